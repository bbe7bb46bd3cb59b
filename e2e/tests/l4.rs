//! The L4 scenarios (`e2e::scenarios::l4`) on the local cluster with the
//! whole mesh running: istiod-rs, and per node the node agent and
//! ztunnel-rs, pods enrolled through the CNI plugin. One cluster is shared
//! by every scenario, run in order; `E2E_SCENARIO=<part of a name>` runs
//! only the matching ones.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use e2e::mesh::{MeshConfig, MeshMode};
use e2e::scenarios::{self, L4Fixture, l4};
use e2e::{LocalCluster, LocalClusterConfig, privilege};

#[test]
fn l4_scenarios_on_the_local_cluster() {
    if !privilege::enter_for_test() {
        return;
    }
    let mesh = MeshConfig::default();
    let trust_domain = mesh.trust_domain.clone();
    let cluster = LocalCluster::start(LocalClusterConfig {
        mesh: MeshMode::On(mesh),
        ..LocalClusterConfig::default()
    })
    .unwrap_or_else(|e| panic!("the local cluster with the mesh starts: {e}"));
    let fixture = L4Fixture::create(&cluster, &trust_domain)
        .unwrap_or_else(|e| panic!("the scenarios' pods start and join the mesh: {e}"));
    let filter = std::env::var("E2E_SCENARIO").ok();
    let outcomes = scenarios::run_all(&cluster, &fixture, &l4::all(), filter.as_deref());
    assert!(
        !outcomes.is_empty(),
        "no scenario matches E2E_SCENARIO={filter:?}"
    );
    let summary = scenarios::summary(&outcomes);
    eprintln!("L4 scenarios:\n{summary}");
    assert!(
        outcomes.iter().all(|o| o.result.is_ok()),
        "L4 scenarios failed:\n{summary}\n(component logs: {})",
        cluster.run().dir().join("logs").display()
    );
}
