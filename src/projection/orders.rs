//! orders -> the header fields of `orders` documents (never their `lines`, which the order_details job
//! owns), and the order's status into its `order_details` documents.

use bson::doc;

use super::{Collection, Write};
use crate::envelope::Event;
use crate::readmodel;
use crate::rows::Order;
use crate::runtime::Job;
use crate::sink::Txn;

/// The writes for one order change, given the version of its document the transaction sees (`-1` for
/// none) and whether `order_details` documents of the order exist (`has_details`, the status is copied
/// into them): a change no newer than it writes nothing to `orders` (the fan-out to `order_details` has its
/// own guard). Plain `$set`s, not pipelines: the version was read in the batch's transaction, and a write
/// to the document since would abort it as a write conflict (the order_details job writes the order's
/// document whenever it writes one of its lines, so lines it adds concurrently conflict too).
pub fn project(event: &Event<Order>, stored_version: i64, has_details: bool) -> Vec<Write> {
    let write = |collection, statement| Write { collection, statement };
    let newer = |pos: i64| pos > stored_version;
    match event {
        Event::Upsert { row, source, .. } => {
            let pos = source.lsn as i64;
            let mut writes = Vec::with_capacity(2);
            if newer(pos) {
                let mut header = readmodel::order_header(
                    &row.customer_name,
                    &row.address,
                    &row.phone,
                    row.order_date,
                    row.status.as_deref(),
                );
                header.insert("_v", pos);
                header.insert("_deleted", false);
                // A new document starts with no lines; lines the order_details job wrote first are kept.
                let empty = doc! { "lines": [], "totals": readmodel::order_totals(&[]) };
                writes.push(write(
                    Collection::Orders,
                    doc! {
                        "q": { "_id": row.order_id },
                        "u": { "$set": header, "$setOnInsert": empty },
                        "upsert": true,
                    },
                ));
            }
            if !has_details {
                return writes;
            }
            writes.push(write(
                Collection::OrderDetails,
                doc! {
                    "q": { "order_id": row.order_id, "_ov": { "$not": { "$gte": pos } } },
                    "u": { "$set": { "order_status": row.status.as_deref(), "_ov": pos } },
                    "multi": true,
                },
            ));
            writes
        }
        Event::Delete { before, source } => {
            let pos = source.lsn as i64;
            if !newer(pos) {
                return Vec::new();
            }
            // Lines stay until their own deletes (the cascade) arrive.
            vec![write(
                Collection::Orders,
                doc! {
                    "q": { "_id": before.order_id },
                    "u": { "$set": { "_deleted": true, "_v": pos } },
                    "upsert": true,
                },
            )]
        }
        Event::Truncate { source } => {
            let pos = source.lsn as i64;
            vec![write(
                Collection::Orders,
                doc! {
                    "q": { "_v": { "$not": { "$gte": pos } } },
                    "u": [ { "$set": { "_deleted": true, "_v": { "$literal": pos } } } ],
                    "multi": true,
                },
            )]
        }
        Event::Tombstone => Vec::new(),
    }
}

/// The `stream_orders` job.
pub struct OrdersJob;

impl Job for OrdersJob {
    const TABLE: &'static str = "orders";
    const BIN: &'static str = "stream_orders";
    type Row = Order;

    fn key(row: &Order) -> i32 {
        row.order_id
    }

    async fn project(&self, events: &[Event<Order>], tx: &mut Txn<'_>) -> anyhow::Result<Vec<Write>> {
        let mut ids: Vec<i32> = events.iter().filter_map(|e| e.row().map(|r| r.order_id)).collect();
        ids.sort_unstable();
        ids.dedup();
        let versions = tx.versions(Collection::Orders, &ids).await?;
        let with_details = tx.present(Collection::OrderDetails, "order_id", &ids).await?;
        // A TRUNCATE in the batch makes every document at least that new for the events after it.
        let mut truncated = -1;
        let mut writes = Vec::with_capacity(events.len() * 2);
        for event in events {
            if let Event::Truncate { source } = event {
                truncated = truncated.max(source.lsn as i64);
            }
            let id = event.row().map(|r| r.order_id);
            let stored = id.and_then(|id| versions.get(&id)).copied().unwrap_or(-1);
            writes.extend(project(event, stored.max(truncated), id.is_some_and(|id| with_details.contains(&id))));
        }
        Ok(writes)
    }
}
