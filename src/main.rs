//! The `outbox-relay` binary: parse arguments, run the command, map the outcome to an exit code.

fn main() {
    let cli = <outbox_relay::cli::Cli as clap::Parser>::parse();
    std::process::exit(outbox_relay::cli::main(cli));
}
