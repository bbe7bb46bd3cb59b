//! The proxies' own clients (proxy-core) against the real istiod-rs, over
//! TLS with bearer tokens, as ztunnel-rs runs them: the delta xDS client
//! feeding a workload store (ACK, NACK of a resource it rejects, resuming
//! after istiod restarts), and the CA client behind the certificate manager
//! (the SAN, impersonation by node, rotation, and an mTLS handshake
//! between two managed identities).

use crate::support::istiod;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::SpiffeId;
use api::type_url::{ADDRESS, AUTHORIZATION};
use proxy_core::identity::{
    CaClient, CertificateError, CertificateManager, FetchError, ManagerConfig, WorkloadCertificate,
};
use proxy_core::store::{Workload, WorkloadStore};
use proxy_core::xds::{ConnectionState, StatusWatch, XdsClient, XdsConfig, XdsStatus, handlers};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

use istiod::{LocalIstiod, NAMESPACE, PATIENCE, WEB_SERVICE, pod, service, uid};

const NODE_A: &str = "ztunnel-node-a";
const NODE_B: &str = "ztunnel-node-b";

fn web_1(version: &str) -> String {
    pod(
        "web-1",
        "node-a",
        "web",
        "10.244.0.11",
        &format!("app: web, version: {version}"),
    )
}

async fn cluster() -> LocalIstiod {
    LocalIstiod::start(&[
        ("namespace.yaml", NAMESPACE),
        ("web-1.yaml", &web_1("v1")),
        (
            "api-1.yaml",
            &pod("api-1", "node-b", "api", "10.244.1.11", "app: api"),
        ),
        ("service.yaml", &service(80)),
    ])
    .await
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(istiod::TRUST_DOMAIN, namespace, service_account).unwrap()
}

/// A node's ztunnel as far as xDS goes: the client and the store it fills.
struct Ztunnel {
    store: WorkloadStore,
    status: StatusWatch,
    stop: CancellationToken,
}

impl Ztunnel {
    fn start(istiod: &LocalIstiod, token: &str) -> Ztunnel {
        let plane = istiod.control_plane(token);
        let mut config = XdsConfig::new(proxy_core::xds::ztunnel_node_id(
            "10.0.0.1".parse().unwrap(),
            "ztunnel-a",
            "istio-system",
        ));
        // Reconnect promptly once istiod is back.
        config.backoff_min = Duration::from_millis(20);
        config.backoff_max = Duration::from_millis(200);
        let store = WorkloadStore::new();
        let client =
            handlers::subscribe_store(XdsClient::new(plane.channel().unwrap(), config), &store)
                .with_metadata(plane.xds_metadata());
        let status = client.status();
        let stop = CancellationToken::new();
        tokio::spawn(client.run(stop.clone()));
        Ztunnel {
            store,
            status,
            stop,
        }
    }

    /// The client's status once `until` holds for it.
    async fn status_until(&self, until: impl Fn(&XdsStatus) -> bool) -> XdsStatus {
        let mut watch = self.status.clone();
        let wait = async {
            let mut current = watch.current();
            while !until(&current) {
                current = watch.changed().await.expect("the xDS client is running");
            }
            current
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(status) => status,
            Err(_) => panic!("xDS client never got there: {:?}", self.status.current()),
        }
    }

    /// Waits until the store's copy of workload `name` satisfies `until`.
    async fn workload_until(&self, name: &str, until: impl Fn(&Workload) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(w) = self.store.snapshot().workload_by_uid(&uid(name))
                && until(&w)
            {
                return;
            }
            assert!(Instant::now() < deadline, "workload {name} never got there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The port of service `demo/web` in the proxy's store.
fn service_port(store: &WorkloadStore) -> Option<u16> {
    let key = WEB_SERVICE.parse().unwrap();
    let service = store.snapshot().service(&key)?;
    service.ports.first().map(|p| p.service_port)
}

#[tokio::test]
async fn xds_client_acks_nacks_and_resumes_after_istiod_restarts() {
    let mut istiod = cluster().await;
    let ztunnel = Ztunnel::start(&istiod, NODE_A);

    // ACK: the first state of both types (policies: none) lands in the store.
    let status = ztunnel.status_until(|s| s.synced).await;
    assert_eq!(status.types[ADDRESS].resources, 3, "{status:?}");
    assert_eq!(status.types[AUTHORIZATION].resources, 0, "{status:?}");
    let snapshot = ztunnel.store.snapshot();
    assert_eq!(snapshot.workload_count(), 2);
    assert!(snapshot.workload_by_uid(&uid("web-1")).is_some());
    assert_eq!(service_port(&ztunnel.store), Some(80));

    // NACK: a service whose port the proxy refuses (above 65535: the API
    // server would not take it, a config directory does). The proxy keeps
    // its last good copy and istiod records the rejection for it.
    istiod.write("service.yaml", &service(70_000));
    let status = ztunnel.status_until(|s| s.types[ADDRESS].nacks == 1).await;
    let nack = status.types[ADDRESS].last_nack.clone().unwrap();
    assert!(
        nack.contains(WEB_SERVICE) && nack.contains("70000"),
        "{nack}"
    );
    assert_eq!(service_port(&ztunnel.store), Some(80));
    let syncz = istiod.get_json("/debug/syncz").await;
    let proxy = &syncz["proxies"][0];
    assert_eq!(proxy["last_nack"]["message"], nack.as_str(), "{syncz:#}");
    assert_eq!(proxy["identity"], id("istio-system", "ztunnel").to_string());

    // A fixed service is accepted again.
    istiod.write("service.yaml", &service(8080));
    let deadline = Instant::now() + PATIENCE;
    while service_port(&ztunnel.store) != Some(8080) {
        assert!(Instant::now() < deadline, "the fixed service never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // istiod goes away: the proxy keeps serving what it has.
    istiod.stop().await;
    ztunnel
        .status_until(|s| s.connection == ConnectionState::Disconnected)
        .await;
    assert!(
        ztunnel
            .store
            .snapshot()
            .workload_by_uid(&uid("web-1"))
            .is_some()
    );

    // One pod changes while it is away; istiod comes back on the same
    // ports; the proxy resumes with its versions and is sent only that pod.
    istiod.write("web-1.yaml", &web_1("v2"));
    istiod.restart().await;
    ztunnel
        .workload_until("web-1", |w| w.canonical_revision == "v2")
        .await;
    let status = ztunnel
        .status_until(|s| s.connection == ConnectionState::Connected)
        .await;
    assert!(status.connection_attempts >= 2, "{status:?}");
    let sent = |kind: &str| format!("xds_{kind}_total{{type=\"wds\"}}");
    assert_eq!(istiod.metric(&sent("resources_sent")).await, 1.0);
    assert_eq!(istiod.metric(&sent("removals_sent")).await, 0.0);
    assert_eq!(ztunnel.store.snapshot().workload_count(), 2);
}

/// A certificate manager talking to istiod's CA with `token`.
fn manager(istiod: &LocalIstiod, token: &str, config: ManagerConfig) -> CertificateManager {
    let ca = CaClient::new(&istiod.control_plane(token)).unwrap();
    CertificateManager::new(Arc::new(ca), config)
}

fn impersonating() -> ManagerConfig {
    ManagerConfig {
        impersonate: true,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        ..ManagerConfig::default()
    }
}

/// The status the CA refused a fetch with.
fn refusal(error: FetchError) -> tonic::Code {
    match error {
        FetchError::Issue { source, .. } => match &*source {
            CertificateError::Ca { status, .. } => status.code(),
            other => panic!("not a CA refusal: {other}"),
        },
        other => panic!("not a refusal: {other}"),
    }
}

fn uri_sans(cert: &WorkloadCertificate) -> Vec<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.leaf().as_ref()).unwrap();
    let sans = parsed.subject_alternative_name().unwrap().unwrap();
    sans.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(uri) => uri.to_string(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn certificates_carry_the_callers_identity_and_impersonation_follows_nodes() {
    let istiod = cluster().await;

    // A workload's own certificate: exactly its SPIFFE id, nothing else.
    let client = manager(&istiod, "demo-client", ManagerConfig::default());
    let cert = client.fetch(&id("demo", "client")).await.unwrap();
    assert_eq!(uri_sans(&cert), [id("demo", "client").to_string()]);
    // The identity comes from the token, not from what is asked for.
    let err = client.fetch(&id("demo", "web")).await.unwrap_err();
    assert!(err.to_string().contains("was requested"), "{err}");

    // node-a's ztunnel may have the certificate of a pod on node-a...
    let node_a = manager(&istiod, NODE_A, impersonating());
    let web = node_a.fetch(&id("demo", "web")).await.unwrap();
    assert_eq!(uri_sans(&web), [id("demo", "web").to_string()]);
    // ... not of one that runs only on node-b.
    let err = node_a.fetch(&id("demo", "api")).await.unwrap_err();
    assert_eq!(refusal(err), tonic::Code::PermissionDenied);
    let node_b = manager(&istiod, NODE_B, impersonating());
    node_b.fetch(&id("demo", "api")).await.unwrap();

    // A workload that is not a node agent may not impersonate at all.
    let sneaky = manager(&istiod, "demo-client", impersonating());
    let err = sneaky.fetch(&id("demo", "web")).await.unwrap_err();
    assert_eq!(refusal(err), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn short_lived_certificates_are_rotated_before_they_expire() {
    let istiod = cluster().await;
    let config = ManagerConfig {
        validity: Duration::from_secs(6),
        ..impersonating()
    };
    let node_a = manager(&istiod, NODE_A, config);
    let web = id("demo", "web");
    let first = node_a.fetch(&web).await.unwrap();
    let lifetime = first
        .not_after()
        .duration_since(first.not_before())
        .unwrap();
    assert!(lifetime <= Duration::from_secs(6), "{lifetime:?}");

    let deadline = Instant::now() + PATIENCE;
    let second = loop {
        let current = node_a.fetch(&web).await.unwrap();
        if current.serial_number() != first.serial_number() {
            break current;
        }
        assert!(Instant::now() < deadline, "never rotated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Issued while the first was still valid, and valid for longer.
    assert!(second.not_before() < first.not_after());
    assert!(second.not_after() > first.not_after());
    assert_eq!(uri_sans(&second), [web.to_string()]);
}

/// One mutual-TLS handshake with proxy-core's HBONE configs: `client`
/// expecting `expected`, against `server`. The server's view of the client
/// when it succeeds.
async fn handshake(
    client: &WorkloadCertificate,
    expected: &SpiffeId,
    server: &WorkloadCertificate,
) -> Result<SpiffeId, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(proxy_core::tls::hbone_server_config(server).unwrap());
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        proxy_core::tls::peer_identity(tls.get_ref().1).ok_or_else(|| "no peer identity".into())
    });
    let connector = tokio_rustls::TlsConnector::from(
        proxy_core::tls::hbone_client_config(client, expected).unwrap(),
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = proxy_core::tls::server_name("127.0.0.1").unwrap();
    let connected = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .unwrap();
    let server_view = tokio::time::timeout(PATIENCE, accepted)
        .await
        .unwrap()
        .unwrap();
    connected.map_err(|e| e.to_string())?;
    server_view
}

#[tokio::test]
async fn managed_identities_complete_mutual_tls_only_with_the_expected_peer() {
    let istiod = cluster().await;
    let client = manager(&istiod, "demo-client", ManagerConfig::default())
        .fetch(&id("demo", "client"))
        .await
        .unwrap();
    let server = manager(&istiod, NODE_A, impersonating())
        .fetch(&id("demo", "web"))
        .await
        .unwrap();

    let seen = handshake(&client, &id("demo", "web"), &server)
        .await
        .unwrap();
    assert_eq!(seen, id("demo", "client"));

    let err = handshake(&client, &id("demo", "api"), &server)
        .await
        .unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/demo/sa/web"),
        "{err}"
    );
}
