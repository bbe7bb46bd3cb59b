//! A rolling upgrade of every node's ztunnel-rs on the local cluster under
//! steady traffic loses no request, no stream and no new connection
//! (`scenarios::upgrade`). A cluster of its own: the replaced ztunnels keep
//! their live connections until those end, so their drain deadline must
//! outlast the scenario's traffic, which no other scenario wants.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use std::time::Duration;

use e2e::mesh::MeshConfig;
use e2e::privilege;
use e2e::scenarios::{self, upgrade};

#[test]
fn a_ztunnel_upgrade_loses_nothing() {
    if !privilege::enter_for_test() {
        return;
    }
    let mesh = MeshConfig {
        drain_deadline: upgrade::TRAFFIC + Duration::from_secs(60),
        ..MeshConfig::default()
    };
    if let Err(failure) = scenarios::on_local_cluster(mesh, &[upgrade::ztunnel_upgrade()], None) {
        panic!("{failure}");
    }
}
