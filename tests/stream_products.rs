//! stream_products against the real services: the `products` read model converges to PostgreSQL through
//! inserts, price and stock updates, deletes, an out-of-line (TOASTed) description, a record that does not
//! decode, a change MongoDB refuses, a full replay from the first offset, and a TRUNCATE; a renamed
//! product whose copy one order refuses, which reaches the product's other orders all the same; and the
//! job's health when its broker is gone.

mod common;

use std::time::Duration;

use common::Capture;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn products_converge_through_updates_deletes_poison_replay_and_truncate() {
    let mut cap = Capture::start("products").await;
    cap.workload(&[
        "--products",
        "40",
        "--orders",
        "0",
        "--changes",
        "300",
        "--mix",
        "change_price=5,change_stock=5,new_product=2",
    ]);

    // A deleted product, and one whose long description is stored out of line and then left unchanged by
    // a price update (Debezium sends the placeholder; the read model must keep the text).
    let long: String = (0..5000).map(|i| char::from(b'a' + ((i * 7919) % 26) as u8)).collect();
    sqlx::query("INSERT INTO products (product_id, name, price, stock_quantity) VALUES (100001, 'gone', 1.00, 1)")
        .execute(&mut cap.pg)
        .await
        .unwrap();
    sqlx::query("DELETE FROM products WHERE product_id = 100001").execute(&mut cap.pg).await.unwrap();
    sqlx::query("ALTER TABLE products ALTER COLUMN description SET STORAGE EXTERNAL")
        .execute(&mut cap.pg)
        .await
        .unwrap();
    sqlx::query("INSERT INTO products (product_id, name, description, price, stock_quantity) VALUES (100002, 'toasted', $1, 9.99, 3)")
        .bind(&long)
        .execute(&mut cap.pg)
        .await
        .unwrap();
    sqlx::query("UPDATE products SET price = 10.49 WHERE product_id = 100002").execute(&mut cap.pg).await.unwrap();

    // Read models an earlier version indexed: the job drops the indexes no query uses any more.
    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    let db = mongo.database(&cap.name);
    let index = |keys| mongodb::IndexModel::builder().keys(keys).build();
    let (orders, details) =
        (db.collection::<bson::Document>("orders"), db.collection::<bson::Document>("order_details"));
    orders.create_index(index(bson::doc! { "lines.product_id": 1 })).await.unwrap();
    details.create_index(index(bson::doc! { "product_id": 1 })).await.unwrap();
    details.create_index(index(bson::doc! { "order_id": 1 })).await.unwrap();

    let metrics_port = cdc_cqrs::metrics::free_port().unwrap();
    let job = cap.spawn_job_with(
        "stream_products",
        "products",
        &[("CDC_METRICS_ADDR", &format!("127.0.0.1:{metrics_port}"))],
    );
    cap.converge(&["products"], CONVERGE).await;
    let sorted = |mut names: Vec<String>| {
        names.sort();
        names
    };
    let (orders_indexes, details_indexes) =
        (orders.list_index_names().await.unwrap(), details.list_index_names().await.unwrap());
    assert_eq!(sorted(orders_indexes), ["_id_", "customer_name_1__id_1", "status_1__id_1"]);
    assert_eq!(sorted(details_indexes), ["_id_", "product_id_1_order_id_1"]);
    // The writes are visible before their batch's checkpoints commit and its metrics count them: wait for
    // the counts. At least a statement per product (fan-outs go only where a product is embedded: here,
    // nowhere).
    let started = std::time::Instant::now();
    loop {
        let metrics =
            reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
        let value =
            |name: &str| cdc_cqrs::metrics::value(&metrics, name).unwrap_or_else(|| panic!("{name} in {metrics}"));
        // Each applied change is timed from its commit, its Kafka record and its receipt by the job.
        let counted = value("cdc_records_in_total") >= 300.0
            && value("cdc_batches_total") >= 1.0
            && value("cdc_writes_total") >= 100.0
            && ["cdc_freshness_seconds_count", "cdc_in_job_seconds_count", "cdc_since_received_seconds_count"]
                .iter()
                .all(|h| value(h) >= 1.0);
        if counted {
            assert_eq!(value("cdc_dead_lettered_total"), 0.0);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the metrics never counted the writes:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Poison: a record that is not a Debezium envelope goes to the dead-letter topic; the job goes on.
    let topic = format!("{}.public.products", cap.name);
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &cap.stack.brokers).create().unwrap();
    producer
        .send(FutureRecord::to(&topic).key("{\"product_id\":1}").payload("{not json"), Duration::from_secs(10))
        .await
        .unwrap();
    sqlx::query("UPDATE products SET stock_quantity = 777 WHERE product_id = 1").execute(&mut cap.pg).await.unwrap();
    cap.converge(&["products"], CONVERGE).await;
    let dead_letter = format!("{}.dead_letter", cap.name);
    let dead = raw_records(&cap.stack.brokers, &dead_letter);
    assert_eq!(dead.len(), 1, "one dead letter");
    let (value, headers) = &dead[0];
    assert_eq!(value.as_deref(), Some(&b"{not json"[..]));
    assert!(headers.iter().any(|(k, v)| k == "reason" && v.contains("not a Debezium JSON envelope")), "{headers:?}");
    assert!(headers.iter().any(|(k, v)| k == "source_topic" && v == &topic), "{headers:?}");

    // A change MongoDB refuses for what it holds (here a validator's rule; in life, say, an order grown past
    // 16 MB) goes to the dead-letter topic as its source record, with MongoDB's reason and the store that
    // refused it, and the job goes on with the changes after it, in the same batch or not.
    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    let read_db = mongo.database(&cap.name);
    let products = read_db.collection::<bson::Document>("products");
    let rule = bson::doc! { "collMod": "products", "validator": { "name": { "$ne": "refused by MongoDB" } } };
    read_db.run_command(rule).await.unwrap();
    let before = products.find_one(bson::doc! {"_id": 2}).await.unwrap().expect("product 2");
    // One transaction, so that its changes are likely to share a batch.
    sqlx::raw_sql(
        "BEGIN;
         UPDATE products SET stock_quantity = 555 WHERE product_id = 3;
         UPDATE products SET name = 'refused by MongoDB' WHERE product_id = 2;
         UPDATE products SET stock_quantity = 444 WHERE product_id = 4;
         COMMIT;",
    )
    .execute(&mut cap.pg)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let applied = bson::doc! { "$or": [{"_id": 3, "stock_quantity": 555}, {"_id": 4, "stock_quantity": 444}] };
    while products.count_documents(applied.clone()).await.unwrap() < 2 {
        assert!(started.elapsed() < CONVERGE, "the changes beside the refused one were never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = raw_records(&cap.stack.brokers, &dead_letter);
    assert_eq!(dead.len(), 2, "the undecodable record and the refused change");
    let (value, headers) = dead.iter().find(|(_, h)| h.iter().any(|(k, _)| k == "store")).expect("the refusal");
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let source: serde_json::Value = serde_json::from_slice(value.as_deref().expect("the source record")).unwrap();
    let after = source.get("payload").unwrap_or(&source)["after"].clone();
    assert_eq!(after["product_id"], 2, "{source}");
    assert_eq!(after["name"], "refused by MongoDB", "{source}");
    assert!(header("reason").is_some_and(|r| r.contains("Document failed validation")), "{headers:?}");
    assert_eq!(header("source_topic"), Some(topic.as_str()));
    assert!(header("source_offset").is_some_and(|o| o.parse::<i64>().is_ok()), "{headers:?}");
    let unchanged = products.find_one(bson::doc! {"_id": 2}).await.unwrap().expect("product 2");
    assert_eq!(unchanged.get_str("name").ok(), before.get_str("name").ok(), "the refused change wrote nothing");
    read_db.run_command(bson::doc! { "collMod": "products", "validator": {} }).await.unwrap();
    job.stop();

    // Replay everything from the first offset (new group, checkpoints gone): still equal (the refused
    // change too, now that MongoDB takes it), the deleted product stays deleted.
    mongo.database(&cap.name).collection::<bson::Document>("_checkpoints").drop().await.unwrap();
    let replay = cap.spawn_job("stream_products", "products-replay");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cap.converge(&["products"], CONVERGE).await;
    let gone = mongo
        .database(&cap.name)
        .collection::<bson::Document>("products")
        .find_one(bson::doc! {"_id": 100001})
        .await
        .unwrap();
    assert_eq!(gone.and_then(|d| d.get_bool("_deleted").ok()), Some(true), "the deleted product stays a tombstone");
    mongo.shutdown().await;

    // TRUNCATE (cascades to the empty order_details), then new rows.
    sqlx::query("TRUNCATE products CASCADE").execute(&mut cap.pg).await.unwrap();
    sqlx::query("INSERT INTO products (name, price, stock_quantity) VALUES ('after truncate', 5.00, 5)")
        .execute(&mut cap.pg)
        .await
        .unwrap();
    cap.converge(&["products"], CONVERGE).await;
    replay.stop();
    cap.teardown().await;
}

/// A record's value and headers.
type RawRecord = (Option<Vec<u8>>, Vec<(String, String)>);

/// A copy MongoDB refuses in one order (here a validator's rule; in life, an order at 16 MB) costs only that
/// copy: the product's other orders still get its new name, though one statement updates them all and MongoDB
/// stops such a statement at the first document it refuses; the change is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_refused_in_one_order_still_reaches_the_others() {
    let mut cap = Capture::start("fanout").await;
    sqlx::raw_sql(
        "INSERT INTO products (product_id, name, price, stock_quantity) VALUES (1, 'old name', 5.00, 10);
         INSERT INTO orders (order_id, customer_name, address, phone) VALUES (1, 'a', 'x', '1'), (2, 'b', 'x', '2'), (3, 'c', 'x', '3');
         INSERT INTO order_details (order_id, product_id, unit_price, quantity) VALUES (1, 1, 5.00, 1), (2, 1, 5.00, 1), (3, 1, 5.00, 1);",
    )
    .execute(&mut cap.pg)
    .await
    .unwrap();
    let products = cap.spawn_job("stream_products", "fanout");
    let details = cap.spawn_job("stream_order_details", "fanout");
    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    let db = mongo.database(&cap.name);
    let orders = db.collection::<bson::Document>("orders");
    let named = |name: &str| bson::doc! { "lines.product.name": name };
    let started = std::time::Instant::now();
    while orders.count_documents(named("old name")).await.unwrap() < 3 {
        assert!(started.elapsed() < CONVERGE, "the three orders never embedded the product");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    db.run_command(bson::doc! { "collMod": "orders", "validator": { "_id": { "$ne": 2 } } }).await.unwrap();
    sqlx::query("UPDATE products SET name = 'new name' WHERE product_id = 1").execute(&mut cap.pg).await.unwrap();
    let dead_letter = format!("{}.dead_letter", cap.name);
    let started = std::time::Instant::now();
    while orders.count_documents(named("new name")).await.unwrap() < 2 {
        assert!(started.elapsed() < CONVERGE, "the orders beside the refused one never got the new name");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = common::read_topics(
        &cap.stack.brokers,
        std::slice::from_ref(&dead_letter),
        Duration::from_secs(1),
        CONVERGE,
        |r| !r.is_empty(),
    );
    let renamed: Vec<i32> =
        orders.distinct("_id", named("new name")).await.unwrap().iter().map(|id| id.as_i32().unwrap()).collect();
    assert_eq!(renamed, [1, 3], "order 3, after the refused order 2, has its copy too");
    let value = dead[0].value.as_ref().expect("the source record");
    assert_eq!(value.get("payload").unwrap_or(value)["after"]["name"], "new name", "{value}");
    let headers = raw_records(&cap.stack.brokers, &dead_letter).remove(0).1;
    assert!(headers.iter().any(|(k, v)| k == "reason" && v.contains("Document failed validation")), "{headers:?}");
    // order_details hold the name too: every copy there is written (after the product's own document, so
    // wait for them rather than for it).
    cap.converge(&["products"], CONVERGE).await;
    let detail_docs = db.collection::<bson::Document>("order_details");
    let started = std::time::Instant::now();
    while detail_docs.count_documents(bson::doc! { "product_name": "new name" }).await.unwrap() < 3 {
        assert!(started.elapsed() < CONVERGE, "an order_details copy never got the new name");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.run_command(bson::doc! { "collMod": "orders", "validator": {} }).await.unwrap();
    products.stop();
    details.stop();
    mongo.shutdown().await;
    cap.teardown().await;
}

/// Every record of a topic, raw: value and headers (reads until 2 s pass without a new one).
/// A job whose broker is gone polls and comes round its loop with nothing to read: its `/health` tells it from
/// a quiet hour by its consumer's statistics (no broker connection up) and answers 503 once that lasts.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_without_a_broker_is_reported_stalled() {
    let stack = common::Stack::from_env();
    let database = common::unique("no_broker");
    // Nothing listens there: a port picked free, below the ephemeral range.
    let nowhere = format!("127.0.0.1:{}", cdc_cqrs::metrics::free_port().unwrap());
    let health = format!("127.0.0.1:{}", cdc_cqrs::metrics::free_port().unwrap());
    let mut command = stack.command("stream_products");
    command
        .env("CDC_KAFKA_BROKERS", &nowhere)
        .env("CDC_MONGO_DATABASE", &database)
        .env("CDC_METRICS_ADDR", &health)
        .env("CDC_STALLED_AFTER", "2s")
        .env("RUST_LOG", "off");
    let job = common::JobProcess::spawn(command);
    let (_, report) =
        common::job_health(&format!("http://{health}"), |code, _| code == reqwest::StatusCode::SERVICE_UNAVAILABLE)
            .await;
    job.kill();
    let store = &report["stores"][0];
    assert_eq!(store["state"], "stalled", "{report}");
    assert!(store["broker_unreachable_s"].as_f64().is_some_and(|s| s > 2.0), "{report}");
    // Its loop itself goes round: only the statistics tell.
    assert!(store["since_loop_s"].as_f64().is_some_and(|s| s < 2.0), "{report}");
    let mongo = mongodb::Client::with_uri_str(&stack.mongo_uri).await.unwrap();
    mongo.database(&database).drop().await.unwrap();
}

fn raw_records(brokers: &str, topic: &str) -> Vec<RawRecord> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", common::unique("dlq-reader"))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let partitions =
        consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap().topics()[0].partitions().len();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = std::time::Instant::now();
    while last.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((m.payload().map(<[u8]>::to_vec), headers));
            last = std::time::Instant::now();
        }
    }
    out
}
