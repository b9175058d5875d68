//! The dead-letter topic read back, and its records sent to the topics they came from: what the
//! `dead_letters` tool does once the cause of a dead letter is fixed (a job version that decodes what an
//! older one could not, a validator changed, lines removed from an order grown past 16 MB).
//!
//! A record sent back is its source record, byte for byte, to its source partition: the job reads it as a
//! late copy of the change and its version guards decide, as for any replay (DESIGN invariant 2): applied
//! where nothing newer of the row is in MongoDB, nothing otherwise. How far redriving went is the committed
//! offset of a consumer group of its own, so each dead letter is sent back once; one refused again comes
//! back to the dead-letter topic as a new record.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{DeadLetterArgs, SourceRecord};
use crate::config::KafkaArgs;
use crate::envelope;
use crate::kafka;

/// The header naming where a record sent back was dead-lettered (`<topic>/<partition>/<offset>`).
pub const REDRIVEN_FROM: &str = "redriven_from";

/// How long the broker may take to deliver the next record it says it holds.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// One record of the dead-letter topic, with what its headers say.
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (epoch ms).
    pub timestamp_ms: Option<i64>,
    pub record: SourceRecord,
    pub reason: String,
    /// Where it came from; `None` if its headers do not say (not written by a job).
    pub source: Option<SourcePlace>,
    /// The read store that refused it (none: it did not decode).
    pub store: Option<String>,
}

/// A record's place in its source topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePlace {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl DeadLetter {
    fn of(m: &BorrowedMessage<'_>) -> DeadLetter {
        let mut headers = BTreeMap::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                headers.insert(h.key, String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned());
            }
        }
        DeadLetter {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            record: SourceRecord::of(m),
            reason: headers.get("reason").cloned().unwrap_or_default(),
            source: source_place(&headers),
            store: headers.get("store").cloned(),
        }
    }
}

/// The source place the headers name, if they name a whole one.
fn source_place(headers: &BTreeMap<&str, String>) -> Option<SourcePlace> {
    Some(SourcePlace {
        topic: headers.get("source_topic")?.clone(),
        partition: headers.get("source_partition")?.parse().ok()?,
        offset: headers.get("source_offset")?.parse().ok()?,
    })
}

/// One partition of the dead-letter topic as a run found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The first record still held.
    pub low: i64,
    /// Past the last record when the run began: what the run reads up to (later records wait for the next).
    pub high: i64,
    /// Where the last redrive stopped (the records before it were sent back or passed over).
    pub redriven: Option<i64>,
}

impl Span {
    /// Where a redrive starts in this partition.
    pub fn next_to_redrive(&self) -> i64 {
        self.redriven.unwrap_or(self.low).clamp(self.low, self.high)
    }
}

/// The dead-letter topic, read through the redrive group's consumer.
pub struct DeadLetterTopic {
    consumer: StreamConsumer,
    pub topic: String,
    pub group: String,
    pub partitions: BTreeMap<i32, Span>,
}

impl DeadLetterTopic {
    /// The topic's partitions and where the group stands in each; `None` if the topic does not exist (nothing
    /// was ever dead-lettered there).
    pub fn open(args: &KafkaArgs, topic: &str, group: &str) -> Result<Option<DeadLetterTopic>> {
        let consumer: StreamConsumer =
            kafka::reader_config(args).set("group.id", group).create().context("Kafka consumer")?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("reading the metadata of {topic} from {}", args.brokers))?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(None) };
        if found.error().is_some() || found.partitions().is_empty() {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        for p in found.partitions() {
            tpl.add_partition(topic, p.id());
        }
        let committed = consumer.committed_offsets(tpl, timeout).context("reading the redrive group's offsets")?;
        let mut partitions = BTreeMap::new();
        for p in found.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .with_context(|| format!("reading where partition {} of {topic} begins and ends", p.id()))?;
            let redriven = match committed.find_partition(topic, p.id()).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            partitions.insert(p.id(), Span { low, high, redriven });
        }
        Ok(Some(DeadLetterTopic { consumer, topic: topic.to_owned(), group: group.to_owned(), partitions }))
    }

    /// Where a read starts in each partition: the first record held (`from_beginning`), or where the last redrive
    /// stopped.
    pub fn starts(&self, from_beginning: bool) -> BTreeMap<i32, i64> {
        let start = |s: &Span| if from_beginning { s.low } else { s.next_to_redrive() };
        self.partitions.iter().map(|(&p, s)| (p, start(s))).collect()
    }

    /// The letters after where the redrive group stands, up to the ends found by [`DeadLetterTopic::open`].
    pub fn waiting(&self) -> i64 {
        self.partitions.values().map(|s| s.high - s.next_to_redrive()).sum()
    }

    /// Each partition's end as found by [`DeadLetterTopic::open`].
    pub fn ends(&self) -> BTreeMap<i32, i64> {
        self.partitions.iter().map(|(&p, s)| (p, s.high)).collect()
    }

    /// Reads from `start` (per partition) up to each partition's end as found by [`DeadLetterTopic::open`].
    pub fn read_from(&self, start: &BTreeMap<i32, i64>) -> Result<Reading<'_>> {
        let mut tpl = TopicPartitionList::new();
        let mut remaining = BTreeMap::new();
        for (&p, span) in &self.partitions {
            let from = start.get(&p).copied().unwrap_or(span.low).clamp(span.low, span.high);
            if from < span.high {
                tpl.add_partition_offset(&self.topic, p, Offset::Offset(from))?;
                remaining.insert(p, span.high);
            }
        }
        self.consumer.assign(&tpl).context("assigning the dead-letter topic's partitions")?;
        Ok(Reading { topic: self, remaining })
    }

    /// Stores `next` (per partition) as where the next redrive starts.
    pub fn mark_redriven(&self, next: &BTreeMap<i32, i64>) -> Result<()> {
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &offset) in next {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(offset))?;
        }
        self.consumer.commit(&tpl, CommitMode::Sync).context("committing the redrive group's offsets")
    }
}

/// A read of the dead-letter topic, up to the ends found when it was opened.
pub struct Reading<'t> {
    topic: &'t DeadLetterTopic,
    /// Per partition still being read: its end.
    remaining: BTreeMap<i32, i64>,
}

impl Reading<'_> {
    /// The next record, or `None` once every partition is read to its end.
    pub async fn next(&mut self) -> Result<Option<DeadLetter>> {
        while !self.remaining.is_empty() {
            let m = tokio::time::timeout(READ_TIMEOUT, self.topic.consumer.recv())
                .await
                .with_context(|| {
                    let left: Vec<String> =
                        self.remaining.iter().map(|(p, end)| format!("partition {p} up to {end}")).collect();
                    format!(
                        "{}: no record in {READ_TIMEOUT:?}, though it said it held {}",
                        self.topic.topic,
                        left.join(", ")
                    )
                })?
                .context("reading the dead-letter topic")?;
            let Some(&end) = self.remaining.get(&m.partition()) else { continue };
            if m.offset() + 1 >= end {
                self.remaining.remove(&m.partition());
            }
            if m.offset() < end {
                return Ok(Some(DeadLetter::of(&m)));
            }
        }
        Ok(None)
    }
}

/// The dead letters `redrive` has not gone over yet, by the WAL position of their change: what `compact`
/// keeps redrivable (see [`crate::compaction`]).
#[derive(Debug, Default)]
pub struct Waiting {
    /// Per position, the first letter holding it (`<topic>/<partition>/<offset>`).
    by_lsn: BTreeMap<u64, String>,
    /// Letters whose record names no position (it is not a Debezium envelope at all).
    pub without_position: u64,
}

impl Waiting {
    /// Reads the letters after where the redrive group stands, up to the topic's end now (none if the topic
    /// does not exist).
    pub async fn read(args: &KafkaArgs, dead_letters: &DeadLetterArgs) -> Result<Waiting> {
        let topic = dead_letters.topic(args);
        let mut waiting = Waiting::default();
        let Some(dlt) = DeadLetterTopic::open(args, &topic, &dead_letters.redrive_group)? else { return Ok(waiting) };
        let mut reading = dlt.read_from(&dlt.starts(false))?;
        while let Some(letter) = reading.next().await? {
            match letter.record.payload.as_deref().and_then(envelope::lsn_of) {
                Some(lsn) => {
                    waiting
                        .by_lsn
                        .entry(lsn)
                        .or_insert_with(|| format!("{topic}/{}/{}", letter.partition, letter.offset));
                }
                None => waiting.without_position += 1,
            }
        }
        Ok(waiting)
    }

    /// The oldest letter whose change is after `lsn`, and where it is.
    pub fn oldest_after(&self, lsn: i64) -> Option<(u64, &str)> {
        let from = u64::try_from(lsn.saturating_add(1)).unwrap_or(0);
        self.by_lsn.range(from..).next().map(|(&lsn, at)| (lsn, at.as_str()))
    }
}

/// Sends dead letters back to the places they came from.
pub struct SendBack {
    producer: FutureProducer,
    /// The dead-letter topic, named in each record sent back (`redriven_from`).
    from: String,
}

impl SendBack {
    pub fn new(args: &KafkaArgs, from: &str) -> Result<SendBack> {
        let producer = kafka::producer_config(args).create().context("Kafka producer")?;
        Ok(SendBack { producer, from: from.to_owned() })
    }

    /// Sends each of `letters` (all with a source) to its source partition, at once; returns when the
    /// broker has them all.
    pub async fn send(&self, letters: &[DeadLetter]) -> Result<()> {
        let sends = letters.iter().map(|letter| async move {
            let Some(source) = &letter.source else { bail!("dead letter {} has no source", letter.offset) };
            let from = format!("{}/{}/{}", self.from, letter.partition, letter.offset);
            let headers = OwnedHeaders::new().insert(Header { key: REDRIVEN_FROM, value: Some(&from) });
            let mut out = FutureRecord::<[u8], [u8]>::to(&source.topic).partition(source.partition).headers(headers);
            if let Some(k) = &letter.record.key {
                out = out.key(k);
            }
            if let Some(p) = &letter.record.payload {
                out = out.payload(p);
            }
            self.producer.send(out, Duration::from_secs(30)).await.map_err(|(e, _)| {
                anyhow::Error::new(e)
                    .context(format!("sending {from} back to {} partition {}", source.topic, source.partition))
            })?;
            Ok(())
        });
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}

/// Which dead letters a redrive sends back.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only those whose reason contains this text.
    pub reason_contains: Option<String>,
    /// Only those that came from this topic.
    pub source_topic: Option<String>,
}

impl Filter {
    /// Why `letter` is passed over, or `None` to send it back.
    pub fn passes_over(&self, letter: &DeadLetter) -> Option<&'static str> {
        let Some(source) = &letter.source else { return Some("no source_topic/source_partition header") };
        if self.source_topic.as_ref().is_some_and(|t| t != &source.topic) {
            return Some("another --source-topic");
        }
        if self.reason_contains.as_ref().is_some_and(|r| !letter.reason.contains(r.as_str())) {
            return Some("not matching --reason-contains");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str, source: Option<&str>) -> DeadLetter {
        DeadLetter {
            partition: 0,
            offset: 7,
            timestamp_ms: None,
            record: SourceRecord { key: None, payload: Some(b"{}".to_vec()) },
            reason: reason.into(),
            source: source.map(|t| SourcePlace { topic: t.into(), partition: 1, offset: 2 }),
            store: None,
        }
    }

    #[test]
    fn a_source_is_named_only_by_all_three_headers() {
        let mut h = BTreeMap::from([("source_topic", "t".to_owned()), ("source_partition", "3".to_owned())]);
        assert_eq!(source_place(&h), None);
        h.insert("source_offset", "41".to_owned());
        assert_eq!(source_place(&h), Some(SourcePlace { topic: "t".into(), partition: 3, offset: 41 }));
        h.insert("source_partition", "three".to_owned());
        assert_eq!(source_place(&h), None);
    }

    #[test]
    fn a_filter_passes_over_what_it_does_not_name_and_what_has_no_source() {
        let all = Filter::default();
        assert_eq!(all.passes_over(&letter("Document failed validation", Some("a"))), None);
        assert!(all.passes_over(&letter("x", None)).is_some());
        let some = Filter { reason_contains: Some("validation".into()), source_topic: Some("a".into()) };
        assert_eq!(some.passes_over(&letter("Document failed validation", Some("a"))), None);
        assert!(some.passes_over(&letter("Document failed validation", Some("b"))).is_some());
        assert!(some.passes_over(&letter("not a Debezium JSON envelope", Some("a"))).is_some());
    }

    #[test]
    fn the_oldest_waiting_letter_is_the_first_after_a_position() {
        let at = |s: &str| s.to_owned();
        let waiting = Waiting { by_lsn: BTreeMap::from([(50, at("d/0/3")), (90, at("d/0/1"))]), without_position: 0 };
        assert_eq!(waiting.oldest_after(-1), Some((50, "d/0/3")));
        assert_eq!(waiting.oldest_after(49), Some((50, "d/0/3")));
        assert_eq!(waiting.oldest_after(50), Some((90, "d/0/1")), "at or below the horizon: nothing to keep");
        assert_eq!(waiting.oldest_after(90), None);
    }

    #[test]
    fn a_redrive_starts_where_the_last_stopped_within_what_the_topic_holds() {
        let span = |redriven| Span { low: 5, high: 9, redriven };
        assert_eq!(span(None).next_to_redrive(), 5);
        assert_eq!(span(Some(7)).next_to_redrive(), 7);
        assert_eq!(span(Some(2)).next_to_redrive(), 5, "records before it are gone");
        assert_eq!(span(Some(12)).next_to_redrive(), 9);
    }
}
