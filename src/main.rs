//! The `outbox-relay` binary: parse arguments, run the command, map the outcome to an exit code.

// The relay allocates and frees a row, its strings and its message body per event; glibc's
// malloc showed up at ~15% of the relay's CPU in perf, mimalloc is made for this pattern.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = <outbox_relay::cli::Cli as clap::Parser>::parse();
    // A panic outside any task (the panic hook has logged it) exits like one inside a task.
    let code = std::panic::catch_unwind(|| outbox_relay::cli::main(cli))
        .unwrap_or(outbox_relay::service::EX_SOFTWARE);
    // The last lines ("relay stopped", the error or the panic) may still be in the log's
    // queue; `exit` would drop them.
    outbox_relay::telemetry::flush(outbox_relay::telemetry::EXIT_FLUSH);
    std::process::exit(code);
}
