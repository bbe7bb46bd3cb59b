//! `istiod-rs`: parse the flags, start logging, run the app until SIGTERM.

use clap::Parser;
use istiod_rs::app::{App, Args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.init_logging()?;
    let app = App::start(args.into_config()?).await?;
    app.run().await?;
    Ok(())
}
