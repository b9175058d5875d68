//! `setup_pg_db`: creates the write-model database, schema, capture role and publication. Idempotent.

use std::process::ExitCode;

use anyhow::anyhow;
use cdc_cqrs::bootstrap::setup;
use cdc_cqrs::cli;
use cdc_cqrs::config::PgArgs;
use clap::Parser;

/// Create the `ecommerce` write model in PostgreSQL: database, tables, the `debezium` capture role
/// (LOGIN REPLICATION, SELECT on the three tables) and the `cdc_cqrs` publication. Running it again
/// changes nothing. Needs wal_level=logical.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,

    /// Password to give the `debezium` role (the connector logs in with it).
    #[arg(long, env = "DEBEZIUM_PASSWORD", hide_env_values = true)]
    debezium_password: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run(async move {
        let password = cli
            .debezium_password
            .filter(|p| !p.is_empty())
            .ok_or_else(|| anyhow!("set DEBEZIUM_PASSWORD (the password the connector's `debezium` role will use)"))?;
        let report = setup::setup(&cli.pg, &password).await?;
        if report.changed.is_empty() {
            println!("setup_pg_db: database {} already up to date, nothing changed", cli.pg.database);
        } else {
            for change in &report.changed {
                println!("setup_pg_db: {change}");
            }
            println!("setup_pg_db: database {} ready ({} changes)", cli.pg.database, report.changed.len());
        }
        Ok(())
    })
}
