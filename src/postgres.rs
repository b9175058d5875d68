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

/// A WAL position (`pg_lsn`), comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl std::str::FromStr for Lsn {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Lsn> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| anyhow!("a source position looks like 0/16B3748, not {s:?}"))?;
        let part =
            |p: &str| u64::from_str_radix(p, 16).map_err(|_| anyhow!("{s:?} is not a source position (hex/hex)"));
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Where Debezium's replication slot stands.
#[derive(Debug, Clone, Copy)]
pub struct SlotPosition {
    /// Every transaction committed before it is in Kafka (Debezium confirms only what Kafka acknowledged).
    pub confirmed: Lsn,
    /// The oldest WAL the slot still needs: every change before it belongs to a transaction that ended
    /// before `confirmed` (a transaction still open has all its changes at or after it).
    pub restart: Lsn,
}

/// Debezium's positions in its replication slot `slot`.
pub async fn slot_position(pg: impl sqlx::PgExecutor<'_>, slot: &str) -> Result<SlotPosition> {
    let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pg)
    .await
    .context("reading the replication slot")?;
    match row {
        Some((Some(confirmed), Some(restart))) => {
            Ok(SlotPosition { confirmed: confirmed.parse()?, restart: restart.parse()? })
        }
        _ => anyhow::bail!("no replication slot {slot:?}: is the connector registered (--slot / CDC_SLOT_NAME)?"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parses_orders_and_prints_back() {
        let a: Lsn = "0/16B3748".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "0/16B3748");
        assert_eq!(b.0, 1 << 32);
        assert!("16B3748".parse::<Lsn>().is_err());
    }
}
