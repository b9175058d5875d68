//! The read-model documents of DESIGN.md as plain BSON: one definition of each shape, used by the stream
//! projections, by `verify` (from PostgreSQL rows) and by `first_load`, so a document looks the same
//! whoever wrote it. Fields starting with `_` other than `_id` are bookkeeping (versions, tombstones) and
//! not part of the contract.

use bson::{Bson, Document, doc};
use rust_decimal::Decimal;

use crate::projection::decimal;

/// A `products` document (without bookkeeping). `description: None` is a NULL description.
pub fn product(
    product_id: i32,
    name: &str,
    description: Option<&str>,
    price: Decimal,
    stock_quantity: i32,
) -> Document {
    doc! {
        "_id": product_id,
        "name": name,
        "description": description.map_or(Bson::Null, Bson::from),
        "price": decimal(price),
        "stock_quantity": stock_quantity,
    }
}

/// Strips bookkeeping fields (`_v`, `_deleted`, ...) from a stored document, recursively, keeping `_id`.
pub fn contract_view(doc: &Document) -> Document {
    doc.iter().filter(|(k, _)| *k == "_id" || !k.starts_with('_')).map(|(k, v)| (k.clone(), strip(v))).collect()
}

fn strip(v: &Bson) -> Bson {
    match v {
        Bson::Document(d) => Bson::Document(contract_view(d)),
        Bson::Array(a) => Bson::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

/// Whether a stored document is a tombstone (the row was deleted).
pub fn is_tombstone(doc: &Document) -> bool {
    doc.get_bool("_deleted").unwrap_or(false)
}
