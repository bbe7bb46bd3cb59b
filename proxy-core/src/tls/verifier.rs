//! The SPIFFE-aware certificate verifiers for HBONE. webpki does the chain
//! validation (signatures up to a mesh root, validity period, key usage);
//! these add the identity check that host-name verification would do on the
//! web: the peer's `spiffe://` URI SAN.

use std::sync::Arc;

use api::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::{TlsError, provider, spiffe_id};

/// Client side: the server must chain to the mesh roots and be exactly the
/// identity the destination must have. The dialled name plays no part: HBONE
/// peers are addressed by IP and named by SPIFFE id.
#[derive(Debug)]
pub(super) struct ServerIdentityVerifier {
    roots: RootCertStore,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerIdentityVerifier {
    pub(super) fn new(roots: RootCertStore, expected: &SpiffeId) -> Self {
        ServerIdentityVerifier {
            roots,
            expected: expected.clone(),
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = spiffe_id(end_entity).map_err(reject)?;
        if presented != self.expected {
            return Err(reject(TlsError::WrongIdentity {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server side: a client certificate is mandatory, must chain to the mesh
/// roots (webpki's client verifier) and must name an identity in our trust
/// domain. Which identities may do what is policy, decided after the
/// handshake from [`super::peer_identity`].
#[derive(Debug)]
pub(super) struct ClientIdentityVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientIdentityVerifier {
    pub(super) fn new(roots: RootCertStore, trust_domain: &str) -> Result<Self, TlsError> {
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()?;
        Ok(ClientIdentityVerifier {
            chain,
            trust_domain: trust_domain.to_string(),
        })
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = spiffe_id(end_entity).map_err(reject)?;
        if presented.trust_domain() != self.trust_domain {
            return Err(reject(TlsError::ForeignTrustDomain {
                presented,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Carries our reason through rustls, so the handshake error (and log line)
/// says which identity was presented and which was expected.
fn reject(reason: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Rejected(reason)),
    )))
}

/// rustls prints custom certificate errors with `Debug`; this makes that
/// the readable message.
struct Rejected(TlsError);

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
