//! `compact`: removes the tombstones and removed-line marks of a read store that no change can need any more.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cdc_cqrs::compaction::Compaction;
use cdc_cqrs::config::{GROUP_PREFIX, KafkaArgs, PgArgs, StoresArgs};
use cdc_cqrs::dead_letter::DeadLetterArgs;
use cdc_cqrs::sink::{Feed, MongoSink};
use cdc_cqrs::{cli, kafka, postgres};
use clap::Parser;
use rdkafka::consumer::BaseConsumer;

/// Remove the deletion marks (tombstones, an order's removed lines) that every stream job has gone past.
///
/// Waits for the three jobs to apply, in each read store, every change Debezium has confirmed, then makes them
/// drop any older change from now on (a replay of one would otherwise bring a deleted row back) and removes
/// the marks older than that. Safe while the jobs and the workload run; refused while first_load is under
/// way. Run it now and then (cron), or keep it running with --every.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    pg: PgArgs,

    #[command(flatten)]
    kafka: KafkaArgs,

    /// Every read store given is compacted, one after the other.
    #[command(flatten)]
    stores: StoresArgs,

    /// The dead letters not sent back yet stay redrivable: no mark newer than the oldest of them goes.
    #[command(flatten)]
    dead_letters: DeadLetterArgs,

    /// The stream jobs' consumer groups are <prefix>-<table>: their checkpoints tell how far the store is.
    #[arg(long, env = "CDC_GROUP_PREFIX", default_value = GROUP_PREFIX)]
    group_prefix: String,

    /// Debezium's replication slot.
    #[arg(long, env = "CDC_SLOT_NAME", default_value = "cdc_cqrs_ecommerce")]
    slot: String,

    /// How long to wait for the jobs to catch up before giving up.
    #[arg(long, env = "CDC_COMPACT_WAIT_SECS", default_value_t = 60)]
    wait_secs: u64,

    /// Run again this long after each run (e.g. 1h), until SIGTERM, instead of once; a failed run is a warning
    /// and the next one tries again.
    #[arg(long, env = "CDC_COMPACT_EVERY", value_parser = cli::parse_duration)]
    every: Option<Duration>,

    /// Count what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run(async move {
        let compaction = Compaction {
            pg: postgres::pool(&cli.pg, &cli.pg.database, 1).await?,
            kafka: Arc::new(
                kafka::consumer_config(&cli.kafka, "cdc-cqrs-compact")
                    .create::<BaseConsumer>()
                    .context("Kafka client")?,
            ),
            kafka_args: cli.kafka.clone(),
            dead_letters: cli.dead_letters.clone(),
            feeds: Feed::all(&cli.kafka, &cli.group_prefix),
            slot: cli.slot.clone(),
            wait: Duration::from_secs(cli.wait_secs),
            dry_run: cli.dry_run,
        };
        let Some(every) = cli.every else {
            compact_stores(&cli, &compaction).await?;
            if !cli.dry_run {
                println!("the stream jobs now drop any change older than these positions (a replay of one)");
            }
            return Ok(());
        };
        // A stop in the middle of a run is safe: the horizon is raised before any mark goes.
        let mut stop = std::pin::pin!(cli::terminated());
        loop {
            tokio::select! {
                done = compact_stores(&cli, &compaction) => if let Err(e) = done {
                    tracing::warn!(error = %format!("{e:#}"), "compaction failed; trying again at the next run");
                },
                _ = &mut stop => return Ok(()),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = &mut stop => return Ok(()),
            }
        }
    })
}

/// Compacts every store given and prints what went from each.
async fn compact_stores(cli: &Cli, compaction: &Compaction) -> anyhow::Result<()> {
    let stores = cli.stores.stores();
    let mut sinks = Vec::with_capacity(stores.len());
    for store in &stores {
        sinks.push(MongoSink::connect(&store.mongo).await.with_context(|| format!("connecting to {}", store.name))?);
    }
    let named: Vec<_> = stores.iter().zip(&sinks).map(|(store, sink)| (store.name.as_str(), sink.database())).collect();
    let report = compaction.run(&named).await?;
    let verb = if cli.dry_run { "would remove" } else { "removed" };
    for (store, done) in stores.iter().zip(&report.stores) {
        let tombstones: Vec<String> = done.tombstones.iter().map(|(c, n)| format!("{} {n}", c.name())).collect();
        let held = done.held_by.as_ref().map_or(String::new(), |letter| {
            format!(
                " (held back by the dead letter {letter}, not sent back yet: `dead_letters redrive` sends it, \
                 `dead_letters skip` gives up on it)"
            )
        });
        println!(
            "{}: {verb} the marks older than {}{held}: tombstones {}; {} removed lines in {} orders; {} notes of \
             dead letters sent that the jobs are past",
            store.name,
            done.horizon,
            tombstones.join(", "),
            done.removed_lines,
            done.orders_with_removed_lines,
            done.dead_letter_notes
        );
    }
    if report.letters_without_position > 0 {
        println!(
            "{} dead letters not sent back name no source position (they did not decode): sent back from before a \
             store's horizon, one is dead-lettered again",
            report.letters_without_position
        );
    }
    Ok(())
}
