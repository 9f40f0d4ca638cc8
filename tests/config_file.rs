//! The commented example config/outbox-relay.toml is the config reference: it must load, state
//! the real defaults, and mention every setting the code knows. Environment overrides are
//! checked in a child process (the environment is process-global and tests run in parallel
//! threads) and through the real binary, so no test here changes this process's environment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outbox_relay::config::{
    ColumnsSettings, DebeziumSettings, ExchangeType, LogFormat, OnExhausted, OnPublished,
    PayloadType, RabbitTlsSettings, Settings, TableName, EX_CONFIG,
};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/outbox-relay.toml");
const BINARY: &str = env!("CARGO_BIN_EXE_outbox-relay");
const ENV_PREFIX: &str = "OUTBOX_RELAY__";
/// Set only in the child process that `an_environment_variable_overrides_a_key_of_the_file` starts.
const CHILD_MARKER: &str = "OUTBOX_RELAY_CONFIG_FILE_TEST_CHILD";

/// Loads `path`, refusing to run when the environment already carries overrides that would
/// make the assertions about the file meaningless.
fn load(path: &Path) -> Settings {
    let inherited: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(ENV_PREFIX))
        .collect();
    assert!(
        inherited.is_empty() || std::env::var_os(CHILD_MARKER).is_some(),
        "unset {inherited:?} to run these tests: they check what the file alone says"
    );
    Settings::load(path).unwrap_or_else(|e| panic!("{e}"))
}

/// A file in the temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "outbox-relay-config-file-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("writing a temp config");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_example_config_loads_with_the_values_it_states() {
    let s = load(Path::new(EXAMPLE));

    assert_eq!(
        s.postgres.url.expose(),
        "postgres://postgres@127.0.0.1:5432/app"
    );
    assert_eq!(s.postgres.max_connections, 4);
    assert_eq!(s.postgres.connect_timeout, Duration::from_secs(10));
    assert_eq!(s.postgres.statement_timeout, Duration::from_secs(30));

    assert_eq!(
        s.rabbitmq.url.to_string(),
        "amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(s.rabbitmq.connection_name, "outbox-relay");
    assert_eq!(s.rabbitmq.connect_timeout, Duration::from_secs(10));
    assert_eq!(s.rabbitmq.confirm_timeout, Duration::from_secs(30));
    assert_eq!(s.rabbitmq.max_message_bytes, 128 * 1024 * 1024);

    assert_eq!(s.relay.batch_size, 1000);
    assert_eq!(s.relay.poll_interval, Duration::from_secs(1));
    assert_eq!(s.relay.max_in_flight, 1000);
    assert!(s.relay.notify);
    assert_eq!(s.relay.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(s.relay.reconnect_max_delay, Duration::from_secs(30));
    assert_eq!(s.relay.heartbeat, Duration::from_secs(2));
    assert_eq!(s.relay.lease, None);
    assert_eq!(s.lease(), Duration::from_secs(66));
    assert_eq!(s.relay.channels, 1);

    assert_eq!(s.retry.initial_delay, Duration::from_secs(1));
    assert_eq!(s.retry.max_delay, Duration::from_secs(300));
    assert_eq!(s.retry.multiplier, 2.0);
    assert_eq!(s.retry.jitter, 0.2);
    assert_eq!(s.retry.max_attempts, 10);
    assert_eq!(s.retry.on_exhausted, OnExhausted::HoldKey);

    assert_eq!(s.log.format, LogFormat::Text);
    assert_eq!(s.log.level, "info");

    assert_eq!(s.outbox.len(), 1);
    let table = &s.outbox[0];
    assert_eq!(table.table, TableName::parse("public.outbox").unwrap());
    assert_eq!(table.exchange, "events");
    // What is off by default stays off in the reference: copying it changes nothing.
    assert!(table.declare_exchange.is_none());
    assert!(s.health.listen.is_none());
    assert_eq!(table.retry.max_attempts, Some(10));
    assert_eq!(table.retry.on_exhausted, Some(OnExhausted::HoldKey));
    assert_eq!(table.on_published, OnPublished::Mark);
    assert_eq!(table.retention, None);
    assert_eq!(table.partitions, 256);
}

#[test]
fn every_default_the_example_states_is_the_default_the_code_applies() {
    let example = load(Path::new(EXAMPLE));
    // Only the required keys: everything else comes from the code's defaults.
    let minimal = TempFile::new(
        "minimal",
        r#"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/app"

[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[[outbox]]
table = "public.outbox"
exchange = "events"
"#,
    );
    let defaults = load(&minimal.0);

    let (e, d) = (&example.postgres, &defaults.postgres);
    assert_eq!(
        (e.max_connections, e.connect_timeout, e.statement_timeout),
        (d.max_connections, d.connect_timeout, d.statement_timeout)
    );
    let (e, d) = (&example.rabbitmq, &defaults.rabbitmq);
    assert_eq!(
        (
            &e.connection_name,
            e.connect_timeout,
            e.confirm_timeout,
            e.max_message_bytes
        ),
        (
            &d.connection_name,
            d.connect_timeout,
            d.confirm_timeout,
            d.max_message_bytes
        )
    );
    let (e, d) = (&example.relay, &defaults.relay);
    assert_eq!(
        (
            e.batch_size,
            e.poll_interval,
            e.max_in_flight,
            e.notify,
            e.shutdown_timeout,
            e.reconnect_max_delay,
            e.heartbeat,
            example.lease(),
            e.channels
        ),
        (
            d.batch_size,
            d.poll_interval,
            d.max_in_flight,
            d.notify,
            d.shutdown_timeout,
            d.reconnect_max_delay,
            d.heartbeat,
            defaults.lease(),
            d.channels
        )
    );
    assert_eq!(example.outbox[0].partitions, defaults.outbox[0].partitions);
    let (e, d) = (&example.retry, &defaults.retry);
    assert_eq!(
        (
            e.initial_delay,
            e.max_delay,
            e.multiplier,
            e.jitter,
            e.max_attempts,
            e.on_exhausted
        ),
        (
            d.initial_delay,
            d.max_delay,
            d.multiplier,
            d.jitter,
            d.max_attempts,
            d.on_exhausted
        )
    );
    assert_eq!(
        (example.log.format, &example.log.level),
        (defaults.log.format, &defaults.log.level)
    );

    // A table marks its published rows and keeps them unless it sets a retention.
    assert_eq!(
        defaults.outbox[0].on_published,
        example.outbox[0].on_published
    );
    assert_eq!(defaults.outbox[0].retention, None);
    // The per-table override in the example restates the global policy, so it changes nothing.
    let effective = example.retry.with_override(&example.outbox[0].retry);
    assert_eq!(
        (effective.max_attempts, effective.on_exhausted),
        (d.max_attempts, d.on_exhausted)
    );
    // The declaration's `durable` defaults to true when left out.
    let declared = TempFile::new(
        "declared",
        r#"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/app"
[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[[outbox]]
table = "outbox"
exchange = "events"
declare_exchange = { type = "fanout" }
"#,
    );
    let declared = load(&declared.0);
    let declaration = declared.outbox[0].declare_exchange.as_ref().unwrap();
    assert_eq!(declaration.kind, ExchangeType::Fanout);
    assert!(declaration.durable);
}

#[test]
fn the_example_config_mentions_every_setting_the_code_knows() {
    let settings = load(Path::new(EXAMPLE));
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    // Uncommented lines only: a key that appears only in a comment is not shown in use.
    let live: String = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    // `Debug` of the settings names every field of every section, including the per-table
    // overrides that are `None`; a field added to the code without a line in the example
    // fails here.
    let debug = format!("{settings:?}");
    let mut missing = Vec::new();
    for field in debug_field_names(&debug) {
        let key = match field.as_str() {
            // TableName's parts, written together as `table = "schema.table"`.
            "schema" | "name" => continue,
            // ExchangeDeclaration::kind is `type` in TOML.
            "kind" => "type".to_owned(),
            // `[rabbitmq.tls]` names certificate files and needs an amqps:// URL, so the
            // example shows it commented out; its keys are checked below.
            "tls" => continue,
            // An adopted table's column mapping (one of the two, for a table the application
            // made): shown commented out, its keys checked below. `mapping` is what load
            // resolves them into, not a key.
            "columns" | "debezium" | "mapping" => continue,
            // Where the spans go: resolved at load from `otlp_endpoint` and the OTEL_ variables.
            "traces_url" => continue,
            // Derived from other settings unless set: shown commented out with its default.
            "lease" => {
                if !example.contains("# lease = ") {
                    missing.push("lease (commented out)".to_owned());
                }
                continue;
            }
            // Off unless set: shown commented out with an example value, so copying the
            // reference changes nothing.
            "retention"
            | "declare_exchange"
            | "listen"
            | "otlp_endpoint"
            | "cloudevents_source"
            | "cloudevents_extensions" => {
                if !example.contains(&format!("# {field} = ")) {
                    missing.push(format!("{field} (commented out)"));
                }
                continue;
            }
            // The alternative to `url` (one of the two, never both): shown commented out.
            "url_file" => {
                if !example.contains("# url_file = ") {
                    missing.push("url_file (commented out)".to_owned());
                }
                continue;
            }
            other => other.to_owned(),
        };
        let shown = live.contains(&format!("{key} ="))
            || live.contains(&format!("[{key}]"))
            || live.contains(&format!("[[{key}]]"))
            || live.contains(&format!(".{key}]"));
        if !shown && !missing.contains(&key) {
            missing.push(key);
        }
    }
    let tls = format!("{:?}", RabbitTlsSettings::default());
    let debezium = format!("{:?}", DebeziumSettings::default());
    // Every field named, so a new one fails to compile here until it is listed.
    let columns = format!(
        "{:?}",
        ColumnsSettings {
            dedup_key: String::new(),
            ordering_key: String::new(),
            routing_key: None,
            routing_key_template: None,
            event_type: String::new(),
            payload: String::new(),
            payload_type: PayloadType::Jsonb,
            content_type: None,
            headers: None,
            header_columns: Vec::new(),
            exchange: None,
            created_at: None,
            trace_context: None,
        }
    );
    for key in std::iter::once("[rabbitmq.tls]".to_owned())
        .chain(debug_field_names(&tls).iter().map(|k| format!("{k} =")))
        .chain([
            "[outbox.columns]".to_owned(),
            "[outbox.debezium]".to_owned(),
        ])
        .chain(
            debug_field_names(&debezium)
                .iter()
                .map(|k| format!("{k} =")),
        )
        .chain(debug_field_names(&columns).iter().map(|k| format!("{k} =")))
    {
        if !example.contains(&format!("# {key}")) {
            missing.push(key);
        }
    }
    assert!(
        missing.is_empty(),
        "settings missing from {EXAMPLE}: {missing:?}"
    );
}

/// The identifiers directly before `: ` in a derived `Debug` text.
fn debug_field_names(debug: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in debug.match_indices(": ") {
        let before = &debug[..at];
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = &before[start..];
        if !name.is_empty() && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

#[test]
fn an_environment_variable_overrides_a_key_of_the_file() {
    // Run the ignored test below in a fresh process of this test binary, with the variable
    // set there only.
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "the_example_config_with_an_override_in_the_environment",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MARKER, "1")
        .env("OUTBOX_RELAY__RELAY__BATCH_SIZE", "500")
        .env("OUTBOX_RELAY__LOG__FORMAT", "json")
        .env(
            "OUTBOX_RELAY__RABBITMQ__URL",
            "amqp://relay:s3cret@10.0.0.7:5672/prod",
        );
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)) {
        child.env_remove(key);
    }
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the child failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "the child test did not run:\n{stdout}"
    );
}

#[test]
#[ignore = "run in a child process by an_environment_variable_overrides_a_key_of_the_file"]
fn the_example_config_with_an_override_in_the_environment() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        eprintln!("skipped: only meaningful in the child process its parent test starts");
        return;
    }
    let s = load(Path::new(EXAMPLE));
    assert_eq!(s.relay.batch_size, 500);
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(
        s.rabbitmq.url.nodes()[0].expose(),
        "amqp://relay:s3cret@10.0.0.7:5672/prod"
    );
    assert!(
        !format!("{s:?}").contains("s3cret"),
        "Debug of the settings shows the password"
    );
    // Keys not overridden still come from the file.
    assert_eq!(s.relay.max_in_flight, 1000);
    assert_eq!(
        s.postgres.url.expose(),
        "postgres://postgres@127.0.0.1:5432/app"
    );
    assert_eq!(s.outbox[0].exchange, "events");
}

/// Runs the real binary's `status` with `envs`; configuration errors stop it before it
/// reaches any server.
fn binary_status(config: Option<&str>, envs: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BINARY);
    if let Some(config) = config {
        cmd.args(["--config", config]);
    }
    cmd.arg("status").env_remove("OUTBOX_RELAY_CONFIG");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)) {
        cmd.env_remove(key);
    }
    cmd.envs(envs.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_invalid_environment_override_is_named_by_its_variable_and_not_blamed_on_the_file() {
    let (code, stderr) = binary_status(Some(EXAMPLE), &[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "0")]);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(
        stderr.contains(
            "invalid configuration in the environment:\n  - OUTBOX_RELAY__RELAY__BATCH_SIZE \
             (relay.batch_size): expected 1 to 10000, got 0"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains(EXAMPLE), "the file is blamed: {stderr}");

    let (code, stderr) = binary_status(Some(EXAMPLE), &[("OUTBOX_RELAY__RELAY__BATCH_SIZ", "50")]);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(
        stderr.contains(
            "OUTBOX_RELAY__RELAY__BATCH_SIZ (relay.batch_siz): unknown key; did you mean \
             batch_size?"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains(EXAMPLE), "the file is blamed: {stderr}");
}

#[test]
fn the_outbox_tables_cannot_be_set_from_the_environment_and_the_error_says_so() {
    let (code, stderr) = binary_status(Some(EXAMPLE), &[("OUTBOX_RELAY__OUTBOX__TABLE", "x")]);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(
        stderr.contains(
            "OUTBOX_RELAY__OUTBOX__TABLE: the [[outbox]] tables are set in the config file only"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("map"), "{stderr}");
}

#[test]
fn numbers_and_booleans_from_the_environment_are_text_and_read_as_the_key_expects() {
    // Valid overrides of every type: the config loads (status then fails to reach the servers
    // named by the example, which is not a configuration error).
    let (code, stderr) = binary_status(
        Some(EXAMPLE),
        &[
            ("OUTBOX_RELAY__RELAY__NOTIFY", "false"),
            ("OUTBOX_RELAY__RETRY__MULTIPLIER", "1.5"),
            ("OUTBOX_RELAY__RETRY__MAX_ATTEMPTS", "3"),
            ("OUTBOX_RELAY__RETRY__INITIAL_DELAY", "250ms"),
            (
                "OUTBOX_RELAY__POSTGRES__URL",
                "postgres://postgres@127.0.0.1:1/app",
            ),
            ("OUTBOX_RELAY__POSTGRES__CONNECT_TIMEOUT", "2s"),
        ],
    );
    assert_ne!(code, EX_CONFIG, "{stderr}");
    let (code, stderr) = binary_status(
        Some(EXAMPLE),
        &[
            ("OUTBOX_RELAY__RELAY__NOTIFY", "yes"),
            ("OUTBOX_RELAY__RETRY__INITIAL_DELAY", "5"),
            ("OUTBOX_RELAY__RETRY__MAX_ATTEMPTS", "three"),
        ],
    );
    assert_eq!(code, EX_CONFIG, "{stderr}");
    for expected in [
        "OUTBOX_RELAY__RELAY__NOTIFY (relay.notify): expected true or false, found \"yes\"",
        "OUTBOX_RELAY__RETRY__INITIAL_DELAY (retry.initial_delay): expected a duration as text, \
         like \"5s\"",
        "OUTBOX_RELAY__RETRY__MAX_ATTEMPTS (retry.max_attempts): expected an integer, found \
         \"three\"",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
}

/// `check-config` of the file `text` (with no environment overrides): its exit code and stderr.
fn check_text(name: &str, text: &str) -> (i32, String) {
    let file = TempFile::new(name, text);
    let (code, _, stderr) = check_config(&file.0);
    (code, stderr)
}

const SERVERS: &str = "[postgres]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n\
     [rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n";
const ONE_TABLE: &str = "[[outbox]]\ntable = \"outbox\"\nexchange = \"events\"\n";

#[test]
fn the_file_s_types_are_strict_and_each_error_names_the_expected_type() {
    let (code, stderr) = check_text(
        "strict-types",
        &format!(
            "{SERVERS}[relay]\nnotify = \"yes\"\n[retry]\nmax_attempts = \"3\"\n\
             initial_delay = 5\nmultiplier = 2\n{ONE_TABLE}\
             [outbox.retry]\nmax_attempts = 2.5\n"
        ),
    );
    assert_eq!(code, EX_CONFIG, "{stderr}");
    for expected in [
        "relay.notify: expected a boolean (true or false), found a string \"yes\"",
        "retry.max_attempts: expected an integer, found a string \"3\"",
        "retry.initial_delay: expected a duration as text, like \"5s\", \"250ms\" or \"1h 30m\", \
         found an integer 5",
        "outbox[0].retry.max_attempts: expected an integer, found a float 2.5",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
    // An integer where a float is expected is a number all the same.
    assert!(!stderr.contains("multiplier"), "{stderr}");

    let (code, stderr) = check_text(
        "strict-bool",
        &format!("{SERVERS}[relay]\nnotify = 0\n{ONE_TABLE}"),
    );
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(
        stderr.contains("relay.notify: expected a boolean (true or false), found an integer 0"),
        "{stderr}"
    );
}

#[test]
fn a_single_bracket_outbox_table_is_answered_with_the_fix() {
    let (code, stderr) = check_text(
        "single-bracket",
        &format!("{SERVERS}[outbox]\ntable = \"outbox\"\nexchange = \"events\"\n"),
    );
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(
        stderr.contains(
            "outbox: `[outbox]` is a table; write `[[outbox]]` (two brackets), one for each \
             outbox table"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("sequence"), "{stderr}");
}

#[test]
fn each_problem_is_reported_once() {
    let (code, stderr) = check_text("no-outbox", SERVERS);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "outbox-relay: invalid configuration in {}:\n  - outbox: required section is missing",
            std::env::temp_dir()
                .join(format!(
                    "outbox-relay-config-file-{}-no-outbox.toml",
                    std::process::id()
                ))
                .display()
        )
    );
    // A required key of the wrong type is one problem, not also a missing key.
    let (code, stderr) = check_text(
        "wrong-required",
        &format!("{SERVERS}[[outbox]]\ntable = \"outbox\"\nexchange = 7\n"),
    );
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert_eq!(stderr.matches("outbox[0].exchange").count(), 1, "{stderr}");
}

#[test]
fn the_binary_never_prints_a_password_from_an_overridden_url() {
    let (code, stderr) = binary_status(
        Some(EXAMPLE),
        &[(
            "OUTBOX_RELAY__POSTGRES__URL",
            "mysql://app:hunter2@db.example:3306/app",
        )],
    );
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(stderr.contains("postgres.url"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn the_binary_finds_its_config_through_outbox_relay_config() {
    let missing = std::env::temp_dir().join("outbox-relay-config-file-test-no-such-file.toml");
    let missing = missing.to_str().unwrap();
    let (code, stderr) = binary_status(None, &[("OUTBOX_RELAY_CONFIG", missing)]);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(stderr.contains(missing), "{stderr}");
    assert!(stderr.contains("file not found"), "{stderr}");
}

/// Passwords written without percent-encoding: the URL parser's delimiters, nothing but `@`,
/// the host's own name, non-ASCII letters.
const HOSTILE_PASSWORDS: [&str; 5] = [
    "p@ss/w:rd?#%",
    "@@@",
    "x-mq.internal-db.internal-y",
    "pä$$wörd✓ ünï",
    "s3cr3t,amqp:/x",
];

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Runs the real binary's `check-config` on `config`; returns its exit code, stdout and stderr.
fn check_config(config: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(BINARY);
    cmd.args(["--config", &config.display().to_string(), "check-config"])
        .env_remove("OUTBOX_RELAY_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)) {
        cmd.env_remove(key);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn no_password_reaches_the_output_of_a_refused_config_whatever_characters_it_holds() {
    const PG_OK: &str = "postgres://relay@db.internal:5432/app";
    const AMQP_OK: &str = "amqp://relay@mq.internal:5672/%2f";
    for (n, password) in HOSTILE_PASSWORDS.iter().enumerate() {
        let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
        // (what the case is, [postgres] lines, [rabbitmq] lines, the key the error must name);
        // each URL is refused, for its password's characters or for a parameter.
        let url_file = std::env::temp_dir().join(format!(
            "outbox-relay-config-file-{}-hostile-{n}.url",
            std::process::id()
        ));
        let cases: Vec<(&str, String, String, &str)> = vec![
            (
                "amqp",
                format!("url = {}", toml_string(PG_OK)),
                format!(
                    "url = {}",
                    toml_string(&format!(
                        "amqp://relay:{password}@mq.internal:5672/%2f?heartbeat=abc"
                    ))
                ),
                "rabbitmq.url",
            ),
            (
                "amqps, the second of two nodes",
                format!("url = {}", toml_string(PG_OK)),
                format!(
                    "url = [{}, {}]",
                    toml_string("amqps://relay@mq-a.internal/%2f"),
                    toml_string(&format!(
                        "amqps://relay:{password}@mq-b.internal/%2f?frame_max=x"
                    ))
                ),
                "rabbitmq.url[1]",
            ),
            (
                "amqp, a password at the end and no host",
                format!("url = {}", toml_string(PG_OK)),
                format!("url = {}", toml_string(&format!("amqp://relay:{password}"))),
                "rabbitmq.url",
            ),
            (
                "postgres, one host",
                format!(
                    "url = {}",
                    toml_string(&format!(
                        "postgres://relay:{password}@db.internal:5432/app?connect_timeout=abc"
                    ))
                ),
                format!("url = {}", toml_string(AMQP_OK)),
                "postgres.url",
            ),
            (
                "postgres, several hosts",
                format!(
                    "url = {}",
                    toml_string(&format!(
                        "postgresql://relay:{password}@db-a.internal:5432,db-b.internal:5433/app?sslmode=bogus"
                    ))
                ),
                format!("url = {}", toml_string(AMQP_OK)),
                "postgres.url",
            ),
            (
                "postgres, a password at the end and no host",
                format!(
                    "url = {}",
                    toml_string(&format!("postgres://relay:{password}"))
                ),
                format!("url = {}", toml_string(AMQP_OK)),
                "postgres.url",
            ),
            (
                "postgres key=value, quoted",
                format!(
                    "url = {}",
                    toml_string(&format!(
                        "host=db.internal,db-b.internal user=relay password='{quoted}' dbname=app sslmode=bogus"
                    ))
                ),
                format!("url = {}", toml_string(AMQP_OK)),
                "postgres.url",
            ),
            (
                "postgres key=value, unquoted",
                format!(
                    "url = {}",
                    toml_string(&format!(
                        "host=db.internal user=relay password={password} dbname=app keepalives=1"
                    ))
                ),
                format!("url = {}", toml_string(AMQP_OK)),
                "postgres.url",
            ),
            (
                "postgres.url_file",
                format!("url_file = {}", toml_string(&url_file.display().to_string())),
                format!("url = {}", toml_string(AMQP_OK)),
                "postgres.url_file",
            ),
            (
                "rabbitmq.url_file",
                format!("url = {}", toml_string(PG_OK)),
                format!("url_file = {}", toml_string(&url_file.display().to_string())),
                "rabbitmq.url_file",
            ),
        ];
        for (case, postgres, rabbitmq, key) in cases {
            let file_url = match key {
                "postgres.url_file" => {
                    format!(
                        "postgres://relay:{password}@db.internal/app?application_name=x&bogus=1"
                    )
                }
                _ => format!("amqp://relay:{password}@mq.internal/%2f?heartbeat=-1"),
            };
            std::fs::write(&url_file, format!("{file_url}\n")).unwrap();
            let config = TempFile::new(
                &format!("hostile-{n}"),
                &format!(
                    "[postgres]\n{postgres}\n[rabbitmq]\n{rabbitmq}\n\
                     [[outbox]]\ntable = \"outbox\"\nexchange = \"events\"\n"
                ),
            );
            let (code, stdout, stderr) = check_config(&config.0);
            let shown = format!("{stdout}\n{stderr}");
            assert_eq!(code, EX_CONFIG, "{case}, password {password:?}:\n{shown}");
            assert!(
                stderr.contains(&format!("{key}: ")),
                "{case}, password {password:?}: the error names {key}:\n{shown}"
            );
            assert!(
                !shown.contains(password),
                "{case}: the password {password:?} is shown:\n{shown}"
            );
            // Nor the pieces a parser would take for a host, a path or a query.
            for piece in ["ss/w", "w:rd", "wörd", "3t,amqp"] {
                if password.contains(piece) {
                    assert!(
                        !shown.contains(piece),
                        "{case}: {piece:?} of the password {password:?} is shown:\n{shown}"
                    );
                }
            }
        }
        let _ = std::fs::remove_file(&url_file);
    }
}

#[test]
fn a_toml_error_in_a_url_line_is_reported_without_the_line() {
    // A `"` in the password ends the TOML string early.
    let config = TempFile::new(
        "toml-quote",
        "[postgres]\nurl = \"postgres://relay:pg-\"s3cret@db.internal/app\"\n\
         [rabbitmq]\nurl = \"amqp://relay@mq.internal/%2f\"\n\
         [[outbox]]\ntable = \"outbox\"\nexchange = \"events\"\n",
    );
    let (code, stdout, stderr) = check_config(&config.0);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("s3cret"), "{stderr}");
}

#[test]
fn unquoted_table_names_fold_to_lower_case_and_quoted_ones_keep_their_case() {
    let config = TempFile::new(
        "table-names",
        r#"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/app"
[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[[outbox]]
table = "Sales.OutBox"
exchange = "events"
[[outbox]]
table = 'sales."OutBox"'
exchange = "events"
"#,
    );
    let s = load(&config.0);
    assert_eq!(s.outbox[0].table, TableName::parse("sales.outbox").unwrap());
    assert_eq!(s.outbox[0].table.to_string(), "sales.outbox");
    assert_eq!(s.outbox[1].table.name, "OutBox");
    assert_eq!(s.outbox[1].table.quoted(), "\"sales\".\"OutBox\"");

    // The same table twice, spelled two ways, is one table configured twice.
    let twice = TempFile::new(
        "table-names-twice",
        r#"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/app"
[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[[outbox]]
table = "public.OutBox"
exchange = "events"
[[outbox]]
table = "outbox"
exchange = "events"
"#,
    );
    let (code, _, stderr) = check_config(&twice.0);
    assert_eq!(code, EX_CONFIG, "{stderr}");
    assert!(
        stderr.contains("outbox[1].table: public.outbox is configured twice"),
        "{stderr}"
    );
}
