//! The gRPC channel to the control plane (istiod), shared by the CA client
//! and the xDS client: TLS against the mesh root with a fixed server name
//! whatever address is dialled (15012), or plaintext (15010, local
//! development), and a bearer token re-read from its file on every request
//! because projected service-account tokens rotate.
//!
//! istiod is trusted, for every new connection, by the root file as it is
//! then ([`ControlPlane::with_root_file`]) plus the trust bundle the CA sent
//! with the proxy's latest certificate ([`LearnedRoots`]). During a root
//! rotation istiod's serving certificate moves to the new root; the proxy
//! learned that root with its previous renewal, and the file (the
//! `istio-ca-root-cert` ConfigMap) may be updated later or never. Upstream
//! ztunnel reads its root file once, when the channel is built
//! (istio/ztunnel `src/tls/control.rs`, `grpc_tls_connector`), so it needs
//! a restart to follow; here it costs one small read per connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{self, TlsError};

/// The name istiod's serving certificate carries, as upstream.
pub const DEFAULT_SERVER_NAME: &str = "istiod.istio-system.svc";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("control-plane address {address:?} is not host:port: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("TLS to the control plane: {0}")]
    Tls(#[from] TlsError),
}

/// Where the control plane is and how to talk to it.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `host:port` dialled, e.g. `istiod.istio-system.svc:15012` or `10.0.0.1:15012`.
    pub address: String,
    /// Mesh roots to verify istiod with; `None` means plaintext.
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// Where `roots` came from: re-read for each new connection, `roots`
    /// kept while it cannot be read or parsed.
    pub root_file: Option<PathBuf>,
    /// Roots the CA sent with the proxy's certificates, trusted as well.
    pub learned_roots: Option<LearnedRoots>,
    /// Name istiod's certificate is verified against (not the dialled host).
    pub server_name: String,
    /// File holding the bearer token; `None` sends no token.
    pub token_path: Option<PathBuf>,
    pub connect_timeout: Duration,
}

/// A channel whose every request carries the bearer token.
pub type AuthenticatedChannel = InterceptedService<Channel, BearerToken>;

impl ControlPlane {
    /// istiod over TLS, verified against `roots` as [`DEFAULT_SERVER_NAME`].
    pub fn tls(address: impl Into<String>, roots: Vec<CertificateDer<'static>>) -> Self {
        ControlPlane {
            address: address.into(),
            roots: Some(roots),
            root_file: None,
            learned_roots: None,
            server_name: DEFAULT_SERVER_NAME.to_string(),
            token_path: None,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// istiod in plaintext (its 15010 port; local development only).
    pub fn plaintext(address: impl Into<String>) -> Self {
        ControlPlane {
            roots: None,
            ..ControlPlane::tls(address, Vec::new())
        }
    }

    pub fn with_token_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_path = Some(path.into());
        self
    }

    /// Re-read the roots from `path` (where they were loaded from) for
    /// every new connection.
    pub fn with_root_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_file = Some(path.into());
        self
    }

    /// Also trust the roots the CA sends with certificates.
    pub fn with_learned_roots(mut self, learned: LearnedRoots) -> Self {
        self.learned_roots = Some(learned);
        self
    }

    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// A lazily connected channel: nothing is dialled until the first
    /// request, and tonic re-dials after a failure, so callers keep one
    /// channel for the life of the process and bring their own retry policy.
    /// Errors only for configuration that can never work.
    pub fn channel(&self) -> Result<Channel, ControlPlaneError> {
        let endpoint = self.endpoint()?;
        let address: Arc<str> = self.address.as_str().into();
        match &self.roots {
            None => Ok(
                endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                    let address = address.clone();
                    async move {
                        let tcp = dial(&address).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
                    }
                })),
            ),
            Some(roots) => {
                let roots = Arc::new(ControlPlaneRoots::new(
                    roots,
                    self.root_file.clone(),
                    self.learned_roots.clone(),
                )?);
                let name: ServerName<'static> = tls::server_name(&self.server_name)?;
                Ok(
                    endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                        let (address, roots, name) = (address.clone(), roots.clone(), name.clone());
                        async move {
                            let connector = tokio_rustls::TlsConnector::from(roots.config());
                            let tcp = dial(&address).await?;
                            let tls = connector.connect(name, tcp).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                        }
                    })),
                )
            }
        }
    }

    /// The interceptor that adds `authorization: Bearer <token>`.
    pub fn bearer_token(&self) -> BearerToken {
        BearerToken {
            path: self.token_path.clone().map(Arc::from),
        }
    }

    /// The bearer token for the xDS client's streams (it takes a plain
    /// channel and adds credentials per stream): re-read on every reconnect.
    pub fn xds_metadata(&self) -> crate::xds::MetadataFn {
        let token = self.bearer_token();
        std::sync::Arc::new(move |metadata: &mut tonic::metadata::MetadataMap| {
            let request = token
                .clone()
                .call(tonic::Request::new(()))
                .map_err(|status| status.message().to_string())?;
            if let Some(value) = request.metadata().get("authorization") {
                metadata.insert("authorization", value.clone());
            }
            Ok(())
        })
    }

    /// [`Self::channel`] with [`Self::bearer_token`] on every request: what
    /// generated clients (`FooClient::new(..)`) are built on.
    pub fn authenticated_channel(&self) -> Result<AuthenticatedChannel, ControlPlaneError> {
        Ok(InterceptedService::new(
            self.channel()?,
            self.bearer_token(),
        ))
    }

    fn endpoint(&self) -> Result<Endpoint, ControlPlaneError> {
        let invalid = |reason: String| ControlPlaneError::InvalidAddress {
            address: self.address.clone(),
            reason,
        };
        let authority: http::uri::Authority =
            self.address.parse().map_err(|e| invalid(format!("{e}")))?;
        if authority.port_u16().is_none() {
            return Err(invalid("the port is missing".into()));
        }
        // The scheme only labels requests: the connector above decides TLS.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            // Detect a vanished istiod on long-lived xDS streams.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(endpoint)
    }
}

/// The trust bundle of the proxy's latest certificate, shared between the
/// certificate manager (which stores it) and the control-plane channels
/// (which trust it for their next connection).
#[derive(Clone, Debug, Default)]
pub struct LearnedRoots(Arc<ArcSwap<Vec<CertificateDer<'static>>>>);

impl LearnedRoots {
    pub fn store(&self, roots: &[CertificateDer<'static>]) {
        if self.0.load().as_slice() != roots {
            self.0.store(Arc::new(roots.to_vec()));
        }
    }

    pub fn load(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.0.load_full()
    }
}

/// The TLS config for the next connection to istiod: the root file as it
/// is now (or the last roots read from it) plus the learned roots.
struct ControlPlaneRoots {
    file: Option<PathBuf>,
    learned: Option<LearnedRoots>,
    current: Mutex<Current>,
}

struct Current {
    /// The file's contents last read, and the roots parsed from them.
    file_bytes: Option<Vec<u8>>,
    file_roots: Vec<CertificateDer<'static>>,
    learned: Arc<Vec<CertificateDer<'static>>>,
    config: Arc<rustls::ClientConfig>,
}

impl ControlPlaneRoots {
    fn new(
        roots: &[CertificateDer<'static>],
        file: Option<PathBuf>,
        learned: Option<LearnedRoots>,
    ) -> Result<Self, ControlPlaneError> {
        let config = tls::control_plane_client_config(roots)?;
        Ok(ControlPlaneRoots {
            file,
            learned,
            current: Mutex::new(Current {
                // Not read here: `roots` may be older than the file (read at
                // start, the channel made later); the first connection reads
                // it and trusts what it holds then.
                file_bytes: None,
                file_roots: roots.to_vec(),
                learned: Arc::default(),
                config,
            }),
        })
    }

    fn config(&self) -> Arc<rustls::ClientConfig> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        // A read error (the file mid-swap) keeps the last good roots.
        if let Some(file) = &self.file
            && let Ok(bytes) = std::fs::read(file)
            && current.file_bytes.as_ref() != Some(&bytes)
        {
            let what = file.display().to_string();
            match tls::parse_pem_certificates(&what, &bytes) {
                Ok(roots) if roots == current.file_roots => {}
                Ok(roots) => {
                    tracing::info!(file = %what, roots = roots.len(), "control-plane root certificates reloaded");
                    current.file_roots = roots;
                    changed = true;
                }
                Err(error) => {
                    tracing::warn!(%error, "the control-plane root file changed but cannot be used; keeping the previous roots");
                }
            }
            current.file_bytes = Some(bytes);
        }
        if let Some(learned) = &self.learned {
            let now = learned.load();
            if now != current.learned {
                current.learned = now;
                changed = true;
            }
        }
        if changed {
            let mut roots = current.file_roots.clone();
            roots.extend(
                current
                    .learned
                    .iter()
                    .filter(|r| !current.file_roots.contains(r))
                    .cloned(),
            );
            match tls::control_plane_client_config(&roots) {
                Ok(config) => current.config = config,
                Err(error) => {
                    tracing::warn!(%error, "cannot trust the new control-plane roots; keeping the previous ones");
                }
            }
        }
        current.config.clone()
    }
}

async fn dial(address: &str) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Adds the bearer token read from a file. Reading on every request (not
/// once) is deliberate: kubelet rewrites projected tokens before they expire.
#[derive(Clone, Debug)]
pub struct BearerToken {
    path: Option<Arc<Path>>,
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(path) = &self.path else {
            return Ok(request);
        };
        // A token file is a few hundred bytes on tmpfs; a blocking read costs
        // less than handing it to a blocking thread.
        let token = std::fs::read_to_string(path).map_err(|e| {
            tonic::Status::unauthenticated(format!(
                "cannot read the bearer token file {}: {e}",
                path.display()
            ))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(tonic::Status::unauthenticated(format!(
                "the bearer token file {} is empty",
                path.display()
            )));
        }
        let value = format!("Bearer {token}").parse().map_err(|_| {
            tonic::Status::unauthenticated(format!(
                "the bearer token in {} contains characters not allowed in a header",
                path.display()
            ))
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_addresses_without_a_port() {
        let err = ControlPlane::plaintext("istiod.istio-system.svc")
            .channel()
            .unwrap_err()
            .to_string();
        assert!(err.contains("port is missing"), "{err}");
        let err = ControlPlane::plaintext("not an address")
            .channel()
            .unwrap_err()
            .to_string();
        assert!(err.contains("not host:port"), "{err}");
    }

    #[test]
    fn tls_needs_roots() {
        let err = ControlPlane::tls("127.0.0.1:15012", Vec::new())
            .channel()
            .unwrap_err()
            .to_string();
        assert!(err.contains("root certificate"), "{err}");
    }

    #[test]
    fn reads_the_token_on_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let mut interceptor = ControlPlane::plaintext("127.0.0.1:1")
            .with_token_path(&path)
            .bearer_token();

        let err = interceptor.call(tonic::Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("token"), "{}", err.message());

        std::fs::write(&path, "first\n").unwrap();
        let req = interceptor.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer first");

        std::fs::write(&path, "second").unwrap();
        let req = interceptor.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer second"
        );

        let mut anonymous = ControlPlane::plaintext("127.0.0.1:1").bearer_token();
        let req = anonymous.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn xds_streams_carry_the_current_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let metadata = ControlPlane::plaintext("127.0.0.1:1")
            .with_token_path(&path)
            .xds_metadata();
        let mut map = tonic::metadata::MetadataMap::new();
        let err = metadata(&mut map).unwrap_err();
        assert!(err.contains("token"), "{err}");

        std::fs::write(&path, "first").unwrap();
        metadata(&mut map).unwrap();
        assert_eq!(map.get("authorization").unwrap(), "Bearer first");
        std::fs::write(&path, "second").unwrap();
        metadata(&mut map).unwrap();
        assert_eq!(map.get("authorization").unwrap(), "Bearer second");

        let mut empty = tonic::metadata::MetadataMap::new();
        ControlPlane::plaintext("127.0.0.1:1").xds_metadata()(&mut empty).unwrap();
        assert!(empty.get("authorization").is_none());
    }
}
