//! Projections: from a batch of one table's change events to the MongoDB writes that bring the read models
//! up to date. This is where the CDC semantics live; the runtime and the sink know nothing of tables.
//!
//! Every write is guarded by the source position (`_v`, the change's WAL position) of what it writes: a
//! document, an embedded line or an embedded product reference changes only when the incoming position is
//! newer. Guards are pipeline updates with `$cond`, never filters that make an upsert collide, so a stale
//! write is a no-op and not an error that would abort the batch's transaction. Deletes leave a tombstone
//! document (`_deleted: true` with its `_v`) so that a replayed older insert cannot resurrect the row;
//! readers and `verify` skip tombstones and every field whose name starts with `_` other than `_id`.

pub mod order_details;
pub mod orders;
pub mod products;

use bson::{Bson, Document, doc};

/// A read collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Collection {
    Products,
    Orders,
    OrderDetails,
}

impl Collection {
    pub fn name(self) -> &'static str {
        match self {
            Collection::Products => "products",
            Collection::Orders => "orders",
            Collection::OrderDetails => "order_details",
        }
    }
}

/// One statement of a MongoDB `update` command (`{q, u, upsert, multi, arrayFilters}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub collection: Collection,
    pub statement: Document,
}

/// `{$literal: v}`: a value inside an aggregation expression that must never be read as a field path or
/// an operator (a product called "$5 deal" stays a name).
pub fn literal(v: impl Into<Bson>) -> Bson {
    Bson::Document(doc! { "$literal": v.into() })
}

/// True when `position` is newer than the version at `path` of the document being updated.
pub fn newer(position: i64, path: &str) -> Document {
    doc! { "$gt": [ position, { "$ifNull": [ path, -1_i64 ] } ] }
}

/// Replaces the document by `replacement` if `position` is newer than its `_v`, else leaves it.
pub fn guarded_replace(id: i32, position: i64, replacement: Document) -> Document {
    doc! {
        "q": { "_id": id },
        "u": [ { "$replaceWith": { "$cond": [ newer(position, "$_v"), replacement, "$$ROOT" ] } } ],
        "upsert": true,
    }
}

/// A tombstone: the row is gone as of `position`.
pub fn tombstone(id: i32, position: i64) -> Document {
    doc! { "_id": id, "_deleted": true, "_v": position }
}

/// Turns every document of a collection older than `position` into a tombstone (a TRUNCATE).
pub fn truncate_all(position: i64) -> Document {
    doc! {
        "q": { "_v": { "$not": { "$gte": position } } },
        "u": [ { "$replaceWith": { "_id": "$_id", "_deleted": true, "_v": { "$literal": position } } } ],
        "multi": true,
    }
}

/// Money as BSON Decimal128, exactly (keeps the scale: 11.00 stays 11.00).
pub fn decimal(d: rust_decimal::Decimal) -> Bson {
    Bson::Decimal128(d.to_string().parse().expect("a rust_decimal always prints as a valid Decimal128"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact_decimal128() {
        let d: rust_decimal::Decimal = "498.80".parse().unwrap();
        assert_eq!(decimal(d).to_string(), "498.80");
    }
}
