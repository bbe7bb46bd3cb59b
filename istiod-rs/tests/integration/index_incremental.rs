//! The incremental translator reuses unchanged pods' workloads only while
//! nothing else changed, and its output always equals a fresh translation.

use std::sync::Arc;

use api::manifest::{Kind, Object, ObjectKey};
use istiod_rs::index::{self, MeshConfig, Translator, testing::synthetic_cluster};
use istiod_rs::state::ClusterState;

fn check(translator: &mut Translator, state: &ClusterState) -> usize {
    check_with(translator, state, &MeshConfig::default())
}

fn check_with(translator: &mut Translator, state: &ClusterState, mesh: &MeshConfig) -> usize {
    let incremental = translator.translate(state, mesh);
    let fresh = index::translate(state, mesh);
    assert_eq!(incremental.snapshot, fresh.snapshot);
    assert_eq!(incremental.problems, fresh.problems);
    translator.reused()
}

#[test]
fn reuses_unchanged_pods_and_matches_a_fresh_translation() {
    let mut state = synthetic_cluster(200, 20, 4);
    let mut translator = Translator::default();
    assert_eq!(check(&mut translator, &state), 0);
    // Nothing changed: everything reused.
    assert_eq!(check(&mut translator, &state), 200);

    // One pod changes (a new object, as a watch event brings).
    let key = ObjectKey::new("ns-3", "svc-3-3");
    let mut pod = (*state.pods[&key]).clone();
    pod.status.as_mut().unwrap().pod_ip = Some("10.200.0.1".into());
    state.apply(Object::Pod(pod));
    assert_eq!(check(&mut translator, &state), 199);

    // A pod goes away.
    state.delete(api::manifest::Kind::Pod, &key);
    assert_eq!(check(&mut translator, &state), 199);

    // A service changes: every workload may list it, nothing is reused.
    let svc_key = ObjectKey::new("ns-1", "svc-1");
    let mut svc = (*state.services[&svc_key]).clone();
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap().pop();
    state.services.insert(svc_key, Arc::new(svc));
    assert_eq!(check(&mut translator, &state), 0);

    // A namespace label changes enrolment.
    let ns_key = ObjectKey::cluster("ns-1");
    let mut ns = (*state.namespaces[&ns_key]).clone();
    ns.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    state.apply(Object::Namespace(ns));
    assert_eq!(check(&mut translator, &state), 0);
    assert_eq!(check(&mut translator, &state), 199);

    // Another mesh configuration: nothing is reused.
    let other = MeshConfig {
        trust_domain: "example.org".into(),
        ..MeshConfig::default()
    };
    translator.translate(&state, &other);
    assert_eq!(translator.reused(), 0);
}

/// `web` (pod web-1, account `web`) in the ambient namespace `shop`, and a
/// waypoint for the `web` account's services only: `web` is bound to it
/// while all its pods run as `web`.
const WEB_AND_ITS_ACCOUNT_WAYPOINT: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: web-waypoint
  namespace: shop
  labels: {istio.io/waypoint-for: service}
  annotations: {istio.io/for-service-account: web}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: web-waypoint.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.1}
";

/// A pod of another account, joining `web`.
const WEB_2_OF_ANOTHER_ACCOUNT: &str = "apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: other, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.2}
";

fn objects(yaml: &str) -> Vec<Object> {
    api::manifest::parse(yaml).unwrap().objects
}

#[test]
fn a_pod_joining_a_service_updates_the_l7_denials_of_the_others() {
    // An L7 policy on the waypoint denies connections to what is bound to
    // it. A pod of another account joins: the service is no longer bound,
    // so web-1 (unchanged) loses the denial.
    let mut state = ClusterState::from_objects(objects(&format!(
        "{WEB_AND_ITS_ACCOUNT_WAYPOINT}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: via-waypoint, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: web-waypoint}}]
  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]
"
    )));
    let mut translator = Translator::default();
    check(&mut translator, &state);
    for o in objects(WEB_2_OF_ANOTHER_ACCOUNT) {
        state.apply(o);
    }
    check(&mut translator, &state);
}

/// The implicit ALLOW-from-waypoint policies a workload lists change with
/// other pods: a waypoint has one only while it has instances, and a
/// per-ServiceAccount waypoint binds a service only while all its pods run
/// as that account.
#[test]
fn other_pods_change_the_implicit_waypoint_policies_of_unchanged_pods() {
    let mesh = MeshConfig {
        auto_allow_waypoint_policy: true,
        ..MeshConfig::default()
    };
    let mut state = ClusterState::from_objects(objects(WEB_AND_ITS_ACCOUNT_WAYPOINT));
    let listed = |translator: &mut Translator, state: &ClusterState| {
        check_with(translator, state, &mesh);
        let t = index::translate(state, &mesh);
        let uid = mesh.pod_uid("shop", "web-1");
        let json = index::json::snapshot_json(&t.snapshot);
        json["workloads"][uid.as_str()]["authorizationPolicies"].clone()
    };
    let key = "shop/istio_allow_waypoint_shop_web-waypoint";
    let mut translator = Translator::default();
    // No instance yet: no policy to list.
    assert_eq!(listed(&mut translator, &state), serde_json::Value::Null);

    // The waypoint's first instance starts: web-1 (unchanged) lists it.
    for o in objects(
        "apiVersion: v1
kind: Pod
metadata: {name: web-waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: web-waypoint}}
spec: {nodeName: node-a, serviceAccountName: web-waypoint, containers: [{name: proxy, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.100}
",
    ) {
        state.apply(o);
    }
    assert_eq!(listed(&mut translator, &state), serde_json::json!([key]));

    // A pod of another account joins the service: no longer bound to the
    // per-ServiceAccount waypoint, so web-1 (unchanged) lists nothing.
    for o in objects(WEB_2_OF_ANOTHER_ACCOUNT) {
        state.apply(o);
    }
    assert_eq!(listed(&mut translator, &state), serde_json::Value::Null);

    // It leaves again: bound, listed.
    state.delete(api::manifest::Kind::Pod, &ObjectKey::new("shop", "web-2"));
    assert_eq!(listed(&mut translator, &state), serde_json::json!([key]));
}

/// `web` bound to the waypoint `wp`, an L7 policy on `web` and a route for
/// each of `web` and `api`.
const L7_ROUTES: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: wp.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {selector: {app: api}, clusterIP: 10.96.0.2, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.1, conditions: [{type: Ready, status: 'True'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: node-a, containers: [{name: proxy, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.100, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
";

fn set_ready(state: &mut ClusterState, name: &str, ready: bool) {
    let key = ObjectKey::new("shop", name);
    let mut pod = (*state.pods[&key]).clone();
    pod.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status =
        if ready { "True" } else { "False" }.into();
    state.apply(Object::Pod(pod));
}

/// The resources whose versions differ between two snapshots, as
/// `(type URL, name)`.
fn changed(
    a: &istiod_rs::snapshot::Snapshot,
    b: &istiod_rs::snapshot::Snapshot,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let urls: std::collections::BTreeSet<&str> = a.type_urls().chain(b.type_urls()).collect();
    for url in urls {
        let (ra, rb) = (a.of_type(url), b.of_type(url));
        let names: std::collections::BTreeSet<&String> = ra.keys().chain(rb.keys()).collect();
        for name in names {
            if ra.get(name).map(|r| &r.version) != rb.get(name).map(|r| &r.version) {
                out.push((url.to_string(), name.clone()));
            }
        }
    }
    out
}

#[test]
fn a_route_change_changes_only_its_route_table() {
    let mut state = ClusterState::from_objects(objects(L7_ROUTES));
    let mut translator = Translator::default();
    check(&mut translator, &state);
    let before = index::translate(&state, &MeshConfig::default()).snapshot;
    let key = ObjectKey::new("shop", "api");
    let mut route = (*state.http_routes[&key]).clone();
    route.spec.rules.as_mut().unwrap()[0]
        .backend_refs
        .as_mut()
        .unwrap()[0]
        .weight = Some(5);
    state.apply(Object::HttpRoute(route));
    check(&mut translator, &state);
    let after = index::translate(&state, &MeshConfig::default()).snapshot;
    assert_eq!(
        changed(&before, &after),
        [(
            api::type_url::ROUTE_TABLE.to_string(),
            "shop/api.shop.svc.cluster.local".to_string()
        )]
    );
}

#[test]
fn a_waypoint_becoming_ready_hands_the_rules_over_from_unchanged_pods() {
    let mut state = ClusterState::from_objects(objects(L7_ROUTES));
    let mesh = MeshConfig::default();
    let mut translator = Translator::default();
    let listed = |translator: &mut Translator, state: &ClusterState| {
        check(translator, state);
        let t = index::translate(state, &mesh);
        let json = index::json::snapshot_json(&t.snapshot);
        json["workloads"][mesh.pod_uid("shop", "web-1").as_str()]["authorizationPolicies"].clone()
    };
    // Starting: web-1 is denied by the stand-ins of the policy and route.
    let denied = serde_json::json!([
        "shop/unserved_l7_authorizationpolicy_web-get",
        "shop/unserved_l7_httproute_web"
    ]);
    assert_eq!(listed(&mut translator, &state), denied);
    // Ready: web-1 (unchanged) lists nothing; the waypoint serves both.
    set_ready(&mut state, "wp-1", true);
    assert_eq!(listed(&mut translator, &state), serde_json::Value::Null);
    // Not ready again: denied again.
    set_ready(&mut state, "wp-1", false);
    assert_eq!(listed(&mut translator, &state), denied);
}
#[test]
fn subsets_follow_pod_labels_while_pods_are_reused() {
    // A pod changing labels moves between DestinationRule subsets: the
    // TrafficPolicy changes although unchanged pods' workloads are reused,
    // and a DestinationRule change alone reuses every workload.
    let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: n, containers: [{name: app, image: web}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: n, containers: [{name: app, image: web}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";
    let subsets = |state: &ClusterState| -> Vec<Vec<String>> {
        use prost::Message;
        let translation = index::translate(state, &MeshConfig::default());
        let resource = &translation.snapshot.of_type(api::type_url::TRAFFIC_POLICY)["shop/web.shop.svc.cluster.local"];
        let policy = api::l7::TrafficPolicy::decode(resource.body.value.as_slice()).unwrap();
        policy
            .subsets
            .into_iter()
            .map(|s| s.workload_uids)
            .collect()
    };
    let mut state = ClusterState::from_objects(api::manifest::parse(yaml).unwrap().objects);
    let mut translator = Translator::default();
    check(&mut translator, &state);
    assert_eq!(
        subsets(&state),
        [
            vec![
                "Kubernetes//Pod/shop/web-1".to_string(),
                "Kubernetes//Pod/shop/web-2".to_string()
            ],
            vec![]
        ]
    );

    let key = ObjectKey::new("shop", "web-2");
    let mut pod = (*state.pods[&key]).clone();
    pod.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("version".into(), "v2".into());
    state.apply(Object::Pod(pod));
    assert_eq!(check(&mut translator, &state), 1);
    assert_eq!(
        subsets(&state),
        [
            vec!["Kubernetes//Pod/shop/web-1".to_string()],
            vec!["Kubernetes//Pod/shop/web-2".to_string()]
        ]
    );

    let dr_key = ObjectKey::new("shop", "web");
    let mut dr = (*state.destination_rules[&dr_key]).clone();
    dr.spec.subsets.pop();
    state.apply(Object::DestinationRule(dr));
    assert_eq!(check(&mut translator, &state), 2);
    assert_eq!(
        subsets(&state),
        [vec!["Kubernetes//Pod/shop/web-1".to_string()]]
    );
}

/// `web-1` (account web) covered by a RequestAuthentication and an ALLOW
/// with HTTP attributes, both by selector; its on-demand waypoint exists
/// with an instance that is not ready.
const SELECTOR_L7: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: web-waypoint
  namespace: shop
  labels: {istio-rs.io/on-demand-waypoint: 'true'}
  annotations: {istio.io/for-service-account: web, istio-rs.io/needed-by: RequestAuthentication shop/jwt}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: web-waypoint.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.9.0.1, conditions: [{type: Ready, status: 'True'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: web-waypoint}}
spec: {nodeName: node-a, serviceAccountName: web-waypoint, containers: [{name: proxy, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.100, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules: [{issuer: https://issuer.example, jwks: '{\"keys\":[]}'}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {paths: [/api]}}]}]
";

#[test]
fn a_waypoint_becoming_ready_exempts_it_from_selector_rules_of_unchanged_pods() {
    let mut state = ClusterState::from_objects(objects(SELECTOR_L7));
    let mesh = MeshConfig::default();
    let mut translator = Translator::default();
    let policies = |translator: &mut Translator, state: &ClusterState| {
        check(translator, state);
        let t = index::translate(state, &mesh);
        let json = index::json::snapshot_json(&t.snapshot);
        (
            json["workloads"][mesh.pod_uid("shop", "web-1").as_str()]["authorizationPolicies"]
                .clone(),
            json["authorizations"].clone(),
        )
    };
    let listed = serde_json::json!([
        "shop/api-only",
        "shop/unserved_l7_requestauthentication_jwt"
    ]);
    let (keys, before) = policies(&mut translator, &state);
    assert_eq!(keys, listed);
    // Ready: the same keys (the pod's list does not change), the policies' content now
    // exempts the waypoint; not ready again: as before.
    set_ready(&mut state, "wp-1", true);
    let (keys, after) = policies(&mut translator, &state);
    assert_eq!(keys, listed);
    assert_ne!(before, after);
    let waypoint = "cluster.local/ns/shop/sa/web-waypoint";
    assert!(after.to_string().contains(waypoint), "{after}");
    set_ready(&mut state, "wp-1", false);
    let (keys, again) = policies(&mut translator, &state);
    assert_eq!((keys, again), (listed, before));
}

/// [`SELECTOR_L7`] with the on-demand waypoint ready, and a waypoint `mine`
/// (not ready) that the namespace binds everything to.
fn users_waypoint_starting() -> String {
    SELECTOR_L7
        .replace(
            "labels: {istio.io/dataplane-mode: ambient}",
            "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: mine}",
        )
        .replace("status: 'False'}]}", "status: 'True'}]}")
        + "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: mine, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: mine.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Pod
metadata: {name: mine-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: mine}}
spec: {nodeName: node-a, serviceAccountName: mine, containers: [{name: proxy, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.101, conditions: [{type: Ready, status: 'False'}]}
"
}

#[test]
fn a_users_waypoint_becoming_ready_takes_over_unchanged_pods_from_the_on_demand_one() {
    // web-1's own traffic is bound to the ready on-demand waypoint while
    // the user's (named by the namespace) has no ready instance; once it
    // has, the pod (unchanged) must be bound to it.
    let mut state = ClusterState::from_objects(objects(&users_waypoint_starting()));
    let mesh = MeshConfig::default();
    let mut translator = Translator::default();
    let waypoint = |translator: &mut Translator, state: &ClusterState| {
        check(translator, state);
        let t = index::translate(state, &mesh);
        let json = index::json::snapshot_json(&t.snapshot);
        json["workloads"][mesh.pod_uid("shop", "web-1").as_str()]["waypoint"].to_string()
    };
    assert!(waypoint(&mut translator, &state).contains("web-waypoint"));
    set_ready(&mut state, "mine-1", true);
    assert!(waypoint(&mut translator, &state).contains("mine"));
}

#[test]
fn an_on_demand_waypoint_serves_what_it_hands_over_until_its_gateway_is_gone() {
    // Clients learn that web-1 and Service web moved to `mine` only after
    // the translation that moves them, and requests they sent before are in
    // flight: web-waypoint must still serve both, with the same rules, and
    // be exempt from their L4 form, until its Gateway is deleted; and `mine`
    // must hold them before it is ready (clients send to it from then on).
    let yaml = users_waypoint_starting()
        + "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80}]
";
    let mut state = ClusterState::from_objects(objects(&yaml));
    let mesh = MeshConfig::default();
    let mut translator = Translator::default();
    let uid = mesh.pod_uid("shop", "web-1");
    // (web-1's entry, Service web's entry) in a waypoint's configuration.
    let served = |json: &serde_json::Value, waypoint: &str| {
        let w = &json["waypoints"][waypoint];
        let workload = w["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["uid"] == uid.as_str())
            .cloned();
        let service = w["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["hostname"] == "web.shop.svc.cluster.local")
            .cloned();
        (workload, service)
    };
    let mut translate = |state: &ClusterState| {
        check(&mut translator, state);
        index::json::snapshot_json(&index::translate(state, &mesh).snapshot)
    };
    let exempt = |json: &serde_json::Value, sa: &str| {
        let principal = format!("cluster.local/ns/shop/sa/{sa}");
        json["authorizations"]["shop/api-only"]
            .to_string()
            .contains(&principal)
    };

    // The user's waypoint, not ready yet, already holds what it will serve.
    let before = translate(&state);
    let (workload, service) = served(&before, "shop/web-waypoint");
    assert!(workload.is_some() && service.is_some(), "{before}");
    assert_eq!(
        served(&before, "shop/mine"),
        (workload.clone(), service.clone())
    );
    assert!(
        exempt(&before, "web-waypoint") && !exempt(&before, "mine"),
        "{before}"
    );

    set_ready(&mut state, "mine-1", true);
    let after = translate(&state);
    assert!(
        after["workloads"][uid.as_str()]["waypoint"]
            .to_string()
            .contains("mine")
    );
    assert_eq!(
        served(&after, "shop/mine"),
        (workload.clone(), service.clone())
    );
    assert_eq!(
        served(&after, "shop/web-waypoint"),
        (workload.clone(), service.clone())
    );
    assert!(
        exempt(&after, "mine") && exempt(&after, "web-waypoint"),
        "{after}"
    );

    // Drained (no rule needs it): still serving, until deleted.
    let key = ObjectKey::new("shop", "web-waypoint");
    let Some(Object::Gateway(mut gw)) = state.object(Kind::Gateway, &key) else {
        panic!("no Gateway shop/web-waypoint");
    };
    let annotations = gw.metadata.annotations.as_mut().unwrap();
    annotations.insert("istio-rs.io/needed-by".into(), String::new());
    state.apply(Object::Gateway(gw));
    let draining = translate(&state);
    assert_eq!(
        served(&draining, "shop/web-waypoint"),
        (workload.clone(), service.clone())
    );
    assert!(exempt(&draining, "web-waypoint"), "{draining}");
    // Without a ready instance it receives nothing: nothing to keep.
    set_ready(&mut state, "wp-1", false);
    let not_ready = translate(&state);
    assert_eq!(served(&not_ready, "shop/web-waypoint"), (None, None));
    assert!(!exempt(&not_ready, "web-waypoint"), "{not_ready}");
    set_ready(&mut state, "wp-1", true);
    assert!(state.delete(Kind::Gateway, &key));
    let gone = translate(&state);
    assert!(
        gone["waypoints"].get("shop/web-waypoint").is_none(),
        "{gone}"
    );
    assert_eq!(served(&gone, "shop/mine"), (workload, service));
    assert!(
        exempt(&gone, "mine") && !exempt(&gone, "web-waypoint"),
        "{gone}"
    );
}

#[test]
fn waypoints_running_as_one_account_are_exempted_once() {
    // Around the handover both waypoints enforce api-only; `mine` runs as
    // web-waypoint's account too (web-waypoint also as another, which sorts
    // first): the shared principal is listed once in the rule's L4 form.
    let yaml = users_waypoint_starting().replace(
        "serviceAccountName: mine,",
        "serviceAccountName: web-waypoint,",
    ) + "---
apiVersion: v1
kind: Pod
metadata: {name: wp-2, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: web-waypoint}}
spec: {nodeName: node-a, serviceAccountName: a-second, containers: [{name: proxy, image: waypoint}]}
status: {phase: Running, podIP: 10.9.0.102, conditions: [{type: Ready, status: 'True'}]}
";
    let mut state = ClusterState::from_objects(objects(&yaml));
    set_ready(&mut state, "mine-1", true);
    let mesh = MeshConfig::default();
    check(&mut Translator::default(), &state);
    let json = index::json::snapshot_json(&index::translate(&state, &mesh).snapshot);
    let policy = json["authorizations"]["shop/api-only"].to_string();
    let principal = "cluster.local/ns/shop/sa/web-waypoint";
    assert_eq!(policy.matches(principal).count(), 1, "{policy}");
}
