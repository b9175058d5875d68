//! The pipeline through the migrations a live e-commerce schema goes through: columns added (with and
//! without a default) and dropped, `varchar` and `numeric` widened, quantities to `bigint`, `order_date` to
//! `timestamptz`, all while the workload writes and the three jobs run. Nothing is dead-lettered, the read
//! models stay equal to PostgreSQL's projection (their shape is the contract's: new columns stay out), and
//! `first_load --rebuild` loads the migrated tables; a money column given more decimals than first_load
//! reads exactly is streamed exactly (the product and its copies in orders), and first_load refuses it
//! naming the column.

mod common;

use std::time::Duration;

use common::{Capture, success};

const ALL: [&str; 3] = ["products", "orders", "order_details"];
const JOBS: [&str; 3] = ["stream_products", "stream_orders", "stream_order_details"];
const CONVERGE: Duration = Duration::from_secs(180);

/// Run one after another while the workload writes. The session is in UTC, so the `timestamptz` holds the
/// instants the `timestamp` meant (a rewrite that changes values is not in the change stream: see README).
const MIGRATIONS: [&str; 7] = [
    "ALTER TABLE products ADD COLUMN category varchar(40)",
    "ALTER TABLE orders ADD COLUMN channel text NOT NULL DEFAULT 'web'",
    "ALTER TABLE products ALTER COLUMN name TYPE varchar(200)",
    "ALTER TABLE order_details ALTER COLUMN unit_price TYPE numeric(12,2), ALTER COLUMN quantity TYPE bigint",
    "ALTER TABLE products ALTER COLUMN stock_quantity TYPE bigint",
    "SET timezone = 'UTC'; ALTER TABLE orders ALTER COLUMN order_date TYPE timestamptz",
    "ALTER TABLE orders ALTER COLUMN phone TYPE varchar(40)",
];

#[tokio::test(flavor = "multi_thread")]
async fn the_read_models_follow_the_write_model_through_its_migrations() {
    let cap = Capture::start("migrations").await;
    cap.workload(&["--products", "30", "--orders", "60", "--changes", "200", "--seed", "21", "--connections", "2"]);
    let jobs = JOBS.map(|job| cap.spawn_job(job, job));
    cap.converge(&ALL, CONVERGE).await;

    // Changes only, at a steady rate, for as long as the migrations take.
    let steady: Vec<&str> =
        "--products 0 --orders 0 --duration 20s --rate 40 --seed 22 --connections 2".split(' ').collect();
    let mut workload = cap.workload_in_background(&steady);
    let mut pg = cap.connect().await;
    for ddl in MIGRATIONS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl)).execute(&mut pg).await.unwrap_or_else(|e| panic!("{ddl}: {e}"));
    }
    assert!(workload.wait().unwrap().success(), "the workload went on through the migrations");
    // Rows that use what the migrations made room for.
    sqlx::raw_sql(
        "UPDATE products SET category = 'garden', name = name || repeat(' extra long', 10) WHERE product_id % 3 = 0; \
         UPDATE products SET stock_quantity = 2000000000 WHERE product_id % 5 = 1; \
         UPDATE orders SET channel = 'app', order_date = order_date + interval '90 minutes 0.123456 seconds', \
                phone = '+44 20 7946 0958 ext. 4417' WHERE order_id % 4 = 0; \
         UPDATE order_details SET quantity = 70000, unit_price = unit_price + 1000000 WHERE order_detail_id % 7 = 0; \
         ALTER TABLE products DROP COLUMN category",
    )
    .execute(&mut pg)
    .await
    .unwrap();
    cap.workload(&["--products", "5", "--orders", "20", "--changes", "100", "--seed", "23"]);
    cap.converge(&ALL, CONVERGE).await;

    // Every change was applied: none refused.
    let letters = dead_letters(&cap);
    assert!(letters.contains(": 0 dead letters") || letters.contains("no such topic"), "{letters}");

    // The migrated tables load too, from a new snapshot, and the jobs go on from it.
    success("first_load", &cap.run_first_load(&["--rebuild"]));
    cap.workload(&["--products", "0", "--orders", "10", "--changes", "50", "--seed", "24"]);
    cap.converge(&ALL, CONVERGE).await;

    // Prices with four decimals: the stream keeps them exact, first_load (whole cents) refuses the column.
    sqlx::raw_sql(
        "ALTER TABLE products ALTER COLUMN price TYPE numeric(12,4); \
         UPDATE products SET price = price + 0.0049 WHERE product_id % 2 = 0",
    )
    .execute(&mut pg)
    .await
    .unwrap();
    cap.converge(&ALL, CONVERGE).await;
    // Exact, not rounded to cents on both sides: a changed price as PostgreSQL has it, its copies the same.
    let (id, price): (i32, String) = sqlx::query_as(
        "SELECT p.product_id, p.price::text FROM products p WHERE p.product_id % 2 = 0 \
           AND EXISTS (SELECT 1 FROM order_details d WHERE d.product_id = p.product_id) ORDER BY 1 LIMIT 1",
    )
    .fetch_one(&mut pg)
    .await
    .unwrap();
    assert!(!price.ends_with("00"), "a price with four decimals: {price}");
    let db = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap().database(&cap.name);
    let product = db.collection::<bson::Document>("products").find_one(bson::doc! { "_id": id }).await.unwrap();
    assert_eq!(product.unwrap().get("price").map(ToString::to_string), Some(price.clone()));
    let order = db
        .collection::<bson::Document>("orders")
        .find_one(bson::doc! { "lines.product_id": id })
        .projection(bson::doc! { "lines.$": 1 })
        .await
        .unwrap()
        .expect("an order with that product");
    let copy = order.get_array("lines").unwrap()[0].as_document().unwrap().get_document("product").unwrap();
    assert_eq!(copy.get("price").map(ToString::to_string), Some(price));
    let refused = cap.run_first_load(&["--rebuild"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "first_load loaded prices it would round:\n{stderr}");
    assert!(stderr.contains("products.price is numeric(12,4)") && stderr.contains("numeric(p,2)"), "{stderr}");

    for job in jobs {
        job.stop();
    }
    cap.teardown().await;
}

/// `dead_letters list` for this capture.
fn dead_letters(cap: &Capture) -> String {
    let out = cap.stack.command("dead_letters").env("CDC_TOPIC_PREFIX", &cap.name).arg("list").output().unwrap();
    success("dead_letters", &out)
}
