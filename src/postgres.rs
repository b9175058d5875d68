//! Connecting to PostgreSQL, with failures that say what to do about them.
//!
//! Every binary that touches the write model goes through here, so an unreachable server, a rejected
//! password or a missing database reads the same everywhere: one line naming the fix. URLs are shown
//! without their password.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::config::PgArgs;

/// Connection options for `database` on the server named by `args.url`.
pub fn options(args: &PgArgs, database: &str) -> Result<PgConnectOptions> {
    // sqlx fills what the URL leaves out from PGHOST/PGPORT/PGUSER/PGPASSWORD, like libpq.
    let opts = PgConnectOptions::from_str(&args.url)
        .map_err(|e| {
            anyhow!("--pg-url / CDC_PG_URL is not a PostgreSQL URL ({e}); expected postgres://USER@HOST:PORT/DB")
        })?
        .database(database)
        .application_name("cdc-cqrs")
        // "relation already exists, skipping" and the like are not news for a user.
        .options([("client_min_messages", "warning")])
        .log_statements(tracing::log::LevelFilter::Trace)
        // verify's and the workload's long reads are expected to be long: not a warning for users.
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1));
    Ok(opts)
}

/// `user@host:port/database`, safe to print.
pub fn describe(opts: &PgConnectOptions) -> String {
    format!("{}@{}:{}/{}", opts.get_username(), opts.get_host(), opts.get_port(), opts.get_database().unwrap_or(""))
}

/// Opens one connection to `database`.
pub async fn connect(args: &PgArgs, database: &str) -> Result<PgConnection> {
    let opts = options(args, database)?;
    opts.connect().await.map_err(|e| explain(e, &opts))
}

/// Opens a pool of up to `size` connections to `database`.
pub async fn pool(args: &PgArgs, database: &str, size: u32) -> Result<PgPool> {
    let opts = options(args, database)?;
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts.clone())
        .await
        .map_err(|e| explain(e, &opts))
}

/// Turns a connection failure into a one-line error that names the fix.
pub fn explain(err: sqlx::Error, opts: &PgConnectOptions) -> anyhow::Error {
    let target = describe(opts);
    let code = err.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    match (code.as_deref(), &err) {
        (Some("28P01" | "28000"), _) => anyhow!(
            "PostgreSQL rejected the credentials for {target}: set PGPASSWORD (or put the password in CDC_PG_URL); \
             with the local stack run the command through `scripts/stack exec`"
        ),
        (Some("3D000"), _) => {
            anyhow!("database missing at {target}: create it with `cargo run --bin setup_pg_db` (or pass --database)")
        }
        (_, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => anyhow!(
            "cannot reach PostgreSQL at {target} ({err}): start it (`scripts/stack up`) or point CDC_PG_URL at it"
        ),
        _ => anyhow::Error::new(err).context(format!("connecting to PostgreSQL at {target}")),
    }
}

/// Fails unless the server decodes WAL logically, which Debezium's pgoutput needs.
pub async fn require_logical_wal(conn: &mut PgConnection) -> Result<()> {
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&mut *conn)
        .await
        .context("reading wal_level")?;
    if level != "logical" {
        return Err(anyhow!(
            "PostgreSQL has wal_level={level}, Debezium needs logical: run `ALTER SYSTEM SET wal_level = logical;` \
             (or set wal_level = logical in postgresql.conf) and restart PostgreSQL"
        ));
    }
    Ok(())
}
