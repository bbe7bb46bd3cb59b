//! Status conditions: why each policy and route is (not) enforced, written
//! where the user looks.
//!
//! [`desired`] is pure: from the cluster state and a translation, the
//! conditions istiod-rs owns on every object, in upstream's terms:
//!
//! | object | condition |
//! |---|---|
//! | AuthorizationPolicy, RequestAuthentication with `targetRefs` | `WaypointAccepted` (reasons Accepted, PartiallyInvalid, Invalid, AncestorNotBound, TargetNotFound) |
//! | other AuthorizationPolicy, PeerAuthentication, RequestAuthentication | `ZtunnelAccepted` (Accepted "attached to ztunnel", or UnsupportedValue with the problems) |
//! | HTTPRoute, GRPCRoute | `status.parents[]`, one per Service parent, controller `istio.io/mesh-controller`: `Accepted` (Accepted "served by waypoint ..." with what it serves differently, NoMatchingParent, UnsupportedValue), `ResolvedRefs` (ResolvedRefs, InvalidKind, RefNotPermitted, BackendNotFound, UnsupportedValue) |
//! | DestinationRule, VirtualService | `WaypointAccepted` (Accepted; PartiallyInvalid or Invalid with the fields the waypoint does not honour) |
//! | Service bound to a waypoint, or asking for one it cannot use | `istio.io/WaypointBound`: True `WaypointAccepted` "Successfully attached to waypoint ns/name" (with upstream's ingress sentence), or False with upstream's reasons WaypointIsNotReady, AttachmentDenied, UnsupportedTrafficType; removed otherwise |
//! | ServiceEntry given VIPs (`index/ip_allocate.rs`) | `status.addresses` (`{host, value}` per VIP) |
//! | ServiceEntry asking for a waypoint (its `istio.io/use-waypoint`, else its namespace's) | `istio.io/WaypointBound` False: upstream's reasons WaypointIsNotReady, AttachmentDenied, UnsupportedTrafficType and messages; `NotSupported` (ours) when the waypoint could take it, since istiod-rs does not bind entries to waypoints; removed when it asks for none |
//!
//! Ours, not upstream's: an AuthorizationPolicy with HTTP attributes or a
//! RequestAuthentication attached by selector or namespace is enforced by
//! waypoints as well (`index/l7.rs`). It keeps `ZtunnelAccepted`: True once
//! every part of it is served (the message names the enforcing waypoints;
//! reason Accepted when nothing else is wrong), False with the reason of
//! each unserved part while its L4 form stands in for it there.
//!
//! A [`Sink`] writes them: through the Kubernetes status subresource with
//! server-side apply ([`kube`]; a ServiceEntry's addresses with a JSON
//! patch, as upstream), or in local mode as one YAML file per object
//! under `<config-dir>/generated/status/` ([`directory`]). [`spawn`] runs the
//! writer on its own task, fed by a watch channel the pipeline only ever
//! replaces: a slow or failing API server never holds up the xDS pipeline.
//! A write is made only when the object's conditions differ from what it
//! carries; a failed write is counted and retried with backoff.

pub mod directory;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::crd::service_entry::ServiceEntryAddress;
use api::manifest::{Kind, ObjectKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::index::{
    Attachment, L7Rule, PolicyProblem, PolicyRef, TargetOutcome, TargetRef, Translation, Unserved,
};
use crate::state::{ClusterState, Objects};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "istiod-rs-status";
/// The controller name on route parents: the `istio-waypoint`
/// GatewayClass's controller (upstream's ManagedGatewayMeshController).
pub const ROUTE_CONTROLLER: &str = "istio.io/mesh-controller";
/// Condition of policies enforced by ztunnel.
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";
/// Condition of policies attached to waypoints.
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";
/// The condition types istiod-rs owns on security objects.
pub const OWNED_CONDITIONS: [&str; 3] = [ZTUNNEL_ACCEPTED, WAYPOINT_ACCEPTED, WAYPOINT_BOUND];
/// Condition of a ServiceEntry that asks for a waypoint (upstream's
/// `model.WaypointBound`, written by `ServiceInfo.GetConditions` in
/// istio/istio pilot/pkg/model/service.go).
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";

/// One condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub observed_generation: Option<i64>,
}

impl Condition {
    fn new(
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> Self {
        Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.into(),
            observed_generation: generation,
        }
    }

    /// As the API carries it; `last_transition_time` when there is one.
    pub fn to_json(&self, last_transition_time: Option<&str>) -> Value {
        let mut v = json!({
            "type": self.type_,
            "status": if self.status { "True" } else { "False" },
            "reason": self.reason,
            "message": self.message,
        });
        if let Some(g) = self.observed_generation {
            v["observedGeneration"] = json!(g);
        }
        if let Some(t) = last_transition_time {
            v["lastTransitionTime"] = json!(t);
        }
        v
    }

    /// Reads a condition as the API carries it.
    pub(crate) fn from_json(v: &Value) -> Option<Condition> {
        Some(Condition {
            type_: v.get("type")?.as_str()?.to_string(),
            status: v.get("status")?.as_str()? == "True",
            reason: str_field(v, "reason"),
            message: str_field(v, "message"),
            observed_generation: v.get("observedGeneration").and_then(Value::as_i64),
        })
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// istiod-rs's entry for one parent of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteParent {
    pub parent_ref: TargetRef,
    pub conditions: Vec<Condition>,
}

/// What istiod-rs owns in one object's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectStatus {
    /// security.istio.io objects: `status.conditions` of the
    /// [`OWNED_CONDITIONS`] types.
    Conditions(Vec<Condition>),
    /// Routes: the `status.parents[]` entries of [`ROUTE_CONTROLLER`]
    /// (none: any left from before are removed).
    Parents(Vec<RouteParent>),
    /// ServiceEntries: the whole of `status.addresses` when istiod-rs gave
    /// it VIPs (`index/ip_allocate.rs`; `None`: left as it is), and the
    /// [`WAYPOINT_BOUND`] condition when it asks for a waypoint (none: any
    /// left from before is removed).
    ServiceEntry {
        addresses: Option<Vec<ServiceEntryAddress>>,
        conditions: Vec<Condition>,
    },
}

/// What istiod-rs owns in the status of every object it reads.
pub type Statuses = BTreeMap<PolicyRef, ObjectStatus>;

/// The status every policy and route should carry after `translation`.
pub fn desired(state: &ClusterState, translation: &Translation) -> Statuses {
    let mut problems: BTreeMap<&PolicyRef, Vec<&PolicyProblem>> = BTreeMap::new();
    for p in &translation.problems {
        problems.entry(p.object()).or_default().push(p);
    }
    let l7: BTreeMap<&PolicyRef, &L7Rule> = translation.l7.iter().map(|r| (&r.object, r)).collect();
    let mut out = Statuses::new();
    let mut put = |kind: Kind, key: &ObjectKey, status: ObjectStatus| {
        out.insert(
            PolicyRef {
                kind,
                key: key.clone(),
            },
            status,
        );
    };
    let of = |kind: Kind, key: &ObjectKey| {
        let object = PolicyRef {
            kind,
            key: key.clone(),
        };
        let found = problems.get(&object).cloned().unwrap_or_default();
        (l7.get(&object).copied(), found)
    };
    for (key, p) in &state.authorization_policies {
        let (rule, problems) = of(Kind::AuthorizationPolicy, key);
        let attached = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
        let dry_run = crate::index::dry_run(p);
        // Waypoints do not evaluate dry-run policies; ztunnel does (and logs).
        let not_enforced = (dry_run && attached).then_some(DRY_RUN);
        let mut condition = policy_condition(
            p.metadata.generation,
            attached,
            rule,
            &problems,
            not_enforced,
        );
        if dry_run && !attached {
            condition.message = joined(Some(DRY_RUN_ZTUNNEL), &[condition.message])
                .trim_end_matches("; ")
                .to_string();
        }
        put(
            Kind::AuthorizationPolicy,
            key,
            ObjectStatus::Conditions(vec![condition]),
        );
    }
    for (key, p) in &state.peer_authentications {
        let (_, problems) = of(Kind::PeerAuthentication, key);
        let condition = policy_condition(p.metadata.generation, false, None, &problems, None);
        put(
            Kind::PeerAuthentication,
            key,
            ObjectStatus::Conditions(vec![condition]),
        );
    }
    for (key, p) in &state.request_authentications {
        let (rule, problems) = of(Kind::RequestAuthentication, key);
        let attached = rule.is_some_and(|r| r.attachment == Attachment::TargetRefs);
        let condition = policy_condition(p.metadata.generation, attached, rule, &problems, None);
        put(
            Kind::RequestAuthentication,
            key,
            ObjectStatus::Conditions(vec![condition]),
        );
    }
    routes(
        state,
        &state.http_routes,
        Kind::HttpRoute,
        &l7,
        &problems,
        &mut put,
    );
    routes(
        state,
        &state.grpc_routes,
        Kind::GrpcRoute,
        &l7,
        &problems,
        &mut put,
    );
    let used = translated_sources(translation);
    let networking = state
        .destination_rules
        .iter()
        .map(|(k, r)| (Kind::DestinationRule, k, r.metadata.generation))
        .chain(
            state
                .virtual_services
                .iter()
                .map(|(k, v)| (Kind::VirtualService, k, v.metadata.generation)),
        );
    for (kind, key, generation) in networking {
        let (_, problems) = of(kind, key);
        let object = PolicyRef {
            kind,
            key: key.clone(),
        };
        let condition = translation_condition(generation, used.contains(&object), &problems);
        put(kind, key, ObjectStatus::Conditions(vec![condition]));
    }
    for (key, svc) in &state.services {
        let condition = translation.service_waypoint_conditions.get(key).map(|c| {
            Condition::new(
                WAYPOINT_BOUND,
                c.bound,
                c.reason,
                c.message.clone(),
                svc.metadata.generation,
            )
        });
        // Listed without one only to remove the one it still carries.
        let carried = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == WAYPOINT_BOUND));
        if condition.is_some() || carried {
            put(
                Kind::Service,
                key,
                ObjectStatus::Conditions(condition.into_iter().collect()),
            );
        }
    }
    for (key, se) in &state.service_entries {
        let addresses = translation.allocations.get(key).cloned();
        let conditions: Vec<Condition> = translation
            .service_entry_waypoints
            .get(key)
            .map(|w| {
                Condition::new(
                    WAYPOINT_BOUND,
                    false,
                    w.reason,
                    w.message.clone(),
                    se.metadata.generation,
                )
            })
            .into_iter()
            .collect();
        // An entry with neither is listed only to remove a condition it
        // still carries from before.
        let carried = se
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == WAYPOINT_BOUND));
        if addresses.is_some() || !conditions.is_empty() || carried {
            put(
                Kind::ServiceEntry,
                key,
                ObjectStatus::ServiceEntry {
                    addresses,
                    conditions,
                },
            );
        }
    }
    out
}

/// The DestinationRules and VirtualServices some served resource comes
/// from (the `origin` of TrafficPolicies and RouteTable routes).
fn translated_sources(translation: &Translation) -> std::collections::BTreeSet<PolicyRef> {
    use prost::Message;
    let snapshot = &translation.snapshot;
    let mut origins = Vec::new();
    for r in snapshot.of_type(api::type_url::TRAFFIC_POLICY).values() {
        if let Ok(p) = api::l7::TrafficPolicy::decode(r.body.value.as_slice()) {
            origins.extend(p.origin);
        }
    }
    for r in snapshot.of_type(api::type_url::ROUTE_TABLE).values() {
        if let Ok(t) = api::l7::RouteTable::decode(r.body.value.as_slice()) {
            origins.extend(t.routes.into_iter().filter_map(|route| route.origin));
        }
    }
    origins
        .into_iter()
        .filter_map(|o| {
            let kind = match o.kind.as_str() {
                "DestinationRule" => Kind::DestinationRule,
                "VirtualService" => Kind::VirtualService,
                _ => return None,
            };
            Some(PolicyRef::new(kind, o.namespace, o.name))
        })
        .collect()
}

/// WaypointAccepted of a DestinationRule or VirtualService: Accepted when
/// translated as written, PartiallyInvalid when translated without what
/// the problems name, Invalid when nothing of it is served.
fn translation_condition(
    generation: Option<i64>,
    used: bool,
    problems: &[&PolicyProblem],
) -> Condition {
    let details: Vec<String> = problems.iter().map(|p| p.detail()).collect();
    let (status, reason, message) = match (used, details.is_empty()) {
        (true, true) => (
            true,
            REASON_ACCEPTED,
            "translated for the waypoints of its destinations".to_string(),
        ),
        (true, false) => (true, "PartiallyInvalid", details.join("; ")),
        (false, true) => (
            false,
            "Invalid",
            "it translates to nothing a waypoint serves".to_string(),
        ),
        (false, false) => (false, "Invalid", details.join("; ")),
    };
    Condition::new(WAYPOINT_ACCEPTED, status, reason, message, generation)
}

/// Why a dry-run policy attached to waypoints carries a False condition.
const DRY_RUN: &str = "the istio.io/dry-run annotation is set: the policy is neither enforced nor evaluated (remove the annotation to enforce it)";
/// What a dry-run policy attached to ztunnel gets (its condition otherwise
/// as an enforced one's).
const DRY_RUN_ZTUNNEL: &str = "dry run (istio.io/dry-run): ztunnel evaluates the policy and logs what it would decide, without enforcing it";

/// The one condition of a security object.
fn policy_condition(
    generation: Option<i64>,
    attached_to_waypoints: bool,
    rule: Option<&L7Rule>,
    problems: &[&PolicyProblem],
    not_enforced: Option<&str>,
) -> Condition {
    let details: Vec<String> = problems.iter().map(|p| p.detail()).collect();
    let rejected = problems.iter().any(|p| p.rejected());
    if attached_to_waypoints {
        return match (rule, not_enforced) {
            (Some(rule), None) if !rejected => waypoint_condition(generation, rule, problems),
            _ => Condition::new(
                WAYPOINT_ACCEPTED,
                false,
                REASON_UNSUPPORTED,
                joined(not_enforced, &details),
                generation,
            ),
        };
    }
    if let Some(reason) = not_enforced {
        return Condition::new(
            ZTUNNEL_ACCEPTED,
            false,
            REASON_UNSUPPORTED,
            joined(Some(reason), &details),
            generation,
        );
    }
    // A rule attached by selector or namespace (ours, see index/l7.rs):
    // which waypoints enforce it as written.
    let enforced = rule
        .filter(|r| !r.enforced_by.is_empty())
        .map(|r| format!("enforced by waypoint(s) {}", r.enforced_by.join(", ")));
    if details.is_empty() {
        return Condition::new(
            ZTUNNEL_ACCEPTED,
            true,
            REASON_ACCEPTED,
            joined(Some("attached to ztunnel"), enforced.as_slice()),
            generation,
        );
    }
    // Served in a stricter form (or, for an L7 rule, held to its L4 form
    // where no waypoint serves it yet), unless rejected outright.
    let served = !rejected && rule.is_none_or(L7Rule::served);
    // Served as written by waypoints, and at L4 for the rest: the only
    // problem says so.
    let as_written = served
        && problems.iter().all(|p| {
            matches!(
                p,
                PolicyProblem::HttpAttributes {
                    effect: crate::index::Effect::WaypointsEnforce { .. },
                    ..
                }
            )
        });
    Condition::new(
        ZTUNNEL_ACCEPTED,
        served,
        if as_written {
            REASON_ACCEPTED
        } else {
            REASON_UNSUPPORTED
        },
        details.join("; "),
        generation,
    )
}

const REASON_ACCEPTED: &str = "Accepted";
/// Upstream's reason when ztunnel cannot enforce (part of) a policy.
const REASON_UNSUPPORTED: &str = "UnsupportedValue";

fn joined(first: Option<&str>, rest: &[String]) -> String {
    first
        .map(str::to_string)
        .into_iter()
        .chain(rest.iter().cloned())
        .collect::<Vec<_>>()
        .join("; ")
}

/// WaypointAccepted for a rule attached with targetRefs, flattened over its
/// targets as upstream's flattenConditions: one target gives its own
/// reason; several give Accepted (all bound), PartiallyInvalid (some) or
/// Invalid (none).
fn waypoint_condition(
    generation: Option<i64>,
    rule: &L7Rule,
    problems: &[&PolicyProblem],
) -> Condition {
    let others: Vec<String> = problems
        .iter()
        .filter(|p| !matches!(p, PolicyProblem::UnservedL7 { .. }))
        .map(|p| p.detail())
        .collect();
    let messages: Vec<String> = rule
        .targets
        .iter()
        .map(|t| target_message(t, problems))
        .collect();
    let bound = rule.targets.iter().filter(|t| t.serving.is_ok()).count();
    let (status, reason) = match rule.targets.as_slice() {
        [one] => (one.serving.is_ok(), target_reason(one)),
        all if bound == all.len() => (true, REASON_ACCEPTED),
        _ if bound > 0 => (true, "PartiallyInvalid"),
        _ => (false, "Invalid"),
    };
    let message = messages
        .into_iter()
        .chain(others)
        .collect::<Vec<_>>()
        .join("; ");
    Condition::new(WAYPOINT_ACCEPTED, status, reason, message, generation)
}

/// Upstream's WaypointAccepted reason for one target.
fn target_reason(t: &TargetOutcome) -> &'static str {
    match &t.serving {
        Ok(_) => REASON_ACCEPTED,
        Err(
            Unserved::NotBound { .. }
            | Unserved::AutoWaypointDisabled { .. }
            | Unserved::OnDemandPending { .. }
            | Unserved::OnDemandNameTaken { .. },
        ) => "AncestorNotBound",
        Err(Unserved::TargetNotFound { .. }) => "TargetNotFound",
        Err(Unserved::WaypointNotReady { .. } | Unserved::UnsupportedTarget { .. }) => "Invalid",
    }
}

/// `bound to <waypoint>`, or the unserved problem's detail, prefixed with
/// the ancestor when there is one.
fn target_message(t: &TargetOutcome, problems: &[&PolicyProblem]) -> String {
    let body = match &t.serving {
        Ok(waypoint) => format!("bound to {waypoint}"),
        Err(reason) => problems
            .iter()
            .find(|p| matches!(p, PolicyProblem::UnservedL7 { reason: r, .. } if r == reason))
            .map(|p| p.detail())
            .unwrap_or_else(|| reason.to_string()),
    };
    match &t.reference {
        Some(r) if !body.starts_with(&r.kind) => format!("{}: {body}", r.ancestor()),
        _ => body,
    }
}

/// Every route gets an entry, so that parents istiod-rs wrote before and no
/// longer owns are removed.
fn routes<K: ::kube::Resource + RouteBackends>(
    state: &ClusterState,
    routes: &Objects<K>,
    kind: Kind,
    l7: &BTreeMap<&PolicyRef, &L7Rule>,
    problems: &BTreeMap<&PolicyRef, Vec<&PolicyProblem>>,
    put: &mut impl FnMut(Kind, &ObjectKey, ObjectStatus),
) {
    for (key, route) in routes {
        let object = PolicyRef {
            kind,
            key: key.clone(),
        };
        // What the waypoint serves differently from what the route says.
        let untranslated: Vec<String> = problems
            .get(&object)
            .into_iter()
            .flatten()
            .filter(|p| matches!(p, PolicyProblem::UntranslatableL7 { .. }))
            .map(|p| p.detail())
            .collect();
        let parents = match l7.get(&object) {
            Some(rule) => {
                let generation = route.meta().generation;
                let resolved = resolved_refs(state, &key.namespace, &route.backends(), generation);
                rule.targets
                    .iter()
                    .filter_map(|t| {
                        let parent_ref = t.reference.clone()?;
                        let accepted = match &t.serving {
                            Ok(w) => Condition::new(
                                "Accepted",
                                true,
                                "Accepted",
                                joined(Some(&format!("served by waypoint {w}")), &untranslated),
                                generation,
                            ),
                            Err(reason @ Unserved::TargetNotFound { .. }) => Condition::new(
                                "Accepted",
                                false,
                                "NoMatchingParent",
                                reason.to_string(),
                                generation,
                            ),
                            Err(reason) => Condition::new(
                                "Accepted",
                                false,
                                REASON_UNSUPPORTED,
                                format!(
                                    "{reason}; connections to the endpoints of {} {}/{} are denied until a waypoint serves the route",
                                    parent_ref.kind, parent_ref.namespace, parent_ref.name
                                ),
                                generation,
                            ),
                        };
                        Some(RouteParent {
                            parent_ref,
                            conditions: vec![accepted, resolved.clone()],
                        })
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        put(kind, key, ObjectStatus::Parents(parents));
    }
}

/// A backendRef as written: (group, kind, namespace, name, port).
pub(crate) type Backend = (String, String, Option<String>, String, Option<i32>);

/// The backendRefs of a route, whatever its kind.
pub(crate) trait RouteBackends {
    fn backends(&self) -> Vec<Backend>;
}

macro_rules! route_backends {
    ($route:ty) => {
        impl RouteBackends for $route {
            fn backends(&self) -> Vec<Backend> {
                self.spec
                    .rules
                    .iter()
                    .flatten()
                    .flat_map(|r| r.backend_refs.iter().flatten())
                    .map(|b| {
                        (
                            b.group.clone().unwrap_or_default(),
                            b.kind.clone().unwrap_or_else(|| "Service".to_string()),
                            b.namespace.clone(),
                            b.name.clone(),
                            b.port,
                        )
                    })
                    .collect()
            }
        }
    };
}
route_backends!(gateway_api::experimental::httproutes::HttpRoute);
route_backends!(gateway_api::grpcroutes::GrpcRoute);

/// Gateway API's ResolvedRefs: every backendRef is a Service of the
/// route's namespace that exists, with a port. The reason is the first
/// failure's, in upstream's terms (istio/istio
/// pilot/pkg/config/kube/gateway `buildDestination`): `InvalidKind`,
/// `RefNotPermitted` (istiod-rs reads no ReferenceGrants, so every
/// cross-namespace reference is one), `BackendNotFound`, `UnsupportedValue`
/// ("port is required in backendRef"). The waypoint answers 500 for the
/// share of traffic of each such backend.
fn resolved_refs(
    state: &ClusterState,
    namespace: &str,
    backends: &[Backend],
    generation: Option<i64>,
) -> Condition {
    let mut unresolved: Vec<(&str, String)> = Vec::new();
    for (group, kind, ns, name, port) in backends {
        let ns = ns.as_deref().unwrap_or(namespace);
        if !(kind == "Service" && matches!(group.as_str(), "" | "core")) {
            unresolved.push((
                "InvalidKind",
                format!("{kind} {ns}/{name} is not a Service"),
            ));
        } else if ns != namespace {
            unresolved.push((
                "RefNotPermitted",
                format!(
                    "Service {ns}/{name} is in another namespace: ReferenceGrants are not supported by istiod-rs"
                ),
            ));
        } else if !state
            .services
            .contains_key(&ObjectKey::new(ns, name.as_str()))
        {
            unresolved.push((
                "BackendNotFound",
                format!("Service {ns}/{name} was not found"),
            ));
        } else if port.is_none() {
            unresolved.push((
                REASON_UNSUPPORTED,
                format!("port is required in backendRef (Service {ns}/{name})"),
            ));
        }
    }
    match unresolved.first() {
        None => Condition::new(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all references resolved",
            generation,
        ),
        Some((reason, _)) => Condition::new(
            "ResolvedRefs",
            false,
            reason,
            unresolved
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            generation,
        ),
    }
}

/// A route parent entry as the API carries it.
pub fn parent_json(parent: &RouteParent, times: Times<'_>) -> Value {
    json!({
        "parentRef": parent.parent_ref,
        "controllerName": ROUTE_CONTROLLER,
        "conditions": parent
            .conditions
            .iter()
            .map(|c| c.to_json(times(Some(&parent.parent_ref), c).as_deref()))
            .collect::<Vec<_>>(),
    })
}

/// Reads istiod-rs's part of a status as the API carries it (`status` of a
/// live object), for comparison with the desired one.
pub fn owned(kind: Kind, status: Option<&Value>) -> ObjectStatus {
    let list = |field: &str| {
        status
            .and_then(|s| s.get(field))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    if kind == Kind::ServiceEntry {
        let addresses = status
            .and_then(|s| s.get("addresses"))
            .cloned()
            .map(|v| serde_json::from_value(v).unwrap_or_default());
        let conditions = list("conditions")
            .iter()
            .filter_map(Condition::from_json)
            .filter(|c| c.type_ == WAYPOINT_BOUND)
            .collect();
        return ObjectStatus::ServiceEntry {
            addresses,
            conditions,
        };
    }
    if matches!(kind, Kind::HttpRoute | Kind::GrpcRoute) {
        let parents = list("parents")
            .iter()
            .filter(|p| p.get("controllerName").and_then(Value::as_str) == Some(ROUTE_CONTROLLER))
            .filter_map(|p| {
                Some(RouteParent {
                    parent_ref: parent_ref(p)?,
                    conditions: p
                        .get("conditions")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Condition::from_json)
                        .collect(),
                })
            })
            .collect();
        ObjectStatus::Parents(parents)
    } else {
        ObjectStatus::Conditions(
            list("conditions")
                .iter()
                .filter_map(Condition::from_json)
                .filter(|c| OWNED_CONDITIONS.contains(&c.type_.as_str()))
                .collect(),
        )
    }
}

/// The `parentRef` of a route parent entry as the API carries it.
pub fn parent_ref(entry: &Value) -> Option<TargetRef> {
    let r = entry.get("parentRef")?;
    Some(TargetRef {
        group: str_field(r, "group"),
        kind: str_field(r, "kind"),
        name: str_field(r, "name"),
        namespace: str_field(r, "namespace"),
        port: r
            .get("port")
            .and_then(Value::as_i64)
            .and_then(|p| i32::try_from(p).ok()),
        section_name: r
            .get("sectionName")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Gives a condition (of the route parent it is in, if any) its
/// lastTransitionTime.
pub type Times<'a> = &'a dyn Fn(Option<&TargetRef>, &Condition) -> Option<String>;

/// The `status` istiod-rs applies: its own entries (`times` gives each
/// condition's lastTransitionTime), and, from the live `status`, the
/// entries of other writers, kept as they are.
pub fn status_json(status: &ObjectStatus, live: Option<&Value>, times: Times<'_>) -> Value {
    let others = |field: &str, ours: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        live.and_then(|s| s.get(field))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| !ours(v))
            .cloned()
            .collect()
    };
    match status {
        ObjectStatus::Conditions(conditions) => {
            let mut all = others("conditions", &|v| {
                v.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| OWNED_CONDITIONS.contains(&t))
            });
            all.extend(
                conditions
                    .iter()
                    .map(|c| c.to_json(times(None, c).as_deref())),
            );
            json!({ "conditions": all })
        }
        ObjectStatus::Parents(parents) => {
            let mut all = others("parents", &|v| {
                v.get("controllerName").and_then(Value::as_str) == Some(ROUTE_CONTROLLER)
            });
            all.extend(parents.iter().map(|p| parent_json(p, times)));
            json!({ "parents": all })
        }
        ObjectStatus::ServiceEntry {
            addresses,
            conditions,
        } => {
            let mut out = json!({});
            if let Some(addresses) = addresses {
                out["addresses"] = json!(addresses);
            }
            let conditions =
                status_json(&ObjectStatus::Conditions(conditions.clone()), live, times);
            if conditions["conditions"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
            {
                out["conditions"] = conditions["conditions"].clone();
            }
            out
        }
    }
}

/// Whether `live` (an object's `status`) already carries what istiod-rs
/// wants in it: for a ServiceEntry, the addresses only when it wants some
/// (it leaves the others alone).
pub fn carries(kind: Kind, status: &ObjectStatus, live: Option<&Value>) -> bool {
    match (status, owned(kind, live)) {
        (
            ObjectStatus::ServiceEntry {
                addresses,
                conditions,
            },
            ObjectStatus::ServiceEntry {
                addresses: live_addresses,
                conditions: live_conditions,
            },
        ) => {
            (addresses.is_none() || *addresses == live_addresses) && *conditions == live_conditions
        }
        (status, live) => *status == live,
    }
}

/// The `apiVersion` of the kinds that carry statuses: `v1` for the core
/// group.
pub fn api_version(kind: Kind) -> String {
    match kind.group() {
        "" => "v1".to_string(),
        group => format!("{group}/v1"),
    }
}

/// The current time as Kubernetes writes it: `2024-05-01T12:00:00Z`.
pub type Clock = Arc<dyn Fn() -> String + Send + Sync>;

/// The system clock, to the second.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        let now = time::OffsetDateTime::now_utc();
        now.replace_nanosecond(0)
            .unwrap_or(now)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    })
}

/// Why a status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("could not write the status of {object} through the API server: {source}")]
    Kube {
        object: PolicyRef,
        #[source]
        source: ::kube::Error,
    },
    #[error("could not write {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not encode the status of {object}: {reason}")]
    Encode { object: PolicyRef, reason: String },
}

/// How status writes are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusConfig {
    /// First delay after a failed write.
    pub retry_min: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
    /// `ok` or `error`.
    pub result: String,
}

/// What the status writer counts.
#[derive(Debug, Default)]
pub struct StatusMetrics {
    /// Status writes made, by kind and result.
    pub writes: Family<WriteLabels, Counter>,
}

impl StatusMetrics {
    /// Registers every metric, prefixed `istiod_status_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("istiod_status");
        r.register(
            "writes",
            "Status writes of policies and routes, by kind and result (ok, error); errors are retried",
            self.writes.clone(),
        );
    }

    fn count(&self, object: &PolicyRef, ok: bool) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: object.kind.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }
}

/// Where statuses go.
pub enum Sink {
    /// The Kubernetes status subresource.
    Kube(kube::KubeStatus),
    /// Files under `<config-dir>/generated/status/`.
    Directory(directory::DirectoryStatus),
}

impl Sink {
    /// Brings one object's status to `status`; true when a write was made.
    async fn apply(
        &mut self,
        object: &PolicyRef,
        status: &ObjectStatus,
    ) -> Result<bool, StatusError> {
        match self {
            Sink::Kube(k) => k.apply(object, status).await,
            Sink::Directory(d) => d.apply(object, status),
        }
    }

    /// Forgets (and, for files, removes) the statuses of objects that are gone.
    fn retain(&mut self, statuses: &Statuses) -> Vec<StatusError> {
        match self {
            Sink::Kube(k) => {
                k.retain(statuses);
                Vec::new()
            }
            Sink::Directory(d) => d.retain(statuses),
        }
    }
}

/// Starts the writer: once the first statuses are sent (the channel's
/// initial value is not), it writes them, then each change, retrying
/// failures with backoff until they succeed or are superseded.
pub fn spawn(
    statuses: watch::Receiver<Arc<Statuses>>,
    sink: Sink,
    config: StatusConfig,
    metrics: Arc<StatusMetrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(statuses, sink, config, metrics))
}

/// Runs until the sender is gone.
pub async fn run(
    mut statuses: watch::Receiver<Arc<Statuses>>,
    mut sink: Sink,
    config: StatusConfig,
    metrics: Arc<StatusMetrics>,
) {
    // Nothing until the first translation: the channel's initial value
    // (no objects) would remove every status file left by a previous run.
    if statuses.changed().await.is_err() {
        return;
    }
    let mut delay = config.retry_min;
    loop {
        let desired = statuses.borrow_and_update().clone();
        let mut failed = 0;
        for error in sink.retain(&desired) {
            warn!(%error, "status left over from a removed object");
        }
        for (object, status) in desired.iter() {
            match sink.apply(object, status).await {
                Ok(written) => {
                    if written {
                        debug!(%object, "status written");
                        metrics.count(object, true);
                    }
                }
                Err(error) => {
                    warn!(%error, "status write failed; retrying");
                    metrics.count(object, false);
                    failed += 1;
                }
            }
        }
        if failed == 0 {
            delay = config.retry_min;
            if statuses.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Retry after the delay, or at once when newer statuses arrive.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            r = statuses.changed() => if r.is_err() { return },
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_writes_kubernetes_times() {
        let t = system_clock()();
        // 2025-01-02T03:04:05Z
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
