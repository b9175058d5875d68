//! Creating the write model: the database, the schema of `schema/ecommerce.sql`, the `debezium` capture
//! role's password and the publication. Idempotent: a second run changes nothing and says so.

use anyhow::{Context, Result};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::config::PgArgs;
use crate::postgres;

/// The write model, as shipped in `schema/ecommerce.sql`.
pub const SCHEMA_SQL: &str = include_str!("../../schema/ecommerce.sql");

/// The role Debezium logs in as (created by the schema file).
pub const CAPTURE_ROLE: &str = "debezium";

/// What one run of [`setup`] changed; empty when everything was already in place.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub changed: Vec<String>,
}

/// Brings the server named by `args` to the write model of DESIGN.md.
pub async fn setup(args: &PgArgs, capture_password: &str) -> Result<SetupReport> {
    let mut report = SetupReport::default();
    let maintenance_db = url_database(&args.url)?.unwrap_or_else(|| "postgres".into());
    let mut admin = postgres::connect(args, &maintenance_db).await?;
    postgres::require_logical_wal(&mut admin).await?;

    if create_database_if_missing(&mut admin, &args.database).await? {
        report.changed.push(format!("created database {}", args.database));
    }
    drop(admin);

    let mut conn = postgres::connect(args, &args.database).await?;
    let before = present_objects(&mut conn).await?;
    // The capture role is cluster-wide: a setup of another database running at the same moment may create
    // it between our check and our CREATE (unique violation); the schema is then applied again, and finds it.
    for attempt in 1.. {
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        match sqlx::raw_sql(SCHEMA_SQL).execute(&mut *tx).await {
            Ok(_) => {
                tx.commit().await.context("committing the schema")?;
                break;
            }
            Err(e) if attempt < 5 && e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
                tx.rollback().await?;
            }
            Err(e) => return Err(e).context("applying schema/ecommerce.sql"),
        }
    }
    let after = present_objects(&mut conn).await?;
    report.changed.extend(after.into_iter().filter(|o| !before.contains(o)).map(|o| format!("created {o}")));

    if !capture_role_logs_in(args, capture_password).await? {
        set_capture_password(&mut conn, capture_password).await?;
        report.changed.push(format!("set the password of role {CAPTURE_ROLE}"));
    }
    Ok(report)
}

/// The database named in the URL, as sqlx (which connects with it) reads it.
fn url_database(url: &str) -> Result<Option<String>> {
    let opts: PgConnectOptions =
        url.parse().map_err(|e| anyhow::anyhow!("--pg-url / CDC_PG_URL is not a PostgreSQL URL ({e})"))?;
    Ok(opts.get_database().filter(|db| !db.is_empty()).map(str::to_owned))
}

async fn create_database_if_missing(admin: &mut PgConnection, database: &str) -> Result<bool> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&mut *admin)
        .await?;
    if exists {
        return Ok(false);
    }
    let quoted: String = sqlx::query_scalar("SELECT quote_ident($1)").bind(database).fetch_one(&mut *admin).await?;
    match sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}"))).execute(&mut *admin).await {
        Ok(_) => Ok(true),
        // Another setup run created it between our check and our CREATE.
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P04") => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating database {database}")),
    }
}

/// The objects the schema file creates, as readable names, to report what a run changed.
async fn present_objects(conn: &mut PgConnection) -> Result<Vec<String>> {
    let rows: Vec<String> = sqlx::query_scalar(
        r#"
        SELECT 'table ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname IN ('products', 'orders', 'order_details')
        UNION ALL
        SELECT 'index ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'i'
           AND c.relname IN ('order_details_order_id_idx', 'order_details_product_id_idx')
        UNION ALL
        SELECT 'replica identity full on ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relreplident = 'f' AND c.relname IN ('products', 'orders', 'order_details')
        UNION ALL
        SELECT 'role ' || rolname FROM pg_roles WHERE rolname = 'debezium'
        UNION ALL
        SELECT 'SELECT grant on ' || table_name || ' to debezium' FROM information_schema.role_table_grants
         WHERE grantee = 'debezium' AND privilege_type = 'SELECT' AND table_schema = 'public'
        UNION ALL
        SELECT 'publication ' || pubname FROM pg_publication WHERE pubname = 'cdc_cqrs'
        "#,
    )
    .fetch_all(&mut *conn)
    .await
    .context("reading the catalog")?;
    Ok(rows)
}

/// Whether the capture role can already log in with `password` (then it is left as it is).
async fn capture_role_logs_in(args: &PgArgs, password: &str) -> Result<bool> {
    let opts = postgres::options(args, &args.database)?.username(CAPTURE_ROLE).password(password);
    match opts.connect().await {
        Ok(conn) => {
            let _ = sqlx::Connection::close(conn).await;
            Ok(true)
        }
        Err(e) if e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "28P01" || c == "28000") => {
            Ok(false)
        }
        Err(e) => Err(postgres::explain(e, &opts)),
    }
}

async fn set_capture_password(conn: &mut PgConnection, password: &str) -> Result<()> {
    // format(%L) quotes server-side; the statement itself is never logged.
    let stmt: String = sqlx::query_scalar("SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', $1::text, $2::text)")
        .bind(CAPTURE_ROLE)
        .bind(password)
        .fetch_one(&mut *conn)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("setting the password of role {CAPTURE_ROLE}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::url_database;

    #[test]
    fn maintenance_database_comes_from_the_url() {
        assert_eq!(url_database("postgres://u@h:1/admin").unwrap().as_deref(), Some("admin"));
        assert_eq!(url_database("postgres://u@h:1/admin?sslmode=disable").unwrap().as_deref(), Some("admin"));
        assert_eq!(url_database("postgres://u@h:1/").unwrap(), None);
        assert_eq!(url_database("postgres://u@h:1").unwrap(), None);
    }
}
