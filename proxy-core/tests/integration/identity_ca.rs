//! The CA client and the control-plane channel over real gRPC on loopback:
//! TLS verified as `istiod.istio-system.svc`, the bearer token re-read per
//! request, impersonation metadata, plaintext. The server here stands in
//! for istiod's CA (built on another branch) with the same wire contract.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use api::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use api::ca::{IstioCertificateRequest, IstioCertificateResponse};
use proxy_core::identity::{
    CaClient, CertificateManager, ControlPlane, LearnedRoots, ManagerConfig,
};
use proxy_core::testing::TestCa;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// What the stand-in CA saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    token: String,
    impersonated: Option<String>,
    validity: i64,
}

struct StandInCa {
    ca: Arc<TestCa>,
    accepted_token: Mutex<String>,
    seen: Mutex<Vec<Seen>>,
}

struct Service(Arc<StandInCa>);

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| tonic::Status::unauthenticated("no bearer token"))?
            .to_string();
        let this = &self.0;
        if token != *this.accepted_token.lock().unwrap() {
            return Err(tonic::Status::unauthenticated("unknown token"));
        }
        let request = request.into_inner();
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        this.seen.lock().unwrap().push(Seen {
            token,
            impersonated: impersonated.clone(),
            validity: request.validity_duration,
        });
        // The caller's own identity unless it impersonates (no node check
        // here: that is the real CA's business).
        let identity = match impersonated {
            Some(id) => id
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("bad identity"))?,
            None => this.ca.identity("istio-system", "ztunnel"),
        };
        let validity = Duration::from_secs(request.validity_duration.try_into().unwrap_or(3600));
        let cert_chain = this.ca.sign_csr(&request.csr, &identity, validity)?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain,
        }))
    }
}

/// tonic needs `Connected` on what it serves; a TLS stream is just passed through.
struct Tls(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Tls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The stand-in CA on loopback and a token file holding the token it accepts.
struct Fixture {
    ca: Arc<TestCa>,
    address: SocketAddr,
    state: Arc<StandInCa>,
    token: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Serves over TLS as istiod (15012) or in plaintext (15010).
    async fn start(tls: bool) -> Self {
        let ca = Arc::new(TestCa::new("cluster.local"));
        let state = Arc::new(StandInCa {
            ca: ca.clone(),
            accepted_token: Mutex::new("token-1".into()),
            seen: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let service = IstioCertificateServiceServer::new(Service(state.clone()));
        let server = tonic::transport::Server::builder().add_service(service);
        if tls {
            let config = ca.server_tls_config(&["istiod.istio-system.svc"]);
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // Failed handshakes (the negative tests) are skipped, not fatal.
            let incoming =
                futures::stream::unfold((listener, acceptor), |(listener, acceptor)| async move {
                    loop {
                        let (tcp, _) = listener.accept().await.ok()?;
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            return Some((Ok::<_, io::Error>(Tls(tls)), (listener, acceptor)));
                        }
                    }
                });
            tokio::spawn(server.serve_with_incoming(incoming));
        } else {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(server.serve_with_incoming(incoming));
        }
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("istio-token");
        std::fs::write(&token, "token-1\n").unwrap();
        Fixture {
            ca,
            address,
            state,
            token,
            _dir: dir,
        }
    }

    /// Dialled by IP, verified as istiod.istio-system.svc.
    fn tls(&self) -> ControlPlane {
        ControlPlane::tls(self.address.to_string(), self.ca.roots()).with_token_path(&self.token)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn manager(&self, control_plane: &ControlPlane) -> CertificateManager {
        let client = CaClient::new(control_plane)
            .unwrap()
            .with_timeout(Duration::from_secs(20));
        CertificateManager::new(
            Arc::new(client),
            ManagerConfig {
                impersonate: true,
                validity: Duration::from_secs(3600),
                ..ManagerConfig::default()
            },
        )
    }

    async fn fetch_error(&self, control_plane: ControlPlane) -> String {
        let id = self.ca.identity("default", "web");
        let manager = self.manager(&control_plane);
        tokio::time::timeout(Duration::from_secs(60), manager.fetch(&id))
            .await
            .expect("fetch hangs")
            .unwrap_err()
            .to_string()
    }
}

#[tokio::test]
async fn issues_over_tls_with_a_rotating_bearer_token() {
    let fixture = Fixture::start(true).await;
    let manager = fixture.manager(&fixture.tls());

    let reviews = fixture.ca.identity("bookinfo", "reviews");
    let cert = manager.fetch(&reviews).await.unwrap();
    assert_eq!(cert.identity(), &reviews);

    // kubelet rotates the token; the next request carries the new one.
    std::fs::write(&fixture.token, "token-2").unwrap();
    *fixture.state.accepted_token.lock().unwrap() = "token-2".into();
    let ratings = fixture.ca.identity("bookinfo", "ratings");
    manager.fetch(&ratings).await.unwrap();

    let seen = fixture.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].token, "token-1");
    assert_eq!(seen[0].impersonated, Some(reviews.to_string()));
    assert_eq!(seen[0].validity, 3600);
    assert_eq!(seen[1].token, "token-2");
    assert_eq!(seen[1].impersonated, Some(ratings.to_string()));
}

#[tokio::test]
async fn issues_over_plaintext() {
    let fixture = Fixture::start(false).await;
    let control_plane =
        ControlPlane::plaintext(fixture.address.to_string()).with_token_path(&fixture.token);

    let id = fixture.ca.identity("default", "web");
    fixture.manager(&control_plane).fetch(&id).await.unwrap();
    assert_eq!(fixture.seen().len(), 1);
}

#[tokio::test]
async fn refuses_a_control_plane_it_cannot_verify() {
    let fixture = Fixture::start(true).await;

    let wrong_name = fixture.tls().with_server_name("not-istiod.example");
    let err = fixture.fetch_error(wrong_name).await;
    assert!(
        err.contains("Unavailable") && err.contains("not-istiod.example"),
        "{err}"
    );

    let mut untrusted = fixture.tls();
    untrusted.roots = Some(TestCa::new("cluster.local").roots());
    let err = fixture.fetch_error(untrusted).await;
    assert!(
        err.contains("Unavailable") && err.contains("invalid peer certificate"),
        "{err}"
    );

    assert!(fixture.seen().is_empty(), "no request reached the CA");
}

/// During a root rotation istiod's serving certificate may move to a root
/// the proxy was not started with. It trusts, for each new connection, the
/// root file as it is now and the roots the CA sent with its last
/// certificate (`LearnedRoots`), which the certificate manager stores.
#[tokio::test]
async fn the_control_plane_is_trusted_by_the_root_file_as_it_is_now_and_the_learned_roots() {
    let fixture = Fixture::start(true).await;
    let unrelated = TestCa::new("cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, unrelated.root_pem()).unwrap();
    let learned = LearnedRoots::default();
    let control_plane = ControlPlane::tls(fixture.address.to_string(), unrelated.roots())
        .with_token_path(&fixture.token)
        .with_root_file(&root_file)
        .with_learned_roots(learned.clone());

    // Neither the file nor anything learned trusts istiod's root.
    let err = fixture.fetch_error(control_plane.clone()).await;
    assert!(err.contains("invalid peer certificate"), "{err}");

    // The file is rewritten (a ConfigMap update): the next connection trusts it.
    std::fs::write(&root_file, fixture.ca.root_pem()).unwrap();
    let id = fixture.ca.identity("default", "web");
    fixture.manager(&control_plane).fetch(&id).await.unwrap();

    // The file goes back to the unrelated root; what the CA sent is learned.
    std::fs::write(&root_file, unrelated.root_pem()).unwrap();
    assert!(
        fixture
            .fetch_error(control_plane.clone())
            .await
            .contains("invalid peer certificate")
    );
    let storing = CertificateManager::new(
        Arc::new(CaClient::new(&fixture.tls()).unwrap()),
        ManagerConfig {
            impersonate: true,
            learned_roots: Some(learned.clone()),
            ..ManagerConfig::default()
        },
    );
    storing.fetch(&id).await.unwrap();
    assert_eq!(
        *learned.load(),
        fixture.ca.roots(),
        "the CA's roots are learned"
    );
    fixture.manager(&control_plane).fetch(&id).await.unwrap();
}

#[tokio::test]
async fn a_missing_or_refused_token_is_a_clear_error() {
    let fixture = Fixture::start(true).await;

    std::fs::remove_file(&fixture.token).unwrap();
    let err = fixture.fetch_error(fixture.tls()).await;
    assert!(
        err.contains("cannot read the bearer token file") && err.contains("istio-token"),
        "{err}"
    );

    std::fs::write(&fixture.token, "stale").unwrap();
    let err = fixture.fetch_error(fixture.tls()).await;
    assert!(
        err.contains("Unauthenticated") && err.contains("unknown token"),
        "{err}"
    );
}
