//! HTTP connections to endpoints, each on its own HBONE tunnel, kept per
//! endpoint (identity, `ip:port`, protocol) and bounded by the
//! destination's connection pool ([`Limits`]):
//! - an HTTP/2 connection carries many requests at once (up to the
//!   destination's `maxConcurrentStreams`; past it another connection is
//!   opened);
//! - HTTP/1.1 connections go back to a short idle list once their response
//!   has been read to the end, and the next request takes one from there
//!   before opening another;
//! - with `maxRequestsPerConnection`, a connection that has carried that
//!   many takes no more (and closes once its requests end);
//! - a request no connection can take at once waits, counted against
//!   `http1MaxPendingRequests`, while one is set up or, at the
//!   destination's `maxConnections`, until one comes back or closes.
//!
//! A connection that failed is dropped and the next request opens a fresh
//! one. A connection without a request for its destination's idle timeout
//! (`http.idleTimeout`, else `--pool-unused-release-timeout`) is closed by
//! a sweep once a second, so endpoints that went away or are no longer
//! chosen do not keep tunnels open.
//!
//! Upgrades (WebSocket, HTTP/1.1 CONNECT) get a connection of their own,
//! never pooled: it becomes the upgraded byte stream.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use api::SpiffeId;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::hbone::HboneStream;

use super::limits::{ConnectionPermit, Limits};
use super::{Body, BoxError, Error};

/// How often idle connections are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which connection a request may use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub identity: SpiffeId,
    pub address: SocketAddr,
    pub http2: bool,
}

struct Http2Connection {
    sender: http2::SendRequest<Body>,
    /// Requests started on it.
    started: u32,
    /// Requests on it now.
    active: Arc<AtomicU32>,
    last_used: Instant,
}

impl Http2Connection {
    /// Open, and busy or used within the idle timeout.
    fn usable(&self, now: Instant, idle_timeout: Duration) -> bool {
        !self.sender.is_closed()
            && (self.active.load(Ordering::Relaxed) > 0
                || now.duration_since(self.last_used) < idle_timeout)
    }
}

struct Http1Connection {
    sender: http1::SendRequest<Body>,
    /// Requests carried so far (the one in flight included).
    started: u32,
    idle_since: Instant,
}

/// One endpoint's connections.
struct Slot {
    /// HTTP/2 connections that may take new requests.
    http2: Vec<Http2Connection>,
    /// HTTP/1.1 connections waiting for a request.
    idle: Vec<Http1Connection>,
    /// Connections open (being set up, busy or idle): an endpoint with
    /// none gets one even at the destination's connection limit.
    open: usize,
    idle_timeout: Duration,
}

impl Slot {
    fn new(idle_timeout: Duration) -> Self {
        Slot {
            http2: Vec::new(),
            idle: Vec::new(),
            open: 0,
            idle_timeout,
        }
    }

    fn unused(&self) -> bool {
        self.open == 0 && self.http2.is_empty() && self.idle.is_empty()
    }
}

/// The connection cache. Shared (`Arc`): connections give their place
/// back to it when they close, HTTP/1.1 ones return to it from the
/// response body.
pub struct Clients {
    slots: Mutex<HashMap<Key, Slot>>,
    /// Held while an HTTP/2 connection to the key is being set up, so a
    /// burst of first requests shares one connection.
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    max_idle: usize,
    sweeper: OnceLock<tokio::task::JoinHandle<()>>,
}

impl Drop for Clients {
    fn drop(&mut self) {
        if let Some(sweeper) = self.sweeper.get() {
            sweeper.abort();
        }
    }
}

/// An open connection's place: counted in its endpoint's slot and, when
/// the destination limits connections, in its circuit breaker. Given back
/// when the connection ends (or fails to open).
struct Opened {
    clients: Arc<Clients>,
    key: Key,
    limits: Arc<Limits>,
    _permit: ConnectionPermit,
}

impl Drop for Opened {
    fn drop(&mut self) {
        {
            let mut slots = self.clients.lock();
            if let Some(slot) = slots.get_mut(&self.key) {
                slot.open = slot.open.saturating_sub(1);
                if slot.unused() {
                    slots.remove(&self.key);
                }
            }
        }
        self.limits.notify_freed();
    }
}

/// One request on an HTTP/2 connection, until its response ends.
struct Stream {
    active: Arc<AtomicU32>,
    limits: Arc<Limits>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.limits.notify_freed();
    }
}

impl Clients {
    pub fn new(max_idle: usize) -> Self {
        Clients {
            slots: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            max_idle,
            sweeper: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the idle sweep with the first connection (a runtime exists
    /// then); it ends with the cache.
    fn sweep_idle(self: &Arc<Self>) {
        self.sweeper.get_or_init(|| {
            let clients: Weak<Clients> = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(clients) = clients.upgrade() else {
                        return;
                    };
                    clients.sweep(Instant::now());
                }
            })
        });
    }

    /// Drops connections idle past their timeout (they close) and closed
    /// ones; forgets endpoints with none left.
    fn sweep(&self, now: Instant) {
        {
            let mut slots = self.lock();
            for slot in slots.values_mut() {
                let timeout = slot.idle_timeout;
                slot.idle.retain(|c| {
                    !c.sender.is_closed() && now.duration_since(c.idle_since) < timeout
                });
                slot.http2.retain(|c| c.usable(now, timeout));
            }
            slots.retain(|_, slot| !slot.unused());
        }
        self.connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, gate| Arc::strong_count(gate) > 1);
    }

    /// Counts a new connection to `key`'s endpoint, if the destination's
    /// connection limit allows it.
    fn reserve(self: &Arc<Self>, key: &Key, limits: &Arc<Limits>) -> Option<Opened> {
        let mut slots = self.lock();
        let slot = slots
            .entry(key.clone())
            .or_insert_with(|| Slot::new(limits.settings.idle_timeout));
        let permit = limits.open_connection(slot.open == 0)?;
        slot.open += 1;
        slot.idle_timeout = limits.settings.idle_timeout;
        Some(Opened {
            clients: self.clone(),
            key: key.clone(),
            limits: limits.clone(),
            _permit: permit,
        })
    }

    /// Sends `request` to the endpoint of `key`, opening a tunnel with
    /// `tunnel` when no cached connection can take it.
    pub async fn send<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        limits: &Arc<Limits>,
        tunnel: F,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneStream, Error>>,
    {
        if key.http2 {
            self.send_http2(key, limits, tunnel, request).await
        } else {
            self.send_http1(key, limits, tunnel, request).await
        }
    }

    /// A request slot on an HTTP/2 connection to `key` that can take one
    /// more, counted as started there.
    fn take_stream(
        &self,
        key: &Key,
        limits: &Arc<Limits>,
    ) -> Option<(http2::SendRequest<Body>, Stream)> {
        let settings = &limits.settings;
        let now = Instant::now();
        let mut slots = self.lock();
        let slot = slots.get_mut(key)?;
        let timeout = slot.idle_timeout;
        slot.http2.retain(|c| c.usable(now, timeout));
        let i = slot.http2.iter().position(|c| {
            settings
                .max_concurrent_streams
                .is_none_or(|max| c.active.load(Ordering::Relaxed) < max)
        })?;
        let connection = &mut slot.http2[i];
        connection.started += 1;
        connection.last_used = now;
        connection.active.fetch_add(1, Ordering::Relaxed);
        let taken = (
            connection.sender.clone(),
            Stream {
                active: connection.active.clone(),
                limits: limits.clone(),
            },
        );
        if settings
            .max_requests_per_connection
            .is_some_and(|max| connection.started >= max)
        {
            // Its last request: it closes once its requests end.
            slot.http2.swap_remove(i);
        }
        Some(taken)
    }

    async fn send_http2<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        limits: &Arc<Limits>,
        tunnel: F,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneStream, Error>>,
    {
        let endpoint = key.address;
        let mut tunnel = Some(tunnel);
        let mut waiting = None;
        let (mut sender, stream) = loop {
            let freed = limits.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(taken) = self.take_stream(&key, limits) {
                break taken;
            }
            if waiting.is_none() {
                waiting = Some(limits.wait_for_connection()?);
            }
            let gate = self
                .connecting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_default()
                .clone();
            let gate = gate.lock_owned().await;
            if let Some(taken) = self.take_stream(&key, limits) {
                break taken;
            }
            if let Some(opened) = self.reserve(&key, limits)
                && let Some(tunnel) = tunnel.take()
            {
                let stream = tunnel().await?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| Error::Handshake { endpoint, source })?;
                tokio::spawn(async move {
                    let _opened = opened;
                    if let Err(error) = connection.await {
                        tracing::debug!(%endpoint, %error, "HTTP/2 connection to endpoint ended");
                    }
                });
                self.sweep_idle();
                self.lock()
                    .entry(key.clone())
                    .or_insert_with(|| Slot::new(limits.settings.idle_timeout))
                    .http2
                    .push(Http2Connection {
                        sender,
                        started: 0,
                        active: Arc::new(AtomicU32::new(0)),
                        last_used: Instant::now(),
                    });
                drop(gate);
                continue;
            }
            drop(gate);
            freed.await;
        };
        drop(waiting);
        let sent = async {
            sender.ready().await?;
            sender.send_request(request).await
        };
        match sent.await {
            Ok(response) => Ok(response.map(|body| {
                BodyExt::boxed(OnStream {
                    body,
                    _stream: stream,
                })
            })),
            Err(source) => {
                self.forget_http2(&key, &sender);
                Err(Error::Request { endpoint, source })
            }
        }
    }

    fn forget_http2(&self, key: &Key, failed: &http2::SendRequest<Body>) {
        if failed.is_closed()
            && let Some(slot) = self.lock().get_mut(key)
        {
            slot.http2.retain(|c| !c.sender.is_closed());
        }
    }

    async fn send_http1<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        limits: &Arc<Limits>,
        tunnel: F,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneStream, Error>>,
    {
        let endpoint = key.address;
        let mut tunnel = Some(tunnel);
        let mut waiting = None;
        let mut connection = loop {
            let freed = limits.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(idle) = self.take_idle(&key) {
                break idle;
            }
            if waiting.is_none() {
                waiting = Some(limits.wait_for_connection()?);
            }
            if let Some(opened) = self.reserve(&key, limits)
                && let Some(tunnel) = tunnel.take()
            {
                let stream = tunnel().await?;
                let (sender, connection) = http1::Builder::new()
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| Error::Handshake { endpoint, source })?;
                tokio::spawn(async move {
                    let _opened = opened;
                    if let Err(error) = connection.await {
                        tracing::debug!(%endpoint, %error, "HTTP/1.1 connection to endpoint ended");
                    }
                });
                self.sweep_idle();
                break Http1Connection {
                    sender,
                    started: 0,
                    idle_since: Instant::now(),
                };
            }
            freed.await;
        };
        drop(waiting);
        connection.started += 1;
        let response = async {
            connection.sender.ready().await?;
            connection.sender.send_request(request).await
        }
        .await
        .map_err(|source| Error::Request { endpoint, source })?;
        let (parts, body) = response.into_parts();
        let body = Returning {
            body,
            home: Some((self.clone(), key, connection, limits.clone())),
        };
        Ok(http::Response::from_parts(parts, BodyExt::boxed(body)))
    }

    fn take_idle(&self, key: &Key) -> Option<Http1Connection> {
        let now = Instant::now();
        let mut slots = self.lock();
        let slot = slots.get_mut(key)?;
        while let Some(connection) = slot.idle.pop() {
            // Idle past the timeout: closes, even before the sweep.
            if connection.sender.is_ready()
                && now.duration_since(connection.idle_since) < slot.idle_timeout
            {
                return Some(connection);
            }
        }
        None
    }

    /// An HTTP/1.1 connection whose response has ended: idle again, unless
    /// it has carried its destination's `maxRequestsPerConnection` or the
    /// idle list is full (then it closes).
    fn give_back(&self, key: Key, mut connection: Http1Connection, limits: &Limits) {
        let spent = limits
            .settings
            .max_requests_per_connection
            .is_some_and(|max| connection.started >= max);
        if connection.sender.is_closed() || spent {
            return;
        }
        {
            let mut slots = self.lock();
            let Some(slot) = slots.get_mut(&key) else {
                return;
            };
            if slot.idle.len() >= self.max_idle {
                return;
            }
            connection.idle_since = Instant::now();
            slot.idle.push(connection);
        }
        limits.notify_freed();
    }

    /// A request that upgrades (WebSocket, CONNECT) on a connection of its
    /// own; the caller takes the upgraded stream from the response.
    pub async fn send_upgrade(
        stream: HboneStream,
        endpoint: SocketAddr,
        request: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, Error> {
        let (mut sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Handshake { endpoint, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, %error, "upgraded connection to endpoint ended");
            }
        });
        sender
            .send_request(request)
            .await
            .map_err(|source| Error::Request { endpoint, source })
    }

    /// Connections held, by endpoint, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let slots = self.lock();
        let mut out: Vec<_> = slots
            .iter()
            .map(|(key, slot)| {
                serde_json::json!({
                    "endpoint": key.address,
                    "identity": key.identity.to_string(),
                    "protocol": if key.http2 { "HTTP/2" } else { "HTTP/1.1" },
                    "connections": slot.open,
                    "idle": slot.idle.len(),
                    "idleTimeout": format!("{:?}", slot.idle_timeout),
                })
            })
            .collect();
        out.sort_by_key(|v| v["endpoint"].to_string());
        serde_json::Value::Array(out)
    }

    /// Connections open to the endpoint at `address`, of either protocol.
    pub fn open_to(&self, address: SocketAddr) -> usize {
        self.lock()
            .iter()
            .filter(|(key, _)| key.address == address)
            .map(|(_, slot)| slot.open)
            .sum()
    }
}

/// An HTTP/2 response body that holds its request's place on the
/// connection until it ends.
struct OnStream {
    body: Incoming,
    _stream: Stream,
}

impl HttpBody for OnStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An HTTP/1.1 response body that returns its connection to the idle list
/// once read to the end (dropped early, the connection closes).
struct Returning {
    body: Incoming,
    home: Option<(Arc<Clients>, Key, Http1Connection, Arc<Limits>)>,
}

impl Returning {
    fn go_home(&mut self) {
        if let Some((clients, key, connection, limits)) = self.home.take() {
            clients.give_back(key, connection, &limits);
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.go_home(),
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        polled.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended.
        if self.body.is_end_stream() {
            self.go_home();
        }
    }
}
