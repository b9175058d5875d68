//! Whether a job's pipelines are going round, for `GET /health` (an orchestrator's probe, a load check)
//! and the metric `cdc_pipeline_stalled_seconds`.
//!
//! A store's pipeline comes round its loop at least every 200 ms when idle and once a batch under load.
//! One that has not come round for `--stalled-after` is stuck: its read store or the broker does not
//! answer, or a write keeps failing (it retries with backoff and moves no offset; its last error says
//! which). So is one whose consumer has had no broker connection up for as long (its statistics, every
//! 5 s): polling a broker that is gone, it comes round with nothing to read, like a quiet hour. The lag
//! metrics cannot tell either: they move only when a batch commits. A pipeline waiting for first_load comes
//! round every second and is not stuck.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::metrics::{Metrics, now_ms};

/// One pipeline's beat.
pub struct Pulse {
    beat_ms: AtomicI64,
    /// Since when no connection to a broker is up (0: one is, or not known yet).
    broker_lost_ms: AtomicI64,
    waiting_for_first_load: AtomicBool,
    /// What failed since the last beat, and how, and the step it is on (checked without the locks on
    /// every beat).
    failed: AtomicBool,
    last_error: Mutex<Option<String>>,
    stepped: AtomicBool,
    step: Mutex<Option<&'static str>>,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            beat_ms: AtomicI64::new(now_ms()),
            broker_lost_ms: AtomicI64::new(0),
            waiting_for_first_load: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            last_error: Mutex::new(None),
            stepped: AtomicBool::new(false),
            step: Mutex::new(None),
        }
    }
}

impl Pulse {
    /// The loop came round: whatever failed before has since succeeded.
    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::Relaxed);
        if self.failed.swap(false, Ordering::Relaxed) {
            *lock(&self.last_error) = None;
        }
        if self.stepped.swap(false, Ordering::Relaxed) {
            *lock(&self.step) = None;
        }
    }

    /// The pipeline is about to wait on `what` (a store or the broker), which is what a stalled one names.
    pub fn step(&self, what: &'static str) {
        *lock(&self.step) = Some(what);
        self.stepped.store(true, Ordering::Relaxed);
    }

    pub fn waiting_for_first_load(&self, waiting: bool) {
        self.waiting_for_first_load.store(waiting, Ordering::Relaxed);
    }

    /// `what` failed with `error` and will be tried again.
    pub fn failed(&self, what: &str, error: &anyhow::Error) {
        *lock(&self.last_error) = Some(format!("{what}: {error:#}"));
        self.failed.store(true, Ordering::Relaxed);
    }

    /// What the consumer's statistics say: whether a connection to a broker is up.
    pub fn broker_reachable(&self, up: bool) {
        if up {
            self.broker_lost_ms.store(0, Ordering::Relaxed);
        } else {
            let _ = self.broker_lost_ms.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Since no broker connection has been up (0 while one is).
    fn broker_lost_for_ms(&self) -> i64 {
        match self.broker_lost_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => (now_ms() - since).max(0),
        }
    }

    fn since_beat_ms(&self) -> i64 {
        (now_ms() - self.beat_ms.load(Ordering::Relaxed)).max(0)
    }

    /// Since the loop last came round, or since the broker was lost if longer: a pipeline polling a broker
    /// that is gone comes round without reading anything.
    pub fn stalled_ms(&self) -> i64 {
        self.since_beat_ms().max(self.broker_lost_for_ms())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `/health` answer: 200 when every pipeline came round within `stalled_after` and had a broker
/// connection up within it, else 503; the body says, per store, its state, the seconds since its loop came
/// round and since no broker connection was up, the step it waits on (if any) and its last error.
pub fn report(pipelines: &[Arc<Metrics>], stalled_after: Duration) -> (StatusCode, Value) {
    let mut stalled_any = false;
    let stores: Vec<Value> = pipelines
        .iter()
        .map(|m| {
            let stalled_ms = m.pulse.stalled_ms();
            let stalled = stalled_ms > stalled_after.as_millis() as i64;
            stalled_any |= stalled;
            let state = if stalled {
                "stalled"
            } else if m.pulse.waiting_for_first_load.load(Ordering::Relaxed) {
                "waiting for first_load"
            } else {
                "running"
            };
            let broker_lost_ms = m.pulse.broker_lost_for_ms();
            json!({
                "store": m.store,
                "state": state,
                "since_loop_s": m.pulse.since_beat_ms() as f64 / 1000.0,
                "broker_unreachable_s": (broker_lost_ms > 0).then(|| broker_lost_ms as f64 / 1000.0),
                "step": *lock(&m.pulse.step),
                "last_error": lock(&m.pulse.last_error).clone(),
            })
        })
        .collect();
    let status = if stalled_any { "stalled" } else { "ok" };
    let code = if stalled_any { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let job = pipelines.first().map(|m| m.job.as_str());
    (code, json!({ "job": job, "status": status, "stalled_after_s": stalled_after.as_secs_f64(), "stores": stores }))
}
