//! The listener guard on loopback, against peers that hold connections
//! without finishing anything: beyond the cap, before the TLS handshake,
//! before the request head or the HTTP/2 preface, and silent mid-way. Each
//! is dropped and counted while a well-behaved client keeps being served.
//! Timeouts are short; nothing asserts how long anything took.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_core::listener::{DropReason, Listener, ListenerLimits, ListenerMetrics};
use proxy_core::testing::{TestCa, until_closed};
use proxy_core::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// Only there so a bug cannot hang a test.
const PATIENCE: Duration = Duration::from_secs(30);
/// Long enough never to fire during a test.
const NEVER: Duration = Duration::from_secs(3600);
const SHORT: Duration = Duration::from_millis(200);

fn limits(max_connections: usize) -> ListenerLimits {
    ListenerLimits {
        max_connections,
        max_connections_per_peer: max_connections,
        handshake_timeout: NEVER,
        header_timeout: NEVER,
        idle_timeout: NEVER,
    }
}

fn router() -> Router {
    Router::new().route(
        "/",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("hello {peer}") }),
    )
}

/// An HTTP/1.1 server of [`router`] on a guarded loopback listener.
async fn http1_server(
    limits: ListenerLimits,
    tls: Option<TlsAcceptor>,
) -> (SocketAddr, ListenerMetrics, CancellationToken) {
    let metrics = ListenerMetrics::default();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), "test", limits, &metrics)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(listener.serve_http1(tls, router(), shutdown.clone()));
    (addr, metrics, shutdown)
}

/// `GET /` as a well-behaved client: the body, which names the peer.
async fn get_root(addr: SocketAddr) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let body = request(TokioIo::new(tcp)).await;
    assert_eq!(body, format!("hello {local}"), "the handler sees the peer");
    body
}

async fn request<IO>(io: TokioIo<IO>) -> String
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::time::timeout(PATIENCE, async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/")
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    })
    .await
    .expect("the server answers")
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tls_pair() -> (TlsAcceptor, tokio_rustls::TlsConnector) {
    tls::install_default_provider();
    let ca = TestCa::new("cluster.local");
    let server = ca.server_tls_config(&["server.test"]);
    let mut server = (*server).clone();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let client = tls::control_plane_client_config(&ca.roots()).unwrap();
    (
        TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(client),
    )
}

#[tokio::test]
async fn connections_beyond_the_cap_are_reset_and_counted() {
    let (addr, metrics, _shutdown) = http1_server(limits(4), None).await;

    // Four peers hold a connection each, sending nothing.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("four connections held", || metrics.open("test") == 4).await;

    // The fifth is accepted and reset at once, and counted.
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    until_closed("the fifth connection", &mut fifth).await;
    assert_eq!(metrics.dropped("test", DropReason::connection_limit), 1);
    assert_eq!(metrics.open("test"), 4);

    // A held connection can still be served...
    let mut first = held.remove(0);
    first
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // ...and once it is gone, its place is free for a new client.
    drop(first);
    eventually("a place freed", || metrics.open("test") == 3).await;
    get_root(addr).await;
    assert_eq!(metrics.dropped("test", DropReason::connection_limit), 1);
}

#[tokio::test]
async fn one_address_cannot_fill_the_listener_for_the_others() {
    let (addr, metrics, _shutdown) = http1_server(
        ListenerLimits {
            max_connections_per_peer: 3,
            ..limits(64)
        },
        None,
    )
    .await;
    // 127.0.0.1 holds three connections; its fourth is reset, counted.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("three connections held", || metrics.open("test") == 3).await;
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    until_closed("the fourth connection from 127.0.0.1", &mut fourth).await;
    assert_eq!(metrics.dropped("test", DropReason::peer_limit), 1);
    // Another address is served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let local = socket.local_addr().unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    assert_eq!(request(TokioIo::new(tcp)).await, format!("hello {local}"));
    assert_eq!(metrics.dropped("test", DropReason::peer_limit), 1);
}

#[tokio::test]
async fn partial_request_heads_are_closed_after_the_header_timeout() {
    let (addr, metrics, _shutdown) = http1_server(
        ListenerLimits {
            header_timeout: SHORT,
            ..limits(64)
        },
        None,
    )
    .await;

    // Twenty peers send half a request line and stop.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTT").await.unwrap();
        stalled.push(tcp);
    }
    // A normal client is served meanwhile.
    get_root(addr).await;

    for (i, tcp) in stalled.iter_mut().enumerate() {
        until_closed(&format!("stalled peer {i}"), tcp).await;
    }
    eventually("twenty header timeouts counted", || {
        metrics.dropped("test", DropReason::header_timeout) == 20
    })
    .await;
    eventually("nothing held", || metrics.open("test") == 0).await;
    get_root(addr).await;
}

#[tokio::test]
async fn an_unused_kept_alive_connection_is_closed_but_not_counted() {
    let (addr, metrics, _shutdown) = http1_server(
        ListenerLimits {
            header_timeout: SHORT,
            ..limits(64)
        },
        None,
    )
    .await;
    // One request on a kept-alive connection, then nothing: a scraper
    // between two scrapes.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    until_closed("the kept-alive connection", &mut tcp).await;
    eventually("nothing held", || metrics.open("test") == 0).await;
    assert_eq!(metrics.dropped("test", DropReason::header_timeout), 0);
}

#[tokio::test]
async fn peers_that_never_finish_the_tls_handshake_are_dropped() {
    let (acceptor, connector) = tls_pair();
    let (addr, metrics, _shutdown) = http1_server(
        ListenerLimits {
            handshake_timeout: SHORT,
            ..limits(64)
        },
        Some(acceptor),
    )
    .await;

    // Ten peers connect and send nothing; one sends garbage.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

    // A TLS client is served meanwhile.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(tls::server_name("server.test").unwrap(), tcp)
        .await
        .unwrap();
    assert!(request(TokioIo::new(tls)).await.starts_with("hello "));

    for (i, tcp) in silent.iter_mut().enumerate() {
        until_closed(&format!("silent peer {i}"), tcp).await;
    }
    until_closed("the peer that is not TLS", &mut garbage).await;
    eventually("ten handshake timeouts and a failure counted", || {
        metrics.dropped("test", DropReason::handshake_timeout) == 10
            && metrics.dropped("test", DropReason::handshake_failed) == 1
    })
    .await;
}

/// An HTTP/2 server (hyper's, as tonic's) over `http2_connections`.
async fn http2_server(
    limits: ListenerLimits,
    tls: Option<TlsAcceptor>,
) -> (SocketAddr, ListenerMetrics) {
    let metrics = ListenerMetrics::default();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), "test", limits, &metrics)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let mut connections = listener.http2_connections(tls, CancellationToken::new());
    tokio::spawn(async move {
        while let Some(Ok(connection)) = connections.next().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::<bytes::Bytes>::from("h2"),
                        ))
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(connection), service)
                    .await;
            });
        }
    });
    (addr, metrics)
}

async fn h2_get<IO>(io: IO) -> String
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::time::timeout(PATIENCE, async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("http://server.test/")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    })
    .await
    .expect("the HTTP/2 server answers")
}

#[tokio::test]
async fn tls_peers_that_never_send_the_http2_preface_are_dropped() {
    let (acceptor, connector) = tls_pair();
    let (addr, metrics) = http2_server(
        ListenerLimits {
            header_timeout: SHORT,
            ..limits(64)
        },
        Some(acceptor),
    )
    .await;
    let tls_connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector
            .connect(tls::server_name("server.test").unwrap(), tcp)
            .await
            .unwrap()
    };

    // Ten peers finish the TLS handshake, then send nothing; one sends
    // part of the preface.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(tls_connect().await);
    }
    let mut partial = tls_connect().await;
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    partial.flush().await.unwrap();

    // A gRPC-like client is served meanwhile.
    assert_eq!(h2_get(tls_connect().await).await, "h2");

    for (i, tls) in silent.iter_mut().enumerate() {
        until_closed(&format!("silent TLS peer {i}"), tls).await;
    }
    until_closed("the partial preface", &mut partial).await;
    eventually("eleven header timeouts counted", || {
        metrics.dropped("test", DropReason::header_timeout) == 11
    })
    .await;
    assert_eq!(metrics.dropped("test", DropReason::idle_timeout), 0);
}

#[tokio::test]
async fn connections_on_which_nothing_moves_are_closed_after_the_idle_timeout() {
    let (addr, metrics) = http2_server(
        ListenerLimits {
            idle_timeout: SHORT,
            ..limits(64)
        },
        None,
    )
    .await;

    // Five peers send the whole preface, read the server's settings, and
    // fall silent.
    let mut silent = Vec::new();
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        silent.push(tcp);
    }
    // A client that keeps talking is served meanwhile.
    assert_eq!(h2_get(TcpStream::connect(addr).await.unwrap()).await, "h2");

    for (i, tcp) in silent.iter_mut().enumerate() {
        until_closed(&format!("silent peer {i}"), tcp).await;
    }
    eventually("five idle timeouts counted", || {
        metrics.dropped("test", DropReason::idle_timeout) >= 5
    })
    .await;
    assert_eq!(metrics.dropped("test", DropReason::header_timeout), 0);
}
