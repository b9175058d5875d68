//! An order grown past MongoDB's 16 MB document limit, DESIGN invariant 6 at its hardest: the lines that fit
//! are embedded, each further one is refused by MongoDB and goes to the dead-letter topic, and the job goes on
//! with the other orders. About 3 minutes in a release build, so outside the default run:
//! `scripts/stack exec cargo test --release --test big_order -- --ignored`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Capture;
use futures::TryStreamExt;

/// Lines of 100-character product names take ~317 bytes each embedded: this many pass 16 MB by ~140.
const LINES: i64 = 53_100;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "about 3 minutes in release: cargo test --release --test big_order -- --ignored"]
async fn an_order_past_16_mb_embeds_what_fits_and_dead_letters_the_rest() {
    let mut cap = Capture::start("bigorder").await;
    sqlx::raw_sql(
        "INSERT INTO products (name, price, stock_quantity) SELECT repeat('p', 100), 1.00, 10 FROM generate_series(1, 10);
         INSERT INTO orders (order_id, customer_name, address, phone) VALUES (1, 'big', 'here', '1'), (2, 'small', 'there', '2');",
    )
    .execute(&mut cap.pg)
    .await
    .unwrap();
    // The products first: their names, copied into each line, make the lines this long.
    let products_job = cap.spawn_job("stream_products", "big");
    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    let products = mongo.database(&cap.name).collection::<bson::Document>("products");
    let started = Instant::now();
    while products.count_documents(bson::doc! {}).await.unwrap() < 10 {
        assert!(started.elapsed() < Duration::from_secs(120), "the products never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics_port = cdc_cqrs::metrics::free_port().unwrap();
    let job = cap.spawn_job_with(
        "stream_order_details",
        "big",
        &[("CDC_METRICS_ADDR", &format!("127.0.0.1:{metrics_port}"))],
    );
    sqlx::query(
        "INSERT INTO order_details (order_id, product_id, unit_price, quantity)
         SELECT 1, 1 + g % 10, 1.00, 1 FROM generate_series(1, $1) g",
    )
    .bind(LINES)
    .execute(&mut cap.pg)
    .await
    .unwrap();
    sqlx::query("INSERT INTO order_details (order_id, product_id, unit_price, quantity) VALUES (2, 1, 2.00, 2)")
        .execute(&mut cap.pg)
        .await
        .unwrap();

    // Every line of the big order is either embedded or dead-lettered, and the small order has its line.
    let orders = mongo.database(&cap.name).collection::<bson::Document>("orders");
    let sizes = bson::doc! { "$project": {
        "bytes": { "$bsonSize": "$$ROOT" },
        "lines": { "$size": { "$ifNull": ["$lines", []] } },
    } };
    let started = Instant::now();
    let (big, small, dead) = loop {
        let docs: Vec<bson::Document> =
            orders.aggregate(vec![sizes.clone()]).await.unwrap().try_collect().await.unwrap();
        let lines_of =
            |id: i32| docs.iter().find(|d| d.get_i32("_id").ok() == Some(id)).and_then(|d| d.get_i32("lines").ok());
        let metrics =
            reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
        let dead = cdc_cqrs::metrics::value(&metrics, "cdc_dead_lettered_total").unwrap_or(0.0) as i64;
        let (big, small) = (lines_of(1).unwrap_or(0) as i64, lines_of(2).unwrap_or(0));
        if big + dead >= LINES && small == 1 {
            let bytes = docs.iter().find(|d| d.get_i32("_id").ok() == Some(1)).and_then(|d| d.get_i32("bytes").ok());
            assert!(bytes.is_some_and(|b| b <= 16 << 20), "order 1 is {bytes:?} bytes");
            break (big, small, dead);
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "after 15 min: {big} lines embedded, {dead} dead-lettered of {LINES}; order 2 has {small}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(dead > 0 && big > LINES - 1000, "{big} embedded, {dead} dead-lettered");
    assert_eq!((big + dead, small), (LINES, 1));

    // The dead letters are the source records of exactly the lines the order does not embed.
    let order = orders.find_one(bson::doc! { "_id": 1 }).await.unwrap().unwrap();
    let embedded: BTreeSet<i64> = order
        .get_array("lines")
        .unwrap()
        .iter()
        .map(|l| l.as_document().unwrap().get_i32("order_detail_id").unwrap() as i64)
        .collect();
    let topic = format!("{}.dead_letter", cap.name);
    let records =
        common::read_topics(&cap.stack.brokers, &[topic], Duration::from_secs(2), Duration::from_secs(60), |r| {
            r.len() as i64 >= dead
        });
    let refused: BTreeSet<i64> = records
        .iter()
        .map(|r| {
            let value = r.value.as_ref().expect("the source record");
            let after = &value.get("payload").unwrap_or(value)["after"];
            assert_eq!(after["order_id"], 1, "{value}");
            after["order_detail_id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(refused.len() as i64, dead, "one dead letter per refused line");
    assert!(embedded.is_disjoint(&refused));
    let all: Vec<i64> = sqlx::query_scalar("SELECT order_detail_id::bigint FROM order_details WHERE order_id = 1")
        .fetch_all(&mut cap.pg)
        .await
        .unwrap();
    assert_eq!(embedded.union(&refused).copied().collect::<Vec<_>>(), {
        let mut all = all;
        all.sort();
        all
    });
    job.stop();
    products_job.stop();
    mongo.shutdown().await;
    cap.teardown().await;
}
