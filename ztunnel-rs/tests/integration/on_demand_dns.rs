//! On-demand DNS through the proxy on loopback: a service whose endpoint is
//! known by hostname only is reached at the address a resolver on loopback
//! gives for it (HBONE or plain TCP, as the workload says), looked up once
//! for the answer's TTL; a hostname that does not resolve refuses the
//! connection, counted; the pod's answers are in its `/config_dump` entry.

use std::net::{IpAddr, SocketAddr};

use hickory_proto::rr::RecordType;
use proxy_core::admin::DumpSection;
use ztunnel_rs::dns::testing::TestResolver;
use ztunnel_rs::proxy::testing::{EchoApp, TestMesh, exchange, xds};

use crate::proxy::assert_refused;

const APP_PORT: u16 = 8080;

fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn a_queries(resolver: &TestResolver, name: &str) -> usize {
    resolver
        .seen_types()
        .iter()
        .filter(|(n, t)| n == name && *t == RecordType::A)
        .count()
}

#[tokio::test]
async fn a_service_endpoint_known_by_hostname_is_resolved_from_the_pod_and_cached() {
    let resolver = TestResolver::start("127.0.0.1".parse().unwrap()).await;
    let servers = vec![resolver.addr];
    let mesh = TestMesh::with_config(move |c| c.dns.servers = servers).await;
    let client = mesh.pod("client", "a", 2).await;
    // The server pod is enrolled; the endpoint that stands for it (as a
    // ServiceEntry's DNS endpoint would) speaks HBONE with its identity.
    let server = mesh.pod("server", "b", 3).await;
    EchoApp::start(at(server.ip, APP_PORT), "server").await;
    resolver.set_record("backend.example.com", &[server.ip]);
    let vip = mesh.ip(100);
    let service = xds::service("external", "b", &vip.to_string(), &[(80, APP_PORT)]);
    let missing_vip = mesh.ip(101);
    let missing = xds::service("missing", "b", &missing_vip.to_string(), &[(80, APP_PORT)]);
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("external-backend", "b", "0.0.0.0")
                .hostname_only("backend.example.com")
                .service_account("server")
                .in_service(&service.key(), &[(80, APP_PORT)])
                .hbone()
                .into(),
            xds::workload("missing-backend", "b", "0.0.0.0")
                .hostname_only("missing.example.com")
                .in_service(&missing.key(), &[(80, APP_PORT)])
                .into(),
            service.into(),
            missing.into(),
        ],
    );

    for i in 0..3 {
        let mut conn = client.connect(at(vip, 80)).await.unwrap();
        let reply = exchange(&mut conn, format!("{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(reply, format!("server: {i}").as_bytes());
    }
    // Asked once (A: the client connected over IPv4), from the pod.
    assert_eq!(a_queries(&resolver, "backend.example.com."), 1);
    let labels = [
        ("hostname", "backend.example.com"),
        ("source_workload", "client"),
        ("source_workload_namespace", "a"),
    ];
    assert_eq!(mesh.counter("istio_on_demand_dns_total", &labels), 3);
    let server_id = mesh.identity("b", "server").to_string();
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("connection_security_policy", "mutual_tls"),
            ("destination_principal", server_id.as_str()),
            ("destination_service", "external.b.svc.cluster.local"),
        ],
        3,
    )
    .await;

    // Not resolvable: refused, counted, asked once while the failure is
    // remembered.
    for _ in 0..2 {
        let mut conn = client.connect(at(missing_vip, 80)).await.unwrap();
        assert_refused(exchange(&mut conn, b"anyone?").await);
    }
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "outbound"), ("reason", "unresolved_hostname")],
        2,
    )
    .await;
    assert_eq!(a_queries(&resolver, "missing.example.com."), 1);

    let dump = mesh.manager.dump();
    let pod = dump
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["info"]["name"] == "client")
        .expect("the client pod is dumped");
    let resolved = pod["resolvedHostnames"].as_array().unwrap();
    let backend = resolved
        .iter()
        .find(|e| e["hostname"] == "backend.example.com")
        .expect("the answer is listed");
    assert_eq!(backend["recordType"], "A");
    assert_eq!(backend["addresses"][0], server.ip.to_string());
    let failed = resolved
        .iter()
        .find(|e| e["hostname"] == "missing.example.com")
        .expect("the failure is listed");
    assert!(
        failed["error"].as_str().unwrap().contains("NXDomain")
            || failed["error"].as_str().unwrap().contains("Non-Existent"),
        "{failed}"
    );
}
