//! Shell completions and the man page, generated from the CLI definition itself ([`Cli`]), so
//! they list exactly the commands and options the parser accepts. Prints to standard output;
//! reads no config and touches no server.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;

/// The shells `outbox-relay completions` writes a script for.
pub use clap_complete::Shell;

/// Writes the completion script for `shell` (bash, zsh, fish, elvish, powershell).
pub fn completions(shell: Shell, out: &mut dyn Write) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "outbox-relay", out);
}

/// Writes the man pages into `dir`, the way git's are split: outbox-relay(1) for the program
/// and its commands, and one page per command (outbox-relay-run(1), outbox-relay-migrate(1),
/// ...) with that command's options and example. Returns the files written.
pub fn man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    clap_mangen::generate_to(Cli::command(), dir)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("outbox-relay") && n.ends_with(".1"))
        })
        .collect();
    written.sort();
    Ok(written)
}
