//! The query side: documents of the read models, from one read store per query (round-robin over the
//! healthy ones, see [`super::stores`]). A store that fails a query is counted down and the query goes to
//! the next one. Every answer names the store that served it and how far behind the source it was:
//! `{"store", "behind_records", "behind_ms", "data"}` and the header `x-read-store`.

use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use serde::Deserialize;
use serde_json::{Value, json};

use super::stores::{STORE_TIMEOUT, Unavailable};
use super::{ApiError, App};
use crate::postgres::Lsn;
use crate::projection::{Collection, decimal_of};
use crate::readmodel;

/// `?after=<position>`: read-your-writes, the position a command answered with.
#[derive(Debug, Default, Deserialize)]
pub struct After {
    after: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Listing {
    after: Option<String>,
    customer: Option<String>,
    status: Option<String>,
    #[serde(default = "default_limit")]
    limit: i64,
    #[serde(default)]
    offset: u64,
}

fn default_limit() -> i64 {
    20
}

/// Answers `query` from a read store (`None` from it is a 404 saying `missing`).
pub async fn from_a_store<F, Fut>(app: &App, after: Option<&str>, missing: String, query: F) -> Response
where
    F: Fn(Database) -> Fut,
    Fut: Future<Output = mongodb::error::Result<Option<Value>>>,
{
    let after = match after.map(str::parse::<Lsn>).transpose() {
        Ok(a) => a,
        Err(e) => return ApiError::invalid(format!("after: {e}")).into_response(),
    };
    let mut failed = Vec::new();
    loop {
        let picked = match after {
            Some(position) => app.stores.pick_caught_up(position, app.read_your_writes_timeout, &failed).await,
            None => app.stores.pick(&failed).await,
        };
        let (i, status) = match picked {
            Ok(p) => p,
            Err(e @ Unavailable::NotCaughtUp(..)) => {
                return ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()).into_response();
            }
            Err(e) => return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        };
        let store = app.stores.store(i);
        let answer = tokio::time::timeout(STORE_TIMEOUT, query(store.db.clone())).await;
        match answer.unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into())) {
            Ok(data) => {
                app.stores.served(i);
                let mut body = json!({
                    "store": status.name,
                    "behind_records": status.behind_records,
                    "behind_ms": status.behind_ms,
                });
                let code = match data {
                    Some(data) => {
                        body["data"] = data;
                        StatusCode::OK
                    }
                    None => {
                        body["error"] = json!(missing);
                        StatusCode::NOT_FOUND
                    }
                };
                let mut response = (code, Json(body)).into_response();
                if let Ok(name) = HeaderValue::from_str(&status.name) {
                    response.headers_mut().insert("x-read-store", name);
                }
                return response;
            }
            Err(e) => {
                tracing::warn!(store = %status.name, error = %e, "a read store failed a query; trying another");
                app.stores.failed(i, &e.to_string()).await;
                failed.push(i);
            }
        }
    }
}

pub async fn product(State(app): State<Arc<App>>, Path(id): Path<i32>, Query(q): Query<After>) -> Response {
    from_a_store(&app, q.after.as_deref(), format!("no product {id}"), |db| one(db, Collection::Products, id)).await
}

pub async fn order(State(app): State<Arc<App>>, Path(id): Path<i32>, Query(q): Query<After>) -> Response {
    from_a_store(&app, q.after.as_deref(), format!("no order {id}"), |db| one(db, Collection::Orders, id)).await
}

pub async fn products(State(app): State<Arc<App>>, Query(q): Query<Listing>) -> Response {
    let page = match page(&q) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    from_a_store(&app, q.after.as_deref(), String::new(), |db| list(db, Collection::Products, doc! {}, page)).await
}

pub async fn orders(State(app): State<Arc<App>>, Query(q): Query<Listing>) -> Response {
    let page = match page(&q) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut filter = doc! {};
    if let Some(customer) = &q.customer {
        filter.insert("customer_name", customer);
    }
    if let Some(status) = &q.status {
        filter.insert("status", status);
    }
    from_a_store(&app, q.after.as_deref(), String::new(), |db| list(db, Collection::Orders, filter.clone(), page)).await
}

fn page(q: &Listing) -> Result<(i64, u64), ApiError> {
    if !(1..=500).contains(&q.limit) {
        return Err(ApiError::invalid(format!("limit: from 1 to 500, not {}", q.limit)));
    }
    Ok((q.limit, q.offset))
}

async fn one(db: Database, collection: Collection, id: i32) -> mongodb::error::Result<Option<Value>> {
    let found =
        db.collection::<Document>(collection.name()).find_one(doc! { "_id": id, "_deleted": { "$ne": true } }).await?;
    Ok(found.map(|d| to_json(&Bson::Document(readmodel::contract_view(&d)))))
}

async fn list(
    db: Database,
    collection: Collection,
    mut filter: Document,
    (limit, offset): (i64, u64),
) -> mongodb::error::Result<Option<Value>> {
    filter.insert("_deleted", doc! { "$ne": true });
    let docs: Vec<Document> = db
        .collection::<Document>(collection.name())
        .find(filter)
        .sort(doc! { "_id": 1 })
        .skip(offset)
        .limit(limit)
        .await?
        .try_collect()
        .await?;
    let items: Vec<Value> = docs.iter().map(|d| to_json(&Bson::Document(readmodel::contract_view(d)))).collect();
    Ok(Some(json!({ "items": items, "limit": limit, "offset": offset })))
}

/// A read-model value as JSON: money as exact decimal strings, dates as RFC 3339.
pub fn to_json(value: &Bson) -> Value {
    match value {
        Bson::Document(d) => Value::Object(d.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Bson::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Bson::Decimal128(_) => decimal_of(value).map_or(Value::Null, |d| Value::String(d.to_string())),
        Bson::DateTime(t) => t.try_to_rfc3339_string().map_or(Value::Null, Value::String),
        Bson::Int32(i) => json!(i),
        Bson::Int64(i) => json!(i),
        Bson::Double(f) => json!(f),
        Bson::String(s) => json!(s),
        Bson::Boolean(b) => json!(b),
        Bson::Null => Value::Null,
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::decimal;

    #[test]
    fn documents_become_plain_json_with_exact_money() {
        let d = doc! {
            "_id": 7,
            "price": decimal("19.90".parse().unwrap()),
            "order_date": bson::DateTime::from_millis(0),
            "lines": [ { "quantity": 2 } ],
        };
        assert_eq!(
            to_json(&Bson::Document(d)),
            json!({ "_id": 7, "price": "19.90", "order_date": "1970-01-01T00:00:00Z", "lines": [ { "quantity": 2 } ] })
        );
    }
}
