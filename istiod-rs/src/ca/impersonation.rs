//! Who may ask for someone else's certificate (`ImpersonatedIdentity`): a
//! trusted node agent (ztunnel), and only for identities that have a pod on
//! the agent's own node. This is upstream istiod's node authorizer
//! (`security/pkg/server/ca/node_auth.go`, `NodeAuthorizer.authenticateImpersonation`).
//!
//! The agent's node comes from its own pod, as upstream finds it: the pod
//! its bound token names (`pod-name` / `pod-uid` extras, on every Kubernetes
//! version with bound service-account tokens) must be in the cluster state
//! istiod watches, with that uid, running as the caller's service account;
//! its `spec.nodeName` is the node. Beyond upstream, the token's `node-name`
//! extra (Kubernetes 1.30+), or a token file entry's `node`, names the node
//! when the pod cannot be looked up (the token names none, or istiod's
//! cluster state is not synced yet); and when both are known they must agree.
//!
//! [`bind_node`] and [`ImpersonationPolicy::authorize`] are pure decisions
//! over a [`NodeLookup`]; the CA service counts and logs their outcome.

use std::collections::BTreeMap;
use std::sync::RwLock;

use api::SpiffeId;
use prometheus_client::encoding::EncodeLabelValue;

use crate::auth::{Caller, ServiceAccount};

/// What the cluster state holds about a pod, as far as node binding needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlacement {
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`; `None` while the pod is not scheduled.
    pub node: Option<String>,
}

/// The cluster state's answer about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodLookup {
    Found(PodPlacement),
    /// The state is complete and has no such pod.
    Missing,
    /// The state is not complete yet (istiod is starting): absence proves
    /// nothing.
    NotSynced,
}

/// Where pods run: the cluster state answers it for the real store.
pub trait NodeLookup: Send + Sync {
    /// Whether a pod running as `namespace/service_account` is scheduled on
    /// `node` and not finished.
    fn has_pod_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool;

    /// The pod `namespace/name`.
    fn pod(&self, namespace: &str, name: &str) -> PodLookup;
}

/// How the caller's node was found.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum NodeSource {
    /// The caller's pod, from the cluster state.
    pod,
    /// The node its credential names (`node-name` extra, token file).
    credential,
}

/// The node a caller runs on, and how it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeBinding {
    pub node: String,
    pub source: NodeSource,
}

/// Why impersonation was refused. Logged in full (`Display`); the caller is
/// told why in [`ImpersonationRefusal::caller_message`], which names only
/// what its own credential already says (where other pods run, and other
/// pods' details, are not its business).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImpersonationRefusal {
    #[error(
        "{caller} is not a trusted node agent (--trusted-node-agent lists who may request certificates for pods on their node)"
    )]
    NotTrusted { caller: SpiffeId },
    #[error("{requested} is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        requested: SpiffeId,
        trust_domain: String,
    },
    #[error(
        "the caller's token names pod {namespace}/{pod}, which istiod does not know; if the pod was just created istiod will see it shortly (retry), otherwise the token belongs to a deleted pod"
    )]
    PodNotFound { namespace: String, pod: String },
    #[error(
        "the caller's token was issued to pod {namespace}/{pod} with uid {token_uid}, but that pod now has uid {pod_uid} (recreated with the same name); the caller must use its current token"
    )]
    PodUidMismatch {
        namespace: String,
        pod: String,
        token_uid: String,
        pod_uid: String,
    },
    #[error(
        "the caller's pod {namespace}/{pod} runs as service account {pod_service_account:?}, not {token_service_account:?} as its token says"
    )]
    PodServiceAccountMismatch {
        namespace: String,
        pod: String,
        pod_service_account: String,
        token_service_account: String,
    },
    #[error(
        "the caller's pod {namespace}/{pod} is not scheduled on any node (spec.nodeName is empty)"
    )]
    PodNotScheduled { namespace: String, pod: String },
    #[error(
        "the caller's token names node {token_node:?}, but its pod {namespace}/{pod} runs on node {pod_node:?}"
    )]
    NodeMismatch {
        namespace: String,
        pod: String,
        token_node: String,
        pod_node: String,
    },
    #[error(
        "istiod has not finished reading the cluster state, so the caller's pod {namespace}/{pod} cannot be looked up yet, and its token names no node; retry shortly"
    )]
    NotSynced { namespace: String, pod: String },
    #[error(
        "the caller's token names neither its pod nor its node; a node agent must use a bound (projected) service-account token with audience istio-ca"
    )]
    NoNode,
    #[error("no pod running as {namespace}/{service_account} is scheduled on node {node:?}")]
    NoPodOnNode {
        namespace: String,
        service_account: String,
        node: String,
    },
}

/// A bounded label for metrics: one per refusal kind.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusalReason {
    not_trusted,
    foreign_trust_domain,
    pod_not_found,
    pod_uid_mismatch,
    pod_service_account_mismatch,
    pod_not_scheduled,
    node_mismatch,
    not_synced,
    no_node,
    no_pod_on_node,
}

impl ImpersonationRefusal {
    /// Why, for the caller's PERMISSION_DENIED: its own identity, pod and
    /// the identity it asked for, never a node name or another pod's
    /// details.
    pub fn caller_message(&self, requested: &SpiffeId) -> String {
        match self {
            Self::NotTrusted { caller } => format!(
                "{caller} may not request certificates for other identities ({requested}): only trusted node agents (istiod's --trusted-node-agent) may"
            ),
            Self::ForeignTrustDomain { trust_domain, .. } => format!(
                "{requested} is not in this mesh's trust domain {trust_domain:?}"
            ),
            Self::PodNotFound { namespace, pod } => format!(
                "istiod does not know pod {namespace}/{pod}, which your token was issued to; if it was just created retry shortly, otherwise the token belongs to a deleted pod"
            ),
            Self::PodUidMismatch { namespace, pod, .. } => format!(
                "your token was issued to an earlier pod named {namespace}/{pod} (it was recreated since); use the current pod's token"
            ),
            Self::PodServiceAccountMismatch { namespace, pod, .. } => format!(
                "pod {namespace}/{pod}, which your token was issued to, does not run as the service account your token names"
            ),
            Self::PodNotScheduled { namespace, pod } => format!(
                "pod {namespace}/{pod}, which your token was issued to, is not scheduled on a node yet; retry once it is"
            ),
            Self::NodeMismatch { .. } => {
                "the node your token names is not the node your pod runs on".to_string()
            }
            Self::NotSynced { .. } => {
                "istiod is still reading the cluster state and cannot tell your node yet; retry shortly".to_string()
            }
            Self::NoNode => {
                "your token names neither your pod nor your node; a node agent needs a bound (projected) service-account token with audience istio-ca".to_string()
            }
            Self::NoPodOnNode { .. } => format!(
                "impersonation is allowed only for identities with a pod on your node, and no pod running as {requested} is scheduled there"
            ),
        }
    }

    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::NotTrusted { .. } => RefusalReason::not_trusted,
            Self::ForeignTrustDomain { .. } => RefusalReason::foreign_trust_domain,
            Self::PodNotFound { .. } => RefusalReason::pod_not_found,
            Self::PodUidMismatch { .. } => RefusalReason::pod_uid_mismatch,
            Self::PodServiceAccountMismatch { .. } => RefusalReason::pod_service_account_mismatch,
            Self::PodNotScheduled { .. } => RefusalReason::pod_not_scheduled,
            Self::NodeMismatch { .. } => RefusalReason::node_mismatch,
            Self::NotSynced { .. } => RefusalReason::not_synced,
            Self::NoNode => RefusalReason::no_node,
            Self::NoPodOnNode { .. } => RefusalReason::no_pod_on_node,
        }
    }
}

/// The node `caller` runs on. `lookup(namespace, name)` is asked only when
/// the caller's token names its pod.
pub fn bind_node(
    caller: &Caller,
    lookup: impl FnOnce(&str, &str) -> PodLookup,
) -> Result<NodeBinding, ImpersonationRefusal> {
    let credential = || {
        caller.node.clone().map(|node| NodeBinding {
            node,
            source: NodeSource::credential,
        })
    };
    let Some(pod) = &caller.pod else {
        return credential().ok_or(ImpersonationRefusal::NoNode);
    };
    // A service account's pods live in its namespace.
    let namespace = caller.identity.namespace().to_string();
    let name = pod.name.clone();
    match lookup(&namespace, &pod.name) {
        PodLookup::Found(found) => {
            if found.uid != pod.uid {
                return Err(ImpersonationRefusal::PodUidMismatch {
                    namespace,
                    pod: name,
                    token_uid: pod.uid.clone(),
                    pod_uid: found.uid,
                });
            }
            let token_service_account = caller.identity.service_account();
            if found.service_account != token_service_account {
                return Err(ImpersonationRefusal::PodServiceAccountMismatch {
                    namespace,
                    pod: name,
                    pod_service_account: found.service_account,
                    token_service_account: token_service_account.to_string(),
                });
            }
            let Some(pod_node) = found.node.filter(|n| !n.is_empty()) else {
                return Err(ImpersonationRefusal::PodNotScheduled {
                    namespace,
                    pod: name,
                });
            };
            match &caller.node {
                Some(token_node) if *token_node != pod_node => {
                    Err(ImpersonationRefusal::NodeMismatch {
                        namespace,
                        pod: name,
                        token_node: token_node.clone(),
                        pod_node,
                    })
                }
                _ => Ok(NodeBinding {
                    node: pod_node,
                    source: NodeSource::pod,
                }),
            }
        }
        PodLookup::Missing => Err(ImpersonationRefusal::PodNotFound {
            namespace,
            pod: name,
        }),
        PodLookup::NotSynced => credential().ok_or(ImpersonationRefusal::NotSynced {
            namespace,
            pod: name,
        }),
    }
}

/// Who may impersonate whom.
#[derive(Clone, Debug)]
pub struct ImpersonationPolicy<'a> {
    pub trusted_node_agents: &'a [ServiceAccount],
    pub trust_domain: &'a str,
}

impl ImpersonationPolicy<'_> {
    /// Whether `caller` may have a certificate for `requested` (another
    /// identity than its own): it is a trusted node agent, `requested` is in
    /// the mesh's trust domain, and a pod running as `requested` is on the
    /// caller's node.
    pub fn authorize(
        &self,
        caller: &Caller,
        requested: &SpiffeId,
        nodes: &dyn NodeLookup,
    ) -> Result<NodeBinding, ImpersonationRefusal> {
        if !self
            .trusted_node_agents
            .iter()
            .any(|sa| sa.is(&caller.identity))
        {
            return Err(ImpersonationRefusal::NotTrusted {
                caller: caller.identity.clone(),
            });
        }
        if requested.trust_domain() != self.trust_domain {
            return Err(ImpersonationRefusal::ForeignTrustDomain {
                requested: requested.clone(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let binding = bind_node(caller, |ns, name| nodes.pod(ns, name))?;
        if !nodes.has_pod_on_node(
            requested.namespace(),
            requested.service_account(),
            &binding.node,
        ) {
            return Err(ImpersonationRefusal::NoPodOnNode {
                namespace: requested.namespace().to_string(),
                service_account: requested.service_account().to_string(),
                node: binding.node,
            });
        }
        Ok(binding)
    }
}

/// A [`NodeLookup`] over pods given one by one, for tests and for setups
/// without cluster state.
#[derive(Debug)]
pub struct StaticNodeLookup {
    /// Pods by (namespace, name).
    pods: RwLock<BTreeMap<(String, String), PodPlacement>>,
    synced: RwLock<bool>,
}

impl Default for StaticNodeLookup {
    fn default() -> Self {
        StaticNodeLookup {
            pods: RwLock::default(),
            synced: RwLock::new(true),
        }
    }
}

impl StaticNodeLookup {
    /// Records pod `namespace/name` (uid `<namespace>-<name>-uid`) running
    /// as `service_account` on `node`.
    pub fn add(&self, namespace: &str, name: &str, service_account: &str, node: &str) {
        self.add_pod(
            namespace,
            name,
            PodPlacement {
                uid: format!("{namespace}-{name}-uid"),
                service_account: service_account.into(),
                node: Some(node.into()),
            },
        );
    }

    pub fn add_pod(&self, namespace: &str, name: &str, pod: PodPlacement) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.into(), name.into()), pod);
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.into(), name.into()));
    }

    /// Whether absence of a pod is meaningful (default: true).
    pub fn set_synced(&self, synced: bool) {
        *self.synced.write().unwrap_or_else(|e| e.into_inner()) = synced;
    }
}

impl NodeLookup for StaticNodeLookup {
    fn has_pod_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|((ns, _), pod)| {
                ns == namespace
                    && pod.service_account == service_account
                    && pod.node.as_deref() == Some(node)
            })
    }

    fn pod(&self, namespace: &str, name: &str) -> PodLookup {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        match pods.get(&(namespace.to_string(), name.to_string())) {
            Some(pod) => PodLookup::Found(pod.clone()),
            None if *self.synced.read().unwrap_or_else(|e| e.into_inner()) => PodLookup::Missing,
            None => PodLookup::NotSynced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::CallerPod;

    fn ztunnel(pod: Option<(&str, &str)>, node: Option<&str>) -> Caller {
        Caller {
            identity: SpiffeId::new("cluster.local", "istio-system", "ztunnel").unwrap(),
            pod: pod.map(|(name, uid)| CallerPod {
                name: name.into(),
                uid: uid.into(),
            }),
            node: node.map(String::from),
        }
    }

    fn placed(uid: &str, sa: &str, node: Option<&str>) -> PodLookup {
        PodLookup::Found(PodPlacement {
            uid: uid.into(),
            service_account: sa.into(),
            node: node.map(String::from),
        })
    }

    #[test]
    fn binds_the_caller_to_its_node() {
        use NodeSource::{credential, pod};
        let zt = Some(("ztunnel-abc", "uid-1"));
        let found = placed("uid-1", "ztunnel", Some("node-a"));
        // (token's pod, token's node, what the state says) -> node and source, or refusal
        type Case = (
            &'static str,
            Caller,
            PodLookup,
            Result<(&'static str, NodeSource), RefusalReason>,
        );
        let cases: Vec<Case> = vec![
            (
                "pod found, no node extra (Kubernetes < 1.30)",
                ztunnel(zt, None),
                found.clone(),
                Ok(("node-a", pod)),
            ),
            (
                "pod found, node extra agrees",
                ztunnel(zt, Some("node-a")),
                found.clone(),
                Ok(("node-a", pod)),
            ),
            (
                "pod found, node extra disagrees",
                ztunnel(zt, Some("node-b")),
                found.clone(),
                Err(RefusalReason::node_mismatch),
            ),
            (
                "pod recreated: other uid",
                ztunnel(zt, Some("node-a")),
                placed("uid-2", "ztunnel", Some("node-a")),
                Err(RefusalReason::pod_uid_mismatch),
            ),
            (
                "pod runs as another service account",
                ztunnel(zt, None),
                placed("uid-1", "default", Some("node-a")),
                Err(RefusalReason::pod_service_account_mismatch),
            ),
            (
                "pod not scheduled",
                ztunnel(zt, None),
                placed("uid-1", "ztunnel", None),
                Err(RefusalReason::pod_not_scheduled),
            ),
            (
                "pod with an empty nodeName",
                ztunnel(zt, None),
                placed("uid-1", "ztunnel", Some("")),
                Err(RefusalReason::pod_not_scheduled),
            ),
            (
                "pod missing, even with a node extra",
                ztunnel(zt, Some("node-a")),
                PodLookup::Missing,
                Err(RefusalReason::pod_not_found),
            ),
            (
                "state not synced: the node extra",
                ztunnel(zt, Some("node-a")),
                PodLookup::NotSynced,
                Ok(("node-a", credential)),
            ),
            (
                "state not synced, no node extra",
                ztunnel(zt, None),
                PodLookup::NotSynced,
                Err(RefusalReason::not_synced),
            ),
            (
                "no pod in the token: its node",
                ztunnel(None, Some("node-a")),
                PodLookup::Missing,
                Ok(("node-a", credential)),
            ),
            (
                "neither pod nor node",
                ztunnel(None, None),
                found.clone(),
                Err(RefusalReason::no_node),
            ),
        ];
        for (name, caller, lookup, want) in cases {
            let mut asked = None;
            let got = bind_node(&caller, |ns, name| {
                asked = Some(format!("{ns}/{name}"));
                lookup
            });
            let got = got.map(|b| (b.node, b.source)).map_err(|r| r.reason());
            let want = want.map(|(n, s)| (n.to_string(), s));
            assert_eq!(got, want, "{name}");
            // The pod is looked up in the caller's namespace, and only when named.
            let expected = caller
                .pod
                .as_ref()
                .map(|p| format!("istio-system/{}", p.name));
            assert_eq!(asked, expected, "{name}");
        }
    }

    #[test]
    fn refusals_name_the_pod_and_what_to_do() {
        let caller = ztunnel(Some(("ztunnel-abc", "uid-1")), None);
        let err = bind_node(&caller, |_, _| placed("uid-2", "ztunnel", Some("n"))).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("istio-system/ztunnel-abc")
                && text.contains("uid-1")
                && text.contains("uid-2"),
            "{text}"
        );
        let err = bind_node(&ztunnel(None, None), |_, _| PodLookup::Missing).unwrap_err();
        assert!(
            err.to_string()
                .contains("bound (projected) service-account token"),
            "{err}"
        );
    }

    #[test]
    fn authorizes_trusted_agents_for_identities_on_their_node() {
        let nodes = StaticNodeLookup::default();
        nodes.add("istio-system", "ztunnel-abc", "ztunnel", "node-a");
        nodes.add("demo", "web-1", "web", "node-a");
        nodes.add("demo", "db-1", "db", "node-b");
        let trusted = [ServiceAccount::ztunnel()];
        let policy = ImpersonationPolicy {
            trusted_node_agents: &trusted,
            trust_domain: "cluster.local",
        };
        let agent = ztunnel(Some(("ztunnel-abc", "istio-system-ztunnel-abc-uid")), None);
        let id = |s: &str| -> SpiffeId { s.parse().unwrap() };

        let ok = policy
            .authorize(&agent, &id("spiffe://cluster.local/ns/demo/sa/web"), &nodes)
            .unwrap();
        assert_eq!(
            ok,
            NodeBinding {
                node: "node-a".into(),
                source: NodeSource::pod
            }
        );

        let cases = [
            (
                agent.clone(),
                "spiffe://cluster.local/ns/demo/sa/db",
                RefusalReason::no_pod_on_node,
            ),
            (
                agent.clone(),
                "spiffe://other.domain/ns/demo/sa/web",
                RefusalReason::foreign_trust_domain,
            ),
            (
                Caller {
                    identity: id("spiffe://cluster.local/ns/demo/sa/web"),
                    ..agent.clone()
                },
                "spiffe://cluster.local/ns/demo/sa/db",
                RefusalReason::not_trusted,
            ),
        ];
        for (caller, requested, want) in cases {
            let got = policy
                .authorize(&caller, &id(requested), &nodes)
                .unwrap_err();
            assert_eq!(got.reason(), want, "{requested}: {got}");
        }

        // The agent's pod goes away: no more certificates for its node.
        nodes.remove("istio-system", "ztunnel-abc");
        let gone = policy
            .authorize(&agent, &id("spiffe://cluster.local/ns/demo/sa/web"), &nodes)
            .unwrap_err();
        assert_eq!(gone.reason(), RefusalReason::pod_not_found);
    }
}
