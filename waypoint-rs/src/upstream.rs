//! From a destination to an endpoint's answer: pick a ready endpoint, open
//! HBONE to `<endpoint ip>:15008` with the waypoint's own certificate,
//! expecting the endpoint workload's identity, CONNECT authority
//! `<endpoint ip>:<target port>` (what agentgateway's
//! `client/hbone_tunnel.rs` and Envoy's `connect_originate` send: no extra
//! headers), and carry the request over an HTTP connection on that tunnel
//! ([`client`]: cached per endpoint, HTTP/2 multiplexed, HTTP/1.1 reused).
//!
//! Failures are classified by Envoy's response flags and answered with
//! Envoy's router bodies (`source/common/router/router.cc`): no endpoint
//! `UH` 503 "no healthy upstream", connect failure `UF` 503, connection
//! ended mid-request `UC` 503, circuit breaker `UO` 503, timeout `UT` 504
//! "upstream request timeout". Tries, backoff and the replayable body are
//! in [`retry`]; the destination's connection pool and circuit breakers in
//! [`limits`].

pub mod client;
pub mod limits;
pub mod retry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
use bytes::Bytes;
use http::StatusCode;
use proxy_core::hbone::{HboneError, HbonePool, HboneStream, HboneTarget};
use proxy_core::identity::{CertificateManager, FetchError};
use proxy_core::store::{Service, Workload};
use tokio::sync::OwnedSemaphorePermit;

use crate::balance::{DestinationBalancer, Outcome, Picked, Weighted};
use crate::config::ConnectionPool;
use crate::request::ResponseFlag;

pub use client::Clients;
pub use limits::{Breaker, Limits, PoolSettings};
pub use retry::{Forwarded, RequestBody, RetryPolicy};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the data path moves: requests to endpoints, responses to
/// clients.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Upstream's settings (from [`crate::args::WaypointArgs`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct UpstreamConfig {
    /// The port endpoints take HBONE on (15008).
    pub hbone_port: u16,
    /// All tries of one request together; `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// One try; `None`: no limit.
    pub per_try_timeout: Option<Duration>,
    /// Used when no route says otherwise.
    pub retry: RetryPolicy,
    /// Request bodies up to this size can be replayed on a retry.
    pub retry_buffer_limit: usize,
    /// In-flight requests per destination; one more is refused `UO`.
    pub max_requests_per_destination: u32,
    pub max_idle_connections_per_endpoint: usize,
    /// An HTTP connection to an endpoint unused this long is dropped.
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no healthy endpoint of {destination} serves port {port}")]
    NoHealthyEndpoint { destination: String, port: u16 },
    #[error("{destination} already has {limit} {breaker}: refused")]
    Overflow {
        destination: String,
        breaker: Breaker,
        limit: u32,
    },
    #[error("the waypoint has no certificate of its own: {0}")]
    Certificate(#[from] FetchError),
    #[error("HBONE to endpoint {endpoint} failed: {source}")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: HboneError,
    },
    #[error("HBONE to endpoint {endpoint} was not set up within the connect timeout {timeout:?}")]
    ConnectTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    #[error("HTTP set-up with endpoint {endpoint} failed: {source}")]
    Handshake {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("endpoint {endpoint} ended the request before answering: {source}")]
    Request {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("endpoint {endpoint} did not answer within the per-try timeout {timeout:?}")]
    PerTryTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    #[error("no answer within the request timeout {timeout:?}")]
    RequestTimeout { timeout: Duration },
    #[error("the client's request body failed: {0}")]
    Downstream(#[source] BoxError),
}

impl Error {
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Error::NoHealthyEndpoint { .. } => ResponseFlag::NoHealthyUpstream,
            Error::Overflow { .. } => ResponseFlag::UpstreamOverflow,
            Error::Certificate(_)
            | Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::Handshake { .. } => ResponseFlag::UpstreamConnectionFailure,
            Error::Request { .. } => ResponseFlag::UpstreamConnectionTermination,
            Error::PerTryTimeout { .. } | Error::RequestTimeout { .. } => {
                ResponseFlag::UpstreamRequestTimeout
            }
            Error::Downstream(_) => ResponseFlag::DownstreamConnectionTermination,
        }
    }

    /// The status of the local reply.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::PerTryTimeout { .. } | Error::RequestTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Error::Downstream(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The body of the local reply, Envoy's wording.
    pub fn body(&self) -> &'static str {
        match self {
            Error::NoHealthyEndpoint { .. } => "no healthy upstream",
            Error::Overflow { .. } => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            Error::Certificate(_) | Error::Connect { .. } | Error::Handshake { .. } => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Error::ConnectTimeout { .. } => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
            }
            Error::Request { .. } => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            Error::PerTryTimeout { .. } | Error::RequestTimeout { .. } => {
                "upstream request timeout"
            }
            Error::Downstream(_) => "downstream request body failed",
        }
    }

    /// What outlier detection learns from it: whether the endpoint could
    /// be reached (local-origin failures), `None` when it says nothing
    /// about the endpoint.
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::Handshake { .. }
            | Error::Request { .. }
            | Error::PerTryTimeout { .. } => Some(Outcome::LocalOriginFailure),
            _ => None,
        }
    }
}

/// Where a request goes: a service (its ready endpoints) or one workload.
#[derive(Clone, Debug)]
pub struct Destination {
    /// `namespace/hostname` of the service, or the workload uid: names it in
    /// errors and keys its circuit breaker.
    pub name: String,
    pub service: Option<Arc<Service>>,
    /// The port the client addressed.
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
    /// The DestinationRule's load balancer and outlier detection; `None`:
    /// round robin.
    pub balancer: Option<Arc<DestinationBalancer>>,
    /// The request's consistent-hash key, when the balancer hashes.
    pub hash: Option<u64>,
    /// Its connection pool and circuit breakers.
    pub limits: Arc<Limits>,
}

impl Destination {
    /// Feeds a TCP connection attempt's outcome to outlier detection.
    pub fn record_connect(&self, endpoint: &Endpoint, failed: Option<&Error>) {
        if let Some(balancer) = &self.balancer {
            let outcome = match failed.and_then(Error::outcome) {
                Some(outcome) => outcome,
                None if failed.is_none() => Outcome::LocalOriginSuccess,
                None => return,
            };
            let now = std::time::Instant::now();
            balancer.record(&endpoint.workload.uid, outcome, self.endpoints.len(), now);
        }
    }

    /// Feeds one try's outcome to outlier detection.
    pub fn record(&self, endpoint: &Endpoint, result: &Result<http::Response<Body>, Error>) {
        let Some(balancer) = &self.balancer else {
            return;
        };
        let outcome = match result {
            Ok(response) => Some(Outcome::Status(response.status().as_u16())),
            Err(error) => error.outcome(),
        };
        if let Some(outcome) = outcome {
            let now = std::time::Instant::now();
            balancer.record(&endpoint.workload.uid, outcome, self.endpoints.len(), now);
        }
    }
}

/// One endpoint able to take the request.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// `<endpoint ip>:<target port>`: the CONNECT authority.
    pub target: SocketAddr,
}

/// The upstream side of the waypoint. Cheap to share (`Arc`).
pub struct Upstream {
    pool: HbonePool,
    certificates: CertificateManager,
    identity: SpiffeId,
    pub(crate) clients: Arc<Clients>,
    pub config: UpstreamConfig,
    limits: Mutex<LimitsByDestination>,
    next: AtomicUsize,
}

/// Every destination's [`Limits`], by [`Upstream::limits`] key.
#[derive(Default)]
struct LimitsByDestination {
    by_key: HashMap<String, Arc<Limits>>,
    /// Past this many, those no request or connection holds are forgotten.
    prune_at: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("identity", &self.identity.to_string())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The waypoint's own identity, which it presents upstream.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn new(
        pool: HbonePool,
        certificates: CertificateManager,
        identity: SpiffeId,
        config: UpstreamConfig,
    ) -> Self {
        Upstream {
            pool,
            certificates,
            identity,
            clients: Arc::new(Clients::new(config.max_idle_connections_per_endpoint)),
            config,
            limits: Mutex::new(LimitsByDestination::default()),
            next: AtomicUsize::new(0),
        }
    }

    /// The circuit breakers of destination `key` (a service port and
    /// subset, or a workload port) with `pool`'s settings: the same ones
    /// for every request while the settings stay; new ones (counting from
    /// zero) when they change.
    pub fn limits(&self, key: &str, pool: Option<&ConnectionPool>) -> Arc<Limits> {
        let settings = PoolSettings::new(pool, &self.config);
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = limits.by_key.get(key)
            && current.settings == settings
        {
            return current.clone();
        }
        if limits.by_key.len() >= limits.prune_at {
            limits.by_key.retain(|_, l| Arc::strong_count(l) > 1);
            limits.prune_at = (limits.by_key.len() * 2).max(64);
        }
        let fresh = Arc::new(Limits::new(key.to_string(), settings));
        limits.by_key.insert(key.to_string(), fresh.clone());
        fresh
    }

    /// A place among the destination's in-flight requests, or `UO` at once
    /// when they are all taken (a circuit breaker: never a queue). Held
    /// until the response has been passed on.
    pub fn admit(&self, destination: &Destination) -> Result<OwnedSemaphorePermit, Error> {
        destination.limits.admit()
    }

    /// An endpoint for the next try, preferring one not tried yet for this
    /// request (Istio's default retry host predicate `previous_hosts`): by
    /// the destination's balancer (not ejected by outlier detection; the
    /// `Picked` counts the request in flight until dropped), else in turn.
    pub fn pick<'a>(
        &self,
        destination: &'a Destination,
        tried: &[SocketAddr],
    ) -> Result<(&'a Endpoint, Option<Picked>), Error> {
        let endpoints = &destination.endpoints;
        let none = || Error::NoHealthyEndpoint {
            destination: destination.name.clone(),
            port: destination.port,
        };
        if endpoints.is_empty() {
            return Err(none());
        }
        if let Some(balancer) = &destination.balancer {
            let fresh: Vec<&Endpoint> = endpoints
                .iter()
                .filter(|e| !tried.contains(&e.target))
                .collect();
            let offered = if fresh.is_empty() {
                endpoints.iter().collect()
            } else {
                fresh
            };
            let weighted: Vec<Weighted<'_>> = offered
                .iter()
                .map(|e| Weighted {
                    uid: &e.workload.uid,
                    weight: e.workload.capacity.max(1),
                })
                .collect();
            let now = std::time::Instant::now();
            let picked = balancer
                .pick(&weighted, destination.hash, now, &mut rand::rng())
                .ok_or_else(none)?;
            return Ok((offered[picked.index], Some(picked)));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let fresh = (0..endpoints.len())
            .map(|i| &endpoints[(start + i) % endpoints.len()])
            .find(|e| !tried.contains(&e.target));
        Ok((fresh.unwrap_or(&endpoints[start % endpoints.len()]), None))
    }

    /// An HBONE tunnel to `endpoint`, as the waypoint itself, set up
    /// within the destination's connect timeout (when it has one: the
    /// HBONE pool's `--connect-timeout` bounds it as well).
    pub async fn tunnel(&self, endpoint: &Endpoint, limits: &Limits) -> Result<HboneStream, Error> {
        let connect = async {
            let certificate = self.certificates.fetch(&self.identity).await?;
            let target = HboneTarget {
                identity: endpoint.workload.identity.clone(),
                address: SocketAddr::new(endpoint.target.ip(), self.config.hbone_port),
                authority: endpoint.target,
            };
            self.pool
                .connect(&certificate, &target)
                .await
                .map_err(|source| Error::Connect {
                    endpoint: endpoint.target,
                    source,
                })
        };
        match limits.settings.connect_timeout {
            None => connect.await,
            Some(timeout) => {
                tokio::time::timeout(timeout, connect)
                    .await
                    .unwrap_or(Err(Error::ConnectTimeout {
                        endpoint: endpoint.target,
                        timeout,
                    }))
            }
        }
    }

    /// One try: the request to `endpoint`, over the cached connection.
    pub async fn send(
        &self,
        destination: &Destination,
        endpoint: &Endpoint,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error> {
        let key = client::Key {
            identity: endpoint.workload.identity.clone(),
            address: endpoint.target,
            http2: request.version() == http::Version::HTTP_2,
        };
        let limits = &destination.limits;
        self.clients
            .send(key, limits, || self.tunnel(endpoint, limits), request)
            .await
    }

    /// HTTP connections held to endpoints, for `/config_dump`.
    pub fn connections(&self) -> serde_json::Value {
        self.clients.dump()
    }

    /// HTTP connections open to the endpoint at `address` (`ip:port`).
    pub fn connections_to(&self, address: SocketAddr) -> usize {
        self.clients.open_to(address)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The flags' defaults.
    pub(crate) fn config() -> UpstreamConfig {
        UpstreamConfig {
            hbone_port: api::ports::HBONE,
            request_timeout: None,
            per_try_timeout: None,
            retry: RetryPolicy::istio_default(2, Duration::from_millis(25)),
            retry_buffer_limit: 64 * 1024,
            max_requests_per_destination: u32::MAX,
            max_idle_connections_per_endpoint: 16,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}
