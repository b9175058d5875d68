//! The three stream jobs together against the real services: the read models converge to PostgreSQL's
//! projection (checked by `verify`) through the sample workload's inserts, updates and deletes on all
//! tables, through a replay from the first offset, with the jobs started far apart (lines before their
//! orders and products), while every job is killed (SIGKILL) and restarted in the middle of writes, and
//! with order_details catching up in slices of time (records carried between batches, partitions held back)
//! and then shared by two processes.

mod common;

use std::time::Duration;

use common::Capture;

const ALL: [&str; 3] = ["products", "orders", "order_details"];
const JOBS: [&str; 3] = ["stream_products", "stream_orders", "stream_order_details"];
const CONVERGE: Duration = Duration::from_secs(240);
/// Dynamic group membership (see the slices test).
const DYNAMIC: (&str, &str) = ("CDC_INSTANCE_ID", "");
/// A group assignment every member gives up and takes anew in one round (see the slices test).
const EAGER: (&str, &str) = ("CDC_KAFKA_OPTIONS", "partition.assignment.strategy=roundrobin");

#[tokio::test(flavor = "multi_thread")]
async fn the_read_models_converge_and_survive_a_replay() {
    let cap = Capture::start("jobs").await;
    let summary = cap.workload(&[
        "--products",
        "30",
        "--orders",
        "120",
        "--changes",
        "800",
        "--seed",
        "11",
        "--connections",
        "2",
    ]);
    for op in ["delete_order", "remove_line", "change_price", "advance_status"] {
        assert!(summary.contains(op), "the workload exercises {op}:\n{summary}");
    }
    // products and orders well ahead of order_details (the chaos test does the reverse).
    let mut jobs: Vec<_> = JOBS[..2].iter().map(|j| Some(cap.spawn_job(j, j))).collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    jobs.push(Some(cap.spawn_job(JOBS[2], JOBS[2])));
    cap.converge(&ALL, CONVERGE).await;

    // Replay order_details from the first offset: a new group, its checkpoints gone. Deleted lines and
    // orders stay deleted, totals stay right.
    jobs[2].take().unwrap().stop();
    let mongo = mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap();
    mongo
        .database(&cap.name)
        .collection::<bson::Document>("_checkpoints")
        .delete_many(bson::doc! { "topic": format!("{}.public.order_details", cap.name) })
        .await
        .unwrap();
    mongo.shutdown().await;
    jobs[2] = Some(cap.spawn_job("stream_order_details", "order_details-replay"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    cap.workload(&["--products", "0", "--orders", "10", "--changes", "100", "--seed", "12"]);
    cap.converge(&ALL, CONVERGE).await;

    // Lines moved to another order, one of them twice in a row (the same batch, most likely).
    let mut pg = cap.connect().await;
    let (first, last): (i32, i32) =
        sqlx::query_as("SELECT min(order_id), max(order_id) FROM orders").fetch_one(&mut pg).await.unwrap();
    let lines: Vec<i32> =
        sqlx::query_scalar("SELECT order_detail_id FROM order_details ORDER BY order_detail_id LIMIT 2")
            .fetch_all(&mut pg)
            .await
            .unwrap();
    for (line, order) in [(lines[0], last), (lines[1], last), (lines[1], first)] {
        sqlx::query("UPDATE order_details SET order_id = $2 WHERE order_detail_id = $1")
            .bind(line)
            .bind(order)
            .execute(&mut pg)
            .await
            .unwrap();
    }
    cap.converge(&ALL, CONVERGE).await;

    // TRUNCATE of orders (and by cascade order_details), then new orders.
    sqlx::query("TRUNCATE orders CASCADE").execute(&mut pg).await.unwrap();
    cap.workload(&["--products", "0", "--orders", "15", "--changes", "50", "--seed", "13"]);
    cap.converge(&ALL, CONVERGE).await;
    for job in jobs.into_iter().flatten() {
        job.stop();
    }
    cap.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_far_apart_and_killed_mid_stream_still_converge() {
    let cap = Capture::start("chaos").await;
    cap.workload(&["--products", "25", "--orders", "80", "--changes", "300", "--seed", "21", "--connections", "2"]);

    // order_details alone first: every line arrives before its order's header and its product.
    let details = cap.spawn_job("stream_order_details", "stream_order_details");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let orders = cap.spawn_job("stream_orders", "stream_orders");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let products = cap.spawn_job("stream_products", "stream_products");
    cap.converge(&ALL, CONVERGE).await;

    // Writes go on while each job is killed at an arbitrary moment and restarted, several times.
    let mut writer = cap.workload_in_background(&[
        "--products",
        "0",
        "--orders",
        "0",
        "--duration",
        "20s",
        "--rate",
        "150",
        "--seed",
        "22",
    ]);
    let mut running = [Some(products), Some(orders), Some(details)];
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(1500 + 700 * (round % 3) as u64)).await;
        let i = round % 3;
        running[i].take().unwrap().kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        running[i] = Some(cap.spawn_job(JOBS[i], JOBS[i]));
    }
    assert!(writer.wait().unwrap().success(), "the workload failed");
    cap.converge(&ALL, CONVERGE).await;
    for job in running.into_iter().flatten() {
        job.stop();
    }
    cap.teardown().await;
}

/// order_details catching up writes the oldest records in hand across partitions and carries the rest to
/// the next batch, holding back the partitions it holds half a batch of: nothing may be lost or doubled.
/// Batches of 40 records make it carry records and hold partitions back over and over; the read models must
/// still equal PostgreSQL's projection. Then a second process of the job joins the group and takes half the
/// partitions (each reads a partition through a queue of its own, made anew whenever its assignment changes),
/// and the workload writes on: still equal. Then the second leaves and the first takes its partitions back,
/// and the workload writes on: still equal. The two take dynamic membership and librdkafka's eager
/// `roundrobin` assignment, the one way both local brokers share a group's partitions and hand them back
/// (README, "Known gaps").
#[tokio::test(flavor = "multi_thread")]
async fn order_details_catching_up_in_slices_of_time_converges() {
    let cap = Capture::start("slices").await;
    cap.workload(&[
        "--products",
        "20",
        "--orders",
        "300",
        "--orders-per-tx",
        "10",
        "--changes",
        "300",
        "--seed",
        "31",
        "--connections",
        "2",
    ]);
    let port = cdc_cqrs::metrics::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut jobs: Vec<_> = JOBS[..2].iter().map(|j| cap.spawn_job(j, j)).collect();
    jobs.push(cap.spawn_job_with(
        "stream_order_details",
        "stream_order_details",
        &[("CDC_BATCH_SIZE", "40"), ("CDC_METRICS_ADDR", &addr), DYNAMIC, EAGER],
    ));
    cap.converge(&ALL, CONVERGE).await;
    let metrics = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    let held_back = cdc_cqrs::metrics::value(&metrics, "cdc_partitions_held_back_total").expect("the held-back metric");
    assert!(held_back > 0.0, "order_details never held back a partition ahead of the others:\n{metrics}");

    let second_addr = format!("127.0.0.1:{}", cdc_cqrs::metrics::free_port().unwrap());
    let second = cap.spawn_job_with(
        "stream_order_details",
        "stream_order_details",
        &[("CDC_BATCH_SIZE", "40"), ("CDC_METRICS_ADDR", &second_addr), DYNAMIC, EAGER],
    );
    let joined = std::time::Instant::now();
    while assigned_partitions(&second_addr).await == 0.0 {
        assert!(joined.elapsed() < Duration::from_secs(90), "a second process of order_details got no partition");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let more =
        ["--products", "5", "--orders", "100", "--orders-per-tx", "10", "--changes", "200", "--connections", "2"];
    cap.workload(&[&more[..], &["--seed", "32"]].concat());
    cap.converge(&ALL, CONVERGE).await;
    let first = assigned_partitions(&addr).await;
    assert!(first > 0.0, "the first process of order_details kept no partition");

    let all = first + assigned_partitions(&second_addr).await;
    second.stop();
    let left = std::time::Instant::now();
    while assigned_partitions(&addr).await < all {
        assert!(left.elapsed() < Duration::from_secs(90), "the first process never took the second's partitions");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cap.workload(&[&more[..], &["--seed", "33"]].concat());
    cap.converge(&ALL, CONVERGE).await;
    for job in jobs {
        job.stop();
    }
    cap.teardown().await;
}

/// `cdc_assigned_partitions` of the job serving metrics at `addr` (0 until it is up).
async fn assigned_partitions(addr: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("http://{addr}/metrics")).await else { return 0.0 };
    let metrics = response.text().await.unwrap_or_default();
    cdc_cqrs::metrics::value(&metrics, "cdc_assigned_partitions").unwrap_or(0.0)
}
