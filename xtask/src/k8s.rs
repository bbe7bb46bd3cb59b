//! `cargo xtask k8s build | path`: the real Kubernetes control-plane
//! binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! kubectl, kube-proxy) built from Go modules into a cache outside the work
//! tree. The recipe and the cache live in the `e2e` crate
//! (`e2e::kube::build`), which the end-to-end tests use too; this runs its
//! `k8s` binary.

use anyhow::{Context, Result, bail};

use crate::{cargo, display};

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("build" | "path") if args.len() == 1 => {}
        _ => bail!("usage: cargo xtask k8s build | path"),
    }
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "e2e", "--bin", "k8s", "--"])
        .args(args);
    eprintln!("$ {}", display(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", display(&cmd)))?;
    if !status.success() {
        bail!("`cargo xtask k8s {}` failed: {status}", args.join(" "));
    }
    Ok(())
}
