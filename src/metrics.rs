//! A job's metrics in the Prometheus text format: records in, written, skipped (below the checkpoint),
//! dead-lettered, batches and their latency, lag (records behind the topic ends; milliseconds from the
//! source commit of the newest applied change to now), and freshness histograms: how long a change took
//! from its PostgreSQL commit, from its Kafka record, and from the job receiving it, to its MongoDB commit.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::routing::get;

use crate::health::{self, Pulse};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Count and sum of observations, in microseconds to stay atomic.
#[derive(Default)]
pub struct Summary {
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Summary {
    pub fn observe(&self, seconds: f64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

/// Upper bounds of the freshness histograms' buckets, in milliseconds (fine where the targets are).
const BUCKETS_MS: [u64; 24] =
    [1, 2, 3, 5, 7, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 60000];

/// A Prometheus histogram of millisecond durations (plus the largest seen, which a histogram cannot tell).
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_ms: AtomicU64,
    max_ms: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ms: AtomicU64::new(0),
            max_ms: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records `n` observations of `ms` milliseconds.
    pub fn observe_ms(&self, ms: i64, n: u64) {
        let ms = ms.max(0) as u64;
        if let Some(i) = BUCKETS_MS.iter().position(|&le| ms <= le) {
            self.buckets[i].fetch_add(n, Ordering::Relaxed);
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms * n, Ordering::Relaxed);
        self.max_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The series of one labelled histogram (`labels` as `k="v",...`); HELP and TYPE are the caller's.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (le, bucket) in BUCKETS_MS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}", *le as f64 / 1e3);
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_ms.load(Ordering::Relaxed) as f64 / 1e3);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

pub struct Metrics {
    /// `job="<table>",store="store<i>"`: one Metrics per job and read store.
    labels: String,
    pub records_in: Counter,
    pub skipped: Counter,
    pub written: Counter,
    pub dead_lettered: Counter,
    pub batches: Counter,
    pub conflicts: Counter,
    pub partitions_held_back: Counter,
    pub batch_seconds: Summary,
    pub lag_records: Gauge,
    pub lag_ms: Gauge,
    pub assigned_partitions: Gauge,
    /// PostgreSQL commit (Debezium's `source.ts_ms`) to the MongoDB commit of the batch, per change.
    pub freshness: Histogram,
    /// Kafka record timestamp to the MongoDB commit: the part of freshness spent in the job, with the
    /// broker's delivery.
    pub in_job: Histogram,
    /// The job receiving the record to the MongoDB commit: the part of freshness the job alone decides.
    pub since_received: Histogram,
    /// Whether the pipeline goes round (`/health`).
    pub pulse: Arc<Pulse>,
    pub job: String,
    pub store: String,
}

/// What a job process reports once, whatever its read stores.
pub struct ProcessMetrics {
    /// `job="<table>",topic="<dead-letter topic>"`.
    labels: String,
    /// The letters in the dead-letter topic not sent back yet (-1 until first read: not shown).
    pub dead_letters_waiting: Gauge,
    /// When the oldest of them was dead-lettered, epoch ms (0: none waits); its age is served, as of the scrape.
    pub oldest_dead_letter_ms: Gauge,
}

impl ProcessMetrics {
    pub fn new(job: &str, dead_letter_topic: &str) -> ProcessMetrics {
        let dead_letters_waiting = Gauge::default();
        dead_letters_waiting.set(-1);
        let labels = format!("job=\"{job}\",topic=\"{dead_letter_topic}\"");
        ProcessMetrics { labels, dead_letters_waiting, oldest_dead_letter_ms: Gauge::default() }
    }
}

/// Wall-clock time, epoch ms: what Kafka record and Debezium timestamps are measured against.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One plain series: name, type, help, and how to read it.
type Series = (&'static str, &'static str, &'static str, fn(&Metrics) -> String);

const SERIES: [Series; 13] = [
    ("cdc_records_in_total", "counter", "Kafka records polled.", |m| m.records_in.get().to_string()),
    ("cdc_records_skipped_total", "counter", "Records below the checkpoint (already applied).", |m| {
        m.skipped.get().to_string()
    }),
    ("cdc_writes_total", "counter", "MongoDB write statements committed.", |m| m.written.get().to_string()),
    ("cdc_dead_lettered_total", "counter", "Records sent to the dead-letter topic.", |m| {
        m.dead_lettered.get().to_string()
    }),
    ("cdc_batches_total", "counter", "Batches committed.", |m| m.batches.get().to_string()),
    (
        "cdc_conflicts_total",
        "counter",
        "Writes redone: another job changed the document between read and write, or a batch met a TRUNCATE or first_load.",
        |m| m.conflicts.get().to_string(),
    ),
    (
        "cdc_partitions_held_back_total",
        "counter",
        "Partitions left unread while catching up: the job held half a batch of records of it, ahead of the others.",
        |m| m.partitions_held_back.get().to_string(),
    ),
    ("cdc_batch_seconds_sum", "counter", "Time spent on committed batches.", |m| {
        format!("{:.6}", m.batch_seconds.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }),
    ("cdc_batch_seconds_count", "counter", "Batches timed.", |m| {
        m.batch_seconds.count.load(Ordering::Relaxed).to_string()
    }),
    ("cdc_lag_records", "gauge", "Records between the checkpoints and the topic ends.", |m| {
        m.lag_records.get().to_string()
    }),
    ("cdc_lag_ms", "gauge", "Source commit of the newest applied change to its MongoDB commit.", |m| {
        m.lag_ms.get().to_string()
    }),
    (
        "cdc_pipeline_stalled_seconds",
        "gauge",
        "Since the store's pipeline last came round its loop (every 200 ms when idle, once a batch under load), or since its consumer had no broker connection up if longer: high when its store or the broker does not answer.",
        |m| format!("{:.1}", m.pulse.stalled_ms() as f64 / 1000.0),
    ),
    ("cdc_assigned_partitions", "gauge", "Partitions of the topic this process holds in its consumer group.", |m| {
        m.assigned_partitions.get().to_string()
    }),
];

/// The histograms: name, help, and which one.
type HistogramSeries = (&'static str, &'static str, fn(&Metrics) -> &Histogram);

const HISTOGRAMS: [HistogramSeries; 3] = [
    ("cdc_freshness_seconds", "PostgreSQL commit of a change to the MongoDB commit that applied it.", |m| &m.freshness),
    ("cdc_in_job_seconds", "Kafka record timestamp of a change to the MongoDB commit that applied it.", |m| &m.in_job),
    ("cdc_since_received_seconds", "The job receiving a change's record to the MongoDB commit that applied it.", |m| {
        &m.since_received
    }),
];

impl Metrics {
    pub fn new(job: &str, store: &str) -> Metrics {
        Metrics {
            labels: format!("job=\"{job}\",store=\"{store}\""),
            records_in: Counter::default(),
            skipped: Counter::default(),
            written: Counter::default(),
            dead_lettered: Counter::default(),
            batches: Counter::default(),
            conflicts: Counter::default(),
            partitions_held_back: Counter::default(),
            batch_seconds: Summary::default(),
            lag_records: Gauge::default(),
            lag_ms: Gauge::default(),
            assigned_partitions: Gauge::default(),
            freshness: Histogram::default(),
            in_job: Histogram::default(),
            since_received: Histogram::default(),
            pulse: Arc::default(),
            job: job.to_owned(),
            store: store.to_owned(),
        }
    }
}

/// The Prometheus text exposition of several label sets (a job's read stores) and the process's own series:
/// each family once.
pub fn render(all: &[Arc<Metrics>], process: &ProcessMetrics) -> String {
    let mut out = String::new();
    let waiting = process.dead_letters_waiting.get();
    if waiting >= 0 {
        let oldest = process.oldest_dead_letter_ms.get();
        let age = if oldest > 0 { (now_ms() - oldest).max(0) as f64 / 1000.0 } else { 0.0 };
        let gauges = [
            (
                "cdc_dead_letters_waiting",
                "Dead letters not sent back yet (after the redrive group's offsets): each waits for someone to act.",
                waiting.to_string(),
            ),
            (
                "cdc_dead_letters_oldest_waiting_seconds",
                "How long the oldest dead letter not sent back yet has waited (0: none waits).",
                format!("{age:.1}"),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{}}} {value}", process.labels);
        }
    }
    for (name, kind, help, value) in SERIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in all {
            let _ = writeln!(out, "{name}{{{}}} {}", m.labels, value(m));
        }
    }
    for (name, help, histogram) in HISTOGRAMS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for m in all {
            histogram(m).render(&mut out, name, &m.labels);
        }
        let _ = writeln!(out, "# HELP {name}_max Largest observation.\n# TYPE {name}_max gauge");
        for m in all {
            let _ = writeln!(
                out,
                "{name}_max{{{}}} {}",
                m.labels,
                histogram(m).max_ms.load(Ordering::Relaxed) as f64 / 1e3
            );
        }
    }
    out
}

/// A free port for a job's metrics endpoint, for a caller that starts the job and then reads it (the
/// benchmarks, the tests). Picked below Linux's ephemeral range (32768-60999), which a port the kernel picks
/// (`bind` to port 0) falls in: a client connection of any process (Kafka, MongoDB) could take that one
/// between the pick and the job's bind, and did (the job then exits with "Address already in use").
pub fn free_port() -> anyhow::Result<u16> {
    // Each call moves on: the port a call returns stays free until its job binds it.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = u64::from(std::process::id()) * 97;
    (0..12_000)
        .map(|_| 20_000 + ((start + NEXT.fetch_add(1, Ordering::Relaxed) * 7) % 12_000) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .context("no free port between 20000 and 31999 for a metrics endpoint")
}

/// The value of series `name` (its first, when labelled) in a Prometheus text exposition such as
/// [`render`]'s: what the benchmarks and tests read back from a job's `/metrics`.
pub fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Serves `GET /metrics` and `GET /health` (see [`health`]) on `addr` in the background.
pub async fn serve(
    addr: SocketAddr,
    metrics: Vec<Arc<Metrics>>,
    process: Arc<ProcessMetrics>,
    stalled_after: Duration,
) -> anyhow::Result<()> {
    let pipelines = metrics.clone();
    let app = Router::new().route("/metrics", get(move || std::future::ready(render(&metrics, &process)))).route(
        "/health",
        get(move || {
            let (code, body) = health::report(&pipelines, stalled_after);
            std::future::ready((code, axum::Json(body)))
        }),
    );
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
