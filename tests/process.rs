//! The process itself. Under load, its log pipe closed by the reader (`outbox-relay run 2>&1 |
//! head` after `head` exits; journald restarting is the same shape), its log pipe no longer
//! read but kept open (a paused pager, journald stuck), and SIGHUP: none may stop or stall a
//! table or lose a row: every row is still delivered, first deliveries keep per-key order, the
//! health endpoint tells the truth, and SIGTERM still drains and exits 0. And a panic ends the
//! process with an exit code systemd restarts.

use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_relay_testkit::faults::signal;
use outbox_relay_testkit::prelude::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

const KEYS: usize = 20;

/// `outbox-relay run` with stdout and stderr on one pipe (`2>&1 |`), read by the test until
/// it closes its end, or pauses (and later resumes) reading it.
struct PipedRelay {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    close: CancellationToken,
    pause: CancellationToken,
    resume: CancellationToken,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl PipedRelay {
    fn start(env: &TestEnv) -> PipedRelay {
        PipedRelay::start_with(env, None)
    }

    /// Starts the relay with `RUST_LOG` set to `rust_log` (or unset).
    fn start_with(env: &TestEnv, rust_log: Option<&str>) -> PipedRelay {
        // Both ends are close-on-exec: the relay gets only the write end (as its stdout and
        // stderr), so once the test closes the read end its writes fail with EPIPE.
        let (read, write) = std::io::pipe().expect("a pipe");
        let mut command = tokio::process::Command::new(relay_binary());
        command.arg("--config").arg(&env.config_path).arg("run");
        for (key, _) in std::env::vars() {
            if key.starts_with("OUTBOX_RELAY") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
                command.env_remove(key);
            }
        }
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(write.try_clone().expect("clone the pipe's write end"))
            .stderr(write)
            .kill_on_drop(true)
            .spawn()
            .expect("start outbox-relay run");
        // The test's copies of the write end went with `command`.
        drop(command);
        let read = pipe::Receiver::from_owned_fd(OwnedFd::from(read))
            .expect("read the pipe asynchronously");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let close = CancellationToken::new();
        let (pause, resume) = (CancellationToken::new(), CancellationToken::new());
        let reader = tokio::spawn({
            let (lines, close) = (lines.clone(), close.clone());
            let (pause, resume) = (pause.clone(), resume.clone());
            async move {
                let mut read = BufReader::new(read).lines();
                let mut paused = false;
                loop {
                    // `next_line` is cancel safe: a line half read when the pause comes is
                    // finished after the resume.
                    tokio::select! {
                        line = read.next_line() => match line {
                            Ok(Some(line)) => lines.lock().unwrap().push(line),
                            _ => return,
                        },
                        _ = pause.cancelled(), if !paused => {
                            // The read end stays open, unread: the relay's writes fill the
                            // pipe and then wait.
                            paused = true;
                            tokio::select! {
                                _ = resume.cancelled() => {}
                                _ = close.cancelled() => return,
                            }
                        }
                        _ = close.cancelled() => return,
                    }
                }
                // Returning drops the read end: the pipe has no reader any more.
            }
        });
        PipedRelay {
            child,
            lines,
            close,
            pause,
            resume,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id().expect("the relay has not been reaped") as i32
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until the relay wrote a line containing `needle` (while the pipe is read).
    async fn wait_for_log(&self, needle: &str) -> String {
        eventually(&format!("{needle:?} in the relay's output"), || async {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
        })
        .await;
        let lines = self.lines.lock().unwrap();
        lines.iter().find(|l| l.contains(needle)).unwrap().clone()
    }

    /// The reader goes away, as `head` does after its lines: returns once the read end is
    /// closed, and how many lines were read.
    async fn close_pipe(&mut self) -> usize {
        self.close.cancel();
        if let Some(reader) = self.reader.take() {
            reader.await.expect("the pipe's reader");
        }
        self.lines.lock().unwrap().len()
    }

    /// The reader stops reading but keeps the pipe open, as a paused pager does: returns how
    /// many lines were read until then.
    async fn pause_reading(&self) -> usize {
        self.pause.cancel();
        // Time for the reader task to see the pause (it may push a line or two before).
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.lines.lock().unwrap().len()
    }

    /// The reader reads again, to the end of the pipe (the relay has exited): returns every
    /// line read, before and after the pause.
    async fn read_to_end(&mut self) -> Vec<String> {
        self.resume.cancel();
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(TIMEOUT, reader)
                .await
                .expect("the pipe ends once the relay has exited")
                .expect("the pipe's reader");
        }
        self.lines.lock().unwrap().clone()
    }

    /// Waits for the process to exit (at most the tests' [`TIMEOUT`]).
    async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the relay did not exit within {TIMEOUT:?}"))
            .expect("wait for the relay")
    }
}

/// The health endpoint's address, from the relay's start-up line (`addr=127.0.0.1:PORT`).
async fn health_address(relay: &PipedRelay) -> String {
    let line = relay.wait_for_log("health endpoint listening").await;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_closed_by_its_reader_under_load_loses_no_row_and_sigterm_still_drains() {
    let env = TestEnv::new(
        Setup::new()
            .own_vhost()
            .set("health", "listen", "\"127.0.0.1:0\""),
    )
    .await;
    let mut relay = PipedRelay::start(&env);
    let health = health_address(&relay).await;
    let producer = Producer::start(&env, "pipe", KEYS, 20, Duration::from_millis(20));
    env.consumer.wait_for(300).await;

    let read = relay.close_pipe().await;
    let at_close = env.consumer.unique_count();
    // Outages to report after the reader left: the relay loop, the membership and the
    // coordination session all have something to log into the closed pipe.
    env.close_broker_connections().await;
    env.terminate_relay_sessions().await;
    // Rows written after the reader left are relayed too, by a relay that says it is alive.
    env.consumer.wait_for(at_close + 500).await;
    if let Some(status) = relay.child.try_wait().expect("poll the relay") {
        panic!("the relay exited after its log pipe closed ({status})");
    }
    let (live, body) = http_get(&health, "/live").await;
    assert_eq!(live, 200, "/live after the log pipe closed: {body}");
    // What the relay wrote after the close was dropped and counted.
    let dropped = Scrape::of(&health)
        .await
        .value("outbox_relay_log_lines_dropped_total", &[])
        .expect("outbox_relay_log_lines_dropped_total in /metrics");
    assert!(dropped > 0.0, "log lines dropped: {dropped}");
    // Ready again once the outages are over.
    eventually("/ready to answer 200 after the outages", || async {
        http_get(&health, "/ready").await.0 == 200
    })
    .await;

    let written = producer.stop().await;
    env.assert_nothing_lost(written).await;
    assert!(
        signal("-TERM", relay.pid()),
        "kill -TERM {} failed",
        relay.pid()
    );
    let status = relay.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after the log pipe closed: a clean drain exits 0 ({status}); the {read} lines read before the close:\n{}",
        relay.log()
    );
    eprintln!("the pipe closed after {read} lines and {at_close} of {written} rows");
}

/// The relay's `outbox_relay_log_lines_dropped_total`. Bounded: a relay whose runtime waits
/// on a full log pipe does not answer at all.
async fn log_lines_dropped(health: &str) -> f64 {
    const BOUND: Duration = Duration::from_secs(10);
    tokio::time::timeout(BOUND, Scrape::of(health))
        .await
        .unwrap_or_else(|_| panic!("GET /metrics unanswered for {BOUND:?}: the relay is stalled"))
        .value("outbox_relay_log_lines_dropped_total", &[])
        .expect("outbox_relay_log_lines_dropped_total in /metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_under_load_stalls_no_row_and_sigterm_still_exits_0() {
    let env = TestEnv::new(
        Setup::new()
            .own_vhost()
            .set("health", "listen", "\"127.0.0.1:0\""),
    )
    .await;
    // The AMQP client's trace (a few lines per frame, thousands a second under this load):
    // plenty to fill the pipe's 64 KiB and the relay's log queue behind it.
    let mut relay = PipedRelay::start_with(&env, Some("info,lapin=trace"));
    let health = health_address(&relay).await;
    let producer = Producer::start(&env, "stuck", KEYS, 20, Duration::from_millis(20));
    env.consumer.wait_for(100).await;

    let read = relay.pause_reading().await;
    // The pipe fills, then the queue; from then on lines are dropped and counted, and the
    // relay still answers.
    let deadline = Instant::now() + TIMEOUT;
    let mut dropped = 0.0;
    while dropped == 0.0 {
        assert!(
            Instant::now() < deadline,
            "no log line dropped within {TIMEOUT:?} of the pause"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        dropped = log_lines_dropped(&health).await;
    }
    // Rows written while the log is stuck are relayed, also across outages that the relay
    // loop, the membership and the coordination session each log (and renew leases after).
    let at_full = env.consumer.unique_count();
    env.consumer.wait_for(at_full + 300).await;
    env.close_broker_connections().await;
    env.terminate_relay_sessions().await;
    env.consumer.wait_for(at_full + 800).await;
    let (live, body) = http_get(&health, "/live").await;
    assert_eq!(live, 200, "/live while the log pipe is full: {body}");
    eventually("/ready to answer 200 after the outages", || async {
        http_get(&health, "/ready").await.0 == 200
    })
    .await;
    let written = producer.stop().await;
    env.assert_nothing_lost(written).await;
    let dropped_at_end = log_lines_dropped(&health).await;
    assert!(
        dropped_at_end > dropped,
        "lines dropped while the pipe stayed full: {dropped} then {dropped_at_end}"
    );

    // SIGTERM drains and exits 0 with the pipe still full: the last lines wait for it for a
    // bounded time only.
    let stopping = Instant::now();
    assert!(
        signal("-TERM", relay.pid()),
        "kill -TERM {} failed",
        relay.pid()
    );
    let status = relay.wait_exit().await;
    let took = stopping.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM with the log pipe full ({status})"
    );
    // Then the reader comes back: what the pipe held is there to read, up to its end.
    let lines = relay.read_to_end().await;
    let after_pause: usize = lines[read..].iter().map(|l| l.len() + 1).sum();
    assert!(
        after_pause >= 32 * 1024,
        "the pipe held {after_pause} bytes: it never filled"
    );
    eprintln!(
        "{dropped_at_end} log lines dropped; exit took {took:?} after SIGTERM; {after_pause} \
         bytes in the pipe; {written} rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_is_logged_and_ignored_and_sigterm_still_drains() {
    let env = TestEnv::new(Setup::new()).await;
    let mut relay = env.start_relay();
    let producer = Producer::start(&env, "hup", KEYS, 20, Duration::from_millis(20));
    env.consumer.wait_for(300).await;

    const IGNORED: &str = "SIGHUP ignored";
    for sent in 1..=2 {
        assert!(signal("-HUP", relay.pid()), "kill -HUP {}", relay.pid());
        // One line per signal, saying what to do instead (or the relay is gone: say so now).
        let deadline = Instant::now() + TIMEOUT;
        while relay.log().matches(IGNORED).count() < sent {
            if !relay.is_running() {
                let status = relay.wait_exit().await;
                panic!("SIGHUP #{sent} stopped the relay ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "no {IGNORED:?} line #{sent} within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let at_signal = env.consumer.unique_count();
        env.consumer.wait_for(at_signal + 300).await;
        assert!(relay.is_running(), "SIGHUP #{sent} stopped the relay");
    }
    assert!(
        relay.log().contains("restart the service to apply changes"),
        "{}",
        relay.log()
    );

    let written = producer.stop().await;
    env.assert_nothing_lost(written).await;
    relay.sigterm();
    let status = relay.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", relay.log());
    assert!(relay.log().contains("relay stopped"), "{}", relay.log());
}

#[test]
fn the_exit_code_after_a_panic_is_one_systemd_restarts() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/outbox-relay.service"
    ))
    .expect("read the unit");
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(values("Restart"), ["on-failure"]);
    let prevented: Vec<String> = values("RestartPreventExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(
        !prevented.contains(&outbox_relay::service::EX_SOFTWARE.to_string()),
        "RestartPreventExitStatus={prevented:?} keeps a relay that panicked down"
    );
}

/// A CLI command whose output's reader is already gone (`outbox-relay status | head -1` once
/// `head` has its line) ends at its first write the way `cat` and `grep` do: killed by SIGPIPE
/// (141 in the shell), with nothing on stderr about it: no panic, no "panicked" log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_command_whose_stdout_reader_is_gone_ends_quietly_by_sigpipe() {
    use std::os::unix::process::ExitStatusExt;
    const SIGPIPE: i32 = 13;
    let env = TestEnv::new(Setup::new()).await;
    let commands: [&[&str]; 4] = [
        &["status"],
        &["status", "--json"],
        &["check-config"],
        &["migrate"],
    ];
    for args in commands {
        let (read, write) = std::io::pipe().expect("a pipe");
        // Closed before the command writes anything.
        drop(read);
        let mut command = tokio::process::Command::new(relay_binary());
        command.arg("--config").arg(&env.config_path).args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("OUTBOX_RELAY") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
                command.env_remove(key);
            }
        }
        // Spawned, not `output()`, which would give it a fresh stdout pipe.
        let child = command
            .stdin(Stdio::null())
            .stdout(write)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start outbox-relay");
        drop(command);
        let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not end within {TIMEOUT:?}"))
            .expect("run outbox-relay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(SIGPIPE),
            "outbox-relay {args:?} with its stdout closed: {}; stderr:\n{stderr}",
            out.status
        );
        assert!(
            !stderr.contains("panicked"),
            "outbox-relay {args:?}: stderr:\n{stderr}"
        );
    }
}

/// A stop under systemd: the drain (shutdown_timeout), the final mark (bounded by PostgreSQL's
/// statement timeout), then up to `EXIT_FLUSH` for the last log lines when journald does not
/// read; all of it inside TimeoutStopSec, or systemd kills the relay before its exit code.
#[test]
fn the_unit_waits_for_a_stop_longer_than_the_drain_the_final_mark_and_the_log_flush() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/outbox-relay.service"
    ))
    .expect("read the unit");
    let stop = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec in the unit");
    let stop = humantime::parse_duration(stop).expect("TimeoutStopSec in seconds");
    let drain = outbox_relay::config::RelaySettings::default().shutdown_timeout;
    let final_mark = Duration::from_secs(30);
    assert!(
        stop > drain + final_mark + outbox_relay::telemetry::EXIT_FLUSH,
        "TimeoutStopSec={stop:?}"
    );
}
