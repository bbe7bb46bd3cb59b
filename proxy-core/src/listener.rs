//! Bounds on what a peer can hold on a server's listening socket, for every
//! server a process runs: ztunnel's admin (15000), stats (15020) and
//! readiness (15021) servers, istiod's gRPC (15012, 15010), monitoring
//! (15014) and webhook (15017) listeners; ztunnel's data-path listeners
//! (each pod's 15001, 15006, 15008 and DNS over TCP) take the caps alone
//! ([`ListenerLimits::caps`], [`Admitted::into_parts`]). Anyone who can reach
//! such a port, credentials or not, must not be able to exhaust the
//! process's file descriptors or memory by opening connections and sending
//! nothing.
//!
//! A [`Listener`] holds at most `max_connections` connections at once, and
//! at most `max_connections_per_peer` from one IP address; one more is
//! accepted and reset at once (left in the kernel's backlog it would still
//! hold a socket, and its peer could not tell), so the listener never takes
//! more than the cap's file descriptors whatever the peers do, and one pod
//! alone cannot fill it for everyone else. Each admitted connection then
//! has:
//!
//! - `handshake_timeout` to finish its TLS handshake (TLS listeners);
//! - `header_timeout` to send its first request: the HTTP/1 request head
//!   (hyper's header timeout, which also ends a kept-alive connection that
//!   sends no next request: closed, but not counted as dropped) or the
//!   HTTP/2 connection preface;
//! - `idle_timeout` at any time: a connection on which nothing is read and
//!   nothing written for that long is closed (a peer that stopped reading a
//!   response, a body that stopped arriving, a dead peer).
//!
//! Every connection a limit drops is counted in
//! `listener_connections_dropped_total{listener, reason}` (both labels from
//! fixed sets; `listener_open_connections{listener}` shows how full each
//! listener is) and logged at most once per interval ([`LogLimit`]).
//!
//! [`Listener::serve_http1`] serves an HTTP/1.1 service (an axum router...)
//! over plain TCP or TLS; [`Listener::http2_connections`] feeds a gRPC server
//! (tonic's `serve_with_incoming`). Timers assume, as hyper and tonic do,
//! that one task drives each connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::log_limit::LogLimit;

/// The HTTP/2 connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) is 24
/// bytes: a gRPC client has sent its first request once they arrived.
const HTTP2_PREFACE_LEN: usize = 24;
/// A peer-triggered line is logged at most this often per call site.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After an accept failure that is not the peer's (out of file descriptors,
/// of memory), the listener waits this long before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What every accept loop does when `accept` fails (this guard's, the
/// HBONE server's, ztunnel's pod listeners'): logs it at most once per
/// interval for the whole process, with the count it left out (out of file
/// descriptors, every listener fails at once, as fast as the kernel
/// answers), and unless the failure was the peer's (a connection that died
/// in the backlog) pauses before the next try, so a lasting one cannot spin.
pub async fn after_accept_failure(listener: &str, error: &io::Error) {
    static ACCEPT_FAILED: LogLimit = LogLimit::new(LOG_INTERVAL);
    if let Some(suppressed) = ACCEPT_FAILED.allow() {
        warn!(listener, %error, suppressed, "accepting a connection failed");
    }
    if !matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) {
        tokio::time::sleep(ACCEPT_RETRY).await;
    }
}

/// What one listener allows each peer; part of each binary's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections held at once; one more is reset at once.
    pub max_connections: usize,
    /// Connections held at once from one IP address (of the peer as the
    /// listener sees it: a gateway or SNAT makes many clients one peer).
    pub max_connections_per_peer: usize,
    /// From accept to the end of the TLS handshake (TLS listeners).
    pub handshake_timeout: Duration,
    /// From the connection being ready to the end of the first request
    /// head (HTTP/1; also between two requests of a kept-alive connection)
    /// or of the connection preface (HTTP/2).
    pub header_timeout: Duration,
    /// Nothing read and nothing written for this long: closed.
    pub idle_timeout: Duration,
}

impl ListenerLimits {
    /// The caps alone, for a listener whose connections leave through
    /// [`Admitted::into_parts`] to a protocol with timeouts of its own: the
    /// timeouts here, which only [`Listener::serve_http1`] and
    /// [`Listener::http2_connections`] apply, are a century (finite, so
    /// that a deadline computed from them cannot overflow).
    pub const fn caps(max_connections: usize, max_connections_per_peer: usize) -> Self {
        const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        ListenerLimits {
            max_connections,
            max_connections_per_peer,
            handshake_timeout: NEVER,
            header_timeout: NEVER,
            idle_timeout: NEVER,
        }
    }
}

/// Why a listener dropped a connection (a fixed set: a metric label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// The listener already held `max_connections`.
    connection_limit,
    /// The listener already held `max_connections_per_peer` from that address.
    peer_limit,
    /// The TLS handshake did not finish within `handshake_timeout`.
    handshake_timeout,
    /// The TLS handshake failed (not TLS, no common protocol...).
    handshake_failed,
    /// The first request (head or HTTP/2 preface) did not arrive in time.
    header_timeout,
    /// Nothing moved either way for `idle_timeout`.
    idle_timeout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    listener: &'static str,
    reason: DropReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// The listeners' metrics, registered once per process; every [`Listener`]
/// shares them, labelled with its name.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    dropped: Family<DroppedLabels, Counter>,
    open: Family<ListenerLabel, Gauge>,
    accept_failures: Family<ListenerLabel, Counter>,
}

impl ListenerMetrics {
    /// Registers `listener_connections_dropped_total`,
    /// `listener_open_connections` and `listener_accept_failures_total`
    /// (under the registry's prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ListenerMetrics::default();
        registry.register(
            "listener_connections_dropped",
            "Connections a listener dropped because of one of its limits (connection caps, handshake, header and idle timeouts) or a failed TLS handshake, by listener and reason",
            metrics.dropped.clone(),
        );
        registry.register(
            "listener_open_connections",
            "Connections a listener holds, by listener (at most its connection cap)",
            metrics.open.clone(),
        );
        registry.register(
            "listener_accept_failures",
            "Failed accepts on a listener (out of file descriptors or memory), by listener",
            metrics.accept_failures.clone(),
        );
        metrics
    }

    /// How many accepts failed on `listener`.
    pub fn accept_failures(&self, listener: &'static str) -> u64 {
        self.accept_failures
            .get_or_create(&ListenerLabel { listener })
            .get()
    }

    /// How many connections `listener` dropped for `reason`.
    pub fn dropped(&self, listener: &'static str, reason: DropReason) -> u64 {
        self.dropped
            .get_or_create(&DroppedLabels { listener, reason })
            .get()
    }

    /// How many connections `listener` holds now.
    pub fn open(&self, listener: &'static str) -> i64 {
        self.open.get_or_create(&ListenerLabel { listener }).get()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What [`Listener::serve_http1`] serves: a tower service of HTTP requests
/// that never fails (an axum `Router`, a `service_fn`...).
pub trait HttpService:
    tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<Self::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
    type Body: hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
    B: hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type Body = B;
}

/// A listening socket with its limits. `name` labels its metrics and logs
/// (`admin`, `stats`, `grpc-tls`...).
pub struct Listener {
    tcp: TcpListener,
    name: &'static str,
    limits: ListenerLimits,
    slots: Arc<Semaphore>,
    /// Connections held per peer address (only addresses holding some).
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    tally: Tally,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("addr", &self.tcp.local_addr().ok())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Binds `addr`.
    pub async fn bind(
        addr: SocketAddr,
        name: &'static str,
        limits: ListenerLimits,
        metrics: &ListenerMetrics,
    ) -> io::Result<Listener> {
        Ok(Listener::new(
            TcpListener::bind(addr).await?,
            name,
            limits,
            metrics,
        ))
    }

    /// Guards a bound socket.
    pub fn new(
        tcp: TcpListener,
        name: &'static str,
        limits: ListenerLimits,
        metrics: &ListenerMetrics,
    ) -> Listener {
        Listener {
            tcp,
            name,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            peers: Arc::default(),
            tally: Tally {
                listener: name,
                metrics: metrics.clone(),
                open: metrics
                    .open
                    .get_or_create(&ListenerLabel { listener: name })
                    .clone(),
            },
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn limits(&self) -> ListenerLimits {
        self.limits
    }

    /// The next connection within the cap. Connections beyond it are reset
    /// and counted; accept failures (out of file descriptors...) are logged
    /// once per interval and retried after a pause.
    pub async fn accept(&self) -> Admitted {
        loop {
            let (tcp, peer) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    self.tally
                        .metrics
                        .accept_failures
                        .get_or_create(&ListenerLabel {
                            listener: self.name,
                        })
                        .inc();
                    after_accept_failure(self.name, &error).await;
                    continue;
                }
            };
            match self.admit(peer) {
                Ok(slot) => {
                    return Admitted {
                        tcp,
                        peer,
                        limits: self.limits,
                        slot,
                    };
                }
                Err(reason) => {
                    // Reset rather than close: no TIME_WAIT kept on our side.
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    drop(tcp);
                    static AT_LIMIT: LogLimit = LogLimit::new(LOG_INTERVAL);
                    self.tally.count(reason, peer, &AT_LIMIT);
                }
            }
        }
    }

    /// A place for a connection from `peer`, or the limit it would exceed.
    fn admit(&self, peer: SocketAddr) -> Result<Slot, DropReason> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| DropReason::connection_limit)?;
        let ip = peer.ip().to_canonical();
        {
            let mut peers = lock(&self.peers);
            let held = peers.entry(ip).or_default();
            if *held >= self.limits.max_connections_per_peer {
                if *held == 0 {
                    peers.remove(&ip);
                }
                return Err(DropReason::peer_limit);
            }
            *held += 1;
        }
        self.tally.open.inc();
        Ok(Slot {
            _permit: permit,
            peer: ip,
            peers: self.peers.clone(),
            tally: self.tally.clone(),
        })
    }

    /// [`Self::accept`], or `None` once `shutdown` is cancelled.
    async fn accept_until(&self, shutdown: &CancellationToken) -> Option<Admitted> {
        tokio::select! {
            _ = shutdown.cancelled() => None,
            admitted = self.accept() => Some(admitted),
        }
    }

    /// Serves HTTP/1.1 (over TLS when `tls` is given) with `service` until
    /// `shutdown`, then lets each connection finish its request in flight.
    /// Requests carry the peer's address as axum's `ConnectInfo<SocketAddr>`.
    pub async fn serve_http1(
        self,
        tls: Option<TlsAcceptor>,
        service: impl HttpService,
        shutdown: CancellationToken,
    ) {
        let connections = TaskTracker::new();
        while let Some(admitted) = self.accept_until(&shutdown).await {
            let tls = tls.clone();
            let service = service.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                if let Some(connection) = admitted.establish_until(tls.as_ref(), &shutdown).await {
                    serve_http1_connection(connection, service, shutdown).await;
                }
            });
        }
        connections.close();
        connections.wait().await;
    }

    /// Established connections (TLS when `tls` is given, each handshake in
    /// its own task) for an HTTP/2 server such as tonic's
    /// `serve_with_incoming`; each must send the HTTP/2 preface within the
    /// header timeout. Ends at `shutdown`.
    pub fn http2_connections(
        self,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> ReceiverStream<io::Result<Connection>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(admitted) = self.accept_until(&shutdown).await {
                let tls = tls.clone();
                let tx = tx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    if let Some(connection) =
                        admitted.establish_until(tls.as_ref(), &shutdown).await
                    {
                        let connection = connection.expect_opening(HTTP2_PREFACE_LEN);
                        let _ = tx.send(Ok(connection)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Serves one HTTP/1.1 connection; counts hyper's header timeout.
async fn serve_http1_connection(
    connection: Connection,
    service: impl HttpService,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt;
    let peer = connection.peer;
    let header_timeout = connection.header_timeout;
    let tally = connection.slot.tally.clone();
    let served = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let served = served.clone();
        move |mut request: http::Request<_>| {
            served.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo(peer));
            service.clone().oneshot(request)
        }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(connection), service);
    tokio::pin!(http);
    let result = tokio::select! {
        result = http.as_mut() => result,
        _ = shutdown.cancelled() => {
            http.as_mut().graceful_shutdown();
            http.await
        }
    };
    match result {
        Ok(()) => {}
        // hyper's own timer: the request head did not arrive in time. After
        // a served request that is a kept-alive connection nobody reused
        // (a scraper between two scrapes): closed, not worth a count.
        Err(error) if error.is_timeout() && served.load(Ordering::Relaxed) => {
            debug!(listener = tally.listener, %peer, "closed a kept-alive connection left unused");
        }
        Err(error) if error.is_timeout() => {
            static HEADER_TIMEOUT: LogLimit = LogLimit::new(LOG_INTERVAL);
            tally.count(DropReason::header_timeout, peer, &HEADER_TIMEOUT);
        }
        Err(error) => {
            debug!(listener = tally.listener, %peer, %error, "connection ended with an error")
        }
    }
}

/// The listener's counters, shared by its connections.
#[derive(Clone, Debug)]
struct Tally {
    listener: &'static str,
    metrics: ListenerMetrics,
    open: Gauge,
}

impl Tally {
    /// Counts a dropped connection and logs it through `limit`.
    fn count(&self, reason: DropReason, peer: SocketAddr, limit: &LogLimit) {
        self.metrics
            .dropped
            .get_or_create(&DroppedLabels {
                listener: self.listener,
                reason,
            })
            .inc();
        if let Some(suppressed) = limit.allow() {
            info!(
                listener = self.listener,
                %peer,
                ?reason,
                suppressed,
                "dropped a connection at a listener limit"
            );
        }
    }
}

/// A connection's place under the caps, freed when the connection ends
/// (dropped with it, or held beside it after [`Admitted::into_parts`]).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    peer: IpAddr,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    tally: Tally,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tally.open.dec();
        let mut peers = lock(&self.peers);
        if let Some(held) = peers.get_mut(&self.peer) {
            *held -= 1;
            if *held == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// Locks the peer counts even if a panicking holder poisoned them: they are
/// plain counters, consistent between statements.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection accepted within the cap, before its TLS handshake.
#[derive(Debug)]
pub struct Admitted {
    tcp: TcpStream,
    peer: SocketAddr,
    limits: ListenerLimits,
    slot: Slot,
}

impl Admitted {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The accepted socket, its peer and its place under the caps, for a
    /// server that runs a protocol of its own on it (ztunnel's data path):
    /// the connection counts against the caps until the [`Slot`] drops.
    /// None of the listener's timeouts apply to it.
    pub fn into_parts(self) -> (TcpStream, SocketAddr, Slot) {
        (self.tcp, self.peer, self.slot)
    }

    /// [`Self::establish`], given up when `shutdown` is cancelled.
    async fn establish_until(
        self,
        tls: Option<&TlsAcceptor>,
        shutdown: &CancellationToken,
    ) -> Option<Connection> {
        tokio::select! {
            _ = shutdown.cancelled() => None,
            established = self.establish(tls) => established,
        }
    }

    /// Finishes the TLS handshake (when `tls` is given) within the
    /// handshake timeout; `None` (counted, logged) when it does not.
    pub async fn establish(self, tls: Option<&TlsAcceptor>) -> Option<Connection> {
        let Admitted {
            tcp,
            peer,
            limits,
            slot,
        } = self;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let io = match tls {
            None => Transport::Plain(tcp),
            Some(acceptor) => {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => Transport::Tls(Box::new(stream)),
                    Ok(Err(error)) => {
                        static FAILED: LogLimit = LogLimit::new(LOG_INTERVAL);
                        debug!(listener = slot.tally.listener, %peer, %error, "TLS handshake failed");
                        slot.tally
                            .count(DropReason::handshake_failed, peer, &FAILED);
                        return None;
                    }
                    Err(_) => {
                        static TIMED_OUT: LogLimit = LogLimit::new(LOG_INTERVAL);
                        slot.tally
                            .count(DropReason::handshake_timeout, peer, &TIMED_OUT);
                        return None;
                    }
                }
            }
        };
        let now = Instant::now();
        Some(Connection {
            io,
            peer,
            local,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            opening: None,
            expired: None,
            slot,
        })
    }
}

/// Plain TCP or server-side TLS.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An established connection under its listener's timeouts: a read or
/// write that waits past a deadline fails with `TimedOut` (counted), which
/// makes the HTTP server drop the connection.
#[derive(Debug)]
pub struct Connection {
    io: Transport,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    header_timeout: Duration,
    idle_timeout: Duration,
    last_activity: Instant,
    /// Fires no later than the earliest deadline; moved on lazily.
    timer: Pin<Box<Sleep>>,
    /// Bytes of the opening still to come, and by when.
    opening: Option<(usize, Instant)>,
    expired: Option<DropReason>,
    slot: Slot,
}

impl Connection {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The first `len` bytes must arrive within the header timeout.
    fn expect_opening(mut self, len: usize) -> Self {
        let deadline = Instant::now() + self.header_timeout;
        self.opening = Some((len, deadline));
        let next = deadline.min(self.timer.deadline());
        self.timer.as_mut().reset(next);
        self
    }

    fn on_read(&mut self, n: usize) {
        self.last_activity = Instant::now();
        if let Some((left, deadline)) = self.opening {
            self.opening = (left > n).then(|| (left - n, deadline));
        }
    }

    /// Pending until a deadline passes; then the error every later read or
    /// write returns too.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if let Some(reason) = self.expired {
            return Poll::Ready(timed_out(reason));
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let reason = match self.opening {
                Some((_, deadline)) if deadline <= now => DropReason::header_timeout,
                _ if self.last_activity + self.idle_timeout <= now => DropReason::idle_timeout,
                opening => {
                    let idle = self.last_activity + self.idle_timeout;
                    let next = opening.map_or(idle, |(_, deadline)| deadline.min(idle));
                    self.timer.as_mut().reset(next);
                    continue;
                }
            };
            static TIMED_OUT: LogLimit = LogLimit::new(LOG_INTERVAL);
            self.slot.tally.count(reason, self.peer, &TIMED_OUT);
            self.expired = Some(reason);
            return Poll::Ready(timed_out(reason));
        }
    }
}

impl Connection {
    /// A write through `write`: progress counts as activity; waiting is
    /// bounded by the deadlines.
    fn write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut Transport, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Some(reason) = self.expired {
            return Poll::Ready(Err(timed_out(reason)));
        }
        match write(&mut self.io, cx) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last_activity = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_deadline(cx).map(Err),
        }
    }
}

fn timed_out(reason: DropReason) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connection closed by the listener: {reason:?}"),
    )
}

macro_rules! with_io {
    ($transport:expr, $io:ident => $body:expr) => {
        match $transport {
            Transport::Plain($io) => $body,
            Transport::Tls($io) => $body,
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.expired {
            return Poll::Ready(Err(timed_out(reason)));
        }
        let before = buf.filled().len();
        let polled = with_io!(&mut this.io, io => Pin::new(io).poll_read(cx, buf));
        match polled {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.on_read(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx).map(Err),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(
            cx,
            |io, cx| with_io!(io, io => Pin::new(io).poll_write(cx, buf)),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(
            cx,
            |io, cx| with_io!(io, io => Pin::new(io).poll_write_vectored(cx, bufs)),
        )
    }

    fn is_write_vectored(&self) -> bool {
        with_io!(&self.io, io => io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match with_io!(&mut this.io, io => Pin::new(io).poll_flush(cx)) {
            Poll::Pending => this.poll_deadline(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match with_io!(&mut this.io, io => Pin::new(io).poll_shutdown(cx)) {
            Poll::Pending => this.poll_deadline(cx).map(Err),
            ready => ready,
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}
