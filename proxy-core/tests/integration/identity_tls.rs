//! Mutual TLS between workload identities on loopback: the HBONE client and
//! server configs, the SPIFFE verifier, and the certificate manager feeding
//! them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use proxy_core::identity::{ManagerConfig, WorkloadCertificate};
use proxy_core::testing::{TestCa, TestSigner};
use proxy_core::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(30);

struct Outcome {
    /// The client's view: Ok(server identity) or the handshake error.
    client: Result<SpiffeId, String>,
    /// The server's view: Ok(client identity) or the handshake error.
    server: Result<SpiffeId, String>,
}

/// One TLS handshake (plus a byte each way when it succeeds) between a
/// client presenting `client` and expecting `expected`, and a server
/// presenting `server`.
async fn handshake(
    client: &WorkloadCertificate,
    expected: &SpiffeId,
    server: &WorkloadCertificate,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::hbone_server_config(server).unwrap());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls::peer_identity(stream.get_ref().1).ok_or("no peer identity")?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(&byte).await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector =
        tokio_rustls::TlsConnector::from(tls::hbone_client_config(client, expected).unwrap());
    let client_side = async {
        let tcp = TcpStream::connect(address).await.unwrap();
        let name = tls::server_name(&address.ip().to_string()).unwrap();
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(tls::ALPN_H2));
        let peer = tls::peer_identity(stream.get_ref().1).ok_or("no peer identity")?;
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    };
    let client = tokio::time::timeout(LIMIT, client_side)
        .await
        .expect("client hangs");
    let server = tokio::time::timeout(LIMIT, server_side)
        .await
        .expect("server hangs")
        .unwrap();
    Outcome { client, server }
}

fn mesh() -> (Arc<TestCa>, SpiffeId, SpiffeId) {
    let ca = Arc::new(TestCa::new("cluster.local"));
    let a = ca.identity("default", "client");
    let b = ca.identity("default", "server");
    (ca, a, b)
}

/// Certificates for `a` and `b` from a certificate manager.
async fn managed(
    ca: &Arc<TestCa>,
    a: &SpiffeId,
    b: &SpiffeId,
) -> (Arc<WorkloadCertificate>, Arc<WorkloadCertificate>) {
    let manager = TestSigner::new(ca.clone()).manager(ManagerConfig::default());
    (
        manager.fetch(a).await.unwrap(),
        manager.fetch(b).await.unwrap(),
    )
}

#[tokio::test]
async fn managed_identities_handshake_when_the_expected_identity_matches() {
    let (ca, a, b) = mesh();
    let (client, server) = managed(&ca, &a, &b).await;

    let outcome = handshake(&client, &b, &server).await;
    assert_eq!(
        outcome.client.unwrap(),
        b,
        "client sees the server's identity"
    );
    assert_eq!(
        outcome.server.unwrap(),
        a,
        "server sees the client's identity"
    );
}

#[tokio::test]
async fn handshake_fails_when_the_server_is_not_the_expected_identity() {
    let (ca, a, b) = mesh();
    let (client, server) = managed(&ca, &a, &b).await;
    let expected = ca.identity("default", "someone-else");

    let outcome = handshake(&client, &expected, &server).await;
    let err = outcome.client.unwrap_err();
    assert!(
        err.contains(&b.to_string()) && err.contains(&expected.to_string()),
        "error names both identities: {err}"
    );
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn expired_certificates_are_rejected_on_both_sides() {
    let (ca, a, b) = mesh();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = |id: &SpiffeId| ca.certificate_valid_between(id, now - 2 * hour, now - hour);

    let outcome = handshake(&ca.certificate(&a), &b, &expired(&b)).await;
    let err = outcome.client.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let outcome = handshake(&expired(&a), &b, &ca.certificate(&b)).await;
    let err = outcome.server.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn certificates_from_another_root_are_rejected_on_both_sides() {
    let (ca, a, b) = mesh();
    // Same trust domain and subject as the real root: only the signature
    // can tell them apart.
    let impostor = TestCa::new("cluster.local");

    let outcome = handshake(&ca.certificate(&a), &b, &impostor.certificate(&b)).await;
    let err = outcome.client.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");

    let client = impostor.certificate_trusting(&a, ca.roots());
    let outcome = handshake(&client, &b, &ca.certificate(&b)).await;
    let err = outcome.server.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn server_rejects_clients_from_another_trust_domain() {
    let (ca, _, b) = mesh();
    // Same root, so only the trust-domain check can refuse it.
    let foreign = SpiffeId::new("other.example", "default", "client").unwrap();

    let outcome = handshake(&ca.certificate(&foreign), &b, &ca.certificate(&b)).await;
    let err = outcome.server.unwrap_err();
    assert!(err.contains("outside the trust domain"), "{err}");
}

/// A CA that signs with `signer` and sends `bundle` as the trust bundle,
/// as istiod does during a root rotation (old and new roots in one PEM).
struct RotatingCa {
    signer: Arc<TestCa>,
    bundle: String,
}

impl proxy_core::identity::CertificateSigner for RotatingCa {
    fn sign(
        &self,
        request: proxy_core::identity::CertificateRequest,
    ) -> proxy_core::identity::SignFuture<'_> {
        let answer = self
            .signer
            .sign_csr(&request.csr_pem, &request.identity, LIMIT)
            .map(|mut chain| {
                *chain.last_mut().expect("leaf and root") = self.bundle.clone();
                chain
            });
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn during_a_root_rotation_peers_signed_by_either_root_verify_each_other() {
    let old = Arc::new(TestCa::new("cluster.local"));
    let new = Arc::new(TestCa::new("cluster.local"));
    let a = old.identity("default", "client");
    let b = old.identity("default", "server");
    let bundle = format!("{}{}", old.root_pem(), new.root_pem());
    let issue = |signer: &Arc<TestCa>, id: &SpiffeId| {
        let ca = RotatingCa {
            signer: signer.clone(),
            bundle: bundle.clone(),
        };
        let id = id.clone();
        async move {
            proxy_core::identity::issue(&ca, &id, LIMIT, false)
                .await
                .unwrap()
        }
    };
    // `a` renewed under the new root, `b` still holds the old one.
    let a_cert = issue(&new, &a).await;
    let b_cert = issue(&old, &b).await;
    assert_eq!(a_cert.roots(), [old.root(), new.root()]);
    let outcome = handshake(&a_cert, &b, &b_cert).await;
    assert_eq!(outcome.client, Ok(b.clone()));
    assert_eq!(outcome.server, Ok(a.clone()));
    let outcome = handshake(&b_cert, &a, &a_cert).await;
    assert_eq!(outcome.client, Ok(a.clone()));
    assert_eq!(outcome.server, Ok(b.clone()));

    // After the rotation, a proxy that trusts only the new root refuses a
    // peer still on the old one.
    let only_new = RotatingCa {
        signer: new.clone(),
        bundle: new.root_pem(),
    };
    let a_final = proxy_core::identity::issue(&only_new, &a, LIMIT, false)
        .await
        .unwrap();
    let outcome = handshake(&a_final, &b, &b_cert).await;
    assert!(outcome.client.is_err(), "the old root is no longer trusted");
}
