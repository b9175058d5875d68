//! What every binary's `main` does around its work: structured logs, a Tokio runtime, and a failure
//! printed as one line (`error: what failed: why`) with exit code 1.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

/// Runs `work` to completion and turns its outcome into the process exit code.
pub fn run<F>(work: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(work) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // Leave without tearing the runtime down: the MongoDB driver's connection-pool task can panic when
    // its runtime goes away under it, which printed a panic after the one-line error.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code)
}

/// For a tool whose output is a listing: a closed stdout (`dead_letters list | head`) ends the process quietly,
/// as it does `ls`, instead of a panic in `println!` (Rust ignores SIGPIPE). Not for the jobs or the service,
/// whose sockets must answer a closed peer with an error, not die.
pub fn stop_at_closed_stdout() {
    // SAFETY: called at the start of `main`, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// This machine's name (a container's, under Docker): what names a process to others.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Resolves at SIGTERM or Ctrl-C: when an orchestrator, or the user, asks the process to stop.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Parses a duration flag: `500ms`, `30s` (or `30`), `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration like 30s, 5m or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}' has an unknown unit; use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}
