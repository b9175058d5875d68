//! The MongoDB sink: applies a batch's writes, then advances the job's checkpoints.
//!
//! Every write a projection makes is guarded by the source position of what it writes (see
//! [`crate::projection`]), so writes of one document commute and a replay is a no-op: the writes go to MongoDB
//! as plain single-document updates (and inserts of documents that do not exist yet, which a replay finds
//! and guards), outside any transaction, and the checkpoints move only after them. A crash
//! in between replays writes that change nothing. Plain writes never abort each other: the three jobs, which
//! share order documents, used to write them in transactions that conflicted more the more data there was (at
//! 1,000,000 records order_details committed 10 batches in 30 s).
//!
//! What still needs a transaction is serializing a batch with first_load's phase changes and with a TRUNCATE
//! of its table. A batch opens one, checks the handoff gate, writes its lane's truncation watermark in it and
//! holds it while the writes go out, then writes the checkpoints in it and commits: a phase change or a
//! TRUNCATE writes every lane's watermark, so it cannot commit while a batch holds one, and a batch that began
//! before one committed conflicts on its watermark before it writes anything. The projection's reads start
//! at once, beside the transaction's: only its writes wait for the lane (a read that a TRUNCATE overtakes
//! is one more stale read, which the guards and the re-checks are there for).
//!
//! A job may have up to [`LANES`] batches in flight at once (the runtime splits a large batch by key into
//! lanes); each lane has its own watermark document, so lanes never conflict with each other.
//! A server without replica set or an unreachable one is an error the runtime retries with backoff.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bson::oid::ObjectId;
use bson::{Document, RawArrayBuf, RawBsonRef, RawDocument, RawDocumentBuf, doc, rawdoc};
use mongodb::error::{TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::ClientOptions;
use mongodb::{Client, ClientSession, Database, IndexModel};
use tokio::sync::watch;

use crate::config::{KafkaArgs, MongoArgs, job_group};
use crate::envelope::{Event, Place};
use crate::handoff::{self, Gate, Handoff, Phase};
use crate::kafka::Offsets;
use crate::projection::{Collection, Write};
use crate::runtime::Job;

/// `update` commands hold at most this many statements (the server's limit is 100,000).
const STATEMENTS_PER_COMMAND: usize = 10_000;
/// Write commands hold at most this many bytes of statements, however few: the server refuses a command over
/// 16 MB (an order's statement carries all its lines).
const BYTES_PER_COMMAND: usize = 8 << 20;
pub(crate) const CHECKPOINTS: &str = "_checkpoints";
pub(crate) const TRUNCATIONS: &str = "_truncations";
/// The field of a `_truncations` document that holds the store's compaction horizon (see
/// [`crate::compaction`]): changes at or below it are dropped like those a TRUNCATE removed.
pub(crate) const HORIZON: &str = "horizon";

/// Batches one job process may have in flight at once.
pub const LANES: usize = 4;

/// The `_truncations` document of `table` for `lane`: a batch writes its lane's, a TRUNCATE and first_load
/// write all of them.
pub(crate) fn truncation_mark(table: &str, lane: usize) -> String {
    format!("{table}|{lane}")
}

/// What became of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Written, with this many write statements, of which `raced` were redone after another writer changed
    /// the document between the projection's read and its write.
    Written { statements: usize, raced: usize },
    /// Nothing written: first_load is loading or swapping (see [`crate::handoff`]).
    Paused(Phase),
    /// Nothing written: a new first_load epoch; checkpoints must be re-read.
    Reset,
    /// Checkpoints not moved: the batch's transaction outlived MongoDB's limit (60 s by default); the same
    /// events in smaller batches will go through.
    TooLarge,
    /// Nothing written: the batch's transaction conflicted on its truncation watermark (a TRUNCATE, a phase
    /// change of first_load, another process of the job). Redone by the runtime after a short random pause.
    Conflict,
    /// Checkpoints not moved: MongoDB refused a write for what it holds (see [`Refused`]), with this reason.
    /// Written again it would be refused again: the runtime finds the change that made it and dead-letters it.
    Refused(String),
}

/// A lane's `_truncations` document as a batch took it: the table's newest TRUNCATE, the store's compaction
/// horizon, and the token of the last first_load phase change.
struct LaneMark {
    lsn: i64,
    horizon: i64,
    token: Option<ObjectId>,
}

/// How far a job has applied one partition: the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Where a batch (or a piece of one) stands in its topic.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The checkpoints before the batch (partition -> next offset): a change below them was written by a
    /// batch that committed, every write of it made; at or past them, by this batch or by a try of it that
    /// did not commit (a crash, a failed write).
    pub applied: &'a HashMap<i32, i64>,
    /// The checkpoints this piece moves, with its commit (none for all but a batch's last piece).
    pub moves: &'a [Checkpoint],
}

pub struct MongoSink {
    client: Client,
    db: Database,
    /// The handoff state last read as `done`, with the token of its lane mark.
    done: Mutex<Option<(Option<ObjectId>, Arc<Handoff>)>>,
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
        Ok(MongoSink { client, db, done: Mutex::new(None) })
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

    /// Applies `events` with `job` and moves the checkpoints forward (`progress.moves`), in transaction lane
    /// `lane`: the writes go out while the lane's transaction holds its truncation watermark, the checkpoints
    /// are committed with it. `epoch` is the first_load epoch the job's checkpoints belong to: nothing is
    /// written under another. With no events, only the checkpoints move (after lanes that wrote without them).
    pub async fn apply<J: Job>(
        &self,
        job: &J,
        events: &[Event<J::Row>],
        lane: usize,
        group: &str,
        progress: Progress<'_>,
        epoch: i64,
    ) -> Result<Applied> {
        let checkpoint_updates: Vec<RawDocumentBuf> = progress
            .moves
            .iter()
            .map(|c| {
                rawdoc! {
                    "q": { "_id": format!("{group}|{}|{}", c.topic, c.partition) },
                    "u": {
                        "$max": { "next_offset": c.next_offset },
                        "$set": { "group": group, "topic": c.topic.as_str(), "partition": c.partition },
                    },
                    "upsert": true,
                }
            })
            .collect();
        let mut session = self.client.start_session().await.context("starting a MongoDB session")?;
        let attempt = std::time::Instant::now();
        session.start_transaction().await?;
        // The token under which `done` was known before this batch began (see `handoff`).
        let known_done = self.done.lock().expect("handoff cache").as_ref().map(|(token, _)| *token);
        let result = async {
            let (open, writable) = watch::channel(false);
            let store = ReadModels::new(&self.db, writable, progress.applied);
            // The transaction takes the lane, checks the handoff and filters the events while the projection
            // already makes its first reads (outside it): a live batch saves a round trip. Its writes wait
            // for the gate, which opens only when its reads were made under the state the lane shows: the
            // lane carries the token `done` was known under before they began (no load or swap since: only
            // a new token leaves `done`), and every event is admitted as is. Else they are called off
            // (nothing was written) and the admitted events are projected again below.
            let gate = async {
                let open = open; // the gate's own: dropped unopened, it calls off the writes waiting on it
                let mark = self.take_lane::<J>(&mut session, lane).await?;
                let unchanged = known_done == Some(mark.token);
                let handoff = match handoff::gate(self.handoff(&mut session, mark.token).await?, epoch) {
                    Gate::Open(handoff) => handoff,
                    Gate::Closed(phase) => return Ok(Err(Applied::Paused(phase))),
                    Gate::Reset => return Ok(Err(Applied::Reset)),
                };
                if let Some(refusal) = redriven_past_horizon(events, &mark, &handoff) {
                    return Ok(Err(Applied::Refused(refusal)));
                }
                let admitted = self.admissible::<J>(&mut session, events, mark.lsn.max(mark.horizon), &handoff).await?;
                let speculation_holds = unchanged && matches!(admitted, Cow::Borrowed(_));
                if speculation_holds {
                    let _ = open.send(true);
                    // The checkpoints go out while the projection writes: they take effect only with the
                    // commit, which waits for both.
                    self.write_checkpoints(&mut session, &checkpoint_updates).await?;
                }
                Ok::<_, anyhow::Error>(Ok((admitted, speculation_holds)))
            };
            let (gated, speculated) = tokio::join!(gate, project(job, events, lane, &store));
            let written = match gated? {
                Err(stopped) => return Ok(stopped),
                Ok((_, true)) => speculated.map(|()| store)?,
                Ok((admitted, false)) => {
                    tracing::debug!(
                        job = J::TABLE,
                        lane,
                        events = events.len(),
                        admitted = admitted.len(),
                        "the projection's early reads were called off; projecting again"
                    );
                    let (_open, writable) = watch::channel(true);
                    let store = ReadModels::new(&self.db, writable, progress.applied);
                    let (projected, checkpointed) = tokio::join!(
                        project(job, &admitted, lane, &store),
                        self.write_checkpoints(&mut session, &checkpoint_updates),
                    );
                    projected.and(checkpointed).map(|()| store)?
                }
            };
            let (statements, raced) = (written.statements.into_inner(), written.raced.into_inner());
            Ok::<_, anyhow::Error>(Applied::Written { statements, raced })
        }
        .await;
        match result {
            Ok(written @ Applied::Written { .. }) => match commit(&mut session).await {
                Ok(()) => Ok(written),
                Err(e) => self.failed(anyhow::Error::new(e).context("committing the batch"), attempt, events.len()),
            },
            Ok(stopped) => {
                let _ = session.abort_transaction().await;
                Ok(stopped)
            }
            Err(e) => {
                let _ = session.abort_transaction().await;
                self.failed(e, attempt, events.len())
            }
        }
    }

    /// What a batch whose transaction failed becomes: the writes it made stand (they are idempotent), its
    /// checkpoints did not move.
    fn failed(&self, e: anyhow::Error, attempt: std::time::Instant, events: usize) -> Result<Applied> {
        if refused_for_the_data(&e) {
            let reason = format!("{e:#}");
            tracing::debug!(events, %reason, "MongoDB refused a write of the batch");
            return Ok(Applied::Refused(reason));
        }
        // The server killed a transaction that ran too long (it then reports it as gone, a transient error):
        // smaller batches, not the same again.
        if is_transient(&e) && attempt.elapsed() > TOO_LONG {
            tracing::warn!(events, error = %format!("{e:#}"), "batch too long for one transaction");
            return Ok(Applied::TooLarge);
        }
        // A conflict on the truncation watermark: a TRUNCATE or a phase change committed meanwhile.
        if is_transient(&e) {
            tracing::debug!(events, "write conflict on the truncation watermark");
            return Ok(Applied::Conflict);
        }
        Err(e)
    }
}

impl MongoSink {
    /// Moves the batch's checkpoints in its transaction (they take effect with its commit).
    async fn write_checkpoints(&self, session: &mut ClientSession, updates: &[RawDocumentBuf]) -> Result<()> {
        if !updates.is_empty() {
            update(&self.db, Some(session), CHECKPOINTS, updates.to_vec(), true).await?;
        }
        Ok(())
    }

    /// Takes the lane: its `_truncations` document, written first in the batch's transaction so that a
    /// TRUNCATE or a first_load phase change committed meanwhile conflicts with the batch (both write every
    /// lane's). A TRUNCATE writes every lane's document, so the lane's own holds the table's newest one.
    async fn take_lane<J: Job>(&self, session: &mut ClientSession, lane: usize) -> Result<LaneMark> {
        let own = self
            .db
            .collection::<RawDocumentBuf>(TRUNCATIONS)
            .find_one_and_update(doc! { "_id": truncation_mark(J::TABLE, lane) }, doc! { "$inc": { "batches": 1_i64 } })
            .upsert(true)
            .session(session)
            .await
            .map_err(anyhow::Error::new)?;
        Ok(LaneMark {
            lsn: own.as_ref().and_then(|d| d.get_i64("lsn").ok()).unwrap_or(-1),
            horizon: own.as_ref().and_then(|d| d.get_i64(HORIZON).ok()).unwrap_or(-1),
            token: own.as_ref().and_then(|d| d.get_object_id(handoff::HANDOFF_TOKEN).ok()),
        })
    }

    /// The handoff state in the batch's transaction, whose lane mark carries `token`: the `done` state last
    /// read under the same token (only a new token can leave `done`, see [`crate::handoff`]), or read now.
    async fn handoff(&self, session: &mut ClientSession, token: Option<ObjectId>) -> Result<Arc<Handoff>> {
        if let Some((known, done)) = &*self.done.lock().expect("handoff cache") {
            if *known == token {
                return Ok(done.clone());
            }
        }
        let now = Arc::new(handoff::read(&self.db, Some(session)).await?);
        if now.phase == Phase::Done {
            // Lanes may race to store theirs; each pair was read in one transaction, so any is true.
            *self.done.lock().expect("handoff cache") = Some((token, now.clone()));
        }
        Ok(now)
    }

    /// The batch's events that first_load's snapshot does not hold and that are newer than the table's
    /// last TRUNCATE and the store's compaction horizon (`mark`, the later of the two; older ones describe rows
    /// the TRUNCATE removed, or were applied before the horizon), and the table's truncation watermark
    /// moved to the batch's newest TRUNCATE. Every batch writes its lane's watermark document and a TRUNCATE
    /// writes every lane's, so a batch serializes with any TRUNCATE of its table: an older insert from
    /// another partition cannot slip in after a TRUNCATE that was applied concurrently (and first_load's
    /// phase changes conflict with every batch, see [`crate::handoff`]).
    async fn admissible<'e, J: Job>(
        &self,
        session: &mut ClientSession,
        events: &'e [Event<J::Row>],
        mark: i64,
        handoff: &Handoff,
    ) -> Result<std::borrow::Cow<'e, [Event<J::Row>]>> {
        let admissible = |e: &Event<J::Row>| e.source().is_none_or(|s| s.lsn as i64 > mark && !handoff.loaded(s.tx_id));
        let newest_truncate = events
            .iter()
            .filter(|e| admissible(e))
            .filter_map(|e| if let Event::Truncate { source } = e { Some(source.lsn as i64) } else { None })
            .max();
        if let Some(newest_truncate) = newest_truncate {
            let statements: Vec<RawDocumentBuf> = (0..LANES)
                .map(|l| {
                    rawdoc! {
                        "q": { "_id": truncation_mark(J::TABLE, l) },
                        "u": { "$max": { "lsn": newest_truncate } },
                        "upsert": true,
                    }
                })
                .collect();
            update(&self.db, Some(session), TRUNCATIONS, statements, true).await?;
        }
        Ok(if events.iter().all(admissible) {
            std::borrow::Cow::Borrowed(events)
        } else {
            std::borrow::Cow::Owned(events.iter().filter(|e| admissible(e)).cloned().collect())
        })
    }
}

/// Why a change sent back from the dead-letter topic cannot be applied, if one in `events` is from before the
/// store's compaction horizon (and after its table's last TRUNCATE, which removed the row either way): the
/// deletion marks that would guard it may be gone, so it could bring back a row deleted since. Refused, it is
/// dead-lettered again with this reason, which names the way to bring the store back to the source.
fn redriven_past_horizon<R>(events: &[Event<R>], mark: &LaneMark, handoff: &Handoff) -> Option<String> {
    let source = events.iter().filter_map(Event::source).find(|s| {
        let lsn = s.lsn as i64;
        s.redriven && lsn <= mark.horizon && lsn > mark.lsn && !handoff.loaded(s.tx_id)
    })?;
    Some(format!(
        "a change sent back from the dead-letter topic from before this store's compaction horizon ({} <= {}): its \
         row's deletion marks may be gone, so it is not applied; `first_load --rebuild` brings the store back to \
         PostgreSQL",
        source.lsn, mark.horizon
    ))
}

/// The read models as a projection sees them while it applies a batch: reads of the latest committed
/// documents, and writes outside any transaction.
///
/// Shared (`&self`): a projection may have several reads or writes in flight at once.
pub struct ReadModels<'a> {
    db: &'a Database,
    statements: AtomicUsize,
    raced: AtomicUsize,
    /// Whether the batch may write yet: its reads may start before its transaction holds the lane, its
    /// writes may not (see [`MongoSink::apply`]).
    writable: watch::Receiver<bool>,
    applied: &'a HashMap<i32, i64>,
}

impl<'a> ReadModels<'a> {
    fn new(db: &'a Database, writable: watch::Receiver<bool>, applied: &'a HashMap<i32, i64>) -> Self {
        ReadModels { db, statements: AtomicUsize::new(0), raced: AtomicUsize::new(0), writable, applied }
    }

    /// Whether the change read at `place` was written by a batch that committed, every write of it made
    /// (see [`Progress::applied`]).
    pub fn committed(&self, place: Place) -> bool {
        self.applied.get(&place.partition).is_some_and(|&next| place.offset < next)
    }

    /// Waits until the batch may write; an error if its writes were called off.
    async fn may_write(&self) -> Result<()> {
        let mut writable = self.writable.clone();
        match writable.wait_for(|&open| open).await {
            Ok(_) => Ok(()),
            Err(_) => bail!("the batch's writes were called off (its transaction did not admit them as they are)"),
        }
    }

    /// Applies `writes`, one command per collection, the collections at once (guarded writes commute, so
    /// their order does not matter). Any refused statement fails the batch, once every other has run: a
    /// change MongoDB refuses one write of (a fan-out to an order at 16 MB) still makes its others.
    pub async fn write(&self, writes: Vec<Write>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.may_write().await?;
        let mut by_collection: BTreeMap<Collection, Vec<RawDocumentBuf>> = BTreeMap::new();
        for w in writes {
            by_collection.entry(w.collection).or_default().push(w.statement);
        }
        // Every collection's command runs to its end even when another's fails: a change MongoDB refuses in one
        // collection (an order at 16 MB) is dead-lettered whole, and its statements in the others must have
        // been applied, not dropped with a future cancelled half way (its product copies in order_details).
        let written = futures::future::join_all(by_collection.into_iter().map(|(collection, statements)| {
            self.statements.fetch_add(statements.len(), Ordering::Relaxed);
            async move {
                // Kept aside: a refused one is run again document by document (see `one_by_one`).
                let multi: Vec<(usize, RawDocumentBuf)> =
                    statements.iter().enumerate().filter(|(_, s)| is_multi(s)).map(|(i, s)| (i, s.clone())).collect();
                let lost = match update(self.db, None, collection.name(), statements, false).await {
                    Err(e) => return Err(self.one_by_one(collection, &multi, e).await),
                    Ok(lost) => lost,
                };
                if let Some(&first) = lost.first() {
                    bail!(
                        "{} writes of {} collided with another writer's (the first: statement {first}); redoing the batch",
                        lost.len(),
                        collection.name()
                    );
                }
                Ok(())
            }
        }))
        .await;
        written.into_iter().collect()
    }

    /// `refusal` of a statement that changes several documents by `_id` (a fan-out of copies), after the
    /// statement has been run again for each of them alone: MongoDB stops a multi-document update at the first
    /// document it refuses (an order at 16 MB), which would leave the documents after it without their copy.
    async fn one_by_one(
        &self,
        collection: Collection,
        multi: &[(usize, RawDocumentBuf)],
        refusal: anyhow::Error,
    ) -> anyhow::Error {
        let refused = refusal.downcast_ref::<Refused>().map(|r| r.index);
        let statement = multi.iter().find(|(i, _)| Some(*i) == refused).map(|(_, s)| s);
        let singles = statement.and_then(|s| per_document(s));
        if let Some(singles) = singles {
            tracing::debug!(collection = collection.name(), documents = singles.len(), "a refused fan-out, one by one");
            // Their own refusals are that one again: the error reported is the first.
            if let Err(e) = update(self.db, None, collection.name(), singles, false).await
                && !refused_for_the_data(&e)
            {
                return e;
            }
        }
        refusal
    }

    /// Applies conditional upserts of `collection` ([`crate::projection::set_if_unchanged`]), all of them
    /// even when some fail, and returns the positions of those that lost a race: the document changed since
    /// it was read, and the statement failed its check ([`CHANGED_SINCE_READ`]) or collided with it.
    pub async fn write_if_unchanged(
        &self,
        collection: Collection,
        statements: Vec<RawDocumentBuf>,
    ) -> Result<Vec<usize>> {
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        self.may_write().await?;
        let count = statements.len();
        let lost = update(self.db, None, collection.name(), statements, false).await?;
        self.statements.fetch_add(count - lost.len(), Ordering::Relaxed);
        self.raced.fetch_add(lost.len(), Ordering::Relaxed);
        Ok(lost)
    }

    /// Applies `writes` and inserts the `new` documents of `collection` (which [`ReadModels::existing`]
    /// found missing) at once; a document whose `_id` was taken meanwhile gets the write `guarded` makes
    /// from its key instead (its projection's guarded write). Returns the keys of those.
    pub async fn write_or_insert<K: Copy, W: IntoIterator<Item = Write>>(
        &self,
        writes: Vec<Write>,
        collection: Collection,
        new: Vec<(K, RawDocumentBuf)>,
        guarded: impl Fn(&K) -> W,
    ) -> Result<Vec<K>> {
        let (keys, documents): (Vec<K>, Vec<RawDocumentBuf>) = new.into_iter().unzip();
        // Both to their end, as in `write`.
        let (taken, written) = tokio::join!(self.insert(collection, documents), self.write(writes));
        let taken = taken?;
        written?;
        let taken: Vec<K> = taken.into_iter().map(|i| keys[i]).collect();
        self.write(taken.iter().flat_map(&guarded).collect()).await?;
        Ok(taken)
    }

    /// Inserts `documents`, which the projection found missing (see [`ReadModels::existing`]), each on its
    /// own, and returns the positions of those whose `_id` was taken meanwhile (another writer got there
    /// first): they inserted nothing and need the projection's guarded write. An insert costs MongoDB a
    /// third of an upsert's CPU (measured: 10-14 against 32-36 us a document), most of a catch-up's writes.
    pub async fn insert(&self, collection: Collection, documents: Vec<RawDocumentBuf>) -> Result<Vec<usize>> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        self.may_write().await?;
        let count = documents.len();
        let taken = insert(self.db, collection.name(), documents).await?;
        self.statements.fetch_add(count - taken.len(), Ordering::Relaxed);
        self.raced.fetch_add(taken.len(), Ordering::Relaxed);
        Ok(taken)
    }

    /// Which of `ids` have a document in `collection`, tombstones included: those a projection writes with
    /// a guarded update, the others it inserts. Answered from the `_id` index alone (~1 us an id).
    pub async fn existing(&self, collection: Collection, ids: &[i32]) -> Result<HashSet<i32>> {
        Ok(self.fields(collection, ids, doc! { "_id": 1 }).await?.into_keys().collect())
    }

    /// The ids of the lines embedded in each of orders `ids` that has any: the `order_details` documents an
    /// order's change must be fanned out to (each is written before its line).
    pub async fn line_ids(&self, ids: &[i32]) -> Result<HashMap<i32, Vec<i32>>> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let mut cursor = self
            .db
            .collection::<RawDocumentBuf>(Collection::Orders.name())
            .find(doc! { "_id": { "$in": ids }, "lines.0": { "$exists": true } })
            .projection(doc! { "lines.order_detail_id": 1 })
            .await
            .map_err(anyhow::Error::new)?;
        while cursor.advance().await? {
            let d = cursor.current();
            let (Ok(id), Ok(lines)) = (d.get_i32("_id"), d.get_array("lines")) else { continue };
            let lines = lines.into_iter().filter_map(|l| l.ok()?.as_document()?.get_i32("order_detail_id").ok());
            out.insert(id, lines.collect());
        }
        Ok(out)
    }

    /// The orders whose lines hold each of products `ids` (sorted), by product, found through the
    /// `order_details` documents (each line has one, written before the line): where a product's change
    /// must be fanned out to. Answered from the `(product_id, order_id)` index alone.
    pub async fn holders(&self, ids: &[i32]) -> Result<HashMap<i32, Vec<i32>>> {
        let mut out: HashMap<i32, Vec<i32>> = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let mut cursor = self
            .db
            .collection::<RawDocumentBuf>(Collection::OrderDetails.name())
            .find(doc! { "product_id": { "$in": ids } })
            .projection(doc! { "_id": 0, "product_id": 1, "order_id": 1 })
            .await
            .map_err(anyhow::Error::new)?;
        while cursor.advance().await? {
            let d = cursor.current();
            if let (Ok(product), Ok(order)) = (d.get_i32("product_id"), d.get_i32("order_id")) {
                out.entry(product).or_default().push(order);
            }
        }
        for orders in out.values_mut() {
            orders.sort_unstable();
            orders.dedup();
        }
        Ok(out)
    }

    /// The documents of `collection` with these `_id`s (tombstones included), only the fields of
    /// `projection` (e.g. `{name: 1}`). Kept as BSON bytes: order_details reads thousands of orders with
    /// their lines per batch, and as `Document` trees they were a catch-up's largest allocation.
    pub async fn fields(
        &self,
        collection: Collection,
        ids: &[i32],
        projection: Document,
    ) -> Result<HashMap<i32, RawDocumentBuf>> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let mut cursor = self
            .db
            .collection::<RawDocumentBuf>(collection.name())
            .find(doc! { "_id": { "$in": ids } })
            .projection(projection)
            .await
            .map_err(anyhow::Error::new)?;
        while cursor.advance().await? {
            let d = cursor.current();
            if let Ok(id) = d.get_i32("_id") {
                out.insert(id, d.to_owned());
            }
        }
        Ok(out)
    }
}

/// Applies `events` with `job` through `store` (nothing to do without events).
async fn project<J: Job>(job: &J, events: &[Event<J::Row>], lane: usize, store: &ReadModels<'_>) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    job.apply(events, store).await?;
    tracing::debug!(
        job = J::TABLE,
        lane,
        events = events.len(),
        statements = store.statements.load(Ordering::Relaxed),
        raced = store.raced.load(Ordering::Relaxed),
        ms = started.elapsed().as_millis() as u64,
        "batch written"
    );
    Ok(())
}

/// MongoDB's error code for a failed conversion: what a write conditional on the document as read fails
/// with when it changed since ([`crate::projection::set_if_unchanged`]).
pub const CHANGED_SINCE_READ: i32 = 241;

/// MongoDB's error code for dropping an index that is not there.
const INDEX_NOT_FOUND: i32 = 27;

/// Creates `collection`'s indexes on the MongoDB collection `name` (a rebuild's shadow has another name), and
/// drops the ones it no longer has.
pub async fn create_indexes(db: &Database, collection: Collection, name: &str) -> Result<()> {
    let indexes: Vec<IndexModel> =
        collection.indexes().into_iter().map(|keys| IndexModel::builder().keys(keys).build()).collect();
    let target = db.collection::<Document>(name);
    if !indexes.is_empty() {
        target.create_indexes(indexes).await.with_context(|| format!("creating the indexes of {name}"))?;
    }
    let retired = collection.retired_indexes();
    if !retired.is_empty() {
        let existing = target.list_index_names().await.with_context(|| format!("listing the indexes of {name}"))?;
        for index in retired.iter().filter(|r| existing.iter().any(|e| e == *r)) {
            // Another job starting at the same time may have dropped it first.
            match target.drop_index(*index).await {
                Err(e) if !matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == INDEX_NOT_FOUND) => {
                    return Err(e).with_context(|| format!("dropping the retired index {index} of {name}"));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// One table's feed into a read store: its topic, and the stream job's consumer group, whose checkpoints in
/// the store tell how far it has applied the topic.
#[derive(Debug, Clone)]
pub struct Feed {
    pub collection: Collection,
    pub topic: String,
    pub group: String,
}

impl Feed {
    /// The three tables' feeds, the jobs' groups under `group_prefix`.
    pub fn all(kafka: &KafkaArgs, group_prefix: &str) -> Vec<Feed> {
        Collection::ALL
            .iter()
            .map(|&collection| Feed {
                collection,
                topic: kafka.table_topic(collection.name()),
                group: job_group(group_prefix, collection.name()),
            })
            .collect()
    }
}

/// The read store's checkpoints for `feeds`: (topic, partition) -> next offset.
pub async fn applied(db: &Database, feeds: &[Feed]) -> Result<Offsets> {
    let mut applied = Offsets::new();
    for feed in feeds {
        for (partition, next) in checkpoints(db, &feed.group, &feed.topic).await? {
            applied.insert((feed.topic.clone(), partition), next);
        }
    }
    Ok(applied)
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

/// Whether a transaction failed in a way MongoDB says to retry (a write conflict, an election).
pub(crate) fn is_transient(e: &anyhow::Error) -> bool {
    e.downcast_ref::<mongodb::error::Error>().is_some_and(|me| me.contains_label(TRANSIENT_TRANSACTION_ERROR))
}

/// A write statement MongoDB refused, with the server's error code and its account of why.
#[derive(Debug, thiserror::Error)]
#[error("MongoDB refused an {verb} of {collection}: {detail}")]
pub struct Refused {
    verb: &'static str,
    collection: String,
    code: i32,
    detail: String,
    /// The refused statement's (or document's) place among those given.
    index: usize,
}

/// Whether an update statement may change several documents.
fn is_multi(statement: &RawDocument) -> bool {
    statement.get_bool("multi").unwrap_or(false)
}

/// An update statement of several documents by `_id` (`q: {_id: {$in: [...]}, ...}`, `multi`) as one
/// statement per document; `None` for any other.
fn per_document(statement: &RawDocument) -> Option<Vec<RawDocumentBuf>> {
    if !is_multi(statement) {
        return None;
    }
    let filter = statement.get_document("q").ok()?;
    let ids = filter.get_document("_id").ok()?.get_array("$in").ok()?;
    let ids: Vec<RawBsonRef> = ids.into_iter().collect::<Result<_, _>>().ok()?;
    if ids.len() < 2 {
        return None;
    }
    let single = |id: RawBsonRef| -> Option<RawDocumentBuf> {
        let mut q = RawDocumentBuf::new();
        q.append(bson::cstr!("_id"), id);
        for field in filter {
            let (key, value) = field.ok()?;
            if key.as_str() != "_id" {
                q.append(key, value);
            }
        }
        let mut one = RawDocumentBuf::new();
        for field in statement {
            let (key, value) = field.ok()?;
            match key.as_str() {
                "q" => one.append(key, std::mem::take(&mut q)),
                "multi" => one.append(key, false),
                _ => one.append(key, value),
            }
        }
        Some(one)
    };
    ids.into_iter().map(single).collect()
}

/// Server error codes that mean a write is refused for what it holds, and would be again: a document over
/// 16 MB (10334, and 17419 for an update's result), a collection validator's refusal (121), a value or field
/// name the server does not take (2, 9, 14, 28, 52, 55, 56, 57, 66), an index key too long (17280). Any
/// other refusal (a duplicate key or a conflict: a race; a step-down, a timeout) is retried as it is.
const REFUSED_FOR_THE_DATA: [i32; 13] = [2, 9, 14, 28, 52, 55, 56, 57, 66, 121, 10334, 17280, 17419];

/// Whether `e` is MongoDB refusing a write for what it holds: a statement's error, or the whole command's
/// (a statement too large for any command).
pub(crate) fn refused_for_the_data(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let statement = cause.downcast_ref::<Refused>().map(|r| r.code);
        let command = cause.downcast_ref::<mongodb::error::Error>().and_then(|me| match me.kind.as_ref() {
            mongodb::error::ErrorKind::Command(c) => Some(c.code),
            _ => None,
        });
        statement.or(command).is_some_and(|code| REFUSED_FOR_THE_DATA.contains(&code))
    })
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

/// Runs `attempt` in a transaction of `session` and commits it, from the start again (after `pause`) whenever
/// MongoDB says the failure is transient (a write conflict: a job's batch holds a document the attempt
/// writes). `what` names the work in an error.
pub(crate) async fn in_transaction<T>(
    session: &mut ClientSession,
    what: &'static str,
    pause: Duration,
    mut attempt: impl AsyncFnMut(&mut ClientSession) -> Result<T>,
) -> Result<T> {
    loop {
        session.start_transaction().await?;
        match attempt(session).await {
            Ok(done) => match commit(session).await {
                Ok(()) => return Ok(done),
                Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) => {}
                Err(e) => return Err(e).context(what),
            },
            Err(e) => {
                let _ = session.abort_transaction().await;
                if !is_transient(&e) {
                    return Err(e).context(what);
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// Runs `update` commands for `statements`, in the session's transaction if one is given. `ordered`: any
/// write error fails the batch; unordered: every statement runs, the positions of those refused as
/// duplicate keys (a conditional upsert that lost a race) are returned, any other error fails the batch.
async fn update(
    db: &Database,
    session: Option<&mut ClientSession>,
    collection: &str,
    statements: Vec<RawDocumentBuf>,
    ordered: bool,
) -> Result<Vec<usize>> {
    run_writes(db, session, Verb::Update, collection, statements, ordered).await
}

/// Runs unordered `insert` commands for `documents`, outside any transaction: the positions of those
/// refused as duplicate keys are returned, any other error fails the batch.
async fn insert(db: &Database, collection: &str, documents: Vec<RawDocumentBuf>) -> Result<Vec<usize>> {
    run_writes(db, None, Verb::Insert, collection, documents, false).await
}

/// The write command a batch of statements or documents goes in.
#[derive(Clone, Copy)]
enum Verb {
    Update,
    Insert,
}

/// Runs `verb` commands for `items`, [`STATEMENTS_PER_COMMAND`] and [`BYTES_PER_COMMAND`] at most at a time (see
/// [`update`]).
async fn run_writes(
    db: &Database,
    mut session: Option<&mut ClientSession>,
    verb: Verb,
    collection: &str,
    items: Vec<RawDocumentBuf>,
    ordered: bool,
) -> Result<Vec<usize>> {
    const DUPLICATE_KEY: i32 = 11000;
    let (name, list) = match verb {
        Verb::Update => (bson::cstr!("update"), bson::cstr!("updates")),
        Verb::Insert => (bson::cstr!("insert"), bson::cstr!("documents")),
    };
    let mut lost = Vec::new();
    let mut items = items.into_iter().peekable();
    let mut n = 0;
    while items.peek().is_some() {
        let mut array = RawArrayBuf::new();
        let (mut count, mut bytes) = (0, 0);
        while let Some(item) = items.next_if(|item| {
            count == 0 || (count < STATEMENTS_PER_COMMAND && bytes + item.as_bytes().len() <= BYTES_PER_COMMAND)
        }) {
            count += 1;
            bytes += item.as_bytes().len();
            array.push(item);
        }
        let mut command = RawDocumentBuf::new();
        command.append(name, collection);
        command.append(list, array);
        command.append(bson::cstr!("ordered"), ordered);
        let reply = match session.as_deref_mut() {
            Some(session) => db.run_raw_command(command).session(session).await,
            None => {
                // Acknowledged once applied, not once journaled and replicated: the batch's transaction
                // commits after these writes with the default (majority, journaled) write concern, and the
                // oplog and journal are sequential, so that commit makes them durable too. Until then a
                // lost write is only a replay. One journal wait per batch instead of one per command.
                command.append(bson::cstr!("writeConcern"), rawdoc! { "w": 1 });
                db.run_raw_command(command).await
            }
        }
        .map_err(anyhow::Error::new)?;
        if let Ok(concern) = reply.get_document("writeConcernError") {
            bail!("MongoDB could not make an {} of {collection} durable: {concern}", name.as_str());
        }
        let errors = reply.get_array("writeErrors").map(|e| e.as_slice()).unwrap_or_default();
        for error in errors {
            let error = error.as_document().context("a write error that is not a document")?;
            let code = error.get_i32("code").unwrap_or_default();
            let index = error.get_i32("index").unwrap_or_default() as usize;
            if ordered || (code != DUPLICATE_KEY && code != CHANGED_SINCE_READ) {
                let detail = error.to_string();
                let (verb, collection, index) = (name.as_str(), collection.to_owned(), n + index);
                return Err(Refused { verb, collection, code, detail, index }.into());
            }
            lost.push(n + index);
        }
        n += count;
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redriven_change_from_before_the_horizon_is_refused_and_others_pass() {
        let change = |lsn: u64, redriven: bool| Event::<()>::Truncate {
            source: crate::envelope::Source { lsn, tx_id: Some(lsn), ts_ms: 0, snapshot: false, place: None, redriven },
        };
        let mark = LaneMark { lsn: 10, horizon: 100, token: None };
        let none = Handoff::none();
        // Redriven and between the last TRUNCATE and the horizon: refused, naming the way back.
        let refusal = redriven_past_horizon(&[change(200, false), change(50, true)], &mark, &none).unwrap();
        assert!(refusal.contains("compaction horizon (50 <= 100)") && refusal.contains("first_load --rebuild"));
        // Not redriven (a replay: dropped quietly), past the horizon (applied as any change), or older than
        // the TRUNCATE (its row is gone either way): not refused.
        assert_eq!(redriven_past_horizon(&[change(50, false)], &mark, &none), None);
        assert_eq!(redriven_past_horizon(&[change(101, true)], &mark, &none), None);
        assert_eq!(redriven_past_horizon(&[change(10, true)], &mark, &none), None);
        // Held by first_load's snapshot: skipped as loaded, not refused.
        let loaded =
            Handoff { snapshot: Some(handoff::Snapshot { xmin: 60, xmax: 60, xip: vec![] }), ..Handoff::none() };
        assert_eq!(redriven_past_horizon(&[change(50, true)], &mark, &loaded), None);
    }

    /// A handle on a server that is not there: the gate must decide before any write reaches one.
    async fn nowhere() -> Database {
        let opts = ClientOptions::parse("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=100").await.unwrap();
        Client::with_options(opts).unwrap().database("nowhere")
    }

    fn one_write() -> Vec<Write> {
        vec![Write::raw(Collection::Products, rawdoc! { "q": { "_id": 1 }, "u": { "$set": { "name": "x" } } })]
    }

    #[test]
    fn a_fan_out_by_ids_splits_into_one_statement_per_document() {
        let (name, price) = (bson::Bson::from("Tent"), crate::projection::decimal("19.90".parse().unwrap()));
        let [fan_out] = &crate::projection::products::lines_fan_out(7, &name, &price, 10, &[1, 2, 3])[..] else {
            panic!("one statement")
        };
        let fan_out = Document::try_from(fan_out.statement.as_ref()).unwrap();
        let singles: Vec<Document> = per_document(&crate::projection::encode(&fan_out))
            .unwrap()
            .iter()
            .map(|s| Document::try_from(s.as_ref()).unwrap())
            .collect();
        assert_eq!(singles.len(), 3);
        for (id, single) in (1..=3).zip(&singles) {
            let mut expected = fan_out.clone();
            let q = expected.get_document_mut("q").unwrap();
            q.insert("_id", id);
            expected.insert("multi", false);
            assert_eq!(single, &expected, "the same statement, for order {id} alone");
            assert_eq!(single.get_document("q").unwrap().keys().next().map(String::as_str), Some("_id"));
        }
        let one_document = doc! { "q": { "_id": { "$in": [1] } }, "u": { "$set": { "x": 1 } }, "multi": true };
        assert!(per_document(&crate::projection::encode(&one_document)).is_none());
        let by_other_key = doc! { "q": { "product_id": 7 }, "u": { "$set": { "x": 1 } }, "multi": true };
        assert!(per_document(&crate::projection::encode(&by_other_key)).is_none());
    }

    #[tokio::test]
    async fn writes_wait_for_the_gate_and_are_called_off_when_it_closes_unopened() {
        let db = nowhere().await;
        let (open, writable) = watch::channel(false);
        let none = HashMap::new();
        let store = ReadModels::new(&db, writable, &none);
        // Nothing to write: nothing to wait for.
        store.write(Vec::new()).await.unwrap();
        let mut pending = std::pin::pin!(store.write(one_write()));
        assert!(tokio::time::timeout(Duration::from_millis(300), &mut pending).await.is_err(), "wrote before the gate");
        drop(open);
        let called_off = pending.await.unwrap_err().to_string();
        assert!(called_off.contains("called off"), "{called_off}");
        assert_eq!(store.statements.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_opened_gate_lets_the_writes_go() {
        let db = nowhere().await;
        let (open, writable) = watch::channel(false);
        let none = HashMap::new();
        let store = ReadModels::new(&db, writable, &none);
        let write = store.write(one_write());
        open.send(true).unwrap();
        // It went to the server, which is not there.
        let failed = write.await.unwrap_err();
        assert!(failed.downcast_ref::<mongodb::error::Error>().is_some(), "{failed:#}");
    }

    #[test]
    fn only_a_refusal_for_the_data_is_not_retried() {
        let refusal =
            |code| Refused { verb: "update", collection: "orders".into(), code, detail: String::new(), index: 0 };
        let wrapped = anyhow::Error::new(refusal(10334)).context("writing order lines");
        assert!(refused_for_the_data(&wrapped), "a document over 16 MB, under context");
        assert!(refused_for_the_data(&refusal(121).into()), "a validator's rule");
        assert!(!refused_for_the_data(&refusal(11000).into()), "a duplicate key is a race");
        assert!(!refused_for_the_data(&refusal(11602).into()), "an election is retried");
        assert!(!refused_for_the_data(&anyhow!("server selection timed out")));
    }
}
