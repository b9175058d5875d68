//! setup_pg_db's failures are one line that names the fix: a server without logical decoding (a real,
//! throwaway PostgreSQL cluster started with wal_level=replica), an unreachable server, wrong credentials,
//! and no capture password.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::Stack;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure with exit code 1 and one `error:` line containing every `needle`.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got {}: {err}", out.status);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    for needle in needles {
        assert!(lines[0].contains(needle), "'{needle}' missing from: {}", lines[0]);
    }
}

/// A private PostgreSQL cluster with wal_level=replica, stopped and deleted on drop.
struct ReplicaCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl ReplicaCluster {
    fn start() -> ReplicaCluster {
        let bin = PathBuf::from(std::env::var("CDC_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("cdc-cqrs-walreplica-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = ReplicaCluster { dir, port, bin };
        cluster.chown_to_postgres();
        let data = cluster.dir.join("data");
        cluster.pg(&["initdb", "-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust"]);
        let opts = format!(
            "-c wal_level=replica -c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            cluster.dir.display()
        );
        let log = cluster.dir.join("log");
        cluster.pg(&["pg_ctl", "-D", data.to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "start"]);
        cluster
    }

    fn is_root() -> bool {
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    }

    fn chown_to_postgres(&self) {
        if Self::is_root() {
            let ok = Command::new("chown").args(["postgres:postgres", self.dir.to_str().unwrap()]).status().unwrap();
            assert!(ok.success());
        }
    }

    /// Runs a PostgreSQL server program, as the postgres user when we are root (initdb refuses root).
    fn pg(&self, args: &[&str]) -> Output {
        let program = self.bin.join(args[0]);
        let out = if Self::is_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&program).args(&args[1..]).output()
        } else {
            Command::new(&program).args(&args[1..]).output()
        }
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    }
}

impl Drop for ReplicaCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ =
            std::panic::catch_unwind(|| self.pg(&["pg_ctl", "-D", data.to_str().unwrap(), "-m", "immediate", "stop"]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn wal_level_replica_is_refused_with_the_fix() {
    let stack = Stack::from_env();
    let cluster = ReplicaCluster::start();
    let out = stack
        .command("setup_pg_db")
        .env("CDC_PG_URL", format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port))
        .args(["--database", "never_created"])
        .output()
        .unwrap();
    assert_fails_with(&out, &["wal_level=replica", "ALTER SYSTEM SET wal_level = logical", "restart PostgreSQL"]);
    // And it stopped before creating anything.
    let dbs = cluster.pg(&[
        "psql",
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
        "-Atc",
        "SELECT datname FROM pg_database",
    ]);
    assert!(!String::from_utf8_lossy(&dbs.stdout).contains("never_created"));
}

#[test]
fn an_unreachable_server_names_the_fix() {
    let stack = Stack::from_env();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // nobody listens once dropped
    let out = stack
        .command("setup_pg_db")
        .env("CDC_PG_URL", format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .output()
        .unwrap();
    assert_fails_with(&out, &["cannot reach PostgreSQL", &format!("127.0.0.1:{port}"), "scripts/stack up"]);
}

#[test]
fn wrong_credentials_name_the_fix_and_never_echo_the_password() {
    let stack = Stack::from_env();
    let out = stack.command("setup_pg_db").env("PGPASSWORD", "not-the-password-123").output().unwrap();
    assert_fails_with(&out, &["rejected the credentials", "PGPASSWORD"]);
    assert!(!stderr(&out).contains("not-the-password-123"));
}

#[test]
fn a_missing_capture_password_names_the_variable() {
    let stack = Stack::from_env();
    let out = stack.command("setup_pg_db").env_remove("DEBEZIUM_PASSWORD").output().unwrap();
    assert_fails_with(&out, &["DEBEZIUM_PASSWORD"]);
}

#[test]
fn a_wrong_flag_is_one_line_naming_the_fix() {
    let out = Command::new(common::bin_path("insert_sample_data")).args(["--mix", "new_ordr=3"]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown operation 'new_ordr'") && err.contains("new_order"), "{err}");
    // A Kafka option without its key is refused without echoing it (it may be a password).
    let out = Command::new(common::bin_path("stream_orders")).env("CDC_KAFKA_OPTIONS", "hunter2").output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("key=value") && !err.contains("hunter2"), "{err}");
    // A misspelled one is named by its key, never with its value.
    let out = Command::new(common::bin_path("stream_orders"))
        .env("CDC_KAFKA_OPTIONS", "fetch.wait.max.ms=10 sasl.pasword=hunter2")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("sasl.pasword is not a librdkafka setting") && !err.contains("hunter2"), "{err}");
    // A health threshold a busy pipeline would trip.
    let out = Command::new(common::bin_path("stream_products")).env("CDC_STALLED_AFTER", "200ms").output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("'200ms' is under 1s") && err.contains("e.g. 30s"), "{err}");
}

#[test]
fn cqrs_api_on_a_taken_port_or_a_bad_store_names_the_fix() {
    let stack = Stack::from_env();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = stack.command("cqrs_api").env("CDC_API_ADDR", &addr).output().unwrap();
    assert_fails_with(&out, &[&format!("binding {addr}"), "--listen / CDC_API_ADDR"]);
    let out = stack
        .command("cqrs_api")
        .env("CDC_API_ADDR", "127.0.0.1:0")
        .env("CDC_MONGO_URI", "mongodb://127.0.0.1:1/ http://nope")
        .output()
        .unwrap();
    assert_fails_with(&out, &["store1 (nope)", "is not a MongoDB URI"]);
}

#[test]
fn every_binary_answers_help() {
    let bins = [
        "setup_pg_db",
        "insert_sample_data",
        "register_connector",
        "stream_products",
        "stream_orders",
        "stream_order_details",
        "verify",
        "first_load",
        "bench",
        "cqrs_api",
    ];
    for bin in bins {
        let out = Command::new(common::bin_path(bin)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{bin} --help: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"), "{bin} --help prints its usage");
    }
}
