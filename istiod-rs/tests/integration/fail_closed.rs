//! Issue 9 within the control plane, end to end: cluster state -> the
//! index's translation -> proxy-core's workload store -> the policy decision
//! ztunnel makes for a connection. Each case is a way the mesh used to widen
//! access (an unreadable value dropping a whole policy, an L7 rule silently
//! ignored, traffic skipping a waypoint) and must now refuse.

use std::net::{IpAddr, SocketAddr};

use api::SpiffeId;
use api::security::Authorization as XdsAuthorization;
use api::type_url;
use api::workload::{Address, address};
use istiod_rs::index::{self, MeshConfig};
use istiod_rs::state::ClusterState;
use prost::Message;
use proxy_core::authorization::{Authorization, ConnectionInfo, Decision};
use proxy_core::store::{Workload, WorkloadStore};

/// The namespace and pods every case runs in: `web` (10.9.0.1) and `db`
/// (10.9.0.2) in `shop`.
const PODS: &str = "
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
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.1, conditions: [{type: Ready, status: \"True\"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-a, serviceAccountName: db, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.2, conditions: [{type: Ready, status: \"True\"}]}
";

/// What ztunnel would hold after receiving the translation of `yaml` (plus
/// the pods above).
fn ztunnel_view(yaml: &str) -> WorkloadStore {
    ztunnel_view_with(yaml, &MeshConfig::default())
}

/// [`ztunnel_view`] under other mesh settings.
fn ztunnel_view_with(yaml: &str, mesh: &MeshConfig) -> WorkloadStore {
    let text = format!("{PODS}---\n{yaml}");
    let manifest = api::manifest::parse(&text).unwrap();
    assert!(manifest.refused.is_empty(), "{:?}", manifest.refused);
    let translation = index::translate(&ClusterState::from_objects(manifest.objects), mesh);
    let store = WorkloadStore::new();
    store.update(|batch| {
        for r in translation.snapshot.of_type(type_url::ADDRESS).values() {
            let a = Address::decode(r.body.value.as_slice()).unwrap();
            if let Some(address::Type::Workload(w)) = a.r#type {
                batch.insert_workload(Workload::try_from(w).unwrap());
            }
        }
        for r in translation
            .snapshot
            .of_type(type_url::AUTHORIZATION)
            .values()
        {
            let a = XdsAuthorization::decode(r.body.value.as_slice()).unwrap();
            batch.insert_policy(Authorization::try_from(a).unwrap());
        }
    });
    store
}

/// The decision for a connection from `identity` (plaintext when `None`)
/// at 10.9.0.100 to `destination`.
fn decide(store: &WorkloadStore, identity: Option<&str>, destination: &str) -> Decision {
    let destination: SocketAddr = destination.parse().unwrap();
    let snapshot = store.snapshot();
    let workload = snapshot
        .workload_by_address("", destination.ip())
        .expect("the destination is a workload");
    snapshot.policies_for(&workload).check(&ConnectionInfo {
        source_ip: "10.9.0.100".parse::<IpAddr>().unwrap(),
        source_identity: identity.map(|i| i.parse::<SpiffeId>().unwrap()),
        destination,
    })
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const STRANGER: &str = "spiffe://cluster.local/ns/other/sa/stranger";

#[test]
fn an_allow_policy_with_an_unreadable_port_still_refuses_callers_it_does_not_allow() {
    let store = ztunnel_view(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {ports: ["http"]}}]
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
"#,
    );
    // Before: the policy was dropped and everyone was allowed by default.
    assert_eq!(
        decide(&store, Some(STRANGER), "10.9.0.1:8080"),
        Decision::NotAllowed
    );
    assert_eq!(decide(&store, None, "10.9.0.1:8080"), Decision::NotAllowed);
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.1:8080"),
        Decision::Allowed {
            policy: "shop/web-from-frontend".into()
        }
    );
    // Other workloads are not its business.
    assert_eq!(
        decide(&store, Some(STRANGER), "10.9.0.2:5432"),
        Decision::AllowedByDefault
    );
}

#[test]
fn an_allow_policy_whose_only_rule_is_unreadable_allows_no_one() {
    let store = ztunnel_view(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-internal, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]
"#,
    );
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.2:5432"),
        Decision::NotAllowed
    );
}

#[test]
fn a_deny_policy_with_an_unreadable_cidr_still_denies() {
    let store = ztunnel_view(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]
    to: [{operation: {ports: ["5432"]}}]
"#,
    );
    // Before: the policy was dropped and nothing was denied.
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.2:5432"),
        Decision::Denied {
            policy: "shop/block-db".into()
        }
    );
    // It denies what it would without the CIDR: port 5432, not others.
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.2:9000"),
        Decision::AllowedByDefault
    );
}

#[test]
fn a_deny_rule_left_with_no_condition_denies_every_connection() {
    let store = ztunnel_view(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-ports, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - when: [{key: destination.port, values: ["5432", "postgres"]}]
"#,
    );
    for port in ["10.9.0.2:5432", "10.9.0.2:1"] {
        assert_eq!(
            decide(&store, Some(FRONTEND), port),
            Decision::Denied {
                policy: "shop/block-ports".into()
            }
        );
    }
}

#[test]
fn a_custom_policy_denies_what_its_rules_match() {
    let store = ztunnel_view(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: opa}
  rules:
  - to: [{operation: {ports: ["8080"], paths: [/admin]}}]
"#,
    );
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.1:8080"),
        Decision::Denied {
            policy: "shop/ext-authz".into()
        }
    );
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.1:9090"),
        Decision::AllowedByDefault
    );
}

#[test]
fn an_unknown_mtls_mode_refuses_plaintext() {
    let store = ztunnel_view(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: typo, namespace: shop}\nspec: {mtls: {mode: STRICTT}}\n",
    );
    assert!(matches!(
        decide(&store, None, "10.9.0.1:8080"),
        Decision::Denied { .. }
    ));
    assert!(decide(&store, Some(FRONTEND), "10.9.0.1:8080").is_allowed());
}

#[test]
fn an_l7_policy_on_a_service_refuses_its_endpoints_until_removed() {
    const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules:
  - to: [{operation: {methods: [GET]}}]
"#;
    let store = ztunnel_view(POLICY);
    // Before: the policy was skipped and web admitted everyone.
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.1:8080"),
        Decision::Denied {
            policy: "shop/unserved_l7_authorizationpolicy_web-get-only".into()
        }
    );
    // Only the Service's endpoints.
    assert!(decide(&store, Some(FRONTEND), "10.9.0.2:5432").is_allowed());
    // Removed: web admits again.
    let store = ztunnel_view("");
    assert!(decide(&store, Some(FRONTEND), "10.9.0.1:8080").is_allowed());
}

#[test]
fn routes_and_request_authentications_refuse_their_targets() {
    let store = ztunnel_view(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: web-grpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: db-jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  jwtRules: [{issuer: https://issuer.example}]
"#,
    );
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.1:8080"),
        Decision::Denied {
            policy: "shop/unserved_l7_grpcroute_web-grpc".into()
        }
    );
    assert_eq!(
        decide(&store, Some(FRONTEND), "10.9.0.2:5432"),
        Decision::Denied {
            policy: "shop/unserved_l7_requestauthentication_db-jwt".into()
        }
    );
}

#[test]
fn a_selector_request_authentication_lets_only_its_ready_waypoint_through() {
    const JWT: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: db-jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  jwtRules: [{issuer: https://issuer.example}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: db-waypoint, namespace: shop, annotations: {istio.io/for-service-account: db}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: db-waypoint.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: db-waypoint}}
spec: {nodeName: node-a, serviceAccountName: db-waypoint, containers: [{name: waypoint, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.50, conditions: [{type: Ready, status: "READY"}]}
"#;
    const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/db-waypoint";
    let denied = Decision::Denied {
        policy: "shop/unserved_l7_requestauthentication_db-jwt".into(),
    };
    // The instance is not ready: nobody is exempt, the waypoint included.
    let store = ztunnel_view(&JWT.replace("READY", "False"));
    assert_eq!(decide(&store, Some(WAYPOINT), "10.9.0.2:5432"), denied);
    // Ready: the waypoint checks tokens, so it passes; whoever skips it
    // (with an identity or in plaintext) is still refused.
    let store = ztunnel_view(&JWT.replace("READY", "True"));
    assert!(decide(&store, Some(WAYPOINT), "10.9.0.2:5432").is_allowed());
    assert_eq!(decide(&store, Some(FRONTEND), "10.9.0.2:5432"), denied);
    assert_eq!(decide(&store, None, "10.9.0.2:5432"), denied);
    // Not covered: web is untouched.
    assert!(decide(&store, Some(FRONTEND), "10.9.0.1:8080").is_allowed());
}

#[test]
fn with_auto_allow_waypoint_policy_only_the_waypoint_reaches_a_bound_pod() {
    // `api` (web's pods) is bound to a waypoint whose one instance runs as
    // `waypoint`; `db` is bound to nothing.
    const WAYPOINT: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: waypoint.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: node-a, serviceAccountName: waypoint, containers: [{name: proxy, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.50, conditions: [{type: Ready, status: \"True\"}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080}]
";
    const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
    let mesh = MeshConfig {
        auto_allow_waypoint_policy: true,
        ..MeshConfig::default()
    };
    let store = ztunnel_view_with(WAYPOINT, &mesh);
    for client in [Some(FRONTEND), Some(STRANGER), None] {
        assert_eq!(
            decide(&store, client, "10.9.0.1:8080"),
            Decision::NotAllowed,
            "{client:?} skipped the waypoint"
        );
    }
    assert_eq!(
        decide(&store, Some(WAYPOINT_ID), "10.9.0.1:8080"),
        Decision::Allowed {
            policy: "shop/istio_allow_waypoint_shop_waypoint".into()
        }
    );
    // An unbound workload is not the waypoint's business.
    assert_eq!(
        decide(&store, Some(STRANGER), "10.9.0.2:5432"),
        Decision::AllowedByDefault
    );

    // Off (the default, as upstream): L4 policy alone, and there is none.
    let store = ztunnel_view(WAYPOINT);
    for client in [Some(FRONTEND), Some(WAYPOINT_ID)] {
        assert_eq!(
            decide(&store, client, "10.9.0.1:8080"),
            Decision::AllowedByDefault
        );
    }
}
