//! Status conditions: what each policy and route carries after a
//! translation ([`status::desired`], upstream's condition types and
//! reasons), and how it is written: through the status subresource with
//! server-side apply (the exact requests, over a mock API server), or as
//! files under `<config-dir>/generated/status/` that the directory source
//! never reads back. A status write that fails or hangs never holds up the
//! xDS pipeline.

use crate::support::kube_mock::{Seen, next};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::manifest::{Kind, Object, ObjectKey};
use http::{Request, Response};
use istiod_rs::index::{self, MeshConfig, PolicyRef};
use istiod_rs::pipeline::{self, Debounce, PipelineMetrics};
use istiod_rs::state::directory::DirectorySource;
use istiod_rs::state::{ClusterState, Store};
use istiod_rs::status::directory::DirectoryStatus;
use istiod_rs::status::kube::KubeStatus;
use istiod_rs::status::{self, Clock, ObjectStatus, Sink, StatusConfig, StatusMetrics, Statuses};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fine, namespace: shop, generation: 3}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [shop]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: shop, generation: 1}
spec:
  rules: [{to: [{operation: {ports: ["http"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop, generation: 2}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: two-targets, namespace: shop}
spec:
  targetRefs:
  - {kind: Service, group: "", name: web}
  - {kind: Service, group: "", name: gone}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: typo, namespace: shop}
spec: {mtls: {mode: STRCT}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules: [{issuer: https://issuer.example}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-route, namespace: shop, generation: 4}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}, {name: missing, port: 80}]}]
"#;

fn objects(yaml: &str) -> Vec<Object> {
    api::manifest::parse(yaml).unwrap().objects
}

fn desired(yaml: &str) -> Statuses {
    let state = ClusterState::from_objects(objects(yaml));
    let translation = index::translate(&state, &MeshConfig::default());
    status::desired(&state, &translation)
}

#[test]
fn a_namespace_without_waypoints_on_demand_says_so_in_the_status() {
    let opted_out = CLUSTER.replacen(
        "labels: {istio.io/dataplane-mode: ambient}",
        "labels: {istio.io/dataplane-mode: ambient, istio.io/auto-waypoint: disabled}",
        1,
    );
    let s = desired(&opted_out);
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "web-get-only");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("WaypointAccepted", false, "AncestorNotBound")
    );
    assert_eq!(
        message,
        "Service shop/web is not bound to a waypoint, and waypoints on demand are disabled in namespace shop (label istio.io/auto-waypoint: disabled); connections to the endpoints of Service shop/web are denied until a waypoint serves the rule"
    );
}

fn object(kind: Kind, name: &str) -> PolicyRef {
    PolicyRef {
        kind,
        key: ObjectKey::new("shop", name),
    }
}

/// The one condition of a security object: (type, status, reason, message).
fn condition(statuses: &Statuses, kind: Kind, name: &str) -> (String, bool, String, String) {
    let Some(ObjectStatus::Conditions(c)) = statuses.get(&object(kind, name)) else {
        panic!("{kind} {name} has no conditions: {statuses:?}");
    };
    assert_eq!(c.len(), 1, "{c:?}");
    let c = &c[0];
    (
        c.type_.clone(),
        c.status,
        c.reason.clone(),
        c.message.clone(),
    )
}

/// A dry-run policy attached to ztunnel is served (ztunnel evaluates it
/// and logs the outcome): Accepted, saying it is not enforced. One attached
/// to waypoints is neither (waypoints do not evaluate dry runs).
#[test]
fn a_dry_run_policy_says_ztunnel_evaluates_it_without_enforcing_it() {
    let yaml = format!(
        "{CLUSTER}---\n{}",
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: trying-out, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [other]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-trial, namespace: shop, annotations: {istio.io/dry-run: "1"}}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
"#
    );
    let s = desired(&yaml);
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "trying-out");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("ZtunnelAccepted", true, "Accepted")
    );
    assert_eq!(
        message,
        "dry run (istio.io/dry-run): ztunnel evaluates the policy and logs what it would decide, without enforcing it; attached to ztunnel"
    );
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "waypoint-trial");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("WaypointAccepted", false, "UnsupportedValue")
    );
    assert!(
        message.contains("neither enforced nor evaluated"),
        "{message}"
    );
}

#[test]
fn every_policy_gets_upstreams_condition_and_reason() {
    let s = desired(CLUSTER);
    assert_eq!(
        condition(&s, Kind::AuthorizationPolicy, "fine"),
        (
            "ZtunnelAccepted".into(),
            true,
            "Accepted".into(),
            "attached to ztunnel".into()
        )
    );
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "bad-port");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("ZtunnelAccepted", true, "UnsupportedValue")
    );
    assert!(
        message.starts_with("rules[0].to[0].operation.ports[0]: \"http\" is not a port number"),
        "{message}"
    );
    let (t, ok, reason, _) = condition(&s, Kind::AuthorizationPolicy, "audit");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("ZtunnelAccepted", false, "UnsupportedValue")
    );

    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "web-get-only");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("WaypointAccepted", false, "AncestorNotBound")
    );
    assert_eq!(
        message,
        "Service shop/web is not bound to a waypoint yet; istiod-rs is creating waypoint shop/default-waypoint on demand; connections to the endpoints of Service shop/web are denied until a waypoint serves the rule"
    );
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "two-targets");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("WaypointAccepted", false, "Invalid")
    );
    assert!(
        message.contains("Service shop/gone was not found"),
        "{message}"
    );

    let (t, ok, reason, message) = condition(&s, Kind::PeerAuthentication, "typo");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("ZtunnelAccepted", true, "UnsupportedValue")
    );
    assert!(message.contains("enforced as STRICT"), "{message}");
    let (t, ok, reason, message) = condition(&s, Kind::RequestAuthentication, "jwt");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("ZtunnelAccepted", false, "UnsupportedValue")
    );
    assert!(message.contains("are denied"), "{message}");
}

/// DestinationRule and VirtualService carry WaypointAccepted: Accepted as
/// written, PartiallyInvalid naming the fields the waypoint does not
/// honour, Invalid when nothing of the object is served.
#[test]
fn destination_rules_and_virtual_services_say_what_the_waypoint_honours() {
    let networking = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-lb, namespace: shop, generation: 2}
spec:
  host: web
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-tls, namespace: shop}
spec:
  host: api
  trafficPolicy: {tls: {mode: SIMPLE}, loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external, namespace: shop}
spec:
  host: example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-routes, namespace: shop}
spec:
  hosts: [api]
  http: [{corsPolicy: {}, route: [{destination: {host: api}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-routes, namespace: shop}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80}]
"#;
    let statuses = desired(&format!("{CLUSTER}{networking}"));
    let (type_, status, reason, message) = condition(&statuses, Kind::DestinationRule, "web-lb");
    assert_eq!(
        (type_.as_str(), status, reason.as_str()),
        ("WaypointAccepted", true, "Accepted")
    );
    assert!(message.contains("translated"), "{message}");
    let (_, status, reason, message) = condition(&statuses, Kind::DestinationRule, "web-tls");
    assert_eq!((status, reason.as_str()), (true, "PartiallyInvalid"));
    assert!(message.contains("spec.trafficPolicy.tls"), "{message}");
    let (_, status, reason, message) = condition(&statuses, Kind::DestinationRule, "external");
    assert_eq!((status, reason.as_str()), (false, "Invalid"));
    assert!(message.contains("spec.host"), "{message}");
    let (_, status, reason, message) = condition(&statuses, Kind::VirtualService, "api-routes");
    assert_eq!((status, reason.as_str()), (true, "PartiallyInvalid"));
    assert!(message.contains("spec.http[0].corsPolicy"), "{message}");
    // web has an HTTPRoute (web-route): the VirtualService is not used.
    let (_, status, reason, message) = condition(&statuses, Kind::VirtualService, "web-routes");
    assert_eq!((status, reason.as_str()), (false, "Invalid"));
    assert!(message.contains("HTTPRoute shop/web-route"), "{message}");
    let Some(ObjectStatus::Conditions(c)) = statuses.get(&object(Kind::DestinationRule, "web-lb"))
    else {
        panic!()
    };
    assert_eq!(c[0].observed_generation, Some(2));
}

#[test]
fn a_route_gets_one_parent_entry_per_service_parent() {
    let s = desired(CLUSTER);
    let Some(ObjectStatus::Parents(parents)) = s.get(&object(Kind::HttpRoute, "web-route")) else {
        panic!("no parents: {s:?}");
    };
    assert_eq!(parents.len(), 1);
    let p = &parents[0];
    assert_eq!(
        serde_json::to_value(&p.parent_ref).unwrap(),
        json!({"group": "", "kind": "Service", "name": "web", "namespace": "shop", "port": 80})
    );
    let conditions: Vec<_> = p
        .conditions
        .iter()
        .map(|c| {
            (
                c.type_.as_str(),
                c.status,
                c.reason.as_str(),
                c.observed_generation,
            )
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("Accepted", false, "UnsupportedValue", Some(4)),
            ("ResolvedRefs", false, "BackendNotFound", Some(4)),
        ]
    );
    assert_eq!(
        p.conditions[1].message,
        "Service shop/missing was not found"
    );
}

/// `orders` is bound to the ready waypoint `ready`, `payments` to `starting`
/// whose only instance is not ready yet.
/// Waypoint `shop/ready` (a Gateway with its address) and its one ready
/// pod, for the fixtures below.
macro_rules! ready_waypoint {
    () => {
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ready, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: Hostname, value: ready.shop.svc.cluster.local}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ready-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: ready}}
spec: {nodeName: node-a, containers: [{name: w, image: w}]}
status: {phase: Running, podIP: 10.9.0.100, conditions: [{type: Ready, status: "True"}]}
---
"#
    };
}

const WAYPOINTS: &str = concat!(
    r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
"#,
    ready_waypoint!(),
    r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: starting, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: Hostname, value: starting.shop.svc.cluster.local}]}
---
apiVersion: v1
kind: Pod
metadata: {name: starting-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: starting}}
spec: {nodeName: node-a, containers: [{name: w, image: w}]}
status: {phase: Running, podIP: 10.9.0.101, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop, labels: {istio.io/use-waypoint: ready}}
spec: {selector: {app: orders}, clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: shop, labels: {istio.io/use-waypoint: starting}}
spec: {selector: {app: payments}, clusterIP: 10.96.0.21, ports: [{name: http, port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-get, namespace: shop, generation: 1}
spec:
  targetRefs: [{kind: Service, group: "", name: orders}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-get, namespace: shop, generation: 1}
spec:
  targetRefs: [{kind: Service, group: "", name: payments}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: orders-jwt, namespace: shop, generation: 1}
spec:
  targetRefs: [{kind: Service, group: "", name: orders}]
  jwtRules: [{issuer: https://issuer.example, jwksUri: https://issuer.example/keys}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orders, namespace: shop, generation: 2}
spec:
  parentRefs: [{group: "", kind: Service, name: orders, port: 80}]
  rules:
  - backendRefs: [{name: orders, port: 80}, {name: orders, namespace: other, port: 80}]
  - filters: [{type: CORS, cors: {allowOrigins: ["https://example.com"]}}]
    backendRefs: [{name: orders, port: 80}]
"#
);

#[test]
fn rules_served_by_a_ready_waypoint_are_accepted_and_those_of_a_starting_one_are_not() {
    let s = desired(WAYPOINTS);
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "orders-get");
    assert_eq!(
        (t.as_str(), ok, reason.as_str(), message.as_str()),
        (
            "WaypointAccepted",
            true,
            "Accepted",
            "Service.core:shop/orders: bound to shop/ready"
        )
    );
    let (t, ok, reason, message) = condition(&s, Kind::AuthorizationPolicy, "payments-get");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("WaypointAccepted", false, "Invalid")
    );
    assert_eq!(
        message,
        "Service shop/payments is bound to waypoint shop/starting, which has no ready instance yet; connections to the endpoints of Service shop/payments are denied until a waypoint serves the rule"
    );
    // Served, with the keys it cannot fetch named.
    let (t, ok, reason, message) = condition(&s, Kind::RequestAuthentication, "orders-jwt");
    assert_eq!(
        (t.as_str(), ok, reason.as_str()),
        ("WaypointAccepted", true, "Accepted")
    );
    assert!(
        message.contains("spec.jwtRules[0].jwksUri: the JWKS of https://issuer.example/keys is unavailable: not fetched yet"),
        "{message}"
    );

    let Some(ObjectStatus::Parents(parents)) = s.get(&object(Kind::HttpRoute, "orders")) else {
        panic!("no parents: {s:?}");
    };
    let [p] = parents.as_slice() else {
        panic!("{parents:?}")
    };
    let c: Vec<_> = p
        .conditions
        .iter()
        .map(|c| {
            (
                c.type_.as_str(),
                c.status,
                c.reason.as_str(),
                c.message.as_str(),
            )
        })
        .collect();
    assert_eq!(
        c,
        [
            (
                "Accepted",
                true,
                "Accepted",
                "served by waypoint shop/ready; spec.rules[0].backendRefs[1]: Service other/orders is in another namespace: that needs a ReferenceGrant, which istiod-rs does not read; the backend's share of the traffic is answered 500, which is stricter than written; spec.rules[1].filters[0].type: filter CORS is not supported by the waypoint; requests matching the rule are answered 500, which is stricter than written"
            ),
            (
                "ResolvedRefs",
                false,
                "RefNotPermitted",
                "Service other/orders is in another namespace: ReferenceGrants are not supported by istiod-rs"
            ),
        ]
    );
}

// --- Kubernetes mode -------------------------------------------------------

fn fixed_clock() -> Clock {
    Arc::new(|| "2025-01-02T03:04:05Z".to_string())
}

/// A store holding `yaml`, and the statuses it should carry.
fn cluster(yaml: &str) -> (Arc<Store>, Statuses) {
    let store = Store::new();
    store.update(|s| {
        for o in objects(yaml) {
            s.apply(o);
        }
    });
    let statuses = {
        let state = store.read();
        let translation = index::translate(&state, &MeshConfig::default());
        status::desired(&state, &translation)
    };
    (store, statuses)
}

fn ok(body: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn failure(code: u16) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "InternalError", "message": "etcd is sad", "code": code,
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

const TARGETED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop, generation: 2, resourceVersion: "7"}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
status:
  conditions:
  - {type: Reconciled, status: "True", reason: Done, message: another controller's}
  - {type: ZtunnelAccepted, status: "True", reason: Accepted, message: attached to ztunnel, lastTransitionTime: "2024-01-01T00:00:00Z"}
"#;

#[tokio::test]
async fn kubernetes_statuses_are_applied_to_the_status_subresource_only_when_they_change() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (store, statuses) = cluster(TARGETED);
    let policy = object(Kind::AuthorizationPolicy, "web-get-only");
    let status = statuses[&policy].clone();
    let mut sink = KubeStatus::new(client, store.clone(), fixed_clock());

    let write = tokio::spawn(async move {
        let written = sink.apply(&policy, &status).await;
        (sink, policy, status, written)
    });
    let (seen, respond) = next(&mut handle).await;
    let Seen {
        method,
        path,
        query,
        content_type,
        body,
    } = seen;
    assert_eq!(method, "PATCH");
    assert_eq!(
        path,
        "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/web-get-only/status"
    );
    assert_eq!(
        query,
        BTreeMap::from([
            ("fieldManager".to_string(), "istiod-rs-status".to_string()),
            ("force".to_string(), "true".to_string()),
        ])
    );
    assert_eq!(content_type, "application/apply-patch+yaml");
    // The other controller's condition is applied back as it is; ours is
    // replaced (the policy moved to a waypoint), with a new transition time.
    assert_eq!(
        body,
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "web-get-only", "namespace": "shop"},
            "status": {"conditions": [
                {"type": "Reconciled", "status": "True", "reason": "Done", "message": "another controller's"},
                {
                    "type": "WaypointAccepted", "status": "False", "reason": "AncestorNotBound",
                    "message": "Service shop/web is not bound to a waypoint; connections to the endpoints of Service shop/web are denied until a waypoint serves the rule",
                    "observedGeneration": 2,
                    "lastTransitionTime": "2025-01-02T03:04:05Z",
                },
            ]},
        })
    );
    respond.send_response(ok(&body));
    let (mut sink, policy, status, written) = write.await.unwrap();
    assert!(written.unwrap());

    // Until the watch brings the new version, the same status is not
    // written again.
    assert!(!sink.apply(&policy, &status).await.unwrap());
    // Once the object carries it, nothing is written either.
    let mut applied: Value = body.clone();
    applied["metadata"]["resourceVersion"] = json!("8");
    applied["spec"] = json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}]});
    store.update(|s| {
        s.apply(Object::AuthorizationPolicy(
            serde_json::from_value(applied).unwrap(),
        ))
    });
    assert!(!sink.apply(&policy, &status).await.unwrap());
    // No request was made.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), handle.next_request())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn route_parents_of_other_controllers_are_kept_and_ours_replaced() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (store, statuses) = cluster(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api, namespace: shop, generation: 5}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
status:
  parents:
  - parentRef: {name: public}
    controllerName: example.net/gateway
    conditions: [{type: Accepted, status: "True", reason: Accepted, message: ok, lastTransitionTime: "2024-01-01T00:00:00Z"}]
  - parentRef: {group: "", kind: Service, name: api, namespace: shop}
    controllerName: istio.io/mesh-controller
    conditions:
    - {type: Accepted, status: "False", reason: UnsupportedValue, message: old words, lastTransitionTime: "2024-06-01T00:00:00Z", observedGeneration: 4}
"#,
    );
    let route = object(Kind::GrpcRoute, "api");
    let status = statuses[&route].clone();
    let mut sink = KubeStatus::new(client, store, fixed_clock());
    let write = tokio::spawn(async move { sink.apply(&route, &status).await });
    let (
        Seen {
            method, path, body, ..
        },
        respond,
    ) = next(&mut handle).await;
    assert_eq!(method, "PATCH");
    assert_eq!(
        path,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/grpcroutes/api/status"
    );
    assert_eq!(
        body["status"],
        json!({"parents": [
            {
                "parentRef": {"name": "public"},
                "controllerName": "example.net/gateway",
                "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
            },
            {
                "parentRef": {"group": "", "kind": "Service", "name": "api", "namespace": "shop"},
                "controllerName": "istio.io/mesh-controller",
                "conditions": [
                    {
                        "type": "Accepted", "status": "False", "reason": "NoMatchingParent",
                        "message": "Service shop/api was not found", "observedGeneration": 5,
                        // Still False: the time it turned False is kept.
                        "lastTransitionTime": "2024-06-01T00:00:00Z",
                    },
                    {
                        "type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
                        "message": "all references resolved", "observedGeneration": 5,
                        "lastTransitionTime": "2025-01-02T03:04:05Z",
                    },
                ],
            },
        ]})
    );
    respond.send_response(ok(&body));
    assert!(write.await.unwrap().unwrap());
}

#[tokio::test]
async fn failed_writes_are_counted_and_retried() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (store, statuses) = cluster(TARGETED);
    let metrics = Arc::new(StatusMetrics::default());
    let (tx, mut rx) = watch::channel(Arc::new(statuses));
    rx.mark_changed();
    let task = status::spawn(
        rx,
        Sink::Kube(KubeStatus::new(client, store, fixed_clock())),
        StatusConfig {
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
        },
        metrics.clone(),
    );
    let (
        Seen {
            path, body: first, ..
        },
        respond,
    ) = next(&mut handle).await;
    respond.send_response(failure(500));
    let (
        Seen {
            path: again,
            body: second,
            ..
        },
        respond,
    ) = next(&mut handle).await;
    assert_eq!((path.as_str(), &first), (again.as_str(), &second));
    respond.send_response(ok(&second));
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    // Counted once each.
    for _ in 0..100 {
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        if text.contains("result=\"ok\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        text.contains(
            "istiod_status_writes_total{kind=\"AuthorizationPolicy\",result=\"error\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("istiod_status_writes_total{kind=\"AuthorizationPolicy\",result=\"ok\"} 1"),
        "{text}"
    );
    drop(tx);
    task.await.unwrap();
}

#[tokio::test]
async fn a_hanging_status_write_never_holds_up_the_xds_pipeline() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let store = Store::new();
    let (outputs, pipeline) = pipeline::spawn(
        store.clone(),
        MeshConfig::default(),
        Debounce::default(),
        Arc::new(PipelineMetrics::default()),
    );
    let writer = status::spawn(
        outputs.statuses,
        Sink::Kube(KubeStatus::new(client, store.clone(), fixed_clock())),
        StatusConfig::default(),
        Arc::new(StatusMetrics::default()),
    );
    let mut snapshots = outputs.snapshots;
    store.update(|s| {
        for o in objects(TARGETED) {
            s.apply(o);
        }
    });
    store.mark_synced();
    // The status write arrives and is never answered...
    let (_, held) = next(&mut handle).await;
    // ...while the pipeline keeps publishing: a new pod reaches the snapshot.
    store.update(|s| {
        s.apply(objects(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {nodeName: node-a, containers: [{name: app, image: app}]}\nstatus: {phase: Running, podIP: 10.9.0.1}\n",
        ).remove(0));
    });
    let uid = MeshConfig::default().pod_uid("shop", "web");
    let published = async {
        while !snapshots
            .borrow_and_update()
            .of_type(api::type_url::ADDRESS)
            .contains_key(&uid)
        {
            snapshots.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), published)
        .await
        .expect("a snapshot is published while the status write hangs");
    drop(held);
    pipeline.abort();
    writer.abort();
}

// --- Local mode --------------------------------------------------------------

#[tokio::test]
async fn local_statuses_are_files_that_go_with_their_objects_and_are_not_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("cluster.yaml"), CLUSTER).unwrap();
    // Left by a run before this one, for a policy deleted since.
    let stale = root.join("generated/status/AuthorizationPolicy/shop/deleted.yaml");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "# old\n").unwrap();
    let (tx, rx) = watch::channel(Arc::new(Statuses::new()));
    let sink = DirectoryStatus::new(root);
    let file = sink.path(&object(Kind::AuthorizationPolicy, "bad-port"));
    assert_eq!(
        file,
        root.join("generated/status/AuthorizationPolicy/shop/bad-port.yaml")
    );
    let task = status::spawn(
        rx,
        Sink::Directory(sink),
        StatusConfig::default(),
        Arc::new(StatusMetrics::default()),
    );
    // Nothing is written or removed before the first statuses arrive.
    tokio::task::yield_now().await;
    assert!(stale.exists());
    tx.send_replace(Arc::new(desired(CLUSTER)));
    let route = root.join("generated/status/HTTPRoute/shop/web-route.yaml");
    wait_for(|| file.exists() && route.exists() && !stale.exists()).await;
    let text = std::fs::read_to_string(&file).unwrap();
    let yaml: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(yaml["kind"], "AuthorizationPolicy");
    assert_eq!(
        yaml["metadata"],
        json!({"name": "bad-port", "namespace": "shop"})
    );
    let c = &yaml["status"]["conditions"][0];
    assert_eq!(
        (
            &c["type"],
            &c["status"],
            &c["reason"],
            &c["observedGeneration"]
        ),
        (
            &json!("ZtunnelAccepted"),
            &json!("True"),
            &json!("UnsupportedValue"),
            &json!(1)
        )
    );
    assert!(c.get("lastTransitionTime").is_none(), "{text}");
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| !n.to_string_lossy().starts_with('.')),
        "{names:?}"
    );

    // The directory source reads the cluster, not the status files.
    let mut source = DirectorySource::new(root);
    source.scan();
    let state = source.state();
    assert_eq!(state.count(Kind::AuthorizationPolicy), 5);
    assert!(
        state.authorization_policies[&ObjectKey::new("shop", "bad-port")]
            .status
            .is_none()
    );
    assert!(source.problems().is_empty(), "{:?}", source.problems());

    // The policy goes: so does its file; the others stay.
    let without: String = CLUSTER.replace("name: bad-port", "name: renamed");
    tx.send_replace(Arc::new(desired(&without)));
    wait_for(|| !file.exists()).await;
    assert!(route.exists());
    assert!(
        root.join("generated/status/AuthorizationPolicy/shop/renamed.yaml")
            .exists()
    );
    drop(tx);
    task.await.unwrap();
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fresh, namespace: shop, resourceVersion: "3", creationTimestamp: "2024-01-02T00:00:00Z"}
spec: {hosts: [fresh.example.com], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: renamed, namespace: shop, resourceVersion: "4", creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {hosts: [new.example.com], resolution: DNS}
status:
  conditions:
  - {type: Reconciled, status: "True", reason: Done, message: another controller's}
  addresses:
  - {host: old.example.com, value: 240.240.0.9}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec: {hosts: [p.example.com], resolution: NONE}
"#;

#[tokio::test]
async fn service_entry_vips_are_json_patched_into_status_addresses() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (store, statuses) = cluster(ENTRIES);
    assert!(!statuses.contains_key(&object(Kind::ServiceEntry, "passthrough")));
    let mut sink = KubeStatus::new(client, store.clone(), fixed_clock());
    // The older entry is given addresses first; the host it no longer has
    // loses its address.
    let expected = [
        (
            "renamed",
            json!([
                {"op": "test", "path": "/status/addresses", "value": [{"host": "old.example.com", "value": "240.240.0.9"}]},
                {"op": "replace", "path": "/status/addresses", "value": [
                    {"host": "new.example.com", "value": "240.240.0.1"},
                    {"host": "new.example.com", "value": "2001:2::1"},
                ]},
            ]),
        ),
        (
            "fresh",
            json!([
                {"op": "add", "path": "/status", "value": {"addresses": [
                    {"host": "fresh.example.com", "value": "240.240.0.2"},
                    {"host": "fresh.example.com", "value": "2001:2::2"},
                ]}},
            ]),
        ),
    ];
    for (name, patch) in expected {
        let entry = object(Kind::ServiceEntry, name);
        let status = statuses[&entry].clone();
        let write =
            tokio::spawn(async move { sink.apply(&entry, &status).await.map(|w| (sink, w)) });
        let (seen, respond) = next(&mut handle).await;
        let Seen {
            method,
            path,
            query,
            content_type,
            body,
        } = seen;
        assert_eq!(method, "PATCH");
        assert_eq!(
            path,
            format!("/apis/networking.istio.io/v1/namespaces/shop/serviceentries/{name}/status")
        );
        assert!(query.is_empty(), "{query:?}");
        assert_eq!(content_type, "application/json-patch+json");
        assert_eq!(body, patch, "{name}");
        respond.send_response(ok(&json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "shop"},
        })));
        let (back, written) = write.await.unwrap().unwrap();
        assert!(written);
        sink = back;
    }
}

#[tokio::test]
async fn local_service_entry_vips_are_status_files_read_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_, statuses) = cluster(ENTRIES);
    let mut sink = DirectoryStatus::new(root);
    for (object, status) in statuses
        .iter()
        .filter(|(o, _)| o.kind == Kind::ServiceEntry)
    {
        assert!(sink.apply(object, status).unwrap());
    }
    let text = std::fs::read_to_string(root.join("generated/status/ServiceEntry/shop/fresh.yaml"))
        .unwrap();
    let yaml: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(
        yaml["status"],
        json!({"addresses": [
            {"host": "fresh.example.com", "value": "240.240.0.2"},
            {"host": "fresh.example.com", "value": "2001:2::2"},
        ]})
    );
    // A new run: the entries carry no status (the directory source does not
    // read it back), an entry older than both is added; each keeps its VIPs.
    let recorded = sink.recorded_addresses();
    assert_eq!(recorded.len(), 2);
    let restarted = format!(
        "{}---\n{}",
        ENTRIES.replace("status:\n  conditions:\n  - {type: Reconciled, status: \"True\", reason: Done, message: another controller's}\n  addresses:\n  - {host: old.example.com, value: 240.240.0.9}\n", ""),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: oldest, namespace: shop, creationTimestamp: \"2023-01-01T00:00:00Z\"}\n\
         spec: {hosts: [oldest.example.com], resolution: STATIC}\n"
    );
    let state = ClusterState::from_objects(objects(&restarted));
    assert!(state.service_entries.values().all(|se| se.status.is_none()));
    let mut allocator = index::IpAllocator::with_recorded(recorded.clone());
    let allocations = allocator.allocate(&state, true);
    for (key, addresses) in &recorded {
        assert_eq!(&allocations[key], addresses, "{key:?}");
    }
    assert_eq!(
        allocations[&ObjectKey::new("shop", "oldest")][0].value,
        "240.240.0.3"
    );
}

/// ServiceEntries asking for waypoints, in a namespace bound to "ready".
const WAYPOINT_ENTRIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: ready}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ready, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: Hostname, value: ready.shop.svc.cluster.local}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pods-only, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: Hostname, value: pods-only.shop.svc.cluster.local}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-namespace, namespace: shop, generation: 2}
spec: {hosts: [a.example.com], addresses: [10.8.0.1], resolution: STATIC, endpoints: [{address: 10.8.1.1}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: missing, namespace: shop, labels: {istio.io/use-waypoint: gone}}
spec: {hosts: [b.example.com], addresses: [10.8.0.2]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wrong-kind, namespace: shop, labels: {istio.io/use-waypoint: pods-only}}
spec: {hosts: [c.example.com], addresses: [10.8.0.3]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: opted-out, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {hosts: [d.example.com], addresses: [10.8.0.4]}
"#;

/// A WaypointBound condition: (status, reason, message).
type Bound = (bool, String, String);

/// The WaypointBound condition of a ServiceEntry, and its addresses.
fn entry_status(statuses: &Statuses, name: &str) -> Option<(Option<Value>, Vec<Bound>)> {
    match statuses.get(&object(Kind::ServiceEntry, name))? {
        ObjectStatus::ServiceEntry {
            addresses,
            conditions,
        } => Some((
            addresses.as_ref().map(|a| json!(a)),
            conditions
                .iter()
                .map(|c| {
                    assert_eq!(c.type_, "istio.io/WaypointBound");
                    (c.status, c.reason.clone(), c.message.clone())
                })
                .collect(),
        )),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn service_entries_asking_for_a_waypoint_say_why_they_are_not_bound() {
    let statuses = desired(WAYPOINT_ENTRIES);
    let condition = |name: &str| {
        let (addresses, conditions) = entry_status(&statuses, name).expect(name);
        assert_eq!(addresses, None, "{name}: own addresses, none allocated");
        assert_eq!(conditions.len(), 1, "{name}: {conditions:?}");
        conditions[0].clone()
    };
    assert_eq!(
        condition("missing"),
        (
            false,
            "WaypointIsNotReady".into(),
            r#"waypoint "shop/gone" is not ready"#.into()
        )
    );
    assert_eq!(
        condition("wrong-kind"),
        (
            false,
            "UnsupportedTrafficType".into(),
            r#"attempting to bind to traffic type "service" which the waypoint "shop/pods-only" does not support"#.into()
        )
    );
    let (status, reason, message) = condition("by-namespace");
    assert!(!status);
    assert_eq!(reason, "NotSupported");
    assert!(
        message.starts_with(r#"waypoint "shop/ready" would be bound, but"#),
        "{message}"
    );
    // The generation it was computed for.
    let Some(ObjectStatus::ServiceEntry { conditions, .. }) =
        statuses.get(&object(Kind::ServiceEntry, "by-namespace"))
    else {
        unreachable!()
    };
    assert_eq!(conditions[0].observed_generation, Some(2));
    // Opted out: nothing to say, no status.
    assert!(entry_status(&statuses, "opted-out").is_none());
}

#[tokio::test]
async fn a_service_entry_s_waypoint_condition_is_applied_and_pruned_keeping_other_writers() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    // "missing" carries another controller's condition and our condition
    // from before; the namespace no longer names a waypoint and the entry
    // its own label drops: the condition is to go, the other stays.
    let yaml = WAYPOINT_ENTRIES.replace(
        "metadata: {name: missing, namespace: shop, labels: {istio.io/use-waypoint: gone}}\nspec: {hosts: [b.example.com], addresses: [10.8.0.2]}",
        "metadata: {name: missing, namespace: shop, resourceVersion: \"7\"}\nspec: {hosts: [b.example.com], addresses: [10.8.0.2]}\n\
         status:\n  conditions:\n  - {type: Reconciled, status: \"True\", reason: Done, message: another controller's}\n\
         \x20 - {type: istio.io/WaypointBound, status: \"False\", reason: WaypointIsNotReady, message: old, lastTransitionTime: \"2024-01-01T00:00:00Z\"}",
    )
    .replace(
        "metadata: {name: shop, labels: {istio.io/use-waypoint: ready}}",
        "metadata: {name: shop}",
    );
    let (store, statuses) = cluster(&yaml);
    let entry = object(Kind::ServiceEntry, "missing");
    let status = statuses[&entry].clone();
    assert_eq!(
        status,
        ObjectStatus::ServiceEntry {
            addresses: None,
            conditions: vec![]
        }
    );
    let mut sink = KubeStatus::new(client, store.clone(), fixed_clock());
    let write = tokio::spawn(async move { sink.apply(&entry, &status).await });
    let (seen, respond) = next(&mut handle).await;
    let Seen {
        method,
        path,
        query,
        content_type,
        body,
    } = seen;
    assert_eq!(method, "PATCH");
    assert_eq!(
        path,
        "/apis/networking.istio.io/v1/namespaces/shop/serviceentries/missing/status"
    );
    assert_eq!(query["fieldManager"], "istiod-rs-status");
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert_eq!(
        body["status"],
        json!({"conditions": [
            {"type": "Reconciled", "status": "True", "reason": "Done", "message": "another controller's"},
        ]})
    );
    respond.send_response(ok(&json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "missing", "namespace": "shop"},
    })));
    assert!(write.await.unwrap().unwrap());
}

#[test]
fn local_service_entry_waypoint_conditions_are_status_files_until_the_entry_opts_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut sink = DirectoryStatus::new(root);
    let statuses = desired(WAYPOINT_ENTRIES);
    for (object, status) in statuses
        .iter()
        .filter(|(o, _)| o.kind == Kind::ServiceEntry)
    {
        assert!(sink.apply(object, status).unwrap());
    }
    let path = root.join("generated/status/ServiceEntry/shop/missing.yaml");
    let yaml: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        yaml["status"],
        json!({"conditions": [{
            "type": "istio.io/WaypointBound", "status": "False", "reason": "WaypointIsNotReady",
            "message": "waypoint \"shop/gone\" is not ready",
        }]})
    );
    assert!(
        !root
            .join("generated/status/ServiceEntry/shop/opted-out.yaml")
            .exists()
    );
    // The entry opts out: nothing is left to write, so its file goes.
    let statuses = desired(&WAYPOINT_ENTRIES.replace(
        "labels: {istio.io/use-waypoint: gone}",
        "labels: {istio.io/use-waypoint: none}",
    ));
    assert!(!statuses.contains_key(&object(Kind::ServiceEntry, "missing")));
}

const WAYPOINT_SERVICES: &str = concat!(
    r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
"#,
    ready_waypoint!(),
    r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, generation: 4, labels: {istio.io/use-waypoint: ready}}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: shop, labels: {istio.io/use-waypoint: ready, istio.io/ingress-use-waypoint: "true"}}
spec: {clusterIP: 10.96.0.21, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: lost, namespace: shop, labels: {istio.io/use-waypoint: gone}}
spec: {clusterIP: 10.96.0.22, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.23, ports: [{name: http, port: 80}]}
"#
);

#[test]
fn services_say_which_waypoint_they_are_bound_to_as_upstream() {
    let statuses = desired(WAYPOINT_SERVICES);
    let condition = |name: &str| match statuses.get(&object(Kind::Service, name)) {
        Some(ObjectStatus::Conditions(c)) if c.len() == 1 => {
            assert_eq!(c[0].type_, "istio.io/WaypointBound");
            (c[0].status, c[0].reason.clone(), c[0].message.clone())
        }
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(
        condition("web"),
        (
            true,
            "WaypointAccepted".into(),
            "Successfully attached to waypoint shop/ready".into()
        )
    );
    assert_eq!(
        condition("front"),
        (
            true,
            "WaypointAccepted".into(),
            "Successfully attached to waypoint shop/ready. Ingress traffic will traverse the waypoint".into()
        )
    );
    assert_eq!(
        condition("lost"),
        (
            false,
            "WaypointIsNotReady".into(),
            r#"waypoint "shop/gone" is not ready"#.into()
        )
    );
    assert!(!statuses.contains_key(&object(Kind::Service, "plain")));
}

#[tokio::test]
async fn a_service_s_waypoint_condition_is_applied_to_the_core_status_subresource() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (store, statuses) = cluster(WAYPOINT_SERVICES);
    let web = object(Kind::Service, "web");
    let status = statuses[&web].clone();
    let mut sink = KubeStatus::new(client, store.clone(), fixed_clock());
    let write = tokio::spawn(async move { sink.apply(&web, &status).await });
    let (seen, respond) = next(&mut handle).await;
    let Seen {
        method,
        path,
        query,
        content_type,
        body,
    } = seen;
    assert_eq!(method, "PATCH");
    assert_eq!(path, "/api/v1/namespaces/shop/services/web/status");
    assert_eq!(query["fieldManager"], "istiod-rs-status");
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["kind"], "Service");
    assert_eq!(
        body["status"],
        json!({"conditions": [{
            "type": "istio.io/WaypointBound", "status": "True", "reason": "WaypointAccepted",
            "message": "Successfully attached to waypoint shop/ready", "observedGeneration": 4,
            "lastTransitionTime": "2025-01-02T03:04:05Z",
        }]})
    );
    respond.send_response(ok(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
    })));
    assert!(write.await.unwrap().unwrap());
}
