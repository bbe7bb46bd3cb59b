//! The servers both proxies run besides their data path:
//!
//! - admin, `127.0.0.1:15000`: `/config_dump` (the workload store,
//!   certificates, configuration and extra sections, in the JSON shape
//!   upstream ztunnel emits and `istioctl ztunnel-config` reads) and `/certs`;
//! - stats, `0.0.0.0:15020`: `/metrics` (and `/stats/prometheus`), OpenMetrics
//!   text of the process registry;
//! - readiness, `0.0.0.0:15021`: `/healthz/ready`, 200 once every registered
//!   [`Readiness`] condition is met, else 503 naming what is missing.
//!
//! Every address is configurable (tests bind port 0); all three stop
//! gracefully when the shutdown token is cancelled. Each is a
//! [`Listener`] with its own connection cap and the same timeouts
//! ([`ServerConfig`]): anyone who reaches 15020 or 15021 (every pod on the
//! node) can hold at most the cap's connections, each only as long as the
//! timeouts allow, so the data path running on the same runtime keeps its
//! file descriptors and its time.

mod config_dump;
mod readiness;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::listener::{Listener, ListenerLimits, ListenerMetrics};
use crate::metrics::{OPENMETRICS_CONTENT_TYPE, SharedRegistry};

pub use config_dump::{
    AdminState, CertDump, CertificateSource, CertsDump, DumpSection, NoCertificates, rfc3339_utc,
};
pub use readiness::{Condition, Readiness};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on {addr} for the {server} server (is another process using it?): {source}"
    )]
    Bind {
        server: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the three servers listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerAddrs {
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
}

impl Default for ServerAddrs {
    /// Upstream's: admin on loopback only, the others on every interface.
    fn default() -> Self {
        ServerAddrs {
            admin: (Ipv4Addr::LOCALHOST, api::ports::ADMIN).into(),
            stats: (Ipv4Addr::UNSPECIFIED, api::ports::STATS).into(),
            readiness: (Ipv4Addr::UNSPECIFIED, api::ports::READINESS).into(),
        }
    }
}

/// Where the three servers listen and what each allows a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub addrs: ServerAddrs,
    /// Each server's own cap and timeouts (the same values for all three).
    pub limits: ListenerLimits,
}

impl ServerConfig {
    /// Upstream ztunnel reads a request head for at most 2 s on these
    /// servers (`hyper_util::Server`'s `header_read_timeout`); a scrape or a
    /// probe needs one or two connections, so 128 each, 16 from one
    /// address, leave room for every legitimate client (the kubelet's
    /// probes, a scraper) while bounding what one pod can hold.
    pub const DEFAULT_LIMITS: ListenerLimits = ListenerLimits {
        max_connections: 128,
        max_connections_per_peer: 16,
        handshake_timeout: Duration::from_secs(2),
        header_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(60),
    };
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addrs: ServerAddrs::default(),
            limits: ServerConfig::DEFAULT_LIMITS,
        }
    }
}

/// The running servers.
#[derive(Debug)]
pub struct Servers {
    /// The addresses actually bound (port 0 resolved).
    pub addrs: ServerAddrs,
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Binds all three, then serves until `shutdown` is cancelled. Binding
    /// happens before this returns, so a port in use fails start-up.
    /// `listeners` must be registered in `registry` (as `listener_*`).
    pub async fn start(
        config: ServerConfig,
        admin: AdminState,
        registry: SharedRegistry,
        listeners: &ListenerMetrics,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Result<Servers, Error> {
        let ServerConfig { addrs, limits } = config;
        let bind = |server: &'static str, addr: SocketAddr| async move {
            Listener::bind(addr, server, limits, listeners)
                .await
                .map_err(|source| Error::Bind {
                    server,
                    addr,
                    source,
                })
        };
        let admin_listener = bind("admin", addrs.admin).await?;
        let stats_listener = bind("stats", addrs.stats).await?;
        let readiness_listener = bind("readiness", addrs.readiness).await?;
        let bound = ServerAddrs {
            admin: local_addr(&admin_listener, addrs.admin),
            stats: local_addr(&stats_listener, addrs.stats),
            readiness: local_addr(&readiness_listener, addrs.readiness),
        };
        let tasks = vec![
            serve(admin_listener, admin_router(admin), &shutdown),
            serve(stats_listener, stats_router(registry), &shutdown),
            serve(readiness_listener, readiness_router(readiness), &shutdown),
        ];
        Ok(Servers {
            addrs: bound,
            tasks,
        })
    }

    /// Waits for every server to finish (after shutdown was cancelled).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn local_addr(listener: &Listener, requested: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(requested)
}

fn serve(listener: Listener, router: Router, shutdown: &CancellationToken) -> JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(server = listener.name(), %addr, "listening");
    }
    tokio::spawn(listener.serve_http1(None, router, shutdown.clone()))
}

/// `/config_dump`, `/certs` and an index at `/`.
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(admin_index))
        .route("/config_dump", get(config_dump::config_dump))
        .route("/certs", get(config_dump::certs))
        .with_state(Arc::new(state))
}

async fn admin_index(State(state): State<Arc<AdminState>>) -> String {
    state.index()
}

/// `/metrics` (and upstream's alias `/stats/prometheus`).
pub fn stats_router(registry: SharedRegistry) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/stats/prometheus", get(metrics))
        .with_state(registry)
}

async fn metrics(State(registry): State<SharedRegistry>) -> Response {
    match crate::metrics::encode(&registry) {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {error}\n"),
        )
            .into_response(),
    }
}

/// `/healthz/ready`.
pub fn readiness_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> Response {
    let missing = readiness.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", missing.join(", ")),
        )
            .into_response()
    }
}
