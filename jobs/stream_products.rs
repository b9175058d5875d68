//! `stream_products`: keeps the `products` read model, and the product data embedded in orders and
//! order_details, in step with the `products` table.

use std::process::ExitCode;

use cdc_cqrs::cli;
use cdc_cqrs::projection::products::ProductsJob;
use cdc_cqrs::runtime::{self, JobArgs};
use clap::Parser;

/// Stream the Debezium change events of `products` into the MongoDB read models: the `products`
/// documents, the product name and price embedded in order lines, and `order_details.product_name`.
/// Exactly-once per batch (writes and checkpoint in one MongoDB transaction); stops cleanly on SIGTERM.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    job: JobArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run(runtime::run(ProductsJob, cli.job))
}
