//! The admin, stats and readiness servers on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use proxy_core::admin::{
    AdminState, CertDump, CertsDump, Readiness, ServerAddrs, ServerConfig, Servers,
};
use proxy_core::listener::{DropReason, ListenerLimits, ListenerMetrics};
use proxy_core::metrics;
use proxy_core::store::{Workload, WorkloadStore};
use proxy_core::testing::{loopback_admin_servers, until_closed};
use proxy_core::xds::{XdsClient, XdsConfig};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    tokio::time::timeout(WAIT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            content_type,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    })
    .await
    .expect("no reply")
}

fn loopback() -> ServerAddrs {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ServerAddrs {
        admin: any,
        stats: any,
        readiness: any,
    }
}

fn on(addrs: ServerAddrs) -> ServerConfig {
    ServerConfig {
        addrs,
        ..ServerConfig::default()
    }
}

fn workload() -> Workload {
    Workload::try_from(api::workload::Workload {
        uid: "Kubernetes//Pod/ns/a".into(),
        name: "a".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn defaults_are_upstreams_ports_with_admin_on_loopback_only() {
    let d = ServerAddrs::default();
    assert_eq!(d.admin, "127.0.0.1:15000".parse().unwrap());
    assert_eq!(d.stats, "0.0.0.0:15020".parse().unwrap());
    assert_eq!(d.readiness, "0.0.0.0:15021".parse().unwrap());
}

#[tokio::test]
async fn serves_config_dump_certs_metrics_and_readiness_then_stops() {
    let store = WorkloadStore::new();
    store.update(|b| b.insert_workload(workload()));

    let mut registry = metrics::new_registry();
    let opened = Counter::<u64>::default();
    registry.register(
        "tcp_connections_opened",
        "connections opened",
        opened.clone(),
    );
    opened.inc();
    // An xDS client that never runs: its status is a dump section.
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let xds = XdsClient::new(
        channel,
        XdsConfig::new("ztunnel~10.0.0.1~z.istio-system~istio-system.svc.cluster.local"),
    )
    .with_metrics(proxy_core::xds::XdsMetrics::register(&mut registry));

    let readiness = Readiness::new();
    let xds_synced = readiness.register("xds synced");
    let zds = readiness.register("zds snapshot received");

    let admin = AdminState::new(store.clone())
        .with_certificates(|| async {
            vec![CertsDump {
                identity: "spiffe://cluster.local/ns/ns/sa/a".into(),
                state: "Available".into(),
                cert_chain: vec![CertDump {
                    pem: "cGVt".into(),
                    serial_number: "1".into(),
                    valid_from: "2025-01-01T00:00:00Z".into(),
                    expiration_time: "2025-01-02T00:00:00Z".into(),
                }],
                root_certs: vec![],
            }]
        })
        .with_config(serde_json::json!({"clusterId": "Kubernetes"}))
        .with_section(xds.status());

    let shutdown = CancellationToken::new();
    let listeners = ListenerMetrics::register(&mut registry);
    let servers = Servers::start(
        on(loopback()),
        admin,
        Arc::new(registry),
        &listeners,
        readiness.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let addrs = servers.addrs;
    assert_ne!(addrs.admin.port(), 0);

    // Readiness names what is missing until everything is in.
    let r = get(addrs.readiness, "/healthz/ready").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        "not ready: waiting for xds synced, zds snapshot received\n"
    );
    xds_synced.mark_ready();
    let r = get(addrs.readiness, "/healthz/ready").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("zds snapshot received") && !r.body.contains("xds synced"));
    zds.mark_ready();
    let r = get(addrs.readiness, "/healthz/ready").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

    // Metrics: OpenMetrics text of the one registry.
    let r = get(addrs.stats, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("application/openmetrics-text"));
    assert!(
        r.body.contains("istio_tcp_connections_opened_total 1"),
        "{}",
        r.body
    );
    assert_eq!(get(addrs.stats, "/stats/prometheus").await.status, 200);

    // The config dump: upstream's keys, the store's content, our sections.
    let r = get(addrs.admin, "/config_dump").await;
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("application/json"));
    let dump: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    for key in [
        "workloads",
        "services",
        "policies",
        "certificates",
        "config",
        "xds",
    ] {
        assert!(dump.get(key).is_some(), "missing {key}: {dump}");
    }
    assert_eq!(dump["workloads"][0]["uid"], "Kubernetes//Pod/ns/a");
    assert_eq!(dump["workloads"][0]["workloadIps"][0], "10.0.0.1");
    assert_eq!(
        dump["certificates"][0]["certChain"][0]["expirationTime"],
        "2025-01-02T00:00:00Z"
    );
    assert_eq!(dump["config"]["clusterId"], "Kubernetes");
    assert_eq!(dump["xds"]["connection"], "Connecting");
    assert_eq!(dump["xds"]["synced"], false);

    // Changes show up in the next dump.
    store.update(|b| b.remove_workload("Kubernetes//Pod/ns/a"));
    let dump: serde_json::Value =
        serde_json::from_str(&get(addrs.admin, "/config_dump").await.body).unwrap();
    assert_eq!(dump["workloads"], serde_json::json!([]));

    let r = get(addrs.admin, "/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        certs["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/ns/sa/a"
    );
    assert_eq!(get(addrs.admin, "/nope").await.status, 404);

    // Graceful shutdown: every server ends, nothing listens any more.
    shutdown.cancel();
    tokio::time::timeout(WAIT, servers.join()).await.unwrap();
    for addr in [addrs.admin, addrs.stats, addrs.readiness] {
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}

#[tokio::test]
async fn a_port_in_use_fails_start_up_naming_the_server() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = ServerAddrs {
        stats: taken.local_addr().unwrap(),
        ..loopback()
    };
    let err = Servers::start(
        on(addrs),
        AdminState::new(WorkloadStore::new()),
        Arc::new(metrics::new_registry()),
        &ListenerMetrics::default(),
        Readiness::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("for the stats server"), "{err}");
}

#[tokio::test]
async fn partial_requests_on_every_server_are_dropped_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let limits = ListenerLimits {
        header_timeout: Duration::from_millis(200),
        ..ServerConfig::DEFAULT_LIMITS
    };
    let (servers, listeners, shutdown) = loopback_admin_servers(limits, WorkloadStore::new()).await;
    let addrs = servers.addrs;
    let servers_by_name = [
        ("admin", addrs.admin),
        ("stats", addrs.stats),
        ("readiness", addrs.readiness),
    ];

    // Twelve peers per server (fewer than one address may hold) send half
    // a request line and stop.
    let mut stalled = Vec::new();
    for (name, addr) in servers_by_name {
        for _ in 0..12 {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET /healthz/ready HTT").await.unwrap();
            stalled.push((name, tcp));
        }
    }
    // Probes and scrapes are answered meanwhile.
    assert_eq!(get(addrs.readiness, "/healthz/ready").await.status, 200);
    assert_eq!(get(addrs.stats, "/metrics").await.status, 200);

    for (name, tcp) in &mut stalled {
        until_closed(name, tcp).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    for (name, _) in servers_by_name {
        while listeners.dropped(name, DropReason::header_timeout) != 12 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {} header timeouts counted",
                listeners.dropped(name, DropReason::header_timeout)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The counts are on /metrics, one series per server and reason.
    let text = get(addrs.stats, "/metrics").await.body;
    assert!(
        text.contains(
            r#"istio_listener_connections_dropped_total{listener="readiness",reason="header_timeout"} 12"#
        ),
        "{text}"
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, servers.join()).await.unwrap();
}
