//! Kubernetes mode: the pod annotation `ambient.istio.io/redirection=enabled`
//! that tells the rest of the cluster (istiod, istioctl) a pod's traffic is
//! redirected. Set once ztunnel has acked the pod, removed on unenrol.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::enrolment::PodKey;

/// Errors annotating pods.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot annotate pod {pod} with {annotation}: {source} (may the node agent's service account patch pods/status?)"
)]
pub struct AnnotateError {
    pub pod: PodKey,
    pub annotation: &'static str,
    pub source: kube::Error,
}

/// The merge patch that sets (or, with `enabled == false`, removes) the
/// redirection annotation.
pub fn redirection_patch(enabled: bool) -> serde_json::Value {
    let value = if enabled {
        serde_json::Value::String(api::labels::AMBIENT_REDIRECTION_ENABLED.to_string())
    } else {
        serde_json::Value::Null
    };
    serde_json::json!({
        "metadata": { "annotations": { api::labels::AMBIENT_REDIRECTION: value } }
    })
}

/// Sets or removes the annotation on one pod with a JSON merge patch of its
/// status subresource: both `pods` and `pods/status` may change a pod's
/// metadata, and `pods/status` is the smaller privilege (upstream's
/// `AnnotateEnrolledPod`, istio/istio `cni/pkg/util/podutil.go`).
pub async fn set_redirection(
    client: &Client,
    pod: &PodKey,
    enabled: bool,
) -> Result<(), AnnotateError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    pods.patch_status(
        &pod.name,
        &PatchParams::default(),
        &Patch::Merge(redirection_patch(enabled)),
    )
    .await
    .map(|_| ())
    .map_err(|source| AnnotateError {
        pod: pod.clone(),
        annotation: api::labels::AMBIENT_REDIRECTION,
        source,
    })
}
