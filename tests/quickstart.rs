//! The README's quickstart, followed as a new user follows it: the config file, `migrate`,
//! `run`, the tail on the exchange, the insert with psql, and the message the tail prints. The
//! steps are read from the README's marked blocks (`<!-- quickstart:NAME -->` before a fenced
//! block), so the README cannot drift from what works. Only the servers' URLs are replaced,
//! by those of a database and a vhost of the test's own; the relay binary stands for
//! `outbox-relay` on the PATH, and the tail runs in this process (examples/tail.rs, with the
//! arguments of the README's `cargo run --example tail` line).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay_testkit::faults::signal;
use outbox_relay_testkit::prelude::*;
use outbox_relay_testkit::vhost::Vhost;

#[allow(dead_code)] // `main` is the example's, unused here
#[path = "../examples/tail.rs"]
mod tail;

/// The README's marked blocks: `<!-- quickstart:NAME -->`, then a fenced block; NAME → its
/// lines.
fn quickstart_blocks(readme: &str) -> BTreeMap<String, String> {
    let mut blocks = BTreeMap::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- quickstart:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "<!-- quickstart:{name} --> is not followed by a fenced block but by {fence:?}"
        );
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        blocks.insert(name.trim().to_owned(), body.join("\n"));
    }
    blocks
}

/// A shell command line split into words (single and double quotes, no expansions).
fn words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut in_word) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The one command of a block, as words, checked to start with `program`.
fn command(blocks: &BTreeMap<String, String>, name: &str, program: &str) -> Vec<String> {
    let block = &blocks[name];
    let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "quickstart:{name} should be one command: {block}"
    );
    let words = words(lines[0]);
    assert_eq!(
        words.first().map(String::as_str),
        Some(program),
        "quickstart:{name}"
    );
    words
}

/// `outbox-relay ARGS` run as the README says, in `dir`, with nothing from the test's
/// environment that configures the relay.
fn relay(dir: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(relay_binary());
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_RELAY") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The test's temp dir and the relay it started: killed and removed at the end, also when
/// the test fails (printing the relay's log then).
struct Workdir {
    dir: PathBuf,
    relay: Option<Child>,
}

impl Workdir {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if let Some(mut child) = self.relay.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- the relay's log ----\n{}\n----", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_quickstart_delivers_the_inserted_event() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let blocks = quickstart_blocks(&readme);
    for name in ["config", "migrate", "run", "tail", "insert", "output"] {
        assert!(
            blocks.contains_key(name),
            "the README has no <!-- quickstart:{name} --> block"
        );
    }

    // The README's servers, from its config block, become the test's own.
    let config = &blocks["config"];
    let urls: Vec<&str> = config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("url = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .collect();
    let [readme_pg, readme_amqp] = urls[..] else {
        panic!("the quickstart config should have a postgres and a rabbitmq url: {config}");
    };
    let name = unique_name("obr_qs");
    let database = Database::create(&servers().postgres_url("postgres"), &name)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let vhost = Vhost::create(servers(), &name)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let own = |text: &str| {
        text.replace(readme_pg, database.url().as_str())
            .replace(readme_amqp, vhost.url().as_str())
    };

    // 1. The config file, in the directory the commands run in.
    let mut work = Workdir {
        dir: std::env::temp_dir().join(&name),
        relay: None,
    };
    std::fs::create_dir_all(&work.dir).expect("create the temp dir");
    let migrate = command(&blocks, "migrate", "outbox-relay");
    let config_file = migrate
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].clone())
        .expect("the migrate command names its --config file");
    std::fs::write(work.dir.join(&config_file), own(config)).expect("write the config");

    // 2. migrate.
    let migrated = relay(&work.dir, &migrate[1..])
        .output()
        .expect("run outbox-relay migrate");
    assert!(
        migrated.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&migrated.stdout),
        String::from_utf8_lossy(&migrated.stderr)
    );

    // 3. run, until it logs the line the README quotes.
    let run = command(&blocks, "run", "outbox-relay");
    let log = std::fs::File::create(work.dir.join("relay.log")).expect("create the log");
    let child = relay(&work.dir, &run[1..])
        .stdout(log.try_clone().expect("clone the log file"))
        .stderr(log)
        .spawn()
        .expect("start outbox-relay run");
    let pid = child.id() as i32;
    work.relay = Some(child);
    let after_run = &readme[readme
        .find("<!-- quickstart:run -->")
        .expect("the run block")..];
    let quoted = after_run
        .split_once("logs `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(line, _)| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .expect("the README quotes the log line of a relay that is connected");
    eventually(&format!("the relay to log {quoted:?}"), || async {
        work.log().contains(&quoted)
    })
    .await;

    // 4. The tail, with the README's arguments.
    let tail_words = command(&blocks, "tail", "cargo");
    let args = &tail_words[tail_words
        .iter()
        .position(|w| w == "--")
        .expect("cargo run ... -- ARGS")
        + 1..];
    assert!(
        args.len() == 2 || args.len() == 3,
        "tail takes AMQP_URL EXCHANGE [BINDING_KEY]: {args:?}"
    );
    let binding = args.get(2).map_or("#", String::as_str);
    let mut tail =
        tokio::time::timeout(TIMEOUT, tail::Tail::bind(&own(&args[0]), &args[1], binding))
            .await
            .expect("the tail to bind within the timeout")
            .unwrap_or_else(|e| panic!("the tail: {e:#}"));

    // 5. The insert, with psql reading the here-document.
    let insert = &blocks["insert"];
    let mut insert_lines = insert.lines();
    let psql = words(insert_lines.next().unwrap_or_default());
    let (program, url, heredoc) = match &psql[..] {
        [program, url, heredoc] => (program, url, heredoc),
        other => panic!("quickstart:insert should start `psql URL <<'END'`: {other:?}"),
    };
    assert_eq!(program, "psql");
    let end = heredoc
        .strip_prefix("<<")
        .expect("a here-document after the URL");
    let sql: Vec<&str> = insert_lines.take_while(|l| l.trim() != end).collect();
    let mut psql = tokio::process::Command::new("psql")
        .arg(own(url))
        .current_dir(&work.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = psql.stdin.take().expect("psql's stdin");
        stdin
            .write_all(format!("{}\n", sql.join("\n")).as_bytes())
            .await
            .expect("write the SQL to psql");
    }
    let inserted = tokio::time::timeout(TIMEOUT, psql.wait_with_output())
        .await
        .expect("psql to finish")
        .expect("psql's output");
    let said = String::from_utf8_lossy(&inserted.stdout).into_owned()
        + &String::from_utf8_lossy(&inserted.stderr);
    assert!(
        inserted.status.success() && said.contains("INSERT 0 1"),
        "psql: {said}"
    );

    // The message the tail prints is the one the README shows.
    let printed = tokio::time::timeout(TIMEOUT, tail.next())
        .await
        .expect("a message within the timeout")
        .unwrap_or_else(|e| panic!("the tail: {e:#}"))
        .expect("the tail's consumer ended");
    assert_eq!(printed.trim_end(), blocks["output"].trim_end());
    tail.close().await;

    // The row is marked published once its confirm is recorded.
    let pool = sqlx::PgPool::connect(database.url().as_str())
        .await
        .expect("connect to the test database");
    eventually("the row to be marked published", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT count(*) = 1 FROM public.outbox WHERE published_at IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    pool.close().await;

    // Ctrl-C: the relay drains and exits 0.
    assert!(signal("-INT", pid), "kill -INT {pid}");
    let mut child = work.relay.take().expect("the relay");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the relay") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the relay exited with {status}");

    drop(work);
    vhost.remove().await.unwrap_or_else(|e| panic!("{e:#}"));
    database.remove().await.unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn command_lines_are_split_as_the_shell_splits_them() {
    assert_eq!(
        words("cargo run -- amqp://h/%2f events '#'"),
        ["cargo", "run", "--", "amqp://h/%2f", "events", "#"]
    );
    assert_eq!(words("psql \"a b\" <<'SQL'"), ["psql", "a b", "<<SQL"]);
    assert_eq!(words("x ''"), ["x", ""]);
}
