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
//! namespace) that exists, is in the mesh (some pod behind it is enrolled,
//! as `workloads::enrolled` decides; with no pod yet, its namespace is
//! labelled ambient) and that no binding a user made serves: neither the
//! Service nor its namespace carries `istio.io/use-waypoint`, and no
//! waypoint a user annotated `istio.io/for-service-account` serves its
//! account. The pods behind it that are not finished decide which
//! waypoint: all of one ServiceAccount -> one Gateway for that account,
//! named [`api::labels::on_demand_waypoint_name`], which then also serves
//! the account's workloads; several (or none yet) -> one Gateway for the
//! Service alone, named [`api::labels::on_demand_service_waypoint_name`]
//! (no per-account waypoint could serve it). A namespace labelled
//! `istio.io/auto-waypoint: disabled` gets none. A Gateway of that name that
//! istiod-rs did not make, or one planned to serve something else, is never
//! replaced. A Gateway no rule needs is not planned, so the sink drains and
//! removes it.
//!
//! A rule attached by selector or namespace (see `l7.rs`) needs, for each
//! (namespace, ServiceAccount) of the workloads it covers whose own traffic
//! no user binding serves (`Traffic::Workload`), that account's waypoint
//! (which serves its workloads and the services whose pods all run as it);
//! and, for each Service with a covered endpoint, what a Service target
//! needs (the account's waypoint, or one for the Service when its pods run
//! as several accounts). The same naming, holding and opting out apply.
//!
//! A user's binding wins once its waypoint has a ready instance. Until then
//! (it is being created, or not yet named right) the on-demand waypoint that
//! exists stays planned and bound (see `waypoints.rs`), and none is created:
//! replacing an automatic waypoint with one's own refuses no request. `none`
//! wins at once.
//!
//! Where a target is not bound yet, its reason says what is happening
//! ([`Unserved::OnDemandPending`], [`Unserved::AutoWaypointDisabled`],
//! [`Unserved::OnDemandNameTaken`]); it stays denied at L4 until the
//! waypoint is ready, as any unserved rule.

use std::collections::{BTreeMap, BTreeSet};

use api::labels;
use api::manifest::ObjectKey;
use gateway_api::gateways::Gateway;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::l7::{Attachment, L7Rule};
use super::problem::{PolicyRef, Unserved};
use super::selectors::labels_of;
use super::services::Services;
use super::waypoints::{Traffic, UserBinding, Waypoints, is_on_demand};
use super::workloads;
use crate::state::{ClusterState, in_namespace, pod_is_terminal, pod_service_account};

/// Whom an on-demand waypoint serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serves {
    /// The workloads of a ServiceAccount, and the services whose workloads
    /// all run as it (annotation `istio.io/for-service-account`).
    Account(String),
    /// One service whose workloads run as several ServiceAccounts, or as
    /// none yet (annotation `istio-rs.io/for-service`, label
    /// `istio.io/waypoint-for: service`).
    Service(String),
}

impl std::fmt::Display for Serves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Serves::Account(sa) => write!(f, "ServiceAccount {sa}"),
            Serves::Service(name) => write!(f, "Service {name}"),
        }
    }
}

/// One waypoint Gateway istiod-rs should have created on demand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnDemandWaypoint {
    pub key: ObjectKey,
    pub serves: Serves,
    /// The rules that need it; empty while it drains before its deletion.
    pub needed_by: BTreeSet<PolicyRef>,
}

impl OnDemandWaypoint {
    /// What an on-demand Gateway of the cluster serves, read back from its
    /// annotations, with no rule needing it (to drain it).
    pub fn draining(key: &ObjectKey, gw: &Gateway) -> Option<OnDemandWaypoint> {
        let annotations = labels_of(&gw.metadata.annotations);
        let serves = match (
            annotations.get(labels::FOR_SERVICE_ACCOUNT),
            annotations.get(labels::FOR_SERVICE),
        ) {
            (Some(sa), _) => Serves::Account(sa.clone()),
            (None, Some(service)) => Serves::Service(service.clone()),
            (None, None) => return None,
        };
        Some(OnDemandWaypoint {
            key: key.clone(),
            serves,
            needed_by: BTreeSet::new(),
        })
    }

    /// `Kind ns/name` of each rule needing it, sorted, joined by `,`: the
    /// `istio-rs.io/needed-by` annotation.
    pub fn needed_by_annotation(&self) -> String {
        let mut rules: Vec<String> = self.needed_by.iter().map(ToString::to_string).collect();
        rules.sort();
        rules.join(",")
    }

    /// The Gateway: class `istio-waypoint`, labelled
    /// `istio-rs.io/on-demand-waypoint: "true"`, annotated with whom it
    /// serves and `istio-rs.io/needed-by`, one listener `mesh`, HBONE on
    /// 15008: the listener upstream's `istioctl waypoint generate` writes
    /// (`makeGateway`, istioctl/pkg/waypoint/waypoint.go).
    pub fn gateway(&self) -> Value {
        let mut labels = json!({labels::ON_DEMAND_WAYPOINT: labels::ON_DEMAND_WAYPOINT_VALUE});
        let mut annotations = json!({labels::NEEDED_BY: self.needed_by_annotation()});
        match &self.serves {
            Serves::Account(sa) => annotations[labels::FOR_SERVICE_ACCOUNT] = json!(sa),
            Serves::Service(name) => {
                annotations[labels::FOR_SERVICE] = json!(name);
                labels[labels::WAYPOINT_FOR] = json!("service");
            }
        }
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": self.key.name,
                "namespace": self.key.namespace,
                "labels": labels,
                "annotations": annotations,
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
    /// Names taken by a Gateway istiod-rs did not create (or by an
    /// on-demand one serving something else), with the rules that needed
    /// them.
    pub name_taken: BTreeMap<ObjectKey, BTreeSet<PolicyRef>>,
}

/// What a service, or the covered workloads of an account, need.
enum Need {
    /// Waypoints on demand are disabled in its namespace.
    Disabled(String),
    /// This on-demand waypoint, whose name is free.
    Waypoint(ObjectKey),
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
    // The services that need one, with the rules needing them; and the
    // covered workloads of rules attached by selector or namespace, by
    // (namespace, account).
    let mut wanted: BTreeMap<usize, BTreeSet<PolicyRef>> = BTreeMap::new();
    let mut wanted_accounts: BTreeMap<(&str, &str), Wanted<'_>> = BTreeMap::new();
    for rule in rules.iter() {
        if let Some(coverage) = rule.coverage() {
            for &i in &coverage.services {
                wanted.entry(i).or_default().insert(rule.object.clone());
            }
            for key in &coverage.workloads {
                let Some(pod) = state.pods.get(key) else {
                    continue;
                };
                let account = (key.namespace.as_str(), pod_service_account(pod));
                let w = wanted_accounts.entry(account).or_default();
                w.pods.push(pod);
                w.needed_by.insert(rule.object.clone());
            }
            continue;
        }
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
    if wanted.is_empty() && wanted_accounts.is_empty() {
        return OnDemandPlan::default();
    }
    // Per-account waypoints users made, with an address or not yet: intent.
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
        // The accounts behind the Service, and whether it is in the mesh:
        // some workload behind it is enrolled, or (none yet) its namespace.
        let mut accounts = BTreeSet::new();
        let mut any_enrolled = false;
        for pod in in_namespace(&state.pods, namespace) {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let pod_labels = labels_of(&pod.metadata.labels);
            if pod_is_terminal(pod) || !services.backed_by(namespace, name, pod_labels).contains(&i)
            {
                continue;
            }
            accounts.insert(pod_service_account(pod));
            any_enrolled |= workloads::enrolled(state, waypoints, namespace, pod);
        }
        let enrolled = if accounts.is_empty() {
            labels_of(&ns.metadata.labels)
                .get(labels::DATAPLANE_MODE)
                .is_some_and(|m| m == labels::DATAPLANE_MODE_AMBIENT)
        } else {
            any_enrolled
        };
        if !enrolled {
            continue;
        }
        let single = (accounts.len() == 1).then(|| *accounts.first().expect("one"));
        // A user's binding wins once its waypoint is ready; until then the
        // on-demand waypoint that exists keeps serving, and none is created.
        let Some(hold) = hold(
            waypoints.user_binding(state, namespace, entry.labels(), single, Traffic::Service),
            single,
            namespace,
            &users_per_account,
        ) else {
            continue;
        };
        let (key, serves) = match single {
            Some(sa) => (
                ObjectKey::new(namespace, labels::on_demand_waypoint_name(sa)),
                Serves::Account(sa.to_string()),
            ),
            None => (
                ObjectKey::new(
                    namespace,
                    labels::on_demand_service_waypoint_name(&entry.proto.name),
                ),
                Serves::Service(entry.proto.name.clone()),
            ),
        };
        if let Some(need) = decide(&mut plan, state, key, serves, hold, &needed_by) {
            needs.insert(i, need);
        }
    }
    // The covered workloads of an account: its waypoint, unless every one
    // of them is served by a user's binding (or opts out).
    let mut account_needs: BTreeMap<(String, String), Need> = BTreeMap::new();
    for ((namespace, sa), w) in wanted_accounts {
        let holds: Vec<bool> = w
            .pods
            .iter()
            .filter_map(|pod| {
                let user = waypoints.user_binding(
                    state,
                    namespace,
                    labels_of(&pod.metadata.labels),
                    Some(sa),
                    Traffic::Workload,
                );
                hold(user, Some(sa), namespace, &users_per_account)
            })
            .collect();
        if holds.is_empty() {
            continue;
        }
        let key = ObjectKey::new(namespace, labels::on_demand_waypoint_name(sa));
        let serves = Serves::Account(sa.to_string());
        let hold = holds.iter().all(|h| *h);
        if let Some(need) = decide(&mut plan, state, key, serves, hold, &w.needed_by) {
            account_needs.insert((namespace.to_string(), sa.to_string()), need);
        }
    }
    for t in rules.iter_mut().flat_map(|r| r.targets.iter_mut()) {
        let Err(Unserved::NotBound { target }) = &t.serving else {
            continue;
        };
        let need = match (t.service(), t.account()) {
            (Some(i), _) => needs.get(&i),
            (None, Some((ns, sa))) => account_needs.get(&(ns.to_string(), sa.to_string())),
            (None, None) => None,
        };
        let target = target.clone();
        t.serving = Err(match need {
            None => continue,
            Some(Need::Disabled(namespace)) => Unserved::AutoWaypointDisabled {
                target,
                namespace: namespace.clone(),
            },
            Some(Need::NameTaken(key)) => Unserved::OnDemandNameTaken {
                target,
                gateway: key.to_string(),
            },
            Some(Need::Waypoint(key)) => Unserved::OnDemandPending {
                target,
                waypoint: key.to_string(),
            },
        });
    }
    plan
}

/// The covered workloads of one account and the rules covering them.
#[derive(Default)]
struct Wanted<'a> {
    pods: Vec<&'a Pod>,
    needed_by: BTreeSet<PolicyRef>,
}

/// What the bindings a user made mean for an on-demand waypoint: `None`,
/// none is wanted (opted out, or a user's waypoint is ready); `Some(true)`,
/// hold: one that exists keeps serving but none is created (a user's
/// waypoint is named but not ready, or one is annotated for the account);
/// `Some(false)`, one is wanted.
fn hold(
    user: UserBinding<'_>,
    single: Option<&str>,
    namespace: &str,
    users_per_account: &BTreeSet<(&str, &str)>,
) -> Option<bool> {
    match user {
        UserBinding::OptOut => None,
        UserBinding::Bound(w) if w.ready => None,
        // A user's waypoint for the account that has no address yet.
        UserBinding::Unset => {
            Some(single.is_some_and(|sa| users_per_account.contains(&(namespace, sa))))
        }
        UserBinding::Bound(_) | UserBinding::Unusable => Some(true),
    }
}

/// Plans the on-demand waypoint `key` serving `serves` for `needed_by`, or
/// says why it cannot be: `None` while held (see [`hold`]), when the one
/// that exists stays planned and none is created.
fn decide(
    plan: &mut OnDemandPlan,
    state: &ClusterState,
    key: ObjectKey,
    serves: Serves,
    hold: bool,
    needed_by: &BTreeSet<PolicyRef>,
) -> Option<Need> {
    let existing = state.gateways.get(&key);
    if hold {
        if existing.is_some_and(|gw| is_on_demand(gw)) {
            add(plan, key, serves, needed_by);
        }
        return None;
    }
    let disabled = state.namespace(&key.namespace).is_some_and(|ns| {
        labels_of(&ns.metadata.labels)
            .get(labels::AUTO_WAYPOINT)
            .is_some_and(|v| v == labels::AUTO_WAYPOINT_DISABLED)
    });
    if disabled {
        return Some(Need::Disabled(key.namespace));
    }
    Some(match existing {
        Some(gw) if !is_on_demand(gw) => {
            plan.name_taken
                .entry(key.clone())
                .or_default()
                .extend(needed_by.iter().cloned());
            Need::NameTaken(key)
        }
        _ if add(plan, key.clone(), serves, needed_by) => Need::Waypoint(key),
        _ => Need::NameTaken(key),
    })
}

/// Adds the rules `needed_by` to the planned waypoint `key` serving
/// `serves`; false when that name is planned for something else.
fn add(
    plan: &mut OnDemandPlan,
    key: ObjectKey,
    serves: Serves,
    needed_by: &BTreeSet<PolicyRef>,
) -> bool {
    let w = plan
        .waypoints
        .entry(key.clone())
        .or_insert_with(|| OnDemandWaypoint {
            key: key.clone(),
            serves: serves.clone(),
            needed_by: BTreeSet::new(),
        });
    if w.serves != serves {
        plan.name_taken
            .entry(key)
            .or_default()
            .extend(needed_by.iter().cloned());
        return false;
    }
    w.needed_by.extend(needed_by.iter().cloned());
    true
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
    fn a_service_of_one_account_gets_that_accounts_waypoint() {
        let t = run(&cluster("", "", "reviews", &format!("{ROUTE}{POLICY}")));
        assert_eq!(keys(&t), ["shop/reviews-waypoint"]);
        let w = &t.on_demand.waypoints[&ObjectKey::new("shop", "reviews-waypoint")];
        assert_eq!(w.serves, Serves::Account("reviews".into()));
        assert_eq!(
            w.needed_by_annotation(),
            "AuthorizationPolicy shop/deny-delete,HTTPRoute shop/reviews"
        );
        let gateway: Gateway = serde_json::from_value(w.gateway()).unwrap();
        assert_eq!(gateway.spec.gateway_class_name, "istio-waypoint");
        assert!(is_on_demand(&gateway));
        let annotations = gateway.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[labels::FOR_SERVICE_ACCOUNT], "reviews");
        assert!(!annotations.contains_key(labels::FOR_SERVICE));
        let listener = &gateway.spec.listeners[0];
        assert_eq!(
            (listener.port, listener.protocol.as_str()),
            (15008, "HBONE")
        );
        // What the sink drains it as, read back from the Gateway.
        let drained = OnDemandWaypoint::draining(&w.key, &gateway).unwrap();
        assert_eq!((&drained.serves, drained.needed_by.len()), (&w.serves, 0));
    }

    #[test]
    fn a_service_of_several_accounts_gets_a_waypoint_of_its_own() {
        let t = run(&cluster("", "", "ratings", &format!("{ROUTE}{POLICY}")));
        assert_eq!(keys(&t), ["shop/waypoint-svc-reviews"]);
        let w = &t.on_demand.waypoints[&ObjectKey::new("shop", "waypoint-svc-reviews")];
        assert_eq!(w.serves, Serves::Service("reviews".into()));
        let gateway: Gateway = serde_json::from_value(w.gateway()).unwrap();
        let annotations = gateway.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[labels::FOR_SERVICE], "reviews");
        assert!(!annotations.contains_key(labels::FOR_SERVICE_ACCOUNT));
        assert_eq!(
            gateway.metadata.labels.clone().unwrap()[labels::WAYPOINT_FOR],
            "service"
        );
        assert_eq!(
            reasons(&t, "reviews"),
            [
                "Service shop/reviews is not bound to a waypoint yet; istiod-rs is creating waypoint shop/waypoint-svc-reviews on demand"
            ]
        );
        // Once it exists and is ready, it serves the Service.
        let ready = format!(
            "---\n{}\n{}",
            serde_json::to_string(&w.gateway()).unwrap(),
            instance("waypoint-svc-reviews")
        );
        let t = run(&cluster("", "", "ratings", &format!("{ROUTE}{ready}")));
        let rule =
            t.l7.iter()
                .find(|r| r.object.key.name == "reviews")
                .unwrap();
        assert_eq!(
            rule.targets[0].serving,
            Ok("shop/waypoint-svc-reviews".to_string())
        );
    }

    /// A ready instance of waypoint `name` with its Service (standing for
    /// what the provisioner makes).
    fn instance(name: &str) -> String {
        format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: {name}, gateway.istio.io/managed: istio.io-mesh-controller}}}}
spec: {{clusterIP: 10.96.0.99, ports: [{{name: mesh, port: 15008}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-0, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: {name}}}}}
spec: {{nodeName: node-a, serviceAccountName: {name}, containers: [{{name: waypoint, image: waypoint}}]}}
status: {{phase: Running, podIP: 10.40.0.{ip}, conditions: [{{type: Ready, status: "True"}}]}}
"#,
            ip = 100 + name.len()
        )
    }

    #[test]
    fn the_on_demand_waypoint_stays_until_the_users_replacement_is_ready() {
        let on_demand = OnDemandWaypoint {
            key: ObjectKey::new("shop", "reviews-waypoint"),
            serves: Serves::Account("reviews".into()),
            needed_by: BTreeSet::from([PolicyRef {
                kind: api::manifest::Kind::HttpRoute,
                key: ObjectKey::new("shop", "reviews"),
            }]),
        };
        let existing = format!(
            "---\n{}\n{}",
            serde_json::to_string(&on_demand.gateway()).unwrap(),
            instance("reviews-waypoint")
        );
        let mine = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: mine, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;
        let label = "istio.io/use-waypoint: mine";
        let served_by = |t: &Translation| {
            let rule =
                t.l7.iter()
                    .find(|r| r.object.key.name == "reviews")
                    .unwrap();
            rule.targets[0].serving.clone()
        };
        // The user's waypoint is named but not there, then there but not
        // ready: the on-demand one stays planned and serving.
        for user in ["", mine] {
            let t = run(&cluster(
                "",
                label,
                "reviews",
                &format!("{ROUTE}{existing}{user}"),
            ));
            assert_eq!(keys(&t), ["shop/reviews-waypoint"]);
            assert_eq!(served_by(&t), Ok("shop/reviews-waypoint".to_string()));
        }
        // Ready: it serves, and the on-demand one is no longer planned.
        let ready = format!("{ROUTE}{existing}{mine}{}", instance("mine"));
        let t = run(&cluster("", label, "reviews", &ready));
        assert!(keys(&t).is_empty());
        assert_eq!(served_by(&t), Ok("shop/mine".to_string()));
        // Nothing is created for a user's binding that is not ready.
        let t = run(&cluster("", label, "reviews", &format!("{ROUTE}{mine}")));
        assert!(keys(&t).is_empty());
        // `none` wins at once.
        let t = run(&cluster(
            "",
            "istio.io/use-waypoint: none",
            "reviews",
            &format!("{ROUTE}{existing}"),
        ));
        assert!(keys(&t).is_empty());
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
  annotations: {istio.io/for-service-account: reviews, istio-rs.io/needed-by: HTTPRoute shop/reviews}
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
                "Service shop/reviews is not bound to a waypoint, and the on-demand waypoint cannot be created: Gateway shop/reviews-waypoint exists and was not created on demand for it"
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
        // A Service of two accounts, one with a user's waypoint: that
        // waypoint serves only its account, so the Service gets its own.
        let t = run(&cluster("", "", "ratings", &format!("{ROUTE}{mine}")));
        assert_eq!(keys(&t), ["shop/waypoint-svc-reviews"]);
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

    // Rules attached by selector or namespace (l7.rs): waypoints on demand
    // for the workloads they cover, enforced there, and the L4 form exempting
    // only the waypoints that enforce them.

    use api::l7::Waypoint as WaypointConfig;
    use api::security::{Authorization, Clause, Match, Rule, StringMatch};
    use api::type_url;
    use prost::Message;

    const PATHS_ALLOW: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-only, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {paths: ["/api/*"]}}]}]
"#;

    fn snapshot_resource<M: Message + Default>(t: &Translation, url: &str, key: &str) -> M {
        let r = t
            .snapshot
            .of_type(url)
            .get(key)
            .unwrap_or_else(|| panic!("no {url} {key}"));
        M::decode(r.body.value.as_slice()).unwrap()
    }

    fn authorization(t: &Translation, key: &str) -> Authorization {
        snapshot_resource(t, type_url::AUTHORIZATION, key)
    }

    fn waypoint_config(t: &Translation, key: &str) -> WaypointConfig {
        snapshot_resource(t, type_url::WAYPOINT, key)
    }

    fn principal(p: &str) -> StringMatch {
        StringMatch {
            match_type: Some(api::security::string_match::MatchType::Exact(p.to_string())),
        }
    }

    /// `cluster(..)` plus every waypoint the plan asks for, each with a
    /// ready instance (`ready`) or one not ready yet.
    fn with_planned(ns_labels: &str, v2_account: &str, extra: &str, ready: bool) -> ClusterState {
        let t = run(&cluster(ns_labels, "", v2_account, extra));
        let mut more = extra.to_string();
        for w in t.on_demand.waypoints.values() {
            let mut inst = instance(&w.key.name);
            if !ready {
                inst = inst.replace(r#"status: "True""#, r#"status: "False""#);
            }
            more.push_str(&format!(
                "---\n{}\n{inst}",
                serde_json::to_string(&w.gateway()).unwrap()
            ));
        }
        cluster(ns_labels, "", v2_account, &more)
    }

    fn rule<'a>(t: &'a Translation, name: &str) -> &'a L7Rule {
        t.l7.iter().find(|r| r.object.key.name == name).unwrap()
    }

    #[test]
    fn a_selector_allow_with_paths_gets_the_accounts_waypoint_and_its_l4_form_until_ready() {
        // No waypoint: one is planned for the account, and the L4 form
        // (the HTTP rule matches nothing) admits no one.
        let t = run(&cluster("", "", "reviews", PATHS_ALLOW));
        assert_eq!(keys(&t), ["shop/reviews-waypoint"]);
        let w = &t.on_demand.waypoints[&ObjectKey::new("shop", "reviews-waypoint")];
        assert_eq!(
            w.needed_by_annotation(),
            "AuthorizationPolicy shop/api-only"
        );
        let a = authorization(&t, "shop/api-only");
        assert!(a.rules.is_empty(), "{a:?}");
        assert!(rule(&t, "api-only").enforced_by.is_empty());
        assert_eq!(
            reasons(&t, "api-only"),
            [
                "ServiceAccount shop/reviews is not bound to a waypoint yet; istiod-rs is creating waypoint shop/reviews-waypoint on demand",
                "Service shop/reviews is not bound to a waypoint yet; istiod-rs is creating waypoint shop/reviews-waypoint on demand",
            ]
        );

        // The waypoint exists, its instance is not ready: still no exemption.
        let t = run(&with_planned("", "reviews", PATHS_ALLOW, false));
        assert!(authorization(&t, "shop/api-only").rules.is_empty());
        assert!(rule(&t, "api-only").enforced_by.is_empty());
        assert!(
            reasons(&t, "api-only")
                .iter()
                .all(|r| r.contains("which has no ready instance yet")),
            "{:?}",
            reasons(&t, "api-only")
        );

        // Ready: the waypoint enforces it for the workloads and the Service
        // of that one account, and the L4 form admits the waypoint.
        let t = run(&with_planned("", "reviews", PATHS_ALLOW, true));
        assert_eq!(keys(&t), ["shop/reviews-waypoint"]);
        assert!(reasons(&t, "api-only").is_empty());
        let r = rule(&t, "api-only");
        assert_eq!(r.enforced_by, ["shop/reviews-waypoint"]);
        assert!(r.served());
        let config = waypoint_config(&t, "shop/reviews-waypoint");
        assert_eq!(config.workloads.len(), 2);
        for w in &config.workloads {
            assert_eq!(w.authorizations, ["shop/api-only"], "{}", w.uid);
        }
        assert_eq!(config.services.len(), 1);
        assert_eq!(config.services[0].authorizations, ["shop/api-only"]);
        assert!(
            t.snapshot
                .of_type(type_url::HTTP_AUTHORIZATION)
                .contains_key("shop/api-only")
        );
        let a = authorization(&t, "shop/api-only");
        assert_eq!(
            a.rules,
            [Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        principals: vec![principal("cluster.local/ns/shop/sa/reviews-waypoint")],
                        ..Match::default()
                    }],
                }],
            }]
        );
        // Its problem no longer claims the HTTP rules match nothing.
        let problem = t
            .problems
            .iter()
            .find(|p| matches!(p, PolicyProblem::HttpAttributes { .. }))
            .unwrap()
            .to_string();
        assert!(
            problem
                .contains("waypoint(s) shop/reviews-waypoint enforce it with its HTTP attributes"),
            "{problem}"
        );
        let state = with_planned("", "reviews", PATHS_ALLOW, true);
        let statuses = crate::status::desired(&state, &run(&state));
        let Some(crate::status::ObjectStatus::Conditions(c)) = statuses.get(&PolicyRef::new(
            api::manifest::Kind::AuthorizationPolicy,
            "shop",
            "api-only",
        )) else {
            panic!("no status");
        };
        assert_eq!(
            (c[0].type_.as_str(), c[0].status, c[0].reason.as_str()),
            ("ZtunnelAccepted", true, "Accepted")
        );
    }

    #[test]
    fn a_selector_deny_spares_only_the_enforcing_waypoint() {
        let deny = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{from: [{source: {namespaces: [other]}}], to: [{operation: {paths: ["/admin"]}}]}]
"#;
        let not_waypoint = Clause {
            matches: vec![Match {
                not_principals: vec![principal("cluster.local/ns/shop/sa/reviews-waypoint")],
                ..Match::default()
            }],
        };
        let t = run(&cluster("", "", "reviews", deny));
        let before = authorization(&t, "shop/no-admin");
        assert_eq!(before.rules.len(), 1);
        assert!(!before.rules[0].clauses.contains(&not_waypoint));
        let t = run(&with_planned("", "reviews", deny, true));
        let after = authorization(&t, "shop/no-admin");
        let mut want = before.rules[0].clauses.clone();
        want.push(not_waypoint);
        assert_eq!(after.rules, [Rule { clauses: want }]);
    }

    const NAMESPACE_JWT: &str = r#"---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  jwtRules: [{issuer: https://issuer.example, jwks: '{"keys":[]}'}]
"#;

    #[test]
    fn a_namespace_request_authentication_gets_a_waypoint_per_account_and_exempts_exactly_them() {
        let t = run(&cluster("", "", "ratings", NAMESPACE_JWT));
        assert_eq!(
            keys(&t),
            [
                "shop/ratings-waypoint",
                "shop/reviews-waypoint",
                "shop/waypoint-svc-reviews"
            ]
        );
        let stand_in = "shop/unserved_l7_requestauthentication_jwt";
        assert_eq!(
            authorization(&t, stand_in).rules,
            [Rule { clauses: vec![] }]
        );
        let t = run(&with_planned("", "ratings", NAMESPACE_JWT, true));
        let r = rule(&t, "jwt");
        assert!(r.served(), "{:?}", reasons(&t, "jwt"));
        assert_eq!(
            r.enforced_by,
            [
                "shop/ratings-waypoint",
                "shop/reviews-waypoint",
                "shop/waypoint-svc-reviews"
            ]
        );
        for (waypoint, workloads, services) in [
            ("shop/ratings-waypoint", 1, 0),
            ("shop/reviews-waypoint", 1, 0),
            ("shop/waypoint-svc-reviews", 0, 1),
        ] {
            let config = waypoint_config(&t, waypoint);
            assert_eq!(config.workloads.len(), workloads, "{waypoint}");
            assert_eq!(config.services.len(), services, "{waypoint}");
            for w in &config.workloads {
                assert_eq!(w.authentications, ["shop/jwt"], "{waypoint}");
            }
            for s in &config.services {
                assert_eq!(s.authentications, ["shop/jwt"], "{waypoint}");
            }
        }
        assert!(
            t.snapshot
                .of_type(type_url::JWT_AUTHENTICATION)
                .contains_key("shop/jwt")
        );
        // Still listed by the covered workloads, sparing only the waypoints.
        assert_eq!(
            authorization(&t, stand_in).rules,
            [Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        not_principals: vec![
                            principal("cluster.local/ns/shop/sa/ratings-waypoint"),
                            principal("cluster.local/ns/shop/sa/reviews-waypoint"),
                            principal("cluster.local/ns/shop/sa/waypoint-svc-reviews"),
                        ],
                        ..Match::default()
                    }],
                }],
            }]
        );
        assert_eq!(r.deny_key.as_deref(), Some(stand_in));
    }

    #[test]
    fn a_route_on_another_service_to_a_covered_backend_carries_the_rule() {
        // `front` (account front, not covered) routes to `reviews` (covered).
        let front = r#"---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: shop}
spec: {selector: {app: front}, clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: front-0, namespace: shop, labels: {app: front}}
spec: {nodeName: node-a, serviceAccountName: front, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.40.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: front, port: 80}]
  rules: [{backendRefs: [{name: reviews, port: 80}]}]
"#;
        let t = run(&with_planned(
            "",
            "reviews",
            &format!("{front}{PATHS_ALLOW}"),
            true,
        ));
        let config = waypoint_config(&t, "shop/front-waypoint");
        let served = config
            .services
            .iter()
            .find(|s| s.hostname.starts_with("front."))
            .unwrap();
        assert_eq!(served.authorizations, ["shop/api-only"]);
        assert_eq!(
            rule(&t, "api-only").enforced_by,
            ["shop/front-waypoint", "shop/reviews-waypoint"]
        );
        // Every request of front reaches reviews: nothing stricter to say.
        assert!(
            !t.problems
                .iter()
                .any(|p| matches!(p, PolicyProblem::AppliedToWholeService { .. })),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn a_service_with_an_endpoint_the_rule_does_not_cover_is_checked_whole_and_says_so() {
        // Only reviews-v3 (account reviews) is covered; v1 and v2 are not.
        let policy = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-only, namespace: shop}
spec:
  selector: {matchLabels: {tier: checked}}
  rules: [{to: [{operation: {paths: ["/api/*"]}}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v3, namespace: shop, labels: {app: reviews, tier: checked}}
spec: {nodeName: node-a, serviceAccountName: reviews, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.40.0.3, conditions: [{type: Ready, status: "True"}]}
"#;
        let t = run(&with_planned("", "ratings", policy, true));
        // Service of two accounts: its own waypoint; the covered account's.
        assert_eq!(
            keys(&t),
            ["shop/reviews-waypoint", "shop/waypoint-svc-reviews"]
        );
        let config = waypoint_config(&t, "shop/waypoint-svc-reviews");
        assert_eq!(config.services[0].authorizations, ["shop/api-only"]);
        let wider: Vec<String> = t
            .problems
            .iter()
            .filter(|p| matches!(p, PolicyProblem::AppliedToWholeService { .. }))
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            wider,
            [
                "AuthorizationPolicy shop/api-only: at Service shop/reviews, it also has endpoints the rule does not cover; waypoint shop/waypoint-svc-reviews checks every request to it against the rule, which is stricter than written"
            ]
        );
        // Only the covered pod is listed as a workload.
        let config = waypoint_config(&t, "shop/reviews-waypoint");
        let listed: Vec<&str> = config
            .workloads
            .iter()
            .filter(|w| !w.authorizations.is_empty())
            .map(|w| w.uid.as_str())
            .collect();
        assert_eq!(listed, ["Kubernetes//Pod/shop/reviews-v3"]);
    }

    #[test]
    fn an_opted_out_namespace_keeps_the_l4_form_without_exemption() {
        let t = run(&cluster(
            "istio.io/auto-waypoint: disabled",
            "",
            "reviews",
            PATHS_ALLOW,
        ));
        assert!(t.on_demand.waypoints.is_empty());
        assert!(authorization(&t, "shop/api-only").rules.is_empty());
        assert_eq!(
            reasons(&t, "api-only"),
            [
                "ServiceAccount shop/reviews is not bound to a waypoint, and waypoints on demand are disabled in namespace shop (label istio.io/auto-waypoint: disabled)",
                "Service shop/reviews is not bound to a waypoint, and waypoints on demand are disabled in namespace shop (label istio.io/auto-waypoint: disabled)",
            ]
        );
        let problem = t
            .problems
            .iter()
            .find(|p| matches!(p, PolicyProblem::UnservedL7 { .. }))
            .unwrap();
        assert!(
            problem.to_string().ends_with(
                "connections to the workloads of ServiceAccount shop/reviews are held to the policy's L4 form until a waypoint serves the rule"
            ),
            "{problem}"
        );
    }

    #[test]
    fn a_users_waypoint_for_the_workloads_serves_the_rule_instead() {
        let mine = format!(
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: mine, namespace: shop, labels: {{istio.io/waypoint-for: all}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
{}{PATHS_ALLOW}"#,
            instance("mine")
        );
        let t = run(&cluster(
            "istio.io/use-waypoint: mine",
            "",
            "reviews",
            &mine,
        ));
        assert!(keys(&t).is_empty());
        let r = rule(&t, "api-only");
        assert!(r.served(), "{:?}", reasons(&t, "api-only"));
        assert_eq!(r.enforced_by, ["shop/mine"]);
        let config = waypoint_config(&t, "shop/mine");
        assert_eq!(config.workloads.len(), 2);
        assert!(
            config
                .workloads
                .iter()
                .all(|w| w.authorizations == ["shop/api-only"])
        );
        assert_eq!(
            authorization(&t, "shop/api-only").rules[0].clauses[0].matches[0].principals,
            [principal("cluster.local/ns/shop/sa/mine")]
        );
    }
}
