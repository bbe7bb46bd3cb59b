//! istiod-rs as a running program: one layer per line, from the cluster
//! state to the proxies.
//!
//! ```text
//! source (YAML directory | Kubernetes watchers) -> state::Store --NodeLookup--> CA
//!                                                     |
//!   pipeline (debounce, translate) -> watch<Snapshot> -> XdsServer
//!                                   \-> watch<Statuses> -> status writer
//!                                        (status subresource | <config-dir>/generated/status)
//!                                   \-> watch<OnDemandPlan> -> on-demand waypoint Gateways
//!                                        (server-side apply | <config-dir>/generated/on-demand)
//!                   state::Store changes -> waypoint provisioner (server-side
//!                                        apply + Gateway status | <config-dir>/generated/waypoints)
//!                                                     |
//! gRPC 15012 TLS   : CA + delta ADS (bearer token required)
//! gRPC 15010 plain : CA + delta ADS (token optional; only with --plaintext)
//! HTTPS 15017      : POST /validate, the validating admission webhook
//!                    (Kubernetes mode; its ValidatingWebhookConfiguration is
//!                    kept pointed at istiod)
//! HTTP 15014       : /metrics /ready /debug/syncz /debug/config_dump
//! ```
//!
//! The listeners are bound at start (a taken port fails start-up at once),
//! but gRPC is served only once the first snapshot is published: a proxy
//! that connected earlier would be told the mesh is empty and call itself
//! synced. `/ready` says the same: source synced and first snapshot out.
//! [`App::shutdown`] ends every xDS stream (proxies reconnect elsewhere),
//! lets gRPC connections drain, then stops.

pub mod args;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use proxy_core::listener::{Listener, ListenerMetrics};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::auth::token_file::{TokenFile, TokenFileError};
use crate::auth::token_review::{TokenReviewAuthenticator, TokenReviewConfig};
use crate::ca::impersonation::NodeLookup;
use crate::ca::reload::ReloadMetrics;
use crate::ca::service::CertificateService;
use crate::ca::{CaConfig, CaError, CertificateAuthority, PluginWatcher, root};
use crate::grpc::{GrpcConfig, GrpcError, GrpcServer};
use crate::index::{IpAllocator, MeshConfig, json};
use crate::jwks::JwksConfig;
use crate::monitoring::{self, DebugAccess, Monitoring, MonitoringConfig, Readiness};
use crate::pipeline::{self, Debounce, PipelineMetrics};
use crate::provision::{self, ProvisionConfig, ProvisionMetrics};
use crate::snapshot::Snapshot;
use crate::state::directory::{DirectoryConfig, DirectoryMetrics, DirectorySource};
use crate::state::{self, Store};
use crate::status::{self, StatusConfig, StatusMetrics};
use crate::webhook::configuration::ConfigurationKeeper;
use crate::webhook::{WebhookConfig, WebhookError, WebhookMetrics, WebhookServer};
use crate::xds::{Authentication, SyncStatus, XdsServer};

pub use args::Args;

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Local mode: every YAML file under a directory, polled.
    Directory(DirectoryConfig),
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kubernetes,
    /// A store its owner fills and marks synced (embedding, benchmarks).
    Store(Arc<Store>),
}

/// Who callers are, from their bearer tokens.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// Local mode: a token file (see [`crate::auth::token_file`]).
    File(PathBuf),
    /// Kubernetes TokenReview, audience `istio-ca`.
    TokenReview(TokenReviewConfig),
}

/// Everything istiod-rs is started with; [`Args`] builds it from flags.
#[derive(Clone)]
pub struct AppConfig {
    pub source: Source,
    pub tokens: TokenSource,
    pub ca: CaConfig,
    pub grpc: GrpcConfig,
    pub monitoring: MonitoringConfig,
    pub mesh: MeshConfig,
    pub debounce: Debounce,
    /// How status writes are retried.
    pub status: StatusConfig,
    /// The validating admission webhook; `None`: not served.
    pub webhook: Option<WebhookConfig>,
    /// Waypoint provisioning; `None`: off.
    pub provision: Option<ProvisionConfig>,
    /// The Kubernetes client for the Kubernetes source and TokenReview;
    /// `None`: in-cluster config or KUBECONFIG, made when needed.
    pub kube_client: Option<kube::Client>,
}

impl AppConfig {
    /// Every listener on an ephemeral loopback port, no webhook, no
    /// Kubernetes client given: istiod embedded in tests and benchmarks.
    pub fn on_loopback(source: Source, tokens: TokenSource, ca: CaConfig) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        AppConfig {
            source,
            tokens,
            ca,
            grpc: GrpcConfig {
                tls_addr: loopback,
                ..GrpcConfig::default()
            },
            monitoring: MonitoringConfig {
                addr: loopback,
                ..MonitoringConfig::default()
            },
            mesh: MeshConfig::default(),
            debounce: Debounce::default(),
            status: StatusConfig::default(),
            webhook: None,
            provision: None,
            kube_client: None,
        }
    }
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConfig")
            .field("source", &self.source)
            .field("tokens", &self.tokens)
            .field("ca", &self.ca)
            .field("grpc", &self.grpc)
            .field("monitoring", &self.monitoring)
            .field("mesh", &self.mesh)
            .field("debounce", &self.debounce)
            .field("status", &self.status)
            .field("webhook", &self.webhook)
            .field("provision", &self.provision)
            .field("kube_client", &self.kube_client.as_ref().map(|_| "given"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("the CA could not start (--data-dir, --cacerts-dir, --trust-domain, cert TTLs): {0}")]
    Ca(#[from] CaError),
    #[error("--token-file: {0}")]
    TokenFile(#[from] TokenFileError),
    #[error(
        "could not reach the Kubernetes API (in-cluster config or KUBECONFIG): {0}; run with --config-dir DIR for local mode"
    )]
    Kubernetes(#[from] kube::Error),
    #[error("gRPC listeners (--grpc-addr, --plaintext-addr): {0}")]
    Grpc(#[from] GrpcError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error("--http-addr {addr}: could not listen: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--monitoring-addr {addr}: could not listen: {source}")]
    MonitoringBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("a component of istiod-rs stopped unexpectedly: {0}")]
    Stopped(String),
}

/// Where the running istiod listens (port 0 resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub grpc_tls: SocketAddr,
    pub grpc_plaintext: Option<SocketAddr>,
    pub monitoring: SocketAddr,
    /// The monitoring endpoints on upstream's HTTP port, when served.
    pub http: Option<SocketAddr>,
    /// The validating webhook's HTTPS listener, when served.
    pub webhook: Option<SocketAddr>,
}

/// A running istiod-rs.
pub struct App {
    addresses: Addresses,
    root_cert: PathBuf,
    ca: Arc<CertificateAuthority>,
    store: Arc<Store>,
    published: watch::Receiver<bool>,
    xds: SyncStatus,
    shutdown: CancellationToken,
    grpc: JoinHandle<Result<(), GrpcError>>,
    monitoring: JoinHandle<()>,
    /// Source and pipeline: aborted on shutdown (they run forever).
    background: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addresses", &self.addresses)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Starts every component; returns once the listeners are bound. Errors
    /// name the flag or file to fix.
    pub async fn start(config: AppConfig) -> Result<App, AppError> {
        proxy_core::tls::install_default_provider();
        let AppConfig {
            source,
            tokens,
            ca,
            grpc,
            monitoring: monitoring_config,
            mut mesh,
            debounce,
            status: status_config,
            webhook,
            provision,
            kube_client,
        } = config;

        // CA: plug-in or self-signed root, checked before anything listens.
        let ca = Arc::new(CertificateAuthority::new(ca)?);
        let root_cert = root_cert_path(&ca);

        // Kubernetes client, only when something needs one.
        let needs_kube =
            matches!(source, Source::Kubernetes) || matches!(tokens, TokenSource::TokenReview(_));
        let kube = match kube_client {
            Some(client) if needs_kube => Some(client),
            None if needs_kube => Some(kube::Client::try_default().await?),
            _ => None,
        };

        // One registry for every metric; complete before it is shared.
        let mut registry = Registry::default();
        let listeners = ListenerMetrics::register(registry.sub_registry_with_prefix("istiod"));

        // Authentication of every gRPC caller.
        let authenticator: Arc<dyn Authenticator> = match &tokens {
            TokenSource::File(path) => Arc::new(TokenFile::open(path, ca.trust_domain())?),
            TokenSource::TokenReview(config) => {
                let reviews = TokenReviewAuthenticator::new(
                    kube.clone().expect("a client was made for TokenReview"),
                    ca.trust_domain(),
                    config,
                );
                reviews.register(&mut registry);
                Arc::new(reviews)
            }
        };

        // Listeners first: a taken port fails start-up before anything runs.
        let max_request_bytes = grpc.max_receive_message_bytes;
        // /debug is for istiod's own namespace (and the allowed ones).
        let debug_namespaces: Vec<String> = std::iter::once(grpc.namespace.clone())
            .chain(monitoring_config.debug_namespaces.iter().cloned())
            .collect();
        let grpc_server = GrpcServer::bind(grpc, ca.clone(), &listeners).await?;
        // The webhook presents the same serving certificate as 15012.
        let webhook_metrics = WebhookMetrics::default();
        webhook_metrics.register(&mut registry);
        let webhook_server = match &webhook {
            Some(config) => Some(
                WebhookServer::bind(
                    config,
                    grpc_server.serving_cert().clone(),
                    &mesh.root_namespace,
                    webhook_metrics,
                    &listeners,
                )
                .await?,
            ),
            None => None,
        };
        let monitoring_addr = monitoring_config.addr;
        let monitoring_listener = Listener::bind(
            monitoring_addr,
            monitoring::LISTENER,
            monitoring_config.limits,
            &listeners,
        )
        .await
        .map_err(|source| AppError::MonitoringBind {
            addr: monitoring_addr,
            source,
        })?;
        let http_listener = match monitoring_config.http_addr {
            Some(addr) => Some(
                Listener::bind(
                    addr,
                    monitoring::HTTP_LISTENER,
                    monitoring_config.limits,
                    &listeners,
                )
                .await
                .map_err(|source| AppError::HttpBind { addr, source })?,
            ),
            None => None,
        };
        let addresses = Addresses {
            http: http_listener.as_ref().and_then(|l| l.local_addr().ok()),
            grpc_tls: grpc_server.tls_addr(),
            grpc_plaintext: grpc_server.plaintext_addr(),
            monitoring: monitoring_listener.local_addr().map_err(|source| {
                AppError::MonitoringBind {
                    addr: monitoring_addr,
                    source,
                }
            })?,
            webhook: webhook_server.as_ref().map(WebhookServer::addr),
        };
        let root_namespace = mesh.root_namespace.clone();
        let shutdown = CancellationToken::new();

        // Cluster state, where statuses are written and waypoints provisioned.
        let (store, mut background, status_sink, provision_sink, on_demand_sink) = match source {
            Source::Directory(config) => {
                let store = Store::new();
                let sink =
                    status::Sink::Directory(status::directory::DirectoryStatus::new(&config.dir));
                let provisioner = provision::Sink::Directory(
                    provision::directory::DirectoryProvisioner::new(&config.dir),
                );
                let on_demand = provision::on_demand::OnDemandSink::Directory(
                    provision::on_demand::DirectoryOnDemand::new(&config.dir),
                );
                let metrics = DirectoryMetrics::default();
                metrics.register(&mut registry);
                let source = DirectorySource::with_config(&config).with_metrics(metrics);
                let task = tokio::spawn(source.run(store.clone(), config.poll_interval));
                (
                    store,
                    vec![task],
                    Some(sink),
                    Some(provisioner),
                    Some(on_demand),
                )
            }
            Source::Kubernetes => {
                let store = Store::new();
                let client = kube.expect("a client was made for the Kubernetes source");
                let sink = status::Sink::Kube(status::kube::KubeStatus::new(
                    client.clone(),
                    store.clone(),
                    status::system_clock(),
                ));
                let provisioner = provision::Sink::Kube(provision::kube::KubeProvisioner::new(
                    client.clone(),
                    ca.watch_roots_pem(),
                    status::system_clock(),
                ));
                let on_demand = provision::on_demand::OnDemandSink::Kube(
                    provision::on_demand::KubeOnDemand::new(client.clone()),
                );
                let mut tasks = state::kube::spawn(client.clone(), store.clone());
                // The API server calls the webhook: keep its configuration
                // pointed at istiod.
                if let Some(webhook) = &webhook {
                    let keeper = ConfigurationKeeper::new(
                        client,
                        &webhook.configuration_name,
                        ca.watch_roots_pem(),
                        &root_namespace,
                        (webhook.retry_min, webhook.retry_max),
                    );
                    tasks.push(tokio::spawn(keeper.run(shutdown.clone())));
                }
                (store, tasks, Some(sink), Some(provisioner), Some(on_demand))
            }
            // Its owner writes no statuses and provisions nothing.
            Source::Store(store) => (store, Vec::new(), None, None, None),
        };
        let provision_metrics = Arc::new(ProvisionMetrics::default());
        provision_metrics.register(&mut registry);
        // Waypoints are created on demand only where they are provisioned.
        let on_demand_sink = on_demand_sink.filter(|_| provision.is_some());
        mesh.on_demand_waypoints &= on_demand_sink.is_some();
        let on_demand_retry = provision.clone();
        if let (Some(config), Some(sink)) = (provision, provision_sink) {
            background.push(provision::spawn(
                store.clone(),
                sink,
                config,
                provision_metrics.clone(),
            ));
        }

        let pipeline_metrics = Arc::new(PipelineMetrics::default());
        pipeline_metrics.register(&mut registry);
        // Local mode: the status files are the record of the VIPs given to
        // ServiceEntries (in Kubernetes, their status is in the store).
        let allocator = match &status_sink {
            Some(status::Sink::Directory(d)) => IpAllocator::with_recorded(d.recorded_addresses()),
            _ => IpAllocator::default(),
        };
        let (outputs, pipeline) = pipeline::spawn_with_jwks(
            store.clone(),
            mesh,
            debounce,
            JwksConfig::default(),
            allocator,
            pipeline_metrics,
        );
        background.push(pipeline);
        // Also with waypoints on demand turned off: its plans are then
        // empty, and what it created before is drained and deleted.
        if let (Some(sink), Some(config)) = (on_demand_sink, on_demand_retry) {
            background.push(provision::on_demand::spawn(
                store.clone(),
                outputs.on_demand,
                sink,
                config,
                provision_metrics,
            ));
        }
        let snapshots = outputs.snapshots;
        let status_metrics = Arc::new(StatusMetrics::default());
        status_metrics.register(&mut registry);
        if let Some(sink) = status_sink {
            background.push(status::spawn(
                outputs.statuses,
                sink,
                status_config,
                status_metrics,
            ));
        }
        let xds = XdsServer::new(snapshots.clone(), &mut registry)
            .with_max_request_bytes(max_request_bytes)
            .with_pods(store.clone());
        let nodes: Arc<dyn NodeLookup> = store.clone();
        let certificates =
            CertificateService::new(ca.clone(), authenticator.clone(), nodes, &mut registry);
        // A rotated plug-in CA is picked up without a restart.
        let reload_metrics = ReloadMetrics::default();
        reload_metrics.register(&mut registry);
        // A self-signed root is renewed before it expires.
        background.push(tokio::spawn(crate::ca::keep_root_renewed(
            ca.clone(),
            certificates.metrics().clone(),
            shutdown.clone(),
        )));
        if let Some(watcher) = PluginWatcher::new(ca.clone(), reload_metrics) {
            let watcher = watcher.with_ca_metrics(certificates.metrics().clone());
            background.push(tokio::spawn(
                watcher.run(ca.config().plugin_poll_interval, shutdown.clone()),
            ));
        }

        // The TLS port requires a token for xDS, the plaintext one checks a
        // token only when one is sent. The CA always requires one.
        let certificates = certificates
            .into_server()
            .max_decoding_message_size(max_request_bytes);
        let tls_routes = Routes::new(certificates.clone())
            .add_service(xds.service(Authentication::Required(authenticator.clone())));
        let plaintext_routes = Routes::new(certificates)
            .add_service(xds.service(Authentication::Optional(authenticator.clone())));
        let debug_access = DebugAccess::authenticated(
            authenticator,
            debug_namespaces,
            monitoring_config.debug_auth,
            &mut registry,
        );

        let (published_tx, published) = watch::channel(false);
        background.push(tokio::spawn(first_snapshot(snapshots, published_tx)));

        if let Some(server) = webhook_server {
            background.push(tokio::spawn(server.serve(shutdown.clone())));
        }
        let grpc = tokio::spawn(serve_grpc_when_published(
            grpc_server,
            tls_routes,
            plaintext_routes,
            published.clone(),
            shutdown.clone(),
        ));

        let readiness = readiness(store.clone(), published.clone());
        let status = xds.status();
        let router = Monitoring::new(Arc::new(registry), readiness, status.clone())
            .with_snapshot_json(Arc::new(json::snapshot_json))
            .with_debug_access(debug_access)
            .router();
        let monitoring = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let http = async {
                    if let Some(listener) = http_listener {
                        monitoring::serve(listener, router.clone(), shutdown.clone()).await;
                    }
                };
                tokio::join!(
                    monitoring::serve(monitoring_listener, router.clone(), shutdown.clone()),
                    http
                );
            }
        });

        info!(
            grpc_tls = %addresses.grpc_tls,
            grpc_plaintext = %addresses
                .grpc_plaintext
                .map_or_else(|| "off".to_string(), |a| a.to_string()),
            monitoring = %addresses.monitoring,
            http = %addresses
                .http
                .map_or_else(|| "off".to_string(), |a| a.to_string()),
            webhook = %addresses
                .webhook
                .map_or_else(|| "off".to_string(), |a| a.to_string()),
            root_cert = %root_cert.display(),
            "istiod-rs listening"
        );
        Ok(App {
            addresses,
            root_cert,
            ca,
            store,
            published,
            xds: status,
            shutdown,
            grpc,
            monitoring,
            background,
        })
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// The mesh root certificate (PEM) proxies must trust:
    /// `<data-dir>/root-cert.pem` for the self-signed root, the plug-in
    /// directory's `root-cert.pem` otherwise.
    pub fn root_cert_path(&self) -> &Path {
        &self.root_cert
    }

    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// The cluster state being served.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The xDS server's view of its proxies and snapshot.
    pub fn xds_status(&self) -> &SyncStatus {
        &self.xds
    }

    /// Resolves once the source has synced and the first snapshot is out
    /// (what `/ready` reports).
    pub async fn ready(&self) {
        let mut published = self.published.clone();
        let _ = published.wait_for(|p| *p).await;
    }

    /// Runs until SIGTERM or SIGINT (then shuts down gracefully) or until a
    /// listener fails.
    pub async fn run(mut self) -> Result<(), AppError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).map_err(|source| AppError::Signal {
            signal: "SIGTERM",
            source,
        })?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| AppError::Signal {
            signal: "SIGINT",
            source,
        })?;
        let failure = tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: shutting down"); None }
            _ = interrupt.recv() => { info!("SIGINT: shutting down"); None }
            r = &mut self.grpc => Some(stopped("the gRPC server", r.map(|r| r.map_err(AppError::from)))),
            r = &mut self.monitoring => Some(stopped("the monitoring server", r.map(Ok))),
        };
        self.shutdown().await;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops: ends every xDS stream, lets gRPC connections drain (bounded by
    /// the drain timeout), stops the monitoring server and the source.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        // The pipeline's end closes the snapshot feed, which ends each proxy's
        // stream with UNAVAILABLE: proxies reconnect rather than wait.
        for task in &self.background {
            task.abort();
        }
        if let Ok(Err(error)) = self.grpc.await {
            warn!(%error, "gRPC server ended with an error");
        }
        let _ = self.monitoring.await;
        for task in self.background {
            let _ = task.await;
        }
        info!("istiod-rs stopped");
    }
}

/// Turns a listener task that ended while istiod was running into an error.
fn stopped(what: &str, result: Result<Result<(), AppError>, tokio::task::JoinError>) -> AppError {
    match result {
        Ok(Ok(())) => AppError::Stopped(format!("{what} ended")),
        Ok(Err(e)) => AppError::Stopped(format!("{what}: {e}")),
        Err(e) => AppError::Stopped(format!("{what} panicked: {e}")),
    }
}

/// Where the roots proxies must trust are on disk.
fn root_cert_path(ca: &CertificateAuthority) -> PathBuf {
    match &ca.source() {
        root::RootSource::PlugIn { dir } | root::RootSource::SelfSigned { dir, .. } => {
            dir.join(root::ROOT_CERT)
        }
    }
}

/// Flips `published` when the pipeline publishes its first snapshot (which
/// it does only after the source synced).
async fn first_snapshot(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    published: watch::Sender<bool>,
) {
    if snapshots.changed().await.is_ok() {
        let resources = snapshots.borrow().len();
        info!(resources, "first snapshot of the cluster state published");
        published.send_replace(true);
    }
}

async fn serve_grpc_when_published(
    server: GrpcServer,
    tls_routes: Routes,
    plaintext_routes: Routes,
    mut published: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = published.wait_for(|p| *p) => if r.is_err() { return Ok(()) },
    }
    server
        .serve_each(tls_routes, plaintext_routes, shutdown)
        .await
}

/// `/ready`: the source has synced and the first snapshot is published.
fn readiness(store: Arc<Store>, published: watch::Receiver<bool>) -> Readiness {
    Readiness::new(move || {
        if !store.is_synced() {
            return Err("the configuration source has not delivered the cluster state yet".into());
        }
        if !*published.borrow() {
            return Err("the first snapshot of the cluster state is not published yet".into());
        }
        Ok(())
    })
}
