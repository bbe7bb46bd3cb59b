//! waypoint-rs: the mesh's L7 proxy. Thin: logging, the runtime, then
//! [`waypoint_rs::app::App`].

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "waypoint-rs", version, about)]
struct Cli {
    #[command(flatten)]
    args: waypoint_rs::args::WaypointArgs,
    /// Threads that carry requests. With 1 (the default, as ztunnel-rs) a
    /// request's tasks never wake another thread: the least CPU per
    /// request. More threads spread a busy waypoint over cores.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    waypoint_rs::init_logging();
    runtime(cli.worker_threads)?
        .block_on(async { waypoint_rs::app::App::start(cli.args).await?.run().await })
}

/// Everything on the calling thread for one worker, else a work-stealing
/// pool of `workers` threads.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match workers {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}
