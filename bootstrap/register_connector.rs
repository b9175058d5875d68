//! `register_connector`: puts the Debezium connector's config to Kafka Connect and waits until it streams.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use cdc_cqrs::bootstrap::connector::{self, ConnectClient, Deployment};
use cdc_cqrs::config::PgArgs;
use cdc_cqrs::{cli, postgres};
use clap::Parser;

/// Register (create or update) the Debezium PostgreSQL connector with Kafka Connect, wait until the
/// connector and its task are RUNNING, and print its status. The password comes from DEBEZIUM_PASSWORD.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Kafka Connect REST URL.
    #[arg(long, env = "CDC_CONNECT_URL", default_value = "http://127.0.0.1:58083")]
    connect_url: String,

    /// Connector name.
    #[arg(long, env = "CDC_CONNECTOR_NAME", default_value = "ecommerce")]
    name: String,

    /// Connector config to start from (default: the built-in connector/ecommerce.json).
    #[arg(long)]
    config: Option<std::path::PathBuf>,

    #[command(flatten)]
    pg: PgArgs,

    /// PostgreSQL host as Kafka Connect reaches it (default: the host of --pg-url).
    #[arg(long, env = "CDC_CONNECT_PG_HOST")]
    connect_pg_host: Option<String>,

    /// PostgreSQL port as Kafka Connect reaches it (default: the port of --pg-url).
    #[arg(long, env = "CDC_CONNECT_PG_PORT")]
    connect_pg_port: Option<u16>,

    /// Topic prefix: topics are <prefix>.public.<table>.
    #[arg(long, env = "CDC_TOPIC_PREFIX", default_value = "ecommerce")]
    topic_prefix: String,

    /// Replication slot name (cluster-wide: one per captured database).
    #[arg(long, env = "CDC_SLOT_NAME", default_value = "cdc_cqrs_ecommerce")]
    slot: String,

    /// Debezium snapshot mode: no_data (first_load copies existing rows) or initial (Debezium reads them).
    #[arg(long, env = "CDC_SNAPSHOT_MODE", default_value = "no_data")]
    snapshot_mode: String,

    /// Password of the `debezium` role.
    #[arg(long, env = "DEBEZIUM_PASSWORD", hide_env_values = true)]
    debezium_password: Option<String>,

    /// Seconds to wait for RUNNING.
    #[arg(long, default_value_t = 120)]
    timeout: u64,

    /// Only print the connector's status.
    #[arg(long, conflicts_with = "delete")]
    status: bool,

    /// Delete the connector (the replication slot stays).
    #[arg(long)]
    delete: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run(async move {
        let client = ConnectClient::new(&cli.connect_url)?;
        if cli.status {
            let status = client.status(&cli.name).await?.ok_or_else(|| anyhow!("no connector named {}", cli.name))?;
            println!("{status}");
            return Ok(());
        }
        if cli.delete {
            client.delete(&cli.name).await?;
            println!("register_connector: deleted connector {}", cli.name);
            return Ok(());
        }
        let password = cli.debezium_password.filter(|p| !p.is_empty()).ok_or_else(|| {
            anyhow!("set DEBEZIUM_PASSWORD (the `debezium` role's password, as given to setup_pg_db)")
        })?;
        let template = match &cli.config {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            None => connector::CONFIG_TEMPLATE.to_owned(),
        };
        let server = postgres::options(&cli.pg, &cli.pg.database)?;
        let deployment = Deployment {
            pg_host: cli.connect_pg_host.unwrap_or_else(|| server.get_host().to_owned()),
            pg_port: cli.connect_pg_port.unwrap_or_else(|| server.get_port()),
            database: cli.pg.database.clone(),
            user: cdc_cqrs::bootstrap::setup::CAPTURE_ROLE.to_owned(),
            password,
            topic_prefix: cli.topic_prefix,
            slot: cli.slot,
            snapshot_mode: cli.snapshot_mode,
        };
        let cfg = connector::render(&template, &deployment)?;
        tracing::info!(connector = %cli.name, config = %serde_json::Value::Object(connector::redacted(&cfg)), "registering");
        client.put_config(&cli.name, &cfg).await?;
        let status = client.wait_running(&cli.name, Duration::from_secs(cli.timeout)).await?;
        println!("register_connector: {status}");
        Ok(())
    })
}
