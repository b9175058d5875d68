//! `insert_sample_data`: a realistic, tunable e-commerce write workload (also the benchmarks' load).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use cdc_cqrs::bootstrap::workload::{self, Mix, Workload};
use cdc_cqrs::config::PgArgs;
use cdc_cqrs::{cli, postgres};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Write a realistic e-commerce workload to the write model, in real transactions: first --products
/// products, then --orders orders with 1-5 lines each, then --changes (or --duration of) mixed changes:
/// new orders, line edits and removals, status moves, cancellations, order deletes, new products, price and
/// stock changes. Same --seed, same data.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,

    /// Products to add first.
    #[arg(long, default_value_t = 100)]
    products: u64,

    /// Orders to create next, each with 1-5 lines.
    #[arg(long, default_value_t = 1_000)]
    orders: u64,

    /// Orders per transaction while creating --orders (1 = one order and its lines per transaction).
    #[arg(long, default_value_t = 1)]
    orders_per_tx: u32,

    /// Mixed change transactions after the orders (default: none, or until --duration ends).
    #[arg(long)]
    changes: Option<u64>,

    /// Stop after this long (e.g. 30s, 5m, 500ms); with no --changes, mixes changes until then.
    #[arg(long, value_parser = cli::parse_duration)]
    duration: Option<Duration>,

    /// Transactions per second over all connections (0 = as fast as PostgreSQL goes).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,

    /// Seed of the generators: same seed, same data.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Weights of the change operations, NAME=WEIGHT,...
    #[arg(long, default_value = Mix::DEFAULT)]
    mix: Mix,

    /// Parallel connections.
    #[arg(long, default_value_t = 4)]
    connections: u32,

    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run(async move {
        if cli.rate < 0.0 || !cli.rate.is_finite() {
            bail!("--rate must be 0 (unthrottled) or a positive number of transactions per second");
        }
        let plan = Workload {
            products: cli.products,
            orders: cli.orders,
            orders_per_tx: cli.orders_per_tx,
            changes: cli.changes,
            duration: cli.duration,
            rate: (cli.rate > 0.0).then_some(cli.rate),
            seed: cli.seed,
            mix: cli.mix,
            connections: cli.connections,
        };
        let pool = postgres::pool(&cli.pg, &cli.pg.database, cli.connections + 1).await?;

        let known_total = match (plan.changes, plan.duration) {
            (Some(c), _) => Some(plan.orders + c),
            (None, None) => Some(plan.orders),
            (None, Some(_)) => None,
        };
        let bar = match known_total {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template("{spinner} {msg:>14} [{bar:30}] {pos}/{len} tx-units {per_sec} ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg:>14} {pos} tx-units {per_sec} {elapsed}")
                    .expect("valid template"),
            ),
        };
        if cli.quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        let summary = workload::run(&pool, &plan, &bar).await?;
        bar.finish_and_clear();

        // A closed stdout (`| head`) is not a failure of the workload.
        let _ = write!(std::io::stdout().lock(), "{summary}");
        Ok(())
    })
}
