//! ztunnel-rs: the per-node L4 proxy and its node agent.
//! `ztunnel-rs proxy [flags]` runs the proxy, `ztunnel-rs cni [flags]` the
//! node agent.
//!
//! The node agent is the binary `ztunnel-rs-cni` next to this one, which
//! `ztunnel-rs cni` runs in its place. Kept apart so that the proxy, running
//! on every node, carries none of the agent's Kubernetes client and YAML
//! code: that was two thirds of its text and kept about 3.5 MB of it
//! resident.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
// A later flag overrides an earlier one: the flags made from upstream's
// environment variables come first (`ztunnel_rs::upstream`).
#[command(name = "ztunnel-rs", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The node proxy: HBONE/mTLS for every enrolled pod on this node, L4 policy, metrics.
    Proxy {
        /// Upstream's DaemonSet runs `ztunnel proxy ztunnel`; the one mode
        /// there is.
        #[arg(value_parser = ["ztunnel"], hide = true)]
        mode: Option<String>,
        #[command(flatten)]
        args: ztunnel_rs::app::ProxyArgs,
        /// Threads that carry the proxy's connections. With 1, a connection's
        /// task and its HBONE connection's task share a thread, so handing
        /// bytes between them never wakes another thread: the least CPU and
        /// latency per request. More threads spread a busy node over cores.
        /// A number, or a percentage of `ZTUNNEL_CPU_LIMIT` (else of the
        /// machine's cores) as upstream reads it, e.g. `50%`.
        #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value = "1", value_parser = worker_threads)]
        worker_threads: usize,
    },
    /// Prints the version (upstream's `ztunnel version`).
    Version,
    /// The node agent: enrols this node's pods (in-pod rules, ZDS, CNI
    /// events). Runs `ztunnel-rs-cni` from this binary's directory with the
    /// same arguments; `ztunnel-rs cni --help` lists its flags.
    #[command(disable_help_flag = true)]
    Cni {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn worker_threads(value: &str) -> Result<usize, String> {
    let limit = std::env::var("ZTUNNEL_CPU_LIMIT").ok();
    ztunnel_rs::upstream::worker_threads(value, limit.as_deref())
}

fn main() -> anyhow::Result<()> {
    let argv = ztunnel_rs::upstream::proxy_argv(std::env::args_os().collect(), &|name| {
        std::env::var(name).ok()
    })?;
    match Cli::parse_from(argv).command {
        Command::Version => {
            println!("ztunnel-rs {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Proxy {
            mode: _,
            args,
            worker_threads,
        } => {
            ztunnel_rs::init_logging();
            keep_large_buffers_in_the_heap();
            runtime(worker_threads)?
                .block_on(async { ztunnel_rs::app::App::start(args).await?.run().await })
        }
        Command::Cni { args } => {
            let agent = std::env::current_exe()?.with_file_name(NODE_AGENT);
            // Only returns if the agent could not be started.
            let error = std::process::Command::new(&agent)
                .arg0("ztunnel-rs cni")
                .args(args)
                .exec();
            anyhow::bail!(
                "ztunnel-rs cni runs the node agent binary {}, which could not be started: {error} \
                 (install {NODE_AGENT} next to ztunnel-rs)",
                agent.display()
            )
        }
    }
}

/// The node agent's binary, installed next to `ztunnel-rs`.
const NODE_AGENT: &str = "ztunnel-rs-cni";

/// Bulk transfers allocate and free buffers of a few hundred KiB (reads
/// from TCP, HTTP/2 frames) all the time. glibc serves those from fresh
/// mmap(2)s, so each one costs page faults and zeroing: a tenth of the
/// proxy's CPU in a bulk transfer. Taking them from the heap instead, and
/// trimming the heap only past a few MiB of free space, lets them be reused.
#[allow(unsafe_code)]
fn keep_large_buffers_in_the_heap() {
    // SAFETY: mallopt only tunes the allocator; called before any thread
    // of ours exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// The proxy's runtime: everything on the calling thread for one worker,
/// else a work-stealing pool of `workers` threads.
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
