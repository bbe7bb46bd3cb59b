//! The delta ADS server alone on loopback, fed hand-built snapshots: its
//! gRPC listener and its monitoring port, a bearer-token double, and
//! reading `/debug/syncz`. For the xDS tests (`xds.rs`, `xds_waypoint.rs`);
//! the syncz readers serve every test reading syncz.
//!
//! Included with `#[path]`, next to `http_client.rs`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use istiod_rs::auth::{AuthError, AuthFuture, Authenticator, Caller};
use istiod_rs::monitoring::{self, Monitoring, MonitoringConfig, Readiness};
use istiod_rs::xds::{Authentication, XdsServer};
use prometheus_client::registry::Registry;
use proxy_core::listener::{Listener, ListenerMetrics};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// The token authenticator double (the real ones come with the CA):
/// token -> caller.
pub struct Tokens(pub HashMap<String, Caller>);

impl Authenticator for Tokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            self.0
                .get(token)
                .cloned()
                .ok_or_else(|| AuthError::InvalidToken("unknown token".into()))
        })
    }
}

/// Where a served [`XdsServer`] listens.
pub struct Ports {
    pub xds: SocketAddr,
    pub monitoring: SocketAddr,
}

/// Serves `server` with `authentication` on one loopback port and its
/// monitoring endpoints (metrics from `registry`, ready when `ready` is
/// true) on another.
pub async fn serve(
    server: &XdsServer,
    registry: Registry,
    authentication: Authentication,
    ready: watch::Receiver<bool>,
) -> Ports {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.service(authentication))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let router = Monitoring::new(
        Arc::new(registry),
        Readiness::when_true(ready, "the configuration source has not synced yet"),
        server.status(),
    )
    .router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let monitoring = listener.local_addr().unwrap();
    let listener = Listener::new(
        listener,
        monitoring::LISTENER,
        MonitoringConfig::DEFAULT_LIMITS,
        &ListenerMetrics::default(),
    );
    tokio::spawn(monitoring::serve(
        listener,
        router,
        CancellationToken::new(),
    ));
    Ports { xds, monitoring }
}

/// Only to avoid hanging forever when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

/// `/debug/syncz` on `monitoring`: the entry of `proxy`, once `until` holds for it.
pub async fn syncz_until(
    monitoring: SocketAddr,
    proxy: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = super::http_client::http_get(monitoring, "/debug/syncz").await;
        assert_eq!(status, 200, "{body}");
        let syncz: Value = serde_json::from_str(&body).unwrap();
        if let Some(entry) = syncz_entry(&syncz, proxy)
            && until(&entry)
        {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "syncz never got there: {syncz:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `/debug/syncz` entry of `proxy`, if connected.
pub fn syncz_entry(syncz: &Value, proxy: &str) -> Option<Value> {
    syncz["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["proxy"] == proxy)
        .cloned()
}

/// Whether every type of a proxy's `/debug/syncz` entry is SYNCED.
pub fn all_synced(proxy: &Value) -> bool {
    proxy["types"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["status"] == "SYNCED")
}

/// One type's entry in a proxy's `/debug/syncz` entry.
pub fn type_entry<'a>(proxy: &'a Value, type_url: &str) -> &'a Value {
    proxy["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type_url"] == type_url)
        .unwrap_or_else(|| panic!("no {type_url} in {proxy:#}"))
}
