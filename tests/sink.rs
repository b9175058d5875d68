//! The MongoDB sink and the jobs' projections against a real mongod, without Kafka: a document that does
//! not exist is inserted, one that does gets the guarded write, and an insert that finds its `_id` taken
//! (another writer created the document after the projection looked) falls back to the guarded write.

mod common;

use bson::{Document, doc};
use cdc_cqrs::config::MongoArgs;
use cdc_cqrs::envelope::{Event, Source};
use cdc_cqrs::projection::orders::OrdersJob;
use cdc_cqrs::projection::{Collection, Write, encode};
use cdc_cqrs::rows::Order;
use cdc_cqrs::runtime::Job;
use cdc_cqrs::sink::{Applied, MongoSink, ReadModels};
use common::{Stack, unique};

fn source(lsn: u64) -> Source {
    Source { lsn, tx_id: Some(lsn), ts_ms: 0, snapshot: false }
}

fn order(id: i32, status: &str) -> Order {
    Order {
        order_id: id,
        customer_name: format!("customer {id}"),
        address: "1 Main St".into(),
        phone: "555-0100".into(),
        order_date: Some(1_700_000_000_000_000),
        status: Some(status.into()),
    }
}

async fn sink(stack: &Stack, database: &str) -> MongoSink {
    let args = MongoArgs { uri: stack.mongo_uri.clone(), database: database.into() };
    MongoSink::connect(&args).await.expect("mongod of the stack")
}

/// Inserts orders 1 and 2 as new documents, though order 2 was created meanwhile; falls back to a write
/// that marks it.
struct InsertsIntoATakenId;

impl Job for InsertsIntoATakenId {
    const TABLE: &'static str = "orders";
    const BIN: &'static str = "test";
    type Row = Order;

    fn key(row: &Order) -> i32 {
        row.order_id
    }

    async fn apply(&self, events: &[Event<Order>], store: &ReadModels<'_>) -> anyhow::Result<()> {
        let new = events.iter().filter_map(|e| e.row()).map(|r| (r.order_id, encode(&doc! { "_id": r.order_id })));
        let fallback = |id: &i32| {
            let mark = doc! { "q": { "_id": *id }, "u": { "$set": { "fell_back": true } }, "upsert": true };
            Some(Write::new(Collection::Orders, mark))
        };
        store.write_or_insert(Vec::new(), Collection::Orders, new.collect(), fallback).await.map(drop)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_insert_that_finds_its_id_taken_falls_back_to_the_guarded_write() {
    let stack = Stack::from_env();
    let sink = sink(&stack, &unique("sink_taken")).await;
    let orders = sink.database().collection::<Document>("orders");
    orders.insert_one(doc! { "_id": 2, "other_writer": true }).await.unwrap();

    let events: Vec<_> =
        [1, 2].map(|id| Event::Upsert { row: order(id, "new"), before: None, source: source(10) }).into();
    let applied = sink.apply(&InsertsIntoATakenId, &events, 0, "test", &[], 0).await.unwrap();
    assert_eq!(applied, Applied::Written { statements: 2, raced: 1 });
    assert_eq!(orders.find_one(doc! { "_id": 1 }).await.unwrap(), Some(doc! { "_id": 1 }));
    assert_eq!(
        orders.find_one(doc! { "_id": 2 }).await.unwrap(),
        Some(doc! { "_id": 2, "other_writer": true, "fell_back": true }),
        "the taken document gets the fallback write, and keeps what the other writer wrote"
    );
    sink.database().drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_orders_job_inserts_new_orders_and_merges_into_existing_ones() {
    let stack = Stack::from_env();
    let sink = sink(&stack, &unique("sink_orders")).await;
    sink.create_indexes().await.unwrap();
    let orders = sink.database().collection::<Document>("orders");
    // Order 1's lines came first (the order_details job); order 3's newer change is stored already.
    orders.insert_one(doc! { "_id": 1, "lines": [ { "order_detail_id": 9 } ], "_lv": 1_i64 }).await.unwrap();
    orders.insert_one(doc! { "_id": 3, "status": "shipped", "_v": 50_i64 }).await.unwrap();

    let events = vec![
        Event::Upsert { row: order(1, "paid"), before: None, source: source(10) },
        Event::Upsert { row: order(2, "new"), before: None, source: source(11) },
        Event::Upsert { row: order(3, "paid"), before: None, source: source(12) },
        Event::Delete { before: order(4, "new"), source: source(13) },
    ];
    let applied = sink.apply(&OrdersJob, &events, 0, "test", &[], 0).await.unwrap();
    assert!(matches!(applied, Applied::Written { raced: 0, .. }), "{applied:?}");

    let get = |id: i32| {
        let orders = orders.clone();
        async move { orders.find_one(doc! { "_id": id }).await.unwrap().unwrap() }
    };
    let first = get(1).await;
    assert_eq!(first.get_str("status").unwrap(), "paid");
    assert_eq!(first.get_array("lines").unwrap().len(), 1, "lines written first are kept: {first}");
    let second = get(2).await;
    let header = ["_id", "customer_name", "address", "phone", "order_date", "status", "_v", "_deleted"];
    let keys: Vec<&str> = second.keys().map(String::as_str).collect();
    assert_eq!(keys, [&header[..], &["lines", "totals"]].concat(), "a new order: {second}");
    assert_eq!((second.get_str("status").unwrap(), second.get_i64("_v").unwrap()), ("new", 11));
    assert!(second.get_array("lines").unwrap().is_empty());
    assert_eq!(get(3).await.get_str("status").unwrap(), "shipped", "an older change leaves a newer document");
    assert_eq!(get(4).await, doc! { "_id": 4, "_deleted": true, "_v": 13_i64 }, "a delete of an unseen order");
    sink.database().drop().await.unwrap();
}
