//! order_details -> the `order_details` documents (enriched with the product's name and the order's
//! status), and the line embedded in its order's document: added, replaced or removed by
//! `order_detail_id`, with the order's `totals` recomputed in the same update.
//!
//! Order independence: a line may arrive before its order (the order document is created without a
//! header, which the orders job fills in later) or before its product (the products job fills in the
//! product when it gets there). The product and order data are read inside the batch's transaction; the
//! order document is written by both jobs, and the product's document is touched here, so a concurrent
//! product or order change conflicts with this transaction and one of the two is redone on a fresh
//! snapshot: embedded copies are never left stale.
//!
//! Removed lines leave `{order_detail_id, _v}` in the order's `_removed`, so a replayed older insert of a
//! removed line is recognised as older and ignored.

use std::collections::HashMap;

use bson::{Bson, Document, doc};

use super::{Collection, Write, guarded_replace, literal, newer, tombstone, truncate_all};
use crate::envelope::Event;
use crate::readmodel;
use crate::rows::OrderDetail;
use crate::runtime::Job;
use crate::sink::Reads;

/// The `stream_order_details` job.
pub struct OrderDetailsJob;

impl Job for OrderDetailsJob {
    const TABLE: &'static str = "order_details";
    const BIN: &'static str = "stream_order_details";
    type Row = OrderDetail;

    fn key(row: &OrderDetail) -> i32 {
        row.order_detail_id
    }

    /// A move to another order must reach the old order even when a later change of the line follows.
    fn must_keep(event: &Event<OrderDetail>) -> bool {
        matches!(event, Event::Upsert { row, before: Some(b), .. } if b.order_id != row.order_id)
    }

    async fn project(&self, events: &[Event<OrderDetail>], reads: &mut Reads<'_>) -> anyhow::Result<Vec<Write>> {
        let rows = || events.iter().filter_map(|e| if let Event::Upsert { row, .. } = e { Some(row) } else { None });
        let mut product_ids: Vec<i32> = rows().map(|r| r.product_id).collect();
        product_ids.sort_unstable();
        product_ids.dedup();
        let mut order_ids: Vec<i32> = rows().map(|r| r.order_id).collect();
        order_ids.sort_unstable();
        order_ids.dedup();
        let products = reads.by_ids(Collection::Products, &product_ids).await?;
        let orders = reads.by_ids(Collection::Orders, &order_ids).await?;

        let mut writes: Vec<Write> = product_ids
            .iter()
            .map(|id| Write {
                collection: Collection::Products,
                // A real write, to conflict with a concurrent change of this product. A product not seen
                // yet gets a hidden stub that its first event replaces.
                statement: doc! {
                    "q": { "_id": id },
                    "u": { "$inc": { "_touch": 1 }, "$setOnInsert": { "_deleted": true } },
                    "upsert": true,
                },
            })
            .collect();
        for event in events {
            writes.extend(project(event, &products, &orders));
        }
        Ok(writes)
    }
}

/// The writes for one line change, given the product and order documents the transaction sees.
fn project(
    event: &Event<OrderDetail>,
    products: &HashMap<i32, Document>,
    orders: &HashMap<i32, Document>,
) -> Vec<Write> {
    let write = |collection, statement| Write { collection, statement };
    match event {
        Event::Upsert { row, before, source } => {
            let pos = source.lsn as i64;
            let product = products.get(&row.product_id).filter(|p| p.contains_key("name") && p.contains_key("_v"));
            let order = orders.get(&row.order_id).filter(|o| o.contains_key("status"));
            let mut writes = vec![
                write(Collection::OrderDetails, detail_document(row, pos, product, order)),
                write(Collection::Orders, upsert_line(row, pos, product)),
            ];
            // Moved to another order: it leaves the old one.
            if let Some(old) = before.as_ref().filter(|b| b.order_id != row.order_id) {
                writes.push(write(Collection::Orders, remove_line(old.order_id, row.order_detail_id, pos)));
            }
            writes
        }
        Event::Delete { before, source } => {
            let pos = source.lsn as i64;
            vec![
                write(
                    Collection::OrderDetails,
                    guarded_replace(before.order_detail_id, pos, tombstone(before.order_detail_id, pos)),
                ),
                write(Collection::Orders, remove_line(before.order_id, before.order_detail_id, pos)),
            ]
        }
        Event::Truncate { source } => {
            let pos = source.lsn as i64;
            vec![write(Collection::OrderDetails, truncate_all(pos)), write(Collection::Orders, remove_all_lines(pos))]
        }
        Event::Tombstone => Vec::new(),
    }
}

/// The `order_details` document, merged over the stored one when newer: enrichment not known yet
/// (product or order not seen) keeps what the other jobs' fan-out stored.
fn detail_document(row: &OrderDetail, pos: i64, product: Option<&Document>, order: Option<&Document>) -> Document {
    let plain = readmodel::order_detail(row, None, None);
    let mut fields: Document = plain
        .into_iter()
        .filter(|(k, _)| k != "product_name" && k != "order_status")
        .map(|(k, v)| if k == "_id" { (k, v) } else { (k, literal(v)) })
        .collect();
    fields.insert("_v", literal(pos));
    fields.insert("_deleted", false);
    if let Some(p) = product {
        fields.insert("product_name", literal(p.get("name").cloned().unwrap_or(Bson::Null)));
        fields.insert("_pv", literal(p.get("_v").cloned().unwrap_or(Bson::Null)));
    }
    if let Some(o) = order {
        fields.insert("order_status", literal(o.get("status").cloned().unwrap_or(Bson::Null)));
        fields.insert("_ov", literal(o.get("_v").cloned().unwrap_or(Bson::Null)));
    }
    let defaults = doc! { "product_name": Bson::Null, "order_status": Bson::Null };
    doc! {
        "q": { "_id": row.order_detail_id },
        "u": [ { "$replaceWith": { "$cond": [
            newer(pos, "$_v"),
            { "$mergeObjects": [ defaults, "$$ROOT", fields ] },
            "$$ROOT",
        ] } } ],
        "upsert": true,
    }
}

/// `_seen`: the newest position this order document knows for line `id` (present or removed).
fn seen_stage(id: i32) -> Document {
    let newest = |array: &str| {
        doc! { "$ifNull": [ { "$max": { "$map": {
            "input": { "$filter": { "input": array, "cond": { "$eq": [ "$$this.order_detail_id", id ] } } },
            "in": "$$this._v",
        } } }, -1_i64 ] }
    };
    doc! { "$set": {
        "lines": { "$ifNull": [ "$lines", [] ] },
        "_removed": { "$ifNull": [ "$_removed", [] ] },
        "_seen": { "$max": [ newest("$lines"), newest("$_removed") ] },
    } }
}

fn without_line(id: i32) -> Document {
    doc! { "$filter": { "input": "$lines", "cond": { "$ne": [ "$$this.order_detail_id", id ] } } }
}

/// Totals from the lines, in cents (sums of two-decimal amounts; "0.00" fixes the scale of an empty sum).
fn totals_stage() -> Document {
    let zero = readmodel::order_totals(&[]).get("total").cloned().expect("totals have a total");
    let subtotal = doc! { "$add": [ zero.clone(), { "$sum": { "$map": {
        "input": "$lines", "in": { "$multiply": [ "$$this.unit_price", "$$this.quantity" ] },
    } } } ] };
    let total = doc! { "$add": [ zero, { "$sum": "$lines.line_total" } ] };
    doc! { "$set": { "totals": {
        "items": { "$size": "$lines" },
        "quantity": { "$sum": "$lines.quantity" },
        "subtotal": subtotal.clone(),
        "discount": { "$subtract": [ subtotal, total.clone() ] },
        "total": total,
    } } }
}

fn upsert_line(row: &OrderDetail, pos: i64, product: Option<&Document>) -> Document {
    let id = row.order_detail_id;
    let plain = readmodel::order_line(row, None);
    let mut line: Document = plain.into_iter().map(|(k, v)| (k, literal(v))).collect();
    let product_expr = match product {
        Some(p) => literal(doc! {
            "name": p.get("name").cloned().unwrap_or(Bson::Null),
            "price": p.get("price").cloned().unwrap_or(Bson::Null),
            "_v": p.get("_v").cloned().unwrap_or(Bson::Null),
        }),
        // Not seen yet: keep what the line had (the products job fills it in when it gets there).
        None => Bson::Document(doc! { "$ifNull": [
            { "$getField": { "field": "product", "input": { "$first": { "$filter": {
                "input": "$lines", "cond": { "$eq": [ "$$this.order_detail_id", id ] },
            } } } } },
            Bson::Null,
        ] }),
    };
    line.insert("product", product_expr);
    line.insert("_v", literal(pos));
    doc! {
        "q": { "_id": row.order_id },
        "u": [
            seen_stage(id),
            { "$set": { "lines": { "$cond": [
                { "$gt": [ pos, "$_seen" ] },
                { "$sortArray": {
                    "input": { "$concatArrays": [ without_line(id), [ line ] ] },
                    "sortBy": { "order_detail_id": 1 },
                } },
                "$lines",
            ] } } },
            { "$unset": "_seen" },
            totals_stage(),
        ],
        "upsert": true,
    }
}

fn remove_line(order_id: i32, id: i32, pos: i64) -> Document {
    doc! {
        "q": { "_id": order_id },
        "u": [
            seen_stage(id),
            { "$set": {
                "lines": { "$cond": [ { "$gt": [ pos, "$_seen" ] }, without_line(id), "$lines" ] },
                "_removed": { "$cond": [
                    { "$gt": [ pos, "$_seen" ] },
                    { "$concatArrays": [
                        { "$filter": { "input": "$_removed", "cond": { "$ne": [ "$$this.order_detail_id", id ] } } },
                        [ { "order_detail_id": id, "_v": pos } ],
                    ] },
                    "$_removed",
                ] },
            } },
            { "$unset": "_seen" },
            totals_stage(),
        ],
        "upsert": true,
    }
}

/// A TRUNCATE of order_details: every line older than it leaves every order.
fn remove_all_lines(pos: i64) -> Document {
    let older =
        doc! { "$filter": { "input": { "$ifNull": [ "$lines", [] ] }, "cond": { "$lt": [ "$$this._v", pos ] } } };
    doc! {
        "q": {},
        "u": [
            { "$set": {
                "_removed": { "$concatArrays": [
                    { "$ifNull": [ "$_removed", [] ] },
                    { "$map": { "input": older, "in": { "order_detail_id": "$$this.order_detail_id", "_v": { "$literal": pos } } } },
                ] },
                "lines": { "$filter": { "input": { "$ifNull": [ "$lines", [] ] }, "cond": { "$gte": [ "$$this._v", pos ] } } },
            } },
            totals_stage(),
        ],
        "multi": true,
    }
}
