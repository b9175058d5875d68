//! products -> the `products` documents, and the product's name and price wherever they are embedded:
//! the lines of `orders` (`lines[].product`) and `order_details.product_name`.

use bson::{Document, doc};

use super::{Collection, Write, decimal, decimal_of, guarded_replace, literal, tombstone, truncate_all};
use crate::envelope::{Event, Toasted};
use crate::readmodel;
use crate::rows::Product;

/// The writes for one product change (`event` already reduced: the last of its key in the batch), given
/// the product's document as the transaction sees it (its name and price): the copies embedded in orders
/// and order_details are only updated when the name or the price differ from it (a stock change, most
/// product changes, touches no order).
pub fn project(event: &Event<Product>, stored: Option<&Document>) -> Vec<Write> {
    let write = |collection, statement| Write { collection, statement };
    match event {
        Event::Upsert { row, source, .. } => {
            let (id, pos) = (row.product_id, source.lsn as i64);
            let mut writes = vec![write(Collection::Products, guarded_replace(id, pos, document(row, pos)))];
            let embedded_as_stored = stored.is_some_and(|d| {
                d.get_str("name").is_ok_and(|name| name == row.name)
                    && d.get("price").and_then(decimal_of) == Some(row.price)
            });
            if embedded_as_stored {
                return writes;
            }
            let product_ref = doc! { "name": &row.name, "price": decimal(row.price), "_v": pos };
            writes.push(write(
                Collection::Orders,
                doc! {
                    "q": { "lines.product_id": row.product_id },
                    "u": { "$set": { "lines.$[line].product": product_ref } },
                    "arrayFilters": [ {
                        "line.product_id": row.product_id,
                        "$or": [ { "line.product._v": { "$lt": pos } }, { "line.product._v": { "$exists": false } } ],
                    } ],
                    "multi": true,
                },
            ));
            writes.push(write(
                Collection::OrderDetails,
                doc! {
                    "q": { "product_id": row.product_id, "_pv": { "$not": { "$gte": pos } } },
                    "u": { "$set": { "product_name": &row.name, "_pv": pos } },
                    "multi": true,
                },
            ));
            writes
        }
        Event::Delete { before, source } => {
            let (id, pos) = (before.product_id, source.lsn as i64);
            vec![write(Collection::Products, guarded_replace(id, pos, tombstone(id, pos)))]
        }
        Event::Truncate { source } => vec![write(Collection::Products, truncate_all(source.lsn as i64))],
        Event::Tombstone => Vec::new(),
    }
}

/// The `products` document as an aggregation expression: every value a literal, except an unavailable
/// (TOASTed, unchanged) description, which keeps the stored one.
fn document(row: &Product, pos: i64) -> Document {
    let description = match &row.description {
        Some(Toasted::Value(text)) => Some(text.as_str()),
        _ => None,
    };
    let plain = readmodel::product(row.product_id, &row.name, description, row.price, row.stock_quantity);
    let mut expr: Document =
        plain.into_iter().map(|(k, v)| if k == "_id" { (k, v) } else { (k, literal(v)) }).collect();
    if row.description == Some(Toasted::Unavailable) {
        expr.insert("description", "$description");
    }
    expr.insert("_v", literal(pos));
    expr
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

    async fn project(
        &self,
        events: &[Event<Product>],
        reads: &mut crate::sink::Reads<'_>,
    ) -> anyhow::Result<Vec<Write>> {
        let mut ids: Vec<i32> = events.iter().filter_map(|e| e.row().map(|r| r.product_id)).collect();
        ids.sort_unstable();
        ids.dedup();
        // Updated within the batch with what an earlier event of the same product (a kept one) leaves behind.
        let mut stored = reads.fields(Collection::Products, &ids, doc! { "name": 1, "price": 1 }).await?;
        let mut writes = Vec::with_capacity(events.len() * 3);
        for event in events {
            let id = event.row().map(|r| r.product_id);
            writes.extend(project(event, id.and_then(|id| stored.get(&id))));
            if let (Some(id), Event::Upsert { row, .. }) = (id, event) {
                stored.insert(id, doc! { "name": &row.name, "price": decimal(row.price) });
            }
        }
        Ok(writes)
    }
}
