//! The gRPC channel to the control plane (istiod), shared by the CA client
//! and the xDS client: TLS against the mesh root with a fixed server name
//! whatever address is dialled (15012), or plaintext (15010, local
//! development), and a bearer token re-read from its file on every request
//! because projected service-account tokens rotate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
                let connector =
                    tokio_rustls::TlsConnector::from(tls::control_plane_client_config(roots)?);
                let name: ServerName<'static> = tls::server_name(&self.server_name)?;
                Ok(
                    endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                        let (address, connector, name) =
                            (address.clone(), connector.clone(), name.clone());
                        async move {
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
