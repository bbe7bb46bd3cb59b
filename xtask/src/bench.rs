//! `cargo xtask bench <name>`: runs a benchmark in release mode. Each one
//! measures the mesh against a baseline in the same run and prints a table
//! and JSON; none of them asserts on time.

use anyhow::{Result, bail};

use crate::{cargo, run as run_cmd};

/// name -> (package, bench target, what it measures)
const BENCHES: &[(&str, &str, &str, &str)] = &[
    (
        "ca",
        "istiod-rs",
        "ca",
        "CreateCertificate per second over gRPC TLS; signing vs transport",
    ),
    (
        "controlplane",
        "istiod-rs",
        "controlplane",
        "10k pods to 100 delta-ADS clients: translation, state size, fan-out, burst CPU, RSS",
    ),
];

pub fn run(args: &[String]) -> Result<()> {
    let Some((name, rest)) = args.split_first() else {
        eprintln!("usage: cargo xtask bench <name> [args]\n\nbenchmarks:");
        for (name, _, _, what) in BENCHES {
            eprintln!("  {name:<14} {what}");
        }
        bail!("no benchmark named");
    };
    let Some((_, package, target, _)) = BENCHES.iter().find(|b| b.0 == name) else {
        let names: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
        bail!("unknown benchmark {name:?}; known: {}", names.join(", "));
    };
    run_cmd(
        cargo()
            .args(["bench", "-p", package, "--bench", target, "--"])
            .args(rest),
    )
}
