//! The proxy on loopback: each pod is an address of a /24 of 127/8 proxied
//! through plain sockets bound to it, certificates come from an in-process
//! CA through the real certificate manager (impersonating, as on a node),
//! and the workload store is filled through the real xDS handlers.
//!
//! Paths: outbound -> HBONE -> inbound -> app with both identities
//! verified; service VIP load balancing; passthrough; waypoints; policy
//! (DENY, STRICT / PERMISSIVE); and the faults: no healthy endpoint, a peer
//! with the wrong identity or a bad certificate, a CONNECT for another pod,
//! the application refusing, going around a waypoint; and failing closed:
//! nothing carried before the first complete state or for a pod the store
//! lacks, a listed policy not held denies, a policy change cuts live
//! connections; and bounds on hostile peers: the ceilings on sockets held
//! to applications, a peer that stops answering PINGs; and the live
//! connections the admin lists (`workloadState`).

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use api::security::{Action, Match};
use proxy_core::hbone::{
    Connect, HboneError, HbonePool, HboneServer, HboneStream, HboneTarget, InboundConnect,
    Keepalive, PoolConfig,
};
use proxy_core::identity::WorkloadCertificate;
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use proxy_core::testing::TestCa;
use proxy_core::testing::raw_http2::RawHttp2;
use proxy_core::tls;
use tokio::net::TcpListener;
use ztunnel_rs::proxy::sockets::SocketFuture;
use ztunnel_rs::proxy::testing::{EchoApp, PATIENCE, TestMesh, TestPod, eventually, exchange, xds};
use ztunnel_rs::proxy::{
    HeldSocketLimits, LoadBalancing, LocalSockets, PodConnect, PodInfo, PodSockets,
};

const APP_PORT: u16 = 8080;

fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The client's connection was refused: closed without a byte of answer
/// (EOF, or a reset when the proxy closed it with the client's bytes
/// unread, the kernel's rule).
pub(crate) fn assert_refused(result: io::Result<Vec<u8>>) {
    match result {
        Ok(reply) if reply.is_empty() => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("expected the connection refused, got {other:?}"),
    }
}

/// A client that sends nothing reads EOF from a refused connection: it was
/// closed, not reset (as upstream ztunnel refuses).
async fn assert_closed_quietly(conn: &mut tokio::net::TcpStream) {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(conn, &mut byte))
        .await
        .expect("the refused connection stayed open");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Ok(0),
        "a refused connection is closed (EOF), not reset"
    );
}

/// The client saw its connection cut with RST.
fn assert_reset(result: io::Result<Vec<u8>>) {
    match result {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// An HBONE client outside the proxy, presenting `cert` from `ip`.
async fn raw_hbone(
    ip: IpAddr,
    cert: &WorkloadCertificate,
    target: HboneTarget,
) -> Result<HboneStream, HboneError> {
    let pool = HbonePool::new(
        PoolConfig::default(),
        Arc::new(PodConnect(Arc::new(LocalSockets::new(ip)))),
    );
    tokio::time::timeout(PATIENCE, pool.connect(cert, &target))
        .await
        .expect("HBONE client hung")
}

type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An HBONE server presenting `cert` at `address` that answers every
/// CONNECT by `answer`, recording (peer identity, authority).
async fn hbone_server(
    address: SocketAddr,
    cert: Arc<WorkloadCertificate>,
    answer: impl Fn(InboundConnect) -> Boxed + Send + Sync + 'static,
) -> Arc<Mutex<Vec<(SpiffeId, SocketAddr)>>> {
    let seen: Arc<Mutex<Vec<(SpiffeId, SocketAddr)>>> = Arc::default();
    let listener = Listener::new(
        TcpListener::bind(address).await.unwrap(),
        "hbone",
        ListenerLimits::caps(4096, 4096),
        &ListenerMetrics::default(),
    );
    let handler = {
        let seen = seen.clone();
        move |connect: InboundConnect| -> Boxed {
            seen.lock()
                .unwrap()
                .push((connect.peer_identity().clone(), connect.authority()));
            answer(connect)
        }
    };
    let server = HboneServer::new(handler);
    tokio::spawn(async move {
        server
            .serve(listener, move |_| {
                let config = tls::hbone_server_config(&cert);
                async move { Ok(config?) }
            })
            .await
    });
    seen
}

/// Pod a/client says hello to the app in pod b/server through the mesh;
/// returns the two pods' IPs and the address the app saw the call from.
async fn hello_client_to_server(mesh: &TestMesh) -> (IpAddr, IpAddr, SocketAddr) {
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"hello").await.unwrap(),
        b"server: hello"
    );
    (client.ip, server.ip, app.peers()[0])
}

#[tokio::test]
async fn without_original_source_the_app_sees_its_own_pod() {
    let mesh = TestMesh::with_config(|c| c.original_source = false).await;
    let (_, server, seen) = hello_client_to_server(&mesh).await;
    assert_eq!(seen.ip(), server);
}

/// The traffic series of a workload that left the mesh are dropped once
/// they have been unused for the retention; those of workloads still here
/// stay. Without it every workload a node ever talked to stays exported.
#[tokio::test]
async fn traffic_series_of_a_workload_gone_from_the_mesh_are_dropped() {
    let mesh = TestMesh::with_config(|c| c.metrics_retention = Duration::from_millis(200)).await;
    hello_client_to_server(&mesh).await;
    let naming_server = |mesh: &TestMesh| {
        mesh.metrics()
            .lines()
            .filter(|l| l.starts_with("istio_tcp_") && l.contains("_workload=\"server\""))
            .count()
    };
    let closed = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    mesh.wait_for_counter("istio_tcp_connections_closed_total", &closed, 2)
        .await;
    // Both reporters: opened, closed, bytes each way.
    assert_eq!(naming_server(&mesh), 8);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        naming_server(&mesh),
        8,
        "kept while the server is in the mesh"
    );

    xds::remove(&mesh.store, &["Kubernetes//Pod/b/server"]);
    eventually("the server's series to be dropped", || {
        naming_server(&mesh) == 0
    })
    .await;
}

#[tokio::test]
async fn pod_to_pod_goes_through_hbone_with_both_identities_verified() {
    let mesh = TestMesh::new().await;
    let (client, _, seen) = hello_client_to_server(&mesh).await;
    // The application sees the client's address (original source).
    assert_eq!(seen.ip(), client);

    let client_id = mesh.identity("a", "client").to_string();
    let server_id = mesh.identity("b", "server").to_string();
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", client_id.as_str()),
            ("source_workload", "client"),
            ("source_workload_namespace", "a"),
            ("destination_principal", server_id.as_str()),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "b"),
            ("response_flags", "-"),
        ];
        mesh.wait_for_counter("istio_tcp_connections_closed_total", &labels, 1)
            .await;
        assert_eq!(
            mesh.counter("istio_tcp_connections_opened_total", &labels),
            1
        );
        assert_eq!(mesh.counter("istio_tcp_received_bytes_total", &labels), 5);
        assert_eq!(mesh.counter("istio_tcp_sent_bytes_total", &labels), 13);
    }

    // Certificates were asked for on the pods' behalf, one identity each.
    let requests = mesh.signer.requests();
    assert!(requests.iter().all(|r| r.impersonate), "{requests:?}");
    let asked: BTreeSet<String> = requests.iter().map(|r| r.identity.to_string()).collect();
    assert_eq!(asked, BTreeSet::from([client_id, server_id]));
}

#[tokio::test]
async fn a_service_vip_balances_over_its_healthy_endpoints() {
    let mesh = TestMesh::with_config(|c| c.load_balancing = LoadBalancing::RoundRobin).await;
    let client = mesh.pod("client", "a", 2).await;
    let vip = mesh.ip(100);
    let service = xds::service("web", "b", &vip.to_string(), &[(80, APP_PORT)]);
    let mut apps = Vec::new();
    for (name, host) in [("web-1", 3), ("web-2", 4)] {
        let ip = mesh.ip(host);
        xds::apply(
            &mesh.store,
            vec![
                xds::workload(name, "b", &ip.to_string())
                    .service_account("web")
                    .in_service(&service.key(), &[(80, APP_PORT)])
                    .hbone()
                    .into(),
            ],
        );
        mesh.proxy(name, "b", "web", ip).await;
        apps.push(EchoApp::start(at(ip, APP_PORT), name).await);
    }
    // An unhealthy endpoint never gets traffic.
    let sick = mesh.ip(5);
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("web-3", "b", &sick.to_string())
                .in_service(&service.key(), &[(80, APP_PORT)])
                .hbone()
                .unhealthy()
                .into(),
            service.into(),
        ],
    );

    let mut replies = Vec::new();
    for i in 0..4 {
        let mut conn = client.connect(at(vip, 80)).await.unwrap();
        let reply = exchange(&mut conn, format!("{i}").as_bytes())
            .await
            .unwrap();
        replies.push(String::from_utf8(reply).unwrap());
    }
    assert_eq!(replies, ["web-1: 0", "web-2: 1", "web-1: 2", "web-2: 3"]);
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("destination_service", "web.b.svc.cluster.local"),
            ("destination_service_namespace", "b"),
            ("destination_service_name", "web"),
            ("connection_security_policy", "mutual_tls"),
        ],
        4,
    )
    .await;
}

#[tokio::test]
async fn random_balancing_reaches_every_endpoint() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let vip = mesh.ip(100);
    let service = xds::service("web", "b", &vip.to_string(), &[(80, 0)]);
    for (name, host) in [("web-1", 3), ("web-2", 4)] {
        let ip = mesh.ip(host);
        // A named target port: each endpoint says where it listens.
        xds::apply(
            &mesh.store,
            vec![
                xds::workload(name, "b", &ip.to_string())
                    .in_service(&service.key(), &[(80, APP_PORT)])
                    .hbone()
                    .into(),
            ],
        );
        mesh.proxy(name, "b", name, ip).await;
        EchoApp::start(at(ip, APP_PORT), name).await;
    }
    xds::apply(&mesh.store, vec![service.into()]);
    let mut seen = BTreeSet::new();
    // Two endpoints picked at random: 40 tries all landing on one has
    // probability 2^-39.
    for _ in 0..40 {
        let mut conn = client.connect(at(vip, 80)).await.unwrap();
        let reply = String::from_utf8(exchange(&mut conn, b"x").await.unwrap()).unwrap();
        seen.insert(reply);
    }
    assert_eq!(seen, BTreeSet::from(["web-1: x".into(), "web-2: x".into()]));
}

#[tokio::test]
async fn destinations_outside_the_mesh_get_plain_tcp_from_the_pod() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    // Unknown to the store.
    let outside = EchoApp::start(at(mesh.ip(50), 9000), "outside").await;
    // Known, but not enrolled.
    let legacy_ip = mesh.ip(51);
    xds::apply(
        &mesh.store,
        vec![xds::workload("legacy", "legacy", &legacy_ip.to_string()).into()],
    );
    let legacy = EchoApp::start(at(legacy_ip, 9000), "legacy").await;

    for (app, name) in [(&outside, "outside"), (&legacy, "legacy")] {
        let mut conn = client.connect(app.address).await.unwrap();
        let reply = exchange(&mut conn, b"hi").await.unwrap();
        assert_eq!(reply, format!("{name}: hi").as_bytes());
        // It left with the pod's address.
        assert_eq!(app.peers()[0].ip(), client.ip);
    }
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("connection_security_policy", "unknown"),
            (
                "source_principal",
                &mesh.identity("a", "client").to_string(),
            ),
        ],
        2,
    )
    .await;
    assert_eq!(
        mesh.counter(
            "istio_tcp_connections_closed_total",
            &[("destination_workload", "legacy")]
        ),
        1
    );
    assert_eq!(
        mesh.counter(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0
    );
}

#[tokio::test]
async fn a_deny_policy_refuses_the_client_and_leaves_others_alone() {
    let mesh = TestMesh::new().await;
    let denied = mesh.pod("client", "a", 2).await;
    let allowed = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    xds::apply_policies(
        &mesh.store,
        vec![xds::policy(
            "deny-a",
            "b",
            Action::Deny,
            Match {
                namespaces: vec![xds::exact("a")],
                ..Match::default()
            },
        )],
    );

    let mut conn = denied.connect(app.address).await.unwrap();
    assert_refused(exchange(&mut conn, b"hello").await);
    let mut conn = allowed.connect(app.address).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"hello").await.unwrap(),
        b"server: hello"
    );

    let inbound_denied = [("direction", "inbound"), ("reason", "policy_denied")];
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &inbound_denied,
        1,
    )
    .await;
    // The client's proxy saw the CONNECT refused (401).
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "outbound"), ("reason", "refused")],
        1,
    )
    .await;
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            (
                "source_principal",
                &mesh.identity("a", "client").to_string(),
            ),
        ],
        1,
    )
    .await;
    assert_eq!(
        mesh.counter("istio_ztunnel_connection_failures_total", &inbound_denied),
        1
    );
    // A client that sends nothing reads EOF: closed, not reset.
    let mut quiet = denied.connect(app.address).await.unwrap();
    assert_closed_quietly(&mut quiet).await;

    // Without the policy, traffic flows again.
    xds::remove_policies(&mesh.store, &["b/deny-a"]);
    let mut conn = denied.connect(app.address).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"again").await.unwrap(),
        b"server: again"
    );
}

#[tokio::test]
async fn strict_rejects_plaintext_and_permissive_allows_it() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let legacy = mesh.ip(60);

    // PERMISSIVE: no policy, plaintext is let in.
    let mut conn = server.connect_plaintext(legacy, APP_PORT).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"plain").await.unwrap(),
        b"server: plain"
    );
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "unknown"),
            ("destination_workload", "server"),
            ("response_flags", "-"),
        ],
        1,
    )
    .await;

    // STRICT: refused; mTLS still works.
    xds::apply_policies(&mesh.store, vec![xds::strict("b")]);
    let mut conn = server.connect_plaintext(legacy, APP_PORT).await.unwrap();
    assert_refused(exchange(&mut conn, b"plain").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[
            ("direction", "inbound_plaintext"),
            ("reason", "policy_denied"),
        ],
        1,
    )
    .await;
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"mtls").await.unwrap(), b"server: mtls");
}

/// Issue 9 items 4 and 5: the waypoint carries a bound pod's traffic; going
/// around it is refused only where a policy says so (upstream istiod's
/// allow-from-waypoint policy), and the waypoint's own traffic obeys the
/// pod's DENY policies like anyone's.
#[tokio::test]
async fn waypoint_traffic_and_traffic_around_the_waypoint_are_both_judged_by_policy() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let (server_ip, waypoint_ip, vip) = (mesh.ip(3), mesh.ip(5), mesh.ip(103));
    let waypoint_id = mesh.identity("b", "waypoint");
    let waypoint_service = xds::service("waypoint", "b", &mesh.ip(105).to_string(), &[]);
    let service = xds::service("server", "b", &vip.to_string(), &[(80, APP_PORT)])
        .waypoint_service("b", "waypoint.b.svc.cluster.local");
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("waypoint", "b", &waypoint_ip.to_string())
                .in_service(&waypoint_service.key(), &[])
                .into(),
            waypoint_service.into(),
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .in_service(&service.key(), &[(80, APP_PORT)])
                .waypoint_service("b", "waypoint.b.svc.cluster.local")
                .into(),
            service.into(),
        ],
    );
    let server = mesh.proxy("server", "b", "server", server_ip).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    // The waypoint: terminates HBONE as itself, then forwards to the pod,
    // from its own address, as itself.
    let waypoint_cert = mesh.certificates.fetch(&waypoint_id).await.unwrap();
    let upstream = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server_ip, mesh.hbone_port()),
        authority: app.address,
    };
    let seen = hbone_server(at(waypoint_ip, mesh.hbone_port()), waypoint_cert.clone(), {
        let pool = HbonePool::new(
            PoolConfig::default(),
            Arc::new(PodConnect(Arc::new(LocalSockets::new(waypoint_ip)))),
        );
        move |connect| -> Boxed {
            let (pool, cert, upstream) = (pool.clone(), waypoint_cert.clone(), upstream.clone());
            Box::pin(async move {
                let Ok(mut up) = pool.connect(&cert, &upstream).await else {
                    return connect.refuse(http::StatusCode::BAD_GATEWAY);
                };
                let mut down = connect.accept().unwrap();
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            })
        }
    })
    .await;

    // By workload address and by service VIP: the original destination
    // travels in :authority, to the waypoint's identity.
    for dst in [app.address, at(vip, 80)] {
        let mut conn = client.connect(dst).await.unwrap();
        assert_eq!(exchange(&mut conn, b"via").await.unwrap(), b"server: via");
    }
    let client_id = mesh.identity("a", "client");
    assert_eq!(
        *seen.lock().unwrap(),
        [(client_id.clone(), app.address), (client_id, at(vip, 80))]
    );
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &waypoint_id.to_string()),
            ("response_flags", "-"),
        ],
        2,
    )
    .await;

    // Going around the waypoint (an ingress or a sidecar does) is not
    // refused by the binding alone, as upstream: policy decides.
    let intruder = mesh.identity("a", "intruder");
    let cert = mesh.certificates.fetch(&intruder).await.unwrap();
    let direct = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server_ip, mesh.hbone_port()),
        authority: app.address,
    };
    let mut stream = raw_hbone(mesh.ip(7), &cert, direct.clone()).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(b"around").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply))
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(reply, b"server: around");
    }

    // With istiod's allow-from-waypoint policy listed on the pod (upstream's
    // PILOT_AUTO_ALLOW_WAYPOINT_POLICY), only the waypoint gets through.
    let implicit = "istio_allow_waypoint_b_waypoint";
    xds::apply_policies(
        &mesh.store,
        vec![api::security::Authorization {
            scope: api::security::Scope::WorkloadSelector as i32,
            ..xds::policy(
                implicit,
                "b",
                api::security::Action::Allow,
                api::security::Match {
                    principals: vec![xds::exact("cluster.local/ns/b/sa/waypoint")],
                    ..Default::default()
                },
            )
        }],
    );
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .in_service("b/server.b.svc.cluster.local", &[(80, APP_PORT)])
                .waypoint_service("b", "waypoint.b.svc.cluster.local")
                .policy(&format!("b/{implicit}"))
                .into(),
        ],
    );
    let err = raw_hbone(mesh.ip(7), &cert, direct).await.unwrap_err();
    // Denied by policy: 401, as upstream ztunnel answers.
    assert_eq!(err.status(), Some(http::StatusCode::UNAUTHORIZED), "{err}");
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"via").await.unwrap(), b"server: via");

    // The waypoint is a source like any other: a DENY on its identity
    // stops what it forwards.
    xds::apply_policies(
        &mesh.store,
        vec![xds::policy(
            "deny-waypoint",
            "b",
            api::security::Action::Deny,
            api::security::Match {
                principals: vec![xds::exact("cluster.local/ns/b/sa/waypoint")],
                ..Default::default()
            },
        )],
    );
    // The waypoint stand-in answers the refused upstream CONNECT with 502,
    // which the client's ztunnel turns into a refusal.
    let mut conn = client.connect(app.address).await.unwrap();
    assert_refused(exchange(&mut conn, b"via").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "policy_denied")],
        2,
    )
    .await;
}

#[tokio::test]
async fn a_service_without_healthy_endpoints_resets_the_client() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let vip = mesh.ip(100);
    let service = xds::service("gone", "b", &vip.to_string(), &[(80, APP_PORT)]);
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("gone-1", "b", &mesh.ip(9).to_string())
                .in_service(&service.key(), &[(80, APP_PORT)])
                .hbone()
                .unhealthy()
                .into(),
            service.into(),
        ],
    );
    let mut conn = client.connect(at(vip, 80)).await.unwrap();
    assert_refused(exchange(&mut conn, b"anyone?").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "outbound"), ("reason", "no_healthy_endpoint")],
        1,
    )
    .await;
    // Nothing else is disturbed.
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"ok").await.unwrap(), b"server: ok");
}

#[tokio::test]
async fn the_application_refusing_is_a_503_and_a_refusal() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    // Nothing listens on 9999 in the server pod.
    let mut conn = client.connect(at(server.ip, 9999)).await.unwrap();
    assert_refused(exchange(&mut conn, b"hello").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "app_refused")],
        1,
    )
    .await;
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("response_flags", "CONNECT")],
        1,
    )
    .await;
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "outbound"), ("reason", "refused")],
        1,
    )
    .await;

    // The same through a raw client: the status is 503.
    let cert = mesh
        .certificates
        .fetch(&mesh.identity("a", "client"))
        .await
        .unwrap();
    let target = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server.ip, mesh.hbone_port()),
        authority: at(server.ip, 9999),
    };
    let err = raw_hbone(client.ip, &cert, target).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn a_connect_for_another_address_is_refused() {
    let mesh = TestMesh::new().await;
    let server = mesh.pod("server", "b", 3).await;
    let other = mesh.pod("other", "b", 4).await;
    let app = EchoApp::start(at(other.ip, APP_PORT), "other").await;
    let cert = mesh
        .certificates
        .fetch(&mesh.identity("a", "client"))
        .await
        .unwrap();
    // Asking pod .3's proxy to carry traffic to pod .4.
    let target = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server.ip, mesh.hbone_port()),
        authority: app.address,
    };
    let err = raw_hbone(mesh.ip(2), &cert, target).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err}");
    // Or to its own proxy ports.
    let target = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server.ip, mesh.hbone_port()),
        authority: at(server.ip, mesh.hbone_port()),
    };
    let err = raw_hbone(mesh.ip(2), &cert, target).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err}");
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "wrong_target")],
        1,
    )
    .await;
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "proxy_port")],
        1,
    )
    .await;
    assert!(app.peers().is_empty());
}

#[tokio::test]
async fn peers_with_the_wrong_identity_or_a_bad_certificate_are_refused() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let foreign = TestCa::new("cluster.local");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // Outbound: destinations whose HBONE listener is not who the store says.
    let impostors = [
        (20, mesh.ca.certificate(&mesh.identity("b", "impostor"))),
        (
            21,
            mesh.ca.certificate_valid_between(
                &mesh.identity("b", "fake-21"),
                now - 2 * hour,
                now - hour,
            ),
        ),
        (
            22,
            foreign.certificate_trusting(&mesh.identity("b", "fake-22"), mesh.ca.roots()),
        ),
    ];
    for (host, cert) in impostors {
        let ip = mesh.ip(host);
        xds::apply(
            &mesh.store,
            vec![
                xds::workload(&format!("fake-{host}"), "b", &ip.to_string())
                    .hbone()
                    .into(),
            ],
        );
        hbone_server(at(ip, mesh.hbone_port()), Arc::new(cert), |connect| {
            Box::pin(async move { drop(connect) })
        })
        .await;
        let mut conn = client.connect(at(ip, APP_PORT)).await.unwrap();
        assert_refused(exchange(&mut conn, b"secret").await);
    }
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "outbound"), ("reason", "handshake")],
        3,
    )
    .await;

    // Inbound: clients with an expired certificate or one from another root.
    let to_server = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server.ip, mesh.hbone_port()),
        authority: app.address,
    };
    let expired = mesh.ca.certificate_valid_between(
        &mesh.identity("a", "client"),
        now - 2 * hour,
        now - hour,
    );
    let from_elsewhere =
        foreign.certificate_trusting(&mesh.identity("a", "client"), mesh.ca.roots());
    for cert in [expired, from_elsewhere] {
        assert!(
            raw_hbone(mesh.ip(8), &cert, to_server.clone())
                .await
                .is_err()
        );
    }
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "handshake")],
        2,
    )
    .await;
    assert!(app.peers().is_empty(), "{:?}", app.peers());

    // The real path still works.
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"fine").await.unwrap(), b"server: fine");
}

#[tokio::test]
async fn a_drain_finishes_live_connections_and_refuses_new_ones() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    let mut live = client.connect(app.address).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut live, b"part1 ")
        .await
        .unwrap();
    eventually("the connection reaches the app", || app.peers().len() == 1).await;

    let manager = mesh.manager.clone();
    let drained = tokio::spawn(async move { manager.drain().await });
    eventually("the listeners close", || {
        std::net::TcpStream::connect(client.addresses.outbound).is_err()
    })
    .await;
    assert!(mesh.manager.pods().is_empty());

    // The live connection carries on to its end.
    assert_eq!(
        exchange(&mut live, b"part2").await.unwrap(),
        b"server: part1 part2"
    );
    tokio::time::timeout(PATIENCE, drained)
        .await
        .unwrap()
        .unwrap();
    // No pod holds the identities any more.
    assert!(mesh.certificates.snapshot().is_empty());
}

#[tokio::test]
async fn the_drain_deadline_closes_what_is_left() {
    let mesh = TestMesh::with_config(|c| c.drain_deadline = Duration::from_millis(100)).await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    let mut live = client.connect(app.address).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut live, b"never finished")
        .await
        .unwrap();
    eventually("the connection reaches the app", || app.peers().len() == 1).await;

    tokio::time::timeout(PATIENCE, mesh.manager.drain())
        .await
        .expect("the drain ends at its deadline");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut live, &mut rest),
    )
    .await
    .expect("the connection was closed");
    assert!(rest.is_empty(), "{read:?} {rest:?}");
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "source")],
        1,
    )
    .await;
}

#[tokio::test]
async fn pods_come_and_go_as_the_node_agent_says() {
    let mesh = TestMesh::new().await;
    let web1 = mesh.proxy("web-1", "a", "web", mesh.ip(2)).await;
    let web2 = mesh.proxy("web-2", "a", "web", mesh.ip(3)).await;
    let web = mesh.identity("a", "web");
    eventually("the shared identity is issued", || {
        mesh.certificates
            .snapshot()
            .iter()
            .any(|s| s.identity == web && s.certificate.is_some())
    })
    .await;
    assert_eq!(
        mesh.signer.request_count(),
        1,
        "one certificate per identity"
    );

    // Added again with the same sockets: nothing changes.
    let again = mesh.proxy("web-1", "a", "web", mesh.ip(2)).await;
    assert_eq!(again.addresses, web1.addresses);
    assert!(mesh.manager.keep(&web1.info.uid).is_ok());
    assert!(mesh.manager.keep("uid-unknown").is_err());

    // The snapshot names only web-2: web-1 goes, the identity stays.
    let known = [web2.info.uid.clone()].into_iter().collect();
    for drain in mesh.manager.snapshot_done(&known).await {
        drain.finished().await;
    }
    assert_eq!(mesh.manager.pods(), vec![web2.info.uid.clone()]);
    assert!(
        mesh.certificates
            .snapshot()
            .iter()
            .any(|s| s.identity == web)
    );

    // The last pod with the identity goes: its certificate is forgotten.
    let drain = mesh
        .manager
        .del(&web2.info.uid)
        .await
        .expect("web-2 was here");
    drain.finished().await;
    assert!(mesh.manager.pods().is_empty());
    assert!(mesh.certificates.snapshot().is_empty());

    // A pod without a service account cannot be proxied.
    let err = mesh
        .manager
        .add(
            ztunnel_rs::proxy::PodInfo {
                uid: "uid-x".into(),
                name: "x".into(),
                namespace: "a".into(),
                service_account: String::new(),
            },
            Arc::new(LocalSockets::new(mesh.ip(4))),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("service account"), "{err}");
}

#[tokio::test]
async fn a_pod_gone_while_its_certificate_is_issued_leaves_nothing_renewing() {
    let mesh = TestMesh::new().await;
    mesh.signer.pause();
    let pod = mesh.proxy("web", "a", "web", mesh.ip(2)).await;
    eventually("the CSR is sent", || mesh.signer.request_count() == 1).await;
    let drain = mesh
        .manager
        .del(&pod.info.uid)
        .await
        .expect("the pod was here");
    tokio::time::timeout(PATIENCE, drain.finished())
        .await
        .expect("the drain does not wait for the CA");
    assert!(mesh.certificates.snapshot().is_empty());
    mesh.signer.resume();
}

/// Writes `message` without ending the stream, then waits for the end:
/// what a long-lived connection cut from the other side sees.
async fn hold_until_cut(conn: &mut tokio::net::TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(message).await?;
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut reply))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "never cut"))??;
    Ok(reply)
}

/// Sockets of a pod another proxy already listens in: the pod a new
/// ztunnel is handed during a rolling upgrade while the old one serves it.
struct ServedElsewhere(LocalSockets);

impl PodSockets for ServedElsewhere {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn listen(&self, port: u16) -> SocketFuture<'_, TcpListener> {
        self.0.listen(port)
    }
    fn listen_udp(&self, port: u16) -> SocketFuture<'_, Vec<tokio::net::UdpSocket>> {
        self.0.listen_udp(port)
    }
    fn connect(&self, addr: SocketAddr) -> SocketFuture<'_, tokio::net::TcpStream> {
        self.0.connect(addr)
    }
    fn udp_connect(&self, addr: SocketAddr) -> SocketFuture<'_, tokio::net::UdpSocket> {
        self.0.udp_connect(addr)
    }
    fn connect_as(
        &self,
        addr: SocketAddr,
        source: IpAddr,
    ) -> SocketFuture<'_, tokio::net::TcpStream> {
        self.0.connect_as(addr, source)
    }
    fn original_dst(&self, stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
        self.0.original_dst(stream)
    }
    fn listened(&self, _port: u16) -> SocketFuture<'_, bool> {
        Box::pin(async { Ok(true) })
    }
}

/// A new proxy handed a pod the old one still serves opens its listeners
/// there only once it has its first complete state and the pod's
/// certificate: listening earlier would take a share of the pod's new
/// connections from the old proxy only to hold them. A pod nobody serves
/// gets its listeners at once (waiting would refuse its connections), and
/// a takeover that cannot get ready goes ahead after `takeover_wait`.
#[tokio::test]
async fn a_pod_served_elsewhere_gets_listeners_once_the_proxy_is_ready() {
    let mesh = TestMesh::unsynced(|_| {}).await;
    let (fresh_ip, taken_ip) = (mesh.ip(2), mesh.ip(3));
    mesh.proxy("fresh", "a", "fresh", fresh_ip).await;
    tokio::net::TcpStream::connect(at(fresh_ip, mesh.hbone_port()))
        .await
        .expect("a pod nobody serves is listened for before the first state");

    let info = PodInfo {
        uid: "uid-b-taken".into(),
        name: "taken".into(),
        namespace: "b".into(),
        service_account: "taken".into(),
    };
    let add = tokio::spawn({
        let manager = mesh.manager.clone();
        let sockets = Arc::new(ServedElsewhere(LocalSockets::new(taken_ip)));
        async move { manager.add(info, sockets).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!add.is_finished(), "the takeover waits for the first state");
    assert!(
        tokio::net::TcpStream::connect(at(taken_ip, mesh.hbone_port()))
            .await
            .is_err(),
        "nothing listens for the taken-over pod yet"
    );
    mesh.store.mark_synced();
    add.await.unwrap().expect("the pod is taken over");
    let taken = mesh.identity("b", "taken");
    assert!(
        mesh.certificates
            .snapshot()
            .iter()
            .any(|s| s.identity == taken && s.certificate.is_some()),
        "the pod's certificate was there before its listeners"
    );
    tokio::net::TcpStream::connect(at(taken_ip, mesh.hbone_port()))
        .await
        .expect("listening once ready");

    // Never ready: the takeover goes ahead after the bound.
    let stuck = TestMesh::unsynced(|c| c.takeover_wait = Duration::from_millis(200)).await;
    let ip = stuck.ip(4);
    let info = PodInfo {
        uid: "uid-c-stuck".into(),
        name: "stuck".into(),
        namespace: "c".into(),
        service_account: "stuck".into(),
    };
    tokio::time::timeout(
        PATIENCE,
        stuck
            .manager
            .add(info, Arc::new(ServedElsewhere(LocalSockets::new(ip)))),
    )
    .await
    .expect("a takeover that cannot get ready is bounded")
    .expect("the pod is taken over");
    tokio::net::TcpStream::connect(at(ip, stuck.hbone_port()))
        .await
        .expect("listening after the bound");
}

/// The identities whose certificates the proxy holds (issued or not).
fn tracked(mesh: &TestMesh) -> BTreeSet<String> {
    mesh.certificates
        .snapshot()
        .iter()
        .map(|s| s.identity.to_string())
        .collect()
}

/// The certificate of an enrolled workload the store places on this node is
/// requested before its pod is handed over (and all of a node's at once when
/// a new ztunnel takes over); it is dropped once neither the store nor a pod
/// holds it. Workloads of other nodes and plain TCP ones get none.
#[tokio::test]
async fn certificates_of_this_nodes_workloads_are_fetched_before_their_pods_arrive() {
    let mesh = TestMesh::with_config(|c| c.node = Some("node-a".into())).await;
    let (early_ip, other_ip) = (mesh.ip(2), mesh.ip(3));
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("early", "a", &early_ip.to_string())
                .hbone()
                .node("node-a")
                .into(),
            xds::workload("other", "a", &other_ip.to_string())
                .hbone()
                .node("node-a")
                .into(),
            xds::workload("remote", "b", "127.99.0.4")
                .hbone()
                .node("node-b")
                .into(),
            xds::workload("plain", "c", "127.99.0.5")
                .node("node-a")
                .into(),
        ],
    );
    let early = mesh.identity("a", "early").to_string();
    let other = mesh.identity("a", "other").to_string();
    eventually(
        "both of this node's enrolled workloads' certificates",
        || {
            mesh.certificates
                .snapshot()
                .iter()
                .filter(|s| s.certificate.is_some())
                .count()
                == 2
        },
    )
    .await;
    assert_eq!(
        tracked(&mesh),
        BTreeSet::from([early.clone(), other.clone()])
    );
    assert_eq!(mesh.signer.request_count(), 2, "one request per identity");

    // The pod arrives: its certificate is already there.
    mesh.proxy("early", "a", "early", early_ip).await;
    assert_eq!(mesh.signer.request_count(), 2);

    // Its workload leaves the store first: the running pod keeps it.
    xds::remove(&mesh.store, &["Kubernetes//Pod/a/early"]);
    // A workload leaves with no pod here: its certificate goes.
    xds::remove(&mesh.store, &["Kubernetes//Pod/a/other"]);
    eventually("the certificate nobody holds to be dropped", || {
        !tracked(&mesh).contains(&other)
    })
    .await;
    assert!(
        tracked(&mesh).contains(&early),
        "the running pod keeps its own"
    );
    // Then the pod goes: nothing is left.
    drop(mesh.manager.del("uid-a-early").await);
    eventually("every certificate to be dropped", || {
        tracked(&mesh).is_empty()
    })
    .await;

    // A proxy that does not know its node prefetches nothing.
    let unnamed = TestMesh::new().await;
    xds::apply(
        &unnamed.store,
        vec![
            xds::workload("early", "a", &unnamed.ip(2).to_string())
                .hbone()
                .into(),
        ],
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(unnamed.signer.request_count(), 0);
}

/// Issue 9, item 1: before the first complete xDS state nothing is carried
/// (connections wait, unanswered, instead of leaving as plaintext to what
/// looks like an unknown address); once it arrives they go in mutual TLS.
#[tokio::test]
async fn nothing_leaves_a_pod_before_the_first_complete_state() {
    let mesh = TestMesh::unsynced(|_| {}).await;
    let (client_ip, server_ip) = (mesh.ip(2), mesh.ip(3));
    // The node agent hands the pods over before istiod has answered.
    let client = mesh.proxy("client", "a", "client", client_ip).await;
    mesh.proxy("server", "b", "server", server_ip).await;
    let app = EchoApp::start(at(server_ip, APP_PORT), "server").await;

    let mut conn = client.connect(app.address).await.unwrap();
    let early = tokio::spawn(async move { exchange(&mut conn, b"early").await });

    // istiod's first answer: both pods are enrolled.
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("client", "a", &client_ip.to_string())
                .hbone()
                .into(),
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .into(),
        ],
    );
    assert!(
        app.peers().is_empty(),
        "nothing reached the app before sync"
    );
    mesh.store.mark_synced();

    assert_eq!(early.await.unwrap().unwrap(), b"server: early");
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("connection_security_policy", "mutual_tls"),
        ],
        1,
    )
    .await;
    assert_eq!(
        mesh.counter(
            "istio_tcp_connections_opened_total",
            &[("connection_security_policy", "unknown")]
        ),
        0,
        "no connection was carried in plaintext"
    );
}

/// Issue 9, item 1: a pod whose own workload the (synced) store lacks waits
/// for it, briefly, and is refused if it does not come.
#[tokio::test]
async fn a_pod_unknown_to_the_store_is_refused_after_the_wait() {
    let mesh = TestMesh::with_config(|c| c.workload_wait = Duration::from_millis(200)).await;
    let unknown = mesh.proxy("ghost", "a", "ghost", mesh.ip(2)).await;
    let outside = EchoApp::start(at(mesh.ip(50), 9000), "outside").await;

    let mut conn = unknown.connect(outside.address).await.unwrap();
    assert_refused(exchange(&mut conn, b"hi").await);
    assert!(outside.peers().is_empty(), "nothing left the pod");
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "outbound"), ("reason", "unknown_workload")],
        1,
    )
    .await;

    // Arriving while a connection waits, the workload lets it through.
    let mesh = TestMesh::with_config(|c| c.workload_wait = PATIENCE).await;
    let late = mesh.proxy("late", "a", "late", mesh.ip(2)).await;
    let outside = EchoApp::start(at(mesh.ip(50), 9000), "outside").await;
    let mut conn = late.connect(outside.address).await.unwrap();
    let waiting = tokio::spawn(async move { exchange(&mut conn, b"hi").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("late", "a", &mesh.ip(2).to_string())
                .hbone()
                .into(),
        ],
    );
    assert_eq!(waiting.await.unwrap().unwrap(), b"outside: hi");
}

/// Issue 9, item 2 (ztunnel): a policy the destination lists but the proxy
/// does not hold denies, until it arrives.
#[tokio::test]
async fn a_listed_policy_that_has_not_arrived_denies() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server_ip = mesh.ip(3);
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .policy("b/allow-a")
                .into(),
        ],
    );
    mesh.proxy("server", "b", "server", server_ip).await;
    let app = EchoApp::start(at(server_ip, APP_PORT), "server").await;

    let mut conn = client.connect(app.address).await.unwrap();
    assert_refused(exchange(&mut conn, b"hello").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "missing_policy")],
        1,
    )
    .await;

    xds::apply_policies(
        &mesh.store,
        vec![api::security::Authorization {
            scope: api::security::Scope::WorkloadSelector as i32,
            ..xds::policy(
                "allow-a",
                "b",
                Action::Allow,
                Match {
                    namespaces: vec![xds::exact("a")],
                    ..Match::default()
                },
            )
        }],
    );
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"hello").await.unwrap(),
        b"server: hello"
    );
}

/// Issue 9, item 6: a DENY applied while a connection is open cuts it (HBONE
/// and plaintext alike); a connection the change does not concern stays.
#[tokio::test]
async fn a_policy_change_cuts_live_connections_it_denies() {
    let mesh = TestMesh::new().await;
    let denied = mesh.pod("client", "a", 2).await;
    let spared = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let legacy = mesh.ip(60);

    let mut cut = denied.connect(app.address).await.unwrap();
    let mut kept = spared.connect(app.address).await.unwrap();
    let mut plain = server.connect_plaintext(legacy, APP_PORT).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        for conn in [&mut cut, &mut kept, &mut plain] {
            conn.write_all(b"open").await.unwrap();
        }
    }
    eventually("the three connections reach the app", || {
        app.peers().len() == 3
    })
    .await;

    xds::apply_policies(
        &mesh.store,
        vec![
            xds::policy(
                "deny-a",
                "b",
                Action::Deny,
                Match {
                    namespaces: vec![xds::exact("a")],
                    ..Match::default()
                },
            ),
            xds::strict("b"),
        ],
    );
    assert_reset(hold_until_cut(&mut cut, b"more").await);
    assert_reset(hold_until_cut(&mut plain, b"more").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("reason", "policy_revoked")],
        2,
    )
    .await;
    assert_eq!(
        mesh.counter(
            "istio_ztunnel_connection_failures_total",
            &[("direction", "inbound"), ("reason", "policy_revoked")]
        ),
        1
    );
    assert_eq!(
        mesh.counter(
            "istio_ztunnel_connection_failures_total",
            &[
                ("direction", "inbound_plaintext"),
                ("reason", "policy_revoked")
            ]
        ),
        1
    );
    // The other namespace's connection is untouched and still works.
    assert_eq!(
        exchange(&mut kept, b" and done").await.unwrap(),
        b"server: open and done"
    );
}

/// Opens a connection from `pod` to `dst` through the mesh and leaves it
/// open; returns once the application has accepted it (`app` then counts
/// `accepted` connections).
async fn hold_open(
    pod: &TestPod,
    dst: SocketAddr,
    app: &EchoApp,
    accepted: usize,
) -> tokio::net::TcpStream {
    let conn = pod.connect(dst).await.unwrap();
    eventually("the application to accept the connection", || {
        app.peers().len() == accepted
    })
    .await;
    conn
}

/// Retries a hello from `pod` to `dst` until it is carried (a ceiling
/// frees its place once the connection holding it is fully closed).
async fn eventually_served(pod: &TestPod, dst: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut conn = pod.connect(dst).await.unwrap();
        if let Ok(reply) = exchange(&mut conn, b"again").await {
            assert_eq!(reply, b"server: again");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_peer_past_its_held_socket_ceiling_is_refused_and_others_are_served() {
    let mesh = TestMesh::with_config(|c| {
        c.held_sockets = HeldSocketLimits {
            per_peer: 2,
            per_node: 100,
        }
    })
    .await;
    let hostile = mesh.pod("client", "a", 2).await;
    let other = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    // HBONE: the peer (identity a/client at .2) holds two sockets to the app.
    let _held = [
        hold_open(&hostile, app.address, &app, 1).await,
        hold_open(&hostile, app.address, &app, 2).await,
    ];
    let mut third = hostile.connect(app.address).await.unwrap();
    assert_refused(exchange(&mut third, b"hello").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "peer_socket_limit")],
        1,
    )
    .await;
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("response_flags", "UO")],
        1,
    )
    .await;
    assert_eq!(
        app.peers().len(),
        2,
        "the refused one never reached the app"
    );
    // Another peer is served.
    let mut conn = other.connect(app.address).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"hello").await.unwrap(),
        b"server: hello"
    );

    // Plaintext: a client address is a peer of its own.
    let legacy = mesh.ip(60);
    let mut plaintext = Vec::new();
    for _ in 0..2 {
        plaintext.push(server.connect_plaintext(legacy, APP_PORT).await.unwrap());
    }
    eventually("the plaintext connections to reach the app", || {
        app.peers().len() == 5
    })
    .await;
    let mut third = server.connect_plaintext(legacy, APP_PORT).await.unwrap();
    assert_refused(exchange(&mut third, b"hello").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[
            ("direction", "inbound_plaintext"),
            ("reason", "peer_socket_limit"),
        ],
        1,
    )
    .await;

    // Closing a connection gives the peer its place back.
    drop(_held);
    eventually_served(&hostile, app.address).await;
}

#[tokio::test]
async fn past_the_node_s_held_socket_ceiling_new_connections_wait_for_a_place() {
    let mesh = TestMesh::with_config(|c| {
        c.held_sockets = HeldSocketLimits {
            per_peer: 100,
            per_node: 2,
        }
    })
    .await;
    let first = mesh.pod("client", "a", 2).await;
    let second = mesh.pod("client", "c", 4).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;

    let held = hold_open(&first, app.address, &app, 1).await;
    let _plaintext = server
        .connect_plaintext(mesh.ip(60), APP_PORT)
        .await
        .unwrap();
    eventually("the plaintext connection to reach the app", || {
        app.peers().len() == 2
    })
    .await;
    // The node is full: a peer far under its own ceiling is refused.
    let mut conn = second.connect(app.address).await.unwrap();
    assert_refused(exchange(&mut conn, b"hello").await);
    mesh.wait_for_counter(
        "istio_ztunnel_connection_failures_total",
        &[("direction", "inbound"), ("reason", "node_socket_limit")],
        1,
    )
    .await;
    // The pods' own outbound traffic is not held for peers: still carried.
    let outside = EchoApp::start(at(mesh.ip(70), APP_PORT), "server").await;
    let mut conn = second.connect(outside.address).await.unwrap();
    assert_eq!(exchange(&mut conn, b"out").await.unwrap(), b"server: out");

    drop(held);
    eventually_served(&second, app.address).await;
}

#[tokio::test]
async fn an_hbone_peer_that_stops_answering_pings_is_dropped() {
    let mesh = TestMesh::with_config(|c| {
        c.http2.keepalive = Keepalive {
            ping_interval: Duration::from_millis(200),
            ping_timeout: Duration::from_secs(2),
            ..Keepalive::default()
        }
    })
    .await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let cert = mesh
        .certificates
        .fetch(&mesh.identity("a", "client"))
        .await
        .unwrap();

    // This peer does the handshake with the pod's HBONE listener, then
    // reads nothing more.
    let connector = PodConnect(Arc::new(LocalSockets::new(mesh.ip(5))));
    let tcp = connector
        .connect(at(server.ip, mesh.hbone_port()))
        .await
        .unwrap();
    let _silent = RawHttp2::start(tcp, &cert, &mesh.identity("b", "server"))
        .await
        .unwrap();
    mesh.wait_for_counter(
        "istio_hbone_connections_dropped_total",
        &[("side", "server"), ("reason", "keepalive_timeout")],
        1,
    )
    .await;

    // Pods whose proxies answer PINGs keep being served.
    let mut conn = client.connect(app.address).await.unwrap();
    assert_eq!(
        exchange(&mut conn, b"hello").await.unwrap(),
        b"server: hello"
    );
}

#[tokio::test]
async fn live_connections_are_listed_with_identities_and_bytes_until_they_end() {
    use tokio::io::AsyncWriteExt;
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(at(server.ip, APP_PORT), "server").await;
    let legacy = mesh.ip(60);

    let mut meshed = client.connect(app.address).await.unwrap();
    let mut plain = server.connect_plaintext(legacy, APP_PORT).await.unwrap();
    for conn in [&mut meshed, &mut plain] {
        conn.write_all(b"open").await.unwrap();
    }
    eventually(
        "both connections listed with the bytes their clients sent",
        || {
            let states = mesh.manager.workload_state();
            let outbound = &states["uid-a-client"].connections.outbound;
            let inbound = &states["uid-b-server"].connections.inbound;
            outbound.len() == 1
                && outbound[0].bytes_sent == Some(4)
                && inbound.len() == 2
                && inbound.iter().all(|c| c.bytes_received == Some(4))
        },
    )
    .await;

    let states = mesh.manager.workload_state();
    let client_id = mesh.identity("a", "client").to_string();
    let server_id = mesh.identity("b", "server").to_string();
    let ip_of = |addr: &str| addr.parse::<SocketAddr>().unwrap().ip();

    let pod = &states["uid-a-client"];
    assert_eq!(
        (pod.state.as_str(), pod.info.name.as_str()),
        ("Up", "client")
    );
    assert!(pod.connections.inbound.is_empty());
    let out = &pod.connections.outbound[0];
    assert_eq!(out.protocol, "HBONE");
    assert_eq!(ip_of(&out.src), client.ip);
    assert_eq!(out.original_dst, Some(app.address.to_string()));
    assert_eq!(out.actual_dst, at(server.ip, mesh.hbone_port()).to_string());
    assert_eq!(out.src_identity.as_deref(), Some(client_id.as_str()));
    assert_eq!(out.dst_identity.as_deref(), Some(server_id.as_str()));
    assert_eq!(out.bytes_received, Some(0));
    assert!(
        out.start_time.is_some() && out.duration_ms.is_some(),
        "{out:?}"
    );

    let inbound = &states["uid-b-server"].connections.inbound;
    let hbone = inbound.iter().find(|c| c.protocol == "HBONE").unwrap();
    assert_eq!(ip_of(&hbone.src), client.ip);
    assert_eq!(hbone.actual_dst, app.address.to_string());
    assert_eq!(hbone.src_identity.as_deref(), Some(client_id.as_str()));
    assert_eq!(hbone.dst_identity.as_deref(), Some(server_id.as_str()));
    let tcp = inbound.iter().find(|c| c.protocol == "TCP").unwrap();
    assert_eq!(ip_of(&tcp.src), legacy);
    assert_eq!(tcp.actual_dst, app.address.to_string());
    assert_eq!((&tcp.src_identity, &tcp.dst_identity), (&None, &None));

    for conn in [&mut meshed, &mut plain] {
        assert_eq!(
            exchange(conn, b" and done").await.unwrap(),
            b"server: open and done"
        );
    }
    eventually("both connections gone from the list", || {
        let states = mesh.manager.workload_state();
        states.len() == 2
            && states.values().all(|s| {
                s.state == "Up"
                    && s.connections.inbound.is_empty()
                    && s.connections.outbound.is_empty()
            })
    })
    .await;
}

/// An outbound CONNECT says who the client is (`baggage`), where it
/// connected from and which Service it addressed (`forwarded`), and carries
/// a trace context (`traceparent`), as upstream ztunnel's CONNECTs do.
#[tokio::test]
async fn an_outbound_connect_carries_baggage_forwarded_and_traceparent() {
    let mesh = TestMesh::new().await;
    let client = mesh.pod("client", "a", 2).await;
    let server_ip = mesh.ip(3);
    let vip = mesh.ip(100);
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .in_service("b/server.b.svc.cluster.local", &[(80, APP_PORT)])
                .into(),
            xds::service("server", "b", &vip.to_string(), &[(80, APP_PORT)]).into(),
        ],
    );
    let cert = mesh
        .certificates
        .fetch(&mesh.identity("b", "server"))
        .await
        .unwrap();
    let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    hbone_server(at(server_ip, mesh.hbone_port()), cert, {
        let seen = seen.clone();
        move |connect| -> Boxed {
            seen.lock().unwrap().push(connect.headers().clone());
            Box::pin(async move { connect.refuse(http::StatusCode::UNAUTHORIZED) })
        }
    })
    .await;

    let mut conn = client.connect(at(vip, 80)).await.unwrap();
    let from = conn.local_addr().unwrap();
    // Refused by the server with 401: the client reads EOF, not a reset.
    assert_closed_quietly(&mut conn).await;
    let headers = seen
        .lock()
        .unwrap()
        .pop()
        .expect("the CONNECT reached the server");
    assert_eq!(
        headers["forwarded"],
        format!("for=\"{from}\";host=server.b.svc.cluster.local").as_str()
    );
    let baggage = headers["baggage"].to_str().unwrap();
    for member in [
        "k8s.cluster.name=Kubernetes",
        "k8s.namespace.name=a",
        "k8s.deployment.name=client",
        "service.name=client",
        "service.version=v1",
    ] {
        assert!(
            baggage.split(',').any(|m| m == member),
            "{member} in {baggage}"
        );
    }
    let trace = headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = trace.split('-').collect();
    assert_eq!(parts.len(), 4, "{trace}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len()),
        ("00", 32, 16),
        "{trace}"
    );

    // Each connection is its own trace.
    let mut again = client.connect(at(vip, 80)).await.unwrap();
    assert_closed_quietly(&mut again).await;
    let second = seen.lock().unwrap().pop().unwrap();
    assert_ne!(second["traceparent"], headers["traceparent"]);
}

/// A pod behind two Services on the same port: the `forwarded` host of the
/// CONNECT says which one the client addressed, and that is the
/// `destination_service` the server's ztunnel reports; a host the pod does
/// not back is ignored (the port decides, as without the header).
#[tokio::test]
async fn inbound_reports_the_service_the_client_forwarded() {
    let mesh = TestMesh::new().await;
    let server_ip = mesh.ip(3);
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("server", "b", &server_ip.to_string())
                .hbone()
                .in_service("b/first.b.svc.cluster.local", &[(80, APP_PORT)])
                .in_service("b/second.b.svc.cluster.local", &[(80, APP_PORT)])
                .into(),
            xds::service("first", "b", &mesh.ip(100).to_string(), &[(80, APP_PORT)]).into(),
            xds::service("second", "b", &mesh.ip(101).to_string(), &[(80, APP_PORT)]).into(),
        ],
    );
    mesh.proxy("server", "b", "server", server_ip).await;
    let app = EchoApp::start(at(server_ip, APP_PORT), "server").await;
    let client_id = mesh.identity("a", "client");
    let cert = mesh.certificates.fetch(&client_id).await.unwrap();
    let target = HboneTarget {
        identity: mesh.identity("b", "server"),
        address: at(server_ip, mesh.hbone_port()),
        authority: app.address,
    };
    let pool = HbonePool::new(
        PoolConfig::default(),
        Arc::new(PodConnect(Arc::new(LocalSockets::new(mesh.ip(2))))),
    );
    let send = |host: &'static str| {
        let (pool, cert, target) = (pool.clone(), cert.clone(), target.clone());
        async move {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::FORWARDED,
                http::HeaderValue::from_str(&format!("for=\"10.0.0.2:1\";host={host}")).unwrap(),
            );
            headers.insert(
                "traceparent",
                http::HeaderValue::from_static(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            );
            let mut tunnel = pool
                .connect_with_headers(&cert, &target, &headers)
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut tunnel, b"hi")
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut tunnel)
                .await
                .unwrap();
            let mut reply = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut tunnel, &mut reply)
                .await
                .unwrap();
            assert_eq!(reply, b"server: hi");
        }
    };
    send("second.b.svc.cluster.local").await;
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("destination_service", "second.b.svc.cluster.local"),
        ],
        1,
    )
    .await;
    send("elsewhere.example.com").await;
    mesh.wait_for_counter(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("destination_service", "first.b.svc.cluster.local"),
        ],
        1,
    )
    .await;
}
