//! ztunnel-rs: the per-node L4 proxy and its node agent.
//! `ztunnel-rs proxy [flags]` runs the proxy, `ztunnel-rs cni [flags]` the
//! node agent.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ztunnel-rs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The node proxy: HBONE/mTLS for every enrolled pod on this node, L4 policy, metrics.
    Proxy(ztunnel_rs::app::ProxyArgs),
    /// The node agent: enrols this node's pods (in-pod rules, ZDS, CNI events).
    Cni(ztunnel_rs::node_agent::CniArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Proxy(args) => ztunnel_rs::app::App::start(args).await?.run().await,
        Command::Cni(args) => ztunnel_rs::node_agent::run(args).await,
    }
}
