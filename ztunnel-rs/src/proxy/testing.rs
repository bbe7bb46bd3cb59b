//! A loopback harness for proxy tests (feature `testing`): "pods" are
//! distinct loopback addresses (a /24 of 127/8 per mesh, so tests run in
//! parallel), proxied through [`LocalSockets`]; certificates come from an
//! in-process CA through the real certificate manager in impersonation
//! mode; the store is filled through the real xDS handlers ([`xds`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
use prometheus_client::registry::Registry;
use proxy_core::identity::{CertificateManager, ManagerConfig};
use proxy_core::store::WorkloadStore;
use proxy_core::testing::{TestCa, TestSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{LocalSockets, Metrics, PodAddresses, PodInfo, ProxyConfig, ProxyManager};

/// Long enough for a loaded machine; only there so a bug cannot hang a test.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `check` holds (polling), panicking with `what` after [`PATIENCE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A /24 of loopback addresses no other mesh in this process uses, and
/// likely none in another test process (the second octet follows the pid).
fn next_subnet() -> [u8; 2] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let second = 20 + (std::process::id() % 200) as u8;
    [second, (n % 250 + 1) as u8]
}

/// One node's proxy with its CA, store and metrics.
pub struct TestMesh {
    pub ca: Arc<TestCa>,
    pub signer: Arc<TestSigner>,
    /// The proxy's certificate manager (impersonating, as on a node).
    pub certificates: CertificateManager,
    pub store: WorkloadStore,
    pub registry: Registry,
    pub manager: ProxyManager,
    subnet: [u8; 2],
}

impl std::fmt::Debug for TestMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestMesh")
            .field("subnet", &self.subnet)
            .finish_non_exhaustive()
    }
}

impl TestMesh {
    pub async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    /// A mesh whose store has not had its first complete state yet (call
    /// `store.mark_synced()` to deliver it).
    pub async fn unsynced(configure: impl FnOnce(&mut ProxyConfig)) -> Self {
        Self::build(configure, false).await
    }

    /// A mesh whose proxy config is adjusted by `configure` (ports are the
    /// harness's own: 0 for the capture listeners, a free port for HBONE).
    pub async fn with_config(configure: impl FnOnce(&mut ProxyConfig)) -> Self {
        Self::build(configure, true).await
    }

    async fn build(configure: impl FnOnce(&mut ProxyConfig), synced: bool) -> Self {
        let subnet = next_subnet();
        let hbone_port = free_port(ip_in(subnet, 1)).await;
        let mut config = ProxyConfig::default();
        config.ports.outbound = 0;
        config.ports.inbound_plaintext = 0;
        config.ports.hbone = hbone_port;
        config.ports.dns = Some(0);
        config.drain_deadline = PATIENCE;
        configure(&mut config);
        let ca = Arc::new(TestCa::new(&config.trust_domain));
        let signer = TestSigner::new(ca.clone());
        let certificates = signer.manager(ManagerConfig {
            impersonate: true,
            ..ManagerConfig::default()
        });
        let store = WorkloadStore::new();
        if synced {
            store.mark_synced();
        }
        let mut registry = proxy_core::metrics::new_registry();
        let metrics = Metrics::register(&mut registry);
        let manager = ProxyManager::new(config, store.clone(), certificates.clone(), metrics);
        TestMesh {
            ca,
            signer,
            certificates,
            store,
            registry,
            manager,
            subnet,
        }
    }

    /// `127.<subnet>.<host>`.
    pub fn ip(&self, host: u8) -> IpAddr {
        ip_in(self.subnet, host)
    }

    pub fn hbone_port(&self) -> u16 {
        self.manager.config().ports.hbone
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
    pub fn identity(&self, namespace: &str, service_account: &str) -> SpiffeId {
        self.ca.identity(namespace, service_account)
    }

    /// An enrolled pod at `.host`, running as service account `name`: in
    /// the store (HBONE) and proxied.
    pub async fn pod(&self, name: &str, namespace: &str, host: u8) -> TestPod {
        let ip = self.ip(host);
        xds::apply(
            &self.store,
            vec![
                xds::workload(name, namespace, &ip.to_string())
                    .hbone()
                    .into(),
            ],
        );
        self.proxy(name, namespace, name, ip).await
    }

    /// Proxies a pod (the node agent's add), whatever the store says.
    pub async fn proxy(
        &self,
        name: &str,
        namespace: &str,
        service_account: &str,
        ip: IpAddr,
    ) -> TestPod {
        let sockets = LocalSockets::new(ip);
        let info = PodInfo {
            uid: format!("uid-{namespace}-{name}"),
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        let addresses = self
            .manager
            .add(info.clone(), Arc::new(sockets.clone()))
            .await
            .expect("proxy the pod");
        TestPod {
            info,
            ip,
            sockets,
            addresses,
        }
    }

    /// The OpenMetrics text of the mesh's registry.
    pub fn metrics(&self) -> String {
        proxy_core::metrics::encode(&self.registry).expect("metrics encode")
    }

    /// The sum of every series of `name` carrying all of `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until `name` with `labels` reaches `at_least`.
    pub async fn wait_for_counter(&self, name: &str, labels: &[(&str, &str)], at_least: u64) {
        let what = format!("{name} {labels:?} >= {at_least}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.counter(name, labels) < at_least {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; metrics:\n{}",
                self.metrics()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn ip_in(subnet: [u8; 2], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, subnet[0], subnet[1], host))
}

/// A port free on `ip` right now for HBONE, which listens on the same port
/// on every pod address (as 15008 in real pods). It is below the ephemeral
/// range, so no socket bound to port 0 (the capture listeners, clients) can
/// take it on another pod address.
async fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20_000..30_000);
        if TcpListener::bind(SocketAddr::new(ip, port)).await.is_ok() {
            return port;
        }
    }
    panic!("no free port for HBONE on {ip}");
}

/// A proxied pod.
#[derive(Clone, Debug)]
pub struct TestPod {
    pub info: PodInfo,
    pub ip: IpAddr,
    pub sockets: LocalSockets,
    pub addresses: PodAddresses,
}

impl TestPod {
    /// A connection the pod's application opens to `dst`, captured by the
    /// pod's outbound listener as its redirection rules would.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        redirected(self.ip, &self.sockets, self.addresses.outbound, dst).await
    }

    /// A plaintext connection from `from` to this pod's `port`, captured by
    /// its inbound plaintext listener.
    pub async fn connect_plaintext(&self, from: IpAddr, port: u16) -> io::Result<TcpStream> {
        let dst = SocketAddr::new(self.ip, port);
        redirected(from, &self.sockets, self.addresses.inbound_plaintext, dst).await
    }
}

async fn redirected(
    from: IpAddr,
    sockets: &LocalSockets,
    listener: SocketAddr,
    original: SocketAddr,
) -> io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    sockets.redirect(socket.local_addr()?, original);
    socket.connect(listener).await
}

/// Sends `message`, half-closes, and reads the reply to the end.
pub async fn exchange(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
    tokio::time::timeout(PATIENCE, async {
        stream.write_all(message).await?;
        stream.shutdown().await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok(reply)
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))?
}

/// An application that reads until EOF, then answers `<name>: <what it
/// read>` and closes. It remembers who connected.
#[derive(Clone, Debug)]
pub struct EchoApp {
    pub address: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoApp {
    pub async fn start(address: SocketAddr, name: &str) -> EchoApp {
        let listener = TcpListener::bind(address).await.expect("bind the echo app");
        Self::serve(listener, name)
    }

    /// Serves on a listener made elsewhere (inside a pod's netns, say).
    pub fn serve(listener: TcpListener, name: &str) -> EchoApp {
        let address = listener.local_addr().expect("local address");
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let name = name.to_string();
        tokio::spawn({
            let peers = peers.clone();
            async move {
                while let Ok((mut stream, peer)) = listener.accept().await {
                    peers
                        .lock()
                        .expect("lock")
                        .push(super::sockets::canonical(peer));
                    let name = name.clone();
                    tokio::spawn(async move {
                        let mut data = Vec::new();
                        if stream.read_to_end(&mut data).await.is_ok() {
                            let mut reply = format!("{name}: ").into_bytes();
                            reply.extend(data);
                            let _ = stream.write_all(&reply).await;
                            let _ = stream.shutdown().await;
                        }
                    });
                }
            }
        });
        EchoApp { address, peers }
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("lock").clone()
    }
}

/// Workload API resources for tests, applied through the real handlers.
pub mod xds {
    use std::net::IpAddr;

    use api::security::{
        self as sec, Authorization, Clause, Match, Rule, StringMatch, string_match,
    };
    use api::workload::{
        Address, GatewayAddress, LoadBalancing, Locality, NamespacedHostname, NetworkAddress, Port,
        PortList, Service, TunnelProtocol, Workload, WorkloadStatus, address, gateway_address,
        load_balancing,
    };
    use proxy_core::store::WorkloadStore;
    use proxy_core::xds::handlers::{AddressHandler, AuthorizationHandler};
    use proxy_core::xds::{Handler, Update};

    fn bytes(ip: &str) -> Vec<u8> {
        match ip.parse::<IpAddr>().expect("an IP address") {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    fn waypoint_at(ip: &str) -> GatewayAddress {
        GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: bytes(ip),
            })),
            hbone_mtls_port: 0,
        }
    }

    fn waypoint_named(namespace: &str, hostname: &str) -> GatewayAddress {
        GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: namespace.to_string(),
                hostname: hostname.to_string(),
            })),
            hbone_mtls_port: 0,
        }
    }

    /// A pod as istiod describes it.
    #[derive(Clone, Debug)]
    pub struct TestWorkload(pub Workload);

    /// Pod `name` in `namespace` at `ip`, running as service account
    /// `name`, healthy, not enrolled (see [`TestWorkload::hbone`]).
    pub fn workload(name: &str, namespace: &str, ip: &str) -> TestWorkload {
        TestWorkload(Workload {
            uid: format!("Kubernetes//Pod/{namespace}/{name}"),
            name: name.to_string(),
            namespace: namespace.to_string(),
            addresses: vec![bytes(ip)],
            trust_domain: "cluster.local".to_string(),
            service_account: name.to_string(),
            workload_name: name.to_string(),
            canonical_name: name.to_string(),
            canonical_revision: "v1".to_string(),
            node: "node-1".to_string(),
            cluster_id: "Kubernetes".to_string(),
            ..Workload::default()
        })
    }

    impl TestWorkload {
        /// Enrolled: reached over HBONE.
        pub fn hbone(mut self) -> Self {
            self.0.tunnel_protocol = TunnelProtocol::Hbone as i32;
            self
        }

        /// A pod with a sidecar: LEGACY_ISTIO_MTLS.
        pub fn sidecar(mut self) -> Self {
            self.0.tunnel_protocol = TunnelProtocol::LegacyIstioMtls as i32;
            self
        }

        pub fn unhealthy(mut self) -> Self {
            self.0.status = WorkloadStatus::Unhealthy as i32;
            self
        }

        pub fn service_account(mut self, sa: &str) -> Self {
            self.0.service_account = sa.to_string();
            self
        }

        /// Runs on node `node` (default `node-1`).
        pub fn node(mut self, node: &str) -> Self {
            self.0.node = node.to_string();
            self
        }

        /// In this region, zone and subzone (default: none).
        pub fn locality(mut self, region: &str, zone: &str, subzone: &str) -> Self {
            self.0.locality = Some(Locality {
                region: region.to_string(),
                zone: zone.to_string(),
                subzone: subzone.to_string(),
            });
            self
        }

        /// Backs service `namespace/hostname` with these (service port,
        /// target port) mappings.
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

        pub fn waypoint_service(mut self, namespace: &str, hostname: &str) -> Self {
            self.0.waypoint = Some(waypoint_named(namespace, hostname));
            self
        }

        pub fn waypoint_address(mut self, ip: &str) -> Self {
            self.0.waypoint = Some(waypoint_at(ip));
            self
        }

        /// Known by this hostname only, no address (a ServiceEntry's DNS
        /// endpoint).
        pub fn hostname_only(mut self, hostname: &str) -> Self {
            self.0.addresses.clear();
            self.0.hostname = hostname.to_string();
            self
        }

        /// Lists a selector-scoped policy (`namespace/name`).
        pub fn policy(mut self, key: &str) -> Self {
            self.0.authorization_policies.push(key.to_string());
            self
        }

        pub fn uid(&self) -> &str {
            &self.0.uid
        }
    }

    impl From<TestWorkload> for Address {
        fn from(w: TestWorkload) -> Address {
            Address {
                r#type: Some(address::Type::Workload(w.0)),
            }
        }
    }

    #[derive(Clone, Debug)]
    pub struct TestService(pub Service);

    /// Service `name.namespace.svc.cluster.local` at `vip` with these
    /// (service port, target port) mappings.
    pub fn service(name: &str, namespace: &str, vip: &str, ports: &[(u16, u16)]) -> TestService {
        TestService(Service {
            name: name.to_string(),
            namespace: namespace.to_string(),
            hostname: format!("{name}.{namespace}.svc.cluster.local"),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: bytes(vip),
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
        pub fn waypoint_service(mut self, namespace: &str, hostname: &str) -> Self {
            self.0.waypoint = Some(waypoint_named(namespace, hostname));
            self
        }

        pub fn waypoint_address(mut self, ip: &str) -> Self {
            self.0.waypoint = Some(waypoint_at(ip));
            self
        }

        /// Restricted to this IP family.
        pub fn ip_families(mut self, families: api::workload::IpFamilies) -> Self {
            self.0.ip_families = families as i32;
            self
        }

        /// Load balancing as istiod sends it: the scopes in order, the mode
        /// and the health policy.
        pub fn load_balancing(
            mut self,
            scopes: &[load_balancing::Scope],
            mode: load_balancing::Mode,
            health: load_balancing::HealthPolicy,
        ) -> Self {
            self.0.load_balancing = Some(LoadBalancing {
                routing_preference: scopes.iter().map(|s| *s as i32).collect(),
                mode: mode as i32,
                health_policy: health as i32,
                ..LoadBalancing::default()
            });
            self
        }

        /// `namespace/hostname`, the key workloads list it under.
        pub fn key(&self) -> String {
            format!("{}/{}", self.0.namespace, self.0.hostname)
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

    /// Applies the resources as one xDS response would; panics on a NACK.
    pub fn apply(store: &WorkloadStore, addresses: Vec<Address>) {
        let updates = addresses
            .into_iter()
            .map(|a| Update {
                name: name_of(&a),
                resource: Some(a),
            })
            .collect();
        AddressHandler::new(store.clone())
            .apply(updates)
            .expect("the store takes the resources");
    }

    /// Removes workloads (by uid) or services (by `namespace/hostname`).
    pub fn remove(store: &WorkloadStore, names: &[&str]) {
        let updates = names
            .iter()
            .map(|n| Update::<Address> {
                name: n.to_string(),
                resource: None,
            })
            .collect();
        AddressHandler::new(store.clone())
            .apply(updates)
            .expect("removals apply");
    }

    /// Adds or replaces policies; panics on a NACK.
    pub fn apply_policies(store: &WorkloadStore, policies: Vec<Authorization>) {
        let updates = policies
            .into_iter()
            .map(|p| Update {
                name: format!("{}/{}", p.namespace, p.name),
                resource: Some(p),
            })
            .collect();
        AuthorizationHandler::new(store.clone())
            .apply(updates)
            .expect("the store takes the policies");
    }

    pub fn remove_policies(store: &WorkloadStore, keys: &[&str]) {
        let updates = keys
            .iter()
            .map(|k| Update::<Authorization> {
                name: k.to_string(),
                resource: None,
            })
            .collect();
        AuthorizationHandler::new(store.clone())
            .apply(updates)
            .expect("removals apply");
    }

    /// A namespace-scoped policy with one match.
    pub fn policy(name: &str, namespace: &str, action: sec::Action, m: Match) -> Authorization {
        Authorization {
            name: name.to_string(),
            namespace: namespace.to_string(),
            scope: sec::Scope::Namespace as i32,
            action: action as i32,
            rules: vec![Rule {
                clauses: vec![Clause { matches: vec![m] }],
            }],
            dry_run: false,
        }
    }

    pub fn exact(value: &str) -> StringMatch {
        StringMatch {
            match_type: Some(string_match::MatchType::Exact(value.to_string())),
        }
    }

    /// What istiod makes of a STRICT PeerAuthentication, as upstream: deny
    /// every connection without a principal.
    pub fn strict(namespace: &str) -> Authorization {
        policy(
            "istio_converted_static_strict",
            namespace,
            sec::Action::Deny,
            Match {
                not_principals: vec![StringMatch {
                    match_type: Some(string_match::MatchType::Presence(())),
                }],
                ..Match::default()
            },
        )
    }
}
