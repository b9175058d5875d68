//! orders -> the header fields of `orders` documents (never their `lines`, which the order_details job
//! owns), and the order's status into its `order_details` documents.

use bson::{Document, doc};

use super::{Collection, Write, literal, newer};
use crate::envelope::Event;
use crate::readmodel;
use crate::rows::Order;
use crate::runtime::Job;
use crate::sink::Reads;

/// The writes for one order change.
pub fn project(event: &Event<Order>) -> Vec<Write> {
    let write = |collection, statement| Write { collection, statement };
    match event {
        Event::Upsert { row, source, .. } => {
            let pos = source.lsn as i64;
            let plain = readmodel::order_header(
                &row.customer_name,
                &row.address,
                &row.phone,
                row.order_date,
                row.status.as_deref(),
            );
            let mut header: Document = plain.into_iter().map(|(k, v)| (k, literal(v))).collect();
            header.insert("_v", literal(pos));
            header.insert("_deleted", false);
            // A new document starts with no lines; lines the order_details job wrote first are kept.
            let empty =
                doc! { "lines": literal(Vec::<bson::Bson>::new()), "totals": literal(readmodel::order_totals(&[])) };
            vec![
                write(
                    Collection::Orders,
                    doc! {
                        "q": { "_id": row.order_id },
                        "u": [ { "$replaceWith": { "$cond": [
                            newer(pos, "$_v"),
                            { "$mergeObjects": [ empty, "$$ROOT", header ] },
                            "$$ROOT",
                        ] } } ],
                        "upsert": true,
                    },
                ),
                write(
                    Collection::OrderDetails,
                    doc! {
                        "q": { "order_id": row.order_id, "_ov": { "$not": { "$gte": pos } } },
                        "u": { "$set": { "order_status": row.status.as_deref(), "_ov": pos } },
                        "multi": true,
                    },
                ),
            ]
        }
        Event::Delete { before, source } => {
            let pos = source.lsn as i64;
            // Lines stay until their own deletes (the cascade) arrive.
            vec![write(
                Collection::Orders,
                doc! {
                    "q": { "_id": before.order_id },
                    "u": [ { "$replaceWith": { "$cond": [
                        newer(pos, "$_v"),
                        { "$mergeObjects": [ "$$ROOT", { "_deleted": true, "_v": pos } ] },
                        "$$ROOT",
                    ] } } ],
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

    async fn project(&self, events: &[Event<Order>], _: &mut Reads<'_>) -> anyhow::Result<Vec<Write>> {
        Ok(events.iter().flat_map(project).collect())
    }
}
