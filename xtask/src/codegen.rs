//! `cargo xtask codegen [--check]`: regenerates committed generated files.

use anyhow::{Result, bail};

use crate::{cargo, root, run as run_cmd};

pub fn run(args: &[String]) -> Result<()> {
    let check = match args {
        [] => false,
        [a] if a == "--check" => true,
        _ => bail!("usage: cargo xtask codegen [--check]"),
    };
    if check {
        // The api crate's test compares the committed YAML with the types.
        return run_cmd(cargo().args(["test", "-p", "api", "--test", "crds_fresh"]));
    }
    let dir = root().join("manifests/crds");
    run_cmd(
        cargo()
            .args(["run", "--quiet", "-p", "api", "--example", "crdgen", "--"])
            .arg(&dir),
    )
}
