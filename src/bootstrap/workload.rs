//! The sample write workload: an e-commerce shop's life in transactions.
//!
//! Three phases, each made of real transactions: a catalogue of products (1,000 per transaction), then
//! orders with 1-5 lines each (an order and its lines in one transaction, or several orders per
//! transaction with `orders_per_tx`), then a mix of changes over time: new orders, lines added, changed and
//! removed, status moves, cancellations, order deletes (lines go by cascade), new products, price and
//! stock changes. Every transaction is a single statement, so one round trip; several connections run in
//! parallel. It is also the load generator of the benchmarks.
//!
//! Same seed, same data: each connection draws from its own generator seeded from `seed` and its index, and
//! updates or deletes only orders it owns, so with one connection every id and value repeats exactly; with
//! several, the same transactions run and only the interleaving of generated ids differs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::PgConnection;

/// One kind of write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    NewOrder,
    AddLine,
    ChangeLine,
    RemoveLine,
    AdvanceStatus,
    CancelOrder,
    DeleteOrder,
    NewProduct,
    ChangePrice,
    ChangeStock,
}

impl Op {
    pub const ALL: [Op; 10] = [
        Op::NewOrder,
        Op::AddLine,
        Op::ChangeLine,
        Op::RemoveLine,
        Op::AdvanceStatus,
        Op::CancelOrder,
        Op::DeleteOrder,
        Op::NewProduct,
        Op::ChangePrice,
        Op::ChangeStock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::NewOrder => "new_order",
            Op::AddLine => "add_line",
            Op::ChangeLine => "change_line",
            Op::RemoveLine => "remove_line",
            Op::AdvanceStatus => "advance_status",
            Op::CancelOrder => "cancel_order",
            Op::DeleteOrder => "delete_order",
            Op::NewProduct => "new_product",
            Op::ChangePrice => "change_price",
            Op::ChangeStock => "change_stock",
        }
    }

    fn index(self) -> usize {
        Op::ALL.iter().position(|&o| o == self).expect("every op is in ALL")
    }

    fn needs_order(self) -> bool {
        matches!(
            self,
            Op::AddLine | Op::ChangeLine | Op::RemoveLine | Op::AdvanceStatus | Op::CancelOrder | Op::DeleteOrder
        )
    }
}

/// Relative weights of the change phase's operations, e.g. `new_order=30,change_price=10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(Op, u32)>,
}

impl Mix {
    pub const DEFAULT: &'static str = "new_order=30,add_line=5,change_line=10,remove_line=5,advance_status=20,\
        cancel_order=3,delete_order=5,new_product=2,change_price=10,change_stock=10";

    fn pick(&self, rng: &mut impl Rng) -> Op {
        let total: u32 = self.weights.iter().map(|(_, w)| w).sum();
        let mut ticket = rng.random_range(0..total);
        for &(op, w) in &self.weights {
            if ticket < w {
                return op;
            }
            ticket -= w;
        }
        unreachable!("ticket below the total weight")
    }
}

impl Default for Mix {
    fn default() -> Self {
        Mix::DEFAULT.parse().expect("the default mix parses")
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let known = || Op::ALL.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ");
        let mut weights = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) =
                part.split_once('=').ok_or_else(|| format!("'{part}' is not NAME=WEIGHT (e.g. new_order=30)"))?;
            let op = Op::ALL
                .into_iter()
                .find(|o| o.name() == name.trim())
                .ok_or_else(|| format!("unknown operation '{}'; known: {}", name.trim(), known()))?;
            let weight: u32 =
                weight.trim().parse().map_err(|_| format!("weight of {} must be a whole number", op.name()))?;
            if weights.iter().any(|(o, _)| *o == op) {
                return Err(format!("{} is given twice", op.name()));
            }
            weights.push((op, weight));
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            return Err(format!("the mix needs at least one operation with a weight above 0; known: {}", known()));
        }
        Ok(Mix { weights })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.weights.iter().map(|(o, w)| format!("{}={w}", o.name())).collect();
        f.write_str(&parts.join(","))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Products to add first.
    pub products: u64,
    /// Orders to create next (with their lines).
    pub orders: u64,
    /// Orders per transaction in the orders phase.
    pub orders_per_tx: u32,
    /// Transactions of the change phase; `None` runs it until `duration` is over (or not at all).
    pub changes: Option<u64>,
    /// Wall-clock bound of the whole run.
    pub duration: Option<Duration>,
    /// Transactions per second over all connections; `None` is as fast as the server goes.
    pub rate: Option<f64>,
    pub seed: u64,
    pub mix: Mix,
    /// Parallel connections.
    pub connections: u32,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Transactions per operation (the orders phase counts under `new_order`, one per order).
    pub ops: BTreeMap<&'static str, u64>,
    pub products_added: u64,
    pub transactions: u64,
    /// Time of the orders and change phases (the catalogue is not counted).
    pub elapsed: Duration,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
    pub latency_max: Duration,
}

impl Summary {
    pub fn tx_per_sec(&self) -> f64 {
        self.transactions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(
            f,
            "insert_sample_data: {} products added; {} transactions in {:.2}s = {:.0} tx/s \
             (latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
            self.products_added,
            self.transactions,
            self.elapsed.as_secs_f64(),
            self.tx_per_sec(),
            ms(self.latency_p50),
            ms(self.latency_p99),
            ms(self.latency_max),
        )?;
        for (op, n) in &self.ops {
            writeln!(f, "  {op:<15} {n}")?;
        }
        Ok(())
    }
}

const PRODUCTS_PER_TX: u64 = 1_000;

/// Runs the workload on `pool` (which should allow `workload.connections` connections), ticking `progress`
/// once per order or change.
pub async fn run(pool: &PgPool, workload: &Workload, progress: &ProgressBar) -> Result<Summary> {
    if workload.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let started = Instant::now();
    let deadline = workload.duration.map(|d| started + d);
    let mut conn = pool.acquire().await?;
    let products_added = add_catalogue(&mut conn, workload, progress).await?;
    let catalogue: Arc<Vec<(i32, Decimal)>> = Arc::new(
        sqlx::query_as("SELECT product_id, price FROM products ORDER BY product_id")
            .fetch_all(&mut *conn)
            .await
            .context("reading the product catalogue")?,
    );
    let runs_changes = workload.changes.is_some_and(|n| n > 0) || (workload.changes.is_none() && deadline.is_some());
    if catalogue.is_empty() && (workload.orders > 0 || runs_changes) {
        bail!("there are no products to order: add some with --products N");
    }
    let existing_orders: Vec<i32> = if runs_changes {
        sqlx::query_scalar("SELECT order_id FROM orders ORDER BY order_id").fetch_all(&mut *conn).await?
    } else {
        Vec::new()
    };
    drop(conn);

    let phase_start = Instant::now();
    let n = u64::from(workload.connections);
    let mut tasks = Vec::new();
    for w in 0..n {
        let share = |total: u64| total / n + u64::from(w < total % n);
        let worker = Worker {
            rng: ChaCha8Rng::seed_from_u64(workload.seed.wrapping_add(w.wrapping_mul(0x9E37_79B9_7F4A_7C15))),
            catalogue: catalogue.as_ref().clone(),
            orders: existing_orders.iter().copied().filter(|id| *id as u64 % n == w).collect(),
            counts: [0; Op::ALL.len()],
            latencies: Vec::new(),
        };
        let plan = WorkerPlan {
            orders: share(workload.orders),
            changes: workload.changes.map(share),
            orders_per_tx: workload.orders_per_tx.max(1),
            mix: workload.mix.clone(),
            interval: workload.rate.map(|r| Duration::from_secs_f64(n as f64 / r.max(1e-6))),
            deadline,
        };
        let mut conn = pool.acquire().await?;
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move { worker.run(&mut conn, plan, &progress).await }));
    }

    let mut counts = [0u64; Op::ALL.len()];
    let mut latencies = Vec::new();
    for task in tasks {
        let worker = task.await.context("a workload connection panicked")??;
        for (total, c) in counts.iter_mut().zip(worker.counts) {
            *total += c;
        }
        latencies.extend(worker.latencies);
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(Duration::ZERO, |&us| Duration::from_micros(us.into()))
    };
    Ok(Summary {
        ops: Op::ALL.iter().map(|o| (o.name(), counts[o.index()])).filter(|(_, c)| *c > 0).collect(),
        products_added,
        transactions: latencies.len() as u64,
        elapsed: phase_start.elapsed(),
        latency_p50: pct(0.50),
        latency_p99: pct(0.99),
        latency_max: pct(1.0),
    })
}

async fn add_catalogue(conn: &mut PgConnection, workload: &Workload, progress: &ProgressBar) -> Result<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(workload.seed ^ 0xC0FF_EE00_D15C_0BA1);
    let mut added = 0;
    while added < workload.products {
        let batch = (workload.products - added).min(PRODUCTS_PER_TX);
        let products: Vec<NewProduct> = (0..batch).map(|_| NewProduct::generate(&mut rng)).collect();
        insert_products(conn, &products).await?;
        added += batch;
        progress.set_message(format!("{added} products"));
    }
    Ok(added)
}

struct WorkerPlan {
    orders: u64,
    changes: Option<u64>,
    orders_per_tx: u32,
    mix: Mix,
    interval: Option<Duration>,
    deadline: Option<Instant>,
}

/// One connection's share of the work, with the state it needs to pick realistic targets.
struct Worker {
    rng: ChaCha8Rng,
    catalogue: Vec<(i32, Decimal)>,
    /// Orders this worker owns (created, or existing ones with id % connections == its index).
    orders: Vec<i32>,
    counts: [u64; Op::ALL.len()],
    /// Per transaction, in microseconds.
    latencies: Vec<u32>,
}

impl Worker {
    async fn run(mut self, conn: &mut PgConnection, plan: WorkerPlan, progress: &ProgressBar) -> Result<Self> {
        let mut ticker = plan.interval.map(|i| {
            let mut t = tokio::time::interval(i);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        let over = |deadline: Option<Instant>| deadline.is_some_and(|d| Instant::now() >= d);

        let mut remaining = plan.orders;
        while remaining > 0 && !over(plan.deadline) {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            let k = remaining.min(u64::from(plan.orders_per_tx));
            let orders: Vec<NewOrder> = (0..k).map(|_| NewOrder::generate(&mut self.rng, &self.catalogue)).collect();
            let t0 = Instant::now();
            let ids = insert_orders(conn, &orders).await?;
            self.record(Op::NewOrder, t0, k);
            self.orders.extend(ids);
            remaining -= k;
            progress.inc(k);
        }

        let mut done = 0u64;
        while plan.changes.is_none_or(|n| done < n) && !over(plan.deadline) {
            if plan.changes.is_none() && plan.deadline.is_none() {
                break;
            }
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            let mut op = plan.mix.pick(&mut self.rng);
            if op.needs_order() && self.orders.is_empty() {
                op = Op::NewOrder;
            }
            let t0 = Instant::now();
            self.apply(conn, op).await.with_context(|| format!("workload operation {}", op.name()))?;
            self.record(op, t0, 1);
            done += 1;
            progress.inc(1);
        }
        Ok(self)
    }

    fn record(&mut self, op: Op, started: Instant, n: u64) {
        self.counts[op.index()] += n;
        self.latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }

    fn some_order(&mut self) -> (usize, i32) {
        let i = self.rng.random_range(0..self.orders.len());
        (i, self.orders[i])
    }

    fn some_product(&mut self) -> (usize, i32) {
        let i = popular_index(&mut self.rng, self.catalogue.len());
        (i, self.catalogue[i].0)
    }

    async fn apply(&mut self, conn: &mut PgConnection, op: Op) -> Result<()> {
        match op {
            Op::NewOrder => {
                let order = NewOrder::generate(&mut self.rng, &self.catalogue);
                let ids = insert_orders(conn, std::slice::from_ref(&order)).await?;
                self.orders.extend(ids);
            }
            Op::AddLine => {
                let (_, order_id) = self.some_order();
                let line = Line::generate(&mut self.rng, &self.catalogue);
                sqlx::query(
                    "INSERT INTO order_details (order_id, product_id, unit_price, quantity, discount) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(order_id)
                .bind(line.product_id)
                .bind(line.unit_price)
                .bind(line.quantity)
                .bind(line.discount)
                .execute(&mut *conn)
                .await?;
            }
            Op::ChangeLine => {
                let (_, order_id) = self.some_order();
                let nth: i64 = self.rng.random_range(0..5);
                let quantity = quantity(&mut self.rng);
                let discount = discount(&mut self.rng);
                sqlx::query(
                    "UPDATE order_details SET quantity = $2, discount = $3 WHERE order_detail_id = ( \
                       SELECT order_detail_id FROM order_details WHERE order_id = $1 ORDER BY order_detail_id \
                       OFFSET $4 % greatest(1, (SELECT count(*) FROM order_details WHERE order_id = $1)) LIMIT 1)",
                )
                .bind(order_id)
                .bind(quantity)
                .bind(discount)
                .bind(nth)
                .execute(&mut *conn)
                .await?;
            }
            Op::RemoveLine => {
                let (_, order_id) = self.some_order();
                // An order keeps at least one line.
                sqlx::query(
                    "DELETE FROM order_details WHERE order_detail_id = ( \
                       SELECT max(order_detail_id) FROM order_details WHERE order_id = $1 HAVING count(*) > 1)",
                )
                .bind(order_id)
                .execute(&mut *conn)
                .await?;
            }
            Op::AdvanceStatus => {
                let (_, order_id) = self.some_order();
                sqlx::query(
                    "UPDATE orders SET status = CASE status WHEN 'pending' THEN 'paid' WHEN 'paid' THEN 'shipped' \
                       ELSE 'delivered' END \
                     WHERE order_id = $1 AND status IN ('pending', 'paid', 'shipped')",
                )
                .bind(order_id)
                .execute(&mut *conn)
                .await?;
            }
            Op::CancelOrder => {
                let (_, order_id) = self.some_order();
                sqlx::query(
                    "UPDATE orders SET status = 'cancelled' WHERE order_id = $1 AND status IN ('pending', 'paid')",
                )
                .bind(order_id)
                .execute(&mut *conn)
                .await?;
            }
            Op::DeleteOrder => {
                let (i, order_id) = self.some_order();
                sqlx::query("DELETE FROM orders WHERE order_id = $1").bind(order_id).execute(&mut *conn).await?;
                self.orders.swap_remove(i);
            }
            Op::NewProduct => {
                let product = NewProduct::generate(&mut self.rng);
                let added = insert_products(conn, std::slice::from_ref(&product)).await?;
                self.catalogue.extend(added);
            }
            Op::ChangePrice => {
                let (i, product_id) = self.some_product();
                let factor = *[0.90, 0.95, 0.98, 1.02, 1.05, 1.10].choose(&mut self.rng).expect("not empty");
                let price: Decimal = sqlx::query_scalar(
                    "UPDATE products SET price = greatest(0.01, round(price * $2::numeric, 2)) \
                     WHERE product_id = $1 RETURNING price",
                )
                .bind(product_id)
                .bind(factor)
                .fetch_one(&mut *conn)
                .await?;
                self.catalogue[i].1 = price;
            }
            Op::ChangeStock => {
                let (_, product_id) = self.some_product();
                let delta: i32 = self.rng.random_range(-20..=50);
                sqlx::query(
                    "UPDATE products SET stock_quantity = greatest(0, stock_quantity + $2) WHERE product_id = $1",
                )
                .bind(product_id)
                .bind(delta)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}

/// 80% of picks go to the first 20% of the catalogue: a few products sell most.
fn popular_index(rng: &mut impl Rng, len: usize) -> usize {
    let hot = (len / 5).max(1);
    if rng.random_bool(0.8) { rng.random_range(0..hot) } else { rng.random_range(0..len) }
}

fn quantity(rng: &mut impl Rng) -> i32 {
    *[1, 1, 1, 1, 2, 2, 3, 4, 5, 10].choose(rng).expect("not empty")
}

fn discount(rng: &mut impl Rng) -> Decimal {
    let permille = *[0, 0, 0, 0, 0, 50, 100, 150, 125].choose(rng).expect("not empty");
    Decimal::new(permille, 3)
}

struct NewProduct {
    name: String,
    description: Option<String>,
    price: Decimal,
    stock: i32,
}

impl NewProduct {
    fn generate(rng: &mut impl Rng) -> Self {
        const ADJECTIVES: [&str; 12] = [
            "Classic",
            "Compact",
            "Deluxe",
            "Eco",
            "Ergonomic",
            "Heavy-Duty",
            "Mini",
            "Pro",
            "Rustic",
            "Smart",
            "Ultra",
            "Vintage",
        ];
        const MATERIALS: [&str; 10] =
            ["Bamboo", "Canvas", "Ceramic", "Cotton", "Glass", "Leather", "Oak", "Steel", "Titanium", "Wool"];
        const NOUNS: [&str; 14] = [
            "Backpack",
            "Blender",
            "Chair",
            "Desk Lamp",
            "Headphones",
            "Kettle",
            "Keyboard",
            "Mug",
            "Notebook",
            "Pan",
            "Scarf",
            "Sneakers",
            "Tent",
            "Watch",
        ];
        let pick = |rng: &mut dyn rand::RngCore, list: &[&'static str]| list[rng.random_range(0..list.len())];
        let name = format!(
            "{} {} {} {}",
            pick(rng, &ADJECTIVES),
            pick(rng, &MATERIALS),
            pick(rng, &NOUNS),
            rng.random_range(100..1000)
        );
        let description = match rng.random_range(0..100) {
            // No description at all.
            0..=4 => None,
            // A long, poorly compressible text: stored out of line (TOAST), so an update of another column
            // streams it as Debezium's unavailable-value placeholder.
            5..=6 => Some((0..6_000).map(|i| if i % 9 == 8 { ' ' } else { rng.random_range('a'..='z') }).collect()),
            _ => Some(format!(
                "{} made of {}; {} year warranty.",
                pick(rng, &["Handmade", "Durable", "Lightweight", "Award-winning", "Bestselling"]),
                pick(rng, &MATERIALS).to_lowercase(),
                rng.random_range(1..=5)
            )),
        };
        NewProduct {
            name,
            description,
            price: Decimal::new(rng.random_range(199..=49_999), 2),
            stock: rng.random_range(0..=500),
        }
    }
}

async fn insert_products(conn: &mut PgConnection, products: &[NewProduct]) -> Result<Vec<(i32, Decimal)>> {
    let rows = sqlx::query_as(
        "INSERT INTO products (name, description, price, stock_quantity) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::int[]) \
         RETURNING product_id, price",
    )
    .bind(products.iter().map(|p| p.name.clone()).collect::<Vec<_>>())
    .bind(products.iter().map(|p| p.description.clone()).collect::<Vec<_>>())
    .bind(products.iter().map(|p| p.price).collect::<Vec<_>>())
    .bind(products.iter().map(|p| p.stock).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .context("inserting products")?;
    Ok(rows)
}

struct Line {
    product_id: i32,
    unit_price: Decimal,
    quantity: i32,
    discount: Decimal,
}

impl Line {
    fn generate(rng: &mut impl Rng, catalogue: &[(i32, Decimal)]) -> Self {
        let (product_id, unit_price) = catalogue[popular_index(rng, catalogue.len())];
        Line { product_id, unit_price, quantity: quantity(rng), discount: discount(rng) }
    }
}

struct NewOrder {
    customer_name: String,
    address: String,
    phone: String,
    lines: Vec<Line>,
}

impl NewOrder {
    fn generate(rng: &mut impl Rng, catalogue: &[(i32, Decimal)]) -> Self {
        const FIRST: [&str; 16] = [
            "Ada", "Bruno", "Chloé", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Inés", "Jonas", "Kemi", "Lars",
            "Maya", "Noah", "Olga", "Priya",
        ];
        const LAST: [&str; 14] = [
            "Andersen", "Baptiste", "Chen", "Dubois", "García", "Haddad", "Ivanova", "Johnson", "Kowalski", "Lopez",
            "Müller", "Nakamura", "O'Brien", "Rossi",
        ];
        const STREETS: [&str; 10] = [
            "Main St",
            "Oak Ave",
            "Rue de Rivoli",
            "Baker St",
            "Elm Rd",
            "Hauptstraße",
            "Via Roma",
            "Maple Dr",
            "High St",
            "Calle Mayor",
        ];
        const CITIES: [&str; 8] = ["Springfield", "Paris", "London", "Berlin", "Madrid", "Rome", "Lagos", "Osaka"];
        let lines = (0..rng.random_range(1..=5)).map(|_| Line::generate(rng, catalogue)).collect();
        NewOrder {
            customer_name: format!(
                "{} {}",
                FIRST[rng.random_range(0..FIRST.len())],
                LAST[rng.random_range(0..LAST.len())]
            ),
            address: format!(
                "{} {}, {}",
                rng.random_range(1..=999),
                STREETS[rng.random_range(0..STREETS.len())],
                CITIES[rng.random_range(0..CITIES.len())]
            ),
            phone: format!("+1-555-{:03}-{:04}", rng.random_range(0..1000), rng.random_range(0..10_000)),
            lines,
        }
    }
}

/// Inserts orders and all their lines in one statement (so one transaction and one round trip) and returns
/// the new order ids. Ids are drawn from the orders sequence first, so lines join their order by position.
async fn insert_orders(conn: &mut PgConnection, orders: &[NewOrder]) -> Result<Vec<i32>> {
    let mut line_order = Vec::new();
    let (mut product_id, mut unit_price, mut quantity, mut discount) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (n, order) in orders.iter().enumerate() {
        for line in &order.lines {
            line_order.push(n as i32 + 1);
            product_id.push(line.product_id);
            unit_price.push(line.unit_price);
            quantity.push(line.quantity);
            discount.push(line.discount);
        }
    }
    let ids = sqlx::query_scalar(
        r#"
        WITH ids AS MATERIALIZED (
            SELECT n, nextval(pg_get_serial_sequence('orders', 'order_id'))::int AS order_id
            FROM generate_series(1, $1::int) AS n
        ), new_orders AS (
            INSERT INTO orders (order_id, customer_name, address, phone)
            SELECT ids.order_id, c.customer_name, c.address, c.phone
            FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS c(customer_name, address, phone, n)
            JOIN ids USING (n)
            RETURNING order_id
        ), new_lines AS (
            INSERT INTO order_details (order_id, product_id, unit_price, quantity, discount)
            SELECT ids.order_id, l.product_id, l.unit_price, l.quantity, l.discount
            FROM unnest($5::int[], $6::int[], $7::numeric[], $8::int[], $9::numeric[])
                 AS l(n, product_id, unit_price, quantity, discount)
            JOIN ids USING (n)
        )
        SELECT order_id FROM new_orders
        "#,
    )
    .bind(orders.len() as i32)
    .bind(orders.iter().map(|o| o.customer_name.clone()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.address.clone()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.phone.clone()).collect::<Vec<_>>())
    .bind(line_order)
    .bind(product_id)
    .bind(unit_price)
    .bind(quantity)
    .bind(discount)
    .fetch_all(&mut *conn)
    .await
    .context("inserting orders")?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects_with_the_fix() {
        let mix: Mix = "new_order=3, delete_order=1".parse().unwrap();
        assert_eq!(mix.to_string(), "new_order=3,delete_order=1");
        assert!(Mix::default().weights.len() == Op::ALL.len());
        let err = "new_ordr=3".parse::<Mix>().unwrap_err();
        assert!(err.contains("unknown operation 'new_ordr'") && err.contains("new_order"), "{err}");
        assert!("new_order=x".parse::<Mix>().unwrap_err().contains("whole number"));
        assert!("new_order=0".parse::<Mix>().unwrap_err().contains("above 0"));
        assert!("new_order".parse::<Mix>().unwrap_err().contains("NAME=WEIGHT"));
        assert!("new_order=1,new_order=2".parse::<Mix>().unwrap_err().contains("twice"));
    }

    #[test]
    fn picks_follow_the_weights() {
        let mix: Mix = "new_order=3,delete_order=1".parse().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let deletes = (0..10_000).filter(|_| mix.pick(&mut rng) == Op::DeleteOrder).count();
        assert!((2_200..2_800).contains(&deletes), "{deletes}");
    }

    #[test]
    fn same_seed_same_orders() {
        let catalogue = vec![(1, Decimal::new(1000, 2)), (2, Decimal::new(250, 2))];
        let generate = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| NewOrder::generate(&mut rng, &catalogue))
                .map(|o| (o.customer_name, o.phone, o.lines.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(generate(7), generate(7));
        assert_ne!(generate(7), generate(8));
    }
}
