//! `istiod-rs`: parse the flags, start logging, run the app until SIGTERM.
//! A start-up error is printed as one line naming what to fix, exit code 1.

use std::process::ExitCode;

use clap::Parser;
use istiod_rs::app::{App, AppError, Args};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("istiod-rs: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), AppError> {
    args.init_logging()?;
    App::start(args.into_config()?).await?.run().await
}
