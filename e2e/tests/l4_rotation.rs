//! Certificate rotation on the local cluster: workload certificates that
//! live seconds are renewed on both sides while long-lived connections keep
//! flowing, and new connections use the new certificates. A cluster of its
//! own, since the short lifetime applies to every certificate in it.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use std::time::Duration;

use e2e::mesh::{MeshConfig, MeshMode};
use e2e::scenarios::{self, L4Fixture, l4};
use e2e::{LocalCluster, LocalClusterConfig, privilege};

/// Short enough that a renewal (at half the lifetime) comes within seconds,
/// long enough for a slow machine to issue the next one in time.
const CERTIFICATE_TTL: Duration = Duration::from_secs(10);

#[test]
fn certificates_rotate_under_live_connections() {
    if !privilege::enter_for_test() {
        return;
    }
    let mesh = MeshConfig {
        certificate_ttl: Some(CERTIFICATE_TTL),
        ..MeshConfig::default()
    };
    let trust_domain = mesh.trust_domain.clone();
    let cluster = LocalCluster::start(LocalClusterConfig {
        mesh: MeshMode::On(mesh),
        ..LocalClusterConfig::default()
    })
    .unwrap_or_else(|e| panic!("the local cluster with the mesh starts: {e}"));
    let fixture = L4Fixture::create(&cluster, &trust_domain)
        .unwrap_or_else(|e| panic!("the scenario's pods start and join the mesh: {e}"));
    let outcomes = scenarios::run_all(&cluster, &fixture, &[l4::rotation()], None);
    let summary = scenarios::summary(&outcomes);
    assert!(
        outcomes.iter().all(|o| o.result.is_ok()),
        "{summary}\n(component logs: {})",
        cluster.run().dir().join("logs").display()
    );
}
