//! `first_load` against the real services: a seeded load equals PostgreSQL's projection; the handoff to
//! the stream loses and doubles nothing while writes go on (a first load and a `--rebuild` with the jobs
//! running); a load killed half way is simply run again; and the errors a user can meet name their fix.
//!
//! The captures here start after rows exist (`Capture::start_after`): the stream never saw them, so only
//! first_load can bring them, and a change the handoff dropped would stay missing.

mod common;

use std::time::{Duration, Instant};

use bson::{Document, doc};
use common::{Capture, JobProcess, StoppedStore, success};

const ALL: [&str; 3] = ["products", "orders", "order_details"];
const JOBS: [&str; 3] = ["stream_products", "stream_orders", "stream_order_details"];
const CONVERGE: Duration = Duration::from_secs(240);

async fn mongo(cap: &Capture) -> mongodb::Client {
    mongodb::Client::with_uri_str(&cap.stack.mongo_uri).await.unwrap()
}

/// The handoff state document first_load keeps.
async fn handoff(client: &mongodb::Client, cap: &Capture) -> Option<Document> {
    client.database(&cap.name).collection::<Document>("_handoff").find_one(doc! { "_id": "first_load" }).await.unwrap()
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Documents in the shadows of `collection` (`<collection>_load_<run>`), where a run loads before its swap.
async fn shadow_documents(db: &mongodb::Database, collection: &str) -> u64 {
    let prefix = format!("{collection}_load_");
    let mut n = 0;
    for name in db.list_collection_names().await.unwrap().into_iter().filter(|c| c.starts_with(&prefix)) {
        n += db.collection::<Document>(&name).count_documents(doc! {}).await.unwrap();
    }
    n
}

/// Waits until a run has written orders into its shadow.
async fn until_shadow_documents(db: &mongodb::Database) {
    wait_for("documents to be written", Duration::from_secs(60), async || shadow_documents(db, "orders").await > 0)
        .await;
}

/// A capture whose load, with [`SLOW_LOAD`], takes long enough to be caught half way.
async fn slow_load_capture(what: &str, seed: &str) -> Capture {
    let rows = ["--products", "100", "--orders", "8000", "--orders-per-tx", "50", "--seed", seed];
    Capture::start_after(what, &rows).await
}

/// first_load's flags for a load of [`slow_load_capture`] that can be caught half way.
const SLOW_LOAD: [&str; 4] = ["--chunk", "200", "--parallelism", "1"];

/// A first_load lease held by a run on another host, last renewed `age` ago.
fn lease_elsewhere(age: Duration) -> Document {
    let at = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - age.as_millis() as i64);
    let holder = bson::oid::ObjectId::new();
    doc! { "_id": "first_load_lease", "owner": holder, "host": "elsewhere", "pid": 1_i64, "since": at, "renewed_at": at }
}

/// Puts a lease held from another host in `leases` and renews it every 500 ms until the task is aborted.
async fn hold_lease_elsewhere(leases: &mongodb::Collection<Document>) -> tokio::task::JoinHandle<()> {
    leases.replace_one(doc! { "_id": "first_load_lease" }, lease_elsewhere(Duration::ZERO)).upsert(true).await.unwrap();
    let leases = leases.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = bson::DateTime::now();
            let renewed = doc! { "$set": { "renewed_at": now } };
            leases.update_one(doc! { "_id": "first_load_lease" }, renewed).await.unwrap();
        }
    })
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Read stores a test loads in one run: a client of each, and first_load commands over all of them.
struct LoadedTogether<'a> {
    cap: &'a Capture,
    /// The stores' URIs, space separated, as `--mongo-uri` takes them.
    uris: String,
    clients: Vec<mongodb::Client>,
}

impl<'a> LoadedTogether<'a> {
    /// The first `count` read stores of the stack.
    async fn connect(cap: &'a Capture, count: usize) -> LoadedTogether<'a> {
        let all = &cap.stack.mongo_uris;
        assert!(count > 1 && all.len() >= count, "this test needs several read stores (CDC_MONGO_STORES=3)");
        let uris = &all[..count];
        let mut clients = Vec::new();
        for uri in uris {
            clients.push(mongodb::Client::with_uri_str(uri).await.unwrap());
        }
        LoadedTogether { cap, uris: uris.join(" "), clients }
    }

    /// A `first_load` command over every one of the stores, with `flags`.
    fn first_load(&self, flags: &[&str]) -> std::process::Command {
        let mut cmd = self.cap.first_load(flags);
        cmd.env("CDC_MONGO_URI", &self.uris);
        cmd
    }

    async fn shutdown(self) {
        for client in self.clients {
            client.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seeded_load_equals_the_source_and_refuses_to_overwrite() {
    let cap = Capture::start_after(
        "fl_seeded",
        &["--products", "150", "--orders", "2500", "--changes", "1500", "--seed", "31"],
    )
    .await;
    let out = success("first_load", &cap.run_first_load(&["--chunk", "700"]));
    assert!(out.contains("loaded in"), "summary: {out}");
    assert!(out.contains("orders") && out.contains("rows/s"), "summary has per-table rates: {out}");
    cap.converge(&ALL, Duration::from_secs(5)).await;

    // Documents carry version 0, so that any change the stream applies later is newer.
    let client = mongo(&cap).await;
    let order = client.database(&cap.name).collection::<Document>("orders").find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(order.get_i64("_v").unwrap(), 0);
    let state = handoff(&client, &cap).await.expect("handoff state recorded");
    assert_eq!(state.get_str("phase").unwrap(), "done");
    assert!(state.get_document("snapshot").unwrap().get_i64("xmax").unwrap() > 0);

    // A second load would overwrite: refused, naming --rebuild; nothing changes.
    let again = cap.run_first_load(&[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("not empty") && stderr(&again).contains("--rebuild"), "{}", stderr(&again));

    // The rebuild loads beside and swaps in; still equal, indexes in place.
    cap.workload(&["--products", "0", "--orders", "0", "--changes", "300", "--seed", "32"]);
    let out = success("first_load", &cap.run_first_load(&["--rebuild"]));
    assert!(out.contains("rebuilt and swapped in"), "{out}");
    cap.converge(&ALL, Duration::from_secs(5)).await;
    let names = client.database(&cap.name).list_collection_names().await.unwrap();
    assert!(!names.iter().any(|n| n.contains("_load_")), "no shadow left: {names:?}");
    let indexes = |name: &'static str| {
        let db = client.database(&cap.name);
        async move { db.collection::<Document>(name).list_index_names().await.unwrap() }
    };
    let details = indexes("order_details").await;
    assert!(details.iter().any(|i| i == "product_id_1_order_id_1"), "{details:?}");
    assert!(indexes("orders").await.iter().all(|i| !i.contains("lines")), "lines are indexed no more");
    client.shutdown().await;
    cap.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clear_errors_for_a_missing_slot_and_missing_tables() {
    let cap = Capture::start_after("fl_errors", &["--products", "5", "--orders", "5"]).await;
    let out = cap.run_first_load(&["--slot", "no_such_slot"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("no replication slot no_such_slot") && err.contains("register_connector"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let mut pg = cap.connect().await;
    sqlx::query("ALTER TABLE order_details RENAME TO order_lines").execute(&mut pg).await.unwrap();
    let err = stderr(&cap.run_first_load(&[]));
    assert!(err.contains("order_details missing") && err.contains("setup_pg_db"), "{err}");
    sqlx::query("ALTER TABLE order_lines RENAME TO order_details").execute(&mut pg).await.unwrap();
    drop(pg);
    cap.teardown().await;
}

/// Writes go on through a first load (the jobs, started during it, wait for it) and then through a
/// rebuild with the jobs running: every change lands exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn the_handoff_loses_and_doubles_nothing_while_writes_go_on() {
    let cap = Capture::start_after(
        "fl_handoff",
        &["--products", "200", "--orders", "6000", "--orders-per-tx", "50", "--seed", "41"],
    )
    .await;
    let client = mongo(&cap).await;
    let writes = [
        "--products",
        "0",
        "--orders",
        "0",
        "--duration",
        "25s",
        "--rate",
        "300",
        "--connections",
        "6",
        "--seed",
        "42",
    ];
    let mut writer = cap.workload_in_background(&writes);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut load = cap.first_load(&["--chunk", "500", "--parallelism", "2"]).spawn().expect("first_load");
    // Jobs started while the load runs must wait for it, then take over at its snapshot.
    wait_for("the load to start", Duration::from_secs(60), async || {
        handoff(&client, &cap).await.is_some_and(|h| h.get_str("phase").ok() == Some("loading"))
    })
    .await;
    let jobs: Vec<JobProcess> = JOBS.iter().map(|j| cap.spawn_job(j, j)).collect();
    assert!(load.wait().unwrap().success(), "first_load failed");
    let state = handoff(&client, &cap).await.unwrap();
    let xip = state.get_document("snapshot").unwrap().get_array("xip").unwrap().len();
    assert!(writer.wait().unwrap().success(), "the workload failed");
    cap.converge(&ALL, CONVERGE).await;
    eprintln!("first load: {xip} transactions were in flight at its snapshot");

    // A rebuild with the jobs running and writes going on: swapped in, jobs rewound, still exact.
    let mut writer = cap.workload_in_background(&[
        "--products",
        "0",
        "--orders",
        "0",
        "--duration",
        "15s",
        "--rate",
        "300",
        "--connections",
        "6",
        "--seed",
        "43",
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = success("first_load", &cap.run_first_load(&["--rebuild", "--chunk", "500", "--parallelism", "2"]));
    assert!(out.contains("rebuilt and swapped in"), "{out}");
    assert!(writer.wait().unwrap().success(), "the workload failed");
    cap.converge(&ALL, CONVERGE).await;
    let state = handoff(&client, &cap).await.unwrap();
    // The first load's load and swap, then the rebuild's swap.
    assert_eq!(state.get_i64("epoch").unwrap(), 3);
    for job in jobs {
        job.stop();
    }
    client.shutdown().await;
    cap.teardown().await;
}

/// Given several read stores, one run loads them all from one snapshot while writes go on, each store handing
/// over to its own pipeline of the jobs; a store that is not empty stops a first load before any store is
/// touched; a rebuild swaps in everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn one_run_loads_every_read_store_from_one_snapshot() {
    let cap = Capture::start_after(
        "fl_stores",
        &["--products", "150", "--orders", "3000", "--orders-per-tx", "50", "--seed", "61"],
    )
    .await;
    // Two of the stack's stores: each is a Kafka consumer per job, and noida-db (CI's broker) answers every
    // fetch at once, so each consumer costs the 2 cores.
    let stores = LoadedTogether::connect(&cap, 2).await;
    let writes = |seconds: &str, seed: &str| {
        let flags = ["--products", "0", "--orders", "0", "--duration", seconds, "--rate", "200", "--seed", seed];
        cap.workload_in_background(&flags)
    };

    let mut writer = writes("8s", "62");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut load = stores.first_load(&["--chunk", "300", "--parallelism", "2"]).spawn().expect("first_load");
    // The jobs keep every store; started once the load has paused them in each, they wait for it there.
    for client in &stores.clients {
        wait_for("the load to start in every store", Duration::from_secs(60), async || {
            handoff(client, &cap).await.is_some_and(|h| h.get_str("phase").ok() == Some("loading"))
        })
        .await;
    }
    let env = [("CDC_MONGO_URI", stores.uris.as_str())];
    let jobs: Vec<JobProcess> = JOBS.iter().map(|j| cap.spawn_job_with(j, j, &env)).collect();
    assert!(load.wait().unwrap().success(), "first_load failed");
    let mut snapshots = Vec::new();
    for client in &stores.clients {
        let state = handoff(client, &cap).await.expect("handoff state in every store");
        assert_eq!(state.get_str("phase").unwrap(), "done");
        snapshots.push(state.get_document("snapshot").unwrap().clone());
    }
    assert!(snapshots.iter().all(|s| *s == snapshots[0]), "one snapshot for every store: {snapshots:?}");
    assert!(writer.wait().unwrap().success(), "the workload failed");
    cap.converge_in(&stores.uris, &ALL, CONVERGE).await;

    // Not empty: refused, naming a store, and no store's handoff moved.
    let again = stores.first_load(&[]).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    let err = stderr(&again);
    assert!(err.contains("store0 (") && err.contains("not empty") && err.contains("--rebuild"), "{err}");
    assert!(err.contains("or leave this store out of --mongo-uri"), "{err}");
    for client in &stores.clients {
        assert_eq!(handoff(client, &cap).await.unwrap().get_i64("epoch").unwrap(), 2, "a store was touched");
    }

    let mut writer = writes("6s", "63");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = success("first_load", &stores.first_load(&["--rebuild", "--chunk", "300"]).output().unwrap());
    assert_eq!(out.matches(": rebuilt and swapped in (handoff epoch 3)").count(), stores.clients.len(), "{out}");
    assert!(writer.wait().unwrap().success(), "the workload failed");
    cap.converge_in(&stores.uris, &ALL, CONVERGE).await;
    for job in jobs {
        job.stop();
    }
    stores.shutdown().await;
    cap.teardown().await;
}

/// A load of several stores killed half way leaves each store's load to redo; a run refused on one store (its
/// lease held from another host) releases the leases it took on the others; the next run loads them all.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_of_several_stores_killed_half_way_is_run_again() {
    let cap = slow_load_capture("fl_stores_killed", "71").await;
    let stores = LoadedTogether::connect(&cap, cap.stack.mongo_uris.len()).await;
    let dbs: Vec<_> = stores.clients.iter().map(|c| c.database(&cap.name)).collect();

    let mut load = stores.first_load(&SLOW_LOAD).spawn().expect("first_load");
    until_shadow_documents(&dbs[0]).await;
    load.kill().unwrap();
    load.wait().unwrap();
    for (db, client) in dbs.iter().zip(&stores.clients) {
        let written = shadow_documents(db, "orders").await;
        assert!(written < 8000, "killed half way ({written} orders written)");
        assert_eq!(handoff(client, &cap).await.unwrap().get_str("phase").unwrap(), "loading");
    }

    // The last store's lease held from another host: refused, naming that store; the others' released.
    let last = dbs.last().unwrap();
    let renewing = hold_lease_elsewhere(&last.collection::<Document>("_handoff")).await;
    let refused = stores.first_load(&[]).output().unwrap();
    renewing.abort();
    let err = stderr(&refused);
    let named = format!("store{} (", dbs.len() - 1);
    assert!(
        !refused.status.success() && err.contains(&named) && err.contains("another first_load is running"),
        "{err}"
    );
    for (i, db) in dbs[..dbs.len() - 1].iter().enumerate() {
        let leases = db.collection::<Document>("_handoff");
        let held = leases.count_documents(doc! { "_id": "first_load_lease" }).await.unwrap();
        assert_eq!(held, 0, "a refused run left its lease held on store{i}");
    }
    last.collection::<Document>("_handoff").delete_one(doc! { "_id": "first_load_lease" }).await.unwrap();

    let out = success("first_load", &stores.first_load(&[]).output().unwrap());
    assert_eq!(out.matches(": loaded (handoff epoch ").count(), dbs.len(), "{out}");
    cap.converge_in(&stores.uris, &ALL, Duration::from_secs(5)).await;
    stores.shutdown().await;
    cap.teardown().await;
}

/// A load killed half way leaves the jobs waiting; running it again finishes the job. A rebuild killed
/// half way leaves the live read models untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_killed_half_way_is_run_again() {
    let cap = slow_load_capture("fl_killed", "51").await;
    let client = mongo(&cap).await;
    let db = client.database(&cap.name);
    let mut load = cap.first_load(&SLOW_LOAD).spawn().expect("first_load");
    until_shadow_documents(&db).await;
    // A second run while the first writes: refused at once, naming it; the first goes on.
    let second = cap.run_first_load(&[]);
    assert!(!second.status.success(), "a second first_load ran beside the first");
    assert!(stderr(&second).contains("another first_load is running on this store"), "{}", stderr(&second));
    assert!(load.try_wait().unwrap().is_none(), "the first run stopped");
    load.kill().unwrap();
    load.wait().unwrap();
    let written = shadow_documents(&db, "orders").await;
    assert!(written > 0 && written < 8000, "killed half way ({written} orders written)");
    assert_eq!(handoff(&client, &cap).await.unwrap().get_str("phase").unwrap(), "loading");

    success("first_load", &cap.run_first_load(&[]));
    cap.converge(&ALL, Duration::from_secs(5)).await;

    // A rebuild killed half way: the live read models stay whole and equal; a rerun swaps in.
    let mut rebuild = cap.first_load(&SLOW_LOAD).arg("--rebuild").spawn().unwrap();
    until_shadow_documents(&db).await;
    rebuild.kill().unwrap();
    rebuild.wait().unwrap();
    cap.converge(&ALL, Duration::from_secs(5)).await;
    cap.workload(&["--products", "0", "--orders", "0", "--changes", "200", "--seed", "52"]);

    // A lease held from another host: refused as soon as it is seen renewed; taken over once it is not
    // renewed for 30 s (the holder died). The killed rebuild's own lease (this host, its process gone) was
    // taken over at once above.
    let leases = client.database(&cap.name).collection::<Document>("_handoff");
    // (Over the killed rebuild's: still there, nothing ran since.)
    let renewing = hold_lease_elsewhere(&leases).await;
    let refused = cap.run_first_load(&["--rebuild"]);
    renewing.abort();
    assert!(!refused.status.success(), "first_load ran beside a live holder on another host");
    assert!(
        stderr(&refused).contains("host elsewhere, pid 1") && stderr(&refused).contains("renewed its lease just now")
    );
    leases.replace_one(doc! { "_id": "first_load_lease" }, lease_elsewhere(Duration::from_secs(40))).await.unwrap();
    success("first_load", &cap.run_first_load(&["--rebuild"]));
    assert_eq!(leases.count_documents(doc! { "_id": "first_load_lease" }).await.unwrap(), 0, "the lease is released");
    cap.converge(&ALL, Duration::from_secs(5)).await;
    client.shutdown().await;
    cap.teardown().await;
}

/// A load cut off from MongoDB (its mongod frozen) cannot renew its lease: it stops before the lease expires
/// and another run could take the store over, and a rerun finishes the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_that_cannot_renew_its_lease_stops_before_it_expires() {
    let cap = slow_load_capture("fl_fenced", "61").await;
    // Store 2 (the other tests here load store 0, which must not freeze under them).
    let store = cap.stack.mongo_uris.get(2).expect("this test needs 3 read stores (CDC_MONGO_STORES=3)").clone();
    let client = mongodb::Client::with_uri_str(&store).await.unwrap();
    let db = client.database(&cap.name);
    let mut load = cap
        .first_load(&SLOW_LOAD)
        .env("CDC_MONGO_URI", &store)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("first_load");
    until_shadow_documents(&db).await;
    let frozen = StoppedStore::sigstop(2);
    let frozen_at = Instant::now();
    let status = loop {
        if let Some(status) = load.try_wait().unwrap() {
            break status;
        }
        // Its last renewal was before the freeze: by 30 s after it, another run could take the lease over.
        if frozen_at.elapsed() >= Duration::from_secs(30) {
            let _ = load.kill();
            panic!("first_load went on with its lease about to expire");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(frozen);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut load.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "first_load succeeded with its store frozen");
    assert!(err.contains("could not renew its lease for 15 s"), "{err}");

    let rerun = cap.first_load(&[]).env("CDC_MONGO_URI", &store).output().unwrap();
    success("first_load", &rerun);
    let verify = cap
        .stack
        .command("verify")
        .env("CDC_MONGO_URI", &store)
        .env("CDC_MONGO_DATABASE", &cap.name)
        .args(["--database", &cap.name])
        .output()
        .unwrap();
    success("verify", &verify);
    client.shutdown().await;
    cap.teardown().await;
}

/// A run frozen past its lease's expiry (a paused VM) that wakes after another run took the store over and
/// finished writes on until it notices (here its renewal stalls on a lock for 5 s, as a slow server would
/// make it): what it writes lands in its own shadows, never in the read models the other run swapped in.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_frozen_past_its_lease_writes_nothing_into_the_models_swapped_in() {
    let mut cap = slow_load_capture("fl_frozen", "71").await;
    let client = mongo(&cap).await;
    let db = client.database(&cap.name);
    let leases = db.collection::<Document>("_handoff");
    // From another host, so that the next run waits for its lease to expire rather than refusing at once.
    let frozen = cap
        .first_load(&SLOW_LOAD)
        .env("HOSTNAME", "frozen-host")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("first_load");
    let live = db.collection::<Document>("orders");
    // Or in the live ones: a load writing them directly is what this test must catch.
    wait_for("documents to be written", Duration::from_secs(60), async || {
        shadow_documents(&db, "orders").await + live.count_documents(doc! {}).await.unwrap() > 0
    })
    .await;
    let signal = |sig: &str| {
        let pid = frozen.id().to_string();
        assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    };
    signal("-STOP");
    let owner =
        leases.find_one(doc! { "_id": "first_load_lease" }).await.unwrap().unwrap().get_object_id("owner").unwrap();
    // Most orders go: every one the frozen run writes from now on is from before (its snapshot).
    sqlx::query("DELETE FROM orders WHERE order_id % 4 <> 0").execute(&mut cap.pg).await.unwrap();

    // The next run takes over once the frozen one's lease is 30 s old, loads and swaps in.
    success("first_load", &cap.run_first_load(&[]));
    cap.converge(&ALL, Duration::from_secs(5)).await;

    // The frozen run wakes believing it holds the lease, and its renewal hangs (a transaction holds the lease
    // document): it writes until its renewal gives up (5 s) and it stops.
    let at = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 60_000);
    let stale = doc! { "_id": "first_load_lease", "owner": owner, "host": "frozen-host", "pid": 1_i64, "since": at, "renewed_at": at };
    leases.insert_one(stale).await.unwrap();
    let mut lock = client.start_session().await.unwrap();
    lock.start_transaction().await.unwrap();
    leases
        .update_one(doc! { "_id": "first_load_lease" }, doc! { "$set": { "locked": true } })
        .session(&mut lock)
        .await
        .unwrap();
    let before = shadow_documents(&db, "orders").await;
    signal("-CONT");
    let out = frozen.wait_with_output().unwrap();
    let written = shadow_documents(&db, "orders").await;
    lock.abort_transaction().await.unwrap();
    drop(lock); // the client's shutdown waits for its sessions
    leases.delete_one(doc! { "_id": "first_load_lease" }).await.unwrap();
    // The models swapped in are untouched: no deleted order back.
    cap.converge(&ALL, Duration::from_secs(5)).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "the frozen run finished after another took the store over");
    assert!(err.contains("could not renew its lease"), "{err}");
    assert!(
        written > before,
        "the frozen run wrote nothing after waking ({before} -> {written}): the test shows nothing"
    );
    // The next run drops what the frozen one left.
    success("first_load", &cap.run_first_load(&["--rebuild"]));
    assert_eq!(shadow_documents(&db, "orders").await, 0, "a frozen run's shadow left behind");
    cap.converge(&ALL, Duration::from_secs(5)).await;
    client.shutdown().await;
    cap.teardown().await;
}

/// An order with more lines than one 16 MB document holds: first_load embeds the first ones with their
/// totals, writes every order_details document and says which lines it left out (it used to fail the whole
/// load); the stream then takes the order as it would have built it: a change to an embedded line applies,
/// one to a line left out is refused by MongoDB and dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_past_16_mb_is_loaded_with_the_lines_that_fit() {
    // Lines with a 100-character product name take ~317 bytes embedded: 53,100 pass 16 MB by ~140.
    const LINES: i64 = 53_100;
    let cap = Capture::start_after_sql(
        "fl_big",
        &format!(
            "INSERT INTO products (name, price, stock_quantity) SELECT repeat('p', 100), 1.00, 10 FROM generate_series(1, 10);
             INSERT INTO orders (order_id, customer_name, address, phone) VALUES (1, 'big', 'here', '1'), (2, 'small', 'there', '2');
             INSERT INTO order_details (order_id, product_id, unit_price, quantity) SELECT 1, 1 + g % 10, 1.00, 1 FROM generate_series(1, {LINES}) g;
             INSERT INTO order_details (order_id, product_id, unit_price, quantity) VALUES (2, 1, 2.00, 2);"
        ),
    )
    .await;
    let out = success("first_load", &cap.run_first_load(&[]));
    assert!(out.contains("order 1 is over MongoDB's 16 MB document limit"), "{out}");
    cap.converge(&["products", "order_details"], Duration::from_secs(5)).await;

    let client = mongo(&cap).await;
    let orders = client.database(&cap.name).collection::<Document>("orders");
    let bytes = doc! { "$project": { "bytes": { "$bsonSize": "$$ROOT" } } };
    let sizes: Vec<Document> =
        futures::TryStreamExt::try_collect(orders.aggregate(vec![bytes]).await.unwrap()).await.unwrap();
    assert!(sizes[0].get_i32("bytes").unwrap() <= 16 << 20, "{sizes:?}");
    let order = orders.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    let embedded: Vec<i64> = order
        .get_array("lines")
        .unwrap()
        .iter()
        .map(|l| i64::from(l.as_document().unwrap().get_i32("order_detail_id").unwrap()))
        .collect();
    let kept = embedded.len() as i64;
    assert!(kept > LINES - 1000 && kept < LINES, "{kept} of {LINES} lines embedded");
    assert_eq!(embedded, (1..=kept).collect::<Vec<_>>(), "the first lines, in order");
    let totals = order.get_document("totals").unwrap();
    assert_eq!(i64::from(totals.get_i32("items").unwrap()), kept, "the totals are of what it holds: {totals}");
    assert_eq!(i64::from(totals.get_i32("quantity").unwrap()), kept, "{totals}");
    assert!(out.contains(&format!("{kept} lines embedded, {} left out", LINES - kept)), "{out}");
    let state = handoff(&client, &cap).await.unwrap();
    let summary = state.get_document("summary").map(|s| s.get_i64("lines_not_embedded"));
    assert!(matches!(summary, Ok(Ok(n)) if n == LINES - kept), "{state}");
    // verify names the order, briefly.
    let report =
        cap.stack.command("verify").env("CDC_MONGO_DATABASE", &cap.name).args(["--database", &cap.name]).output();
    let report = String::from_utf8_lossy(&report.unwrap().stdout).into_owned();
    assert!(report.contains(&format!("lines: {LINES} expected, {kept} found, from [{kept}] on")), "{report}");
    assert!(report.len() < 10_000, "a short report: {} bytes", report.len());

    // The stream goes on from there: one transaction changes the first line and the last one.
    let job = cap.spawn_job("stream_order_details", "big");
    let mut pg = cap.connect().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN;
         UPDATE order_details SET quantity = 5 WHERE order_detail_id = 1;
         UPDATE order_details SET quantity = 7 WHERE order_detail_id = {LINES};
         COMMIT;"
    )))
    .execute(&mut pg)
    .await
    .unwrap();
    let applied = doc! { "_id": 1, "lines.0.quantity": 5, "totals.quantity": kept + 4 };
    wait_for("the embedded line's change", CONVERGE, async || {
        orders.count_documents(applied.clone()).await.unwrap() == 1
    })
    .await;
    let topic = format!("{}.dead_letter", cap.name);
    let dead = common::read_topics(&cap.stack.brokers, &[topic], Duration::from_secs(2), CONVERGE, |r| !r.is_empty());
    let [dead] = &dead[..] else { panic!("one dead letter: {dead:?}") };
    let value = dead.value.as_ref().unwrap();
    let after = &value.get("payload").unwrap_or(value)["after"];
    assert_eq!((after["order_detail_id"].as_i64(), after["quantity"].as_i64()), (Some(LINES), Some(7)), "{value}");
    cap.converge(&["order_details"], CONVERGE).await;
    job.stop();
    drop(pg);
    client.shutdown().await;
    cap.teardown().await;
}
