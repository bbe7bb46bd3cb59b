//! The upstream resolvers and the exchange with them. As upstream's
//! `SystemForwarder` (`src/dns/server.rs`): the nameservers come from
//! ztunnel's own `/etc/resolv.conf` (its search list is not applied to
//! forwarded queries: the client's resolver already did; on-demand lookups
//! apply it, see `on_demand`), and the sockets are the pod's (opened in
//! its network namespace with the proxy mark, so they pass its DNS capture).
//!
//! The client's query is relayed as it is, under a fresh random id, over the
//! protocol it came on: UDP queries over UDP (an answer with TC set goes
//! back as it is, and the client retries over TCP), TCP queries over TCP.
//! Servers are tried in order until one answers.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use api::resolv_conf::ResolvConf;
use hickory_proto::op::{Header, Message, MessageType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::PodSockets;

/// Where ztunnel reads its nameservers by default, as upstream.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long one upstream server may take to answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest UDP answer read from upstream.
const MAX_DATAGRAM: usize = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no upstream resolver is configured (no nameserver in resolv.conf, no --dns-server)")]
    NoServers,
    #[error("cannot read {path}: {source}")]
    ResolvConf {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream resolver {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream resolver {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream resolver {server} sent an answer that is not DNS: {reason}")]
    BadAnswer { server: SocketAddr, reason: String },
    #[error("cannot encode the query: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
}

/// The resolvers unknown names are forwarded to.
#[derive(Clone, Debug)]
pub struct Forwarder {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

/// The protocol a query came on, and so goes upstream on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    /// Upstream's `request_protocol` label value.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

impl Forwarder {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Forwarder { servers, timeout }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The upstream answer to `query` (with the query's own id), from the
    /// first server that gives one.
    pub async fn forward(
        &self,
        sockets: &dyn PodSockets,
        query: &Message,
        protocol: Protocol,
    ) -> Result<Message, Error> {
        let mut last = Error::NoServers;
        for &server in &self.servers {
            let mut upstream = query.clone();
            upstream.set_id(rand::random());
            let bytes = upstream.to_vec()?;
            let exchange = async {
                match protocol {
                    Protocol::Udp => udp_exchange(sockets, server, &bytes, upstream.id()).await,
                    Protocol::Tcp => tcp_exchange(sockets, server, &bytes).await,
                }
            };
            let answer = match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(source)) => {
                    last = Error::Io { server, source };
                    continue;
                }
                Err(_) => {
                    last = Error::Timeout {
                        server,
                        timeout: self.timeout,
                    };
                    continue;
                }
            };
            match check(answer, upstream.id()) {
                Ok(mut answer) => {
                    answer.set_id(query.id());
                    return Ok(answer);
                }
                Err(reason) => last = Error::BadAnswer { server, reason },
            }
        }
        Err(last)
    }
}

fn check(bytes: Vec<u8>, id: u16) -> Result<Message, String> {
    let answer = Message::from_vec(&bytes).map_err(|e| e.to_string())?;
    if answer.message_type() != MessageType::Response || answer.id() != id {
        return Err("not the answer to the query sent".into());
    }
    Ok(answer)
}

async fn udp_exchange(
    sockets: &dyn PodSockets,
    server: SocketAddr,
    query: &[u8],
    id: u16,
) -> io::Result<Vec<u8>> {
    // Connected: datagrams from anyone else are not delivered.
    let socket = sockets.udp_connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A late answer to an earlier query on a reused port is skipped.
        let header = Header::read(&mut BinDecoder::new(&buf[..n]));
        if header.is_ok_and(|h| h.id() == id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(
    sockets: &dyn PodSockets,
    server: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let mut stream = sockets.connect(server).await?;
    write_frame(&mut stream, query).await?;
    read_frame(&mut stream)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering"))
}

/// One DNS-over-TCP message: a two-byte length, then the message (RFC 1035
/// 4.2.2). `None` at a clean end of stream.
pub async fn read_frame(stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

pub async fn write_frame(
    stream: &mut (impl AsyncWriteExt + Unpin),
    message: &[u8],
) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut frame = Vec::with_capacity(message.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    stream.write_all(&frame).await
}

/// A resolv.conf, read as a stub resolver reads it; each line that cannot
/// be used is skipped with a warning naming the file, line and field.
pub fn read_resolv_conf(path: &Path) -> Result<ResolvConf, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ResolvConf {
        path: path.display().to_string(),
        source,
    })?;
    let (conf, problems) = ResolvConf::parse(&text);
    for problem in problems {
        tracing::warn!(file = %path.display(), line = problem.line, field = problem.field,
            "resolv.conf: skipped: {}", problem.reason);
    }
    Ok(conf)
}

/// A resolv.conf's nameservers, on port 53.
pub fn servers(conf: &ResolvConf) -> Vec<SocketAddr> {
    conf.nameservers
        .iter()
        .map(|&ip| SocketAddr::new(ip, 53))
        .collect()
}
