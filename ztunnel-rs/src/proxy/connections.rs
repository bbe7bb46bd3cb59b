//! Live connections: every connection the node's pod proxies carry, listed
//! while it is carried, for `/config_dump`'s `workloadState` (upstream
//! ztunnel's key and shape, [`api::workload_state`]) and `istioctl-rs
//! ztunnel-config connections`.
//!
//! A connection is tracked once it is carried (its next hop or application
//! answered) and untracked when its [`Tracked`] guard drops: at its end, on
//! an error, on a panic, or when the drain deadline cancels its task, so no
//! path leaves an entry behind. Its byte counts are the connection's own
//! counters (those of the access log and the metrics: atomics the copy loop
//! already adds to), so tracking costs nothing per read or write; the lock
//! is taken once when a connection starts and once when it ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use api::SpiffeId;
use api::workload_state::Connection as ConnectionDump;

use super::PodInfo;

/// Which of the pod's lists a connection is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// To the pod (HBONE or plaintext inbound).
    Inbound,
    /// From the pod.
    Outbound,
}

/// What carries the connection on the network side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Hbone,
    Tcp,
}

impl Protocol {
    /// Upstream's spelling.
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Hbone => "HBONE",
            Protocol::Tcp => "TCP",
        }
    }
}

/// One carried connection of a pod.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The pod it belongs to.
    pub pod: Arc<PodInfo>,
    pub carried: Carried,
}

/// A connection as the listener that carries it knows it.
#[derive(Clone, Debug)]
pub struct Carried {
    pub direction: Direction,
    pub protocol: Protocol,
    /// The client.
    pub src: SocketAddr,
    /// Outbound: the address the application dialled; inbound: the service
    /// the peer addressed, if any.
    pub original_dst: Option<String>,
    /// The next hop (outbound) or the application (inbound).
    pub actual_dst: SocketAddr,
    /// Identities proved by mutual TLS (HBONE only).
    pub src_identity: Option<SpiffeId>,
    pub dst_identity: Option<SpiffeId>,
}

/// Bytes one way, shared with the copy loop that counts them.
pub type ByteTotal = Arc<AtomicU64>;

struct Entry {
    connection: Connection,
    started: SystemTime,
    start: Instant,
    /// From the pod's side: what it sent and what it received.
    sent: ByteTotal,
    received: ByteTotal,
}

/// The node's live connections. Shared by every pod's proxy.
#[derive(Default)]
pub struct Tracker {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("live", &self.len())
            .finish_non_exhaustive()
    }
}

/// A connection listed until this is dropped.
#[must_use = "the connection is untracked when this drops"]
pub struct Tracked {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
    }
}

impl Tracker {
    /// Lists `connection` until the returned guard drops; `sent` and
    /// `received` are the pod's running byte totals for it.
    pub fn track(
        self: &Arc<Self>,
        connection: Connection,
        (sent, received): (ByteTotal, ByteTotal),
    ) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            connection,
            started: SystemTime::now(),
            start: Instant::now(),
            sent,
            received,
        };
        self.lock().insert(id, entry);
        Tracked {
            tracker: self.clone(),
            id,
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live connection by pod uid: the pod, then its inbound and
    /// outbound connections, each oldest first.
    pub fn by_pod(&self) -> HashMap<String, PodConnections> {
        let now = Instant::now();
        let mut pods: HashMap<String, PodConnections> = HashMap::new();
        let live = self.lock();
        let mut entries: Vec<(&u64, &Entry)> = live.iter().collect();
        // Ids grow with time: oldest first, and a stable order.
        entries.sort_by_key(|(id, _)| **id);
        for (_, e) in entries {
            let owner = &e.connection.pod;
            let pod = pods
                .entry(owner.uid.clone())
                .or_insert_with(|| PodConnections {
                    pod: owner.clone(),
                    inbound: Vec::new(),
                    outbound: Vec::new(),
                });
            let c = &e.connection.carried;
            let dump = ConnectionDump {
                src: c.src.to_string(),
                original_dst: c.original_dst.clone(),
                actual_dst: c.actual_dst.to_string(),
                protocol: c.protocol.as_str().to_string(),
                src_identity: c.src_identity.as_ref().map(ToString::to_string),
                dst_identity: c.dst_identity.as_ref().map(ToString::to_string),
                bytes_sent: Some(e.sent.load(Ordering::Relaxed)),
                bytes_received: Some(e.received.load(Ordering::Relaxed)),
                start_time: Some(proxy_core::admin::rfc3339_utc(e.started)),
                duration_ms: Some(now.saturating_duration_since(e.start).as_millis() as u64),
            };
            match c.direction {
                Direction::Inbound => pod.inbound.push(dump),
                Direction::Outbound => pod.outbound.push(dump),
            }
        }
        pods
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One pod's live connections.
#[derive(Clone, Debug)]
pub struct PodConnections {
    pub pod: Arc<PodInfo>,
    pub inbound: Vec<ConnectionDump>,
    pub outbound: Vec<ConnectionDump>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Arc<PodInfo> {
        Arc::new(PodInfo {
            uid: "uid-1".into(),
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
        })
    }

    fn connection(direction: Direction) -> Connection {
        Connection {
            pod: pod(),
            carried: Carried {
                direction,
                protocol: Protocol::Hbone,
                src: "10.0.0.1:40000".parse().unwrap(),
                original_dst: Some("10.96.0.1:80".into()),
                actual_dst: "10.0.0.2:15008".parse().unwrap(),
                src_identity: Some(SpiffeId::new("cluster.local", "default", "web").unwrap()),
                dst_identity: Some(SpiffeId::new("cluster.local", "default", "db").unwrap()),
            },
        }
    }

    fn totals() -> (ByteTotal, ByteTotal) {
        (Arc::default(), Arc::default())
    }

    #[test]
    fn a_connection_is_listed_with_its_bytes_while_open_and_gone_once_closed() {
        let tracker = Arc::new(Tracker::default());
        let (sent, received) = totals();
        let tracked = tracker.track(
            connection(Direction::Outbound),
            (sent.clone(), received.clone()),
        );
        sent.fetch_add(5, Ordering::Relaxed);
        received.fetch_add(13, Ordering::Relaxed);

        let pods = tracker.by_pod();
        let web = &pods["uid-1"];
        assert!(web.inbound.is_empty());
        let c = &web.outbound[0];
        assert_eq!(c.src, "10.0.0.1:40000");
        assert_eq!(c.original_dst.as_deref(), Some("10.96.0.1:80"));
        assert_eq!(c.actual_dst, "10.0.0.2:15008");
        assert_eq!(c.protocol, "HBONE");
        assert_eq!(
            c.src_identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/web")
        );
        assert_eq!(
            c.dst_identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/db")
        );
        assert_eq!((c.bytes_sent, c.bytes_received), (Some(5), Some(13)));
        assert!(c.start_time.as_deref().is_some_and(|t| t.ends_with('Z')));

        // Bytes that flow later show in the next read.
        sent.fetch_add(1, Ordering::Relaxed);
        assert_eq!(tracker.by_pod()["uid-1"].outbound[0].bytes_sent, Some(6));

        drop(tracked);
        assert!(tracker.is_empty());
        assert!(tracker.by_pod().is_empty());
    }

    #[test]
    fn directions_go_to_their_lists_oldest_first() {
        let tracker = Arc::new(Tracker::default());
        let mut first = connection(Direction::Inbound);
        first.carried.src = "10.0.0.9:1".parse().unwrap();
        let _a = tracker.track(first, totals());
        let _b = tracker.track(connection(Direction::Inbound), totals());
        let _c = tracker.track(connection(Direction::Outbound), totals());
        let pods = tracker.by_pod();
        let web = &pods["uid-1"];
        let srcs: Vec<&str> = web.inbound.iter().map(|c| c.src.as_str()).collect();
        assert_eq!(srcs, ["10.0.0.9:1", "10.0.0.1:40000"]);
        assert_eq!(web.outbound.len(), 1);
    }

    #[test]
    fn an_error_path_leaves_nothing_behind() {
        let tracker = Arc::new(Tracker::default());
        let carry = |tracker: &Arc<Tracker>| -> Result<(), &'static str> {
            let _tracked = tracker.track(connection(Direction::Inbound), totals());
            assert_eq!(tracker.len(), 1);
            Err("the peer reset")
        };
        assert!(carry(&tracker).is_err());
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn a_panicking_or_cancelled_task_leaves_nothing_behind() {
        let tracker = Arc::new(Tracker::default());
        let panicking = tokio::spawn({
            let tracker = tracker.clone();
            async move {
                let _tracked = tracker.track(connection(Direction::Inbound), totals());
                panic!("a bug in the copy loop");
            }
        });
        assert!(panicking.await.unwrap_err().is_panic());
        assert!(tracker.is_empty());

        let (tracked_tx, tracked_rx) = tokio::sync::oneshot::channel();
        let hanging = tokio::spawn({
            let tracker = tracker.clone();
            async move {
                let _tracked = tracker.track(connection(Direction::Outbound), totals());
                let _ = tracked_tx.send(());
                std::future::pending::<()>().await;
            }
        });
        tracked_rx.await.unwrap();
        assert_eq!(tracker.len(), 1);
        hanging.abort();
        assert!(hanging.await.unwrap_err().is_cancelled());
        assert!(tracker.is_empty());
    }
}
