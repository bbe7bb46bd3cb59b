//! istiod's listeners against any pod, credentials or not, that holds
//! connections without finishing anything: partial HTTP requests on the
//! monitoring port (15014), TCP connections that never start TLS and TLS
//! connections that never send the HTTP/2 preface on the gRPC port (15012),
//! and more connections than a listener's cap. Each is dropped and counted
//! in `istiod_listener_connections_dropped_total`, while a well-behaved
//! client (a readiness probe, a CA request) keeps being served. The app
//! runs in-process on loopback with short timeouts; nothing asserts how
//! long anything took.

use crate::support::ca_client as client;
use crate::support::http_client;
use crate::support::istiod;

use std::time::Duration;

use proxy_core::testing::until_closed;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use http_client::{http_get, metric_sample};
use istiod::{LocalIstiod, PATIENCE};

/// Long enough never to fire during a test.
const NEVER: Duration = Duration::from_secs(3600);
const SHORT: Duration = Duration::from_millis(200);

/// A CA request over 15012, as a proxy makes it.
async fn certificate(istiod: &LocalIstiod) {
    let key = rcgen::KeyPair::generate().unwrap();
    let request = client::request(client::csr_pem(&key), Some("demo-client"), 0, None);
    let chain = tokio::time::timeout(PATIENCE, async {
        let mut client = client::tls_channel(istiod.addresses().grpc_tls, &istiod.roots())
            .await
            .unwrap();
        client.create_certificate(request).await.unwrap()
    })
    .await
    .expect("the CA answers")
    .into_inner()
    .cert_chain;
    assert!(!chain.is_empty());
}

/// A TLS connection to 15012 that completed its handshake.
async fn tls(istiod: &LocalIstiod) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(istiod.addresses().grpc_tls)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(client::client_tls(&istiod.roots()));
    tokio::time::timeout(
        PATIENCE,
        connector.connect(ServerName::try_from(client::ISTIOD_NAME).unwrap(), tcp),
    )
    .await
    .expect("the handshake finishes")
    .unwrap()
}

/// Waits until `istiod_listener_connections_dropped_total` of `listener`
/// for `reason` is `count`.
async fn wait_dropped(istiod: &LocalIstiod, listener: &str, reason: &str, count: f64) {
    let sample = format!(
        "istiod_listener_connections_dropped_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = istiod.metric(&sample).await;
        if seen == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sample}: {seen}, want {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_monitoring_port_drops_partial_requests_after_the_header_timeout() {
    let mut istiod = LocalIstiod::start_with(&[], |c| {
        c.monitoring.limits.header_timeout = SHORT;
    })
    .await;
    let monitoring = istiod.addresses().monitoring;

    // Thirty peers send half a request line and stop.
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut tcp = TcpStream::connect(monitoring).await.unwrap();
        tcp.write_all(b"GET /metrics HTT").await.unwrap();
        stalled.push(tcp);
    }
    // The readiness probe is answered meanwhile.
    assert_eq!(http_get(monitoring, "/ready").await.0, 200);

    for (i, tcp) in stalled.iter_mut().enumerate() {
        until_closed(&format!("partial request {i}"), tcp).await;
    }
    wait_dropped(&istiod, "monitoring", "header_timeout", 30.0).await;
    istiod.stop().await;
}

/// `n` connections to `addr` that send nothing.
async fn hold(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    held
}

/// `n` more connections to `addr`, each of which istiod must reset.
async fn expect_reset(addr: std::net::SocketAddr, n: usize, beyond: &str) {
    for i in 0..n {
        let mut extra = TcpStream::connect(addr).await.unwrap();
        until_closed(&format!("connection {i} beyond {beyond}"), &mut extra).await;
    }
}

/// `GET /metrics` (HTTP/1.0) from `source` (a loopback address); the
/// whole answer, or `None` if the connection was reset.
async fn metrics_from(source: &str, addr: std::net::SocketAddr) -> Option<String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
    let mut text = String::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_string(&mut text)).await;
    (text.split(' ').nth(1) == Some("200")).then_some(text)
}

fn dropped_sample(text: &str, reason: &str) -> f64 {
    metric_sample(
        text,
        &format!(
            "istiod_listener_connections_dropped_total{{listener=\"monitoring\",reason=\"{reason}\"}}"
        ),
    )
}

#[tokio::test]
async fn a_saturated_monitoring_port_refuses_more_and_grpc_keeps_serving() {
    let mut istiod = LocalIstiod::start_with(&[], |c| {
        c.monitoring.limits.max_connections = 4;
        c.monitoring.limits.header_timeout = NEVER;
    })
    .await;
    let monitoring = istiod.addresses().monitoring;

    // Four peers hold every place, sending nothing. Connections are
    // accepted in order, so the next five find the listener full.
    let mut held = hold(monitoring, 4).await;
    expect_reset(monitoring, 5, "the cap").await;

    // The rest of istiod is untouched: the CA answers over 15012.
    certificate(&istiod).await;

    // One place freed: the monitoring port serves again, and counted.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let text = loop {
        if let Some(text) = metrics_from("127.0.0.1", monitoring).await {
            break text;
        }
        // Reset: the freed place was not noticed yet.
        assert!(tokio::time::Instant::now() < deadline, "no place freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(dropped_sample(&text, "connection_limit") >= 5.0, "{text}");
    assert_eq!(
        metric_sample(
            &text,
            "istiod_listener_open_connections{listener=\"monitoring\"}"
        ),
        4.0,
        "{text}"
    );
    drop(held);
    istiod.stop().await;
}

#[tokio::test]
async fn one_pod_cannot_fill_the_monitoring_port_for_the_readiness_probe() {
    let mut istiod = LocalIstiod::start_with(&[], |c| {
        c.monitoring.limits.max_connections_per_peer = 4;
        c.monitoring.limits.header_timeout = NEVER;
    })
    .await;
    let monitoring = istiod.addresses().monitoring;

    // A pod at 127.0.0.1 holds its four places; its next ten are reset.
    let held = hold(monitoring, 4).await;
    expect_reset(monitoring, 10, "the per-peer cap").await;
    // Another address (the kubelet's probe, a scraper) is answered.
    let text = metrics_from("127.0.0.2", monitoring)
        .await
        .expect("another address is served");
    assert_eq!(dropped_sample(&text, "peer_limit"), 10.0, "{text}");
    drop(held);
    istiod.stop().await;
}

#[tokio::test]
async fn the_grpc_port_drops_peers_that_never_start_tls_or_http2() {
    let mut istiod = LocalIstiod::start_with(&[], |c| {
        c.grpc.limits.handshake_timeout = SHORT;
        c.grpc.limits.header_timeout = SHORT;
    })
    .await;
    let grpc = istiod.addresses().grpc_tls;

    // Ten peers open TCP and say nothing; ten finish TLS and say nothing.
    let mut silent_tcp = Vec::new();
    for _ in 0..10 {
        silent_tcp.push(TcpStream::connect(grpc).await.unwrap());
    }
    let mut silent_tls = Vec::new();
    for _ in 0..10 {
        silent_tls.push(tls(&istiod).await);
    }
    // Five say nothing on the plaintext port (15010) either.
    let plaintext = istiod.addresses().grpc_plaintext.expect("15010 is served");
    let mut silent_plaintext = Vec::new();
    for _ in 0..5 {
        silent_plaintext.push(TcpStream::connect(plaintext).await.unwrap());
    }
    // A proxy's CA request is served meanwhile.
    certificate(&istiod).await;

    for (i, tcp) in silent_tcp.iter_mut().enumerate() {
        until_closed(&format!("TCP without TLS {i}"), tcp).await;
    }
    for (i, tls) in silent_tls.iter_mut().enumerate() {
        until_closed(&format!("TLS without the HTTP/2 preface {i}"), tls).await;
    }
    for (i, tcp) in silent_plaintext.iter_mut().enumerate() {
        until_closed(&format!("plaintext without the HTTP/2 preface {i}"), tcp).await;
    }
    wait_dropped(&istiod, "grpc-tls", "handshake_timeout", 10.0).await;
    wait_dropped(&istiod, "grpc-tls", "header_timeout", 10.0).await;
    wait_dropped(&istiod, "grpc-plaintext", "header_timeout", 5.0).await;
    certificate(&istiod).await;
    istiod.stop().await;
}

#[tokio::test]
async fn the_grpc_port_resets_connections_beyond_its_cap() {
    let mut istiod = LocalIstiod::start_with(&[], |c| {
        c.grpc.limits.max_connections = 3;
        c.grpc.limits.header_timeout = NEVER;
    })
    .await;
    let grpc = istiod.addresses().grpc_tls;

    // Three TLS peers hold every place without sending the preface.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls(&istiod).await);
    }
    // The fourth is reset before its handshake.
    let mut fourth = TcpStream::connect(grpc).await.unwrap();
    until_closed("the fourth connection", &mut fourth).await;
    wait_dropped(&istiod, "grpc-tls", "connection_limit", 1.0).await;

    // A place freed: proxies are served again.
    drop(held.pop());
    certificate(&istiod).await;
    drop(held);
    istiod.stop().await;
}
