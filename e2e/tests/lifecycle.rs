//! The mesh's own lifecycle on the local cluster: istiod-rs killed, and
//! away for two minutes over a certificate renewal, while 1,000 requests a
//! second and a steady stream of new connections flow; nothing may fail
//! (see `e2e::scenarios::lifecycle`). A cluster of its own: its workload
//! certificates live minutes, so a renewal falls inside the test.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use std::time::Duration;

use e2e::mesh::MeshConfig;
use e2e::privilege;
use e2e::scenarios::{self, lifecycle};

/// Renewal at half the lifetime (3 minutes) comes after the first
/// scenario; the two-minute outage placed over it ends well before expiry.
const CERTIFICATE_TTL: Duration = Duration::from_secs(6 * 60);

#[test]
fn istiod_kill_and_outage_lose_nothing() {
    if !privilege::enter_for_test() {
        return;
    }
    let mesh = MeshConfig {
        certificate_ttl: Some(CERTIFICATE_TTL),
        ..MeshConfig::default()
    };
    let filter = std::env::var("E2E_SCENARIO").ok();
    if let Err(failure) = scenarios::on_local_cluster(mesh, &lifecycle::all(), filter.as_deref()) {
        panic!("{failure}");
    }
}
