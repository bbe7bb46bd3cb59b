//! `kube-e2e [--filter S]`: the shared L4 scenarios and the
//! Kubernetes-only ones on the real control plane with the mesh installed
//! by `istioctl-rs install` (see `e2e::scenarios::on_kube_cluster`).
//! `cargo xtask e2e` runs it. Prints a summary with timings; exits 1 when a
//! scenario fails (the run's directory, with every log, is kept).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "the end-to-end scenarios on the real Kubernetes control plane")]
struct Args {
    /// Run only the scenarios whose name contains this.
    #[arg(long)]
    filter: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Without root, run again inside a user namespace with mapped root.
    if let Some(status) = e2e::privilege::enter_for_binary()? {
        std::process::exit(status.code().unwrap_or(1));
    }
    let started = std::time::Instant::now();
    let shared = e2e::scenarios::l4::all();
    match e2e::scenarios::on_kube_cluster(&shared, args.filter.as_deref()) {
        Ok((timings, outcomes)) => {
            eprintln!(
                "\ne2e on Kubernetes: every scenario passed in {:.1?}\ntimings:\n{timings}scenarios:\n{}",
                started.elapsed(),
                e2e::scenarios::summary(&outcomes)
            );
            Ok(())
        }
        Err(failure) => {
            eprintln!(
                "\ne2e on Kubernetes: FAILED after {:.1?}\n{failure}",
                started.elapsed()
            );
            std::process::exit(1);
        }
    }
}
