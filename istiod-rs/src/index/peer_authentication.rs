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

use std::collections::{BTreeMap, BTreeSet};

use api::crd::{MtlsMode, MutualTls, PeerAuthentication};
use api::security::string_match::MatchType;
use api::security::{Action, Authorization, Group, Match, Rules, Scope, StringMatch};

use super::selectors::{Labels, subset_of};
use crate::state::ClusterState;

/// Name of the static STRICT policy (`_` cannot appear in Kubernetes names).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix of converted selector policies.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

fn mode(mtls: &Option<MutualTls>) -> MtlsMode {
    mtls.as_ref().map(|m| m.mode).unwrap_or(MtlsMode::Unset)
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

/// The oldest policy, first in iteration (name) order on equal timestamps.
fn oldest<'a>(
    policies: impl IntoIterator<Item = &'a PeerAuthentication>,
) -> Option<&'a PeerAuthentication> {
    let mut found: Option<&PeerAuthentication> = None;
    for p in policies {
        let older = match found {
            None => true,
            Some(f) => p.metadata.creation_timestamp < f.metadata.creation_timestamp,
        };
        if older {
            found = Some(p);
        }
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

/// The PeerAuthentications of the cluster, arranged for per-workload lookups.
#[derive(Debug, Default)]
pub(super) struct PeerAuthentications<'a> {
    root_namespace: String,
    any: bool,
    /// Root-namespace policies without a selector (mesh-wide).
    mesh: Vec<&'a PeerAuthentication>,
    by_namespace: BTreeMap<&'a str, Vec<&'a PeerAuthentication>>,
}

impl<'a> PeerAuthentications<'a> {
    pub fn new(state: &'a ClusterState, root_namespace: &str) -> Self {
        let mut index = PeerAuthentications {
            root_namespace: root_namespace.to_string(),
            any: !state.peer_authentications.is_empty(),
            ..Default::default()
        };
        for pa in state.peer_authentications.values() {
            let ns = namespace_of(pa);
            if ns == root_namespace && !has_selector(pa) {
                index.mesh.push(pa);
            }
            index.by_namespace.entry(ns).or_default().push(pa);
        }
        index
    }

    /// The converted policies to serve.
    pub fn authorizations(&self) -> Vec<Authorization> {
        if !self.any {
            return Vec::new();
        }
        let mut out = vec![Authorization {
            name: STATIC_STRICT_POLICY.to_string(),
            namespace: self.root_namespace.clone(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            groups: vec![Group {
                rules: vec![Rules {
                    matches: vec![deny_without_identity(Vec::new())],
                }],
            }],
        }];
        let root = oldest(self.mesh.iter().copied());
        for policies in self.by_namespace.values() {
            let namespace_level = oldest(policies.iter().copied().filter(|p| !has_selector(p)));
            for pa in policies {
                if let Some(a) = self.convert(pa, namespace_level, root) {
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
        pa: &PeerAuthentication,
        ns_cfg: Option<&PeerAuthentication>,
        root_cfg: Option<&PeerAuthentication>,
    ) -> Option<Authorization> {
        let spec = &pa.spec;
        let namespace = namespace_of(pa);
        if namespace == self.root_namespace || !has_selector(pa) || spec.port_level_mtls.is_empty()
        {
            return None;
        }
        let top = mode(&spec.mtls);
        let ns_mode = ns_cfg.map(|c| mode(&c.spec.mtls));
        let root_mode = root_cfg.map(|c| mode(&c.spec.mtls));
        let mut rules = Vec::new();
        let mut groups = Vec::new();
        if top == MtlsMode::Strict {
            rules.push(Rules {
                matches: vec![deny_without_identity(Vec::new())],
            });
        }
        let mut found_non_strict_port = false;
        for (port, port_mtls) in &spec.port_level_mtls {
            match port_mtls.mode {
                MtlsMode::Strict => {
                    // Already enforced by the inherited or own STRICT mode.
                    let inherited_strict = top == MtlsMode::Strict
                        || (top == MtlsMode::Unset && ns_mode == Some(MtlsMode::Strict))
                        || (matches!(ns_mode, None | Some(MtlsMode::Unset))
                            && root_mode == Some(MtlsMode::Strict));
                    if inherited_strict {
                        continue;
                    }
                    groups.push(Group {
                        rules: vec![Rules {
                            matches: vec![deny_without_identity(vec![*port])],
                        }],
                    });
                }
                MtlsMode::Permissive | MtlsMode::Disable => {
                    if matches!(top, MtlsMode::Permissive | MtlsMode::Disable) {
                        continue;
                    }
                    let effective_not_strict = top == MtlsMode::Unset
                        && (ns_mode.is_some_and(|m| m != MtlsMode::Strict)
                            || (ns_mode.is_none()
                                && root_mode.is_some_and(|m| m != MtlsMode::Strict))
                            || (ns_mode.is_none() && root_mode.is_none()));
                    if effective_not_strict {
                        continue;
                    }
                    found_non_strict_port = true;
                    // Deny unless the connection is to this port.
                    rules.push(Rules {
                        matches: vec![Match {
                            not_destination_ports: vec![*port],
                            ..Default::default()
                        }],
                    });
                }
                MtlsMode::Unset => {}
            }
        }
        if top == MtlsMode::Strict && !found_non_strict_port {
            return None;
        }
        if rules.is_empty() && groups.is_empty() {
            return None;
        }
        let merge_strict = (root_mode == Some(MtlsMode::Strict)
            && matches!(
                ns_mode,
                None | Some(MtlsMode::Unset) | Some(MtlsMode::Strict)
            ))
            || ns_mode == Some(MtlsMode::Strict);
        if merge_strict && found_non_strict_port {
            rules.push(Rules {
                matches: vec![deny_without_identity(Vec::new())],
            });
        }
        if !rules.is_empty() {
            groups.push(Group { rules });
        }
        Some(Authorization {
            name: format!(
                "{CONVERTED_PREFIX}{}",
                pa.metadata.name.as_deref().unwrap_or_default()
            ),
            namespace: namespace.to_string(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            groups,
        })
    }

    /// The converted policies a workload lists (sorted), as upstream's
    /// convertedSelectorPeerAuthentications.
    pub fn workload_keys(&self, namespace: &str, labels: &Labels) -> Vec<String> {
        if !self.any {
            return Vec::new();
        }
        let applicable = self.mesh.iter().copied().chain(
            self.by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .copied()
                .filter(|p| {
                    p.spec
                        .selector
                        .as_ref()
                        .is_none_or(|s| subset_of(&s.match_labels, labels))
                }),
        );
        let (mut mesh_cfg, mut ns_cfg, mut workload_cfg): (
            Option<&PeerAuthentication>,
            Option<&PeerAuthentication>,
            Option<&PeerAuthentication>,
        ) = (None, None, None);
        let pick = |slot: &mut Option<&'a PeerAuthentication>, p: &'a PeerAuthentication| {
            if slot.is_none_or(|s| p.metadata.creation_timestamp < s.metadata.creation_timestamp) {
                *slot = Some(p);
            }
        };
        for p in applicable {
            let ns = namespace_of(p);
            if !has_selector_labels(p) {
                if ns == self.root_namespace {
                    pick(&mut mesh_cfg, p);
                } else {
                    pick(&mut ns_cfg, p);
                }
            } else if ns != self.root_namespace {
                pick(&mut workload_cfg, p);
            }
        }
        let mut strict = mesh_cfg.is_some_and(|c| mode(&c.spec.mtls) == MtlsMode::Strict);
        if let Some(c) = ns_cfg
            && mode(&c.spec.mtls) != MtlsMode::Unset
        {
            strict = mode(&c.spec.mtls) == MtlsMode::Strict;
        }
        let mut port_policy = None;
        if let Some(w) = workload_cfg {
            let top = mode(&w.spec.mtls);
            match top {
                MtlsMode::Strict => strict = true,
                MtlsMode::Permissive | MtlsMode::Disable => strict = false,
                MtlsMode::Unset => {}
            }
            let ports = &w.spec.port_level_mtls;
            let any_port = |f: fn(MtlsMode) -> bool| ports.values().any(|m| f(m.mode));
            if !ports.is_empty() {
                let key = format!(
                    "{}/{CONVERTED_PREFIX}{}",
                    namespace_of(w),
                    w.metadata.name.as_deref().unwrap_or_default()
                );
                match top {
                    MtlsMode::Strict => {
                        if any_port(|m| matches!(m, MtlsMode::Permissive | MtlsMode::Disable)) {
                            port_policy = Some(key);
                            strict = false;
                        }
                    }
                    MtlsMode::Permissive | MtlsMode::Disable => {
                        if any_port(|m| m == MtlsMode::Strict) {
                            port_policy = Some(key);
                        }
                    }
                    MtlsMode::Unset => {
                        if strict {
                            if any_port(|m| m == MtlsMode::Permissive) {
                                port_policy = Some(key);
                                strict = false;
                            }
                        } else if any_port(|m| m == MtlsMode::Strict) {
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
