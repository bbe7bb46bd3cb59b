//! The Node object, its Lease and its status, as kubelet keeps them: the
//! Node is created with `spec.podCIDR(s)` set to the node's pod range (the
//! controller manager's range allocator then records it as taken), the
//! `kubernetes.io/hostname` and `kubernetes.io/os` labels; its status says
//! Ready with the node's address and room for pods; the Lease in
//! `kube-node-lease` (owned by the Node, as kubelet's) is renewed every
//! quarter of its duration; the status is re-reported every
//! `status_report`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use super::{NodeError, Shared};

fn api_err(node: &str, what: &str, source: kube::Error) -> NodeError {
    NodeError::Api {
        node: node.into(),
        what: what.into(),
        source,
    }
}

/// The Node object as registered.
pub fn node_object(shared: &Shared) -> serde_json::Value {
    let spec = &shared.spec;
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": {
                "kubernetes.io/hostname": spec.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        },
        "spec": {
            "podCIDR": spec.pod_cidr.to_string(),
            "podCIDRs": [spec.pod_cidr.to_string()],
        },
    })
}

/// The status kubelet reports: Ready, no pressure, the fabric address,
/// the kubelet server's port, room for pods, what it runs.
pub fn node_status(shared: &Shared, kubelet_version: &str, now: &str) -> serde_json::Value {
    let spec = &shared.spec;
    let resources =
        json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"});
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        })
    };
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    json!({"status": {
        "capacity": resources,
        "allocatable": resources,
        "addresses": [
            {"type": "InternalIP", "address": spec.ip.to_string()},
            {"type": "Hostname", "address": spec.name},
        ],
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "the e2e node runtime is posting ready status"),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": shared.kubelet_port}},
        "nodeInfo": {
            "machineID": spec.name,
            "systemUUID": spec.name,
            "bootID": spec.name,
            "kernelVersion": kernel,
            "osImage": "istio-rs e2e network-namespace node",
            "containerRuntimeVersion": format!("e2e://{}", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": kubelet_version,
            "kubeProxyVersion": kubelet_version,
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    }})
}

/// Now as the API writes times (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    crate::kube::now_rfc3339()
}

/// Creates (or adopts) the Node, checks its pod CIDR, reports it Ready and
/// takes its Lease; the Node's uid.
pub async fn register(shared: Arc<Shared>, kubelet_version: String) -> Result<String, NodeError> {
    let shared = &shared;
    let kubelet_version = kubelet_version.as_str();
    let name = &shared.spec.name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let object: Node = serde_json::from_value(node_object(shared)).expect("a valid Node");
    let node = match nodes.create(&PostParams::default(), &object).await {
        Ok(n) => n,
        Err(kube::Error::Api(s)) if s.code == 409 => nodes
            .get(name)
            .await
            .map_err(|e| api_err(name, "read the existing Node", e))?,
        Err(e) => return Err(api_err(name, "create the Node", e)),
    };
    let cidr = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.clone())
        .unwrap_or_default();
    if cidr != shared.spec.pod_cidr.to_string() {
        return Err(NodeError::PodCidr {
            node: name.clone(),
            found: if cidr.is_empty() {
                "(none)".into()
            } else {
                cidr
            },
            expected: shared.spec.pod_cidr,
        });
    }
    report_status(shared, kubelet_version).await?;
    let uid = node.metadata.uid.clone().unwrap_or_default();
    renew_lease(shared, &uid).await?;
    Ok(uid)
}

async fn report_status(shared: &Shared, kubelet_version: &str) -> Result<(), NodeError> {
    let name = &shared.spec.name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let status = node_status(shared, kubelet_version, &now());
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| api_err(name, "report the Node's status", e))?;
    Ok(())
}

/// Creates or renews the node's Lease (holder: the node).
async fn renew_lease(shared: &Shared, node_uid: &str) -> Result<(), NodeError> {
    let name = &shared.spec.name;
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let seconds = shared.timings.lease_duration.as_secs().max(1) as i32;
    let renew = MicroTime(Timestamp::now());
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid,
            }],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": seconds,
            "renewTime": renew,
        },
    }))
    .expect("a valid Lease");
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let patch = json!({"spec": {
                "holderIdentity": name, "leaseDurationSeconds": seconds, "renewTime": renew,
            }});
            leases
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|e| api_err(name, "renew the Lease", e))
        }
        Err(e) => Err(api_err(name, "create the Lease", e)),
    }
}

/// Renews the Lease every quarter of its duration and re-reports the
/// status every `status_report`, for as long as the runtime lives.
pub async fn heartbeat(shared: Arc<Shared>, kubelet_version: String, node_uid: String) {
    let renew_every = shared.timings.lease_duration / 4;
    let report_every = shared.timings.status_report;
    let mut since_report = Duration::ZERO;
    let mut warned = false;
    loop {
        tokio::time::sleep(renew_every).await;
        since_report += renew_every;
        let mut result = renew_lease(&shared, &node_uid).await;
        if result.is_ok() && since_report >= report_every {
            since_report = Duration::ZERO;
            result = report_status(&shared, &kubelet_version).await;
        }
        match result {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!("{e}");
            }
            Err(_) => {}
        }
    }
}
