//! L4 authorization as ztunnel enforces it: `istio.security.Authorization`
//! converted into validated Rust types, and the pure decision
//! [`Policies::check`] with upstream ztunnel's semantics.
//!
//! - DENY policies first: any match denies.
//! - Then ALLOW: when at least one ALLOW policy applies to the workload, one
//!   of them must match; when none applies, the connection is allowed.
//! - A policy matches when any of its rules matches; a rule when all of its
//!   clauses match (a clause is one of `from` / `to` / `when`); a clause when
//!   any of its matches does; a match when every field it sets holds (values
//!   of one field are alternatives) and none of its `not_` fields does. A
//!   policy with no rules matches nothing, an empty rule or clause matches
//!   everything, a match with no fields set is skipped.
//! - A dry-run policy (`dry_run`, from istiod's `istio.io/dry-run`
//!   annotation) never takes part in the decision: [`Policies::check`]
//!   ignores it. [`Policies::dry_run`] gives the decision the connection would
//!   have got had the dry-run policies been enforced, and
//!   [`Policies::log_dry_run`] logs it (target `authorization`, level info),
//!   so a policy can be watched before it is enforced.
//! - Principals are stored without `spiffe://` (istiod strips it); the
//!   connection's identity is compared with its `spiffe://` removed.
//! - A connection without a verified identity (plaintext) has no principal,
//!   namespace or service account: a field requiring one does not match,
//!   while its `not_` form does.
//!
//! Beyond upstream (which skips them with a warning): a selector-scoped
//! policy a workload refers to but the proxy does not hold (not received
//! yet, or rejected when it arrived) denies every connection to that
//! workload, before any other policy is looked at. Whatever it says, the
//! workload was meant to be guarded by it, and allowing while it is missing
//! could be wider than what it says.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use api::SpiffeId;
use api::security as xds;
use ipnet::IpNet;

use crate::store::ip_from_bytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{field}: {len} bytes is not an IP address (IPv4 has 4 bytes, IPv6 16)")]
    AddressLength { field: String, len: usize },
    #[error("{field}: prefix length {length} is too long for {address}")]
    PrefixLength {
        field: String,
        address: IpAddr,
        length: u32,
    },
    #[error("{field}: port {value} is out of range (0-65535)")]
    Port { field: String, value: u32 },
    #[error("{field}: unknown value {value}; is this proxy older than the control plane?")]
    UnknownEnum { field: String, value: i32 },
    #[error("{field}: a string match needs one of exact, prefix, suffix or presence")]
    EmptyStringMatch { field: String },
    #[error("{field} is required")]
    Missing { field: String },
}

impl Error {
    /// The field the error is about, as given to the conversion.
    pub fn field(&self) -> &str {
        match self {
            Error::AddressLength { field, .. }
            | Error::PrefixLength { field, .. }
            | Error::Port { field, .. }
            | Error::UnknownEnum { field, .. }
            | Error::EmptyStringMatch { field }
            | Error::Missing { field } => field,
        }
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Scope {
    /// Every workload in the mesh (policies in the root namespace).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list the policy in `authorization_policies`.
    WorkloadSelector,
}

impl Scope {
    /// Whether a policy of this scope in `policy_namespace`, keyed `key`,
    /// applies to a workload of `namespace` listing `listed`: a global one
    /// always, a namespace one in its namespace, any one the workload lists.
    pub fn applies(
        self,
        policy_namespace: &str,
        key: &str,
        namespace: &str,
        listed: &[String],
    ) -> bool {
        match self {
            Scope::Global => true,
            Scope::Namespace if policy_namespace == namespace => true,
            Scope::Namespace | Scope::WorkloadSelector => listed.iter().any(|k| k == key),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// One policy, keyed `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Rules (any) of clauses (all) of matches (any), as upstream's nested
    /// `rules` lists.
    pub rules: Vec<Vec<Vec<Match>>>,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
}

/// One set of conditions; every field set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "cidrs")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "cidrs")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "cidrs")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "cidrs")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

fn cidrs<S: serde::Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(nets.iter().map(|n| n.to_string()))
}

/// Upstream's JSON: `{"Exact": "..."}`, `{"Presence": []}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence(),
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence() => !value.is_empty(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// What policy evaluation knows about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub source_ip: IpAddr,
    /// The peer's verified identity; `None` for plaintext.
    pub source_identity: Option<SpiffeId>,
    pub destination: SocketAddr,
}

/// The outcome of [`Policies::check`], with what decided it (for logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No DENY policy matched and no ALLOW policy applies.
    AllowedByDefault,
    /// This ALLOW policy matched.
    Allowed { policy: String },
    /// This DENY policy matched.
    Denied { policy: String },
    /// ALLOW policies apply and none matched.
    NotAllowed,
    /// The workload refers to this policy, which the proxy does not hold.
    MissingPolicy { policy: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::AllowedByDefault | Decision::Allowed { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::AllowedByDefault => f.write_str("allow (no ALLOW policy applies)"),
            Decision::Allowed { policy } => write!(f, "allow (policy {policy})"),
            Decision::Denied { policy } => write!(f, "deny (policy {policy})"),
            Decision::NotAllowed => f.write_str("deny (no ALLOW policy matched)"),
            Decision::MissingPolicy { policy } => write!(
                f,
                "deny (policy {policy} applies to the workload but has not been received or was rejected; failing closed)"
            ),
        }
    }
}

/// The policies that apply to one destination workload.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    /// The policies held that apply.
    pub applied: Vec<Arc<Authorization>>,
    /// Keys of policies the workload refers to that are not held.
    pub missing: Vec<String>,
}

impl Policies {
    /// Policies that are all held.
    pub fn new(applied: Vec<Arc<Authorization>>) -> Self {
        Policies {
            applied,
            missing: Vec::new(),
        }
    }

    /// The decision, from the enforced policies only (dry-run ones are left
    /// out).
    pub fn check(&self, conn: &ConnectionInfo) -> Decision {
        self.decide(conn, false)
    }

    /// When a dry-run policy applies: the decision `conn` would get were the
    /// dry-run policies enforced too (`check` ignores them). `None` when no
    /// dry-run policy applies.
    pub fn dry_run(&self, conn: &ConnectionInfo) -> Option<Decision> {
        self.applied
            .iter()
            .any(|p| p.dry_run)
            .then(|| self.decide(conn, true))
    }

    /// Logs what the dry-run policies that apply would have decided, next to
    /// `enforced` (the decision [`Policies::check`] made); nothing when none
    /// applies. One line per connection, naming each dry-run policy and
    /// whether it matched.
    pub fn log_dry_run(&self, conn: &ConnectionInfo, enforced: &Decision) {
        let Some(would) = self.dry_run(conn) else {
            return;
        };
        let peer = Peer::of(conn);
        let policies = self
            .applied
            .iter()
            .filter(|p| p.dry_run)
            .map(|p| {
                let action = match p.action {
                    Action::Allow => "ALLOW",
                    Action::Deny => "DENY",
                };
                let matched = if p.matches_peer(conn, &peer) {
                    "matched"
                } else {
                    "not matched"
                };
                format!("{} ({action}, {matched})", p.key())
            })
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(
            target: "authorization",
            src = %conn.source_ip,
            src.identity = conn.source_identity.as_ref().map(tracing::field::display),
            dst = %conn.destination,
            dry_run.policies = %policies,
            dry_run.decision = %would,
            decision = %enforced,
            "dry-run authorization: {} if enforced, {} as enforced",
            if would.is_allowed() { "allow" } else { "deny" },
            if enforced.is_allowed() { "allow" } else { "deny" },
        );
    }

    fn decide(&self, conn: &ConnectionInfo, with_dry_run: bool) -> Decision {
        if let Some(policy) = self.missing.first() {
            return Decision::MissingPolicy {
                policy: policy.clone(),
            };
        }
        let peer = Peer::of(conn);
        let (deny, allow): (Vec<_>, Vec<_>) = self
            .applied
            .iter()
            .filter(|p| with_dry_run || !p.dry_run)
            .partition(|p| p.action == Action::Deny);
        if let Some(p) = deny.iter().find(|p| p.matches_peer(conn, &peer)) {
            return Decision::Denied { policy: p.key() };
        }
        if allow.is_empty() {
            return Decision::AllowedByDefault;
        }
        match allow.iter().find(|p| p.matches_peer(conn, &peer)) {
            Some(p) => Decision::Allowed { policy: p.key() },
            None => Decision::NotAllowed,
        }
    }
}

/// The source identity in the forms the match fields compare against,
/// computed once per connection.
struct Peer<'a> {
    /// Without `spiffe://`; `None` for plaintext.
    principal: Option<String>,
    /// Empty for plaintext, as upstream.
    namespace: &'a str,
    identity: Option<&'a SpiffeId>,
}

impl<'a> Peer<'a> {
    fn of(conn: &'a ConnectionInfo) -> Self {
        let identity = conn.source_identity.as_ref();
        Peer {
            principal: identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
            namespace: identity.map(SpiffeId::namespace).unwrap_or(""),
            identity,
        }
    }
}

impl Authorization {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn matches(&self, conn: &ConnectionInfo) -> bool {
        self.matches_peer(conn, &Peer::of(conn))
    }

    fn matches_peer(&self, conn: &ConnectionInfo, peer: &Peer<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(conn, peer)))
        })
    }
}

/// A field holds when it is unset or any value matches; its `not_` form
/// holds when it is unset or no value matches.
pub fn field<T>(positive: &[T], negative: &[T], mut test: impl FnMut(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&mut test)) && !negative.iter().any(test)
}

impl Match {
    pub fn is_empty(&self) -> bool {
        self == &Match::default()
    }

    fn matches(&self, conn: &ConnectionInfo, peer: &Peer<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let dst = conn.destination;
        field(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&dst.ip())
        }) && field(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&conn.source_ip)
        }) && field(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == dst.port()
        }) && field(&self.service_accounts, &self.not_service_accounts, |sa| {
            peer.identity.is_some_and(|id| {
                id.namespace() == sa.namespace && id.service_account() == sa.service_account
            })
        }) && field(&self.principals, &self.not_principals, |m| {
            peer.principal.as_deref().is_some_and(|p| m.matches(p))
        }) && field(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(peer.namespace)
        })
    }
}

fn known<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, Error> {
    E::try_from(value).map_err(|_| Error::UnknownEnum {
        field: field.to_string(),
        value,
    })
}

impl TryFrom<xds::Authorization> for Authorization {
    type Error = Error;

    fn try_from(a: xds::Authorization) -> Result<Self, Error> {
        if a.name.is_empty() {
            return Err(Error::Missing {
                field: "name".into(),
            });
        }
        if a.namespace.is_empty() {
            return Err(Error::Missing {
                field: "namespace".into(),
            });
        }
        let scope = match known::<xds::Scope>("scope", a.scope)? {
            xds::Scope::Global => Scope::Global,
            xds::Scope::Namespace => Scope::Namespace,
            xds::Scope::WorkloadSelector => Scope::WorkloadSelector,
        };
        let action = match known::<xds::Action>("action", a.action)? {
            xds::Action::Allow => Action::Allow,
            xds::Action::Deny => Action::Deny,
        };
        let rules = a
            .rules
            .iter()
            .enumerate()
            .map(|(r, rule)| {
                rule.clauses
                    .iter()
                    .enumerate()
                    .map(|(c, clause)| {
                        clause
                            .matches
                            .iter()
                            .enumerate()
                            .map(|(m, x)| {
                                convert_match(&format!("rules[{r}].clauses[{c}].matches[{m}]"), x)
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Authorization {
            name: a.name,
            namespace: a.namespace,
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}

fn convert_match(path: &str, m: &xds::Match) -> Result<Match, Error> {
    let strings = |name: &str, v: &[xds::StringMatch]| {
        v.iter()
            .enumerate()
            .map(|(i, s)| string_match(&format!("{path}.{name}[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
    };
    let nets = |name: &str, v: &[xds::Address]| {
        v.iter()
            .enumerate()
            .map(|(i, a)| cidr(&format!("{path}.{name}[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |name: &str, v: &[u32]| {
        v.iter()
            .enumerate()
            .map(|(i, p)| {
                u16::try_from(*p).map_err(|_| Error::Port {
                    field: format!("{path}.{name}[{i}]"),
                    value: *p,
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |v: &[xds::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(Match {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings("principals", &m.principals)?,
        not_principals: strings("not_principals", &m.not_principals)?,
        source_ips: nets("source_ips", &m.source_ips)?,
        not_source_ips: nets("not_source_ips", &m.not_source_ips)?,
        destination_ips: nets("destination_ips", &m.destination_ips)?,
        not_destination_ips: nets("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
    })
}

/// `s` validated; `field` names it in the error (shared with waypoint-rs's
/// L7 policies, so both read a string match the same way).
pub fn string_match(field: &str, s: &xds::StringMatch) -> Result<StringMatch, Error> {
    use xds::string_match::MatchType;
    match &s.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence()),
        None => Err(Error::EmptyStringMatch {
            field: field.to_string(),
        }),
    }
}

/// `a` as a CIDR; `field` names it in the error (shared with waypoint-rs).
pub fn cidr(field: &str, a: &xds::Address) -> Result<IpNet, Error> {
    let address = ip_from_bytes(&a.address).ok_or_else(|| Error::AddressLength {
        field: format!("{field}.address"),
        len: a.address.len(),
    })?;
    let too_long = || Error::PrefixLength {
        field: format!("{field}.length"),
        address,
        length: a.length,
    };
    let length = u8::try_from(a.length).map_err(|_| too_long())?;
    IpNet::new(address, length).map_err(|_| too_long())
}

#[cfg(test)]
mod tests;
