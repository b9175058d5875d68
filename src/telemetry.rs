//! Structured logs for every binary: human-readable by default, JSON lines with `CDC_LOG_FORMAT=json`
//! (for log shippers), level from `RUST_LOG` (default `info`). Logs go to stderr so that a binary's
//! stdout carries only its result (a summary, a report).

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CDC_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.compact().init();
    }
}
