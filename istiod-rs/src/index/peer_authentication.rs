//! PeerAuthentication -> Authorization, exactly as upstream istiod converts
//! it for ztunnel, which has no notion of mTLS modes, only DENY rules:
//!
//! - When any PeerAuthentication exists, one static policy
//!   `<root>/istio_converted_static_strict` is served: DENY any connection
//!   without a peer identity (`not_principals: [presence]`).
//! - Each workload lists it when its effective mode is STRICT (mesh policy,
//!   overridden by the namespace's unless UNSET, overridden by the oldest
//!   selector policy that selects it).
//! - A selector policy with port-level modes (outside the root namespace) is
//!   converted to `<ns>/converted_peer_authentication_<name>`, a DENY policy
//!   holding the per-port exceptions (merged with the inherited STRICT mode
//!   when needed, since ztunnel denies on any matching DENY policy), and the
//!   workloads it selects list that instead.
//!
//! Where several policies compete at one level, the oldest (by
//! creationTimestamp, then name) wins, as upstream.
//!
//! Beyond upstream, a value that cannot be read never loosens mTLS (see
//! [`read`]): an unknown mode is enforced as STRICT, and a port-level mode
//! that cannot be applied (its key is not a port number, or the policy has
//! no selector) makes the policy STRICT when it asks for STRICT and is
//! dropped otherwise. Upstream ignores both, which can leave a port
//! PERMISSIVE that was meant to be STRICT.

use std::collections::{BTreeMap, BTreeSet};

use api::crd::{MtlsMode, MutualTls, PeerAuthentication};
use api::manifest::Kind;
use api::security::string_match::MatchType;
use api::security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::authorization::{PORT, parse_port};
use super::problem::{Effect, PolicyProblem, PolicyRef};
use super::selectors::{Labels, subset_of};
use crate::state::ClusterState;

/// Name of the static STRICT policy (`_` cannot appear in Kubernetes names).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix of converted selector policies.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// What a mode must be.
const MODE: &str = "one of UNSET, DISABLE, PERMISSIVE, STRICT";

/// An mTLS mode as enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A PeerAuthentication as enforced: unknown modes read as STRICT, port
/// keys as numbers (see [`read`]).
#[derive(Debug)]
struct Peer<'a> {
    pa: &'a PeerAuthentication,
    mode: Mode,
    ports: BTreeMap<u32, Mode>,
}

/// The problems an admission webhook must refuse the policy for (an mTLS
/// mode or a port that cannot be read, port-level modes without a
/// selector), each naming the field. The same reading as the conversion's.
pub fn validate_peer_authentication(policy: &PeerAuthentication) -> Vec<PolicyProblem> {
    let mut problems = Vec::new();
    read(policy, &mut problems);
    problems.retain(PolicyProblem::rejected_at_admission);
    problems
}

/// Reads a mode; an unknown one is STRICT.
fn read_mode(
    object: &PolicyRef,
    field: &str,
    mtls: Option<&MutualTls>,
    problems: &mut Vec<PolicyProblem>,
) -> Mode {
    match mtls.map(|m| &m.mode) {
        None | Some(MtlsMode::Unset) => Mode::Unset,
        Some(MtlsMode::Disable) => Mode::Disable,
        Some(MtlsMode::Permissive) => Mode::Permissive,
        Some(MtlsMode::Strict) => Mode::Strict,
        Some(MtlsMode::Unknown(value)) => {
            problems.push(PolicyProblem::InvalidValue {
                object: object.clone(),
                field: field.to_string(),
                value: value.clone(),
                expected: MODE,
                effect: Effect::EnforcedAsStrict,
            });
            Mode::Strict
        }
    }
}

/// Reads a policy so that nothing it says is enforced more loosely than
/// written: an unknown mode is STRICT; a port-level mode under a key that
/// is not a port number, or in a policy without a selector (which upstream
/// ignores), makes the whole policy STRICT when that mode is STRICT and is
/// dropped otherwise (the port keeps the mode it has without it).
fn read<'a>(pa: &'a PeerAuthentication, problems: &mut Vec<PolicyProblem>) -> Peer<'a> {
    let object = PolicyRef::new(
        Kind::PeerAuthentication,
        namespace_of(pa),
        pa.metadata.name.clone().unwrap_or_default(),
    );
    let spec = &pa.spec;
    let mut mode = read_mode(&object, "mtls.mode", spec.mtls.as_ref(), problems);
    let mut ports = BTreeMap::new();
    for (key, mtls) in &spec.port_level_mtls {
        let field = format!("portLevelMtls[{key}]");
        let port_mode = read_mode(&object, &format!("{field}.mode"), Some(mtls), problems);
        // Applied where it cannot be: as STRICT for the whole policy when
        // it asks for STRICT, not at all otherwise.
        let mut unapplied = || {
            if port_mode == Mode::Strict {
                mode = Mode::Strict;
                Effect::PolicyStrict
            } else {
                Effect::PortExceptionIgnored
            }
        };
        match parse_port(key) {
            Some(_) if !has_selector_labels(pa) => problems.push(PolicyProblem::UnsupportedField {
                object: object.clone(),
                field,
                reason: "port-level modes apply only to a policy with a selector",
                effect: unapplied(),
            }),
            Some(port) => {
                ports.insert(port, port_mode);
            }
            None => problems.push(PolicyProblem::InvalidValue {
                object: object.clone(),
                field,
                value: key.clone(),
                expected: PORT,
                effect: unapplied(),
            }),
        }
    }
    Peer { pa, mode, ports }
}

fn has_selector(pa: &PeerAuthentication) -> bool {
    pa.spec.selector.is_some()
}

fn has_selector_labels(pa: &PeerAuthentication) -> bool {
    pa.spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty())
}

fn namespace_of(pa: &PeerAuthentication) -> &str {
    pa.metadata.namespace.as_deref().unwrap_or_default()
}

fn created<'a>(p: &Peer<'a>) -> Option<&'a Time> {
    p.pa.metadata.creation_timestamp.as_ref()
}

/// The oldest policy, first in iteration (name) order on equal timestamps.
fn oldest<'p, 'a>(policies: impl IntoIterator<Item = &'p Peer<'a>>) -> Option<&'p Peer<'a>> {
    let mut found = None;
    for p in policies {
        pick(&mut found, p);
    }
    found
}

fn deny_without_identity(destination_ports: Vec<u32>) -> Match {
    Match {
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        destination_ports,
        ..Default::default()
    }
}

/// The PeerAuthentications of the cluster, read, and arranged for
/// per-workload lookups.
#[derive(Debug, Default)]
pub(super) struct PeerAuthentications<'a> {
    root_namespace: String,
    by_namespace: BTreeMap<&'a str, Vec<Peer<'a>>>,
}

impl<'a> PeerAuthentications<'a> {
    /// Reads every policy, pushing what is wrong with each to `problems`.
    pub fn new(
        state: &'a ClusterState,
        root_namespace: &str,
        problems: &mut Vec<PolicyProblem>,
    ) -> Self {
        let mut index = PeerAuthentications {
            root_namespace: root_namespace.to_string(),
            ..Default::default()
        };
        for pa in state.peer_authentications.values() {
            index
                .by_namespace
                .entry(namespace_of(pa))
                .or_default()
                .push(read(pa, problems));
        }
        index
    }

    fn any(&self) -> bool {
        !self.by_namespace.is_empty()
    }

    /// Root-namespace policies without a selector (mesh-wide).
    fn mesh(&self) -> impl Iterator<Item = &Peer<'a>> {
        self.by_namespace
            .get(self.root_namespace.as_str())
            .into_iter()
            .flatten()
            .filter(|p| !has_selector(p.pa))
    }

    /// The converted policies to serve.
    pub fn authorizations(&self) -> Vec<Authorization> {
        if !self.any() {
            return Vec::new();
        }
        let mut out = vec![Authorization {
            name: STATIC_STRICT_POLICY.to_string(),
            namespace: self.root_namespace.clone(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![deny_without_identity(Vec::new())],
                }],
            }],
            dry_run: false,
        }];
        let root = oldest(self.mesh());
        for policies in self.by_namespace.values() {
            let namespace_level = oldest(policies.iter().filter(|p| !has_selector(p.pa)));
            for p in policies {
                if let Some(a) = self.convert(p, namespace_level, root) {
                    out.push(a);
                }
            }
        }
        out
    }

    /// One selector policy with port-level modes, as upstream's
    /// convertPeerAuthentication.
    fn convert(
        &self,
        p: &Peer<'_>,
        ns_cfg: Option<&Peer<'_>>,
        root_cfg: Option<&Peer<'_>>,
    ) -> Option<Authorization> {
        let namespace = namespace_of(p.pa);
        if namespace == self.root_namespace || !has_selector(p.pa) || p.ports.is_empty() {
            return None;
        }
        let top = p.mode;
        let ns_mode = ns_cfg.map(|c| c.mode);
        let root_mode = root_cfg.map(|c| c.mode);
        let mut clauses = Vec::new();
        let mut rules = Vec::new();
        if top == Mode::Strict {
            clauses.push(Clause {
                matches: vec![deny_without_identity(Vec::new())],
            });
        }
        let mut found_non_strict_port = false;
        for (port, port_mode) in &p.ports {
            match port_mode {
                Mode::Strict => {
                    // Already enforced by the inherited or own STRICT mode.
                    let inherited_strict = top == Mode::Strict
                        || (top == Mode::Unset && ns_mode == Some(Mode::Strict))
                        || (matches!(ns_mode, None | Some(Mode::Unset))
                            && root_mode == Some(Mode::Strict));
                    if inherited_strict {
                        continue;
                    }
                    rules.push(Rule {
                        clauses: vec![Clause {
                            matches: vec![deny_without_identity(vec![*port])],
                        }],
                    });
                }
                Mode::Permissive | Mode::Disable => {
                    if matches!(top, Mode::Permissive | Mode::Disable) {
                        continue;
                    }
                    let effective_not_strict = top == Mode::Unset
                        && (ns_mode.is_some_and(|m| m != Mode::Strict)
                            || (ns_mode.is_none() && root_mode.is_some_and(|m| m != Mode::Strict))
                            || (ns_mode.is_none() && root_mode.is_none()));
                    if effective_not_strict {
                        continue;
                    }
                    found_non_strict_port = true;
                    // Deny unless the connection is to this port.
                    clauses.push(Clause {
                        matches: vec![Match {
                            not_destination_ports: vec![*port],
                            ..Default::default()
                        }],
                    });
                }
                Mode::Unset => {}
            }
        }
        if top == Mode::Strict && !found_non_strict_port {
            return None;
        }
        if clauses.is_empty() && rules.is_empty() {
            return None;
        }
        let merge_strict = (root_mode == Some(Mode::Strict)
            && matches!(ns_mode, None | Some(Mode::Unset) | Some(Mode::Strict)))
            || ns_mode == Some(Mode::Strict);
        if merge_strict && found_non_strict_port {
            clauses.push(Clause {
                matches: vec![deny_without_identity(Vec::new())],
            });
        }
        if !clauses.is_empty() {
            rules.push(Rule { clauses });
        }
        Some(Authorization {
            name: converted_name(p.pa),
            namespace: namespace.to_string(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules,
            dry_run: false,
        })
    }

    /// The converted policies a workload lists (sorted), as upstream's
    /// convertedSelectorPeerAuthentications.
    pub fn workload_keys(&self, namespace: &str, labels: &Labels) -> Vec<String> {
        if !self.any() {
            return Vec::new();
        }
        let applicable = self.mesh().chain(
            self.by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .filter(|p| {
                    p.pa.spec
                        .selector
                        .as_ref()
                        .is_none_or(|s| subset_of(&s.match_labels, labels))
                }),
        );
        let (mut mesh_cfg, mut ns_cfg, mut workload_cfg) = (None, None, None);
        for p in applicable {
            let ns = namespace_of(p.pa);
            if !has_selector_labels(p.pa) {
                if ns == self.root_namespace {
                    pick(&mut mesh_cfg, p);
                } else {
                    pick(&mut ns_cfg, p);
                }
            } else if ns != self.root_namespace {
                pick(&mut workload_cfg, p);
            }
        }
        let mut strict = mesh_cfg.is_some_and(|c| c.mode == Mode::Strict);
        if let Some(c) = ns_cfg
            && c.mode != Mode::Unset
        {
            strict = c.mode == Mode::Strict;
        }
        let mut port_policy = None;
        if let Some(w) = workload_cfg {
            let top = w.mode;
            match top {
                Mode::Strict => strict = true,
                Mode::Permissive | Mode::Disable => strict = false,
                Mode::Unset => {}
            }
            let any_port = |f: fn(Mode) -> bool| w.ports.values().any(|m| f(*m));
            if !w.ports.is_empty() {
                let key = format!("{}/{}", namespace_of(w.pa), converted_name(w.pa));
                match top {
                    Mode::Strict => {
                        if any_port(|m| matches!(m, Mode::Permissive | Mode::Disable)) {
                            port_policy = Some(key);
                            strict = false;
                        }
                    }
                    Mode::Permissive | Mode::Disable => {
                        if any_port(|m| m == Mode::Strict) {
                            port_policy = Some(key);
                        }
                    }
                    Mode::Unset => {
                        if strict {
                            if any_port(|m| m == Mode::Permissive) {
                                port_policy = Some(key);
                                strict = false;
                            }
                        } else if any_port(|m| m == Mode::Strict) {
                            port_policy = Some(key);
                        }
                    }
                }
            }
        }
        let mut keys = BTreeSet::new();
        if strict {
            keys.insert(format!("{}/{STATIC_STRICT_POLICY}", self.root_namespace));
        }
        keys.extend(port_policy);
        keys.into_iter().collect()
    }
}

/// Keeps the older of `slot` and `p` in `slot`.
fn pick<'p, 'a>(slot: &mut Option<&'p Peer<'a>>, p: &'p Peer<'a>) {
    if slot.is_none_or(|s| created(p) < created(s)) {
        *slot = Some(p);
    }
}

/// `converted_peer_authentication_<name>`.
fn converted_name(pa: &PeerAuthentication) -> String {
    format!(
        "{CONVERTED_PREFIX}{}",
        pa.metadata.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> PeerAuthentication {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: shop}}\n{yaml}"
        );
        match api::manifest::parse(&text).unwrap().objects.remove(0) {
            api::manifest::Object::PeerAuthentication(p) => p,
            other => panic!("not a policy: {other:?}"),
        }
    }

    #[test]
    fn unreadable_values_read_as_stricter() {
        let mut problems = Vec::new();
        let pa = policy("spec:\n  mtls: {mode: STRICTT}\n");
        assert_eq!(read(&pa, &mut problems).mode, Mode::Strict);
        assert_eq!(problems[0].field(), Some("mtls.mode"));

        // A bad key asking for STRICT makes the policy STRICT; a bad key
        // asking for PERMISSIVE is dropped; a good one is kept.
        let pa = policy(
            "spec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    http: {mode: STRICT}\n    \"8080\": {mode: DISABLE}\n    \"-1\": {mode: PERMISSIVE}\n    \"9090\": {mode: strict}\n",
        );
        let mut problems = Vec::new();
        let read = read(&pa, &mut problems);
        assert_eq!(read.mode, Mode::Strict);
        assert_eq!(
            read.ports,
            BTreeMap::from([(8080, Mode::Disable), (9090, Mode::Strict)])
        );
        let fields: Vec<_> = problems.iter().filter_map(PolicyProblem::field).collect();
        assert_eq!(
            fields,
            [
                "portLevelMtls[-1]",
                "portLevelMtls[9090].mode",
                "portLevelMtls[http]"
            ]
        );
        assert_eq!(validate_peer_authentication(&pa), problems);
    }

    #[test]
    fn port_level_modes_without_a_selector_are_refused_and_never_loosen() {
        let pa = policy(
            "spec:\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    \"8080\": {mode: STRICT}\n",
        );
        let mut problems = Vec::new();
        let read = read(&pa, &mut problems);
        assert_eq!(read.mode, Mode::Strict);
        assert!(read.ports.is_empty());
        let problems = validate_peer_authentication(&pa);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field(), Some("portLevelMtls[8080]"));
        assert!(
            validate_peer_authentication(&policy("spec:\n  mtls: {mode: STRICT}\n")).is_empty()
        );
    }
}
