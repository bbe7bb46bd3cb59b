//! AuthorizationPolicy (`security.istio.io/v1`) -> `istio.security.Authorization`,
//! with upstream istiod's conversion semantics, so upstream ztunnel enforces
//! our output exactly as it would enforce istiod's:
//!
//! - scope: a selector -> WORKLOAD_SELECTOR (listed on the workloads it
//!   selects, in its namespace or, from the root namespace, in any);
//!   otherwise NAMESPACE, or GLOBAL in the root namespace.
//! - each rule becomes one group: a `to` clause (its operations), a `from`
//!   clause (its sources) and one clause per `when` condition, all ANDed.
//! - principals keep the user's text without `spiffe://` (ztunnel strips
//!   that prefix from the peer identity before matching); `*` is presence,
//!   `*x` a suffix and `x*` a prefix match, as for namespaces.
//! - HTTP-only attributes cannot be checked at L4 and fail closed: in an
//!   ALLOW policy the rule holding them is dropped (it matches nothing); in a
//!   DENY policy the rule is kept without them (it denies on its L4 part; a
//!   clause left with no L4 attribute is dropped rather than sent as an
//!   empty match, which ztunnel would never match). Either way the policy
//!   is still served and a warning names it.
//! - `targetRef(s)` policies belong to waypoints and are skipped here;
//!   `istio.io/dry-run: "true"` policies are not enforced.
//!
//! Beyond upstream (which silently drops such values), a value that cannot
//! be read (a bad CIDR, a port that is not a number) rejects the whole policy
//! with an error naming the policy and the field, and CUSTOM / AUDIT actions
//! are rejected with a reason. Other policies are unaffected.

use std::collections::BTreeSet;
use std::net::IpAddr;

use api::crd::{AuthorizationAction, AuthorizationPolicy, Condition, Rule};
use api::security::{
    Action, Address, Authorization, Group, Match, Rules, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};

use super::selectors::Labels;

/// Annotation that marks a policy as dry-run (evaluated, not enforced).
const DRY_RUN: &str = "istio.io/dry-run";

/// `when` keys ztunnel can evaluate.
const L4_CONDITIONS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// What is wrong with a policy, or what is enforced differently from what it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error(
        "AuthorizationPolicy {policy}: action {action} is not supported by ztunnel; the policy is rejected (only ALLOW and DENY are enforced at L4; attach {action} policies to a waypoint with targetRefs)"
    )]
    UnsupportedAction { policy: String, action: String },
    #[error(
        "AuthorizationPolicy {policy}: {field}: {reason}; the policy is rejected until the value is fixed"
    )]
    InvalidValue {
        policy: String,
        field: String,
        reason: String,
    },
    #[error(
        "AuthorizationPolicy {policy}: ztunnel does not support HTTP attributes (found: {attributes}). {consequence} Bind a waypoint and use targetRefs to enforce HTTP rules"
    )]
    HttpAttributes {
        policy: String,
        attributes: String,
        consequence: &'static str,
    },
}

impl PolicyProblem {
    /// Whether the policy was left out entirely (as opposed to served in a
    /// stricter form).
    pub fn rejected(&self) -> bool {
        !matches!(self, PolicyProblem::HttpAttributes { .. })
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyProblem::UnsupportedAction { .. } => "unsupported_action",
            PolicyProblem::InvalidValue { .. } => "invalid_value",
            PolicyProblem::HttpAttributes { .. } => "http_attributes",
        }
    }
}

/// A policy as ztunnel receives it, and whom it selects.
#[derive(Debug, Clone)]
pub(super) struct Converted {
    pub authorization: Authorization,
    /// For WORKLOAD_SELECTOR policies: the labels a workload must carry.
    pub selector: Option<Labels>,
}

/// Converts one policy. `Ok(None)`: not for ztunnel (targetRefs, dry-run).
/// The problems are warnings about a policy that is still served.
pub(super) fn convert(
    root_namespace: &str,
    policy: &AuthorizationPolicy,
    warnings: &mut Vec<PolicyProblem>,
) -> Result<Option<Converted>, PolicyProblem> {
    let namespace = policy.metadata.namespace.clone().unwrap_or_default();
    let name = policy.metadata.name.clone().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let spec = &policy.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return Ok(None);
    }
    let dry_run = policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN))
        // The spellings Go's strconv.ParseBool reads as true, as upstream.
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"));
    if dry_run {
        return Ok(None);
    }
    let action = match spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        AuthorizationAction::Audit | AuthorizationAction::Custom => {
            return Err(PolicyProblem::UnsupportedAction {
                policy: key,
                action: format!("{:?}", spec.action).to_uppercase(),
            });
        }
    };
    let scope = match (&spec.selector, namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    let mut http_attributes = BTreeSet::new();
    let mut groups = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let ctx = Ctx {
            policy: &key,
            field: format!("rules[{i}]"),
        };
        let (rules, http) = convert_rule(&ctx, rule, &namespace)?;
        let drop_rule = action == Action::Allow && !http.is_empty();
        http_attributes.extend(http);
        if !drop_rule {
            groups.push(Group { rules });
        }
    }
    if !http_attributes.is_empty() {
        warnings.push(PolicyProblem::HttpAttributes {
            policy: key,
            attributes: http_attributes.into_iter().collect::<Vec<_>>().join(", "),
            consequence: match action {
                Action::Allow => {
                    "Within an ALLOW policy, rules matching HTTP attributes are omitted, which is more restrictive than requested."
                }
                Action::Deny => {
                    "A DENY policy with HTTP attributes is enforced without the HTTP rules, which is more restrictive than requested."
                }
            },
        });
    }
    Ok(Some(Converted {
        authorization: Authorization {
            name,
            namespace,
            scope: scope as i32,
            action: action as i32,
            groups,
        },
        selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
    }))
}

/// Where in the policy a value sits, for error messages.
struct Ctx<'a> {
    policy: &'a str,
    field: String,
}

impl Ctx<'_> {
    fn at(&self, field: impl std::fmt::Display) -> Ctx<'_> {
        Ctx {
            policy: self.policy,
            field: format!("{}.{field}", self.field),
        }
    }

    fn invalid(&self, index: usize, value: &str, reason: &str) -> PolicyProblem {
        PolicyProblem::InvalidValue {
            policy: self.policy.to_string(),
            field: format!("{}[{index}]", self.field),
            reason: format!("{value:?} {reason}"),
        }
    }
}

/// One rule's clauses, and the HTTP-only attributes it uses.
fn convert_rule(
    ctx: &Ctx<'_>,
    rule: &Rule,
    namespace: &str,
) -> Result<(Vec<Rules>, Vec<String>), PolicyProblem> {
    let mut http = Vec::new();
    let mut clauses = Vec::new();
    let mut to = Vec::new();
    let mut to_unconstrained = false;
    for (i, t) in rule.to.iter().enumerate() {
        let op = &t.operation;
        let ctx = ctx.at(format_args!("to[{i}].operation"));
        let before = http.len();
        for (attr, values) in [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ] {
            if !values.is_empty() {
                http.push(attr.to_string());
            }
        }
        let m = Match {
            destination_ports: ports(&ctx.at("ports"), &op.ports)?,
            not_destination_ports: ports(&ctx.at("notPorts"), &op.not_ports)?,
            ..Default::default()
        };
        to_unconstrained |= http.len() > before && m == Match::default();
        to.push(m);
    }
    let mut from = Vec::new();
    let mut from_unconstrained = false;
    for (i, f) in rule.from.iter().enumerate() {
        let src = &f.source;
        let ctx = ctx.at(format_args!("from[{i}].source"));
        let before = http.len();
        for (attr, values) in [
            ("remoteIpBlocks", &src.remote_ip_blocks),
            ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ("requestPrincipals", &src.request_principals),
            ("notRequestPrincipals", &src.not_request_principals),
        ] {
            if !values.is_empty() {
                http.push(attr.to_string());
            }
        }
        let m = Match {
            namespaces: string_matches(&src.namespaces),
            not_namespaces: string_matches(&src.not_namespaces),
            principals: string_matches(&src.principals),
            not_principals: string_matches(&src.not_principals),
            source_ips: cidrs(&ctx.at("ipBlocks"), &src.ip_blocks)?,
            not_source_ips: cidrs(&ctx.at("notIpBlocks"), &src.not_ip_blocks)?,
            service_accounts: service_accounts(&src.service_accounts, namespace),
            not_service_accounts: service_accounts(&src.not_service_accounts, namespace),
            ..Default::default()
        };
        from_unconstrained |= http.len() > before && m == Match::default();
        from.push(m);
    }
    // An entry left with no L4 attribute once its HTTP ones are gone
    // constrains nothing at L4, so its whole (ORed) clause is dropped.
    // Upstream keeps it as an empty match, which ztunnel never matches: a
    // DENY would then stop denying. Dropping it denies on the L4 part.
    if !to.is_empty() && !to_unconstrained {
        clauses.push(Rules { matches: to });
    }
    if !from.is_empty() && !from_unconstrained {
        clauses.push(Rules { matches: from });
    }
    for (i, when) in rule.when.iter().enumerate() {
        let ctx = ctx.at(format_args!("when[{i}]"));
        if !L4_CONDITIONS.contains(&when.key.as_str()) {
            // Unconstrained at L4, as above.
            http.push(when.key.clone());
            continue;
        }
        clauses.push(Rules {
            matches: vec![condition(&ctx, when)?],
        });
    }
    Ok((clauses, http))
}

/// A `when` condition on an L4 key as one match.
fn condition(ctx: &Ctx<'_>, when: &Condition) -> Result<Match, PolicyProblem> {
    let values = ctx.at("values");
    let not_values = ctx.at("notValues");
    let mut m = Match::default();
    match when.key.as_str() {
        "source.namespace" => {
            m.namespaces = string_matches(&when.values);
            m.not_namespaces = string_matches(&when.not_values);
        }
        "source.principal" => {
            m.principals = string_matches(&when.values);
            m.not_principals = string_matches(&when.not_values);
        }
        "source.ip" => {
            m.source_ips = cidrs(&values, &when.values)?;
            m.not_source_ips = cidrs(&not_values, &when.not_values)?;
        }
        "destination.ip" => {
            m.destination_ips = cidrs(&values, &when.values)?;
            m.not_destination_ips = cidrs(&not_values, &when.not_values)?;
        }
        "destination.port" => {
            m.destination_ports = ports(&values, &when.values)?;
            m.not_destination_ports = ports(&not_values, &when.not_values)?;
        }
        _ => {}
    }
    Ok(m)
}

/// `*` -> presence, `*x` -> suffix `x`, `x*` -> prefix `x`, else exact.
pub(super) fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| {
            let t = if v == "*" {
                MatchType::Presence(())
            } else if let Some(suffix) = v.strip_prefix('*') {
                MatchType::Suffix(suffix.to_string())
            } else if let Some(prefix) = v.strip_suffix('*') {
                MatchType::Prefix(prefix.to_string())
            } else {
                MatchType::Exact(v.clone())
            };
            StringMatch {
                match_type: Some(t),
            }
        })
        .collect()
}

fn ports(ctx: &Ctx<'_>, values: &[String]) -> Result<Vec<u32>, PolicyProblem> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<u16>()
                .map(u32::from)
                .map_err(|_| ctx.invalid(i, v, "is not a port number (0-65535)"))
        })
        .collect()
}

/// An address or CIDR; a bare address is a full-length prefix.
fn cidrs(ctx: &Ctx<'_>, values: &[String]) -> Result<Vec<Address>, PolicyProblem> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let bad = || ctx.invalid(i, v, "is not an IP address or CIDR");
            let (ip, length) = if v.contains('/') {
                let net: ipnet::IpNet = v.parse().map_err(|_| bad())?;
                (net.addr(), u32::from(net.prefix_len()))
            } else {
                let ip: IpAddr = v.parse().map_err(|_| bad())?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            };
            Ok(Address {
                address: super::ip_bytes(ip),
                length,
            })
        })
        .collect()
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            },
            None => ServiceAccountMatch {
                namespace: namespace.to_string(),
                service_account: v.clone(),
            },
        })
        .collect()
}
