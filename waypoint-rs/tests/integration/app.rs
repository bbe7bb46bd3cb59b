//! `waypoint-rs` as a whole, on loopback: its real xDS and CA clients
//! against a stand-in istiod (delta ADS + CreateCertificate, plaintext),
//! the admin, stats and readiness servers, the HBONE listener, and drain.

use crate::support::harness;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use api::ca::{IstioCertificateRequest, IstioCertificateResponse};
use api::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use api::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use api::workload::address;
use clap::Parser;
use harness::{PATIENCE, service, workload};
use prost::Message;
use proxy_core::hbone::{DirectConnect, HbonePool, HboneTarget};
use proxy_core::testing::TestCa;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use waypoint_rs::app::{App, CERTIFICATE, DRAINING, XDS_SYNCED};
use waypoint_rs::args::WaypointArgs;

/// (node id, type URL, names) of one subscription.
type Subscription = (String, String, Vec<String>);

/// What the stand-in istiod serves and what it was asked.
#[derive(Clone)]
struct Istiod {
    ca: Arc<TestCa>,
    /// The identity the CA gives the token's service account.
    identity: api::SpiffeId,
    addresses: Arc<Vec<api::workload::Address>>,
    /// The `Waypoint` resource listing what the waypoint serves.
    waypoint: api::l7::Waypoint,
    /// (impersonated identity, if any) of each CSR.
    csrs: Arc<Mutex<Vec<Option<String>>>>,
    subscriptions: Arc<Mutex<Vec<Subscription>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Istiod {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let istiod = self.clone();
        tokio::spawn(async move {
            let mut nonce = 0;
            let mut node = String::new();
            while let Ok(Some(r)) = requests.message().await {
                if let Some(n) = &r.node {
                    node = n.id.clone();
                }
                if r.resource_names_subscribe.is_empty() && !r.response_nonce.is_empty() {
                    continue;
                }
                istiod.subscriptions.lock().unwrap().push((
                    node.clone(),
                    r.type_url.clone(),
                    r.resource_names_subscribe.clone(),
                ));
                nonce += 1;
                let resources = match r.type_url.as_str() {
                    api::type_url::ADDRESS => istiod.addresses.iter().map(address).collect(),
                    api::type_url::WAYPOINT => {
                        let w = &istiod.waypoint;
                        let name = format!("{}/{}", w.namespace, w.name);
                        vec![resource(name, api::type_url::WAYPOINT, w.encode_to_vec())]
                    }
                    _ => Vec::new(),
                };
                let response = DeltaDiscoveryResponse {
                    type_url: r.type_url,
                    nonce: nonce.to_string(),
                    resources,
                    ..Default::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn address(address: &api::workload::Address) -> Resource {
    let name = match &address.r#type {
        Some(address::Type::Workload(w)) => w.uid.clone(),
        Some(address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    };
    resource(name, api::type_url::ADDRESS, address.encode_to_vec())
}

fn resource(name: String, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        name,
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Istiod {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let request = request.into_inner();
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .map(|v| format!("{v:?}"));
        self.csrs.lock().unwrap().push(impersonated);
        let validity = Duration::from_secs(request.validity_duration.max(1) as u64);
        let chain = self.ca.sign_csr(&request.csr, &self.identity, validity)?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: WaypointArgs,
}

async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(harness::empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn wait_for_status(address: SocketAddr, path: &str, want: u16) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = http_get(address, path).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still answers {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_waypoint_gets_its_identity_and_config_serves_and_drains() {
    proxy_core::tls::install_default_provider();
    let subnet = 30 + (std::process::id() % 200) as u8;
    let ip = |host: u8| IpAddr::from([127, subnet, 251, host]);
    let waypoint_ip = ip(1);
    let ca = Arc::new(TestCa::new(harness::TRUST_DOMAIN));
    let identity = ca.identity("waypoint-ns", "waypoint");
    let svc_key = "default/echo.default.svc.cluster.local";
    let istiod = Istiod {
        ca: ca.clone(),
        identity: identity.clone(),
        addresses: Arc::new(vec![
            service("echo", "default", ip(100), &[(80, 8080)])
                .waypoint(waypoint_ip)
                .into(),
            workload("echo-0", "default", ip(10))
                .in_service(svc_key, &[(80, 8080)])
                .into(),
        ]),
        waypoint: api::l7::Waypoint {
            namespace: "waypoint-ns".into(),
            name: "waypoint".into(),
            services: vec![api::l7::ServedService {
                namespace: "default".into(),
                hostname: "echo.default.svc.cluster.local".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        csrs: Arc::default(),
        subscriptions: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind((ip(2), 0)).await.unwrap();
    let istiod_address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(istiod.clone()))
            .add_service(IstioCertificateServiceServer::new(istiod.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token").unwrap();
    let any = |host: u8| format!("{}:0", ip(host));
    let cli = Cli::try_parse_from([
        "waypoint-rs",
        "--xds-address",
        &format!("http://{istiod_address}"),
        "--root-cert",
        root.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--instance-ip",
        &waypoint_ip.to_string(),
        "--pod-name",
        "waypoint-abc",
        "--pod-namespace",
        "waypoint-ns",
        "--service-account",
        "waypoint",
        "--hbone-address",
        &any(1),
        "--admin-address",
        &any(1),
        "--stats-address",
        &any(1),
        "--readiness-address",
        &any(1),
        "--protocol-detection-timeout",
        "60s",
        "--drain-deadline",
        "30s",
    ])
    .unwrap();
    let app = App::start(cli.args).await.expect("the waypoint starts");

    // Ready once xDS synced and its own certificate was issued.
    wait_for_status(app.servers.readiness, "/healthz/ready", 200).await;
    assert!(app.readiness.is_ready());
    assert_eq!(
        istiod.csrs.lock().unwrap().clone(),
        [None],
        "one CSR, for its own identity, not impersonating"
    );
    let subscriptions = istiod.subscriptions.lock().unwrap().clone();
    let node = &subscriptions[0].0;
    assert!(
        node.starts_with(&format!("waypoint~{waypoint_ip}~waypoint-abc.waypoint-ns~")),
        "{node}"
    );
    for wanted in [
        api::type_url::ADDRESS,
        api::type_url::WAYPOINT,
        api::type_url::ROUTE_TABLE,
        api::type_url::HTTP_AUTHORIZATION,
        api::type_url::JWT_AUTHENTICATION,
        api::type_url::TRAFFIC_POLICY,
    ] {
        assert!(
            subscriptions
                .iter()
                .any(|(_, type_url, _)| type_url == wanted),
            "subscribes to {wanted}"
        );
    }

    // /config_dump says what it serves; /metrics has the registry.
    let dump = wait_for_status(app.servers.admin, "/config_dump", 200).await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["waypoint"]["identity"],
        "spiffe://cluster.local/ns/waypoint-ns/sa/waypoint"
    );
    assert_eq!(dump["waypoint"]["bound"]["services"][0]["service"], svc_key);
    assert_eq!(dump["certificates"][0]["state"], "Available");
    assert!(dump["l7"].is_object(), "the L7 configuration is dumped too");
    let metrics = wait_for_status(app.servers.stats, "/metrics", 200).await;
    assert!(metrics.contains("istio_xds"), "{metrics}");

    // A tunnel still deciding its protocol keeps the drain waiting.
    let client = ca.certificate(&ca.identity("client-ns", "client"));
    let pool = HbonePool::new(Default::default(), Arc::new(DirectConnect));
    let target = HboneTarget {
        identity: identity.clone(),
        address: app.hbone,
        authority: SocketAddr::new(ip(100), 80),
    };
    let mut tunnel = pool
        .connect(&client, &target)
        .await
        .expect("CONNECT accepted");
    // The client is outside what the waypoint is sent: it asks istiod for
    // it by address (`<network>/<ip>`), for its metric labels.
    let asked = tokio::time::timeout(PATIENCE, async {
        loop {
            let found = istiod
                .subscriptions
                .lock()
                .unwrap()
                .iter()
                .find_map(|(_, t, names)| {
                    (t == api::type_url::ADDRESS)
                        .then(|| names.iter().find(|n| n.starts_with('/')).cloned())
                        .flatten()
                });
            if let Some(name) = found {
                return name;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("an on-demand lookup of the client");
    assert!(asked[1..].parse::<IpAddr>().is_ok(), "{asked}");
    let (readiness, hbone) = (app.servers.readiness, app.hbone);
    let drain = app.drain.clone();
    let stopped = tokio::spawn(app.shutdown());
    let body = wait_for_status(readiness, "/healthz/ready", 503).await;
    assert!(body.contains(DRAINING), "{body}");
    assert!(!body.contains(XDS_SYNCED) && !body.contains(CERTIFICATE));
    let late = HboneTarget {
        address: hbone,
        ..target
    };
    let fresh = HbonePool::new(Default::default(), Arc::new(DirectConnect));
    assert!(
        fresh.connect(&client, &late).await.is_err(),
        "no new tunnel while draining"
    );
    assert_eq!(drain.live(), 1);
    tunnel.shutdown().await.unwrap();
    tokio::time::timeout(PATIENCE, stopped)
        .await
        .expect("drained once the tunnel ended")
        .unwrap();
}
