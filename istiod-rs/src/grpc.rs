//! istiod's gRPC front door: one set of tonic services (the CA, and the
//! xDS server when it is added) served on 15012 over TLS and, only when
//! asked for (local development), on 15010 in plaintext.
//!
//! The TLS listener presents a certificate the embedded CA issues to
//! istiod itself ([`serving_cert`]): SAN `spiffe://<td>/ns/<ns>/sa/istiod`
//! plus `istiod.<ns>.svc` and `istiod.<ns>.svc.<cluster-domain>`, so proxies
//! connecting to `istiod.istio-system.svc` verify it against the mesh root.
//! Handshakes run in their own tasks, each under a timeout; a failed one
//! is logged and dropped, never fatal.

pub mod serving_cert;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use api::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::ca::CertificateAuthority;
use serving_cert::{ServingCert, ServingCertError};

/// The service account istiod runs as; part of its serving identity.
pub const ISTIOD_SERVICE_ACCOUNT: &str = "istiod";

/// How istiod's gRPC listeners are set up.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// TLS listener (upstream: 15012).
    pub tls_addr: SocketAddr,
    /// Plaintext listener (upstream: 15010); `None` unless asked for.
    pub plaintext_addr: Option<SocketAddr>,
    /// istiod's namespace: its identity and DNS names derive from it.
    pub namespace: String,
    /// The cluster's DNS domain, for `istiod.<ns>.svc.<domain>`.
    pub cluster_domain: String,
    /// More DNS names for the serving certificate (a LoadBalancer name...).
    pub extra_dns_names: Vec<String>,
    /// Lifetime of the serving certificate (renewed at half).
    pub serving_cert_ttl: Duration,
    /// A client that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// After shutdown is asked for, open connections get this long to end.
    pub drain_timeout: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            tls_addr: SocketAddr::from(([0, 0, 0, 0], api::ports::ISTIOD_TLS)),
            plaintext_addr: None,
            namespace: api::labels::DEFAULT_ROOT_NAMESPACE.into(),
            cluster_domain: api::labels::DEFAULT_CLUSTER_DOMAIN.into(),
            extra_dns_names: Vec::new(),
            serving_cert_ttl: Duration::from_secs(24 * 3600),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

impl GrpcConfig {
    /// The DNS names on the serving certificate.
    pub fn dns_names(&self) -> Vec<String> {
        let svc = format!("{ISTIOD_SERVICE_ACCOUNT}.{}.svc", self.namespace);
        let mut names = vec![svc.clone(), format!("{svc}.{}", self.cluster_domain)];
        for name in &self.extra_dns_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("could not listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("istiod's identity in namespace {namespace:?} is not valid: {source}")]
    Identity {
        namespace: String,
        source: api::IdentityError,
    },
    #[error(transparent)]
    ServingCert(#[from] ServingCertError),
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the gRPC server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
}

/// Bound listeners, ready to serve.
pub struct GrpcServer {
    config: GrpcConfig,
    tls: TcpListener,
    tls_addr: SocketAddr,
    plaintext: Option<(TcpListener, SocketAddr)>,
    serving_cert: Arc<ServingCert>,
    acceptor: TlsAcceptor,
}

impl GrpcServer {
    /// Binds the listeners and issues the first serving certificate.
    pub async fn bind(
        config: GrpcConfig,
        ca: Arc<CertificateAuthority>,
    ) -> Result<Self, GrpcError> {
        let identity = SpiffeId::new(ca.trust_domain(), &config.namespace, ISTIOD_SERVICE_ACCOUNT)
            .map_err(|source| GrpcError::Identity {
                namespace: config.namespace.clone(),
                source,
            })?;
        let serving_cert =
            ServingCert::issue(ca, identity, config.dns_names(), config.serving_cert_ttl)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(proxy_core::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(serving_cert.clone());
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let (tls_listener, tls_addr) = listen(config.tls_addr).await?;
        let plaintext = match config.plaintext_addr {
            Some(addr) => Some(listen(addr).await?),
            None => None,
        };
        Ok(GrpcServer {
            config,
            tls: tls_listener,
            tls_addr,
            plaintext,
            serving_cert,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
        })
    }

    /// The TLS listener's address (its real port when bound to port 0).
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr
    }

    /// The plaintext listener's address, when there is one.
    pub fn plaintext_addr(&self) -> Option<SocketAddr> {
        self.plaintext.as_ref().map(|(_, addr)| *addr)
    }

    pub fn serving_cert(&self) -> &Arc<ServingCert> {
        &self.serving_cert
    }

    /// Serves `routes` on every listener until `shutdown` is cancelled, then
    /// lets open connections finish for up to the drain timeout.
    pub async fn serve(self, routes: Routes, shutdown: CancellationToken) -> Result<(), GrpcError> {
        self.serve_each(routes.clone(), routes, shutdown).await
    }

    /// [`Self::serve`] with different services per listener: the xDS service
    /// requires a token on the TLS port but not on the plaintext one.
    pub async fn serve_each(
        self,
        tls_routes: Routes,
        plaintext_routes: Routes,
        shutdown: CancellationToken,
    ) -> Result<(), GrpcError> {
        let GrpcServer {
            config,
            tls,
            tls_addr,
            plaintext,
            serving_cert,
            acceptor,
        } = self;
        tokio::spawn(serving_cert.keep_fresh(shutdown.clone()));

        let (tx, rx) = mpsc::channel(128);
        tokio::spawn(accept_tls(
            tls,
            acceptor,
            config.handshake_timeout,
            "gRPC",
            tx,
            shutdown.clone(),
        ));
        tracing::info!(addr = %tls_addr, "serving gRPC over TLS");
        let tls_server = serve_incoming(
            tls_routes,
            ReceiverStream::new(rx),
            tls_addr,
            shutdown.clone(),
        );

        let plaintext_server = async {
            match plaintext {
                Some((listener, addr)) => {
                    tracing::warn!(%addr, "serving gRPC in plaintext: for local development only");
                    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                    serve_incoming(plaintext_routes, incoming, addr, shutdown.clone()).await
                }
                None => Ok(()),
            }
        };

        let servers = async { tokio::try_join!(tls_server, plaintext_server).map(|_| ()) };
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.drain_timeout).await;
        };
        tokio::select! {
            result = servers => result,
            _ = deadline => {
                tracing::warn!(timeout = ?config.drain_timeout, "gRPC connections still open after the drain timeout; closing them");
                Ok(())
            }
        }
    }
}

async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), GrpcError> {
    let bind_err = |source| GrpcError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

async fn serve_incoming<I, IO, IE>(
    routes: Routes,
    incoming: I,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), GrpcError>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|source| GrpcError::Serve { addr, source })
}

/// Accepts TCP connections and hands each finished TLS handshake on
/// (to tonic, or to the webhook's HTTP server). Each handshake runs in its
/// own task under `handshake_timeout`; `port` names the listener in logs.
pub(crate) async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    port: &'static str,
    connections: mpsc::Sender<io::Result<TlsConnection>>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep going.
                tracing::warn!(%error, port, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = connections.send(Ok(TlsConnection { stream, info })).await;
                }
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, port, "TLS handshake failed");
                }
                Err(_) => {
                    tracing::info!(%peer, timeout = ?handshake_timeout, port, "TLS handshake timed out");
                }
            }
        });
    }
}

/// A server-side TLS connection, with the addresses tonic exposes to
/// handlers (`Request::remote_addr`).
pub(crate) struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl TlsConnection {
    /// The client's address.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
