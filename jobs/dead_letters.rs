//! `dead_letters`: what the jobs could not apply, and sending it back once the cause is fixed.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;
use cdc_cqrs::cli;
use cdc_cqrs::config::KafkaArgs;
use cdc_cqrs::dead_letter::DeadLetterArgs;
use cdc_cqrs::dead_letter::redrive::{DeadLetter, DeadLetterTopic, Filter, SendBack};
use clap::{Parser, Subcommand};

/// List the dead-letter topic (what the stream jobs could not apply: records that did not decode, changes
/// MongoDB refused, each with why), and send its records back to the topics they came from once the cause
/// is fixed. A change sent back is applied only where nothing newer of its row is in MongoDB (the jobs'
/// version guards), so sending back a stale one changes nothing.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    dead_letters: DeadLetterArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print each dead letter: where it came from, the read store that refused it, why, and whether
    /// `redrive` has sent it back.
    List {
        /// Only those `redrive` has not gone over yet.
        #[arg(long)]
        new: bool,
    },
    /// Send the dead letters that came since the last redrive back to their source partitions, byte for
    /// byte, for the jobs to apply again. A letter refused again comes back as a new dead letter. Run it
    /// after fixing the cause: a job version that decodes what an older one could not, a validator
    /// changed, lines removed from an order grown past MongoDB's 16 MB.
    Redrive {
        /// Only letters whose reason contains this text (the others are passed over, and not sent by the
        /// next redrive either: see --from-beginning).
        #[arg(long)]
        reason_contains: Option<String>,
        /// Only letters from this topic (e.g. ecommerce.public.orders).
        #[arg(long)]
        source_topic: Option<String>,
        /// Go over every letter the topic still holds, not only those since the last redrive.
        #[arg(long)]
        from_beginning: bool,
        /// Print what would be sent back; send nothing, remember nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give up on the dead letters that came since the last redrive: the next redrive starts after them,
    /// none is sent back (they stay in the topic, for `list`). For a letter whose cause cannot be fixed:
    /// `compact` keeps every letter not gone over redrivable, and so removes no deletion mark newer than it.
    Skip,
}

/// Letters sent back at a time (and the redrive's progress stored after each such chunk).
const CHUNK: usize = 1000;

fn main() -> ExitCode {
    cli::stop_at_closed_stdout();
    let cli = Cli::parse();
    cli::run(async move {
        let topic = cli.dead_letters.topic(&cli.kafka);
        let Some(dlt) = DeadLetterTopic::open(&cli.kafka, &topic, &cli.dead_letters.redrive_group)? else {
            println!("{topic}: no such topic, nothing was ever dead-lettered there (or check --topic-prefix)");
            return Ok(());
        };
        match cli.command {
            Command::List { new } => list(&dlt, new).await,
            Command::Redrive { reason_contains, source_topic, from_beginning, dry_run } => {
                let filter = Filter { reason_contains, source_topic };
                redrive(&cli.kafka, &dlt, &filter, from_beginning, dry_run).await
            }
            Command::Skip => skip(&dlt),
        }
    })
}

async fn list(dlt: &DeadLetterTopic, only_new: bool) -> Result<()> {
    let held: i64 = dlt.partitions.values().map(|s| s.high - s.low).sum();
    println!("{}: {held} dead letters ({})", dlt.topic, spans(dlt));
    let mut reading = dlt.read_from(&dlt.starts(!only_new))?;
    // (source topic, what happened) -> letters, for the closing summary.
    let mut kinds: BTreeMap<(String, String), usize> = BTreeMap::new();
    while let Some(letter) = reading.next().await? {
        let redriven = dlt.partitions[&letter.partition].redriven.is_some_and(|r| letter.offset < r);
        println!("{}", describe(&letter, redriven));
        let source = letter.source.as_ref().map_or("an unknown topic".to_owned(), |s| s.topic.clone());
        *kinds.entry((source, kind(&letter))).or_default() += 1;
    }
    for ((source, kind), n) in &kinds {
        println!("{n:>8}  {kind}, from {source}");
    }
    Ok(())
}

/// What happened to a letter's change: it did not decode, or a store refused it.
fn kind(letter: &DeadLetter) -> String {
    letter.store.as_deref().map_or("did not decode".to_owned(), |s| format!("refused by {s}"))
}

async fn redrive(
    kafka: &KafkaArgs,
    dlt: &DeadLetterTopic,
    filter: &Filter,
    from_beginning: bool,
    dry_run: bool,
) -> Result<()> {
    let (start, ends) = (dlt.starts(from_beginning), dlt.ends());
    if start == ends {
        println!("{}: nothing new since the last redrive ({})", dlt.topic, spans(dlt));
        return Ok(());
    }
    let send_back = SendBack::new(kafka, &dlt.topic)?;
    let verb = if dry_run { "would send back" } else { "sent back" };
    let (mut sent, mut passed_over) = (BTreeMap::<String, usize>::new(), BTreeMap::<&str, usize>::new());
    let mut reading = dlt.read_from(&start)?;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut next = start.clone();
    loop {
        let letter = reading.next().await?;
        let done = letter.is_none();
        if let Some(letter) = letter {
            next.insert(letter.partition, letter.offset + 1);
            match filter.passes_over(&letter) {
                Some(why) => *passed_over.entry(why).or_default() += 1,
                None => {
                    if dry_run {
                        println!("{}", describe(&letter, false));
                    }
                    let source = letter.source.as_ref().map(|s| s.topic.clone()).unwrap_or_default();
                    *sent.entry(source).or_default() += 1;
                    chunk.push(letter);
                }
            }
        }
        if chunk.len() >= CHUNK || done {
            if !dry_run {
                send_back.send(&chunk).await?;
                dlt.mark_redriven(&next)?;
            }
            chunk.clear();
        }
        if done {
            break;
        }
    }
    // Partitions with nothing to read keep their place.
    if !dry_run {
        dlt.mark_redriven(&ends)?;
    }
    let total: usize = sent.values().sum();
    let by_topic: Vec<String> = sent.iter().map(|(t, n)| format!("{t} {n}")).collect();
    let by_topic = if by_topic.is_empty() { String::new() } else { format!(" ({})", by_topic.join(", ")) };
    println!("{}: {verb} {total} dead letters to their topics{by_topic}", dlt.topic);
    for (why, n) in &passed_over {
        println!("  passed over {n}: {why}");
    }
    if !dry_run {
        println!("  the next redrive starts at {}", offsets(&ends));
    }
    Ok(())
}

fn skip(dlt: &DeadLetterTopic) -> Result<()> {
    let skipped: i64 = dlt.partitions.values().map(|s| s.high - s.next_to_redrive()).sum();
    let ends = dlt.ends();
    dlt.mark_redriven(&ends)?;
    println!("{}: gave up on {skipped} dead letters; the next redrive starts at {}", dlt.topic, offsets(&ends));
    Ok(())
}

/// `partition 0 offset 12, partition 1 offset 9`.
fn offsets(at: &BTreeMap<i32, i64>) -> String {
    let at: Vec<String> = at.iter().map(|(p, o)| format!("partition {p} offset {o}")).collect();
    at.join(", ")
}

/// Each partition's offsets and how far redrive went in it.
fn spans(dlt: &DeadLetterTopic) -> String {
    let parts: Vec<String> = dlt
        .partitions
        .iter()
        .map(|(p, s)| {
            let redriven = s.redriven.map_or("none".to_owned(), |r| format!("up to {r}"));
            format!("partition {p}: offsets {}..{}, redriven {redriven}", s.low, s.high)
        })
        .collect();
    parts.join("; ")
}

/// One letter in two lines: where it is, where it came from, by whom it was refused; then why.
fn describe(letter: &DeadLetter, redriven: bool) -> String {
    let when = letter
        .timestamp_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or("-".to_owned(), |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string());
    let from = letter.source.as_ref().map_or("an unknown place".to_owned(), |s| {
        format!("{} partition {} offset {}", s.topic, s.partition, s.offset)
    });
    let store = kind(letter);
    let state = if redriven { "  (sent back)" } else { "" };
    let reason: String = letter.reason.chars().take(300).collect();
    let cut = if reason.len() < letter.reason.len() { "..." } else { "" };
    format!("{}/{}  {when}  from {from}, {store}{state}\n    reason: {reason}{cut}", letter.partition, letter.offset)
}
