//! compact against the real services: it waits for every job, removes the tombstones and removed-line marks,
//! and a full replay of the three jobs afterwards brings none of the deleted rows back.

mod common;

use std::time::Duration;

use bson::{Document, doc};
use cdc_cqrs::dead_letter::redrive::REDRIVEN_FROM;
use common::{Capture, success, wait_until};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const CONVERGE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread")]
async fn compaction_removes_the_marks_and_a_replay_after_it_brings_nothing_back() {
    let mut cap = Capture::start("compact").await;
    cap.workload(&["--products", "30", "--orders", "60", "--changes", "400", "--seed", "7"]);
    // A deleted product (the workload deletes orders and lines, never products).
    sqlx::query("INSERT INTO products (product_id, name, price, stock_quantity) VALUES (100001, 'gone', 1.00, 1)")
        .execute(&mut cap.pg)
        .await
        .unwrap();
    sqlx::query("DELETE FROM products WHERE product_id = 100001").execute(&mut cap.pg).await.unwrap();

    let jobs = ["stream_products", "stream_orders", "stream_order_details"];
    let tables = ["products", "orders", "order_details"];
    let mut running: Vec<_> = jobs.iter().zip(tables).map(|(job, table)| cap.spawn_job(job, table)).collect();
    cap.converge(&[], CONVERGE).await;

    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    let db = mongo.database(&cap.name);
    let count = |collection: &'static str, filter: Document| {
        let c = db.collection::<Document>(collection);
        async move { c.count_documents(filter).await.unwrap() }
    };
    let removed_lines = doc! { "_removed.0": { "$exists": true } };
    for table in tables {
        assert!(count(table, doc! { "_deleted": true }).await > 0, "the workload left no tombstone in {table}");
    }
    assert!(count("orders", removed_lines.clone()).await > 0, "the workload left no removed line");

    let compact = |flags: &[&str]| {
        let mut args = vec!["--database", &cap.name, "--group-prefix", &cap.name, "--slot", &cap.name];
        args.extend_from_slice(flags);
        cap.stack
            .command("compact")
            .env("CDC_MONGO_DATABASE", &cap.name)
            .env("CDC_TOPIC_PREFIX", &cap.name)
            .args(args)
            .output()
            .expect("compact")
    };

    // A job behind: compact waits, then says which one and changes nothing.
    running.pop().unwrap().stop();
    sqlx::query("DELETE FROM order_details WHERE order_detail_id = (SELECT min(order_detail_id) FROM order_details)")
        .execute(&mut cap.pg)
        .await
        .unwrap();
    slot_past_now(&mut cap.pg, &cap.name, "confirmed_flush_lsn").await; // the delete and its Kafka tombstone in the topic
    let out = compact(&["--wait-secs", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "compact went on with order_details behind");
    // One record or two: Kafka Connect may confirm the delete before its null-value tombstone is in the topic
    // (both carry the same source offset; measured, tansu), which holds no change.
    assert!(stderr.contains("order_details ") && stderr.contains(" behind (group"), "{stderr}");
    assert!(!stderr.contains("products ") && !stderr.contains("orders "), "only order_details is behind: {stderr}");
    assert!(count("products", doc! { "_deleted": true }).await > 0, "a refused compaction removed tombstones");
    running.push(cap.spawn_job("stream_order_details", "order_details"));
    cap.converge(&[], CONVERGE).await;

    // A change MongoDB refuses (a validator's rule) waits in the dead-letter topic, after every delete so far:
    // compact keeps it redrivable, and removes the marks older than it.
    let dead_letters = |args: &[&str]| {
        let out = cap.stack.command("dead_letters").env("CDC_TOPIC_PREFIX", &cap.name).args(args).output();
        success("dead_letters", &out.unwrap())
    };
    db.run_command(doc! { "collMod": "products", "validator": { "name": { "$ne": "refused" } } }).await.unwrap();
    sqlx::query("UPDATE products SET name = 'refused' WHERE product_id = (SELECT min(product_id) FROM products)")
        .execute(&mut cap.pg)
        .await
        .unwrap();
    wait_until(CONVERGE, || dead_letters(&["list", "--new"]), |list| list.contains("Document failed validation"));

    let tombstones: u64 = {
        let mut n = 0;
        for table in tables {
            n += count(table, doc! { "_deleted": true }).await;
        }
        n
    };
    assert_eq!(count("_dead_lettered", doc! {}).await, 1, "the refused change not noted as dead-lettered");
    slot_past_now(&mut cap.pg, &cap.name, "restart_lsn").await;
    // A first_load running on the store (its lease renewed just now, here from another host; a --rebuild
    // loads while the phase says done): refused, nothing removed. A lease 40 s old is a run that died.
    let leases = db.collection::<Document>("_handoff");
    let lease = |age_ms: i64| {
        let at = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - age_ms);
        let owner = bson::oid::ObjectId::new();
        doc! { "_id": "first_load_lease", "owner": owner, "host": "elsewhere", "pid": 7_i64, "since": at, "renewed_at": at }
    };
    leases.insert_one(lease(0)).await.unwrap();
    let out = compact(&["--wait-secs", "60"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "compact ran beside a first_load");
    assert!(stderr.contains("a first_load is running on this store (host elsewhere, pid 7)"), "{stderr}");
    let mut left = 0;
    for table in tables {
        left += count(table, doc! { "_deleted": true }).await;
    }
    assert_eq!(left, tombstones, "a refused compaction removed tombstones");
    leases.replace_one(doc! { "_id": "first_load_lease" }, lease(40_000)).await.unwrap();
    let report = success("compact", &compact(&["--wait-secs", "60"]));
    assert!(report.contains("removed the marks older than"), "{report}");
    for table in tables {
        assert_eq!(count(table, doc! { "_deleted": true }).await, 0, "tombstones left in {table}: {report}");
    }
    assert_eq!(count("orders", removed_lines.clone()).await, 0, "removed lines left: {report}");
    let said: u64 = ["products ", "orders ", "order_details "]
        .iter()
        .map(|t| {
            let after = &report[report.find(t).expect("a count per collection") + t.len()..];
            after.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(said, tombstones, "{report}");
    // The jobs are past the refused change's record: no replay but one from checkpoints dropped by hand can
    // meet it again, so its note goes (the letter itself stays in its topic, waiting).
    assert!(report.contains("; 1 notes of dead letters sent that the jobs are past"), "{report}");
    assert_eq!(count("_dead_lettered", doc! {}).await, 0, "the note of a letter the jobs are past is left");
    assert!(report.contains(&format!("held back by the dead letter {}.dead_letter/", cap.name)), "{report}");
    // The cause fixed, the letter sent back is applied (verify compares the name), not refused.
    db.run_command(doc! { "collMod": "products", "validator": {} }).await.unwrap();
    let sent = dead_letters(&["redrive"]);
    assert!(sent.contains("sent back 1 dead letters"), "{sent}");
    cap.converge(&[], CONVERGE).await;

    // Every job replays its topic from the first offset (checkpoints gone): the changes from before the
    // horizon are dropped, so no deleted row comes back, not even as a tombstone, and no order is left
    // with lines and no header.
    for job in running.drain(..) {
        job.stop();
    }
    db.collection::<Document>("_checkpoints").drop().await.unwrap();
    let running: Vec<_> = jobs.iter().zip(tables).map(|(job, table)| cap.spawn_job(job, table)).collect();
    // A dry run waits for the jobs to reach the topics' ends, and counts.
    let dry = success("compact", &compact(&["--dry-run", "--wait-secs", "120"]));
    assert!(dry.contains("would remove"), "{dry}");
    for table in tables {
        assert_eq!(count(table, doc! { "_deleted": true }).await, 0, "a replay brought a deleted row back in {table}");
    }
    assert_eq!(count("orders", doc! { "customer_name": { "$exists": false } }).await, 0, "an order with no header");
    assert_eq!(count("orders", removed_lines.clone()).await, 0);
    cap.converge(&[], CONVERGE).await;

    // The deleted product's insert sent back as `dead_letters redrive` does: from before the horizon, with no
    // tombstone left to guard it, it is dead-lettered again with the reason, and the product stays deleted.
    let topic = format!("{}.public.products", cap.name);
    let records = common::read_topics(
        &cap.stack.brokers,
        std::slice::from_ref(&topic),
        Duration::from_millis(500),
        CONVERGE,
        |r| r.iter().any(|r| r.op() == "d"),
    );
    let insert = records
        .iter()
        .find(|r| r.op() == "c" && r.key.as_ref().is_some_and(|k| k["product_id"] == 100001))
        .expect("the deleted product's insert");
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &cap.stack.brokers).create().unwrap();
    let (key, value) = (serde_json::to_vec(&insert.key).unwrap(), serde_json::to_vec(&insert.value).unwrap());
    let from = format!("{}.dead_letter/0@0", cap.name);
    let headers = OwnedHeaders::new().insert(Header { key: REDRIVEN_FROM, value: Some(&from) });
    let record = FutureRecord::to(&topic).partition(insert.partition).key(&key).payload(&value).headers(headers);
    producer.send(record, Duration::from_secs(10)).await.expect("sending the copy");
    let listed = wait_until(CONVERGE, || dead_letters(&["list"]), |list| list.contains("compaction horizon"));
    assert!(listed.contains("first_load --rebuild"), "{listed}");
    assert_eq!(count("products", doc! { "_id": 100001 }).await, 0, "a redriven insert brought the product back");

    // Changes after the horizon apply as ever, deletes included, and a second compaction removes their marks.
    cap.workload(&["--products", "0", "--orders", "0", "--changes", "200", "--seed", "8"]);
    cap.converge(&[], CONVERGE).await;
    assert!(count("orders", doc! { "_deleted": true }).await > 0, "the second workload deleted no order");
    slot_past_now(&mut cap.pg, &cap.name, "restart_lsn").await;
    // This time kept running (`--every`), as compose runs it, and stopped by SIGTERM.
    let mut every = cap
        .stack
        .command("compact")
        .env("CDC_MONGO_DATABASE", &cap.name)
        .env("CDC_TOPIC_PREFIX", &cap.name)
        .args(["--database", &cap.name, "--group-prefix", &cap.name, "--slot", &cap.name, "--every", "1s"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("compact --every");
    let started = std::time::Instant::now();
    for table in tables {
        while count(table, doc! { "_deleted": true }).await > 0 {
            assert!(started.elapsed() < Duration::from_secs(60), "tombstones left in {table} after the second");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    std::process::Command::new("kill").args(["-TERM", &every.id().to_string()]).status().unwrap();
    assert!(every.wait().unwrap().success(), "compact --every exits cleanly on SIGTERM");
    cap.converge(&[], CONVERGE).await;
    // The letter refused again is from before the horizon: it held nothing back. Given up, it is no longer new.
    let skipped = dead_letters(&["skip"]);
    assert!(skipped.contains("gave up on 1 dead letters"), "{skipped}");
    assert!(!dead_letters(&["list", "--new"]).contains("reason:"), "a letter given up is still new");

    for job in running {
        job.stop();
    }
    mongo.shutdown().await;
    cap.teardown().await;
}

/// Waits until the slot's `position` (`restart_lsn` or `confirmed_flush_lsn`) passes the WAL written so far.
/// The restart position lags the confirmed one until PostgreSQL logs the transactions running, which CHECKPOINT
/// does: then the horizon covers every change made.
async fn slot_past_now(pg: &mut sqlx::PgConnection, slot: &str, position: &str) {
    let now: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut *pg).await.unwrap();
    let started = std::time::Instant::now();
    let past = format!("SELECT {position} >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2");
    loop {
        sqlx::query("CHECKPOINT").execute(&mut *pg).await.unwrap();
        let passed: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(past.clone()))
            .bind(&now)
            .bind(slot)
            .fetch_one(&mut *pg)
            .await
            .unwrap();
        if passed == Some(true) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the slot's {position} stayed before {now}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
