//! order_details -> the `order_details` documents (enriched with the product's name and the order's
//! status), and the line embedded in its order's document: added, replaced or removed by
//! `order_detail_id`, with the order's `totals` recomputed.
//!
//! Embedded lines are changed here, in Rust, on the order document the batch's transaction reads, and
//! written back with one plain `$set` per order and batch however many of its lines changed (an order's
//! lines arrive together): a read-modify-write is safe because any other write to that document after the
//! transaction's snapshot makes MongoDB abort it as a write conflict, and the runtime redoes it.
//!
//! Order independence: a line may arrive before its order (the order document is created without a
//! header, which the orders job fills in later) or before its product (the products job fills in the
//! product when it gets there). The product and order data are read inside the batch's transaction; the
//! order document is written by both jobs, and the product's lock is taken here and by the products job when
//! a name or price changes ([`crate::sink::Txn::lock_embedded_products`]), so a concurrent product or order
//! change conflicts with this transaction and one of the two is redone on a fresh snapshot: embedded copies
//! are never left stale. An `order_details` document is only written with its order's, for the same reason.
//!
//! Removed lines leave `{order_detail_id, _v}` in the order's `_removed`, so a replayed older insert of a
//! removed line is recognised as older and ignored.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use bson::{Bson, Document, doc};
use rust_decimal::Decimal;

use super::{Collection, Write, decimal_of, replace, tombstone, truncate_all};
use crate::envelope::Event;
use crate::readmodel;
use crate::rows::OrderDetail;
use crate::runtime::Job;
use crate::sink::Txn;

/// The `stream_order_details` job.
pub struct OrderDetailsJob;

impl Job for OrderDetailsJob {
    const TABLE: &'static str = "order_details";
    const BIN: &'static str = "stream_order_details";
    type Row = OrderDetail;

    fn key(row: &OrderDetail) -> i32 {
        row.order_detail_id
    }

    /// An order's lines are written together, in its document: by order.
    fn lane_key(row: &OrderDetail) -> i32 {
        row.order_id
    }

    /// A move to another order must reach the old order even when a later change of the line follows.
    fn must_keep(event: &Event<OrderDetail>) -> bool {
        matches!(event, Event::Upsert { row, before: Some(b), .. } if b.order_id != row.order_id)
    }

    async fn project(&self, events: &[Event<OrderDetail>], tx: &mut Txn<'_>) -> anyhow::Result<Vec<Write>> {
        let mut product_ids = Vec::new();
        let mut order_ids = Vec::new();
        for event in events {
            match event {
                Event::Upsert { row, before, .. } => {
                    product_ids.push(row.product_id);
                    order_ids.push(row.order_id);
                    order_ids.extend(before.as_ref().map(|b| b.order_id));
                }
                Event::Delete { before, .. } => order_ids.push(before.order_id),
                Event::Truncate { .. } | Event::Tombstone => {}
            }
        }
        for ids in [&mut product_ids, &mut order_ids] {
            ids.sort_unstable();
            ids.dedup();
        }
        let mut detail_ids: Vec<i32> = events.iter().filter_map(|e| e.row().map(|r| r.order_detail_id)).collect();
        detail_ids.sort_unstable();
        detail_ids.dedup();
        // Only the fields the projection uses: a catch-up batch reads thousands of orders with their lines.
        let products = tx.fields(Collection::Products, &product_ids, doc! { "name": 1, "price": 1, "_v": 1 }).await?;
        let orders =
            tx.fields(Collection::Orders, &order_ids, doc! { "lines": 1, "_removed": 1, "status": 1, "_v": 1 }).await?;
        let enrichment = doc! { "_v": 1, "product_name": 1, "_pv": 1, "order_status": 1, "_ov": 1 };
        let details = tx.fields(Collection::OrderDetails, &detail_ids, enrichment).await?;
        // The version of each order_details document as this batch leaves it.
        let mut versions: HashMap<i32, i64> =
            details.iter().map(|(&id, d)| (id, d.get_i64("_v").unwrap_or(-1))).collect();

        // A product's name and price are embedded as this transaction read them: its lock makes a concurrent
        // change of them conflict (one of the two is redone and sees the other).
        let (known, unknown): (Vec<i32>, Vec<i32>) =
            product_ids.iter().partition(|id| products.get(id).is_some_and(is_known));
        tx.lock_embedded_products(&known, &unknown).await?;

        let mut writes: Vec<Write> = Vec::with_capacity(events.len() * 2);
        let mut lines = Lines::new(&orders);
        for event in events {
            match event {
                Event::Upsert { row, before, source } => {
                    let pos = source.lsn as i64;
                    let product = products.get(&row.product_id).filter(|p| is_known(p));
                    let order = orders.get(&row.order_id).filter(|o| o.contains_key("status"));
                    let order_lines = lines.of(row.order_id);
                    if advance(&mut versions, row.order_detail_id, pos) {
                        let document = detail_document(row, pos, details.get(&row.order_detail_id), product, order);
                        writes.push(Write { collection: Collection::OrderDetails, statement: replace(document) });
                        // The order's status is copied in: the order document is written too, so that a
                        // concurrent status change conflicts (the orders job fans out only to what it sees).
                        order_lines.changed = true;
                    }
                    order_lines.upsert(row, pos, product);
                    // Moved to another order: it leaves the old one.
                    if let Some(old) = before.as_ref().filter(|b| b.order_id != row.order_id) {
                        lines.of(old.order_id).remove(row.order_detail_id, pos);
                    }
                }
                Event::Delete { before, source } => {
                    let (id, pos) = (before.order_detail_id, source.lsn as i64);
                    if advance(&mut versions, id, pos) {
                        writes.push(Write {
                            collection: Collection::OrderDetails,
                            statement: replace(tombstone(id, pos)),
                        });
                    }
                    lines.of(before.order_id).remove(id, pos);
                }
                Event::Truncate { source } => {
                    let pos = source.lsn as i64;
                    writes.push(Write { collection: Collection::OrderDetails, statement: truncate_all(pos) });
                    for v in versions.values_mut() {
                        *v = (*v).max(pos);
                    }
                    // Orders not otherwise in the batch: in MongoDB, before the batch's own order writes.
                    writes.push(Write { collection: Collection::Orders, statement: remove_all_lines(pos) });
                    lines.truncate(pos);
                }
                Event::Tombstone => {}
            }
        }
        writes.extend(lines.into_writes()?);
        Ok(writes)
    }
}

/// Whether a `products` document is a product (not a tombstone): one whose name and price can be embedded.
fn is_known(product: &Document) -> bool {
    product.contains_key("name") && product.contains_key("_v")
}

/// Whether `pos` is newer than the version of document `id`, which it then becomes.
fn advance(versions: &mut HashMap<i32, i64>, id: i32, pos: i64) -> bool {
    let v = versions.entry(id).or_insert(-1);
    let newer = pos > *v;
    *v = (*v).max(pos);
    newer
}

/// The embedded lines of the orders a batch changes, each read once from the transaction's snapshot.
struct Lines<'a> {
    stored: &'a HashMap<i32, Document>,
    orders: BTreeMap<i32, OrderLines>,
    /// TRUNCATEs met so far in the batch, to apply to an order first read after them.
    truncates: Vec<i64>,
}

impl<'a> Lines<'a> {
    fn new(stored: &'a HashMap<i32, Document>) -> Self {
        Lines { stored, orders: BTreeMap::new(), truncates: Vec::new() }
    }

    fn of(&mut self, order_id: i32) -> &mut OrderLines {
        self.orders.entry(order_id).or_insert_with(|| {
            let mut lines = OrderLines::stored(self.stored.get(&order_id));
            for &pos in &self.truncates {
                lines.truncate(pos);
            }
            lines
        })
    }

    fn truncate(&mut self, pos: i64) {
        self.truncates.push(pos);
        for lines in self.orders.values_mut() {
            lines.truncate(pos);
        }
    }

    /// One `$set` of lines, `_removed` and totals per order whose lines changed.
    fn into_writes(self) -> anyhow::Result<Vec<Write>> {
        let mut writes = Vec::new();
        for (order_id, lines) in self.orders {
            if let Some(statement) = lines.statement(order_id)? {
                writes.push(Write { collection: Collection::Orders, statement });
            }
        }
        Ok(writes)
    }
}

/// One order's `lines` (sorted by `order_detail_id`) and `_removed` (`{order_detail_id, _v}` of lines gone),
/// changed only by events newer than what the order knows of that line.
#[derive(Debug, Default)]
struct OrderLines {
    lines: Vec<Document>,
    removed: Vec<Document>,
    changed: bool,
}

impl OrderLines {
    fn stored(order: Option<&Document>) -> Self {
        let array = |name| -> Vec<Document> {
            order
                .and_then(|o| o.get_array(name).ok())
                .map(|a| a.iter().filter_map(|b| b.as_document().cloned()).collect())
                .unwrap_or_default()
        };
        OrderLines { lines: array("lines"), removed: array("_removed"), changed: false }
    }

    /// The newest position this order knows for line `id` (present or removed), -1 if none.
    fn seen(&self, id: i32) -> i64 {
        self.lines
            .iter()
            .chain(&self.removed)
            .filter(|l| l.get_i32("order_detail_id").ok() == Some(id))
            .filter_map(|l| l.get_i64("_v").ok())
            .max()
            .unwrap_or(-1)
    }

    fn upsert(&mut self, row: &OrderDetail, pos: i64, product: Option<&Document>) {
        let id = row.order_detail_id;
        if pos <= self.seen(id) {
            return;
        }
        let at = self.lines.iter().position(|l| l.get_i32("order_detail_id").ok() == Some(id));
        let mut line = readmodel::order_line(row, None);
        let product = match product {
            Some(p) => Bson::Document(doc! {
                "name": p.get("name").cloned().unwrap_or(Bson::Null),
                "price": p.get("price").cloned().unwrap_or(Bson::Null),
                "_v": p.get("_v").cloned().unwrap_or(Bson::Null),
            }),
            // Not seen yet: keep what the line had (the products job fills it in when it gets there).
            None => at.and_then(|i| self.lines[i].get("product").cloned()).unwrap_or(Bson::Null),
        };
        line.insert("product", product);
        line.insert("_v", pos);
        match at {
            Some(i) => self.lines[i] = line,
            None => {
                let i = self.lines.partition_point(|l| l.get_i32("order_detail_id").is_ok_and(|other| other < id));
                self.lines.insert(i, line);
            }
        }
        self.changed = true;
    }

    fn remove(&mut self, id: i32, pos: i64) {
        if pos <= self.seen(id) {
            return;
        }
        let is_it = |l: &Document| l.get_i32("order_detail_id").ok() == Some(id);
        self.lines.retain(|l| !is_it(l));
        self.removed.retain(|l| !is_it(l));
        self.removed.push(doc! { "order_detail_id": id, "_v": pos });
        self.changed = true;
    }

    /// Every line older than `pos` leaves (a TRUNCATE of order_details).
    fn truncate(&mut self, pos: i64) {
        let (older, newer): (Vec<Document>, Vec<Document>) =
            std::mem::take(&mut self.lines).into_iter().partition(|l| l.get_i64("_v").unwrap_or(-1) < pos);
        self.lines = newer;
        if !older.is_empty() {
            self.changed = true;
        }
        for line in older {
            let id = line.get_i32("order_detail_id").unwrap_or_default();
            self.removed.push(doc! { "order_detail_id": id, "_v": pos });
        }
    }

    /// `totals` from the lines (the same sums and scale as first_load's and `verify`'s).
    fn totals(&self) -> anyhow::Result<Document> {
        let (mut quantity, mut subtotal, mut total) = (0, Decimal::ZERO, Decimal::ZERO);
        for line in &self.lines {
            let money = |field| {
                line.get(field).and_then(decimal_of).with_context(|| format!("an order line without a decimal {field}"))
            };
            let q = line.get_i32("quantity")?;
            quantity += q;
            subtotal += money("unit_price")? * Decimal::from(q);
            total += money("line_total")?;
        }
        Ok(readmodel::totals(self.lines.len() as i32, quantity, subtotal, total))
    }

    /// The update writing these lines back, if any changed.
    fn statement(self, order_id: i32) -> anyhow::Result<Option<Document>> {
        if !self.changed {
            return Ok(None);
        }
        let totals = self.totals()?;
        Ok(Some(doc! {
            "q": { "_id": order_id },
            "u": { "$set": { "lines": self.lines, "_removed": self.removed, "totals": totals } },
            "upsert": true,
        }))
    }
}

/// The `order_details` document for `row`: the row's fields, and the product's name and the order's status
/// from the documents the transaction sees, or, when one is not known yet, what the other jobs' fan-out
/// stored in the document.
fn detail_document(
    row: &OrderDetail,
    pos: i64,
    stored: Option<&Document>,
    product: Option<&Document>,
    order: Option<&Document>,
) -> Document {
    let mut document = readmodel::order_detail(row, None, None);
    let enrichment = [
        ("product_name", "_pv", product.map(|p| (p.get("name"), p.get("_v")))),
        ("order_status", "_ov", order.map(|o| (o.get("status"), o.get("_v")))),
    ];
    for (field, version, known) in enrichment {
        let (value, v) = match known {
            Some(known) => known,
            None => (stored.and_then(|d| d.get(field)), stored.and_then(|d| d.get(version))),
        };
        document.insert(field, value.cloned().unwrap_or(Bson::Null));
        if let Some(v) = v {
            document.insert(version, v.clone());
        }
    }
    document.insert("_v", pos);
    document.insert("_deleted", false);
    document
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::decimal;

    fn line(id: i32, price: &str, quantity: i32, discount: &str) -> OrderDetail {
        OrderDetail {
            order_detail_id: id,
            order_id: 7,
            product_id: 100 + id,
            unit_price: price.parse().unwrap(),
            quantity,
            discount: discount.parse().unwrap(),
        }
    }

    fn ids(lines: &OrderLines) -> Vec<i32> {
        lines.lines.iter().map(|l| l.get_i32("order_detail_id").unwrap()).collect()
    }

    #[test]
    fn lines_stay_sorted_and_only_newer_changes_apply() {
        let mut lines = OrderLines::stored(None);
        lines.upsert(&line(2, "10.00", 3, "0.150"), 20, None);
        lines.upsert(&line(1, "2.50", 2, "0"), 10, None);
        assert_eq!(ids(&lines), [1, 2]);
        // A replayed older image of line 2 changes nothing.
        lines.upsert(&line(2, "99.00", 9, "0"), 15, None);
        assert_eq!(lines.lines[1].get_i32("quantity").unwrap(), 3);
        // Removed, then a late insert of the same line older than the removal: it stays gone.
        lines.remove(1, 30);
        lines.upsert(&line(1, "2.50", 2, "0"), 25, None);
        assert_eq!(ids(&lines), [2]);
        assert_eq!(lines.removed, vec![doc! { "order_detail_id": 1, "_v": 30_i64 }]);
        // A TRUNCATE newer than every line empties the order.
        lines.truncate(40);
        assert!(lines.lines.is_empty());
        assert!(lines.changed);
    }

    #[test]
    fn totals_match_the_contract_and_a_known_product_is_embedded() {
        let product = doc! { "name": "Tent", "price": decimal("498.80".parse().unwrap()), "_v": 5_i64, "_touch": 3 };
        let mut lines = OrderLines::stored(None);
        let rows = [line(1, "10.00", 3, "0.150"), line(2, "2.50", 2, "0"), line(3, "0.05", 1, "0.500")];
        for (i, row) in rows.iter().enumerate() {
            lines.upsert(row, 10 + i as i64, Some(&product));
        }
        let expected: Vec<_> = rows.iter().map(|r| (r.unit_price, r.quantity, r.discount)).collect();
        assert_eq!(lines.totals().unwrap(), readmodel::order_totals(&expected));
        let embedded = lines.lines[0].get_document("product").unwrap();
        assert_eq!(embedded, &doc! { "name": "Tent", "price": decimal("498.80".parse().unwrap()), "_v": 5_i64 });
        // Unchanged lines write nothing.
        let stored = doc! { "lines": lines.lines.clone(), "_removed": [] };
        let mut again = OrderLines::stored(Some(&stored));
        again.upsert(&rows[0], 10, None);
        assert!(again.statement(7).unwrap().is_none());
    }
}
