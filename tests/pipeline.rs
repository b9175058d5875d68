//! The capture path end to end against the real services: setup_pg_db (twice), register_connector,
//! insert_sample_data with a seed, then every Debezium event of the three topics read back from Kafka and
//! checked: op, key, before/after, exact decimals, tombstones, and the final state they describe equal to
//! the tables; and the slot moving past WAL written elsewhere while the tables are idle.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{Record, Stack, success, unique};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use sqlx::PgConnection;

const TABLES: [(&str, &str); 3] =
    [("products", "product_id"), ("orders", "order_id"), ("order_details", "order_detail_id")];
const UNAVAILABLE: &str = "__debezium_unavailable_value";

#[tokio::test(flavor = "multi_thread")]
async fn debezium_streams_every_change_of_the_sample_workload() {
    let stack = Stack::from_env();
    let name = unique("pipeline");
    common::sweep_stale(&stack).await;

    // setup_pg_db: creates everything, then a second run changes nothing.
    let first = success("setup_pg_db", &stack.run("setup_pg_db", &["--database", &name]));
    for object in
        ["created database", "created table products", "created table order_details", "created publication cdc_cqrs"]
    {
        assert!(first.contains(object), "first setup should report '{object}':\n{first}");
    }
    let second = success("setup_pg_db", &stack.run("setup_pg_db", &["--database", &name]));
    assert!(second.contains("nothing changed"), "second setup changed something:\n{second}");

    let connect_args =
        ["--name", &name, "--database", &name, "--topic-prefix", &name, "--slot", &name, "--timeout", "180"];
    let registered = success("register_connector", &stack.run("register_connector", &connect_args));
    assert!(registered.contains("RUNNING"), "{registered}");

    let mut conn = stack.connect(&name).await.expect("connect");
    common::wait_for_streaming_slot(&mut conn, &name).await;

    // A deterministic probe first: exact values to look for in the stream.
    let probe_id: i32 = sqlx::query_scalar(
        "INSERT INTO products (name, description, price, stock_quantity) VALUES ('probe', 'exact', 12.34, 5) RETURNING product_id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::query("UPDATE products SET price = 12.35 WHERE product_id = $1")
        .bind(probe_id)
        .execute(&mut conn)
        .await
        .unwrap();

    let workload = [
        "--database",
        &name,
        "--products",
        "40",
        "--orders",
        "80",
        "--changes",
        "400",
        "--seed",
        "7",
        "--connections",
        "2",
        "--quiet",
    ];
    let summary = success("insert_sample_data", &stack.run("insert_sample_data", &workload));
    assert!(summary.contains("delete_order") && summary.contains("change_price"), "{summary}");

    // The last write: once its event is in, everything committed before it is too.
    let marker: i32 = sqlx::query_scalar(
        "INSERT INTO products (name, price, stock_quantity) VALUES ('end-marker', 1.00, 0) RETURNING product_id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();

    let topics: Vec<String> = TABLES.iter().map(|(t, _)| format!("{name}.public.{t}")).collect();
    let products_topic = topics[0].clone();
    let records =
        common::read_topics(&stack.brokers, &topics, Duration::from_secs(3), Duration::from_secs(180), |rs| {
            rs.iter().any(|r| r.topic == products_topic && r.key == Some(json!({"product_id": marker})))
        });

    check_envelopes(&records, &name);
    check_probe(&records, &products_topic, probe_id);
    for (i, (table, pk)) in TABLES.iter().enumerate() {
        let topic_records: Vec<&Record> = records.iter().filter(|r| r.topic == topics[i]).collect();
        let streamed = replay(&topic_records, pk);
        let actual = table_rows(&mut conn, table, pk).await;
        assert_eq!(streamed.len(), actual.len(), "{table}: rows described by the stream vs rows in PostgreSQL");
        for (id, row) in &actual {
            assert_eq!(streamed.get(id), Some(row), "{table} {pk}={id}: stream's last image differs from the row");
        }
    }

    slot_passes_a_position_with_other_wal_after_the_last_change(&mut conn, &stack, &name).await;

    drop(conn);
    common::teardown(&stack, &name).await;
}

/// cqrs_api's read-your-writes waits for the slot to pass the WAL position read after a command's commit.
/// Debezium confirms only commits it decodes from this database, so WAL written elsewhere after the last
/// change here would hold the slot short of such a position until the next change. The connector's
/// heartbeat commits a logical message here every second, which moves it on; the message never reaches
/// Kafka.
async fn slot_passes_a_position_with_other_wal_after_the_last_change(
    conn: &mut PgConnection,
    stack: &Stack,
    name: &str,
) {
    let mut other = stack.connect("postgres").await.expect("connect");
    sqlx::query("SELECT pg_logical_emit_message(false, 'elsewhere', repeat('x', 1000))")
        .execute(&mut other)
        .await
        .unwrap();
    let position: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut *conn).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (confirmed, passed): (String, bool) = sqlx::query_as(
            "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(name)
        .bind(&position)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if passed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed at {confirmed}, short of {position}, for 30 s with no change in the captured tables"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let message_topic = format!("{name}.message");
    assert!(
        !metadata.topics().iter().any(|t| t.name() == message_topic),
        "the heartbeat's messages reached Kafka ({message_topic})"
    );
}

/// Per-event checks on every record.
fn check_envelopes(records: &[Record], prefix: &str) {
    let mut ops: BTreeMap<(String, String), usize> = BTreeMap::new();
    // Per topic partition, the op of the previous record of each key: a tombstone must follow its delete.
    let mut previous: HashMap<(String, i32, String), String> = HashMap::new();
    for r in records {
        let table = r.topic.rsplit('.').next().unwrap();
        let pk = TABLES.iter().find(|(t, _)| *t == table).unwrap().1;
        let key = r.key.as_ref().unwrap_or_else(|| panic!("{}@{}: record without a key", r.topic, r.offset));
        let id = key[pk].as_i64().unwrap_or_else(|| panic!("key {key} has no integer {pk}"));
        assert_eq!(key.as_object().unwrap().len(), 1, "key {key} should hold only {pk}");
        let op = r.op().to_owned();
        *ops.entry((table.to_owned(), op.clone())).or_default() += 1;
        let slot = (r.topic.clone(), r.partition, key.to_string());
        if let Some(v) = &r.value {
            let (before, after) = (&v["before"], &v["after"]);
            let source = &v["source"];
            assert_eq!(source["table"], table);
            assert_eq!(source["db"], prefix);
            assert_eq!(source["snapshot"], "false", "snapshot.mode=no_data: no snapshot reads");
            assert!(
                source["lsn"].as_i64().is_some() && source["txId"].as_i64().is_some(),
                "source has lsn and txId: {source}"
            );
            match op.as_str() {
                "c" => assert!(before.is_null() && after.is_object(), "create: {v}"),
                // (PostgreSQL logs an UPDATE even when it sets the values a row already has.)
                "u" => assert!(
                    before.is_object() && after.is_object(),
                    "update carries both images (REPLICA IDENTITY FULL): {v}"
                ),
                "d" => assert!(before.is_object() && after.is_null(), "delete carries the old row: {v}"),
                other => panic!("unexpected op {other} in {v}"),
            }
            for image in [before, after].into_iter().filter(|i| i.is_object()) {
                assert_eq!(image[pk].as_i64(), Some(id), "key and row agree: {v}");
                check_decimals(table, image);
            }
        } else {
            assert_eq!(
                previous.get(&slot).map(String::as_str),
                Some("d"),
                "tombstone for {key} must follow its delete"
            );
        }
        previous.insert(slot, op);
    }
    let count = |t: &str, op: &str| ops.get(&(t.to_owned(), op.to_owned())).copied().unwrap_or(0);
    for (table, op) in [
        ("products", "c"),
        ("products", "u"),
        ("orders", "c"),
        ("orders", "u"),
        ("orders", "d"),
        ("order_details", "c"),
        ("order_details", "u"),
        ("order_details", "d"),
    ] {
        assert!(count(table, op) > 0, "no {op} event for {table}: {ops:?}");
    }
    for (table, _) in TABLES {
        assert_eq!(count(table, "d"), count(table, "tombstone"), "{table}: one tombstone per delete");
    }
}

/// Money arrives as exact strings with the column's scale.
fn check_decimals(table: &str, image: &Value) {
    let fields: &[(&str, usize)] = match table {
        "products" => &[("price", 2)],
        "order_details" => &[("unit_price", 2), ("discount", 3)],
        _ => &[],
    };
    for &(field, scale) in fields {
        let s = image[field].as_str().unwrap_or_else(|| panic!("{table}.{field} should be a decimal string: {image}"));
        let (int, frac) = s.split_once('.').unwrap_or_else(|| panic!("{table}.{field}={s} has no decimals"));
        assert!(!int.is_empty() && int.chars().all(|c| c.is_ascii_digit()), "{table}.{field}={s}");
        assert_eq!(frac.len(), scale, "{table}.{field}={s} should have {scale} decimals");
    }
}

fn check_probe(records: &[Record], products_topic: &str, probe_id: i32) {
    let probe: Vec<&Record> = records
        .iter()
        .filter(|r| r.topic == products_topic && r.key == Some(json!({"product_id": probe_id})))
        .collect();
    assert!(probe.len() >= 2, "probe product: expected its create and update, got {probe:?}");
    let create = probe[0].value.as_ref().unwrap();
    assert_eq!(create["op"], "c");
    assert_eq!(
        create["after"],
        json!({"product_id": probe_id, "name": "probe", "description": "exact", "price": "12.34", "stock_quantity": 5})
    );
    let update = probe[1].value.as_ref().unwrap();
    assert_eq!(update["op"], "u");
    assert_eq!(update["before"]["price"], "12.34");
    assert_eq!(update["after"]["price"], "12.35");
}

/// The rows a topic describes: the last image per key, deletes applied, placeholders for unchanged
/// TOASTed values resolved from the previous image (as the jobs must do).
fn replay(records: &[&Record], pk: &str) -> BTreeMap<i64, Value> {
    let mut rows: BTreeMap<i64, Value> = BTreeMap::new();
    for r in records {
        let Some(v) = &r.value else { continue };
        let id = r.key.as_ref().unwrap()[pk].as_i64().unwrap();
        match r.op() {
            "d" => {
                rows.remove(&id);
            }
            _ => {
                let mut after = v["after"].clone();
                for (field, value) in after.as_object_mut().unwrap() {
                    if value == UNAVAILABLE {
                        *value = rows
                            .get(&id)
                            .map(|old| old[field.as_str()].clone())
                            .expect("placeholder without an earlier value");
                    }
                }
                rows.insert(id, after);
            }
        }
    }
    rows
}

/// The table's rows as Debezium renders them (decimal strings, timestamps in epoch microseconds).
async fn table_rows(conn: &mut PgConnection, table: &str, pk: &str) -> BTreeMap<i64, Value> {
    let sql = match table {
        "products" => {
            "SELECT json_build_object('product_id', product_id, 'name', name, 'description', description, \
                       'price', price::text, 'stock_quantity', stock_quantity) FROM products"
        }
        "orders" => {
            "SELECT json_build_object('order_id', order_id, 'customer_name', customer_name, 'address', address, \
                     'phone', phone, 'order_date', (extract(epoch FROM order_date) * 1000000)::bigint, 'status', status) \
                     FROM orders"
        }
        _ => {
            "SELECT json_build_object('order_detail_id', order_detail_id, 'order_id', order_id, 'product_id', product_id, \
              'unit_price', unit_price::text, 'quantity', quantity, 'discount', discount::text) FROM order_details"
        }
    };
    let rows: Vec<Value> = sqlx::query_scalar(sql).fetch_all(conn).await.unwrap();
    rows.into_iter().map(|r| (r[pk].as_i64().unwrap(), r)).collect()
}
