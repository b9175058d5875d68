//! The read-model documents of DESIGN.md as plain BSON: one definition of each shape, used by the stream
//! projections, by `verify` (from PostgreSQL rows) and by `first_load`, so a document looks the same
//! whoever wrote it. Fields starting with `_` other than `_id` are bookkeeping (versions, tombstones) and
//! not part of the contract.
//!
//! The shapes written once per change (an order's header, an order line, its totals, an order_details
//! document) are built as raw BSON: as `Document`s (an index map and a key string per field, then encoded) they were most of
//! order_details' projection, which took 45% of that job's CPU.

use bson::raw::{BindRawBsonRef, cstr};
use bson::{Bson, DateTime, Decimal128, Document, RawBson, RawDocument, RawDocumentBuf, doc, rawdoc};
use rust_decimal::Decimal;

use crate::projection::decimal128;
use crate::rows::OrderDetail;

/// MongoDB's limit on a document's size (`maxBsonObjectSize`): an order with enough lines reaches it.
pub const MAX_DOCUMENT_BYTES: usize = 16 << 20;

/// Money in one form whoever read it, exactly: at least the contract's 2 decimals (`numeric(10,2)`:
/// PostgreSQL's binary protocol gives a zero as `0`, Debezium as `"0.00"`), more only where the value has
/// them (a column migrated to `numeric(12,4)` holds `12.3400` for `12.34`, which a document written before
/// the migration has as `12.34`).
pub fn money(d: Decimal) -> Decimal128 {
    decimal128(canonical(d, 2))
}

/// A discount rate the same way, at least at its column's 3 decimals (`numeric(4,3)`).
fn rate(d: Decimal) -> Decimal128 {
    decimal128(canonical(d, 3))
}

fn canonical(d: Decimal, decimals: u32) -> Decimal {
    let mut d = if d.scale() > decimals { d.normalize() } else { d };
    if d.scale() < decimals {
        d.rescale(decimals);
    }
    d
}

/// A raw shape of this module as a `Document`, for the callers that compare or extend documents.
pub fn document(raw: &RawDocument) -> Document {
    Document::try_from(raw).expect("the shapes of this module are valid BSON")
}

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
        "price": money(price),
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

/// An `orders` document's `_id` and header fields. `order_date` is epoch microseconds (stored as a Date, to
/// the millisecond, rounded down).
pub fn order_header(
    order_id: i32,
    customer_name: &str,
    address: &str,
    phone: &str,
    order_date_us: Option<i64>,
    status: Option<&str>,
) -> RawDocumentBuf {
    let order_date =
        order_date_us.map_or(RawBson::Null, |us| RawBson::DateTime(DateTime::from_millis(us.div_euclid(1000))));
    rawdoc! {
        "_id": order_id,
        "customer_name": customer_name,
        "address": address,
        "phone": phone,
        "order_date": order_date,
        "status": status.map_or(RawBson::Null, RawBson::from),
    }
}

/// A line's amount after discount, to the cent (half to even, as MongoDB's `$round` does).
pub fn line_total(unit_price: Decimal, quantity: i32, discount: Decimal) -> Decimal {
    (unit_price * Decimal::from(quantity) * (Decimal::ONE - discount))
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven)
}

/// An order line as embedded in `orders.lines`; `product` is its [`line_product`] (null if not known yet).
pub fn order_line(row: &OrderDetail, product: Option<RawDocumentBuf>) -> RawDocumentBuf {
    order_line_with_total(row, product, line_total(row.unit_price, row.quantity, row.discount))
}

/// [`order_line`] with its [`line_total`] computed elsewhere (first_load computes it in bulk).
pub fn order_line_with_total(
    row: &OrderDetail,
    product: Option<RawDocumentBuf>,
    line_total: Decimal,
) -> RawDocumentBuf {
    rawdoc! {
        "order_detail_id": row.order_detail_id,
        "product_id": row.product_id,
        "product": product.map_or(RawBson::Null, RawBson::Document),
        "unit_price": money(row.unit_price),
        "quantity": row.quantity,
        "discount": rate(row.discount),
        "line_total": money(line_total),
    }
}

/// A line's copy of its product, `{name, price}` (a price as [`money`]), with the product's version `_v`
/// (bookkeeping) when given.
pub fn line_product(name: impl BindRawBsonRef, price: impl BindRawBsonRef, version: Option<i64>) -> RawDocumentBuf {
    let mut copy = RawDocumentBuf::new();
    copy.append(cstr!("name"), name);
    copy.append(cstr!("price"), price);
    if let Some(version) = version {
        copy.append(cstr!("_v"), version);
    }
    copy
}

/// `totals` of an order from its lines (the same sums the stream computes in MongoDB; see
/// [`crate::projection::order_details`]).
pub fn order_totals(lines: &[(Decimal, i32, Decimal)]) -> RawDocumentBuf {
    // Prices have two decimals and line totals are rounded to them, so every sum is exact in cents.
    let subtotal: Decimal = lines.iter().map(|(p, q, _)| *p * Decimal::from(*q)).sum();
    let total: Decimal = lines.iter().map(|(p, q, d)| line_total(*p, *q, *d)).sum();
    totals(lines.len() as i32, lines.iter().map(|(_, q, _)| q).sum::<i32>(), subtotal, total)
}

/// `totals` from its sums: lines, quantity, sum of price x quantity, sum of line totals.
pub fn totals(items: i32, quantity: i32, subtotal: Decimal, total: Decimal) -> RawDocumentBuf {
    rawdoc! {
        "items": items,
        "quantity": quantity,
        "subtotal": money(subtotal),
        "discount": money(subtotal - total),
        "total": money(total),
    }
}

/// An `order_details` document: the row plus the product's name and the order's status.
pub fn order_detail(row: &OrderDetail, product_name: Option<&str>, order_status: Option<&str>) -> RawDocumentBuf {
    rawdoc! {
        "_id": row.order_detail_id,
        "order_id": row.order_id,
        "product_id": row.product_id,
        "unit_price": money(row.unit_price),
        "quantity": row.quantity,
        "discount": rate(row.discount),
        "product_name": product_name.map_or(RawBson::Null, RawBson::from),
        "order_status": order_status.map_or(RawBson::Null, RawBson::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn line_totals_round_half_to_even_to_the_cent() {
        assert_eq!(line_total(dec("10.00"), 3, dec("0.150")).to_string(), "25.50");
        assert_eq!(line_total(dec("0.05"), 1, dec("0.500")).to_string(), "0.02"); // 0.025 -> 0.02
        assert_eq!(line_total(dec("0.15"), 1, dec("0.500")).to_string(), "0.08"); // 0.075 -> 0.08
    }

    #[test]
    fn money_keeps_every_decimal_it_has_and_at_least_two() {
        let shown = |s: &str| money(dec(s)).to_string();
        assert_eq!(shown("12.3"), "12.30");
        assert_eq!(shown("0"), "0.00");
        assert_eq!(shown("12.3400"), "12.34");
        assert_eq!(shown("12.3449"), "12.3449");
        assert_eq!(shown("12.34490"), "12.3449");
        assert_eq!(shown("1000.000"), "1000.00");
        assert_eq!(rate(dec("0.15")).to_string(), "0.150");
        assert_eq!(rate(dec("0.1250")).to_string(), "0.125");
        assert_eq!(rate(dec("0.1255")).to_string(), "0.1255");
    }

    #[test]
    fn totals_are_sums_in_cents_and_zero_for_no_lines() {
        let t = document(&order_totals(&[(dec("10.00"), 3, dec("0.150")), (dec("2.50"), 2, dec("0.000"))]));
        assert_eq!(t.get_i32("items").unwrap(), 2);
        assert_eq!(t.get_i32("quantity").unwrap(), 5);
        assert_eq!(t.get("subtotal").unwrap().to_string(), "35.00");
        assert_eq!(t.get("discount").unwrap().to_string(), "4.50");
        assert_eq!(t.get("total").unwrap().to_string(), "30.50");
        let empty = document(&order_totals(&[]));
        assert_eq!(empty.get("total").unwrap().to_string(), "0.00");
    }
}
