//! The L4 proxy: one instance per enrolled pod, each listening inside its
//! pod's network namespace, all sharing the node's workload store,
//! certificate manager and metrics.
//!
//! ```text
//!  pod app --(redirected)--> 15001 outbound ---------- HBONE / TCP ---------> peer
//!  peer ----- HBONE --------> 15008 inbound ----------- TCP, in the pod ----> pod app
//!  peer ----- plaintext ----> 15006 inbound_passthrough  (policy, no identity)
//!  pod app --(DNS, captured)-> 15053 dns: the store's answer, or upstream's
//! ```
//!
//! - [`ProxyManager`]: the pods being proxied; the node agent's requests
//!   (add / del / keep / snapshot done) become calls here. Certificates are
//!   held per identity while a pod with that identity is here.
//! - [`route`]: outbound decisions; [`admission`]: the inbound decision
//!   (policy only, HBONE and plaintext alike); [`revocation`]: admitted
//!   connections decided again on every policy change; [`outbound`],
//!   [`inbound`], [`inbound_passthrough`]: the three listeners; [`metrics`]:
//!   traffic metrics and the access log; [`sockets`]: where sockets come
//!   from (in production, the pod's network namespace from the node agent);
//!   [`held`]: the per-peer and per-node ceiling on sockets held open to
//!   applications for peers; [`connections`]: the live connections, for
//!   the admin's `workloadState` ([`WorkloadStateDump`]); [`dns`]: the
//!   pod's DNS proxy listeners (UDP and TCP).
//!
//! Fail closed: a pod's listeners accept only once the store holds a
//! complete state (the first xDS sync); a connection whose own pod's
//! workload is missing waits for it (`workload_wait`) and is refused if it
//! does not come.
//!
//! Drain: listeners stop accepting at once, HBONE peers get GOAWAY, live
//! connections may finish until the deadline, then they are closed.

pub mod admission;
pub mod connect_headers;
pub mod connections;
pub mod dns;
pub mod held;
pub mod inbound;
pub mod inbound_passthrough;
mod inpod;
pub mod metrics;
pub mod outbound;
mod prefetch;
pub mod revocation;
pub mod route;
pub mod sockets;
mod splice;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
use proxy_core::admin::DumpSection;
use proxy_core::hbone::{HboneError, HbonePool, HboneServer, Http2Settings, PoolConfig};
use proxy_core::identity::{CertificateManager, FetchError, WorkloadCertificate};
use proxy_core::listener::{Listener, ListenerLimits};
use proxy_core::log_limit::LogLimit;
use proxy_core::store::{Snapshot, Workload, WorkloadStore};
use rustls::ServerConfig;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::dns::on_demand::{OnDemand, OnDemandConfig, SystemClock};

pub use held::HeldSocketLimits;
pub use metrics::Metrics;
pub use route::LoadBalancing;
pub use sockets::{ConnectError, LocalSockets, PodConnect, PodSockets};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {uid}: cannot listen on port {port} ({sockets}): {source}")]
    Listen {
        uid: String,
        port: u16,
        sockets: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pod {uid}: the node agent sent no {field}; the proxy needs it to know the pod's identity"
    )]
    MissingInfo { uid: String, field: &'static str },
    #[error("pod {uid}: no valid identity: {source}")]
    Identity {
        uid: String,
        #[source]
        source: api::IdentityError,
    },
    #[error("pod {uid} is not proxied here; the node agent must add it first")]
    UnknownPod { uid: String },
}

/// The listener ports inside each pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    /// Also the port peers are dialled on.
    pub hbone: u16,
    /// The DNS proxy, UDP and TCP (`None`: no DNS proxy, upstream's
    /// `ISTIO_META_DNS_CAPTURE=false`).
    pub dns: Option<u16>,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: api::ports::ZTUNNEL_OUTBOUND,
            inbound_plaintext: api::ports::ZTUNNEL_INBOUND_PLAINTEXT,
            hbone: api::ports::HBONE,
            dns: Some(api::ports::DNS),
        }
    }
}

impl Ports {
    /// Connections to these would loop back into the proxy.
    fn contains(&self, port: u16) -> bool {
        [self.outbound, self.inbound_plaintext, self.hbone].contains(&port)
    }
}

/// Connections each of a pod's listeners (15001, 15006, 15008, DNS over
/// TCP) holds at once. Each holds a file descriptor of the process, which
/// every pod on the node shares, from accept until it ends, carried or not:
/// without a cap one pod, or one peer, could take them all. One more is
/// reset at once and counted in
/// `istio_listener_connections_dropped_total{listener, reason}`.
/// Upstream ztunnel has no such cap (its `src/config.rs` has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodConnectionLimits {
    /// On each listener of one pod, from everyone.
    pub per_listener: usize,
    /// From one address on a pod's inbound listeners (15006, 15008): one
    /// client pod, node or waypoint. The outbound and DNS listeners serve
    /// the pod's own applications, one address: `per_listener` alone.
    pub per_peer: usize,
}

impl Default for PodConnectionLimits {
    /// 1024 per peer, as [`HeldSocketLimits`]: a peer with more
    /// connections than it may hold sockets to applications gains nothing
    /// from them; 8192 per listener.
    fn default() -> Self {
        PodConnectionLimits {
            per_listener: 8192,
            per_peer: HeldSocketLimits::default().per_peer,
        }
    }
}

impl PodConnectionLimits {
    /// The caps of an inbound listener (15006, 15008).
    fn inbound(self) -> ListenerLimits {
        ListenerLimits::caps(self.per_listener, self.per_peer.min(self.per_listener))
    }

    /// The caps of a listener serving the pod's own applications.
    fn local(self) -> ListenerLimits {
        ListenerLimits::caps(self.per_listener, self.per_listener)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Workload uids are `<cluster>//Pod/<namespace>/<name>`.
    pub cluster_id: String,
    pub trust_domain: String,
    /// The network this node's pods are on (empty: the default network).
    pub network: String,
    pub ports: Ports,
    pub load_balancing: LoadBalancing,
    /// How long live connections may take to finish once a pod (or the
    /// proxy) drains.
    #[serde(with = "seconds")]
    pub drain_deadline: Duration,
    /// How long connecting to a next hop (TCP, or HBONE up to the CONNECT
    /// answer) may take. An HBONE connection whose CONNECT takes longer
    /// takes no new streams.
    #[serde(with = "seconds")]
    pub connect_timeout: Duration,
    /// Connections to applications keep the client's address as their
    /// source (upstream's `ENABLE_ORIGINAL_SOURCE`).
    pub original_source: bool,
    /// How long a connection waits for its pod's own workload to appear in
    /// the store before it is refused (upstream waits 5 s).
    #[serde(with = "seconds")]
    pub workload_wait: Duration,
    /// How long a pod another proxy already serves (a new ztunnel started
    /// beside the old one) waits for this proxy's first xDS state and the
    /// pod's certificate before its listeners open; the old proxy serves
    /// every new connection meanwhile. Zero opens them at once.
    #[serde(with = "seconds")]
    pub takeover_wait: Duration,
    /// How long the traffic metrics of a workload that left the mesh stay
    /// exported, unused, before they are dropped; zero keeps them forever.
    #[serde(with = "seconds")]
    pub metrics_retention: Duration,
    /// Ceilings on connections to applications held for peers.
    pub held_sockets: HeldSocketLimits,
    /// Caps on the connections each pod's listeners hold.
    pub pod_connections: PodConnectionLimits,
    /// Each pod's HBONE pool; its `http2` and `connect_timeout` are taken
    /// from the fields here ([`Self::pool_config`]).
    #[serde(skip)]
    pub pool: PoolConfig,
    /// HTTP/2 settings and limits of HBONE, both directions.
    #[serde(skip)]
    pub http2: Http2Settings,
    /// The DNS proxy's names and upstream resolvers.
    pub dns: DnsConfig,
    /// The node this proxy serves (upstream's `NODE_NAME`): certificates of
    /// the HBONE workloads the store places on it are fetched before their
    /// pods are handed over ([`prefetch`]). None: nothing is prefetched.
    pub node: Option<String>,
}

/// The DNS proxy's settings (it runs when [`Ports::dns`] is set).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsConfig {
    /// Services are `<name>.<namespace>.svc.<cluster domain>`.
    pub cluster_domain: String,
    /// Where unknown names are forwarded (by default the nameservers of
    /// ztunnel's own `/etc/resolv.conf`, as upstream).
    pub servers: Vec<SocketAddr>,
    /// How long one upstream resolver may take to answer.
    #[serde(with = "seconds")]
    pub upstream_timeout: Duration,
    /// Lookups of workloads known by hostname only (they use `servers`
    /// too, with or without the DNS proxy).
    pub on_demand: OnDemandConfig,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            cluster_domain: "cluster.local".to_string(),
            servers: Vec::new(),
            upstream_timeout: crate::dns::forwarder::DEFAULT_TIMEOUT,
            on_demand: OnDemandConfig::default(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            cluster_id: "Kubernetes".to_string(),
            trust_domain: "cluster.local".to_string(),
            network: String::new(),
            ports: Ports::default(),
            load_balancing: LoadBalancing::default(),
            drain_deadline: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            original_source: true,
            workload_wait: Duration::from_secs(5),
            takeover_wait: Duration::from_secs(5),
            metrics_retention: Duration::from_secs(300),
            held_sockets: HeldSocketLimits::default(),
            pod_connections: PodConnectionLimits::default(),
            pool: PoolConfig::default(),
            http2: Http2Settings::default(),
            dns: DnsConfig::default(),
            node: None,
        }
    }
}

impl ProxyConfig {
    /// The pool of a pod, with this config's HTTP/2 settings and connect
    /// timeout.
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            connect_timeout: self.connect_timeout,
            http2: self.http2.clone(),
            ..self.pool.clone()
        }
    }
}

mod seconds {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// What the node agent says about a pod.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    /// The pod's Kubernetes uid, as the node agent names it.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// Where a pod's listeners ended up (port 0 resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAddresses {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub hbone: SocketAddr,
    /// UDP and TCP, when the DNS proxy runs.
    pub dns: Option<SocketAddr>,
}

/// What every pod's proxy shares.
struct Node {
    config: ProxyConfig,
    store: WorkloadStore,
    certificates: CertificateManager,
    metrics: Arc<Metrics>,
    balancer: route::Balancer,
    /// What holds each identity: a certificate is renewed while a pod here
    /// runs as it or the store has it on this node ([`prefetch`]).
    identities: Mutex<HashMap<SpiffeId, prefetch::Holders>>,
    /// Inbound connections, decided again on every policy change.
    live: Arc<revocation::LiveConnections>,
    /// Connections to applications held for peers.
    held: Arc<held::HeldSockets>,
    /// Every connection carried, while it is carried.
    tracker: Arc<connections::Tracker>,
    /// Every pod's DNS proxy, when it runs.
    dns: Option<Arc<dns::DnsProxy>>,
}

impl Node {
    fn lock_identities(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, prefetch::Holders>> {
        self.identities.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold_identity(&self, identity: &SpiffeId) {
        self.lock_identities()
            .entry(identity.clone())
            .or_default()
            .pods += 1;
    }

    fn release_identity(&self, identity: &SpiffeId) {
        let mut identities = self.lock_identities();
        if let Some(holders) = identities.get_mut(identity) {
            holders.pods = holders.pods.saturating_sub(1);
            if holders.pods == 0 && !holders.in_store {
                identities.remove(identity);
                self.certificates.forget(identity);
            }
        }
    }
}

/// One pod's proxy as its connections see it.
struct Pod {
    info: Arc<PodInfo>,
    identity: SpiffeId,
    /// The pod's uid in the workload store.
    workload_uid: String,
    sockets: Arc<dyn PodSockets>,
    pool: HbonePool,
    node: Arc<Node>,
    /// Cancelled when the drain deadline passes: every connection closes.
    force: CancellationToken,
    connections: TaskTracker,
    /// The TLS config for the pod's current certificate, rebuilt on renewal.
    server_config: Mutex<Option<(Arc<WorkloadCertificate>, Arc<ServerConfig>)>>,
    /// Lookups of endpoints known by hostname, from the pod's sockets, and
    /// their answers: per pod, since each pod's resolvers may differ (in
    /// the local cluster the upstream resolver is on the pod's loopback).
    on_demand: OnDemand,
}

impl Pod {
    /// The pod's workload: by uid, else by the address it was seen at.
    fn workload(&self, snapshot: &Snapshot, ip: IpAddr) -> Option<Arc<Workload>> {
        snapshot
            .workload_by_uid(&self.workload_uid)
            .or_else(|| snapshot.workload_by_address(&self.node.config.network, ip))
    }

    /// The pod's workload, waiting up to the configured time for it to
    /// arrive (a pod just added is often ahead of its workload); `None`
    /// when it did not: the caller refuses the connection.
    async fn wait_for_workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let store = &self.node.store;
        let found = store
            .wait_for(self.node.config.workload_wait, |s| self.workload(s, ip))
            .await;
        if found.is_none() {
            // Every connection to or from the pod says so in the access log;
            // this line is bounded.
            static MISSING: LogLimit = LogLimit::new(Duration::from_secs(10));
            if let Some(suppressed) = MISSING.allow() {
                warn!(
                    pod = %self.info.uid,
                    workload = %self.workload_uid,
                    waited = ?self.node.config.workload_wait,
                    suppressed,
                    "the pod's workload is not in the workload store; refusing its traffic (is istiod reachable, and does it know the pod?)"
                );
            }
        }
        found
    }

    /// A place for one more connection to the pod's application held for
    /// `peer`; refused (and warned about, bounded) past a ceiling.
    fn hold_socket(&self, peer: held::Peer) -> Result<held::HeldSocket, held::Error> {
        self.node.held.hold(peer).inspect_err(held::Error::warn)
    }

    async fn certificate(&self) -> Result<Arc<WorkloadCertificate>, FetchError> {
        self.node.certificates.fetch(&self.identity).await
    }

    /// The HBONE server config presenting the pod's certificate.
    async fn server_config(&self) -> Result<Arc<ServerConfig>, HboneError> {
        let cert = self.certificate().await?;
        let mut cached = self.server_config.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((for_cert, config)) = cached.as_ref()
            && Arc::ptr_eq(for_cert, &cert)
        {
            return Ok(config.clone());
        }
        let config = proxy_core::tls::hbone_server_config(&cert)?;
        *cached = Some((cert, config.clone()));
        Ok(config)
    }

    /// A connection from the pod to `target`, within the connect timeout.
    async fn connect(&self, target: SocketAddr) -> Result<TcpStream, ConnectError> {
        self.timed_connect(target, self.sockets.connect(target))
            .await
    }

    /// A connection to the application in the pod at `target` on behalf of
    /// `client`: with the client's address as its source unless
    /// `original_source` is off.
    async fn connect_app(
        &self,
        target: SocketAddr,
        client: IpAddr,
    ) -> Result<TcpStream, ConnectError> {
        let connecting = if self.node.config.original_source {
            self.sockets.connect_as(target, client)
        } else {
            self.sockets.connect(target)
        };
        self.timed_connect(target, connecting).await
    }

    async fn timed_connect(
        &self,
        target: SocketAddr,
        connecting: sockets::SocketFuture<'_, TcpStream>,
    ) -> Result<TcpStream, ConnectError> {
        let timeout = self.node.config.connect_timeout;
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(stream)) => {
                // Proxied bytes go on at once, as on the accepted side.
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(source)) => Err(ConnectError::Failed { target, source }),
            Err(_) => Err(ConnectError::Timeout { target, timeout }),
        }
    }

    /// Lists a carried connection of this pod until the guard drops;
    /// `record` holds its byte counts.
    fn track(
        &self,
        connection: connections::Carried,
        record: &metrics::ConnectionRecord,
    ) -> connections::Tracked {
        let connection = connections::Connection {
            pod: self.info.clone(),
            carried: connection,
        };
        self.node.tracker.track(connection, record.pod_bytes())
    }

    /// Runs one connection's work until it ends or the drain deadline.
    fn spawn_connection(&self, work: impl Future<Output = ()> + Send + 'static) {
        let force = self.force.clone();
        self.connections.spawn(async move {
            tokio::select! {
                () = work => {}
                () = force.cancelled() => {}
            }
        });
    }
}

/// Accepts on `listener` until `stop`, within `limits` (a connection past
/// them is reset and counted), handling each connection as one of the
/// pod's connections; it counts against the caps until it ends.
async fn accept_loop<F, Fut>(
    listener_name: &'static str,
    limits: ListenerLimits,
    pod: &Arc<Pod>,
    listener: TcpListener,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(Arc<Pod>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Nothing is decided on a partial view of the mesh: before the first
    // complete xDS state, connections wait in the listen backlog (they are
    // neither refused nor carried) and are handled once it has arrived.
    let store = &pod.node.store;
    if !store.is_synced() {
        info!(pod = %pod.info.uid, listener = listener_name, "waiting for the first complete xDS state before accepting");
        tokio::select! {
            () = store.synced() => {}
            () = stop.cancelled() => return,
        }
    }
    let listener = Listener::new(listener, listener_name, limits, &pod.node.metrics.listeners);
    loop {
        let admitted = tokio::select! {
            admitted = listener.accept() => admitted,
            () = stop.cancelled() => break,
        };
        let (stream, peer, slot) = admitted.into_parts();
        // Small writes (handshakes, interactive protocols) must not wait.
        let _ = stream.set_nodelay(true);
        let work = handle(pod.clone(), stream, peer);
        pod.spawn_connection(async move {
            work.await;
            drop(slot);
        });
    }
    tracing::debug!(pod = %pod.info.uid, listener = listener_name, "stopped accepting");
}

/// A running pod proxy.
struct PodProxy {
    pod: Arc<Pod>,
    addresses: PodAddresses,
    /// Cancelled to stop accepting.
    accept: CancellationToken,
    /// The three accept loops.
    listeners: TaskTracker,
    hbone: HboneServer<inbound::Handler>,
}

/// Returns once a pod another proxy already listens for (a takeover: a new
/// ztunnel started beside the old one, which keeps serving until this one is
/// ready) can be served here without waiting: this proxy has its first xDS
/// state and the pod's certificate. Listening earlier would have the kernel
/// hand this proxy a share of the pod's new connections (the listeners join
/// the old one's `SO_REUSEPORT` group) that then wait for both. Bounded by
/// [`ProxyConfig::takeover_wait`]; a pod nobody serves (a new pod, or a
/// restart after the old proxy died) gets its listeners at once, since any
/// wait would refuse its connections instead of queueing them.
async fn ready_to_take_over(
    node: &Node,
    info: &PodInfo,
    identity: &SpiffeId,
    sockets: &dyn PodSockets,
) {
    let bound = node.config.takeover_wait;
    if bound.is_zero() {
        return;
    }
    match sockets.listened(node.config.ports.hbone).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(error) => {
            warn!(pod = %info.uid, %error, "cannot tell whether another proxy serves the pod; listening at once");
            return;
        }
    }
    let started = std::time::Instant::now();
    let ready = async {
        node.store.synced().await;
        node.certificates.fetch(identity).await
    };
    match tokio::time::timeout(bound, ready).await {
        Ok(Ok(_)) => info!(
            pod = %info.uid,
            waited_ms = started.elapsed().as_millis() as u64,
            "taking the pod over from the proxy that serves it"
        ),
        Ok(Err(error)) => warn!(
            pod = %info.uid, %error,
            "taking the pod over without its certificate"
        ),
        Err(_) => warn!(
            pod = %info.uid,
            waited = ?bound,
            synced = node.store.is_synced(),
            "taking the pod over before this proxy is ready for it"
        ),
    }
}

impl PodProxy {
    async fn start(
        node: Arc<Node>,
        info: PodInfo,
        sockets: Arc<dyn PodSockets>,
    ) -> Result<PodProxy, Error> {
        let identity = SpiffeId::new(
            &node.config.trust_domain,
            &info.namespace,
            &info.service_account,
        )
        .map_err(|source| Error::Identity {
            uid: info.uid.clone(),
            source,
        })?;
        let ports = node.config.ports;
        ready_to_take_over(&node, &info, &identity, sockets.as_ref()).await;
        let listen = |port: u16| {
            let sockets = sockets.clone();
            let uid = info.uid.clone();
            async move {
                sockets.listen(port).await.map_err(|source| Error::Listen {
                    uid,
                    port,
                    sockets: sockets.describe(),
                    source,
                })
            }
        };
        let outbound = listen(ports.outbound).await?;
        let inbound_plaintext = listen(ports.inbound_plaintext).await?;
        let hbone_listener = listen(ports.hbone).await?;
        let dns_listeners = match (ports.dns, &node.dns) {
            (Some(port), Some(_)) => {
                let tcp = listen(port).await?;
                // Port 0 (tests): UDP takes the port TCP got.
                let port = tcp.local_addr().map_or(port, |a| a.port());
                let udp = sockets
                    .listen_udp(port)
                    .await
                    .map_err(|source| Error::Listen {
                        uid: info.uid.clone(),
                        port,
                        sockets: sockets.describe(),
                        source,
                    })?;
                Some((udp, tcp))
            }
            _ => None,
        };
        let local = |l: &TcpListener| l.local_addr().ok().map(sockets::canonical);
        let addresses = match (
            local(&outbound),
            local(&inbound_plaintext),
            local(&hbone_listener),
        ) {
            (Some(outbound), Some(inbound_plaintext), Some(hbone)) => PodAddresses {
                outbound,
                inbound_plaintext,
                hbone,
                dns: dns_listeners.as_ref().and_then(|(_, tcp)| local(tcp)),
            },
            _ => {
                return Err(Error::Listen {
                    uid: info.uid.clone(),
                    port: 0,
                    sockets: sockets.describe(),
                    source: std::io::Error::other("a listener has no local address"),
                });
            }
        };
        let pool = HbonePool::with_metrics(
            node.config.pool_config(),
            Arc::new(sockets::PodConnect(sockets.clone())),
            node.metrics.hbone.clone(),
        );
        let workload_uid = format!(
            "{}//Pod/{}/{}",
            node.config.cluster_id, info.namespace, info.name
        );
        let on_demand = OnDemand::new(
            crate::dns::Forwarder::new(
                node.config.dns.servers.clone(),
                node.config.dns.upstream_timeout,
            ),
            node.config.dns.on_demand.clone(),
            Arc::new(SystemClock),
        );
        node.hold_identity(&identity);
        let pod = Arc::new(Pod {
            info: Arc::new(info),
            identity,
            workload_uid,
            sockets,
            pool,
            node,
            force: CancellationToken::new(),
            connections: TaskTracker::new(),
            server_config: Mutex::new(None),
            on_demand,
        });
        let hbone = HboneServer::with_metrics(
            inbound::Handler::new(pod.clone()),
            pod.node.config.http2.clone(),
            pod.node.metrics.hbone.clone(),
        );
        let accept = CancellationToken::new();
        let listeners = TaskTracker::new();
        let tasks = &listeners;
        tasks.spawn(outbound::serve(pod.clone(), outbound, accept.clone()));
        tasks.spawn(inbound_passthrough::serve(
            pod.clone(),
            inbound_plaintext,
            accept.clone(),
        ));
        tasks.spawn(inbound::serve(
            pod.clone(),
            hbone.clone(),
            hbone_listener,
            accept.clone(),
        ));
        if let (Some((udp, tcp)), Some(dns)) = (dns_listeners, &pod.node.dns) {
            for udp in udp {
                tasks.spawn(dns::serve_udp(
                    pod.clone(),
                    dns.clone(),
                    udp,
                    accept.clone(),
                ));
            }
            tasks.spawn(dns::serve_tcp(
                pod.clone(),
                dns.clone(),
                tcp,
                accept.clone(),
            ));
        }
        // Upstream fetches the certificate as the pod arrives, so its first
        // connection does not wait for the CA; failures retry in the manager.
        // Counted as a connection: the identity is released only after it,
        // so a pod removed at once cannot leave a certificate renewing.
        pod.connections.spawn({
            let (pod, stop) = (pod.clone(), accept.clone());
            async move {
                tokio::select! {
                    fetched = pod.certificate() => if let Err(error) = fetched {
                        warn!(pod = %pod.info.uid, %error, "no certificate for the pod yet");
                    },
                    () = stop.cancelled() => {}
                }
            }
        });
        info!(
            pod = %pod.info.uid,
            name = %pod.info.name,
            namespace = %pod.info.namespace,
            identity = %pod.identity,
            sockets = %pod.sockets.describe(),
            outbound = %addresses.outbound,
            inbound_plaintext = %addresses.inbound_plaintext,
            hbone = %addresses.hbone,
            dns = ?addresses.dns,
            "proxying pod"
        );
        listeners.close();
        Ok(PodProxy {
            pod,
            addresses,
            accept,
            listeners,
            hbone,
        })
    }

    /// Stops accepting, lets connections finish until the deadline, then
    /// closes what is left.
    /// Closes the listeners (returns once they are closed, so the ports
    /// are free) and sends GOAWAY to HBONE peers; then the connections get
    /// until `deadline` in the background, and are cut.
    async fn drain(self, deadline: Duration) -> Drain {
        self.accept.cancel();
        self.hbone.shutdown_token().cancel();
        // Once the loops are gone no connection can be added.
        self.listeners.wait().await;
        Drain(tokio::spawn(Self::finish(self.pod, deadline)))
    }

    async fn finish(pod: Arc<Pod>, deadline: Duration) {
        pod.connections.close();
        if tokio::time::timeout(deadline, pod.connections.wait())
            .await
            .is_err()
        {
            warn!(
                pod = %pod.info.uid,
                open = pod.connections.len(),
                ?deadline,
                "drain deadline passed; closing the pod's remaining connections"
            );
            pod.force.cancel();
            pod.connections.wait().await;
        }
        pod.node.release_identity(&pod.identity);
        info!(pod = %pod.info.uid, "stopped proxying pod");
    }

    fn dump(&self) -> Value {
        json!({
            "info": &*self.pod.info,
            "identity": self.pod.identity.to_string(),
            "sockets": self.pod.sockets.describe(),
            "addresses": self.addresses,
            "connections": self.pod.connections.len(),
            "hboneConnectionsOut": self.pod.pool.open_connections(),
            "hboneConnectionsIn": self.hbone.live_connections(),
            "resolvedHostnames": self.pod.on_demand.dump(),
        })
    }
}

/// A pod's connections draining; await it to know they are all gone.
#[derive(Debug)]
#[must_use = "the drain continues in the background; await it to wait for the end"]
pub struct Drain(tokio::task::JoinHandle<()>);

impl Drain {
    pub async fn finished(self) {
        // The task only fails by panicking, which the runtime has reported.
        let _ = self.0.await;
    }
}

/// The pods this node proxies. Cheap to clone; clones share the pods.
#[derive(Clone)]
pub struct ProxyManager {
    node: Arc<Node>,
    pods: Arc<Mutex<HashMap<String, PodProxy>>>,
}

impl std::fmt::Debug for ProxyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyManager")
            .field("pods", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// Drops the traffic series of workloads that left the mesh
/// ([`Metrics::expire`]), sweeping every half `retention`, at most every
/// minute, once the store has had its first complete state. Ends when the
/// metrics are gone.
fn expire_series(
    metrics: std::sync::Weak<Metrics>,
    store: WorkloadStore,
    retention: Duration,
) -> tokio::task::JoinHandle<()> {
    let every = (retention / 2).clamp(Duration::from_millis(10), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(metrics) = metrics.upgrade() else {
                break;
            };
            if !store.is_synced() {
                continue;
            }
            let snapshot = store.snapshot();
            let present: HashSet<(&str, &str)> = snapshot
                .workloads()
                .map(|w| (w.namespace.as_str(), w.workload_name.as_str()))
                .collect();
            let dropped = metrics.expire(std::time::Instant::now(), retention, &|ns, name| {
                present.contains(&(ns, name))
            });
            if dropped > 0 {
                tracing::debug!(
                    label_sets = dropped,
                    "dropped the traffic metrics of workloads that left the mesh"
                );
            }
        }
    })
}

impl ProxyManager {
    pub fn new(
        config: ProxyConfig,
        store: WorkloadStore,
        certificates: CertificateManager,
        metrics: Arc<Metrics>,
    ) -> Self {
        let live = Arc::new(revocation::LiveConnections::default());
        // Ends when the manager (and so the registry) is gone.
        drop(revocation::watch(store.clone(), Arc::downgrade(&live)));
        if !config.metrics_retention.is_zero() {
            drop(expire_series(
                Arc::downgrade(&metrics),
                store.clone(),
                config.metrics_retention,
            ));
        }
        let dns = config.ports.dns.and_then(|_| {
            match crate::dns::Domains::new(&config.dns.cluster_domain) {
                Ok(domains) => Some(Arc::new(dns::DnsProxy {
                    domains,
                    forwarder: crate::dns::Forwarder::new(
                        config.dns.servers.clone(),
                        config.dns.upstream_timeout,
                    ),
                })),
                Err(error) => {
                    warn!(cluster_domain = %config.dns.cluster_domain, %error,
                          "the cluster domain is not a DNS name; the DNS proxy is off");
                    None
                }
            }
        });
        // Subscribed before the node is shared: no change is missed.
        let changes = store.subscribe();
        let node = Arc::new(Node {
            balancer: route::Balancer::new(config.load_balancing),
            held: held::HeldSockets::new(config.held_sockets),
            config,
            store,
            certificates,
            metrics,
            identities: Mutex::default(),
            live,
            tracker: Arc::default(),
            dns,
        });
        prefetch::spawn(Arc::downgrade(&node), changes);
        ProxyManager {
            node,
            pods: Arc::default(),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.node.config
    }

    /// Starts proxying `pod` with `sockets`. Adding a pod already here with
    /// the same sockets keeps it as it is; with new sockets (its sandbox was
    /// recreated) the new proxy starts and the old one drains.
    pub async fn add(
        &self,
        pod: PodInfo,
        sockets: Arc<dyn PodSockets>,
    ) -> Result<PodAddresses, Error> {
        for (field, value) in [
            ("pod name", &pod.name),
            ("pod namespace", &pod.namespace),
            ("service account", &pod.service_account),
        ] {
            if value.is_empty() {
                return Err(Error::MissingInfo {
                    uid: pod.uid.clone(),
                    field,
                });
            }
        }
        let deadline = self.node.config.drain_deadline;
        let same_sockets = {
            let pods = self.lock();
            match pods.get(&pod.uid) {
                Some(running)
                    if *running.pod.info == pod
                        && running.pod.sockets.describe() == sockets.describe() =>
                {
                    return Ok(running.addresses);
                }
                Some(running) => running.pod.sockets.describe() == sockets.describe(),
                None => false,
            }
        };
        // Same sockets, new details: the old listeners hold the ports.
        let stale = if same_sockets {
            self.lock().remove(&pod.uid)
        } else {
            None
        };
        if let Some(old) = stale {
            drop(old.drain(deadline).await);
        }
        let uid = pod.uid.clone();
        let proxy = PodProxy::start(self.node.clone(), pod, sockets).await?;
        let addresses = proxy.addresses;
        let replaced = self.lock().insert(uid, proxy);
        if let Some(old) = replaced {
            drop(old.drain(deadline).await);
        }
        Ok(addresses)
    }

    /// Stops proxying the pod (it is gone). Its listeners are closed when
    /// this returns; its connections drain in the background (see [`Drain`]).
    pub async fn del(&self, uid: &str) -> Option<Drain> {
        let removed = self.lock().remove(uid);
        match removed {
            Some(proxy) => Some(proxy.drain(self.node.config.drain_deadline).await),
            None => {
                info!(pod = uid, "asked to stop proxying a pod that is not here");
                None
            }
        }
    }

    /// The node agent still has the pod but could not hand over its
    /// namespace again: keep what runs for it.
    pub fn keep(&self, uid: &str) -> Result<(), Error> {
        if self.lock().contains_key(uid) {
            Ok(())
        } else {
            Err(Error::UnknownPod {
                uid: uid.to_string(),
            })
        }
    }

    /// The node agent's snapshot is complete: pods it did not name are gone
    /// (as [`Self::del`]: listeners closed now, connections drained).
    pub async fn snapshot_done(&self, known: &HashSet<String>) -> Vec<Drain> {
        let stale: Vec<PodProxy> = {
            let mut pods = self.lock();
            let gone: Vec<String> = pods
                .keys()
                .filter(|uid| !known.contains(*uid))
                .cloned()
                .collect();
            gone.iter().filter_map(|uid| pods.remove(uid)).collect()
        };
        let deadline = self.node.config.drain_deadline;
        futures::future::join_all(stale.into_iter().map(|p| p.drain(deadline))).await
    }

    /// Drains every pod and waits until their connections are gone (the
    /// proxy is shutting down).
    pub async fn drain(&self) {
        let all: Vec<PodProxy> = self.lock().drain().map(|(_, p)| p).collect();
        let deadline = self.node.config.drain_deadline;
        let drains = futures::future::join_all(all.into_iter().map(|p| p.drain(deadline))).await;
        futures::future::join_all(drains.into_iter().map(Drain::finished)).await;
    }

    /// The uids of the pods proxied, sorted.
    pub fn pods(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.lock().keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Where a pod's listeners are.
    pub fn addresses(&self, uid: &str) -> Option<PodAddresses> {
        self.lock().get(uid).map(|p| p.addresses)
    }

    /// `/config_dump`'s `workloadState`: each pod proxied (`Up`) and its
    /// live connections; a pod already removed whose connections still
    /// drain is listed as `Draining` with them.
    pub fn workload_state(&self) -> api::workload_state::WorkloadStates {
        use api::workload_state::{Connections, WorkloadInfo, WorkloadState};
        let trust_domain = &self.node.config.trust_domain;
        let info = |pod: &PodInfo| WorkloadInfo {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            trust_domain: trust_domain.clone(),
        };
        let mut live = self.node.tracker.by_pod();
        let mut states = api::workload_state::WorkloadStates::new();
        for (uid, proxy) in self.lock().iter() {
            // A pod replaced under the same uid has its old connections here too.
            let connections = live
                .remove(uid)
                .map_or_else(Connections::default, |c| Connections {
                    inbound: c.inbound,
                    outbound: c.outbound,
                });
            let state = WorkloadState {
                state: "Up".into(),
                connections,
                info: info(&proxy.pod.info),
            };
            states.insert(uid.clone(), state);
        }
        for (uid, draining) in live {
            let state = WorkloadState {
                state: "Draining".into(),
                connections: Connections {
                    inbound: draining.inbound,
                    outbound: draining.outbound,
                },
                info: info(&draining.pod),
            };
            states.insert(uid, state);
        }
        states
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodProxy>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `/config_dump` key `pods`: what runs for each pod.
impl DumpSection for ProxyManager {
    fn key(&self) -> &'static str {
        "pods"
    }

    fn describe(&self) -> &'static str {
        "each pod proxied: its listeners, identity, connection counts, hostnames it resolved"
    }

    fn dump(&self) -> Value {
        let pods = self.lock();
        let mut uids: Vec<&String> = pods.keys().collect();
        uids.sort();
        Value::Array(uids.into_iter().map(|uid| pods[uid].dump()).collect())
    }
}

/// `/config_dump` key `workloadState` (upstream ztunnel's): every pod and
/// its live connections ([`ProxyManager::workload_state`]).
pub struct WorkloadStateDump(pub ProxyManager);

impl DumpSection for WorkloadStateDump {
    fn key(&self) -> &'static str {
        api::workload_state::KEY
    }

    fn describe(&self) -> &'static str {
        "each pod and its live connections (istioctl-rs ztunnel-config connections)"
    }

    fn dump(&self) -> Value {
        serde_json::to_value(self.0.workload_state()).unwrap_or(Value::Null)
    }
}
