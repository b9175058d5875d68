//! What the integration tests share: where the real services are (the environment `scripts/stack exec`
//! gives), unique names so tests never see each other's data, running the project's binaries, and reading
//! topics back from the broker.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cdc_cqrs::bootstrap::connector::ConnectClient;
use cdc_cqrs::config::PgArgs;
use cdc_cqrs::postgres;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgConnection;

/// The real services, as the stack script describes them.
pub struct Stack {
    pub pg_url: String,
    pub brokers: String,
    pub connect_url: String,
    pub debezium_password: String,
    pub mongo_uri: String,
    /// Every read store of the stack (`CDC_MONGO_URIS`, space separated); the first is `mongo_uri`.
    pub mongo_uris: Vec<String>,
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
            mongo_uri: var("CDC_MONGO_URI", "mongodb://127.0.0.1:57017/?directConnection=true"),
            mongo_uris: var(
                "CDC_MONGO_URIS",
                &var("CDC_MONGO_URI", "mongodb://127.0.0.1:57017/?directConnection=true"),
            )
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        }
    }

    /// A connection to `database` on this stack's PostgreSQL.
    pub async fn connect(&self, database: &str) -> anyhow::Result<PgConnection> {
        let pg = PgArgs { url: self.pg_url.clone(), database: database.to_owned() };
        postgres::connect(&pg, database).await
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
            .env("CDC_MONGO_URI", &self.mongo_uri)
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
        "stream_products" => env!("CARGO_BIN_EXE_stream_products").to_owned(),
        "stream_orders" => env!("CARGO_BIN_EXE_stream_orders").to_owned(),
        "stream_order_details" => env!("CARGO_BIN_EXE_stream_order_details").to_owned(),
        "verify" => env!("CARGO_BIN_EXE_verify").to_owned(),
        "dead_letters" => env!("CARGO_BIN_EXE_dead_letters").to_owned(),
        "compact" => env!("CARGO_BIN_EXE_compact").to_owned(),
        "bench" => env!("CARGO_BIN_EXE_bench").to_owned(),
        "cqrs_api" => env!("CARGO_BIN_EXE_cqrs_api").to_owned(),
        // Another package of the workspace: `cargo test` builds it beside this one's binaries, but
        // `cargo test --test NAME` builds only this package's, and an older first_load fails in ways that
        // look like bugs.
        "first_load" => {
            let path = std::path::Path::new(env!("CARGO_BIN_EXE_verify")).with_file_name("first_load");
            let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            let edited = newest_edit(&[root.join("src"), root.join("jobs/first_load")]);
            assert!(
                built.is_some_and(|built| edited.is_none_or(|edited| edited <= built)),
                "{} is missing or older than its sources: `cargo build -p first_load`, or run the tests with \
                 `cargo test` at the workspace root",
                path.display()
            );
            path.to_string_lossy().into_owned()
        }
        other => panic!("no binary {other}"),
    }
}

/// When the newest Rust source under `dirs` (tests aside) was last changed.
fn newest_edit(dirs: &[std::path::PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut pending = dirs.to_vec();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let (path, Ok(meta)) = (entry.path(), entry.metadata()) else { continue };
            if meta.is_dir() {
                if !path.ends_with("tests") {
                    pending.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && let Ok(modified) = meta.modified()
            {
                newest = newest.max(Some(modified));
            }
        }
    }
    newest
}

/// Asserts a binary succeeded, showing its output if not; returns its stdout.
/// Runs `read` (a command's output) until `done` holds for what it returns; panics with the last after `timeout`.
pub fn wait_until(timeout: Duration, read: impl Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let got = read();
        if done(&got) {
            return got;
        }
        assert!(started.elapsed() < timeout, "never came:\n{got}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

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

pub async fn wait_for_streaming_slot(conn: &mut PgConnection, slot: &str) {
    for _ in 0..120 {
        let active: Option<bool> = sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(&mut *conn)
            .await
            .unwrap();
        if active == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("replication slot {slot} never became active");
}

/// Removes the connector, its topics, its slot and its PostgreSQL and MongoDB databases (best effort: a
/// failure here is not the test's).
pub async fn teardown(stack: &Stack, name: &str) {
    for uri in &stack.mongo_uris {
        if let Ok(mongo) = mongodb::Client::with_uri_str(uri).await {
            let _ = mongo.database(name).drop().await;
            // Shut down before the test's runtime does, or the driver's pool task panics as it goes.
            mongo.shutdown().await;
        }
    }
    let connect = ConnectClient::new(&stack.connect_url).unwrap();
    let _ = connect.delete(name).await;
    let topics: Vec<String> = ["products", "orders", "order_details"]
        .iter()
        .map(|t| format!("{name}.public.{t}"))
        .chain([format!("__debezium-heartbeat.{name}"), format!("{name}.dead_letter")])
        .collect();
    delete_topics(&stack.brokers, &topics.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let Ok(mut conn) = stack.connect("postgres").await else { return };
    for _ in 0..60 {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
        )
        .bind(name)
        .execute(&mut conn)
        .await;
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .unwrap_or(0);
        if dropped.is_ok() && left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
        .execute(&mut conn)
        .await;
}

/// Tears down what earlier test processes (now gone) left behind, so slots never pile up.
pub async fn sweep_stale(stack: &Stack) {
    let alive = |name: &str| {
        name.strip_prefix("it_")
            .and_then(|rest| rest.split('_').next())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut conn = stack.connect("postgres").await.expect("connect");
    let mut names: Vec<String> = sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'it\\_%' \
         UNION SELECT datname::text FROM pg_database WHERE datname LIKE 'it\\_%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let connect = ConnectClient::new(&stack.connect_url).unwrap();
    names.extend(connect.list().await.unwrap_or_default().into_iter().filter(|n| n.starts_with("it_")));
    for uri in &stack.mongo_uris {
        if let Ok(mongo) = mongodb::Client::with_uri_str(uri).await {
            let dbs = mongo.list_database_names().await.unwrap_or_default();
            names.extend(dbs.into_iter().filter(|n| n.starts_with("it_")));
            mongo.shutdown().await;
        }
    }
    names.sort();
    names.dedup();
    for name in names.into_iter().filter(|n| !alive(n)) {
        teardown(stack, &name).await;
    }
}

/// A captured database of its own: PostgreSQL database, connector, slot, topics and MongoDB database all
/// named `it_<pid>_<what>`.
pub struct Capture {
    pub stack: Stack,
    pub name: String,
    pub pg: PgConnection,
}

impl Capture {
    /// Sets up the write model and starts capturing it (before any row exists: the stream holds them all).
    pub async fn start(what: &str) -> Capture {
        Capture::start_after(what, &[]).await
    }

    /// Sets up the write model, writes the workload `prefill` (when not empty) and only then starts
    /// capturing: the stream holds none of those rows, only first_load can bring them.
    pub async fn start_after(what: &str, prefill: &[&str]) -> Capture {
        let (stack, name) = Capture::set_up(what).await;
        if !prefill.is_empty() {
            let mut args = vec!["--database", &name, "--quiet"];
            args.extend_from_slice(prefill);
            success("insert_sample_data", &stack.run("insert_sample_data", &args));
        }
        Capture::capture(stack, name).await
    }

    /// [`Capture::start_after`] with rows written by `sql` instead of a workload.
    pub async fn start_after_sql(what: &str, sql: &str) -> Capture {
        let (stack, name) = Capture::set_up(what).await;
        let mut pg = stack.connect(&name).await.expect("connect");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut pg).await.expect("the rows written before the capture");
        drop(pg);
        Capture::capture(stack, name).await
    }

    async fn set_up(what: &str) -> (Stack, String) {
        let stack = Stack::from_env();
        let name = unique(what);
        sweep_stale(&stack).await;
        success("setup_pg_db", &stack.run("setup_pg_db", &["--database", &name]));
        (stack, name)
    }

    async fn capture(stack: Stack, name: String) -> Capture {
        let args = ["--name", &name, "--database", &name, "--topic-prefix", &name, "--slot", &name, "--timeout", "180"];
        success("register_connector", &stack.run("register_connector", &args));
        let mut pg = stack.connect(&name).await.expect("connect");
        wait_for_streaming_slot(&mut pg, &name).await;
        Capture { stack, name, pg }
    }

    /// Another connection to this capture's database.
    pub async fn connect(&self) -> PgConnection {
        self.stack.connect(&self.name).await.expect("connect")
    }

    /// Runs insert_sample_data on this database with extra flags.
    pub fn workload(&self, flags: &[&str]) -> String {
        let mut args = vec!["--database", &self.name, "--quiet"];
        args.extend_from_slice(flags);
        success("insert_sample_data", &self.stack.run("insert_sample_data", &args))
    }

    /// Starts insert_sample_data in the background.
    pub fn workload_in_background(&self, flags: &[&str]) -> std::process::Child {
        self.stack
            .command("insert_sample_data")
            .args(["--database", &self.name, "--quiet"])
            .args(flags)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("insert_sample_data")
    }

    /// A `first_load` command for this capture (its database, slot and MongoDB database), with `flags`.
    pub fn first_load(&self, flags: &[&str]) -> Command {
        let mut cmd = self.stack.command("first_load");
        cmd.env("CDC_MONGO_DATABASE", &self.name)
            .env("CDC_SLOT_NAME", &self.name)
            .args(["--database", &self.name, "--quiet"])
            .args(flags);
        cmd
    }

    /// Runs `first_load` with `flags` and returns its output.
    pub fn run_first_load(&self, flags: &[&str]) -> Output {
        self.first_load(flags).output().expect("first_load")
    }

    /// Starts a stream job on this capture (its own consumer group unless `group` says otherwise).
    pub fn spawn_job(&self, bin: &str, group: &str) -> JobProcess {
        self.spawn_job_with(bin, group, &[])
    }

    /// [`Capture::spawn_job`] with extra environment.
    pub fn spawn_job_with(&self, bin: &str, group: &str, env: &[(&str, &str)]) -> JobProcess {
        let child = self
            .stack
            .command(bin)
            .envs(env.iter().copied())
            .env("CDC_TOPIC_PREFIX", &self.name)
            .env("CDC_MONGO_DATABASE", &self.name)
            .env("CDC_GROUP_ID", format!("{}-{group}", self.name))
            .env("CDC_BATCH_MS", "100")
            .env("RUST_LOG", std::env::var("CDC_TEST_JOB_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        JobProcess(Some(child))
    }

    /// Runs `verify` for `collections` until the read models equal PostgreSQL's projection; panics with
    /// the last report after `timeout`.
    pub async fn converge(&self, collections: &[&str], timeout: Duration) {
        self.converge_in(&self.stack.mongo_uri, collections, timeout).await
    }

    /// [`Capture::converge`] in the read stores `stores` (URIs, space separated).
    pub async fn converge_in(&self, stores: &str, collections: &[&str], timeout: Duration) {
        let started = Instant::now();
        let mut args = vec!["--database", &self.name, "--examples", "3"];
        for c in collections {
            args.extend_from_slice(&["--collection", c]);
        }
        loop {
            let out = self
                .stack
                .command("verify")
                .env("CDC_MONGO_URI", stores)
                .env("CDC_MONGO_DATABASE", &self.name)
                .args(&args)
                .output()
                .expect("verify");
            if out.status.success() {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "read models did not converge in {timeout:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub async fn teardown(self) {
        drop(self.pg);
        teardown(&self.stack, &self.name).await;
    }
}

/// A running job, killed if the test ends without stopping it (a failed assertion must not leave it behind).
pub struct JobProcess(Option<std::process::Child>);

impl JobProcess {
    /// Starts `command` (a job the test configures itself).
    pub fn spawn(mut command: Command) -> JobProcess {
        JobProcess(Some(command.spawn().expect("starting a job")))
    }

    /// Stops the job the way an orchestrator does (SIGTERM) and checks it exits cleanly.
    pub fn stop(mut self) {
        let mut child = self.0.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let status = child.wait().expect("job exit");
        assert!(status.success(), "job exited with {status} after SIGTERM");
    }

    /// Kills the job at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let mut child = self.0.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A job's `/health` (at `base`, `http://host:port`) once `done` holds for it (at most 60 s).
pub async fn job_health(
    base: &str,
    done: impl Fn(reqwest::StatusCode, &serde_json::Value) -> bool,
) -> (reqwest::StatusCode, serde_json::Value) {
    let started = Instant::now();
    loop {
        let answer = match reqwest::get(format!("{base}/health")).await {
            Ok(r) => Some((r.status(), r.json::<serde_json::Value>().await.unwrap_or_default())),
            Err(_) => None, // not serving yet
        };
        if let Some((code, report)) = &answer
            && done(*code, report)
        {
            return answer.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the job's health never came to that: {answer:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A read store's mongod frozen with SIGSTOP, thawed (SIGCONT) when dropped, whatever the test's outcome.
pub struct StoppedStore(String);

impl StoppedStore {
    pub fn sigstop(i: usize) -> StoppedStore {
        let dir = std::env::var("CDC_STACK_DIR").expect("CDC_STACK_DIR (from scripts/stack exec)");
        let pid = std::fs::read_to_string(format!("{dir}/run/mongo{i}.pid")).expect("the store's pid file");
        let pid = pid.trim().to_owned();
        assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        // The signal is only queued: wait until every thread is stopped, or a read sent right away may
        // still be answered (seen once on a loaded machine).
        let stopped = |pid: &str| {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the store's threads");
            tasks.flatten().all(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !stopped(&pid) {
            assert!(std::time::Instant::now() < deadline, "store {i} did not stop within 5 s of SIGSTOP");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        StoppedStore(pid)
    }
}

impl Drop for StoppedStore {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}
