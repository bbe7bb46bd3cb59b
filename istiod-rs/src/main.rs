//! `istiod-rs`: parse the flags, start logging, run the app until SIGTERM.
//! A start-up error is printed as one line naming what to fix, exit code 1.

use std::process::ExitCode;

use clap::Parser;
use istiod_rs::app::{App, AppError, Args, upstream};

#[tokio::main]
async fn main() -> ExitCode {
    // Upstream istiod's command line (`discovery --monitoringAddr=:15014 ...`) is ours too.
    let (argv, notes) = match upstream::discovery_argv(std::env::args_os().collect()) {
        Ok(translated) => translated,
        Err(error) => {
            eprintln!("istiod-rs: {error}");
            return ExitCode::FAILURE;
        }
    };
    match run(Args::parse_from(argv), notes).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("istiod-rs: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, notes: upstream::Notes) -> Result<(), AppError> {
    args.init_logging()?;
    for note in notes {
        tracing::warn!("{note}");
    }
    App::start(args.into_config()?).await?.run().await
}
