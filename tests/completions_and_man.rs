//! Shell completions and man pages, as a packager or an operator generates them: from the
//! binary alone, with no config file and no server, listing every command the parser accepts.

use std::process::Command;

use outbox_relay_testkit::relay::binary;

/// The commands `outbox-relay --help` lists (the parser's own list, read from its output).
fn commands() -> Vec<String> {
    let help = Command::new(binary())
        .arg("--help")
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let listed: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(listed.len() >= 6, "too few commands in:\n{help}");
    listed
}

#[test]
fn completions_name_every_command_and_need_no_config() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(binary())
            .args(["--config", "/nonexistent/relay.toml", "completions", shell])
            .output()
            .expect("completions");
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for command in commands() {
            assert!(
                script.contains(&command),
                "{shell} completion lacks {command}"
            );
        }
    }
    let bad = Command::new(binary())
        .args(["completions", "tcsh"])
        .output()
        .expect("completions");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
}

#[test]
fn man_pages_are_written_for_the_program_and_each_command() {
    let dir = ManDir::new();
    let out = Command::new(binary())
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .output()
        .expect("man");
    assert!(out.status.success(), "{out:?}");
    let main = std::fs::read_to_string(dir.path().join("outbox-relay.1")).expect("outbox-relay.1");
    assert!(main.contains(".TH outbox-relay 1"), "{main}");
    for command in commands() {
        let page = dir.path().join(format!("outbox-relay-{command}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(".SH SYNOPSIS"), "{}", page.display());
        assert!(
            main.contains(&format!(
                "outbox\\-relay\\-{}(1)",
                command.replace('-', "\\-")
            )),
            "outbox-relay(1) does not point to outbox-relay-{command}(1)"
        );
    }
    // Printed: the files written, one per line.
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.lines().count(), commands().len() + 1, "{printed}");

    let missing = Command::new(binary())
        .args(["man", "--out-dir", "/nonexistent/man1"])
        .output()
        .expect("man");
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/man1"),
        "{missing:?}"
    );
}

/// A directory of the test's own, removed afterwards.
struct ManDir(std::path::PathBuf);

impl ManDir {
    fn new() -> ManDir {
        let dir = std::env::temp_dir().join(format!("outbox-relay-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the man directory");
        ManDir(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ManDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
