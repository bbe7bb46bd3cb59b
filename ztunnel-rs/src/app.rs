//! `ztunnel-rs proxy`: the node proxy's wiring, one layer per line.
//!
//! ```text
//! istiod (15012 TLS | 15010) --delta xDS--> XdsClient --handlers--> WorkloadStore --+
//!                            <--CSR------- CertificateManager (impersonating pods) -+--> ProxyManager
//! node agent (ZDS socket) ---pods + netns--> ZdsClient ----------------------------+     (a proxy per pod)
//! 127.0.0.1:15000 admin, :15020 metrics, :15021 readiness (xDS synced + ZDS snapshot)
//! ```
//!
//! SIGTERM (or Ctrl-C): stop taking pods, drain every pod's proxy (listeners
//! close, live connections get until the drain deadline), then stop.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use proxy_core::admin::{AdminState, Readiness, ServerAddrs, ServerConfig, Servers};
use proxy_core::hbone::{Http2Settings, Keepalive};
use proxy_core::identity::{
    CaClient, CertificateManager, ControlPlane, LearnedRoots, ManagerConfig,
};
use proxy_core::listener::ListenerLimits;
use proxy_core::store::WorkloadStore;
use proxy_core::xds::{
    ConnectionState, StatusWatch, XdsClient, XdsConfig, XdsMetrics, handlers, ztunnel_node_id,
};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::inpod::zds::DEFAULT_ZDS_SOCKET;
use crate::inpod::{ZdsClient, ZdsClientConfig};
use crate::proxy::{
    HeldSocketLimits, LoadBalancing, Metrics, PodConnectionLimits, ProxyConfig, ProxyManager,
    WorkloadStateDump, held,
};

/// Readiness conditions, as `/healthz/ready` names them.
pub const XDS_SYNCED: &str = "xds synced";
pub const ZDS_SNAPSHOT: &str = "zds snapshot received";

/// Flags of `ztunnel-rs proxy`; each also reads the environment variable
/// upstream's ztunnel uses where it has one.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// istiod's xDS address, host:port (15012 with TLS, 15010 with --plaintext).
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "istiod.istio-system.svc:15012"
    )]
    pub xds_address: String,
    /// istiod's CA address, when it is not the xDS address.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// The mesh root certificate(s) (PEM) istiod is verified against; re-read
    /// for each new connection to istiod. HBONE peers are verified against
    /// the trust bundle the CA sends with each certificate.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub root_cert: PathBuf,
    /// Talk to istiod without TLS whatever the addresses say (local development only).
    #[arg(long, env = "XDS_PLAINTEXT")]
    pub plaintext: bool,
    /// The name istiod's serving certificate is verified against.
    #[arg(long, env = "XDS_SERVER_NAME", default_value = proxy_core::identity::control_plane::DEFAULT_SERVER_NAME)]
    pub istiod_server_name: String,
    /// The bearer token sent to istiod (re-read on every request).
    #[arg(
        long,
        env = "TOKEN_FILE",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub token_file: PathBuf,
    /// This node's name.
    #[arg(long, visible_alias = "node", env = "NODE_NAME")]
    pub node_name: String,
    /// This ztunnel's IP, for its xDS node id (default: the address it
    /// reaches istiod from).
    #[arg(long, env = "INSTANCE_IP")]
    pub node_ip: Option<IpAddr>,
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The network this node's pods are on (empty: the default network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// The node agent's ZDS socket.
    #[arg(long, env = "ZDS_SOCKET", default_value = DEFAULT_ZDS_SOCKET)]
    pub zds_socket: PathBuf,
    #[arg(long, env = "ADMIN_ADDRESS", default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,
    #[arg(long, env = "STATS_ADDRESS", default_value = "0.0.0.0:15020")]
    pub stats_address: SocketAddr,
    #[arg(long, env = "READINESS_ADDRESS", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,
    /// Connections each of the admin, stats and readiness servers holds at
    /// once; one more is reset (and counted in
    /// istio_listener_connections_dropped_total).
    #[arg(long, env = "SERVER_MAX_CONNECTIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub server_max_connections: u32,
    /// Connections each of those servers holds at once from one address
    /// (a pod): one more is reset, the others' places stay free.
    #[arg(long, env = "SERVER_MAX_CONNECTIONS_PER_PEER", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub server_max_connections_per_peer: u32,
    /// The admin, stats and readiness servers drop a connection whose
    /// request head has not arrived within this (upstream ztunnel: 2s),
    /// also between two requests on one connection.
    #[arg(long, env = "SERVER_HEADER_TIMEOUT", default_value = "2s", value_parser = parse_timeout)]
    pub server_header_timeout: Duration,
    /// The admin, stats and readiness servers drop a connection on which
    /// nothing was read or written for this long.
    #[arg(long, env = "SERVER_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub server_idle_timeout: Duration,
    /// How service endpoints are picked: random or round-robin.
    #[arg(long, env = "LOAD_BALANCING", default_value = "random")]
    pub load_balancing: LoadBalancing,
    /// How long live connections may take to finish on shutdown (e.g. 5s, 500ms, 1m).
    #[arg(long, env = "DRAIN_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Connections to applications keep the client's address as their
    /// source, as without the mesh (needs CAP_NET_ADMIN and the node agent's
    /// in-pod routing; without them applications see their own address).
    #[arg(long, env = "ENABLE_ORIGINAL_SOURCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub original_source: bool,
    /// How long a pod's connection waits for the pod's own workload to
    /// arrive from istiod before it is refused.
    #[arg(long, env = "WORKLOAD_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub workload_wait: Duration,
    /// How long a pod the previous ztunnel still serves (a rolling
    /// upgrade) waits for this one's first xDS state and the pod's
    /// certificate before this one listens there too; 0s listens at once.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub takeover_wait: Duration,
    /// How long the traffic metrics (`istio_tcp_*`) of a workload that
    /// left the mesh stay exported, unused, before they are dropped, so
    /// churn does not grow the proxy; 0s keeps them forever.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub metrics_retention: Duration,
    /// Lifetime asked of the CA for workload certificates.
    #[arg(long, env = "CERTIFICATE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub certificate_ttl: Duration,
    /// HBONE: CONNECT streams a peer may have open at once on one
    /// connection; more are refused with REFUSED_STREAM (upstream: 200).
    #[arg(long, env = "HBONE_MAX_CONCURRENT_STREAMS", default_value_t = Http2Settings::default().max_concurrent_streams)]
    pub hbone_max_concurrent_streams: u32,
    /// HBONE: the largest header list of a CONNECT, in bytes; a larger one
    /// gets 431 (upstream: 64 KiB).
    #[arg(long, env = "HBONE_MAX_HEADER_LIST_SIZE", default_value_t = Http2Settings::default().max_request_header_list)]
    pub hbone_max_header_list_size: u32,
    /// HBONE: how often each connection's peer is sent an HTTP/2 PING.
    #[arg(long, env = "HBONE_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub hbone_ping_interval: Duration,
    /// HBONE: a PING unanswered this long drops the connection as dead.
    #[arg(long, env = "HBONE_PING_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub hbone_ping_timeout: Duration,
    /// TCP keepalive on HBONE connections: idle time before the first probe.
    #[arg(long, env = "KEEPALIVE_TIME", default_value = "180s", value_parser = parse_duration)]
    pub keepalive_time: Duration,
    /// TCP keepalive on HBONE connections: time between probes.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "180s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// TCP keepalive on HBONE connections: unanswered probes before the
    /// connection is dropped.
    #[arg(long, env = "KEEPALIVE_RETRIES", default_value_t = Keepalive::default().tcp_retries)]
    pub keepalive_retries: u32,
    /// Connections to applications on this node that one peer (an HBONE
    /// identity at an address, or a plaintext client address) may hold at
    /// once; more are refused (503 / RST).
    #[arg(long, env = "MAX_HELD_SOCKETS_PER_PEER", default_value_t = HeldSocketLimits::default().per_peer)]
    pub max_held_sockets_per_peer: usize,
    /// Connections to applications on this node held for all peers at once;
    /// more are refused (default: a third of the open-file limit).
    #[arg(long, env = "MAX_HELD_SOCKETS_PER_NODE")]
    pub max_held_sockets_per_node: Option<usize>,
    /// Connections each of a pod's listeners (15001, 15006, 15008, DNS over
    /// TCP) holds at once; one more is reset (counted in
    /// istio_listener_connections_dropped_total{reason="connection_limit"}).
    #[arg(long, env = "POD_MAX_CONNECTIONS",
          default_value_t = PodConnectionLimits::default().per_listener as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_max_connections: u32,
    /// Connections a pod's inbound listeners (15006, 15008) each hold at
    /// once from one address; one more is reset (reason="peer_limit").
    #[arg(long, env = "POD_MAX_CONNECTIONS_PER_PEER",
          default_value_t = PodConnectionLimits::default().per_peer as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_max_connections_per_peer: u32,
    /// Run the DNS proxy on 15053 in every pod (upstream's
    /// `ISTIO_META_DNS_CAPTURE`; `DNS_CAPTURE` is read when that is unset).
    #[arg(long, env = crate::dns::CAPTURE_ENV, default_value_t = crate::dns::capture_default(),
          action = clap::ArgAction::Set)]
    pub dns_capture: bool,
    /// The cluster's DNS domain: Services are `<name>.<ns>.svc.<domain>`.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Where the DNS proxy forwards names the mesh does not know: these
    /// servers (ip or ip:port, repeatable) instead of the nameservers of
    /// --resolv-conf.
    #[arg(long = "dns-server", env = "DNS_SERVERS", value_delimiter = ',', value_parser = parse_dns_server)]
    pub dns_servers: Vec<SocketAddr>,
    /// The resolv.conf whose nameservers unknown names are forwarded to
    /// (ztunnel's own, as upstream).
    #[arg(long, env = "RESOLV_CONF", default_value = crate::dns::forwarder::DEFAULT_RESOLV_CONF)]
    pub resolv_conf: PathBuf,
    /// Answers about service endpoints known by hostname (ServiceEntry DNS
    /// endpoints) each pod keeps; they live for their TTL.
    #[arg(long, env = "ON_DEMAND_DNS_CACHE_SIZE",
          default_value_t = crate::dns::on_demand::DEFAULT_CAPACITY)]
    pub on_demand_dns_cache_size: usize,
    /// How long a failed or empty lookup of such a hostname is remembered
    /// (its connections are refused meanwhile without asking again).
    #[arg(long, env = "ON_DEMAND_DNS_NEGATIVE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub on_demand_dns_negative_ttl: Duration,
}

/// `ip` (port 53) or `ip:port`.
fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is neither an IP address nor ip:port"))
}

impl ProxyArgs {
    /// The upstream resolvers of the DNS proxy and of on-demand lookups:
    /// --dns-server, else the nameservers of --resolv-conf; on-demand
    /// lookups also take its search list and `ndots`. A resolv.conf that
    /// cannot be read leaves the proxy answering the mesh's names only
    /// (forwarded queries get SERVFAIL) and, without --dns-server,
    /// endpoints known by hostname unreachable, and says so; its unusable
    /// lines are skipped with a warning naming them.
    fn dns_config(&self) -> crate::proxy::DnsConfig {
        let conf = match crate::dns::forwarder::read_resolv_conf(&self.resolv_conf) {
            Ok(conf) => Some(conf),
            Err(error) => {
                if self.dns_servers.is_empty() {
                    tracing::warn!(%error, "no upstream resolver; names outside the mesh will not resolve, nor will service endpoints known by hostname");
                } else {
                    tracing::warn!(%error, "no search list for endpoints known by hostname; they are asked as written");
                }
                None
            }
        };
        let servers = if self.dns_servers.is_empty() {
            conf.as_ref()
                .map(crate::dns::forwarder::servers)
                .unwrap_or_default()
        } else {
            self.dns_servers.clone()
        };
        let search = conf.map(|c| c.search).unwrap_or_default();
        if self.dns_capture {
            info!(servers = ?servers, "DNS proxy on; names outside the mesh go to these resolvers");
        }
        crate::proxy::DnsConfig {
            cluster_domain: self.cluster_domain.clone(),
            servers,
            on_demand: crate::dns::on_demand::OnDemandConfig {
                capacity: self.on_demand_dns_cache_size,
                negative_ttl: self.on_demand_dns_negative_ttl,
                search,
            },
            ..crate::proxy::DnsConfig::default()
        }
    }

    /// HBONE's settings from the flags; zero is no value for any of them.
    fn http2(&self) -> anyhow::Result<Http2Settings> {
        let durations = [
            ("--hbone-ping-interval", self.hbone_ping_interval),
            ("--hbone-ping-timeout", self.hbone_ping_timeout),
            ("--keepalive-time", self.keepalive_time),
            ("--keepalive-interval", self.keepalive_interval),
        ];
        if let Some((flag, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            anyhow::bail!("{flag} must be longer than 0");
        }
        let counts = [
            (
                "--hbone-max-concurrent-streams",
                self.hbone_max_concurrent_streams,
            ),
            (
                "--hbone-max-header-list-size",
                self.hbone_max_header_list_size,
            ),
            ("--keepalive-retries", self.keepalive_retries),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, n)| *n == 0) {
            anyhow::bail!("{flag} must be at least 1");
        }
        Ok(Http2Settings {
            max_concurrent_streams: self.hbone_max_concurrent_streams,
            max_request_header_list: self.hbone_max_header_list_size,
            keepalive: Keepalive {
                ping_interval: self.hbone_ping_interval,
                ping_timeout: self.hbone_ping_timeout,
                tcp_time: self.keepalive_time,
                tcp_interval: self.keepalive_interval,
                tcp_retries: self.keepalive_retries,
            },
            ..Http2Settings::default()
        })
    }

    /// The caps on each pod's listeners, from the flags.
    fn pod_connections(&self) -> PodConnectionLimits {
        PodConnectionLimits {
            per_listener: self.pod_max_connections as usize,
            per_peer: self.pod_max_connections_per_peer as usize,
        }
    }

    /// The ceilings on connections held to applications, from the flags.
    fn held_sockets(&self) -> anyhow::Result<HeldSocketLimits> {
        let limits = HeldSocketLimits {
            per_peer: self.max_held_sockets_per_peer,
            per_node: self
                .max_held_sockets_per_node
                .unwrap_or_else(held::node_default),
        };
        if limits.per_peer == 0 || limits.per_node == 0 {
            anyhow::bail!(
                "--max-held-sockets-per-peer and --max-held-sockets-per-node must be at least 1 (a large number lifts them)"
            );
        }
        Ok(limits)
    }
}

/// `250ms`, `30s`, `5m`, `24h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 500ms, 30s, 5m or 24h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "{s:?} has an unknown unit {unit:?}: use ms, s, m or h"
        )),
    }
}

/// A [`parse_duration`] that must be longer than 0: a timeout of 0 would
/// drop every connection at once.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

impl ProxyArgs {
    /// What the admin, stats and readiness servers listen on and allow.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            addrs: ServerAddrs {
                admin: self.admin_address,
                stats: self.stats_address,
                readiness: self.readiness_address,
            },
            limits: ListenerLimits {
                max_connections: self.server_max_connections as usize,
                max_connections_per_peer: self.server_max_connections_per_peer as usize,
                // Plain HTTP: no handshake.
                handshake_timeout: self.server_header_timeout,
                header_timeout: self.server_header_timeout,
                idle_timeout: self.server_idle_timeout,
            },
        }
    }
}

/// The running proxy.
pub struct App {
    pub manager: ProxyManager,
    /// Where the admin, stats and readiness servers listen (port 0 resolved).
    pub servers: ServerAddrs,
    pub readiness: Readiness,
    pub xds: StatusWatch,
    /// Stops taking pods from the node agent.
    zds_stop: CancellationToken,
    /// Stops xDS and the servers.
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    server_tasks: Servers,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// Where istiod is and whether it speaks TLS there, from an address flag.
#[derive(Debug, PartialEq, Eq)]
struct Endpoint {
    host_port: String,
    tls: bool,
}

fn endpoint(flag: &str, address: &str, plaintext: bool) -> anyhow::Result<Endpoint> {
    let (tls, host_port) = match address.split_once("://") {
        Some(("https", rest)) => (!plaintext, rest),
        Some(("http", rest)) => (false, rest),
        Some((scheme, _)) => anyhow::bail!(
            "{flag} {address:?}: unknown scheme {scheme:?}; use https://host:port, http://host:port or host:port"
        ),
        None => (!plaintext, address),
    };
    Ok(Endpoint {
        host_port: host_port.trim_end_matches('/').to_string(),
        tls,
    })
}

fn control_plane(
    args: &ProxyArgs,
    endpoint: &Endpoint,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    learned: &LearnedRoots,
) -> ControlPlane {
    let plane = if endpoint.tls {
        ControlPlane::tls(&endpoint.host_port, roots.to_vec())
            .with_root_file(&args.root_cert)
            .with_learned_roots(learned.clone())
            .with_server_name(&args.istiod_server_name)
    } else {
        ControlPlane::plaintext(&endpoint.host_port)
    };
    plane.with_token_path(&args.token_file)
}

/// The local address this host reaches `host_port` from (a UDP "connect"
/// sends nothing), for the node id when no IP is given.
fn local_ip_towards(host_port: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let target = host_port.to_socket_addrs().ok()?.next()?;
    let unspecified: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

impl App {
    /// Starts everything; returns once the servers listen. istiod and the
    /// node agent may be unreachable: both are retried in the background and
    /// readiness says what is still missing.
    pub async fn start(args: ProxyArgs) -> anyhow::Result<App> {
        proxy_core::tls::install_default_provider();
        let roots = proxy_core::tls::load_pem_certificates(&args.root_cert).with_context(|| {
            format!(
                "--root-cert {}: the mesh root certificate is needed to verify istiod",
                args.root_cert.display()
            )
        })?;
        let xds_endpoint = endpoint("--xds-address", &args.xds_address, args.plaintext)?;
        let ca_endpoint = match &args.ca_address {
            Some(address) => endpoint("--ca-address", address, args.plaintext)?,
            None => endpoint("--xds-address", &args.xds_address, args.plaintext)?,
        };
        // istiod is trusted by the root file and by the roots the CA sends
        // with certificates (a root rotation reaches the latter first).
        let learned = LearnedRoots::default();
        let xds_plane = control_plane(&args, &xds_endpoint, &roots, &learned);
        let ca_plane = control_plane(&args, &ca_endpoint, &roots, &learned);
        let node_ip = args
            .node_ip
            .or_else(|| local_ip_towards(&xds_endpoint.host_port))
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));

        let stop = CancellationToken::new();
        let zds_stop = CancellationToken::new();
        let mut registry = proxy_core::metrics::new_registry();
        let readiness = Readiness::new();
        let store = WorkloadStore::new();

        // Certificates: the pods' identities, asked for as this node's ztunnel.
        let ca = CaClient::new(&ca_plane).context("--ca-address")?;
        let certificates = CertificateManager::new(
            Arc::new(ca),
            ManagerConfig {
                validity: args.certificate_ttl,
                impersonate: true,
                learned_roots: Some(learned.clone()),
                ..ManagerConfig::default()
            },
        );

        // xDS: workloads, services and policies into the store.
        let node_id = ztunnel_node_id(node_ip, &args.pod_name, &args.pod_namespace);
        let channel = xds_plane.channel().context("--xds-address")?;
        let xds =
            handlers::subscribe_store(XdsClient::new(channel, XdsConfig::new(node_id)), &store)
                .with_metadata(xds_plane.xds_metadata())
                .with_metrics(XdsMetrics::register(&mut registry));
        let xds_status = xds.status();
        let mut tasks = vec![tokio::spawn(xds.run(stop.clone()))];
        let xds_synced = readiness.register(XDS_SYNCED);
        // istiod is the CA too: when its xDS stream comes back, identities
        // whose certificate failed during the outage retry at once.
        tasks.push(tokio::spawn({
            let mut status = xds_status.clone();
            let certificates = certificates.clone();
            async move {
                let mut was_connected = false;
                while let Some(now) = status.changed().await {
                    let connected = now.connection == ConnectionState::Connected;
                    if connected && !was_connected {
                        let woken = certificates.retry_failed();
                        if woken > 0 {
                            info!(
                                identities = woken,
                                "control plane back: retrying failed certificates now"
                            );
                        }
                    }
                    was_connected = connected;
                }
            }
        }));
        tasks.push(tokio::spawn({
            let status = xds_status.clone();
            let store = store.clone();
            async move {
                status.synced().await;
                info!("first xDS state received");
                // Pods' listeners start accepting only now.
                store.mark_synced();
                xds_synced.mark_ready();
            }
        }));

        // The proxies, one per pod the node agent hands over.
        let mut config = ProxyConfig {
            cluster_id: args.cluster_id.clone(),
            trust_domain: args.trust_domain.clone(),
            network: args.network.clone(),
            load_balancing: args.load_balancing,
            drain_deadline: args.drain_deadline,
            original_source: args.original_source,
            workload_wait: args.workload_wait,
            takeover_wait: args.takeover_wait,
            node: Some(args.node_name.clone()).filter(|n| !n.is_empty()),
            metrics_retention: args.metrics_retention,
            held_sockets: args.held_sockets()?,
            pod_connections: args.pod_connections(),
            http2: args.http2()?,
            dns: args.dns_config(),
            ..ProxyConfig::default()
        };
        if !args.dns_capture {
            config.ports.dns = None;
        }
        let metrics = Metrics::register(&mut registry);
        let listeners = metrics.listeners.clone();
        let manager = ProxyManager::new(config, store.clone(), certificates.clone(), metrics);
        let zds = Arc::new(ZdsClient::new(
            ZdsClientConfig {
                socket: args.zds_socket.clone(),
                ..ZdsClientConfig::default()
            },
            manager.clone(),
        ));
        let zds_snapshot = readiness.register(ZDS_SNAPSHOT);
        let mut snapshot_received = zds.snapshot_received();
        tasks.push(tokio::spawn(async move {
            if snapshot_received
                .wait_for(|received| *received)
                .await
                .is_ok()
            {
                zds_snapshot.mark_ready();
            }
        }));
        tasks.push(tokio::spawn({
            let stop = zds_stop.clone();
            async move { zds.run(stop.cancelled_owned()).await }
        }));

        // Admin, stats, readiness.
        let admin = AdminState::new(store)
            .with_certificates(certificates)
            .with_config(json!({
                "proxy": manager.config(),
                "node": {
                    "name": args.node_name,
                    "ip": node_ip,
                    "clusterId": args.cluster_id,
                },
                "xdsAddress": args.xds_address,
                "xdsTls": xds_endpoint.tls,
                "caAddress": args.ca_address.as_deref().unwrap_or(&args.xds_address),
                "caTls": ca_endpoint.tls,
                "zdsSocket": args.zds_socket,
            }))
            .with_section(xds_status.clone())
            .with_section(manager.clone())
            .with_section(WorkloadStateDump(manager.clone()));
        let server_tasks = Servers::start(
            args.server_config(),
            admin,
            Arc::new(registry),
            &listeners,
            readiness.clone(),
            stop.clone(),
        )
        .await?;
        info!(
            node = %args.node_name,
            xds = %args.xds_address,
            zds = %args.zds_socket.display(),
            "ztunnel-rs proxy started"
        );
        Ok(App {
            manager,
            servers: server_tasks.addrs,
            readiness,
            xds: xds_status,
            zds_stop,
            stop,
            tasks,
            server_tasks,
        })
    }

    /// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: draining"),
        }
        self.shutdown().await;
        Ok(())
    }

    /// Stops taking pods, drains them (up to the drain deadline), then stops
    /// xDS and the servers.
    pub async fn shutdown(self) {
        self.zds_stop.cancel();
        self.manager.drain().await;
        self.stop.cancel();
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.server_tasks.join().await;
        info!("ztunnel-rs proxy stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiod_addresses_say_whether_to_use_tls() {
        let tls = |host_port: &str| Endpoint {
            host_port: host_port.into(),
            tls: true,
        };
        let plain = |host_port: &str| Endpoint {
            host_port: host_port.into(),
            tls: false,
        };
        let e =
            |address: &str, plaintext: bool| endpoint("--xds-address", address, plaintext).unwrap();
        assert_eq!(e("https://10.0.0.1:15012", false), tls("10.0.0.1:15012"));
        assert_eq!(
            e("https://istiod.istio-system.svc:15012/", false),
            tls("istiod.istio-system.svc:15012")
        );
        assert_eq!(e("http://10.0.0.1:15010", false), plain("10.0.0.1:15010"));
        assert_eq!(e("10.0.0.1:15012", false), tls("10.0.0.1:15012"));
        assert_eq!(e("10.0.0.1:15010", true), plain("10.0.0.1:15010"));
        let err = endpoint("--ca-address", "grpc://x:1", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--ca-address") && err.contains("unknown scheme"),
            "{err}"
        );
    }

    #[test]
    fn the_node_ip_defaults_to_the_route_towards_istiod() {
        assert_eq!(
            local_ip_towards("127.0.0.1:15012"),
            Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
        );
        assert_eq!(local_ip_towards("not an address"), None);
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn args(flags: &[&str]) -> ProxyArgs {
        use clap::Parser;
        let argv = ["ztunnel-rs", "--node-name", "n"].iter().chain(flags);
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn hbone_limits_default_to_upstream_s_and_refuse_zero() {
        let http2 = args(&[]).http2().unwrap();
        let defaults = Http2Settings::default();
        assert_eq!(http2.max_concurrent_streams, 200);
        assert_eq!(http2.max_request_header_list, 64 * 1024);
        assert_eq!(http2.keepalive, defaults.keepalive);
        assert_eq!(http2.keepalive.ping_interval, Duration::from_secs(10));
        assert_eq!(http2.keepalive.ping_timeout, Duration::from_secs(20));
        assert_eq!(http2.keepalive.tcp_time, Duration::from_secs(180));

        let held = args(&[]).held_sockets().unwrap();
        assert_eq!(held, HeldSocketLimits::default());
        let held = args(&["--max-held-sockets-per-node", "10"])
            .held_sockets()
            .unwrap();
        assert_eq!(held.per_node, 10);
        assert_eq!(args(&[]).pod_connections(), PodConnectionLimits::default());
        let pod = args(&["--pod-max-connections-per-peer", "3"]).pod_connections();
        assert_eq!(pod.per_peer, 3);

        let err = args(&["--hbone-ping-timeout", "0"]).http2().unwrap_err();
        assert!(err.to_string().contains("--hbone-ping-timeout"), "{err}");
        let err = args(&["--hbone-max-concurrent-streams", "0"])
            .http2()
            .unwrap_err();
        assert!(
            err.to_string().contains("--hbone-max-concurrent-streams"),
            "{err}"
        );
        let err = args(&["--max-held-sockets-per-peer", "0"])
            .held_sockets()
            .unwrap_err();
        assert!(err.to_string().contains("per-peer"), "{err}");
    }

    #[test]
    fn server_limits_default_to_the_documented_values() {
        use clap::Parser;
        assert_eq!(
            args(&[]).server_config().limits,
            ServerConfig::DEFAULT_LIMITS
        );
        let limits = args(&[
            "--server-max-connections",
            "7",
            "--server-header-timeout",
            "500ms",
        ])
        .server_config()
        .limits;
        assert_eq!(limits.max_connections, 7);
        assert_eq!(limits.header_timeout, Duration::from_millis(500));
        for bad in [
            ["--server-max-connections", "0"],
            ["--server-idle-timeout", "0s"],
            ["--pod-max-connections", "0"],
            ["--pod-max-connections-per-peer", "0"],
        ] {
            let argv = ["ztunnel-rs", "--node-name", "n", bad[0], bad[1]];
            let err = Cli::try_parse_from(argv)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(bad[0]), "{err}");
        }
    }

    #[test]
    fn durations_read_like_upstream_flags() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(
            parse_duration("5 days")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
