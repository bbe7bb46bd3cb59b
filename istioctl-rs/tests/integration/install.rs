//! `install::run` against a scripted API server: the exact requests (the
//! checks, then one server-side apply per object in dependency order, the
//! mesh root, the CRDs' Established wait, the rollout reads), nothing sent
//! on `--dry-run`, and the errors that stop an install: another Istio, a
//! Kubernetes too old, a missing permission, a component never ready.

use crate::support::api_server;

use std::collections::BTreeMap;
use std::time::Duration;

use api_server::{Recorded, list, not_found, path, status, version};
use istioctl_rs::install::{self, InstallError, InstallOptions, Installed};
use istioctl_rs::manifest::{self, InstallKind, ManifestObject};
use istioctl_rs::values::Values;
use serde_json::{Value, json};

/// A cluster that takes what is applied and runs it.
struct Fake {
    minor: u32,
    objects: BTreeMap<String, Value>,
    reads: BTreeMap<String, usize>,
    /// Reads of the ztunnel DaemonSet before it is ready.
    ztunnel_ready_after: usize,
    /// Deployments labelled app=istiod already there.
    istiods: Vec<Value>,
    /// An apply of this path is forbidden.
    forbid: Option<String>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            minor: 32,
            objects: BTreeMap::new(),
            reads: BTreeMap::new(),
            ztunnel_ready_after: 2,
            istiods: Vec::new(),
            forbid: None,
        }
    }

    fn respond(&mut self, r: &Recorded) -> (u16, Value) {
        let p = r.path.as_str();
        match r.method.as_str() {
            "GET" if p == "/version" => version(self.minor),
            "GET" if p == "/apis/apps/v1/deployments" => list(self.istiods.clone()),
            "GET" if p == "/apis/apps/v1/daemonsets" => list(vec![]),
            "PATCH" if Some(p) == self.forbid.as_deref() => status(
                403,
                "Forbidden",
                "clusterroles.rbac.authorization.k8s.io \"istiod-rs\" is forbidden: User \"dev\" cannot create resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope",
            ),
            "PATCH" => {
                self.objects.insert(p.to_string(), r.body.clone());
                (200, r.body.clone())
            }
            "POST" => {
                let name = r.body["metadata"]["name"].as_str().unwrap();
                let at = format!("{p}/{name}");
                if self.objects.contains_key(&at) {
                    return status(409, "AlreadyExists", &format!("{name} already exists"));
                }
                self.objects.insert(at, r.body.clone());
                (201, r.body.clone())
            }
            "GET" => {
                let reads = self.reads.entry(p.to_string()).or_default();
                *reads += 1;
                let reads = *reads;
                match self.objects.get(p) {
                    Some(o) => (
                        200,
                        running(
                            o.clone(),
                            reads >= self.ztunnel_ready_after || !p.ends_with("/ztunnel"),
                        ),
                    ),
                    None => not_found(),
                }
            }
            other => panic!("unexpected {other} {p}"),
        }
    }
}

/// `object` as the cluster shows it once its controllers ran: CRDs
/// established, workloads rolled out (DaemonSets on 2 nodes, `ready` or not).
fn running(mut object: Value, ready: bool) -> Value {
    object["metadata"]["generation"] = json!(1);
    match object["kind"].as_str().unwrap() {
        "CustomResourceDefinition" => {
            object["status"] = json!({"conditions": [{"type": "Established", "status": "True"}]});
        }
        "Deployment" => {
            let n = object["spec"]["replicas"].clone();
            object["status"] = json!({"observedGeneration": 1, "replicas": n, "updatedReplicas": n,
                                      "availableReplicas": n, "readyReplicas": n});
        }
        "DaemonSet" => {
            object["status"] = json!({"observedGeneration": 1, "desiredNumberScheduled": 2,
                "currentNumberScheduled": 2, "numberMisscheduled": 0, "updatedNumberScheduled": 2,
                "numberReady": if ready { 2 } else { 1 }});
        }
        _ => {}
    }
    object
}

fn object_path(o: &ManifestObject) -> String {
    path(
        &o.kind.api_version(),
        o.kind.plural(),
        o.namespace.as_deref(),
        &o.name,
    )
}

fn collection_path(o: &ManifestObject) -> String {
    object_path(o)
        .rsplit_once('/')
        .map(|(collection, _)| collection.to_string())
        .unwrap()
}

fn options() -> InstallOptions {
    let mut options = InstallOptions::new(Values::default());
    options.poll_interval = Duration::from_millis(1);
    options
}

#[tokio::test]
async fn install_applies_everything_in_order_with_server_side_apply() {
    let (installed, requests, text) = install_on(Fake::new(), &options()).await;
    let installed = installed.unwrap();

    let manifest = manifest::generate(&Values::default()).unwrap();
    let secrets = "/api/v1/namespaces/istio-system/secrets";
    let mut expected = vec![
        "GET /version".to_string(),
        "GET /apis/apps/v1/deployments".into(),
        "GET /apis/apps/v1/daemonsets".into(),
        "GET /apis/apps/v1/daemonsets".into(),
    ];
    let crds: Vec<&ManifestObject> = manifest
        .of_kind(InstallKind::CustomResourceDefinition)
        .collect();
    for o in &manifest.objects {
        if o.if_absent {
            // Created, never applied over what a cluster has.
            expected.push(format!("POST {}", collection_path(o)));
        } else {
            expected.push(format!("PATCH {}", object_path(o)));
        }
        if o.kind == InstallKind::Namespace {
            expected.push(format!("GET {secrets}/cacerts"));
            expected.push(format!("POST {secrets}"));
            expected
                .push("PATCH /api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert".into());
        }
        if std::ptr::eq(o, *crds.last().unwrap()) {
            expected.extend(crds.iter().map(|c| format!("GET {}", object_path(c))));
        }
    }
    let workloads = [
        "/apis/apps/v1/namespaces/istio-system/deployments/istiod",
        "/apis/apps/v1/namespaces/istio-system/daemonsets/istio-cni-node",
        "/apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel",
    ];
    // Two polls: ztunnel is ready on its second read.
    for _ in 0..2 {
        expected.extend(workloads.iter().map(|w| format!("GET {w}")));
    }
    let lines: Vec<String> = requests.iter().map(Recorded::line).collect();
    assert_eq!(lines, expected);
    // The dependency order, spelled out.
    let at = |line: &str| {
        lines
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("no {line}"))
    };
    assert_eq!(at("PATCH /api/v1/namespaces/istio-system"), 4);
    let crd = at(
        "PATCH /apis/apiextensions.k8s.io/v1/customresourcedefinitions/authorizationpolicies.security.istio.io",
    );
    let account = at("PATCH /api/v1/namespaces/istio-system/serviceaccounts/istiod");
    let role = at("PATCH /apis/rbac.authorization.k8s.io/v1/clusterroles/istiod-rs");
    let webhook = at(
        "PATCH /apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/istio-validator-istio-system",
    );
    let istiod = at("PATCH /apis/apps/v1/namespaces/istio-system/deployments/istiod");
    let ztunnel = at("PATCH /apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel");
    let established = at(
        "GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/authorizationpolicies.security.istio.io",
    );
    assert!(at("POST /api/v1/namespaces/istio-system/secrets") < crd);
    assert!(crd < established && established < account);
    assert!(account < role && role < webhook && webhook < istiod && istiod < ztunnel);

    // Every apply: server-side, as istioctl-rs, forced, strict, and exactly
    // the manifest's object.
    let applies: Vec<&Recorded> = requests.iter().filter(|r| r.method == "PATCH").collect();
    for r in &applies {
        assert_eq!(r.content_type, "application/apply-patch+yaml", "{}", r.path);
        assert_eq!(
            r.query,
            BTreeMap::from([
                ("fieldManager".to_string(), "istioctl-rs".to_string()),
                ("fieldValidation".to_string(), "Strict".to_string()),
                ("force".to_string(), "true".to_string()),
            ]),
            "{}",
            r.path
        );
    }
    for o in &manifest.objects {
        let sent = if o.if_absent {
            requests
                .iter()
                .find(|r| r.method == "POST" && r.body["metadata"]["name"] == o.name.as_str())
        } else {
            applies.iter().copied().find(|r| r.path == object_path(o))
        };
        assert_eq!(sent.unwrap().body, o.body, "{}", o.describe());
    }
    // The Secret is created (never applied over an existing root), with
    // our field manager; the ConfigMap carries its root.
    let post = requests.iter().find(|r| r.method == "POST").unwrap();
    assert_eq!(
        post.query.get("fieldManager").map(String::as_str),
        Some("istioctl-rs")
    );
    assert_eq!(
        post.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "istioctl-rs"
    );
    let config_map = applies
        .iter()
        .find(|r| r.path.ends_with("/istio-ca-root-cert"))
        .unwrap();
    let root = config_map.body["data"]["root-cert.pem"].as_str().unwrap();
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    assert_eq!(
        installed.mesh_root,
        Some(istioctl_rs::mesh_root::MeshRoot::Created)
    );
    assert_eq!(installed.applied.len(), manifest.objects.len() + 1);

    // What the user saw: each apply, the progress (ztunnel waiting, then
    // ready, as plain lines: not a terminal), the next steps.
    assert!(
        text.contains("applied Deployment istio-system/istiod\n"),
        "{text}"
    );
    assert!(
        text.contains("created Secret istio-system/cacerts: a new mesh root"),
        "{text}"
    );
    let waiting = text
        .find("DaemonSet istio-system/ztunnel         waiting: 1/2 ready (1/2 nodes ready)")
        .expect(&text);
    let ready = text
        .find("DaemonSet istio-system/ztunnel         ready: 2/2")
        .expect(&text);
    assert!(waiting < ready);
    assert!(!text.contains('\x1b'));
    assert!(text.ends_with(&install::next_steps()), "{text}");
    assert!(text.contains("kubectl label namespace NAMESPACE istio.io/dataplane-mode=ambient"));
}

#[tokio::test]
async fn dry_run_sends_nothing() {
    let (client, server) = api_server::client(|r| panic!("dry run sent {}", r.line()));
    let mut options = options();
    options.dry_run = true;
    let mut out = Vec::new();
    let installed = install::run(&client, &options, &mut out, false)
        .await
        .unwrap();
    drop(client);
    assert_eq!(server.await.unwrap(), Vec::<Recorded>::new());
    assert!(installed.applied.is_empty());
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("Dry run: nothing is applied."), "{text}");
    assert!(
        text.contains("  Deployment istio-system/istiod (istiod.yaml:"),
        "{text}"
    );
    assert!(
        text.contains("Secret istio-system/cacerts: created with a new mesh root unless it exists")
    );
}

/// Runs an install on `fake`: its outcome, the requests, the output.
async fn install_on(
    mut fake: Fake,
    options: &InstallOptions,
) -> (Result<Installed, InstallError>, Vec<Recorded>, String) {
    let (client, server) = api_server::client(move |r| fake.respond(r));
    let mut out = Vec::new();
    let outcome = install::run(&client, options, &mut out, false).await;
    drop(client);
    (
        outcome,
        server.await.unwrap(),
        String::from_utf8(out).unwrap(),
    )
}

/// An install expected to fail: the error and the requests.
async fn failing(fake: Fake) -> (InstallError, Vec<Recorded>) {
    let (outcome, requests, _) = install_on(fake, &options()).await;
    (outcome.unwrap_err(), requests)
}

#[tokio::test]
async fn another_istio_blocks_the_install_before_anything_is_applied() {
    let mut fake = Fake::new();
    fake.istiods.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "istiod", "namespace": "istio-system", "labels": {"app": "istiod"}},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "discovery", "image": "docker.io/istio/pilot:1.24.2"}]}}},
    }));
    let (err, requests) = failing(fake).await;
    let text = err.to_string();
    assert!(
        text.contains("another Istio installation runs here: Deployment istio-system/istiod (docker.io/istio/pilot:1.24.2); uninstall it first"),
        "{text}"
    );
    assert!(requests.iter().all(|r| r.method == "GET"), "{requests:?}");
}

#[tokio::test]
async fn an_earlier_istio_rs_install_is_upgraded_in_place() {
    let mut fake = Fake::new();
    fake.istiods.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "istiod", "namespace": "istio-system",
                     "labels": {"app": "istiod", "app.kubernetes.io/managed-by": "istioctl-rs"}},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "discovery", "image": "istio-rs/istiod-rs:0.0.9"}]}}},
    }));
    let (installed, requests, _) = install_on(fake, &options()).await;
    installed.unwrap();
    assert!(requests.iter().any(|r| r.method == "PATCH"));
}

#[tokio::test]
async fn too_old_a_kubernetes_is_refused() {
    let mut fake = Fake::new();
    fake.minor = 29;
    let (err, requests) = failing(fake).await;
    let text = err.to_string();
    assert!(
        text.contains("v1.29.3 is too old: istio-rs needs Kubernetes 1.30 or newer"),
        "{text}"
    );
    assert!(requests.iter().all(|r| r.method == "GET"));
}

#[tokio::test]
async fn a_forbidden_apply_says_which_permission_is_missing() {
    let mut fake = Fake::new();
    fake.forbid = Some("/apis/rbac.authorization.k8s.io/v1/clusterroles/istiod-rs".into());
    let (err, requests) = failing(fake).await;
    assert_eq!(
        err.to_string(),
        "applying ClusterRole istiod-rs was forbidden: these credentials may not create clusterroles.rbac.authorization.k8s.io; ask a cluster admin for that permission or use a kubeconfig with cluster-admin (API server: clusterroles.rbac.authorization.k8s.io \"istiod-rs\" is forbidden: User \"dev\" cannot create resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope)"
    );
    // Nothing after it was applied.
    assert_eq!(
        requests.last().unwrap().path,
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/istiod-rs"
    );
}

#[tokio::test]
async fn gateway_api_crds_a_cluster_has_are_left_as_they_are() {
    let mut fake = Fake::new();
    let gateways = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gateways.gateway.networking.k8s.io";
    let theirs = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gateways.gateway.networking.k8s.io",
                     "annotations": {"gateway.networking.k8s.io/bundle-version": "v1.3.0"}},
    });
    fake.objects.insert(gateways.into(), theirs.clone());
    let (installed, requests, out) = install_on(fake, &options()).await;
    let installed = installed.unwrap();
    // Asked to create it, refused as existing, never applied over.
    assert!(
        !requests
            .iter()
            .any(|r| r.path == gateways && r.method != "GET"),
        "{requests:?}"
    );
    assert!(
        out.contains("kept CustomResourceDefinition gateways.gateway.networking.k8s.io: the cluster has it already, left as it is"),
        "{out}"
    );
    assert!(
        out.contains("created CustomResourceDefinition httproutes.gateway.networking.k8s.io"),
        "{out}"
    );
    assert!(
        !installed
            .applied
            .iter()
            .any(|a| a.contains("gateways.gateway.networking.k8s.io"))
    );
    // Still waited for: istiod-rs reads it.
    assert!(
        requests
            .iter()
            .any(|r| r.path == gateways && r.method == "GET")
    );
}

#[tokio::test]
async fn an_existing_mesh_root_is_kept() {
    let mut fake = Fake::new();
    let existing = istioctl_rs::mesh_root::new_secret("istio-system", "cluster.local").unwrap();
    fake.objects.insert(
        "/api/v1/namespaces/istio-system/secrets/cacerts".into(),
        existing.clone(),
    );
    let (installed, requests, out) = install_on(fake, &options()).await;
    assert_eq!(
        installed.unwrap().mesh_root,
        Some(istioctl_rs::mesh_root::MeshRoot::Kept)
    );
    assert!(!requests.iter().any(|r| r.path.contains("/secrets")
        && (r.method == "POST" || r.path.ends_with("/secrets/cacerts") && r.method == "PATCH")));
    let config_map = requests
        .iter()
        .find(|r| r.path.ends_with("/istio-ca-root-cert"))
        .unwrap();
    let pem = existing["data"]["root-cert.pem"].as_str().unwrap();
    let decoded = String::from_utf8(
        serde_json::from_value::<k8s_openapi::ByteString>(json!(pem))
            .unwrap()
            .0,
    )
    .unwrap();
    assert_eq!(config_map.body["data"]["root-cert.pem"], decoded);
    assert!(out.contains("kept Secret istio-system/cacerts"), "{out}");
}

#[tokio::test]
async fn a_component_never_ready_times_out_naming_it() {
    let mut fake = Fake::new();
    fake.ztunnel_ready_after = usize::MAX;
    let mut options = options();
    options.timeout = Duration::from_millis(50);
    let (outcome, _, _) = install_on(fake, &options).await;
    let text = outcome.unwrap_err().to_string();
    assert!(
        text.starts_with("not ready after 50ms: DaemonSet istio-system/ztunnel waiting: 1/2 ready (1/2 nodes ready); see `kubectl -n istio-system get pods`"),
        "{text}"
    );
}
