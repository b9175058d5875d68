//! compose.yml cannot run on a machine without a Docker engine, so this keeps it consistent with the
//! local stack by reading it: the same services and ports (bound to 127.0.0.1 only), logical decoding,
//! Debezium 3.x, a Mongo replica set, secrets from the environment, and setup running our binaries.

use serde_yaml_ng::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/compose.yml")).unwrap();
    let mut doc: Value = serde_yaml_ng::from_str(&text).expect("compose.yml is YAML");
    doc.apply_merge().expect("merge keys resolve");
    doc
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["services"].get(name).unwrap_or_else(|| panic!("compose.yml has no service {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn stack_script() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack")).unwrap()
}

/// The default port scripts/stack gives a setting, e.g. CDC_PG_PORT -> 55432.
fn stack_default(setting: &str) -> String {
    let script = stack_script();
    let needle = format!("$(setting {setting} ");
    let at = script.find(&needle).unwrap_or_else(|| panic!("scripts/stack has no setting {setting}"));
    script[at + needle.len()..].split(')').next().unwrap().to_owned()
}

/// The WiredTiger eviction settings scripts/stack starts mongod with.
fn stack_eviction() -> String {
    let script = stack_script();
    let line =
        script.lines().find_map(|l| l.strip_prefix("MONGO_EVICTION=")).expect("scripts/stack sets MONGO_EVICTION");
    line.trim_matches('"').to_owned()
}

#[test]
fn services_and_ports_match_the_local_stack() {
    let doc = compose();
    for (name, setting, inner) in [
        ("postgres", "CDC_PG_PORT", "5432"),
        ("kafka", "CDC_KAFKA_PORT", "29092"),
        ("connect", "CDC_CONNECT_PORT", "8083"),
        ("mongo", "CDC_MONGO_PORT", "27017"),
    ] {
        let ports = strings(&service(&doc, name)["ports"]);
        assert_eq!(ports, vec![format!("127.0.0.1:{}:{inner}", stack_default(setting))], "{name} ports");
    }
    for (name, svc) in doc["services"].as_mapping().unwrap() {
        for port in strings(&svc["ports"]) {
            assert!(port.starts_with("127.0.0.1:"), "{name:?} publishes {port} beyond loopback");
        }
    }
    // Read stores 1 and 2 where the stack puts them (CDC_MONGO_PORT + i).
    let mongo_port: u16 = stack_default("CDC_MONGO_PORT").parse().unwrap();
    for i in 1..3u16 {
        let ports = strings(&service(&doc, &format!("mongo{i}"))["ports"]);
        assert_eq!(ports, vec![format!("127.0.0.1:{}:27017", mongo_port + i)], "mongo{i} ports");
    }
    let stores = service(&doc, "stream_orders")["environment"]["CDC_MONGO_URI"].as_str().unwrap();
    assert_eq!(stores.split_whitespace().count(), 3, "the jobs keep three read stores: {stores}");
    let advertised = service(&doc, "kafka")["environment"]["KAFKA_ADVERTISED_LISTENERS"].as_str().unwrap();
    assert!(advertised.contains(&format!("127.0.0.1:{}", stack_default("CDC_KAFKA_PORT"))), "{advertised}");
}

#[test]
fn capture_runs_as_the_design_requires() {
    let doc = compose();
    let pg = strings(&service(&doc, "postgres")["command"]).join(" ");
    assert!(pg.contains("wal_level=logical"), "{pg}");
    let connect = service(&doc, "connect")["image"].as_str().unwrap();
    assert!(connect.starts_with("quay.io/debezium/connect:3."), "{connect}");
    let eviction = stack_eviction();
    for name in ["mongo", "mongo1", "mongo2"] {
        let mongo = strings(&service(&doc, name)["command"]);
        assert!(mongo.iter().any(|a| a == "--replSet"), "{mongo:?}");
        // As scripts/stack starts mongod: no point-in-time history for reads nobody makes (README).
        assert!(mongo.iter().any(|a| a == "minSnapshotHistoryWindowInSeconds=0"), "{mongo:?}");
        // And with its dirty-page thresholds (README, "Your own read stores").
        assert!(mongo.contains(&eviction), "{mongo:?}");
    }
    let kafka = &service(&doc, "kafka")["environment"];
    assert!(kafka["KAFKA_PROCESS_ROLES"].as_str().unwrap().contains("controller"), "single-node KRaft");
}

#[test]
fn secrets_come_from_the_environment() {
    let doc = compose();
    for (svc, var) in [("postgres", "POSTGRES_PASSWORD"), ("setup", "PGPASSWORD"), ("setup", "DEBEZIUM_PASSWORD")] {
        let v = service(&doc, svc)["environment"][var].as_str().unwrap();
        assert!(v.starts_with("${") && v.contains(":?"), "{svc}.{var} must be required from the environment, is {v}");
    }
}

#[test]
fn setup_and_jobs_run_this_projects_binaries() {
    let doc = compose();
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let setup = strings(&service(&doc, "setup")["command"]).join(" ");
    for bin in ["setup_pg_db", "register_connector"] {
        assert!(setup.contains(bin), "setup should run {bin}: {setup}");
        assert!(manifest.contains(&format!("name = \"{bin}\"")), "{bin} is not a binary of Cargo.toml");
    }
    assert_eq!(service(&doc, "setup")["environment"]["CDC_CONNECT_PG_HOST"], "postgres");
    for job in ["stream_products", "stream_orders", "stream_order_details", "cqrs_api"] {
        let svc = service(&doc, job);
        assert_eq!(strings(&svc["command"]), vec![job.to_owned()]);
        assert_eq!(svc["image"], service(&doc, "setup")["image"], "{job} runs the project image");
        assert_eq!(svc["environment"]["CDC_KAFKA_BROKERS"], "kafka:9092");
    }
    let compact = strings(&service(&doc, "compact")["command"]);
    assert_eq!(compact[..2], ["compact", "--every"], "compact keeps running: {compact:?}");
    assert!(manifest.contains("name = \"compact\""), "compact is not a binary of Cargo.toml");
}

#[test]
fn prometheus_scrapes_every_job_where_it_serves_its_metrics_and_compose_checks_its_health() {
    let doc = compose();
    let read = |file: &str| {
        let text = std::fs::read_to_string(format!("{}/monitoring/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        serde_yaml_ng::from_str::<Value>(&text).unwrap_or_else(|e| panic!("monitoring/{file}: {e}"))
    };
    let prometheus = read("prometheus.yml");
    let scrape = &prometheus["scrape_configs"][0];
    assert_eq!(scrape["honor_labels"], true, "the jobs' own `job` label would be renamed");
    let targets = strings(&scrape["static_configs"][0]["targets"]);
    for job in ["stream_products", "stream_orders", "stream_order_details"] {
        let addr = service(&doc, job)["environment"]["CDC_METRICS_ADDR"].as_str().unwrap_or_default().to_owned();
        let port = addr.rsplit(':').next().unwrap();
        assert!(addr.starts_with("0.0.0.0:"), "{job} serves its metrics beyond its container: {addr}");
        assert!(targets.contains(&format!("{job}:{port}")), "prometheus does not scrape {job} at {port}: {targets:?}");
        let health = strings(&service(&doc, job)["healthcheck"]["test"]).join(" ");
        assert!(health.contains(&format!("http://localhost:{port}/health")), "{job}'s health check: {health}");
        let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
        let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
        assert!(runtime.contains(" curl "), "the image that runs {job} has no curl for its health check");
    }
    let mounted = strings(&service(&doc, "prometheus")["volumes"]);
    assert!(mounted.iter().any(|v| v.starts_with("./monitoring:/etc/prometheus")), "{mounted:?}");
    assert_eq!(strings(&prometheus["rule_files"]), ["alerts.yml"]);
    let rules = read("alerts.yml");
    let rules = rules["groups"][0]["rules"].as_sequence().expect("alert rules");
    assert!(!rules.is_empty());
    for rule in rules {
        assert!(rule["expr"].as_str().is_some_and(|e| !e.is_empty()), "{rule:?}");
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{rule:?}");
    }
}
