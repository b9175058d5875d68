//! first_load's command line, without services. (This integration test also makes `cargo test` build the
//! `first_load` binary that the workspace's service tests run.)

use std::process::Command;

#[test]
fn help_and_a_wrong_flag() {
    let help = Command::new(env!("CARGO_BIN_EXE_first_load")).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--rebuild"));
    let wrong = Command::new(env!("CARGO_BIN_EXE_first_load")).args(["--chunk", "0"]).output().unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("--chunk and --parallelism must be at least 1"), "{err}");
}
