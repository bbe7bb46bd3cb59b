//! Client side of HBONE: a pool of mutual-TLS HTTP/2 connections, keyed by
//! (source identity, destination identity, destination address), each
//! carrying many CONNECT streams.
//!
//! A connection takes at most `max_streams_per_connection` streams; when all
//! of a key's connections are full another is opened. Connections with no
//! stream for `idle_timeout` are closed. Setting up a connection for a key
//! happens under that key's lock, so a burst of first requests shares one
//! handshake instead of racing to open one each.
//!
//! A CONNECT not answered within `connect_timeout` (connection set-up
//! included) retires its connection at once: it takes no new streams, so
//! the next CONNECT dials fresh instead of queuing behind a dead peer;
//! streams already on it go on until they end. A connection whose peer
//! stops answering PINGs is dropped with its streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use api::SpiffeId;
use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::metrics::{DropReason, HboneMetrics, Side};
use super::{Connect, HboneError, HboneStream, Http2Settings, keepalive};
use crate::identity::WorkloadCertificate;
use crate::log_limit::LogLimit;
use crate::tls;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_streams_per_connection: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// How long a CONNECT may take, from asking the pool to the peer's
    /// answer (setting up a connection included).
    pub connect_timeout: Duration,
    pub http2: Http2Settings,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            http2: Http2Settings::default(),
        }
    }
}

/// Where a tunnel goes: the HBONE peer (`address`, usually `<ip>:15008`),
/// the identity it must prove, and the `:authority` of the CONNECT (the
/// destination `ip:port` behind the peer; for a waypoint, the original
/// destination).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HboneTarget {
    pub identity: SpiffeId,
    pub address: SocketAddr,
    pub authority: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    address: SocketAddr,
}

type Connections = Arc<tokio::sync::Mutex<Vec<Arc<PooledConnection>>>>;

/// Cheap to clone; clones share connections. Must be created inside a
/// tokio runtime (it runs an eviction task, stopped when the last clone goes).
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("config", &self.inner.config)
            .field("open_connections", &self.open_connections())
            .finish_non_exhaustive()
    }
}

struct PoolInner {
    connector: Arc<dyn Connect>,
    config: PoolConfig,
    metrics: Arc<HboneMetrics>,
    keys: Mutex<HashMap<PoolKey, Connections>>,
    /// HTTP/2 connections whose driver task is still running.
    open: Arc<AtomicUsize>,
    next_id: AtomicU64,
    evictor: AbortHandle,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.evictor.abort();
    }
}

struct PooledConnection {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    active_streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Set once the connection takes no new streams: its driver ended, or it
    /// was retired.
    closed: Arc<AtomicBool>,
}

impl PooledConnection {
    fn try_reserve(self: &Arc<Self>, max: usize) -> Option<StreamSlot> {
        self.active_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(StreamSlot {
            connection: self.clone(),
        })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// No new streams on this connection; those on it go on. True for the
    /// call that retired it.
    fn retire(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.active_streams.load(Ordering::Acquire) != 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(now.saturating_duration_since(since))
    }
}

/// A stream's place on a pooled connection; freed when the stream drops.
pub(crate) struct StreamSlot {
    connection: Arc<PooledConnection>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self
            .connection
            .active_streams
            .fetch_sub(1, Ordering::AcqRel)
            == 1
        {
            *self
                .connection
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

impl HbonePool {
    pub fn new(config: PoolConfig, connector: Arc<dyn Connect>) -> Self {
        Self::with_metrics(config, connector, Arc::default())
    }

    /// A pool counting the connections it drops or retires into `metrics`.
    pub fn with_metrics(
        config: PoolConfig,
        connector: Arc<dyn Connect>,
        metrics: Arc<HboneMetrics>,
    ) -> Self {
        let period =
            (config.idle_timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(10));
        let inner = Arc::new_cyclic(|pool: &Weak<PoolInner>| PoolInner {
            connector,
            config,
            metrics,
            keys: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(0),
            evictor: tokio::spawn(evict_idle(pool.clone(), period)).abort_handle(),
        });
        HbonePool { inner }
    }

    /// Opens a CONNECT tunnel to `target` as `source`, reusing a pooled
    /// connection when one has room. Fails if the peer is not
    /// `target.identity`, answers anything but 200, or takes longer than
    /// the pool's `connect_timeout`.
    pub async fn connect(
        &self,
        source: &WorkloadCertificate,
        target: &HboneTarget,
    ) -> Result<HboneStream, HboneError> {
        self.connect_with_headers(source, target, &http::HeaderMap::new())
            .await
    }

    /// [`Self::connect`], the CONNECT carrying `headers` too (ztunnel's
    /// `baggage`, `forwarded`, `traceparent`).
    pub async fn connect_with_headers(
        &self,
        source: &WorkloadCertificate,
        target: &HboneTarget,
        headers: &http::HeaderMap,
    ) -> Result<HboneStream, HboneError> {
        let key = PoolKey {
            source: source.identity().clone(),
            destination: target.identity.clone(),
            address: target.address,
        };
        let timeout = self.inner.config.connect_timeout;
        let deadline = Instant::now() + timeout;
        let mut retried = false;
        loop {
            let (slot, fresh) =
                tokio::time::timeout_at(deadline, self.inner.checkout(&key, source))
                    .await
                    .map_err(|_| HboneError::Timeout {
                        address: key.address,
                        timeout,
                    })??;
            // Pending only while the peer's own stream limit is reached.
            let ready = tokio::time::timeout_at(deadline, slot.connection.sender.clone().ready());
            match ready.await {
                Err(_) => return Err(self.inner.connect_timed_out(slot, target)),
                Ok(Ok(sender)) => {
                    let connection = slot.connection.clone();
                    match self
                        .inner
                        .send_connect(sender, slot, target, headers, deadline)
                        .await
                    {
                        // The peer went away without a word (its pod's
                        // network namespace is gone; a new pod may hold the
                        // address): the connection looked alive until this
                        // CONNECT met a reset. No tunnel existed, so no byte
                        // of the caller's was sent: retire it, retry once.
                        Err(HboneError::Http2 { source, .. })
                            if !fresh && !retried && (source.is_io() || source.is_go_away()) =>
                        {
                            tracing::debug!(address = %key.address, error = %source, "pooled HBONE connection failed its CONNECT; reconnecting");
                            connection.retire();
                            retried = true;
                        }
                        outcome => return outcome,
                    }
                }
                // A pooled connection can die quietly (GOAWAY, peer restart):
                // drop it and try once more on a new one.
                Ok(Err(e)) if !fresh && !retried => {
                    tracing::debug!(address = %key.address, error = %e, "pooled HBONE connection is gone; reconnecting");
                    slot.connection.retire();
                    retried = true;
                }
                Ok(Err(source)) => {
                    return Err(HboneError::Http2 {
                        address: target.address,
                        source,
                    });
                }
            }
        }
    }

    /// HTTP/2 connections currently open (pooled or still carrying streams).
    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }
}

impl PoolInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Connections>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot on a connection for `key`: an existing one with room, else a
    /// new one. Returns whether the connection is new.
    async fn checkout(
        &self,
        key: &PoolKey,
        source: &WorkloadCertificate,
    ) -> Result<(StreamSlot, bool), HboneError> {
        let connections = self.lock().entry(key.clone()).or_default().clone();
        let mut connections = connections.lock().await;
        connections.retain(|c| !c.is_closed());
        let max = self.config.max_streams_per_connection.max(1);
        if let Some(slot) = connections.iter().find_map(|c| c.try_reserve(max)) {
            return Ok((slot, false));
        }
        let timeout = self.config.http2.handshake_timeout;
        let connection = tokio::time::timeout(timeout, self.open_connection(key, source))
            .await
            .map_err(|_| HboneError::Timeout {
                address: key.address,
                timeout,
            })??;
        connections.push(connection.clone());
        Ok((StreamSlot { connection }, true))
    }

    /// A new connection to `key`, with one stream slot already taken for
    /// the caller.
    async fn open_connection(
        &self,
        key: &PoolKey,
        source: &WorkloadCertificate,
    ) -> Result<Arc<PooledConnection>, HboneError> {
        let address = key.address;
        let config = tls::hbone_client_config(source, &key.destination)?;
        let tcp = self
            .connector
            .connect(address)
            .await
            .map_err(|source| HboneError::Connect { address, source })?;
        // Small writes (handshakes, window updates) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let settings = &self.config.http2;
        settings
            .keepalive
            .apply_tcp(&tcp)
            .map_err(|source| HboneError::Connect { address, source })?;
        // The name is irrelevant to verification (the SPIFFE id is checked);
        // an IP sends no SNI.
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(address.ip().into()), tcp)
            .await
            .map_err(|source| HboneError::Tls { address, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(HboneError::NoAlpn { address });
        }
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(settings.max_frame_size)
            .max_header_list_size(settings.max_response_header_list)
            .max_local_error_reset_streams(Some(settings.max_refused_streams))
            // Until the peer's SETTINGS say otherwise, as many as we put on it.
            .initial_max_send_streams(self.config.max_streams_per_connection)
            // A stream may queue as much as the peer's window takes.
            .max_send_buffer_size(settings.stream_window as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::Http2 { address, source })?;
        let ping_pong = connection
            .ping_pong()
            .expect("a new connection hands out its PingPong once");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        self.open.fetch_add(1, Ordering::AcqRel);
        tokio::spawn({
            let (closed, open, metrics) = (closed.clone(), self.open.clone(), self.metrics.clone());
            let keepalive = settings.keepalive;
            async move {
                tokio::select! {
                    biased;
                    result = connection => match result {
                        Ok(()) => tracing::debug!(%address, id, "HBONE connection closed"),
                        Err(error) => tracing::debug!(%address, id, %error, "HBONE connection failed"),
                    },
                    // Dropping the connection closes it and fails its streams.
                    () = keepalive::unanswered_ping(ping_pong, keepalive) => {
                        metrics.dropped(Side::Client, DropReason::KeepaliveTimeout);
                        static DEAD_PEER: LogLimit = LogLimit::new(Duration::from_secs(10));
                        if let Some(suppressed) = DEAD_PEER.allow() {
                            tracing::warn!(%address, id, timeout = ?keepalive.ping_timeout, suppressed, "HBONE peer stopped answering PINGs; connection dropped");
                        }
                    }
                }
                closed.store(true, Ordering::Release);
                open.fetch_sub(1, Ordering::AcqRel);
            }
        });
        tracing::debug!(%address, id, source = %key.source, destination = %key.destination, "HBONE connection opened");
        Ok(Arc::new(PooledConnection {
            id,
            sender,
            active_streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            closed,
        }))
    }

    /// Sends the CONNECT on `slot`'s connection and waits for the answer
    /// until `deadline`.
    async fn send_connect(
        &self,
        mut sender: h2::client::SendRequest<Bytes>,
        slot: StreamSlot,
        target: &HboneTarget,
        headers: &http::HeaderMap,
        deadline: Instant,
    ) -> Result<HboneStream, HboneError> {
        let address = target.address;
        let h2_error = |source| HboneError::Http2 { address, source };
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.authority.to_string())
            .body(())
            .map_err(|_| HboneError::Authority(target.authority))?;
        request
            .headers_mut()
            .extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (response, send) = sender.send_request(request, false).map_err(h2_error)?;
        let response = match tokio::time::timeout_at(deadline, response).await {
            Ok(response) => response.map_err(h2_error)?,
            Err(_) => return Err(self.connect_timed_out(slot, target)),
        };
        if response.status() != http::StatusCode::OK {
            return Err(HboneError::Refused {
                address,
                authority: target.authority,
                status: response.status(),
            });
        }
        Ok(HboneStream::new(send, response.into_body(), Some(slot)))
    }

    /// A CONNECT on `slot`'s connection went unanswered: the connection is
    /// retired (and counted once), the stream given up.
    fn connect_timed_out(&self, slot: StreamSlot, target: &HboneTarget) -> HboneError {
        let connection = &slot.connection;
        if connection.retire() {
            self.metrics
                .dropped(Side::Client, DropReason::ConnectTimeout);
            tracing::debug!(address = %target.address, id = connection.id, "CONNECT unanswered; HBONE connection retired");
        }
        HboneError::ConnectTimeout {
            address: target.address,
            authority: target.authority,
            timeout: self.config.connect_timeout,
        }
    }

    /// Drops closed connections and those idle past the timeout; dropping the
    /// last handle makes h2 close the connection gracefully (GOAWAY).
    fn evict(&self, now: Instant) {
        let idle_timeout = self.config.idle_timeout;
        self.lock().retain(|_, connections| {
            // Busy: someone is opening or picking a connection; next round.
            let Ok(mut list) = connections.try_lock() else {
                return true;
            };
            list.retain(|c| {
                let idle = c.idle_for(now).is_some_and(|d| d >= idle_timeout);
                if idle {
                    tracing::debug!(id = c.id, "closing idle HBONE connection");
                }
                !idle && !c.is_closed()
            });
            // Only the map holds an empty list: nobody is about to use it.
            !list.is_empty() || Arc::strong_count(connections) > 1
        });
    }
}

async fn evict_idle(pool: Weak<PoolInner>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.evict(Instant::now());
    }
}
