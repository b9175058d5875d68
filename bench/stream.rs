//! `bench stream`: the streaming path measured end to end on the local stack, in one run.
//!
//! 1. Events: the sample workload writes PostgreSQL until Debezium has put `--events` change records in
//!    Kafka (kept between runs: topics, connector and database are all named `cdc_bench_stream`).
//! 2. Catch-up: each job alone, then the three together, from the first offset into an empty MongoDB
//!    database, timed until their MongoDB checkpoints reach the topic ends; CPU and peak RSS per job.
//! 3. The limits beside it: one consumer reading the three topics raw, and as many bulk upserts by `_id`
//!    as there are events, straight into MongoDB.
//! 4. Freshness: the jobs caught up, the workload at `--rate` transactions per second (several rates run
//!    one after another and end with a table of them); the jobs' own histograms say how long each change
//!    took from its PostgreSQL commit, and from its Kafka record, to the MongoDB commit that made it
//!    visible; a plain consumer beside them says how much of the latter is the broker's delivery (record
//!    timestamp -> a consumer has it).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bson::{Document, doc};
use cdc_cqrs::bootstrap::connector::{self, ConnectClient, Deployment};
use cdc_cqrs::bootstrap::{setup, workload};
use cdc_cqrs::config::{KafkaArgs, PgArgs};
use cdc_cqrs::{kafka, postgres};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::measure::{self, Histogram, MachineCpu, ProcessStats, Rate, ServiceCpu};

/// The PostgreSQL database, connector, slot, topic prefix and MongoDB database the benchmark owns.
const NAME: &str = "cdc_bench_stream";
const RAW_DATABASE: &str = "cdc_bench_raw";
const TABLES: [&str; 3] = ["products", "orders", "order_details"];
const JOBS: [&str; 3] = ["stream_products", "stream_orders", "stream_order_details"];
/// Records per change transaction of the default mix, about (an order with its lines, a delete with its
/// tombstone and cascade...): sizes the change phase.
const RECORDS_PER_CHANGE: f64 = 2.3;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Change records to have in Kafka over the three topics (tombstones count: the jobs read them too).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,

    /// Write new events even if the topics already hold enough.
    #[arg(long)]
    fresh: bool,

    /// Transactions per second of the freshness run; several, comma-separated ("50,200,500"), run one
    /// after the other on the same caught-up jobs and end with a table of the jobs' freshness by load.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "500", value_parser = positive_rate)]
    rate: Vec<f64>,

    /// The freshness run's mix of transactions (insert_sample_data's --mix). Price changes fan out to every
    /// order holding the product, the heaviest write of the model.
    #[arg(long, default_value = workload::Mix::DEFAULT)]
    mix: workload::Mix,

    /// Seconds of the freshness run (0 skips it).
    #[arg(long, default_value_t = 30)]
    freshness_secs: u64,

    /// Only the three jobs together (no single-job catch-up runs).
    #[arg(long, conflicts_with = "singles_only")]
    together_only: bool,

    /// Only the single-job catch-up runs (no run of the three together, hence no freshness run).
    #[arg(long)]
    singles_only: bool,

    /// Flags passed on to every job (e.g. "--batch-size 10000").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    job_flags: String,

    /// Kafka bootstrap servers.
    #[arg(long, env = "CDC_KAFKA_BROKERS", default_value = "127.0.0.1:59092")]
    brokers: String,

    /// Kafka Connect REST URL.
    #[arg(long, env = "CDC_CONNECT_URL", default_value = "http://127.0.0.1:58083")]
    connect_url: String,

    #[command(flatten)]
    endpoints: crate::Endpoints,
}

/// Partition -> end offset, per topic.
type Ends = HashMap<String, HashMap<i32, i64>>;

pub async fn run(args: Args) -> Result<()> {
    let pg = PgArgs { url: args.endpoints.pg_url.clone(), database: NAME.into() };
    let kafka_args = KafkaArgs { brokers: args.brokers.clone(), topic_prefix: NAME.into(), options: Vec::new() };
    let topics: Vec<String> = TABLES.iter().map(|t| kafka_args.table_topic(t)).collect();
    let mut ends = topic_ends(&args.brokers, &topics)?;
    if args.fresh || records(&ends) < args.events {
        write_events(&args, &pg, &topics).await?;
        ends = topic_ends(&args.brokers, &topics)?;
    } else {
        eprintln!(
            "bench: reusing the {} records already in the {NAME}.* topics (--fresh writes new ones)",
            records(&ends)
        );
    }
    let per_topic: Vec<u64> =
        topics.iter().map(|t| ends.get(t).map_or(0, |e| e.values().sum::<i64>() as u64)).collect();
    let total = records(&ends);
    let mongo = mongodb::Client::with_uri_str(&args.endpoints.mongo_uri).await?;
    let jobs = Jobs { args: &args, mongo: &mongo };

    // Kafka Connect is not part of a catch-up (and a distributed worker idles polling its internal
    // topics): paused (SIGSTOP) until the freshness run, which needs it.
    let paused = measure::Paused::processes_named("org.apache.kafka.connect.cli.Connect");
    let pids = paused.pids().to_vec();
    tokio::spawn(async move {
        // Interrupted: never leave Connect stopped.
        let _ = tokio::signal::ctrl_c().await;
        measure::Paused::resume(&pids);
        std::process::exit(130);
    });
    let broker = std::env::var("CDC_BROKER").unwrap_or_else(|_| "the stack's broker".into());
    println!(
        "bench stream: {total} change records (products {}, orders {}, order_details {}), Debezium 3.1 -> {broker}; {}",
        per_topic[0],
        per_topic[1],
        per_topic[2],
        measure::machine()
    );
    // Results are printed as they come (a long run can be stopped and still have told something).
    eprintln!("bench: limit, one consumer reading the three topics");
    let (kafka_limit, kafka_bytes) = read_raw(&args.brokers, &topics, &ends)?;
    println!(
        "  limit: Kafka read        {:>7.1} s {:>10.0} records/s  (one consumer, the three topics, {} MB)",
        kafka_limit.secs(),
        kafka_limit.per_sec(),
        kafka_bytes / 1_000_000
    );
    eprintln!("bench: limit, {total} bulk upserts by _id into MongoDB");
    let (mongo_limit, upsert_work) = upsert_raw(&mongo, total).await?;
    // The server's CPU per upsert: what a record costs MongoDB at best, steadier than rates on a shared machine.
    let (upsert_micros, upsert_written) = upsert_work.per(total);
    println!(
        "  limit: MongoDB upserts   {:>7.1} s {:>10.0} upserts/s  (by _id, 10,000 per update command, 4 in flight){}; \
         its cache wrote {upsert_written:.0} bytes per upsert",
        mongo_limit.secs(),
        mongo_limit.per_sec(),
        upsert_micros.map_or(String::new(), |us| format!("; MongoDB CPU {us:.0} us per upsert"))
    );
    let limit = kafka_limit.per_sec().min(mongo_limit.per_sec());
    println!("  catch-up (from the first offset into empty collections; steady = after the first batch;");
    println!(
        "  \"of limit\" = records/s / min(the two limits) = records/s / {limit:.0}, \"steady\" the same of steady/s (the target's);"
    );
    println!("  \"MongoDB us/rec\" = the server's CPU per record, \"x upsert\" = that / the same for one raw upsert;");
    println!(
        "  \"MongoDB time\" = where the server's time went, from its `top`: wall time on each collection by operation;"
    );
    println!(
        "  \"cache wrote\" = the bytes WiredTiger wrote out of its cache, per record: a page written out again and again"
    );
    println!("  while the jobs rewrite it costs the server CPU, in reconciliation and compression;");
    println!(
        "  \"machine busy\" = the whole machine's CPU after the first batch (/proc/stat: every service shares these cores),"
    );
    println!(
        "  \"CPU ..., share of one core\" = which service it was busy with (/proc/PID/stat), and its CPU per record applied):"
    );
    println!(
        "    {:<22} {:>9} {:>8} {:>10} {:>10} {:>7} {:>6} {:>9}   {:>8} {:>6} {:>14} {:>8}  {:<12}",
        "",
        "records",
        "s",
        "records/s",
        "steady/s",
        "CPU s",
        "CPU %",
        "peak RSS",
        "of limit",
        "steady",
        "MongoDB us/rec",
        "x upsert",
        "machine busy"
    );
    let mut caught_up = Vec::new();
    let mut report = |name: &str, records: u64, run: &JobRun| {
        let rate = Rate::new(records, run.elapsed);
        let steady = run.steady_rate(records);
        caught_up.push(CatchUp { name: name.to_owned(), steady, limit, peak_rss_mb: run.peak_rss_mb() });
        let (micros, written) = run.server.per(records);
        let cost = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        println!(
            "    {:<22} {:>9} {:>8.1} {:>10.0} {:>10.0} {:>7.1} {:>6.0} {:>6} MB   {:>7.0}% {:>5.0}% {:>14} {:>8}  {:<12}",
            name,
            records,
            rate.secs(),
            rate.per_sec(),
            steady,
            run.cpu_secs(),
            100.0 * run.cpu_secs() / rate.secs(),
            run.peak_rss_mb(),
            100.0 * rate.per_sec() / limit,
            100.0 * steady / limit,
            cost(micros, 0),
            cost(micros.zip(upsert_micros).map(|(job, upsert)| job / upsert), 1),
            run.machine_busy,
        );
        let spent: Vec<String> = run
            .server_top
            .iter()
            .map(|(what, micros)| format!("{what} {:.1}", *micros as f64 / records.max(1) as f64))
            .collect();
        if !spent.is_empty() {
            println!("      MongoDB time, us per record: {}", spent.join(", "));
        }
        println!("      MongoDB's cache wrote {written:.0} bytes per record");
        println!("      CPU after the first batch, share of one core: {}", run.services);
    };
    if !args.together_only {
        for (i, job) in JOBS.iter().enumerate() {
            eprintln!("bench: catch-up, {job} alone ({} records)", per_topic[i]);
            report(job, per_topic[i], &jobs.catch_up(&[i], &ends, "alone").await?);
        }
    }
    if args.singles_only {
        report_targets(&caught_up, &[]);
        mongo.shutdown().await;
        return Ok(());
    }
    eprintln!("bench: catch-up, the three jobs together ({total} records)");
    let together = jobs.catch_up(&[0, 1, 2], &ends, "together").await?;
    report("all three together", total, &together);
    if !paused.pids().is_empty() {
        println!("  (Kafka Connect paused during catch-up and limits)");
    }
    drop(paused);

    let mut by_load = Vec::new();
    if args.freshness_secs > 0 {
        for &rate in &args.rate {
            eprintln!("bench: freshness, {rate} tx/s for {} s with the jobs caught up", args.freshness_secs);
            let f = jobs.freshness(&pg, &topics, &together.group, rate).await?;
            report_freshness(&args, &f);
            by_load.push(f);
        }
        if by_load.len() > 1 {
            report_by_load(&by_load);
        }
    }
    report_targets(&caught_up, &by_load);
    mongo.shutdown().await;
    Ok(())
}

/// The targets the benchmark is read against (issue #6, on 2 cores).
const TARGET_STEADY_PER_SEC: f64 = 50_000.0;
const TARGET_SHARE_OF_LIMIT: f64 = 0.70;
const TARGET_IN_JOBS_P99_MS: f64 = 50.0;
const TARGET_PEAK_RSS_MB: u64 = 100;

/// A catch-up's figures the targets are read on.
struct CatchUp {
    name: String,
    steady: f64,
    /// The lower of the run's two limits.
    limit: f64,
    peak_rss_mb: u64,
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Every figure of the run against the targets, one line each, so a run says at its end where it stands.
fn report_targets(caught_up: &[CatchUp], freshness: &[Freshness]) {
    println!(
        "  against the targets: catch-up >= {TARGET_STEADY_PER_SEC:.0} records/s steady and >= {:.0}% of the lower limit; \
         the jobs' share of freshness (from the Kafka record) p99 < {TARGET_IN_JOBS_P99_MS:.0} ms; a job's peak RSS < {TARGET_PEAK_RSS_MB} MB",
        100.0 * TARGET_SHARE_OF_LIMIT
    );
    for c in caught_up {
        let share = c.steady / c.limit;
        println!(
            "    {:<22} {:>7.0} records/s {:<8} {:>4.0}% of the limit {:<8} peak RSS {:>3} MB {}",
            c.name,
            c.steady,
            verdict(c.steady >= TARGET_STEADY_PER_SEC),
            100.0 * share,
            verdict(share >= TARGET_SHARE_OF_LIMIT),
            c.peak_rss_mb,
            verdict(c.peak_rss_mb < TARGET_PEAK_RSS_MB)
        );
    }
    for f in freshness {
        let p99 = f.in_job.quantile_ms(0.99);
        let rss = peak_rss_mb(&f.stats);
        println!(
            "    freshness at {:>4.0} tx/s: in the jobs p99 {:>6.1} ms {:<8} (since received {:.1} ms, Kafka delivery {:.1} ms)  peak RSS {:>3} MB {}",
            f.tx_per_sec,
            p99,
            verdict(p99 < TARGET_IN_JOBS_P99_MS),
            f.since_received.quantile_ms(0.99),
            nearest_rank(&f.delivery_ms, 0.99),
            rss,
            verdict(rss < TARGET_PEAK_RSS_MB)
        );
    }
}

/// A `--rate` value: transactions per second, above 0.
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!("`{s}` is not a rate: give transactions per second above 0, e.g. --rate 50,200,500")),
    }
}

/// One freshness run's report: where a change's time went, per job and for the three.
fn report_freshness(args: &Args, f: &Freshness) {
    println!(
        "  freshness: {} changes applied while insert_sample_data ran {:.0} tx/s for {} s (the three jobs; the topics held {} records before){}:",
        f.source.count(),
        f.tx_per_sec,
        args.freshness_secs,
        f.held,
        if f.behind > 0 {
            format!(", {} records still not applied 2 minutes after it", f.behind)
        } else {
            String::new()
        }
    );
    println!("    {:<40} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p95", "p99", "max");
    for (name, h) in [
        ("PostgreSQL commit -> visible in MongoDB", &f.source),
        ("  of which in the jobs (Kafka record ->)", &f.in_job),
        ("    of which since the job received it", &f.since_received),
    ] {
        println!(
            "    {:<40} {:>5.1} ms {:>5.1} ms {:>5.1} ms {:>5.0} ms",
            name,
            h.quantile_ms(0.50),
            h.quantile_ms(0.95),
            h.quantile_ms(0.99),
            h.max_ms()
        );
    }
    let d = &f.delivery_ms;
    println!(
        "    {:<40} {:>5.1} ms {:>5.1} ms {:>5.1} ms {:>5.0} ms",
        "    of which Kafka delivery (record ->)",
        nearest_rank(d, 0.50),
        nearest_rank(d, 0.95),
        nearest_rank(d, 0.99),
        nearest_rank(d, 1.0)
    );
    for (((job, stats), (batches, conflicts)), (in_job, since_received)) in
        JOBS.iter().zip(&f.stats).zip(&f.batches).zip(&f.job_in_job)
    {
        println!(
            "    {job:<22} in the job p50 {:>6.1} ms, p99 {:>6.1} ms (since received p50 {:>5.1}, p99 {:>5.1}); CPU {:>5.1} s ({:>3.0}% of one core)  peak RSS {} MB  {batches} batches, {conflicts} write conflicts",
            in_job.quantile_ms(0.50),
            in_job.quantile_ms(0.99),
            since_received.quantile_ms(0.50),
            since_received.quantile_ms(0.99),
            stats.cpu_secs,
            100.0 * stats.cpu_secs / args.freshness_secs as f64,
            stats.peak_rss_kb / 1024
        );
    }
    println!("    (quantiles interpolated in the jobs' histogram buckets; max exact)");
    println!(
        "    machine busy while the workload ran: {} (PostgreSQL, Kafka Connect, the broker, MongoDB, the workload and the jobs share these cores)",
        f.machine_busy
    );
    println!("    CPU while the workload ran, share of one core: {}", f.services);
}

/// The freshness runs side by side: p99 of each part, against the target for the jobs' share.
fn report_by_load(runs: &[Freshness]) {
    println!(
        "  freshness by load, p99 (the target: the jobs' share, from the Kafka record, under {TARGET_IN_JOBS_P99_MS:.0} ms):"
    );
    println!(
        "    {:>6} {:>16} {:>16} {:>16} {:>16}  machine busy",
        "tx/s", "commit->visible", "in the jobs", "since received", "Kafka delivery"
    );
    for f in runs {
        println!(
            "    {:>6.0} {:>13.1} ms {:>13.1} ms {:>13.1} ms {:>13.1} ms  {}",
            f.tx_per_sec,
            f.source.quantile_ms(0.99),
            f.in_job.quantile_ms(0.99),
            f.since_received.quantile_ms(0.99),
            nearest_rank(&f.delivery_ms, 0.99),
            f.machine_busy
        );
    }
}

fn records(ends: &Ends) -> u64 {
    ends.values().flat_map(|e| e.values()).map(|&n| n.max(0) as u64).sum()
}

/// End offsets of every partition of `topics` (a missing topic has none).
fn topic_ends(brokers: &str, topics: &[String]) -> Result<Ends> {
    let consumer: BaseConsumer = raw_consumer(brokers)?;
    let mut ends = Ends::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
        let mut by_partition = HashMap::new();
        for p in 0..partitions as i32 {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            by_partition.insert(p, high);
        }
        ends.insert(topic.clone(), by_partition);
    }
    Ok(ends)
}

fn raw_consumer(brokers: &str) -> Result<BaseConsumer> {
    let args = KafkaArgs { brokers: brokers.into(), topic_prefix: NAME.into(), options: Vec::new() };
    let group = format!("{NAME}-raw-{}", std::process::id());
    Ok(kafka::consumer_config(&args, &group).create()?)
}

/// Starts over: a new database captured by a new connector, then the sample workload (a catalogue, orders
/// with their lines, then the default mix of changes) until Debezium has written `args.events` records.
async fn write_events(args: &Args, pg: &PgArgs, topics: &[String]) -> Result<()> {
    eprintln!("bench: writing {} change events (database, connector, slot and topics {NAME})", args.events);
    let connect = ConnectClient::new(&args.connect_url)?;
    let _ = connect.delete(NAME).await;
    delete_topics(&args.brokers, topics).await;
    let server = PgArgs { url: pg.url.clone(), database: "postgres".into() };
    let mut admin = postgres::connect(&server, "postgres").await?;
    // The slot goes once Connect has let go of it.
    for _ in 0..60 {
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
        )
        .bind(NAME)
        .execute(&mut admin)
        .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)")
                .bind(NAME)
                .fetch_one(&mut admin)
                .await?;
        if !exists {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    setup::setup(pg, &capture_password()?).await?;
    register_connector(&connect, pg).await?;
    for _ in 0..240 {
        let active: Option<bool> = sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(NAME)
            .fetch_optional(&mut admin)
            .await?;
        if active == Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let pool = postgres::pool(pg, NAME, 9).await?;
    let orders = args.events * 2 / 5 / 4; // ~40% of the records from the orders phase (an order and ~3 lines)
    let mut plan = workload::Workload {
        products: 10_000.min(args.events / 20).max(10),
        orders,
        orders_per_tx: 10,
        changes: Some(0),
        duration: None,
        rate: None,
        seed: 7,
        mix: workload::Mix::default(),
        connections: 8,
    };
    let mut seed = plan.seed;
    loop {
        let bar = ProgressBar::new(plan.orders + plan.changes.unwrap_or(0));
        workload::run(&pool, &plan, &bar).await?;
        bar.finish_and_clear();
        let written = wait_drained(&args.brokers, topics).await?;
        eprintln!("bench: {written} records in Kafka");
        if written >= args.events {
            return Ok(());
        }
        seed += 1;
        plan = workload::Workload {
            products: 0,
            orders: 0,
            changes: Some(((args.events - written) as f64 / RECORDS_PER_CHANGE) as u64 + 100),
            seed,
            ..plan
        };
    }
}

fn capture_password() -> Result<String> {
    std::env::var("DEBEZIUM_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .context("set DEBEZIUM_PASSWORD (scripts/stack exec sets it): the benchmark captures its own database")
}

/// Puts the project's connector configuration for the benchmark's database (the current one: a run that
/// reuses the topics still measures today's settings) and waits until it runs.
async fn register_connector(connect: &ConnectClient, pg: &PgArgs) -> Result<()> {
    let server_opts = postgres::options(pg, NAME)?;
    let deployment = Deployment {
        pg_host: server_opts.get_host().to_owned(),
        pg_port: server_opts.get_port(),
        database: NAME.into(),
        user: setup::CAPTURE_ROLE.into(),
        password: capture_password()?,
        topic_prefix: NAME.into(),
        slot: NAME.into(),
        snapshot_mode: "no_data".into(),
    };
    connect.put_config(NAME, &connector::render(connector::CONFIG_TEMPLATE, &deployment)?).await?;
    connect.wait_running(NAME, Duration::from_secs(180)).await.map(|_| ())
}

/// Waits until Debezium has caught up with the workload: the topics' ends stay put for 5 s. Returns the
/// records they hold.
async fn wait_drained(brokers: &str, topics: &[String]) -> Result<u64> {
    let mut last = (u64::MAX, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = records(&topic_ends(brokers, topics)?);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(5) {
            return Ok(now);
        }
    }
}

async fn delete_topics(brokers: &str, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let Ok(admin) =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}

/// A run of some jobs: how long until they were done, and what they used.
#[derive(Clone)]
struct JobRun {
    elapsed: Duration,
    /// When the first batch of every job had committed.
    first_batch: Option<(Duration, u64)>,
    stats: Vec<ProcessStats>,
    /// What the MongoDB server did over the run.
    server: measure::ServerWork,
    /// Where the server's time went over the run, by collection and kind of operation ([`measure::server_top`]).
    server_top: Vec<(String, u64)>,
    /// How busy the whole machine was after the first batch ([`measure::busy_since`]).
    machine_busy: String,
    /// Which service it was busy with, over the same time ([`ServiceCpu`]).
    services: String,
    group: String,
}

impl JobRun {
    /// Records per second after the first batch (startup, group join and connection setup left out).
    fn steady_rate(&self, records: u64) -> f64 {
        match self.first_batch {
            Some((at, done)) if self.elapsed > at => (records - done) as f64 / (self.elapsed - at).as_secs_f64(),
            _ => Rate::new(records, self.elapsed).per_sec(),
        }
    }
    fn cpu_secs(&self) -> f64 {
        self.stats.iter().map(|s| s.cpu_secs).sum()
    }
    fn peak_rss_mb(&self) -> u64 {
        peak_rss_mb(&self.stats)
    }
}

/// The largest peak RSS of some jobs, in MB.
fn peak_rss_mb(stats: &[ProcessStats]) -> u64 {
    stats.iter().map(|s| s.peak_rss_kb).max().unwrap_or(0) / 1024
}

/// The freshness run's results.
struct Freshness {
    source: Histogram,
    in_job: Histogram,
    /// The job receiving a record to its MongoDB commit: the part of `in_job` that is the job's own.
    since_received: Histogram,
    tx_per_sec: f64,
    stats: Vec<ProcessStats>,
    /// Per job: batches committed and transactions aborted by a write conflict with another job.
    batches: Vec<(u64, u64)>,
    /// Per job: its share of `in_job` (which job holds the tail), and of `since_received`.
    job_in_job: Vec<(Histogram, Histogram)>,
    /// Records the jobs had not applied two minutes after the workload ended.
    behind: u64,
    /// Kafka record timestamp -> a plain consumer has it, in milliseconds, sorted: the broker's part of
    /// "in the jobs", which no job can go below.
    delivery_ms: Vec<i64>,
    /// How busy the whole machine was while the workload ran ([`measure::busy_since`]).
    machine_busy: String,
    /// Which service it was busy with ([`ServiceCpu`]).
    services: String,
    /// Records in the topics when the run began: tansu's memory storage spends more on every fetch the more
    /// it holds, so its delivery depends on it (README, "Freshness by load").
    held: u64,
}

/// Running the project's job binaries against the benchmark's topics.
struct Jobs<'a> {
    args: &'a Args,
    mongo: &'a mongodb::Client,
}

/// Job processes, stopped with SIGTERM when dropped.
struct Running {
    children: Vec<Child>,
    metrics_ports: Vec<u16>,
}

impl Running {
    /// An error if a job has exited (it should run until stopped).
    fn check_alive(&mut self) -> Result<()> {
        for child in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("a job exited early ({status})");
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        for child in &mut self.children {
            // SAFETY: kill only sends a signal to a process id we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Jobs<'_> {
    /// Starts the jobs `which` (indexes into [`JOBS`]) in consumer group `group`.
    fn start(&self, which: &[usize], group: &str) -> Result<Running> {
        let mut running = Running { children: Vec::new(), metrics_ports: Vec::new() };
        for &i in which {
            let port = cdc_cqrs::metrics::free_port()?;
            let group = format!("{group}-{}", TABLES[i]);
            let mut command = Command::new(measure::sibling_binary(JOBS[i])?);
            // The jobs stop with the benchmark, even when it is interrupted or killed.
            // SAFETY: prctl is async-signal-safe and only changes this child's own death signal.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let child = command
                .env("CDC_KAFKA_BROKERS", &self.args.brokers)
                .env("CDC_TOPIC_PREFIX", NAME)
                .env("CDC_MONGO_URI", &self.args.endpoints.mongo_uri)
                .env("CDC_MONGO_DATABASE", NAME)
                .env("CDC_GROUP_ID", &group)
                .env("CDC_INSTANCE_ID", &group)
                .env("CDC_METRICS_ADDR", format!("127.0.0.1:{port}"))
                .env("RUST_LOG", std::env::var("CDC_BENCH_JOB_LOG").unwrap_or_else(|_| "warn".into()))
                .args(self.args.job_flags.split_whitespace())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", JOBS[i]))?;
            running.children.push(child);
            running.metrics_ports.push(port);
        }
        Ok(running)
    }

    /// Runs the jobs `which` from the first offset into an empty database until their checkpoints reach
    /// `ends`, then stops them (their consumer group is in the result).
    async fn catch_up(&self, which: &[usize], ends: &Ends, label: &str) -> Result<JobRun> {
        let db = self.mongo.database(NAME);
        db.drop().await?;
        let group = format!("{NAME}-{label}-{}-{}", std::process::id(), now_nanos());
        let server_before = measure::ServerWork::read(self.mongo).await?;
        let top_before = measure::server_top(self.mongo, NAME).await?;
        let mut machine_before = MachineCpu::now();
        let mut services_before = (ServiceCpu::now(), Instant::now());
        let started = Instant::now();
        let mut running = self.start(which, &group)?;
        let ends: Ends = which
            .iter()
            .map(|&i| {
                let topic = format!("{NAME}.public.{}", TABLES[i]);
                let parts = ends.get(&topic).cloned().unwrap_or_default();
                (topic, parts)
            })
            .collect();
        let mut first_batch = None;
        let mut applied: u64;
        let timeout = Duration::from_secs(3600);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let progress = checkpoints(&db, &group).await?;
            applied = progress.values().flat_map(|p| p.values()).map(|&n| n as u64).sum();
            if first_batch.is_none() && ends.keys().all(|t| progress.contains_key(t)) {
                first_batch = Some((started.elapsed(), applied));
                // Over the same time as "steady/s": the group join before it leaves the machine idle.
                machine_before = MachineCpu::now();
                services_before = (ServiceCpu::now(), Instant::now());
            }
            if behind(&progress, &ends) == 0 {
                break;
            }
            if started.elapsed() > timeout {
                bail!("the jobs did not catch up within {timeout:?} ({applied} records applied)");
            }
            running.check_alive()?;
        }
        let elapsed = started.elapsed();
        let machine_busy = measure::busy_since(machine_before);
        let since_first = applied - first_batch.map_or(0, |(_, done)| done);
        let services = ServiceCpu::now().since(&services_before.0, services_before.1.elapsed(), Some(since_first));
        let server = measure::ServerWork::read(self.mongo).await?.since(server_before);
        let server_top = measure::top_since(&top_before, &measure::server_top(self.mongo, NAME).await?);
        let stats = running.children.iter().map(|c| ProcessStats::of(c.id())).collect::<Result<_>>()?;
        running.stop();
        Ok(JobRun { elapsed, first_batch, stats, server, server_top, machine_busy, services, group })
    }

    /// Starts the three jobs again where the run `group` left them (their histograms empty), runs the
    /// workload at `rate` transactions per second and reads the jobs' freshness histograms once they have
    /// applied all of it.
    async fn freshness(&self, pg: &PgArgs, topics: &[String], group: &str, rate: f64) -> Result<Freshness> {
        let db = self.mongo.database(NAME);
        register_connector(&ConnectClient::new(&self.args.connect_url)?, pg).await?;
        let mut running = self.start(&[0, 1, 2], group)?;
        let http = reqwest::Client::new();
        for &port in &running.metrics_ports {
            // Every job holds its partition, so no change waits for a group join.
            loop {
                let text = scrape(&http, port).await.unwrap_or_default();
                if cdc_cqrs::metrics::value(&text, "cdc_assigned_partitions").is_some_and(|n| n > 0.0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before: Vec<ProcessStats> =
            running.children.iter().map(|c| ProcessStats::of(c.id())).collect::<Result<_>>()?;
        let pool = postgres::pool(pg, NAME, 5).await?;
        let ends_before = topic_ends(&self.args.brokers, topics)?;
        let held = records(&ends_before);
        let probe = DeliveryProbe::start(&self.args.brokers, &ends_before)?;
        let plan = workload::Workload {
            products: 0,
            orders: 0,
            orders_per_tx: 1,
            changes: None,
            duration: Some(Duration::from_secs(self.args.freshness_secs)),
            rate: Some(rate),
            seed: now_nanos() as u64,
            mix: self.args.mix.clone(),
            connections: 4,
        };
        let machine_before = MachineCpu::now();
        let services_before = ServiceCpu::now();
        let summary = workload::run(&pool, &plan, &ProgressBar::hidden()).await?;
        let machine_busy = measure::busy_since(machine_before);
        let services = ServiceCpu::now().since(&services_before, summary.elapsed, None);
        let ends = {
            wait_drained(&self.args.brokers, topics).await?;
            topic_ends(&self.args.brokers, topics)?
        };
        let behind = wait_applied(&db, group, &ends, &mut running, Duration::from_secs(120)).await?;
        let delivery_ms = probe.stop()?;
        let mut source = Histogram::default();
        let mut in_job = Histogram::default();
        let mut since_received = Histogram::default();
        let mut batches = Vec::new();
        let mut job_in_job = Vec::new();
        for &port in &running.metrics_ports {
            let text = scrape(&http, port).await?;
            source.add(&Histogram::parse(&text, "cdc_freshness_seconds")?);
            let job = Histogram::parse(&text, "cdc_in_job_seconds")?;
            let job_since_received = Histogram::parse(&text, "cdc_since_received_seconds")?;
            in_job.add(&job);
            since_received.add(&job_since_received);
            job_in_job.push((job, job_since_received));
            let counter = |name| cdc_cqrs::metrics::value(&text, name).unwrap_or(0.0) as u64;
            batches.push((counter("cdc_batches_total"), counter("cdc_conflicts_total")));
        }
        let after: Vec<ProcessStats> =
            running.children.iter().map(|c| ProcessStats::of(c.id())).collect::<Result<_>>()?;
        let stats = after
            .iter()
            .zip(&before)
            .map(|(a, b)| ProcessStats { cpu_secs: a.cpu_secs - b.cpu_secs, peak_rss_kb: a.peak_rss_kb })
            .collect();
        running.stop();
        Ok(Freshness {
            source,
            in_job,
            since_received,
            tx_per_sec: summary.tx_per_sec(),
            stats,
            batches,
            job_in_job,
            behind,
            delivery_ms,
            machine_busy,
            services,
            held,
        })
    }
}

/// A plain consumer of the topics' new records (assigned, no group, nothing decoded) noting how long after
/// its timestamp each record reached it: how fresh the broker alone lets a consumer be.
struct DeliveryProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<i64>>>,
}

impl DeliveryProbe {
    /// Reads from `ends` on.
    fn start(brokers: &str, ends: &Ends) -> Result<DeliveryProbe> {
        let consumer = raw_consumer(brokers)?;
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in ends {
            for (&p, &end) in partitions {
                tpl.add_partition_offset(topic, p, Offset::Offset(end))?;
            }
        }
        consumer.assign(&tpl)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        // tansu reports partition ends a few records short (STACK.md): the records stamped before the probe
        // started are older ones, not the run's.
        let started_ms = (now_nanos() / 1_000_000) as i64;
        let thread = std::thread::spawn(move || {
            let mut delays = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        if let Some(ts) = m.timestamp().to_millis().filter(|&ts| ts >= started_ms) {
                            delays.push((now_nanos() / 1_000_000) as i64 - ts);
                        }
                    }
                    Some(Err(e)) => bail!("the delivery probe's consumer: {e}"),
                    None => {}
                }
            }
            Ok(delays)
        });
        Ok(DeliveryProbe { stop, thread })
    }

    /// The delays seen, sorted.
    fn stop(self) -> Result<Vec<i64>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut delays = self.thread.join().map_err(|_| anyhow::anyhow!("the delivery probe panicked"))??;
        delays.sort_unstable();
        Ok(delays)
    }
}

/// The `q` quantile of sorted `values` (nearest rank), 0 when empty.
fn nearest_rank(values: &[i64], q: f64) -> f64 {
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len().max(1));
    values.get(rank - 1).copied().unwrap_or(0) as f64
}

/// Waits up to `within` until the group's checkpoints reach `ends` (the jobs must still run); returns the
/// records still not applied then.
async fn wait_applied(
    db: &mongodb::Database,
    group: &str,
    ends: &Ends,
    running: &mut Running,
    within: Duration,
) -> Result<u64> {
    let started = Instant::now();
    loop {
        let behind = behind(&checkpoints(db, group).await?, ends);
        if behind == 0 || started.elapsed() > within {
            return Ok(behind);
        }
        running.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records between the checkpoints (topic -> partition -> next offset) and `ends`.
fn behind(progress: &HashMap<String, HashMap<i32, i64>>, ends: &Ends) -> u64 {
    ends.iter()
        .flat_map(|(t, parts)| {
            parts.iter().map(move |(p, &end)| {
                let at = progress.get(t).and_then(|c| c.get(p)).copied().unwrap_or(0);
                (end - at).max(0) as u64
            })
        })
        .sum()
}

/// The checkpoints of every job whose group starts with `group`: topic -> partition -> next offset.
async fn checkpoints(db: &mongodb::Database, group: &str) -> Result<HashMap<String, HashMap<i32, i64>>> {
    let filter = doc! { "group": { "$regex": format!("^{}", regex_escape(group)) } };
    let docs: Vec<Document> = db.collection::<Document>("_checkpoints").find(filter).await?.try_collect().await?;
    let mut out: HashMap<String, HashMap<i32, i64>> = HashMap::new();
    for d in docs {
        out.entry(d.get_str("topic")?.to_owned())
            .or_default()
            .insert(d.get_i32("partition")?, d.get_i64("next_offset")?);
    }
    Ok(out)
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() || c == '_' { vec![c] } else { vec!['\\', c] }).collect()
}

async fn scrape(http: &reqwest::Client, port: u16) -> Result<String> {
    Ok(http.get(format!("http://127.0.0.1:{port}/metrics")).send().await?.error_for_status()?.text().await?)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Reads every record of `topics` up to `ends` with one consumer (the jobs' client settings, partitions
/// assigned, nothing decoded); also returns the bytes of the values read.
fn read_raw(brokers: &str, topics: &[String], ends: &Ends) -> Result<(Rate, u64)> {
    let consumer = raw_consumer(brokers)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for topic in topics {
        for (&p, &end) in &ends[topic] {
            if end > 0 {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
                remaining += 1;
            }
        }
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let (mut read, mut bytes) = (0_u64, 0_u64);
    while remaining > 0 {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                read += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                if m.offset() + 1 == ends[m.topic()][&m.partition()] {
                    remaining -= 1;
                }
            }
            Some(Err(e)) => bail!("reading the topics: {e}"),
            None => bail!("no record for 10 s with {remaining} partitions not read to their end"),
        }
    }
    Ok((Rate::new(read, started.elapsed()), bytes))
}

/// `count` upserts by `_id` of documents the size of an order line's (an `update` statement per event,
/// like the jobs write, but no transaction, no guard, unordered, 10,000 per command, 4 commands in flight).
/// Keys repeat, so some are inserts and most replace an existing document, as in a change stream.
async fn upsert_raw(mongo: &mongodb::Client, count: u64) -> Result<(Rate, measure::ServerWork)> {
    const PER_COMMAND: u64 = 10_000;
    let db = mongo.database(RAW_DATABASE);
    db.drop().await?;
    let keys = (count / 3).max(1);
    let before = measure::ServerWork::read(mongo).await?;
    let started = Instant::now();
    futures::stream::iter((0..count).step_by(PER_COMMAND as usize))
        .map(|start| {
            let updates: Vec<Document> = (start..(start + PER_COMMAND).min(count))
                .map(|i| {
                    let id = (i * 7_919) % keys;
                    doc! {
                        "q": { "_id": id as i64 },
                        "u": { "$set": {
                            "order_id": (id / 3) as i64, "product_id": (i % 10_000) as i64,
                            "product_name": "Ergonomic Steel Chair", "unit_price": "498.80", "quantity": 3,
                            "discount": "0.050", "order_status": "pending", "_v": i as i64,
                        } },
                        "upsert": true,
                    }
                })
                .collect();
            let db = db.clone();
            async move {
                let reply = db.run_command(doc! { "update": "upserts", "updates": updates, "ordered": false }).await?;
                if reply.get_array("writeErrors").is_ok_and(|e| !e.is_empty()) {
                    bail!("the raw upserts failed: {reply}");
                }
                Ok(())
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await?;
    let rate = Rate::new(count, started.elapsed());
    let work = measure::ServerWork::read(mongo).await?.since(before);
    db.drop().await?;
    Ok((rate, work))
}
