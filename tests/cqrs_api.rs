//! The CQRS service against the real services: its commands land in PostgreSQL and come back through
//! Debezium and the stream jobs into three MongoDB read stores; every command read back with
//! read-your-writes; validation answers; 1000 reads spread a third each (333/334) over the three stores,
//! through the API and through the demo page in headless Chromium (screenshots kept in target/tmp); one store stopped
//! (SIGSTOP: it hangs, the hardest way to be down) -> reads go on from the other two at once and the demo
//! shows it down, and stream_products' `/health` shows its pipeline for that store stalled; resumed -> it catches
//! up, the job is healthy again, and the sync check finds every store equal to PostgreSQL; the service's own
//! `/health` answers 503 only once every store is frozen.
//!
//! One test: the phases share the stores, and stopping one must not surprise another phase.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Capture, JobProcess, StoppedStore};
use reqwest::StatusCode;
use serde_json::{Value, json};

const JOBS: [(&str, &str); 3] =
    [("stream_products", "products"), ("stream_orders", "orders"), ("stream_order_details", "order_details")];

#[tokio::test(flavor = "multi_thread")]
async fn commands_queries_round_robin_and_a_store_down() {
    let cap = Capture::start("api").await;
    let stores = cap.stack.mongo_uris.clone();
    assert!(stores.len() >= 3, "this test needs 3 read stores: run the stack with CDC_MONGO_STORES=3 (the default)");
    let stores = stores[..3].join(" ");
    // stream_products serves its health, which counts a pipeline stalled after 5 s without coming round.
    let health = format!("http://127.0.0.1:{}", cdc_cqrs::metrics::free_port().unwrap());
    let _jobs: Vec<JobProcess> = JOBS
        .iter()
        .map(|(bin, table)| {
            let mut env = vec![("CDC_MONGO_URI", stores.as_str())];
            if *bin == "stream_products" {
                env.extend([("CDC_METRICS_ADDR", &health["http://".len()..]), ("CDC_STALLED_AFTER", "5s")]);
            }
            cap.spawn_job_with(bin, table, &env)
        })
        .collect();
    let api = Api::start(&cap, &stores).await;
    let (code, health_now) = api.get("/health").await;
    assert_eq!(
        (code, &health_now["read_stores_up"], &health_now["postgres"]["up"]),
        (StatusCode::OK, &json!(3), &json!(true))
    );
    let (code, report) =
        common::job_health(&health, |_, report| report["stores"].as_array().is_some_and(|s| s.len() == 3)).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    for store in report["stores"].as_array().unwrap() {
        assert_eq!(store["state"], "running", "{report}");
    }

    commands_read_back_with_read_your_writes(&api).await;
    validation_errors(&api).await;

    // Round-robin: 1000 reads, each store serves a third.
    let ids = api.product_ids().await;
    let served = api.reads(&ids, 1000).await;
    assert_eq!(served.values().sum::<u32>(), 1000, "every read answered: {served:?}");
    assert_eq!(served.len(), 3, "three stores served: {served:?}");
    // A third each: exactly 333/334 when every store stays healthy throughout; a store the watch saw
    // late for a moment (a loaded 2-core CI machine) passes its turns to the others, hence the margin.
    for (store, n) in &served {
        assert!((300..=367).contains(n), "{store} served {n} of 1000 reads: {served:?}");
    }

    let mut browser = Browser::start().await;
    let page = browser.demo(&api, 1000, "demo-3-stores.png").await;
    for store in ["store0", "store1", "store2"] {
        let (count, state) = &page[store];
        assert!((300..=367).contains(count), "the demo page shows {store} served {count}: {page:?}");
        assert_eq!(state, "healthy", "{page:?}");
    }

    // Store 2 stops answering. Reads sent right away go on from the others (the one sent to store 2
    // waits for its timeout, then goes to the next store), and the watch soon counts it down.
    let stopped = StoppedStore::sigstop(2);
    let served = api.reads(&ids, 300).await;
    assert_eq!(served.values().sum::<u32>(), 300, "every read answered with a store down: {served:?}");
    assert!(!served.keys().any(|s| s.starts_with("store2")), "the stopped store served reads: {served:?}");
    api.wait_store(2, |s| !s["up"].as_bool().unwrap(), "store2 down").await;
    let (code, health_now) = api.get("/health").await;
    assert_eq!((code, &health_now["read_stores_up"]), (StatusCode::OK, &json!(2)), "{health_now}");
    // Writes go on too, and read-your-writes is served by a store that has them.
    let created =
        api.post("/api/products", json!({"name": "During the outage", "price": 5, "stock_quantity": 1})).await;
    let read = api.read_after(&format!("/api/products/{}", created["product_id"]), &created).await;
    assert!(!read["store"].as_str().unwrap().starts_with("store2"));
    // The products job's pipeline for store 2 no longer comes round (its write of that product hangs):
    // its health says so, naming the store, while the other two pipelines run.
    let (code, report) = common::job_health(&health, |code, _| code == StatusCode::SERVICE_UNAVAILABLE).await;
    let states: Vec<(&str, &str)> = report["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["store"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("store0", "running"), ("store1", "running"), ("store2", "stalled")], "{code}: {report}");
    assert!(report["stores"][2]["since_loop_s"].as_f64().unwrap() > 5.0, "{report}");
    // Idle, it checks first_load's epoch every second; or it was writing the product when the store stopped.
    let step = report["stores"][2]["step"].as_str().unwrap_or_default();
    assert!(["reading first_load's epoch", "writing the batch to MongoDB"].contains(&step), "{report}");
    let metrics = reqwest::get(format!("{health}/metrics")).await.unwrap().text().await.unwrap();
    let stalled = metrics
        .lines()
        .find(|l| l.starts_with("cdc_pipeline_stalled_seconds{") && l.contains("store=\"store2\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(stalled.is_some_and(|s| s > 5.0), "cdc_pipeline_stalled_seconds of store2: {stalled:?}");
    let page = browser.demo(&api, 300, "demo-store2-down.png").await;
    assert_eq!(page["store2"], (0, "down".to_owned()), "{page:?}");
    assert_eq!(page["store0"].0 + page["store1"].0, 300, "{page:?}");
    assert!(page["store0"].0 == 150 && page["store1"].0 == 150, "{page:?}");
    browser.stop().await;

    // Resumed: it catches up on what it missed, is read again, and every store equals PostgreSQL.
    drop(stopped);
    api.wait_store(2, |s| s["healthy"].as_bool().unwrap() && s["behind_records"] == 0, "store2 caught up").await;
    let served = api.reads(&ids, 30).await;
    assert_eq!(served.len(), 3, "store2 serves again: {served:?}");
    let (_, report) = common::job_health(&health, |code, _| code == StatusCode::OK).await;
    assert_eq!(report["stores"][2]["state"], "running", "{report}");
    let (code, sync) = api.get("/api/sync").await;
    assert_eq!(code, StatusCode::OK);
    for store in sync["stores"].as_array().unwrap() {
        for c in store["collections"].as_array().unwrap() {
            assert_eq!(c["equal"], true, "{} {} differs from PostgreSQL: {c}", store["store"], c["collection"]);
        }
        assert_eq!(store["collections"].as_array().unwrap().len(), 3, "{store}");
    }

    // Every store frozen: the service can take no query, and its health says so (for a load balancer).
    let frozen: Vec<StoppedStore> = (0..3).map(StoppedStore::sigstop).collect();
    let started = Instant::now();
    let health_now = loop {
        let (code, health_now) = api.get("/health").await;
        if code == StatusCode::SERVICE_UNAVAILABLE {
            break health_now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "/health still {code} with every store down: {health_now}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (&health_now["read_stores_up"], &health_now["postgres"]["up"]),
        (&json!(0), &json!(true)),
        "{health_now}"
    );
    drop(frozen);
    for i in 0..3 {
        api.wait_store(i, |s| s["up"] == true, "up again").await;
    }
    assert_eq!(api.get("/health").await.0, StatusCode::OK);
    drop(api);
    cap.teardown().await;
}

/// Each command, then the query that shows it, with `?after=` its position.
async fn commands_read_back_with_read_your_writes(api: &Api) {
    let lamp = api.post("/api/products", json!({"name": "Desk lamp", "price": "19.90", "stock_quantity": 7})).await;
    let mug = api
        .post("/api/products", json!({"name": "Mug", "description": "Blue", "price": 4.5, "stock_quantity": 3}))
        .await;
    let (lamp_id, mug_id) = (lamp["product_id"].as_i64().unwrap(), mug["product_id"].as_i64().unwrap());
    let product = api.read_after(&format!("/api/products/{lamp_id}"), &lamp).await;
    assert_eq!(
        product["data"],
        json!({"_id": lamp_id, "name": "Desk lamp", "description": null, "price": "19.90", "stock_quantity": 7})
    );

    let changed =
        api.send("PATCH", &format!("/api/products/{mug_id}"), json!({"price": "5.25", "description": null})).await;
    let product = api.read_after(&format!("/api/products/{mug_id}"), &changed).await;
    assert_eq!((&product["data"]["price"], &product["data"]["description"]), (&json!("5.25"), &Value::Null));

    let order = api
        .post(
            "/api/orders",
            json!({"customer_name": "Ada Lovelace", "address": "12 St James's Sq", "phone": "+44 20 1234",
                   "lines": [{"product_id": lamp_id, "quantity": 2, "discount": "0.1"}, {"product_id": mug_id, "quantity": 4}]}),
        )
        .await;
    let order_id = order["order_id"].as_i64().unwrap();
    let doc = api.read_after(&format!("/api/orders/{order_id}"), &order).await["data"].clone();
    assert_eq!(doc["status"], "pending");
    assert_eq!(doc["lines"].as_array().unwrap().len(), 2, "{doc}");
    assert_eq!(doc["lines"][0]["product"], json!({"name": "Desk lamp", "price": "19.90"}));
    // 2 x 19.90 x 0.9 = 35.82; 4 x 5.25 = 21.00
    assert_eq!(
        doc["totals"],
        json!({"items": 2, "quantity": 6, "subtotal": "60.80", "discount": "3.98", "total": "56.82"})
    );

    let paid = api.send("PATCH", &format!("/api/orders/{order_id}/status"), json!({"status": "paid"})).await;
    assert_eq!(api.read_after(&format!("/api/orders/{order_id}"), &paid).await["data"]["status"], "paid");

    let added = api.post(&format!("/api/orders/{order_id}/lines"), json!({"product_id": mug_id, "quantity": 1})).await;
    let line_id = added["order_detail_id"].as_i64().unwrap();
    let doc = api.read_after(&format!("/api/orders/{order_id}"), &added).await["data"].clone();
    assert_eq!(doc["lines"].as_array().unwrap().len(), 3, "{doc}");
    assert_eq!(doc["totals"]["total"], "62.07");

    let changed = api.send("PATCH", &format!("/api/lines/{line_id}"), json!({"quantity": 3})).await;
    let doc = api.read_after(&format!("/api/orders/{order_id}"), &changed).await["data"].clone();
    assert_eq!(doc["lines"][2]["quantity"], 3);
    assert_eq!(doc["totals"]["total"], "72.57");

    let removed = api.send("DELETE", &format!("/api/lines/{line_id}"), Value::Null).await;
    let doc = api.read_after(&format!("/api/orders/{order_id}"), &removed).await["data"].clone();
    assert_eq!(doc["lines"].as_array().unwrap().len(), 2, "{doc}");
    assert_eq!(doc["totals"]["total"], "56.82");

    // Listings: by customer and by status, paged.
    let (code, listed) =
        api.get(&format!("/api/orders?customer=Ada%20Lovelace&after={}", removed["position"].as_str().unwrap())).await;
    assert_eq!(code, StatusCode::OK, "{listed}");
    assert_eq!(listed["data"]["items"][0]["_id"], order_id);
    let (_, paid_orders) =
        api.get(&format!("/api/orders?status=paid&limit=1&after={}", removed["position"].as_str().unwrap())).await;
    assert_eq!(paid_orders["data"]["items"].as_array().unwrap().len(), 1);

    let deleted = api.send("DELETE", &format!("/api/orders/{order_id}"), Value::Null).await;
    let (code, gone) =
        api.get(&format!("/api/orders/{order_id}?after={}", deleted["position"].as_str().unwrap())).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{gone}");
    assert_eq!(gone["error"], format!("no order {order_id}"));
    assert!(gone["store"].is_string(), "a 404 still says which store answered: {gone}");
}

async fn validation_errors(api: &Api) {
    let cases = [
        (
            "POST",
            "/api/products",
            json!({"name": "x", "price": "1.234", "stock_quantity": 1}),
            422,
            "price: at most 2 decimals",
        ),
        (
            "POST",
            "/api/products",
            json!({"name": "x", "price": "-1", "stock_quantity": 1}),
            422,
            "price: must not be negative",
        ),
        (
            "POST",
            "/api/products",
            json!({"name": " ", "price": "1", "stock_quantity": 1}),
            422,
            "name: must not be empty",
        ),
        ("POST", "/api/products", json!({"name": "x", "price": "1", "stock": 1}), 422, "unknown field `stock`"),
        (
            "POST",
            "/api/orders",
            json!({"customer_name": "a", "address": "b", "phone": "c", "lines": [{"product_id": 1, "quantity": -2}]}),
            422,
            "lines[0].quantity: must be at least 1",
        ),
        (
            "POST",
            "/api/orders",
            json!({"customer_name": "a", "address": "b", "phone": "c", "lines": [{"product_id": 999999, "quantity": 1}]}),
            422,
            "unknown product 999999",
        ),
        (
            "POST",
            "/api/orders",
            json!({"customer_name": "a", "address": "b", "phone": "c", "lines": []}),
            422,
            "at least one line",
        ),
        ("PATCH", "/api/orders/1/status", json!({"status": "lost"}), 422, "status: one of pending"),
        ("PATCH", "/api/products/999999", json!({"price": 1}), 404, "no product 999999"),
        ("DELETE", "/api/lines/999999", Value::Null, 404, "no order line 999999"),
    ];
    for (method, path, body, code, message) in cases {
        let (got, answer) = api.request(method, path, body.clone()).await;
        assert_eq!(got.as_u16(), code, "{method} {path} {body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{method} {path} {body}: {error:?} does not say {message:?}");
    }
    // A product on order lines cannot go.
    let p = api.post("/api/products", json!({"name": "Kept", "price": 1, "stock_quantity": 1})).await;
    api.post(
        "/api/orders",
        json!({"customer_name": "a", "address": "b", "phone": "c", "lines": [{"product_id": p["product_id"], "quantity": 1}]}),
    )
    .await;
    let (code, answer) = api.request("DELETE", &format!("/api/products/{}", p["product_id"]), Value::Null).await;
    assert_eq!(code, StatusCode::CONFLICT, "{answer}");
    let (code, answer) = api.get("/api/products/1?after=garbage").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
}

/// The service on a port of its own, on the test's capture.
struct Api {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn start(cap: &Capture, stores: &str) -> Api {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = cap
            .stack
            .command("cqrs_api")
            .env("CDC_API_ADDR", format!("127.0.0.1:{port}"))
            .env("CDC_PG_DATABASE", &cap.name)
            .env("CDC_TOPIC_PREFIX", &cap.name)
            .env("CDC_MONGO_URI", stores)
            .env("CDC_MONGO_DATABASE", &cap.name)
            .env("CDC_GROUP_PREFIX", &cap.name)
            .env("CDC_SLOT_NAME", &cap.name)
            .env("CDC_READ_YOUR_WRITES_TIMEOUT_MS", "60000")
            .stdout(Stdio::null())
            .spawn()
            .expect("cqrs_api");
        let api = Api { child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
        for i in 0..3 {
            api.wait_store(i, |s| s["up"] == true, "up").await;
        }
        api
    }

    async fn request(&self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let mut request = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let code = response.status();
        (code, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request("GET", path, Value::Null).await
    }

    /// A command that must succeed; its answer (with `position`).
    async fn send(&self, method: &str, path: &str, body: Value) -> Value {
        let (code, answer) = self.request(method, path, body.clone()).await;
        assert!(code.is_success(), "{method} {path} {body}: {code} {answer}");
        assert!(answer["position"].is_string(), "a command answers with its position: {answer}");
        answer
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.send("POST", path, body).await
    }

    /// Reads `path` with read-your-writes on `command`'s position: the change is there on the first read.
    async fn read_after(&self, path: &str, command: &Value) -> Value {
        let position = command["position"].as_str().unwrap();
        let sep = if path.contains('?') { '&' } else { '?' };
        let (code, answer) = self.get(&format!("{path}{sep}after={position}")).await;
        assert_eq!(code, StatusCode::OK, "GET {path} after {position}: {answer}");
        answer
    }

    async fn product_ids(&self) -> Vec<i64> {
        let (_, listed) = self.get("/api/products?limit=50").await;
        listed["data"]["items"].as_array().unwrap().iter().map(|p| p["_id"].as_i64().unwrap()).collect()
    }

    /// `n` sequential reads of products; how many each store served.
    async fn reads(&self, ids: &[i64], n: usize) -> HashMap<String, u32> {
        let mut served = HashMap::new();
        for i in 0..n {
            let response =
                self.http.get(format!("{}/api/products/{}", self.base, ids[i % ids.len()])).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let store = response.headers()["x-read-store"].to_str().unwrap().split(' ').next().unwrap().to_owned();
            *served.entry(store).or_default() += 1;
        }
        served
    }

    async fn wait_store(&self, i: usize, ok: impl Fn(&Value) -> bool, what: &str) {
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/api/stores", self.base)).send().await
                && let Ok(status) = r.json::<Value>().await
                && ok(&status["stores"][i])
            {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "store {i} never {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// Headless Chromium driven through chromedriver's WebDriver API.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
}

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; .ci/run installs it)");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("cdc-cqrs-chromium-{}", std::process::id()));
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}});
        let session: Value =
            http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {session}"));
        Browser { driver, http, session: format!("{base}/session/{id}") }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let request = self.http.request(method.parse().unwrap(), url);
        let request = if method == "GET" { request } else { request.json(&body) };
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(answer["value"]["error"].is_null(), "WebDriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    async fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": js, "args": []})).await
    }

    /// Opens the demo page, runs `reads` reads by clicking its button, waits for them, keeps a screenshot
    /// as `artifact`, and returns what the page shows per store: (served, state).
    async fn demo(&mut self, api: &Api, reads: u32, artifact: &str) -> HashMap<String, (u32, String)> {
        self.call("POST", "/url", json!({"url": format!("{}/demo", api.base)})).await;
        // The store table fills from /api/stores once a second.
        let started = Instant::now();
        while self.script("return document.querySelectorAll('#served tbody tr').length").await.as_u64() < Some(3) {
            assert!(started.elapsed() < Duration::from_secs(30), "the demo page never listed the stores");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.script(&format!("document.getElementById('reads').value = {reads}")).await;
        let button = self.call("POST", "/element", json!({"using": "css selector", "value": "#run"})).await;
        let button = button[ELEMENT].as_str().unwrap_or_else(|| panic!("no #run button: {button}"));
        self.call("POST", &format!("/element/{button}/click"), json!({})).await;
        let started = Instant::now();
        while self.script("return document.body.dataset.done || ''").await != "true" {
            assert!(started.elapsed() < Duration::from_secs(300), "the demo's reads never finished");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Let the store table show the latest state (it refreshes every second).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let screenshot = self.call("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(screenshot.as_str().unwrap()).unwrap();
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(artifact);
        std::fs::write(&path, png).unwrap();
        eprintln!("demo page screenshot: {}", path.display());
        let rows = self
            .script(
                "return [...document.querySelectorAll('#served tbody tr')].map(r => \
                 [r.dataset.store, Number(r.querySelector('.count').textContent), r.cells[3].textContent])",
            )
            .await;
        let status = self.script("return document.getElementById('status').textContent").await;
        assert_eq!(status, format!("done: {reads} reads"));
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (r[0].as_str().unwrap().to_owned(), (r[1].as_u64().unwrap() as u32, r[2].as_str().unwrap().to_owned()))
            })
            .collect()
    }

    async fn stop(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
