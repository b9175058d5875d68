//! The denormalised documents of one orders key range, computed with polars: lines joined with their
//! product and their order, each line's total, each order's totals; then written out as BSON in the
//! read-model shapes of [`cdc_cqrs::readmodel`], with version 0 everywhere so that any change the stream
//! applies afterwards is newer.
//!
//! Amounts are exact integers: cents for money, thousandths for the discount. A line total is
//! `price x quantity x (1000 - discount)` thousandths of a cent, rounded half to even to the cent, as the
//! stream rounds it.

use anyhow::{Context, Result, bail};
use bson::raw::cstr;
use bson::{RawArrayBuf, RawDocumentBuf};
use cdc_cqrs::projection::encode;
use cdc_cqrs::readmodel;
use cdc_cqrs::rows::OrderDetail;
use polars::prelude::*;
use rust_decimal::Decimal;

use crate::source::{OrderRange, Products};

/// Above this, `price x quantity x 1000` would not fit in 64 bits.
const LARGEST_LINE_CENTS: i128 = (i64::MAX / 1000) as i128;

/// The documents of one key range, ready for `insert_many` (as raw BSON, the shapes' own form).
#[derive(Debug, Default)]
pub struct Documents {
    pub orders: Vec<RawDocumentBuf>,
    pub order_details: Vec<RawDocumentBuf>,
}

/// `products` documents (nothing to join: one row, one document).
pub fn product_documents(rows: Products) -> Vec<RawDocumentBuf> {
    (0..rows.product_id.len())
        .map(|i| {
            let mut d = readmodel::product(
                rows.product_id[i],
                &rows.name[i],
                rows.description[i].as_deref(),
                Decimal::new(rows.price_cents[i], 2),
                rows.stock_quantity[i],
            );
            d.insert("_v", 0_i64);
            encode(&d)
        })
        .collect()
}

/// The `orders` and `order_details` documents of one orders key range.
pub fn order_documents(range: OrderRange) -> Result<Documents> {
    let OrderRange { orders, lines, products } = range;
    let too_large = lines
        .unit_price_cents
        .iter()
        .zip(&lines.quantity)
        .any(|(&p, &q)| i128::from(p) * i128::from(q) > LARGEST_LINE_CENTS);
    if too_large {
        bail!(
            "a line's price x quantity exceeds {LARGEST_LINE_CENTS} cents: too large for first_load's exact arithmetic"
        );
    }
    let orders = df!(
        "order_id" => orders.order_id,
        "customer_name" => orders.customer_name,
        "address" => orders.address,
        "phone" => orders.phone,
        "order_date_us" => orders.order_date_us,
        "status" => orders.status,
    )?;
    let lines = df!(
        "order_detail_id" => lines.order_detail_id,
        "order_id" => lines.order_id,
        "product_id" => lines.product_id,
        "unit_price_cents" => lines.unit_price_cents,
        "quantity" => lines.quantity,
        "discount_milli" => lines.discount_milli,
    )?;
    let products = df!(
        "product_id" => products.product_id,
        "name" => products.name,
        "price_cents" => products.price_cents,
    )?;
    let (orders, lines) =
        anyhow::Context::context(denormalise(orders, lines, products), "computing the order documents")?;
    to_bson(&orders, &lines)
}

/// Lines with their product, order status and total, sorted by (order, line); orders with their totals,
/// sorted by order.
fn denormalise(orders: DataFrame, lines: DataFrame, products: DataFrame) -> PolarsResult<(DataFrame, DataFrame)> {
    let amount = col("unit_price_cents") * col("quantity").cast(DataType::Int64);
    let thousandths = amount.clone() * (lit(1000_i64) - col("discount_milli"));
    let cents = thousandths.clone().floor_div(lit(1000_i64));
    let rest = thousandths % lit(1000_i64);
    let round_up =
        rest.clone().gt(lit(500_i64)).or(rest.eq(lit(500_i64)).and((cents.clone() % lit(2_i64)).eq(lit(1_i64))));
    let line_total = when(round_up).then(cents.clone() + lit(1_i64)).otherwise(cents);

    let status = orders.clone().lazy().select([col("order_id"), col("status")]);
    let lines = lines
        .lazy()
        .join(products.lazy(), [col("product_id")], [col("product_id")], JoinArgs::new(JoinType::Left))
        .join(status, [col("order_id")], [col("order_id")], JoinArgs::new(JoinType::Left))
        .with_columns([amount.alias("amount_cents"), line_total.alias("line_total_cents")])
        .sort(["order_id", "order_detail_id"], SortMultipleOptions::default())
        .collect()?;
    let totals = lines.clone().lazy().group_by([col("order_id")]).agg([
        len().cast(DataType::Int32).alias("items"),
        col("quantity").cast(DataType::Int64).sum().alias("quantity_sum"),
        col("amount_cents").sum().alias("subtotal_cents"),
        col("line_total_cents").sum().alias("total_cents"),
    ]);
    let orders = orders
        .lazy()
        .join(totals, [col("order_id")], [col("order_id")], JoinArgs::new(JoinType::Left))
        .with_columns([
            col("items").fill_null(lit(0_i32)),
            col("quantity_sum").fill_null(lit(0_i64)),
            col("subtotal_cents").fill_null(lit(0_i64)),
            col("total_cents").fill_null(lit(0_i64)),
        ])
        .sort(["order_id"], SortMultipleOptions::default())
        .collect()?;
    Ok((orders, lines))
}

fn to_bson(orders: &DataFrame, lines: &DataFrame) -> Result<Documents> {
    let i32s =
        |df: &DataFrame, name: &str| -> Result<Vec<Option<i32>>> { Ok(df.column(name)?.i32()?.iter().collect()) };
    let i64s =
        |df: &DataFrame, name: &str| -> Result<Vec<Option<i64>>> { Ok(df.column(name)?.i64()?.iter().collect()) };
    let strs = |df: &DataFrame, name: &str| -> Result<Vec<Option<String>>> {
        Ok(df.column(name)?.str()?.iter().map(|s| s.map(str::to_owned)).collect())
    };
    let required = |v: Option<i32>| v.context("a key column holds a null");

    let (l_id, l_order, l_product) =
        (i32s(lines, "order_detail_id")?, i32s(lines, "order_id")?, i32s(lines, "product_id")?);
    let (l_price, l_quantity, l_discount) =
        (i64s(lines, "unit_price_cents")?, i32s(lines, "quantity")?, i64s(lines, "discount_milli")?);
    let (l_name, l_product_price, l_status, l_total) =
        (strs(lines, "name")?, i64s(lines, "price_cents")?, strs(lines, "status")?, i64s(lines, "line_total_cents")?);

    let mut out =
        Documents { orders: Vec::with_capacity(orders.height()), order_details: Vec::with_capacity(lines.height()) };
    // (order, line, embedded line), in the frame's (order, line) order.
    let mut order_lines: Vec<(i32, i32, RawDocumentBuf)> = Vec::with_capacity(lines.height());
    for i in 0..lines.height() {
        let row = OrderDetail {
            order_detail_id: required(l_id[i])?,
            order_id: required(l_order[i])?,
            product_id: required(l_product[i])?,
            unit_price: Decimal::new(l_price[i].unwrap_or(0), 2),
            quantity: l_quantity[i].unwrap_or(0),
            discount: Decimal::new(l_discount[i].unwrap_or(0), 3),
        };
        let (name, price) = match (&l_name[i], l_product_price[i]) {
            (Some(name), Some(price)) => (name.as_str(), Decimal::new(price, 2)),
            _ => bail!(
                "line {} refers to product {} that the snapshot does not hold",
                row.order_detail_id,
                row.product_id
            ),
        };
        let product = readmodel::line_product(name, readmodel::money(price), Some(0));
        let mut line = readmodel::order_line_with_total(&row, Some(product), Decimal::new(l_total[i].unwrap_or(0), 2));
        line.append(cstr!("_v"), 0_i64);
        order_lines.push((row.order_id, row.order_detail_id, line));

        let mut detail = readmodel::order_detail(&row, Some(name), l_status[i].as_deref());
        detail.append(cstr!("_v"), 0_i64);
        detail.append(cstr!("_deleted"), false);
        detail.append(cstr!("_pv"), 0_i64);
        detail.append(cstr!("_ov"), 0_i64);
        out.order_details.push(detail);
    }

    let (o_id, o_items, o_quantity) =
        (i32s(orders, "order_id")?, i32s(orders, "items")?, i64s(orders, "quantity_sum")?);
    let (o_subtotal, o_total, o_date) =
        (i64s(orders, "subtotal_cents")?, i64s(orders, "total_cents")?, i64s(orders, "order_date_us")?);
    let (o_name, o_address, o_phone, o_status) =
        (strs(orders, "customer_name")?, strs(orders, "address")?, strs(orders, "phone")?, strs(orders, "status")?);
    // Both frames are sorted by order: walk them together.
    let mut order_lines = order_lines.into_iter().peekable();
    for i in 0..orders.height() {
        let id = required(o_id[i])?;
        let mut embedded = RawArrayBuf::new();
        while let Some((_, _, line)) = order_lines.next_if(|(order, _, _)| *order == id) {
            embedded.push(line);
        }
        let mut order = readmodel::order_header(
            id,
            o_name[i].as_deref().unwrap_or_default(),
            o_address[i].as_deref().unwrap_or_default(),
            o_phone[i].as_deref().unwrap_or_default(),
            o_date[i],
            o_status[i].as_deref(),
        );
        let totals = readmodel::totals(
            o_items[i].unwrap_or(0),
            o_quantity[i].unwrap_or(0) as i32,
            Decimal::new(o_subtotal[i].unwrap_or(0), 2),
            Decimal::new(o_total[i].unwrap_or(0), 2),
        );
        order.append(cstr!("lines"), embedded);
        order.append(cstr!("totals"), encode(&totals));
        order.append(cstr!("_v"), 0_i64);
        order.append(cstr!("_deleted"), false);
        out.orders.push(order);
    }
    if let Some((_, line, _)) = order_lines.next() {
        bail!("line {line} belongs to no order of its range");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use bson::Bson;

    use super::*;
    use crate::source::{Lines, Orders, ProductRefs};

    /// The documents polars computes equal the shapes the stream and `verify` compute one row at a time.
    #[test]
    fn orders_equal_the_row_by_row_projection() {
        let prices = [1000_i64, 5, 15, 250, 99_999];
        let discounts = [0_i64, 500, 150, 999, 333];
        let mut lines = Lines::default();
        for i in 0..40 {
            lines.order_detail_id.push(100 - i); // out of order on purpose
            lines.order_id.push(1 + i % 7);
            lines.product_id.push(1 + i % 5);
            lines.unit_price_cents.push(prices[i as usize % 5] + i64::from(i));
            lines.quantity.push(1 + i % 4);
            lines.discount_milli.push(discounts[i as usize % 5]);
        }
        let orders = Orders {
            order_id: (1..=8).collect(),
            customer_name: (1..=8).map(|i| format!("c{i}")).collect(),
            address: vec!["a".into(); 8],
            phone: vec!["0123".into(); 8],
            order_date_us: (1..=8).map(|i| Some(1_700_000_000_123_456 + i)).collect(),
            status: (1..=8).map(|i| if i == 3 { None } else { Some("pending".into()) }).collect(),
        };
        let products = ProductRefs {
            product_id: (1..=5).collect(),
            name: (1..=5).map(|i| format!("p{i}")).collect(),
            price_cents: vec![1, 2, 3, 4, 5],
        };
        let expected_lines: Vec<OrderDetail> = (0..40)
            .map(|i| OrderDetail {
                order_detail_id: lines.order_detail_id[i],
                order_id: lines.order_id[i],
                product_id: lines.product_id[i],
                unit_price: Decimal::new(lines.unit_price_cents[i], 2),
                quantity: lines.quantity[i],
                discount: Decimal::new(lines.discount_milli[i], 3),
            })
            .collect();
        let docs = order_documents(OrderRange { orders, lines, products }).unwrap();
        assert_eq!(docs.orders.len(), 8);
        assert_eq!(docs.order_details.len(), 40);
        for order in &docs.orders {
            let order = &readmodel::document(order);
            let id = order.get_i32("_id").unwrap();
            let mut mine: Vec<&OrderDetail> = expected_lines.iter().filter(|l| l.order_id == id).collect();
            mine.sort_by_key(|l| l.order_detail_id);
            let amounts: Vec<_> = mine.iter().map(|l| (l.unit_price, l.quantity, l.discount)).collect();
            assert_eq!(order.get_document("totals").unwrap(), &readmodel::order_totals(&amounts), "order {id}");
            let embedded = readmodel::contract_view(order);
            let expected: Vec<Bson> = mine
                .iter()
                .map(|l| {
                    let price = readmodel::money(Decimal::new(i64::from(l.product_id), 2));
                    let product = readmodel::line_product(format!("p{}", l.product_id).as_str(), price, None);
                    Bson::Document(readmodel::document(&readmodel::order_line(l, Some(product))))
                })
                .collect();
            assert_eq!(embedded.get_array("lines").unwrap(), &expected, "order {id}");
        }
        assert!(docs.orders[7].get_array("lines").unwrap().is_empty(), "order 8 has no lines");
    }
}
