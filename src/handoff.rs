//! The handoff between `first_load` and the stream jobs (DESIGN.md invariant 3).
//!
//! `first_load` copies the tables as one PostgreSQL snapshot saw them and records that snapshot here. The
//! stream then skips every event whose transaction the snapshot holds (already in the loaded data) and
//! applies every other one; loaded documents carry version 0, so any applied change is newer. Commit
//! order, not WAL position, decides what a snapshot holds, hence transaction ids and not LSNs.
//!
//! The state is one MongoDB document, `_handoff {_id: "first_load"}`: an `epoch` that every load bumps,
//! a `phase` and the `snapshot`. Jobs consult it inside each batch's transaction and write nothing while a
//! load or a swap is under way. `first_load` starts a load or a swap in a transaction that also stamps
//! every table's `_truncations` documents (one per lane) with a new token, and every transaction of every
//! job writes its lane's one first: a batch that began under the old state conflicts and is redone under
//! the new one, so none can commit across a phase change. Only [`begin`] leaves [`Phase::Done`] (the
//! snapshot and the end of a load are recorded while not done), so a job that read `done` under a token
//! may trust it while its lane's mark carries the same token, and skip the read (see [`crate::sink`]).
//! A batch started under an older epoch is answered [`Gate::Reset`]: `--rebuild` moved the checkpoints
//! back to where they stood before its snapshot, and the job must re-read them and seek.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use mongodb::{ClientSession, Database};

pub const COLLECTION: &str = "_handoff";
const ID: &str = "first_load";
/// The tables whose `_truncations` documents a phase change writes.
const TABLES: [&str; 3] = ["products", "orders", "order_details"];
/// The field of a `_truncations` document that [`begin`] sets to a new token.
pub(crate) const HANDOFF_TOKEN: &str = "handoff";
/// The `_handoff` document of the first_load running on a store: its lease (first_load's `lease` module).
pub const LEASE_ID: &str = "first_load_lease";
/// A lease not renewed for this long belongs to a run that died.
pub const LEASE_EXPIRY_MS: i64 = 30_000;

/// A PostgreSQL snapshot as `pg_current_snapshot()` gives it (64-bit transaction ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    /// Transactions in progress when the snapshot was taken, sorted.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Result<Snapshot> {
        let bad = || anyhow!("not a PostgreSQL snapshot: {text:?}");
        let id = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let [xmin, xmax, list] = text.trim().splitn(3, ':').collect::<Vec<_>>()[..] else { return Err(bad()) };
        let (xmin, xmax) = (id(xmin)?, id(xmax)?);
        let mut xip = list.split(',').filter(|s| !s.is_empty()).map(id).collect::<Result<Vec<_>>>()?;
        xip.sort_unstable();
        Ok(Snapshot { xmin, xmax, xip })
    }

    /// Whether the committed transaction `tx_id` is in the snapshot. Debezium reports 32-bit transaction
    /// ids; they are widened to the 64-bit id nearest the snapshot (transactions around a load are never
    /// two billion apart).
    pub fn holds(&self, tx_id: u64) -> bool {
        let tx = self.widen(tx_id);
        tx < self.xmin || (tx < self.xmax && self.xip.binary_search(&tx).is_err())
    }

    fn widen(&self, tx_id: u64) -> u64 {
        if tx_id > u64::from(u32::MAX) {
            return tx_id;
        }
        const WRAP: u64 = 1 << 32;
        let candidate = (self.xmax & !(WRAP - 1)) | tx_id;
        if candidate > self.xmax.saturating_add(WRAP / 2) && candidate >= WRAP {
            candidate - WRAP
        } else if candidate.saturating_add(WRAP / 2) < self.xmax {
            candidate + WRAP
        } else {
            candidate
        }
    }

    fn to_bson(&self) -> Document {
        let xip: Vec<i64> = self.xip.iter().map(|&x| x as i64).collect();
        doc! { "xmin": self.xmin as i64, "xmax": self.xmax as i64, "xip": xip }
    }

    fn from_bson(d: &Document) -> Result<Snapshot> {
        let mut xip: Vec<u64> = d
            .get_array("xip")?
            .iter()
            .map(|x| x.as_i64().map(|x| x as u64).ok_or_else(|| anyhow!("xip holds a non-integer")))
            .collect::<Result<_>>()?;
        xip.sort_unstable();
        Ok(Snapshot { xmin: d.get_i64("xmin")? as u64, xmax: d.get_i64("xmax")? as u64, xip })
    }
}

/// As PostgreSQL prints it: `xmin:xmax:xip,...`.
impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let xip: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        write!(f, "{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }
}

/// Where a load stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A first load (not a rebuild) loading: jobs wait.
    Loading,
    /// Swapping loaded collections in: jobs wait.
    Swapping,
    /// Done (or never started): jobs apply what the snapshot does not hold.
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Swapping => "swapping",
            Phase::Done => "done",
        }
    }

    fn parse(s: &str) -> Result<Phase> {
        Ok(match s {
            "loading" => Phase::Loading,
            "swapping" => Phase::Swapping,
            "done" => Phase::Done,
            other => bail!("unknown handoff phase {other:?}"),
        })
    }
}

/// The recorded handoff state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub epoch: i64,
    pub phase: Phase,
    pub snapshot: Option<Snapshot>,
    /// `true` for a `--rebuild` (the live collections stay whole while it loads).
    pub rebuild: bool,
    /// The lease owner of the run that began this phase: its shadow collections are the ones a swap renames
    /// (none from a version before fencing: the shadows had one name).
    pub loaded_by: Option<String>,
}

impl Handoff {
    /// No load ever ran: the stream alone builds the read models.
    pub fn none() -> Handoff {
        Handoff { epoch: 0, phase: Phase::Done, snapshot: None, rebuild: false, loaded_by: None }
    }

    /// Whether the loaded data already holds the change of transaction `tx_id`.
    pub fn loaded(&self, tx_id: Option<u64>) -> bool {
        match (&self.snapshot, tx_id) {
            (Some(s), Some(tx)) => s.holds(tx),
            _ => false,
        }
    }

    fn from_bson(d: &Document) -> Result<Handoff> {
        Ok(Handoff {
            epoch: d.get_i64("epoch")?,
            phase: Phase::parse(d.get_str("phase")?)?,
            snapshot: match d.get("snapshot") {
                Some(Bson::Document(s)) => Some(Snapshot::from_bson(s)?),
                _ => None,
            },
            rebuild: d.get_bool("rebuild").unwrap_or(false),
            loaded_by: d.get_str("loaded_by").ok().map(str::to_owned),
        })
    }
}

/// What a job's batch may do under the current handoff state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Apply, skipping what the snapshot holds.
    Open(Arc<Handoff>),
    /// A load or swap is under way: write nothing, try again later.
    Closed(Phase),
    /// A newer epoch: the job's checkpoints may have moved back; re-read them.
    Reset,
}

/// The handoff state (in `session`'s transaction when given).
pub async fn read(db: &Database, session: Option<&mut ClientSession>) -> Result<Handoff> {
    let handoffs = db.collection::<Document>(COLLECTION);
    let find = handoffs.find_one(doc! { "_id": ID });
    let found = match session {
        Some(s) => find.session(s).await,
        None => find.await,
    }
    .map_err(anyhow::Error::new)?;
    found.map_or(Ok(Handoff::none()), |d| Handoff::from_bson(&d).context("reading the first_load handoff state"))
}

/// Whether a lease document was renewed in the last [`LEASE_EXPIRY_MS`] by MongoDB's clock (an aggregation
/// expression): what tells a running first_load from one that died.
pub fn lease_live() -> Document {
    doc! { "$gt": [ "$renewed_at", { "$subtract": [ "$$NOW", LEASE_EXPIRY_MS ] } ] }
}

/// The first_load running on the store (`host ..., pid ...`), if one holds a lease renewed in the last
/// [`LEASE_EXPIRY_MS`] by MongoDB's clock (in `session`'s transaction when given).
pub async fn running_first_load(db: &Database, session: Option<&mut ClientSession>) -> Result<Option<String>> {
    let live = doc! { "_id": LEASE_ID, "$expr": lease_live() };
    let leases = db.collection::<Document>(COLLECTION);
    let find = leases.find_one(live);
    let found = match session {
        Some(s) => find.session(s).await,
        None => find.await,
    }
    .context("reading the first_load lease")?;
    Ok(found.map(|d| {
        let host = d.get_str("host").unwrap_or("?");
        format!("host {host}, pid {}", d.get_i64("pid").unwrap_or(0))
    }))
}

/// The gate for a batch of a job that knows `epoch`, under `handoff` (read in the batch's transaction, or
/// known to be the same, see the module doc).
pub fn gate(handoff: Arc<Handoff>, epoch: i64) -> Gate {
    if handoff.epoch != epoch {
        Gate::Reset
    } else if handoff.phase != Phase::Done {
        Gate::Closed(handoff.phase)
    } else {
        Gate::Open(handoff)
    }
}

/// Starts a new epoch in `phase` for the first_load run holding the lease `owner` (whose shadow collections
/// a swap renames). With `rewind`, every job checkpoint moves, in the same transaction, to the offset `rewind`
/// gives for its `_id` (0 if none). Every job batch that has not committed yet conflicts with this
/// transaction (see the module doc), and so does another run taking the lease over: a run that lost it
/// changes nothing. Returns the new epoch.
pub async fn begin(
    db: &Database,
    session: &mut ClientSession,
    owner: ObjectId,
    phase: Phase,
    snapshot: Option<&Snapshot>,
    rebuild: bool,
    rewind: Option<&HashMap<String, i64>>,
) -> Result<i64> {
    let pause = std::time::Duration::ZERO;
    crate::sink::in_transaction(session, "recording the handoff state", pause, async |session| {
        let handoffs = db.collection::<Document>(COLLECTION);
        // Written, not just read: a takeover committed meanwhile conflicts with this transaction.
        let held = handoffs
            .update_one(doc! { "_id": LEASE_ID, "owner": owner }, doc! { "$currentDate": { "renewed_at": true } })
            .session(&mut *session)
            .await?;
        if held.matched_count == 0 {
            bail!("this first_load no longer holds the store's lease: another run took it over; run one at a time");
        }
        let current = read(db, Some(&mut *session)).await?;
        let epoch = current.epoch + 1;
        let mut state = doc! {
            "epoch": epoch,
            "phase": phase.name(),
            "rebuild": rebuild,
            "loaded_by": owner.to_hex(),
            "started_at": bson::DateTime::now(),
        };
        state.insert("snapshot", snapshot.map_or(Bson::Null, |s| Bson::Document(s.to_bson())));
        handoffs.replace_one(doc! { "_id": ID }, state).upsert(true).session(&mut *session).await?;
        let marks = db.collection::<Document>(crate::sink::TRUNCATIONS);
        let token = ObjectId::new();
        for table in TABLES {
            for lane in 0..crate::sink::LANES {
                marks
                    .update_one(
                        doc! { "_id": crate::sink::truncation_mark(table, lane) },
                        doc! { "$set": { HANDOFF_TOKEN: token } },
                    )
                    .upsert(true)
                    .session(&mut *session)
                    .await?;
            }
        }
        if let Some(rewind) = rewind {
            let checkpoints = db.collection::<Document>(crate::sink::CHECKPOINTS);
            let mut ids = Vec::new();
            let mut cursor = checkpoints.find(doc! {}).projection(doc! { "_id": 1 }).session(&mut *session).await?;
            while let Some(d) = cursor.next(&mut *session).await {
                if let Ok(id) = d?.get_str("_id") {
                    ids.push(id.to_owned());
                }
            }
            for id in ids {
                let offset = rewind.get(&id).copied().unwrap_or(0);
                checkpoints
                    .update_one(doc! { "_id": &id }, doc! { "$set": { "next_offset": offset } })
                    .session(&mut *session)
                    .await?;
            }
        }
        Ok(epoch)
    })
    .await
}

/// Records the snapshot of the load of `epoch`.
/// Every job checkpoint now: `_id` -> next offset (what `--rebuild` rewinds to at its swap).
pub async fn checkpoints(db: &Database) -> Result<HashMap<String, i64>> {
    let mut cursor = db
        .collection::<Document>(crate::sink::CHECKPOINTS)
        .find(doc! {})
        .await
        .context("reading the jobs' checkpoints")?;
    let mut out = HashMap::new();
    while cursor.advance().await? {
        let d = cursor.deserialize_current()?;
        out.insert(d.get_str("_id")?.to_owned(), d.get_i64("next_offset")?);
    }
    Ok(out)
}

pub async fn set_snapshot(db: &Database, epoch: i64, snapshot: &Snapshot) -> Result<()> {
    db.collection::<Document>(COLLECTION)
        .update_one(doc! { "_id": ID, "epoch": epoch }, doc! { "$set": { "snapshot": snapshot.to_bson() } })
        .await
        .context("recording the load's snapshot")?;
    Ok(())
}

/// Ends the load of `epoch`: jobs go on, skipping what its snapshot holds. `summary` is kept for people.
pub async fn finish(db: &Database, epoch: i64, summary: Document) -> Result<()> {
    let done = db
        .collection::<Document>(COLLECTION)
        .update_one(
            doc! { "_id": ID, "epoch": epoch },
            doc! { "$set": { "phase": Phase::Done.name(), "finished_at": bson::DateTime::now(), "summary": summary } },
        )
        .await
        .context("recording the end of the load")?;
    if done.matched_count == 0 {
        bail!("another first_load started while this one ran (the handoff epoch moved on); run only one at a time");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_decides_visibility() {
        let s = Snapshot::parse("100:110:104,102").unwrap();
        assert_eq!(s.xip, vec![102, 104]);
        assert_eq!(s.to_string(), "100:110:102,104");
        assert!(s.holds(99) && s.holds(101) && s.holds(103) && s.holds(105));
        assert!(!s.holds(102) && !s.holds(104) && !s.holds(110) && !s.holds(111));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.holds(6) && !empty.holds(7));
    }

    #[test]
    fn widens_32_bit_ids_around_the_snapshot() {
        let epoch1 = 1_u64 << 32;
        let s = Snapshot { xmin: epoch1 + 5, xmax: epoch1 + 10, xip: vec![] };
        assert!(s.holds(4) && !s.holds(10)); // 32-bit ids in the snapshot's epoch
        let near_wrap = Snapshot { xmin: epoch1 + 2, xmax: epoch1 + 3, xip: vec![] };
        assert!(near_wrap.holds(u64::from(u32::MAX) - 1)); // just before the wrap: older
        let before_wrap = Snapshot { xmin: epoch1 - 10, xmax: epoch1 - 5, xip: vec![] };
        assert!(!before_wrap.holds(3)); // just after the wrap: newer
        assert!(before_wrap.holds(u64::from(u32::MAX) - 20));
    }

    #[test]
    fn no_snapshot_holds_nothing() {
        assert!(!Handoff::none().loaded(Some(1)));
    }
}
