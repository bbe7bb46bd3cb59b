//! HTTP connections to endpoints, each on its own HBONE tunnel, kept per
//! endpoint (identity, `ip:port`, protocol): an HTTP/2 connection carries
//! every request to its endpoint at once; HTTP/1.1 connections go back to
//! a short idle list once their response has been read to the end, and the
//! next request takes one from there before opening another. A connection
//! that failed is dropped and the next request opens a fresh one.
//!
//! A connection not used for `idle_timeout` is dropped from the cache (and
//! closes once its requests end), so endpoints that went away or are no
//! longer chosen do not keep tunnels open.
//!
//! Upgrades (WebSocket, HTTP/1.1 CONNECT) get a connection of their own,
//! never pooled: it becomes the upgraded byte stream.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use api::SpiffeId;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::hbone::HboneStream;

use super::{Body, BoxError, Error};

/// Which connection a request may use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub identity: SpiffeId,
    pub address: SocketAddr,
    pub http2: bool,
}

enum Connections {
    Http2(http2::SendRequest<Body>),
    Http1(Vec<http1::SendRequest<Body>>),
}

struct Slot {
    connections: Connections,
    last_used: Instant,
}

/// The connection cache. Shared (`Arc`): HTTP/1.1 connections return to it
/// from the response body.
pub struct Clients {
    slots: Mutex<Slots>,
    /// Held while an HTTP/2 connection to the key is being set up, so a
    /// burst of first requests shares one connection.
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct Slots {
    by_key: HashMap<Key, Slot>,
    swept: Option<Instant>,
}

impl Clients {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Clients {
            slots: Mutex::new(Slots::default()),
            connecting: Mutex::new(HashMap::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// The cache, swept of idle connections at most every half idle timeout.
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = slots
            .swept
            .is_none_or(|at| now.duration_since(at) >= self.idle_timeout / 2);
        if due {
            let timeout = self.idle_timeout;
            slots
                .by_key
                .retain(|_, slot| now.duration_since(slot.last_used) < timeout);
            slots.swept = Some(now);
        }
        slots
    }

    fn get_http2(&self, key: &Key) -> Option<http2::SendRequest<Body>> {
        let mut slots = self.lock();
        let slot = slots.by_key.get_mut(key)?;
        match &slot.connections {
            Connections::Http2(sender) if !sender.is_closed() => {
                slot.last_used = Instant::now();
                Some(sender.clone())
            }
            _ => None,
        }
    }

    /// Sends `request` to the endpoint of `key`, opening a tunnel with
    /// `tunnel` when no cached connection can take it.
    pub async fn send<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        tunnel: F,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneStream, Error>>,
    {
        if key.http2 {
            self.send_http2(key, tunnel, request).await
        } else {
            self.send_http1(key, tunnel, request).await
        }
    }

    async fn send_http2<F, Fut>(
        &self,
        key: Key,
        tunnel: F,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneStream, Error>>,
    {
        let endpoint = key.address;
        let gate = match self.get_http2(&key) {
            Some(_) => None,
            None => {
                let gate = self
                    .connecting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key.clone())
                    .or_default()
                    .clone();
                Some(gate.lock_owned().await)
            }
        };
        let mut sender = match self.get_http2(&key) {
            Some(sender) => sender,
            None => {
                let stream = tunnel().await?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| Error::Handshake { endpoint, source })?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%endpoint, %error, "HTTP/2 connection to endpoint ended");
                    }
                });
                self.lock().by_key.insert(
                    key.clone(),
                    Slot {
                        connections: Connections::Http2(sender.clone()),
                        last_used: Instant::now(),
                    },
                );
                sender
            }
        };
        drop(gate);
        let sent = async {
            sender.ready().await?;
            sender.send_request(request).await
        };
        match sent.await {
            Ok(response) => Ok(response.map(boxed)),
            Err(source) => {
                self.forget_http2(&key, &sender);
                Err(Error::Request { endpoint, source })
            }
        }
    }

    fn forget_http2(&self, key: &Key, failed: &http2::SendRequest<Body>) {
        let mut slots = self.lock();
        if let Some(Slot {
            connections: Connections::Http2(current),
            ..
        }) = slots.by_key.get(key)
            && (current.is_closed() || failed.is_closed())
        {
            slots.by_key.remove(key);
        }
    }

    async fn send_http1<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        tunnel: F,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneStream, Error>>,
    {
        let endpoint = key.address;
        let mut sender = match self.take_idle(&key) {
            Some(sender) => sender,
            None => {
                let stream = tunnel().await?;
                let (sender, connection) = http1::Builder::new()
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| Error::Handshake { endpoint, source })?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%endpoint, %error, "HTTP/1.1 connection to endpoint ended");
                    }
                });
                sender
            }
        };
        let response = async {
            sender.ready().await?;
            sender.send_request(request).await
        }
        .await
        .map_err(|source| Error::Request { endpoint, source })?;
        let (parts, body) = response.into_parts();
        let body = Returning {
            body,
            home: Some((self.clone(), key, sender)),
        };
        Ok(http::Response::from_parts(parts, BodyExt::boxed(body)))
    }

    fn take_idle(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut slots = self.lock();
        let Some(Slot {
            connections: Connections::Http1(idle),
            ..
        }) = slots.by_key.get_mut(key)
        else {
            return None;
        };
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, key: Key, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut slots = self.lock();
        let slot = slots.by_key.entry(key).or_insert_with(|| Slot {
            connections: Connections::Http1(Vec::new()),
            last_used: Instant::now(),
        });
        slot.last_used = Instant::now();
        if let Connections::Http1(idle) = &mut slot.connections
            && idle.len() < self.max_idle
        {
            idle.push(sender);
        }
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
            .by_key
            .iter()
            .map(|(key, slot)| {
                let (protocol, idle) = match &slot.connections {
                    Connections::Http2(s) => ("HTTP/2", usize::from(!s.is_closed())),
                    Connections::Http1(idle) => ("HTTP/1.1", idle.len()),
                };
                serde_json::json!({
                    "endpoint": key.address,
                    "identity": key.identity.to_string(),
                    "protocol": protocol,
                    "connections": idle,
                })
            })
            .collect();
        out.sort_by_key(|v| v["endpoint"].to_string());
        serde_json::Value::Array(out)
    }
}

fn boxed(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// An HTTP/1.1 response body that returns its connection to the idle list
/// once read to the end (dropped early, the connection closes).
struct Returning {
    body: Incoming,
    home: Option<(Arc<Clients>, Key, http1::SendRequest<Body>)>,
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
            Poll::Ready(None) => {
                if let Some((clients, key, sender)) = self.home.take() {
                    clients.give_back(key, sender);
                }
            }
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
        if self.body.is_end_stream()
            && let Some((clients, key, sender)) = self.home.take()
        {
            clients.give_back(key, sender);
        }
    }
}
