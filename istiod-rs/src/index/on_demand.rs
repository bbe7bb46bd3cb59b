//! Waypoints on demand: which waypoint Gateways istiod-rs should create so
//! that every L7 rule has a waypoint to enforce it.
//!
//! Planned inside the translation because it reads what only the index
//! knows (the L7 rules and their targets, services' endpoints, enrolment,
//! bindings), and because its outcome refines why a rule is not served
//! before the rule's problems are reported. Pure: the plan is published with
//! the snapshot and written by `provision::on_demand`.
//!
//! A rule's target needs a waypoint on demand when it is a Service (a
//! `targetRefs` entry or a route's Service parent in the route's own
//! namespace) that exists and no user binding covers: neither the Service
//! nor its namespace carries `istio.io/use-waypoint` (any value, `none`
//! included). Its workloads are the pods backing it that are enrolled (as
//! `workloads::enrolled` decides) and not finished, less those with their
//! own `istio.io/use-waypoint` label and those whose ServiceAccount has a
//! waypoint a user annotated `istio.io/for-service-account` in their
//! namespace (ready or not: intent, not readiness, decides, so the plan does
//! not flap while a user's waypoint starts). Each (namespace, ServiceAccount)
//! of them gets one Gateway, [`OnDemandWaypoint::gateway`], named
//! [`api::labels::on_demand_waypoint_name`]. A namespace labelled
//! `istio.io/auto-waypoint: disabled` gets none. A Gateway of that name that
//! istiod-rs did not make is never replaced. A Gateway no rule needs is not
//! planned, so the sink removes it.
//!
//! Where a target is not bound yet, its reason says what is happening
//! ([`Unserved::OnDemandPending`], [`Unserved::OnDemandSplit`],
//! [`Unserved::AutoWaypointDisabled`], [`Unserved::OnDemandNameTaken`]);
//! it stays denied at L4 until the waypoint is ready, as any unserved rule.

use std::collections::{BTreeMap, BTreeSet};

use api::labels;
use api::manifest::ObjectKey;
use serde_json::{Value, json};

use super::l7::{Attachment, L7Rule};
use super::problem::{PolicyRef, Unserved};
use super::selectors::labels_of;
use super::services::Services;
use super::waypoints::{Waypoints, is_on_demand};
use super::workloads;
use crate::state::{ClusterState, in_namespace, pod_is_terminal, pod_service_account};

/// One waypoint Gateway istiod-rs should have created on demand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnDemandWaypoint {
    pub key: ObjectKey,
    /// The ServiceAccount whose workloads it serves.
    pub service_account: String,
    /// The rules that need it.
    pub needed_by: BTreeSet<PolicyRef>,
}

impl OnDemandWaypoint {
    /// `Kind ns/name` of each rule needing it, sorted, joined by `,`: the
    /// `istio-rs.io/needed-by` annotation.
    pub fn needed_by_annotation(&self) -> String {
        let mut rules: Vec<String> = self.needed_by.iter().map(ToString::to_string).collect();
        rules.sort();
        rules.join(",")
    }

    /// The Gateway: class `istio-waypoint`, labelled
    /// `istio-rs.io/on-demand-waypoint: "true"`, annotated
    /// `istio.io/for-service-account` and `istio-rs.io/needed-by`, one
    /// listener `mesh`, HBONE on 15008: the listener upstream's `istioctl
    /// waypoint generate` writes (`makeGateway`,
    /// istioctl/pkg/waypoint/waypoint.go).
    pub fn gateway(&self) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": self.key.name,
                "namespace": self.key.namespace,
                "labels": {labels::ON_DEMAND_WAYPOINT: labels::ON_DEMAND_WAYPOINT_VALUE},
                "annotations": {
                    labels::FOR_SERVICE_ACCOUNT: self.service_account,
                    labels::NEEDED_BY: self.needed_by_annotation(),
                },
            },
            "spec": {
                "gatewayClassName": labels::WAYPOINT_GATEWAY_CLASS,
                "listeners": [{"name": "mesh", "port": api::ports::HBONE, "protocol": "HBONE"}],
            },
        })
    }
}

/// Every waypoint Gateway that should exist on demand, and the names that
/// cannot be used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnDemandPlan {
    pub waypoints: BTreeMap<ObjectKey, OnDemandWaypoint>,
    /// Names taken by a Gateway istiod-rs did not create, with the rules
    /// that needed them.
    pub name_taken: BTreeMap<ObjectKey, BTreeSet<PolicyRef>>,
}

/// What a service needs.
enum Need {
    /// Waypoints on demand are disabled in its namespace.
    Disabled(String),
    /// This on-demand waypoint (one), whose name is free.
    Waypoints(Vec<ObjectKey>),
    /// These, for some of the accounts of a Service of several: none can
    /// serve the Service itself.
    Split(Vec<ObjectKey>),
    /// The name of this one is taken.
    NameTaken(ObjectKey),
}

/// Plans the on-demand waypoints of `rules` and refines the reason of each
/// target they leave unbound.
pub(super) fn plan(
    state: &ClusterState,
    waypoints: &Waypoints,
    services: &Services<'_>,
    rules: &mut [L7Rule],
) -> OnDemandPlan {
    // The services that need one, with the rules needing them.
    let mut wanted: BTreeMap<usize, BTreeSet<PolicyRef>> = BTreeMap::new();
    for rule in rules.iter() {
        for t in &rule.targets {
            let (Some(r), Some(i)) = (&t.reference, t.service()) else {
                continue;
            };
            let consumer_route = rule.attachment == Attachment::RouteParents
                && r.namespace != rule.object.key.namespace;
            let attaches = !matches!(
                t.serving,
                Err(Unserved::TargetNotFound { .. } | Unserved::UnsupportedTarget { .. })
            );
            if r.is_service() && attaches && !consumer_route {
                wanted.entry(i).or_default().insert(rule.object.clone());
            }
        }
    }
    if wanted.is_empty() {
        return OnDemandPlan::default();
    }
    let users_per_account: BTreeSet<(&str, &str)> = state
        .gateways
        .iter()
        .filter(|(_, gw)| {
            gw.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS && !is_on_demand(gw)
        })
        .filter_map(|(key, gw)| {
            let sa = gw
                .metadata
                .annotations
                .as_ref()?
                .get(labels::FOR_SERVICE_ACCOUNT)?;
            Some((key.namespace.as_str(), sa.as_str()))
        })
        .collect();
    let mut plan = OnDemandPlan::default();
    let mut needs: BTreeMap<usize, Need> = BTreeMap::new();
    for (i, needed_by) in wanted {
        let entry = &services.entries[i];
        let namespace = entry.namespace;
        let Some(ns) = state.namespace(namespace) else {
            continue;
        };
        let ns_labels = labels_of(&ns.metadata.labels);
        if entry.labels().contains_key(labels::USE_WAYPOINT)
            || ns_labels.contains_key(labels::USE_WAYPOINT)
        {
            continue;
        }
        // The accounts to serve; and every account behind the Service,
        // which can be bound to a per-account waypoint only when it has one.
        let mut accounts = BTreeSet::new();
        let mut behind = BTreeSet::new();
        for pod in in_namespace(&state.pods, namespace) {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let pod_labels = labels_of(&pod.metadata.labels);
            if pod_is_terminal(pod) || !services.backed_by(namespace, name, pod_labels).contains(&i)
            {
                continue;
            }
            let sa = pod_service_account(pod);
            behind.insert(sa);
            if !pod_labels.contains_key(labels::USE_WAYPOINT)
                && workloads::enrolled(state, waypoints, namespace, pod)
                && !users_per_account.contains(&(namespace, sa))
            {
                accounts.insert(sa.to_string());
            }
        }
        if accounts.is_empty() {
            continue;
        }
        if ns_labels
            .get(labels::AUTO_WAYPOINT)
            .is_some_and(|v| v == labels::AUTO_WAYPOINT_DISABLED)
        {
            needs.insert(i, Need::Disabled(namespace.to_string()));
            continue;
        }
        let mut keys = Vec::new();
        let mut taken = None;
        for sa in accounts {
            let key = ObjectKey::new(namespace, labels::on_demand_waypoint_name(&sa));
            match state.gateways.get(&key) {
                Some(gw) if !is_on_demand(gw) => {
                    let rules = plan.name_taken.entry(key.clone()).or_default();
                    rules.extend(needed_by.iter().cloned());
                    taken.get_or_insert(key);
                }
                _ => {
                    let w = plan
                        .waypoints
                        .entry(key.clone())
                        .or_insert_with(|| OnDemandWaypoint {
                            key: key.clone(),
                            service_account: sa,
                            needed_by: BTreeSet::new(),
                        });
                    w.needed_by.extend(needed_by.iter().cloned());
                    keys.push(key);
                }
            }
        }
        let need = match taken {
            Some(key) => Need::NameTaken(key),
            None if behind.len() > 1 => Need::Split(keys),
            None => Need::Waypoints(keys),
        };
        needs.insert(i, need);
    }
    for t in rules.iter_mut().flat_map(|r| r.targets.iter_mut()) {
        let (Err(Unserved::NotBound { target }), Some(i)) = (&t.serving, t.service()) else {
            continue;
        };
        let target = target.clone();
        let listed = |keys: &[ObjectKey]| {
            let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
            keys.join(", ")
        };
        t.serving = Err(match needs.get(&i) {
            None => continue,
            Some(Need::Disabled(namespace)) => Unserved::AutoWaypointDisabled {
                target,
                namespace: namespace.clone(),
            },
            Some(Need::NameTaken(key)) => Unserved::OnDemandNameTaken {
                target,
                gateway: key.to_string(),
            },
            Some(Need::Waypoints(keys)) => Unserved::OnDemandPending {
                target,
                waypoints: listed(keys),
            },
            Some(Need::Split(keys)) => Unserved::OnDemandSplit {
                target,
                waypoints: listed(keys),
            },
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MeshConfig, PolicyProblem, Translation, translate};

    /// Namespace `shop` (labels `ns_labels`), Service `reviews` (labels
    /// `svc_labels`) selecting app=reviews, its pods `reviews-v1` (account
    /// `reviews`) and `reviews-v2` (account `v2_account`), and `extra`.
    fn cluster(ns_labels: &str, svc_labels: &str, v2_account: &str, extra: &str) -> ClusterState {
        let text = format!(
            r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient, {ns_labels}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop, labels: {{{svc_labels}}}}}
spec: {{selector: {{app: reviews}}, clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1, namespace: shop, labels: {{app: reviews}}}}
spec: {{nodeName: node-a, serviceAccountName: reviews, containers: [{{name: app, image: app}}]}}
status: {{phase: Running, podIP: 10.40.0.1, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v2, namespace: shop, labels: {{app: reviews}}}}
spec: {{nodeName: node-a, serviceAccountName: {v2_account}, containers: [{{name: app, image: app}}]}}
status: {{phase: Running, podIP: 10.40.0.2, conditions: [{{type: Ready, status: "True"}}]}}
{extra}"#
        );
        let manifest = api::manifest::parse(&text).unwrap();
        assert!(manifest.refused.is_empty(), "{:?}", manifest.refused);
        ClusterState::from_objects(manifest.objects)
    }

    const ROUTE: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules: [{backendRefs: [{name: reviews, port: 80}]}]
"#;

    const POLICY: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-delete, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"#;

    fn run(state: &ClusterState) -> Translation {
        translate(state, &MeshConfig::default())
    }

    fn keys(t: &Translation) -> Vec<String> {
        t.on_demand
            .waypoints
            .keys()
            .map(ToString::to_string)
            .collect()
    }

    /// The reasons the rule `name` is not served.
    fn reasons(t: &Translation, name: &str) -> Vec<String> {
        t.problems
            .iter()
            .filter(|p| p.object().key.name == name)
            .filter_map(|p| match p {
                PolicyProblem::UnservedL7 { reason, .. } => Some(reason.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_waypoint_per_service_account_of_the_targeted_workloads() {
        let t = run(&cluster("", "", "ratings", &format!("{ROUTE}{POLICY}")));
        assert_eq!(keys(&t), ["shop/ratings-waypoint", "shop/reviews-waypoint"]);
        let w = &t.on_demand.waypoints[&ObjectKey::new("shop", "ratings-waypoint")];
        assert_eq!(w.service_account, "ratings");
        assert_eq!(
            w.needed_by_annotation(),
            "AuthorizationPolicy shop/deny-delete,HTTPRoute shop/reviews"
        );
        let gateway: gateway_api::gateways::Gateway = serde_json::from_value(w.gateway()).unwrap();
        assert_eq!(gateway.spec.gateway_class_name, "istio-waypoint");
        assert!(is_on_demand(&gateway));
        let annotations = gateway.metadata.annotations.unwrap();
        assert_eq!(annotations[labels::FOR_SERVICE_ACCOUNT], "ratings");
        let listener = &gateway.spec.listeners[0];
        assert_eq!(
            (listener.port, listener.protocol.as_str()),
            (15008, "HBONE")
        );
        // A Service of two accounts cannot be bound to either: its rules say so.
        assert_eq!(
            reasons(&t, "reviews"),
            [
                "Service shop/reviews selects workloads of more than one ServiceAccount: the waypoints created on demand for its ServiceAccounts (shop/ratings-waypoint, shop/reviews-waypoint) serve its workloads, and no per-ServiceAccount waypoint can serve the Service itself; bind it to a waypoint with the istio.io/use-waypoint label"
            ]
        );
    }

    #[test]
    fn one_account_one_waypoint_and_the_rule_says_it_is_coming() {
        let t = run(&cluster("", "", "reviews", ROUTE));
        assert_eq!(keys(&t), ["shop/reviews-waypoint"]);
        assert_eq!(
            reasons(&t, "reviews"),
            [
                "Service shop/reviews is not bound to a waypoint yet; istiod-rs is creating waypoint shop/reviews-waypoint on demand"
            ]
        );
    }

    #[test]
    fn the_waypoint_stays_planned_once_it_exists_and_serves_the_service() {
        let gateway = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: reviews-waypoint
  namespace: shop
  labels: {istio-rs.io/on-demand-waypoint: "true"}
  annotations: {istio.io/for-service-account: reviews}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: reviews-waypoint.shop.svc.cluster.local}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: reviews-waypoint}}
spec: {nodeName: node-a, serviceAccountName: reviews-waypoint, containers: [{name: waypoint, image: waypoint}]}
status: {phase: Running, podIP: 10.40.0.100, conditions: [{type: Ready, status: "True"}]}
"#;
        let t = run(&cluster("", "", "reviews", &format!("{ROUTE}{gateway}")));
        assert_eq!(keys(&t), ["shop/reviews-waypoint"]);
        assert_eq!(reasons(&t, "reviews"), Vec::<String>::new());
        let rule =
            t.l7.iter()
                .find(|r| r.object.key.name == "reviews")
                .unwrap();
        assert_eq!(
            rule.targets[0].serving,
            Ok("shop/reviews-waypoint".to_string())
        );
    }

    #[test]
    fn a_namespace_that_opts_out_gets_none_and_the_rule_says_so() {
        let t = run(&cluster(
            "istio.io/auto-waypoint: disabled",
            "",
            "reviews",
            ROUTE,
        ));
        assert!(t.on_demand.waypoints.is_empty());
        assert_eq!(
            reasons(&t, "reviews"),
            [
                "Service shop/reviews is not bound to a waypoint, and waypoints on demand are disabled in namespace shop (label istio.io/auto-waypoint: disabled)"
            ]
        );
        let rule =
            t.l7.iter()
                .find(|r| r.object.key.name == "reviews")
                .unwrap();
        assert!(rule.deny_key.is_some(), "still denied at L4");
    }

    #[test]
    fn a_user_gateway_of_that_name_is_never_replaced() {
        let taken = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: reviews-waypoint, namespace: shop}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
"#;
        let t = run(&cluster("", "", "reviews", &format!("{ROUTE}{taken}")));
        assert!(t.on_demand.waypoints.is_empty());
        let taken_key = ObjectKey::new("shop", "reviews-waypoint");
        assert_eq!(
            t.on_demand.name_taken[&taken_key]
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["HTTPRoute shop/reviews"]
        );
        assert_eq!(
            reasons(&t, "reviews"),
            [
                "Service shop/reviews is not bound to a waypoint, and the on-demand waypoint cannot be created: Gateway shop/reviews-waypoint exists and was not created on demand"
            ]
        );
    }

    #[test]
    fn a_waypoint_a_user_bound_means_none() {
        let mine = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: mine, namespace: shop, annotations: {istio.io/for-service-account: reviews}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;
        // The Service's label, the namespace's (even `none`), a waypoint
        // for the account (not ready yet: intent decides).
        for state in [
            cluster("", "istio.io/use-waypoint: mine", "reviews", ROUTE),
            cluster("istio.io/use-waypoint: mine", "", "reviews", ROUTE),
            cluster("istio.io/use-waypoint: none", "", "reviews", ROUTE),
            cluster("", "", "reviews", &format!("{ROUTE}{mine}")),
        ] {
            assert!(run(&state).on_demand.waypoints.is_empty());
        }
        // Only the account without a waypoint of its own gets one; the
        // Service, of two accounts, is bound to neither.
        let t = run(&cluster("", "", "ratings", &format!("{ROUTE}{mine}")));
        assert_eq!(keys(&t), ["shop/ratings-waypoint"]);
        assert_eq!(
            reasons(&t, "reviews"),
            [
                "Service shop/reviews selects workloads of more than one ServiceAccount: the waypoints created on demand for its ServiceAccounts (shop/ratings-waypoint) serve its workloads, and no per-ServiceAccount waypoint can serve the Service itself; bind it to a waypoint with the istio.io/use-waypoint label"
            ]
        );
    }

    #[test]
    fn no_rule_no_waypoint() {
        assert!(
            run(&cluster("", "", "ratings", ""))
                .on_demand
                .waypoints
                .is_empty()
        );
        // Nor for workloads outside the mesh, nor with the plan turned off.
        let mut state = cluster("", "", "reviews", ROUTE);
        let shop = ObjectKey::cluster("shop");
        let mut ns = state.namespaces[&shop].as_ref().clone();
        ns.metadata.labels = None;
        state.namespaces.insert(shop, std::sync::Arc::new(ns));
        assert!(run(&state).on_demand.waypoints.is_empty());
        let off = MeshConfig {
            on_demand_waypoints: false,
            ..MeshConfig::default()
        };
        let t = translate(&cluster("", "", "reviews", ROUTE), &off);
        assert!(t.on_demand.waypoints.is_empty());
        assert_eq!(
            reasons(&t, "reviews"),
            ["Service shop/reviews is not bound to a waypoint"]
        );
    }
}
