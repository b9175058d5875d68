//! Measuring what the benchmarks report: rates, a child process's wall time, CPU and peak memory, latency
//! quantiles from a job's Prometheus histogram, and the machine they ran on.

use std::collections::{BTreeMap, HashMap};
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

/// CPU time and peak memory of a running process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    pub cpu_secs: f64,
    pub peak_rss_kb: u64,
}

impl ProcessStats {
    pub fn of(pid: u32) -> Result<ProcessStats> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
        // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 = fields.get(11..13).into_iter().flatten().filter_map(|f| f.parse::<f64>().ok()).sum();
        // SAFETY: sysconf has no preconditions.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let peak_rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        Ok(ProcessStats { cpu_secs: ticks / per_sec, peak_rss_kb })
    }
}

/// CPU seconds each process of the stack has used, by service (told apart by executable name,
/// `/proc/PID/comm`): two readings say which service a busy machine was busy with. A process that ended
/// between them is not counted (the workload's connections and the jobs last the whole run).
pub struct ServiceCpu(HashMap<u32, (&'static str, f64)>);

/// Executable name (or its start) -> the service it is.
const SERVICES: [(&str, &str); 6] = [
    ("postgres", "PostgreSQL"),
    ("java", "Kafka Connect"),
    ("tansu", "the broker"),
    ("noida", "the broker"),
    ("mongod", "MongoDB"),
    ("stream_", "the jobs"),
];

impl ServiceCpu {
    pub fn now() -> ServiceCpu {
        let own = std::process::id();
        let pids = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()));
        let by_pid = pids
            .filter_map(|pid| {
                let service = if pid == own {
                    "this bench (and its workload)"
                } else {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                    SERVICES.iter().find(|(name, _)| comm.starts_with(name))?.1
                };
                Some((pid, (service, ProcessStats::of(pid).ok()?.cpu_secs)))
            })
            .collect();
        ServiceCpu(by_pid)
    }

    /// Each service's CPU since `before`, as a share of one core over `elapsed`, largest first, and per record
    /// when `records` were applied meanwhile: "MongoDB 61% (40 us a record), the broker 40% (...), ...".
    pub fn since(&self, before: &ServiceCpu, elapsed: Duration, records: Option<u64>) -> String {
        let mut used: Vec<(&str, f64)> = Vec::new();
        for (pid, &(service, secs)) in &self.0 {
            let spent = secs - before.0.get(pid).map_or(0.0, |&(_, then)| then);
            match used.iter_mut().find(|(s, _)| *s == service) {
                Some((_, total)) => *total += spent,
                None => used.push((service, spent)),
            }
        }
        used.sort_by(|a, b| b.1.total_cmp(&a.1));
        let secs = elapsed.as_secs_f64().max(1e-9);
        used.iter()
            .map(|(service, spent)| match records.filter(|&n| n > 0 && spent / secs >= 0.01) {
                Some(n) => {
                    format!("{service} {:.0}% ({:.0} us a record)", 100.0 * spent / secs, 1e6 * spent / n as f64)
                }
                None => format!("{service} {:.0}%", 100.0 * spent / secs),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The whole machine's CPU time, busy and in all (`/proc/stat`, every core): two readings say how busy the
/// machine was between them. Every service of the stack shares these cores, so a run's latency is partly
/// waiting for one; this says how much of that there was to wait for. Time the hypervisor gave to other
/// guests (steal) counts as busy, and is also told apart: it is a slower machine, not more work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineCpu {
    busy: u64,
    steal: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> Option<MachineCpu> {
        MachineCpu::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From `/proc/stat`'s first line: user nice system idle iowait irq softirq steal (guest time is
    /// counted in user already); idle and iowait are not busy.
    fn parse(stat: &str) -> Option<MachineCpu> {
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let total: u64 = fields.iter().sum();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        let steal = fields.get(7).copied().unwrap_or(0);
        Some(MachineCpu { busy: total - idle, steal, total })
    }

    /// Percent of the machine busy, and of it stolen, between `earlier` and this reading.
    pub fn busy_percent_since(&self, earlier: Option<MachineCpu>) -> Option<(f64, f64)> {
        let earlier = earlier?;
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)? as f64;
        let share = |now: u64, then: u64| 100.0 * now.saturating_sub(then) as f64 / total;
        Some((share(self.busy, earlier.busy), share(self.steal, earlier.steal)))
    }
}

/// How busy the machine was since `earlier` (see [`MachineCpu`]), for a report: "87%", "87% (5% stolen)" or "-".
pub fn busy_since(earlier: Option<MachineCpu>) -> String {
    match MachineCpu::now().and_then(|now| now.busy_percent_since(earlier)) {
        None => "-".into(),
        Some((busy, steal)) if steal >= 0.5 => format!("{busy:.0}% ({steal:.0}% stolen)"),
        Some((busy, _)) => format!("{busy:.0}%"),
    }
}

/// A count the server reports, whichever numeric type it chose for it (counters grow from int32 to int64;
/// some statistics are doubles).
pub fn server_number(b: &bson::Bson) -> Option<u64> {
    match b {
        bson::Bson::Int64(n) => Some(*n as u64),
        bson::Bson::Int32(n) => Some(*n as u64),
        bson::Bson::Double(f) => Some(*f as u64),
        _ => None,
    }
}

/// What the MongoDB server has done since it started, from one `serverStatus`: a difference of two readings
/// ([`ServerWork::since`]) is what a piece of work cost the server, a steadier measure on a shared machine
/// than the time it took.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerWork {
    /// CPU time (`extra_info`, Linux; `None` where the server does not report it).
    pub cpu: Option<Duration>,
    /// Bytes WiredTiger wrote out of its cache (eviction and checkpoints): a page written again and again
    /// while it is rewritten shows here, at a cost in CPU (reconciliation, compression) the writes do not.
    pub cache_written: u64,
}

impl ServerWork {
    pub async fn read(mongo: &mongodb::Client) -> Result<ServerWork> {
        let status = mongo.database("admin").run_command(bson::doc! { "serverStatus": 1 }).await?;
        let extra = status.get_document("extra_info").ok();
        let micros = |key| extra?.get(key).and_then(server_number);
        let cpu = micros("user_time_us").zip(micros("system_time_us")).map(|(u, s)| Duration::from_micros(u + s));
        let cache = status.get_document("wiredTiger").and_then(|wt| wt.get_document("cache")).ok();
        let cache_written = cache.and_then(|c| c.get("bytes written from cache")).and_then(server_number).unwrap_or(0);
        Ok(ServerWork { cpu, cache_written })
    }

    /// What the server did from `before` to this reading.
    pub fn since(self, before: ServerWork) -> ServerWork {
        ServerWork {
            cpu: self.cpu.zip(before.cpu).map(|(now, before)| now.saturating_sub(before)),
            cache_written: self.cache_written.saturating_sub(before.cache_written),
        }
    }

    /// Per item of `items`: CPU microseconds, and bytes written out of the cache.
    pub fn per(self, items: u64) -> (Option<f64>, f64) {
        let items = items.max(1) as f64;
        (self.cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / items), self.cache_written as f64 / items)
    }
}

/// The kinds of operation `top` times per collection, as this benchmark names them.
const TOP_KINDS: [(&str, &str); 6] = [
    ("insert", "insert"),
    ("update", "update"),
    ("remove", "remove"),
    ("queries", "find"),
    ("getmore", "find"),
    ("commands", "other"),
];

/// Time the MongoDB server has spent on each collection of `database`, by kind of operation (`top`:
/// microseconds since the server started, of wall time holding the collection): a difference of two
/// readings says where a piece of work's server time went. Keys are `collection kind`, e.g.
/// `order_details update`; `other` holds the commands `top` does not name (findAndModify, distinct, ...).
pub async fn server_top(mongo: &mongodb::Client, database: &str) -> Result<BTreeMap<String, u64>> {
    let top = mongo.database("admin").run_command(bson::doc! { "top": 1 }).await?;
    let mut out = BTreeMap::new();
    let prefix = format!("{database}.");
    for (namespace, entry) in top.get_document("totals")? {
        let (Some(collection), Some(entry)) = (namespace.strip_prefix(&prefix), entry.as_document()) else {
            continue;
        };
        for (field, kind) in TOP_KINDS {
            let time = entry.get_document(field).ok().and_then(|d| d.get("time")).and_then(server_number);
            *out.entry(format!("{collection} {kind}")).or_default() += time.unwrap_or(0);
        }
    }
    Ok(out)
}

/// What `after` adds to `before` (two [`server_top`] readings), largest first, without the zeros.
pub fn top_since(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut spent: Vec<(String, u64)> = after
        .iter()
        .map(|(key, &t)| (key.clone(), t.saturating_sub(before.get(key).copied().unwrap_or(0))))
        .filter(|&(_, t)| t > 0)
        .collect();
    spent.sort_by_key(|s| std::cmp::Reverse(s.1));
    spent
}

/// A Prometheus histogram read back: cumulative counts per upper bound (milliseconds), and the max.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    buckets: Vec<(f64, u64)>,
    max_ms: f64,
}

impl Histogram {
    /// `<name>_bucket{..,le="0.005"} 12` lines (seconds) and `<name>_max`.
    pub fn parse(text: &str, name: &str) -> Result<Histogram> {
        let prefix = format!("{name}_bucket{{");
        let mut buckets = Vec::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).context("a bucket without le")?;
            let count: u64 = line.rsplit(' ').next().and_then(|c| c.parse().ok()).context("a bucket without count")?;
            let le_ms = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>()? * 1e3 };
            buckets.push((le_ms, count));
        }
        if buckets.is_empty() {
            bail!("no histogram {name} in the metrics");
        }
        let max_ms = cdc_cqrs::metrics::value(text, &format!("{name}_max")).unwrap_or(0.0) * 1e3;
        Ok(Histogram { buckets, max_ms })
    }

    /// Adds another process's histogram of the same buckets.
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
        } else {
            for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
                mine.1 += theirs.1;
            }
        }
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    pub fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |b| b.1)
    }

    pub fn max_ms(&self) -> f64 {
        self.max_ms
    }

    /// The `q` quantile, linearly interpolated inside its bucket (as Prometheus' histogram_quantile), and
    /// never above the max.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let rank = q * self.count() as f64;
        let (mut lower, mut below) = (0.0, 0_u64);
        for &(le, cumulative) in &self.buckets {
            if cumulative as f64 >= rank && cumulative > below {
                let upper = if le.is_finite() { le } else { self.max_ms };
                let within = (rank - below as f64) / (cumulative - below) as f64;
                return (lower + (upper - lower) * within).min(self.max_ms);
            }
            (lower, below) = (le, cumulative);
        }
        self.max_ms
    }
}

/// Processes stopped with SIGSTOP until this is dropped (SIGCONT).
pub struct Paused(Vec<i32>);

impl Paused {
    /// Stops every process whose command line contains `pattern`.
    pub fn processes_named(pattern: &str) -> Paused {
        let own = std::process::id() as i32;
        let pids: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|&pid| pid != own)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(pattern))
            })
            .collect();
        for &pid in &pids {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Paused(pids)
    }

    pub fn pids(&self) -> &[i32] {
        &self.0
    }

    pub fn resume(pids: &[i32]) {
        for &pid in pids {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        Paused::resume(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_cpu_counts_idle_and_iowait_as_not_busy_and_tells_steal_apart() {
        let before = MachineCpu::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(before, MachineCpu { busy: 150, steal: 0, total: 1000 });
        let after = MachineCpu::parse("cpu  300 0 100 1000 50 0 0 50 0 0\n").unwrap();
        assert_eq!(after.busy_percent_since(Some(before)), Some((60.0, 10.0)));
        assert_eq!(after.busy_percent_since(None), None);
        assert_eq!(before.busy_percent_since(Some(before)), None);
        assert_eq!(MachineCpu::parse("intr 1 2 3\n"), None);
    }

    #[test]
    fn quantiles_interpolate_in_the_bucket_and_stop_at_the_max() {
        let text = "x_bucket{job=\"a\",le=\"0.01\"} 50\nx_bucket{job=\"a\",le=\"0.02\"} 90\n\
                    x_bucket{job=\"a\",le=\"+Inf\"} 100\nx_max{job=\"a\"} 0.03\n";
        let h = Histogram::parse(text, "x").unwrap();
        assert_eq!(h.count(), 100);
        assert!((h.quantile_ms(0.5) - 10.0).abs() < 1e-9);
        assert!((h.quantile_ms(0.7) - 15.0).abs() < 1e-9);
        assert!((h.quantile_ms(0.95) - 25.0).abs() < 1e-9);
        assert_eq!(h.quantile_ms(1.0), 30.0);
        let mut sum = h.clone();
        sum.add(&h);
        assert_eq!(sum.count(), 200);
        assert!((sum.quantile_ms(0.5) - 10.0).abs() < 1e-9);
    }
}
