//! The read stores as the query side sees them: which are up, how far each is behind the source, which
//! one serves the next query (round-robin over the healthy ones), and which have caught up to a source
//! position (read-your-writes).
//!
//! A background watch refreshes, every [`REFRESH`]: Debezium's confirmed position in the replication
//! slot, then the ends of the three change topics, then each store's checkpoints. Reading the slot before
//! the ends is what makes read-your-writes exact: once the slot has confirmed a position, every change
//! committed up to it is in Kafka (Debezium confirms only what Kafka acknowledged), so the ends read after
//! it cover that position, and a store whose checkpoints reach those ends holds every such change.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use rdkafka::consumer::BaseConsumer;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::RwLock;

use crate::config::{KafkaArgs, Store};
use crate::kafka::{self, Offsets, records_behind, topic_ends};
use crate::postgres::{Lsn, slot_position};
use crate::sink::{self, Feed};

/// How often the stores' state is refreshed.
const REFRESH: Duration = Duration::from_millis(200);
/// How long a store may take to answer before it counts as down.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(1500);

/// One read store and what the watch last saw of it.
pub struct ReadStore {
    pub name: String,
    pub db: Database,
    state: RwLock<StoreState>,
    served: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct StoreState {
    up: bool,
    error: Option<String>,
    applied: Offsets,
    /// Records in the topics this store has not applied yet.
    behind: u64,
    /// When the oldest of those first showed in the topics (`None`: before the watch's memory).
    oldest_unapplied: Option<Instant>,
}

/// What `GET /api/stores` says of a store.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    pub name: String,
    pub up: bool,
    pub healthy: bool,
    pub error: Option<String>,
    pub behind_records: u64,
    /// Milliseconds since the oldest change the store has not applied reached Kafka (0 when caught up): a
    /// store that keeps up under steady writes is always a few records but only milliseconds behind.
    pub behind_ms: u64,
    pub served: u64,
}

/// The source side of read-your-writes: a confirmed slot position and the topic ends read after it.
#[derive(Debug, Clone, Default)]
struct Watermark {
    confirmed: Lsn,
    ends: Offsets,
}

/// Why no store could serve a query.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("no read store answered")]
    NoStore,
    #[error("no read store caught up to source position {0} within {1:?}")]
    NotCaughtUp(Lsn, Duration),
}

pub struct ReadStores {
    stores: Vec<Arc<ReadStore>>,
    next: AtomicUsize,
    max_lag: Duration,
    feeds: Vec<Feed>,
    watermark: RwLock<Watermark>,
    /// The topic ends as the watch saw them over the last few `max_lag`s: when each change arrived.
    seen: RwLock<EndsSeen>,
}

impl ReadStores {
    /// Clients for `stores` (nothing is contacted yet: a store that is down is simply not healthy).
    pub async fn new(stores: &[Store], kafka: &KafkaArgs, group_prefix: &str, max_lag: Duration) -> Result<Self> {
        let mut out = Vec::new();
        for store in stores {
            let mut opts = ClientOptions::parse(&store.mongo.uri)
                .await
                .map_err(|e| anyhow!("--mongo-uri / CDC_MONGO_URI: {} is not a MongoDB URI ({e})", store.name))?;
            opts.app_name = Some("cdc-cqrs-api".into());
            opts.server_selection_timeout = Some(STORE_TIMEOUT);
            opts.connect_timeout = Some(STORE_TIMEOUT);
            let db = Client::with_options(opts)?.database(&store.mongo.database);
            out.push(Arc::new(ReadStore {
                name: store.name.clone(),
                db,
                state: RwLock::new(StoreState::default()),
                served: AtomicU64::new(0),
            }));
        }
        let feeds = Feed::all(kafka, group_prefix);
        let seen = RwLock::new(EndsSeen::new((max_lag * 2).max(Duration::from_secs(10))));
        Ok(ReadStores { stores: out, next: AtomicUsize::new(0), max_lag, feeds, watermark: RwLock::default(), seen })
    }

    /// Keeps the state fresh in the background, for as long as the service runs.
    pub fn watch(self: &Arc<Self>, pg: PgPool, kafka: KafkaArgs, slot: String) -> Result<()> {
        let consumer: BaseConsumer =
            kafka::consumer_config(&kafka, "cdc-cqrs-api-watch").create().context("Kafka client for topic ends")?;
        let consumer = Arc::new(consumer);
        let this = self.clone();
        tokio::spawn(async move {
            let mut last_warning: Option<Instant> = None;
            loop {
                if let Err(e) = this.refresh(&pg, &consumer, &slot).await
                    && last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30))
                {
                    tracing::warn!(error = %format!("{e:#}"), "refreshing the source position");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(REFRESH).await;
            }
        });
        Ok(())
    }

    async fn refresh(&self, pg: &PgPool, consumer: &Arc<BaseConsumer>, slot: &str) -> Result<()> {
        // The slot first, then the ends (see the module comment).
        let confirmed = slot_position(pg, slot).await.map(|s| s.confirmed);
        let topics: Vec<String> = self.feeds.iter().map(|f| f.topic.clone()).collect();
        let consumer = consumer.clone();
        let ends = tokio::task::spawn_blocking(move || topic_ends(&consumer, &topics))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|ends| ends);
        // The stores are looked at even when PostgreSQL or Kafka is not answering (against the last ends).
        let lag_ends = match &ends {
            Ok(ends) => {
                self.seen.write().await.push(Instant::now(), ends.clone());
                ends.clone()
            }
            Err(_) => self.watermark.read().await.ends.clone(),
        };
        futures::future::join_all(self.stores.iter().map(|s| self.refresh_store(s, &lag_ends))).await;
        *self.watermark.write().await = Watermark { confirmed: confirmed?, ends: ends? };
        Ok(())
    }

    async fn refresh_store(&self, store: &ReadStore, ends: &Offsets) {
        let read = tokio::time::timeout(STORE_TIMEOUT, sink::applied(&store.db, &self.feeds)).await;
        let mut state = store.state.write().await;
        let was_healthy = self.is_healthy(&state);
        match read {
            Ok(Ok(applied)) => {
                state.behind = records_behind(ends, &applied).values().sum();
                state.oldest_unapplied = self.seen.read().await.first_seen(&applied);
                state.applied = applied;
                state.up = true;
                state.error = None;
            }
            Ok(Err(e)) => (state.up, state.error) = (false, Some(format!("{e:#}"))),
            Err(_) => (state.up, state.error) = (false, Some(format!("no answer in {STORE_TIMEOUT:?}"))),
        }
        // Which stores serve queries changes here: worth a line each time, with the reason.
        if self.is_healthy(&state) != was_healthy {
            let healthy = !was_healthy;
            tracing::info!(store = %store.name, healthy, up = state.up, behind_records = state.behind, behind_ms = behind_ms(&state), error = state.error.as_deref().unwrap_or(""), "read store health changed");
        }
    }

    pub async fn status(&self) -> Vec<StoreStatus> {
        let mut out = Vec::with_capacity(self.stores.len());
        for store in &self.stores {
            let state = store.state.read().await;
            out.push(StoreStatus {
                name: store.name.clone(),
                up: state.up,
                healthy: self.is_healthy(&state),
                error: state.error.clone(),
                behind_records: state.behind,
                behind_ms: behind_ms(&state),
                served: store.served.load(Ordering::Relaxed),
            });
        }
        out
    }

    pub fn all(&self) -> &[Arc<ReadStore>] {
        &self.stores
    }

    fn is_healthy(&self, state: &StoreState) -> bool {
        state.up && Duration::from_millis(behind_ms(state)) <= self.max_lag
    }

    /// The store for the next query: round-robin over the healthy ones; when none is, the up store least
    /// behind; when none is up, a store anyway. The watch's verdict can be a moment old (a starved
    /// service counts every store down at once), and the query's own timeout bounds the try: only a
    /// store that fails this query (`exclude`) is never picked again for it.
    pub async fn pick(&self, exclude: &[usize]) -> Result<(usize, StoreStatus), Unavailable> {
        let status = self.status().await;
        let candidates: Vec<usize> = (0..status.len()).filter(|i| !exclude.contains(i)).collect();
        let healthy: Vec<usize> = candidates.iter().copied().filter(|&i| status[i].healthy).collect();
        let chosen = if healthy.is_empty() {
            candidates.into_iter().min_by_key(|&i| (!status[i].up, status[i].behind_ms))
        } else {
            Some(healthy[self.next.fetch_add(1, Ordering::Relaxed) % healthy.len()])
        };
        let i = chosen.ok_or(Unavailable::NoStore)?;
        Ok((i, status[i].clone()))
    }

    /// Like [`pick`](Self::pick), among the stores that hold every change committed up to `position`;
    /// waits up to `timeout` for one to.
    pub async fn pick_caught_up(
        &self,
        position: Lsn,
        timeout: Duration,
        exclude: &[usize],
    ) -> Result<(usize, StoreStatus), Unavailable> {
        let deadline = Instant::now() + timeout;
        let mut required: Option<Offsets> = None;
        loop {
            if required.is_none() {
                let watermark = self.watermark.read().await;
                if watermark.confirmed >= position {
                    required = Some(watermark.ends.clone());
                }
            }
            if let Some(ends) = &required {
                let mut ready = Vec::new();
                for (i, store) in self.stores.iter().enumerate() {
                    let state = store.state.read().await;
                    let holds = ends.iter().all(|(tp, &end)| state.applied.get(tp).copied().unwrap_or(0) >= end);
                    if state.up && holds && !exclude.contains(&i) {
                        ready.push(i);
                    }
                }
                if !ready.is_empty() {
                    let i = ready[self.next.fetch_add(1, Ordering::Relaxed) % ready.len()];
                    let status = self.status().await.swap_remove(i);
                    return Ok((i, status));
                }
            }
            if Instant::now() >= deadline {
                return Err(Unavailable::NotCaughtUp(position, timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn store(&self, i: usize) -> &ReadStore {
        &self.stores[i]
    }

    /// A query on store `i` failed: count it down until the watch sees it answer again.
    pub async fn failed(&self, i: usize, error: &str) {
        let mut state = self.stores[i].state.write().await;
        state.up = false;
        state.error = Some(error.to_owned());
    }

    pub fn served(&self, i: usize) {
        self.stores[i].served.fetch_add(1, Ordering::Relaxed);
    }
}

fn behind_ms(state: &StoreState) -> u64 {
    match (state.behind, state.oldest_unapplied) {
        (0, _) => 0,
        (_, Some(t)) => t.elapsed().as_millis() as u64,
        (_, None) => u64::MAX,
    }
}

/// The topic ends sampled by the watch, oldest first, for `keep`: how long a store has been behind is how
/// long ago the first change it lacks arrived, not how long ago it last had nothing left to apply.
#[derive(Debug)]
struct EndsSeen {
    samples: std::collections::VecDeque<(Instant, Offsets)>,
    keep: Duration,
    forgot: bool,
}

impl EndsSeen {
    fn new(keep: Duration) -> Self {
        EndsSeen { samples: Default::default(), keep, forgot: false }
    }

    fn push(&mut self, at: Instant, ends: Offsets) {
        self.samples.push_back((at, ends));
        while self.samples.front().is_some_and(|(t, _)| at.duration_since(*t) > self.keep) {
            self.samples.pop_front();
            self.forgot = true;
        }
    }

    /// When the oldest change beyond `applied` first showed in the ends: the earliest sample past it, on
    /// any partition. A change older than every sample kept is at least that old; one already there when
    /// the watch began is of unknown age (`None`, as is nothing beyond `applied`: then the store is not
    /// behind, and its age unused).
    fn first_seen(&self, applied: &Offsets) -> Option<Instant> {
        let (_, latest) = self.samples.back()?;
        let mut oldest: Option<Instant> = None;
        for (tp, &end) in latest {
            let done = applied.get(tp).copied().unwrap_or(0);
            if end <= done {
                continue;
            }
            let before = self.samples.partition_point(|(_, ends)| ends.get(tp).copied().unwrap_or(0) <= done);
            if before == 0 && !self.forgot {
                return None;
            }
            let at = self.samples[before].0;
            oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
        oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MongoArgs;

    #[tokio::test]
    async fn when_no_store_is_up_each_is_still_tried_until_it_fails_the_query() {
        let store = |index: usize| Store {
            index,
            name: format!("store{index}"),
            mongo: MongoArgs { uri: format!("mongodb://127.0.0.1:{}/", index + 1), database: "d".into() },
        };
        let kafka = KafkaArgs { brokers: "127.0.0.1:1".into(), topic_prefix: "p".into(), options: vec![] };
        let stores = ReadStores::new(&[store(0), store(1)], &kafka, "g", Duration::from_secs(5)).await.unwrap();
        // Store 0 as the watch leaves it when no answer came in time; store 1 up but too far behind.
        stores.failed(0, "no answer in 1.5s").await;
        {
            let mut state = stores.stores[1].state.write().await;
            (state.up, state.behind) = (true, 7);
        }
        assert_eq!(stores.pick(&[]).await.unwrap().0, 1, "the up store first");
        assert_eq!(stores.pick(&[1]).await.unwrap().0, 0, "then the one counted down");
        assert!(matches!(stores.pick(&[0, 1]).await, Err(Unavailable::NoStore)));
    }

    #[test]
    fn behind_is_the_age_of_the_oldest_change_not_applied() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let ends = |a: i64, b: i64| Offsets::from([(("t".into(), 0), a), (("t".into(), 1), b)]);
        let mut seen = EndsSeen::new(Duration::from_secs(10));
        seen.push(at(0), ends(10, 10));
        // Behind on what was already there when the watch began: age unknown.
        assert_eq!(seen.first_seen(&ends(5, 10)), None);
        seen.push(at(200), ends(12, 10));
        seen.push(at(400), ends(14, 13));
        // Always a few records behind under steady writes, but only since the last sample or two.
        assert_eq!(seen.first_seen(&ends(12, 10)), Some(at(400)));
        assert_eq!(seen.first_seen(&ends(10, 13)), Some(at(200)));
        assert_eq!(seen.first_seen(&ends(11, 12)), Some(at(200)));
        // Past the memory kept: at least as old as the oldest sample kept.
        seen.push(at(10_300), ends(14, 13));
        assert_eq!(seen.first_seen(&ends(5, 10)), Some(at(400)));
    }
}
