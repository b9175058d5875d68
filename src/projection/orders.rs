//! orders -> the header fields of `orders` documents (never their `lines`, which the order_details job
//! owns), and the order's status into its `order_details` documents.
//!
//! The order's document is written before its `order_details` documents are looked for, by the ids of the
//! lines it embeds: the order_details job writes a line's document, then the line into its order, and reads
//! the order after (its re-check), so a document it copies an older status into is either found here or
//! sees the new status there.

use std::collections::HashSet;
use std::sync::LazyLock;

use bson::{Bson, RawArrayBuf, RawDocument, RawDocumentBuf, cstr, doc, rawdoc};

use super::{Collection, Existing, LIVE_BELOW, Write, guarded_replace, tombstone};
use crate::envelope::Event;
use crate::readmodel;
use crate::rows::Order;
use crate::runtime::Job;
use crate::sink::ReadModels;

/// The write of one order change to its document's header, guarded by the document's version (`_v`): a
/// pipeline that keeps whatever else the document holds (the lines the order_details job wrote, first
/// perhaps).
pub fn project(event: &Event<Order>) -> Option<Write> {
    let statement = match event {
        Event::Upsert { row, source, .. } => {
            let pos = source.lsn as i64;
            // A new document starts with no lines; lines the order_details job wrote first are kept.
            let lines = rawdoc! {
                "lines": { "$ifNull": [ "$lines", [] ] },
                "totals": { "$ifNull": [ "$totals", { "$literal": no_totals().to_owned() } ] },
            };
            guarded_merge(row.order_id, pos, [rawdoc! { "$literal": header(row, pos) }, lines])
        }
        // Lines stay until their own deletes (the cascade) arrive.
        Event::Delete { before, source } => {
            let pos = source.lsn as i64;
            guarded_merge(before.order_id, pos, [rawdoc! { "$literal": { "_deleted": true, "_v": pos } }])
        }
        Event::Truncate { source } => {
            let pos = source.lsn as i64;
            rawdoc! {
                "q": { "_v": { "$not": { "$gte": pos } } },
                "u": [ { "$set": { "_deleted": true, "_v": { "$literal": pos } } } ],
                "multi": true,
            }
        }
        Event::Tombstone => return None,
    };
    Some(Write::raw(Collection::Orders, statement))
}

/// The document [`project`] writes where the order has none: its header and no lines, or a tombstone.
pub fn new_document(event: &Event<Order>) -> Option<RawDocumentBuf> {
    match event {
        Event::Upsert { row, source, .. } => {
            let mut document = header(row, source.lsn as i64);
            document.append(cstr!("lines"), RawArrayBuf::new());
            document.append(cstr!("totals"), no_totals());
            Some(document)
        }
        Event::Delete { before, source } => Some(tombstone(before.order_id, source.lsn as i64)),
        Event::Truncate { .. } | Event::Tombstone => None,
    }
}

/// The `totals` of an order without lines.
fn no_totals() -> &'static RawDocument {
    static NO_TOTALS: LazyLock<RawDocumentBuf> = LazyLock::new(|| readmodel::order_totals(&[]));
    &NO_TOTALS
}

/// The `_id` and header fields of `row` as of `pos`, with its version.
fn header(row: &Order, pos: i64) -> RawDocumentBuf {
    let (id, date, status) = (row.order_id, row.order_date, row.status.as_deref());
    let mut header = readmodel::order_header(id, &row.customer_name, &row.address, &row.phone, date, status);
    header.append(cstr!("_v"), pos);
    header.append(cstr!("_deleted"), false);
    header
}

/// Sets the fields of the documents `set` (aggregation expressions; values as one `$literal` where they can
/// be: mongod parses every statement's pipeline, field by field) in order `id`'s document if `pos` is newer
/// than its `_v`, else leaves it.
fn guarded_merge(id: i32, pos: i64, set: impl IntoIterator<Item = RawDocumentBuf>) -> RawDocumentBuf {
    let mut merged = RawArrayBuf::new();
    merged.push("$$ROOT");
    for expression in set {
        merged.push(expression);
    }
    let mut merge = RawDocumentBuf::new();
    merge.append(cstr!("$mergeObjects"), merged);
    guarded_replace(id, pos, merge)
}

/// The copy of order `id`'s `status` (as of `pos`) into its `order_details` documents `details` (those
/// still in the order: a line moved to another order keeps that one's), each guarded by the version it was
/// copied at.
pub fn status_fan_out(id: i32, details: &[i32], status: &Bson, pos: i64) -> Write {
    Write::new(
        Collection::OrderDetails,
        doc! {
            "q": { "_id": { "$in": details }, "order_id": id, "_ov": { "$not": { "$gte": pos } } },
            "u": { "$set": { "order_status": status, "_ov": pos } },
            "multi": true,
        },
    )
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

    async fn apply(&self, events: &[Event<Order>], store: &ReadModels<'_>) -> anyhow::Result<()> {
        // A live batch upserts: its new orders' lines are being written by the order_details job right now.
        let existing = if events.len() < LIVE_BELOW {
            Existing::none()
        } else {
            Existing::read(store, Collection::Orders, events, Self::key).await?
        };
        let new = |e: &Event<Order>| new_document(e);
        let taken = existing.write(store, Collection::Orders, events, Self::key, new, project).await?;
        let taken: HashSet<i32> = taken.iter().filter_map(|e| e.row().map(Self::key)).collect();
        // The status goes to the order's order_details documents, looked for after the order's is written.
        // Every change fans out (guarded), not only newer ones: a replay may follow a crash before it. An
        // order this batch inserted had no lines then: a line the order_details job adds later is re-checked
        // there, against this status (most of a catch-up's orders, whose look-up found nothing).
        let mut ids: Vec<i32> = events
            .iter()
            .filter_map(|e| if let Event::Upsert { row, .. } = e { Some(row.order_id) } else { None })
            .filter(|id| !existing.is_new(*id) || taken.contains(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let details = store.line_ids(&ids).await?;
        let fan_outs = events.iter().filter_map(|e| match e {
            Event::Upsert { row, source, .. } => details.get(&row.order_id).map(|details| {
                let status = row.status.as_deref().map_or(Bson::Null, Bson::from);
                status_fan_out(row.order_id, details, &status, source.lsn as i64)
            }),
            _ => None,
        });
        store.write(fan_outs.collect()).await
    }
}
