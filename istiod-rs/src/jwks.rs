//! The keys behind RequestAuthentication `jwksUri`s, fetched by istiod-rs so
//! that waypoints never dial out: every waypoint gets the same keys, inline
//! in its `JwtAuthentication` (see `index/l7/jwt.rs`).
//!
//! [`run`] keeps [`ClusterState::jwks`] filled: for every `jwtRules[]` entry
//! of a RequestAuthentication with `targetRefs` that has no inline `jwks`, it
//! fetches `jwksUri` (or, without one, the `jwks_uri` of the issuer's OpenID
//! discovery document `<issuer>/.well-known/openid-configuration`), as
//! upstream's `JwksResolver` (istio/istio pilot/pkg/model/jwks_resolver.go):
//! - HTTPS with rustls on aws-lc-rs and the system's roots (plain `http` is
//!   allowed, as upstream); the rule's `timeout` bounds each fetch (default
//!   [`JwksConfig::default_timeout`], upstream's 5 s);
//! - a document is accepted only when it is a JSON object with a `keys`
//!   array; a non-2xx answer, a body over [`JwksConfig::max_body`], a
//!   timeout or a connection error is a failure;
//! - refreshed every [`JwksConfig::refresh`] (upstream's
//!   `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`, 20 min); after a failure retried
//!   after [`JwksConfig::retry_min`] (upstream's 1 min), doubling up to
//!   [`JwksConfig::retry_max`] (60 min);
//! - a failed refresh keeps the last keys fetched; a source never fetched
//!   successfully is [`JwksEntry::Failed`], which the translation turns into
//!   `jwks_error` (the waypoint rejects that issuer's tokens) and a problem.
//!
//! The results enter the pure pipeline as input state: the store's
//! `jwks` field, written only when it changes, which triggers a rebuild
//! like any other change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use proxy_core::log_limit::LogLimit;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::state::{ClusterState, Store};

/// Where one rule's keys come from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JwksSource {
    pub issuer: String,
    /// `jwksUri`; `None`: the issuer's OpenID discovery document names it.
    pub uri: Option<String>,
}

impl JwksSource {
    /// The URL fetched first, for messages.
    pub fn describe(&self) -> String {
        match &self.uri {
            Some(uri) => uri.clone(),
            None => format!("{} (OpenID discovery)", discovery_url(&self.issuer)),
        }
    }
}

fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// What istiod-rs holds for one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksEntry {
    /// The JWKS document.
    Keys(String),
    /// Never fetched successfully: why the last attempt failed.
    Failed(String),
}

/// Every source's keys: part of the cluster state the translation reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksState(BTreeMap<JwksSource, JwksEntry>);

impl JwksState {
    pub fn get(&self, source: &JwksSource) -> Option<&JwksEntry> {
        self.0.get(source)
    }

    pub fn insert(&mut self, source: JwksSource, entry: JwksEntry) {
        self.0.insert(source, entry);
    }
}

/// Checks that a document is a JWKS: a JSON object with a `keys` array.
pub fn validate_jwks(doc: &str) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_str(doc).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
    match v.get("keys") {
        Some(serde_json::Value::Array(_)) => Ok(()),
        Some(_) => Err("the JWKS's keys is not an array".to_string()),
        None => Err("the JWKS has no keys field".to_string()),
    }
}

/// How JWKS are fetched and refreshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwksConfig {
    /// Refresh interval of keys fetched successfully.
    pub refresh: Duration,
    /// Fetch timeout when the rule sets none.
    pub default_timeout: Duration,
    /// First retry delay after a failure; doubles on each further failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Largest document accepted, in bytes.
    pub max_body: usize,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            refresh: Duration::from_secs(20 * 60),
            default_timeout: Duration::from_secs(5),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(60 * 60),
            max_body: 1 << 20,
        }
    }
}

/// Why keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{url:?} is not an http or https URL")]
    BadUrl { url: String },
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {url} failed: {source}")]
    Tls {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url} answered status {status}: {body:?}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("reading the answer of {url} failed (larger than {max} bytes?): {reason}")]
    Body {
        url: String,
        max: usize,
        reason: String,
    },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: {reason}")]
    Document { url: String, reason: String },
}

/// Fetches documents over HTTP(S).
#[derive(Clone)]
pub struct JwksClient {
    tls: Arc<rustls::ClientConfig>,
    max_body: usize,
}

impl JwksClient {
    /// Trusting the system's roots (those that cannot be read are logged).
    pub fn native(max_body: usize) -> Self {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            warn!(error = %e, "a system root certificate could not be read; JWKS servers it signs are not trusted");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        debug!(added, ignored, "system roots for JWKS fetches");
        Self::with_roots(roots, max_body)
    }

    /// Trusting `roots` only.
    pub fn with_roots(roots: RootCertStore, max_body: usize) -> Self {
        let tls = rustls::ClientConfig::builder_with_provider(proxy_core::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        JwksClient {
            tls: Arc::new(tls),
            max_body,
        }
    }

    /// The keys of a source, validated.
    pub async fn resolve(
        &self,
        source: &JwksSource,
        timeout: Duration,
    ) -> Result<String, JwksError> {
        let uri = match &source.uri {
            Some(uri) => uri.clone(),
            None => {
                let url = discovery_url(&source.issuer);
                let doc = self.get(&url, timeout).await?;
                let v: serde_json::Value =
                    serde_json::from_str(&doc).map_err(|e| JwksError::Document {
                        url: url.clone(),
                        reason: format!("the OpenID configuration is not JSON: {e}"),
                    })?;
                v.get("jwks_uri")
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| JwksError::Document {
                        url: url.clone(),
                        reason: "the OpenID configuration has no jwks_uri string".to_string(),
                    })?
                    .to_string()
            }
        };
        let doc = self.get(&uri, timeout).await?;
        validate_jwks(&doc).map_err(|reason| JwksError::Document { url: uri, reason })?;
        Ok(doc)
    }

    /// GET `url`, within `timeout`; the body of a 2xx answer.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<String, JwksError> {
        match tokio::time::timeout(timeout, self.get_unbounded(url)).await {
            Ok(r) => r,
            Err(_) => Err(JwksError::Timeout {
                url: url.to_string(),
                timeout,
            }),
        }
    }

    async fn get_unbounded(&self, url: &str) -> Result<String, JwksError> {
        let bad = || JwksError::BadUrl {
            url: url.to_string(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let host = uri.host().ok_or_else(bad)?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        // `[::1]` in a URL is `::1` on the wire.
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|source| JwksError::Connect {
                url: url.to_string(),
                source,
            })?;
        if https {
            let name = ServerName::try_from(bare).map_err(|_| bad())?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| JwksError::Tls {
                    url: url.to_string(),
                    source,
                })?;
            self.exchange(url, &uri, &host, port, tls).await
        } else {
            self.exchange(url, &uri, &host, port, tcp).await
        }
    }

    async fn exchange<S>(
        &self,
        url: &str,
        uri: &http::Uri,
        host: &str,
        port: u16,
        stream: S,
    ) -> Result<String, JwksError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http_err = |source| JwksError::Http {
            url: url.to_string(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let driver = tokio::spawn(conn);
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let authority = match uri.port_u16() {
            Some(_) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let request = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "istiod-rs")
            .body(Empty::<Bytes>::new())
            .map_err(|_| JwksError::BadUrl {
                url: url.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| JwksError::Body {
                url: url.to_string(),
                max: self.max_body,
                reason: e.to_string(),
            })?
            .to_bytes();
        driver.abort();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(JwksError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: text.chars().take(100).collect(),
            });
        }
        Ok(text)
    }
}

/// What the fetcher counts.
#[derive(Debug, Default)]
pub struct JwksMetrics {
    /// Fetches that gave a valid JWKS.
    pub fetch_success: Counter,
    /// Fetches that failed.
    pub fetch_fail: Counter,
}

impl JwksMetrics {
    /// Registers the metrics, prefixed `istiod_jwks_` (upstream's are
    /// `pilot_jwks_resolver_network_fetch_{success,fail}_total`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("istiod_jwks");
        r.register(
            "fetch_success",
            "JWKS fetches that gave a valid key set",
            self.fetch_success.clone(),
        );
        r.register(
            "fetch_fail",
            "JWKS fetches that failed (the issuer's tokens are rejected until one succeeds)",
            self.fetch_fail.clone(),
        );
    }
}

/// The sources the cluster's RequestAuthentications need, with their fetch
/// timeouts (the shortest when several rules name one source).
pub fn wanted(state: &ClusterState, config: &JwksConfig) -> BTreeMap<JwksSource, Duration> {
    let mut out: BTreeMap<JwksSource, Duration> = BTreeMap::new();
    // However a RequestAuthentication attaches, a waypoint enforces it
    // (selector / namespace ones too, see `index/l7.rs`).
    for ra in state.request_authentications.values() {
        let spec = &ra.spec;
        for rule in spec.jwt_rules.iter().filter(|r| r.jwks.is_none()) {
            let timeout = rule
                .timeout
                .as_deref()
                .and_then(parse_timeout)
                .filter(|d| !d.is_zero())
                .unwrap_or(config.default_timeout);
            let source = JwksSource {
                issuer: rule.issuer.clone(),
                uri: rule.jwks_uri.clone(),
            };
            let slot = out.entry(source).or_insert(timeout);
            *slot = (*slot).min(timeout);
        }
    }
    out
}

/// A rule's `timeout`: a protobuf JSON duration (`5s`, `0.5s`) or a Go
/// duration of h / m / s / ms parts (`1m30s`, `500ms`).
pub fn parse_timeout(text: &str) -> Option<Duration> {
    if let Some(seconds) = text.strip_suffix('s')
        && let Ok(secs) = seconds.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs));
    }
    text.parse::<gateway_api::Duration>()
        .ok()
        .map(|d| Duration::new(d.as_secs(), d.subsec_nanos()))
}

/// One source as the fetcher tracks it.
struct Tracked {
    entry: JwksEntry,
    /// The last keys fetched, kept through failed refreshes.
    last_good: bool,
    failures: u32,
    next: Instant,
}

/// Keeps the store's JWKS state current until the store is gone.
pub async fn run(
    store: Arc<Store>,
    client: JwksClient,
    config: JwksConfig,
    metrics: Arc<JwksMetrics>,
) {
    static FAILED: LogLimit = LogLimit::new(Duration::from_secs(60));
    let mut changes = store.changes();
    let mut tracked: BTreeMap<JwksSource, Tracked> = BTreeMap::new();
    loop {
        let wanted = wanted(&store.read(), &config);
        tracked.retain(|s, _| wanted.contains_key(s));
        let now = Instant::now();
        let due: Vec<(&JwksSource, &Duration)> = wanted
            .iter()
            .filter(|(s, _)| tracked.get(*s).is_none_or(|t| t.next <= now))
            .collect();
        let results =
            futures::future::join_all(due.iter().map(|(s, t)| client.resolve(s, **t))).await;
        let now = Instant::now();
        for ((source, _), result) in due.into_iter().zip(results) {
            let previous = tracked.remove(source);
            let t = match result {
                Ok(keys) => {
                    metrics.fetch_success.inc();
                    Tracked {
                        entry: JwksEntry::Keys(keys),
                        last_good: true,
                        failures: 0,
                        next: now + config.refresh,
                    }
                }
                Err(e) => {
                    metrics.fetch_fail.inc();
                    if let Some(suppressed) = FAILED.allow() {
                        warn!(issuer = %source.issuer, error = %e, suppressed, "JWKS fetch failed");
                    }
                    let failures = previous.as_ref().map_or(0, |p| p.failures) + 1;
                    let delay = config
                        .retry_min
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(config.retry_max);
                    match previous {
                        Some(p) if p.last_good => Tracked {
                            failures,
                            next: now + delay,
                            ..p
                        },
                        _ => Tracked {
                            entry: JwksEntry::Failed(e.to_string()),
                            last_good: false,
                            failures,
                            next: now + delay,
                        },
                    }
                }
            };
            tracked.insert(source.clone(), t);
        }
        let mut state = JwksState::default();
        for (s, t) in &tracked {
            state.insert(s.clone(), t.entry.clone());
        }
        if *store.read().jwks != state {
            info!(sources = tracked.len(), "JWKS changed");
            store.update(|s| s.jwks = Arc::new(state));
        }
        let next = tracked.values().map(|t| t.next).min();
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = sleep_until(next) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_protobuf_and_go_durations() {
        assert_eq!(parse_timeout("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_timeout("soon"), None);
        assert_eq!(parse_timeout("-1s"), None);
    }

    #[test]
    fn a_jwks_is_a_json_object_with_a_keys_array() {
        assert_eq!(validate_jwks(r#"{"keys": []}"#), Ok(()));
        assert!(validate_jwks("{").unwrap_err().contains("not JSON"));
        assert!(
            validate_jwks(r#"{"keys": {}}"#)
                .unwrap_err()
                .contains("not an array")
        );
        assert!(
            validate_jwks(r#"{"k": []}"#)
                .unwrap_err()
                .contains("no keys field")
        );
    }
}
