//! L7 rules (AuthorizationPolicies with `targetRefs`, RequestAuthentications,
//! HTTPRoutes and GRPCRoutes with Service parents): only a waypoint can
//! enforce them, and until one does they fail closed at L4.
//!
//! For every target a rule attaches to, [`serving`] decides who enforces it
//! there: the waypoint bound there once it has a ready instance (a pod
//! labelled `gateway.networking.k8s.io/gateway-name` with condition Ready,
//! see [`binding::ready_waypoints`]): the rule is then translated into the
//! waypoint's configuration (the `l7/` modules) and nothing stands in for it
//! at L4. Otherwise nobody enforces it, and the status says why. Where
//! nobody does, connections to the target's workloads are denied: one DENY
//! Authorization per rule, `<ns>/unserved_l7_<kind>_<name>` (`_` never
//! appears in a Kubernetes name, so the key cannot collide with a user's
//! policy, and ztunnel's denial log names the rule), WORKLOAD_SELECTOR
//! scope, listed by each targeted workload, with one group and no clause:
//! a group with no clause matches every connection, in proxy-core's
//! `Authorization::matches` and in upstream ztunnel's rbac.rs alike.
//!
//! Targets: `targetRefs` kind Service -> the Service's endpoints; kind
//! Gateway (a waypoint) -> the workloads bound to it and the endpoints of
//! the services bound to it; a RequestAuthentication's selector -> the
//! workloads it selects (any namespace from the root namespace); no
//! selector -> its namespace (the root namespace: the whole mesh); a
//! route's `parentRefs` kind Service -> that Service's endpoints (parents of
//! other kinds are gateways' business, not the mesh's). Waypoint instances
//! are never targeted. Dry-run and AUDIT policies never change access and
//! are not L7 rules here. A route whose Service parent is in another
//! namespace (a GAMMA consumer route) is not served: the waypoint's
//! configuration cannot scope a route to its clients' namespace.
//! RequestAuthentications attached by selector or namespace are not served
//! by waypoints either (upstream's waypoints take `targetRefs` only).

pub(super) mod binding;
pub(super) mod http_policies;
pub(super) mod jwt;
pub(super) mod routes;

use std::collections::BTreeSet;

use api::crd::{AuthorizationAction, AuthorizationPolicy, PolicyTargetReference};
use api::labels;
use api::manifest::{Kind, ObjectKey};
use api::security::{Action, Authorization, Group, Scope};

use super::problem::{Effect, PolicyProblem, PolicyRef, Unserved};
use super::selectors::{Labels, subset_of};
use super::services::Services;
use super::{MeshConfig, authorization};
use crate::state::ClusterState;

/// Prefix of the DENY policies that stand in for unserved L7 rules.
pub const UNSERVED_PREFIX: &str = "unserved_l7_";

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A reference to what a rule attaches to, as written (a `targetRef` or a
/// route's `parentRef`), with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl TargetRef {
    /// `Kind.group:namespace/name`, the core group spelled `core`: how
    /// upstream names a policy's ancestors in its WaypointAccepted message.
    pub fn ancestor(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        format!("{}.{group}:{}/{}", self.kind, self.namespace, self.name)
    }

    pub(super) fn is_service(&self) -> bool {
        self.kind == "Service" && matches!(self.group.as_str(), "" | "core")
    }

    fn is_gateway(&self) -> bool {
        self.kind == "Gateway" && self.group == GATEWAY_GROUP
    }

    /// `Service shop/web`, as messages name it.
    fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// How a rule attaches, which decides the condition its status carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// `targetRefs` (WaypointAccepted).
    TargetRefs,
    /// A selector or the namespace (ZtunnelAccepted).
    Workloads,
    /// A route's Service `parentRefs` (`status.parents[]`).
    RouteParents,
}

/// Who enforces a rule at one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetOutcome {
    /// The reference as written; `None` for a selector or the namespace.
    pub reference: Option<TargetRef>,
    /// `Ok(waypoint)`: the waypoint (`ns/name`) that enforces the rule
    /// there; `Err`: why none does.
    pub serving: Result<String, Unserved>,
    /// What it covers at L4, when it resolved to anything.
    target: Option<Target>,
}

impl TargetOutcome {
    /// What is denied at L4 because nobody enforces the rule here.
    fn denied(&self) -> Option<&Target> {
        self.target.as_ref().filter(|_| self.serving.is_err())
    }

    /// The service (index in [`Services::entries`]) it targets, if any.
    pub(super) fn service(&self) -> Option<usize> {
        match &self.target {
            Some(Target::Service(i)) => Some(*i),
            _ => None,
        }
    }

    /// The waypoint (`ns/name`) it targets itself, if any.
    pub(super) fn waypoint(&self) -> Option<&str> {
        match &self.target {
            Some(Target::Waypoint(w)) => Some(w),
            _ => None,
        }
    }
}

/// One L7 rule and what became of each of its targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Rule {
    pub object: PolicyRef,
    pub generation: Option<i64>,
    pub attachment: Attachment,
    pub targets: Vec<TargetOutcome>,
    /// The key of its DENY policy, when it denies anything.
    pub deny_key: Option<String>,
}

/// What a target covers at L4.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// The endpoints of the service at this index of [`Services::entries`].
    Service(usize),
    /// Workloads bound to the waypoint `ns/name`, and the endpoints of the
    /// services bound to it.
    Waypoint(String),
    /// Workloads with these labels, in `namespace` (any when `None`).
    Selector {
        namespace: Option<String>,
        labels: Labels,
    },
    /// Every workload of a namespace.
    Namespace(String),
    /// Every workload.
    Mesh,
}

impl Target {
    /// What the DENY covers, for messages.
    fn describe(&self, services: &Services<'_>) -> String {
        match self {
            Target::Service(i) => {
                let s = &services.entries[*i];
                let name = s.service.metadata.name.as_deref().unwrap_or_default();
                format!("the endpoints of Service {}/{name}", s.namespace)
            }
            Target::Waypoint(w) => {
                format!("the workloads and services bound to waypoint {w}")
            }
            Target::Selector {
                namespace: Some(ns),
                ..
            } => format!("the workloads it selects in namespace {ns}"),
            Target::Selector {
                namespace: None, ..
            } => "the workloads it selects in every namespace".to_string(),
            Target::Namespace(ns) => format!("every workload in namespace {ns}"),
            Target::Mesh => "every workload in the mesh".to_string(),
        }
    }
}

/// A workload as the targets see it.
pub(super) struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
    /// Indices of the services it backs.
    pub services: &'a [usize],
    /// The waypoint (`ns/name`) its own traffic is bound to.
    pub waypoint: Option<String>,
}

/// What the targets need to know about the cluster.
pub(super) struct Context<'a> {
    pub state: &'a ClusterState,
    pub mesh: &'a MeshConfig,
    pub services: &'a Services<'a>,
    /// The waypoint (`ns/name`) each service is bound to, by index.
    pub service_waypoints: &'a [Option<String>],
    /// Waypoints (`ns/name`) with at least one ready instance.
    pub ready_waypoints: &'a BTreeSet<String>,
}

impl Context<'_> {
    fn covers(&self, target: &Target, w: &Workload<'_>) -> bool {
        match target {
            Target::Service(i) => w.services.contains(i),
            Target::Waypoint(key) => {
                w.waypoint.as_ref() == Some(key)
                    || w.services
                        .iter()
                        .any(|i| self.service_waypoints[*i].as_ref() == Some(key))
            }
            Target::Selector { namespace, labels } => {
                namespace.as_deref().is_none_or(|ns| ns == w.namespace)
                    && subset_of(labels, w.labels)
            }
            Target::Namespace(ns) => ns == w.namespace,
            Target::Mesh => true,
        }
    }

    /// Resolves one reference: what it covers (when anything) and whether
    /// a waypoint serves the rule there.
    fn resolve(&self, r: &TargetRef) -> (Option<Target>, Result<String, Unserved>) {
        if r.is_service() {
            let Some(i) = self.services.named(&r.namespace, &r.name) else {
                let target = r.describe();
                return (None, Err(Unserved::TargetNotFound { target }));
            };
            let binding = Binding::Service {
                target: r.describe(),
                waypoint: self.service_waypoints[i].clone(),
            };
            (
                Some(Target::Service(i)),
                serving(binding, self.ready_waypoints),
            )
        } else if r.is_gateway() {
            let key = ObjectKey::new(&r.namespace, &r.name);
            match self.state.gateways.get(&key) {
                None => (
                    None,
                    Err(Unserved::TargetNotFound {
                        target: r.describe(),
                    }),
                ),
                Some(gw) if gw.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS => {
                    let waypoint = key.to_string();
                    let binding = Binding::Waypoint(waypoint.clone());
                    (
                        Some(Target::Waypoint(waypoint)),
                        serving(binding, self.ready_waypoints),
                    )
                }
                Some(_) => (
                    None,
                    Err(Unserved::UnsupportedTarget {
                        target: format!("{} (not a waypoint)", r.describe()),
                    }),
                ),
            }
        } else {
            (
                None,
                Err(Unserved::UnsupportedTarget {
                    target: r.describe(),
                }),
            )
        }
    }
}

/// What a target is bound to.
enum Binding {
    /// A service, and the waypoint it is bound to.
    Service {
        target: String,
        waypoint: Option<String>,
    },
    /// A waypoint itself.
    Waypoint(String),
    /// Workloads picked by selector or namespace: no waypoint is bound to
    /// the rule itself.
    Workloads { what: &'static str },
}

/// Decides who enforces an L7 rule at one target: `Ok(waypoint)` when the
/// waypoint bound there has a ready instance to serve it, `Err(why)` when
/// nobody does. A waypoint that is still starting keeps the L4 stand-in
/// DENY: access never opens before the waypoint can enforce the rule.
fn serving(binding: Binding, ready: &BTreeSet<String>) -> Result<String, Unserved> {
    match binding {
        Binding::Service {
            target,
            waypoint: None,
        } => Err(Unserved::NotBound { target }),
        Binding::Service {
            target,
            waypoint: Some(waypoint),
        } if !ready.contains(&waypoint) => Err(Unserved::WaypointNotReady {
            target: Some(target),
            waypoint,
        }),
        Binding::Waypoint(waypoint) if !ready.contains(&waypoint) => {
            Err(Unserved::WaypointNotReady {
                target: None,
                waypoint,
            })
        }
        Binding::Service {
            waypoint: Some(waypoint),
            ..
        }
        | Binding::Waypoint(waypoint) => Ok(waypoint),
        Binding::Workloads { what } => Err(Unserved::NeedsWaypoint { what }),
    }
}

/// See [`L7Rules::denials`].
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Denials(Vec<(Option<String>, Vec<Target>)>);

/// Every L7 rule of the cluster and the DENY policies standing in for them.
#[derive(Debug, Default)]
pub(super) struct L7Rules {
    pub rules: Vec<L7Rule>,
}

impl L7Rules {
    /// Resolves every rule's targets; [`L7Rules::report`] says where
    /// nobody enforces them.
    pub fn build(ctx: &Context<'_>) -> Self {
        let mut rules = Vec::new();
        for policy in ctx.state.authorization_policies.values() {
            let ignored =
                authorization::dry_run(policy) || policy.spec.action == AuthorizationAction::Audit;
            if authorization::targets_waypoints(policy) && !ignored {
                let refs = policy_target_refs(policy);
                rules.push(rule_for_refs(
                    ctx,
                    authorization::policy_ref(policy),
                    policy.metadata.generation,
                    Attachment::TargetRefs,
                    refs,
                ));
            }
        }
        for (key, ra) in &ctx.state.request_authentications {
            let object = PolicyRef {
                kind: Kind::RequestAuthentication,
                key: key.clone(),
            };
            let generation = ra.metadata.generation;
            let spec = &ra.spec;
            let refs: Vec<TargetRef> = spec
                .target_ref
                .iter()
                .chain(&spec.target_refs)
                .map(|r| target_ref(r, &key.namespace))
                .collect();
            if !refs.is_empty() {
                rules.push(rule_for_refs(
                    ctx,
                    object,
                    generation,
                    Attachment::TargetRefs,
                    refs,
                ));
                continue;
            }
            let root = key.namespace == ctx.mesh.root_namespace;
            let target = match (&spec.selector, root) {
                (Some(s), _) => Target::Selector {
                    namespace: (!root).then(|| key.namespace.clone()),
                    labels: s.match_labels.clone(),
                },
                (None, true) => Target::Mesh,
                (None, false) => Target::Namespace(key.namespace.clone()),
            };
            let serving = serving(
                Binding::Workloads {
                    what: "a RequestAuthentication (JWT validation) attached by selector or namespace",
                },
                ctx.ready_waypoints,
            );
            rules.push(rule(
                object,
                generation,
                Attachment::Workloads,
                vec![TargetOutcome {
                    reference: None,
                    serving,
                    target: Some(target),
                }],
            ));
        }
        // HTTPRoute and GRPCRoute: the same fields in two generated types.
        macro_rules! routes {
            ($objects:ident, $kind:expr) => {
                for (key, route) in &ctx.state.$objects {
                    let parents = route.spec.parent_refs.iter().flatten().map(|p| TargetRef {
                        group: p.group.clone().unwrap_or_else(|| GATEWAY_GROUP.to_string()),
                        kind: p.kind.clone().unwrap_or_else(|| "Gateway".to_string()),
                        name: p.name.clone(),
                        namespace: p.namespace.clone().unwrap_or_else(|| key.namespace.clone()),
                        port: p.port,
                        section_name: p.section_name.clone(),
                    });
                    let object = PolicyRef {
                        kind: $kind,
                        key: key.clone(),
                    };
                    rules.extend(route_rule(ctx, object, route.metadata.generation, parents));
                }
            };
        }
        routes!(http_routes, Kind::HttpRoute);
        routes!(grpc_routes, Kind::GrpcRoute);
        L7Rules { rules }
    }

    /// Pushes a problem per target nobody enforces its rule at.
    pub fn report(&self, ctx: &Context<'_>, problems: &mut Vec<PolicyProblem>) {
        for r in &self.rules {
            for t in &r.targets {
                let Err(reason) = &t.serving else {
                    continue;
                };
                let effect = match t.denied() {
                    Some(target) => Effect::TargetsDenied {
                        targets: target.describe(ctx.services),
                    },
                    None => Effect::NothingDenied,
                };
                problems.push(PolicyProblem::UnservedL7 {
                    object: r.object.clone(),
                    reason: reason.clone(),
                    effect,
                });
            }
        }
    }

    /// The DENY policies to serve, by key.
    pub fn authorizations(&self) -> impl Iterator<Item = (&str, Authorization)> {
        self.rules.iter().filter_map(|r| {
            let key = r.deny_key.as_deref()?;
            let (namespace, name) = key.split_once('/')?;
            Some((
                key,
                Authorization {
                    name: name.to_string(),
                    namespace: namespace.to_string(),
                    scope: Scope::WorkloadSelector as i32,
                    action: Action::Deny as i32,
                    // One group without clauses: matches every connection.
                    groups: vec![Group { rules: Vec::new() }],
                },
            ))
        })
    }

    /// Whether a workload's denials can change when another pod does: a
    /// waypoint target covers the endpoints of the services bound to it,
    /// and a per-ServiceAccount waypoint binds a service only while all
    /// its pods run as that account.
    pub fn depend_on_other_pods(&self) -> bool {
        self.rules.iter().any(|r| {
            r.targets
                .iter()
                .filter_map(TargetOutcome::denied)
                .any(|t| matches!(t, Target::Waypoint(_)))
        })
    }

    /// What the workloads' DENY keys are computed from: which targets of
    /// which rule are denied. It changes with other pods (a waypoint
    /// instance becoming ready hands its targets over), so a workload built
    /// under other denials is built again.
    pub fn denials(&self) -> Denials {
        Denials(
            self.rules
                .iter()
                .map(|r| {
                    let denied = r.targets.iter().filter_map(TargetOutcome::denied);
                    (r.deny_key.clone(), denied.cloned().collect())
                })
                .collect(),
        )
    }

    /// The DENY policies a workload lists, sorted.
    pub fn keys_for(&self, ctx: &Context<'_>, w: &Workload<'_>) -> Vec<String> {
        let mut keys: Vec<String> = self
            .rules
            .iter()
            .filter(|r| {
                r.targets
                    .iter()
                    .filter_map(TargetOutcome::denied)
                    .any(|t| ctx.covers(t, w))
            })
            .filter_map(|r| r.deny_key.clone())
            .collect();
        keys.sort();
        keys
    }
}

fn policy_target_refs(policy: &AuthorizationPolicy) -> Vec<TargetRef> {
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    policy
        .spec
        .target_ref
        .iter()
        .chain(&policy.spec.target_refs)
        .map(|r| target_ref(r, namespace))
        .collect()
}

fn target_ref(r: &PolicyTargetReference, namespace: &str) -> TargetRef {
    TargetRef {
        group: r.group.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
        namespace: r.namespace.clone().unwrap_or_else(|| namespace.to_string()),
        port: None,
        section_name: None,
    }
}

fn rule_for_refs(
    ctx: &Context<'_>,
    object: PolicyRef,
    generation: Option<i64>,
    attachment: Attachment,
    refs: Vec<TargetRef>,
) -> L7Rule {
    let resolved = refs
        .into_iter()
        .map(|r| {
            let (target, serving) = ctx.resolve(&r);
            TargetOutcome {
                reference: Some(r),
                serving,
                target,
            }
        })
        .collect();
    rule(object, generation, attachment, resolved)
}

/// A route's rule, when it has Service parents (the mesh's routes).
fn route_rule(
    ctx: &Context<'_>,
    object: PolicyRef,
    generation: Option<i64>,
    parents: impl Iterator<Item = TargetRef>,
) -> Option<L7Rule> {
    let services: Vec<TargetRef> = parents.filter(TargetRef::is_service).collect();
    if services.is_empty() {
        return None;
    }
    let mut rule = rule_for_refs(ctx, object, generation, Attachment::RouteParents, services);
    // A consumer route (parent in another namespace) applies only to the
    // route's own namespace's clients, which a RouteTable cannot express.
    // A sectionName naming no port of the Service attaches to nothing.
    for t in &mut rule.targets {
        let Some(r) = &t.reference else { continue };
        if let (Some(section), Some(i)) = (&r.section_name, t.service())
            && ctx.services.entries[i].port_named(section).is_none()
        {
            t.target = None;
            t.serving = Err(Unserved::TargetNotFound {
                target: format!("port {section:?} of {}", r.describe()),
            });
            continue;
        }
        if r.namespace != rule.object.key.namespace && t.serving.is_ok() {
            t.serving = Err(Unserved::UnsupportedTarget {
                target: format!(
                    "{} as the parent of a route in namespace {} (a consumer route)",
                    r.describe(),
                    rule.object.key.namespace
                ),
            });
        }
    }
    rule.deny_key = deny_key(&rule.object, &rule.targets);
    Some(rule)
}

fn rule(
    object: PolicyRef,
    generation: Option<i64>,
    attachment: Attachment,
    targets: Vec<TargetOutcome>,
) -> L7Rule {
    let deny_key = deny_key(&object, &targets);
    L7Rule {
        object,
        generation,
        attachment,
        targets,
        deny_key,
    }
}

/// The key of a rule's stand-in DENY, when it denies anything.
fn deny_key(object: &PolicyRef, targets: &[TargetOutcome]) -> Option<String> {
    let denies = targets.iter().any(|t| t.denied().is_some());
    denies.then(|| {
        format!(
            "{}/{UNSERVED_PREFIX}{}_{}",
            object.key.namespace,
            object.kind.as_str().to_lowercase(),
            object.key.name
        )
    })
}
