//! Root rotation of a plug-in CA on the local cluster: istiod-rs reloads
//! its `cacerts` directory while 1,000 requests a second flow, the proxies
//! take the new roots from their next certificates, and nothing may fail
//! (see `e2e::scenarios::rotation`). A cluster of its own: istiod-rs runs
//! on a plug-in CA written here (root A, intermediate A), and certificates
//! live seconds so that each step is picked up within the test.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use std::time::Duration;

use e2e::mesh::MeshConfig;
use e2e::privilege;
use e2e::scenarios::{self, rotation};

/// Renewal at half the lifetime: each step reaches every proxy within
/// about ten seconds.
const CERTIFICATE_TTL: Duration = Duration::from_secs(20);

#[test]
fn plug_in_root_rotation_loses_nothing() {
    if !privilege::enter_for_test() {
        return;
    }
    let cacerts = tempfile::tempdir().expect("a temporary directory");
    let a = rotation::PlugInCa::new("rotation A").expect("CA A");
    a.write_cacerts(cacerts.path(), &a.root_pem())
        .expect("writing cacerts A");
    let mesh = MeshConfig {
        certificate_ttl: Some(CERTIFICATE_TTL),
        cacerts_dir: Some(cacerts.path().to_path_buf()),
        ..MeshConfig::default()
    };
    if let Err(failure) = scenarios::on_local_cluster(mesh, &rotation::all(), None) {
        panic!("{failure}");
    }
}
