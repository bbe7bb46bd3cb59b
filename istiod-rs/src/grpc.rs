//! istiod's gRPC front door: one set of tonic services (the CA, and the
//! xDS server when it is added) served on 15012 over TLS and, only when
//! asked for (local development), on 15010 in plaintext.
//!
//! The TLS listener presents a certificate the embedded CA issues to
//! istiod itself ([`serving_cert`]): SAN `spiffe://<td>/ns/<ns>/sa/istiod`
//! plus `istiod.<ns>.svc` and `istiod.<ns>.svc.<cluster-domain>`, so proxies
//! connecting to `istiod.istio-system.svc` verify it against the mesh root.
//!
//! Both listeners are proxy-core [`Listener`]s: a cap on connections held,
//! a TLS handshake deadline, the HTTP/2 preface within the header timeout,
//! an idle timeout, each counted in
//! `istiod_listener_connections_dropped_total`. Handshakes run in their own
//! tasks; a failed one is counted and dropped, never fatal. Requests are
//! capped at `max_receive_message_bytes` (upstream's
//! `ISTIO_GPRC_MAXRECVMSGSIZE`, 4 MiB), and HTTP/2 keepalive pings drop
//! peers that stopped answering (upstream's 30 s / 10 s).

pub mod serving_cert;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::SpiffeId;
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::Connected;

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
    /// Each listener's cap and timeouts (the header timeout bounds the
    /// wait for the HTTP/2 preface).
    pub limits: ListenerLimits,
    /// Largest request message accepted (CA and xDS); larger ones end the
    /// call with OUT_OF_RANGE.
    pub max_receive_message_bytes: usize,
    /// HTTP/2 PING after this long without a frame from the peer...
    pub keepalive_interval: Duration,
    /// ...and the connection is closed if the PING is not answered in this.
    pub keepalive_timeout: Duration,
    /// After shutdown is asked for, open connections get this long to end.
    pub drain_timeout: Duration,
}

impl GrpcConfig {
    /// A gRPC client finishes its TLS handshake and sends the HTTP/2
    /// preface at once; 10 s each is generous (grpc-go, upstream's server,
    /// allows 120 s for both together). A cluster's proxies hold one or two
    /// connections each (xDS, CA): 20 000 covers thousands of nodes. No
    /// limit per address by default: proxies of a remote cluster reach
    /// istiod through one east-west gateway, thousands behind one address.
    /// Connections idle for 5 min are closed; keepalive (every 30 s) keeps
    /// live ones busy.
    pub const DEFAULT_LIMITS: ListenerLimits = ListenerLimits {
        max_connections: 20_000,
        max_connections_per_peer: 20_000,
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
    };
    /// Upstream's `ISTIO_GPRC_MAXRECVMSGSIZE` default.
    pub const DEFAULT_MAX_RECEIVE_MESSAGE_BYTES: usize = 4 << 20;

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

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            tls_addr: SocketAddr::from(([0, 0, 0, 0], api::ports::ISTIOD_TLS)),
            plaintext_addr: None,
            namespace: api::labels::DEFAULT_ROOT_NAMESPACE.into(),
            cluster_domain: api::labels::DEFAULT_CLUSTER_DOMAIN.into(),
            extra_dns_names: Vec::new(),
            serving_cert_ttl: Duration::from_secs(24 * 3600),
            limits: GrpcConfig::DEFAULT_LIMITS,
            max_receive_message_bytes: GrpcConfig::DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
            // Upstream istiod's keepalive options (pkg/keepalive).
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
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
    tls: Listener,
    tls_addr: SocketAddr,
    plaintext: Option<(Listener, SocketAddr)>,
    serving_cert: Arc<ServingCert>,
    acceptor: TlsAcceptor,
}

/// Listener names, as metrics and logs show them.
pub const TLS_LISTENER: &str = "grpc-tls";
pub const PLAINTEXT_LISTENER: &str = "grpc-plaintext";

impl GrpcServer {
    /// Binds the listeners and issues the first serving certificate.
    pub async fn bind(
        config: GrpcConfig,
        ca: Arc<CertificateAuthority>,
        listeners: &ListenerMetrics,
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

        let listen = |addr: SocketAddr, name: &'static str| async move {
            let bind_err = |source| GrpcError::Bind { addr, source };
            let listener = Listener::bind(addr, name, config.limits, listeners)
                .await
                .map_err(bind_err)?;
            let local = listener.local_addr().map_err(bind_err)?;
            Ok::<_, GrpcError>((listener, local))
        };
        let (tls_listener, tls_addr) = listen(config.tls_addr, TLS_LISTENER).await?;
        let plaintext = match config.plaintext_addr {
            Some(addr) => Some(listen(addr, PLAINTEXT_LISTENER).await?),
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

        tracing::info!(addr = %tls_addr, "serving gRPC over TLS");
        let incoming = tls.http2_connections(Some(acceptor), shutdown.clone());
        let tls_server = serve_incoming(&config, tls_routes, incoming, tls_addr, shutdown.clone());

        let plaintext_server = async {
            match plaintext {
                Some((listener, addr)) => {
                    tracing::warn!(%addr, "serving gRPC in plaintext: for local development only");
                    let incoming = listener.http2_connections(None, shutdown.clone());
                    serve_incoming(&config, plaintext_routes, incoming, addr, shutdown.clone())
                        .await
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

async fn serve_incoming<I, IO, IE>(
    config: &GrpcConfig,
    routes: Routes,
    incoming: I,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), GrpcError>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|source| GrpcError::Serve { addr, source })
}
