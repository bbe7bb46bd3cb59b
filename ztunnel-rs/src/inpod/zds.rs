//! ztunnel's end of ZDS: connects to the node agent, says hello, and turns the
//! agent's requests into calls on the proxy's [`WorkloadProxyManager`].
//!
//! Per connection: Hello; then Add (netns fd attached) or Keep for every pod
//! the agent knows, each acked; then SnapshotSent, after which pods the agent
//! did not name are dropped; then live Add / Del. A malformed packet ends the
//! connection (never the process) and the client reconnects with backoff; a
//! restarted agent simply sends its snapshot again.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use api::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};
use backon::BackoffBuilder;
use prost::Message;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::netns::{Netns, NetnsError};
use super::seqpacket::{Packet, SeqpacketConn};

/// Upstream's default path of the node agent's ZDS socket.
pub const DEFAULT_ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// A pod's uid, as the node agent names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadUid(pub String);

impl fmt::Display for WorkloadUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the proxy could not take a pod; sent back to the agent in the Ack.
pub type ManagerError = Box<dyn std::error::Error + Send + Sync>;

/// What the proxy does with the pods the node agent hands it.
pub trait WorkloadProxyManager: Send + Sync + 'static {
    /// Start proxying for a pod: bind its listeners inside `netns`. Called
    /// again for a pod it already has after a reconnect (the netns may be the
    /// same or, if the pod's sandbox was recreated, a new one).
    fn add(
        &self,
        uid: &WorkloadUid,
        info: Option<&WorkloadInfo>,
        netns: Netns,
    ) -> impl Future<Output = Result<(), ManagerError>> + Send;
    /// Stop proxying for a pod: close its listeners, drain its connections.
    fn del(&self, uid: &WorkloadUid) -> impl Future<Output = ()> + Send;
    /// The agent still knows this pod but could not reopen its netns: keep
    /// whatever is running for it.
    fn keep(&self, uid: &WorkloadUid) -> Result<(), ManagerError>;
    /// The snapshot is complete: drop every pod not in `known`.
    fn snapshot_done(&self, known: &HashSet<WorkloadUid>) -> impl Future<Output = ()> + Send;
}

/// Errors on a ZDS connection. Each ends that connection only.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot reach the node agent at {path}: {source} (is `ztunnel-rs cni` running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("received a truncated ZDS packet ({0} bytes kept): rejected")]
    Truncated(usize),
    #[error("received a ZDS packet that is not valid protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("received a ZDS request without a payload (unknown message kind?)")]
    NoPayload,
    #[error("received AddWorkload for {0} without its netns fd")]
    AddWithoutFd(String),
    #[error("received {kind} with {count} fd(s) attached; only AddWorkload carries exactly one")]
    UnexpectedFds { kind: &'static str, count: usize },
    #[error("received KeepWorkload for {0} after SnapshotSent; Keep is only valid in a snapshot")]
    KeepAfterSnapshot(String),
    #[error("received an invalid netns fd: {0}")]
    Netns(#[from] NetnsError),
    #[error("ZDS peer sent an unexpected message: {0}")]
    Unexpected(String),
    #[error("ZDS peer did not answer within {0:?}")]
    Timeout(Duration),
}

/// A decoded, validated request from the node agent.
#[derive(Debug)]
pub enum ZdsRequest {
    Add {
        uid: WorkloadUid,
        info: Option<WorkloadInfo>,
        netns: Netns,
    },
    Keep(WorkloadUid),
    Del(WorkloadUid),
    SnapshotSent,
}

impl ZdsRequest {
    /// Validates one packet: intact, decodable, with an fd exactly when it is
    /// an Add. Received fds are closed whenever the packet is rejected.
    pub fn from_packet(packet: Packet) -> Result<Self, ZdsError> {
        let Packet {
            data,
            mut fds,
            truncated,
        } = packet;
        if truncated {
            return Err(ZdsError::Truncated(data.len()));
        }
        let payload = WorkloadRequest::decode(data.as_slice())?
            .payload
            .ok_or(ZdsError::NoPayload)?;
        let kind = match &payload {
            workload_request::Payload::Add(_) => "AddWorkload",
            workload_request::Payload::Keep(_) => "KeepWorkload",
            workload_request::Payload::Del(_) => "DelWorkload",
            workload_request::Payload::SnapshotSent(_) => "SnapshotSent",
        };
        match payload {
            workload_request::Payload::Add(add) => {
                if fds.len() > 1 {
                    return Err(ZdsError::UnexpectedFds {
                        kind,
                        count: fds.len(),
                    });
                }
                let fd = fds
                    .pop()
                    .ok_or_else(|| ZdsError::AddWithoutFd(add.uid.clone()))?;
                Ok(ZdsRequest::Add {
                    uid: WorkloadUid(add.uid),
                    info: add.workload_info,
                    netns: Netns::from_fd(fd)?,
                })
            }
            _ if !fds.is_empty() => Err(ZdsError::UnexpectedFds {
                kind,
                count: fds.len(),
            }),
            workload_request::Payload::Keep(k) => Ok(ZdsRequest::Keep(WorkloadUid(k.uid))),
            workload_request::Payload::Del(d) => Ok(ZdsRequest::Del(WorkloadUid(d.uid))),
            workload_request::Payload::SnapshotSent(_) => Ok(ZdsRequest::SnapshotSent),
        }
    }
}

/// Encodes an Ack; an empty `error` means success.
pub fn ack(error: Option<String>) -> Vec<u8> {
    WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.unwrap_or_default(),
        })),
    }
    .encode_to_vec()
}

/// Settings of the ZDS client.
#[derive(Clone, Debug)]
pub struct ZdsClientConfig {
    pub socket: PathBuf,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl Default for ZdsClientConfig {
    fn default() -> Self {
        ZdsClientConfig {
            socket: PathBuf::from(DEFAULT_ZDS_SOCKET),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// ztunnel's ZDS client.
pub struct ZdsClient<M> {
    config: ZdsClientConfig,
    manager: M,
    snapshot_received: watch::Sender<bool>,
}

impl<M: WorkloadProxyManager> ZdsClient<M> {
    pub fn new(config: ZdsClientConfig, manager: M) -> Self {
        ZdsClient {
            config,
            manager,
            snapshot_received: watch::Sender::new(false),
        }
    }

    /// Readiness: becomes true once the first ZDS snapshot has been received
    /// and applied ("ZDS snapshot received"), and stays true across reconnects.
    pub fn snapshot_received(&self) -> watch::Receiver<bool> {
        self.snapshot_received.subscribe()
    }

    pub fn manager(&self) -> &M {
        &self.manager
    }

    /// Connects, serves, and reconnects with jittered backoff, until
    /// `shutdown` resolves.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = self.backoff();
        loop {
            let served = tokio::select! {
                _ = &mut shutdown => return,
                r = self.connect_and_serve() => r,
            };
            match served {
                // A session that got going earns a fresh backoff.
                Ok(true) => {
                    info!("node agent closed the ZDS connection; reconnecting");
                    backoff = self.backoff();
                }
                Ok(false) => debug!("ZDS connection closed before any request"),
                Err(e) => warn!(error = %e, "ZDS connection reset"),
            }
            let wait = backoff.next().unwrap_or(self.config.max_backoff);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(self.config.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// One connection. Ok(true) when at least one request was served.
    async fn connect_and_serve(&self) -> Result<bool, ZdsError> {
        let conn = SeqpacketConn::connect(&self.config.socket)
            .await
            .map_err(|source| ZdsError::Connect {
                path: self.config.socket.display().to_string(),
                source,
            })?;
        info!(socket = %self.config.socket.display(), "connected to the node agent");
        self.serve(&conn).await
    }

    /// Serves one established connection until the agent closes it or sends
    /// something malformed. Ok(true) when at least one request was served.
    pub async fn serve(&self, conn: &SeqpacketConn) -> Result<bool, ZdsError> {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        conn.send(&hello.encode_to_vec(), None).await?;

        let mut in_snapshot = true;
        let mut named: HashSet<WorkloadUid> = HashSet::new();
        let mut served = false;
        while let Some(packet) = conn.recv().await? {
            let request = ZdsRequest::from_packet(packet)?;
            served = true;
            let result = match request {
                ZdsRequest::Add { uid, info, netns } => {
                    debug!(%uid, ?netns, "AddWorkload");
                    let result = self.manager.add(&uid, info.as_ref(), netns).await;
                    if in_snapshot {
                        named.insert(uid.clone());
                    }
                    result.map_err(|e| {
                        warn!(%uid, error = %e, "cannot proxy pod; answering with an error Ack");
                        e.to_string()
                    })
                }
                ZdsRequest::Keep(uid) => {
                    if !in_snapshot {
                        return Err(ZdsError::KeepAfterSnapshot(uid.0));
                    }
                    named.insert(uid.clone());
                    self.manager.keep(&uid).map_err(|e| e.to_string())
                }
                ZdsRequest::Del(uid) => {
                    debug!(%uid, "DelWorkload");
                    named.remove(&uid);
                    self.manager.del(&uid).await;
                    Ok(())
                }
                ZdsRequest::SnapshotSent => {
                    if !in_snapshot {
                        return Err(ZdsError::Unexpected("a second SnapshotSent".into()));
                    }
                    in_snapshot = false;
                    self.manager.snapshot_done(&named).await;
                    info!(pods = named.len(), "ZDS snapshot received");
                    named.clear();
                    self.snapshot_received.send_replace(true);
                    Ok(())
                }
            };
            conn.send(&ack(result.err()), None).await?;
        }
        Ok(served)
    }
}
