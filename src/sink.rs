//! The MongoDB sink: applies a batch's writes and advances the job's checkpoints in one transaction.
//!
//! Committing the checkpoint with the writes is what makes a batch's effect exactly-once: a crash before
//! the commit leaves neither, a crash after leaves both, and on restart the runtime skips records below the
//! checkpoint. Every write is also version-guarded, so a replay past a lost checkpoint is a no-op too: that
//! is what lets a large batch be written in several transactions and its checkpoints after them.
//! A server without replica set or an unreachable one is an error the runtime retries with backoff.
//!
//! A job may have up to [`LANES`] transactions in flight at once (the runtime splits a large batch by key
//! into lanes). What must serialize with a lane's transaction is written per lane: its truncation
//! watermark document and the product locks it takes, so that lanes of one job never conflict over them,
//! while a TRUNCATE, first_load's phase changes and a product's name or price change write every lane's
//! document and conflict with all of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bson::{Document, RawArrayBuf, RawDocumentBuf, doc, rawdoc};
use mongodb::error::{TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::ClientOptions;
use mongodb::{Client, ClientSession, Database, IndexModel};

use crate::config::MongoArgs;
use crate::envelope::Event;
use crate::handoff::{self, Gate, Handoff, Phase};
use crate::projection::Collection;
use crate::runtime::Job;

/// `update` commands hold at most this many statements (the server's limit is 100,000).
const STATEMENTS_PER_COMMAND: usize = 10_000;
pub(crate) const CHECKPOINTS: &str = "_checkpoints";
pub(crate) const TRUNCATIONS: &str = "_truncations";

/// Documents only written, to make transactions that embed a product and those that change it conflict
/// (MongoDB's snapshot isolation would otherwise let both commit, each blind to the other).
pub(crate) const PRODUCT_LOCKS: &str = "_product_locks";

/// The `_id` of product `p`'s lock for `lane`: for embedding it as known, or as `unknown` (not there yet).
fn product_lock(p: i32, lane: usize, unknown: bool) -> i64 {
    (i64::from(p) * 2 + i64::from(unknown)) * LANES as i64 + lane as i64
}

/// Transactions one job process may have in flight at once.
pub const LANES: usize = 4;

/// The `_truncations` document of `table` for `lane`: a batch writes its lane's, a TRUNCATE and first_load
/// write all of them.
pub(crate) fn truncation_mark(table: &str, lane: usize) -> String {
    format!("{table}|{lane}")
}

/// What became of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Committed, with this many write statements.
    Written(usize),
    /// Nothing written: first_load is loading or swapping (see [`crate::handoff`]).
    Paused(Phase),
    /// Nothing written: a new first_load epoch; checkpoints must be re-read.
    Reset,
    /// Nothing written: the transaction outgrew MongoDB's limits (its lifetime, 60 s by default, or its
    /// size); the same events in smaller batches will go through.
    TooLarge,
    /// Nothing written: a write conflict with another job's transaction. Redone by the runtime after a
    /// short random pause (a large transaction in halves, which conflict less).
    Conflict,
}

/// How far a job has applied one partition: the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

pub struct MongoSink {
    client: Client,
    db: Database,
}

impl MongoSink {
    /// Connects and checks the server answers (a one-line error naming the fix otherwise).
    pub async fn connect(args: &MongoArgs) -> Result<MongoSink> {
        if args.uri.split_whitespace().nth(1).is_some() {
            bail!(
                "--mongo-uri / CDC_MONGO_URI lists several read stores; this command works on one: give it one URI \
                 (and run it once per store)"
            );
        }
        let mut opts = ClientOptions::parse(&args.uri)
            .await
            .map_err(|e| anyhow!("--mongo-uri / CDC_MONGO_URI is not a MongoDB URI ({e})"))?;
        opts.app_name = Some("cdc-cqrs".into());
        opts.server_selection_timeout.get_or_insert(Duration::from_secs(10));
        let client = Client::with_options(opts)?;
        let db = client.database(&args.database);
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| {
            anyhow!("cannot reach MongoDB ({e}): start it (`scripts/stack up`) or point CDC_MONGO_URI at it")
        })?;
        Ok(MongoSink { client, db })
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The job's checkpoints for `topic`: partition -> next offset.
    pub async fn checkpoints(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>> {
        checkpoints(&self.db, group, topic).await
    }

    /// Creates the indexes the projections' multi-document updates need (idempotent).
    pub async fn create_indexes(&self) -> Result<()> {
        for collection in Collection::ALL {
            create_indexes(&self.db, collection, collection.name()).await?;
        }
        Ok(())
    }

    /// Projects `events` with `job` and applies the writes, moving `checkpoints` forward, atomically, in
    /// transaction lane `lane`. The projection runs inside the transaction (its reads see the transaction's
    /// snapshot) and is redone when the transaction is retried, so a write conflict with another job never
    /// leaves stale data. `epoch` is the first_load epoch the job's checkpoints belong to: nothing is written
    /// under another. With no events, only the checkpoints move (after lanes that wrote without them).
    pub async fn apply<J: Job>(
        &self,
        job: &J,
        events: &[Event<J::Row>],
        lane: usize,
        group: &str,
        checkpoints: &[Checkpoint],
        epoch: i64,
    ) -> Result<Applied> {
        let checkpoint_updates: Vec<Document> = checkpoints
            .iter()
            .map(|c| {
                doc! {
                    "q": { "_id": format!("{group}|{}|{}", c.topic, c.partition) },
                    "u": {
                        "$max": { "next_offset": c.next_offset },
                        "$set": { "group": group, "topic": &c.topic, "partition": c.partition },
                    },
                    "upsert": true,
                }
            })
            .collect();
        let mut session = self.client.start_session().await.context("starting a MongoDB session")?;
        loop {
            let attempt = std::time::Instant::now();
            session.start_transaction().await?;
            let result = async {
                let handoff = match handoff::gate(&self.db, &mut session, epoch).await? {
                    Gate::Open(handoff) => handoff,
                    Gate::Closed(phase) => return Ok(Applied::Paused(phase)),
                    Gate::Reset => return Ok(Applied::Reset),
                };
                let started = std::time::Instant::now();
                let events = self.admissible::<J>(&mut session, events, lane, &handoff).await?;
                let writes = if events.is_empty() {
                    Vec::new()
                } else {
                    job.project(&events, &mut Txn { db: &self.db, session: &mut session, lane }).await?
                };
                let projected_ms = started.elapsed().as_millis() as u64;
                let count = writes.len();
                if !checkpoint_updates.is_empty() {
                    update(&self.db, &mut session, CHECKPOINTS, &checkpoint_updates).await?;
                }
                // A document a transaction has written is its own until the commit, and another job's write
                // to it in the meantime aborts one of the two: the documents the jobs share most (orders, a
                // new one written by the orders and order_details jobs within milliseconds) go last.
                let mut by_collection: BTreeMap<(bool, Collection), Vec<Document>> = BTreeMap::new();
                for w in writes {
                    by_collection
                        .entry((w.collection == Collection::Orders, w.collection))
                        .or_default()
                        .push(w.statement);
                }
                // (collection, statements, milliseconds): what a slow batch spent its time on.
                let mut timings = Vec::new();
                for ((_, collection), statements) in &by_collection {
                    let t = std::time::Instant::now();
                    update(&self.db, &mut session, collection.name(), statements).await?;
                    timings.push((collection.name(), statements.len(), t.elapsed().as_millis() as u64));
                }
                tracing::debug!(job = J::TABLE, lane, events = events.len(), projected_ms, ?timings, "batch written");
                Ok::<_, anyhow::Error>(Applied::Written(count))
            }
            .await;
            match result {
                Ok(Applied::Written(n)) => match commit(&mut session).await {
                    Ok(()) => return Ok(Applied::Written(n)),
                    Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) => continue,
                    Err(e) => return Err(e).context("committing the batch"),
                },
                Ok(stopped) => {
                    let _ = session.abort_transaction().await;
                    return Ok(stopped);
                }
                Err(e) => {
                    let _ = session.abort_transaction().await;
                    // The server killed a transaction that ran too long (it then reports the transaction as
                    // gone, a transient error) or grew too large: smaller batches, not the same again.
                    if is_too_large(&e) || (is_transient(&e) && attempt.elapsed() > TOO_LONG) {
                        tracing::warn!(job = J::TABLE, events = events.len(), error = %format!("{e:#}"), "batch too large for one transaction");
                        return Ok(Applied::TooLarge);
                    }
                    // A write conflict with another job's transaction on the same document: redo it.
                    if is_transient(&e) {
                        tracing::debug!(job = J::TABLE, events = events.len(), "write conflict with another job");
                        return Ok(Applied::Conflict);
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl MongoSink {
    /// The batch's events that first_load's snapshot does not hold and that are newer than the table's
    /// last TRUNCATE (older ones describe rows it removed), and the table's truncation watermark moved to
    /// the batch's newest TRUNCATE. Every batch writes its lane's watermark document and a TRUNCATE writes
    /// every lane's, so a batch serializes with any TRUNCATE of its table: an older insert from another
    /// partition cannot slip in after a TRUNCATE that was applied concurrently (and first_load's phase
    /// changes conflict with every batch, see [`crate::handoff`]).
    async fn admissible<'e, J: Job>(
        &self,
        session: &mut ClientSession,
        events: &'e [Event<J::Row>],
        lane: usize,
        handoff: &Handoff,
    ) -> Result<std::borrow::Cow<'e, [Event<J::Row>]>> {
        let marks = self.db.collection::<Document>(TRUNCATIONS);
        let ids: Vec<String> = (0..LANES).map(|l| truncation_mark(J::TABLE, l)).collect();
        let mut cursor =
            marks.find(doc! { "_id": { "$in": &ids } }).session(&mut *session).await.map_err(anyhow::Error::new)?;
        let mut mark = -1;
        while let Some(d) = cursor.next(&mut *session).await {
            mark = mark.max(d.map_err(anyhow::Error::new)?.get_i64("lsn").unwrap_or(-1));
        }
        let admissible = |e: &Event<J::Row>| e.source().is_none_or(|s| s.lsn as i64 > mark && !handoff.loaded(s.tx_id));
        let newest_truncate = events
            .iter()
            .filter(|e| admissible(e))
            .filter_map(|e| if let Event::Truncate { source } = e { Some(source.lsn as i64) } else { None })
            .max()
            .unwrap_or(-1);
        let statements: Vec<Document> = ids
            .iter()
            .enumerate()
            .filter(|&(l, _)| newest_truncate >= 0 || l == lane)
            .map(|(_, id)| {
                doc! {
                    "q": { "_id": id },
                    "u": { "$max": { "lsn": newest_truncate }, "$inc": { "batches": 1_i64 } },
                    "upsert": true,
                }
            })
            .collect();
        update(&self.db, session, TRUNCATIONS, &statements).await?;
        Ok(if events.iter().all(admissible) {
            std::borrow::Cow::Borrowed(events)
        } else {
            std::borrow::Cow::Owned(events.iter().filter(|e| admissible(e)).cloned().collect())
        })
    }
}

/// What a projection may do inside its batch's transaction besides returning writes: read, and take the
/// product locks that serialize embedding a product with changing it.
pub struct Txn<'a> {
    db: &'a Database,
    session: &'a mut ClientSession,
    /// The transaction's lane (below [`LANES`]): which of a lock's per-lane documents it writes.
    lane: usize,
}

impl Txn<'_> {
    /// Locks for embedding these products' name and price in order lines: `known` are products the
    /// transaction read, `unknown` products it did not find; both locks of this lane only. Conflicts with
    /// [`Txn::lock_changed_products`] of the same products, never with other lanes.
    pub async fn lock_embedded_products(&mut self, known: &[i32], unknown: &[i32]) -> Result<()> {
        let lane = self.lane;
        let ids = known
            .iter()
            .map(|&p| product_lock(p, lane, false))
            .chain(unknown.iter().map(|&p| product_lock(p, lane, true)));
        self.take_locks(ids).await
    }

    /// Locks for changing the name or price of `changed` products and for the first appearance of `new`
    /// ones, in every lane: an embedding transaction running at the same time conflicts with this one, and
    /// whichever is redone sees the other's writes. (Two locks per lane and product, so that a stock change
    /// or a price change, the usual product changes, conflict with no embedding of a new product.)
    pub async fn lock_changed_products(&mut self, changed: &[i32], new: &[i32]) -> Result<()> {
        let every_lane = |unknown| move |&p: &i32| (0..LANES).map(move |lane| product_lock(p, lane, unknown));
        let ids = changed.iter().flat_map(every_lane(false)).chain(new.iter().flat_map(every_lane(true)));
        self.take_locks(ids).await
    }

    async fn take_locks(&mut self, ids: impl Iterator<Item = i64>) -> Result<()> {
        let statements: Vec<Document> =
            ids.map(|id| doc! { "q": { "_id": id }, "u": { "$inc": { "n": 1_i64 } }, "upsert": true }).collect();
        if statements.is_empty() {
            return Ok(());
        }
        update(self.db, self.session, PRODUCT_LOCKS, &statements).await
    }

    /// Which of `ids` (sorted) some document of `collection` holds in `field` (an indexed field): where a
    /// change must be fanned out to.
    pub async fn present(&mut self, collection: Collection, field: &str, ids: &[i32]) -> Result<HashSet<i32>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let values = self
            .db
            .collection::<Document>(collection.name())
            .distinct(field, doc! { field: { "$in": ids } })
            .session(&mut *self.session)
            .await
            .map_err(anyhow::Error::new)?;
        Ok(values.iter().filter_map(|v| v.as_i32()).filter(|id| ids.binary_search(id).is_ok()).collect())
    }

    /// The documents of `collection` with these `_id`s (tombstones included), only the fields of
    /// `projection` (e.g. `{name: 1}`).
    pub async fn fields(
        &mut self,
        collection: Collection,
        ids: &[i32],
        projection: Document,
    ) -> Result<HashMap<i32, Document>> {
        self.find(collection, ids, Some(projection)).await
    }

    /// The version (`_v`) of the documents of `collection` with these `_id`s that have one.
    pub async fn versions(&mut self, collection: Collection, ids: &[i32]) -> Result<HashMap<i32, i64>> {
        let found = self.find(collection, ids, Some(doc! { "_v": 1 })).await?;
        Ok(found.into_iter().filter_map(|(id, d)| d.get_i64("_v").ok().map(|v| (id, v))).collect())
    }

    async fn find(
        &mut self,
        collection: Collection,
        ids: &[i32],
        projection: Option<Document>,
    ) -> Result<HashMap<i32, Document>> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let mut cursor = self
            .db
            .collection::<Document>(collection.name())
            .find(doc! { "_id": { "$in": ids } })
            .projection(projection.unwrap_or_default())
            .session(&mut *self.session)
            .await
            .map_err(anyhow::Error::new)?;
        while let Some(d) = cursor.next(&mut *self.session).await {
            let d = d.map_err(anyhow::Error::new)?;
            if let Ok(id) = d.get_i32("_id") {
                out.insert(id, d);
            }
        }
        Ok(out)
    }
}

/// Creates `collection`'s indexes on the MongoDB collection `name` (a rebuild's shadow has another name).
pub async fn create_indexes(db: &Database, collection: Collection, name: &str) -> Result<()> {
    let indexes: Vec<IndexModel> =
        collection.indexes().into_iter().map(|keys| IndexModel::builder().keys(keys).build()).collect();
    if !indexes.is_empty() {
        db.collection::<Document>(name)
            .create_indexes(indexes)
            .await
            .with_context(|| format!("creating the indexes of {name}"))?;
    }
    Ok(())
}

/// A job's checkpoints for `topic` in the read store `db`: partition -> next offset.
pub async fn checkpoints(db: &Database, group: &str, topic: &str) -> Result<HashMap<i32, i64>> {
    let mut cursor = db
        .collection::<Document>(CHECKPOINTS)
        .find(doc! { "group": group, "topic": topic })
        .await
        .context("reading checkpoints")?;
    let mut out = HashMap::new();
    while cursor.advance().await? {
        let d = cursor.deserialize_current()?;
        out.insert(d.get_i32("partition")?, d.get_i64("next_offset")?);
    }
    Ok(out)
}

/// A transaction that failed after this long is split rather than retried (MongoDB's default lifetime
/// limit is 60 s).
const TOO_LONG: Duration = Duration::from_secs(30);

/// Whether MongoDB refused a transaction for its length or size (TransactionTooLarge,
/// TransactionExceededLifetimeLimitSeconds, BSONObjectTooLarge).
fn is_too_large(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<mongodb::error::Error>())
        .any(|me| matches!(&*me.kind, mongodb::error::ErrorKind::Command(c) if [257, 290, 10334].contains(&c.code)))
}

/// Whether a transaction failed in a way MongoDB says to retry (a write conflict, an election).
pub(crate) fn is_transient(e: &anyhow::Error) -> bool {
    e.downcast_ref::<mongodb::error::Error>().is_some_and(|me| me.contains_label(TRANSIENT_TRANSACTION_ERROR))
}

/// Commits, retrying while the outcome is unknown (commit is idempotent).
pub(crate) async fn commit(session: &mut ClientSession) -> mongodb::error::Result<()> {
    loop {
        match session.commit_transaction().await {
            Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => continue,
            other => return other,
        }
    }
}

/// Runs `update` commands for `statements` in the session's transaction; any write error fails the batch.
async fn update(db: &Database, session: &mut ClientSession, collection: &str, statements: &[Document]) -> Result<()> {
    for chunk in statements.chunks(STATEMENTS_PER_COMMAND) {
        // Encoded once, straight into the command (a `doc!` command would copy every statement first).
        let mut updates = RawArrayBuf::new();
        for statement in chunk {
            updates.push(RawDocumentBuf::try_from(statement).context("encoding an update statement")?);
        }
        let reply = db
            .run_raw_command(rawdoc! { "update": collection, "updates": updates, "ordered": true })
            .session(&mut *session)
            .await
            .map_err(anyhow::Error::new)?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && let Some(first) = errors.first()
        {
            bail!("MongoDB refused an update of {collection}: {first}");
        }
    }
    Ok(())
}
