//! `cargo xtask demo [--keep]`: builds the mesh's binaries (visibly: a first
//! build takes minutes), then runs the `demo` binary of the `e2e` crate,
//! which brings up the local cluster and prints its table.

use anyhow::{Context, Result};

use crate::{cargo, display, run as run_cmd};

/// Packages whose binaries the local cluster runs.
pub(crate) const MESH_PACKAGES: &[&str] = &["e2e", "istiod-rs", "ztunnel-rs", "waypoint-rs"];

pub fn run(args: &[String]) -> Result<()> {
    eprintln!("demo: building the mesh's binaries (the first time takes a few minutes)");
    run_on_local_cluster("demo", args)
}

/// Builds the mesh's binaries (debug), then runs the `e2e` crate's
/// `binary` with `args`, which brings up the local cluster; its exit
/// status is passed on.
pub(crate) fn run_on_local_cluster(binary: &str, args: &[String]) -> Result<()> {
    let mut build = cargo();
    build.args(["build", "--bins"]);
    for package in MESH_PACKAGES {
        build.args(["-p", package]);
    }
    run_cmd(&mut build)?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "e2e", "--bin", binary, "--"])
        .args(args);
    eprintln!("$ {}", display(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", display(&cmd)))?;
    // The binary has printed its table and what failed; pass its verdict on.
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
