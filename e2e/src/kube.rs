//! Kubernetes for real: the control-plane binaries built from Go modules
//! ([`build`]), their PKI ([`pki`]), a running control plane in the
//! topology's control-plane namespace ([`control_plane`]) and `kubectl`
//! to talk to it ([`kubectl`]).

pub mod build;
pub mod cluster;
pub mod control_plane;
pub mod kubectl;
pub mod mesh;
pub mod node;
pub mod pki;
pub mod samples;
pub mod scenarios;

pub use build::{BuildError, Cache, KubeBinaries, Recipe};
pub use cluster::{KubeCluster, KubeClusterConfig};
pub use control_plane::{ControlPlane, ControlPlaneConfig, ControlPlaneError};
pub use kubectl::{Kubectl, KubectlError};
pub use mesh::{KubeMesh, KubeMeshError};
pub use pki::ClientIdentity;

/// The control-plane binaries of the default [`Recipe`], from the cache;
/// built first when the cache is not complete (the same code path as
/// `cargo xtask k8s build`, which runs before the tests in CI; a first
/// build takes many minutes, Go's output on stderr).
pub fn binaries() -> Result<KubeBinaries, BuildError> {
    let cache = Cache::default_recipe()?;
    if let Ok(binaries) = cache.binaries() {
        return Ok(binaries);
    }
    eprintln!(
        "e2e: the Kubernetes control plane is not built in {}; building it now \
         (`cargo xtask k8s build` does the same)",
        cache.dir.display()
    );
    let (binaries, report) = cache.build(&|step| eprintln!("e2e: k8s: {step}"))?;
    eprintln!(
        "e2e: k8s: built in {}",
        build::human(report.total.as_secs_f64())
    );
    Ok(binaries)
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
}

/// A run with the network (fabric, control-plane namespace, `nodes` node
/// namespaces) and a control plane in its control-plane namespace: where
/// Kubernetes tests start. Dropping it stops everything (the run last).
#[derive(Debug)]
pub struct KubeRun {
    pub control_plane: ControlPlane,
    pub topology: crate::topology::Topology,
    pub run: crate::run::Run,
}

impl KubeRun {
    /// Builds the network and starts the control plane, saying each step on stderr.
    pub fn start(nodes: usize) -> Result<KubeRun, KubeError> {
        let binaries = binaries()?;
        let run = crate::run::Run::start()?;
        let plan = crate::topology::AddressPlan::default();
        let topology = crate::topology::Topology::build(&run, nodes, plan.clone())?;
        let config = ControlPlaneConfig::for_plan(binaries, &plan);
        let started = ControlPlane::start(&run, &topology.control_plane, config, &|step| {
            eprintln!("e2e: kube: {step}")
        });
        let control_plane = match started {
            Ok(cp) => cp,
            Err(e) => {
                // Keep the logs and the PKI to look into (the run says where).
                run.keep_dir();
                return Err(e.into());
            }
        };
        Ok(KubeRun {
            control_plane,
            topology,
            run,
        })
    }
}

/// Registers Node `name` and reports it Ready with room for pods, as a
/// kubelet does when it joins (the object is real; only the kubelet behind
/// it is missing until the node runtime plays that part).
pub fn register_node(kubectl: &Kubectl, name: &str) -> Result<(), KubectlError> {
    kubectl.apply(
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            }},
        })
        .to_string(),
    )?;
    let now = now_rfc3339();
    let resources = serde_json::json!({"cpu": "2", "memory": "4Gi", "pods": "110"});
    kubectl.patch_status(
        "node",
        None,
        name,
        &serde_json::json!({"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "e2e node", "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
        }}),
    )?;
    Ok(())
}

/// Now, as Kubernetes writes times (RFC 3339, seconds, UTC).
pub fn now_rfc3339() -> String {
    let secs = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
