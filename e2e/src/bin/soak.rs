//! `soak`: the churn soak on a local two-node cluster for as long as asked
//! (see `e2e::scenarios::soak`), printing its table. `cargo xtask soak`
//! runs it. Exits 1 when a check fails.

use std::time::Duration;

use clap::Parser;
use e2e::scenarios::soak::{self, DEFAULT_PODS, SAMPLE_EVERY, SoakConfig};

/// The churn soak: pods created and deleted on both nodes, a policy
/// edited, 1,000 requests a second; memory and descriptor slopes and
/// leftovers reported.
#[derive(Debug, Parser)]
struct Args {
    /// Minutes of churn.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    minutes: u64,
    /// Pods created and deleted per churn cycle, over the nodes in turn.
    #[arg(long, default_value_t = DEFAULT_PODS, value_parser = pods)]
    pods: usize,
}

fn pods(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=32).contains(&n) => Ok(n),
        _ => Err(format!("{text:?}: a number of pods from 1 to 32")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(status) = e2e::privilege::enter_for_binary()? {
        std::process::exit(status.code().unwrap_or(1));
    }
    let config = SoakConfig {
        churn: Duration::from_secs(args.minutes * 60),
        pods_per_cycle: args.pods,
        sample_every: SAMPLE_EVERY,
    };
    match soak::on_local_cluster(&config) {
        Ok(_) => Ok(()),
        Err(failure) => {
            eprintln!("{failure}");
            std::process::exit(1);
        }
    }
}
