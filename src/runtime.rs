//! The micro-batch runtime every stream job runs: poll a batch (by count and time) -> decode -> reduce
//! per key -> project and write to MongoDB, then the checkpoints (one lane, or several at once for a large
//! batch: [`BatchWriter`]) -> commit offsets to Kafka (at most once a second). The next batch is fetched
//! while one is written. The jobs differ only in their [`Job`] (table and projection).
//!
//! Failure handling: a record that does not decode goes to the dead-letter topic, with the reason in its
//! headers, before the batch is written (so it is never lost), and so does a change MongoDB refuses for
//! what it holds ([`BatchWriter`] isolates it); MongoDB or Kafka being unreachable means
//! the same batch is retried with backoff and no offset moves; SIGTERM or Ctrl-C lets the batch in hand
//! finish, then the job exits. Offsets committed to Kafka are only a convenience (lag, restart position):
//! the checkpoints in MongoDB decide what is applied (re-read whenever the partition assignment changes,
//! and the consumer is moved back to them when it starts past them), so a job may be killed at any moment.
//! While first_load loads or swaps, batches are dropped unwritten and read again afterwards
//! ([`crate::handoff`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{GROUP_PREFIX, KafkaArgs, Store, StoresArgs, job_group};
use crate::dead_letter::{self, DeadLetters, SourceRecord, redrive};
use crate::envelope::{self, Event, Place};
use crate::feed::Feed;
use crate::handoff;
use crate::health::Pulse;
use crate::kafka::{self, JobConsumer, JobContext};
use crate::metrics::{Metrics, ProcessMetrics, now_ms, serve};
use crate::sink::{Applied, Checkpoint, LANES, MongoSink, Progress, ReadModels};

/// One stream job: the table it follows and how its changes project onto the read models.
pub trait Job: Send + Sync + 'static {
    /// The source table (the topic is `<prefix>.public.<TABLE>`).
    const TABLE: &'static str;
    /// The job's binary name.
    const BIN: &'static str;
    type Row: DeserializeOwned + Clone + Send + Sync + 'static;

    /// The primary key of a row.
    fn key(row: &Self::Row) -> i32;

    /// What decides a change's lane when a large batch is written in several lanes at once ([`LANES`]):
    /// changes that write the same documents should share it (else their writes race, and one is redone).
    /// The primary key unless the job says otherwise.
    fn lane_key(row: &Self::Row) -> i32 {
        Self::key(row)
    }

    /// Whether a catch-up batch must be one slice of time across the topic's partitions: for a job that
    /// writes one document from the changes of several keys, which Debezium spreads over every partition
    /// (order_details: an order's lines). See [`oldest`].
    const BATCHES_BY_TIME: bool = false;

    /// Events the per-key reduction must keep even when a later event of the same key follows.
    fn must_keep(_event: &Event<Self::Row>) -> bool {
        false
    }

    /// Brings the read models up to date with a batch of events, reduced to the last one per key (truncates
    /// kept, in order), through `store`. Every write must be version-guarded (a replay changes nothing),
    /// and a value copied from another job's documents must be re-checked after it is written (see
    /// [`crate::projection`]).
    fn apply(&self, events: &[Event<Self::Row>], store: &ReadModels<'_>) -> impl Future<Output = Result<()>> + Send;
}

/// What every job is configured with.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Consumer group (run more processes with the same group to share partitions). Default: cdc-cqrs-<table>.
    #[arg(long, env = "CDC_GROUP_ID")]
    pub group: Option<String>,

    /// Static group membership id, stable across restarts of this process, unique among the group's
    /// processes (Kafka KIP-345): a restarted job takes its partitions back at once, without a rebalance.
    /// Default: <hostname>-<job binary>; give each process of a scaled-out job its own, or "" for dynamic
    /// membership (what scaling out on the local brokers needs: README, "Known gaps").
    #[arg(long, env = "CDC_INSTANCE_ID")]
    pub instance_id: Option<String>,

    #[command(flatten)]
    pub stores: StoresArgs,

    /// Most records in one batch. Batches are otherwise as large as what has arrived: one change alone is
    /// written at once, and under load the records that come while a batch is written make the next one.
    /// Larger batches reduce more changes per key and make fewer round trips when catching up; they cost
    /// memory (each job's peak RSS is measured in "bench stream", README).
    #[arg(long, env = "CDC_BATCH_SIZE", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    /// Milliseconds to linger for more records once a batch has its first one (0: take what has arrived;
    /// more trades freshness for fewer, larger transactions).
    #[arg(long, env = "CDC_BATCH_MS", default_value_t = 0)]
    pub batch_ms: u64,

    /// Topic for records that cannot be decoded or projected. Default: <prefix>.dead_letter.
    #[arg(long, env = "CDC_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// The consumer group of `dead_letters redrive`: the letters after its offsets are the ones waiting
    /// (the metric `cdc_dead_letters_waiting`).
    #[arg(long, env = "CDC_REDRIVE_GROUP", default_value = dead_letter::REDRIVE_GROUP)]
    pub redrive_group: String,

    /// Serve Prometheus metrics (`/metrics`) and the pipelines' health (`/health`) on this address (e.g.
    /// 127.0.0.1:9101); off when not given.
    #[arg(long, env = "CDC_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// `/health` answers 503 once a store's pipeline has not come round its loop for this long (its store
    /// or the broker does not answer, or a write keeps failing), e.g. 30s, 2m.
    #[arg(long, env = "CDC_STALLED_AFTER", default_value = "30s", value_parser = stalled_after)]
    pub stalled_after: Duration,
}

/// A pipeline comes round every 200 ms when idle and once a batch under load: below a second, a busy one
/// would read as stalled.
fn stalled_after(s: &str) -> Result<Duration, String> {
    let d = crate::cli::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("'{s}' is under 1s: a pipeline writing a batch would read as stalled; give e.g. 30s"));
    }
    Ok(d)
}

/// A job binary's whole `main`: parses the job flags (`--help` describes them with `about`, followed by
/// what every job guarantees), runs the job until SIGTERM / Ctrl-C, and turns the outcome into the exit code.
pub fn main<J: Job>(job: J, about: &'static str) -> std::process::ExitCode {
    use clap::{Args as _, FromArgMatches as _};
    let about = format!(
        "{about} Every write is guarded by the WAL position it reflects and the checkpoints move after the \
         writes, so a crash or a replay never loses, doubles or regresses a change; stops cleanly on SIGTERM."
    );
    let command = JobArgs::augment_args(clap::Command::new(J::BIN)).about(about).version(env!("CARGO_PKG_VERSION"));
    let matches = command.get_matches();
    let args = JobArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // glibc gives each thread that allocates its own arena, and batches are allocated on one worker thread
    // and freed on another: two arenas keep a catch-up's peak RSS about a quarter lower, at no measured cost.
    // A batch's large buffers (update commands, Kafka fetches) are mapped and unmapped on their own rather
    // than left as holes in the heap once freed (glibc would raise its threshold after the first few).
    // (mimalloc instead: peak RSS 58-74 -> 135-185 MB, and no faster: bench/HISTORY.md, session 14.)
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
    }
    crate::cli::run(run(job, args))
}

/// Runs `job` until SIGTERM / Ctrl-C: one pipeline per read store, each with its own consumer and
/// checkpoints, so that a slow or unreachable store holds back only itself.
pub async fn run<J: Job>(job: J, args: JobArgs) -> Result<()> {
    let stores = args.stores.stores();
    anyhow::ensure!(!stores.is_empty(), "no read store: give --mongo-uri (or CDC_MONGO_URI) at least one URI");
    let metrics: Vec<Arc<Metrics>> =
        stores.iter().map(|s| Arc::new(Metrics::new(J::TABLE, &format!("store{}", s.index)))).collect();
    if let Some(addr) = args.metrics_addr {
        let dead_letter_topic = dead_letter::topic(&args.kafka, args.dead_letter_topic.as_deref());
        let process = Arc::new(ProcessMetrics::new(J::TABLE, &dead_letter_topic));
        serve(addr, metrics.clone(), process.clone(), args.stalled_after).await?;
        let (kafka, group) = (args.kafka.clone(), args.redrive_group.clone());
        tokio::spawn(dead_letter::watch_waiting(kafka, dead_letter_topic, group, process));
    }
    let shutdown = shutdown_signal();
    let (job, args) = (Arc::new(job), Arc::new(args));
    let mut pipelines = tokio::task::JoinSet::new();
    for (store, metrics) in stores.into_iter().zip(metrics) {
        let span = tracing::info_span!("store", store = %store.name);
        pipelines.spawn(run_store(job.clone(), args.clone(), store, metrics, shutdown.clone()).instrument(span));
    }
    while let Some(done) = pipelines.join_next().await {
        done.context("a store's pipeline panicked")??;
    }
    Ok(())
}

/// One store's pipeline. Every store keeps the same checkpoint group name (`group`) in its own database;
/// in Kafka, the pipelines of stores after the first use `<group>@store<i>`, to each read every partition.
async fn run_store<J: Job>(
    job: Arc<J>,
    args: Arc<JobArgs>,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let topic = args.kafka.table_topic(J::TABLE);
    let group = args.group.clone().unwrap_or_else(|| job_group(GROUP_PREFIX, J::TABLE));
    let suffix = if store.index == 0 { String::new() } else { format!("@store{}", store.index) };
    let dead_letter_topic = dead_letter::topic(&args.kafka, args.dead_letter_topic.as_deref());

    let sink = retry("connecting to MongoDB", &shutdown, &metrics.pulse, || MongoSink::connect(&store.mongo))
        .await
        .with_context(|| format!("stopped before {} answered", store.name))?;
    retry("creating the read models' indexes", &shutdown, &metrics.pulse, || sink.create_indexes()).await?;
    let member = if J::BATCHES_BY_TIME { kafka::partition_queues_config } else { kafka::consumer_config };
    let mut config = member(&args.kafka, &format!("{group}{suffix}"));
    // An empty id asks for dynamic membership.
    let instance_id = match args.instance_id.as_deref() {
        Some("") => String::new(),
        Some(id) => format!("{id}{suffix}"),
        None => format!("{}-{}{suffix}", crate::cli::hostname(), J::BIN),
    };
    if !instance_id.is_empty() {
        config.set("group.instance.id", &instance_id);
    }
    config.set("statistics.interval.ms", kafka::STATISTICS_MS.to_string());
    let context = JobContext { pulse: metrics.pulse.clone() };
    let consumer: JobConsumer = config.create_with_context(context).context("Kafka consumer")?;
    consumer.subscribe(&[&topic]).context("subscribing")?;
    let mut feed = Feed::new(consumer, &topic, J::BATCHES_BY_TIME);
    let dead_letters =
        DeadLetters::new(&args.kafka, dead_letter_topic, topic.clone(), store.name.clone(), sink.database())?;
    tracing::info!(job = J::TABLE, %topic, %group, %instance_id, database = %store.mongo.database, "started");

    let mut checkpoints = HashMap::new();
    let mut epoch = 0;
    let mut reload = true;
    let mut positions = Positions::default();
    let mut assigned: Vec<i32> = Vec::new();
    let mut last_lag_check = Instant::now() - Duration::from_secs(60);
    let mut last_pause_note: Option<Instant> = None;
    let mut last_epoch_check = Instant::now();
    let batch_size = args.batch_size as usize;
    let mut chunk = batch_size;
    // Records in hand, at most: a batch, and the next one fetched while it is written; more for a job whose
    // batches are slices of time, which takes the oldest of them.
    let hand_size = if J::BATCHES_BY_TIME { HAND_BATCHES * batch_size } else { batch_size };
    let mut prefetched = Vec::new();
    let mut kafka_offsets = KafkaOffsets::default();
    loop {
        if *shutdown.borrow() {
            break;
        }
        metrics.pulse.beat();
        let carried = std::mem::take(&mut prefetched);
        if carried.is_empty() {
            // Nothing in hand, so no partition is ahead of another.
            feed.release_all();
        }
        let linger = Duration::from_millis(args.batch_ms);
        let hand = poll_hand::<J::Row>(&feed, J::TABLE, carried, hand_size, linger, &shutdown).await;
        let now_assigned = assignment(feed.consumer());
        if hand.is_empty() && !reload && now_assigned == assigned {
            kafka_offsets.send_if_due(feed.consumer(), &topic);
            // Idle: a first_load epoch may still have moved the checkpoints back.
            if last_epoch_check.elapsed() > Duration::from_secs(1) {
                last_epoch_check = Instant::now();
                metrics.pulse.step("reading first_load's epoch");
                reload = handoff::read(sink.database(), None).await.is_ok_and(|h| h.epoch != epoch);
            }
            if !reload {
                continue;
            }
        }
        let started = Instant::now();
        let started_ms = now_ms();
        // Partitions handed over by another member come with that member's progress, and a first_load
        // rebuild may have moved checkpoints back: re-read them and read on from there.
        if now_assigned != assigned || reload {
            (checkpoints, epoch) = retry("reading checkpoints", &shutdown, &metrics.pulse, || async {
                let epoch = handoff::read(sink.database(), None).await?.epoch;
                Ok((sink.checkpoints(&group, &topic).await?, epoch))
            })
            .await?;
            tracing::info!(job = J::TABLE, partitions = ?now_assigned, epoch, "checkpoints (re)loaded");
            assigned = now_assigned;
            kafka_offsets.forget();
            metrics.assigned_partitions.set(assigned.len() as i64);
            reload = false;
            positions = Positions::default();
            feed.split(&assigned);
            positions.seek_all(feed.consumer(), &topic, &assigned, &checkpoints);
        }
        let hand = positions.resume_at_checkpoints(feed.consumer(), &topic, hand, &checkpoints);
        if hand.is_empty() {
            continue;
        }
        // What is not taken now is carried to the next batch (never dropped: nothing would fetch it again).
        let (batch, held) = oldest(hand, batch_size);
        if J::BATCHES_BY_TIME {
            metrics.partitions_held_back.inc(feed.pace(held.iter().map(|r| r.partition), batch_size) as u64);
        }
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        // In the batch's order.
        let mut events = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        let mut newest_source_ms = None;
        // Per change: (source commit, Kafka record timestamp, received), for the freshness histograms.
        let mut times: Vec<(i64, Option<i64>, i64)> = Vec::with_capacity(batch.len());
        let batch_len = batch.len();
        for record in batch {
            let (partition, offset) = (record.partition, record.offset);
            let end = next.entry(partition).or_default();
            *end = (*end).max(offset + 1);
            if checkpoints.get(&partition).is_some_and(|&done| offset < done) {
                metrics.skipped.inc(1);
                continue; // applied before a crash or a rebalance
            }
            match record.change {
                Ok(event) => {
                    let event = event.at(Place { partition, offset }, record.redriven);
                    // A change sent back from the dead-letter topic is old news: its commit would read
                    // as lag and its freshness as the time it spent there.
                    if let Some(source) = event.source().filter(|_| !record.redriven) {
                        newest_source_ms = newest_source_ms.max(Some(source.ts_ms));
                        times.push((source.ts_ms, record.timestamp, record.received_ms));
                    }
                    events.push(event);
                }
                Err(rejected) => dead.push((Place { partition, offset }, rejected)),
            }
        }
        metrics.records_in.inc(batch_len as u64);

        for (place, rejected) in &dead {
            let reason = &rejected.reason;
            // Undecodable for every store alike: the first store's pipeline sends it, the others go on. A letter
            // a store sent would come back from a redrive once a store, and each copy again once a store.
            if store.index != 0 {
                tracing::debug!(job = J::TABLE, place.partition, place.offset, %reason, "the first store's pipeline dead-letters this record");
                continue;
            }
            tracing::warn!(job = J::TABLE, place.partition, place.offset, %reason, "dead-lettering a record");
            retry("writing to the dead-letter topic", &shutdown, &metrics.pulse, || {
                dead_letters.undecodable(*place, &rejected.record, reason)
            })
            .await?;
            metrics.dead_lettered.inc(1);
        }
        let reduced = reduce::<J>(events);
        let batch_checkpoints: Vec<Checkpoint> = next
            .iter()
            .map(|(&partition, &next_offset)| Checkpoint { topic: topic.clone(), partition, next_offset })
            .collect();
        let writer = BatchWriter {
            job: job.as_ref(),
            sink: &sink,
            group: &group,
            applied: &checkpoints,
            epoch,
            metrics: &metrics,
            shutdown: &shutdown,
            dead_letters: &dead_letters,
            max_chunk: batch_size,
        };
        // The next batch's records are fetched while this one is written.
        let room = hand_size.saturating_sub(held.len());
        let (written, fetched) =
            while_prefetching(&feed, J::TABLE, room, writer.write(reduced, &batch_checkpoints, &mut chunk)).await;
        prefetched = held;
        prefetched.extend(fetched);
        let written = match written? {
            Ok(written) => written,
            Err(Applied::Paused(phase)) => {
                metrics.pulse.waiting_for_first_load(true);
                if last_pause_note.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(
                        job = J::TABLE,
                        phase = phase.name(),
                        "waiting for first_load (if it crashed, run it again)"
                    );
                    last_pause_note = Some(Instant::now());
                }
                // Read this batch again once the load is done.
                reload = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                tracing::info!(job = J::TABLE, "first_load started a new epoch; re-reading checkpoints");
                reload = true;
                continue;
            }
        };
        last_pause_note = None;
        metrics.pulse.waiting_for_first_load(false);
        metrics.written.inc(written as u64);

        for (&partition, &next_offset) in &next {
            checkpoints.insert(partition, next_offset);
        }
        kafka_offsets.note(&next);
        kafka_offsets.send_if_due(feed.consumer(), &topic);
        metrics.batches.inc(1);
        metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        let committed_ms = now_ms();
        if tracing::enabled!(tracing::Level::DEBUG) {
            // Where a change's time in the job went: waiting to be taken into a batch, or the batch's write.
            let oldest = times.iter().filter_map(|&(_, record_ms, _)| record_ms).min();
            tracing::debug!(
                job = J::TABLE,
                records = batch_len,
                oldest_waited_ms = oldest.map(|ms| started_ms - ms),
                took_ms = committed_ms - started_ms,
                "batch applied"
            );
        }
        if let Some(ts) = newest_source_ms {
            metrics.lag_ms.set((committed_ms - ts).max(0));
        }
        for (source_ms, record_ms, received_ms) in times {
            metrics.freshness.observe_ms(committed_ms - source_ms, 1);
            metrics.since_received.observe_ms(committed_ms - received_ms, 1);
            if let Some(record_ms) = record_ms {
                metrics.in_job.observe_ms(committed_ms - record_ms, 1);
            }
        }
        if last_lag_check.elapsed() > Duration::from_secs(5) {
            last_lag_check = Instant::now();
            metrics.lag_records.set(lag_records(feed.consumer(), &topic, &checkpoints));
        }
    }
    kafka_offsets.send(feed.consumer(), &topic, CommitMode::Sync);
    tracing::info!(job = J::TABLE, "stopped");
    Ok(())
}

/// The offsets told to Kafka, for lag tools only (the MongoDB checkpoints decide where a job resumes): at
/// most once a second and when the job stops, not after every batch. Each commit is a write for the
/// broker (tansu: 0.6-0.8 ms of its CPU, measured), and a job keeping up at 50 tx/s writes 15-20 batches
/// a second.
#[derive(Default)]
struct KafkaOffsets {
    /// Partition -> next offset, applied but not told yet.
    unsent: BTreeMap<i32, i64>,
    last_sent: Option<Instant>,
}

impl KafkaOffsets {
    fn note(&mut self, next: &BTreeMap<i32, i64>) {
        for (&partition, &offset) in next {
            let unsent = self.unsent.entry(partition).or_insert(offset);
            *unsent = (*unsent).max(offset);
        }
    }

    fn send_if_due(&mut self, consumer: &JobConsumer, topic: &str) {
        if self.last_sent.is_none_or(|t| t.elapsed() >= KAFKA_COMMIT_EVERY) {
            self.send(consumer, topic, CommitMode::Async);
        }
    }

    fn send(&mut self, consumer: &JobConsumer, topic: &str, mode: CommitMode) {
        if self.unsent.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (&partition, &offset) in &self.unsent {
            tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).expect("a valid offset");
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::debug!(error = %e, "committing offsets to Kafka (MongoDB checkpoints are authoritative)");
        }
        self.unsent.clear();
        self.last_sent = Some(Instant::now());
    }

    /// Drops what was not told: the partitions may be another member's now, and its offsets newer.
    fn forget(&mut self) {
        self.unsent.clear();
    }
}

/// How often a job tells Kafka its offsets, at most.
const KAFKA_COMMIT_EVERY: Duration = Duration::from_secs(1);

/// Writes a batch's reduced events to one store and moves its checkpoints.
///
/// A small batch is one lane, with its checkpoints. A large one is split by [`Job::lane_key`] into up to
/// [`LANES`] lanes written at once (MongoDB works on several commands in parallel, one command's
/// statements one after the other), then the checkpoints move on their own: a crash in between replays
/// the batch, and every write is guarded by its source position, so the replay changes nothing. A lane is
/// written in smaller pieces when its transaction outlives MongoDB's limit (`chunk` halves and grows back
/// slowly: a property of the data), or when MongoDB refuses a write for what it holds, until the change
/// that made the write stands alone: that one is dead-lettered and the lane goes on without it. A conflict
/// on its truncation watermark is retried after a short random pause.
struct BatchWriter<'a, J: Job> {
    job: &'a J,
    sink: &'a MongoSink,
    group: &'a str,
    /// The checkpoints before this batch.
    applied: &'a HashMap<i32, i64>,
    epoch: i64,
    metrics: &'a Metrics,
    shutdown: &'a watch::Receiver<bool>,
    dead_letters: &'a DeadLetters,
    max_chunk: usize,
}

/// A batch's outcome: write statements committed, or why nothing more was (first_load: paused, new epoch).
type Outcome = std::result::Result<usize, Applied>;

impl<J: Job> BatchWriter<'_, J> {
    async fn write(
        &self,
        events: Vec<Event<J::Row>>,
        checkpoints: &[Checkpoint],
        chunk: &mut usize,
    ) -> Result<Outcome> {
        let lanes = into_lanes::<J>(events);
        if lanes.len() == 1 {
            return self.lane(0, &lanes[0], checkpoints, chunk).await;
        }
        let start = *chunk;
        let results = futures::future::join_all(lanes.iter().enumerate().map(|(lane, events)| async move {
            let mut chunk = start;
            (self.lane(lane, events, &[], &mut chunk).await, chunk)
        }))
        .await;
        let mut written = 0;
        for (outcome, lane_chunk) in results {
            *chunk = (*chunk).min(lane_chunk);
            match outcome? {
                Ok(n) => written += n,
                stopped => return Ok(stopped),
            }
        }
        Ok(self.lane(0, &[], checkpoints, chunk).await?.map(|_| written))
    }

    /// Writes one lane's events in pieces of up to `chunk`, the last with `checkpoints`.
    async fn lane(
        &self,
        lane: usize,
        events: &[Event<J::Row>],
        checkpoints: &[Checkpoint],
        chunk: &mut usize,
    ) -> Result<Outcome> {
        let (mut start, mut written) = (0, 0);
        let mut conflicts_in_a_row = 0;
        loop {
            let end = (start + *chunk).min(events.len());
            let last = end == events.len();
            let covers = if last { checkpoints } else { &[] };
            let attempt = Instant::now();
            let applied = retry("writing the batch to MongoDB", self.shutdown, &self.metrics.pulse, || {
                let progress = Progress { applied: self.applied, moves: covers };
                self.sink.apply(self.job, &events[start..end], lane, self.group, progress, self.epoch)
            })
            .await?;
            match applied {
                Applied::Written { statements, raced } => {
                    written += statements;
                    self.metrics.conflicts.inc(raced as u64);
                    conflicts_in_a_row = 0;
                }
                Applied::Conflict => {
                    self.metrics.conflicts.inc(1);
                    conflicts_in_a_row += 1;
                    tokio::time::sleep(conflict_pause(conflicts_in_a_row)).await;
                    continue;
                }
                Applied::Refused(reason) if end - start > 1 => {
                    *chunk = ((end - start) / 2).max(1);
                    let pieces_of = *chunk;
                    tracing::debug!(job = J::TABLE, pieces_of, %reason, "isolating a refused change");
                    continue;
                }
                Applied::Refused(reason) => {
                    self.dead_letter(&events[start], &reason).await?;
                    start = end;
                    if start == events.len() && checkpoints.is_empty() {
                        return Ok(Ok(written));
                    }
                    continue; // the lane's checkpoints, if the refused change was its last
                }
                Applied::TooLarge => {
                    *chunk = ((end - start) / 2).max(1);
                    tracing::warn!(job = J::TABLE, events = *chunk, "writing the batch in smaller pieces");
                    if end - start == 1 {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    continue;
                }
                stopped => return Ok(Err(stopped)),
            }
            // Grow back slowly after a split, and never towards transactions of seconds.
            if attempt.elapsed() < Duration::from_secs(2) {
                *chunk = (*chunk + *chunk / 4 + 1).min(self.max_chunk);
            }
            if last {
                return Ok(Ok(written));
            }
            start = end;
        }
    }

    /// Sends a change MongoDB refused to the dead-letter topic, with the refusal as its reason.
    async fn dead_letter(&self, event: &Event<J::Row>, reason: &str) -> Result<()> {
        let place = event.source().and_then(|s| s.place).context("a refused change without its place")?;
        tracing::warn!(job = J::TABLE, place.partition, place.offset, %reason, "dead-lettering a refused change");
        retry("writing to the dead-letter topic", self.shutdown, &self.metrics.pulse, || {
            self.dead_letters.refused(place, reason)
        })
        .await?;
        self.metrics.dead_lettered.inc(1);
        Ok(())
    }
}

/// Below this many events a batch is one lane: each lane costs a transaction, and the checkpoints one
/// more. Lanes are for catching up (measured when batches were transactions over the shared documents:
/// with lanes from 512 events, the freshness run's order_details batches grew to 2,000 records and its p50
/// to 1 s; not measured again since the writes left the transactions).
const LANE_MIN_EVENTS: usize = 2048;

/// The batch's events by lane (in batch order within a lane, so a key's events stay in order); one lane
/// for a small batch, or one holding a TRUNCATE (which must see every event before it applied).
fn into_lanes<J: Job>(events: Vec<Event<J::Row>>) -> Vec<Vec<Event<J::Row>>> {
    if events.len() < LANE_MIN_EVENTS || events.iter().any(|e| matches!(e, Event::Truncate { .. })) {
        return vec![events];
    }
    let mut lanes: Vec<Vec<Event<J::Row>>> = (0..LANES).map(|_| Vec::with_capacity(events.len() / LANES + 1)).collect();
    for event in events {
        let key = event.row().map_or(0, J::lane_key);
        lanes[key.rem_euclid(LANES as i32) as usize].push(event);
    }
    lanes.retain(|lane| !lane.is_empty());
    lanes
}

/// A record as a job holds it from the topic to its batch: where it is, and its change decoded as it
/// arrives. A job holds a batch and the next one (order_details three), and a Kafka message's JSON is
/// several times its decoded change.
struct Record<R> {
    partition: i32,
    offset: i64,
    /// The Kafka record timestamp, epoch milliseconds.
    timestamp: Option<i64>,
    /// When the job took it from the consumer, epoch milliseconds.
    received_ms: i64,
    /// A dead letter sent back (`dead_letters redrive`): a late copy, not timed as fresh.
    redriven: bool,
    change: Result<Event<R>, Box<Rejected>>,
}

/// A record that did not decode: kept whole, for the dead-letter topic.
struct Rejected {
    record: SourceRecord,
    reason: String,
}

impl<R: DeserializeOwned> Record<R> {
    /// Decodes a message of `table`'s topic, as it comes from the consumer.
    fn take(table: &str, m: &BorrowedMessage<'_>) -> Self {
        let change = envelope::decode::<R>(table, m.payload())
            .map_err(|reason| Box::new(Rejected { record: SourceRecord::of(m), reason: reason.to_string() }));
        let (partition, offset, timestamp) = (m.partition(), m.offset(), m.timestamp().to_millis());
        // Debezium's records carry no headers: only a record sent back costs the look.
        let redriven = m.headers().is_some_and(|h| h.iter().any(|h| h.key == redrive::REDRIVEN_FROM));
        Record { partition, offset, timestamp, received_ms: now_ms(), redriven, change }
    }
}

/// `hand` with each partition's records in offset order, in the places its records had. They arrive in that
/// order, except across a split of the partition's queue ([`Feed::split`]): a record fetched before it can
/// come, through the consumer's own queue, after one fetched since; a batch's per-key reduction and its
/// checkpoints count on the order.
fn in_offset_order<R>(hand: Vec<Record<R>>) -> Vec<Record<R>> {
    let mut last: HashMap<i32, i64> = HashMap::new();
    let ordered = hand.iter().all(|r| last.insert(r.partition, r.offset).is_none_or(|before| before < r.offset));
    if ordered {
        return hand;
    }
    // Each partition's places in `hand`, and the same places in the order of their records' offsets.
    let mut places: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (i, r) in hand.iter().enumerate() {
        places.entry(r.partition).or_default().push(i);
    }
    let moves: Vec<(Vec<usize>, Vec<usize>)> = places
        .into_values()
        .map(|slots| {
            let mut by_offset = slots.clone();
            by_offset.sort_by_key(|&i| hand[i].offset);
            (slots, by_offset)
        })
        .collect();
    let mut taken: Vec<Option<Record<R>>> = hand.into_iter().map(Some).collect();
    let mut out: Vec<Option<Record<R>>> = (0..taken.len()).map(|_| None).collect();
    for (slots, by_offset) in &moves {
        for (&slot, &from) in slots.iter().zip(by_offset) {
            out[slot] = taken[from].take();
        }
    }
    out.into_iter().flatten().collect()
}

/// How many batches' worth of records a job whose batches are slices of time keeps in hand, to take the
/// oldest of: enough to hold every partition when a broker answers each fetch from one partition (tansu:
/// ~7,000 records of one partition per 4 MB fetch).
const HAND_BATCHES: usize = 3;

/// The batch to write now out of the records in `hand`: all of them, up to `size`; beyond that (catching
/// up), the `size` oldest by record timestamp, each partition's in offset order. The rest is returned, to be
/// carried to the next batch: per partition the newer records, so a checkpoint never passes one not written.
///
/// A broker hands a consumer each partition in long runs (tansu fills a whole fetch from one), so the
/// records in hand are one partition's, then another's. Changes of one source transaction are keyed by row
/// and spread over every partition: a batch of one run gets some of an order's new lines, the next
/// batches the others, and each rewrites the order (measured: 1.9 order writes per (order, transaction)
/// for order_details' catch-up). A batch that is one slice of time holds them together. Records of one
/// partition come in timestamp order (Kafka Connect's producer stamps them as it sends them).
fn oldest<R>(hand: Vec<Record<R>>, size: usize) -> (Vec<Record<R>>, Vec<Record<R>>) {
    let hand = in_offset_order(hand);
    if hand.len() <= size {
        return (hand, Vec::new());
    }
    // Each partition's records in hand, as positions in `hand`, in arrival (offset) order.
    let mut partitions: BTreeMap<i32, VecDeque<usize>> = BTreeMap::new();
    for (i, r) in hand.iter().enumerate() {
        partitions.entry(r.partition).or_default().push_back(i);
    }
    // Oldest first; records without a timestamp keep their arrival order.
    let stamp = |i: usize| (hand[i].timestamp.unwrap_or(i64::MIN), i);
    let mut take = vec![false; hand.len()];
    for _ in 0..size {
        let oldest_head = partitions.iter().filter_map(|(&p, queue)| Some((stamp(*queue.front()?), p))).min();
        let Some((_, p)) = oldest_head else { break };
        if let Some(i) = partitions.get_mut(&p).and_then(|queue| queue.pop_front()) {
            take[i] = true;
        }
    }
    let mut taken = take.into_iter();
    hand.into_iter().partition(|_| taken.next().unwrap_or(false))
}

/// Runs `work` (a batch's write) while taking the records that arrive meanwhile, up to `max`: the next
/// batch is in hand when the write is done.
async fn while_prefetching<R: DeserializeOwned, T>(
    feed: &Feed,
    table: &str,
    max: usize,
    work: impl Future<Output = T>,
) -> (T, Vec<Record<R>>) {
    tokio::pin!(work);
    let mut fetched = Vec::new();
    loop {
        tokio::select! {
            biased;
            out = &mut work => return (out, fetched),
            Ok(m) = feed.recv(), if fetched.len() < max => fetched.push(Record::take(table, &m)),
        }
    }
}

/// A random pause before retrying a batch whose transaction conflicted `n` times in a row on its watermark:
/// up to 5 ms, doubling with each conflict, at most 200 ms.
fn conflict_pause(n: u32) -> Duration {
    let cap = (5u64 << n.min(6)).min(200);
    Duration::from_millis(rand::random_range(0..=cap))
}

/// How long an idle job waits for a record before looking at the handoff state again.
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// The records in hand for the next batch: those `carried` (taken while the last batch was written, or held
/// back by [`oldest`]), else the first to arrive within [`IDLE_WAIT`], then what the consumer has already
/// fetched, up to `size`, lingering up to `linger` for more. Batches adapt to the load by themselves: a lone
/// change is written at once, and under load the records that arrive while a batch is written make the
/// next one.
async fn poll_hand<R: DeserializeOwned>(
    feed: &Feed,
    table: &str,
    carried: Vec<Record<R>>,
    size: usize,
    linger: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Vec<Record<R>> {
    let mut shutdown = shutdown.clone();
    let mut hand = carried;
    if hand.is_empty() {
        let first_by = tokio::time::Instant::now() + IDLE_WAIT;
        let Some(first) = next_record(feed, table, first_by, &mut shutdown).await else { return hand };
        hand.push(first);
    }
    let linger_until = tokio::time::Instant::now() + linger;
    while hand.len() < size {
        let record = match feed.ready() {
            Some(Ok(m)) => Record::take(table, &m),
            // Nothing ready (an error is reported by the next wait).
            _ if linger.is_zero() => break,
            _ => match next_record(feed, table, linger_until, &mut shutdown).await {
                Some(record) => record,
                None => break,
            },
        };
        hand.push(record);
    }
    hand
}

/// The next record, or `None` at `deadline` or shutdown; poll errors are logged and waited out.
async fn next_record<R: DeserializeOwned>(
    feed: &Feed,
    table: &str,
    deadline: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Record<R>> {
    loop {
        tokio::select! {
            received = feed.recv() => match received {
                Ok(m) => return Some(Record::take(table, &m)),
                Err(e) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) => {
                    tracing::info!("waiting for the topic to be created (Debezium creates it with the first change)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka poll failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = shutdown.changed() => return None,
        }
    }
}

/// Which partitions are known to be read from their MongoDB checkpoint.
///
/// The consumer starts a partition where Kafka's committed offset says. That is never behind what MongoDB
/// holds by much (records below the checkpoint are skipped as they come) but it can be past it: a
/// first_load rebuild rewinds checkpoints, and a batch dropped during a load leaves the consumer ahead.
/// A partition read from past its checkpoint is moved back with a seek.
#[derive(Default)]
struct Positions {
    on_track: HashSet<i32>,
    /// Partitions sought back once: the next record is taken as the start (offsets may have gaps).
    sought: HashSet<i32>,
}

impl Positions {
    /// Moves every assigned partition to its checkpoint at once (after a reload; the records in hand may
    /// be past it, and an idle partition would bring no record to notice it by). Records that still come
    /// from past a checkpoint are caught by [`Positions::resume_at_checkpoints`].
    fn seek_all(&mut self, consumer: &JobConsumer, topic: &str, partitions: &[i32], checkpoints: &HashMap<i32, i64>) {
        for &p in partitions {
            if let Err(e) = seek(consumer, topic, p, resume_offset(checkpoints, p)) {
                tracing::debug!(partition = p, error = %e, "seek after reload failed; the first record will tell");
            }
        }
    }

    /// The records of `batch` to process: those of partitions read from their checkpoint. A partition
    /// read from past its checkpoint is sought back and its records dropped (they come again).
    fn resume_at_checkpoints<R>(
        &mut self,
        consumer: &JobConsumer,
        topic: &str,
        batch: Vec<Record<R>>,
        checkpoints: &HashMap<i32, i64>,
    ) -> Vec<Record<R>> {
        let mut sought_now: HashSet<i32> = HashSet::new();
        for r in &batch {
            let p = r.partition;
            if self.on_track.contains(&p) || sought_now.contains(&p) {
                continue;
            }
            let next = resume_offset(checkpoints, p);
            if r.offset <= next || self.sought.contains(&p) {
                self.on_track.insert(p);
                continue;
            }
            match seek(consumer, topic, p, next) {
                Ok(()) => {
                    tracing::info!(partition = p, from = r.offset, to = next, "moved back to the checkpoint");
                    self.sought.insert(p);
                }
                Err(e) => tracing::warn!(partition = p, error = %e, "seeking to the checkpoint failed; retrying"),
            }
            sought_now.insert(p);
        }
        if sought_now.is_empty() {
            return batch;
        }
        batch.into_iter().filter(|r| !sought_now.contains(&r.partition)).collect()
    }
}

/// Where partition `p` resumes: its checkpoint, or the start when it has none.
fn resume_offset(checkpoints: &HashMap<i32, i64>, p: i32) -> i64 {
    checkpoints.get(&p).copied().unwrap_or(0)
}

/// Moves the consumer's position in partition `p` (librdkafka waits for the fetcher: off the async threads).
fn seek(consumer: &JobConsumer, topic: &str, p: i32, offset: i64) -> rdkafka::error::KafkaResult<()> {
    tokio::task::block_in_place(|| consumer.seek(topic, p, Offset::Offset(offset), Duration::from_secs(5)))
}

/// The last event of each key in the batch (and those the job must keep); truncates are all kept.
/// Version guards make the order of writes across keys irrelevant; within a key the last image is the
/// row's state.
fn reduce<J: Job>(events: Vec<Event<J::Row>>) -> Vec<Event<J::Row>> {
    let mut last: HashMap<i32, usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        if let Some(row) = e.row() {
            last.insert(J::key(row), i);
        }
    }
    events
        .into_iter()
        .enumerate()
        .filter(|(i, e)| match e {
            Event::Upsert { row, .. } | Event::Delete { before: row, .. } => {
                last[&J::key(row)] == *i || J::must_keep(e)
            }
            Event::Truncate { .. } => true,
            Event::Tombstone => false,
        })
        .map(|(_, e)| e)
        .collect()
}

/// The partitions this member holds, sorted.
fn assignment(consumer: &JobConsumer) -> Vec<i32> {
    let mut partitions: Vec<i32> =
        consumer.assignment().map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect()).unwrap_or_default();
    partitions.sort_unstable();
    partitions
}

/// Records between the checkpoints and the ends of the topic's partitions.
fn lag_records(consumer: &JobConsumer, topic: &str, checkpoints: &HashMap<i32, i64>) -> i64 {
    tokio::task::block_in_place(|| {
        checkpoints
            .iter()
            .filter_map(|(&p, &next)| {
                consumer.fetch_watermarks(topic, p, Duration::from_secs(2)).ok().map(|(_, hi)| hi - next)
            })
            .map(|lag| lag.max(0))
            .sum()
    })
}

/// Calls `attempt` until it succeeds, backing off from 200 ms to 10 s; gives up only at shutdown. Each
/// failure is the pipeline's last error on `/health` until its loop comes round again.
async fn retry<T, F, Fut>(
    what: &'static str,
    shutdown: &watch::Receiver<bool>,
    pulse: &Pulse,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    pulse.step(what);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !*shutdown.borrow() => {
                pulse.failed(what, &e);
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what} failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e).context(format!("{what} (shutting down)")),
        }
    }
}

/// Turns true at SIGTERM or Ctrl-C.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::cli::terminated().await;
        tracing::info!("shutting down after the batch in hand");
        let _ = tx.send(true);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Source;
    use crate::projection::order_details::OrderDetailsJob;
    use crate::rows::OrderDetail;

    fn source(lsn: u64) -> Source {
        Source { lsn, tx_id: Some(lsn), ts_ms: 0, snapshot: false, place: None, redriven: false }
    }

    fn line(id: i32, order_id: i32, lsn: u64) -> Event<OrderDetail> {
        let row = OrderDetail {
            order_detail_id: id,
            order_id,
            product_id: 1,
            unit_price: "1.00".parse().unwrap(),
            quantity: 1,
            discount: "0".parse().unwrap(),
        };
        Event::Upsert { row, before: None, source: source(lsn) }
    }

    fn orders(lane: &[Event<OrderDetail>]) -> Vec<i32> {
        lane.iter().filter_map(|e| e.row().map(|r| r.order_id)).collect()
    }

    #[test]
    fn a_large_batch_splits_by_lane_key_and_keeps_each_lanes_order() {
        let events: Vec<_> = (0..3000).map(|i| line(i, i / 3, i as u64)).collect();
        let lanes = into_lanes::<OrderDetailsJob>(events);
        assert_eq!(lanes.len(), LANES);
        let mut seen = HashMap::new();
        for (lane, events) in lanes.iter().enumerate() {
            // An order's lines are all in one lane, in batch order.
            for order in orders(events) {
                assert_eq!(*seen.entry(order).or_insert(lane), lane, "order {order} in two lanes");
            }
            let positions: Vec<u64> = events.iter().filter_map(|e| e.source().map(|s| s.lsn)).collect();
            assert!(positions.is_sorted(), "lane {lane} out of order");
        }
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 3000);
    }

    /// A record of partition `p` at `offset`, stamped `ms` (none when negative).
    fn record(p: i32, offset: i64, ms: i64) -> Record<OrderDetail> {
        Record {
            partition: p,
            offset,
            timestamp: (ms >= 0).then_some(ms),
            received_ms: 0,
            redriven: false,
            change: Ok(Event::Tombstone),
        }
    }

    fn places(records: &[Record<OrderDetail>]) -> Vec<(i32, i64)> {
        records.iter().map(|r| (r.partition, r.offset)).collect()
    }

    #[test]
    fn a_batch_is_the_oldest_records_in_hand_and_the_rest_is_carried_in_order() {
        // A broker's long runs: partition 0's records first, then partition 1's, of the same time.
        let mut hand: Vec<_> = (0..6).map(|i| record(0, i, 100 + i * 10)).collect();
        hand.extend((0..6).map(|i| record(1, i, 105 + i * 10)));
        let (batch, held) = oldest(hand, 6);
        // The three oldest of each partition: each partition's taken part is a prefix, so its checkpoint
        // never passes a record carried to the next batch.
        assert_eq!(places(&batch), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
        assert_eq!(places(&held), [(0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)]);
        // Fewer records than a batch: all of them, none carried.
        let (batch, held) = oldest(held, 6);
        assert_eq!((batch.len(), held.len()), (6, 0));
    }

    #[test]
    fn a_partitions_records_are_put_back_in_offset_order_in_their_places() {
        // Partition 1's offset 5 came late (through the consumer's queue, across a split).
        let hand = vec![record(1, 6, 10), record(0, 3, 11), record(1, 7, 12), record(1, 5, 9), record(0, 4, 13)];
        let (batch, held) = oldest(hand, 10);
        assert_eq!(places(&batch), [(1, 5), (0, 3), (1, 6), (1, 7), (0, 4)]);
        assert!(held.is_empty());
    }

    #[test]
    fn records_without_timestamps_are_taken_in_arrival_order() {
        let hand = vec![record(1, 7, -1), record(0, 3, -1), record(1, 8, -1), record(0, 4, -1)];
        let (batch, held) = oldest(hand, 3);
        assert_eq!(places(&batch), [(1, 7), (0, 3), (1, 8)]);
        assert_eq!(places(&held), [(0, 4)]);
    }

    #[test]
    fn small_batches_and_truncates_stay_in_one_lane() {
        let small: Vec<_> = (0..10).map(|i| line(i, i, i as u64)).collect();
        assert_eq!(into_lanes::<OrderDetailsJob>(small).len(), 1);
        let mut large: Vec<_> = (0..3000).map(|i| line(i, i, i as u64)).collect();
        large.insert(1000, Event::Truncate { source: source(1000) });
        let lanes = into_lanes::<OrderDetailsJob>(large);
        assert_eq!(lanes.len(), 1);
        assert!(matches!(lanes[0][1000], Event::Truncate { .. }));
    }
}
