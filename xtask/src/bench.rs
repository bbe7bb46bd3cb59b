//! `cargo xtask bench <name>`: runs a benchmark in release mode. Each one
//! measures the mesh against a baseline in the same run and prints a table
//! and JSON; none of them asserts on time.

use anyhow::{Result, bail};

use crate::demo::MESH_PACKAGES;
use crate::{cargo, run as run_cmd};

/// How a benchmark runs.
enum Runner {
    /// `cargo bench -p <package> --bench <target>`.
    CargoBench {
        package: &'static str,
        target: &'static str,
    },
    /// A binary of the `e2e` crate on the local cluster, after a release
    /// build of every binary the cluster runs.
    LocalCluster { binary: &'static str },
}

/// name -> (runner, what it measures)
const BENCHES: &[(&str, Runner, &str)] = &[
    (
        "ca",
        Runner::CargoBench {
            package: "istiod-rs",
            target: "ca",
        },
        "CreateCertificate per second over gRPC TLS; signing vs transport",
    ),
    (
        "controlplane",
        Runner::CargoBench {
            package: "istiod-rs",
            target: "controlplane",
        },
        "10k pods to 100 delta-ADS clients: translation, state size, fan-out, burst CPU, RSS",
    ),
    (
        "l4",
        Runner::LocalCluster { binary: "bench-l4" },
        "local cluster, mesh vs direct: bulk throughput, latency at 1,000 rps, new connections/s, ztunnel CPU and memory",
    ),
    (
        "l7",
        Runner::LocalCluster { binary: "bench-l7" },
        "local cluster, waypoint vs L4 mesh vs direct: HTTP/1.1 and gRPC at 1,000 rps and at saturation, waypoint CPU and memory",
    ),
];

pub fn run(args: &[String]) -> Result<()> {
    let Some((name, rest)) = args.split_first() else {
        // Asked for no benchmark: the list, which is what the README promises.
        println!("usage: cargo xtask bench <name> [args]\n\nbenchmarks:");
        for (name, _, what) in BENCHES {
            println!("  {name:<14} {what}");
        }
        return Ok(());
    };
    let Some((_, runner, _)) = BENCHES.iter().find(|b| b.0 == name) else {
        let names: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
        bail!("unknown benchmark {name:?}; known: {}", names.join(", "));
    };
    match runner {
        Runner::CargoBench { package, target } => run_cmd(
            cargo()
                .args(["bench", "-p", package, "--bench", target, "--"])
                .args(rest),
        ),
        Runner::LocalCluster { binary } => {
            let mut build = cargo();
            build.args(["build", "--release", "--bins"]);
            for package in MESH_PACKAGES {
                build.args(["-p", package]);
            }
            run_cmd(&mut build)?;
            run_cmd(
                cargo()
                    .args([
                        "run",
                        "--quiet",
                        "--release",
                        "-p",
                        "e2e",
                        "--bin",
                        binary,
                        "--",
                    ])
                    .args(rest),
            )
        }
    }
}
