//! `bench first-load`: times `first_load` on a generated write model and, in the same run, the two raw
//! limits it sits between on this machine: PostgreSQL `COPY` of the three tables to nowhere, and MongoDB
//! `insert_many` of as many ready-made documents of the same sizes.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use bson::{Document, doc};
use cdc_cqrs::bootstrap::{setup, workload};
use cdc_cqrs::config::PgArgs;
use cdc_cqrs::postgres;
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;

use crate::measure::{self, Rate};

/// The PostgreSQL and MongoDB databases the benchmark owns (dropped and rewritten freely).
const DATABASE: &str = "cdc_bench";
const RAW_DATABASE: &str = "cdc_bench_raw";
const SLOT: &str = "cdc_bench";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Orders to generate (1-5 lines each, about 3).
    #[arg(long, default_value_t = 1_000_000)]
    orders: u64,

    /// Products to generate.
    #[arg(long, default_value_t = 10_000)]
    products: u64,

    /// Regenerate the data even if the benchmark database already holds that many orders.
    #[arg(long)]
    fresh: bool,

    /// Flags passed on to first_load (e.g. "--parallelism 2").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    first_load_flags: String,

    #[command(flatten)]
    endpoints: crate::Endpoints,
}

pub async fn run(args: Args) -> Result<()> {
    let pg = PgArgs { url: args.endpoints.pg_url.clone(), database: DATABASE.into() };
    let password = std::env::var("DEBEZIUM_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .context("set DEBEZIUM_PASSWORD (scripts/stack exec sets it): the benchmark creates its own write model")?;
    setup::setup(&pg, &password).await?;
    let mut conn = postgres::connect(&pg, DATABASE).await?;
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut conn).await?;
    if args.fresh || existing as u64 != args.orders {
        generate(&pg, &mut conn, &args).await?;
    } else {
        eprintln!("bench: reusing the {existing} orders already in database {DATABASE} (--fresh regenerates)");
    }
    sqlx::raw_sql("VACUUM ANALYZE products, orders, order_details").execute(&mut conn).await?;
    let mut rows = [0_u64; 3];
    for (i, table) in ["products", "orders", "order_details"].iter().enumerate() {
        rows[i] = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut conn)
            .await? as u64;
    }
    let total_rows: u64 = rows.iter().sum();

    eprintln!("bench: COPY of the three tables to nowhere");
    let started = Instant::now();
    let mut copied_bytes = 0;
    for table in ["products", "orders", "order_details"] {
        let mut out = conn.copy_out_raw(&format!("COPY {table} TO STDOUT")).await?;
        while let Some(chunk) = out.try_next().await? {
            copied_bytes += chunk.len();
        }
    }
    let copy = Rate::new(total_rows, started.elapsed());

    eprintln!("bench: first_load");
    let mongo = mongodb::Client::with_uri_str(&args.endpoints.mongo_uri).await?;
    mongo.database(DATABASE).drop().await?;
    sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
        .bind(SLOT)
        .execute(&mut conn)
        .await?;
    // first_load insists on the connector's slot (changes after its snapshot must be captured).
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')").bind(SLOT).execute(&mut conn).await?;
    let mut command = std::process::Command::new(measure::sibling_binary("first_load")?);
    command
        .env("CDC_PG_URL", &args.endpoints.pg_url)
        .env("CDC_MONGO_URI", &args.endpoints.mongo_uri)
        .args(["--database", DATABASE, "--mongo-database", DATABASE, "--slot", SLOT])
        .args(args.first_load_flags.split_whitespace());
    let loaded = measure::run_child(command);
    // A slot left behind would hold WAL forever.
    sqlx::query("SELECT pg_drop_replication_slot($1)").bind(SLOT).execute(&mut conn).await?;
    let loaded = loaded?;
    print!("{}", loaded.stdout);
    let db = mongo.database(DATABASE);
    let mut documents = 0;
    let mut sizes = Vec::new();
    for name in ["products", "orders", "order_details"] {
        let stats = collection_stats(&db, name).await?;
        documents += stats.0;
        sizes.push(stats);
    }
    let load = Rate::new(total_rows, loaded.elapsed);

    eprintln!("bench: insert_many of {documents} ready-made documents of the same sizes");
    let raw = mongo.database(RAW_DATABASE);
    raw.drop().await?;
    let started = Instant::now();
    for (i, &(count, avg_size)) in sizes.iter().enumerate() {
        insert_ready_made(&raw, &format!("c{i}"), count, avg_size).await?;
    }
    let insert = Rate::new(documents, started.elapsed());
    raw.drop().await?;
    mongo.shutdown().await;

    let limits = copy.elapsed + insert.elapsed;
    println!();
    println!(
        "bench first-load: {} products, {} orders, {} lines ({} rows, {} documents); {}",
        rows[0],
        rows[1],
        rows[2],
        total_rows,
        documents,
        measure::machine()
    );
    println!(
        "  first_load              {:>7.1} s  {:>9.0} rows/s  {:>9.0} docs/s  peak RSS {} MB",
        load.secs(),
        load.per_sec(),
        documents as f64 / load.secs(),
        loaded.peak_rss_kb / 1024
    );
    println!(
        "  limit: PostgreSQL COPY  {:>7.1} s  {:>9.0} rows/s  ({} MB of text, tables one after another)",
        copy.secs(),
        copy.per_sec(),
        copied_bytes / 1_000_000
    );
    println!(
        "  limit: insert_many      {:>7.1} s  {:>9.0} docs/s  (unordered, 10,000 per call, 4 calls in flight)",
        insert.secs(),
        insert.per_sec()
    );
    println!(
        "  first_load / (COPY + insert_many) = {:.2} / {:.2} = {:.2}",
        load.secs(),
        limits.as_secs_f64(),
        load.secs() / limits.as_secs_f64()
    );
    Ok(())
}

async fn generate(pg: &PgArgs, conn: &mut sqlx::PgConnection, args: &Args) -> Result<()> {
    eprintln!("bench: generating {} products and {} orders in database {DATABASE}", args.products, args.orders);
    sqlx::raw_sql("TRUNCATE products, orders, order_details RESTART IDENTITY CASCADE").execute(&mut *conn).await?;
    let plan = workload::Workload {
        products: args.products,
        orders: args.orders,
        orders_per_tx: 100,
        changes: None,
        duration: None,
        rate: None,
        seed: 42,
        mix: workload::Mix::DEFAULT.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
        connections: 4,
    };
    let pool = postgres::pool(pg, DATABASE, 5).await?;
    let bar = ProgressBar::new(args.orders);
    let summary = workload::run(&pool, &plan, &bar).await?;
    bar.finish_and_clear();
    eprintln!("bench: generated in {:.1}s", summary.elapsed.as_secs_f64());
    Ok(())
}

/// Documents and average BSON size of a collection.
async fn collection_stats(db: &mongodb::Database, name: &str) -> Result<(u64, usize)> {
    let mut cursor = db.collection::<Document>(name).aggregate([doc! { "$collStats": { "storageStats": {} } }]).await?;
    let Some(stats) = cursor.try_next().await? else { bail!("no stats for {name}") };
    let storage = stats.get_document("storageStats")?;
    let count = storage.get("count").and_then(measure::server_number).unwrap_or(0);
    let avg = storage.get("avgObjSize").and_then(measure::server_number).unwrap_or(0) as usize;
    Ok((count, avg))
}

/// `count` documents `{_id, pad}` of about `size` bytes, 10,000 per `insert_many`, 4 in flight.
async fn insert_ready_made(db: &mongodb::Database, name: &str, count: u64, size: usize) -> Result<()> {
    const PER_CALL: u64 = 10_000;
    let collection = db.collection::<Document>(name);
    let pad = "x".repeat(size.saturating_sub(30));
    futures::stream::iter((0..count).step_by(PER_CALL as usize))
        .map(|start| {
            let docs: Vec<Document> =
                (start..(start + PER_CALL).min(count)).map(|i| doc! { "_id": i as i64, "pad": &pad }).collect();
            let collection = collection.clone();
            async move { collection.insert_many(docs).ordered(false).await.map(|_| ()) }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}
