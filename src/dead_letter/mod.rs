//! The dead-letter topic (DESIGN invariant 6): a record a job cannot apply goes there whole, with why and
//! where it came from in its headers, and the job goes on.
//!
//! Two kinds of records end there: one that does not decode (sent before its batch is written), and a change
//! MongoDB refuses for what it holds, a document over 16 MB say (the runtime writes its batch in halves until
//! the change stands alone). A job keeps only the decoded change, so a refused change's record is read back
//! from its topic: what lands in the dead-letter topic is always the source record, ready to be sent again
//! ([`redrive`], the `dead_letters` tool).
//!
//! Each record is sent once: one that does not decode by the first read store's pipeline only (it is the same
//! for every store), and a replay sends nothing a store's pipelines sent before (their `_dead_lettered` notes).

pub mod redrive;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bson::doc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaArgs;
use crate::envelope::Place;
use crate::kafka;
use crate::metrics::ProcessMetrics;

/// The consumer group whose offsets remember how far `dead_letters redrive` went, unless told otherwise.
pub const REDRIVE_GROUP: &str = "cdc-cqrs-redrive";

/// How often a job reads how many dead letters wait (see [`watch_waiting`]).
const WAITING_EVERY: Duration = Duration::from_secs(10);

/// The collection of a read store that records the source records dead-lettered (see [`DeadLetters`]).
pub const SENT: &str = "_dead_lettered";

/// The `_id` of a note in [`SENT`]: the source record's place.
fn sent_id(topic: &str, place: Place) -> String {
    format!("{topic}/{}/{}", place.partition, place.offset)
}

/// The source topic, partition and offset a note's `_id` names (see [`sent_id`]; topic names hold no `/`).
pub fn parse_sent_id(id: &str) -> Option<(&str, i32, i64)> {
    let mut parts = id.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    Some((parts.next()?, partition, offset))
}

/// Where the dead letters are and how far `dead_letters redrive` went: what the `dead_letters` tool reads, and
/// `compact`, which keeps every letter not sent back yet redrivable.
#[derive(clap::Args, Clone, Debug)]
pub struct DeadLetterArgs {
    /// The dead-letter topic. Default: <prefix>.dead_letter, where the jobs write by default.
    #[arg(long, env = "CDC_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// The consumer group whose offsets remember how far `dead_letters redrive` went.
    #[arg(long, alias = "group", env = "CDC_REDRIVE_GROUP", default_value = REDRIVE_GROUP)]
    pub redrive_group: String,
}

impl DeadLetterArgs {
    pub fn topic(&self, kafka: &KafkaArgs) -> String {
        topic(kafka, self.dead_letter_topic.as_deref())
    }
}

/// The dead-letter topic: `explicit`, or `<prefix>.dead_letter`.
pub fn topic(kafka: &KafkaArgs, explicit: Option<&str>) -> String {
    explicit.map_or_else(|| format!("{}.dead_letter", kafka.topic_prefix), str::to_owned)
}

/// Keeps the process's dead-letter gauges at the letters in `topic` not sent back yet (after where the redrive
/// `group` stands: what the next `dead_letters redrive` goes over) and when the oldest of them was sent, read
/// every [`WAITING_EVERY`]: the series an operator alerts on, since a letter waits until someone acts. A failed
/// read keeps the last values.
pub async fn watch_waiting(kafka: KafkaArgs, topic: String, group: String, process: Arc<ProcessMetrics>) {
    let mut failing = false;
    let mut heads = Heads::new();
    loop {
        let (kafka, topic, group, known) = (kafka.clone(), topic.clone(), group.clone(), heads.clone());
        // The client is made and dropped (its close blocks) on a blocking thread.
        let read = tokio::task::spawn_blocking(move || read_waiting(&kafka, &topic, &group, &known)).await;
        match read.map_err(anyhow::Error::new).and_then(|r| r) {
            Ok((count, found)) => {
                process.dead_letters_waiting.set(count);
                process.oldest_dead_letter_ms.set(found.values().filter_map(|&(_, at)| at).min().unwrap_or(0));
                heads = found;
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %format!("{e:#}"), "reading how many dead letters wait; trying again");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(WAITING_EVERY).await;
    }
}

/// Per partition where letters wait: the first one's offset and when it was dead-lettered (epoch ms).
type Heads = BTreeMap<i32, (i64, Option<i64>)>;

/// How many letters wait, and their [`Heads`]. A head is read from the topic only when it is not in `known`
/// (a redrive or a skip moved past the one before): one record, not every letter every time.
fn read_waiting(kafka: &KafkaArgs, topic: &str, group: &str, known: &Heads) -> Result<(i64, Heads)> {
    let Some(letters) = redrive::DeadLetterTopic::open(kafka, topic, group)? else { return Ok((0, Heads::new())) };
    let mut heads = Heads::new();
    let mut unread = BTreeMap::new();
    for (&partition, span) in &letters.partitions {
        let head = span.next_to_redrive();
        if head >= span.high {
            continue;
        }
        match known.get(&partition) {
            Some(&(offset, at)) if offset == head => {
                heads.insert(partition, (head, at));
            }
            _ => {
                unread.insert(partition, head);
            }
        }
    }
    if !unread.is_empty() {
        tokio::runtime::Handle::current().block_on(async {
            let mut reading = letters.read_from(&unread)?;
            while unread.keys().any(|p| !heads.contains_key(p)) {
                let Some(letter) = reading.next().await? else { break };
                if let Some(&head) = unread.get(&letter.partition) {
                    heads.entry(letter.partition).or_insert((head, letter.timestamp_ms));
                }
            }
            anyhow::Ok(())
        })?;
    }
    Ok((letters.waiting(), heads))
}

/// Where one job's pipeline sends what it cannot apply.
pub struct DeadLetters {
    producer: FutureProducer,
    kafka: KafkaArgs,
    /// The dead-letter topic.
    topic: String,
    /// The table topic the job reads.
    source_topic: String,
    /// The read store the pipeline writes (a refusal is one store's).
    store: String,
    /// The store's record of the source records dead-lettered (`_dead_lettered`, by `<topic>/<partition>/<offset>`):
    /// a replay meets them again (a `--rebuild`'s rewind, checkpoints dropped) and sends none twice.
    sent: mongodb::Collection<bson::Document>,
    /// Reads refused changes' records back, made at the first (refusals tend to come in runs: every further
    /// line of an order past 16 MB).
    reader: tokio::sync::Mutex<Option<StreamConsumer>>,
}

/// A record as it was in its topic.
pub struct SourceRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

impl SourceRecord {
    /// A copy of `m`'s key and payload.
    pub fn of(m: &impl Message) -> SourceRecord {
        SourceRecord { key: m.key().map(<[u8]>::to_vec), payload: m.payload().map(<[u8]>::to_vec) }
    }
}

impl DeadLetters {
    pub fn new(
        kafka: &KafkaArgs,
        topic: String,
        source_topic: String,
        store: String,
        db: &mongodb::Database,
    ) -> Result<DeadLetters> {
        let producer = kafka::producer_config(kafka).create().context("Kafka producer")?;
        let reader = tokio::sync::Mutex::new(None);
        let sent = db.collection(SENT);
        Ok(DeadLetters { producer, kafka: kafka.clone(), topic, source_topic, store, sent, reader })
    }

    /// Sends a record that did not decode, whole.
    pub async fn undecodable(&self, place: Place, record: &SourceRecord, reason: &str) -> Result<()> {
        self.send(place, record, reason, None).await
    }

    /// Sends the record of a change MongoDB refused, read back from its topic.
    pub async fn refused(&self, place: Place, reason: &str) -> Result<()> {
        let record = self.read_back(place).await?;
        self.send(place, &record, reason, Some(&self.store)).await
    }

    async fn send(&self, place: Place, record: &SourceRecord, reason: &str, store: Option<&str>) -> Result<()> {
        let id = sent_id(&self.source_topic, place);
        if self.sent.find_one(doc! { "_id": &id }).await.context("reading the dead letters sent")?.is_some() {
            tracing::info!(record = %id, "dead-lettered before (a replay): not sent again");
            return Ok(());
        }
        let (partition, offset) = (place.partition.to_string(), place.offset.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(reason) })
            .insert(Header { key: "source_topic", value: Some(&self.source_topic) })
            .insert(Header { key: "source_partition", value: Some(&partition) })
            .insert(Header { key: "source_offset", value: Some(&offset) });
        if let Some(store) = store {
            headers = headers.insert(Header { key: "store", value: Some(store) });
        }
        let mut out = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(k) = &record.key {
            out = out.key(k);
        }
        if let Some(p) = &record.payload {
            out = out.payload(p);
        }
        self.producer.send(out, Duration::from_secs(10)).await.map_err(|(e, _)| anyhow::Error::new(e))?;
        // After the send: a crash between the two sends the letter again at the replay, never loses it.
        self.sent
            .update_one(doc! { "_id": &id }, doc! { "$setOnInsert": { "at": bson::DateTime::now(), "reason": reason } })
            .upsert(true)
            .await
            .context("recording a dead letter sent")?;
        Ok(())
    }

    /// The record at `place` of the source topic.
    async fn read_back(&self, place: Place) -> Result<SourceRecord> {
        let mut reader = self.reader.lock().await;
        let reader = match &mut *reader {
            Some(reader) => reader,
            empty => empty.insert(kafka::reader_config(&self.kafka).create().context("Kafka reader")?),
        };
        let mut at = TopicPartitionList::new();
        at.add_partition_offset(&self.source_topic, place.partition, Offset::Offset(place.offset))?;
        reader.assign(&at)?;
        // Past anything still queued from an earlier place.
        let at_place = async {
            loop {
                let m = reader.recv().await?;
                if m.partition() == place.partition && m.offset() >= place.offset {
                    let record = (m.offset() == place.offset).then(|| SourceRecord::of(&m));
                    return Ok::<_, rdkafka::error::KafkaError>(record);
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), at_place)
            .await
            .context("reading a refused change's record back from its topic: no answer in 10 s")??
        {
            Some(record) => Ok(record),
            None => bail!("the refused change's record at offset {} is no longer in its topic", place.offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_names_its_source_record() {
        let id = sent_id("shop.public.order_details", Place { partition: 3, offset: 1234 });
        assert_eq!(parse_sent_id(&id), Some(("shop.public.order_details", 3, 1234)));
        assert_eq!(parse_sent_id("no place"), None);
        assert_eq!(parse_sent_id("topic/x/1"), None);
    }
}
