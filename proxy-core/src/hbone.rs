//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams over mutual TLS between
//! workload identities (port 15008). One implementation for ztunnel-rs and
//! waypoint-rs.
//!
//! - [`pool`]: the client side, a pool of mTLS HTTP/2 connections keyed by
//!   (source identity, destination identity, destination address), many
//!   CONNECT streams per connection.
//! - [`server`]: accepts mTLS with a per-connection config, serves HTTP/2 and
//!   hands each CONNECT (peer identity, target address, stream) to a handler
//!   that decides the response.
//! - [`stream`]: one tunnel as `AsyncRead + AsyncWrite`, half-close preserved.
//! - [`metrics`]: connections dropped for a peer's fault.
//!
//! Bounds on what one peer can hold ([`Http2Settings`]): streams per
//! connection and header list size (h2 enforces them), dead peers dropped
//! by PING and TCP keepalive (both sides, `keepalive`), and a pooled
//! connection whose CONNECT goes unanswered takes no new streams.

mod keepalive;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod stream;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::identity::FetchError;
use crate::tls::TlsError;

pub use metrics::HboneMetrics;
pub use pool::{HbonePool, HboneTarget, PoolConfig};
pub use server::{HboneServer, InboundConnect, InboundHandler, NotConnect, connect_target};
pub use stream::HboneStream;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("could not connect to HBONE peer {address}: {source}")]
    Connect {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {timeout:?} setting up HBONE with {address}")]
    Timeout {
        address: SocketAddr,
        timeout: Duration,
    },
    #[error("TLS with HBONE peer {address} failed: {source}")]
    Tls {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "HBONE peer {address} did not negotiate ALPN h2; is it an HBONE listener (port 15008)?"
    )]
    NoAlpn { address: SocketAddr },
    #[error("HBONE client {address} presented no SPIFFE identity")]
    NoPeerIdentity { address: SocketAddr },
    #[error("HTTP/2 with HBONE peer {address} failed: {source}")]
    Http2 {
        address: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("HBONE peer {address} answered CONNECT {authority} with {status}")]
    Refused {
        address: SocketAddr,
        authority: SocketAddr,
        status: http::StatusCode,
    },
    #[error(
        "HBONE peer {address} did not answer CONNECT {authority} within {timeout:?}; its connection takes no new streams"
    )]
    ConnectTimeout {
        address: SocketAddr,
        authority: SocketAddr,
        timeout: Duration,
    },
    #[error(
        "HBONE peer {address} did not answer a PING within {timeout:?}; the connection was dropped as dead"
    )]
    KeepaliveTimeout {
        address: SocketAddr,
        timeout: Duration,
    },
    #[error("{0} cannot be the :authority of a CONNECT request")]
    Authority(SocketAddr),
    #[error("TLS configuration for HBONE: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("no certificate for HBONE: {0}")]
    Certificate(#[from] FetchError),
    #[error("HBONE listener: {0}")]
    Io(#[from] io::Error),
}

impl HboneError {
    /// The HTTP status a peer refused a CONNECT with, if that is what happened.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// HTTP/2 settings and limits for both sides. The values are upstream
/// ztunnel's (`src/proxy/h2/server.rs`, `src/proxy/h2/client.rs`,
/// `src/proxy/h2.rs`, `src/config.rs`), except the frame size (see
/// `max_frame_size`). Windows are sized so one stream can keep a fast link
/// busy: with the 64 KiB protocol default a single tunnel is capped at
/// 64 KiB per round trip.
#[derive(Clone, Debug)]
pub struct Http2Settings {
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window, shared by all its streams.
    pub connection_window: u32,
    /// The largest frame a peer may send us. Upstream allows 1 MiB; 256 KiB
    /// moves bulk data as fast here and bounds what a peer can make the
    /// server buffer for one header block (a HEADERS frame and, with the
    /// header list limit below, at most 5 CONTINUATIONs) to 1.5 MiB instead
    /// of 6.
    pub max_frame_size: u32,
    /// Server: CONNECT streams one peer may have open at once on one
    /// connection; h2 refuses more with REFUSED_STREAM (upstream: 200).
    pub max_concurrent_streams: u32,
    /// Server: the largest header list of a CONNECT; h2 answers a larger one
    /// with 431 (upstream: 64 KiB, h2's default being 16 MiB).
    pub max_request_header_list: u32,
    /// Client: the largest header list of a CONNECT's answer (upstream:
    /// 16 KiB).
    pub max_response_header_list: u32,
    /// Streams h2 may reset on one connection for the peer's faults (refused
    /// over the stream limit, oversized headers) before it closes the
    /// connection with GOAWAY ENHANCE_YOUR_CALM (h2's default, which upstream
    /// keeps: 1024).
    pub max_refused_streams: usize,
    /// How long TCP connect + TLS + HTTP/2 set-up may take.
    pub handshake_timeout: Duration,
    pub keepalive: Keepalive,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_concurrent_streams: 200,
            max_request_header_list: 64 * 1024,
            max_response_header_list: 16 * 1024,
            max_refused_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            keepalive: Keepalive::default(),
        }
    }
}

/// How an HBONE connection notices a dead peer, both sides: HTTP/2 PINGs
/// (a peer that stops answering is dropped), and TCP keepalive underneath
/// (a peer whose host is gone is dropped by the kernel even when nothing is
/// sent). Upstream ztunnel's values: PING every 10 s, 20 s for its answer
/// (`src/proxy/h2.rs`); TCP probes after 180 s idle, every 180 s, 9 of them
/// (`src/config.rs`, `SocketConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// From the connection's start, and between a PING's answer and the
    /// next PING.
    pub ping_interval: Duration,
    /// A PING unanswered this long: the connection is dropped.
    pub ping_timeout: Duration,
    /// Idle time before the first TCP keepalive probe.
    pub tcp_time: Duration,
    /// Between unanswered TCP probes.
    pub tcp_interval: Duration,
    /// Unanswered TCP probes before the kernel drops the connection.
    pub tcp_retries: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            tcp_time: Duration::from_secs(180),
            tcp_interval: Duration::from_secs(180),
            tcp_retries: 9,
        }
    }
}

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

/// Opens the TCP connection under an HBONE connection. ztunnel-rs supplies
/// one that opens the socket inside the source pod's network namespace with
/// the proxy mark, so the tunnel leaves with the pod's address.
pub trait Connect: Send + Sync + 'static {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_>;
}

/// A plain `connect(2)` from the proxy's own network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectConnect;

impl Connect for DirectConnect {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_> {
        Box::pin(TcpStream::connect(address))
    }
}
