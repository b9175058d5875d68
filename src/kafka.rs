//! Kafka client settings shared by every consumer and producer of the project.
//!
//! One place decides how the project talks to the broker, so the broker fidelity test exercises exactly
//! the consumer the stream jobs run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};

use crate::config::KafkaArgs;
use crate::health::Pulse;

/// A consumer-group member that commits by hand, after the work a message covers is durable.
///
/// `session.timeout.ms` is short because a group join waits for about half of it on tansu (STACK.md), and
/// a crashed member should hand its partitions over quickly anyway.
pub fn consumer_config(args: &KafkaArgs, group_id: &str) -> ClientConfig {
    member_config(args, group_id, PREFETCH_KBYTES)
}

/// The same member, reading each partition through a queue of its own ([`crate::feed`]). librdkafka then
/// bounds each partition's prefetch by `queued.max.messages.kbytes` instead of the whole consumer's: a
/// quarter of the whole (four partitions) keeps a job's prefetch as it was (measured, order_details' catch-up:
/// peak RSS 114-119 MB at 8 MB a partition, 77 MB at 2 MB).
pub fn partition_queues_config(args: &KafkaArgs, group_id: &str) -> ClientConfig {
    member_config(args, group_id, PREFETCH_KBYTES / 4)
}

/// What a job prefetches, in kilobytes: about a full batch and more (10,000 records are ~6 MB), not
/// librdkafka's 64 MB (a job's RSS).
const PREFETCH_KBYTES: u32 = 8192;

fn member_config(args: &KafkaArgs, group_id: &str, prefetch_kbytes: u32) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // How long the broker may hold a fetch that finds nothing new. A broker that answers a waiting fetch
        // as soon as a record arrives (Apache Kafka) makes this only the rate of empty fetches; one that
        // answers when the wait ends (tansu) adds up to it to every change's freshness (measured, 500 tx/s:
        // in the jobs p99 207-219 ms at 100, 69-133 ms at 20; idle, tansu 1.5% -> 4% of a core per consumer).
        .set("fetch.wait.max.ms", "20")
        // In fetches of at most 4 MB (librdkafka asks for 50 MB at a time by default).
        .set("queued.max.messages.kbytes", prefetch_kbytes.to_string())
        .set("fetch.max.bytes", "4194304")
        // Once that prefetch is full, look again soon: librdkafka waits 1 s by default, and a job drains 8 MB
        // in a few hundred ms when catching up (measured: the orders job stood idle ~0.7 s every ~3 batches).
        .set("fetch.queue.backoff.ms", "10")
        // noida-db ignores fetch.max.bytes: a fetch from far behind answers with everything up to the
        // partition end (169 MB for 260,000 records). A broker that honours it never sends more than it.
        .set("receive.message.max.bytes", "1073741824")
        // A job may start before Debezium has created its topic (it does so with the first change): look
        // for it every few seconds, not every 5 minutes (librdkafka's default).
        .set("topic.metadata.refresh.interval.ms", "5000");
    with_options(cfg, args)
}

/// An idempotent producer: a retried send is never written twice.
pub fn producer_config(args: &KafkaArgs) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    with_options(cfg, args)
}

/// A reader of single records at given places, outside any group: it never commits.
pub fn reader_config(args: &KafkaArgs) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers)
        .set("group.id", "cdc-cqrs-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    with_options(cfg, args)
}

/// The user's own settings (`--kafka-option`) over the project's.
fn with_options(mut cfg: ClientConfig, args: &KafkaArgs) -> ClientConfig {
    for option in &args.options {
        cfg.set(&option.key, &option.value);
    }
    cfg
}

/// A stream job's consumer.
pub type JobConsumer = StreamConsumer<JobContext>;

/// What a stream job's consumer tells of librdkafka's errors: a topic that does not exist yet is what a job
/// started before Debezium's first change of its table meets (Debezium creates the topic then), not an
/// error; anything else is logged as librdkafka says it. Its statistics (every [`STATISTICS_MS`]) say whether
/// any broker connection is up, for the pipeline's health: a consumer polling a broker that is gone looks
/// the same as one with nothing to read.
pub struct JobContext {
    pub pulse: Arc<Pulse>,
}

/// How often a job's consumer reports its brokers' states (`statistics.interval.ms`).
pub const STATISTICS_MS: u32 = 5000;

impl ClientContext for JobContext {
    fn stats_raw(&self, statistics: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Statistics {
            brokers: HashMap<String, Broker>,
        }
        #[derive(serde::Deserialize)]
        struct Broker {
            state: String,
        }
        if let Ok(s) = serde_json::from_slice::<Statistics>(statistics) {
            self.pulse.broker_reachable(s.brokers.values().any(|b| b.state == "UP"));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
            tracing::warn!(
                reason,
                "the topic does not exist yet: Debezium creates it with the table's first change (if it never \
                 comes, check --topic-prefix)"
            );
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for JobContext {}

/// Topic ends, or a job's checkpoints: (topic, partition) -> next offset.
pub type Offsets = HashMap<(String, i32), i64>;

/// The end offsets of every partition of `topics` (a topic not created yet has none). Blocking.
pub fn topic_ends(consumer: &BaseConsumer, topics: &[String]) -> Result<Offsets> {
    let mut ends = Offsets::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).context("topic metadata")?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        for p in 0..partitions as i32 {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).context("topic ends")?;
            ends.insert((topic.clone(), p), high);
        }
    }
    Ok(ends)
}

/// Per topic, the records up to `ends` that `applied` (a store's checkpoints) does not cover; a partition
/// without a checkpoint has applied nothing, one past the end read earlier is not behind.
pub fn records_behind<'a>(ends: &'a Offsets, applied: &Offsets) -> HashMap<&'a str, u64> {
    let mut behind: HashMap<&str, u64> = HashMap::new();
    for (tp, &end) in ends {
        *behind.entry(tp.0.as_str()).or_default() += (end - applied.get(tp).copied().unwrap_or(0)).max(0) as u64;
    }
    behind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_counts_each_topics_records_past_its_checkpoints() {
        let ends = Offsets::from([
            (("t".into(), 0), 10),
            (("t".into(), 1), 5),
            (("t".into(), 2), 3),
            (("other".into(), 0), 100),
        ]);
        // Partition 0 four behind, 1 caught up (a checkpoint past the end read earlier counts as none),
        // 2 never checkpointed: all three of its records.
        let applied = Offsets::from([(("t".into(), 0), 6), (("t".into(), 1), 7), (("other".into(), 0), 100)]);
        assert_eq!(records_behind(&ends, &applied), HashMap::from([("t", 4 + 3), ("other", 0)]));
        let caught_up = Offsets::from([(("t".into(), 0), 10), (("t".into(), 1), 5), (("t".into(), 2), 3)]);
        assert_eq!(records_behind(&ends, &caught_up)["t"], 0);
    }
}
