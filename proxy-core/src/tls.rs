//! The one place TLS policy is decided: the crypto provider, the rustls
//! configs for HBONE (mutual TLS between workload identities, TLS 1.3, ALPN
//! `h2`) and for the control-plane channel, and reading SPIFFE identities out
//! of certificates. The SPIFFE-aware verifiers live in [`verifier`].

mod verifier;

use std::path::Path;
use std::sync::Arc;

use api::SpiffeId;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};

use crate::identity::WorkloadCertificate;

/// ALPN protocol HBONE and the control plane speak: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "no trusted root certificates: configure the mesh root certificate (the CA's root-cert.pem)"
    )]
    NoRoots,
    #[error("a root certificate cannot be used as a trust anchor: {0}")]
    BadRoot(#[source] rustls::Error),
    #[error("the crypto provider does not support the TLS versions the mesh requires: {0}")]
    Provider(#[source] rustls::Error),
    #[error("rustls rejected the certificate or key of {identity}: {source}")]
    BadCertificate {
        identity: SpiffeId,
        #[source]
        source: rustls::Error,
    },
    #[error("could not build the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: malformed PEM: {source}")]
    Pem {
        what: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} contains no PEM certificate")]
    NoCertificate(String),
    #[error("server name {name:?} is not a valid DNS name or IP address")]
    ServerName { name: String },
    #[error("certificate has no usable SPIFFE identity: {0}")]
    NoSpiffeId(String),
    #[error(
        "peer presented identity {presented}, but {expected} was expected; the destination is not the workload it claims to be"
    )]
    WrongIdentity {
        expected: SpiffeId,
        presented: SpiffeId,
    },
    #[error("peer identity {presented} is outside the trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        presented: SpiffeId,
        trust_domain: String,
    },
}

/// The crypto provider every TLS config in the mesh is built with: aws-lc-rs.
///
/// Using one provider everywhere (and never linking `ring`) means rustls never
/// has to guess a process default, which is what makes kube's client panic at
/// start-up when two providers are compiled in.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for libraries (kube) that
/// build their own rustls configs. Safe to call more than once.
pub fn install_default_provider() {
    // Err means a default is already installed; ours is the only one linked.
    let _ = CryptoProvider::install_default(provider().as_ref().clone());
}

/// Client side of HBONE: presents `cert` and accepts only a server that
/// chains to the mesh roots and whose SPIFFE id is exactly `expected`. The
/// server name dialled is irrelevant to verification.
pub fn hbone_client_config(
    cert: &WorkloadCertificate,
    expected: &SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = verifier::ServerIdentityVerifier::new(root_store(cert.roots())?, expected);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Provider)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.private_key())
        .map_err(|source| bad_certificate(cert, source))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips certificate verification; a session cached for
    // one expected identity must never satisfy another, so never resume.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server side of HBONE: presents `cert` and requires a client certificate
/// that chains to the mesh roots and carries a SPIFFE id in `cert`'s trust
/// domain. After the handshake, [`peer_identity`] says who the client is.
pub fn hbone_server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = verifier::ClientIdentityVerifier::new(
        root_store(cert.roots())?,
        cert.identity().trust_domain(),
    )?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Provider)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.private_key())
        .map_err(|source| bad_certificate(cert, source))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients never resume (see hbone_client_config); tickets would be waste.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client config for the control plane (istiod, port 15012): server
/// authentication against `roots` by DNS name (the caller picks the name,
/// usually `istiod.istio-system.svc`), ALPN `h2` for gRPC, no client
/// certificate (proxies authenticate with a bearer token).
pub fn control_plane_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Provider)?
        .with_root_certificates(root_store(roots)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The SPIFFE identity of the peer of an established connection (client or
/// server side), from its leaf certificate. With the configs above the
/// verifier has already checked it; `None` before the handshake or when the
/// peer sent no certificate.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id(leaf).ok()
}

/// The SPIFFE identity a certificate was issued for: its single
/// `spiffe://` URI SAN.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::NoSpiffeId(format!("not a valid X.509 certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::NoSpiffeId(format!("malformed subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::NoSpiffeId("it has no subjectAltName".into()))?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(*uri)
            }
            _ => None,
        });
    let uri = uris
        .next()
        .ok_or_else(|| TlsError::NoSpiffeId("it has no spiffe:// URI SAN".into()))?;
    if uris.next().is_some() {
        // An identity must be unambiguous; Istio's CA never issues two.
        return Err(TlsError::NoSpiffeId(
            "it has more than one spiffe:// URI SAN".into(),
        ));
    }
    uri.parse()
        .map_err(|e| TlsError::NoSpiffeId(format!("{uri:?}: {e}")))
}

/// Parses every certificate in a PEM document; `what` names the source in
/// errors (a file path, "the CA response").
pub fn parse_pem_certificates(
    what: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// Reads a PEM file of certificates, e.g. the mesh root `root-cert.pem`.
pub fn load_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_pem_certificates(&path.display().to_string(), &pem)
}

/// PEM text of certificates, for admin endpoints and CA requests.
pub fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for cert in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        // base64 output is ASCII, so 64-byte chunks are valid UTF-8 lines.
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// A server name for dialling `name` (DNS name or IP literal).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName {
        name: name.to_string(),
    })
}

pub(crate) fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(TlsError::BadRoot)?;
    }
    Ok(store)
}

fn bad_certificate(cert: &WorkloadCertificate, source: rustls::Error) -> TlsError {
    TlsError::BadCertificate {
        identity: cert.identity().clone(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    #[test]
    fn reads_the_spiffe_id_from_the_uri_san() {
        let cert = cert_with_sans(vec![
            SanType::DnsName("web.default.svc".try_into().unwrap()),
            uri("https://example.com/not-spiffe"),
            uri("spiffe://cluster.local/ns/default/sa/web"),
        ]);
        assert_eq!(
            spiffe_id(&cert).unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
    }

    #[test]
    fn rejects_certificates_without_exactly_one_valid_spiffe_id() {
        let cases = [
            (vec![], "no subjectAltName"),
            (
                vec![SanType::DnsName(
                    "istiod.istio-system.svc".try_into().unwrap(),
                )],
                "no spiffe:// URI SAN",
            ),
            (
                vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    uri("spiffe://cluster.local/ns/c/sa/d"),
                ],
                "more than one",
            ),
            (
                vec![uri("spiffe://cluster.local/workload/x")],
                "must have the path",
            ),
        ];
        for (sans, want) in cases {
            let err = spiffe_id(&cert_with_sans(sans)).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let err = spiffe_id(&CertificateDer::from(vec![1, 2, 3])).unwrap_err();
        assert!(err.to_string().contains("not a valid X.509"), "{err}");
    }

    #[test]
    fn pem_round_trips_and_bad_pem_is_named() {
        let certs = vec![
            cert_with_sans(vec![uri("spiffe://td/ns/a/sa/b")]),
            cert_with_sans(vec![uri("spiffe://td/ns/c/sa/d")]),
        ];
        let pem = to_pem(&certs);
        assert_eq!(
            parse_pem_certificates("test", pem.as_bytes()).unwrap(),
            certs
        );

        let err = parse_pem_certificates("root-cert.pem", b"no certificates here").unwrap_err();
        assert_eq!(err.to_string(), "root-cert.pem contains no PEM certificate");
        let err = load_pem_certificates(Path::new("/nonexistent/root-cert.pem")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/root-cert.pem"),
            "{err}"
        );
        assert!(matches!(root_store(&[]), Err(TlsError::NoRoots)));
    }
}
