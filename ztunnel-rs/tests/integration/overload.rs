//! Overload on the data path, on loopback: a peer that opens connections by
//! the thousand to a pod's inbound listeners (15008, 15006), a pod whose
//! application does the same through its outbound capture (15001), one
//! peer's thousands of HBONE streams over its pooled connections, and a
//! client that stops reading while the server writes. In each, the proxy
//! stays within its caps (every flooding connection is either held, up to
//! the cap, or refused and counted with the reason: in
//! `istio_listener_connections_dropped_total` for the listeners, in
//! `istio_ztunnel_connection_failures_total` for the streams), and other
//! pods keep being served.
//!
//! The flood's client sockets live in this process too: a few thousand
//! descriptors, under the open-file limit the test checks first.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use ztunnel_rs::proxy::testing::{EchoApp, PATIENCE, TestMesh, TestPod, eventually, exchange};
use ztunnel_rs::proxy::{HeldSocketLimits, PodConnectionLimits};

const APP_PORT: u16 = 8080;
/// Connections one flood opens.
const FLOOD: usize = 3000;
/// The caps under test: far below the flood.
const PER_LISTENER: usize = 300;
const PER_PEER: usize = 100;
/// Connections other pods open meanwhile, each of which must be served.
const OTHERS: usize = 20;

fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The floods hold some thousands of descriptors in this process: the soft
/// open-file limit is raised to the hard one if it is lower than that.
fn ensure_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = (4 * FLOOD) as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, needed.min(hard), hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft >= needed,
        "the open-file limit ({soft}) is below the {needed} this test needs"
    );
}

async fn mesh() -> TestMesh {
    ensure_fd_limit();
    TestMesh::with_config(|c| {
        c.pod_connections = PodConnectionLimits {
            per_listener: PER_LISTENER,
            per_peer: PER_PEER,
        };
        // Connections that never start TLS stay for the whole test.
        c.http2.handshake_timeout = PATIENCE * 10;
    })
    .await
}

/// The connections of a flood; those the proxy reset so fast that
/// `connect` itself reported it are only counted.
struct Flood {
    reset_at_connect: usize,
    connections: Vec<TcpStream>,
}

impl Flood {
    /// `count` connections made by `connect`, one after the other.
    async fn open<F, Fut>(count: usize, mut connect: F) -> Flood
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let mut flood = Flood {
            reset_at_connect: 0,
            connections: Vec::with_capacity(count),
        };
        for _ in 0..count {
            match connect().await {
                Ok(connection) => flood.connections.push(connection),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => flood.reset_at_connect += 1,
                Err(e) => panic!("a flooding connection failed to connect: {e}"),
            }
        }
        flood
    }

    /// How many connections the proxy reset or closed, and how many it
    /// still holds open (nothing to read, no error).
    fn tally(&self) -> (usize, usize) {
        let (mut refused, mut held) = (self.reset_at_connect, 0);
        for connection in &self.connections {
            let mut byte = [MaybeUninit::<u8>::uninit()];
            // A direct peek: the socket's state now, not tokio's readiness.
            match socket2::SockRef::from(connection).peek(&mut byte) {
                Ok(0) => refused += 1,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => refused += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => held += 1,
                other => panic!("a flooding connection got {other:?}"),
            }
        }
        (refused, held)
    }
}

/// A TCP connection from `from` to `to` that sends nothing.
async fn raw(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(at(from, 0))?;
    socket.connect(to).await
}

/// `OTHERS` connections from `pod` to `app`, one after the other: how
/// many were answered in full.
async fn served(pod: &TestPod, app: &EchoApp) -> usize {
    let mut served = 0;
    for i in 0..OTHERS {
        let mut conn = pod.connect(app.address).await.unwrap();
        let message = format!("hello {i}");
        if exchange(&mut conn, message.as_bytes()).await.unwrap()
            == format!("server: {message}").as_bytes()
        {
            served += 1;
        }
    }
    served
}

fn dropped(mesh: &TestMesh, listener: &str, reason: &str) -> u64 {
    mesh.counter(
        "istio_listener_connections_dropped_total",
        &[("listener", listener), ("reason", reason)],
    )
}

fn open(mesh: &TestMesh, listener: &str) -> u64 {
    mesh.counter("istio_listener_open_connections", &[("listener", listener)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_flooding_a_pod_s_inbound_listeners_is_capped_and_others_are_served() {
    let mesh = mesh().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let hostile = mesh.ip(50);

    // 15008: thousands of connections that never start their handshake.
    let hbone = Flood::open(FLOOD, || raw(hostile, server.addresses.hbone)).await;
    let refused = (FLOOD - PER_PEER) as u64;
    mesh.wait_for_counter(
        "istio_listener_connections_dropped_total",
        &[("listener", "hbone"), ("reason", "peer_limit")],
        refused,
    )
    .await;
    assert_eq!(hbone.tally(), (FLOOD - PER_PEER, PER_PEER));
    assert_eq!(open(&mesh, "hbone"), PER_PEER as u64);

    // Another pod is served over HBONE meanwhile, every time.
    assert_eq!(served(&client, &app).await, OTHERS);
    // Its pooled HBONE connection stays open.
    let others_open = open(&mesh, "hbone") - PER_PEER as u64;
    assert_eq!(dropped(&mesh, "hbone", "peer_limit"), refused);
    assert_eq!(dropped(&mesh, "hbone", "connection_limit"), 0);

    // 15006: thousands of plaintext connections to the application from one
    // address outside the mesh; the ones admitted reach the app and wait.
    let plaintext = Flood::open(FLOOD, || server.connect_plaintext(hostile, APP_PORT)).await;
    mesh.wait_for_counter(
        "istio_listener_connections_dropped_total",
        &[("listener", "inbound_plaintext"), ("reason", "peer_limit")],
        refused,
    )
    .await;
    assert_eq!(plaintext.tally(), (FLOOD - PER_PEER, PER_PEER));
    // Another plaintext client is served.
    let mut conn = server
        .connect_plaintext(mesh.ip(51), APP_PORT)
        .await
        .unwrap();
    assert_eq!(
        exchange(&mut conn, b"plain").await.unwrap(),
        b"server: plain"
    );
    // And so is the other pod, still.
    assert_eq!(served(&client, &app).await, OTHERS);
    assert_eq!(
        dropped(&mesh, "inbound_plaintext", "peer_limit"),
        refused,
        "no other client was refused"
    );
    println!(
        "inbound flood: {FLOOD} to 15008 and {FLOOD} to 15006 from one peer: {PER_PEER} held on each, {refused} reset on each; {} of {} from others served",
        2 * OTHERS + 1,
        2 * OTHERS + 1
    );

    // The flood goes: its places are free again.
    drop((hbone, plaintext));
    eventually("the flood's places to be free", || {
        open(&mesh, "hbone") == others_open && open(&mesh, "inbound_plaintext") == 0
    })
    .await;
    let again = Flood::open(1, || raw(hostile, server.addresses.hbone)).await;
    assert_eq!(again.tally(), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_flooding_its_outbound_capture_is_capped_and_other_pods_are_served() {
    let mesh = mesh().await;
    let hostile = mesh.pod("client", "a", 2).await;
    let other = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    // The hostile pod's application opens thousands of connections to the
    // server; those admitted are carried (they reach the app) and wait.
    let connections = Flood::open(FLOOD, || hostile.connect(app.address)).await;
    let refused = (FLOOD - PER_LISTENER) as u64;
    mesh.wait_for_counter(
        "istio_listener_connections_dropped_total",
        &[("listener", "outbound"), ("reason", "connection_limit")],
        refused,
    )
    .await;
    assert_eq!(connections.tally(), (FLOOD - PER_LISTENER, PER_LISTENER));
    mesh.wait_for_counter(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
        PER_LISTENER as u64,
    )
    .await;

    // Another pod's outbound capture is its own: served every time.
    assert_eq!(served(&other, &app).await, OTHERS);
    assert_eq!(dropped(&mesh, "outbound", "connection_limit"), refused);
    assert_eq!(dropped(&mesh, "outbound", "peer_limit"), 0);
    assert_eq!(app.peers().len(), PER_LISTENER + OTHERS);
    println!(
        "outbound flood: {FLOOD} from one pod's app: {PER_LISTENER} carried, {refused} reset; {OTHERS} of {OTHERS} from another pod served"
    );

    // Once the flood ends the pod's own connections are carried again.
    drop(connections);
    eventually("the flood's places to be free", || {
        open(&mesh, "outbound") == 0
    })
    .await;
    let mut conn = hostile.connect(app.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"back").await.unwrap(), b"server: back");
}

/// An application that, once a client has sent something, writes as much as
/// it can (up to `limit` bytes), counting what its socket took.
async fn firehose(address: SocketAddr, limit: u64) -> Arc<AtomicU64> {
    let listener = TcpListener::bind(address).await.unwrap();
    let written = Arc::new(AtomicU64::default());
    tokio::spawn({
        let written = written.clone();
        async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 16];
            let _ = stream.read(&mut request).await;
            let chunk = vec![b'x'; 64 * 1024];
            while written.load(Ordering::Relaxed) < limit {
                match stream.write(&chunk).await {
                    Ok(n) if n > 0 => written.fetch_add(n as u64, Ordering::Relaxed),
                    _ => return,
                };
            }
        }
    });
    written
}

/// The most a socket buffers each way, by the kernel's TCP settings.
fn kernel_buffer_max(sysctl: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_holds_a_bounded_amount_and_others_keep_their_throughput() {
    let mesh = TestMesh::new().await;
    let stalled = mesh.pod("client", "a", 2).await;
    let other = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    const FIREHOSE: u64 = 1 << 30;
    let written = firehose(at(server.ip, 9090), FIREHOSE).await;
    let echo = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    // The client asks, then never reads.
    let mut never_reads = stalled.connect(at(server.ip, 9090)).await.unwrap();
    never_reads.write_all(b"GET").await.unwrap();

    // Meanwhile another pod moves 8 MiB there and back four times, in full.
    const MOVED: usize = 8 << 20;
    for round in 0..4 {
        let mut conn = other.connect(echo.address).await.unwrap();
        let payload = vec![round as u8; MOVED];
        let reply = exchange(&mut conn, &payload).await.unwrap();
        assert_eq!(reply.len(), "server: ".len() + MOVED);
        assert!(reply.ends_with(&payload));
    }

    // What is held for the stalled client is at most what the sockets on
    // its path buffer (the app's and the client's, and both ends of the
    // proxy's three: app side, HBONE, client side) plus one HTTP/2 stream
    // window and a read buffer each way: the proxy keeps nothing beyond.
    let (wmem, rmem) = (kernel_buffer_max("tcp_wmem"), kernel_buffer_max("tcp_rmem"));
    let window = u64::from(proxy_core::hbone::Http2Settings::default().stream_window);
    let bound = 3 * (wmem + rmem) + window + 2 * 256 * 1024;
    let held = written.load(Ordering::Relaxed);
    println!(
        "never-reading client: the server wrote {held} bytes, none read (bound {bound}); another pod moved {} bytes each way in full",
        4 * MOVED
    );
    assert!(held > 0, "the server never started writing");
    assert!(
        held <= bound,
        "{held} bytes went into a connection whose client reads none (bound {bound})"
    );
    assert!(held < FIREHOSE);
    drop(never_reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hbone_streams_from_one_peer_stop_at_its_ceiling_and_others_are_served() {
    ensure_fd_limit();
    const STREAMS: usize = 1500;
    const CEILING: usize = 500;
    let mesh = TestMesh::with_config(|c| {
        c.held_sockets = HeldSocketLimits {
            per_peer: CEILING,
            per_node: 100_000,
        }
    })
    .await;
    let hostile = mesh.pod("client", "a", 2).await;
    let other = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    // The hostile pod's application opens 1500 connections to the server,
    // which its pool carries as HBONE streams, 100 to a connection; none of
    // them ends.
    let streams = Flood::open(STREAMS, || hostile.connect(app.address)).await;
    let refused = (STREAMS - CEILING) as u64;
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "peer_socket_limit")],
        refused,
    )
    .await;
    // The server's proxy answered 503 past the ceiling; the client's proxy
    // closed those connections.
    eventually("the refused streams' connections to be closed", || {
        streams.tally() == (STREAMS - CEILING, CEILING)
    })
    .await;
    assert_eq!(app.peers().len(), CEILING);
    assert_eq!(
        mesh.counter(
            "istio_ztunnel_connection_failures_total",
            &[("direction", "outbound"), ("reason", "refused")]
        ),
        refused
    );
    let connections = open(&mesh, "hbone");
    assert!(
        connections as usize >= CEILING / 100,
        "{CEILING} streams over {connections} HBONE connections"
    );

    // Another pod is served, every time, over the same server proxy.
    assert_eq!(served(&other, &app).await, OTHERS);
    assert_eq!(
        mesh.counter(
            "istio_ztunnel_connection_failures_total",
            &[("direction", "inbound"), ("reason", "peer_socket_limit")]
        ),
        refused,
        "only the hostile peer was refused"
    );
    println!(
        "HBONE streams: {STREAMS} from one peer over {connections} connections: {CEILING} carried, {refused} refused (503, peer_socket_limit); {OTHERS} of {OTHERS} from another pod served"
    );
}
