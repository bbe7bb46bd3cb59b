//! Server side of HBONE: mutual TLS with a config the caller picks per
//! connection (ztunnel-rs presents the certificate of the pod it serves),
//! HTTP/2, and for each CONNECT a call to a handler with the verified peer
//! identity (and its leaf certificate) and the target address. The handler
//! decides the answer: accept (200 and a stream) or refuse with a status
//! (401, 403, 503...).
//! Anything but a CONNECT to an `ip:port` gets 400 without reaching it.
//!
//! What one peer can hold is bounded ([`Http2Settings`]): h2 refuses
//! streams past `max_concurrent_streams` per connection (REFUSED_STREAM)
//! and header lists past `max_request_header_list` (431), and closes a
//! connection whose peer keeps at it; a peer that stops answering PINGs is
//! dropped; the socket has TCP keepalive. Drops are counted
//! ([`HboneMetrics`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use api::SpiffeId;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::StatusCode;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::metrics::{DropReason, HboneMetrics, Side};
use super::{HboneError, HboneStream, Http2Settings, keepalive};
use crate::listener::Listener;
use crate::log_limit::LogLimit;
use crate::tls;

/// Decides what to do with one CONNECT.
pub trait InboundHandler: Send + Sync + 'static {
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send;
}

impl<F, Fut> InboundHandler for F
where
    F: Fn(InboundConnect) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send {
        self(connect)
    }
}

/// One CONNECT request, not yet answered. Dropping it unanswered refuses it
/// with 503.
pub struct InboundConnect {
    peer_identity: SpiffeId,
    peer_certificate: Arc<CertificateDer<'static>>,
    authority: SocketAddr,
    peer_address: SocketAddr,
    local_address: SocketAddr,
    headers: http::HeaderMap,
    /// Taken by the answer; still here on drop means unanswered.
    unanswered: Option<(SendResponse<Bytes>, RecvStream)>,
}

impl std::fmt::Debug for InboundConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundConnect")
            .field("peer_identity", &self.peer_identity.to_string())
            .field("authority", &self.authority)
            .field("peer_address", &self.peer_address)
            .field("local_address", &self.local_address)
            .finish_non_exhaustive()
    }
}

impl InboundConnect {
    /// The client's SPIFFE id, verified in the TLS handshake.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer_identity
    }

    /// The client's leaf certificate (DER), the one `peer_identity` was
    /// read from. Held once per HBONE connection: every CONNECT on it
    /// shares this `Arc` (pointer-equal), so a handler can derive things
    /// from it once per connection.
    pub fn peer_certificate(&self) -> &Arc<CertificateDer<'static>> {
        &self.peer_certificate
    }

    /// Where the client wants to go (`:authority`).
    pub fn authority(&self) -> SocketAddr {
        self.authority
    }

    /// The TCP peer of the HBONE connection.
    pub fn peer_address(&self) -> SocketAddr {
        self.peer_address
    }

    /// The local address the HBONE connection arrived on.
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    pub fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<HboneStream, HboneError> {
        let Some((mut respond, body)) = self.unanswered.take() else {
            unreachable!("only accept and refuse answer, and both consume self");
        };
        let send = respond
            .send_response(http::Response::new(()), false)
            .map_err(|source| HboneError::Http2 {
                address: self.peer_address,
                source,
            })?;
        Ok(HboneStream::new(send, body, None))
    }

    /// Answers `status` and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        if let Some((mut respond, _)) = self.unanswered.take() {
            reply(&mut respond, status);
        }
    }
}

impl Drop for InboundConnect {
    fn drop(&mut self) {
        if let Some((mut respond, _)) = self.unanswered.take() {
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

/// Serves HBONE. Cheap to clone; clones share the handler, the live
/// connection count and the shutdown token.
pub struct HboneServer<H> {
    shared: Arc<Shared<H>>,
}

impl<H> Clone for HboneServer<H> {
    fn clone(&self) -> Self {
        HboneServer {
            shared: self.shared.clone(),
        }
    }
}

impl<H> std::fmt::Debug for HboneServer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneServer")
            .field("settings", &self.shared.settings)
            .field(
                "live_connections",
                &self.shared.live.load(Ordering::Acquire),
            )
            .finish_non_exhaustive()
    }
}

struct Shared<H> {
    handler: Arc<H>,
    settings: Http2Settings,
    metrics: Arc<HboneMetrics>,
    shutdown: CancellationToken,
    live: AtomicUsize,
}

impl<H: InboundHandler> HboneServer<H> {
    pub fn new(handler: H) -> Self {
        Self::with_settings(handler, Http2Settings::default())
    }

    pub fn with_settings(handler: H, settings: Http2Settings) -> Self {
        Self::with_metrics(handler, settings, Arc::default())
    }

    /// A server counting the connections it drops into `metrics`.
    pub fn with_metrics(handler: H, settings: Http2Settings, metrics: Arc<HboneMetrics>) -> Self {
        HboneServer {
            shared: Arc::new(Shared {
                handler: Arc::new(handler),
                settings,
                metrics,
                shutdown: CancellationToken::new(),
                live: AtomicUsize::new(0),
            }),
        }
    }

    /// Cancel it to drain: listeners stop accepting and every connection gets
    /// a GOAWAY; streams already open run to completion.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// HBONE connections past their handshake and not yet closed.
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Accepts on `listener` until shutdown, within its connection caps
    /// (one more is reset and counted by the listener; its timeouts are
    /// not used: the handshake has [`Http2Settings::handshake_timeout`]).
    /// Each connection holds its place under the caps until it closes.
    /// `tls_config` picks the config for each connection from its local
    /// address (a certificate fetch may happen there, hence async).
    pub async fn serve<F, Fut>(&self, listener: Listener, tls_config: F)
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: Future<Output = Result<Arc<ServerConfig>, HboneError>> + Send + 'static,
    {
        loop {
            let admitted = tokio::select! {
                admitted = listener.accept() => admitted,
                () = self.shared.shutdown.cancelled() => return,
            };
            let (tcp, peer, slot) = admitted.into_parts();
            let config = match tcp.local_addr() {
                Ok(local) => tls_config(local),
                Err(error) => {
                    tracing::debug!(%peer, %error, "HBONE connection vanished before it was served");
                    continue;
                }
            };
            let server = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let config = match config.await {
                    Ok(config) => config,
                    Err(error) => {
                        // Every connection here fails until this is fixed:
                        // one line per interval says so.
                        static NO_CONFIG: LogLimit = LogLimit::new(Duration::from_secs(10));
                        if let Some(suppressed) = NO_CONFIG.allow() {
                            tracing::warn!(%peer, %error, suppressed, "no TLS config for HBONE connection");
                        }
                        return;
                    }
                };
                if let Err(error) = server.serve_connection(tcp, config).await {
                    tracing::debug!(%peer, %error, "HBONE connection ended with an error");
                }
            });
        }
    }

    /// Serves one accepted TCP connection: TLS with `config`, then HTTP/2
    /// until the client closes, shutdown drains it, or the peer stops
    /// answering PINGs.
    pub async fn serve_connection(
        &self,
        tcp: TcpStream,
        config: Arc<ServerConfig>,
    ) -> Result<(), HboneError> {
        let peer_address = tcp.peer_addr()?;
        let local_address = tcp.local_addr()?;
        let _ = tcp.set_nodelay(true);
        let settings = &self.shared.settings;
        settings.keepalive.apply_tcp(&tcp)?;
        let timeout = settings.handshake_timeout;
        let (peer_identity, peer_certificate, mut connection) =
            tokio::time::timeout(timeout, handshake(tcp, config, settings, peer_address))
                .await
                .map_err(|_| HboneError::Timeout {
                    address: peer_address,
                    timeout,
                })??;
        let _live = LiveConnection::count(&self.shared.live);
        tracing::debug!(peer = %peer_identity, %peer_address, "HBONE connection accepted");
        let ping_pong = connection
            .ping_pong()
            .expect("a new connection hands out its PingPong once");
        let unanswered = keepalive::unanswered_ping(ping_pong, settings.keepalive);
        tokio::pin!(unanswered);
        let shutdown = self.shared.shutdown.clone();
        let mut draining = false;
        loop {
            let next = tokio::select! {
                next = connection.accept() => next,
                () = shutdown.cancelled(), if !draining => {
                    connection.graceful_shutdown();
                    draining = true;
                    continue;
                }
                // Dropping the connection closes the socket and fails its
                // streams: the peer is gone, nothing is worth a goodbye.
                () = &mut unanswered => {
                    self.shared.metrics.dropped(Side::Server, DropReason::KeepaliveTimeout);
                    return Err(HboneError::KeepaliveTimeout {
                        address: peer_address,
                        timeout: settings.keepalive.ping_timeout,
                    });
                }
            };
            match next {
                None => return Ok(()),
                // The client closed the connection cleanly (GOAWAY NO_ERROR).
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Ok(()),
                Some(Err(source)) => {
                    if let Some(reason) = DropReason::of_h2(&source) {
                        self.shared.metrics.dropped(Side::Server, reason);
                    }
                    return Err(HboneError::Http2 {
                        address: peer_address,
                        source,
                    });
                }
                Some(Ok((request, respond))) => self.dispatch(
                    request,
                    respond,
                    (&peer_identity, &peer_certificate),
                    peer_address,
                    local_address,
                ),
            }
        }
    }

    fn dispatch(
        &self,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        (peer_identity, peer_certificate): (&SpiffeId, &Arc<CertificateDer<'static>>),
        peer_address: SocketAddr,
        local_address: SocketAddr,
    ) {
        let authority = match connect_target(request.method(), request.uri()) {
            Ok(authority) => authority,
            Err(refusal) => {
                tracing::debug!(%peer_address, method = %request.method(), uri = %request.uri(), %refusal, "HBONE request refused");
                reply(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
        };
        let (parts, body) = request.into_parts();
        let connect = InboundConnect {
            peer_identity: peer_identity.clone(),
            peer_certificate: peer_certificate.clone(),
            authority,
            peer_address,
            local_address,
            headers: parts.headers,
            unanswered: Some((respond, body)),
        };
        let handler = self.shared.handler.clone();
        tokio::spawn(async move { handler.handle(connect).await });
    }
}

/// Why a request on an HBONE connection is not a CONNECT this server
/// hands to its handler; each is answered 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotConnect {
    #[error("method {0} is not CONNECT")]
    Method(http::Method),
    #[error("CONNECT target {0:?} is not ip:port")]
    Target(String),
}

/// The target of an HBONE request: it must be a CONNECT whose authority is
/// `ip:port`. Pure, so the fuzz targets call it on requests from outside.
pub fn connect_target(method: &http::Method, uri: &http::Uri) -> Result<SocketAddr, NotConnect> {
    if method != http::Method::CONNECT {
        return Err(NotConnect::Method(method.clone()));
    }
    uri.authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or_else(|| NotConnect::Target(uri.to_string()))
}

async fn handshake(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    settings: &Http2Settings,
    address: SocketAddr,
) -> Result<
    (
        SpiffeId,
        Arc<CertificateDer<'static>>,
        h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
    ),
    HboneError,
> {
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(tcp)
        .await
        .map_err(|source| HboneError::Tls { address, source })?;
    let (_, session) = tls.get_ref();
    let peer = tls::peer_identity(session).ok_or(HboneError::NoPeerIdentity { address })?;
    // The leaf the identity came from (peer_identity found it, so it is there).
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| Arc::new(leaf.clone().into_owned()))
        .ok_or(HboneError::NoPeerIdentity { address })?;
    if session.alpn_protocol() != Some(tls::ALPN_H2) {
        return Err(HboneError::NoAlpn { address });
    }
    let connection = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_request_header_list)
        .max_local_error_reset_streams(Some(settings.max_refused_streams))
        .handshake(tls)
        .await
        .map_err(|source| HboneError::Http2 { address, source })?;
    Ok((peer, leaf, connection))
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    // The client may already have gone; nothing to tell it then.
    let _ = respond.send_response(response, true);
}

struct LiveConnection<'a>(&'a AtomicUsize);

impl<'a> LiveConnection<'a> {
    fn count(live: &'a AtomicUsize) -> Self {
        live.fetch_add(1, Ordering::AcqRel);
        LiveConnection(live)
    }
}

impl Drop for LiveConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connect_to_ip_and_port_is_handed_on() {
        let target = |method: &str, uri: &str| {
            connect_target(&method.parse().unwrap(), &uri.parse().unwrap())
        };
        assert_eq!(
            target("CONNECT", "10.0.0.1:8080"),
            Ok("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            target("CONNECT", "[fd00::1]:80"),
            Ok("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(
            target("GET", "10.0.0.1:8080"),
            Err(NotConnect::Method(http::Method::GET))
        );
        for uri in ["reviews:9080", "10.0.0.1", "http://reviews/x", "/"] {
            assert!(
                matches!(target("CONNECT", uri), Err(NotConnect::Target(_))),
                "{uri}"
            );
        }
    }
}
