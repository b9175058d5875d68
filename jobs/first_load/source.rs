//! Reading the write model as one PostgreSQL snapshot saw it, in key ranges, from several connections.
//!
//! A REPEATABLE READ transaction exports its snapshot (`pg_export_snapshot()`); every reader connection
//! imports it, so all of them see the same committed state however long the load takes, and that state is
//! exactly what `pg_current_snapshot()` describes for the handoff. Tables are read in primary-key ranges
//! (orders with their lines), so memory is bounded by the ranges in flight, not by the table size.
//! Money leaves PostgreSQL as integer cents (`numeric(10,2) * 100` is exact), the discount as
//! thousandths: the frames compute with exact integers.

use anyhow::{Context, Result, bail};
use cdc_cqrs::config::PgArgs;
use cdc_cqrs::handoff::Snapshot;
use cdc_cqrs::postgres;
use futures::TryStreamExt;
use sqlx::{Connection, PgConnection};

/// The write model's tables, in load order.
pub const TABLES: [&str; 3] = ["products", "orders", "order_details"];

/// The snapshot every reader shares; dropping it ends the exporting transaction.
pub struct SnapshotSource {
    _exporter: PgConnection,
    id: String,
    pub snapshot: Snapshot,
    pg: PgArgs,
}

impl SnapshotSource {
    /// Checks the tables and the connector's replication slot exist. The slot must exist before the
    /// snapshot is taken: then every transaction the snapshot does not hold reaches the stream.
    pub async fn check(pg: &PgArgs, slot: &str) -> Result<()> {
        let mut conn = postgres::connect(pg, &pg.database).await?;
        let mut missing = Vec::new();
        for table in TABLES {
            let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(format!("public.{table}"))
                .fetch_one(&mut conn)
                .await?;
            if found.is_none() {
                missing.push(table);
            }
        }
        if !missing.is_empty() {
            bail!(
                "table(s) {} missing in database {}: create the write model with setup_pg_db (or pick --database)",
                missing.join(", "),
                pg.database
            );
        }
        // Money is read as whole cents and discounts as thousandths (exact integers for polars): a wider
        // scale, which a migration may bring, would be rounded away.
        let too_fine: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT v.t || '.' || v.c, format_type(a.atttypid, a.atttypmod), v.s \
               FROM (VALUES ('products', 'price', 2), ('order_details', 'unit_price', 2), ('order_details', 'discount', 3)) v(t, c, s) \
               JOIN pg_attribute a ON a.attrelid = ('public.' || v.t)::regclass AND a.attname = v.c AND NOT a.attisdropped \
               JOIN information_schema.columns i ON i.table_schema = 'public' AND i.table_name = v.t AND i.column_name = v.c \
              WHERE i.data_type <> 'numeric' OR i.numeric_scale IS NULL OR i.numeric_scale > v.s",
        )
        .fetch_all(&mut conn)
        .await?;
        if let Some((column, kind, scale)) = too_fine.first() {
            bail!(
                "{column} is {kind}: first_load reads it as an exact integer and takes numeric with at most {scale} \
                 decimals (the stream jobs take any); alter the column back to numeric(p,{scale}) or load without first_load"
            );
        }
        let has_slot: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database())",
        )
        .bind(slot)
        .fetch_one(&mut conn)
        .await?;
        if !has_slot {
            bail!(
                "no replication slot {slot} in database {}: register the Debezium connector first (register_connector) so \
                 that changes made during and after the load are captured, or name its slot with --slot",
                pg.database
            );
        }
        Ok(())
    }

    /// Takes and exports the snapshot.
    pub async fn open(pg: &PgArgs) -> Result<SnapshotSource> {
        let mut conn = postgres::connect(pg, &pg.database).await?;
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut conn).await?;
        let (id, text): (String, String) =
            sqlx::query_as("SELECT pg_export_snapshot(), pg_current_snapshot()::text").fetch_one(&mut conn).await?;
        let snapshot = Snapshot::parse(&text)?;
        Ok(SnapshotSource { _exporter: conn, id, snapshot, pg: pg.clone() })
    }

    /// A new connection inside the shared snapshot.
    pub async fn reader(&self) -> Result<Reader> {
        let mut conn = postgres::connect(&self.pg, &self.pg.database).await?;
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut conn).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET TRANSACTION SNAPSHOT '{}'", self.id.replace('\'', ""))))
            .execute(&mut conn)
            .await
            .context("joining the load's snapshot")?;
        Ok(Reader { conn })
    }
}

/// Half-open key ranges `[lo, hi)` of about `size` keys covering `table`'s keys in the snapshot.
pub async fn key_ranges(reader: &mut Reader, table: &str, size: i64) -> Result<Vec<(i64, i64)>> {
    let key = match table {
        "products" => "product_id",
        "orders" => "order_id",
        other => bail!("no key ranges for {other}"),
    };
    let (lo, hi): (Option<i64>, Option<i64>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT min({key})::bigint, max({key})::bigint FROM {table}")))
            .fetch_one(&mut reader.conn)
            .await?;
    let (Some(lo), Some(hi)) = (lo, hi) else { return Ok(Vec::new()) };
    Ok((lo..=hi).step_by(size.max(1) as usize).map(|start| (start, (start + size).min(hi + 1))).collect())
}

/// The number of rows of `table` in the snapshot (for progress bars).
pub async fn count(reader: &mut Reader, table: &str) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&mut reader.conn)
        .await?;
    Ok(n as u64)
}

/// Products, column by column.
#[derive(Debug, Default)]
pub struct Products {
    pub product_id: Vec<i32>,
    pub name: Vec<String>,
    pub description: Vec<Option<String>>,
    pub price_cents: Vec<i64>,
    pub stock_quantity: Vec<i32>,
}

/// Orders, column by column.
#[derive(Debug, Default)]
pub struct Orders {
    pub order_id: Vec<i32>,
    pub customer_name: Vec<String>,
    pub address: Vec<String>,
    pub phone: Vec<String>,
    /// Epoch microseconds, as Debezium sends it.
    pub order_date_us: Vec<Option<i64>>,
    pub status: Vec<Option<String>>,
}

/// Order lines, column by column.
#[derive(Debug, Default)]
pub struct Lines {
    pub order_detail_id: Vec<i32>,
    pub order_id: Vec<i32>,
    pub product_id: Vec<i32>,
    pub unit_price_cents: Vec<i64>,
    pub quantity: Vec<i32>,
    pub discount_milli: Vec<i64>,
}

/// The name and price of the products some lines refer to.
#[derive(Debug, Default)]
pub struct ProductRefs {
    pub product_id: Vec<i32>,
    pub name: Vec<String>,
    pub price_cents: Vec<i64>,
}

/// One orders key range: the orders, their lines and the products those lines refer to.
#[derive(Debug, Default)]
pub struct OrderRange {
    pub orders: Orders,
    pub lines: Lines,
    pub products: ProductRefs,
}

/// A connection inside the load's snapshot.
pub struct Reader {
    conn: PgConnection,
}

impl Reader {
    pub async fn products(&mut self, (lo, hi): (i64, i64)) -> Result<Products> {
        let mut out = Products::default();
        let mut rows = sqlx::query_as::<_, (i32, String, Option<String>, i64, i32)>(
            "SELECT product_id, name, description, (price * 100)::bigint, stock_quantity::int4 FROM products \
             WHERE product_id >= $1 AND product_id < $2",
        )
        .bind(lo)
        .bind(hi)
        .fetch(&mut self.conn);
        while let Some((id, name, description, price, stock)) = rows.try_next().await.context("reading products")? {
            out.product_id.push(id);
            out.name.push(name);
            out.description.push(description);
            out.price_cents.push(price);
            out.stock_quantity.push(stock);
        }
        Ok(out)
    }

    pub async fn orders(&mut self, (lo, hi): (i64, i64)) -> Result<OrderRange> {
        let mut out = OrderRange::default();
        let o = &mut out.orders;
        let mut rows = sqlx::query_as::<_, (i32, String, String, String, Option<i64>, Option<String>)>(
            "SELECT order_id, customer_name, address, phone, (extract(epoch FROM order_date) * 1000000)::bigint, status \
             FROM orders WHERE order_id >= $1 AND order_id < $2",
        )
        .bind(lo)
        .bind(hi)
        .fetch(&mut self.conn);
        while let Some((id, name, address, phone, date, status)) = rows.try_next().await.context("reading orders")? {
            o.order_id.push(id);
            o.customer_name.push(name);
            o.address.push(address);
            o.phone.push(phone);
            o.order_date_us.push(date);
            o.status.push(status);
        }
        drop(rows);
        let l = &mut out.lines;
        let mut rows = sqlx::query_as::<_, (i32, i32, i32, i64, i32, i64)>(
            "SELECT order_detail_id, order_id, product_id, (unit_price * 100)::bigint, quantity::int4, \
             (discount * 1000)::bigint FROM order_details WHERE order_id >= $1 AND order_id < $2",
        )
        .bind(lo)
        .bind(hi)
        .fetch(&mut self.conn);
        while let Some((id, order, product, price, quantity, discount)) =
            rows.try_next().await.context("reading order_details")?
        {
            l.order_detail_id.push(id);
            l.order_id.push(order);
            l.product_id.push(product);
            l.unit_price_cents.push(price);
            l.quantity.push(quantity);
            l.discount_milli.push(discount);
        }
        drop(rows);
        let p = &mut out.products;
        let mut rows = sqlx::query_as::<_, (i32, String, i64)>(
            "SELECT product_id, name, (price * 100)::bigint FROM products WHERE product_id IN \
             (SELECT DISTINCT product_id FROM order_details WHERE order_id >= $1 AND order_id < $2)",
        )
        .bind(lo)
        .bind(hi)
        .fetch(&mut self.conn);
        while let Some((id, name, price)) = rows.try_next().await.context("reading products of lines")? {
            p.product_id.push(id);
            p.name.push(name);
            p.price_cents.push(price);
        }
        Ok(out)
    }

    /// Ends the reader's transaction.
    pub async fn close(mut self) -> Result<()> {
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await?;
        self.conn.close().await?;
        Ok(())
    }
}
