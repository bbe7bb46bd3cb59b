//! istiod-rs's HTTP monitoring server (port 15014): `/metrics` (the process's
//! one Prometheus registry, OpenMetrics text), `/ready` (503 with the reason
//! until the configuration source has synced), `/debug/syncz` (every
//! connected proxy's xDS sync state) and `/debug/config_dump` (the snapshot
//! being served). Every error is JSON: `{"error": "..."}`.
//!
//! `/metrics` and `/ready` answer anyone. `/debug/*` shows every workload,
//! address, identity and policy of the mesh, so, as upstream istiod's
//! (`pilot/pkg/xds/debug.go`, `allowAuthenticatedOrLocalhost` with its
//! namespace authorization, `ENABLE_DEBUG_ENDPOINT_AUTH`,
//! `DEBUG_ENDPOINT_AUTH_ALLOWED_NAMESPACES`), it answers a loopback client
//! (`kubectl exec ... curl localhost:15014`), or a caller whose bearer token
//! istiod's authenticator accepts and whose identity is in istiod's own
//! namespace or an allowed one: 401 without a valid token, 403 from another
//! namespace, each counted in `istiod_debug_refusals_total{reason}` and
//! logged at most once per interval. Upstream lets other namespaces read the
//! config dump of their own namespace's proxies; istiod-rs's dump is the
//! whole mesh, so they get nothing.
//!
//! The server is a proxy-core [`Listener`]: a connection cap, header and
//! idle timeouts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proxy_core::listener::{Listener, ListenerLimits};
use proxy_core::log_limit::LogLimit;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthError, Authenticator};
use crate::snapshot::Snapshot;
use crate::xds::SyncStatus;

/// The listener's name in metrics and logs.
pub const LISTENER: &str = "monitoring";
/// The same endpoints on upstream's HTTP port.
pub const HTTP_LISTENER: &str = "http";

/// How the monitoring server is set up; part of istiod-rs's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitoringConfig {
    /// Upstream: 15014.
    pub addr: SocketAddr,
    /// Where the same endpoints are served too, upstream istiod's HTTP port
    /// (8080), which its Deployment's readiness probe asks for `/ready`.
    pub http_addr: Option<SocketAddr>,
    pub limits: ListenerLimits,
    /// `/debug/*` only for loopback and authenticated callers of allowed
    /// namespaces (upstream's `ENABLE_DEBUG_ENDPOINT_AUTH`, on by default).
    pub debug_auth: bool,
    /// Namespaces whose callers may read `/debug/*` besides istiod's own
    /// (upstream's `DEBUG_ENDPOINT_AUTH_ALLOWED_NAMESPACES`).
    pub debug_namespaces: Vec<String>,
}

impl MonitoringConfig {
    /// A scrape, a probe or a debug request needs a connection or two and
    /// sends its request at once; 256 connections (32 from one address, so
    /// one pod cannot starve the kubelet's `/ready` probe), 10 s for a
    /// request head and a minute without a byte either way leave room for
    /// every legitimate client (upstream's monitoring server sets no limit).
    pub const DEFAULT_LIMITS: ListenerLimits = ListenerLimits {
        max_connections: 256,
        max_connections_per_peer: 32,
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], api::ports::ISTIOD_MONITORING)),
            http_addr: None,
            limits: MonitoringConfig::DEFAULT_LIMITS,
            debug_auth: true,
            debug_namespaces: Vec::new(),
        }
    }
}

/// Why a `/debug` request was refused (a metric label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DebugRefusal {
    /// No bearer token, or one the authenticator rejects: 401.
    unauthenticated,
    /// A valid token of a namespace that may not read `/debug`: 403.
    forbidden,
    /// The authenticator could not answer (TokenReview down): 503.
    unavailable,
}

impl DebugRefusal {
    fn status(self) -> StatusCode {
        match self {
            DebugRefusal::unauthenticated => StatusCode::UNAUTHORIZED,
            DebugRefusal::forbidden => StatusCode::FORBIDDEN,
            DebugRefusal::unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: DebugRefusal,
}

/// Who may read `/debug/*`.
#[derive(Clone)]
pub struct DebugAccess {
    /// `false`: anyone (`ENABLE_DEBUG_ENDPOINT_AUTH=false`).
    enforced: bool,
    /// `None`: loopback clients only.
    authenticator: Option<Arc<dyn Authenticator>>,
    namespaces: BTreeSet<String>,
    refusals: Family<RefusalLabels, Counter>,
}

impl DebugAccess {
    /// Loopback clients only (what a [`Monitoring`] starts with).
    pub fn loopback_only() -> Self {
        DebugAccess {
            enforced: true,
            authenticator: None,
            namespaces: BTreeSet::new(),
            refusals: Family::default(),
        }
    }

    /// Loopback clients, and callers `authenticator` accepts whose identity
    /// is in one of `namespaces` (istiod's own and the allowed ones);
    /// refusals are counted in `registry`. `enforced: false` opens `/debug`
    /// to anyone.
    pub fn authenticated(
        authenticator: Arc<dyn Authenticator>,
        namespaces: impl IntoIterator<Item = String>,
        enforced: bool,
        registry: &mut Registry,
    ) -> Self {
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "istiod_debug_refusals",
            "Requests to /debug/* on the monitoring port refused, by reason (unauthenticated: 401, forbidden: 403, unavailable: 503)",
            refusals.clone(),
        );
        DebugAccess {
            enforced,
            authenticator: Some(authenticator),
            namespaces: namespaces.into_iter().collect(),
            refusals,
        }
    }

    /// How many `/debug` requests were refused for `reason`.
    pub fn refusals(&self, reason: DebugRefusal) -> u64 {
        self.refusals.get_or_create(&RefusalLabels { reason }).get()
    }

    /// Whether a request from `peer` with `headers` may read `/debug`:
    /// `Err` is the response to send instead.
    async fn check(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Result<(), Response> {
        if !self.enforced || peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) {
            return Ok(());
        }
        let Some(authenticator) = &self.authenticator else {
            let message = "/debug is served to loopback clients only".to_string();
            return Err(self.refuse(peer, DebugRefusal::forbidden, message));
        };
        let caller = match auth::http_bearer_token(headers) {
            Ok(token) => authenticator.authenticate(token).await,
            Err(e) => Err(e),
        };
        let allowed = self.allowed_namespaces();
        let (reason, message) = match caller {
            Ok(caller) if self.namespaces.contains(caller.identity.namespace()) => return Ok(()),
            Ok(caller) => (
                DebugRefusal::forbidden,
                format!(
                    "{} may not read /debug: it is open to service accounts of namespace {allowed} only",
                    caller.identity
                ),
            ),
            Err(AuthError::Backend(reason)) => (
                DebugRefusal::unavailable,
                format!("could not check the bearer token: {reason}"),
            ),
            Err(e) => (
                DebugRefusal::unauthenticated,
                format!(
                    "{e}; /debug needs the token of a service account of namespace {allowed}, or a loopback client"
                ),
            ),
        };
        Err(self.refuse(peer, reason, message))
    }

    /// Counts and logs (once per interval) a refusal; the response.
    fn refuse(&self, peer: Option<SocketAddr>, reason: DebugRefusal, message: String) -> Response {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
        static REFUSED: LogLimit = LogLimit::new(Duration::from_secs(10));
        if let Some(suppressed) = REFUSED.allow() {
            tracing::warn!(
                ?peer,
                ?reason,
                suppressed,
                "/debug request refused: {message}"
            );
        }
        let mut response = error(reason.status(), message);
        if reason == DebugRefusal::unauthenticated {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }

    fn allowed_namespaces(&self) -> String {
        self.namespaces
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

/// Whether istiod is ready to serve: `Err(reason)` until it is.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl Readiness {
    pub fn new(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        Readiness(Arc::new(check))
    }

    /// Ready once `flag` is true (e.g. the configuration source's initial
    /// sync); until then not ready because of `reason`.
    pub fn when_true(flag: watch::Receiver<bool>, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Readiness::new(move || {
            if *flag.borrow() {
                Ok(())
            } else {
                Err(reason.clone())
            }
        })
    }

    pub fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

/// Renders the snapshot for `/debug/config_dump`. The index provides a
/// readable view of each resource; [`resource_listing`] is the fallback.
pub type SnapshotJson = Arc<dyn Fn(&Snapshot) -> Value + Send + Sync>;

/// Type URL -> resources as `{name, version}`, in name order.
pub fn resource_listing(snapshot: &Snapshot) -> Value {
    let types: serde_json::Map<String, Value> = snapshot
        .type_urls()
        .map(|type_url| {
            let resources: Vec<Value> = snapshot
                .of_type(type_url)
                .values()
                .map(|r| json!({ "name": r.name, "version": r.version }))
                .collect();
            (type_url.to_string(), Value::Array(resources))
        })
        .collect();
    Value::Object(types)
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Monitoring {
    registry: Arc<Registry>,
    readiness: Readiness,
    xds: SyncStatus,
    snapshot_json: SnapshotJson,
    debug: DebugAccess,
}

impl Monitoring {
    /// `registry` must hold every metric by now (registration needs `&mut`).
    pub fn new(registry: Arc<Registry>, readiness: Readiness, xds: SyncStatus) -> Self {
        Monitoring {
            registry,
            readiness,
            xds,
            snapshot_json: Arc::new(resource_listing),
            debug: DebugAccess::loopback_only(),
        }
    }

    /// Who may read `/debug/*` (loopback clients only until this is set).
    pub fn with_debug_access(mut self, debug: DebugAccess) -> Self {
        self.debug = debug;
        self
    }

    /// Replaces the `/debug/config_dump` rendering.
    pub fn with_snapshot_json(mut self, snapshot_json: SnapshotJson) -> Self {
        self.snapshot_json = snapshot_json;
        self
    }

    pub fn router(self) -> axum::Router {
        let debug = axum::Router::new()
            .route("/debug/syncz", get(syncz))
            .route("/debug/config_dump", get(config_dump))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                debug_access,
            ));
        axum::Router::new()
            .route("/metrics", get(metrics))
            .route("/ready", get(ready))
            .merge(debug)
            .fallback(not_found)
            .with_state(self)
    }
}

/// Serves `router` on `listener` until `shutdown`; open connections then
/// finish the request in flight.
pub async fn serve(listener: Listener, router: axum::Router, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "monitoring server listening");
    }
    listener.serve_http1(None, router, shutdown).await;
}

/// Lets a `/debug` request through only if [`DebugAccess`] allows it.
async fn debug_access(State(m): State<Monitoring>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    match m.debug.check(peer, request.headers()).await {
        Ok(()) => next.run(request).await,
        Err(refused) => refused,
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn metrics(State(m): State<Monitoring>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &m.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the metrics: {e}"),
        ),
    }
}

async fn ready(State(m): State<Monitoring>) -> Response {
    match m.readiness.check() {
        Ok(()) => Json(json!({ "ready": true })).into_response(),
        Err(reason) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        ),
    }
}

async fn syncz(State(m): State<Monitoring>) -> Response {
    let proxies = m.xds.proxies();
    Json(api::syncz::Syncz {
        snapshot_version: m.xds.generation().to_string(),
        connected: proxies.len(),
        proxies,
        waypoints: m.xds.waypoints(),
    })
    .into_response()
}

async fn config_dump(State(m): State<Monitoring>) -> Response {
    let snapshot = m.xds.snapshot();
    Json((m.snapshot_json)(&snapshot)).into_response()
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {}; try /metrics, /ready, /debug/syncz or /debug/config_dump",
            uri.path()
        ),
    )
}
