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
//! gracefully when the shutdown token is cancelled.

mod config_dump;
mod readiness;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{OPENMETRICS_CONTENT_TYPE, SharedRegistry};

pub use config_dump::{
    AdminState, CertDump, CertificateSource, CertsDump, DumpSection, NoCertificates,
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
    pub async fn start(
        addrs: ServerAddrs,
        admin: AdminState,
        registry: SharedRegistry,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Result<Servers, Error> {
        let admin_listener = bind("admin", addrs.admin).await?;
        let stats_listener = bind("stats", addrs.stats).await?;
        let readiness_listener = bind("readiness", addrs.readiness).await?;
        let bound = ServerAddrs {
            admin: local_addr(&admin_listener, addrs.admin),
            stats: local_addr(&stats_listener, addrs.stats),
            readiness: local_addr(&readiness_listener, addrs.readiness),
        };
        let tasks = vec![
            serve("admin", admin_listener, admin_router(admin), &shutdown),
            serve("stats", stats_listener, stats_router(registry), &shutdown),
            serve(
                "readiness",
                readiness_listener,
                readiness_router(readiness),
                &shutdown,
            ),
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

async fn bind(server: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        server,
        addr,
        source,
    })
}

fn local_addr(listener: &TcpListener, requested: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(requested)
}

fn serve(
    server: &'static str,
    listener: TcpListener,
    router: Router,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    let shutdown = shutdown.clone().cancelled_owned();
    if let Ok(addr) = listener.local_addr() {
        info!(server, %addr, "listening");
    }
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(server, %error, "server stopped with an error");
        }
    })
}

/// `/config_dump`, `/certs` and an index at `/`.
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(admin_index))
        .route("/config_dump", get(config_dump::config_dump))
        .route("/certs", get(config_dump::certs))
        .with_state(Arc::new(state))
}

async fn admin_index() -> &'static str {
    "admin endpoints:\n  /config_dump  workloads, services, policies, certificates, config\n  /certs        certificates held by this proxy\n"
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
