//! `verify`: computes the read models straight from PostgreSQL and compares them with MongoDB.
//!
//! Both sides are streamed in `_id` order and merge-joined, so memory stays flat however large the tables.
//! Tombstones and bookkeeping fields are not part of the comparison (see [`crate::readmodel`]).

use std::fmt;

use anyhow::{Context, Result};
use bson::{Bson, Document, doc};
use futures::{Stream, StreamExt, TryStreamExt};
use mongodb::Database;
use rust_decimal::Decimal;
use sqlx::PgConnection;

use crate::projection::Collection;
use crate::readmodel;
use crate::rows::OrderDetail;

/// How one read collection compares with its projection from PostgreSQL.
#[derive(Debug, Default, Clone)]
pub struct CollectionReport {
    pub name: &'static str,
    pub expected: u64,
    pub actual: u64,
    pub missing: u64,
    pub unexpected: u64,
    pub different: u64,
    /// The first differences, readable.
    pub examples: Vec<String>,
}

impl CollectionReport {
    pub fn is_equal(&self) -> bool {
        self.missing == 0 && self.unexpected == 0 && self.different == 0
    }
}

impl fmt::Display for CollectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_equal() { "equal" } else { "DIFFERENT" };
        writeln!(
            f,
            "{:<14} {verdict:<9} expected {}, found {}: {} missing, {} unexpected, {} different",
            self.name, self.expected, self.actual, self.missing, self.unexpected, self.different
        )?;
        for e in &self.examples {
            writeln!(f, "    {e}")?;
        }
        Ok(())
    }
}

/// Compares `collection` in `db` with its projection from the PostgreSQL connection; keeps `examples` of
/// the differences.
pub async fn compare(
    pg: &mut PgConnection,
    db: &Database,
    collection: Collection,
    examples: usize,
) -> Result<CollectionReport> {
    let expected = expected_documents(pg, collection);
    let actual = db
        .collection::<Document>(collection.name())
        .find(doc! { "_deleted": { "$ne": true } })
        .sort(doc! { "_id": 1 })
        .await
        .with_context(|| format!("reading {} from MongoDB", collection.name()))?
        .map_err(anyhow::Error::new)
        .map_ok(|d| readmodel::contract_view(&d));
    merge(collection.name(), expected, actual, examples).await
}

async fn merge(
    name: &'static str,
    expected: impl Stream<Item = Result<Document>>,
    actual: impl Stream<Item = Result<Document>>,
    examples: usize,
) -> Result<CollectionReport> {
    let mut report = CollectionReport { name, ..Default::default() };
    let (mut expected, mut actual) = (Box::pin(expected.fuse()), Box::pin(actual.fuse()));
    let (mut e, mut a) = (expected.try_next().await?, actual.try_next().await?);
    let id = |d: &Document| d.get("_id").and_then(bson::Bson::as_i32).unwrap_or(i32::MIN);
    let note = |report: &mut CollectionReport, text: String| {
        if report.examples.len() < examples {
            report.examples.push(text);
        }
    };
    loop {
        match (&e, &a) {
            (None, None) => break,
            (Some(x), Some(y)) if id(x) == id(y) => {
                report.expected += 1;
                report.actual += 1;
                if x != y {
                    report.different += 1;
                    note(&mut report, format!("_id {}: {}", id(x), difference(x, y)));
                }
                (e, a) = (expected.try_next().await?, actual.try_next().await?);
            }
            (Some(x), y) if y.as_ref().is_none_or(|y| id(x) < id(y)) => {
                report.expected += 1;
                report.missing += 1;
                note(&mut report, format!("_id {}: missing, expected {x}", id(x)));
                e = expected.try_next().await?;
            }
            (_, Some(y)) => {
                report.actual += 1;
                report.unexpected += 1;
                note(&mut report, format!("_id {}: unexpected {y}", id(y)));
                a = actual.try_next().await?;
            }
            (Some(_), None) => unreachable!("handled above"),
        }
    }
    Ok(report)
}

/// What differs between the document expected and the one found, field by field, each value cut short:
/// whole documents (an order of thousands of lines) would be megabytes of report.
fn difference(expected: &Document, found: &Document) -> String {
    let mut parts = Vec::new();
    for (key, x) in expected {
        match (found.get(key), x) {
            (None, _) => parts.push(format!("{key} missing, expected {}", brief(Some(x)))),
            (Some(Bson::Array(ys)), Bson::Array(xs)) if xs != ys => {
                let at = xs.iter().zip(ys).position(|(x, y)| x != y).unwrap_or(xs.len().min(ys.len()));
                parts.push(format!(
                    "{key}: {} expected, {} found, from [{at}] on: expected {}, found {}",
                    xs.len(),
                    ys.len(),
                    brief(xs.get(at)),
                    brief(ys.get(at))
                ));
            }
            (Some(y), _) if y != x => {
                parts.push(format!("{key}: expected {}, found {}", brief(Some(x)), brief(Some(y))))
            }
            _ => {}
        }
    }
    for (key, y) in found.iter().filter(|(key, _)| !expected.contains_key(key)) {
        parts.push(format!("{key} unexpected: {}", brief(Some(y))));
    }
    parts.join("; ")
}

/// A value as BSON's extended JSON, at most 200 characters of it.
fn brief(value: Option<&Bson>) -> String {
    const SHOWN: usize = 200;
    let Some(value) = value else { return "nothing".into() };
    let text = value.to_string();
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}... ({} characters)", &text[..cut], text.chars().count()),
        None => text,
    }
}

/// One line of an order as the verify query aggregates it.
#[derive(serde::Deserialize)]
struct SourceLine {
    order_detail_id: i32,
    product_id: i32,
    name: String,
    #[serde(with = "rust_decimal::serde::str")]
    price: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    unit_price: Decimal,
    quantity: i32,
    #[serde(with = "rust_decimal::serde::str")]
    discount: Decimal,
}

/// The documents a collection should hold, from PostgreSQL, in `_id` order.
fn expected_documents<'a>(
    pg: &'a mut PgConnection,
    collection: Collection,
) -> impl Stream<Item = Result<Document>> + 'a {
    match collection {
        Collection::Products => sqlx::query_as::<_, (i32, String, Option<String>, Decimal, i32)>(
            "SELECT product_id, name, description, price, stock_quantity::int4 FROM products ORDER BY product_id",
        )
        .fetch(pg)
        .map_err(|e| anyhow::Error::new(e).context("reading products from PostgreSQL"))
        .map_ok(|(id, name, description, price, stock)| {
            readmodel::product(id, &name, description.as_deref(), price, stock)
        })
        .boxed(),
        Collection::Orders => sqlx::query_as::<_, (i32, String, String, String, Option<i64>, Option<String>, sqlx::types::Json<Vec<SourceLine>>)>(
            r#"
            SELECT o.order_id, o.customer_name, o.address, o.phone,
                   (extract(epoch FROM o.order_date) * 1000000)::bigint, o.status,
                   coalesce(json_agg(json_build_object(
                       'order_detail_id', d.order_detail_id, 'product_id', d.product_id,
                       'name', p.name, 'price', p.price::text, 'unit_price', d.unit_price::text,
                       'quantity', d.quantity, 'discount', d.discount::text) ORDER BY d.order_detail_id)
                     FILTER (WHERE d.order_detail_id IS NOT NULL), '[]'::json)
            FROM orders o
            LEFT JOIN order_details d ON d.order_id = o.order_id
            LEFT JOIN products p ON p.product_id = d.product_id
            GROUP BY o.order_id
            ORDER BY o.order_id
            "#,
        )
        .fetch(pg)
        .map_err(|e| anyhow::Error::new(e).context("reading orders from PostgreSQL"))
        .map_ok(|(id, name, address, phone, date, status, lines)| {
            let header = readmodel::order_header(id, &name, &address, &phone, date, status.as_deref());
            let mut order = readmodel::document(&header);
            let lines = lines.0;
            order.insert(
                "lines",
                lines
                    .iter()
                    .map(|l| {
                        let row = OrderDetail {
                            order_detail_id: l.order_detail_id,
                            order_id: id,
                            product_id: l.product_id,
                            unit_price: l.unit_price,
                            quantity: l.quantity,
                            discount: l.discount,
                        };
                        let product = readmodel::line_product(l.name.as_str(), readmodel::money(l.price), None);
                        readmodel::document(&readmodel::order_line(&row, Some(product)))
                    })
                    .collect::<Vec<_>>(),
            );
            let amounts: Vec<(Decimal, i32, Decimal)> = lines.iter().map(|l| (l.unit_price, l.quantity, l.discount)).collect();
            order.insert("totals", readmodel::document(&readmodel::order_totals(&amounts)));
            order
        })
        .boxed(),
        Collection::OrderDetails => sqlx::query_as::<_, (i32, i32, i32, Decimal, i32, Decimal, String, Option<String>)>(
            "SELECT d.order_detail_id, d.order_id, d.product_id, d.unit_price, d.quantity::int4, d.discount, p.name, o.status \
             FROM order_details d JOIN products p ON p.product_id = d.product_id JOIN orders o ON o.order_id = d.order_id \
             ORDER BY d.order_detail_id",
        )
        .fetch(pg)
        .map_err(|e| anyhow::Error::new(e).context("reading order_details from PostgreSQL"))
        .map_ok(|(order_detail_id, order_id, product_id, unit_price, quantity, discount, name, status)| {
            let row = OrderDetail { order_detail_id, order_id, product_id, unit_price, quantity, discount };
            readmodel::document(&readmodel::order_detail(&row, Some(&name), status.as_deref()))
        })
        .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_names_the_fields_and_where_a_list_parts() {
        let line = |id: i32| doc! { "order_detail_id": id, "quantity": 1 };
        let expected = doc! { "_id": 1, "status": "paid", "lines": (1..=3).map(line).collect::<Vec<_>>() };
        let found = doc! { "_id": 1, "status": "pending", "lines": [line(1), line(2)], "extra": true };
        assert_eq!(
            difference(&expected, &found),
            "status: expected \"paid\", found \"pending\"; \
             lines: 3 expected, 2 found, from [2] on: expected { \"order_detail_id\": 3, \"quantity\": 1 }, found nothing; \
             extra unexpected: true"
        );
        let long = doc! { "_id": 1, "name": "n".repeat(1000) };
        let shown = difference(&long, &doc! { "_id": 1 });
        assert!(
            shown.starts_with("name missing, expected \"nnn") && shown.ends_with("... (1002 characters)"),
            "{shown}"
        );
    }
}
