//! Measuring what the benchmarks report: rates, a child process's wall time and peak memory, and the
//! machine they ran on.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Items over a time.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub items: u64,
    pub elapsed: Duration,
}

impl Rate {
    pub fn new(items: u64, elapsed: Duration) -> Rate {
        Rate { items, elapsed }
    }

    pub fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    pub fn per_sec(&self) -> f64 {
        self.items as f64 / self.secs().max(1e-9)
    }
}

/// A finished child process.
pub struct Finished {
    pub elapsed: Duration,
    pub peak_rss_kb: u64,
    pub stdout: String,
}

/// Runs `command` to its end (stderr passes through), timing it and reading its peak RSS from the
/// kernel's accounting of waited-for children.
pub fn run_child(mut command: Command) -> Result<Finished> {
    let started = Instant::now();
    let out = command.stderr(Stdio::inherit()).output().with_context(|| format!("running {command:?}"))?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!("{command:?} failed ({})", out.status);
    }
    Ok(Finished { elapsed, peak_rss_kb: children_peak_rss_kb(), stdout: String::from_utf8_lossy(&out.stdout).into() })
}

/// The largest peak RSS of any child waited for so far (the benchmark runs one child at a time).
fn children_peak_rss_kb() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we pass.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } == 0;
    if ok { usage.ru_maxrss as u64 } else { 0 }
}

/// A binary built beside this one (`cargo build --release` builds them all).
pub fn sibling_binary(name: &str) -> Result<std::path::PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!("{} is missing: build every binary first (`cargo build --release`)", path.display());
    }
    Ok(path)
}

/// Cores, memory and CPU model, for the report.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or("unknown CPU".to_owned(), |m| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cores} cores ({model}), {mem_gb} GB")
}
