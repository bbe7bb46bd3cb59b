//! The client side of the CA for tests and the benchmark: a tonic channel
//! over TLS verified against the mesh root (the proxies' real CA client
//! lives in proxy-core), CSRs, and requests carrying a bearer token.
//!
//! Included with `#[path]` by `tests/ca.rs` and `benches/ca.rs`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use api::ca::IstioCertificateRequest;
use api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};

/// A CA client on one HTTP/2 connection.
pub type Client = IstioCertificateServiceClient<Channel>;

/// The name proxies use for istiod, as upstream.
pub const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// A rustls client config trusting `roots`, offering h2.
pub fn client_tls(roots: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .expect("root is a valid certificate");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(proxy_core::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("provider supports the default versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// One HTTP/2 connection to istiod's TLS port, verified as a proxy would
/// (server name `istiod.istio-system.svc`, chain to the mesh root).
pub async fn tls_channel(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
) -> Result<Client, tonic::transport::Error> {
    let tls = tokio_rustls::TlsConnector::from(client_tls(roots));
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(ISTIOD_NAME).expect("valid DNS name");
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect_with_connector(connector)
        .await?;
    Ok(IstioCertificateServiceClient::new(channel))
}

/// One HTTP/2 connection to the plaintext port.
pub async fn plaintext_channel(addr: SocketAddr) -> Result<Client, tonic::transport::Error> {
    IstioCertificateServiceClient::connect(format!("http://{addr}")).await
}

/// A PEM CSR for `key` that asks for identities the CA must ignore.
pub fn csr_pem(key: &rcgen::KeyPair) -> String {
    let mut params =
        rcgen::CertificateParams::new(vec!["spoofed.example.com".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/istio-system/sa/istiod"
            .try_into()
            .unwrap(),
    ));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "spoofed");
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// A CreateCertificate request: `token` as bearer, `ttl_secs` requested
/// lifetime (0: none), and an optional `ImpersonatedIdentity`.
pub fn request(
    csr: String,
    token: Option<&str>,
    ttl_secs: i64,
    impersonate: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            api::labels::IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
            },
        )]
        .into(),
    });
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl_secs,
        metadata,
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ASCII token"),
        );
    }
    request
}
