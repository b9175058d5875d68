//! What the integration tests share: where the real services are (the environment `scripts/stack exec`
//! gives), unique names so tests never see each other's data, running the project's binaries, and reading
//! topics back from the broker.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The real services, as the stack script describes them.
pub struct Stack {
    pub pg_url: String,
    pub brokers: String,
    pub connect_url: String,
    pub debezium_password: String,
}

impl Stack {
    pub fn from_env() -> Stack {
        let var = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_owned());
        assert!(
            std::env::var("PGPASSWORD").is_ok(),
            "PGPASSWORD is not set: run the tests as `scripts/stack up && scripts/stack exec cargo test`"
        );
        Stack {
            pg_url: var("CDC_PG_URL", "postgres://postgres@127.0.0.1:55432/postgres"),
            brokers: var("CDC_KAFKA_BROKERS", "127.0.0.1:59092"),
            connect_url: var("CDC_CONNECT_URL", "http://127.0.0.1:58083"),
            debezium_password: std::env::var("DEBEZIUM_PASSWORD").expect("DEBEZIUM_PASSWORD (from scripts/stack exec)"),
        }
    }

    /// Runs one of the project's binaries against this stack.
    pub fn run(&self, bin: &str, args: &[&str]) -> Output {
        self.command(bin).args(args).output().unwrap_or_else(|e| panic!("running {bin}: {e}"))
    }

    pub fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(bin_path(bin));
        cmd.env("CDC_PG_URL", &self.pg_url)
            .env("CDC_KAFKA_BROKERS", &self.brokers)
            .env("CDC_CONNECT_URL", &self.connect_url)
            .env("DEBEZIUM_PASSWORD", &self.debezium_password)
            .env("RUST_LOG", "warn");
        cmd
    }
}

/// Path of a binary of this package, built by cargo for the integration tests.
pub fn bin_path(bin: &str) -> String {
    match bin {
        "setup_pg_db" => env!("CARGO_BIN_EXE_setup_pg_db").to_owned(),
        "insert_sample_data" => env!("CARGO_BIN_EXE_insert_sample_data").to_owned(),
        "register_connector" => env!("CARGO_BIN_EXE_register_connector").to_owned(),
        other => panic!("no binary {other}"),
    }
}

/// Asserts a binary succeeded, showing its output if not; returns its stdout.
pub fn success(bin: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{bin} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A name no other test run uses: `it_<pid>_<what>` (lowercase: it names databases, slots and topics).
pub fn unique(what: &str) -> String {
    format!("it_{}_{}", std::process::id(), what)
}

/// Every record of `topics` from the beginning, read by partition assignment (no group join), until
/// `done(records so far)` holds and no record came for `idle`; panics after `timeout`.
pub fn read_topics(
    brokers: &str,
    topics: &[String],
    idle: Duration,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        // Debezium creates a topic with its first event: wait for it.
        let partitions = loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
            let n = md.topics().first().map_or(0, |t| t.partitions().len());
            if n > 0 {
                break n;
            }
            assert!(started.elapsed() < timeout, "topic {topic} was never created");
            std::thread::sleep(Duration::from_millis(500));
        };
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut last = Instant::now();
    let mut records = Vec::new();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                records.push(Record {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| serde_json::from_slice(k).expect("JSON key")),
                    value: m.payload().map(|v| serde_json::from_slice(v).expect("JSON value")),
                });
                last = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topics:?}: {e}"),
            None => {}
        }
        if done(&records) && last.elapsed() >= idle {
            return records;
        }
        assert!(
            started.elapsed() < timeout,
            "gave up reading {topics:?} after {timeout:?} ({} records read)",
            records.len()
        );
    }
}

/// Deletes topics a test made (best effort: a failure here is not the test's).
pub async fn delete_topics(brokers: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = match ClientConfig::new().set("bootstrap.servers", brokers).create()
    {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = admin.delete_topics(topics, &AdminOptions::new()).await;
}

/// One Kafka record, JSON-decoded.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<serde_json::Value>,
    pub value: Option<serde_json::Value>,
}

impl Record {
    /// Debezium's op, or "tombstone" for a null value.
    pub fn op(&self) -> &str {
        self.value.as_ref().map_or("tombstone", |v| v["op"].as_str().expect("op is a string"))
    }
}

/// Records grouped by topic.
pub fn by_topic(records: &[Record]) -> HashMap<&str, Vec<&Record>> {
    let mut map: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in records {
        map.entry(r.topic.as_str()).or_default().push(r);
    }
    map
}
