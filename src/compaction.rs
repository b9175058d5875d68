//! Compaction: removing the deletion marks no change can need any more.
//!
//! A delete leaves a tombstone (`{_id, _deleted: true, _v}`) and a removed line leaves `{order_detail_id, _v}`
//! in its order's `_removed`, so that an older change arriving late (another job behind, a replay) cannot
//! bring the row back. Kept forever they grow with every delete. A mark can go once no change older than it
//! can be applied any more, which takes two things:
//!
//! - every job has applied, in this store, every change committed before Debezium's confirmed slot
//!   position, read before the topic ends it waits for (once the slot confirms a position, every change
//!   committed up to it is in Kafka). Every change before the slot's restart position belongs to a
//!   transaction that ended before the confirmed one, so all of them are applied: nothing older than the
//!   restart position can still arrive, but for a replay;
//! - the jobs drop a replayed change from before it: the restart position becomes the horizon in every lane's
//!   `_truncations` document (its `horizon`, beside the last TRUNCATE's position), which a job's batch reads as
//!   it takes its lane and which makes it drop those changes as it drops the ones a TRUNCATE removed (see
//!   [`crate::sink`]). It is written in one transaction with a check that no first_load is under way (a load
//!   or a swap writes the same documents, so the two serialize) nor running at all (its lease: a `--rebuild`
//!   loads while the phase says done, and its swap rewinds the jobs to before its snapshot), and a batch in
//!   flight under the old horizon conflicts with it and is redone under the new one.
//!
//! Only then do marks below the horizon go.
//!
//! A dead letter is a change a job could not apply, to be sent back (`dead_letters redrive`) once its cause is
//! fixed: it must stay above the horizon, or its copy would be dropped. So the horizon stops below the oldest
//! letter the redrive group has not gone over yet (read once the jobs have reached the ends, when every letter
//! of the changes they applied is in the topic), until that letter is sent back or given up
//! (`dead_letters skip`). One from before the horizon all the same (sent again with `--from-beginning`, or
//! dead-lettered by a job version that could not read its position) is not dropped silently: its row's marks may
//! be gone, so it is refused and dead-lettered again with a reason naming `first_load --rebuild`, which brings
//! the read models back to the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bson::{Document, doc};
use mongodb::{ClientSession, Database};
use rdkafka::consumer::BaseConsumer;
use sqlx::PgPool;

use crate::config::KafkaArgs;
use crate::dead_letter::redrive::Waiting;
use crate::dead_letter::{self, DeadLetterArgs};
use crate::handoff::{self, Phase};
use crate::kafka::{Offsets, records_behind, topic_ends};
use crate::postgres::{Lsn, slot_position};
use crate::projection::Collection;
use crate::sink::{self, Feed, LANES, TRUNCATIONS, truncation_mark};

/// One compaction of one or several read stores: they share the slot, the change topics' ends and the dead
/// letters waiting.
pub struct Compaction {
    pub pg: PgPool,
    pub kafka: Arc<BaseConsumer>,
    pub kafka_args: KafkaArgs,
    pub dead_letters: DeadLetterArgs,
    /// The three jobs' topics and groups.
    pub feeds: Vec<Feed>,
    /// Debezium's replication slot.
    pub slot: String,
    /// How long the jobs have to apply the changes the slot has confirmed.
    pub wait: Duration,
    /// Count what would go; change nothing.
    pub dry_run: bool,
}

/// What a compaction removed from one store, or would remove (`--dry-run`).
#[derive(Debug, Clone, Default)]
pub struct Compacted {
    /// Marks below it went: the slot's restart position when the compaction began, or the oldest dead letter
    /// not sent back yet.
    pub horizon: Lsn,
    /// That letter (`<topic>/<partition>/<offset>`), when it held the horizon back.
    pub held_by: Option<String>,
    /// Tombstones removed, per collection.
    pub tombstones: Vec<(Collection, u64)>,
    /// Orders whose `_removed` lost entries, and how many entries in all.
    pub orders_with_removed_lines: u64,
    pub removed_lines: u64,
    /// Notes of dead letters sent (`_dead_lettered`) that no replay can meet any more, removed.
    pub dead_letter_notes: u64,
}

/// What a compaction did.
#[derive(Debug, Default)]
pub struct Report {
    /// Per store given, in their order.
    pub stores: Vec<Compacted>,
    /// Dead letters not sent back yet whose record names no position: they hold nothing back (if a later job
    /// version decodes one from before a horizon, it is refused, naming `first_load --rebuild`).
    pub letters_without_position: u64,
}

impl Compaction {
    /// Compacts each of `stores` (named for errors), see the module doc.
    pub async fn run(&self, stores: &[(&str, &Database)]) -> Result<Report> {
        for (name, db) in stores {
            let refused = refuse_during_first_load(db, None).await;
            refused.with_context(|| format!("compacting {name}"))?;
        }
        // The slot first, then the ends (see the module doc).
        let position = slot_position(&self.pg, &self.slot).await?;
        let topics: Vec<String> = self.feeds.iter().map(|f| f.topic.clone()).collect();
        let kafka = self.kafka.clone();
        let ends = tokio::task::spawn_blocking(move || topic_ends(&kafka, &topics))
            .await?
            .context("reading the change topics' ends")?;
        let deadline = Instant::now() + self.wait;
        let mut applied = Vec::with_capacity(stores.len());
        for (name, db) in stores {
            let reached = self.wait_for_jobs(db, &ends, position.confirmed, deadline);
            applied.push(reached.await.with_context(|| format!("compacting {name}"))?);
        }
        // Only now: every letter of a change before the ends is in the topic (a job sends it before it moves
        // its checkpoint past the change).
        let waiting = Waiting::read(&self.kafka_args, &self.dead_letters)
            .await
            .context("reading the dead letters not sent back yet")?;
        let mut report = Report { letters_without_position: waiting.without_position, ..Default::default() };
        for ((name, db), applied) in stores.iter().zip(&applied) {
            let done = self.compact(db, position.restart.min(position.confirmed), &waiting, applied);
            report.stores.push(done.await.with_context(|| format!("compacting {name}"))?);
        }
        Ok(report)
    }

    /// Raises one store's horizon to `restart`, or below the oldest waiting letter its horizon has not passed
    /// yet, then removes the marks below it, and the notes of dead letters sent that the jobs are past
    /// (`applied`, the store's checkpoints once they reached the topic ends).
    async fn compact(&self, db: &Database, restart: Lsn, waiting: &Waiting, applied: &Offsets) -> Result<Compacted> {
        let mut out = Compacted { horizon: restart, ..Default::default() };
        // A letter at or below the horizon already is refused when sent back, whatever this run does.
        if let Some((lsn, at)) = waiting.oldest_after(current_horizon(db).await?) {
            if Lsn(lsn) < restart {
                out.horizon = Lsn(lsn);
                out.held_by = Some(at.to_owned());
            }
        }
        let below = out.horizon.0 as i64;
        if !self.dry_run {
            raise_horizon(db, below - 1).await?;
        }

        let tombstone = doc! { "_deleted": true, "_v": { "$lt": below } };
        for feed in &self.feeds {
            let collection = db.collection::<Document>(feed.collection.name());
            let removed = if self.dry_run {
                collection.count_documents(tombstone.clone()).await?
            } else {
                collection.delete_many(tombstone.clone()).await?.deleted_count
            };
            out.tombstones.push((feed.collection, removed));
        }

        let orders = db.collection::<Document>(Collection::Orders.name());
        // Not in an order whose tombstone went above (so that a dry run counts what a run removes).
        let old_entries = doc! { "_removed._v": { "$lt": below }, "$nor": [tombstone] };
        let mut cursor = orders
            .aggregate(vec![
                doc! { "$match": old_entries.clone() },
                doc! { "$project": { "n": { "$size": { "$filter": {
                    "input": "$_removed", "cond": { "$lt": [ "$$this._v", below ] },
                } } } } },
                doc! { "$group": { "_id": null, "orders": { "$sum": 1 }, "entries": { "$sum": "$n" } } },
            ])
            .await
            .context("counting the orders' removed lines")?;
        if cursor.advance().await? {
            let counts = cursor.deserialize_current()?;
            out.orders_with_removed_lines =
                counts.get_i32("orders").map(i64::from).or(counts.get_i64("orders"))? as u64;
            out.removed_lines = counts.get_i32("entries").map(i64::from).or(counts.get_i64("entries"))? as u64;
        }
        if !self.dry_run {
            // `_lv` moves as with any other writer of an order's lines: the order_details job's read-modify-write
            // of this order, if one is under way, is redone instead of writing the old `_removed` back.
            orders
                .update_many(
                    old_entries,
                    doc! { "$pull": { "_removed": { "_v": { "$lt": below } } }, "$inc": { "_lv": 1_i64 } },
                )
                .await
                .context("removing the orders' old removed lines")?;
        }
        out.dead_letter_notes = self.forget_dead_letters_sent(db, applied).await?;
        Ok(out)
    }

    /// Removes the store's notes of dead letters sent (`_dead_lettered`, which keep a replay from sending a
    /// letter twice) for records before the store's checkpoints in `applied`. No replay meets them again: a
    /// `--rebuild` rewinds the checkpoints to where they stood when it began, later than now (compact refuses
    /// while one runs); only checkpoints dropped by hand go back further.
    async fn forget_dead_letters_sent(&self, db: &Database, applied: &Offsets) -> Result<u64> {
        let notes = db.collection::<Document>(dead_letter::SENT);
        let mut cursor = notes.find(doc! {}).projection(doc! { "_id": 1 }).await.context("reading _dead_lettered")?;
        let mut passed = Vec::new();
        while cursor.advance().await? {
            let id = cursor.deserialize_current()?.get_str("_id").map(str::to_owned).unwrap_or_default();
            let past = dead_letter::parse_sent_id(&id).is_some_and(|(topic, partition, offset)| {
                applied.get(&(topic.to_owned(), partition)).is_some_and(|&next| offset < next)
            });
            if past {
                passed.push(id);
            }
        }
        if self.dry_run {
            return Ok(passed.len() as u64);
        }
        let mut forgotten = 0;
        for ids in passed.chunks(10_000) {
            let gone =
                notes.delete_many(doc! { "_id": { "$in": ids } }).await.context("removing _dead_lettered notes")?;
            forgotten += gone.deleted_count;
        }
        Ok(forgotten)
    }

    /// Waits until every job's checkpoints in the store reach `ends`, and returns them.
    async fn wait_for_jobs(&self, db: &Database, ends: &Offsets, confirmed: Lsn, deadline: Instant) -> Result<Offsets> {
        loop {
            let applied = sink::applied(db, &self.feeds).await?;
            let records = records_behind(ends, &applied);
            let mut behind = Vec::new();
            for feed in &self.feeds {
                let n = records.get(feed.topic.as_str()).copied().unwrap_or(0);
                if n > 0 {
                    let unit = if n == 1 { "record" } else { "records" };
                    behind.push(format!("{} {n} {unit} behind (group {})", feed.collection.name(), feed.group));
                }
            }
            if behind.is_empty() {
                return Ok(applied);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the jobs have not applied every change up to {confirmed} in this store within {:?}: {}; \
                     compact waits for all three (are the stream jobs running? --wait-secs gives them longer)",
                    self.wait,
                    behind.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Refuses while a first_load is under way in the store: a load or a swap, or a run holding its lease (a
/// `--rebuild` loads while the phase is still done, and its swap rewinds the jobs to before its snapshot).
async fn refuse_during_first_load(db: &Database, mut session: Option<&mut ClientSession>) -> Result<()> {
    refuse_in_phase(&handoff::read(db, session.as_deref_mut()).await?)?;
    if let Some(run) = handoff::running_first_load(db, session).await? {
        bail!(
            "a first_load is running on this store ({run}): run compact once it is done (its rewind may replay \
             changes the horizon would drop)"
        );
    }
    Ok(())
}

fn refuse_in_phase(state: &handoff::Handoff) -> Result<()> {
    if state.phase != Phase::Done {
        bail!(
            "first_load is {} in this store: run compact once it is done (its rewind may replay changes the horizon \
             would drop)",
            state.phase.name()
        );
    }
    Ok(())
}

/// The store's horizon: the lowest of its lanes' (-1 before the first compaction).
async fn current_horizon(db: &Database) -> Result<i64> {
    let ids: Vec<String> =
        Collection::ALL.iter().flat_map(|c| (0..LANES).map(move |lane| truncation_mark(c.name(), lane))).collect();
    let mut marks = db
        .collection::<Document>(TRUNCATIONS)
        .find(doc! { "_id": { "$in": &ids } })
        .await
        .context("reading the store's horizon")?;
    let (mut found, mut lowest) = (0, i64::MAX);
    while marks.advance().await? {
        found += 1;
        lowest = lowest.min(marks.deserialize_current()?.get_i64(sink::HORIZON).unwrap_or(-1));
    }
    Ok(if found < ids.len() { -1 } else { lowest })
}

/// Writes the horizon into every lane's `_truncations` document of every table, in one transaction that
/// checks first_load is not under way.
async fn raise_horizon(db: &Database, drop_at_or_below: i64) -> Result<()> {
    let mut session = db.client().start_session().await.context("starting a MongoDB session")?;
    // On a conflict a job's batch holds a lane: it is let commit first.
    sink::in_transaction(&mut session, "writing the compaction horizon", Duration::from_millis(50), async |session| {
        refuse_during_first_load(db, Some(&mut *session)).await?;
        let marks = db.collection::<Document>(TRUNCATIONS);
        for collection in Collection::ALL {
            for lane in 0..LANES {
                marks
                    .update_one(
                        doc! { "_id": truncation_mark(collection.name(), lane) },
                        doc! { "$max": { sink::HORIZON: drop_at_or_below } },
                    )
                    .upsert(true)
                    .session(&mut *session)
                    .await?;
            }
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_load_under_way_refuses_with_what_to_do() {
        let mut state = handoff::Handoff::none();
        assert!(refuse_in_phase(&state).is_ok());
        state.phase = Phase::Loading;
        let err = refuse_in_phase(&state).unwrap_err().to_string();
        assert!(err.contains("first_load is loading") && err.contains("once it is done"), "{err}");
    }
}
