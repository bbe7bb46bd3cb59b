//! A workload's certificate and how it is obtained: a fresh P-256 key, a CSR
//! sent to a [`CertificateSigner`] (istiod's CA in production), and strict
//! validation of the chain that comes back before anything uses it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::ParsedCertificate;

use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("could not generate a key and CSR for {identity}: {source}")]
    KeyGeneration {
        identity: SpiffeId,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "the CA did not issue a certificate for {identity}: {code:?}: {message}; check the control-plane address, the bearer token and the CA's logs",
        code = status.code(),
        message = status.message()
    )]
    Ca {
        identity: SpiffeId,
        status: tonic::Status,
    },
    #[error("the CA returned an empty certificate chain for {identity}")]
    EmptyChain { identity: SpiffeId },
    #[error("the CA returned a malformed certificate chain for {identity}: {source}")]
    MalformedChain {
        identity: SpiffeId,
        #[source]
        source: TlsError,
    },
    #[error("the CA returned a leaf certificate for {identity} that is not valid X.509: {reason}")]
    BadLeaf { identity: SpiffeId, reason: String },
    #[error(
        "the CA issued a certificate for {issued} but {requested} was requested; check whether this proxy may impersonate that identity"
    )]
    WrongIdentity { requested: SpiffeId, issued: String },
    #[error(
        "the certificate the CA issued for {identity} does not carry the key this proxy generated"
    )]
    KeyMismatch { identity: SpiffeId },
    #[error(
        "the CA's response for {identity} carries no trust bundle: its last element must hold the mesh root certificates"
    )]
    NoRoots { identity: SpiffeId },
    #[error(
        "the certificate issued for {identity} does not chain to any of the {roots} root certificate(s) the CA sent with it: {source}; the current certificate is kept"
    )]
    Untrusted {
        roots: usize,
        identity: SpiffeId,
        #[source]
        source: rustls::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What a signer is asked for. The CA decides the identity from the
/// caller's credentials; `impersonate` asks it (as a node agent) for
/// `identity` on a pod's behalf.
#[derive(Clone, Debug)]
pub struct CertificateRequest {
    pub identity: SpiffeId,
    /// PKCS#10 CSR, PEM.
    pub csr_pem: String,
    pub validity: Duration,
    pub impersonate: bool,
}

pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, tonic::Status>> + Send + 'a>>;

/// Something that turns a CSR into a certificate chain (PEM, leaf first).
/// [`super::CaClient`] is the real one; tests use an in-process CA.
pub trait CertificateSigner: Send + Sync + 'static {
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_>;
}

/// A certificate for one workload identity, with its private key and the
/// mesh roots it chains to. Debug output never shows the key.
pub struct WorkloadCertificate {
    identity: SpiffeId,
    /// Leaf first, then intermediates; the roots are in `roots`, not here.
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &time::OffsetDateTime::from(self.not_before))
            .field("not_after", &time::OffsetDateTime::from(self.not_after))
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Leaf first, then intermediates (what a TLS peer is sent).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The mesh roots peers are verified against: the trust bundle the CA
    /// sent with this certificate.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Half-way through the lifetime: when renewal starts.
    pub fn renewal_time(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    /// The chain (leaf first) as PEM, for admin endpoints.
    pub fn chain_pem(&self) -> String {
        tls::to_pem(&self.chain)
    }

    pub fn roots_pem(&self) -> String {
        tls::to_pem(&self.roots)
    }

    /// The leaf's serial number, hex, for admin endpoints and logs.
    pub fn serial_number(&self) -> String {
        x509_parser::parse_x509_certificate(self.leaf().as_ref())
            .map(|(_, c)| c.tbs_certificate.raw_serial_as_string())
            .unwrap_or_default()
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Validates what a CA returned for a CSR made with `key`. As upstream
    /// ztunnel reads it (istio/ztunnel `src/tls/certificate.rs`,
    /// `WorkloadCertificate::new`), the last element is the trust bundle
    /// (one PEM holding every mesh root, several during a root rotation)
    /// and the ones before it the leaf and intermediates. The leaf must name
    /// exactly `identity`, carry `key`, be currently valid and chain to one
    /// of those roots; a copy of a root at the end of the chain is dropped.
    pub(crate) fn from_signed_chain(
        identity: &SpiffeId,
        key: &KeyPair,
        chain_pem: &[String],
    ) -> Result<Self, CertificateError> {
        let malformed = |source| CertificateError::MalformedChain {
            identity: identity.clone(),
            source,
        };
        let Some((roots_pem, chain_pem)) = chain_pem.split_last() else {
            return Err(CertificateError::EmptyChain {
                identity: identity.clone(),
            });
        };
        if chain_pem.is_empty() {
            // One element: a leaf (perhaps with its chain) and no bundle, or
            // garbage; tell them apart for the error.
            tls::parse_pem_certificates("the CA's certificate chain", roots_pem.as_bytes())
                .map_err(malformed)?;
            return Err(CertificateError::NoRoots {
                identity: identity.clone(),
            });
        }
        let roots = tls::parse_pem_certificates("the CA's trust bundle", roots_pem.as_bytes())
            .map_err(malformed)?;
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(
                tls::parse_pem_certificates("the CA's certificate chain", pem.as_bytes())
                    .map_err(malformed)?,
            );
        }
        let issued = tls::spiffe_id(&chain[0]).map_err(|e| CertificateError::WrongIdentity {
            requested: identity.clone(),
            issued: format!("no identity ({e})"),
        })?;
        if &issued != identity {
            return Err(CertificateError::WrongIdentity {
                requested: identity.clone(),
                issued: issued.to_string(),
            });
        }
        let (not_before, not_after, spki) = leaf_facts(identity, &chain[0])?;
        if spki != key.subject_public_key_info() {
            return Err(CertificateError::KeyMismatch {
                identity: identity.clone(),
            });
        }
        while chain.len() > 1 && chain.last().is_some_and(|c| roots.contains(c)) {
            chain.pop();
        }
        let untrusted = |source| CertificateError::Untrusted {
            identity: identity.clone(),
            roots: roots.len(),
            source,
        };
        let store = tls::root_store(&roots)?;
        let leaf = ParsedCertificate::try_from(&chain[0]).map_err(untrusted)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &store,
            &chain[1..],
            UnixTime::now(),
            tls::provider().signature_verification_algorithms.all,
        )
        .map_err(untrusted)?;
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots,
            not_before,
            not_after,
        })
    }

    /// Assembles a certificate without checking it (test certificates that
    /// are deliberately expired or foreign).
    #[cfg(feature = "testing")]
    pub(crate) fn unchecked(
        identity: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
        roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        let (not_before, not_after, _) =
            leaf_facts(&identity, &chain[0]).expect("test certificate parses");
        WorkloadCertificate {
            identity,
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots,
            not_before,
            not_after,
        }
    }
}

#[cfg(feature = "testing")]
impl WorkloadCertificate {
    pub(crate) fn with_roots(mut self, roots: Vec<CertificateDer<'static>>) -> Self {
        self.roots = roots;
        self
    }
}

/// A fresh P-256 key and a CSR for it naming `identity` (the CA ignores the
/// CSR's names, but upstream sends them and they help debugging).
pub(crate) fn key_and_csr(identity: &SpiffeId) -> Result<(KeyPair, String), CertificateError> {
    let failed = |source| CertificateError::KeyGeneration {
        identity: identity.clone(),
        source,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().map_err(failed)?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(failed)?;
    Ok((key, csr))
}

/// Obtains a certificate for `identity` from `signer`: generates the key
/// (it never leaves this process), sends the CSR, validates the answer
/// against the roots it carries, which become the certificate's trust
/// bundle: a new mesh root reaches the proxy with its next renewal.
pub async fn issue(
    signer: &dyn CertificateSigner,
    identity: &SpiffeId,
    validity: Duration,
    impersonate: bool,
) -> Result<WorkloadCertificate, CertificateError> {
    let (key, csr_pem) = key_and_csr(identity)?;
    let chain = signer
        .sign(CertificateRequest {
            identity: identity.clone(),
            csr_pem,
            validity,
            impersonate,
        })
        .await
        .map_err(|status| CertificateError::Ca {
            identity: identity.clone(),
            status,
        })?;
    WorkloadCertificate::from_signed_chain(identity, &key, &chain)
}

/// Validity period and SubjectPublicKeyInfo (DER) of a leaf.
fn leaf_facts(
    identity: &SpiffeId,
    leaf: &CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime, Vec<u8>), CertificateError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        CertificateError::BadLeaf {
            identity: identity.clone(),
            reason: e.to_string(),
        }
    })?;
    let at = |t: &x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let validity = cert.validity();
    Ok((
        at(&validity.not_before),
        at(&validity.not_after),
        cert.public_key().raw.to_vec(),
    ))
}
