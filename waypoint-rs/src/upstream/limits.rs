//! One destination's connection pool: the DestinationRule's
//! `connectionPool` (istio/istio `pilot/pkg/networking/core/
//! cluster_traffic_policy.go`, `applyConnectionPool`: a limit of 0 means
//! "not set", every unset limit is unbounded) as Envoy's per-cluster circuit
//! breakers and connection options enforce it. A destination is a service
//! port (and subset), or one workload's port: what Envoy calls a cluster.
//!
//! - `http2MaxRequests`: requests in flight; one more is refused `UO`.
//! - `tcp.maxConnections`: connections (HBONE tunnels) open to all its
//!   endpoints; a request that needs one more waits for one to come free.
//!   An endpoint with no connection at all still gets one (Envoy's
//!   circuit-breaking overview: "a host selected by cluster load balancing
//!   has at least one connection allocated"), so a destination never
//!   stalls because its sibling endpoints hold every connection. TCP
//!   connections and upgrades (a connection each) are refused `UO` at the
//!   limit instead.
//! - `http1MaxPendingRequests`: requests waiting because no connection
//!   could take them at once (being set up, or at the connection limit);
//!   one more is refused `UO`.
//! - `maxRetries`: retries in progress at once; a try that would be retried
//!   beyond it is answered as if retries had run out.
//! - `maxRequestsPerConnection`, `http2.maxConcurrentStreams`,
//!   `http.idleTimeout`, `tcp.connectTimeout`, `tcp.idleTimeout`,
//!   `h2UpgradePolicy` / `useClientProtocol`: see [`PoolSettings`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{Error, UpstreamConfig};
use crate::config::{ConnectionPool, H2Upgrade};

/// The connection pool settings in force for one destination.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolSettings {
    /// Requests in flight (`http2MaxRequests`, else
    /// `--max-requests-per-destination`).
    pub max_requests: u32,
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_retries: Option<u32>,
    /// An HTTP connection carries this many requests, then closes (HTTP/1.1)
    /// or takes no new ones (HTTP/2).
    pub max_requests_per_connection: Option<u32>,
    /// Requests at once on one HTTP/2 connection; more open another.
    pub max_concurrent_streams: Option<u32>,
    /// Setting up the tunnel to an endpoint (else the HBONE pool's own).
    pub connect_timeout: Option<Duration>,
    /// An HTTP connection with no request this long is closed.
    pub idle_timeout: Duration,
    /// A TCP connection on which nothing moved either way this long is
    /// closed; `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
    /// An HTTP/1.1 request goes to the endpoint as HTTP/2.
    pub upgrade_to_http2: bool,
}

impl PoolSettings {
    /// `pool` (a DestinationRule's, if any) over the waypoint's defaults.
    pub fn new(pool: Option<&ConnectionPool>, config: &UpstreamConfig) -> Self {
        let set = |v: Option<u32>| v.filter(|n| *n > 0);
        let pool = pool.cloned().unwrap_or_default();
        PoolSettings {
            max_requests: set(pool.http2_max_requests)
                .unwrap_or(config.max_requests_per_destination),
            max_connections: set(pool.max_connections),
            max_pending_requests: set(pool.http1_max_pending_requests),
            max_retries: set(pool.max_retries),
            max_requests_per_connection: set(pool.max_requests_per_connection),
            max_concurrent_streams: set(pool.max_concurrent_streams),
            connect_timeout: pool.connect_timeout.filter(|d| !d.is_zero()),
            idle_timeout: pool
                .http_idle_timeout
                .filter(|d| !d.is_zero())
                .unwrap_or(config.idle_timeout),
            tcp_idle_timeout: pool.tcp_idle_timeout.filter(|d| !d.is_zero()),
            // `useClientProtocol` wins over an upgrade (istio/api
            // destination_rule.proto, `use_client_protocol`).
            upgrade_to_http2: pool.h2_upgrade == H2Upgrade::Upgrade && !pool.use_client_protocol,
        }
    }
}

/// Which circuit breaker refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    Requests,
    PendingRequests,
    Connections,
}

impl std::fmt::Display for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Breaker::Requests => {
                "requests in flight (http2MaxRequests or --max-requests-per-destination)"
            }
            Breaker::PendingRequests => {
                "requests waiting for a connection (http1MaxPendingRequests)"
            }
            Breaker::Connections => "connections open (tcp.maxConnections)",
        })
    }
}

/// One destination's circuit breakers. Shared by every request to it
/// (`Arc`), replaced when its settings change.
#[derive(Debug)]
pub struct Limits {
    /// The destination, for errors.
    pub name: String,
    pub settings: PoolSettings,
    requests: Arc<Semaphore>,
    pending: Option<Arc<Semaphore>>,
    connections: Option<Arc<Semaphore>>,
    retries: Option<Arc<Semaphore>>,
    /// Woken when one of the destination's connections closes, comes back
    /// idle or finishes a request: waiting requests look again.
    freed: Notify,
}

fn semaphore(limit: u32) -> Arc<Semaphore> {
    Arc::new(Semaphore::new((limit as usize).min(Semaphore::MAX_PERMITS)))
}

impl Limits {
    pub fn new(name: String, settings: PoolSettings) -> Self {
        Limits {
            name,
            requests: semaphore(settings.max_requests),
            pending: settings.max_pending_requests.map(semaphore),
            connections: settings.max_connections.map(semaphore),
            retries: settings.max_retries.map(semaphore),
            freed: Notify::new(),
            settings,
        }
    }

    fn overflow(&self, breaker: Breaker, limit: u32) -> Error {
        Error::Overflow {
            destination: self.name.clone(),
            breaker,
            limit,
        }
    }

    /// A place among the requests in flight, held until the response has
    /// been passed on; `UO` at once when they are all taken.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.overflow(Breaker::Requests, self.settings.max_requests))
    }

    /// A place among the requests waiting for a connection; `UO` when
    /// they are all taken. `None`: no limit.
    pub fn wait_for_connection(&self) -> Result<Option<OwnedSemaphorePermit>, Error> {
        let (Some(pending), Some(limit)) = (&self.pending, self.settings.max_pending_requests)
        else {
            return Ok(None);
        };
        match pending.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(self.overflow(Breaker::PendingRequests, limit)),
        }
    }

    /// Room for one more connection, held as long as it is open. `first`:
    /// the endpoint has none, so it gets one even at the limit. `None`: at
    /// the limit, wait ([`Limits::freed`]).
    pub fn open_connection(&self, first: bool) -> Option<ConnectionPermit> {
        let Some(connections) = &self.connections else {
            return Some(ConnectionPermit(None));
        };
        match connections.clone().try_acquire_owned() {
            Ok(permit) => Some(ConnectionPermit(Some(permit))),
            Err(_) if first => Some(ConnectionPermit(None)),
            Err(_) => None,
        }
    }

    /// As [`Limits::open_connection`] for a connection that cannot wait (a
    /// TCP connection, an upgrade): `UO` at the limit.
    pub fn open_connection_now(&self) -> Result<ConnectionPermit, Error> {
        self.open_connection(false).ok_or_else(|| {
            self.overflow(
                Breaker::Connections,
                self.settings.max_connections.unwrap_or(u32::MAX),
            )
        })
    }

    /// Room for one more retry in progress, held until its try ends;
    /// `None`: the destination's retry budget is spent.
    pub fn retry(&self) -> Option<Option<OwnedSemaphorePermit>> {
        match &self.retries {
            None => Some(None),
            Some(retries) => retries.clone().try_acquire_owned().ok().map(Some),
        }
    }

    /// Waits until a connection may have come free (register with
    /// `enable()` before looking, so no wake-up is lost).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Wakes the requests waiting for a connection. Only when connections
    /// are limited: nobody waits otherwise.
    pub fn notify_freed(&self) {
        if self.connections.is_some() || self.settings.max_concurrent_streams.is_some() {
            self.freed.notify_waiters();
        }
    }
}

/// Held by an open connection (`None` inside: not counted).
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> UpstreamConfig {
        crate::upstream::tests::config()
    }

    #[test]
    fn zero_limits_mean_unset_as_istio_reads_them() {
        let pool = ConnectionPool {
            max_connections: Some(0),
            http1_max_pending_requests: Some(0),
            http2_max_requests: Some(0),
            max_requests_per_connection: Some(0),
            max_retries: Some(0),
            connect_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        let settings = PoolSettings::new(Some(&pool), &config());
        assert_eq!(settings, PoolSettings::new(None, &config()));
        assert_eq!(settings.max_requests, config().max_requests_per_destination);
    }

    #[test]
    fn use_client_protocol_wins_over_an_upgrade() {
        let mut pool = ConnectionPool {
            h2_upgrade: H2Upgrade::Upgrade,
            ..Default::default()
        };
        assert!(PoolSettings::new(Some(&pool), &config()).upgrade_to_http2);
        pool.use_client_protocol = true;
        assert!(!PoolSettings::new(Some(&pool), &config()).upgrade_to_http2);
    }

    #[test]
    fn each_breaker_counts_its_own_and_an_endpoint_gets_its_first_connection() {
        let pool = ConnectionPool {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            http2_max_requests: Some(2),
            max_retries: Some(1),
            ..Default::default()
        };
        let limits = Limits::new(
            "default/svc".into(),
            PoolSettings::new(Some(&pool), &config()),
        );
        let _a = limits.admit().unwrap();
        let _b = limits.admit().unwrap();
        let refused = limits.admit().unwrap_err();
        assert!(matches!(
            refused,
            Error::Overflow {
                breaker: Breaker::Requests,
                limit: 2,
                ..
            }
        ));
        let _waiting = limits.wait_for_connection().unwrap().unwrap();
        assert!(limits.wait_for_connection().is_err());
        let held = limits.open_connection(false).unwrap();
        assert!(limits.open_connection(false).is_none());
        assert!(limits.open_connection_now().is_err());
        assert!(
            limits.open_connection(true).is_some(),
            "an endpoint's first"
        );
        drop(held);
        assert!(limits.open_connection(false).is_some());
        let retry = limits.retry().unwrap();
        assert!(limits.retry().is_none());
        drop(retry);
        assert!(limits.retry().is_some());
    }
}
