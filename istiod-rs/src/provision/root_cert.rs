//! The mesh root in each namespace with a waypoint: ConfigMap
//! `istio-ca-root-cert`, key `root-cert.pem`, upstream's name and key
//! (istio/istio `pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go`
//! `CACertNamespaceConfigMap`, `constants.CACertNamespaceConfigMapDataName`),
//! which the waypoint template mounts at `/var/run/secrets/istio`.

use serde_json::{Value, json};

/// The ConfigMap's name.
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
/// Its key holding the roots (PEM).
pub const KEY: &str = "root-cert.pem";

/// The ConfigMap of `namespace` holding `roots_pem`, as applied.
pub fn config_map(namespace: &str, roots_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": namespace},
        "data": {KEY: roots_pem},
    })
}
