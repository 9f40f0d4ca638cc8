//! The relay's command line run to completion (`migrate`, `status`, `check-config`, `retry`):
//! its exit code and what it printed.

use std::path::Path;

use crate::env::TestEnv;
use crate::relay::relay_command;
use crate::wait::TIMEOUT;

/// What a CLI command printed and its exit code.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `outbox-relay --config <config> <args>` to completion.
pub async fn run_cli(config: &Path, args: &[&str]) -> CliOutput {
    let mut cmd = tokio::process::Command::from(relay_command(config));
    let out = tokio::time::timeout(TIMEOUT, cmd.args(args).output())
        .await
        .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not finish within {TIMEOUT:?}"))
        .expect("run outbox-relay");
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl TestEnv {
    /// Runs `outbox-relay --config <this test's config> <args>` to completion.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        run_cli(&self.config_path, args).await
    }

    /// Adds `[[outbox]]` tables (`schema.table`, publishing to the test's exchange) to the
    /// config and runs `migrate`, which must succeed; returns what it printed.
    pub async fn add_tables(&self, tables: &[String]) -> CliOutput {
        let mut config = std::fs::read_to_string(&self.config_path).expect("read the config");
        for table in tables {
            config += &format!(
                "\n[[outbox]]\ntable = \"{table}\"\nexchange = \"{}\"\n",
                self.exchange
            );
        }
        std::fs::write(&self.config_path, config).expect("write the config");
        let migrated = self.cli(&["migrate"]).await;
        assert_eq!(migrated.code, 0, "{migrated:?}");
        migrated
    }

    /// `outbox-relay status --json`'s entry for the first table.
    pub async fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]).await;
        assert_eq!(out.code, 0, "{out:?}");
        let all: serde_json::Value =
            serde_json::from_str(&out.stdout).expect("status --json prints JSON");
        all[0].clone()
    }
}
