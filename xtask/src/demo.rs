//! `cargo xtask demo [--keep]`: builds the mesh's binaries (visibly: a first
//! build takes minutes), then runs the `demo` binary of the `e2e` crate,
//! which brings up the local cluster and prints its table.

use anyhow::Result;

use crate::{cargo, run as run_cmd};

/// Packages whose binaries the local cluster runs.
pub(crate) const MESH_PACKAGES: &[&str] = &["e2e", "istiod-rs", "ztunnel-rs", "waypoint-rs"];

pub fn run(args: &[String]) -> Result<()> {
    eprintln!("demo: building the mesh's binaries (the first time takes a few minutes)");
    let mut build = cargo();
    build.args(["build", "--bins"]);
    for package in MESH_PACKAGES {
        build.args(["-p", package]);
    }
    run_cmd(&mut build)?;
    run_cmd(
        cargo()
            .args(["run", "--quiet", "-p", "e2e", "--bin", "demo", "--"])
            .args(args),
    )
}
