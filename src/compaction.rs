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
//!   [`crate::sink`]). It is written in one transaction with a check that
//!   no first_load is under way (a load or a rebuild writes the same documents, so the two serialize), and a
//!   batch in flight under the old horizon conflicts with it and is redone under the new one.
//!
//! Only then do marks below the horizon go. A dead letter from before the horizon sent back by `dead_letters
//! redrive` is not dropped silently: its row's marks may be gone, so it is refused and dead-lettered again
//! with a reason naming `first_load --rebuild`, which brings the read models back to the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bson::{Document, doc};
use mongodb::Database;
use rdkafka::consumer::BaseConsumer;
use sqlx::PgPool;

use crate::handoff::{self, Phase};
use crate::kafka::{Offsets, records_behind, topic_ends};
use crate::postgres::{Lsn, slot_position};
use crate::projection::Collection;
use crate::sink::{self, Feed, LANES, TRUNCATIONS, truncation_mark};

/// What a compaction removed, or would remove (`--dry-run`).
#[derive(Debug, Clone, Default)]
pub struct Compacted {
    /// Marks below it went: the slot's restart position when the compaction began.
    pub horizon: Lsn,
    /// Tombstones removed, per collection.
    pub tombstones: Vec<(Collection, u64)>,
    /// Orders whose `_removed` lost entries, and how many entries in all.
    pub orders_with_removed_lines: u64,
    pub removed_lines: u64,
}

/// Compacts the read store `db` (see the module doc). Waits up to `wait` for the jobs to apply the changes
/// the slot has confirmed; `dry_run` counts what would go and changes nothing.
pub async fn compact(
    db: &Database,
    pg: &PgPool,
    kafka: Arc<BaseConsumer>,
    feeds: &[Feed],
    slot: &str,
    wait: Duration,
    dry_run: bool,
) -> Result<Compacted> {
    refuse_during_first_load(&handoff::read(db, None).await?)?;
    // The slot first, then the ends (see the module doc).
    let position = slot_position(pg, slot).await?;
    let horizon = position.restart.min(position.confirmed);
    let topics: Vec<String> = feeds.iter().map(|f| f.topic.clone()).collect();
    let ends = tokio::task::spawn_blocking(move || topic_ends(&kafka, &topics))
        .await?
        .context("reading the change topics' ends")?;
    wait_for_jobs(db, feeds, &ends, position.confirmed, wait).await?;
    let below = horizon.0 as i64;
    if !dry_run {
        raise_horizon(db, below - 1).await?;
    }

    let mut out = Compacted { horizon, ..Default::default() };
    let tombstone = doc! { "_deleted": true, "_v": { "$lt": below } };
    for feed in feeds {
        let collection = db.collection::<Document>(feed.collection.name());
        let removed = if dry_run {
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
        out.orders_with_removed_lines = counts.get_i32("orders").map(i64::from).or(counts.get_i64("orders"))? as u64;
        out.removed_lines = counts.get_i32("entries").map(i64::from).or(counts.get_i64("entries"))? as u64;
    }
    if !dry_run {
        // `_lv` moves as with any other writer of an order's lines: the order_details job's read-modify-write of
        // this order, if one is under way, is redone instead of writing the old `_removed` back.
        orders
            .update_many(
                old_entries,
                doc! { "$pull": { "_removed": { "_v": { "$lt": below } } }, "$inc": { "_lv": 1_i64 } },
            )
            .await
            .context("removing the orders' old removed lines")?;
    }
    Ok(out)
}

fn refuse_during_first_load(state: &handoff::Handoff) -> Result<()> {
    if state.phase != Phase::Done {
        bail!(
            "first_load is {} in this store: run compact once it is done (its rewind may replay changes the horizon \
             would drop)",
            state.phase.name()
        );
    }
    Ok(())
}

/// Waits until every job's checkpoints in the store reach `ends`.
async fn wait_for_jobs(db: &Database, feeds: &[Feed], ends: &Offsets, confirmed: Lsn, wait: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let applied = sink::applied(db, feeds).await?;
        let records = records_behind(ends, &applied);
        let mut behind = Vec::new();
        for feed in feeds {
            let n = records.get(feed.topic.as_str()).copied().unwrap_or(0);
            if n > 0 {
                let unit = if n == 1 { "record" } else { "records" };
                behind.push(format!("{} {n} {unit} behind (group {})", feed.collection.name(), feed.group));
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= wait {
            bail!(
                "the jobs have not applied every change up to {confirmed} in this store within {wait:?}: {}; compact \
                 waits for all three (are the stream jobs running? --wait-secs gives them longer)",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes the horizon into every lane's `_truncations` document of every table, in one transaction that
/// checks first_load is not under way.
async fn raise_horizon(db: &Database, drop_at_or_below: i64) -> Result<()> {
    let mut session = db.client().start_session().await.context("starting a MongoDB session")?;
    // On a conflict a job's batch holds a lane: it is let commit first.
    sink::in_transaction(&mut session, "writing the compaction horizon", Duration::from_millis(50), async |session| {
        refuse_during_first_load(&handoff::read(db, Some(&mut *session)).await?)?;
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
        assert!(refuse_during_first_load(&state).is_ok());
        state.phase = Phase::Loading;
        let err = refuse_during_first_load(&state).unwrap_err().to_string();
        assert!(err.contains("first_load is loading") && err.contains("once it is done"), "{err}");
    }
}
