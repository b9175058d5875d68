//! Where a stream job's records come from: its Kafka consumer, and for a job whose batches are slices of
//! time (order_details), one queue per partition, so that a partition read far ahead of the others can be
//! left unread while they catch up.
//!
//! Pausing such a partition instead (librdkafka's `pause`) drops what was already fetched of it, and the
//! broker serves the same records again once it is resumed. A partition's own queue keeps them: librdkafka
//! stops fetching a partition whose queue holds `queued.max.messages.kbytes`, and goes on when it is read.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::FutureExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};

use crate::kafka::{JobConsumer, JobContext};

type PartitionQueue = StreamPartitionQueue<JobContext>;
type NextMessage<'a> = Pin<Box<dyn Future<Output = KafkaResult<BorrowedMessage<'a>>> + Send + 'a>>;

/// A job's consumer, with its partitions' own queues when they are split.
pub struct Feed {
    consumer: Arc<JobConsumer>,
    topic: String,
    by_partition: bool,
    /// Each assigned partition's queue (empty unless `by_partition`).
    queues: Vec<Partition>,
    /// Partitions not read from for now: the records in hand are far ahead in them.
    held_back: HashSet<i32>,
}

struct Partition {
    id: i32,
    queue: PartitionQueue,
    /// The record timestamp of the last message taken from it (epoch ms): the queue read least far goes first.
    read_to_ms: AtomicI64,
}

impl Feed {
    /// Reads `topic` through `consumer`; `by_partition`: through a queue per partition, once
    /// [`Feed::split`] is told which are assigned.
    pub fn new(consumer: JobConsumer, topic: &str, by_partition: bool) -> Self {
        Feed {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            by_partition,
            queues: Vec::new(),
            held_back: HashSet::new(),
        }
    }

    pub fn consumer(&self) -> &JobConsumer {
        &self.consumer
    }

    /// Gives each of `partitions` (the assignment, just changed) its own queue. Call it before moving them to
    /// their checkpoints: the records fetched from there then come through these queues, and any fetched
    /// before, wherever they wait, are dropped by librdkafka as outdated. librdkafka sends a newly assigned
    /// partition's records to the consumer's queue again, so every queue is made anew (an old queue is let
    /// go first: it shares the partition's fetch queue, and letting it go unhooks that queue's wake-ups).
    pub fn split(&mut self, partitions: &[i32]) {
        self.held_back.clear();
        if !self.by_partition {
            return;
        }
        self.queues.clear();
        for &p in partitions {
            match self.consumer.split_partition_queue(&self.topic, p) {
                Some(queue) => self.queues.push(Partition { id: p, queue, read_to_ms: AtomicI64::new(i64::MIN) }),
                // Its records still come, through the consumer's own queue.
                None => tracing::debug!(partition = p, "no queue of its own for this partition"),
            }
        }
    }

    /// A message that is ready now, without waiting: the consumer's own queue first (it also serves the
    /// group's events, and holds what was fetched before a split), then the partitions' that are not held
    /// back, the one read least far in time first. Each partition's records come in time order, so taking
    /// from the one behind merges them into one time line as far as their queues hold records.
    pub fn ready(&self) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        if let Some(message) = self.consumer.recv().now_or_never() {
            return Some(message);
        }
        let mut readable = self.readable();
        readable.sort_unstable_by_key(|p| p.read_to_ms.load(Ordering::Relaxed));
        readable.into_iter().find_map(|p| p.queue.recv().now_or_never().map(|m| p.took(m)))
    }

    /// The next message from the consumer's own queue or a partition's that is not held back.
    pub async fn recv(&self) -> KafkaResult<BorrowedMessage<'_>> {
        if self.queues.is_empty() {
            return self.consumer.recv().await;
        }
        if let Some(message) = self.ready() {
            return message;
        }
        let readable = self.readable();
        let mut next: Vec<NextMessage<'_>> = Vec::with_capacity(readable.len() + 1);
        next.push(Box::pin(self.consumer.recv()));
        next.extend(readable.iter().map(|p| Box::pin(p.queue.recv()) as NextMessage<'_>));
        let (message, from, _) = futures::future::select_all(next).await;
        match from.checked_sub(1) {
            Some(i) => readable[i].took(message),
            None => message,
        }
    }

    /// The partitions' queues that are not held back.
    fn readable(&self) -> Vec<&Partition> {
        self.queues.iter().filter(|p| !self.held_back.contains(&p.id)).collect()
    }

    /// Holds back the partitions `held` (the partition of each record carried to the next batch) has half a
    /// batch or more of, and reads the others again; returns how many it newly held back.
    ///
    /// Taking the oldest records in hand only makes batches of one time if every partition is read at about
    /// the same pace. A broker need not serve them so (tansu fills each fetch from the partitions in the
    /// order asked, and one of four fell seconds behind the others in a catch-up); holding back those
    /// ahead also bounds the records in hand.
    pub fn pace(&mut self, held: impl IntoIterator<Item = i32>, batch_size: usize) -> usize {
        let mut counts: HashMap<i32, usize> = HashMap::new();
        for p in held {
            *counts.entry(p).or_default() += 1;
        }
        let ahead: HashSet<i32> =
            self.queues.iter().map(|p| p.id).filter(|p| counts.get(p).is_some_and(|&n| n >= batch_size / 2)).collect();
        let newly = ahead.difference(&self.held_back).count();
        self.held_back = ahead;
        newly
    }

    /// Reads every partition again (nothing is in hand, so none is ahead).
    pub fn release_all(&mut self) {
        self.held_back.clear();
    }
}

impl Partition {
    /// Notes how far in time `message` (taken from this partition's queue) reads it.
    fn took<'a>(&self, message: KafkaResult<BorrowedMessage<'a>>) -> KafkaResult<BorrowedMessage<'a>> {
        if let Some(ms) = message.as_ref().ok().and_then(|m| m.timestamp().to_millis()) {
            self.read_to_ms.store(ms, Ordering::Relaxed);
        }
        message
    }
}
