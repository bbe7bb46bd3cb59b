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

pub use pool::{HbonePool, HboneTarget, PoolConfig};
pub use server::{HboneServer, InboundConnect, InboundHandler};
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

/// HTTP/2 settings for both sides. Windows are sized so one stream can keep
/// a fast link busy: with the 64 KiB protocol default a single tunnel is
/// capped at 64 KiB per round trip.
#[derive(Clone, Debug)]
pub struct Http2Settings {
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window, shared by all its streams.
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// How long TCP connect + TLS + HTTP/2 set-up may take.
    pub handshake_timeout: Duration,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            handshake_timeout: Duration::from_secs(10),
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
