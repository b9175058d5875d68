//! `cqrs_api`: the CQRS service. Commands go to PostgreSQL; queries are served from the MongoDB read
//! stores, round-robin over the healthy ones; pages at `/`, `/demo` and `/sync`.

use cdc_cqrs::service::ServiceArgs;
use clap::{Args as _, FromArgMatches as _};

fn main() -> std::process::ExitCode {
    let command = ServiceArgs::augment_args(clap::Command::new("cqrs_api"))
        .about(
            "The CQRS service: a JSON API whose commands write to PostgreSQL and whose queries read the MongoDB \
             read models, spread round-robin over the read stores that are up and caught up (read-your-writes \
             with ?after=<position>); pages: / (data and commands), /demo (reads spread over the stores), /sync \
             (each store compared with PostgreSQL). Stops cleanly on SIGTERM.",
        )
        .version(env!("CARGO_PKG_VERSION"));
    let args = ServiceArgs::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    cdc_cqrs::cli::run(cdc_cqrs::service::serve(args))
}
