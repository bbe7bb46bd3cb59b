//! ztunnel-rs-cni: the node agent, which `ztunnel-rs cni` runs. It enrols
//! this node's pods: in-pod rules, ZDS to the proxy, CNI events. All logic
//! lives in `ztunnel_rs::node_agent`; see `ztunnel-rs`'s main for why it is a
//! binary of its own.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "ztunnel-rs cni",
    version,
    about = "The node agent: enrols this node's pods (in-pod rules, ZDS, CNI events)"
)]
struct Cli {
    #[command(flatten)]
    args: ztunnel_rs::node_agent::CniArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ztunnel_rs::init_logging();
    // The agent blocks a thread while it works inside a pod's network
    // namespace: it keeps a thread per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(ztunnel_rs::node_agent::run(cli.args));
    // Stopped (SIGTERM, or a failure): exit now, without waiting for
    // blocking work still in flight; whatever was half done is redone by
    // the next agent's start.
    runtime.shutdown_background();
    result
}
