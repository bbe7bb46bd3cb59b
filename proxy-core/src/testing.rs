//! Helpers for tests of crates built on proxy-core (feature `testing`): an
//! in-process CA that signs the way istiod's does (the identity comes from
//! the request, never from the CSR), certificates for any identity (also
//! expired or from a foreign root), a controllable signer for the
//! certificate manager, a serving config for a stand-in control plane, and
//! what tests of listener limits need: the admin servers on loopback, and
//! waiting for a server to close a connection; [`raw_http2`]: an HBONE
//! client that breaks the rules real clients keep.

pub mod raw_http2;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminState, Readiness, ServerAddrs, ServerConfig, Servers};
use crate::identity::certificate::key_and_csr;
use crate::identity::{
    CertificateManager, CertificateRequest, CertificateSigner, ManagerConfig, SignFuture,
    WorkloadCertificate,
};
use crate::listener::{ListenerLimits, ListenerMetrics};
use crate::store::WorkloadStore;
use crate::tls;

/// Only there so that a bug cannot hang a test.
const PATIENCE: Duration = Duration::from_secs(30);

/// A mesh root that signs leaf certificates for any identity.
pub struct TestCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A fresh self-signed P-256 root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate root key");
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "test mesh root");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(24 * 3600)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        let root = params.self_signed(&key).expect("self-sign root");
        TestCa {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            root: root.der().clone(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
    pub fn identity(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, namespace, service_account).expect("valid test identity")
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }

    pub fn root_pem(&self) -> String {
        tls::to_pem(std::slice::from_ref(&self.root))
    }

    /// Signs `csr_pem`'s key for `identity`, valid from now for `validity`;
    /// returns the chain as a CA response carries it: PEM, leaf first,
    /// ending at the root.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        validity: Duration,
    ) -> Result<Vec<String>, tonic::Status> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| tonic::Status::invalid_argument(format!("malformed CSR: {e}")))?;
        let now = SystemTime::now();
        csr.params = leaf_params(identity, now, now + validity);
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| tonic::Status::internal(format!("signing failed: {e}")))?;
        Ok(vec![leaf.pem(), self.root_pem()])
    }

    /// A valid certificate for `identity` (one day), validated the way a CA
    /// response is.
    pub fn certificate(&self, identity: &SpiffeId) -> WorkloadCertificate {
        let (key, csr) = key_and_csr(identity).expect("key and CSR");
        let chain = self
            .sign_csr(&csr, identity, Duration::from_secs(24 * 3600))
            .expect("sign test certificate");
        WorkloadCertificate::from_signed_chain(identity, &key, &chain)
            .expect("test certificate validates")
    }

    /// A certificate for `identity` valid only between the given times (for
    /// expired or not-yet-valid certificates); not validated.
    pub fn certificate_valid_between(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> WorkloadCertificate {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
        let leaf = leaf_params(identity, not_before, not_after)
            .signed_by(&key, &self.issuer)
            .expect("sign test certificate");
        WorkloadCertificate::unchecked(
            identity.clone(),
            vec![leaf.der().clone()],
            &key,
            self.roots(),
        )
    }

    /// A one-day certificate from this CA for `identity` that trusts
    /// `roots` instead of this CA: an impostor that knows the real mesh
    /// root but cannot get its certificates signed by it.
    pub fn certificate_trusting(
        &self,
        identity: &SpiffeId,
        roots: Vec<CertificateDer<'static>>,
    ) -> WorkloadCertificate {
        let now = SystemTime::now();
        let cert =
            self.certificate_valid_between(identity, now, now + Duration::from_secs(24 * 3600));
        cert.with_roots(roots)
    }

    /// A TLS serving config with a certificate for `dns_names` (e.g.
    /// `istiod.istio-system.svc`), ALPN h2: a stand-in control plane.
    pub fn server_tls_config(&self, dns_names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
        let mut params =
            CertificateParams::new(dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid DNS names");
        params.distinguished_name = DistinguishedName::new();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server certificate");
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server certificate");
        config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        Arc::new(config)
    }
}

/// What istiod puts in a workload certificate: only the SPIFFE URI SAN,
/// usable for both TLS client and server.
fn leaf_params(
    identity: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .to_string()
            .try_into()
            .expect("SPIFFE ids are IA5 strings"),
    )];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(rand::random::<[u8; 16]>().to_vec().into());
    params
}

/// A [`CertificateSigner`] backed by a [`TestCa`] that tests can slow down,
/// break and inspect.
pub struct TestSigner {
    ca: Arc<TestCa>,
    validity: Mutex<Option<Duration>>,
    failing: AtomicBool,
    paused: watch::Sender<bool>,
    requests: Mutex<Vec<CertificateRequest>>,
}

impl std::fmt::Debug for TestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestSigner")
            .field("requests", &self.request_count())
            .finish_non_exhaustive()
    }
}

impl TestSigner {
    pub fn new(ca: Arc<TestCa>) -> Arc<Self> {
        Arc::new(TestSigner {
            ca,
            validity: Mutex::new(None),
            failing: AtomicBool::new(false),
            paused: watch::Sender::new(false),
            requests: Mutex::new(Vec::new()),
        })
    }

    /// A manager that gets its certificates from this signer.
    pub fn manager(self: &Arc<Self>, config: ManagerConfig) -> CertificateManager {
        CertificateManager::new(self.clone(), config)
    }

    /// Issue certificates with this lifetime whatever is asked (`None`: as asked).
    pub fn set_validity(&self, validity: Option<Duration>) {
        *self.validity.lock().expect("lock") = validity;
    }

    /// While failing, every request is answered UNAVAILABLE.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// While paused, requests are recorded but not answered.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<CertificateRequest> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }
}

impl CertificateSigner for TestSigner {
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
        self.requests.lock().expect("lock").push(request.clone());
        let mut paused = self.paused.subscribe();
        Box::pin(async move {
            let _ = paused.wait_for(|paused| !paused).await;
            if self.failing.load(Ordering::SeqCst) {
                return Err(tonic::Status::unavailable(
                    "the test CA is failing on purpose",
                ));
            }
            let validity = self
                .validity
                .lock()
                .expect("lock")
                .unwrap_or(request.validity);
            self.ca
                .sign_csr(&request.csr_pem, &request.identity, validity)
        })
    }
}

/// The admin, stats and readiness servers on ephemeral loopback ports
/// with `limits`, showing `store`; their listener metrics are registered in
/// the registry `/metrics` serves. Cancel the token to stop them.
pub async fn loopback_admin_servers(
    limits: ListenerLimits,
    store: WorkloadStore,
) -> (Servers, ListenerMetrics, CancellationToken) {
    loopback_admin_servers_with(limits, AdminState::new(store)).await
}

/// As [`loopback_admin_servers`], serving `admin` (extra `/config_dump`
/// sections, certificates).
pub async fn loopback_admin_servers_with(
    limits: ListenerLimits,
    admin: AdminState,
) -> (Servers, ListenerMetrics, CancellationToken) {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut registry = crate::metrics::new_registry();
    let listeners = ListenerMetrics::register(&mut registry);
    let shutdown = CancellationToken::new();
    let servers = Servers::start(
        ServerConfig {
            addrs: ServerAddrs {
                admin: any,
                stats: any,
                readiness: any,
            },
            limits,
        },
        admin,
        Arc::new(registry),
        &listeners,
        Readiness::new(),
        shutdown.clone(),
    )
    .await
    .expect("loopback ports are free");
    (servers, listeners, shutdown)
}

/// Waits until the server closes `stream` (EOF or reset), discarding what
/// it sends first; panics naming `what` if it does not within 30 s.
pub async fn until_closed(what: &str, stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!("{what}: the server never closed the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}
