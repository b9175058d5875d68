//! dead_letters against the real services: what stream_products could not apply (a record that does not
//! decode, two changes MongoDB refused) is listed with why; once the cause is fixed, `redrive` sends it
//! back: the refused change its row still holds is applied, the one a newer change overtook changes nothing,
//! the record that still does not decode comes back as a new dead letter, and each letter is sent once.

mod common;

use std::time::{Duration, Instant};

use common::{Capture, success, wait_until};
use futures::TryStreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_and_sent_back_once_their_cause_is_fixed() {
    let mut cap = Capture::start("redrive").await;
    cap.workload(&["--products", "10", "--orders", "0", "--changes", "0"]);
    // The job keeps every read store of the stack (three in CI): a record that does not decode is one letter,
    // not one a store, and sent back it comes back once. The validator below is store 0's alone.
    let stores = cap.stack.mongo_uris.join(" ");
    let metrics_addr = format!("127.0.0.1:{}", cdc_cqrs::metrics::free_port().unwrap());
    let env = [("CDC_MONGO_URI", stores.as_str()), ("CDC_METRICS_ADDR", metrics_addr.as_str())];
    let job = cap.spawn_job_with("stream_products", "products", &env);
    cap.converge(&["products"], CONVERGE).await;
    let dead_letters = |args: &[&str]| {
        let out = cap.stack.command("dead_letters").env("CDC_TOPIC_PREFIX", &cap.name).args(args).output().unwrap();
        success("dead_letters", &out)
    };
    assert!(dead_letters(&["list"]).contains("no such topic"), "nothing dead-lettered yet");

    // MongoDB refuses a name (a validator's rule; in life, say, an order grown past 16 MB), and a record
    // that is not a Debezium envelope comes in between.
    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    let db = mongo.database(&cap.name);
    let products = db.collection::<bson::Document>("products");
    db.run_command(bson::doc! { "collMod": "products", "validator": { "name": { "$ne": "refused" } } }).await.unwrap();
    let first_letter = Instant::now();
    sqlx::query("UPDATE products SET name = 'refused' WHERE product_id = 2").execute(&mut cap.pg).await.unwrap();
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &cap.stack.brokers).create().unwrap();
    let topic = format!("{}.public.products", cap.name);
    producer
        .send(FutureRecord::to(&topic).key("{\"product_id\":1}").payload("{not json"), Duration::from_secs(10))
        .await
        .unwrap();
    sqlx::query("UPDATE products SET name = 'refused' WHERE product_id = 3").execute(&mut cap.pg).await.unwrap();
    let listed = wait_until(CONVERGE, || dead_letters(&["list"]), |list| list.contains(": 3 dead letters"));
    assert_eq!(listed.matches("Document failed validation").count(), 2, "{listed}");
    // Then a count per source topic and what happened.
    let summary = |n: usize, kind: &str| {
        listed
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{n}  {kind}")) && l.ends_with(&format!("from {topic}")))
    };
    assert!(summary(2, "refused by store0") && summary(1, "did not decode"), "{listed}");
    assert!(listed.contains("not a Debezium JSON envelope"), "{listed}");
    assert!(listed.contains(&format!("from {topic} partition ")), "{listed}");
    // The job's metrics say how many wait for someone to act.
    waiting_letters_reach(&metrics_addr, 3).await;
    // And how long the oldest has waited: since the first refusal, not longer.
    let oldest = metric(&metrics_addr, OLDEST).await;
    assert!(oldest > 0.0 && oldest <= first_letter.elapsed().as_secs_f64() + 1.0, "{OLDEST} {oldest}");
    // Every series the shipped alert rules use is one a job serves.
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap().text().await.unwrap();
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/monitoring/alerts.yml")).unwrap();
    let used: Vec<&str> =
        rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("cdc_")).collect();
    assert!(used.len() >= 4, "{used:?}");
    // A histogram is served as its `_bucket`, `_sum` and `_count` series.
    let served: Vec<&str> =
        metrics.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    for name in used {
        let histogram = ["_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}"));
        assert!(
            served.iter().any(|s| *s == name || histogram.iter().any(|h| h == s)),
            "monitoring/alerts.yml uses {name}, which no job serves:\n{metrics}"
        );
    }

    // A replay (store 0's checkpoints gone, as a `--rebuild`'s rewind moves them back) meets the three records
    // again, the validator still there: none is sent twice.
    let checkpoints = db.collection::<bson::Document>("_checkpoints");
    let position = async || {
        let all: Vec<bson::Document> = checkpoints.find(bson::doc! {}).await.unwrap().try_collect().await.unwrap();
        all.iter().map(|d| d.get_i64("next_offset").unwrap()).sum::<i64>()
    };
    let reached = position().await;
    job.stop();
    checkpoints.drop().await.unwrap();
    let job = cap.spawn_job_with("stream_products", "products", &env);
    let started = Instant::now();
    while position().await < reached {
        assert!(started.elapsed() < CONVERGE, "the replay never reached where the job was");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let replayed = dead_letters(&["list"]);
    assert!(replayed.contains(": 3 dead letters"), "a replay sent letters again:\n{replayed}");

    // The cause fixed; product 3 changes again meanwhile: its dead letter is now stale.
    db.run_command(bson::doc! { "collMod": "products", "validator": {} }).await.unwrap();
    sqlx::query("UPDATE products SET name = 'renamed since' WHERE product_id = 3").execute(&mut cap.pg).await.unwrap();
    let started = Instant::now();
    while products.count_documents(bson::doc! { "_id": 3, "name": "renamed since" }).await.unwrap() == 0 {
        assert!(started.elapsed() < CONVERGE, "product 3's new name never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let two = products.find_one(bson::doc! { "_id": 2 }).await.unwrap().unwrap();
    assert_ne!(two.get_str("name").unwrap(), "refused", "the refused change waits in the dead-letter topic");

    // A dry run sends and remembers nothing.
    let dry = dead_letters(&["redrive", "--dry-run"]);
    assert!(dry.contains("would send back 3 dead letters"), "{dry}");
    assert!(dead_letters(&["list", "--new"]).contains("reason:"), "still new after a dry run");

    let redriven = Instant::now();
    let sent = dead_letters(&["redrive"]);
    assert!(sent.contains(&format!("sent back 3 dead letters to their topics ({topic} 3)")), "{sent}");
    // Product 2 takes the name MongoDB refused; product 3 keeps its newer one (verify compares both).
    cap.converge(&["products"], CONVERGE).await;
    // The record that still does not decode comes back, as a new letter: the only one not sent back yet.
    let listed = wait_until(CONVERGE, || dead_letters(&["list"]), |list| list.contains(": 4 dead letters"));
    assert_eq!(listed.matches("(sent back)").count(), 3, "{listed}");
    let new = dead_letters(&["list", "--new"]);
    assert_eq!(new.matches("reason:").count(), 1, "{new}");
    assert!(new.contains("not a Debezium JSON envelope"), "{new}");
    waiting_letters_reach(&metrics_addr, 1).await;
    // The oldest waiting is now that new letter, sent after the redrive began (the first ones are gone).
    let oldest = metric(&metrics_addr, OLDEST).await;
    let bound = redriven.elapsed().as_secs_f64() + 1.0;
    assert!(oldest <= bound && bound + 1.0 < first_letter.elapsed().as_secs_f64(), "{OLDEST} {oldest}, bound {bound}");
    job.stop();

    let filtered = dead_letters(&["redrive", "--reason-contains", "Document failed validation"]);
    assert!(filtered.contains("sent back 0 dead letters"), "{filtered}");
    assert!(filtered.contains("passed over 1: not matching --reason-contains"), "{filtered}");
    let again = dead_letters(&["redrive"]);
    assert!(again.contains("nothing new since the last redrive"), "{again}");

    mongo.shutdown().await;
    cap.teardown().await;
}

/// The job's gauge of the oldest waiting dead letter's age.
const OLDEST: &str = "cdc_dead_letters_oldest_waiting_seconds";

/// A series' value in the metrics the job serves on `addr`.
async fn metric(addr: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    cdc_cqrs::metrics::value(&text, name).unwrap_or_else(|| panic!("{name} is not served:\n{text}"))
}

/// Waits until the job serving metrics on `addr` counts `n` dead letters waiting (it reads them every 10 s).
async fn waiting_letters_reach(addr: &str, n: i64) {
    let started = Instant::now();
    loop {
        let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
        let waiting = cdc_cqrs::metrics::value(&text, "cdc_dead_letters_waiting");
        if waiting == Some(n as f64) {
            return;
        }
        assert!(started.elapsed() < CONVERGE, "cdc_dead_letters_waiting never reached {n}: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
