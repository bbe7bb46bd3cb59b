//! A loopback mesh around one waypoint data path: "pods" are distinct
//! loopback addresses (a /24 of 127/8 per mesh); endpoints are real
//! `HboneServer`s standing in for the destination ztunnels, each serving an
//! app on the tunnels it accepts; the client is a real `HbonePool` with a
//! client workload's certificate, as a source ztunnel dials; certificates
//! come from an in-process CA; the store is filled through the real xDS
//! handler.

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
use api::workload::{
    Address, GatewayAddress, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload,
    address, gateway_address,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use proxy_core::hbone::{
    Connect, ConnectFuture, HboneError, HbonePool, HboneServer, HboneStream, HboneTarget,
    Http2Settings, PoolConfig,
};
use proxy_core::identity::{ManagerConfig, WorkloadCertificate};
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use proxy_core::store::WorkloadStore;
use proxy_core::testing::{TestCa, TestSigner};
use proxy_core::xds::handlers::AddressHandler;
use proxy_core::xds::{Handler, Update};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_rs::app::{DataPath, DataPathConfig};
use waypoint_rs::config::{L7Store, WaypointHandler};
use waypoint_rs::metrics::Metrics;
use waypoint_rs::proxy::ProxyConfig;
use waypoint_rs::upstream::{Body, RetryPolicy, UpstreamConfig};

/// Long enough for a loaded machine; only there so a bug cannot hang a test.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub const TRUST_DOMAIN: &str = "cluster.local";

fn next_subnet() -> [u8; 2] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let second = 20 + (std::process::id() % 200) as u8;
    [second, (n % 250 + 1) as u8]
}

/// The data path's settings for tests: no retries, no timeouts, unless a
/// test asks.
pub fn test_config() -> ProxyConfig {
    ProxyConfig {
        network: String::new(),
        cluster_id: "Kubernetes".into(),
        protocol_detection_timeout: Duration::from_millis(100),
        drain_deadline: PATIENCE,
        upstream: UpstreamConfig {
            hbone_port: 0,
            request_timeout: None,
            per_try_timeout: None,
            retry: RetryPolicy::istio_default(0, Duration::from_millis(1)),
            retry_buffer_limit: 64 * 1024,
            max_requests_per_destination: u32::MAX,
            max_idle_connections_per_endpoint: 16,
            idle_timeout: PATIENCE,
        },
    }
}

/// The waypoint, its CA and store, and a client.
pub struct Mesh {
    pub ca: Arc<TestCa>,
    pub store: WorkloadStore,
    pub l7: L7Store,
    pub registry: Registry,
    pub data_path: DataPath,
    pub waypoint_identity: SpiffeId,
    pub client_identity: SpiffeId,
    client: HbonePool,
    client_certificate: WorkloadCertificate,
    subnet: [u8; 2],
    /// The `Waypoint` resource istiod would serve: what [`Mesh::list`]
    /// and [`Mesh::service`] listed so far.
    listed: Mutex<api::l7::Waypoint>,
}

/// The name of the harness's `Waypoint` resource.
pub const WAYPOINT_RESOURCE: &str = "waypoint-ns/waypoint";

impl Mesh {
    pub async fn start(configure: impl FnOnce(&mut ProxyConfig)) -> Mesh {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        proxy_core::tls::install_default_provider();
        let subnet = next_subnet();
        let ca = Arc::new(TestCa::new(TRUST_DOMAIN));
        let waypoint_identity = ca.identity("waypoint-ns", "waypoint");
        let client_identity = ca.identity("client-ns", "client");
        let certificates = TestSigner::new(ca.clone()).manager(ManagerConfig::default());
        let store = WorkloadStore::new();
        let l7 = L7Store::new();
        let mut registry = proxy_core::metrics::new_registry();
        let metrics = Metrics::register(&mut registry);
        let ip = |host: u8| IpAddr::V4(Ipv4Addr::new(127, subnet[0], subnet[1], host));
        // Every stand-in ztunnel of this mesh takes HBONE on the waypoint's port.
        let port = std::net::TcpListener::bind((ip(1), 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut config = test_config();
        config.upstream.hbone_port = port;
        configure(&mut config);
        let data_path = DataPath::start(DataPathConfig {
            proxy: config,
            http2: Http2Settings::default(),
            pool: PoolConfig::default(),
            hbone_address: SocketAddr::new(ip(1), port),
            hbone_limits: ListenerLimits::caps(4096, 4096),
            listeners: ListenerMetrics::register(&mut registry),
            store: store.clone(),
            l7: l7.clone(),
            certificates,
            identity: waypoint_identity.clone(),
            metrics,
            on_demand: None,
        })
        .await
        .expect("the waypoint listens");
        let client = HbonePool::new(PoolConfig::default(), Arc::new(DialFrom { ip: ip(2) }));
        let client_certificate = ca.certificate(&client_identity);
        let mesh = Mesh {
            ca,
            store,
            l7,
            registry,
            data_path,
            waypoint_identity,
            client_identity,
            client,
            client_certificate,
            subnet,
            listed: Mutex::new(api::l7::Waypoint {
                namespace: "waypoint-ns".into(),
                name: "waypoint".into(),
                ..Default::default()
            }),
        };
        // The client's own workload, for the source labels.
        mesh.apply(vec![workload("client", "client-ns", mesh.ip(2)).into()]);
        mesh
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.subnet[0], self.subnet[1], host))
    }

    /// The certificate the client presents to the waypoint.
    pub fn client_certificate(&self) -> &WorkloadCertificate {
        &self.client_certificate
    }

    pub fn hbone_port(&self) -> u16 {
        self.data_path.hbone.port()
    }

    pub fn waypoint_ip(&self) -> IpAddr {
        self.ip(1)
    }

    /// Applies the resources as one xDS response would; panics on a NACK.
    pub fn apply(&self, addresses: Vec<Address>) {
        let updates = addresses
            .into_iter()
            .map(|a| Update {
                name: name_of(&a),
                resource: Some(a),
            })
            .collect();
        AddressHandler::new(self.store.clone())
            .apply(updates)
            .expect("the store takes the resources");
    }

    /// Applies one L7 resource as an xDS response of its type would;
    /// panics on a NACK.
    pub fn apply_l7<T, H>(&self, handler: fn(L7Store) -> H, name: &str, resource: T)
    where
        H: Handler<T>,
    {
        handler(self.l7.clone())
            .apply(vec![Update {
                name: name.to_string(),
                resource: Some(resource),
            }])
            .unwrap_or_else(|rejected| panic!("{name} NACKed: {rejected:?}"));
    }

    /// Lists `service` in the waypoint's `Waypoint` resource (replacing
    /// the entry of the same service) and applies the resource.
    pub fn list(&self, service: api::l7::ServedService) {
        self.change_listed(|w| {
            w.services
                .retain(|s| (&s.namespace, &s.hostname) != (&service.namespace, &service.hostname));
            w.services.push(service);
        });
    }

    /// Lists a workload addressed directly (by uid) in the `Waypoint` resource.
    pub fn list_workload(&self, workload: api::l7::ServedWorkload) {
        self.change_listed(|w| {
            w.workloads.retain(|x| x.uid != workload.uid);
            w.workloads.push(workload);
        });
    }

    /// Sets the `Waypoint` resource's `forward_client_identity`, as istiod
    /// does from the Gateway's `ambient.istio.io/xfcc-include-client-identity`.
    pub fn forward_client_identity(&self, on: bool) {
        self.change_listed(|w| w.forward_client_identity = on);
    }

    /// Takes service `hostname` (in `default`) out of the `Waypoint` resource.
    pub fn unlist(&self, hostname: &str) {
        self.change_listed(|w| w.services.retain(|s| s.hostname != hostname));
    }

    fn change_listed(&self, change: impl FnOnce(&mut api::l7::Waypoint)) {
        let resource = {
            let mut listed = self.listed.lock().expect("not poisoned");
            change(&mut listed);
            listed.clone()
        };
        self.apply_l7(WaypointHandler::new, WAYPOINT_RESOURCE, resource);
    }

    /// A service `name.default.svc.cluster.local` at VIP `ip(host)` bound to
    /// this waypoint and listed by its `Waypoint` resource (no L7 rules),
    /// with endpoints at the given hosts, each a stand-in ztunnel serving
    /// `app`.
    pub async fn service(
        &self,
        name: &str,
        vip_host: u8,
        ports: &[(u16, u16)],
        endpoint_hosts: &[u8],
        app: App,
    ) -> Vec<Endpoint> {
        let svc = service(name, "default", self.ip(vip_host), ports).waypoint(self.ip(1));
        let key = format!("default/{name}.default.svc.cluster.local");
        let mut resources = vec![svc.into()];
        let mut endpoints = Vec::new();
        for (i, host) in endpoint_hosts.iter().enumerate() {
            let pod = format!("{name}-{i}");
            resources.push(
                workload(&pod, "default", self.ip(*host))
                    .in_service(&key, ports)
                    .into(),
            );
            endpoints.push(self.endpoint(&pod, *host, app.clone()).await);
        }
        self.apply(resources);
        self.list(api::l7::ServedService {
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            ..Default::default()
        });
        endpoints
    }

    /// A stand-in ztunnel at `ip(host)` for pod `pod` in `default`.
    pub async fn endpoint(&self, pod: &str, host: u8, app: App) -> Endpoint {
        let identity = self.ca.identity("default", pod);
        Endpoint::start(
            &self.ca,
            identity,
            SocketAddr::new(self.ip(host), self.hbone_port()),
            app,
        )
        .await
    }

    /// A CONNECT to the waypoint for `authority`, as the client.
    pub async fn connect(&self, authority: SocketAddr) -> Result<HboneStream, HboneError> {
        self.connect_as(&self.client_certificate, authority).await
    }

    pub async fn connect_as(
        &self,
        certificate: &WorkloadCertificate,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let target = HboneTarget {
            identity: self.waypoint_identity.clone(),
            address: self.data_path.hbone,
            authority,
        };
        self.client.connect(certificate, &target).await
    }

    /// An HTTP/1.1 client on a fresh tunnel to `authority`.
    pub async fn http1(
        &self,
        authority: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<Body> {
        let stream = self.connect(authority).await.expect("CONNECT accepted");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection.with_upgrades());
        sender
    }

    /// An h2c (prior knowledge) client on a fresh tunnel to `authority`.
    pub async fn http2(
        &self,
        authority: SocketAddr,
    ) -> hyper::client::conn::http2::SendRequest<Body> {
        let stream = self.connect(authority).await.expect("CONNECT accepted");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        sender
    }

    pub fn metrics(&self) -> String {
        proxy_core::metrics::encode(&self.registry).expect("metrics encode")
    }

    /// The value of the first sample of `name` whose labels include every
    /// one of `labels` (0 when none).
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.metrics(), name, labels)
    }

    /// Waits until `sample(name, labels) >= at_least`.
    pub async fn wait_for_sample(&self, name: &str, labels: &[(&str, &str)], at_least: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if self.sample(name, labels) >= at_least {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {name} {labels:?} >= {at_least}:\n{}",
                self.metrics()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Dials from a fixed loopback address, as a source pod would.
struct DialFrom {
    ip: IpAddr,
}

impl Connect for DialFrom {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_> {
        let ip = self.ip;
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(address).await
        })
    }
}

pub type AppHandler = Arc<
    dyn Fn(http::Request<Incoming>) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// What a stand-in endpoint serves on each accepted tunnel.
#[derive(Clone)]
pub enum App {
    /// HTTP (HTTP/1.1 with upgrades, or h2c) through this handler.
    Http(AppHandler),
    /// A server-first protocol: writes this greeting, then echoes.
    Greeting(&'static [u8]),
}

impl App {
    pub fn http<F, Fut>(handler: F) -> App
    where
        F: Fn(http::Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = http::Response<Body>> + Send + 'static,
    {
        App::Http(Arc::new(move |request| Box::pin(handler(request))))
    }

    /// Answers 200 with `<pod>: <method> <path> <version>`.
    pub fn echo(pod: &str) -> App {
        let pod = pod.to_string();
        App::http(move |request| {
            let text = format!(
                "{pod}: {} {} {:?}",
                request.method(),
                request.uri().path(),
                request.version()
            );
            async move { text_response(200, text) }
        })
    }
}

pub fn text_response(status: u16, text: impl Into<String>) -> http::Response<Body> {
    let mut response = http::Response::new(full(text));
    *response.status_mut() = http::StatusCode::from_u16(status).expect("a status");
    response
}

pub fn full(text: impl Into<String>) -> Body {
    Full::new(Bytes::from(text.into()))
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// One CONNECT a stand-in ztunnel accepted.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub peer: SpiffeId,
    pub authority: SocketAddr,
}

/// A stand-in destination ztunnel and the app behind it.
pub struct Endpoint {
    pub identity: SpiffeId,
    pub address: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Endpoint {
    async fn start(ca: &TestCa, identity: SpiffeId, address: SocketAddr, app: App) -> Endpoint {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let log = accepted.clone();
        let server = HboneServer::new(move |connect: proxy_core::hbone::InboundConnect| {
            let log = log.clone();
            let app = app.clone();
            async move {
                log.lock().unwrap().push(Accepted {
                    peer: connect.peer_identity().clone(),
                    authority: connect.authority(),
                });
                let Ok(stream) = connect.accept() else {
                    return;
                };
                serve_app(app, stream).await;
            }
        });
        let shutdown = server.shutdown_token();
        let listener = Listener::new(
            tokio::net::TcpListener::bind(address)
                .await
                .expect("stand-in ztunnel listens"),
            "hbone",
            ListenerLimits::caps(4096, 4096),
            &ListenerMetrics::default(),
        );
        let tls = proxy_core::tls::hbone_server_config(&ca.certificate(&identity)).expect("tls");
        tokio::spawn(async move {
            server
                .serve(listener, move |_| std::future::ready(Ok(tls.clone())))
                .await
        });
        Endpoint {
            identity,
            address,
            accepted,
            shutdown,
        }
    }

    /// Every CONNECT accepted so far.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap().clone()
    }
}

async fn serve_app(app: App, stream: HboneStream) {
    match app {
        App::Http(handler) => {
            let service = hyper::service::service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        }
        App::Greeting(greeting) => {
            let mut stream = stream;
            if stream.write_all(greeting).await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = stream.shutdown().await;
        }
    }
}

// ---- workload API resources ----

fn bytes_of(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn waypoint_at(ip: IpAddr) -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Address(NetworkAddress {
            network: String::new(),
            address: bytes_of(ip),
        })),
        hbone_mtls_port: 15008,
    }
}

pub struct TestWorkload(pub Workload);

/// Pod `name` in `namespace` at `ip`, service account `name`, over HBONE.
pub fn workload(name: &str, namespace: &str, ip: IpAddr) -> TestWorkload {
    TestWorkload(Workload {
        uid: format!("Kubernetes//Pod/{namespace}/{name}"),
        name: name.to_string(),
        namespace: namespace.to_string(),
        addresses: vec![bytes_of(ip)],
        trust_domain: TRUST_DOMAIN.to_string(),
        service_account: name.to_string(),
        workload_name: name.to_string(),
        canonical_name: name.to_string(),
        canonical_revision: "v1".to_string(),
        cluster_id: "Kubernetes".to_string(),
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        ..Workload::default()
    })
}

impl TestWorkload {
    pub fn in_service(mut self, key: &str, ports: &[(u16, u16)]) -> Self {
        let ports = ports
            .iter()
            .map(|(s, t)| Port {
                service_port: u32::from(*s),
                target_port: u32::from(*t),
                app_protocol: 0,
            })
            .collect();
        self.0.services.insert(key.to_string(), PortList { ports });
        self
    }

    pub fn waypoint(mut self, ip: IpAddr) -> Self {
        self.0.waypoint = Some(waypoint_at(ip));
        self
    }

    pub fn uid(&self) -> String {
        self.0.uid.clone()
    }

    /// Its entry in a `Waypoint` resource (detected protocol on every port).
    pub fn served(&self) -> api::l7::ServedWorkload {
        api::l7::ServedWorkload {
            uid: self.0.uid.clone(),
            addresses: self.0.addresses.clone(),
            ..Default::default()
        }
    }
}

impl From<TestWorkload> for Address {
    fn from(w: TestWorkload) -> Address {
        Address {
            r#type: Some(address::Type::Workload(w.0)),
        }
    }
}

pub struct TestService(pub Service);

pub fn service(name: &str, namespace: &str, vip: IpAddr, ports: &[(u16, u16)]) -> TestService {
    TestService(Service {
        name: name.to_string(),
        namespace: namespace.to_string(),
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: bytes_of(vip),
        }],
        ports: ports
            .iter()
            .map(|(s, t)| Port {
                service_port: u32::from(*s),
                target_port: u32::from(*t),
                app_protocol: 0,
            })
            .collect(),
        ..Service::default()
    })
}

impl TestService {
    pub fn waypoint(mut self, ip: IpAddr) -> Self {
        self.0.waypoint = Some(waypoint_at(ip));
        self
    }
}

impl From<TestService> for Address {
    fn from(s: TestService) -> Address {
        Address {
            r#type: Some(address::Type::Service(s.0)),
        }
    }
}

fn name_of(address: &Address) -> String {
    match &address.r#type {
        Some(address::Type::Workload(w)) => w.uid.clone(),
        Some(address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    }
}

/// Reads until EOF or `n` bytes.
pub async fn read_n(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    n: usize,
) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; n];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut out))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nothing to read"))??;
    Ok(out)
}
