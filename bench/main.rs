//! `bench`: the project's measured numbers, each printed beside the raw limit of the same machine
//! measured in the same run. Build in release first: `cargo build --release`, then
//! `scripts/stack exec cargo run --release --bin bench -- first-load` (or `-- stream`).

mod first_load;
mod measure;
mod stream;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmarks against the local stack. Each owns scratch databases (PostgreSQL and MongoDB `cdc_bench*`)
/// and prints throughput, latency or memory next to the limit of this machine.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// first_load on generated data (default 1,000,000 orders, ~3 lines each, 10,000 products) against
    /// PostgreSQL COPY and MongoDB insert_many of the same data.
    FirstLoad(first_load::Args),
    /// The stream jobs: catch-up throughput (each job, and all three) over Debezium's events of the sample
    /// workload (default 1,000,000), beside the raw Kafka read and MongoDB upsert rates; freshness at a
    /// steady write rate; CPU and peak RSS per job.
    Stream(stream::Args),
}

/// Where the services are.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoints {
    /// PostgreSQL server (password from PGPASSWORD).
    #[arg(long, env = "CDC_PG_URL", default_value = "postgres://postgres@127.0.0.1:55432/postgres")]
    pub pg_url: String,

    /// MongoDB server.
    #[arg(long, env = "CDC_MONGO_URI", default_value = "mongodb://127.0.0.1:57017/?directConnection=true")]
    pub mongo_uri: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cdc_cqrs::cli::run(async move {
        match cli.what {
            What::FirstLoad(args) => first_load::run(args).await,
            What::Stream(args) => stream::run(args).await,
        }
    })
}
