//! `cargo xtask <command>`: the developer workflow, with nothing but cargo.
//!
//! Commands: `demo [--keep]`, `ci`, `e2e [--filter S] [--kind]`, `codegen [--check]`, `bench <name> [args]`,
//! `fuzz --smoke | <target> [--time T]`, `k8s build | path`, `images [--hub HUB] [--tag TAG]`,
//! `soak [--minutes N] [--pods P]`.

mod bench;
mod ci;
mod codegen;
mod demo;
mod e2e;
mod fuzz;
mod images;
mod k8s;
mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  demo [--keep]      the mesh on a local two-node cluster: every L4 path driven, a table of
                     what happened (root or user namespaces); --keep leaves it running
  ci                 fmt check, dependency policy, clippy (warnings are errors), all tests,
                     then `e2e`
  e2e [--filter S] [--kind]
                     the real Kubernetes control plane and two netns nodes, the mesh installed with
                     istioctl-rs, the shared L4 scenarios and the Kubernetes-only ones (root or user
                     namespaces); --kind: on a kind cluster (needs docker and kind; not written yet)
  codegen [--check]  regenerate committed generated files (CRD YAML); --check fails if stale
  soak [--minutes N] [--pods P]
                     the churn soak on the local cluster for N minutes (default 60): P pods (default 2)
                     created and deleted per cycle on both nodes, a policy edited, 1,000 req/s; a table
                     of requests, memory and descriptor slopes per component, leftovers (root or user
                     namespaces)
  bench <name>       run a benchmark and print its table and JSON (names: see `cargo xtask bench`)
  fuzz --smoke       build every fuzz target (fuzz/, cargo-fuzz on the pinned toolchain) and run
                     each on its seeds for a bounded time; fails on a crash, naming the reproducer
  fuzz <target> [--time 4h]
                     run one fuzz target for as long as asked (`fuzz --list`: the targets;
                     `fuzz --seeds`: rewrite the seed corpus)
  k8s build          build the real Kubernetes control plane for the tests (etcd, kube-apiserver,
                     controller manager, scheduler, kubectl, kube-proxy; the reference CNI
                     plugins ptp, host-local, loopback) from Go modules into
                     ${ISTIO_RS_CACHE:-~/.cache/istio-rs}/k8s/ (reused once built)
  k8s path           print the directory holding those binaries
  images [--hub H] [--tag T]
                     build the container images the install manifests run (needs Docker)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((cmd, rest)) => (cmd.as_str(), rest),
        None => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    match cmd {
        "demo" => demo::run(rest),
        "ci" => ci::run(rest),
        "e2e" => e2e::run(rest),
        "codegen" => codegen::run(rest),
        "bench" => bench::run(rest),
        "soak" => soak::run(rest),
        "fuzz" => fuzz::run(rest),
        "k8s" => k8s::run(rest),
        "images" => images::run_images(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("unknown command {other:?}\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// `cargo`, as the one that runs us.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a command, echoing it, and fails with its exit status.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(())
}

pub(crate) fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
