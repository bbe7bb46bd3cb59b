//! Certificates fetched before they are asked for: as soon as the store
//! places an HBONE workload on this node, its identity's certificate is
//! requested, so the pod finds it ready when the node agent hands the pod
//! over (and a new ztunnel taking a node over requests every identity at
//! once instead of one pod after the other). Upstream's ztunnel does the
//! same (istio/ztunnel `src/cert_fetcher.rs`, `CertFetcherImpl::
//! should_prefetch_certificate`: the workload's node is the local node and
//! it takes HBONE or a native tunnel; `clear_cert` when it leaves).
//!
//! An identity's certificate is kept (and renewed) while a pod proxied here
//! runs as it or a workload of the store on this node has it; when neither
//! holds, it is forgotten ([`Holders`]).

use std::collections::{HashMap, HashSet};
use std::sync::Weak;

use api::SpiffeId;
use proxy_core::store::{InboundProtocol, Snapshot};
use tokio::sync::watch;

use super::Node;

/// Who keeps an identity's certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Holders {
    /// Pods proxied here running as the identity.
    pub pods: usize,
    /// A workload of the store on this node has the identity.
    pub in_store: bool,
}

impl Holders {
    fn held(self) -> bool {
        self.pods > 0 || self.in_store
    }
}

/// The identities whose certificates this node's workloads will need.
pub(super) fn wanted(snapshot: &Snapshot, node: &str) -> HashSet<SpiffeId> {
    snapshot
        .workloads()
        .filter(|w| w.node == node && (w.protocol == InboundProtocol::Hbone || w.native_tunnel))
        .map(|w| w.identity.clone())
        .collect()
}

/// Marks `wanted` as held by the store and the rest as not; returns the
/// identities newly wanted (to fetch) and those no longer held (to forget).
pub(super) fn update(
    identities: &mut HashMap<SpiffeId, Holders>,
    wanted: &HashSet<SpiffeId>,
) -> (Vec<SpiffeId>, Vec<SpiffeId>) {
    let mut fetch = Vec::new();
    for identity in wanted {
        let holders = identities.entry(identity.clone()).or_default();
        if !holders.in_store {
            holders.in_store = true;
            if holders.pods == 0 {
                fetch.push(identity.clone());
            }
        }
    }
    let mut forget = Vec::new();
    identities.retain(|identity, holders| {
        if !wanted.contains(identity) {
            holders.in_store = false;
        }
        let keep = holders.held();
        if !keep {
            forget.push(identity.clone());
        }
        keep
    });
    (fetch, forget)
}

/// Follows the store for as long as the node lives (a proxy configured
/// without its node name prefetches nothing, as upstream's with no local
/// node).
pub(super) fn spawn(node: Weak<Node>, mut changes: watch::Receiver<u64>) {
    tokio::spawn(async move {
        loop {
            let Some(node) = node.upgrade() else { break };
            let Some(name) = node.config.node.as_deref().filter(|n| !n.is_empty()) else {
                break;
            };
            let wanted = wanted(&node.store.snapshot(), name);
            let (fetch, forget) = update(&mut node.lock_identities(), &wanted);
            for identity in forget {
                node.certificates.forget(&identity);
            }
            if !fetch.is_empty() {
                tracing::debug!(identities = fetch.len(), "prefetching certificates");
            }
            for identity in fetch {
                let certificates = node.certificates.clone();
                // The manager keeps renewing (and retrying) it; a failure
                // here is only logged: the pod's own fetch reports it.
                tokio::spawn(async move {
                    if let Err(error) = certificates.fetch(&identity).await {
                        tracing::debug!(%identity, %error, "could not prefetch a certificate");
                    }
                });
            }
            drop(node);
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "ns", sa).unwrap()
    }

    #[test]
    fn identities_are_fetched_once_and_forgotten_when_nothing_holds_them() {
        let mut identities = HashMap::new();
        let (a, b) = (id("a"), id("b"));
        let (fetch, forget) = update(&mut identities, &[a.clone(), b.clone()].into());
        let mut fetch = fetch;
        fetch.sort_by_key(|i| i.to_string());
        assert_eq!((fetch, forget), (vec![a.clone(), b.clone()], vec![]));
        // Nothing new: nothing to do.
        assert_eq!(
            update(&mut identities, &[a.clone(), b.clone()].into()),
            (vec![], vec![])
        );
        // A pod runs as `a`; `a` leaves the store: kept for the pod.
        identities.get_mut(&a).unwrap().pods = 1;
        assert_eq!(
            update(&mut identities, &[b.clone()].into()),
            (vec![], vec![])
        );
        assert_eq!(
            identities[&a],
            Holders {
                pods: 1,
                in_store: false
            }
        );
        // `b` leaves the store and no pod holds it: forgotten.
        assert_eq!(update(&mut identities, &HashSet::new()), (vec![], vec![b]));
        // `a` back in the store while its pod runs: already there.
        assert_eq!(
            update(&mut identities, &[a.clone()].into()),
            (vec![], vec![])
        );
        assert!(identities[&a].in_store);
    }
}
