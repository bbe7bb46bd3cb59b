//! The Kubernetes-only scenarios (`e2e::kube::scenarios`) on the mesh
//! installed with `istioctl-rs install` on the real control plane and two
//! netns nodes. `E2E_SCENARIO=<part of a name>` picks scenarios.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use e2e::kube::KubeMesh;
use e2e::kube::scenarios::{self, KubeFixture};
use e2e::privilege;

#[test]
fn kube_only_scenarios() {
    if !privilege::enter_for_test() {
        return;
    }
    let mut mesh = KubeMesh::start(2).unwrap_or_else(|e| panic!("{e}"));
    let took = mesh.install(&[]).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("e2e: timing: istioctl-rs install from nothing to all Ready in {took:?}");
    let fixture = KubeFixture::create(&mesh).unwrap_or_else(|e| {
        mesh.kube.run.keep_dir();
        panic!("{e}\nlogs: {}", mesh.logs_dir().display())
    });
    let filter = std::env::var("E2E_SCENARIO").ok();
    let outcomes = scenarios::run_all(&mesh, &fixture, &scenarios::all(), filter.as_deref());
    if outcomes.iter().any(|o| o.result.is_err()) {
        mesh.kube.run.keep_dir();
        panic!(
            "scenarios failed:\n{}\nlogs: {}",
            e2e::scenarios::summary(&outcomes),
            mesh.logs_dir().display()
        );
    }
    eprintln!("{}", e2e::scenarios::summary(&outcomes));
}
