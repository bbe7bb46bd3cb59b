//! `ztunnel-rs proxy` as a whole, on loopback: its real xDS and CA clients
//! against a stand-in istiod (delta ADS + CreateCertificate over gRPC,
//! plaintext), the real node agent ZDS server (with an empty snapshot: pods
//! need network namespaces, so they are handed to the proxy directly here),
//! and the admin, stats and readiness servers.
//!
//! istiod is unreachable at start (not ready, saying why), then serves
//! (ready, traffic flows with certificates from the CA, impersonated), then
//! goes away (still ready, existing state keeps serving new connections).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
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
use prost::Message;
use proxy_core::testing::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use ztunnel_rs::app::{App, ProxyArgs, XDS_SYNCED, ZDS_SNAPSHOT};
use ztunnel_rs::inpod::testing::serve_zds;
use ztunnel_rs::node_agent::zds_server::ZdsServer;
use ztunnel_rs::proxy::testing::{EchoApp, PATIENCE, TestPod, eventually, exchange, xds};
use ztunnel_rs::proxy::{LocalSockets, PodInfo};

/// What the stand-in istiod serves and what it was asked.
#[derive(Clone)]
struct Istiod {
    ca: Arc<TestCa>,
    addresses: Arc<Vec<api::workload::Address>>,
    /// (authorization header, impersonated identity) of each CSR.
    csrs: Arc<Mutex<Vec<(String, String)>>>,
    /// (authorization header, node id) of each xDS stream.
    streams: Arc<Mutex<Vec<(String, String)>>>,
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

    /// Answers each subscription with the whole state of its type, then
    /// takes the ACKs.
    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let streams = self.streams.clone();
        let addresses = self.addresses.clone();
        tokio::spawn(async move {
            let mut nonce = 0;
            while let Ok(Some(r)) = requests.message().await {
                if let Some(node) = &r.node {
                    streams
                        .lock()
                        .unwrap()
                        .push((token.clone(), node.id.clone()));
                }
                if r.resource_names_subscribe.is_empty() {
                    continue;
                }
                nonce += 1;
                let resources = if r.type_url == api::type_url::ADDRESS {
                    addresses.iter().map(resource).collect()
                } else {
                    Vec::new()
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

fn resource(address: &api::workload::Address) -> Resource {
    let name = match &address.r#type {
        Some(api::workload::address::Type::Workload(w)) => w.uid.clone(),
        Some(api::workload::address::Type::Service(s)) => {
            format!("{}/{}", s.namespace, s.hostname)
        }
        None => String::new(),
    };
    Resource {
        name,
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: api::type_url::ADDRESS.into(),
            value: address.encode_to_vec(),
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
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let request = request.into_inner();
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::permission_denied("a node proxy must impersonate"))?;
        self.csrs
            .lock()
            .unwrap()
            .push((token, impersonated.clone()));
        let identity: SpiffeId = impersonated
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let validity = Duration::from_secs(request.validity_duration.max(1) as u64);
        let chain = self.ca.sign_csr(&request.csr, &identity, validity)?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The stand-in istiod on a runtime of its own, so that stopping it drops
/// every connection at once, as a dying process would.
struct RunningIstiod {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningIstiod {
    fn start(istiod: Istiod, address: SocketAddr) -> RunningIstiod {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(address).await.unwrap();
                bound_tx.send(()).unwrap();
                let server = tonic::transport::Server::builder()
                    .add_service(AggregatedDiscoveryServiceServer::new(istiod.clone()))
                    .add_service(IstioCertificateServiceServer::new(istiod))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = server => {}
                    _ = stopped => {}
                }
            });
            runtime.shutdown_background();
        });
        bound_rx.recv_timeout(PATIENCE).expect("istiod listening");
        RunningIstiod {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

struct Reply {
    status: u16,
    body: String,
}

/// A plain HTTP/1.0 GET.
async fn get(addr: SocketAddr, path: &str) -> Reply {
    tokio::time::timeout(PATIENCE, async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Reply {
            status,
            body: body.to_string(),
        }
    })
    .await
    .expect("the server answers")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn args(dir: &Path, xds: SocketAddr, zds_socket: &Path) -> ProxyArgs {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ProxyArgs {
        // The URL form says plaintext; the node IP is found from the route.
        xds_address: format!("http://{xds}"),
        ca_address: None,
        root_cert: dir.join("root-cert.pem"),
        plaintext: false,
        istiod_server_name: "istiod.istio-system.svc".into(),
        token_file: dir.join("token"),
        node_name: "node-1".into(),
        node_ip: None,
        pod_name: "ztunnel-abc".into(),
        pod_namespace: "istio-system".into(),
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
        network: String::new(),
        zds_socket: zds_socket.to_path_buf(),
        admin_address: any,
        stats_address: any,
        readiness_address: any,
        server_max_connections: 128,
        server_max_connections_per_peer: 16,
        server_header_timeout: Duration::from_secs(2),
        server_idle_timeout: Duration::from_secs(60),
        load_balancing: Default::default(),
        drain_deadline: Duration::from_secs(5),
        certificate_ttl: Duration::from_secs(3600),
        original_source: true,
        workload_wait: Duration::from_secs(5),
        takeover_wait: Duration::from_secs(5),
        metrics_retention: Duration::from_secs(300),
        hbone_max_concurrent_streams: 200,
        hbone_max_header_list_size: 64 * 1024,
        hbone_ping_interval: Duration::from_secs(10),
        hbone_ping_timeout: Duration::from_secs(20),
        keepalive_time: Duration::from_secs(180),
        keepalive_interval: Duration::from_secs(180),
        keepalive_retries: 9,
        max_held_sockets_per_peer: 1024,
        max_held_sockets_per_node: None,
        pod_max_connections: 8192,
        pod_max_connections_per_peer: 1024,
        // The DNS proxy runs in every pod; no resolv.conf there, so it
        // forwards nowhere (and says so).
        dns_capture: true,
        cluster_domain: "cluster.local".into(),
        dns_servers: Vec::new(),
        resolv_conf: dir.join("resolv.conf"),
        on_demand_dns_cache_size: 256,
        on_demand_dns_negative_ttl: Duration::from_secs(5),
    }
}

/// A /24 of loopback for this test's pods (the proxy listens on the real
/// ports, 15001/15006/15008, on each pod address).
fn pod_ip(host: u8) -> IpAddr {
    format!("127.{}.254.{host}", 20 + std::process::id() % 200)
        .parse()
        .unwrap()
}

async fn add_pod(app: &App, name: &str, namespace: &str, ip: IpAddr) -> TestPod {
    let sockets = LocalSockets::new(ip);
    let info = PodInfo {
        uid: format!("uid-{name}"),
        name: name.into(),
        namespace: namespace.into(),
        service_account: name.into(),
    };
    let addresses = app
        .manager
        .add(info.clone(), Arc::new(sockets.clone()))
        .await
        .unwrap();
    TestPod {
        info,
        ip,
        sockets,
        addresses,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_istiod_and_keeps_serving_when_it_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(TestCa::new("cluster.local"));
    std::fs::write(dir.path().join("root-cert.pem"), ca.root_pem()).unwrap();
    std::fs::write(dir.path().join("token"), "node-token\n").unwrap();

    // The node agent's ZDS server, with no pods: an empty snapshot.
    let zds_socket = dir.path().join("ztunnel.sock");
    let (zds, _acked) = ZdsServer::new(PATIENCE);
    serve_zds(&zds, &zds_socket);

    // istiod is not there yet.
    let xds_address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let app = App::start(args(dir.path(), xds_address, &zds_socket))
        .await
        .unwrap();
    let ready = app.servers.readiness;
    eventually("the ZDS snapshot", || {
        app.readiness.missing() == [XDS_SYNCED.to_string()]
    })
    .await;
    let reply = get(ready, "/healthz/ready").await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains(XDS_SYNCED), "{}", reply.body);
    assert!(!reply.body.contains(ZDS_SNAPSHOT), "{}", reply.body);

    // istiod comes up: the proxy syncs and is ready.
    let (client_ip, server_ip) = (pod_ip(2), pod_ip(3));
    let istiod = Istiod {
        ca: ca.clone(),
        addresses: Arc::new(vec![
            xds::workload("client", "a", &client_ip.to_string())
                .hbone()
                .into(),
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .into(),
        ]),
        csrs: Arc::default(),
        streams: Arc::default(),
    };
    let running = RunningIstiod::start(istiod.clone(), xds_address);
    eventually("readiness", || app.readiness.is_ready()).await;
    assert_eq!(get(ready, "/healthz/ready").await.status, 200);

    let client = add_pod(&app, "client", "a", client_ip).await;
    add_pod(&app, "server", "b", server_ip).await;
    let echo = EchoApp::start(SocketAddr::new(server_ip, 8080), "server").await;
    let mut conn = client.connect(echo.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"one").await.unwrap(), b"server: one");

    // Certificates were asked for as the node, on the pods' behalf.
    let csrs = istiod.csrs.lock().unwrap().clone();
    let mut impersonated: Vec<&str> = csrs.iter().map(|(_, id)| id.as_str()).collect();
    impersonated.sort();
    assert_eq!(
        impersonated,
        [
            "spiffe://cluster.local/ns/a/sa/client",
            "spiffe://cluster.local/ns/b/sa/server"
        ]
    );
    assert!(csrs.iter().all(|(token, _)| token == "Bearer node-token"));
    let (token, node) = istiod.streams.lock().unwrap()[0].clone();
    assert_eq!(token, "Bearer node-token");
    assert_eq!(
        node,
        "ztunnel~127.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    );

    // The admin server shows the store, the certificates and the pods.
    let dump: serde_json::Value =
        serde_json::from_str(&get(app.servers.admin, "/config_dump").await.body).unwrap();
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 2, "{dump}");
    assert_eq!(dump["pods"].as_array().unwrap().len(), 2, "{dump}");
    // Each pod's live connections, under upstream's key (istioctl-rs reads it).
    let states = dump["workloadState"].as_object().unwrap();
    assert_eq!(states.len(), 2, "{dump}");
    assert!(states.values().all(|s| s["state"] == "Up"), "{dump}");
    let index = get(app.servers.admin, "/").await.body;
    assert!(index.contains("workloadState"), "{index}");
    assert_eq!(dump["xds"]["synced"], true, "{dump}");
    assert_eq!(dump["config"]["proxy"]["clusterId"], "Kubernetes", "{dump}");
    assert_eq!(dump["config"]["proxy"]["ports"]["hbone"], 15008, "{dump}");
    let certs: serde_json::Value =
        serde_json::from_str(&get(app.servers.admin, "/certs").await.body).unwrap();
    let identities: Vec<&str> = certs["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap())
        .collect();
    assert_eq!(
        identities,
        [
            "spiffe://cluster.local/ns/a/sa/client",
            "spiffe://cluster.local/ns/b/sa/server"
        ]
    );
    assert!(certs["certificates"][0]["state"] == "Available", "{certs}");
    let metrics = get(app.servers.stats, "/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("reporter=\"destination\"")),
        "{metrics}"
    );

    // istiod goes away mid-run: still ready, still serving from what it sent.
    running.stop();
    let mut status = app.xds.clone();
    tokio::time::timeout(PATIENCE, async {
        while status.current().connection == proxy_core::xds::ConnectionState::Connected {
            status.changed().await;
        }
    })
    .await
    .expect("the proxy notices istiod is gone");
    assert_eq!(get(ready, "/healthz/ready").await.status, 200);
    let mut conn = client.connect(echo.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"two").await.unwrap(), b"server: two");

    tokio::time::timeout(PATIENCE, app.shutdown())
        .await
        .expect("the proxy shuts down");
}

#[tokio::test]
async fn a_missing_root_certificate_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = App::start(args(
        dir.path(),
        "127.0.0.1:1".parse().unwrap(),
        &dir.path().join("zds.sock"),
    ))
    .await
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("--root-cert"), "{message}");
    assert!(message.contains("root-cert.pem"), "{message}");
}
