//! `verify`: are the MongoDB read models exactly the projection of PostgreSQL? Exit code 0 only if so.

use std::process::ExitCode;

use anyhow::bail;
use cdc_cqrs::config::{PgArgs, StoresArgs};
use cdc_cqrs::projection::Collection;
use cdc_cqrs::sink::MongoSink;
use cdc_cqrs::{cli, postgres, verify};
use clap::Parser;

/// Compute the read models straight from PostgreSQL and compare them with MongoDB, collection by
/// collection: counts, missing, unexpected and different documents, and the first differences. Exits 0
/// only when every compared collection is equal. Run it once the jobs have caught up (compared while
/// writes go on, recent changes show as differences).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,

    /// Every read store given is compared.
    #[command(flatten)]
    stores: StoresArgs,

    /// Collections to compare (repeat the flag); default: all.
    #[arg(long = "collection", value_enum)]
    collections: Vec<Collection>,

    /// How many differences to show per collection.
    #[arg(long, default_value_t = 5)]
    examples: usize,
}

fn main() -> ExitCode {
    cli::stop_at_closed_stdout();
    let cli = Cli::parse();
    cli::run(async move {
        let collections = if cli.collections.is_empty() {
            vec![Collection::Products, Collection::Orders, Collection::OrderDetails]
        } else {
            cli.collections
        };
        let mut pg = postgres::connect(&cli.pg, &cli.pg.database).await?;
        let stores = cli.stores.stores();
        let mut different = Vec::new();
        for store in &stores {
            if stores.len() > 1 {
                println!("{}:", store.name);
            }
            let sink = MongoSink::connect(&store.mongo).await?;
            for &collection in &collections {
                let report = verify::compare(&mut pg, sink.database(), collection, cli.examples).await?;
                print!("{report}");
                if !report.is_equal() {
                    different.push(format!("{} in {}", report.name, store.name));
                }
            }
        }
        if !different.is_empty() {
            bail!("read models differ from PostgreSQL: {}", different.join(", "));
        }
        Ok(())
    })
}
