//! The ceiling on sockets the proxy holds open to applications on behalf of
//! peers: the connection to the app in the pod behind each HBONE stream and
//! each plaintext client. Without it one peer holds sockets until the
//! process is out of file descriptors and every pod on the node loses
//! service. A peer holds at most `per_peer` of them, the node at most
//! `per_node`; past either, a new connection is refused (503 / RST, reason
//! `peer_socket_limit` / `node_socket_limit`) and everyone else keeps being
//! served.
//!
//! A peer is a verified identity at an address (HBONE: one client pod, or
//! one waypoint), or an address alone (plaintext): one pod's worth of
//! traffic, so a busy identity with many pods is not throttled as one.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use api::SpiffeId;
use proxy_core::log_limit::LogLimit;

use super::metrics::FailureReason;

/// How many application sockets may be held, per peer and per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldSocketLimits {
    pub per_peer: usize,
    pub per_node: usize,
}

impl Default for HeldSocketLimits {
    /// 1024 per peer (Envoy's default circuit-breaker `max_connections` per
    /// upstream cluster); per node, [`node_default`].
    fn default() -> Self {
        HeldSocketLimits {
            per_peer: 1024,
            per_node: node_default(),
        }
    }
}

/// A third of the process's open-file limit: a held socket and its client's
/// socket (plaintext) take two descriptors, and the last third stays for the
/// pods' own outbound connections, the listeners, HBONE connections and
/// istiod.
pub fn node_default() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    usize::try_from(soft / 3).unwrap_or(usize::MAX).max(1)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{peer} already holds {limit} connections to applications on this node (its ceiling, --max-held-sockets-per-peer)"
    )]
    PeerCeiling { peer: Peer, limit: usize },
    #[error(
        "this node already holds {limit} connections to applications for its peers (its ceiling, --max-held-sockets-per-node)"
    )]
    NodeCeiling { limit: usize },
}

impl Error {
    pub fn reason(&self) -> FailureReason {
        match self {
            Error::PeerCeiling { .. } => FailureReason::PeerSocketLimit,
            Error::NodeCeiling { .. } => FailureReason::NodeSocketLimit,
        }
    }

    /// The operator's warning, at most one per interval per ceiling (the
    /// access log still has a line per refused connection).
    pub(super) fn warn(&self) {
        static PEER: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));
        static NODE: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));
        let limit = match self {
            Error::PeerCeiling { .. } => &PEER,
            Error::NodeCeiling { .. } => &NODE,
        };
        if let Some(suppressed) = limit.allow() {
            tracing::warn!(error = %self, suppressed, "refusing new connections");
        }
    }
}

/// Who holds a socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Verified by HBONE's mutual TLS; none for plaintext.
    pub identity: Option<SpiffeId>,
    pub ip: IpAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(identity) => write!(f, "peer {identity} at {}", self.ip),
            None => write!(f, "plaintext peer {}", self.ip),
        }
    }
}

/// The node's held sockets, by peer.
#[derive(Debug)]
pub struct HeldSockets {
    limits: HeldSocketLimits,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Only peers holding at least one.
    by_peer: HashMap<Peer, usize>,
}

impl HeldSockets {
    pub fn new(limits: HeldSocketLimits) -> Arc<Self> {
        Arc::new(HeldSockets {
            limits,
            held: Mutex::default(),
        })
    }

    /// A place for one more socket held for `peer`, given back when the
    /// returned guard drops; refused past the peer's or the node's ceiling.
    pub fn hold(self: &Arc<Self>, peer: Peer) -> Result<HeldSocket, Error> {
        let mut held = self.lock();
        let of_peer = held.by_peer.get(&peer).copied().unwrap_or(0);
        if of_peer >= self.limits.per_peer {
            return Err(Error::PeerCeiling {
                peer,
                limit: self.limits.per_peer,
            });
        }
        if held.total >= self.limits.per_node {
            return Err(Error::NodeCeiling {
                limit: self.limits.per_node,
            });
        }
        held.total += 1;
        *held.by_peer.entry(peer.clone()).or_default() += 1;
        Ok(HeldSocket {
            sockets: self.clone(),
            peer,
        })
    }

    /// Sockets held now, over all peers.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    fn release(&self, peer: &Peer) {
        let mut held = self.lock();
        held.total -= 1;
        if let Some(n) = held.by_peer.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                held.by_peer.remove(peer);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One held socket's place; dropping it gives the place back.
#[derive(Debug)]
pub struct HeldSocket {
    sockets: Arc<HeldSockets>,
    peer: Peer,
}

impl Drop for HeldSocket {
    fn drop(&mut self) {
        self.sockets.release(&self.peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: Option<&str>, ip: &str) -> Peer {
        Peer {
            identity: identity.map(|i| i.parse().unwrap()),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn each_peer_and_the_node_have_a_ceiling() {
        let sockets = HeldSockets::new(HeldSocketLimits {
            per_peer: 2,
            per_node: 5,
        });
        let alice = peer(Some("spiffe://cluster.local/ns/a/sa/alice"), "10.0.0.1");
        // The same identity from another pod, and a plaintext client at
        // alice's address, are other peers.
        let alice_elsewhere = peer(Some("spiffe://cluster.local/ns/a/sa/alice"), "10.0.0.2");
        let plaintext = peer(None, "10.0.0.1");

        let mut held = vec![
            sockets.hold(alice.clone()).unwrap(),
            sockets.hold(alice.clone()).unwrap(),
        ];
        let err = sockets.hold(alice.clone()).unwrap_err();
        assert_eq!(err.reason(), FailureReason::PeerSocketLimit);
        assert!(
            err.to_string().contains("sa/alice at 10.0.0.1")
                && err.to_string().contains("--max-held-sockets-per-peer"),
            "{err}"
        );
        held.push(sockets.hold(alice_elsewhere.clone()).unwrap());
        held.push(sockets.hold(plaintext.clone()).unwrap());
        held.push(sockets.hold(plaintext.clone()).unwrap());
        assert_eq!(sockets.total(), 5);

        // The node is full: a peer under its own ceiling is refused too.
        let err = sockets.hold(alice_elsewhere.clone()).unwrap_err();
        assert_eq!(err.reason(), FailureReason::NodeSocketLimit);
        assert!(
            err.to_string().contains("--max-held-sockets-per-node"),
            "{err}"
        );
        // A peer at its own ceiling is told so first.
        assert_eq!(
            sockets.hold(alice.clone()).unwrap_err().reason(),
            FailureReason::PeerSocketLimit
        );

        // Closing gives places back, to the node and to the peer.
        held.remove(0);
        assert_eq!(sockets.total(), 4);
        held.push(sockets.hold(alice.clone()).unwrap());
        drop(held);
        assert_eq!(sockets.total(), 0);
        assert!(sockets.lock().by_peer.is_empty(), "no peer is remembered");
    }

    #[test]
    fn the_node_default_follows_the_open_file_limit() {
        use nix::sys::resource::{Resource, getrlimit};
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(node_default() as u64, (soft / 3).max(1));
        assert_eq!(HeldSocketLimits::default().per_peer, 1024);
    }
}
