//! The command side: validated writes to PostgreSQL, and nothing else. The read stores learn of a command
//! the same way as of any other change, through the capture; each answer carries the source `position`
//! the command committed at, which a query can pass back (`?after=`) to read its own write.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::{ApiError, App, Body};

/// The statuses an order may have.
pub const STATUSES: [&str; 5] = ["pending", "paid", "shipped", "delivered", "cancelled"];

type Answer = Result<(StatusCode, Json<Value>), ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    name: String,
    #[serde(default)]
    description: Option<String>,
    price: Value,
    stock_quantity: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductChange {
    name: Option<String>,
    /// `null` clears the description; absent keeps it.
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    price: Option<Value>,
    stock_quantity: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLine {
    product_id: i64,
    quantity: i64,
    #[serde(default)]
    discount: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    customer_name: String,
    address: String,
    phone: String,
    #[serde(default)]
    status: Option<String>,
    lines: Vec<NewLine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusChange {
    status: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineChange {
    quantity: Option<i64>,
    discount: Option<Value>,
}

pub async fn create_product(State(app): State<Arc<App>>, Body(p): Body<NewProduct>) -> Answer {
    let name = text("name", &p.name, 100)?;
    let price = money("price", &p.price)?;
    let stock = count("stock_quantity", p.stock_quantity, 0)?;
    let mut tx = app.begin().await?;
    let id: i32 = sqlx::query_scalar(
        "INSERT INTO products (name, description, price, stock_quantity) VALUES ($1, $2, $3, $4) RETURNING product_id",
    )
    .bind(name)
    .bind(&p.description)
    .bind(price)
    .bind(stock)
    .fetch_one(&mut *tx)
    .await?;
    let position = commit(&app.pg, tx).await?;
    Ok((StatusCode::CREATED, Json(json!({ "product_id": id, "position": position }))))
}

pub async fn change_product(State(app): State<Arc<App>>, Path(id): Path<i32>, Body(c): Body<ProductChange>) -> Answer {
    let name = c.name.as_deref().map(|n| text("name", n, 100)).transpose()?;
    let price = c.price.as_ref().map(|p| money("price", p)).transpose()?;
    let stock = c.stock_quantity.map(|s| count("stock_quantity", s, 0)).transpose()?;
    let mut tx = app.begin().await?;
    let found = sqlx::query(
        "UPDATE products SET name = coalesce($2, name), price = coalesce($3, price), \
         stock_quantity = coalesce($4, stock_quantity), description = CASE WHEN $5 THEN $6 ELSE description END \
         WHERE product_id = $1",
    )
    .bind(id)
    .bind(name)
    .bind(price)
    .bind(stock)
    .bind(c.description.is_some())
    .bind(c.description.flatten())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    or_not_found(found, || format!("no product {id}"))?;
    done(&app.pg, tx, json!({ "product_id": id })).await
}

pub async fn delete_product(State(app): State<Arc<App>>, Path(id): Path<i32>) -> Answer {
    let mut tx = app.begin().await?;
    let deleted = sqlx::query("DELETE FROM products WHERE product_id = $1").bind(id).execute(&mut *tx).await;
    match deleted {
        Ok(r) if r.rows_affected() == 0 => Err(ApiError::not_found(format!("no product {id}"))),
        Ok(_) => done(&app.pg, tx, json!({ "product_id": id, "deleted": true })).await,
        Err(e) if is_foreign_key_violation(&e) => Err(ApiError::conflict(format!(
            "product {id} is on order lines: remove those lines (or their orders) first"
        ))),
        Err(e) => Err(e.into()),
    }
}

pub async fn create_order(State(app): State<Arc<App>>, Body(o): Body<NewOrder>) -> Answer {
    let customer = text("customer_name", &o.customer_name, 100)?;
    let address = text("address", &o.address, 100)?;
    let phone = text("phone", &o.phone, 20)?;
    let status = o.status.as_deref().map(status).transpose()?.unwrap_or("pending");
    if o.lines.is_empty() {
        return Err(ApiError::invalid("lines: an order needs at least one line"));
    }
    let lines =
        o.lines.iter().enumerate().map(|(i, l)| line(&format!("lines[{i}]."), l)).collect::<Result<Vec<_>, _>>()?;
    let mut tx = app.begin().await?;
    let order_id: i32 = sqlx::query_scalar(
        "INSERT INTO orders (customer_name, address, phone, status) VALUES ($1, $2, $3, $4) RETURNING order_id",
    )
    .bind(customer)
    .bind(address)
    .bind(phone)
    .bind(status)
    .fetch_one(&mut *tx)
    .await?;
    let mut line_ids = Vec::with_capacity(lines.len());
    for (product_id, quantity, discount) in lines {
        line_ids.push(insert_line(&mut tx, order_id, product_id, quantity, discount).await?);
    }
    let position = commit(&app.pg, tx).await?;
    let answer = json!({ "order_id": order_id, "order_detail_ids": line_ids, "position": position });
    Ok((StatusCode::CREATED, Json(answer)))
}

pub async fn change_status(State(app): State<Arc<App>>, Path(id): Path<i32>, Body(c): Body<StatusChange>) -> Answer {
    let status = status(&c.status)?;
    let mut tx = app.begin().await?;
    let found = sqlx::query("UPDATE orders SET status = $2 WHERE order_id = $1")
        .bind(id)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    or_not_found(found.rows_affected(), || format!("no order {id}"))?;
    done(&app.pg, tx, json!({ "order_id": id, "status": status })).await
}

pub async fn delete_order(State(app): State<Arc<App>>, Path(id): Path<i32>) -> Answer {
    let mut tx = app.begin().await?;
    let found = sqlx::query("DELETE FROM orders WHERE order_id = $1").bind(id).execute(&mut *tx).await?;
    or_not_found(found.rows_affected(), || format!("no order {id}"))?;
    done(&app.pg, tx, json!({ "order_id": id, "deleted": true })).await
}

pub async fn add_line(State(app): State<Arc<App>>, Path(order_id): Path<i32>, Body(l): Body<NewLine>) -> Answer {
    let (product_id, quantity, discount) = line("", &l)?;
    let mut tx = app.begin().await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT order_id FROM orders WHERE order_id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found(format!("no order {order_id}")));
    }
    let id = insert_line(&mut tx, order_id, product_id, quantity, discount).await?;
    let position = commit(&app.pg, tx).await?;
    Ok((StatusCode::CREATED, Json(json!({ "order_detail_id": id, "order_id": order_id, "position": position }))))
}

pub async fn change_line(State(app): State<Arc<App>>, Path(id): Path<i32>, Body(c): Body<LineChange>) -> Answer {
    let quantity = c.quantity.map(|q| count("quantity", q, 1)).transpose()?;
    let discount = c.discount.as_ref().map(|d| rate("discount", d)).transpose()?;
    let mut tx = app.begin().await?;
    let found = sqlx::query(
        "UPDATE order_details SET quantity = coalesce($2, quantity), discount = coalesce($3, discount) \
         WHERE order_detail_id = $1",
    )
    .bind(id)
    .bind(quantity)
    .bind(discount)
    .execute(&mut *tx)
    .await?;
    or_not_found(found.rows_affected(), || format!("no order line {id}"))?;
    done(&app.pg, tx, json!({ "order_detail_id": id })).await
}

pub async fn remove_line(State(app): State<Arc<App>>, Path(id): Path<i32>) -> Answer {
    let mut tx = app.begin().await?;
    let found = sqlx::query("DELETE FROM order_details WHERE order_detail_id = $1").bind(id).execute(&mut *tx).await?;
    or_not_found(found.rows_affected(), || format!("no order line {id}"))?;
    done(&app.pg, tx, json!({ "order_detail_id": id, "deleted": true })).await
}

/// A 404 saying `missing` when the statement touched no row.
fn or_not_found(rows: u64, missing: impl FnOnce() -> String) -> Result<(), ApiError> {
    if rows == 0 { Err(ApiError::not_found(missing())) } else { Ok(()) }
}

/// A line at the product's current price.
async fn insert_line(
    tx: &mut PgConnection,
    order_id: i32,
    product_id: i32,
    quantity: i32,
    discount: Decimal,
) -> Result<i32, ApiError> {
    let id: Option<i32> = sqlx::query_scalar(
        "INSERT INTO order_details (order_id, product_id, unit_price, quantity, discount) \
         SELECT $1, product_id, price, $3, $4 FROM products WHERE product_id = $2 RETURNING order_detail_id",
    )
    .bind(order_id)
    .bind(product_id)
    .bind(quantity)
    .bind(discount)
    .fetch_optional(&mut *tx)
    .await?;
    id.ok_or_else(|| ApiError::invalid(format!("unknown product {product_id}")))
}

/// Commits and answers 200 with `body` plus the position.
async fn done(pg: &PgPool, tx: Transaction<'static, Postgres>, mut body: Value) -> Answer {
    body["position"] = json!(commit(pg, tx).await?);
    Ok((StatusCode::OK, Json(body)))
}

/// Commits, and returns a source position at or after the commit: a query passing it back as `?after=`
/// is served by a store holding this command's changes.
async fn commit(pg: &PgPool, tx: Transaction<'static, Postgres>) -> Result<String, ApiError> {
    tx.commit().await?;
    // Once the commit returned, its record is written: the WAL write position is past it.
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(pg).await?)
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or set.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn line(prefix: &str, l: &NewLine) -> Result<(i32, i32, Decimal), ApiError> {
    let product_id = count(&format!("{prefix}product_id"), l.product_id, 1)?;
    let quantity = count(&format!("{prefix}quantity"), l.quantity, 1)?;
    let discount = l.discount.as_ref().map(|d| rate(&format!("{prefix}discount"), d)).transpose()?;
    Ok((product_id, quantity, discount.unwrap_or_default()))
}

fn text<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!("{field}: at most {max} characters")));
    }
    Ok(value)
}

fn count(field: &str, value: i64, min: i64) -> Result<i32, ApiError> {
    if value < min {
        return Err(ApiError::invalid(format!("{field}: must be at least {min}, not {value}")));
    }
    i32::try_from(value).map_err(|_| ApiError::invalid(format!("{field}: {value} is too large")))
}

fn status(value: &str) -> Result<&'static str, ApiError> {
    STATUSES
        .iter()
        .find(|s| **s == value)
        .copied()
        .ok_or_else(|| ApiError::invalid(format!("status: one of {}, not {value:?}", STATUSES.join(", "))))
}

/// An exact decimal from a JSON string ("12.50") or number (12.5), never through a float.
fn decimal(field: &str, value: &Value) -> Result<Decimal, ApiError> {
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return Err(ApiError::invalid(format!("{field}: a decimal number, as a string or a number"))),
    };
    text.parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(&text))
        .map(|d| d.normalize())
        .map_err(|_| ApiError::invalid(format!("{field}: {text:?} is not a decimal number")))
}

/// Money: `numeric(10,2)`, not negative.
fn money(field: &str, value: &Value) -> Result<Decimal, ApiError> {
    let d = decimal(field, value)?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(ApiError::invalid(format!("{field}: must not be negative")));
    }
    if d.scale() > 2 {
        return Err(ApiError::invalid(format!("{field}: at most 2 decimals, not {d}")));
    }
    if d >= Decimal::new(100_000_000, 0) {
        return Err(ApiError::invalid(format!("{field}: must be below 100000000")));
    }
    Ok(d)
}

/// A discount rate: `numeric(4,3)`, from 0 up to (not including) 1.
fn rate(field: &str, value: &Value) -> Result<Decimal, ApiError> {
    let d = decimal(field, value)?;
    if d.is_sign_negative() && !d.is_zero() || d >= Decimal::ONE {
        return Err(ApiError::invalid(format!("{field}: from 0 up to 1 (a rate: 0.15 is 15%), not {d}")));
    }
    if d.scale() > 3 {
        return Err(ApiError::invalid(format!("{field}: at most 3 decimals, not {d}")));
    }
    Ok(d)
}

fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "23503")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact_and_refuses_what_the_column_cannot_hold() {
        assert_eq!(money("price", &json!("12.50")).unwrap().to_string(), "12.5");
        assert_eq!(money("price", &json!(0.1)).unwrap().to_string(), "0.1");
        assert_eq!(money("price", &json!(19.99)).unwrap().to_string(), "19.99");
        for bad in [json!("1.234"), json!(-1), json!("abc"), json!(true), json!(100000000)] {
            assert!(money("price", &bad).is_err(), "{bad} accepted");
        }
        assert!(money("price", &json!("1.234")).unwrap_err().message.contains("at most 2 decimals"));
    }

    #[test]
    fn rates_counts_and_statuses() {
        assert!(rate("discount", &json!("0.125")).is_ok());
        assert!(rate("discount", &json!(1)).is_err());
        assert!(rate("discount", &json!("0.1255")).is_err());
        assert!(count("quantity", 0, 1).unwrap_err().message.contains("at least 1"));
        assert!(count("quantity", i64::MAX, 1).is_err());
        assert_eq!(status("paid").unwrap(), "paid");
        assert!(status("lost").unwrap_err().message.contains("pending, paid"));
        assert!(text("name", "  ", 100).is_err());
    }
}
