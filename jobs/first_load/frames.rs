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
use bson::{RawArrayBuf, RawBsonRef, RawDocument, RawDocumentBuf};
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
    /// Orders whose lines would take their document past MongoDB's limit.
    pub oversized: Vec<Oversized>,
}

/// An order with more lines than its document can hold: it embeds the first ones (by `order_detail_id`)
/// and its totals are theirs, as a stream job leaves such an order (it dead-letters each line MongoDB
/// refuses). The lines left out still have their `order_details` documents.
#[derive(Debug)]
pub struct Oversized {
    pub order_id: i32,
    pub embedded: usize,
    pub left_out: Vec<i32>,
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

/// A text column's values, borrowed from the frame (no string copied until it is written into BSON).
fn strs<'a>(df: &'a DataFrame, name: &str) -> Result<Vec<Option<&'a str>>> {
    Ok(df.column(name)?.str()?.iter().collect())
}

fn to_bson(orders: &DataFrame, lines: &DataFrame) -> Result<Documents> {
    let i32s =
        |df: &DataFrame, name: &str| -> Result<Vec<Option<i32>>> { Ok(df.column(name)?.i32()?.iter().collect()) };
    let i64s =
        |df: &DataFrame, name: &str| -> Result<Vec<Option<i64>>> { Ok(df.column(name)?.i64()?.iter().collect()) };
    let required = |v: Option<i32>| v.context("a key column holds a null");

    let (l_id, l_order, l_product) =
        (i32s(lines, "order_detail_id")?, i32s(lines, "order_id")?, i32s(lines, "product_id")?);
    let (l_price, l_quantity, l_discount) =
        (i64s(lines, "unit_price_cents")?, i32s(lines, "quantity")?, i64s(lines, "discount_milli")?);
    let (l_name, l_product_price, l_status, l_total) =
        (strs(lines, "name")?, i64s(lines, "price_cents")?, strs(lines, "status")?, i64s(lines, "line_total_cents")?);

    let mut out = Documents {
        orders: Vec::with_capacity(orders.height()),
        order_details: Vec::with_capacity(lines.height()),
        ..Documents::default()
    };
    let amounts = |i: usize| {
        (
            Decimal::new(l_price[i].unwrap_or(0), 2),
            l_quantity[i].unwrap_or(0),
            Decimal::new(l_discount[i].unwrap_or(0), 3),
        )
    };
    // (order, row, embedded line), in the frame's (order, line) order.
    let mut order_lines: Vec<(i32, usize, RawDocumentBuf)> = Vec::with_capacity(lines.height());
    for i in 0..lines.height() {
        let (unit_price, quantity, discount) = amounts(i);
        let row = OrderDetail {
            order_detail_id: required(l_id[i])?,
            order_id: required(l_order[i])?,
            product_id: required(l_product[i])?,
            unit_price,
            quantity,
            discount,
        };
        let (name, price) = match (l_name[i], l_product_price[i]) {
            (Some(name), Some(price)) => (name, Decimal::new(price, 2)),
            _ => bail!(
                "line {} refers to product {} that the snapshot does not hold",
                row.order_detail_id,
                row.product_id
            ),
        };
        let product = readmodel::line_product(name, readmodel::money(price), Some(0));
        let mut line = readmodel::order_line_with_total(&row, Some(product), Decimal::new(l_total[i].unwrap_or(0), 2));
        line.append(cstr!("_v"), 0_i64);
        order_lines.push((row.order_id, i, line));

        let mut detail = readmodel::order_detail(&row, Some(name), l_status[i]);
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
    let mut mine: Vec<(usize, RawDocumentBuf)> = Vec::new();
    for i in 0..orders.height() {
        let id = required(o_id[i])?;
        mine.clear();
        while let Some((_, row, line)) = order_lines.next_if(|(order, _, _)| *order == id) {
            mine.push((row, line));
        }
        // Built again only for an order over the limit.
        let header = || {
            readmodel::order_header(
                id,
                o_name[i].unwrap_or_default(),
                o_address[i].unwrap_or_default(),
                o_phone[i].unwrap_or_default(),
                o_date[i],
                o_status[i],
            )
        };
        let totals = readmodel::totals(
            o_items[i].unwrap_or(0),
            o_quantity[i].unwrap_or(0) as i32,
            Decimal::new(o_subtotal[i].unwrap_or(0), 2),
            Decimal::new(o_total[i].unwrap_or(0), 2),
        );
        let mut order = order_document(header(), &mine, &totals);
        if order.as_bytes().len() > readmodel::MAX_DOCUMENT_BYTES {
            // As the stream does, embed the lines that fit (the first ones) and leave the rest out.
            let kept = lines_that_fit(order.as_bytes().len(), &mine);
            let kept_amounts: Vec<_> = mine[..kept].iter().map(|&(row, _)| amounts(row)).collect();
            order = order_document(header(), &mine[..kept], &readmodel::order_totals(&kept_amounts));
            let left_out = mine[kept..].iter().map(|&(row, _)| l_id[row].unwrap_or_default()).collect();
            out.oversized.push(Oversized { order_id: id, embedded: kept, left_out });
        }
        out.orders.push(order);
    }
    if let Some((_, row, _)) = order_lines.next() {
        bail!("line {} belongs to no order of its range", l_id[row].unwrap_or_default());
    }
    Ok(out)
}

/// An `orders` document: its header, its embedded lines, their totals, version 0.
fn order_document(
    mut order: RawDocumentBuf,
    lines: &[(usize, RawDocumentBuf)],
    totals: &RawDocument,
) -> RawDocumentBuf {
    let mut embedded = RawArrayBuf::new();
    for (_, line) in lines {
        embedded.push(RawBsonRef::Document(line));
    }
    order.append(cstr!("lines"), embedded);
    order.append(cstr!("totals"), totals);
    order.append(cstr!("_v"), 0_i64);
    order.append(cstr!("_deleted"), false);
    order
}

/// How many of `lines` (the first ones) an order document of `bytes` holding them all keeps to stay within
/// MongoDB's limit: the last ones go, each with its array entry (type byte, index as a key and its NUL).
/// Totals are of fixed-size values, so the document shrinks by exactly what goes.
fn lines_that_fit(bytes: usize, lines: &[(usize, RawDocumentBuf)]) -> usize {
    let mut bytes = bytes;
    let mut kept = lines.len();
    while bytes > readmodel::MAX_DOCUMENT_BYTES && kept > 0 {
        kept -= 1;
        bytes -= 2 + kept.to_string().len() + lines[kept].1.as_bytes().len();
    }
    kept
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
            assert_eq!(
                order.get_document("totals").unwrap(),
                &readmodel::document(&readmodel::order_totals(&amounts)),
                "order {id}"
            );
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

    /// An order whose lines pass 16 MB embeds the first ones, up to the limit, with their totals; the next
    /// order, in the same range, is whole.
    #[test]
    fn an_order_past_the_document_limit_embeds_the_lines_that_fit() {
        const LINES: i32 = 55_000; // ~317 bytes each embedded with a 100-character product name
        let mut lines = Lines::default();
        for i in 0..=LINES {
            lines.order_detail_id.push(LINES + 1 - i); // out of order on purpose; the last one is order 2's
            lines.order_id.push(if i == LINES { 2 } else { 1 });
            lines.product_id.push(1);
            lines.unit_price_cents.push(100 + i64::from(i % 7));
            lines.quantity.push(1 + i % 3);
            lines.discount_milli.push(i64::from(i % 2) * 250);
        }
        let expected: Vec<(i32, (Decimal, i32, Decimal))> = (0..LINES as usize)
            .map(|i| {
                let amounts = (
                    Decimal::new(lines.unit_price_cents[i], 2),
                    lines.quantity[i],
                    Decimal::new(lines.discount_milli[i], 3),
                );
                (lines.order_detail_id[i], amounts)
            })
            .collect();
        let orders = Orders {
            order_id: vec![1, 2],
            customer_name: vec!["big".into(), "small".into()],
            address: vec!["a".into(); 2],
            phone: vec!["0".into(); 2],
            order_date_us: vec![None; 2],
            status: vec![Some("pending".into()); 2],
        };
        let products = ProductRefs { product_id: vec![1], name: vec!["p".repeat(100)], price_cents: vec![100] };
        let docs = order_documents(OrderRange { orders, lines, products }).unwrap();

        assert_eq!(docs.order_details.len(), LINES as usize + 1, "every line has its order_details document");
        let big = &docs.orders[0];
        assert!(big.as_bytes().len() <= readmodel::MAX_DOCUMENT_BYTES);
        let big = readmodel::document(big);
        let embedded: Vec<i32> = big
            .get_array("lines")
            .unwrap()
            .iter()
            .map(|l| l.as_document().unwrap().get_i32("order_detail_id").unwrap())
            .collect();
        let mut expected = expected;
        expected.sort_by_key(|&(id, _)| id);
        let kept = embedded.len();
        assert!(kept > 50_000 && kept < LINES as usize, "{kept} lines embedded");
        assert_eq!(embedded, expected[..kept].iter().map(|&(id, _)| id).collect::<Vec<_>>(), "the first lines");
        // One more line would not have fitted.
        let line_bytes = encode(big.get_array("lines").unwrap().last().unwrap().as_document().unwrap());
        assert!(docs.orders[0].as_bytes().len() + line_bytes.as_bytes().len() + 2 + 5 > readmodel::MAX_DOCUMENT_BYTES);
        let amounts: Vec<_> = expected[..kept].iter().map(|&(_, a)| a).collect();
        assert_eq!(
            big.get_document("totals").unwrap(),
            &readmodel::document(&readmodel::order_totals(&amounts)),
            "totals of what it holds"
        );

        let [over] = &docs.oversized[..] else { panic!("{:?}", docs.oversized.len()) };
        assert_eq!((over.order_id, over.embedded), (1, kept));
        assert_eq!(over.left_out, expected[kept..].iter().map(|&(id, _)| id).collect::<Vec<_>>());
        let small = readmodel::document(&docs.orders[1]);
        assert_eq!(small.get_array("lines").unwrap().len(), 1, "order 2 is whole");
    }
}
