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
//!
//! Attached by selector or namespace ([`Attachment::Workloads`]: every
//! RequestAuthentication without `targetRefs`, and every ALLOW or DENY
//! AuthorizationPolicy without `targetRefs` that names an HTTP attribute)
//! is ours, not upstream's (upstream's waypoints take `targetRefs` only).
//! Such a rule covers the mesh workloads its selector / namespace picks
//! (enrolled, not waypoint instances, not finished), and is served in
//! parts: the workloads of each ServiceAccount (by the waypoint their own
//! traffic is bound to) and each Service with a covered endpoint (by the
//! Service's waypoint); `on_demand.rs` plans waypoints for the parts nobody
//! serves. `binding.rs` attaches the rule to every waypoint entry through
//! which a request reaches a covered endpoint; the waypoints with a ready
//! instance among them enforce it ([`L7Rule::enforced_by`]). Its L4 form
//! holds for every other connection, whatever the parts' state: an
//! AuthorizationPolicy stays the ztunnel Authorization it is (`index.rs`
//! admits the enforcing waypoints' identities to an ALLOW and exempts them
//! from a DENY); a RequestAuthentication keeps its stand-in DENY on the
//! covered workloads, with a `not_principals` clause naming the enforcing
//! waypoints' identities (a connection that skips them cannot have its
//! token checked; a plaintext one has no principal, so it stays denied).

pub(super) mod binding;
pub(super) mod http_policies;
pub(super) mod jwt;
pub(super) mod routes;

use std::collections::BTreeSet;

use api::crd::{AuthorizationAction, AuthorizationPolicy, PolicyTargetReference};
use api::labels;
use api::manifest::{Kind, ObjectKey};
use api::security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch};

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

    /// The (namespace, ServiceAccount) whose workloads it is, for a part of
    /// a rule attached by selector or namespace.
    pub(super) fn account(&self) -> Option<(&str, &str)> {
        match &self.target {
            Some(Target::Account { namespace, account }) => Some((namespace, account)),
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
    /// For [`Attachment::Workloads`]: one per part (the covered workloads
    /// of one ServiceAccount bound alike, a Service with a covered
    /// endpoint).
    pub targets: Vec<TargetOutcome>,
    /// The key of its DENY policy, when it denies anything.
    pub deny_key: Option<String>,
    /// [`Attachment::Workloads`]: the waypoints (`ns/name`, sorted) with a
    /// ready instance that enforce it; their identities are exempt from its
    /// L4 form. Set once the waypoints' configuration is built.
    pub enforced_by: Vec<String>,
    /// [`Attachment::Workloads`]: what it covers.
    coverage: Option<Coverage>,
}

/// What a rule attached by selector or namespace covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Coverage {
    scope: Target,
    /// The mesh workloads (pods) it covers.
    pub workloads: BTreeSet<ObjectKey>,
    /// Services (indices in [`Services::entries`]) with a covered endpoint.
    pub services: BTreeSet<usize>,
    /// Services with an endpoint it does not cover.
    pub uncovered: BTreeSet<usize>,
}

impl Coverage {
    /// Every endpoint of service `i` is covered (and it has one).
    pub fn covers_service(&self, i: usize) -> bool {
        self.services.contains(&i) && !self.uncovered.contains(&i)
    }
}

impl L7Rule {
    /// What it covers, when attached by selector or namespace.
    pub(super) fn coverage(&self) -> Option<&Coverage> {
        self.coverage.as_ref()
    }

    /// Whether every part of it is enforced by a ready waypoint.
    pub fn served(&self) -> bool {
        self.targets.iter().all(|t| t.serving.is_ok())
    }

    /// What its stand-in DENY covers: the targets nobody serves it at; for
    /// a RequestAuthentication attached by selector or namespace, its whole
    /// scope, always (the enforcing waypoints are exempted by principal);
    /// for such an AuthorizationPolicy nothing (its own L4 form stands).
    fn denied(&self) -> Vec<&Target> {
        match &self.coverage {
            Some(c) if self.object.kind == Kind::RequestAuthentication => vec![&c.scope],
            Some(_) => Vec::new(),
            None => self
                .targets
                .iter()
                .filter_map(TargetOutcome::denied)
                .collect(),
        }
    }
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
    /// The covered workloads of one ServiceAccount (a part of a rule
    /// attached by selector or namespace).
    Account { namespace: String, account: String },
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
            Target::Account { namespace, account } => {
                format!("the workloads of ServiceAccount {namespace}/{account}")
            }
        }
    }
}

/// A workload as the targets see it.
pub(super) struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
    /// The ServiceAccount it runs as.
    pub account: &'a str,
    /// Indices of the services it backs.
    pub services: &'a [usize],
    /// The waypoint (`ns/name`) its own traffic is bound to.
    pub waypoint: Option<String>,
}

/// A pod that is a workload (not a waypoint instance, not finished), as
/// the rules attached by selector or namespace see it.
pub(super) struct PodWorkload<'a> {
    pub key: &'a ObjectKey,
    /// In the mesh (`workloads::enrolled`): only those are covered.
    pub enrolled: bool,
    pub namespace: &'a str,
    pub labels: &'a Labels,
    pub account: &'a str,
    /// Indices of the services it backs.
    pub services: Vec<usize>,
    /// The waypoint (`ns/name`) its own traffic is bound to.
    pub waypoint: Option<String>,
}

impl PodWorkload<'_> {
    fn workload(&self) -> Workload<'_> {
        Workload {
            namespace: self.namespace,
            labels: self.labels,
            account: self.account,
            services: &self.services,
            waypoint: self.waypoint.clone(),
        }
    }
}

/// What the targets need to know about the cluster.
pub(super) struct Context<'a> {
    pub state: &'a ClusterState,
    pub mesh: &'a MeshConfig,
    pub services: &'a Services<'a>,
    /// The waypoint (`ns/name`) each service is bound to, by index.
    pub service_waypoints: &'a [Option<String>],
    /// The other waypoints (`ns/name`) serving each service around a change
    /// of its binding, by index ([`super::waypoints::Waypoints::serving`]).
    pub service_also_served_by: &'a [Vec<String>],
    /// Waypoints (`ns/name`) with at least one ready instance.
    pub ready_waypoints: &'a BTreeSet<String>,
    /// Every pod that is a workload; empty when no rule is attached by
    /// selector or namespace ([`needs_pod_workloads`]).
    pub pods: &'a [PodWorkload<'a>],
}

/// Whether some rule may be attached by selector or namespace, so that the
/// rules need [`Context::pods`].
pub(super) fn needs_pod_workloads(state: &ClusterState) -> bool {
    state
        .request_authentications
        .values()
        .any(|ra| ra.spec.target_ref.is_none() && ra.spec.target_refs.is_empty())
        || state
            .authorization_policies
            .values()
            .any(|p| authorization::enforced_at_waypoints_by_selector(p))
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
            Target::Account { namespace, account } => {
                namespace == w.namespace && account == w.account
            }
        }
    }

    /// The rule of a policy attached by selector or namespace: what it
    /// covers, and one part per ServiceAccount's covered workloads (bound
    /// alike) and per Service with a covered endpoint, each served by the
    /// waypoint bound there once it is ready.
    fn workloads_rule(&self, object: PolicyRef, generation: Option<i64>, scope: Target) -> L7Rule {
        let mut coverage = Coverage {
            scope,
            workloads: BTreeSet::new(),
            services: BTreeSet::new(),
            uncovered: BTreeSet::new(),
        };
        let mut accounts: BTreeSet<(&str, &str, Option<&str>)> = BTreeSet::new();
        for p in self.pods {
            let w = p.workload();
            if p.enrolled && self.covers(&coverage.scope, &w) {
                coverage.workloads.insert(p.key.clone());
                coverage.services.extend(w.services.iter().copied());
                accounts.insert((p.namespace, p.account, p.waypoint.as_deref()));
            } else {
                coverage.uncovered.extend(w.services.iter().copied());
            }
        }
        let mut targets = Vec::new();
        for (namespace, account, waypoint) in accounts {
            let target = Target::Account {
                namespace: namespace.to_string(),
                account: account.to_string(),
            };
            let binding = Binding::Service {
                target: format!("ServiceAccount {namespace}/{account}"),
                waypoint: waypoint.map(str::to_string),
            };
            targets.push(TargetOutcome {
                reference: None,
                serving: serving(binding, self.ready_waypoints),
                target: Some(target),
            });
        }
        for &i in &coverage.services {
            let entry = &self.services.entries[i];
            let binding = Binding::Service {
                target: format!("Service {}/{}", entry.namespace, entry.proto.name),
                waypoint: self.service_waypoints[i].clone(),
            };
            targets.push(TargetOutcome {
                reference: None,
                serving: serving(binding, self.ready_waypoints),
                target: Some(Target::Service(i)),
            });
        }
        let mut rule = rule(object, generation, Attachment::Workloads, targets);
        rule.coverage = Some(coverage);
        rule.deny_key = deny_key(&rule.object, &rule.denied());
        rule
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
            if authorization::enforced_at_waypoints_by_selector(policy) {
                let object = authorization::policy_ref(policy);
                let scope = workloads_scope(
                    ctx,
                    &object.key.namespace,
                    policy.spec.selector.as_ref().map(|s| &s.match_labels),
                );
                rules.push(ctx.workloads_rule(object, policy.metadata.generation, scope));
            } else if authorization::targets_waypoints(policy) && !ignored {
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
            let scope = workloads_scope(
                ctx,
                &key.namespace,
                spec.selector.as_ref().map(|s| &s.match_labels),
            );
            rules.push(ctx.workloads_rule(object, generation, scope));
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
                let effect = match (t.denied(), &r.coverage) {
                    // A part of a rule attached by selector or namespace.
                    (Some(target), Some(_)) => {
                        let targets = match target {
                            Target::Service(i) => {
                                let s = &ctx.services.entries[*i];
                                format!(
                                    "the endpoints of Service {}/{} it covers",
                                    s.namespace, s.proto.name
                                )
                            }
                            other => other.describe(ctx.services),
                        };
                        if r.object.kind == Kind::AuthorizationPolicy {
                            Effect::L4FormHolds { targets }
                        } else {
                            Effect::TargetsDenied { targets }
                        }
                    }
                    (Some(target), None) => Effect::TargetsDenied {
                        targets: target.describe(ctx.services),
                    },
                    (None, _) => Effect::NothingDenied,
                };
                problems.push(PolicyProblem::UnservedL7 {
                    object: r.object.clone(),
                    reason: reason.clone(),
                    effect,
                });
            }
        }
    }

    /// The DENY policies to serve, by key: one group without clauses
    /// (it matches every connection), with one clause `not_principals`
    /// naming the identities of the waypoints that enforce the rule, when
    /// some do (`exempt`, see [`exemption`]).
    pub fn authorizations<'a>(
        &'a self,
        exempt: impl Fn(&L7Rule) -> Option<Clause> + 'a,
    ) -> impl Iterator<Item = (&'a str, Authorization)> + 'a {
        self.rules.iter().filter_map(move |r| {
            let key = r.deny_key.as_deref()?;
            let (namespace, name) = key.split_once('/')?;
            Some((
                key,
                Authorization {
                    name: name.to_string(),
                    namespace: namespace.to_string(),
                    scope: Scope::WorkloadSelector as i32,
                    action: Action::Deny as i32,
                    rules: vec![Rule {
                        clauses: exempt(r).into_iter().collect(),
                    }],
                    dry_run: false,
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
            r.denied()
                .into_iter()
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
                    let denied = r.denied().into_iter().cloned().collect();
                    (r.deny_key.clone(), denied)
                })
                .collect(),
        )
    }

    /// The DENY policies a workload lists, sorted.
    pub fn keys_for(&self, ctx: &Context<'_>, w: &Workload<'_>) -> Vec<String> {
        let mut keys: Vec<String> = self
            .rules
            .iter()
            .filter(|r| r.denied().into_iter().any(|t| ctx.covers(t, w)))
            .filter_map(|r| r.deny_key.clone())
            .collect();
        keys.sort();
        keys
    }
}

/// What a selector (or, without one, the namespace) covers: the selected
/// workloads, of any namespace from the root namespace; the namespace; the
/// whole mesh from the root namespace.
fn workloads_scope(ctx: &Context<'_>, namespace: &str, selector: Option<&Labels>) -> Target {
    let root = namespace == ctx.mesh.root_namespace;
    match (selector, root) {
        (Some(labels), _) => Target::Selector {
            namespace: (!root).then(|| namespace.to_string()),
            labels: labels.clone(),
        },
        (None, true) => Target::Mesh,
        (None, false) => Target::Namespace(namespace.to_string()),
    }
}

/// The clause exempting the identities of the waypoints that enforce a
/// rule attached by selector or namespace from its L4 form: `not_principals`
/// (a DENY stops denying their connections; a connection without identity
/// still matches it), or, for an ALLOW, `principals` (an extra group
/// admitting them). `None` when no waypoint enforces it.
pub(super) fn exemption(principals: Vec<StringMatch>, allow: bool) -> Option<Clause> {
    if principals.is_empty() {
        return None;
    }
    let m = if allow {
        Match {
            principals,
            ..Match::default()
        }
    } else {
        Match {
            not_principals: principals,
            ..Match::default()
        }
    };
    Some(Clause { matches: vec![m] })
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
    rule.deny_key = deny_key(&rule.object, &rule.denied());
    Some(rule)
}

fn rule(
    object: PolicyRef,
    generation: Option<i64>,
    attachment: Attachment,
    targets: Vec<TargetOutcome>,
) -> L7Rule {
    let denied: Vec<&Target> = targets.iter().filter_map(TargetOutcome::denied).collect();
    let deny_key = deny_key(&object, &denied);
    L7Rule {
        object,
        generation,
        attachment,
        targets,
        deny_key,
        enforced_by: Vec::new(),
        coverage: None,
    }
}

/// The key of a rule's stand-in DENY, when it denies anything.
fn deny_key(object: &PolicyRef, denied: &[&Target]) -> Option<String> {
    let denies = !denied.is_empty();
    denies.then(|| {
        format!(
            "{}/{UNSERVED_PREFIX}{}_{}",
            object.key.namespace,
            object.kind.as_str().to_lowercase(),
            object.key.name
        )
    })
}
