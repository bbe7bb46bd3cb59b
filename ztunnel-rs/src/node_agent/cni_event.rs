//! The CNI plugin's line to the node agent: one JSON request and one JSON
//! reply, each on a line, over a unix stream socket (path in the plugin's
//! netconf as `agent_socket`). Kept this plain so the plugin stays a small
//! synchronous program that starts fast.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::enrolment::PodKey;

/// Where the node agent listens for its CNI plugin by default.
pub const DEFAULT_CNI_EVENT_SOCKET: &str = "/var/run/istio-cni/pluginevent.sock";
/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// A pod sandbox as the container runtime describes it to the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub container_id: String,
    /// The sandbox's netns path (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses, from the chained CNI's `prevResult`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl CniPod {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }
}

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum CniRequest {
    /// A sandbox was created: capture it if it is enrolled, and remember it.
    Add(CniPod),
    /// A sandbox is being torn down.
    Del(CniPod),
    /// Is the sandbox in the state ADD left it in?
    Check(CniPod),
    /// Is the agent ready to serve ADDs?
    Status,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniReply {
    /// The request succeeded.
    pub ok: bool,
    /// The pod's traffic is redirected to ztunnel.
    #[serde(default)]
    pub captured: bool,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CniReply {
    pub fn ok(captured: bool) -> Self {
        CniReply {
            ok: true,
            captured,
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        CniReply {
            ok: false,
            captured: false,
            error: Some(message.into()),
        }
    }
}

/// Answers plugin requests (the node agent).
pub trait CniHandler: Clone + Send + Sync + 'static {
    fn handle(&self, request: CniRequest) -> impl Future<Output = CniReply> + Send;
}

/// Binds the plugin-facing socket, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

/// Serves plugin requests forever, each connection on its own task.
pub async fn serve(listener: UnixListener, handler: impl CniHandler) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, handler).await {
                warn!(error = %e, "CNI plugin connection failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, handler: impl CniHandler) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<CniRequest>(&line) {
        Ok(request) => {
            debug!(?request, "CNI plugin request");
            handler.handle(request).await
        }
        Err(e) => CniReply::error(format!(
            "the node agent cannot parse the plugin's request: {e}"
        )),
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends one request and reads the reply, blocking (for the plugin).
pub fn call(
    path: &Path,
    request: &CniRequest,
    timeout: std::time::Duration,
) -> std::io::Result<CniReply> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the node agent's reply is not valid: {e}"),
        )
    })
}
