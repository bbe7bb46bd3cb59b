//! HBONE client pool and server on loopback, with certificates from the
//! certificate manager and an in-process CA.
//!
//! The test server's handler picks its behaviour from the CONNECT target's
//! port, so one server covers every case.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::SpiffeId;
use proxy_core::hbone::{
    Connect, ConnectFuture, HbonePool, HboneServer, HboneStream, HboneTarget, InboundConnect,
    PoolConfig,
};
use proxy_core::identity::{CertificateManager, ManagerConfig, WorkloadCertificate};
use proxy_core::testing::{TestCa, TestSigner};
use proxy_core::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

#[derive(Clone, Debug)]
struct Seen {
    peer: SpiffeId,
    authority: SocketAddr,
    /// What the client sent on SPEAK_FIRST streams.
    received: Vec<u8>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn handle(connect: InboundConnect, log: Log) {
    let (peer, authority) = (connect.peer_identity().clone(), connect.authority());
    let mut seen = Seen {
        peer,
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let log = Log::default();
        let handler = {
            let log = log.clone();
            move |connect| -> BoxedUnit { Box::pin(handle(connect, log.clone())) }
        };
        let hbone = HboneServer::new(handler);
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
        }
    }
}

type BoxedUnit = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

struct Server<H> {
    address: SocketAddr,
    identity: SpiffeId,
    hbone: HboneServer<H>,
    log: Log,
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
}

/// Counts the TCP connections the pool opens.
#[derive(Default)]
struct CountingConnect(AtomicUsize);

impl Connect for CountingConnect {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(TcpStream::connect(address))
    }
}

fn pool(config: PoolConfig) -> (HbonePool, Arc<CountingConnect>) {
    let connector = Arc::new(CountingConnect::default());
    (HbonePool::new(config, connector.clone()), connector)
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
async fn non_connect_requests_and_bad_targets_get_400() {
    let mesh = Mesh::new();
    let server = mesh.server("server").await;
    let source = mesh.cert("client").await;

    let tcp = TcpStream::connect(server.address).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(
        tls::hbone_client_config(&source, &server.identity).unwrap(),
    );
    let name = tls::server_name("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (h2, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);

    let status = |request: http::Request<()>| {
        let h2 = h2.clone();
        async move {
            let mut h2 = h2.ready().await.unwrap();
            let (response, _) = h2.send_request(request, true).unwrap();
            response.await.unwrap().status()
        }
    };
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
