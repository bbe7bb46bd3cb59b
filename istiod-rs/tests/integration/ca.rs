//! The embedded CA end to end, on real loopback sockets: istiod-rs's gRPC
//! server over TLS (and plaintext when enabled) with the token-file
//! authenticator, a tonic client over a TLS connector written here, and the
//! certificates parsed and verified as a proxy would.

use crate::support::ca_client as client;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use istiod_rs::auth::token_file::TokenFile;
use istiod_rs::auth::{AuthFuture, Authenticator};
use istiod_rs::ca::impersonation::StaticNodeLookup;
use istiod_rs::ca::rate_limit::CallerRateLimit;
use istiod_rs::ca::root::{self, RootError};
use istiod_rs::ca::service::{CaMetrics, CertificateService, Outcome};
use istiod_rs::ca::{CaConfig, CaError, CertificateAuthority};
use istiod_rs::grpc::{GrpcConfig, GrpcError, GrpcServer};
use prometheus_client::registry::Registry;
use proxy_core::listener::ListenerMetrics;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

const TD: &str = "cluster.local";
const TOKENS: &str = r#"
tokens:
  - {token: client-token, serviceAccount: demo/client}
  - {token: ztunnel-node-1, serviceAccount: istio-system/ztunnel, node: node-1}
  - {token: ztunnel-no-node, serviceAccount: istio-system/ztunnel}
  - {token: agent-node-1, serviceAccount: demo/agent, node: node-1}
  - {token: held, serviceAccount: demo/held}
"#;
/// Nothing here should take long; this only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(30);

struct Istiod {
    ca: Arc<CertificateAuthority>,
    metrics: CaMetrics,
    registry: Registry,
    tls_addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), GrpcError>>,
}

impl Istiod {
    async fn start(dir: &Path, ca: CaConfig, grpc: GrpcConfig) -> Istiod {
        Istiod::start_with(ca, grpc, Arc::new(token_file(dir))).await
    }

    async fn start_with(ca: CaConfig, grpc: GrpcConfig, auth: Arc<dyn Authenticator>) -> Istiod {
        let ca = Arc::new(CertificateAuthority::new(ca).unwrap());
        let nodes = Arc::new(StaticNodeLookup::default());
        nodes.add("demo", "server-1", "server", "node-1");
        nodes.add("demo", "remote-1", "remote", "node-2");
        let mut registry = Registry::default();
        let service = CertificateService::new(ca.clone(), auth, nodes, &mut registry);
        let metrics = service.metrics().clone();
        let routes = tonic::service::Routes::new(service.into_server());
        let server = GrpcServer::bind(grpc, ca.clone(), &ListenerMetrics::default())
            .await
            .unwrap();
        let tls_addr = server.tls_addr();
        let plaintext_addr = server.plaintext_addr();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(server.serve(routes, shutdown.clone()));
        Istiod {
            ca,
            metrics,
            registry,
            tls_addr,
            plaintext_addr,
            shutdown,
            server,
        }
    }

    /// The registry in Prometheus text.
    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("the server stops after shutdown")
            .unwrap()
            .unwrap();
    }

    async fn create(
        &self,
        token: Option<&str>,
        ttl_secs: i64,
        impersonate: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        let key = rcgen::KeyPair::generate().unwrap();
        self.create_with_csr(client::csr_pem(&key), token, ttl_secs, impersonate)
            .await
    }

    async fn create_with_csr(
        &self,
        csr: String,
        token: Option<&str>,
        ttl_secs: i64,
        impersonate: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        let mut client = tokio::time::timeout(
            PATIENCE,
            client::tls_channel(self.tls_addr, &self.ca.roots()),
        )
        .await
        .unwrap()
        .unwrap();
        let request = client::request(csr, token, ttl_secs, impersonate);
        let response = tokio::time::timeout(PATIENCE, client.create_certificate(request))
            .await
            .unwrap()?;
        Ok(response.into_inner().cert_chain)
    }
}

/// The test's tokens, written into `dir` unless a test wrote its own.
fn token_file(dir: &Path) -> TokenFile {
    let tokens = dir.join("tokens.yaml");
    if !tokens.exists() {
        std::fs::write(&tokens, TOKENS).unwrap();
    }
    TokenFile::open(&tokens, TD).unwrap()
}

fn ca_config(dir: &Path) -> CaConfig {
    CaConfig::new(TD, dir.join("state"))
}

fn grpc_config(plaintext: bool) -> GrpcConfig {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    GrpcConfig {
        tls_addr: loopback,
        plaintext_addr: plaintext.then_some(loopback),
        extra_dns_names: vec!["istiod.example.com".into()],
        ..GrpcConfig::default()
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("one PEM certificate")
}

fn parsed<'a>(cert: &'a CertificateDer<'_>) -> x509_parser::certificate::X509Certificate<'a> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .unwrap()
        .1
}

/// Every SAN, as `URI:...` / `DNS:...`.
fn sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let cert = parsed(cert);
    let Some(san) = cert.subject_alternative_name().unwrap() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            other => format!("other:{other:?}"),
        })
        .collect()
}

fn lifetime(cert: &CertificateDer<'_>) -> Duration {
    let cert = parsed(cert);
    let v = cert.validity();
    Duration::from_secs((v.not_after.timestamp() - v.not_before.timestamp()) as u64)
}

/// Verifies a PEM chain (leaf first) against `roots` as a peer would, and
/// that each certificate is followed by its issuer, ending at a root.
fn assert_chains_to(chain: &[String], roots: &[CertificateDer<'static>]) {
    let chain: Vec<_> = chain.iter().map(|p| der(p)).collect();
    assert!(
        roots.contains(chain.last().unwrap()),
        "the chain ends at the root"
    );
    for pair in chain.windows(2) {
        assert_eq!(
            parsed(&pair[0]).issuer().as_raw(),
            parsed(&pair[1]).subject().as_raw(),
            "each certificate is followed by its issuer"
        );
    }
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        store.into(),
        proxy_core::tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .expect("the leaf verifies against the mesh root");
}

#[tokio::test]
async fn a_valid_token_gets_a_certificate_for_exactly_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;

    let chain = istiod.create(Some("client-token"), 0, None).await.unwrap();

    let leaf = der(&chain[0]);
    assert_eq!(
        sans(&leaf),
        ["URI:spiffe://cluster.local/ns/demo/sa/client"],
        "the CSR's SANs are ignored"
    );
    let cert = parsed(&leaf);
    assert!(cert.subject().iter_common_name().next().is_none());
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    assert_eq!(lifetime(&leaf), Duration::from_secs(24 * 3600));
    assert_eq!(chain.len(), 2, "leaf and self-signed root");
    assert_chains_to(&chain, &istiod.ca.roots());
    assert_eq!(istiod.metrics.requests(Outcome::success), 1);
    istiod.stop().await;
}

#[tokio::test]
async fn missing_and_wrong_tokens_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;

    let missing = istiod.create(None, 0, None).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unauthenticated, "{missing:?}");
    assert!(missing.message().contains("no bearer token"), "{missing:?}");
    let wrong = istiod.create(Some("guessed"), 0, None).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");

    assert_eq!(istiod.metrics.requests(Outcome::unauthenticated), 2);
    let text = istiod.metrics_text();
    assert!(
        text.contains("istiod_ca_requests_total{result=\"unauthenticated\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("istiod_ca_signing_duration_seconds"),
        "{text}"
    );
    istiod.stop().await;
}

#[tokio::test]
async fn a_node_agent_gets_certificates_only_for_pods_on_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;
    let server = "spiffe://cluster.local/ns/demo/sa/server";
    let remote = "spiffe://cluster.local/ns/demo/sa/remote";

    // Allowed: a pod running as demo/server is on node-1, ztunnel's node.
    let chain = istiod
        .create(Some("ztunnel-node-1"), 0, Some(server))
        .await
        .unwrap();
    assert_eq!(sans(&der(&chain[0])), [format!("URI:{server}")]);
    assert_chains_to(&chain, &istiod.ca.roots());

    // demo/remote runs only on node-2.
    let denied = istiod
        .create(Some("ztunnel-node-1"), 0, Some(remote))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // The caller is told why, not where demo/remote's pods run.
    assert!(
        denied
            .message()
            .contains("impersonation is allowed only for identities with a pod on your node"),
        "{denied:?}"
    );
    assert!(denied.message().contains(remote), "{denied:?}");
    assert!(
        !denied.message().contains("node-2") && !denied.message().contains("node-1"),
        "the refusal does not reveal where pods run: {denied:?}"
    );

    // A token that names no node cannot impersonate anyone.
    let no_node = istiod
        .create(Some("ztunnel-no-node"), 0, Some(server))
        .await
        .unwrap_err();
    assert_eq!(no_node.code(), tonic::Code::PermissionDenied);
    assert!(
        no_node
            .message()
            .contains("your token names neither your pod nor your node"),
        "{no_node:?}"
    );

    // Only trusted node agents may impersonate, even on the right node.
    let untrusted = istiod
        .create(Some("agent-node-1"), 0, Some(server))
        .await
        .unwrap_err();
    assert_eq!(untrusted.code(), tonic::Code::PermissionDenied);
    assert!(
        untrusted.message().contains("only trusted node agents")
            && untrusted.message().contains("demo/sa/agent"),
        "{untrusted:?}"
    );
    let client = istiod
        .create(Some("client-token"), 0, Some(server))
        .await
        .unwrap_err();
    assert_eq!(client.code(), tonic::Code::PermissionDenied);

    // Asking for one's own identity is not impersonation.
    let own = istiod
        .create(
            Some("client-token"),
            0,
            Some("spiffe://cluster.local/ns/demo/sa/client"),
        )
        .await
        .unwrap();
    assert_eq!(
        sans(&der(&own[0])),
        ["URI:spiffe://cluster.local/ns/demo/sa/client"]
    );

    // Another trust domain, or not a SPIFFE id at all.
    let foreign = istiod
        .create(
            Some("ztunnel-node-1"),
            0,
            Some("spiffe://other.domain/ns/demo/sa/server"),
        )
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::PermissionDenied);
    let garbage = istiod
        .create(Some("ztunnel-node-1"), 0, Some("demo/server"))
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");
    assert!(garbage.message().contains("ImpersonatedIdentity"));

    assert_eq!(istiod.metrics.requests(Outcome::permission_denied), 5);
    assert_eq!(istiod.metrics.requests(Outcome::success), 2);
    istiod.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut request = client::request(client::csr_pem(&key), None, 0, None);
        request.metadata_mut().insert(
            "authorization",
            format!("{scheme}  client-token").parse().unwrap(),
        );
        let mut channel = client::tls_channel(istiod.tls_addr, &istiod.ca.roots())
            .await
            .unwrap();
        let chain = tokio::time::timeout(PATIENCE, channel.create_certificate(request))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{scheme}: {e:?}"))
            .into_inner()
            .cert_chain;
        assert_eq!(
            sans(&der(&chain[0])),
            ["URI:spiffe://cluster.local/ns/demo/sa/client"]
        );
    }
    istiod.stop().await;
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_is_refused_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = ca_config(dir.path());
    // Three at once, then one every 1000 s: the fourth request is refused.
    ca.rate_limit = CallerRateLimit {
        per_second: 0.001,
        burst: 3,
    };
    let istiod = Istiod::start(dir.path(), ca, grpc_config(false)).await;
    for _ in 0..3 {
        istiod.create(Some("client-token"), 0, None).await.unwrap();
    }
    for _ in 0..5 {
        let limited = istiod
            .create(Some("client-token"), 0, None)
            .await
            .unwrap_err();
        assert_eq!(
            limited.code(),
            tonic::Code::ResourceExhausted,
            "{limited:?}"
        );
        assert!(
            limited
                .message()
                .contains("spiffe://cluster.local/ns/demo/sa/client")
                && limited.message().contains("retry in"),
            "{limited:?}"
        );
    }
    assert_eq!(istiod.metrics.requests(Outcome::resource_exhausted), 5);

    // Another caller has its own budget, as has the same service account
    // on another node.
    istiod
        .create(
            Some("ztunnel-node-1"),
            0,
            Some("spiffe://cluster.local/ns/demo/sa/server"),
        )
        .await
        .unwrap();
    istiod.create(Some("agent-node-1"), 0, None).await.unwrap();
    assert_eq!(istiod.metrics.requests(Outcome::success), 5);
    let text = istiod.metrics_text();
    assert!(
        text.contains(r#"istiod_ca_requests_total{result="resource_exhausted"} 5"#),
        "{text}"
    );
    istiod.stop().await;
}

/// The token file, except that the `held` token's checks wait until the
/// gate opens, as TokenReviews wait on a slow API server.
struct Gated {
    tokens: TokenFile,
    open: tokio::sync::watch::Receiver<bool>,
    waiting: tokio::sync::watch::Sender<usize>,
}

impl Authenticator for Gated {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            if token == "held" {
                self.waiting.send_modify(|n| *n += 1);
                let mut open = self.open.clone();
                open.wait_for(|open| *open).await.unwrap();
            }
            self.tokens.authenticate(token).await
        })
    }
}

#[tokio::test]
async fn requests_past_the_global_bound_are_refused_until_some_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = ca_config(dir.path());
    ca.max_requests_in_progress = 3;
    let (open, gate) = tokio::sync::watch::channel(false);
    let (waiting, mut held) = tokio::sync::watch::channel(0);
    let auth = Gated {
        tokens: token_file(dir.path()),
        open: gate,
        waiting,
    };
    let istiod = Arc::new(Istiod::start_with(ca, grpc_config(false), Arc::new(auth)).await);

    // Three requests whose token checks hang hold every place.
    let stuck: Vec<_> = (0..3)
        .map(|_| {
            let istiod = istiod.clone();
            tokio::spawn(async move { istiod.create(Some("held"), 0, None).await })
        })
        .collect();
    tokio::time::timeout(PATIENCE, held.wait_for(|n| *n == 3))
        .await
        .expect("three requests reach authentication")
        .unwrap();
    assert_eq!(istiod.metrics.requests_in_progress(), 3);

    // A caller well within its own budget is refused at once, saying why.
    for _ in 0..5 {
        let busy = istiod
            .create(Some("client-token"), 0, None)
            .await
            .unwrap_err();
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted, "{busy:?}");
        assert!(
            busy.message().contains("3 certificate requests") && busy.message().contains("retry"),
            "{busy:?}"
        );
    }
    assert_eq!(istiod.metrics.requests(Outcome::resource_exhausted), 5);
    assert_eq!(istiod.metrics.requests(Outcome::success), 0);

    // Once the held ones finish, everyone is served again.
    open.send(true).unwrap();
    for request in stuck {
        request.await.unwrap().expect("the held request is signed");
    }
    assert_eq!(istiod.metrics.requests_in_progress(), 0);
    istiod.create(Some("client-token"), 0, None).await.unwrap();
    assert_eq!(istiod.metrics.requests(Outcome::success), 4);
    let text = istiod.metrics_text();
    assert!(
        text.contains("istiod_ca_requests_in_progress 0")
            && text.contains(r#"istiod_ca_requests_total{result="resource_exhausted"} 5"#),
        "{text}"
    );
    Arc::into_inner(istiod)
        .expect("every request finished")
        .stop()
        .await;
}

#[tokio::test]
async fn a_bad_csr_is_an_invalid_argument_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;

    let not_pem = istiod
        .create_with_csr("hello".into(), Some("client-token"), 0, None)
        .await
        .unwrap_err();
    assert_eq!(not_pem.code(), tonic::Code::InvalidArgument);
    assert!(not_pem.message().contains("not PEM"), "{not_pem:?}");

    // A CSR whose signature does not match its key: flip a bit of the signature.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(
        client::csr_pem(&key).as_bytes(),
    )
    .unwrap();
    let mut bytes = csr.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = istiod_rs::ca::pem_encode("CERTIFICATE REQUEST", &bytes);
    let bad_sig = istiod
        .create_with_csr(tampered, Some("client-token"), 0, None)
        .await
        .unwrap_err();
    assert_eq!(bad_sig.code(), tonic::Code::InvalidArgument);
    assert!(bad_sig.message().contains("signature"), "{bad_sig:?}");

    // Authentication comes first: a bad CSR without a token is unauthenticated.
    let anonymous = istiod
        .create_with_csr("hello".into(), None, 0, None)
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);

    assert_eq!(istiod.metrics.requests(Outcome::invalid_argument), 2);
    istiod.stop().await;
}

#[tokio::test]
async fn the_requested_lifetime_is_honoured_up_to_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ca_config(dir.path());
    config.max_cert_ttl = Duration::from_secs(2 * 3600);
    config.default_cert_ttl = Duration::from_secs(3600);
    let istiod = Istiod::start(dir.path(), config, grpc_config(false)).await;

    let short = istiod
        .create(Some("client-token"), 600, None)
        .await
        .unwrap();
    assert_eq!(lifetime(&der(&short[0])), Duration::from_secs(600));
    let long = istiod
        .create(Some("client-token"), 365 * 24 * 3600, None)
        .await
        .unwrap();
    assert_eq!(lifetime(&der(&long[0])), Duration::from_secs(2 * 3600));
    let default = istiod.create(Some("client-token"), 0, None).await.unwrap();
    assert_eq!(lifetime(&der(&default[0])), Duration::from_secs(3600));
    let negative = istiod.create(Some("client-token"), -5, None).await.unwrap();
    assert_eq!(lifetime(&der(&negative[0])), Duration::from_secs(3600));
    istiod.stop().await;
}

#[tokio::test]
async fn the_self_signed_root_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;
    let before = first.create(Some("client-token"), 0, None).await.unwrap();
    first.stop().await;

    let key = dir.path().join("state").join(root::ROOT_KEY);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the root key is private");

    let second = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;
    let after = second.create(Some("client-token"), 0, None).await.unwrap();
    assert_eq!(before.last(), after.last(), "same root after the restart");
    // What the first run issued still verifies after the restart.
    assert_chains_to(&before, &second.ca.roots());
    assert!(matches!(
        second.ca.source(),
        root::RootSource::SelfSigned { created: false, .. }
    ));
    second.stop().await;
}

#[test]
fn a_root_certificate_without_its_key_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    CertificateAuthority::new(ca_config(dir.path())).unwrap();
    std::fs::remove_file(state.join(root::ROOT_KEY)).unwrap();
    let err = CertificateAuthority::new(ca_config(dir.path())).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(root::ROOT_KEY) && text.contains("missing"),
        "{text}"
    );
    assert!(state.join(root::ROOT_CERT).exists(), "the old root is kept");
}

/// A root and an intermediate CA signed by it, for plug-in directories.
struct Hierarchy {
    root: rcgen::Certificate,
    intermediate: rcgen::Certificate,
    intermediate_key: rcgen::KeyPair,
}

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    params
}

fn hierarchy() -> Hierarchy {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_params = ca_params("plug-in root");
    let root = root_params.self_signed(&root_key).unwrap();
    let intermediate_key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let intermediate = ca_params("plug-in intermediate")
        .signed_by(&intermediate_key, &issuer)
        .unwrap();
    Hierarchy {
        root,
        intermediate,
        intermediate_key,
    }
}

/// The files of a plug-in CA directory.
struct PlugIn {
    ca_cert: String,
    ca_key: String,
    cert_chain: Option<String>,
    root_cert: String,
}

impl PlugIn {
    fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(root::CA_CERT), &self.ca_cert).unwrap();
        std::fs::write(dir.join(root::CA_KEY), &self.ca_key).unwrap();
        if let Some(chain) = &self.cert_chain {
            std::fs::write(dir.join(root::CERT_CHAIN), chain).unwrap();
        }
        std::fs::write(dir.join(root::ROOT_CERT), &self.root_cert).unwrap();
    }
}

impl Hierarchy {
    /// The intermediate signs; cert-chain.pem is `cert_chain`.
    fn plug_in(&self, cert_chain: Option<String>) -> PlugIn {
        PlugIn {
            ca_cert: self.intermediate.pem(),
            ca_key: self.intermediate_key.serialize_pem(),
            cert_chain,
            root_cert: self.root.pem(),
        }
    }
}

#[tokio::test]
async fn a_plug_in_chain_comes_back_leaf_first() {
    let dir = tempfile::tempdir().unwrap();
    let h = hierarchy();
    let plugin = dir.path().join("cacerts");
    // cert-chain.pem repeats the signing certificate, as upstream's does.
    h.plug_in(Some(format!("{}{}", h.intermediate.pem(), h.root.pem())))
        .write(&plugin);
    let mut config = ca_config(dir.path());
    config.plugin_dir = Some(plugin);
    let istiod = Istiod::start(dir.path(), config, grpc_config(false)).await;

    let chain = istiod.create(Some("client-token"), 0, None).await.unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root; no duplicates");
    assert_eq!(
        sans(&der(&chain[0])),
        ["URI:spiffe://cluster.local/ns/demo/sa/client"]
    );
    assert_eq!(der(&chain[1]), *h.intermediate.der());
    assert_eq!(der(&chain[2]), *h.root.der());
    assert_eq!(istiod.ca.roots(), [h.root.der().clone()]);
    assert_chains_to(&chain, &istiod.ca.roots());
    assert!(
        !dir.path().join("state").exists(),
        "no self-signed root is created in plug-in mode"
    );
    istiod.stop().await;
}

#[test]
fn a_plug_in_chain_without_cert_chain_pem_still_ends_at_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let h = hierarchy();
    h.plug_in(None).write(dir.path());
    let mut config = ca_config(dir.path());
    config.plugin_dir = Some(dir.path().to_path_buf());
    let ca = CertificateAuthority::new(config).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let id = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
    let chain = ca.sign_csr(&client::csr_pem(&key), &id, None).unwrap();
    assert_eq!(chain.len(), 3);
    assert_chains_to(&chain, &ca.roots());
}

/// What `istioctl-rs install` puts in Secret `cacerts`: one self-signed
/// root (proxy-core's, istiod-rs's own kind) as both the signing CA and
/// the root, no cert-chain.pem.
#[test]
fn a_self_signed_root_as_its_own_plug_in_ca_signs() {
    let dir = tempfile::tempdir().unwrap();
    let root = proxy_core::identity::root::self_signed_root(
        "cluster.local",
        Duration::from_secs(3600),
        Duration::from_secs(86400),
    )
    .unwrap();
    PlugIn {
        ca_cert: root.cert_pem.clone(),
        ca_key: root.key_pem.clone(),
        cert_chain: None,
        root_cert: root.cert_pem.clone(),
    }
    .write(dir.path());
    let mut config = ca_config(dir.path());
    config.plugin_dir = Some(dir.path().to_path_buf());
    let ca = CertificateAuthority::new(config).unwrap();
    assert_eq!(ca.roots().len(), 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let id = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
    let chain = ca.sign_csr(&client::csr_pem(&key), &id, None).unwrap();
    assert_eq!(chain.len(), 2, "leaf, root");
    assert_chains_to(&chain, &ca.roots());
}

#[test]
fn plug_in_errors_name_the_file_to_fix() {
    let h = hierarchy();
    let other = hierarchy();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let not_a_ca = rcgen::CertificateParams::new(vec!["leaf.example".to_string()])
        .unwrap()
        .signed_by(
            &leaf_key,
            &rcgen::Issuer::from_ca_cert_der(h.intermediate.der(), &h.intermediate_key).unwrap(),
        )
        .unwrap();
    let chain = format!("{}{}", h.intermediate.pem(), h.root.pem());
    let cases = [
        (
            "key of another CA",
            PlugIn {
                ca_key: other.intermediate_key.serialize_pem(),
                ..h.plug_in(Some(chain.clone()))
            },
            "ca-key.pem: does not belong to the certificate",
        ),
        (
            "signing certificate is not a CA",
            PlugIn {
                ca_cert: not_a_ca.pem(),
                ca_key: leaf_key.serialize_pem(),
                ..h.plug_in(Some(chain.clone()))
            },
            "ca-cert.pem: the certificate for \"CN=rcgen self signed cert\" is not a CA certificate",
        ),
        (
            "chain leads to another root",
            PlugIn {
                root_cert: other.root.pem(),
                ..h.plug_in(Some(h.intermediate.pem()))
            },
            "cert-chain.pem: the chain does not end at root-cert.pem",
        ),
        (
            "no cert-chain.pem and another root",
            PlugIn {
                root_cert: other.root.pem(),
                ..h.plug_in(None)
            },
            "ca-cert.pem: the chain does not end at root-cert.pem",
        ),
        (
            "cert-chain.pem goes on after the root",
            h.plug_in(Some(format!("{chain}{}", other.root.pem()))),
            "cert-chain.pem: continues after the root",
        ),
        (
            "key file is not a key",
            PlugIn {
                ca_key: "-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n".into(),
                ..h.plug_in(None)
            },
            "ca-key.pem: is not a usable private key",
        ),
        (
            "root file is not PEM",
            PlugIn {
                root_cert: "not a certificate".into(),
                ..h.plug_in(None)
            },
            "root-cert.pem: holds no `BEGIN CERTIFICATE` block",
        ),
    ];
    for (what, files, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        files.write(dir.path());
        let mut config = ca_config(dir.path());
        config.plugin_dir = Some(dir.path().to_path_buf());
        let err = CertificateAuthority::new(config).unwrap_err();
        assert!(
            matches!(err, CaError::Root(RootError::Invalid { .. })),
            "{what}: {err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(want), "{what}: {text:?} should say {want:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = ca_config(dir.path());
    config.plugin_dir = Some(dir.path().join("missing"));
    let text = CertificateAuthority::new(config).unwrap_err().to_string();
    assert!(
        text.contains("could not read") && text.contains("missing/ca-cert.pem"),
        "{text}"
    );
}

#[tokio::test]
async fn the_tls_listener_presents_istiods_identity_chained_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;

    // A client that gives up mid-handshake, and one that speaks no TLS at
    // all, do not disturb the listener.
    let mut junk = tokio::net::TcpStream::connect(istiod.tls_addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut junk, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    drop(junk);
    drop(
        tokio::net::TcpStream::connect(istiod.tls_addr)
            .await
            .unwrap(),
    );

    let tcp = tokio::net::TcpStream::connect(istiod.tls_addr)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(client::client_tls(&istiod.ca.roots()));
    let name = rustls::pki_types::ServerName::try_from(client::ISTIOD_NAME).unwrap();
    let tls = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .unwrap()
        .expect("the serving certificate verifies for istiod.istio-system.svc");
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    let presented = session.peer_certificates().unwrap().to_vec();
    // An open connection that never speaks HTTP/2 would hold up the
    // graceful shutdown until the drain timeout.
    drop(tls);
    assert_eq!(
        sans(&presented[0]),
        [
            "URI:spiffe://cluster.local/ns/istio-system/sa/istiod",
            "DNS:istiod.istio-system.svc",
            "DNS:istiod.istio-system.svc.cluster.local",
            "DNS:istiod.example.com",
        ]
    );
    let not_after = parsed(&presented[0]).validity().not_after.timestamp();
    let in_a_day = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 24 * 3600;
    assert!(
        (not_after - in_a_day).abs() < 120,
        "24 h serving certificate"
    );

    // A name the certificate does not carry is refused by the client.
    let tcp = tokio::net::TcpStream::connect(istiod.tls_addr)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(client::client_tls(&istiod.ca.roots()));
    let wrong = rustls::pki_types::ServerName::try_from("istiod.elsewhere.svc").unwrap();
    assert!(connector.connect(wrong, tcp).await.is_err());

    // And the server still serves after all that.
    istiod.create(Some("client-token"), 0, None).await.unwrap();
    istiod.stop().await;
}

#[tokio::test]
async fn plaintext_is_served_only_when_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let tls_only = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(false)).await;
    assert_eq!(tls_only.plaintext_addr, None);
    // Plaintext HTTP/2 to the TLS port gets nowhere.
    let refused = async {
        let mut client = client::plaintext_channel(tls_only.tls_addr).await?;
        let key = rcgen::KeyPair::generate().unwrap();
        let request = client::request(client::csr_pem(&key), Some("client-token"), 0, None);
        client
            .create_certificate(request)
            .await
            .map_err(|e| e.into())
            .map(|_| ())
    };
    let outcome: Result<(), Box<dyn std::error::Error>> =
        tokio::time::timeout(PATIENCE, refused).await.unwrap();
    assert!(
        outcome.is_err(),
        "plaintext must not be served on the TLS port"
    );
    tls_only.stop().await;

    let both = Istiod::start(dir.path(), ca_config(dir.path()), grpc_config(true)).await;
    let addr = both
        .plaintext_addr
        .expect("plaintext listener when enabled");
    let mut client = client::plaintext_channel(addr).await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let response = client
        .create_certificate(client::request(
            client::csr_pem(&key),
            Some("client-token"),
            0,
            None,
        ))
        .await
        .unwrap();
    assert_chains_to(&response.into_inner().cert_chain, &both.ca.roots());
    // TLS keeps working alongside.
    both.create(Some("client-token"), 0, None).await.unwrap();
    both.stop().await;
}

/// Every certificate of the last element of a response (the trust bundle).
fn bundle(chain: &[String]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(chain.last().unwrap().as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn sign_for_client(ca: &CertificateAuthority) -> Vec<String> {
    let key = rcgen::KeyPair::generate().unwrap();
    let id = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
    ca.sign_csr(&client::csr_pem(&key), &id, None).unwrap()
}

/// Whether the chain's leaf verifies under `roots` alone (its own root
/// left out), as a proxy holding only those roots checks a peer.
fn leaf_verifies_under(chain: &[String], roots: &[CertificateDer<'static>]) -> bool {
    let leaf = der(&chain[0]);
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        store.into(),
        proxy_core::tls::provider(),
    )
    .build()
    .unwrap()
    .verify_client_cert(&leaf, &[], UnixTime::now())
    .is_ok()
}

#[test]
fn a_self_signed_root_is_renewed_with_its_key_once_its_grace_period_begins() {
    use istiod_rs::ca::Reload;
    let dir = tempfile::tempdir().unwrap();
    // A root of 1000 s (valid from an hour back: 4600 s in all, so 20% is
    // 920 s); renewals get 100,000 s.
    let mut short = ca_config(dir.path());
    short.root_cert_ttl = Duration::from_secs(1000);
    drop(CertificateAuthority::new(short).unwrap());
    let mut config = ca_config(dir.path());
    config.root_cert_ttl = Duration::from_secs(100_000);
    let ca = CertificateAuthority::new(config.clone()).unwrap();
    let old_root = ca.roots()[0].clone();
    let old_until = ca.root_not_after();
    let before = sign_for_client(&ca);
    let mut roots = ca.watch_roots_pem();
    roots.mark_unchanged();

    // 1000 s of 4600 left: not yet.
    let now = SystemTime::now();
    assert!(matches!(ca.renew_root_if_due(now), Ok(Reload::Unchanged)));
    assert!(!roots.has_changed().unwrap());
    // 900 s left: renewed.
    let later = now + Duration::from_secs(100);
    assert!(matches!(ca.renew_root_if_due(later), Ok(Reload::Swapped)));
    assert!(
        roots.has_changed().unwrap(),
        "the roots' followers are told"
    );
    let new_root = ca.roots()[0].clone();
    assert_ne!(new_root, old_root);
    assert_eq!(ca.roots().len(), 1);
    assert!(ca.root_not_after() > old_until + Duration::from_secs(90_000));
    assert_eq!(
        parsed(&new_root).public_key().raw,
        parsed(&old_root).public_key().raw,
        "the same key"
    );
    assert_eq!(
        parsed(&new_root).subject().as_raw(),
        parsed(&old_root).subject().as_raw()
    );
    // Proxies holding either root verify what either issued.
    let after = sign_for_client(&ca);
    assert_eq!(der(after.last().unwrap()), new_root);
    assert!(leaf_verifies_under(
        &before,
        std::slice::from_ref(&new_root)
    ));
    assert!(leaf_verifies_under(&after, std::slice::from_ref(&old_root)));
    assert!(!leaf_verifies_under(
        &after,
        &proxy_core::testing::TestCa::new(TD).roots()
    ));
    // Kept: a restart signs under the renewed root, which is not due again.
    let restarted = CertificateAuthority::new(config).unwrap();
    assert_eq!(restarted.roots(), vec![new_root]);
    assert!(matches!(
        restarted.renew_root_if_due(later),
        Ok(Reload::Unchanged)
    ));
}

#[test]
fn a_rotated_plug_in_ca_is_swapped_in_only_when_complete_and_valid() {
    use istiod_rs::ca::Reload;
    use istiod_rs::ca::reload::{PluginWatcher, ReloadMetrics, ReloadResult};

    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    let (a, b) = (hierarchy(), hierarchy());
    a.plug_in(None).write(&plugin);
    let mut config = ca_config(dir.path());
    config.plugin_dir = Some(plugin.clone());
    let ca = Arc::new(CertificateAuthority::new(config).unwrap());
    let metrics = ReloadMetrics::default();
    let mut watcher = PluginWatcher::new(ca.clone(), metrics.clone()).unwrap();
    assert!(matches!(watcher.check(), Some(Ok(Reload::Unchanged))));
    assert!(watcher.check().is_none(), "nothing changed since");

    // Half-written: B's certificate beside A's key. A keeps signing.
    std::fs::write(plugin.join(root::CA_CERT), b.intermediate.pem()).unwrap();
    let err = watcher.check().unwrap().unwrap_err().to_string();
    assert!(err.contains(root::CA_KEY), "names the file: {err}");
    assert_eq!(metrics.count(ReloadResult::failed), 1);
    let chain = sign_for_client(&ca);
    assert_eq!(der(&chain[1]), *a.intermediate.der(), "still signed by A");
    assert_chains_to(&chain, &[a.root.der().clone()]);

    // B's intermediate with A's root only: B does not chain to it.
    std::fs::write(
        plugin.join(root::CA_KEY),
        b.intermediate_key.serialize_pem(),
    )
    .unwrap();
    let err = watcher.check().unwrap().unwrap_err().to_string();
    assert!(err.contains(root::CA_CERT), "names the file: {err}");
    assert_eq!(metrics.count(ReloadResult::failed), 2);
    assert_eq!(ca.roots(), [a.root.der().clone()]);

    // Complete: intermediate B, roots A+B. B signs, both roots are sent.
    std::fs::write(
        plugin.join(root::ROOT_CERT),
        format!("{}{}", a.root.pem(), b.root.pem()),
    )
    .unwrap();
    assert!(matches!(watcher.check(), Some(Ok(Reload::Swapped))));
    assert_eq!(metrics.count(ReloadResult::swapped), 1);
    let chain = sign_for_client(&ca);
    assert_eq!(chain.len(), 3, "leaf, intermediate, trust bundle");
    assert_eq!(der(&chain[1]), *b.intermediate.der());
    assert_eq!(bundle(&chain), [b.root.der().clone(), a.root.der().clone()]);
    assert_chains_to(&chain, &ca.roots());
    assert_eq!(ca.roots_pem(), chain[2]);

    // A root change with no overlap is refused: the proxies on A would
    // lose every peer at once.
    let c = hierarchy();
    c.plug_in(None).write(&plugin);
    let err = watcher.check().unwrap().unwrap_err().to_string();
    assert!(err.contains(root::ROOT_CERT), "names the file: {err}");
    assert!(err.contains("overlap"), "{err}");
    assert_eq!(ca.roots().len(), 2, "A and B still");

    // The old root removed: B only.
    b.plug_in(None).write(&plugin);
    assert!(matches!(watcher.check(), Some(Ok(Reload::Swapped))));
    let chain = sign_for_client(&ca);
    assert_eq!(bundle(&chain), [b.root.der().clone()]);
    assert_chains_to(&chain, &[b.root.der().clone()]);
    assert_eq!(metrics.count(ReloadResult::failed), 3);
    assert_eq!(metrics.count(ReloadResult::swapped), 2);
}

#[tokio::test]
async fn istiods_serving_certificate_follows_a_reloaded_ca() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    let (a, b) = (hierarchy(), hierarchy());
    a.plug_in(None).write(&plugin);
    let mut config = ca_config(dir.path());
    config.plugin_dir = Some(plugin.clone());
    let istiod = Istiod::start(dir.path(), config, grpc_config(false)).await;
    PlugIn {
        root_cert: format!("{}{}", a.root.pem(), b.root.pem()),
        ..b.plug_in(None)
    }
    .write(&plugin);
    assert_eq!(istiod.ca.reload().unwrap(), istiod_rs::ca::Reload::Swapped);
    // The serving certificate is re-issued in the background: a client
    // that trusts only B gets through once it is.
    let only_b = [b.root.der().clone()];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let connected = client::tls_channel(istiod.tls_addr, &only_b).await;
        if connected.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "istiod still serves a certificate from A: {connected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chain = istiod.create(Some("client-token"), 0, None).await.unwrap();
    assert_eq!(bundle(&chain).len(), 2);
    istiod.stop().await;
}
