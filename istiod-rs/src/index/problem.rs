//! What is wrong with a policy or route, and what the mesh does about it.
//!
//! Every problem names the object and, where there is one, the field
//! (`rules[0].to[0].operation.ports[1]`), and says its effect: always the
//! same as or stricter than what the object asks for, never looser (see
//! "Fail-closed policy semantics" in ARCHITECTURE.md). The pipeline logs
//! each problem once and counts them by kind and reason; the status writer
//! turns them into the object's conditions; an admission webhook rejects
//! the ones [`PolicyProblem::rejected_at_admission`] says it must.

use std::fmt;

use api::manifest::{Kind, ObjectKey};

/// The object a problem is about: `AuthorizationPolicy shop/web-only`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: Kind,
    pub key: ObjectKey,
}

impl PolicyRef {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PolicyRef {
            kind,
            key: ObjectKey::new(namespace, name),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

/// What the mesh enforces instead of what the object says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// ALLOW: the rule holding the value matches nothing; the policy still
    /// applies (it allows only what its other rules match).
    RuleMatchesNothing { rule: String },
    /// DENY (and CUSTOM): the rule denies as if `field` were absent.
    DeniesWithout { field: String },
    /// CUSTOM: enforced at L4 as a DENY of what its rules match.
    EnforcedAsDeny,
    /// AUDIT: not served (an AUDIT policy never changes access).
    NotServed,
    /// HTTP-only attributes in an ALLOW policy: those rules match nothing.
    HttpRulesMatchNothing,
    /// HTTP-only attributes in a DENY policy: denied on the L4 part alone.
    HttpAttributesIgnored,
    /// PeerAuthentication: this mode is enforced as STRICT.
    EnforcedAsStrict,
    /// PeerAuthentication: the policy's mode is enforced as STRICT on every
    /// port that has no valid port-level exception.
    PolicyStrict,
    /// PeerAuthentication: this port-level exception is not applied; the
    /// port keeps the mode it would have without it.
    PortExceptionIgnored,
    /// An L7 rule no waypoint serves: connections to `targets` are denied.
    TargetsDenied { targets: String },
    /// An L7 rule no waypoint serves, at a target that covers no workload.
    NothingDenied,
    /// An AuthorizationPolicy attached by selector or namespace that no
    /// waypoint serves at `targets`: connections there are held to its L4
    /// form (see its HTTP attributes problem).
    L4FormHolds { targets: String },
    /// An AuthorizationPolicy attached by selector or namespace with HTTP
    /// attributes: the `waypoints` (`ns/name`, joined) enforce it as
    /// written; other connections are held to its L4 form (`allow`: its
    /// HTTP rules match nothing; else it denies without them).
    WaypointsEnforce { waypoints: String, allow: bool },
    /// L7: the rule, route or filter holding the value is left out (an
    /// ALLOW rule matching nothing, a route answering 500).
    L7Stricter { what: String },
    /// A setting that does not change access is not applied; `what` says
    /// what applies instead.
    DefaultApplies { what: String },
    /// JWT: tokens of this issuer are rejected (401) until istiod-rs has
    /// its keys.
    IssuerRejected { issuer: String },
    /// DestinationRule, VirtualService: the waypoint does not apply this
    /// field; the rest of the object applies.
    FieldNotApplied,
    /// VirtualService: this match alternative matches no request.
    MatchMatchesNothing,
    /// VirtualService: requests the route matches get HTTP 500 (never a
    /// later route, which the author did not mean for them).
    RouteFails,
    /// VirtualService: this destination's share of the route's requests
    /// gets HTTP 500 (weights keep their meaning).
    BackendFails,
    /// DestinationRule, VirtualService: not used (for this host).
    NotUsed,
    /// ServiceEntry: none of its hosts is served.
    EntryNotServed,
    /// ServiceEntry endpoint, WorkloadEntry: this endpoint is left out; the
    /// rest is served.
    EndpointLeftOut,
    /// ServiceEntry, Service: `exportTo` is not applied (see
    /// `index/export_to.rs`); the service is served to every namespace.
    ExportToNotApplied,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::RuleMatchesNothing { rule } => write!(
                f,
                "{rule} matches nothing; the ALLOW policy still applies and allows only what its other rules match"
            ),
            Effect::DeniesWithout { field } => write!(
                f,
                "the rule denies as if {field} were absent, which denies more than written"
            ),
            Effect::EnforcedAsDeny => f.write_str(
                "ztunnel cannot call an external authorizer, so the policy is enforced as a DENY of what its rules match at L4",
            ),
            Effect::NotServed => {
                f.write_str("the policy is not served (an AUDIT policy never changes access)")
            }
            Effect::HttpRulesMatchNothing => f.write_str(
                "within an ALLOW policy, rules matching HTTP attributes match nothing, which is more restrictive than requested, until a waypoint enforces the policy",
            ),
            Effect::HttpAttributesIgnored => f.write_str(
                "a DENY policy with HTTP attributes is enforced without them, which is more restrictive than requested, until a waypoint enforces the policy",
            ),
            Effect::EnforcedAsStrict => f.write_str("the mode is enforced as STRICT"),
            Effect::PolicyStrict => f.write_str(
                "the policy's mode is enforced as STRICT on every port without a valid port-level exception",
            ),
            Effect::PortExceptionIgnored => f.write_str(
                "this port-level mode is not applied; the port keeps the mode it has without it",
            ),
            Effect::TargetsDenied { targets } => write!(
                f,
                "connections to {targets} are denied until a waypoint serves the rule"
            ),
            Effect::NothingDenied => f.write_str("it covers no workload, so nothing is denied"),
            Effect::L4FormHolds { targets } => write!(
                f,
                "connections to {targets} are held to the policy's L4 form until a waypoint serves the rule"
            ),
            Effect::WaypointsEnforce { waypoints, allow } => write!(
                f,
                "waypoint(s) {waypoints} enforce it with its HTTP attributes; connections that do not come through them are held to its L4 form, in which {}",
                if *allow {
                    "rules matching HTTP attributes match nothing"
                } else {
                    "rules are enforced without their HTTP attributes"
                }
            ),
            Effect::L7Stricter { what } => write!(f, "{what}, which is stricter than written"),
            Effect::DefaultApplies { what } => f.write_str(what),
            Effect::IssuerRejected { issuer } => write!(
                f,
                "the waypoint rejects every token issued by {issuer} (401) until istiod-rs has its keys"
            ),
            Effect::FieldNotApplied => f.write_str(
                "the waypoint does not apply this field; the rest of the object applies",
            ),
            Effect::MatchMatchesNothing => f.write_str(
                "this match matches no request; the route's other matches still apply",
            ),
            Effect::RouteFails => f.write_str(
                "requests this route matches get HTTP 500 rather than another route",
            ),
            Effect::BackendFails => {
                f.write_str("its share of the route's requests gets HTTP 500")
            }
            Effect::NotUsed => f.write_str("it is not used"),
            Effect::EntryNotServed => {
                f.write_str("the ServiceEntry is not served (none of its hosts)")
            }
            Effect::EndpointLeftOut => {
                f.write_str("this endpoint is left out; the rest is served")
            }
            Effect::ExportToNotApplied => f.write_str(
                "the service is still served to clients of every namespace (ambient mode does not apply exportTo, upstream's neither)",
            ),
        }
    }
}

/// Why an L7 rule is not enforced where it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unserved {
    /// The target exists but is bound to no waypoint.
    NotBound { target: String },
    /// The target is (or is bound to) a waypoint that has no ready
    /// instance yet. `target`: the object bound to it, `None` when the
    /// target is the waypoint itself.
    WaypointNotReady {
        target: Option<String>,
        waypoint: String,
    },
    /// The target is bound to no waypoint and its namespace is labelled
    /// `istio.io/auto-waypoint: disabled`: none is made on demand.
    AutoWaypointDisabled { target: String, namespace: String },
    /// The target is bound to no waypoint yet; istiod-rs is making this one
    /// (`ns/name`) on demand for it.
    OnDemandPending { target: String, waypoint: String },
    /// The on-demand waypoint's name is taken by a Gateway istiod-rs did
    /// not make (which it never overwrites), or by one it made for another
    /// account or Service.
    OnDemandNameTaken { target: String, gateway: String },
    /// The target does not exist (nothing to deny now).
    TargetNotFound { target: String },
    /// A target kind the mesh does not support.
    UnsupportedTarget { target: String },
}

impl fmt::Display for Unserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unserved::NotBound { target } => write!(f, "{target} is not bound to a waypoint"),
            Unserved::WaypointNotReady {
                target: Some(target),
                waypoint,
            } => write!(
                f,
                "{target} is bound to waypoint {waypoint}, which has no ready instance yet"
            ),
            Unserved::WaypointNotReady {
                target: None,
                waypoint,
            } => write!(f, "waypoint {waypoint} has no ready instance yet"),
            Unserved::AutoWaypointDisabled { target, namespace } => write!(
                f,
                "{target} is not bound to a waypoint, and waypoints on demand are disabled in namespace {namespace} (label istio.io/auto-waypoint: disabled)"
            ),
            Unserved::OnDemandPending { target, waypoint } => write!(
                f,
                "{target} is not bound to a waypoint yet; istiod-rs is creating waypoint {waypoint} on demand"
            ),
            Unserved::OnDemandNameTaken { target, gateway } => write!(
                f,
                "{target} is not bound to a waypoint, and the on-demand waypoint cannot be created: Gateway {gateway} exists and was not created on demand for it"
            ),
            Unserved::TargetNotFound { target } => write!(f, "{target} was not found"),
            Unserved::UnsupportedTarget { target } => {
                write!(f, "{target} is not a kind of target the mesh supports")
            }
        }
    }
}

/// What is wrong with a policy or route, or what is enforced differently
/// from what it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    /// A value that cannot be read: a port `"http"`, a CIDR `10.0.0.0/33`,
    /// an unknown mTLS mode.
    #[error("{object}: {field}: {value:?} is not {expected}; {effect}")]
    InvalidValue {
        object: PolicyRef,
        field: String,
        value: String,
        expected: &'static str,
        effect: Effect,
    },
    /// A field ztunnel honours only in a form the object does not use.
    #[error("{object}: {field}: {reason}; {effect}")]
    UnsupportedField {
        object: PolicyRef,
        field: String,
        reason: &'static str,
        effect: Effect,
    },
    /// An action ztunnel cannot enforce as written (CUSTOM, AUDIT).
    #[error("{object}: action {action} is not supported by ztunnel; {effect}")]
    UnsupportedAction {
        object: PolicyRef,
        action: &'static str,
        effect: Effect,
    },
    /// HTTP-only attributes in a policy enforced at L4.
    #[error("{object}: ztunnel does not support HTTP attributes (found: {attributes}); {effect}")]
    HttpAttributes {
        object: PolicyRef,
        attributes: String,
        effect: Effect,
    },
    /// A DestinationRule or VirtualService field the waypoint does not
    /// honour, or a host it cannot apply the object to. A valid object
    /// upstream: never refused at admission.
    #[error("{object}: {field}: {reason}; {effect}")]
    NotHonoured {
        object: PolicyRef,
        field: String,
        reason: String,
        effect: Effect,
    },
    /// An L7 rule (targetRefs policy, RequestAuthentication, route) that no
    /// waypoint serves.
    #[error("{object}: {reason}; {effect}")]
    UnservedL7 {
        object: PolicyRef,
        reason: Unserved,
        effect: Effect,
    },
    /// An L7 field the waypoint configuration cannot carry as written: an
    /// unknown `when` key, a filter kind, a backend that does not resolve.
    #[error("{object}: {field}: {reason}; {effect}")]
    UntranslatableL7 {
        object: PolicyRef,
        field: String,
        reason: String,
        effect: Effect,
    },
    /// An L7 rule attached by selector or namespace that a waypoint applies
    /// to every request of a Service, while only some of them reach what the
    /// rule covers.
    #[error("{object}: at Service {service}, {why}; {effect}")]
    AppliedToWholeService {
        object: PolicyRef,
        service: String,
        why: String,
        effect: Effect,
    },
    /// A RequestAuthentication rule whose `jwksUri` istiod-rs could not
    /// fetch (or has not fetched yet).
    #[error("{object}: {field}: the JWKS of {uri} is unavailable: {error}; {effect}")]
    JwksUnavailable {
        object: PolicyRef,
        field: String,
        uri: String,
        error: String,
        effect: Effect,
    },
}

impl PolicyProblem {
    pub fn object(&self) -> &PolicyRef {
        match self {
            PolicyProblem::InvalidValue { object, .. }
            | PolicyProblem::UnsupportedField { object, .. }
            | PolicyProblem::UnsupportedAction { object, .. }
            | PolicyProblem::HttpAttributes { object, .. }
            | PolicyProblem::UnservedL7 { object, .. }
            | PolicyProblem::UntranslatableL7 { object, .. }
            | PolicyProblem::JwksUnavailable { object, .. }
            | PolicyProblem::AppliedToWholeService { object, .. }
            | PolicyProblem::NotHonoured { object, .. } => object,
        }
    }

    /// The message without the object's name, for the object's own status.
    pub fn detail(&self) -> String {
        let full = self.to_string();
        let prefix = format!("{}: ", self.object());
        match full.strip_prefix(&prefix) {
            Some(rest) => rest.to_string(),
            None => full,
        }
    }

    /// The field at fault, when the problem is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            PolicyProblem::InvalidValue { field, .. }
            | PolicyProblem::UnsupportedField { field, .. }
            | PolicyProblem::UntranslatableL7 { field, .. }
            | PolicyProblem::JwksUnavailable { field, .. }
            | PolicyProblem::NotHonoured { field, .. } => Some(field),
            PolicyProblem::UnsupportedAction { .. } => Some("action"),
            PolicyProblem::HttpAttributes { .. }
            | PolicyProblem::UnservedL7 { .. }
            | PolicyProblem::AppliedToWholeService { .. } => None,
        }
    }

    pub fn effect(&self) -> &Effect {
        match self {
            PolicyProblem::InvalidValue { effect, .. }
            | PolicyProblem::UnsupportedField { effect, .. }
            | PolicyProblem::UnsupportedAction { effect, .. }
            | PolicyProblem::HttpAttributes { effect, .. }
            | PolicyProblem::UnservedL7 { effect, .. }
            | PolicyProblem::UntranslatableL7 { effect, .. }
            | PolicyProblem::JwksUnavailable { effect, .. }
            | PolicyProblem::AppliedToWholeService { effect, .. }
            | PolicyProblem::NotHonoured { effect, .. } => effect,
        }
    }

    /// Whether the object is left out entirely (as opposed to enforced in a
    /// stricter form).
    pub fn rejected(&self) -> bool {
        matches!(
            self.effect(),
            Effect::NotServed | Effect::NotUsed | Effect::EntryNotServed | Effect::EndpointLeftOut
        )
    }

    /// Whether an admission webhook must refuse the object: a value that
    /// cannot be read, a field used in a form that is never honoured, or an
    /// action nothing in the mesh enforces. HTTP attributes and L7 rules are
    /// valid objects (a waypoint enforces them).
    pub fn rejected_at_admission(&self) -> bool {
        matches!(
            self,
            PolicyProblem::InvalidValue { .. }
                | PolicyProblem::UnsupportedField { .. }
                | PolicyProblem::UnsupportedAction { .. }
        )
    }

    /// A short label for metrics: one of a fixed set.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyProblem::InvalidValue { .. } => "invalid_value",
            PolicyProblem::UnsupportedField { .. } => "unsupported_field",
            PolicyProblem::UnsupportedAction { .. } => "unsupported_action",
            PolicyProblem::HttpAttributes { .. } => "http_attributes",
            PolicyProblem::UnservedL7 { .. } => "unserved_l7",
            PolicyProblem::UntranslatableL7 { .. } => "untranslatable_l7",
            PolicyProblem::JwksUnavailable { .. } => "jwks_unavailable",
            PolicyProblem::AppliedToWholeService { .. } => "applied_to_whole_service",
            PolicyProblem::NotHonoured { .. } => "not_honoured",
        }
    }
}
