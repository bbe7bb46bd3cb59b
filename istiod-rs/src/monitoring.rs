//! istiod-rs's HTTP monitoring server (port 15014): `/metrics` (the process's
//! one Prometheus registry, OpenMetrics text), `/ready` (503 with the reason
//! until the configuration source has synced), `/debug/syncz` (every
//! connected proxy's xDS sync state) and `/debug/config_dump` (the snapshot
//! being served). Every error is JSON: `{"error": "..."}`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::snapshot::Snapshot;
use crate::xds::SyncStatus;

#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    #[error("the monitoring server on {addr} failed: {source}")]
    Serve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
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
}

impl Monitoring {
    /// `registry` must hold every metric by now (registration needs `&mut`).
    pub fn new(registry: Arc<Registry>, readiness: Readiness, xds: SyncStatus) -> Self {
        Monitoring {
            registry,
            readiness,
            xds,
            snapshot_json: Arc::new(resource_listing),
        }
    }

    /// Replaces the `/debug/config_dump` rendering.
    pub fn with_snapshot_json(mut self, snapshot_json: SnapshotJson) -> Self {
        self.snapshot_json = snapshot_json;
        self
    }

    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route("/metrics", get(metrics))
            .route("/ready", get(ready))
            .route("/debug/syncz", get(syncz))
            .route("/debug/config_dump", get(config_dump))
            .fallback(not_found)
            .with_state(self)
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MonitoringError> {
    let addr = listener.local_addr().map_or_else(
        |_| "(unknown address)".to_string(),
        |a: SocketAddr| a.to_string(),
    );
    tracing::info!(%addr, "monitoring server listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| MonitoringError::Serve { addr, source })
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
    Json(json!({
        "snapshot_version": m.xds.generation().to_string(),
        "connected": proxies.len(),
        "proxies": proxies,
    }))
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
