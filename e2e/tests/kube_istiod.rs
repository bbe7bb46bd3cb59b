//! istiod-rs's Kubernetes mode against a real API server (the control
//! plane of `e2e::kube`): its watchers, status writer, TokenReview
//! authentication, CA and validating webhook, which until now had met only
//! mocks.
//!
//! With our CRDs applied from `manifests/crds/` and the webhook's
//! configuration from `manifests/install/`, istiod-rs runs as a process in
//! the control-plane namespace with an admin kubeconfig (KUBECONFIG). There
//! is no kubelet yet: the pod's status (IP, Ready) is written through the
//! status subresource as a kubelet would, and the `istiod` Service's
//! endpoint (the control plane's fabric address) is an EndpointSlice
//! written by hand. Then:
//! - an enrolled pod and its Service appear in istiod-rs's served state
//!   (`/debug/config_dump`, from loopback) with the pod's identity, and the
//!   pod reaches a ztunnel's xDS client (TLS, a node agent's bound token);
//! - an AuthorizationPolicy appears as an authorization, and istiod-rs's
//!   `ZtunnelAccepted` condition lands on the object by server-side apply
//!   (`UnsupportedValue`, naming the value, on a bad one stored before
//!   istiod-rs ran);
//! - Gateway API CRDs are not installed: istiod-rs becomes ready all the
//!   same; installed later (standard channel, pinned), the kinds are picked
//!   up and istiod-rs's route status lands on an HTTPRoute;
//! - the CA signs a certificate for a caller presenting a pod-bound
//!   TokenRequest token (audience `istio-ca`) and refuses a forged token and
//!   one for another audience;
//! - the API server calls the webhook, which refuses a policy the mesh could
//!   only enforce more strictly than written, at `kubectl apply`;
//! - our PeerAuthentication CRD's schema is one the API server enforces;
//! - a deleted pod is unhealthy while terminating and gone once its
//!   deletion is confirmed.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::SpiffeId;
use e2e::binaries::Binaries;
use e2e::kube::{KubeRun, Kubectl, register_node};
use e2e::privilege;
use e2e::process::ProcessSpec;
use proxy_core::identity::{CaClient, CertificateRequest, CertificateSigner, ControlPlane};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);
const POD_IP: &str = "10.244.0.5";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
  namespace: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web}
spec:
  nodeName: node0
  serviceAccountName: web
  containers:
    - name: echo
      image: istio-rs/echo
      ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
    - name: http
      port: 80
      targetPort: 8080
"#;

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: shop
spec:
  action: DENY
  rules:
    - from:
        - source:
            namespaces: ["legacy"]
"#;

/// An HTTPRoute bound to the `web` Service (GAMMA): an L7 rule.
const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: shop
spec:
  parentRefs:
    - group: ""
      kind: Service
      name: web
      port: 80
  rules:
    - backendRefs:
        - name: web
          port: 80
"#;

/// The node agents of node0 and node1 (pods of istio-system/ztunnel, the
/// service account istiod-rs trusts to ask for its node's pods).
const ZTUNNELS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: ztunnel
  namespace: istio-system
---
apiVersion: v1
kind: Pod
metadata:
  name: ztunnel-node0
  namespace: istio-system
spec:
  nodeName: node0
  serviceAccountName: ztunnel
  hostNetwork: true
  containers: [{name: istio-proxy, image: istio-rs/ztunnel}]
---
apiVersion: v1
kind: Pod
metadata:
  name: ztunnel-node1
  namespace: istio-system
spec:
  nodeName: node1
  serviceAccountName: ztunnel
  hostNetwork: true
  containers: [{name: istio-proxy, image: istio-rs/ztunnel}]
"#;

/// A policy with a port the mesh cannot read: enforced more strictly than
/// written, so the webhook refuses it.
fn bad_policy(name: &str) -> String {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
    })
    .to_string()
}

/// Where the API server finds the `istiod` Service's webhook port: the
/// control plane's fabric address, where istiod-rs listens (until
/// istiod-rs runs as a pod whose endpoints the controllers write).
fn istiod_endpoints(address: &str) -> String {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": "istiod-e2e", "namespace": "istio-system",
            "labels": {
                "kubernetes.io/service-name": "istiod",
                "endpointslice.kubernetes.io/managed-by": "e2e.istio-rs.local",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "https-webhook", "port": 15017, "protocol": "TCP"}],
    })
    .to_string()
}

/// The pod's status as a kubelet reports a running, ready pod.
fn pod_running(host_ip: &str) -> Value {
    let now = e2e::kube::now_rfc3339();
    let condition = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    json!({"status": {
        "phase": "Running",
        "hostIP": host_ip,
        "podIP": POD_IP,
        "podIPs": [{"ip": POD_IP}],
        "startTime": now,
        "conditions": [condition("PodScheduled"), condition("Initialized"),
                       condition("ContainersReady"), condition("Ready")],
    }})
}

/// istiod-rs's served state (`/debug/config_dump`, from loopback).
fn served(kube: &KubeRun) -> Value {
    let resp = e2e::http::get(
        kube.control_plane.netns(),
        api::ports::ISTIOD_MONITORING,
        "/debug/config_dump",
        Duration::from_secs(10),
    )
    .expect("GET /debug/config_dump");
    assert_eq!(resp.status, 200, "{}", resp.body);
    serde_json::from_str(&resp.body).expect("config_dump is JSON")
}

/// Waits until `find` picks something out of the served state.
fn wait_served(kube: &KubeRun, what: &str, find: impl Fn(&Value) -> Option<Value>) -> Value {
    e2e::kube::kubectl::wait_until(what, PATIENCE, || Ok(find(&served(kube))))
        .unwrap_or_else(|e| panic!("{e}\nserved: {}", served(kube)))
}

fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// A CSR for `identity` (rcgen, P-256) as a proxy sends it.
fn csr_for(identity: &SpiffeId) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.to_string().try_into().unwrap(),
    )];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Asks istiod-rs's CA (TLS, port 15012 at the fabric address) for a
/// certificate for `identity`, presenting `token`; `impersonate`: as a node
/// agent asking for a pod of its node.
fn sign(
    kube: &KubeRun,
    root: &Path,
    token: &str,
    identity: &SpiffeId,
    impersonate: bool,
) -> Result<Vec<String>, tonic::Status> {
    let dir = kube.run.dir().join("ca-client");
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join(format!("token-{}", rand_suffix()));
    std::fs::write(&token_file, token).unwrap();
    let roots = proxy_core::tls::load_pem_certificates(root).expect("the mesh root is PEM");
    let address = SocketAddr::from((
        kube.topology.plan.control_plane_ip(),
        api::ports::ISTIOD_TLS,
    ));
    let request = CertificateRequest {
        identity: identity.clone(),
        csr_pem: csr_for(identity),
        validity: Duration::from_secs(3600),
        impersonate,
    };
    kube.control_plane
        .netns()
        .block_on(move || async move {
            let ca = CaClient::new(
                &ControlPlane::tls(address.to_string(), roots).with_token_path(&token_file),
            )
            .expect("a CA client");
            ca.sign(request).await
        })
        .expect("enter the control-plane namespace")
}

/// Subscribes to istiod-rs's delta xDS (TLS, 15012) as a ztunnel does,
/// presenting `token`, and waits for the workload at `ip`: its namespace
/// and SPIFFE identity as the proxy receives them.
fn xds_workload(kube: &KubeRun, root: &Path, token: &str, ip: &str) -> (String, String) {
    use proxy_core::store::WorkloadStore;
    use proxy_core::xds::{XdsClient, XdsConfig, handlers};
    let token_file = kube.run.dir().join(format!("xds-token-{}", rand_suffix()));
    std::fs::write(&token_file, token).unwrap();
    let roots = proxy_core::tls::load_pem_certificates(root).expect("the mesh root is PEM");
    let address = SocketAddr::from((
        kube.topology.plan.control_plane_ip(),
        api::ports::ISTIOD_TLS,
    ));
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let node_ip = kube.topology.nodes[0].ip.into();
    kube.control_plane
        .netns()
        .block_on(move || async move {
            let plane = ControlPlane::tls(address.to_string(), roots).with_token_path(&token_file);
            let config = XdsConfig::new(proxy_core::xds::ztunnel_node_id(
                node_ip,
                "ztunnel-node0",
                "istio-system",
            ));
            let store = WorkloadStore::new();
            let client = handlers::subscribe_store(
                XdsClient::new(plane.channel().expect("an xDS channel"), config),
                &store,
            )
            .with_metadata(plane.xds_metadata());
            let status = client.status();
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(client.run(stop.clone()));
            let found = tokio::time::timeout(PATIENCE, async {
                let mut changes = store.subscribe();
                loop {
                    if let Some(w) = store.snapshot().workload_by_address("", ip) {
                        return (w.namespace.clone(), w.identity.to_string());
                    }
                    changes.changed().await.expect("the store is alive");
                }
            })
            .await;
            stop.cancel();
            found.unwrap_or_else(|_| panic!("no workload at {ip} over xDS: {:?}", status.current()))
        })
        .expect("enter the control-plane namespace")
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The URI SAN of a PEM certificate.
fn spiffe_of(pem: &str) -> String {
    let der = proxy_core::tls::parse_pem_certificates("the leaf", pem.as_bytes())
        .unwrap()
        .remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap()
}

/// A TokenRequest token of the pod's service account, bound to the pod.
fn token_for(kubectl: &Kubectl, audience: &str, pod: &Value) -> String {
    let account = pod["spec"]["serviceAccountName"].as_str().unwrap();
    let namespace = pod["metadata"]["namespace"].as_str().unwrap();
    kubectl
        .run(&[
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--audience",
            audience,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod["metadata"]["name"].as_str().unwrap(),
            "--bound-object-uid",
            pod["metadata"]["uid"].as_str().unwrap(),
        ])
        .expect("TokenRequest")
        .trim()
        .to_string()
}

#[test]
fn kube_istiod() {
    if !privilege::enter_for_test() {
        return;
    }
    let istiod_bin = Binaries::default()
        .get("istiod-rs", "istiod-rs")
        .expect("istiod-rs builds");
    let kube = KubeRun::start(1).expect("the control plane starts");
    let kubectl = kube.control_plane.kubectl();
    let cp_ip = kube.topology.plan.control_plane_ip().to_string();
    let node_ip = kube.topology.nodes[0].ip.to_string();

    // What an install brings: the CRDs, istiod's namespace, the webhook's
    // configuration (and the endpoint istiod-rs serves it at).
    kubectl
        .apply_crds(&workspace().join("manifests/crds"))
        .expect("our CRDs apply and are established");
    kubectl
        .apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n")
        .expect("istio-system");
    let webhook = workspace().join("manifests/install/istiod-validating-webhook.yaml");
    kubectl
        .run(&["apply", "-f", webhook.to_str().unwrap()])
        .expect("the webhook configuration applies");
    // istiod's Service account, RBAC and Service as installed; not its
    // Deployment: istiod-rs runs here as a process of the test.
    let istiod = std::fs::read_to_string(workspace().join("manifests/install/istiod.yaml"))
        .expect("manifests/install/istiod.yaml");
    let without_deployment: Vec<&str> = istiod
        .split("\n---\n")
        .filter(|doc| !doc.lines().any(|line| line == "kind: Deployment"))
        .collect();
    kubectl
        .apply(&without_deployment.join("\n---\n"))
        .expect("istiod's service account, RBAC and Service apply");
    kubectl
        .apply(&istiod_endpoints(&cp_ip))
        .expect("istiod's endpoint");

    // The cluster: a node, an enrolled namespace with a pod and a Service.
    register_node(&kubectl, "node0").expect("node0 registers");
    kubectl.apply(APPS).expect("the app applies");
    let pod = kubectl
        .patch_status("pod", Some("shop"), "web-0", &pod_running(&node_ip))
        .expect("the pod's status, as a kubelet writes it");
    let service = kubectl
        .get("service", Some("shop"), "web")
        .unwrap()
        .expect("Service web");
    let vip = service["spec"]["clusterIP"].as_str().unwrap().to_string();

    // A bad policy stored while nothing answered the webhook (its
    // failurePolicy is still Ignore): istiod-rs reports the value in the
    // policy's status.
    kubectl
        .apply(&bad_policy("bad-port-early"))
        .expect("stored while istiod-rs is not running");

    // istiod-rs in Kubernetes mode.
    let data_dir = kube.run.dir().join("istiod");
    let spec = ProcessSpec::new("istiod-rs", &istiod_bin)
        .arg("--data-dir")
        .arg(&data_dir)
        .env("KUBECONFIG", kube.control_plane.admin_kubeconfig())
        .env("RUST_LOG", "info,istiod_rs=debug");
    let istiod = kube
        .run
        .spawn(&spec, kube.control_plane.netns())
        .expect("istiod-rs starts");
    e2e::kube::kubectl::wait_until("istiod-rs /ready", PATIENCE, || {
        if let Some(status) = kube.run.exited(&istiod) {
            panic!(
                "istiod-rs exited ({status}):\n{}",
                e2e::process::log_tail(&istiod.log, 40)
            );
        }
        let ready = e2e::http::get(
            kube.control_plane.netns(),
            api::ports::ISTIOD_MONITORING,
            "/ready",
            Duration::from_secs(5),
        );
        Ok(ready.ok().filter(|r| r.status == 200))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", e2e::process::log_tail(&istiod.log, 40)));

    // The enrolled pod and its Service, with the pod's identity.
    let workload = wait_served(&kube, "workload web-0", |s| {
        s["workloads"]
            .as_object()?
            .values()
            .find(|w| w["name"] == "web-0")
            .cloned()
    });
    assert_eq!(workload["namespace"], "shop", "{workload}");
    assert_eq!(workload["serviceAccount"], "web", "{workload}");
    // The default trust domain is left out of the workload.
    assert!(workload["trustDomain"].is_null(), "{workload}");
    assert_eq!(workload["node"], "node0", "{workload}");
    assert_eq!(workload["addresses"], json!([POD_IP]), "{workload}");
    let service = wait_served(&kube, "service web", |s| {
        s["services"]
            .as_object()?
            .values()
            .find(|v| v["name"] == "web" && v["namespace"] == "shop")
            .cloned()
    });
    assert_eq!(
        service["hostname"], "web.shop.svc.cluster.local",
        "{service}"
    );
    assert!(service.to_string().contains(&vip), "VIP {vip}: {service}");
    let workload = wait_served(&kube, "web-0 as an endpoint of web", |s| {
        s["workloads"]
            .as_object()?
            .values()
            .find(|w| w["name"] == "web-0" && !w["services"].is_null())
            .cloned()
    });
    assert!(
        workload["services"]
            .to_string()
            .contains("web.shop.svc.cluster.local"),
        "{workload}"
    );

    // An AuthorizationPolicy: served, and its status written back.
    kubectl.apply(POLICY).expect("the policy applies");
    wait_served(&kube, "authorization shop/deny-legacy", |s| {
        s["authorizations"]
            .as_object()?
            .values()
            .find(|a| a["name"] == "deny-legacy" && a["namespace"] == "shop")
            .cloned()
    });
    let accepted = kubectl
        .wait_for("ZtunnelAccepted on deny-legacy", PATIENCE, |k| {
            let p = k.get("authorizationpolicy", Some("shop"), "deny-legacy")?;
            Ok(p.and_then(|p| condition(&p, "ZtunnelAccepted").cloned()))
        })
        .expect("istiod-rs writes the policy's status");
    assert_eq!(accepted["status"], "True", "{accepted}");
    let policy = kubectl
        .json(&[
            "get",
            "authorizationpolicy",
            "-n",
            "shop",
            "deny-legacy",
            "--show-managed-fields",
        ])
        .unwrap();
    let managers: Vec<&str> = policy["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status" && m["operation"] == "Apply")
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, vec!["istiod-rs-status"], "{policy}");
    let unsupported = kubectl
        .wait_for("ZtunnelAccepted on bad-port-early", PATIENCE, |k| {
            let p = k.get("authorizationpolicy", Some("shop"), "bad-port-early")?;
            Ok(p.and_then(|p| condition(&p, "ZtunnelAccepted").cloned()))
        })
        .expect("istiod-rs writes the bad policy's status");
    // Served in a stricter form (the rule matches nothing), so still True.
    assert_eq!(unsupported["status"], "True", "{unsupported}");
    assert_eq!(unsupported["reason"], "UnsupportedValue", "{unsupported}");
    assert!(
        unsupported["message"]
            .as_str()
            .unwrap_or("")
            .contains("http"),
        "the message names the value: {unsupported}"
    );

    // The Gateway API CRDs the install ships (standard channel, pinned:
    // manifests/crds/gateway-api, byte for byte the module's of the
    // recipe's release) installed while istiod-rs runs: it picks the kinds
    // up once they are served, and its route status lands on an HTTPRoute
    // bound to the Service (which no waypoint serves yet).
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds/gateway-api");
    let module = &kube.control_plane.config.binaries.gateway_api_crds;
    let yaml_files = |dir: &std::path::Path| -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).expect("read a CRD file"))
            })
            .collect();
        files.sort();
        files
    };
    assert!(
        yaml_files(&shipped) == yaml_files(module),
        "{} differs from the Gateway API module's standard channel in {}: update both together",
        shipped.display(),
        module.display()
    );
    kubectl
        .apply_crds(&shipped)
        .expect("the Gateway API CRDs apply and are established");
    kubectl.apply(ROUTE).expect("the HTTPRoute applies");
    let parent = kubectl
        .wait_for(
            "istiod-rs's parent status on HTTPRoute web",
            PATIENCE,
            |k| {
                let route = k.get("httproute", Some("shop"), "web")?;
                Ok(route.and_then(|r| {
                    r["status"]["parents"]
                        .as_array()?
                        .iter()
                        .find(|p| p["controllerName"] == "istio.io/mesh-controller")
                        .cloned()
                }))
            },
        )
        .expect("istiod-rs writes the route's status");
    assert_eq!(parent["parentRef"]["kind"], "Service", "{parent}");
    assert_eq!(parent["parentRef"]["name"], "web", "{parent}");
    assert!(
        condition(&json!({"status": parent}), "Accepted").is_some(),
        "{parent}"
    );

    // The CA: a pod-bound token for audience istio-ca gets the pod's identity.
    let root = data_dir.join("root-cert.pem");
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let chain = sign(
        &kube,
        &root,
        &token_for(&kubectl, "istio-ca", &pod),
        &web,
        false,
    )
    .expect("the CA signs for a token the API server vouches for");
    assert_eq!(
        spiffe_of(&chain[0]),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    // ... and refuses a forged token and one for another audience.
    let token = token_for(&kubectl, "istio-ca", &pod);
    let forged = format!("{}.AAAA", token.rsplit_once('.').unwrap().0);
    let refused = sign(&kube, &root, &forged, &web, false).expect_err("a forged token is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let other_audience = token_for(
        &kubectl,
        "https://kubernetes.default.svc.cluster.local",
        &pod,
    );
    let refused = sign(&kube, &root, &other_audience, &web, false)
        .expect_err("a token for another audience is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // A node agent (ztunnel's service account, its pod's bound token) gets
    // the certificate of a pod on its own node, and not of one elsewhere.
    register_node(&kubectl, "node1").expect("node1 registers");
    kubectl.apply(ZTUNNELS).expect("the ztunnel pods apply");
    let ztunnel = |name: &str| {
        kubectl
            .get("pod", Some("istio-system"), name)
            .unwrap()
            .expect("the ztunnel pod exists")
    };
    let on_node0 = token_for(&kubectl, "istio-ca", &ztunnel("ztunnel-node0"));
    let chain =
        e2e::kube::kubectl::wait_until("ztunnel-node0 in istiod-rs's state", PATIENCE, || {
            Ok(sign(&kube, &root, &on_node0, &web, true).ok())
        })
        .expect("the node agent of web-0's node gets web's certificate");
    assert_eq!(
        spiffe_of(&chain[0]),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    // The same node agent's proxy over xDS: the pod, with its identity.
    assert_eq!(
        xds_workload(&kube, &root, &on_node0, POD_IP),
        (
            "shop".to_string(),
            "spiffe://cluster.local/ns/shop/sa/web".to_string()
        )
    );
    let on_node1 = token_for(&kubectl, "istio-ca", &ztunnel("ztunnel-node1"));
    let refused =
        sign(&kube, &root, &on_node1, &web, true).expect_err("a node agent elsewhere is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // The webhook: istiod-rs fills in the caBundle and, once the API server
    // is seen reaching it, turns failurePolicy to Fail; then a policy the
    // mesh cannot read is refused at apply, naming the field.
    kubectl
        .wait_for("the webhook's failurePolicy to turn Fail", PATIENCE, |k| {
            let c = k.get(
                "validatingwebhookconfiguration",
                None,
                "istio-validator-istio-system",
            )?;
            Ok(c.filter(|c| c["webhooks"][0]["failurePolicy"] == "Fail"))
        })
        .expect("istiod-rs takes over its webhook configuration");
    let refused = kubectl
        .apply(&bad_policy("bad-port"))
        .expect_err("the bad policy is refused");
    let message = refused.to_string();
    assert!(message.contains("validation.istio.io"), "{message}");
    assert!(message.contains("ports"), "{message}");
    assert!(
        kubectl
            .get("authorizationpolicy", Some("shop"), "bad-port")
            .unwrap()
            .is_none(),
        "a refused policy is not stored"
    );

    // Our CRD's schema, as the API server enforces it: portLevelMtls keys
    // are port numbers.
    let refused = kubectl
        .apply(&peer_authentication("http"))
        .expect_err("a port name is refused");
    assert!(refused.to_string().contains("port numbers"), "{refused}");
    kubectl
        .apply(&peer_authentication("8080"))
        .expect("a port number is accepted");

    // A pod being deleted is no longer a healthy endpoint; once its
    // kubelet confirms the deletion (grace period 0), it is gone.
    kubectl
        .run(&["delete", "pod", "-n", "shop", "web-0", "--wait=false"])
        .expect("delete web-0");
    wait_served(&kube, "terminating web-0 to be unhealthy", |s| {
        s["workloads"]
            .as_object()?
            .values()
            .find(|w| w["name"] == "web-0" && w["status"] == "UNHEALTHY")
            .cloned()
    });
    kubectl
        .run(&[
            "delete",
            "pod",
            "-n",
            "shop",
            "web-0",
            "--grace-period=0",
            "--force",
        ])
        .expect("confirm web-0's deletion, as its kubelet would");
    wait_served(&kube, "web-0 to be gone", |s| {
        let gone = !s["workloads"]
            .as_object()?
            .values()
            .any(|w| w["name"] == "web-0");
        gone.then_some(Value::Null)
    });
}

fn peer_authentication(port: &str) -> String {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "web-ports", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "portLevelMtls": {port: {"mode": "STRICT"}},
        },
    })
    .to_string()
}
