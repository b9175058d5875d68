//! A job's metrics in the Prometheus text format: records in, written, skipped (below the checkpoint),
//! dead-lettered, batches and their latency, and lag (records behind the topic ends; milliseconds from the
//! source commit of the newest applied change to now).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use anyhow::Context;
use axum::Router;
use axum::routing::get;

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

pub struct Metrics {
    job: &'static str,
    pub records_in: Counter,
    pub skipped: Counter,
    pub written: Counter,
    pub dead_lettered: Counter,
    pub batches: Counter,
    pub batch_seconds: Summary,
    pub lag_records: Gauge,
    pub lag_ms: Gauge,
}

impl Metrics {
    pub fn new(job: &'static str) -> Metrics {
        Metrics {
            job,
            records_in: Counter::default(),
            skipped: Counter::default(),
            written: Counter::default(),
            dead_lettered: Counter::default(),
            batches: Counter::default(),
            batch_seconds: Summary::default(),
            lag_records: Gauge::default(),
            lag_ms: Gauge::default(),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let job = self.job;
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{job=\"{job}\"}} {value}");
        };
        line("cdc_records_in_total", "counter", "Kafka records polled.", self.records_in.get().to_string());
        line(
            "cdc_records_skipped_total",
            "counter",
            "Records below the checkpoint (already applied).",
            self.skipped.get().to_string(),
        );
        line("cdc_writes_total", "counter", "MongoDB write statements committed.", self.written.get().to_string());
        line(
            "cdc_dead_lettered_total",
            "counter",
            "Records sent to the dead-letter topic.",
            self.dead_lettered.get().to_string(),
        );
        line("cdc_batches_total", "counter", "Batches committed.", self.batches.get().to_string());
        line(
            "cdc_batch_seconds_sum",
            "counter",
            "Time spent on committed batches.",
            format!("{:.6}", self.batch_seconds.sum_us.load(Ordering::Relaxed) as f64 / 1e6),
        );
        line(
            "cdc_batch_seconds_count",
            "counter",
            "Batches timed.",
            self.batch_seconds.count.load(Ordering::Relaxed).to_string(),
        );
        line(
            "cdc_lag_records",
            "gauge",
            "Records between the checkpoints and the topic ends.",
            self.lag_records.get().to_string(),
        );
        line(
            "cdc_lag_ms",
            "gauge",
            "Source commit of the newest applied change to its MongoDB commit.",
            self.lag_ms.get().to_string(),
        );
        out
    }
}

/// Serves `GET /metrics` on `addr` in the background.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let app = Router::new().route("/metrics", get(move || std::future::ready(metrics.render())));
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
