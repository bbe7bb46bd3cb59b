//! The delta ADS server: serves every resource of the current [`Snapshot`] to
//! the proxies (ztunnel, waypoints) over
//! `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`.
//!
//! Data flow: the index publishes snapshots on a `watch` channel; a relay task
//! stamps each with its arrival time and a generation number; every proxy
//! stream runs its own task ([`connection`]) that diffs what that proxy holds
//! against the newest snapshot ([`delta`]) and sends only changed keys and
//! removals. A slow proxy only delays itself: its task skips to the newest
//! snapshot. The server is generic over type URLs: whatever the snapshot
//! holds can be subscribed to.
//!
//! One [`XdsServer`] per process holds the connections, the metrics and the
//! `/debug/syncz` view ([`SyncStatus`]); [`XdsServer::service`] makes a tonic
//! service per listener with that listener's [`Authentication`] policy
//! (required on the TLS port 15012, optional on the plaintext port 15010).

mod connection;
pub mod delta;
mod metrics;
pub mod syncz;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use api::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::auth::{self, Authenticator, Caller};
use crate::snapshot::Snapshot;

pub use syncz::{ProxySync, SyncState, SyncStatus, TypeSync};

/// Requests carry `initial_resource_versions` for everything a resuming proxy
/// holds; tonic's 4 MiB default would cap that at roughly 50k resources.
const MAX_REQUEST_BYTES: usize = 64 << 20;

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
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

impl From<XdsError> for tonic::Status {
    fn from(e: XdsError) -> Self {
        match e {
            XdsError::MissingNode | XdsError::MissingTypeUrl { .. } => {
                tonic::Status::invalid_argument(e.to_string())
            }
            XdsError::StateOfTheWorld => tonic::Status::unimplemented(e.to_string()),
            XdsError::SourceClosed => tonic::Status::unavailable(e.to_string()),
            XdsError::Auth(a) => a.into(),
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
    snapshot: Arc<Snapshot>,
    /// Counts snapshots received; sent as `system_version_info`.
    generation: u64,
    arrived: Instant,
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
}

impl XdsServer {
    /// Serves the snapshots published on `snapshots` and registers the `xds_*`
    /// metrics in `registry`. Spawns the relay task that stamps snapshots, so
    /// it must be called inside a tokio runtime.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, registry: &mut Registry) -> Self {
        let first = Published {
            snapshot: snapshots.borrow().clone(),
            generation: 1,
            arrived: Instant::now(),
        };
        let (tx, feed) = watch::channel(first);
        tokio::spawn(relay(snapshots, tx));
        XdsServer {
            shared: Arc::new(Shared {
                feed,
                metrics: metrics::Metrics::register(registry),
                connections: Mutex::new(BTreeMap::new()),
                next_connection: AtomicU64::new(1),
                boot_id: rand::random(),
                next_nonce: AtomicU64::new(1),
            }),
        }
    }

    /// A tonic service for one listener, with that listener's authentication.
    pub fn service(
        &self,
        authentication: Authentication,
    ) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService {
            shared: self.shared.clone(),
            authentication,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The view behind `/debug/syncz` and `/debug/config_dump`.
    pub fn status(&self) -> SyncStatus {
        SyncStatus::new(self.shared.clone())
    }
}

/// Forwards the index's snapshots, stamped with arrival time and generation.
/// Ends (closing every stream) when the index's sender is dropped.
async fn relay(mut source: watch::Receiver<Arc<Snapshot>>, feed: watch::Sender<Published>) {
    while source.changed().await.is_ok() {
        let snapshot = source.borrow_and_update().clone();
        let arrived = Instant::now();
        feed.send_modify(|p| {
            p.snapshot = snapshot;
            p.generation += 1;
            p.arrived = arrived;
        });
    }
    tracing::info!("snapshot source closed; ending xDS streams");
}

/// The tonic service of one listener.
pub struct AdsService {
    shared: Arc<Shared>,
    authentication: Authentication,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        Err(XdsError::StateOfTheWorld.into())
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let caller = self
            .authentication
            .caller(request.metadata())
            .await
            .map_err(|e| {
                tracing::info!(peer = ?request.remote_addr(), error = %e, "refused xDS stream");
                tonic::Status::from(XdsError::from(e))
            })?;
        let peer = request.remote_addr();
        let stream = connection::spawn(self.shared.clone(), request.into_inner(), caller, peer);
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
