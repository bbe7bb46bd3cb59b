//! The mesh's embedded certificate authority: it holds the signing key
//! ([`root`]: plug-in CA or a persisted self-signed root) and issues
//! short-lived workload certificates whose only SAN is the authenticated
//! caller's SPIFFE id; [`service`] serves it as
//! `istio.v1.auth.IstioCertificateService`.
//!
//! The CSR contributes its public key and nothing else ([`csr`]).

pub mod csr;
pub mod impersonation;
pub mod rate_limit;
pub mod reload;
pub mod root;
pub mod service;
pub mod signature;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use api::SpiffeId;
use base64::Engine;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;

use crate::auth::ServiceAccount;
use rate_limit::CallerRateLimit;
use root::{RootError, RootSource, SigningMaterial};

pub use reload::PluginWatcher;

/// Workload certificate lifetime when the caller does not ask for one.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate lifetime granted, as upstream's default.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a self-signed root created here.
pub const ROOT_CERT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How the CA is set up; built from istiod-rs's command line.
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// Trust domain of every identity issued (`spiffe://<trust-domain>/...`).
    pub trust_domain: String,
    /// A plug-in CA directory (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`). When unset, a self-signed root in `state_dir`.
    pub plugin_dir: Option<PathBuf>,
    /// How often `plugin_dir` is checked for new material ([`PluginWatcher`]).
    pub plugin_poll_interval: Duration,
    /// Where the self-signed root is created and kept.
    pub state_dir: PathBuf,
    /// Lifetime granted when the request does not ask for one.
    pub default_cert_ttl: Duration,
    /// Requested lifetimes are capped to this.
    pub max_cert_ttl: Duration,
    /// Lifetime of a newly created self-signed root.
    pub root_cert_ttl: Duration,
    /// Callers that may ask for the identity of pods on their own node
    /// (`ImpersonatedIdentity`).
    pub trusted_node_agents: Vec<ServiceAccount>,
    /// Each authenticated caller's budget of requests.
    pub rate_limit: CallerRateLimit,
    /// How often a self-signed root is checked for renewal (upstream's
    /// `CITADEL_SELF_SIGNED_ROOT_CERT_CHECK_INTERVAL`, 1 h); zero: never.
    pub root_check_interval: Duration,
    /// A self-signed root with less than this per cent of its lifetime left
    /// is renewed (upstream's
    /// `CITADEL_SELF_SIGNED_ROOT_CERT_GRACE_PERIOD_PERCENTILE`, 20).
    pub root_grace_percent: u8,
    /// Requests being authenticated, checked or signed at once, across all
    /// callers; one more is refused with RESOURCE_EXHAUSTED at once.
    pub max_requests_in_progress: usize,
}

/// [`CaConfig::max_requests_in_progress`] unless configured: a restart of
/// many nodes at once (each ztunnel asking for the identities of its pods)
/// waits on TokenReviews, not on signing; this bounds the TokenReviews
/// istiod has open and the requests it holds in memory while every caller
/// is still well within its own rate limit.
pub const DEFAULT_MAX_REQUESTS_IN_PROGRESS: usize = 512;

impl CaConfig {
    /// Defaults as upstream: 24 h certificates, 90 days at most, and the
    /// ztunnel service account as the one trusted node agent.
    pub fn new(trust_domain: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        CaConfig {
            trust_domain: trust_domain.into(),
            plugin_dir: None,
            plugin_poll_interval: reload::DEFAULT_POLL_INTERVAL,
            state_dir: state_dir.into(),
            default_cert_ttl: DEFAULT_CERT_TTL,
            max_cert_ttl: MAX_CERT_TTL,
            root_cert_ttl: ROOT_CERT_TTL,
            trusted_node_agents: vec![ServiceAccount::ztunnel()],
            rate_limit: CallerRateLimit::DEFAULT,
            max_requests_in_progress: DEFAULT_MAX_REQUESTS_IN_PROGRESS,
            root_check_interval: Duration::from_secs(3600),
            root_grace_percent: 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("trust domain {0:?} is not valid: {1}")]
    TrustDomain(String, api::IdentityError),
    #[error(
        "the CA configuration is inconsistent: the default certificate lifetime ({default:?}) exceeds the maximum ({max:?})"
    )]
    Lifetimes { default: Duration, max: Duration },
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    #[error("could not issue the certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the signing certificate has expired; rotate the CA ({0})")]
    Expired(String),
    #[error(
        "a certificate issued by this CA does not verify against its own root ({source_desc}): {reason}; check that the chain files belong together"
    )]
    SelfCheck { source_desc: String, reason: String },
}

/// A certificate with its private key, for istiod's own serving identity.
#[derive(Debug)]
pub struct IssuedKeyPair {
    /// Leaf first, then the CA chain up to the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The CA: signs certificates for authenticated identities. What it signs
/// with ([`Signer`]) is replaced whole when the plug-in directory changes
/// ([`Self::reload`]); every certificate is issued by one signer from start
/// to end, so a response never mixes old and new material.
#[derive(Debug)]
pub struct CertificateAuthority {
    config: CaConfig,
    signer: ArcSwap<Signer>,
    /// Bumped on every swap: istiod's serving certificate waits on it.
    generation: watch::Sender<u64>,
    /// The roots as one PEM: what publishes them (the `istio-ca-root-cert`
    /// ConfigMaps, the webhook's caBundle) waits on it.
    roots_pem: watch::Sender<String>,
}

/// The signing material of one moment.
#[derive(Debug)]
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Signing certificate .. the chain's root.
    chain: Vec<CertificateDer<'static>>,
    /// The chain without its root, PEM, one certificate per element.
    intermediates_pem: Vec<String>,
    /// Every root proxies must trust (the chain's own root first).
    roots: Vec<CertificateDer<'static>>,
    /// `roots` as one PEM bundle: the last element of every response.
    roots_pem: String,
    /// No leaf may outlive any certificate of the chain.
    chain_not_after: OffsetDateTime,
    source: RootSource,
}

/// What a [`CertificateAuthority::reload`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files hold what the CA already signs with.
    Unchanged,
    /// The CA now signs with the new material.
    Swapped,
}

impl Signer {
    fn new(material: SigningMaterial) -> Result<Self, CaError> {
        let SigningMaterial {
            key,
            chain,
            roots,
            source,
        } = material;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)?;
        let chain_not_after = chain
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .min()
            .expect("a chain has at least the signing certificate");
        let intermediates_pem = chain[..chain.len() - 1]
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect();
        let roots_pem = roots.iter().map(|c| pem_encode("CERTIFICATE", c)).collect();
        Ok(Signer {
            issuer,
            chain,
            intermediates_pem,
            roots,
            roots_pem,
            chain_not_after,
            source,
        })
    }

    /// Same certificates and roots (the key belongs to the first).
    fn same_as(&self, other: &Signer) -> bool {
        self.chain == other.chain && self.roots == other.roots
    }

    fn issue(
        &self,
        key: &impl PublicKeyData,
        sans: Vec<SanType>,
        lifetime: Duration,
    ) -> Result<rcgen::Certificate, CaError> {
        let now = OffsetDateTime::now_utc();
        let not_after = (now + lifetime).min(self.chain_not_after);
        if not_after <= now {
            return Err(CaError::Expired(format!(
                "its chain expired at {}",
                self.chain_not_after
            )));
        }
        let mut params = CertificateParams::default();
        // Identity lives only in the SAN (marked critical by rcgen since
        // the subject is empty).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.not_before = now;
        params.not_after = not_after;
        params.serial_number = Some(proxy_core::identity::root::random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(key, &self.issuer)?)
    }

    fn issue_key_pair(
        &self,
        sans: Vec<SanType>,
        lifetime: Duration,
    ) -> Result<IssuedKeyPair, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.issue(&key, sans, lifetime)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.der())
            .map_err(|e| CaError::Issue(rcgen::Error::X509(e.to_string())))?;
        let validity = parsed.validity();
        let not_before = validity.not_before.to_datetime().into();
        let not_after = validity.not_after.to_datetime().into();
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedKeyPair {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_before,
            not_after,
        })
    }

    /// Issues a leaf to a fresh key and verifies it as a peer would: a CA
    /// that would hand out unverifiable certificates must not start, nor
    /// be swapped in.
    fn self_check(&self, trust_domain: &str) -> Result<(), CaError> {
        let fail = |reason: String| CaError::SelfCheck {
            source_desc: format!("{:?}", self.source),
            reason,
        };
        let probe = SpiffeId::new(trust_domain, "istio-system", "ca-self-check")
            .expect("trust domain validated");
        let issued = self.issue_key_pair(vec![spiffe_san(&probe)?], Duration::from_secs(300))?;
        let mut roots = rustls::RootCertStore::empty();
        for root in &self.roots {
            roots
                .add(root.clone())
                .map_err(|e| fail(format!("root not usable: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            proxy_core::tls::provider(),
        )
        .build()
        .map_err(|e| fail(e.to_string()))?;
        verifier
            .verify_client_cert(&issued.chain[0], &issued.chain[1..], UnixTime::now())
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

/// Checks the self-signed root at start and then every
/// [`CaConfig::root_check_interval`] until `shutdown`, renewing it when due
/// ([`CertificateAuthority::renew_root_if_due`]). A failure is logged and
/// retried at the next check; the CA keeps signing with what it has.
pub async fn keep_root_renewed(
    ca: Arc<CertificateAuthority>,
    metrics: service::CaMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let interval = ca.config().root_check_interval;
    if interval.is_zero() || ca.config().plugin_dir.is_some() {
        return;
    }
    loop {
        match ca.renew_root_if_due(SystemTime::now()) {
            Ok(Reload::Swapped) => metrics.record_expiry(&ca),
            Ok(Reload::Unchanged) => {}
            Err(error) => tracing::error!(
                %error,
                "could not renew the self-signed root; still signing under the current one, trying again at the next check"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

impl CertificateAuthority {
    /// Loads the plug-in CA or the self-signed root (creating it the first
    /// time), validates it and checks that what it issues verifies.
    pub fn new(config: CaConfig) -> Result<Self, CaError> {
        SpiffeId::new(&config.trust_domain, "ns", "sa")
            .map_err(|e| CaError::TrustDomain(config.trust_domain.clone(), e))?;
        if config.default_cert_ttl > config.max_cert_ttl {
            return Err(CaError::Lifetimes {
                default: config.default_cert_ttl,
                max: config.max_cert_ttl,
            });
        }
        let material = match &config.plugin_dir {
            Some(dir) => root::load_plugin(dir)?,
            None => root::load_or_create_self_signed(
                &config.state_dir,
                &config.trust_domain,
                config.root_cert_ttl,
            )?,
        };
        let signer = Signer::new(material)?;
        signer.self_check(&config.trust_domain)?;
        tracing::info!(source = ?signer.source, chain_len = signer.chain.len(), roots = signer.roots.len(), "CA ready");
        Ok(CertificateAuthority {
            config,
            roots_pem: watch::Sender::new(signer.roots_pem.clone()),
            signer: ArcSwap::from_pointee(signer),
            generation: watch::Sender::new(0),
        })
    }

    /// Re-reads the plug-in directory and, when it holds a complete, valid
    /// set that differs from the current one, signs with it from now on.
    /// On any error the current material stays; the error names the file.
    ///
    /// As upstream istiod (istio/istio `pilot/pkg/bootstrap/istio_ca.go`,
    /// `handleEvent`), a new `root-cert.pem` must keep every current root
    /// or be a subset of them: add the new root beside the old one first,
    /// remove the old one once every proxy has renewed.
    pub fn reload(&self) -> Result<Reload, CaError> {
        let Some(dir) = &self.config.plugin_dir else {
            return Ok(Reload::Unchanged);
        };
        let current = self.signer.load_full();
        let next = Signer::new(root::load_plugin(dir)?)?;
        if next.same_as(&current) {
            return Ok(Reload::Unchanged);
        }
        let keeps_old = current.roots.iter().all(|r| next.roots.contains(r));
        let drops_only = next.roots.iter().all(|r| current.roots.contains(r));
        if !keeps_old && !drops_only {
            return Err(CaError::Root(root::RootError::Invalid {
                path: dir.join(root::ROOT_CERT),
                reason: format!(
                    "replaces the mesh roots without an overlap ({} now, {} in the file, none kept); proxies would stop trusting each other: first put the new root next to the current ones, and remove the old ones once every proxy has renewed",
                    current.roots.len(),
                    next.roots.len()
                ),
            }));
        }
        next.self_check(&self.config.trust_domain)?;
        tracing::info!(
            source = ?next.source,
            chain_len = next.chain.len(),
            roots = next.roots.len(),
            "CA reloaded: signing with the new plug-in material"
        );
        self.swap(next);
        Ok(Reload::Swapped)
    }

    /// Renews the self-signed root when it is within its grace period at
    /// `now` ([`root::renew_self_signed_if_due`]: same key, new validity)
    /// and signs under the new certificate from then on; every follower of
    /// the roots is told. Nothing for a plug-in CA (its owner rotates it).
    pub fn renew_root_if_due(&self, now: SystemTime) -> Result<Reload, CaError> {
        if self.config.plugin_dir.is_some() {
            return Ok(Reload::Unchanged);
        }
        let Some(material) = root::renew_self_signed_if_due(
            &self.config.state_dir,
            &self.config.trust_domain,
            self.config.root_cert_ttl,
            self.config.root_grace_percent,
            now,
        )?
        else {
            return Ok(Reload::Unchanged);
        };
        let next = Signer::new(material)?;
        next.self_check(&self.config.trust_domain)?;
        self.swap(next);
        Ok(Reload::Swapped)
    }

    /// Signs with `next` from now on and tells the followers.
    fn swap(&self, next: Signer) {
        let roots_pem = next.roots_pem.clone();
        self.signer.store(Arc::new(next));
        self.generation.send_modify(|g| *g += 1);
        self.roots_pem.send_if_modified(|current| {
            let changed = *current != roots_pem;
            *current = roots_pem;
            changed
        });
    }

    /// Changes whenever the CA swaps its material.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The roots as one PEM bundle, changing when they do.
    pub fn watch_roots_pem(&self) -> watch::Receiver<String> {
        self.roots_pem.subscribe()
    }

    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    pub fn source(&self) -> RootSource {
        self.signer.load().source.clone()
    }

    /// The roots proxies must trust (the chain's own root first).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.signer.load().roots.clone()
    }

    /// The roots as one PEM bundle.
    pub fn roots_pem(&self) -> String {
        self.signer.load().roots_pem.clone()
    }

    /// When the CA's own chain stops being valid.
    pub fn chain_not_after(&self) -> SystemTime {
        self.signer.load().chain_not_after.into()
    }

    /// When the chain's own root (the first of the roots) stops being valid.
    pub fn root_not_after(&self) -> SystemTime {
        let signer = self.signer.load();
        signer
            .roots
            .first()
            .and_then(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.to_datetime().into())
            .unwrap_or_else(|| signer.chain_not_after.into())
    }

    /// The lifetime granted for a request: the default when none is asked
    /// for, never more than the maximum.
    pub fn lifetime(&self, requested: Option<Duration>) -> Duration {
        match requested {
            Some(ttl) if !ttl.is_zero() => ttl.min(self.config.max_cert_ttl),
            _ => self.config.default_cert_ttl,
        }
    }

    /// Signs a leaf for `identity` with the public key of `csr_pem`; returns
    /// the PEM response in the order upstream istiod builds it (istio/istio
    /// `security/pkg/server/ca/server.go`, `CreateCertificate`: leaf, cert
    /// chain, then `root-cert.pem`). Unlike that function, which splits every
    /// element into one certificate each, the roots stay one last element:
    /// upstream ztunnel reads the last element as every root concatenated
    /// (istio/ztunnel `src/tls/certificate.rs`, `WorkloadCertificate::new`),
    /// and so do our proxies, which take it as their trust bundle.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        let key = csr::parse(csr_pem)?;
        let signer = self.signer.load();
        let leaf = signer.issue(&key, vec![spiffe_san(identity)?], self.lifetime(requested))?;
        let mut chain = Vec::with_capacity(2 + signer.intermediates_pem.len());
        chain.push(leaf.pem());
        chain.extend(signer.intermediates_pem.iter().cloned());
        chain.push(signer.roots_pem.clone());
        Ok(chain)
    }

    /// Issues a certificate, with a fresh P-256 key generated here, for
    /// `identity` and `dns_names` (istiod's own serving certificate).
    pub fn issue_key_pair(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<IssuedKeyPair, CaError> {
        let mut sans = vec![spiffe_san(identity)?];
        for name in dns_names {
            sans.push(SanType::DnsName(name.clone().try_into()?));
        }
        self.signer
            .load()
            .issue_key_pair(sans, lifetime.min(self.config.max_cert_ttl))
    }
}

fn spiffe_san(identity: &SpiffeId) -> Result<SanType, CaError> {
    Ok(SanType::URI(identity.to_string().try_into()?))
}

/// PEM text of one DER object (`label`: `CERTIFICATE`, `CERTIFICATE REQUEST`...).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}
