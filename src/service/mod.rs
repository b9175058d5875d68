//! The CQRS service (`cqrs_api`): the two halves of the pattern behind one HTTP server. Commands are
//! validated and written to PostgreSQL only ([`commands`]); queries are answered from the MongoDB read
//! models the stream jobs keep, spread round-robin over several read stores ([`stores`], [`queries`]);
//! server-rendered pages show it working ([`pages`]).

pub mod commands;
pub mod pages;
pub mod queries;
pub mod stores;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, extract::rejection::JsonRejection};
use clap::Args;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::{KafkaArgs, PgArgs, StoresArgs};
use crate::projection::Collection;
use stores::ReadStores;

/// How the service is configured.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Address to serve the API and the pages on.
    #[arg(long, env = "CDC_API_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub pg: PgArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub stores: StoresArgs,

    /// The stream jobs' consumer groups are <prefix>-<table> (their default with `cdc-cqrs`); their
    /// checkpoints in each store tell how far it is.
    #[arg(long, env = "CDC_GROUP_PREFIX", default_value = crate::config::GROUP_PREFIX)]
    pub group_prefix: String,

    /// Debezium's replication slot: its confirmed position is what read-your-writes waits on.
    #[arg(long, env = "CDC_SLOT_NAME", default_value = "cdc_cqrs_ecommerce")]
    pub slot: String,

    /// A store with changes left to apply for longer than this (milliseconds) gets no queries while
    /// another store is within it.
    #[arg(long, env = "CDC_MAX_LAG_MS", default_value_t = 5_000)]
    pub max_lag_ms: u64,

    /// How long a query with `?after=` waits for a store to catch up before answering 504.
    #[arg(long, env = "CDC_READ_YOUR_WRITES_TIMEOUT_MS", default_value_t = 10_000)]
    pub read_your_writes_timeout_ms: u64,
}

/// What every handler shares.
pub struct App {
    pub pg: PgPool,
    pub stores: Arc<ReadStores>,
    pub read_your_writes_timeout: Duration,
}

impl App {
    async fn begin(&self) -> Result<Transaction<'static, Postgres>, ApiError> {
        Ok(self.pg.begin().await?)
    }
}

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "PostgreSQL");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the write model is unavailable: {e}"))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(e.status(), e.body_text())
    }
}

/// A JSON request body whose rejections (bad JSON, a missing or unknown field) answer like every other
/// error: `{"error": "..."}`.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Body(value))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Every route of the service.
pub fn router(app: Arc<App>) -> Router {
    use commands as c;
    use queries as q;
    Router::new()
        .route("/", get(pages::home))
        .route("/demo", get(pages::demo))
        .route("/sync", get(pages::sync))
        .route("/api/products", get(q::products).post(c::create_product))
        .route("/api/products/{id}", get(q::product).patch(c::change_product).delete(c::delete_product))
        .route("/api/orders", get(q::orders).post(c::create_order))
        .route("/api/orders/{id}", get(q::order).delete(c::delete_order))
        .route("/api/orders/{id}/status", patch(c::change_status))
        .route("/api/orders/{id}/lines", post(c::add_line))
        .route("/api/lines/{id}", patch(c::change_line).delete(c::remove_line))
        .route("/api/stores", get(stores_status))
        .route("/health", get(health))
        .route("/api/sync", get(sync_report))
        .with_state(app)
}

/// Runs the service until SIGTERM / Ctrl-C.
pub async fn serve(args: ServiceArgs) -> Result<()> {
    let stores = args.stores.stores();
    anyhow::ensure!(!stores.is_empty(), "no read store: give --mongo-uri (or CDC_MONGO_URI) at least one URI");
    // What needs no other service first: a wrong setting fails at once, before any connection.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {} (another service there? --listen / CDC_API_ADDR)", args.listen))?;
    let read_stores = Arc::new(
        ReadStores::new(&stores, &args.kafka, &args.group_prefix, Duration::from_millis(args.max_lag_ms)).await?,
    );
    let pg = crate::postgres::pool(&args.pg, &args.pg.database, 8).await?;
    read_stores.watch(pg.clone(), args.kafka.clone(), args.slot.clone())?;
    let app = Arc::new(App {
        pg,
        stores: read_stores,
        read_your_writes_timeout: Duration::from_millis(args.read_your_writes_timeout_ms),
    });
    let names: Vec<_> = stores.iter().map(|s| s.name.as_str()).collect();
    tracing::info!(listen = %args.listen, stores = ?names, database = %args.pg.database, "cqrs_api serving");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            crate::cli::terminated().await;
            tracing::info!("shutting down");
        })
        .await
        .context("serving")
}

/// For a load balancer: 200 while the service can take commands (PostgreSQL answers within 1.5 s) and
/// answer queries (a read store is up: one that lags still serves, the least behind first), else 503
/// naming what is missing.
async fn health(State(app): State<Arc<App>>) -> (StatusCode, Json<serde_json::Value>) {
    let answered = tokio::time::timeout(Duration::from_millis(1500), sqlx::query("SELECT 1").execute(&app.pg)).await;
    let postgres_error = match answered {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("{e}")),
        Err(_) => Some("no answer in 1.5 s".to_owned()),
    };
    let stores = app.stores.status().await;
    let up = stores.iter().filter(|s| s.up).count();
    let ok = postgres_error.is_none() && up > 0;
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "postgres": { "up": postgres_error.is_none(), "error": postgres_error },
        "read_stores_up": up,
        "read_stores": stores.len(),
    });
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

async fn stores_status(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(json!({ "stores": app.stores.status().await }))
}

/// `verify` against every store: each collection compared with its projection from PostgreSQL.
async fn sync_report(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let status = app.stores.status().await;
    let mut out = Vec::new();
    for (store, status) in app.stores.all().iter().zip(status) {
        let mut collections = Vec::new();
        let mut error = None;
        for collection in Collection::ALL {
            let mut pg = app.pg.acquire().await?;
            let compared = tokio::time::timeout(
                Duration::from_secs(60),
                crate::verify::compare(&mut pg, &store.db, collection, 3),
            )
            .await;
            match compared {
                Ok(Ok(r)) => collections.push(json!({
                    "collection": r.name, "equal": r.is_equal(), "expected": r.expected, "found": r.actual,
                    "missing": r.missing, "unexpected": r.unexpected, "different": r.different,
                    "examples": r.examples,
                })),
                Ok(Err(e)) => error = Some(format!("{e:#}")),
                Err(_) => error = Some("no answer in 60 s".into()),
            }
            if error.is_some() {
                break;
            }
        }
        out.push(json!({
            "store": status.name, "up": status.up, "behind_records": status.behind_records,
            "behind_ms": status.behind_ms, "error": error, "collections": collections,
        }));
    }
    Ok(Json(json!({ "stores": out })))
}
