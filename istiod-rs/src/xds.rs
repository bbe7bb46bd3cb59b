//! The delta ADS server: serves every resource of the current [`Snapshot`] to
//! the proxies (ztunnel, waypoints) over
//! `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`.
//!
//! Data flow: the index publishes snapshots on a `watch` channel; a relay task
//! numbers each one, stamps its arrival time, shares unchanged resources with
//! the previous generation and notes which names changed ([`served`]); every
//! proxy stream runs its own task ([`connection`]) that diffs what that proxy
//! holds against the newest generation ([`delta`]) and sends only changed keys
//! and removals, encoded chunk by chunk from the shared resources ([`wire`]).
//! A slow proxy only delays itself: its task skips to the newest generation.
//! It serves the type URLs of [`SERVED_TYPES`]; a subscription to any other
//! gets an empty response, as upstream's fallback generator gives it, and
//! leaves no state and no metric series of its own (counted, logged at most
//! once per interval), so a proxy cannot grow istiod's memory or its
//! `/metrics` by inventing types.
//! Requests are limited to `max_request_bytes` (upstream's
//! `ISTIO_GPRC_MAXRECVMSGSIZE`, 4 MiB); an oversized or undecodable request
//! ends the stream with an error status saying why.
//!
//! One [`XdsServer`] per process holds the connections, the metrics and the
//! `/debug/syncz` view ([`SyncStatus`]); [`XdsServer::service`] makes a gRPC
//! service per listener with that listener's [`Authentication`] policy
//! (required on the TLS port 15012, optional on the plaintext port 15010).
//!
//! Waypoints: a stream whose node id starts `waypoint~` is bound to the
//! waypoint Gateway of the pod it names, once the stream's token is shown
//! to be that pod's ([`waypoint`]; refused otherwise, reason
//! `waypoint_identity`), and is sent only that waypoint's scope of every
//! type (`scope`), computed once per generation by the relay. Other
//! proxies (ztunnel) are served the workload API as before and never any
//! of the [`L7_TYPES`]: a subscription to one is answered empty.

mod connection;
pub mod delta;
mod metrics;
mod scope;
mod served;
pub mod syncz;
pub mod waypoint;
mod wire;

/// For the fuzz targets (`fuzz/`), which drive [`delta::TypeState`] with
/// requests decoded from raw bytes and need a [`delta::Current`] to push from.
#[doc(hidden)]
pub use served::ChangeLog;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::registry::Registry;
use proxy_core::log_limit::LogLimit;
use tokio::sync::watch;

use crate::auth::{self, Authenticator, Caller};
use crate::snapshot::{self, Snapshot};

pub use scope::L7_TYPES;
pub use syncz::{ProxySync, SyncState, SyncStatus, TypeSync, WaypointSync};
pub use waypoint::{PodLookup, WaypointError, WaypointPod, WaypointPods};

/// The type URLs istiod-rs serves; requests for others are answered empty.
/// The L7 ones are served to waypoints only, each its own scope.
pub const SERVED_TYPES: [&str; 7] = [
    api::type_url::ADDRESS,
    api::type_url::AUTHORIZATION,
    api::type_url::WAYPOINT,
    api::type_url::ROUTE_TABLE,
    api::type_url::HTTP_AUTHORIZATION,
    api::type_url::JWT_AUTHENTICATION,
    api::type_url::TRAFFIC_POLICY,
];

/// Upstream's receive limit (`ISTIO_GPRC_MAXRECVMSGSIZE`). A resuming
/// proxy's `initial_resource_versions` grow with the mesh (about 1 MiB per
/// 10 000 resources): very large meshes raise it.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error(
        "the first DeltaDiscoveryRequest on a stream must carry node.id (e.g. `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`)"
    )]
    MissingNode,
    #[error(
        "DeltaDiscoveryRequest from {proxy} has an empty type_url: name the resource type to subscribe to"
    )]
    MissingTypeUrl { proxy: String },
    #[error(
        "istiod-rs serves only delta xDS: use DeltaAggregatedResources (ztunnel and Envoy: delta ADS / `DELTA_GRPC`)"
    )]
    StateOfTheWorld,
    #[error(
        "istiod-rs is shutting down (its configuration source stopped); reconnect to another istiod"
    )]
    SourceClosed,
    #[error("DeltaDiscoveryRequest from {proxy} refused: {}{hint}", status.message())]
    BadRequest {
        proxy: String,
        status: tonic::Status,
        hint: &'static str,
    },
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("waypoint stream refused: {0}")]
    Waypoint(#[from] waypoint::WaypointError),
}

impl From<XdsError> for tonic::Status {
    fn from(e: XdsError) -> Self {
        match e {
            XdsError::MissingNode | XdsError::MissingTypeUrl { .. } => {
                tonic::Status::invalid_argument(e.to_string())
            }
            XdsError::StateOfTheWorld => tonic::Status::unimplemented(e.to_string()),
            XdsError::SourceClosed => tonic::Status::unavailable(e.to_string()),
            XdsError::BadRequest { ref status, .. } => {
                tonic::Status::new(status.code(), e.to_string())
            }
            XdsError::Auth(a) => a.into(),
            XdsError::Waypoint(ref w) => tonic::Status::new(w.code(), e.to_string()),
        }
    }
}

/// Who may open a stream on a listener.
#[derive(Clone)]
pub enum Authentication {
    /// Every stream must carry a valid bearer token (the TLS port).
    Required(Arc<dyn Authenticator>),
    /// A token is checked when one is sent (a bad one is refused); streams
    /// without one are served anonymously. For the plaintext port in local
    /// development only.
    Optional(Arc<dyn Authenticator>),
    /// Nobody is asked (plaintext local development without a token source).
    Disabled,
}

impl Authentication {
    async fn caller(
        &self,
        md: &tonic::metadata::MetadataMap,
    ) -> Result<Option<Caller>, auth::AuthError> {
        match self {
            Authentication::Required(a) => auth::authenticate(&**a, md).await.map(Some),
            Authentication::Optional(a) => match auth::bearer_token(md) {
                Err(auth::AuthError::MissingToken) => Ok(None),
                Err(e) => Err(e),
                Ok(token) => a.authenticate(token).await.map(Some),
            },
            Authentication::Disabled => Ok(None),
        }
    }
}

/// Locks a mutex even if a panicking holder poisoned it: the guarded state is
/// bookkeeping that stays consistent between statements.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A snapshot as the xDS server received it.
#[derive(Clone, Debug)]
struct Published {
    /// As the index published it (for `/debug/config_dump`).
    snapshot: Arc<Snapshot>,
    /// What proxies are sent: the same resources, sharing unchanged ones
    /// with earlier generations.
    served: Arc<served::Served>,
    /// Counts snapshots received; sent as `system_version_info`.
    generation: u64,
    arrived: Instant,
    /// When the pipeline saw the change it carries (`arrived` if unknown).
    changed: Instant,
    /// The names that changed in the most recent generations.
    changes: Arc<served::ChangeLog>,
    /// Every waypoint's scope, by waypoint key.
    scopes: Arc<scope::Scopes>,
    /// Workload addresses (`<network>/<ip>`) -> uids, for on-demand lookups.
    aliases: Arc<scope::AliasTable>,
}

impl Published {
    /// What a proxy bound to `waypoint` (or none: ztunnel) may hold of `type_url`.
    fn resources(&self, waypoint: Option<&str>, type_url: &str) -> &snapshot::Resources {
        static EMPTY: snapshot::Resources = BTreeMap::new();
        match waypoint {
            Some(key) => self
                .scopes
                .get(key)
                .map_or(&EMPTY, |scope| scope.of_type(type_url)),
            None if scope::L7_TYPES.contains(&type_url) => &EMPTY,
            None => self.served.of_type(type_url),
        }
    }

    /// Where `waypoint` may look workloads up by address (of Address only).
    fn alias_lookup(
        &self,
        waypoint: Option<&str>,
        type_url: &str,
    ) -> Option<delta::AliasLookup<'_>> {
        (waypoint.is_some() && type_url == api::type_url::ADDRESS).then(|| delta::AliasLookup {
            table: &self.aliases,
            resources: self.served.of_type(api::type_url::ADDRESS),
        })
    }
}

/// What every connection shares.
struct Shared {
    feed: watch::Receiver<Published>,
    metrics: metrics::Metrics,
    connections: Mutex<BTreeMap<u64, Arc<Mutex<connection::Connection>>>>,
    next_connection: AtomicU64,
    /// Nonces are `<boot id>-<counter>`: unique on this process and unlikely
    /// to match one a proxy kept from a previous istiod.
    boot_id: u32,
    next_nonce: AtomicU64,
}

impl Shared {
    fn nonce(&self) -> String {
        let n = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n}", self.boot_id)
    }
}

/// The delta ADS server of one istiod-rs process.
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
    max_request_bytes: usize,
    pods: Option<Arc<dyn WaypointPods>>,
}

impl XdsServer {
    /// Serves the snapshots published on `snapshots` and registers the `xds_*`
    /// metrics in `registry`. Spawns the relay task that stamps snapshots, so
    /// it must be called inside a tokio runtime.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, registry: &mut Registry) -> Self {
        let snapshot = snapshots.borrow().clone();
        let (served, _) = served::Served::default().next(&snapshot);
        let mut index = scope::ScopeIndex::default();
        let (scopes, aliases, _) = index.update(&served, None);
        let first = Published {
            snapshot,
            served: Arc::new(served),
            generation: 1,
            arrived: Instant::now(),
            changed: Instant::now(),
            changes: Arc::default(),
            scopes: Arc::new(scopes),
            aliases,
        };
        let (tx, feed) = watch::channel(first);
        tokio::spawn(relay(snapshots, tx, index));
        XdsServer {
            shared: Arc::new(Shared {
                feed,
                metrics: metrics::Metrics::register(registry),
                connections: Mutex::new(BTreeMap::new()),
                next_connection: AtomicU64::new(1),
                boot_id: rand::random(),
                next_nonce: AtomicU64::new(1),
            }),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            pods: None,
        }
    }

    /// Where waypoint streams' pods are looked up (the cluster state).
    /// Without it, every waypoint stream is refused.
    pub fn with_pods(mut self, pods: Arc<dyn WaypointPods>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Requests larger than this end their stream with OUT_OF_RANGE.
    pub fn with_max_request_bytes(mut self, max: usize) -> Self {
        self.max_request_bytes = max;
        self
    }

    /// The gRPC service for one listener, with that listener's
    /// authentication; add it to a `tonic::transport::Server` (or any router
    /// of `http::Request<tonic::body::Body>`).
    pub fn service(&self, authentication: Authentication) -> AdsService {
        AdsService {
            shared: self.shared.clone(),
            authentication,
            max_request_bytes: self.max_request_bytes,
            pods: self.pods.clone(),
        }
    }

    /// The view behind `/debug/syncz` and `/debug/config_dump`.
    pub fn status(&self) -> SyncStatus {
        SyncStatus::new(self.shared.clone())
    }
}

/// Forwards the index's snapshots, stamped with arrival time and generation,
/// with the names that changed and every waypoint's scope. Ends (closing
/// every stream) when the index's sender is dropped.
async fn relay(
    mut source: watch::Receiver<Arc<Snapshot>>,
    feed: watch::Sender<Published>,
    mut index: scope::ScopeIndex,
) {
    let mut log = served::ChangeLog::default();
    while source.changed().await.is_ok() {
        let snapshot = source.borrow_and_update().clone();
        let arrived = Instant::now();
        let snapshot_changed = snapshot.changed_at();
        let previous = feed.borrow().clone();
        let generation = previous.generation + 1;
        let (served, changes) = previous.served.next(&snapshot);
        let (scopes, aliases, scope_changes) = index.update(&served, Some(&changes));
        log.record(generation, changes, scope_changes);
        // The old generation is freed here, after the swap, not while
        // connections wait on the channel's lock.
        let _previous = feed.send_replace(Published {
            snapshot,
            served: Arc::new(served),
            generation,
            arrived,
            changed: snapshot_changed.unwrap_or(arrived),
            changes: Arc::new(log.clone()),
            scopes: Arc::new(scopes),
            aliases,
        });
    }
    tracing::info!("snapshot source closed; ending xDS streams");
}

/// A line a proxy can trigger at will is logged at most this often.
const LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// `AggregatedDiscoveryService` for one listener. Written against HTTP
/// rather than tonic's generated server so that responses stream from the
/// shared snapshot in chunks ([`wire`]); requests are still decoded by tonic.
#[derive(Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
    authentication: Authentication,
    max_request_bytes: usize,
    pods: Option<Arc<dyn WaypointPods>>,
}

impl tonic::server::NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

type HttpResponse = http::Response<tonic::body::Body>;

impl tower::Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != DELTA_PATH {
            // StreamAggregatedResources, or a method this service lacks.
            let status = tonic::Status::from(XdsError::StateOfTheWorld);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let service = self.clone();
        Box::pin(async move { Ok(service.delta(request).await) })
    }
}

impl AdsService {
    async fn delta(self, request: http::Request<tonic::body::Body>) -> HttpResponse {
        let (parts, body) = request.into_parts();
        // As tonic's request: its metadata, and the peer address tonic's
        // transport left in the extensions.
        let head = tonic::Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(parts.headers),
            parts.extensions,
            (),
        );
        let peer = head.remote_addr();
        let caller = match self.authentication.caller(head.metadata()).await {
            Ok(caller) => caller,
            Err(e) => {
                let reason = match e {
                    auth::AuthError::Backend(_) => metrics::Refusal::auth_unavailable,
                    _ => metrics::Refusal::unauthenticated,
                };
                self.shared.metrics.refused(reason);
                static REFUSED: LogLimit = LogLimit::new(LOG_INTERVAL);
                if let Some(suppressed) = REFUSED.allow() {
                    tracing::info!(?peer, error = %e, suppressed, "refused xDS stream");
                }
                return tonic::Status::from(XdsError::from(e)).into_http();
            }
        };
        let inbound = tonic::Streaming::new_request(
            wire::RequestDecoder,
            body,
            None,
            Some(self.max_request_bytes),
        );
        let responses = connection::spawn(self.shared.clone(), inbound, caller, peer, self.pods);
        let body = wire::ResponseBody::new(responses, self.shared.metrics.clone());
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}
