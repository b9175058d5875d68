//! products -> the `products` documents, and the product's name and price wherever they are embedded:
//! the lines of `orders` (`lines[].product`) and `order_details.product_name`.
//!
//! The product's document is written before its embedded copies are looked for: the order_details job
//! writes a line first and reads the product after (its re-check), so a line it embeds an older name in is
//! either seen here or sees the new name there.

use std::collections::HashMap;

use bson::{Bson, Document, RawDocument, RawDocumentBuf, doc};
use rust_decimal::Decimal;

use super::{
    Collection, Existing, Write, decimal_of, encode, field, guarded_replace, literal, tombstone, truncate_all,
};
use crate::envelope::{Event, Place, Source, Toasted};
use crate::readmodel;
use crate::rows::Product;
use crate::sink::ReadModels;

/// Which embedded copies of a product a change must reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// Order lines, which copy the name and the price.
    pub lines: bool,
    /// `order_details`, which copies the name only.
    pub details: bool,
}

impl Reach {
    const ALL: Reach = Reach { lines: true, details: true };

    fn or(self, other: Reach) -> Reach {
        Reach { lines: self.lines || other.lines, details: self.details || other.details }
    }
}

/// Which copies a product change must reach, given the name and price its document holds as last written
/// (`None`: no document, or a tombstone): those of a name or price that differs, or all when there is none
/// (a new product, which lines read before it may already hold). A stock change, most product changes,
/// reaches none; a price change only lines.
pub fn changes_embedded(event: &Event<Product>, written: Option<(&str, Option<Decimal>)>) -> Reach {
    let Event::Upsert { row, .. } = event else { return Reach::default() };
    let Some((name, price)) = written else { return Reach::ALL };
    let (name, price) = (name == row.name, price == Some(row.price));
    Reach { lines: !(name && price), details: !name }
}

/// Which copies change `event` (at `pos`) reaches, judged against its product's document as read: none
/// when the document is newer, all when it is this change (a replay) or ahead of its copies (`in_step`
/// false: see [`copies_in_step`]), else by name and price ([`changes_embedded`]).
fn reach_from_document(event: &Event<Product>, pos: i64, document: Option<&RawDocumentBuf>, in_step: bool) -> Reach {
    let stored_v = document.and_then(|d| d.get_i64("_v").ok()).unwrap_or(-1);
    if pos < stored_v {
        Reach::default()
    } else if pos == stored_v || !in_step {
        Reach::ALL
    } else {
        changes_embedded(event, document.and_then(|d| written(d)))
    }
}

/// Whether a `products` document's embedded copies hold what it does. Its change's Kafka offset (`_o`)
/// below the checkpoint of the partition says so: the batch that wrote it committed, and a batch commits
/// after its fan-outs. At or past it, a crash or a failed write may have come between the document and its
/// fan-out, and the replayed batch may have reduced that change away under a later one (a stock change that
/// changes no copy). A document with no offset was written by first_load, whose copies are in step (or,
/// with `_fanned: false`, by a version that marked a fan-out to come instead).
fn copies_in_step(document: &RawDocument, partition: Option<i32>, committed: impl Fn(Place) -> bool) -> bool {
    let place = partition.zip(document.get_i64("_o").ok()).map(|(partition, offset)| Place { partition, offset });
    document.get_bool("_fanned").unwrap_or(true) && place.is_none_or(committed)
}

/// The name and price a `products` document holds, as read (`None` for a tombstone).
fn written(document: &RawDocument) -> Option<(&str, Option<Decimal>)> {
    let price = field(document, "price").and_then(|b| decimal_of(&Bson::try_from(b).ok()?));
    Some((document.get_str("name").ok()?, price))
}

/// The write of one product change to its document.
pub fn project(event: &Event<Product>) -> Option<Write> {
    let statement = match event {
        Event::Upsert { row, source, .. } => {
            let (id, pos) = (row.product_id, source.lsn as i64);
            guarded_replace(id, pos, encode(&document(row, source)))
        }
        Event::Delete { before, source } => {
            let (id, pos) = (before.product_id, source.lsn as i64);
            guarded_replace(id, pos, tombstone(id, pos))
        }
        Event::Truncate { source } => encode(&truncate_all(source.lsn as i64)),
        Event::Tombstone => return None,
    };
    Some(Write::raw(Collection::Products, statement))
}

/// Orders per fan-out statement: a product in a great many orders is fanned out in several, each well under
/// MongoDB's 16 MB statement limit.
const ORDERS_PER_FAN_OUT: usize = 10_000;

/// The updates of the copies of product `id`'s `name` and `price` (as of `pos`) in the lines of `orders`
/// (the orders holding it, as found through `order_details`: the orders' lines have no index of their own,
/// which every write of lines would pay for), each copy guarded by the version it was copied at. Order
/// documents it changes get a new `_lv`, which the order_details job's read-modify-write of lines checks.
pub fn lines_fan_out(id: i32, name: &Bson, price: &Bson, pos: i64, orders: &[i32]) -> Vec<Write> {
    // A copy older than `pos`, or one that has no version (not known when it was copied).
    let older = |path: &str| bson::bson!([ { path: { "$lt": pos } }, { path: { "$exists": false } } ]);
    let statement = |orders: &[i32]| {
        doc! {
            "q": { "_id": { "$in": orders }, "lines": { "$elemMatch": { "product_id": id, "$or": older("product._v") } } },
            "u": {
                "$set": { "lines.$[line].product": { "name": name, "price": price, "_v": pos } },
                "$inc": { "_lv": 1_i64 },
            },
            "arrayFilters": [ { "line.product_id": id, "$or": older("line.product._v") } ],
            "multi": true,
        }
    };
    orders.chunks(ORDERS_PER_FAN_OUT).map(|chunk| Write::new(Collection::Orders, statement(chunk))).collect()
}

/// The update of the copies of product `id`'s `name` (as of `pos`) in `order_details` (which hold no price),
/// each guarded by the version it was copied at.
pub fn details_fan_out(id: i32, name: &Bson, pos: i64) -> Write {
    let statement = doc! {
        "q": { "product_id": id, "_pv": { "$not": { "$gte": pos } } },
        "u": { "$set": { "product_name": name, "_pv": pos } },
        "multi": true,
    };
    Write::new(Collection::OrderDetails, statement)
}

/// The `products` document as an aggregation expression: every value a literal, except an unavailable
/// (TOASTed, unchanged) description, which keeps the stored one.
fn document(row: &Product, source: &Source) -> Document {
    let mut expr: Document = plain_document(row, source)
        .into_iter()
        .map(|(k, v)| if k == "_id" { (k, v) } else { (k, literal(v)) })
        .collect();
    if row.description == Some(Toasted::Unavailable) {
        expr.insert("description", "$description");
    }
    expr
}

/// The `products` document of `row` as of `source` where there is none: what [`document`] makes of it then
/// (an unavailable description, kept from a stored document that does not exist, is left out). It records
/// the change's version (`_v`) and its Kafka offset (`_o`, see [`copies_in_step`]).
fn plain_document(row: &Product, source: &Source) -> Document {
    let description = match &row.description {
        Some(Toasted::Value(text)) => Some(text.as_str()),
        _ => None,
    };
    let mut document = readmodel::product(row.product_id, &row.name, description, row.price, row.stock_quantity);
    if row.description == Some(Toasted::Unavailable) {
        document.remove("description");
    }
    document.insert("_v", source.lsn as i64);
    if let Some(place) = source.place {
        document.insert("_o", place.offset);
    }
    document
}

/// What [`project`] writes where the product has no document: the document, or a tombstone.
fn new_document(event: &Event<Product>) -> Option<RawDocumentBuf> {
    match event {
        Event::Upsert { row, source, .. } => Some(encode(&plain_document(row, source))),
        Event::Delete { before, source } => Some(tombstone(before.product_id, source.lsn as i64)),
        Event::Truncate { .. } | Event::Tombstone => None,
    }
}

/// The `stream_products` job.
pub struct ProductsJob;

impl crate::runtime::Job for ProductsJob {
    const TABLE: &'static str = "products";
    const BIN: &'static str = "stream_products";
    type Row = Product;

    fn key(row: &Product) -> i32 {
        row.product_id
    }

    async fn apply(&self, events: &[Event<Product>], store: &ReadModels<'_>) -> anyhow::Result<()> {
        let mut ids: Vec<i32> = events.iter().filter_map(|e| e.row().map(|r| r.product_id)).collect();
        ids.sort_unstable();
        ids.dedup();
        let projection = doc! { "name": 1, "price": 1, "_v": 1, "_o": 1, "_fanned": 1 };
        let stored = store.fields(Collection::Products, &ids, projection).await?;
        // Which changes reach embedded copies: judged against what an earlier event of the same product (a
        // kept one) leaves behind, or the document when its copies hold what it does. A change the
        // document already holds is a replay, and a document ahead of its copies ([`copies_in_step`]) fans
        // out again whatever change comes (guarded, it changes nothing twice).
        let mut current: HashMap<i32, (&str, Option<Decimal>)> = HashMap::new();
        let mut fanned: HashMap<i32, (&Product, i64, Reach)> = HashMap::new();
        for event in events {
            let Event::Upsert { row, source, .. } = event else { continue };
            let (id, pos) = (row.product_id, source.lsn as i64);
            let reach = match current.get(&id) {
                Some(&before) => changes_embedded(event, Some(before)),
                None => {
                    let document = stored.get(&id);
                    let partition = source.place.map(|p| p.partition);
                    let in_step = document.is_none_or(|d| copies_in_step(d, partition, |p| store.committed(p)));
                    reach_from_document(event, pos, document, in_step)
                }
            };
            if reach != Reach::default() {
                let earlier = fanned.get(&id).map_or(Reach::default(), |&(_, _, r)| r);
                fanned.insert(id, (row, pos, reach.or(earlier)));
            }
            current.insert(id, (&row.name, Some(row.price)));
        }
        let existing = Existing::known(stored.keys().copied(), events);
        existing.write(store, Collection::Products, events, Self::key, new_document, project).await?;
        // Only where the product is embedded, looked for after its document is written: an order line has
        // its order_details document, written before it, and that collection's index on (product_id,
        // order_id) answers for both (a fan-out that matches nothing still costs a lookup).
        let mut targets: Vec<i32> = fanned.keys().copied().collect();
        targets.sort_unstable();
        let holders = store.holders(&targets).await?;
        let mut writes = Vec::new();
        for (id, orders) in &holders {
            let (row, pos, reach) = fanned[id];
            let (name, price) = (Bson::String(row.name.clone()), Bson::Decimal128(readmodel::money(row.price)));
            if reach.lines {
                writes.extend(lines_fan_out(*id, &name, &price, pos, orders));
            }
            if reach.details {
                writes.push(details_fan_out(*id, &name, pos));
            }
        }
        store.write(writes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Source;
    use crate::projection::{decimal, encode};

    fn change(name: &str, price: &str) -> Event<Product> {
        let row = Product {
            product_id: 7,
            name: name.into(),
            description: None,
            price: price.parse().unwrap(),
            stock_quantity: 3,
        };
        let source = Source { lsn: 10, tx_id: Some(1), ts_ms: 0, snapshot: false, place: None, redriven: false };
        Event::Upsert { row, before: None, source }
    }

    #[test]
    fn a_document_ahead_of_its_copies_fans_out_any_later_change() {
        let stored = |offset: Option<i64>, fanned: Option<bool>| {
            let mut d = doc! { "name": "Tent", "price": decimal("19.90".parse().unwrap()), "_v": 5_i64 };
            if let Some(offset) = offset {
                d.insert("_o", offset);
            }
            if let Some(fanned) = fanned {
                d.insert("_fanned", fanned);
            }
            encode(&d)
        };
        // Partition 2 is checkpointed at offset 40: records below it were written by committed batches.
        let committed = |p: Place| p.partition == 2 && p.offset < 40;
        let in_step = |d: &RawDocumentBuf| copies_in_step(d, Some(2), committed);
        assert!(in_step(&stored(Some(39), None)), "its batch committed after its fan-out");
        assert!(!in_step(&stored(Some(40), None)), "written by a batch that did not commit");
        assert!(in_step(&stored(None, None)), "written by first_load");
        assert!(!in_step(&stored(None, Some(false))), "marked by an older version");
        assert!(copies_in_step(&stored(Some(40), None), None, committed), "a change not read from Kafka");

        let stock_change = change("Tent", "19.90");
        let document = stored(Some(39), None);
        // Copies in step: a stock change reaches none.
        assert_eq!(reach_from_document(&stock_change, 10, Some(&document), true), Reach::default());
        // Written, then a crash before its fan-out: the replay may hold only this later change.
        assert_eq!(reach_from_document(&stock_change, 10, Some(&document), false), Reach::ALL);
        // The document's own change replayed; an older one.
        assert_eq!(reach_from_document(&stock_change, 5, Some(&document), true), Reach::ALL);
        assert_eq!(reach_from_document(&stock_change, 3, Some(&document), false), Reach::default());
    }

    #[test]
    fn a_product_in_many_orders_fans_out_in_statements_of_bounded_size() {
        let orders: Vec<i32> = (1..=25_000).collect();
        let writes = lines_fan_out(7, &Bson::from("Tent"), &decimal("19.90".parse().unwrap()), 10, &orders);
        let sizes: Vec<usize> = writes
            .iter()
            .map(|w| {
                let statement = Document::try_from(w.statement.as_ref()).unwrap();
                statement.get_document("q").unwrap().get_document("_id").unwrap().get_array("$in").unwrap().len()
            })
            .collect();
        assert_eq!(sizes, [10_000, 10_000, 5_000]);
        assert!(writes.iter().all(|w| w.collection == Collection::Orders));
    }

    #[test]
    fn only_a_new_product_or_a_new_name_or_price_reaches_embedded_copies() {
        let stored = encode(&doc! { "name": "Tent", "price": decimal("19.90".parse().unwrap()), "_v": 3_i64 });
        let stored = written(&stored);
        let (none, lines) = (Reach::default(), Reach { lines: true, details: false });
        assert_eq!(changes_embedded(&change("Tent", "19.90"), stored), none, "a stock change");
        assert_eq!(changes_embedded(&change("Tent", "21.00"), stored), lines, "order_details hold no price");
        assert_eq!(changes_embedded(&change("Big tent", "19.90"), stored), Reach::ALL);
        assert_eq!(changes_embedded(&change("Tent", "19.90"), None), Reach::ALL, "not seen yet: lines may hold it");
        let tombstone = encode(&doc! { "_id": 7, "_deleted": true, "_v": 4_i64 });
        assert_eq!(changes_embedded(&change("Tent", "19.90"), written(&tombstone)), Reach::ALL);
    }
}
