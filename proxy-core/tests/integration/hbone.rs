//! HBONE client pool and server on loopback, with certificates from the
//! certificate manager and an in-process CA.
//!
//! The test server's handler picks its behaviour from the CONNECT target's
//! port, so one server covers every case. Peers that break the rules are
//! played by `proxy_core::testing::raw_http2` (frames written by hand) or by
//! a bare h2 server that stops answering.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
use bytes::Bytes;
use h2::client::SendRequest;
use prometheus_client::registry::Registry;
use proxy_core::hbone::{
    Connect, ConnectFuture, HboneError, HboneMetrics, HbonePool, HboneServer, HboneStream,
    HboneTarget, Http2Settings, InboundConnect, Keepalive, PoolConfig,
};
use proxy_core::identity::{CertificateManager, ManagerConfig, WorkloadCertificate};
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use proxy_core::testing::raw_http2::{self, Frame, RawHttp2};
use proxy_core::testing::{TestCa, TestSigner};
use proxy_core::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Only to keep a broken build from hanging; nothing is timed.
const LIMIT: Duration = Duration::from_secs(60);

/// Reads everything until EOF, then echoes it back and closes.
const ECHO: u16 = 1;
/// Writes a greeting and closes its side first, then reads until EOF.
const SPEAK_FIRST: u16 = 2;
const GREETING: &[u8] = b"hello from the server";
/// Refused with 403.
const FORBIDDEN: u16 = 403;
/// Dropped unanswered (becomes 503).
const DROPPED: u16 = 9;
/// Accepted, then held until the client ends it.
const HOLD: u16 = 3;
/// Never answered.
const HANG: u16 = 4;

#[derive(Clone, Debug)]
struct Seen {
    peer: SpiffeId,
    /// The peer's leaf certificate, shared by the connection's CONNECTs.
    certificate: Arc<rustls::pki_types::CertificateDer<'static>>,
    authority: SocketAddr,
    /// What the client sent on SPEAK_FIRST streams.
    received: Vec<u8>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn handle(connect: InboundConnect, log: Log, started: Arc<AtomicUsize>) {
    started.fetch_add(1, Ordering::SeqCst);
    let (peer, authority) = (connect.peer_identity().clone(), connect.authority());
    let mut seen = Seen {
        peer,
        certificate: connect.peer_certificate().clone(),
        authority,
        received: Vec::new(),
    };
    match authority.port() {
        ECHO => {
            let mut stream = connect.accept().unwrap();
            let mut data = Vec::new();
            stream.read_to_end(&mut data).await.unwrap();
            stream.write_all(&data).await.unwrap();
            stream.shutdown().await.unwrap();
        }
        SPEAK_FIRST => {
            let mut stream = connect.accept().unwrap();
            stream.write_all(GREETING).await.unwrap();
            stream.shutdown().await.unwrap();
            stream.read_to_end(&mut seen.received).await.unwrap();
        }
        FORBIDDEN => connect.refuse(http::StatusCode::FORBIDDEN),
        DROPPED => drop(connect),
        HOLD => {
            let mut stream = connect.accept().unwrap();
            // Ends with the stream, however the client ends it.
            let _ = stream.read_to_end(&mut Vec::new()).await;
        }
        HANG => {
            let _unanswered = connect;
            std::future::pending::<()>().await;
        }
        other => panic!("test sent CONNECT to unexpected port {other}"),
    }
    log.lock().unwrap().push(seen);
}

struct Mesh {
    ca: Arc<TestCa>,
    manager: CertificateManager,
}

impl Mesh {
    fn new() -> Self {
        let ca = Arc::new(TestCa::new("cluster.local"));
        let manager = TestSigner::new(ca.clone()).manager(ManagerConfig::default());
        Mesh { ca, manager }
    }

    fn id(&self, sa: &str) -> SpiffeId {
        self.ca.identity("default", sa)
    }

    async fn cert(&self, sa: &str) -> Arc<WorkloadCertificate> {
        self.manager.fetch(&self.id(sa)).await.unwrap()
    }

    /// An HBONE server on loopback presenting `sa`'s certificate, fetched
    /// per connection as ztunnel-rs does.
    async fn server(
        &self,
        sa: &str,
    ) -> Server<impl Fn(InboundConnect) -> BoxedUnit + Send + Sync + 'static + use<>> {
        self.server_with(sa, Http2Settings::default()).await
    }

    /// The same with `settings`, counting into its own registry.
    async fn server_with(
        &self,
        sa: &str,
        settings: Http2Settings,
    ) -> Server<impl Fn(InboundConnect) -> BoxedUnit + Send + Sync + 'static + use<>> {
        self.server_capped(sa, settings, ListenerLimits::caps(4096, 4096))
            .await
    }

    /// The same behind a listener with `caps`.
    async fn server_capped(
        &self,
        sa: &str,
        settings: Http2Settings,
        caps: ListenerLimits,
    ) -> Server<impl Fn(InboundConnect) -> BoxedUnit + Send + Sync + 'static + use<>> {
        let mut registry = proxy_core::metrics::new_registry();
        let listeners = ListenerMetrics::register(&mut registry);
        let listener = Listener::new(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            "hbone",
            caps,
            &listeners,
        );
        let address = listener.local_addr().unwrap();
        let log = Log::default();
        let started = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (log, started) = (log.clone(), started.clone());
            move |connect| -> BoxedUnit { Box::pin(handle(connect, log.clone(), started.clone())) }
        };
        let metrics = HboneMetrics::register(&mut registry);
        let hbone = HboneServer::with_metrics(handler, settings, metrics);
        let (manager, identity) = (self.manager.clone(), self.id(sa));
        tokio::spawn({
            let hbone = hbone.clone();
            async move {
                hbone
                    .serve(listener, move |_local| {
                        let (manager, identity) = (manager.clone(), identity.clone());
                        async move {
                            let cert = manager.fetch(&identity).await?;
                            Ok(tls::hbone_server_config(&cert)?)
                        }
                    })
                    .await
            }
        });
        Server {
            address,
            identity: self.id(sa),
            hbone,
            log,
            started,
            registry,
        }
    }
}

type BoxedUnit = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

struct Server<H> {
    address: SocketAddr,
    identity: SpiffeId,
    hbone: HboneServer<H>,
    log: Log,
    /// CONNECTs that reached the handler.
    started: Arc<AtomicUsize>,
    registry: Registry,
}

impl<H> Server<H> {
    fn target(&self, port: u16) -> HboneTarget {
        HboneTarget {
            identity: self.identity.clone(),
            address: self.address,
            authority: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn dropped(&self, reason: &str) -> u64 {
        dropped(&self.registry, "server", reason)
    }

    /// `istio_listener_connections_dropped_total{listener="hbone", reason}`.
    fn listener_dropped(&self, reason: &str) -> u64 {
        let text = proxy_core::metrics::encode(&self.registry).unwrap();
        let series = format!(
            "istio_listener_connections_dropped_total{{listener=\"hbone\",reason=\"{reason}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |n| n.parse().unwrap())
    }
}

/// `istio_hbone_connections_dropped_total{side, reason}` in `registry`.
fn dropped(registry: &Registry, side: &str, reason: &str) -> u64 {
    let text = proxy_core::metrics::encode(registry).unwrap();
    let series =
        format!("istio_hbone_connections_dropped_total{{side=\"{side}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |n| n.parse().unwrap())
}

/// The first frame `raw` receives that is `wanted`; `None` if the
/// connection ends first.
async fn frame(raw: &mut RawHttp2, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
    tokio::time::timeout(LIMIT, raw.until(wanted))
        .await
        .expect("timed out waiting for a frame")
        .unwrap()
}

/// Keepalive quick enough for a test: PING every 200 ms, dead after 2 s
/// without an answer (long enough that a loaded machine does not miss an
/// answer from a live peer).
fn quick_keepalive() -> Keepalive {
    Keepalive {
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_secs(2),
        ..Keepalive::default()
    }
}

/// Counts the TCP connections the pool opens, and keeps a duplicate of
/// each socket to look at its options.
#[derive(Default)]
struct CountingConnect(AtomicUsize, Mutex<Vec<OwnedFd>>);

impl Connect for CountingConnect {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let tcp = TcpStream::connect(address).await?;
            self.1
                .lock()
                .unwrap()
                .push(tcp.as_fd().try_clone_to_owned()?);
            Ok(tcp)
        })
    }
}

fn pool(config: PoolConfig) -> (HbonePool, Arc<CountingConnect>) {
    let connector = Arc::new(CountingConnect::default());
    (HbonePool::new(config, connector.clone()), connector)
}

/// A pool counting into its own registry.
fn pool_with_metrics(config: PoolConfig) -> (HbonePool, Arc<CountingConnect>, Registry) {
    let connector = Arc::new(CountingConnect::default());
    let mut registry = proxy_core::metrics::new_registry();
    let metrics = HboneMetrics::register(&mut registry);
    let pool = HbonePool::with_metrics(config, connector.clone(), metrics);
    (pool, connector, registry)
}

/// A plain h2 client connection to `server` as `source`.
async fn h2_client<H>(server: &Server<H>, source: &WorkloadCertificate) -> SendRequest<Bytes> {
    h2_client_from(server, source, IpAddr::from([127, 0, 0, 1])).await
}

/// The same from the loopback address `from`.
async fn h2_client_from<H>(
    server: &Server<H>,
    source: &WorkloadCertificate,
    from: IpAddr,
) -> SendRequest<Bytes> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = socket.connect(server.address).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(
        tls::hbone_client_config(source, &server.identity).unwrap(),
    );
    let name = tls::server_name("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (h2, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    h2
}

/// The status `request` is answered with (the request ends at once).
async fn status(h2: &SendRequest<Bytes>, request: http::Request<()>) -> http::StatusCode {
    try_status(h2, request).await.unwrap()
}

/// The status, or how the connection failed.
async fn try_status(
    h2: &SendRequest<Bytes>,
    request: http::Request<()>,
) -> Result<http::StatusCode, h2::Error> {
    let mut h2 = h2.clone().ready().await?;
    let (response, _) = h2.send_request(request, true)?;
    Ok(response.await?.status())
}

/// A mesh with an HBONE server for `sa/server`, a certificate for
/// `sa/client` and a pool with `config`.
async fn fixture(
    config: PoolConfig,
) -> (
    Mesh,
    Server<impl Fn(InboundConnect) -> BoxedUnit + Send + Sync + 'static>,
    Arc<WorkloadCertificate>,
    HbonePool,
    Arc<CountingConnect>,
) {
    let mesh = Mesh::new();
    let server = mesh.server("server").await;
    let source = mesh.cert("client").await;
    let (pool, connects) = pool(config);
    (mesh, server, source, pool, connects)
}

/// Sends `payload`, closes the sending side, returns all that comes back.
async fn finish_echo(mut stream: HboneStream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    back
}

async fn echo(
    pool: &HbonePool,
    source: &WorkloadCertificate,
    target: &HboneTarget,
    payload: &[u8],
) -> Vec<u8> {
    finish_echo(pool.connect(source, target).await.unwrap(), payload).await
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    tokio::time::timeout(LIMIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_share_one_connection() {
    let (mesh, server, source, pool, connects) = fixture(PoolConfig::default()).await;

    let streams = (0..40u8).map(|i| {
        let (pool, source, target) = (pool.clone(), source.clone(), server.target(ECHO));
        tokio::spawn(async move {
            let payload = vec![i; 1000 + usize::from(i)];
            assert_eq!(echo(&pool, &source, &target, &payload).await, payload);
        })
    });
    for stream in futures::future::join_all(streams).await {
        stream.unwrap();
    }

    assert_eq!(connects.0.load(Ordering::SeqCst), 1, "one TCP connection");
    assert_eq!(pool.open_connections(), 1);
    assert_eq!(server.hbone.live_connections(), 1);
    let seen = server.seen();
    assert_eq!(seen.len(), 40);
    assert!(
        seen.iter()
            .all(|s| s.peer == mesh.id("client") && s.authority.port() == ECHO)
    );
    // The client's leaf, held once for the connection, not per stream.
    assert_eq!(*seen[0].certificate, *source.leaf());
    assert!(
        seen.iter()
            .all(|s| Arc::ptr_eq(&s.certificate, &seen[0].certificate))
    );
}

#[tokio::test]
async fn a_full_connection_makes_the_pool_open_another() {
    let (_mesh, server, source, pool, connects) = fixture(PoolConfig {
        max_streams_per_connection: 4,
        ..PoolConfig::default()
    })
    .await;

    // Ten streams held open at once: 4 + 4 + 2.
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(pool.connect(&source, &server.target(ECHO)).await.unwrap());
    }
    assert_eq!(connects.0.load(Ordering::SeqCst), 3);
    assert_eq!(pool.open_connections(), 3);

    // Closing streams frees their slots: new ones reuse the connections.
    for stream in open.drain(..) {
        finish_echo(stream, b"").await;
    }
    for _ in 0..8 {
        open.push(pool.connect(&source, &server.target(ECHO)).await.unwrap());
    }
    assert_eq!(
        connects.0.load(Ordering::SeqCst),
        3,
        "no new connection needed"
    );
}

#[tokio::test]
async fn a_second_source_identity_gets_its_own_connection() {
    let mesh = Mesh::new();
    let server = mesh.server("server").await;
    let (alice, bob) = (mesh.cert("alice").await, mesh.cert("bob").await);
    let (pool, connects) = pool(PoolConfig::default());

    for source in [&alice, &bob, &alice, &bob] {
        assert_eq!(
            echo(&pool, source, &server.target(ECHO), b"hi").await,
            b"hi"
        );
    }

    assert_eq!(connects.0.load(Ordering::SeqCst), 2);
    assert_eq!(server.hbone.live_connections(), 2);
    let peers: Vec<_> = server.seen().into_iter().map(|s| s.peer).collect();
    assert_eq!(
        peers,
        [
            mesh.id("alice"),
            mesh.id("bob"),
            mesh.id("alice"),
            mesh.id("bob")
        ]
    );
}

#[tokio::test]
async fn data_flows_both_ways_with_half_close() {
    let (_mesh, server, source, pool, _) = fixture(PoolConfig::default()).await;

    // Larger than the stream and connection windows: flow control must
    // keep it moving, in both directions.
    let payload: Vec<u8> = (0..24 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let back = tokio::time::timeout(LIMIT, echo(&pool, &source, &server.target(ECHO), &payload))
        .await
        .unwrap();
    assert!(
        back == payload,
        "echoed {} of {} bytes",
        back.len(),
        payload.len()
    );

    // The server closes its side first; the client still gets to send.
    let mut stream = pool
        .connect(&source, &server.target(SPEAK_FIRST))
        .await
        .unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, GREETING);
    stream
        .write_all(b"and goodbye from the client")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    eventually("the server to log the stream", || server.seen().len() == 2).await;
    assert_eq!(server.seen()[1].received, b"and goodbye from the client");
}

#[tokio::test]
async fn a_refusal_surfaces_as_an_error_with_its_status() {
    let (_mesh, server, source, pool, connects) = fixture(PoolConfig::default()).await;

    let err = pool
        .connect(&source, &server.target(FORBIDDEN))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::FORBIDDEN), "{err}");
    assert!(err.to_string().contains("403"), "{err}");

    let err = pool
        .connect(&source, &server.target(DROPPED))
        .await
        .unwrap_err();
    assert_eq!(
        err.status(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );

    // Refusals are per stream: the connection keeps serving.
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"still here").await,
        b"still here"
    );
    assert_eq!(connects.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idle_connections_are_evicted() {
    let (_mesh, server, source, pool, connects) = fixture(PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    })
    .await;

    let stream = pool.connect(&source, &server.target(ECHO)).await.unwrap();
    assert_eq!(pool.open_connections(), 1);
    // A connection with a live stream is never idle, however long it lasts.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pool.open_connections(), 1);
    assert_eq!(finish_echo(stream, b"late").await, b"late");

    eventually("the idle connection to close", || {
        pool.open_connections() == 0 && server.hbone.live_connections() == 0
    })
    .await;

    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"again").await,
        b"again"
    );
    assert_eq!(
        connects.0.load(Ordering::SeqCst),
        2,
        "a fresh connection after eviction"
    );
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let (mesh, server, source, pool, _) = fixture(PoolConfig::default()).await;

    let mut target = server.target(ECHO);
    target.identity = mesh.id("database");
    let err = pool
        .connect(&source, &target)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TLS") && err.contains("sa/database") && err.contains("sa/server"),
        "{err}"
    );
    assert_eq!(pool.open_connections(), 0);
    assert!(server.seen().is_empty(), "no CONNECT reached the server");
}

#[tokio::test]
async fn the_listener_resets_connections_over_its_caps_and_serves_other_peers() {
    let mesh = Mesh::new();
    let server = mesh
        .server_capped(
            "server",
            // Held connections stay held for the whole test.
            Http2Settings {
                handshake_timeout: LIMIT,
                ..Http2Settings::default()
            },
            ListenerLimits::caps(3, 2),
        )
        .await;
    // Two connections from 127.0.0.1 that never start TLS: held (until
    // the handshake timeout), filling that address's share.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(server.address).await.unwrap());
    }
    // A third from the same address is reset at once: its read ends (a
    // reset may already fail the connect).
    for _ in 0..3 {
        if let Ok(mut over) = TcpStream::connect(server.address).await {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(LIMIT, over.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(0) | Err(_))),
                "a connection over the per-peer cap is closed, got {read:?}"
            );
        }
    }
    eventually("three resets counted as peer_limit", || {
        server.listener_dropped("peer_limit") == 3
    })
    .await;
    // Another address still gets the third place and is served.
    let source = mesh.cert("client").await;
    let h2 = h2_client_from(&server, &source, IpAddr::from([127, 0, 0, 2])).await;
    let forbidden = http::Request::connect("127.0.0.1:403").body(()).unwrap();
    assert_eq!(status(&h2, forbidden).await, http::StatusCode::FORBIDDEN);
    assert_eq!(server.seen().len(), 1);
    // The listener is now full: one more from anywhere is reset, counted
    // as connection_limit.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    if let Ok(mut over) = socket.connect(server.address).await {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(LIMIT, over.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "got {read:?}");
    }
    eventually("one reset counted as connection_limit", || {
        server.listener_dropped("connection_limit") == 1
    })
    .await;
    drop(held);
}

#[tokio::test]
async fn non_connect_requests_and_bad_targets_get_400() {
    let mesh = Mesh::new();
    let server = mesh.server("server").await;
    let source = mesh.cert("client").await;

    let h2 = h2_client(&server, &source).await;
    let status = |request| status(&h2, request);
    let get = http::Request::get("https://127.0.0.1:1/").body(()).unwrap();
    assert_eq!(status(get).await, http::StatusCode::BAD_REQUEST);
    let by_name = http::Request::connect("example.com:80").body(()).unwrap();
    assert_eq!(status(by_name).await, http::StatusCode::BAD_REQUEST);
    let no_port = http::Request::connect("127.0.0.1").body(()).unwrap();
    assert_eq!(status(no_port).await, http::StatusCode::BAD_REQUEST);

    // The same connection still serves a proper CONNECT.
    let good = http::Request::connect("127.0.0.1:403").body(()).unwrap();
    assert_eq!(status(good).await, http::StatusCode::FORBIDDEN);
    assert_eq!(
        server.seen().len(),
        1,
        "only the valid CONNECT reached the handler"
    );
}

#[tokio::test]
async fn shutdown_drains_live_streams_and_stops_accepting() {
    let (_mesh, server, source, pool, _) = fixture(PoolConfig::default()).await;

    let stream = pool.connect(&source, &server.target(ECHO)).await.unwrap();
    server.hbone.shutdown_token().cancel();

    // The stream opened before shutdown completes normally.
    assert_eq!(finish_echo(stream, b"in flight").await, b"in flight");

    eventually("the drained connection to close", || {
        server.hbone.live_connections() == 0
    })
    .await;
    // The listener is gone: a new tunnel cannot be set up.
    let err = pool
        .connect(&source, &server.target(ECHO))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
}

#[tokio::test]
async fn a_peer_gets_200_streams_per_connection_and_is_cut_off_when_it_insists() {
    let mesh = Mesh::new();
    // h2 closes the connection after this many refusals (1024 by default).
    let settings = Http2Settings {
        max_refused_streams: 10,
        ..Http2Settings::default()
    };
    let server = mesh.server_with("server", settings).await;
    let source = mesh.cert("client").await;
    let (pool, _) = pool(PoolConfig::default());
    let hold = SocketAddr::from(([127, 0, 0, 1], HOLD));

    let tcp = TcpStream::connect(server.address).await.unwrap();
    let mut hostile = RawHttp2::start(tcp, &source, &server.identity)
        .await
        .unwrap();
    // Streams 1, 3, ... 399 are held open by the handler.
    for stream in (1..400).step_by(2) {
        hostile.connect(stream, hold).await.unwrap();
    }
    eventually("200 streams to reach the handler", || {
        server.started() == 200
    })
    .await;
    // The 201st is refused, without reaching the handler.
    hostile.connect(401, hold).await.unwrap();
    let refused = frame(&mut hostile, |f| {
        f.kind == raw_http2::RST_STREAM && f.stream == 401
    })
    .await
    .expect("the 201st stream is reset");
    assert_eq!(
        refused.error_code(),
        Some(u32::from(h2::Reason::REFUSED_STREAM))
    );
    assert_eq!(server.started(), 200);
    // Everyone else is served meanwhile.
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"served").await,
        b"served"
    );

    // A peer that keeps opening streams past the limit is disconnected.
    for stream in (403..423).step_by(2) {
        hostile.connect(stream, hold).await.unwrap();
    }
    let goaway = frame(&mut hostile, |f| f.kind == raw_http2::GOAWAY)
        .await
        .expect("the connection is closed with GOAWAY");
    assert_eq!(
        goaway.error_code(),
        Some(u32::from(h2::Reason::ENHANCE_YOUR_CALM))
    );
    eventually("the drop to be counted", || {
        server.dropped("http2_limit") == 1
    })
    .await;
    eventually("the hostile connection to be gone", || {
        server.hbone.live_connections() == 1
    })
    .await;
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"still served").await,
        b"still served"
    );
    assert_eq!(server.started(), 202, "two echoes and the 200 held");
}

#[tokio::test]
async fn header_lists_over_64_kib_are_refused_and_1_mb_closes_the_connection() {
    let (mesh, server, source, pool, _) = fixture(PoolConfig::default()).await;
    let h2 = h2_client(&server, &source).await;
    let connect = |padding: usize| {
        http::Request::connect("127.0.0.1:403")
            .header("x-padding", "a".repeat(padding))
            .body(())
            .unwrap()
    };
    // Just under the limit is fine (and gets the server's SETTINGS in, so
    // the big ones are framed as the server allows).
    assert_eq!(
        status(&h2, connect(60 * 1024)).await,
        http::StatusCode::FORBIDDEN
    );
    // Over it: 431, without reaching the handler; the connection stays.
    assert_eq!(
        status(&h2, connect(100 * 1024)).await,
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(status(&h2, connect(0)).await, http::StatusCode::FORBIDDEN);
    assert_eq!(server.started(), 2);

    // Over four times the limit (1 MB): the connection is closed, counted.
    let err = try_status(&h2, connect(1024 * 1024)).await.unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err}");
    eventually("the drop to be counted", || {
        server.dropped("http2_limit") == 1
    })
    .await;
    assert_eq!(
        server.started(),
        2,
        "the 1 MB header list never reached the handler"
    );
    // Everyone else is still served.
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"served").await,
        b"served"
    );
    let other = h2_client(&server, &*mesh.cert("other").await).await;
    assert_eq!(
        status(&other, connect(0)).await,
        http::StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped_and_others_stay() {
    let mesh = Mesh::new();
    let settings = Http2Settings {
        keepalive: quick_keepalive(),
        ..Http2Settings::default()
    };
    let server = mesh.server_with("server", settings.clone()).await;
    let source = mesh.cert("client").await;
    // A pool's connection answers PINGs (h2 does as it drives it).
    let (pool, connects) = pool(PoolConfig {
        http2: settings,
        ..PoolConfig::default()
    });
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"first").await,
        b"first"
    );

    // This peer does the handshake, then reads nothing more.
    let tcp = TcpStream::connect(server.address).await.unwrap();
    let mut silent = RawHttp2::start(tcp, &source, &server.identity)
        .await
        .unwrap();
    eventually("the silent peer to be dropped", || {
        server.dropped("keepalive_timeout") == 1
    })
    .await;
    // Its connection is closed: past what was sent, it reads the end.
    let end = async { while let Ok(Some(_)) = silent.next_frame().await {} };
    tokio::time::timeout(LIMIT, end)
        .await
        .expect("the silent peer's connection is closed");
    eventually("the silent connection to be gone", || {
        server.hbone.live_connections() == 1
    })
    .await;

    // The pool's connection lived through many PINGs and still serves.
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"second").await,
        b"second"
    );
    assert_eq!(connects.0.load(Ordering::SeqCst), 1);
    assert_eq!(server.dropped("keepalive_timeout"), 1);
}

/// An HBONE server that answers every CONNECT with 200, except that its
/// first connection stops being served (no frame read, no PING answered)
/// once `freeze` is set. Counts the connections it accepts.
async fn freezing_server(
    cert: Arc<WorkloadCertificate>,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::watch::Sender<bool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    let config = tls::hbone_server_config(&cert).unwrap();
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let first = accepted.fetch_add(1, Ordering::SeqCst) == 0;
                let (config, mut frozen) = (config.clone(), frozen.clone());
                tokio::spawn(async move {
                    let tls = tokio_rustls::TlsAcceptor::from(config)
                        .accept(tcp)
                        .await
                        .unwrap();
                    let mut connection = h2::server::handshake(tls).await.unwrap();
                    let mut streams = Vec::new();
                    loop {
                        let next = tokio::select! {
                            next = connection.accept() => next,
                            _ = frozen.wait_for(|f| *f), if first => break,
                        };
                        let Some(Ok((_, mut respond))) = next else {
                            return;
                        };
                        streams.push(respond.send_response(http::Response::new(()), false));
                    }
                    // Held, never polled again.
                    let _frozen = (connection, streams);
                    std::future::pending::<()>().await;
                });
            }
        }
    });
    (address, accepted, freeze)
}

#[tokio::test]
async fn a_pooled_connection_whose_peer_stops_answering_pings_is_dropped() {
    let mesh = Mesh::new();
    let (address, accepted, freeze) = freezing_server(mesh.cert("server").await).await;
    let (pool, connects, registry) = pool_with_metrics(PoolConfig {
        http2: Http2Settings {
            keepalive: quick_keepalive(),
            ..Http2Settings::default()
        },
        ..PoolConfig::default()
    });
    let source = mesh.cert("client").await;
    let target = HboneTarget {
        identity: mesh.id("server"),
        address,
        authority: SocketAddr::from(([127, 0, 0, 1], ECHO)),
    };
    let mut stream = pool.connect(&source, &target).await.unwrap();

    freeze.send(true).unwrap();
    eventually("the pool to drop the silent peer's connection", || {
        pool.open_connections() == 0
    })
    .await;
    assert_eq!(dropped(&registry, "client", "keepalive_timeout"), 1);
    // Its stream fails instead of hanging.
    let read = tokio::time::timeout(LIMIT, stream.read(&mut [0; 1]))
        .await
        .expect("the stream of a dropped connection does not hang");
    assert!(read.is_err(), "{read:?}");

    // The next CONNECT dials a new connection.
    pool.connect(&source, &target).await.unwrap();
    assert_eq!(connects.0.load(Ordering::SeqCst), 2);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_whose_connect_goes_unanswered_is_retired_at_once() {
    let mesh = Mesh::new();
    let server = mesh.server("server").await;
    let source = mesh.cert("client").await;
    let (pool, connects, registry) = pool_with_metrics(PoolConfig {
        connect_timeout: Duration::from_millis(500),
        ..PoolConfig::default()
    });
    let earlier = pool.connect(&source, &server.target(ECHO)).await.unwrap();

    let err = tokio::time::timeout(LIMIT, pool.connect(&source, &server.target(HANG)))
        .await
        .expect("the pool gives up on its own")
        .unwrap_err();
    assert!(matches!(err, HboneError::ConnectTimeout { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:4"), "{err}");
    assert_eq!(dropped(&registry, "client", "connect_timeout"), 1);

    // The next CONNECT does not queue behind it: a new connection.
    assert_eq!(
        echo(&pool, &source, &server.target(ECHO), b"fresh").await,
        b"fresh"
    );
    assert_eq!(connects.0.load(Ordering::SeqCst), 2);
    // A stream already on the retired connection goes on to its end...
    assert_eq!(finish_echo(earlier, b"earlier").await, b"earlier");
    // ... and then the retired connection closes.
    eventually("the retired connection to close", || {
        pool.open_connections() == 1
    })
    .await;
}

#[tokio::test]
async fn hbone_sockets_have_tcp_keepalive_both_ways() {
    let mesh = Mesh::new();
    let keepalive = Keepalive {
        tcp_time: Duration::from_secs(7),
        tcp_interval: Duration::from_secs(3),
        tcp_retries: 4,
        ..Keepalive::default()
    };
    let settings = Http2Settings {
        keepalive,
        ..Http2Settings::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HboneServer::with_settings(
        |connect: InboundConnect| async move { connect.refuse(http::StatusCode::FORBIDDEN) },
        settings.clone(),
    );
    let config = tls::hbone_server_config(&*mesh.cert("server").await).unwrap();
    let (pool, connects) = pool(PoolConfig {
        http2: settings,
        ..PoolConfig::default()
    });
    let target = HboneTarget {
        identity: mesh.id("server"),
        address: listener.local_addr().unwrap(),
        authority: SocketAddr::from(([127, 0, 0, 1], FORBIDDEN)),
    };
    let source = mesh.cert("client").await;
    let connecting = tokio::spawn(async move { pool.connect(&source, &target).await });
    let (tcp, _) = listener.accept().await.unwrap();
    let accepted = tcp.as_fd().try_clone_to_owned().unwrap();
    tokio::spawn(async move { server.serve_connection(tcp, config).await });
    let err = connecting.await.unwrap().unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::FORBIDDEN), "{err}");

    let dialled = connects.1.lock().unwrap().pop().unwrap();
    for (side, fd) in [("client", &dialled), ("server", &accepted)] {
        let socket = socket2::SockRef::from(fd);
        assert!(socket.keepalive().unwrap(), "{side}: SO_KEEPALIVE");
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            keepalive.tcp_time,
            "{side}"
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            keepalive.tcp_interval,
            "{side}"
        );
        assert_eq!(
            socket.tcp_keepalive_retries().unwrap(),
            keepalive.tcp_retries,
            "{side}"
        );
    }
}

/// Connects through a relay it runs per connection, which forwards bytes
/// until [`Vanishing::vanish`]: from then on the connections it carried
/// are silent (nothing reaches either side, no FIN), and the first bytes
/// the client sends on one are answered with a reset, as a peer whose
/// network namespace is gone and whose address a new pod now holds.
/// Connections made after that are relayed again.
#[derive(Default)]
struct Vanishing {
    connects: AtomicUsize,
    generation: Arc<AtomicUsize>,
}

impl Vanishing {
    fn vanish(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Connect for Vanishing {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let generation = self.generation.clone();
        Box::pin(async move {
            let relay = TcpListener::bind("127.0.0.1:0").await?;
            let client = TcpStream::connect(relay.local_addr()?).await?;
            let (mut near, _) = relay.accept().await?;
            let mut far = TcpStream::connect(address).await?;
            let born = generation.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut a, mut b) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
                // Asked after each read: a read that was pending when the
                // peer vanished must not be relayed.
                let gone = || generation.load(Ordering::SeqCst) != born;
                loop {
                    tokio::select! {
                        n = near.read(&mut a) => match n {
                            Ok(n) if n > 0 && gone() => {
                                // A reset, not a FIN: linger 0, then close.
                                let _ = socket2::SockRef::from(&near).set_linger(Some(Duration::ZERO));
                                return;
                            }
                            Ok(n) if n > 0 => {
                                if far.write_all(&a[..n]).await.is_err() { return; }
                            }
                            _ => return,
                        },
                        n = far.read(&mut b) => match n {
                            Ok(n) if n > 0 && gone() => {}
                            Ok(n) if n > 0 => {
                                if near.write_all(&b[..n]).await.is_err() { return; }
                            }
                            _ => return,
                        },
                    }
                }
            });
            Ok(client)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_to_a_vanished_peer_is_replaced_without_failing_the_connect() {
    let mesh = Mesh::new();
    let server = mesh.server("server").await;
    let source = mesh.cert("client").await;
    let connector = Arc::new(Vanishing::default());
    let pool = HbonePool::new(PoolConfig::default(), connector.clone());
    let target = server.target(ECHO);
    assert_eq!(echo(&pool, &source, &target, b"first").await, b"first");
    assert_eq!(pool.open_connections(), 1);

    connector.vanish();
    // The pool still holds the connection (nothing told it otherwise); the
    // CONNECT on it meets a reset and is retried on a new one.
    let stream = tokio::time::timeout(LIMIT, pool.connect(&source, &target))
        .await
        .expect("the CONNECT finishes")
        .expect("retried on a new connection");
    assert_eq!(finish_echo(stream, b"second").await, b"second");
    assert_eq!(connector.connects.load(Ordering::SeqCst), 2);
}
