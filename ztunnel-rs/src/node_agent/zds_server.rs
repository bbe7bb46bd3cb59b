//! The node agent's end of ZDS: ztunnel connects, says Hello, receives the
//! snapshot (an AddWorkload with the netns fd for every enrolled pod, each
//! acked, then SnapshotSent), and then live Add / Del as pods are enrolled and
//! unenrolled.
//!
//! The set of enrolled pods lives here, so a ztunnel that connects (or
//! reconnects after a restart) always gets the full picture. Requests to a
//! connection are serialised through its task: one request, one Ack.
//!
//! A starting agent holds snapshots back ([`ZdsServer::hold_snapshots`])
//! until it has rediscovered the pods that were enrolled before it started:
//! a ztunnel that connects meanwhile waits after its Hello, so it never gets
//! a snapshot that would make it drop pods the agent simply has not found
//! yet (upstream's agent likewise accepts ztunnel connections only after
//! `ConstructInitialSnapshot`). Pods the agent knows are enrolled but whose
//! namespace it could not find go in the snapshot as KeepWorkload: ztunnel
//! keeps what it runs for them (upstream's `sendSnapshot`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::inpod::Netns;
use crate::inpod::seqpacket::{SeqpacketConn, SeqpacketListener};

/// Errors serving ZDS.
#[derive(Debug, thiserror::Error)]
pub enum ZdsServerError {
    #[error("ZDS socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "no ztunnel is connected to the node agent; the pod stays enrolled and is handed over when ztunnel connects"
    )]
    NoZtunnel,
    #[error("ztunnel refused pod {uid}: {reason}")]
    Rejected { uid: String, reason: String },
    #[error("ztunnel did not ack within {0:?}")]
    Timeout(Duration),
    #[error("the ztunnel connection closed before it answered")]
    ConnectionLost,
    #[error("ztunnel sent an invalid message: {0}")]
    Protocol(String),
    #[error("ztunnel sent a packet that is not valid protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// A pod as handed to ztunnel.
#[derive(Clone, Debug)]
pub struct ZdsPod {
    pub uid: String,
    pub info: WorkloadInfo,
    pub netns: Netns,
}

enum Request {
    Add(ZdsPod),
    Del(String),
}

struct Command {
    request: Request,
    reply: oneshot::Sender<Result<(), ZdsServerError>>,
}

struct State {
    pods: BTreeMap<String, ZdsPod>,
    /// Enrolled pods whose namespace the agent has not got: Keep in snapshots.
    kept: BTreeSet<String>,
    connections: BTreeMap<u64, mpsc::Sender<Command>>,
}

struct Shared {
    state: Mutex<State>,
    ack_timeout: Duration,
    acked: mpsc::UnboundedSender<String>,
    next_connection: AtomicU64,
    /// Snapshots may be sent (false while the agent rediscovers its pods).
    snapshots: watch::Sender<bool>,
    /// Connections past their Hello waiting for their snapshot.
    held: AtomicUsize,
    /// Connections whose snapshot ztunnel has acked.
    synced: Gauge,
}

/// The ZDS server; cheap to clone.
#[derive(Clone)]
pub struct ZdsServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZdsServer({} connected)", self.connected())
    }
}

impl ZdsServer {
    /// A server waiting at most `ack_timeout` for each Ack. The receiver gets
    /// the uid of every pod ztunnel acked, live or in a snapshot.
    pub fn new(ack_timeout: Duration) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (acked, acked_rx) = mpsc::unbounded_channel();
        let server = ZdsServer {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    pods: BTreeMap::new(),
                    kept: BTreeSet::new(),
                    connections: BTreeMap::new(),
                }),
                ack_timeout,
                acked,
                next_connection: AtomicU64::new(0),
                snapshots: watch::Sender::new(true),
                held: AtomicUsize::new(0),
                synced: Gauge::default(),
            }),
        };
        (server, acked_rx)
    }

    /// How many ztunnels are connected (past their Hello and snapshot hold).
    pub fn connected(&self) -> usize {
        self.lock().connections.len()
    }

    /// Makes ztunnels that connect from now on wait after their Hello, until
    /// [`Self::release_snapshots`]. Connections already served go on.
    pub fn hold_snapshots(&self) {
        self.shared.snapshots.send_replace(false);
    }

    /// Lets waiting and future connections have their snapshot.
    pub fn release_snapshots(&self) {
        self.shared.snapshots.send_replace(true);
    }

    /// How many ztunnels said Hello and wait for their snapshot.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Registers `istio_node_agent_ztunnel_connected`: ztunnels connected
    /// that have acked their snapshot (upstream's node agent has a
    /// `ztunnel_connected` gauge of its connections).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "node_agent_ztunnel_connected",
            "ztunnels connected to the node agent that have acked their snapshot",
            self.shared.synced.clone(),
        );
    }

    /// Remembers an enrolled pod whose namespace the agent does not have:
    /// snapshots tell ztunnel to keep what it runs for it. No live message:
    /// KeepWorkload is only valid in a snapshot.
    pub fn keep(&self, uid: &str) {
        self.lock().kept.insert(uid.to_string());
    }

    /// Accepts ztunnel connections forever, each served on its own task.
    pub async fn serve(&self, listener: SeqpacketListener) -> std::io::Result<()> {
        info!(socket = %listener.path().display(), "ZDS server listening");
        loop {
            let conn = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move {
                match server.handle(conn).await {
                    Ok(()) => info!("ztunnel disconnected"),
                    Err(e) => warn!(error = %e, "ztunnel connection reset"),
                }
            });
        }
    }

    /// Enrols a pod: remembered for every later snapshot and handed to every
    /// connected ztunnel, waiting for their Acks.
    pub async fn add(&self, pod: ZdsPod) -> Result<(), ZdsServerError> {
        let senders = {
            let mut state = self.lock();
            state.kept.remove(&pod.uid);
            state.pods.insert(pod.uid.clone(), pod.clone());
            state.connections.values().cloned().collect::<Vec<_>>()
        };
        if senders.is_empty() {
            return Err(ZdsServerError::NoZtunnel);
        }
        self.broadcast(senders, || Request::Add(pod.clone())).await
    }

    /// Unenrols a pod: forgotten, and every connected ztunnel told to drop it.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsServerError> {
        let senders = {
            let mut state = self.lock();
            state.pods.remove(uid);
            state.kept.remove(uid);
            state.connections.values().cloned().collect::<Vec<_>>()
        };
        self.broadcast(senders, || Request::Del(uid.to_string()))
            .await
    }

    /// Whether `uid` is among the pods handed to ztunnel.
    pub fn has_pod(&self, uid: &str) -> bool {
        self.lock().pods.contains_key(uid)
    }

    /// Whether `uid` is among the pods kept without a namespace.
    pub fn is_kept(&self, uid: &str) -> bool {
        self.lock().kept.contains(uid)
    }

    async fn broadcast(
        &self,
        senders: Vec<mpsc::Sender<Command>>,
        request: impl Fn() -> Request,
    ) -> Result<(), ZdsServerError> {
        let mut replies = Vec::with_capacity(senders.len());
        for sender in senders {
            let (reply, reply_rx) = oneshot::channel();
            let command = Command {
                request: request(),
                reply,
            };
            if sender.send(command).await.is_ok() {
                replies.push(reply_rx);
            }
        }
        if replies.is_empty() {
            return Err(ZdsServerError::ConnectionLost);
        }
        let mut result = Ok(());
        for reply in replies {
            let answer = reply.await.unwrap_or(Err(ZdsServerError::ConnectionLost));
            if result.is_ok() {
                result = answer;
            }
        }
        result
    }

    /// Serves one ztunnel connection until it closes or misbehaves.
    pub async fn handle(&self, conn: SeqpacketConn) -> Result<(), ZdsServerError> {
        let hello = self.recv_within(&conn).await?;
        let hello = ZdsHello::decode(hello.as_slice())?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsServerError::Protocol(format!(
                "ZdsHello with version {}; only V1 is spoken",
                hello.version
            )));
        }
        let mut snapshots = self.shared.snapshots.subscribe();
        if !*snapshots.borrow() {
            info!(
                "ztunnel connected; its snapshot waits until the agent has rediscovered its pods"
            );
        }
        {
            self.shared.held.fetch_add(1, Ordering::Relaxed);
            let _counted = Held(&self.shared.held);
            // The sender lives as long as the server.
            let _ = snapshots.wait_for(|may| *may).await;
        }
        let (tx, mut rx) = mpsc::channel(16);
        let id = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
        // Registering and copying the pods under one lock: a pod added after
        // this point arrives as a live Add, one added before is in the copy.
        let snapshot: Snapshot = {
            let mut state = self.lock();
            state.connections.insert(id, tx);
            Snapshot {
                pods: state.pods.values().cloned().collect(),
                kept: state.kept.iter().cloned().collect(),
            }
        };
        let result = self.serve_registered(&conn, snapshot, &mut rx).await;
        self.lock().connections.remove(&id);
        // Whoever is still waiting on this connection learns it is gone.
        rx.close();
        while let Ok(command) = rx.try_recv() {
            let _ = command.reply.send(Err(ZdsServerError::ConnectionLost));
        }
        result
    }

    async fn serve_registered(
        &self,
        conn: &SeqpacketConn,
        snapshot: Snapshot,
        rx: &mut mpsc::Receiver<Command>,
    ) -> Result<(), ZdsServerError> {
        info!(
            pods = snapshot.pods.len(),
            kept = snapshot.kept.len(),
            "ztunnel connected; sending snapshot"
        );
        for pod in &snapshot.pods {
            match self.send_add(conn, pod).await {
                Ok(()) => {}
                Err(ZdsServerError::Rejected { uid, reason }) => {
                    warn!(%uid, %reason, "ztunnel refused a pod from the snapshot")
                }
                Err(e) => return Err(e),
            }
        }
        for uid in &snapshot.kept {
            let keep = request(workload_request::Payload::Keep(KeepWorkload {
                uid: uid.clone(),
            }));
            match self.exchange(conn, &keep, None).await {
                Ok(()) => {}
                // It had nothing running for the pod: nothing to keep.
                Err(ZdsServerError::Rejected { reason, .. }) => {
                    warn!(%uid, %reason, "ztunnel has nothing to keep for a pod the agent knows no namespace of")
                }
                Err(e) => return Err(e),
            }
        }
        let done = request(workload_request::Payload::SnapshotSent(SnapshotSent {}));
        self.exchange(conn, &done, None).await?;
        debug!("snapshot acked");
        self.shared.synced.inc();
        let _synced = Synced(&self.shared.synced);
        loop {
            tokio::select! {
                command = rx.recv() => {
                    let Some(Command { request, reply }) = command else { return Ok(()) };
                    let result = match &request {
                        Request::Add(pod) => self.send_add(conn, pod).await,
                        Request::Del(uid) => {
                            let del = self::request(workload_request::Payload::Del(DelWorkload { uid: uid.clone() }));
                            self.exchange(conn, &del, None).await
                        }
                    };
                    // A connection-level failure ends the connection; a
                    // refusal concerns only this pod.
                    let fatal = !matches!(result, Ok(()) | Err(ZdsServerError::Rejected { .. }));
                    let error = result.as_ref().err().map(ToString::to_string);
                    let _ = reply.send(result);
                    if fatal {
                        return Err(ZdsServerError::Protocol(error.unwrap_or_default()));
                    }
                }
                readable = conn.readable() => {
                    readable?;
                    // Between requests ztunnel has nothing to say: anything
                    // but EOF is a protocol error.
                    return match conn.try_recv() {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => Err(e.into()),
                        Ok(None) => Ok(()),
                        Ok(Some(_)) => Err(ZdsServerError::Protocol("a message nobody asked for".into())),
                    };
                }
            }
        }
    }

    async fn send_add(&self, conn: &SeqpacketConn, pod: &ZdsPod) -> Result<(), ZdsServerError> {
        let add = request(workload_request::Payload::Add(AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(pod.info.clone()),
        }));
        self.exchange(conn, &add, Some(&pod.netns))
            .await
            .map_err(|e| match e {
                ZdsServerError::Rejected { reason, .. } => ZdsServerError::Rejected {
                    uid: pod.uid.clone(),
                    reason,
                },
                e => e,
            })?;
        let _ = self.shared.acked.send(pod.uid.clone());
        Ok(())
    }

    /// Sends one request and waits for its Ack.
    async fn exchange(
        &self,
        conn: &SeqpacketConn,
        request: &[u8],
        netns: Option<&Netns>,
    ) -> Result<(), ZdsServerError> {
        conn.send(request, netns.map(|n| n.as_fd())).await?;
        let answer = self.recv_within(conn).await?;
        let response = WorkloadResponse::decode(answer.as_slice())?;
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(ack)) => Err(ZdsServerError::Rejected {
                uid: String::new(),
                reason: ack.error,
            }),
            None => Err(ZdsServerError::Protocol(
                "a response without payload".into(),
            )),
        }
    }

    async fn recv_within(&self, conn: &SeqpacketConn) -> Result<Vec<u8>, ZdsServerError> {
        let timeout = self.shared.ack_timeout;
        let packet = tokio::time::timeout(timeout, conn.recv())
            .await
            .map_err(|_| ZdsServerError::Timeout(timeout))??
            .ok_or(ZdsServerError::ConnectionLost)?;
        if packet.truncated {
            return Err(ZdsServerError::Protocol("a truncated packet".into()));
        }
        if !packet.fds.is_empty() {
            return Err(ZdsServerError::Protocol("a packet carrying fds".into()));
        }
        Ok(packet.data)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked mid-way: every
        // critical section is a single insert/remove/copy.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Uncounts a connection that no longer waits for its snapshot (also when
/// it is dropped while waiting).
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Uncounts a synced connection when it ends.
struct Synced<'a>(&'a Gauge);

impl Drop for Synced<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a connection is sent before SnapshotSent.
struct Snapshot {
    pods: Vec<ZdsPod>,
    kept: Vec<String>,
}

fn request(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}
