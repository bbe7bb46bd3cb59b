//! The DNS proxy on loopback: each pod's 15053 (UDP and TCP, port 0 here)
//! answers the mesh's names from the store (short names through search
//! domains, A and AAAA, headless Services, their pods' hostnames) and
//! forwards the rest to a resolver the test runs on loopback, over the protocol the query came on.

use std::net::{IpAddr, SocketAddr};

use api::workload::{IpFamilies, NetworkAddress};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use ztunnel_rs::dns::forwarder::Protocol;
use ztunnel_rs::dns::testing::{
    KNOWN_ADDRESS, TestResolver, addresses, exchange_tcp, exchange_udp, query,
};
use ztunnel_rs::proxy::testing::{PATIENCE, TestMesh, TestPod, xds};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn address(ip: IpAddr) -> NetworkAddress {
    let address = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    NetworkAddress {
        network: String::new(),
        address,
    }
}

/// A mesh forwarding to a resolver on loopback, with a
/// client pod `client` in `ns1` (at .2) and these services:
/// - `echo.ns1` at 10.96.0.10, IPv4 only;
/// - `echo.ns2` at 10.96.0.20 (another namespace, same short name);
/// - `dual.ns1` at 10.96.0.30 and fd00::30;
/// - headless `db.ns1` with pods `db-0` (.11) and `db-1` (.12).
async fn mesh() -> (TestMesh, TestPod, TestResolver) {
    let resolver = TestResolver::start(ip("127.0.0.1")).await;
    let servers = vec![resolver.addr];
    let mesh = TestMesh::with_config(move |c| c.dns.servers = servers).await;
    let mut echo1 = xds::service("echo", "ns1", "10.96.0.10", &[(80, 8080)]);
    echo1.0.ip_families = IpFamilies::Ipv4Only as i32;
    let echo2 = xds::service("echo", "ns2", "10.96.0.20", &[(80, 8080)]);
    let mut dual = xds::service("dual", "ns1", "10.96.0.30", &[(80, 8080)]);
    dual.0.addresses.push(address(ip("fd00::30")));
    dual.0.ip_families = IpFamilies::Dual as i32;
    let mut db = xds::service("db", "ns1", "10.96.0.40", &[(5432, 5432)]);
    db.0.addresses.clear();
    let db_key = db.key();
    let mut db0 =
        xds::workload("db-0", "ns1", &mesh.ip(11).to_string()).in_service(&db_key, &[(5432, 5432)]);
    db0.0.hostname = "db-0".into();
    let mut db1 =
        xds::workload("db-1", "ns1", &mesh.ip(12).to_string()).in_service(&db_key, &[(5432, 5432)]);
    db1.0.hostname = "db-1".into();
    xds::apply(
        &mesh.store,
        vec![
            echo1.into(),
            echo2.into(),
            dual.into(),
            db.into(),
            db0.into(),
            db1.into(),
        ],
    );
    let client = mesh.pod("client", "ns1", 2).await;
    (mesh, client, resolver)
}

fn dns_addr(pod: &TestPod) -> SocketAddr {
    pod.addresses.dns.expect("the pod has a DNS proxy")
}

async fn ask(pod: &TestPod, name: &str, record_type: RecordType) -> Message {
    exchange_udp(
        pod.ip,
        dns_addr(pod),
        &query(42, name, record_type),
        PATIENCE,
    )
    .await
    .expect("an answer")
}

#[tokio::test]
async fn services_answer_by_every_kubernetes_name_of_the_clients_namespace() {
    let (_mesh, client, resolver) = mesh().await;
    for name in [
        "echo.",
        "echo.ns1.",
        "echo.ns1.svc.",
        "echo.ns1.svc.cluster.local.",
        "ECHO.ns1.svc.cluster.local.",
    ] {
        let answer = ask(&client, name, RecordType::A).await;
        assert_eq!(answer.id(), 42);
        assert_eq!(answer.response_code(), ResponseCode::NoError, "{name}");
        assert!(answer.authoritative(), "{name}");
        assert_eq!(addresses(&answer), [ip("10.96.0.10")], "{name}");
        assert!(answer.answers().iter().all(|r| r.ttl() == 30), "{name}");
    }
    // The other namespace's service by its namespaced names.
    let answer = ask(&client, "echo.ns2.", RecordType::A).await;
    assert_eq!(addresses(&answer), [ip("10.96.0.20")]);
    assert!(
        resolver.seen().is_empty(),
        "nothing forwarded: {:?}",
        resolver.seen()
    );
}

#[tokio::test]
async fn a_name_found_through_a_search_domain_gets_a_cname() {
    let (_mesh, client, _resolver) = mesh().await;
    // What a resolver tries first for `echo.ns2` with ndots:5.
    let answer = ask(&client, "echo.ns2.ns1.svc.cluster.local.", RecordType::A).await;
    let records = answer.answers();
    assert_eq!(records.len(), 2, "{records:?}");
    match records[0].data() {
        RData::CNAME(target) => assert_eq!(target.0.to_ascii(), "echo.ns2."),
        other => panic!("expected a CNAME first, got {other:?}"),
    }
    assert_eq!(records[1].name().to_ascii(), "echo.ns2.");
    assert_eq!(addresses(&answer), [ip("10.96.0.20")]);
}

#[tokio::test]
async fn aaaa_answers_follow_the_services_families() {
    let (_mesh, client, resolver) = mesh().await;
    let answer = ask(&client, "dual.ns1.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(addresses(&answer), [ip("fd00::30")]);
    let answer = ask(&client, "dual.", RecordType::A).await;
    assert_eq!(addresses(&answer), [ip("10.96.0.30")]);
    // The name exists without an IPv6 address: empty, not NXDOMAIN, and
    // not forwarded.
    let answer = ask(&client, "echo.", RecordType::AAAA).await;
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert!(answer.authoritative());
    assert!(answer.answers().is_empty());
    assert!(resolver.seen().is_empty());
}

#[tokio::test]
async fn headless_services_answer_with_their_pods_and_pod_hostnames() {
    let (mesh, client, _resolver) = mesh().await;
    let answer = ask(&client, "db.", RecordType::A).await;
    assert_eq!(addresses(&answer), [mesh.ip(11), mesh.ip(12)]);
    let answer = ask(&client, "db-1.db.ns1.svc.cluster.local.", RecordType::A).await;
    assert_eq!(addresses(&answer), [mesh.ip(12)]);
    let answer = ask(&client, "db-1.db.", RecordType::A).await;
    assert_eq!(addresses(&answer), [mesh.ip(12)]);
}

#[tokio::test]
async fn other_names_are_forwarded_over_the_protocol_they_came_on() {
    let (mesh, client, resolver) = mesh().await;
    let answer = ask(&client, "known.example.", RecordType::A).await;
    assert_eq!(addresses(&answer), [IpAddr::V4(KNOWN_ADDRESS)]);
    assert!(!answer.authoritative());
    assert_eq!(answer.id(), 42, "the client's id comes back");
    // NXDOMAIN comes from upstream, never from the proxy.
    let answer = ask(&client, "nothing.example.", RecordType::A).await;
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    // A mesh name of a type the proxy does not answer goes upstream too.
    let answer = ask(&client, "echo.ns1.svc.cluster.local.", RecordType::MX).await;
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    // Over TCP, upstream is asked over TCP.
    let answer = exchange_tcp(
        client.ip,
        dns_addr(&client),
        &query(7, "known.example.", RecordType::A),
    )
    .await;
    assert_eq!(answer.id(), 7);
    assert_eq!(addresses(&answer), [IpAddr::V4(KNOWN_ADDRESS)]);
    assert_eq!(
        resolver.seen(),
        [
            ("known.example.".to_string(), Protocol::Udp),
            ("nothing.example.".to_string(), Protocol::Udp),
            ("echo.ns1.svc.cluster.local.".to_string(), Protocol::Udp),
            ("known.example.".to_string(), Protocol::Tcp),
        ]
    );
    // Mesh names over TCP are answered here.
    let answer = exchange_tcp(
        client.ip,
        dns_addr(&client),
        &query(8, "echo.", RecordType::A),
    )
    .await;
    assert_eq!(addresses(&answer), [ip("10.96.0.10")]);
    // Upstream's metric names and labels.
    let labels = [
        ("request_query_type", "a"),
        ("request_protocol", "udp"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v1"),
    ];
    assert_eq!(mesh.counter("istio_dns_requests_total", &labels), 2);
    assert_eq!(
        mesh.counter("istio_dns_upstream_requests_total", &labels),
        2
    );
    assert_eq!(
        mesh.counter("istio_dns_upstream_failures_total", &labels),
        0
    );
    assert!(
        mesh.metrics()
            .contains("istio_dns_upstream_request_duration_seconds_bucket")
    );
}

#[tokio::test]
async fn a_truncated_upstream_answer_keeps_tc_and_tcp_gets_it_all() {
    let (_mesh, client, _resolver) = mesh().await;
    let answer = ask(&client, "big.example.", RecordType::A).await;
    assert!(answer.truncated());
    let answer = exchange_tcp(
        client.ip,
        dns_addr(&client),
        &query(9, "big.example.", RecordType::A),
    )
    .await;
    assert!(!answer.truncated());
    assert_eq!(answer.answers().len(), 100);
}

#[tokio::test]
async fn an_unreachable_upstream_is_servfail_and_counted() {
    let mesh = TestMesh::with_config(|c| {
        // Nothing listens there: the UDP query is refused at once.
        c.dns.servers = vec!["127.0.0.1:1".parse().unwrap()];
    })
    .await;
    let client = mesh.pod("client", "ns1", 2).await;
    let answer = ask(&client, "known.example.", RecordType::A).await;
    assert_eq!(answer.response_code(), ResponseCode::ServFail);
    assert_eq!(
        mesh.counter(
            "istio_dns_upstream_failures_total",
            &[("request_protocol", "udp")]
        ),
        1
    );
}

#[tokio::test]
async fn garbage_never_stops_the_listener() {
    let (_mesh, client, _resolver) = mesh().await;
    let server = dns_addr(&client);
    // Too short for a header: dropped.
    let nothing = exchange_udp(
        client.ip,
        server,
        b"\x00\x01\x02",
        std::time::Duration::from_millis(300),
    )
    .await;
    assert!(nothing.is_none());
    // A header announcing a question that is not there: FORMERR.
    let mut half = query(77, "echo.", RecordType::A);
    half.truncate(14);
    let answer = exchange_udp(client.ip, server, &half, PATIENCE)
        .await
        .expect("FORMERR");
    assert_eq!(answer.id(), 77);
    assert_eq!(answer.response_code(), ResponseCode::FormErr);
    // Random bytes over TCP close that connection, not the listener.
    let _ = exchange_tcp_raw(client.ip, server, &[0xff; 40]).await;
    let answer = ask(&client, "echo.", RecordType::A).await;
    assert_eq!(addresses(&answer), [ip("10.96.0.10")]);
}

async fn exchange_tcp_raw(
    from: IpAddr,
    server: SocketAddr,
    bytes: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut stream = socket.connect(server).await?;
    let mut frame = (bytes.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    stream.write_all(&frame).await?;
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out)).await??;
    Ok(out)
}

#[tokio::test]
async fn a_pod_the_store_does_not_know_gets_servfail() {
    let mesh =
        TestMesh::with_config(|c| c.workload_wait = std::time::Duration::from_millis(100)).await;
    // Proxied, but its workload never arrives.
    let stranger = mesh.proxy("stranger", "ns1", "stranger", mesh.ip(9)).await;
    let answer = exchange_udp(
        stranger.ip,
        dns_addr(&stranger),
        &query(5, "echo.", RecordType::A),
        PATIENCE,
    )
    .await
    .expect("an answer");
    assert_eq!(answer.response_code(), ResponseCode::ServFail);
}
