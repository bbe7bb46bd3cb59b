//! `waypoint-rs`: the wiring, one layer per line.
//!
//! ```text
//! istiod (15012 TLS | 15010) --delta xDS (waypoint~ node id)--> XdsClient --AddressHandler--> WorkloadStore
//!                            (the five L7 types)                        --config::subscribe--> L7Store
//!                            <--CSR (own identity)------------- CertificateManager
//! source ztunnels --HBONE 15008--> HboneServer --Inbound (validate, detect)--> Proxy --Upstream--> HbonePool --> endpoints' ztunnels
//! 127.0.0.1:15000 admin (/config_dump), :15020 metrics, :15021 readiness (xDS synced + certificate)
//! ```
//!
//! SIGTERM (or Ctrl-C): not ready, GOAWAY to every HBONE client, inner HTTP
//! connections asked to finish, live tunnels get until the drain deadline,
//! then everything stops.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use api::SpiffeId;
use proxy_core::admin::{AdminState, Readiness, ServerAddrs, Servers};
use proxy_core::hbone::{
    DirectConnect, HboneError, HbonePool, HboneServer, Http2Settings, PoolConfig,
};
use proxy_core::identity::{
    CaClient, CertificateManager, ControlPlane, LearnedRoots, ManagerConfig,
};
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use proxy_core::log_limit::LogLimit;
use proxy_core::store::WorkloadStore;
use proxy_core::xds::handlers::AddressHandler;
use proxy_core::xds::{ConnectionState, OnDemand, StatusWatch, XdsClient, XdsConfig, XdsMetrics};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::WaypointDump;
use crate::args::WaypointArgs;
use crate::config::L7Store;
use crate::drain::Drain;
use crate::inbound::{Inbound, Me};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyConfig};
use crate::upstream::Upstream;

/// Readiness conditions, as `/healthz/ready` names them.
pub const XDS_SYNCED: &str = "xds synced";
pub const CERTIFICATE: &str = "certificate";
/// Registered (and never met) once draining starts.
pub const DRAINING: &str = "draining";

/// What the data path needs, whoever wires it (the app, a test).
pub struct DataPathConfig {
    pub proxy: ProxyConfig,
    pub http2: Http2Settings,
    pub pool: PoolConfig,
    pub hbone_address: SocketAddr,
    /// Caps of the HBONE listener.
    pub hbone_limits: ListenerLimits,
    /// Where the HBONE listener counts what it drops and holds.
    pub listeners: ListenerMetrics,
    pub store: WorkloadStore,
    /// The L7 configuration (routes, policies, traffic policies).
    pub l7: L7Store,
    /// Issues the waypoint's own certificate.
    pub certificates: CertificateManager,
    pub identity: SpiffeId,
    pub metrics: Arc<Metrics>,
    /// Subscribes to client workloads by address (None: no lookups).
    pub on_demand: Option<OnDemand>,
}

/// The data path, running: HBONE server → inbound → proxy → upstream.
pub struct DataPath {
    pub proxy: Arc<Proxy>,
    /// Where HBONE is taken (port 0 resolved).
    pub hbone: SocketAddr,
    pub drain: Drain,
    /// Cancel to stop accepting HBONE and send GOAWAY to every client.
    pub hbone_shutdown: CancellationToken,
    /// The HBONE accept loop.
    pub task: JoinHandle<()>,
}

impl DataPath {
    /// Binds the HBONE listener and serves it.
    pub async fn start(config: DataPathConfig) -> std::io::Result<DataPath> {
        let DataPathConfig {
            proxy,
            http2,
            pool,
            hbone_address,
            hbone_limits,
            listeners,
            store,
            l7,
            certificates,
            identity,
            metrics,
            on_demand,
        } = config;
        let pool = HbonePool::with_metrics(pool, Arc::new(DirectConnect), metrics.hbone.clone());
        let upstream = Upstream::new(
            pool,
            certificates.clone(),
            identity.clone(),
            proxy.upstream.clone(),
        );
        let hbone_metrics = metrics.hbone.clone();
        let proxy = Arc::new(Proxy::new(store, l7, upstream, metrics, proxy, on_demand));
        let drain = Drain::new();
        let inbound = Inbound {
            proxy: proxy.clone(),
            drain: drain.clone(),
        };
        let server = HboneServer::with_metrics(inbound, http2, hbone_metrics);
        let listener = Listener::new(
            tokio::net::TcpListener::bind(hbone_address).await?,
            "hbone",
            hbone_limits,
            &listeners,
        );
        let hbone = listener.local_addr()?;
        let hbone_shutdown = server.shutdown_token();
        let task = tokio::spawn(async move {
            server
                .serve(listener, move |_local| {
                    let certificates = certificates.clone();
                    let identity = identity.clone();
                    async move {
                        let certificate = certificates.fetch(&identity).await?;
                        Ok::<_, HboneError>(proxy_core::tls::hbone_server_config(&certificate)?)
                    }
                })
                .await
        });
        Ok(DataPath {
            proxy,
            hbone,
            drain,
            hbone_shutdown,
            task,
        })
    }

    /// Drains: refuses new tunnels (GOAWAY, 503), asks inner HTTP
    /// connections to finish, waits for live tunnels up to `deadline`.
    /// True if they all ended in time.
    pub async fn drain(&self, deadline: std::time::Duration) -> bool {
        self.hbone_shutdown.cancel();
        self.drain.drain(deadline).await
    }
}

/// The running waypoint.
pub struct App {
    /// Where the admin, stats and readiness servers listen (port 0 resolved).
    pub servers: ServerAddrs,
    /// Where HBONE is taken (port 0 resolved).
    pub hbone: SocketAddr,
    pub readiness: Readiness,
    pub xds: StatusWatch,
    pub drain: Drain,
    drain_deadline: std::time::Duration,
    hbone_shutdown: CancellationToken,
    /// Stops xDS and the servers.
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    server_tasks: Servers,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("servers", &self.servers)
            .field("hbone", &self.hbone)
            .finish_non_exhaustive()
    }
}

/// `https://host:port`, `http://host:port` or `host:port` (TLS unless
/// --plaintext).
fn control_plane(
    flag: &str,
    address: &str,
    args: &WaypointArgs,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    learned: &LearnedRoots,
) -> anyhow::Result<ControlPlane> {
    let (tls, host_port) = match address.split_once("://") {
        Some(("https", rest)) => (!args.plaintext, rest),
        Some(("http", rest)) => (false, rest),
        Some((scheme, _)) => anyhow::bail!(
            "{flag} {address:?}: unknown scheme {scheme:?}; use https://host:port, http://host:port or host:port"
        ),
        None => (!args.plaintext, address),
    };
    let host_port = host_port.trim_end_matches('/');
    let plane = if tls {
        ControlPlane::tls(host_port, roots.to_vec())
            .with_root_file(&args.root_cert)
            .with_learned_roots(learned.clone())
            .with_server_name(&args.istiod_server_name)
    } else {
        ControlPlane::plaintext(host_port)
    };
    Ok(plane.with_token_path(&args.token_file))
}

impl App {
    /// Starts everything; returns once every listener is bound. istiod may
    /// be unreachable: it is retried in the background and readiness says
    /// what is still missing.
    pub async fn start(args: WaypointArgs) -> anyhow::Result<App> {
        proxy_core::tls::install_default_provider();
        crate::http::jwt::crypto_provider().context("JWT verification")?;
        let roots = proxy_core::tls::load_pem_certificates(&args.root_cert).with_context(|| {
            format!(
                "--root-cert {}: the mesh root certificate is needed to verify istiod",
                args.root_cert.display()
            )
        })?;
        let identity = args.identity()?;
        let config = args.proxy()?;
        // istiod is trusted by the root file and by the roots the CA sends
        // with certificates (a root rotation reaches the latter first).
        let learned = LearnedRoots::default();
        let xds_plane = control_plane("--xds-address", &args.xds_address, &args, &roots, &learned)?;
        let ca_plane = match &args.ca_address {
            Some(address) => control_plane("--ca-address", address, &args, &roots, &learned)?,
            None => control_plane("--xds-address", &args.xds_address, &args, &roots, &learned)?,
        };

        let stop = CancellationToken::new();
        let mut registry = proxy_core::metrics::new_registry();
        let readiness = Readiness::new();
        let store = WorkloadStore::new();
        let mut tasks = Vec::new();

        // The waypoint's own certificate (no impersonation: istiod's CA
        // issues the identity of the token's service account).
        let ca = CaClient::new(&ca_plane).context("--ca-address")?;
        let certificates = CertificateManager::new(
            Arc::new(ca),
            ManagerConfig {
                validity: args.certificate_ttl,
                impersonate: false,
                learned_roots: Some(learned.clone()),
                ..ManagerConfig::default()
            },
        );
        let certificate_ready = readiness.register(CERTIFICATE);
        tasks.push(tokio::spawn({
            let certificates = certificates.clone();
            let identity = identity.clone();
            async move {
                static FAILED: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));
                loop {
                    match certificates.fetch(&identity).await {
                        Ok(_) => break,
                        Err(error) => {
                            if let Some(suppressed) = FAILED.allow() {
                                tracing::warn!(%error, suppressed, "no certificate yet");
                            }
                            tokio::time::sleep(ManagerConfig::default().demand_retry).await;
                        }
                    }
                }
                info!(%identity, "certificate issued");
                certificate_ready.mark_ready();
            }
        }));

        // xDS: the workload API (services, workloads) into the store.
        let node_id = proxy_core::xds::waypoint_node_id(
            args.instance_ip,
            &args.pod_name,
            &args.pod_namespace,
        );
        let channel = xds_plane.channel().context("--xds-address")?;
        let l7 = L7Store::new();
        let xds = XdsClient::new(channel, XdsConfig::new(node_id))
            .with_handler(api::type_url::ADDRESS, AddressHandler::new(store.clone()));
        let xds = crate::config::subscribe(xds, &l7)
            .with_metadata(xds_plane.xds_metadata())
            .with_metrics(XdsMetrics::register(&mut registry));
        let xds_status = xds.status();
        let on_demand = xds.on_demand();
        tasks.push(tokio::spawn(xds.run(stop.clone())));
        let xds_synced = readiness.register(XDS_SYNCED);
        tasks.push(tokio::spawn({
            let status = xds_status.clone();
            let store = store.clone();
            async move {
                status.synced().await;
                info!("first xDS state received");
                store.mark_synced();
                xds_synced.mark_ready();
            }
        }));
        // istiod is the CA too: when it is back, a failed certificate retries now.
        tasks.push(tokio::spawn({
            let mut status = xds_status.clone();
            let certificates = certificates.clone();
            async move {
                let mut was_connected = false;
                while let Some(now) = status.changed().await {
                    let connected = now.connection == ConnectionState::Connected;
                    if connected && !was_connected {
                        certificates.retry_failed();
                    }
                    was_connected = connected;
                }
            }
        }));

        // The data path: HBONE in, the proxy, HBONE out.
        let metrics = Metrics::register(&mut registry);
        let listeners = ListenerMetrics::register(&mut registry);
        let me = Me {
            ip: args.instance_ip,
            network: args.network.clone(),
        };
        let data_path = DataPath::start(DataPathConfig {
            proxy: config.clone(),
            http2: args.http2()?,
            pool: args.pool()?,
            hbone_address: args.hbone_address,
            hbone_limits: args.hbone_limits(),
            listeners: listeners.clone(),
            store: store.clone(),
            l7: l7.clone(),
            certificates: certificates.clone(),
            identity: identity.clone(),
            metrics,
            on_demand: Some(on_demand),
        })
        .await
        .with_context(|| format!("--hbone-address {}: cannot listen", args.hbone_address))?;
        let hbone = data_path.hbone;
        let drain = data_path.drain.clone();
        let hbone_shutdown = data_path.hbone_shutdown.clone();
        let proxy = data_path.proxy.clone();
        tasks.push(data_path.task);

        // Admin, stats, readiness.
        let admin = AdminState::new(store)
            .with_certificates(certificates)
            .with_config(json!({
                "proxy": config,
                "identity": identity.to_string(),
                "node": {
                    "pod": args.pod_name,
                    "namespace": args.pod_namespace,
                    "ip": args.instance_ip,
                    "clusterId": args.cluster_id,
                },
                "hbone": hbone,
                "xdsAddress": args.xds_address,
                "caAddress": args.ca_address.as_deref().unwrap_or(&args.xds_address),
            }))
            .with_section(xds_status.clone())
            .with_section(l7)
            .with_section(WaypointDump {
                proxy,
                me,
                identity: identity.clone(),
                drain: drain.clone(),
            });
        let server_tasks = Servers::start(
            args.server_config(),
            admin,
            Arc::new(registry),
            &listeners,
            readiness.clone(),
            stop.clone(),
        )
        .await?;
        info!(%identity, %hbone, xds = %args.xds_address, "waypoint-rs started");
        Ok(App {
            servers: server_tasks.addrs,
            hbone,
            readiness,
            xds: xds_status,
            drain,
            drain_deadline: config.drain_deadline,
            hbone_shutdown,
            stop,
            tasks,
            server_tasks,
        })
    }

    /// Runs until SIGTERM or Ctrl-C, then drains.
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

    /// Not ready from now on, refuses new tunnels, lets live ones finish
    /// (up to the drain deadline), then stops xDS and the servers.
    pub async fn shutdown(self) {
        let _draining = self.readiness.register(DRAINING);
        self.hbone_shutdown.cancel();
        let live = self.drain.live();
        if self.drain.drain(self.drain_deadline).await {
            info!(tunnels = live, "drained");
        } else {
            tracing::warn!(
                still_open = self.drain.live(),
                deadline = ?self.drain_deadline,
                "drain deadline reached; closing what is left"
            );
        }
        self.stop.cancel();
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.server_tasks.join().await;
        info!("waypoint-rs stopped");
    }
}
