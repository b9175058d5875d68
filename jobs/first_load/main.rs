//! `first_load`: bulk-copies the write model into the MongoDB read models from one PostgreSQL snapshot,
//! and hands over to the stream jobs at exactly that snapshot (see `cdc_cqrs::handoff`).
//!
//! Flow: one exported snapshot -> key ranges read by `--parallelism` connections (source) -> documents
//! built with polars (frames) -> unordered bulk inserts into the run's own shadow collections (target),
//! swapped in at the end. A first load pauses the jobs while it loads; `--rebuild` loads while the jobs go
//! on, and its swap rewinds the jobs to where they stood before the snapshot. A crashed run is simply run
//! again: a half-done load is dropped and redone from a fresh snapshot, a half-done swap is finished. One
//! run at a time per store (`lease`): a second is refused while the first runs, and one that lost its lease
//! writes nothing that is swapped in.
//!
//! Given several read stores (as the jobs are), one run loads them all: one snapshot, each document built
//! once and inserted into every store, then each store swapped in its own handoff.

mod frames;
mod lease;
mod source;
mod target;

use std::collections::HashMap;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bson::doc;
use bson::oid::ObjectId;
use cdc_cqrs::cli;
use cdc_cqrs::config::{PgArgs, StoresArgs};
use cdc_cqrs::handoff::{self, Phase};
use cdc_cqrs::projection::Collection;
use cdc_cqrs::sink::MongoSink;
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mongodb::Database;
use tokio::sync::Mutex;

use frames::Oversized;
use lease::Lease;
use source::{Reader, SnapshotSource};

// Millions of small documents are built and freed across threads: glibc's per-thread arenas made the
// peak RSS several times the live data, and malloc/free a third of the CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use target::{Target, Targets};

/// Copy products, orders and order_details from one consistent PostgreSQL snapshot into the MongoDB read
/// models (orders embed their lines with product data and totals; order_details carry the product name
/// and order status), then let the stream jobs go on from exactly that snapshot: no change lost, none
/// applied twice, even while writes go on. Run it with the Debezium connector registered (its slot must
/// exist). Into empty collections by default (the stream jobs wait meanwhile); with --rebuild, beside
/// the live ones, swapped in when complete. Safe to run again after a crash; a run beside one still running
/// on the same read store is refused. Given several read stores, loads them all from one snapshot.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,

    /// Every read store given is loaded from the same snapshot (the documents are built once).
    #[command(flatten)]
    stores: StoresArgs,

    /// Replication slot of the Debezium connector (it must exist before the snapshot is taken).
    #[arg(long, env = "CDC_SLOT_NAME", default_value = "cdc_cqrs_ecommerce")]
    slot: String,

    /// Load into shadow collections and swap them in when done (the read models are not empty).
    #[arg(long)]
    rebuild: bool,

    /// Keys per range: one range of orders (with their lines) or products is read, built and written at
    /// a time per connection.
    #[arg(long, env = "CDC_LOAD_CHUNK", default_value_t = 2_000)]
    chunk: i64,

    /// Ranges in flight, each with its own PostgreSQL connection.
    #[arg(long, env = "CDC_LOAD_PARALLELISM", default_value_t = 4)]
    parallelism: usize,

    /// No progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run(async move {
        if cli.chunk < 1 || cli.parallelism < 1 {
            bail!("--chunk and --parallelism must be at least 1");
        }
        let summary = load(&cli).await?;
        print!("{summary}");
        Ok(())
    })
}

/// A read store this run loads, its lease held.
struct Store {
    /// `store<i> (hosts)` when the run loads several, for the messages that must say which; empty with one.
    label: String,
    db: Database,
    owner: ObjectId,
}

impl Store {
    fn error(&self, e: anyhow::Error) -> anyhow::Error {
        naming(&self.label, e)
    }
}

/// `e`, naming the store `label` when the run loads several (`label` is empty with one).
fn naming(label: &str, e: anyhow::Error) -> anyhow::Error {
    if label.is_empty() { e } else { e.context(label.to_owned()) }
}

async fn load(cli: &Cli) -> Result<Summary> {
    let stores = cli.stores.stores();
    if stores.is_empty() {
        bail!("--mongo-uri / CDC_MONGO_URI names no read store: give it one URI, or several separated by spaces");
    }
    let several = stores.len() > 1;
    let mut connected = Vec::new();
    for store in &stores {
        let label = if several { store.name.clone() } else { String::new() };
        let sink = MongoSink::connect(&store.mongo).await.map_err(|e| naming(&label, e))?;
        connected.push((label, sink.database().clone()));
    }
    // Every store's lease before any is read or written: a run refused on one store leaves them all as they were.
    let mut leases = Vec::new();
    let mut held = Vec::new();
    for (label, db) in connected {
        match Lease::take(&db).await {
            Ok(lease) => {
                held.push(Store { label, owner: lease.owner(), db });
                leases.push(lease);
            }
            Err(e) => {
                release(leases).await.ok();
                return Err(naming(&label, e));
            }
        }
    }
    let lost = leases.iter().zip(&held).map(|(lease, store)| Box::pin(async move { store.error(lease.lost().await) }));
    let lost = futures::future::select_all(lost);
    let done = tokio::select! {
        done = load_holding_the_leases(cli, &held) => done,
        (lost, _, _) = lost => Err(lost),
    };
    // Released after a failure too: what the run left is the next run's to finish or redo.
    let released = release(leases).await;
    let summary = done?;
    released?;
    Ok(summary)
}

/// Releases every lease, reporting the first that failed.
async fn release(leases: Vec<Lease>) -> Result<()> {
    let mut first = Ok(());
    for lease in leases {
        let released = lease.release().await;
        if first.is_ok() {
            first = released;
        }
    }
    first
}

/// What a run does in one store.
struct StoreLoad<'a> {
    store: &'a Store,
    /// A rebuild (beside the live models, the jobs going on), or a first load (the jobs paused).
    rebuild: bool,
    /// A first load's epoch, begun before the snapshot.
    epoch: Option<i64>,
    /// A rebuild's checkpoints of the jobs, noted before the snapshot.
    rewind: Option<HashMap<String, i64>>,
}

async fn load_holding_the_leases(cli: &Cli, stores: &[Store]) -> Result<Summary> {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut loads = Vec::new();
    for store in stores {
        match plan(cli, store).await.map_err(|e| store.error(e))? {
            Plan::SwapFinished(epoch) => summary.swaps_finished.push((store.label.clone(), epoch)),
            Plan::Load { rebuild } => loads.push(StoreLoad { store, rebuild, epoch: None, rewind: None }),
        }
    }
    if loads.is_empty() {
        return Ok(summary);
    }
    SnapshotSource::check(&cli.pg, &cli.slot).await?;

    // A first load stops the jobs before its snapshot: whatever they applied is older than it, so the
    // collections can be dropped and loaded from the snapshot. A rebuild notes where the jobs stand
    // before its snapshot: every change the snapshot lacks is past those checkpoints.
    for load in &mut loads {
        let (db, owner) = (&load.store.db, load.store.owner);
        if load.rebuild {
            load.rewind = Some(handoff::checkpoints(db).await.map_err(|e| load.store.error(e))?);
        } else {
            let mut session = db.client().start_session().await?;
            let epoch = handoff::begin(db, &mut session, owner, Phase::Loading, None, false, None).await;
            load.epoch = Some(epoch.map_err(|e| load.store.error(e))?);
        }
    }
    let source = SnapshotSource::open(&cli.pg).await?;
    let mut targets = Vec::new();
    for load in &loads {
        if let Some(epoch) = load.epoch {
            let recorded = handoff::set_snapshot(&load.store.db, epoch, &source.snapshot).await;
            recorded.map_err(|e| load.store.error(e))?;
        }
        let target = Target::new(load.store.db.clone(), load.store.owner);
        target.reset(!load.rebuild).await.map_err(|e| load.store.error(e))?;
        targets.push((load.store.label.clone(), target));
    }
    let targets = Targets::new(targets);
    tracing::info!(snapshot = %source.snapshot, stores = loads.len(), "snapshot taken");

    // Each phase's time in the log: where a slow load spends it.
    let phase = Instant::now();
    let (tables, oversized) = copy(cli, &source, &targets).await?;
    let documents: u64 = tables.iter().map(|t| t.documents).sum();
    tracing::info!(documents, seconds = phase.elapsed().as_secs_f64(), "documents written");
    let phase = Instant::now();
    let builds = targets
        .iter()
        .zip(&loads)
        .map(|(target, load)| async move { target.create_indexes().await.map_err(|e| load.store.error(e)) });
    futures::future::try_join_all(builds).await?;
    tracing::info!(seconds = phase.elapsed().as_secs_f64(), "indexes built");
    let snapshot = source.snapshot.clone();
    drop(source);

    let summary_doc = doc! {
        "products": tables[0].documents as i64,
        "orders": tables[1].documents as i64,
        "order_details": tables[2].documents as i64,
        "lines_not_embedded": oversized.iter().map(|o| o.left_out.len() as i64).sum::<i64>(),
        "seconds": started.elapsed().as_secs_f64(),
    };
    // One store after another, each in its own handoff: a swap that fails in one store is the next run's to
    // finish there, and leaves the stores already swapped as they are.
    for load in &loads {
        let (db, owner) = (&load.store.db, load.store.owner);
        let swapped = async {
            // A first load swaps too (into empty collections): only the run holding the lease swaps its shadows in.
            let (swap, rewind) = (Some(&snapshot), load.rewind.as_ref());
            let mut session = db.client().start_session().await?;
            let epoch = handoff::begin(db, &mut session, owner, Phase::Swapping, swap, load.rebuild, rewind).await?;
            Target::swap_in(db, Some(&owner.to_hex())).await?;
            handoff::finish(db, epoch, summary_doc.clone()).await?;
            Ok::<_, anyhow::Error>(epoch)
        };
        let phase = Instant::now();
        let epoch = swapped.await.map_err(|e| load.store.error(e))?;
        tracing::info!(store = %load.store.label, epoch, seconds = phase.elapsed().as_secs_f64(), "swapped in");
        summary.loaded.push(Loaded { store: load.store.label.clone(), epoch, rebuild: load.rebuild });
    }
    summary.snapshot = Some(snapshot.to_string());
    summary.tables = tables;
    summary.oversized = oversized;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// What a store needs of this run.
enum Plan {
    /// An earlier run died in its swap: this run finished it (the swap's epoch), the store needs no load.
    SwapFinished(i64),
    Load {
        rebuild: bool,
    },
}

/// Finishes a swap an earlier run left half done, or checks the store can be loaded (empty, unless
/// `--rebuild` or an earlier first load died half way).
async fn plan(cli: &Cli, store: &Store) -> Result<Plan> {
    let db = &store.db;
    let previous = handoff::read(db, None).await?;
    if previous.phase == Phase::Swapping {
        Target::swap_in(db, previous.loaded_by.as_deref()).await?;
        handoff::finish(db, previous.epoch, doc! { "note": "swap finished by a later run" }).await?;
        return Ok(Plan::SwapFinished(previous.epoch));
    }
    // An earlier first load that did not finish left partial collections: redo it.
    let interrupted = previous.phase == Phase::Loading;
    let rebuild = cli.rebuild && !interrupted;
    if !rebuild && !interrupted {
        Target::check_empty(db, !store.label.is_empty()).await?;
    }
    Ok(Plan::Load { rebuild })
}

/// One unit of work: a key range of one table.
#[derive(Clone, Copy)]
enum Range {
    Products(i64, i64),
    Orders(i64, i64),
}

/// Per-table counts.
#[derive(Default, Clone)]
struct TableCount {
    name: &'static str,
    rows: u64,
    documents: u64,
}

async fn copy(cli: &Cli, source: &SnapshotSource, targets: &Targets) -> Result<(Vec<TableCount>, Vec<Oversized>)> {
    let mut first = source.reader().await?;
    let mut work: Vec<Range> = source::key_ranges(&mut first, "products", cli.chunk)
        .await?
        .into_iter()
        .map(|(lo, hi)| Range::Products(lo, hi))
        .collect();
    work.extend(
        source::key_ranges(&mut first, "orders", cli.chunk).await?.into_iter().map(|(lo, hi)| Range::Orders(lo, hi)),
    );
    let bars = Bars::new(cli.quiet);
    for (i, table) in source::TABLES.iter().enumerate() {
        bars.bars[i].set_length(source::count(&mut first, table).await?);
    }
    let work = Arc::new(Mutex::new(work.into_iter()));
    let mut readers = vec![first];
    for _ in 1..cli.parallelism {
        readers.push(source.reader().await?);
    }
    let workers = readers.into_iter().map(|reader| worker(reader, work.clone(), targets, &bars));
    let per_worker = futures::future::try_join_all(workers).await?;
    bars.finish();
    let mut tables: Vec<TableCount> =
        source::TABLES.iter().map(|&name| TableCount { name, ..Default::default() }).collect();
    let mut oversized = Vec::new();
    for (counts, worker_oversized) in per_worker {
        for (t, c) in tables.iter_mut().zip(counts) {
            t.rows += c.rows;
            t.documents += c.documents;
        }
        oversized.extend(worker_oversized);
    }
    oversized.sort_by_key(|o| o.order_id);
    Ok((tables, oversized))
}

/// Takes ranges until none is left: read, build (on the blocking pool: polars and BSON are CPU work),
/// write.
async fn worker(
    mut reader: Reader,
    work: Arc<Mutex<std::vec::IntoIter<Range>>>,
    targets: &Targets,
    bars: &Bars,
) -> Result<(Vec<TableCount>, Vec<Oversized>)> {
    let mut counts = vec![TableCount::default(); 3];
    let mut oversized = Vec::new();
    loop {
        let Some(range) = work.lock().await.next() else { break };
        match range {
            Range::Products(lo, hi) => {
                let rows = reader.products((lo, hi)).await?;
                let n = rows.product_id.len() as u64;
                bars.read(0, n);
                let docs = tokio::task::spawn_blocking(move || frames::product_documents(rows)).await?;
                let written = targets.insert(Collection::Products, &docs).await?;
                bars.written(0, written);
                counts[0].rows += n;
                counts[0].documents += written;
            }
            Range::Orders(lo, hi) => {
                let started = Instant::now();
                let range = reader.orders((lo, hi)).await?;
                let read = started.elapsed();
                let (orders, lines) = (range.orders.order_id.len() as u64, range.lines.order_detail_id.len() as u64);
                bars.read(1, orders);
                bars.read(2, lines);
                let docs = tokio::task::spawn_blocking(move || frames::order_documents(range)).await??;
                let built = started.elapsed();
                for order in &docs.oversized {
                    tracing::warn!(
                        order_id = order.order_id,
                        embedded = order.embedded,
                        left_out = order.left_out.len(),
                        first_left_out = order.left_out.first(),
                        "an order's lines exceed MongoDB's 16 MB document limit: the first ones are embedded"
                    );
                }
                let (o, d) = tokio::try_join!(
                    targets.insert(Collection::Orders, &docs.orders),
                    targets.insert(Collection::OrderDetails, &docs.order_details)
                )?;
                tracing::debug!(
                    lo,
                    read_ms = read.as_millis() as u64,
                    build_ms = (built - read).as_millis() as u64,
                    write_ms = (started.elapsed() - built).as_millis() as u64,
                    "orders range"
                );
                bars.written(1, o);
                bars.written(2, d);
                counts[1].rows += orders;
                counts[1].documents += o;
                counts[2].rows += lines;
                counts[2].documents += d;
                oversized.extend(docs.oversized);
            }
        }
    }
    reader.close().await.context("ending a snapshot reader")?;
    Ok((counts, oversized))
}

/// One progress bar per table: documents written of rows in the snapshot, rows read, rate, ETA.
struct Bars {
    bars: [ProgressBar; 3],
    read: [AtomicU64; 3],
}

impl Bars {
    fn new(quiet: bool) -> Bars {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        let style =
            ProgressStyle::with_template("{prefix:>13} [{bar:30}] {pos}/{len} written, {msg}, {per_sec}, ETA {eta}")
                .expect("valid template")
                .progress_chars("=> ");
        let bars = source::TABLES.map(|t| {
            let bar = multi.add(ProgressBar::new(0).with_style(style.clone()).with_prefix(t));
            bar.set_message("0 read");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Bars { bars, read: Default::default() }
    }

    fn read(&self, table: usize, n: u64) {
        let total = self.read[table].fetch_add(n, Ordering::Relaxed) + n;
        self.bars[table].set_message(format!("{total} read"));
    }

    fn written(&self, table: usize, n: u64) {
        self.bars[table].inc(n);
    }

    fn finish(&self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
    }
}

/// What a run did, printed at the end.
#[derive(Default)]
struct Summary {
    /// Stores where this run finished a swap an earlier run left half done (and loaded nothing): the store's
    /// label and the swap's epoch.
    swaps_finished: Vec<(String, i64)>,
    /// Stores this run loaded, all from one snapshot.
    loaded: Vec<Loaded>,
    snapshot: Option<String>,
    tables: Vec<TableCount>,
    oversized: Vec<Oversized>,
    elapsed: Duration,
}

/// One store this run loaded.
struct Loaded {
    /// Empty when the run loaded one store.
    store: String,
    epoch: i64,
    rebuild: bool,
}

impl Loaded {
    fn how(&self) -> &'static str {
        if self.rebuild { "rebuilt and swapped in" } else { "loaded" }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (store, epoch) in &self.swaps_finished {
            let store = if store.is_empty() { String::new() } else { format!("{store}: ") };
            writeln!(
                f,
                "first_load: {store}finished the swap of rebuild epoch {epoch} that an earlier run left half done"
            )?;
        }
        let secs = self.elapsed.as_secs_f64();
        match self.loaded.as_slice() {
            [] => return Ok(()),
            [one] if one.store.is_empty() => {
                writeln!(f, "first_load: {} in {secs:.1}s (handoff epoch {})", one.how(), one.epoch)?;
            }
            stores => {
                writeln!(f, "first_load: {} read stores from one snapshot in {secs:.1}s", stores.len())?;
                for s in stores {
                    writeln!(f, "  {}: {} (handoff epoch {})", s.store, s.how(), s.epoch)?;
                }
            }
        }
        if let Some(s) = &self.snapshot {
            writeln!(f, "  snapshot {s} (the stream applies what it does not hold)")?;
        }
        let secs = secs.max(1e-9);
        for t in &self.tables {
            writeln!(
                f,
                "  {:<14} {:>10} rows {:>10} documents {:>10.0} rows/s",
                t.name,
                t.rows,
                t.documents,
                t.rows as f64 / secs
            )?;
        }
        let rows: u64 = self.tables.iter().map(|t| t.rows).sum();
        writeln!(f, "  {:<14} {:>10} rows {:>21} {:>10.0} rows/s", "all", rows, "", rows as f64 / secs)?;
        for order in &self.oversized {
            let (first, last) = (order.left_out.first().unwrap_or(&0), order.left_out.last().unwrap_or(&0));
            writeln!(
                f,
                "  order {} is over MongoDB's 16 MB document limit: {} lines embedded, {} left out (order_detail_id \
                 {first} to {last}; their order_details documents are written, `verify` lists the order)",
                order.order_id,
                order.embedded,
                order.left_out.len(),
            )?;
        }
        Ok(())
    }
}
