//! products -> the `products` documents, and the product's name and price wherever they are embedded:
//! the lines of `orders` (`lines[].product`) and `order_details.product_name`.

use std::collections::HashMap;

use bson::{Document, doc};

use super::{Collection, Write, decimal, decimal_of, guarded_replace, literal, tombstone, truncate_all};
use crate::envelope::{Event, Toasted};
use crate::readmodel;
use crate::rows::Product;

/// Whether a product change must reach the copies of its name and price embedded in orders and
/// order_details, given the product's document as the transaction sees it: when they differ from it (a
/// stock change, most product changes, touches no order) or it has none (a new product, which lines read
/// before it may already hold).
pub fn changes_embedded(event: &Event<Product>, stored: Option<&Document>) -> bool {
    let Event::Upsert { row, .. } = event else { return false };
    !stored.is_some_and(|d| {
        d.get_str("name").is_ok_and(|name| name == row.name) && d.get("price").and_then(decimal_of) == Some(row.price)
    })
}

/// The writes for one product change (`event` already reduced: the last of its key in the batch): its
/// document, and, for a change of its embedded name and price ([`changes_embedded`]), the copies in the
/// collections of `fan_out` (those that hold the product).
pub fn project(event: &Event<Product>, fan_out: &[Collection]) -> Vec<Write> {
    let write = |collection, statement| Write { collection, statement };
    match event {
        Event::Upsert { row, source, .. } => {
            let (id, pos) = (row.product_id, source.lsn as i64);
            let mut writes = vec![write(Collection::Products, guarded_replace(id, pos, document(row, pos)))];
            for &collection in fan_out {
                writes.push(write(collection, fan_out_statement(collection, row, pos)));
            }
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

/// The update of the copies of `row`'s name and price in `collection` (orders' lines or order_details),
/// each guarded by the version it was copied at.
fn fan_out_statement(collection: Collection, row: &Product, pos: i64) -> Document {
    match collection {
        Collection::Orders => doc! {
            "q": { "lines.product_id": row.product_id },
            "u": { "$set": { "lines.$[line].product": { "name": &row.name, "price": decimal(row.price), "_v": pos } } },
            "arrayFilters": [ {
                "line.product_id": row.product_id,
                "$or": [ { "line.product._v": { "$lt": pos } }, { "line.product._v": { "$exists": false } } ],
            } ],
            "multi": true,
        },
        _ => doc! {
            "q": { "product_id": row.product_id, "_pv": { "$not": { "$gte": pos } } },
            "u": { "$set": { "product_name": &row.name, "_pv": pos } },
            "multi": true,
        },
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

    async fn project(&self, events: &[Event<Product>], tx: &mut crate::sink::Txn<'_>) -> anyhow::Result<Vec<Write>> {
        let mut ids: Vec<i32> = events.iter().filter_map(|e| e.row().map(|r| r.product_id)).collect();
        ids.sort_unstable();
        ids.dedup();
        let stored = tx.fields(Collection::Products, &ids, doc! { "name": 1, "price": 1 }).await?;
        // Which events change embedded copies: judged against what an earlier event of the same product (a
        // kept one) leaves behind.
        let mut current: HashMap<i32, Document> = HashMap::new();
        let mut fans_out = Vec::with_capacity(events.len());
        let (mut changed, mut new) = (Vec::new(), Vec::new());
        for event in events {
            let Some(id) = event.row().map(|r| r.product_id) else {
                fans_out.push(false);
                continue;
            };
            let before = current.get(&id).or_else(|| stored.get(&id));
            let fans = changes_embedded(event, before);
            if fans {
                if before.is_some_and(|d| d.contains_key("name")) { changed.push(id) } else { new.push(id) }
            }
            fans_out.push(fans);
            if let Event::Upsert { row, .. } = event {
                current.insert(id, doc! { "name": &row.name, "price": decimal(row.price) });
            }
        }
        for list in [&mut changed, &mut new] {
            list.sort_unstable();
            list.dedup();
        }
        tx.lock_changed_products(&changed, &new).await?;
        // Only where the product is embedded: a fan-out that matches nothing still costs a lookup.
        let mut fanned: Vec<i32> = changed.iter().chain(&new).copied().collect();
        fanned.sort_unstable();
        fanned.dedup();
        let in_orders = tx.present(Collection::Orders, "lines.product_id", &fanned).await?;
        let in_details = tx.present(Collection::OrderDetails, "product_id", &fanned).await?;
        let mut writes = Vec::with_capacity(events.len());
        for (event, fans) in events.iter().zip(fans_out) {
            let id = event.row().map(|r| r.product_id).unwrap_or_default();
            let targets: Vec<Collection> = [(Collection::Orders, &in_orders), (Collection::OrderDetails, &in_details)]
                .into_iter()
                .filter(|(_, holders)| fans && holders.contains(&id))
                .map(|(c, _)| c)
                .collect();
            writes.extend(project(event, &targets));
        }
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Source;

    fn change(name: &str, price: &str) -> Event<Product> {
        let row = Product {
            product_id: 7,
            name: name.into(),
            description: None,
            price: price.parse().unwrap(),
            stock_quantity: 3,
        };
        let source = Source { lsn: 10, tx_id: Some(1), ts_ms: 0, table: "products".into(), snapshot: false };
        Event::Upsert { row, before: None, source }
    }

    #[test]
    fn only_a_new_product_or_a_new_name_or_price_reaches_embedded_copies() {
        let stored = doc! { "name": "Tent", "price": decimal("19.90".parse().unwrap()) };
        assert!(!changes_embedded(&change("Tent", "19.90"), Some(&stored)), "a stock change");
        assert!(changes_embedded(&change("Tent", "21.00"), Some(&stored)));
        assert!(changes_embedded(&change("Big tent", "19.90"), Some(&stored)));
        assert!(changes_embedded(&change("Tent", "19.90"), None), "not seen yet: lines may hold it");
        assert!(changes_embedded(&change("Tent", "19.90"), Some(&doc! { "_deleted": true })));
        let fan_out = project(&change("Tent", "21.00"), &[Collection::Orders]);
        assert_eq!(
            fan_out.iter().map(|w| w.collection).collect::<Vec<_>>(),
            [Collection::Products, Collection::Orders]
        );
    }
}
