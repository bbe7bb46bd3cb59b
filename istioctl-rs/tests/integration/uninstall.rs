//! `uninstall::run` against a scripted API server holding an install: what
//! is deleted (by our label only), in which order (workloads first, with
//! foreground deletion, waited for; the rest in reverse install order),
//! and what stays without `--purge` (CRDs, the mesh root, the namespace).

use crate::support::api_server;

use std::time::Duration;

use api_server::{Recorded, list, not_found};
use istioctl_rs::manifest::{self, InstallKind};
use istioctl_rs::mesh_root;
use istioctl_rs::uninstall::{self, UninstallOptions};
use istioctl_rs::values::Values;
use serde_json::{Value, json};

/// An installed cluster: objects by path, with the list path of their kind.
struct Installed {
    objects: Vec<(String, String, Value)>,
    /// GETs of a deleted workload that still find it (foreground deletion
    /// waits for its pods).
    lingering: usize,
}

fn list_path(kind: InstallKind) -> String {
    match kind.group() {
        "" => format!("/api/v1/{}", kind.plural()),
        group => format!("/apis/{group}/{}/{}", kind.version(), kind.plural()),
    }
}

fn object_path(kind: InstallKind, namespace: Option<&str>, name: &str) -> String {
    api_server::path(&kind.api_version(), kind.plural(), namespace, name)
}

impl Installed {
    fn new() -> Self {
        let mut objects = Vec::new();
        let manifest = manifest::generate(&Values::default()).unwrap();
        for o in &manifest.objects {
            objects.push((
                list_path(o.kind),
                object_path(o.kind, o.namespace.as_deref(), &o.name),
                o.body.clone(),
            ));
        }
        let secret = mesh_root::new_secret("istio-system", "cluster.local").unwrap();
        let config_map =
            mesh_root::config_map("istio-system", "-----BEGIN CERTIFICATE-----\n").body;
        for (kind, name, body) in [
            (InstallKind::Secret, "cacerts", secret),
            (InstallKind::ConfigMap, "istio-ca-root-cert", config_map),
            // Someone else's, in our namespace: never ours to delete.
            (
                InstallKind::ConfigMap,
                "theirs",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "theirs", "namespace": "istio-system", "labels": {"app.kubernetes.io/managed-by": "helm"}}}),
            ),
        ] {
            objects.push((
                list_path(kind),
                object_path(kind, Some("istio-system"), name),
                body,
            ));
        }
        Installed {
            objects,
            lingering: 1,
        }
    }

    fn respond(&mut self, r: &Recorded) -> (u16, Value) {
        match r.method.as_str() {
            "GET" if r.query.contains_key("labelSelector") => {
                assert_eq!(
                    r.query["labelSelector"],
                    "app.kubernetes.io/managed-by=istioctl-rs"
                );
                let items = self
                    .objects
                    .iter()
                    .filter(|(l, _, body)| {
                        *l == r.path
                            && body["metadata"]["labels"]["app.kubernetes.io/managed-by"]
                                == "istioctl-rs"
                    })
                    .map(|(_, _, b)| b.clone())
                    .collect();
                list(items)
            }
            "GET" => {
                if self.lingering > 0 && r.path.contains("/daemonsets/") {
                    self.lingering -= 1;
                    return (
                        200,
                        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"}}),
                    );
                }
                match self.objects.iter().find(|(_, p, _)| *p == r.path) {
                    Some((_, _, b)) => (200, b.clone()),
                    None => not_found(),
                }
            }
            "DELETE" => {
                let before = self.objects.len();
                self.objects.retain(|(_, p, _)| *p != r.path);
                assert_eq!(before - 1, self.objects.len(), "deleting {} twice", r.path);
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            }
            other => panic!("unexpected {other} {}", r.path),
        }
    }

    fn remaining(&self) -> Vec<String> {
        self.objects.iter().map(|(_, p, _)| p.clone()).collect()
    }
}

async fn uninstall(purge: bool) -> (Vec<String>, Vec<Recorded>, Vec<String>, String) {
    let installed = std::sync::Arc::new(std::sync::Mutex::new(Installed::new()));
    let serving = installed.clone();
    let (client, server) = api_server::client(move |r| serving.lock().unwrap().respond(r));
    let options = UninstallOptions {
        purge,
        timeout: Duration::from_secs(60),
        poll_interval: Duration::from_millis(1),
    };
    let mut out = Vec::new();
    let deleted = uninstall::run(&client, &options, &mut out).await.unwrap();
    drop(client);
    let requests = server.await.unwrap();
    let remaining = installed.lock().unwrap().remaining();
    (
        deleted,
        requests,
        remaining,
        String::from_utf8(out).unwrap(),
    )
}

#[tokio::test]
async fn uninstall_deletes_what_install_applied_workloads_first() {
    let (deleted, requests, remaining, text) = uninstall(false).await;
    assert_eq!(
        deleted,
        [
            "DaemonSet istio-system/istio-cni-node",
            "DaemonSet istio-system/ztunnel",
            "Deployment istio-system/istiod",
            "ValidatingWebhookConfiguration istio-validator-istio-system",
            "Service istio-system/istiod",
            "ConfigMap istio-system/istio-ca-root-cert",
            "RoleBinding istio-system/istiod-rs-validating-webhook",
            "RoleBinding istio-system/istio-cni-rs",
            "Role istio-system/istiod-rs-validating-webhook",
            "Role istio-system/istio-cni-rs",
            "ClusterRoleBinding istiod-rs-validating-webhook",
            "ClusterRoleBinding istiod-rs",
            "ClusterRoleBinding istiod-rs-provisioner",
            "ClusterRoleBinding istio-cni-rs",
            "ClusterRole istiod-rs-validating-webhook",
            "ClusterRole istiod-rs",
            "ClusterRole istiod-rs-provisioner",
            "ClusterRole istio-cni-rs",
            "ServiceAccount istio-system/istiod",
            "ServiceAccount istio-system/istio-cni",
            "ServiceAccount istio-system/ztunnel",
        ]
    );
    // The workloads go with their pods (the node agent takes its plugin out
    // meanwhile), and are waited for before their RBAC goes.
    let deletes: Vec<&Recorded> = requests.iter().filter(|r| r.method == "DELETE").collect();
    for (i, r) in deletes.iter().enumerate() {
        let expected = if i < 3 { "Foreground" } else { "Background" };
        assert_eq!(r.body["propagationPolicy"], expected, "{}", r.path);
    }
    let lines: Vec<String> = requests.iter().map(Recorded::line).collect();
    let waited = lines
        .iter()
        .rposition(|l| l == "GET /apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel")
        .unwrap();
    let first_role = lines
        .iter()
        .position(|l| l.starts_with("DELETE /apis/rbac.authorization.k8s.io"))
        .unwrap();
    assert!(waited < first_role);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.ends_with("/daemonsets/istio-cni-node") && l.starts_with("GET"))
            .count(),
        2,
        "read until gone"
    );

    // Kept: the CRDs, the mesh root, the namespace, and what is not ours.
    let mut remaining = remaining;
    remaining.retain(|p| !p.contains("/customresourcedefinitions/"));
    assert_eq!(
        remaining,
        [
            "/api/v1/namespaces/istio-system",
            "/api/v1/namespaces/istio-system/secrets/cacerts",
            "/api/v1/namespaces/istio-system/configmaps/theirs",
        ]
    );
    assert!(
        text.contains("kept: the CustomResourceDefinitions"),
        "{text}"
    );
    assert!(
        text.ends_with("istio-rs uninstalled (21 objects deleted)\n"),
        "{text}"
    );
}

#[tokio::test]
async fn purge_also_deletes_the_crds_the_root_and_the_namespace() {
    let (deleted, _, remaining, _) = uninstall(true).await;
    assert_eq!(
        remaining,
        ["/api/v1/namespaces/istio-system/configmaps/theirs"]
    );
    assert!(deleted.contains(&"Secret istio-system/cacerts".to_string()));
    assert_eq!(deleted.last().unwrap(), "Namespace istio-system");
    let crds = manifest::generate(&Values::default())
        .unwrap()
        .of_kind(InstallKind::CustomResourceDefinition)
        .count();
    assert_eq!(
        deleted
            .iter()
            .filter(|d| d.starts_with("CustomResourceDefinition "))
            .count(),
        crds
    );
}
