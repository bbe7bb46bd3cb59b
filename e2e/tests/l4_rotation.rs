//! Certificate rotation on the local cluster: workload certificates that
//! live seconds are renewed on both sides while long-lived connections keep
//! flowing, and new connections use the new certificates. A cluster of its
//! own, since the short lifetime applies to every certificate in it.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use std::time::Duration;

use e2e::mesh::MeshConfig;
use e2e::privilege;
use e2e::scenarios::{self, l4};

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
    if let Err(failure) = scenarios::on_local_cluster(mesh, &[l4::rotation()], None) {
        panic!("{failure}");
    }
}
