//! The waypoint's data path on loopback with real sockets: a client
//! tunnelling over HBONE as a source ztunnel does, the waypoint's real
//! HBONE server, inbound checks, HTTP server, upstream pool and retries,
//! and stand-in destination ztunnels (real `HboneServer`s) with apps.

use crate::support::harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use harness::{App, Mesh, PATIENCE, empty, full, read_n, service, text_response, workload};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

async fn text(response: http::Response<hyper::body::Incoming>) -> String {
    let bytes = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn get(path: &str, host: &str) -> Request<waypoint_rs::upstream::Body> {
    Request::builder()
        .uri(path)
        .header(http::header::HOST, host)
        .body(empty())
        .unwrap()
}

#[tokio::test]
async fn a_connect_to_a_bound_service_is_forwarded_to_an_endpoint_as_the_waypoint() {
    let mesh = Mesh::start(|_| {}).await;
    let endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-0"))
        .await;
    let vip = SocketAddr::new(mesh.ip(100), 80);

    let mut client = mesh.http1(vip).await;
    let response = client.send_request(get("/hello", "echo")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "echo-0: GET /hello HTTP/1.1");

    // The endpoint's ztunnel saw the waypoint's own identity and the
    // endpoint's address with the target port.
    let accepted = endpoints[0].accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].peer, mesh.waypoint_identity);
    assert_eq!(accepted[0].authority, SocketAddr::new(mesh.ip(10), 8080));

    // Metrics: reporter waypoint, the client's principal and workload.
    let labels = [
        ("reporter", "waypoint"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/client-ns/sa/client",
        ),
        ("source_workload", "client"),
        ("source_workload_namespace", "client-ns"),
        ("destination_workload", "echo-0"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/echo-0",
        ),
        ("destination_service", "echo.default.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
    ];
    mesh.wait_for_sample("istio_requests_total", &labels, 1.0)
        .await;
    assert_eq!(
        mesh.sample("istio_request_duration_milliseconds_count", &labels),
        1.0
    );
    assert_eq!(mesh.sample("istio_response_bytes_sum", &labels), 27.0);
}

/// `x-forwarded-client-cert` never carries what the client wrote itself
/// (it could claim any identity). By default the waypoint sends none; once
/// its Gateway opts in (`forward_client_identity`), the destination learns
/// who called through the waypoint from one element set by the waypoint
/// (`By=` its own identity, `Hash=` the SHA-256 of the client's leaf, `URI=`
/// the client's SPIFFE id).
#[tokio::test]
async fn forwarded_requests_carry_the_clients_certificate_only_when_opted_in() {
    use sha2::Digest;
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service(
            "whoami",
            100,
            &[(80, 8080)],
            &[10],
            App::http(|request| async move {
                let values: Vec<String> = request
                    .headers()
                    .get_all("x-forwarded-client-cert")
                    .iter()
                    .map(|v| v.to_str().unwrap_or("<not text>").to_string())
                    .collect();
                harness::text_response(200, values.join("\n"))
            }),
        )
        .await;
    let vip = SocketAddr::new(mesh.ip(100), 80);
    let hash: String = sha2::Sha256::digest(mesh.client_certificate().leaf())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let want = format!(
        "By=spiffe://cluster.local/ns/waypoint-ns/sa/waypoint;Hash={hash};Subject=\"\";\
         URI=spiffe://cluster.local/ns/client-ns/sa/client"
    );
    // A value the client wrote itself, claiming another identity.
    let forged = || {
        let mut request = get("/", "whoami");
        request.headers_mut().insert(
            "x-forwarded-client-cert",
            http::HeaderValue::from_static(
                "By=spiffe://x;URI=spiffe://cluster.local/ns/admin/sa/admin",
            ),
        );
        request
    };

    // Not opted in: the destination sees none, even when the client sent one.
    let mut client = mesh.http1(vip).await;
    let response = client.send_request(get("/", "whoami")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "");
    let response = client.send_request(forged()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "");

    // Opted in: a new connection gets exactly the waypoint's element.
    mesh.forward_client_identity(true);
    let mut client = mesh.http1(vip).await;
    let response = client.send_request(get("/", "whoami")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, want);
    let response = client.send_request(forged()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, want);
}

#[tokio::test]
async fn nothing_is_served_before_istiod_serves_the_l7_configuration() {
    let mesh = Mesh::start(|_| {}).await;
    // Bound here in the workload API, with a ready endpoint, but istiod
    // has served no `Waypoint` resource: its L7 rules are unknown.
    let _endpoint = mesh.endpoint("early-0", 10, App::echo("early-0")).await;
    mesh.apply(vec![
        service("early", "default", mesh.ip(100), &[(80, 8080)])
            .waypoint(mesh.ip(1))
            .into(),
        workload("early-0", "default", mesh.ip(10))
            .in_service("default/early.default.svc.cluster.local", &[(80, 8080)])
            .into(),
    ]);
    let authority = SocketAddr::new(mesh.ip(100), 80);
    let refused = mesh
        .connect(authority)
        .await
        .expect_err("no L7 configuration yet");
    assert_eq!(
        refused.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{refused}"
    );
    // Once it is served, the same CONNECT goes through.
    mesh.list(api::l7::ServedService {
        namespace: "default".into(),
        hostname: "early.default.svc.cluster.local".into(),
        ..Default::default()
    });
    let mut client = mesh.http1(authority).await;
    let response = client.send_request(get("/", "early")).await.unwrap();
    assert_eq!(text(response).await, "early-0: GET / HTTP/1.1");
}

#[tokio::test]
async fn connects_to_addresses_not_bound_here_are_refused() {
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service("mine", 100, &[(80, 8080)], &[10], App::echo("mine-0"))
        .await;
    // A service bound to another waypoint, a workload bound to none.
    mesh.apply(vec![
        service("theirs", "default", mesh.ip(101), &[(80, 8080)])
            .waypoint(mesh.ip(200))
            .into(),
        workload("loner", "default", mesh.ip(20)).into(),
    ]);
    for (authority, why) in [
        (
            SocketAddr::new(mesh.ip(101), 80),
            "service of another waypoint",
        ),
        (
            SocketAddr::new(mesh.ip(20), 8080),
            "workload without waypoint",
        ),
        (SocketAddr::new(mesh.ip(100), 81), "undeclared service port"),
        (SocketAddr::new(mesh.ip(250), 80), "unknown address"),
    ] {
        let refused = mesh.connect(authority).await.expect_err(why);
        assert_eq!(
            refused.status(),
            Some(StatusCode::BAD_REQUEST),
            "{why}: {refused}"
        );
    }
    // A workload bound to this waypoint is served on any port.
    let bound = workload("pinned", "default", mesh.ip(21)).waypoint(mesh.ip(1));
    let uid = bound.uid();
    mesh.list_workload(bound.served());
    mesh.apply(vec![bound.into()]);
    let pinned = mesh.endpoint("pinned", 21, App::echo("pinned")).await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(21), 9000)).await;
    let response = client.send_request(get("/", "pinned")).await.unwrap();
    assert_eq!(text(response).await, "pinned: GET / HTTP/1.1");
    assert_eq!(
        pinned.accepted()[0].authority,
        SocketAddr::new(mesh.ip(21), 9000)
    );
    assert!(uid.contains("pinned"));
}

#[tokio::test]
async fn a_client_without_a_mesh_certificate_is_refused() {
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-0"))
        .await;
    // Signed by another CA, though it trusts the mesh root.
    let stranger_ca = proxy_core::testing::TestCa::new(harness::TRUST_DOMAIN);
    let stranger = stranger_ca.certificate_trusting(
        &stranger_ca.identity("client-ns", "client"),
        mesh.ca.roots(),
    );
    let refused = mesh
        .connect_as(&stranger, SocketAddr::new(mesh.ip(100), 80))
        .await
        .expect_err("a certificate the mesh did not issue");
    assert_eq!(refused.status(), None, "refused in TLS: {refused}");
}

#[tokio::test]
async fn h2c_is_detected_and_multiplexed_to_the_endpoint() {
    let mesh = Mesh::start(|_| {}).await;
    let endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-0"))
        .await;
    let mut client = mesh.http2(SocketAddr::new(mesh.ip(100), 80)).await;
    let request = |path: &str| {
        Request::builder()
            .uri(format!("http://echo.default:80{path}"))
            .body(empty())
            .unwrap()
    };
    let (a, b) = tokio::join!(
        client.send_request(request("/a")),
        client.clone().send_request(request("/b"))
    );
    assert_eq!(text(a.unwrap()).await, "echo-0: GET /a HTTP/2.0");
    assert_eq!(text(b.unwrap()).await, "echo-0: GET /b HTTP/2.0");
    // One HBONE tunnel carried both: one HTTP/2 connection to the endpoint.
    assert_eq!(endpoints[0].accepted().len(), 1);
}

#[tokio::test]
async fn http1_connections_to_an_endpoint_are_reused() {
    let mesh = Mesh::start(|_| {}).await;
    let endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-0"))
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    for path in ["/1", "/2", "/3"] {
        let response = client.send_request(get(path, "echo")).await.unwrap();
        assert_eq!(text(response).await, format!("echo-0: GET {path} HTTP/1.1"));
    }
    assert_eq!(endpoints[0].accepted().len(), 1);
}

#[tokio::test]
async fn a_server_first_protocol_is_carried_as_tcp_without_hanging() {
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service(
            "db",
            100,
            &[(3306, 3306)],
            &[10],
            App::Greeting(b"greeting from the server\n"),
        )
        .await;
    // The client says nothing first: detection gives up and splices.
    let mut tunnel = mesh
        .connect(SocketAddr::new(mesh.ip(100), 3306))
        .await
        .unwrap();
    let greeting = read_n(&mut tunnel, 25).await.expect("the greeting arrives");
    assert_eq!(greeting, b"greeting from the server\n");
    tunnel.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut tunnel, 4).await.unwrap(), b"ping");
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, tunnel.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let labels = [
        ("reporter", "waypoint"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/client-ns/sa/client",
        ),
        ("destination_workload", "db-0"),
        ("request_protocol", "tcp"),
    ];
    mesh.wait_for_sample("istio_tcp_connections_closed_total", &labels, 1.0)
        .await;
    assert_eq!(mesh.sample("istio_tcp_sent_bytes_total", &labels), 29.0);
    assert_eq!(mesh.sample("istio_tcp_received_bytes_total", &labels), 4.0);
    assert_eq!(mesh.sample("istio_requests_total", &[]), 0.0);
}

#[tokio::test]
async fn a_websocket_upgrade_is_spliced_end_to_end() {
    let mesh = Mesh::start(|_| {}).await;
    let app = App::http(|mut request| async move {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        http::Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "websocket")
            .body(empty())
            .unwrap()
    });
    let _endpoints = mesh.service("ws", 100, &[(80, 8080)], &[10], app).await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let request = Request::builder()
        .uri("/chat")
        .header(http::header::HOST, "ws")
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .body(empty())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = tokio::time::timeout(PATIENCE, hyper::upgrade::on(response))
        .await
        .unwrap()
        .expect("upgraded");
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"frame one").await.unwrap();
    assert_eq!(read_n(&mut io, 9).await.unwrap(), b"frame one");
}

/// A gRPC server-streaming answer: three messages, then `grpc-status`
/// in the trailers; or, for `/trailers-only`, the status in the headers.
fn grpc_app() -> App {
    App::http(|request| async move {
        assert_eq!(request.version(), Version::HTTP_2);
        if request.uri().path() == "/pkg.Svc/TrailersOnly" {
            return http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "7")
                .body(empty())
                .unwrap();
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, waypoint_rs::upstream::BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a"))),
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01b"))),
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01c"))),
            Ok(Frame::trailers(trailers)),
        ];
        http::Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
            .unwrap()
    })
}

#[tokio::test]
async fn grpc_streams_carry_trailers_and_label_grpc_status() {
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service("grpc", 100, &[(9090, 9090)], &[10], grpc_app())
        .await;
    let mut client = mesh.http2(SocketAddr::new(mesh.ip(100), 9090)).await;
    let call = |path: &str| {
        Request::builder()
            .method("POST")
            .uri(format!("http://grpc.default:9090{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full("\0\0\0\0\0"))
            .unwrap()
    };
    let response = client.send_request(call("/pkg.Svc/List")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(collected.to_bytes().len(), 18);

    let response = client
        .send_request(call("/pkg.Svc/TrailersOnly"))
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "7");
    let _ = response.into_body().collect().await;

    let grpc = [("request_protocol", "grpc"), ("reporter", "waypoint")];
    let with = |status: &'static str| {
        let mut labels = grpc.to_vec();
        labels.push(("grpc_response_status", status));
        labels
    };
    mesh.wait_for_sample("istio_requests_total", &with("5"), 1.0)
        .await;
    mesh.wait_for_sample("istio_requests_total", &with("7"), 1.0)
        .await;
}

/// Answers 503 to the first `failures` requests, then 200.
fn flaky(failures: usize, seen: Arc<AtomicUsize>) -> App {
    App::http(move |_| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < failures {
                text_response(503, "not now")
            } else {
                text_response(200, "ok")
            }
        }
    })
}

#[tokio::test]
async fn a_flaky_endpoint_is_retried_and_exhausted_retries_say_urx() {
    let mesh = Mesh::start(|c| c.upstream.retry.attempts = 2).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let _endpoints = mesh
        .service("flaky", 100, &[(80, 8080)], &[10], flaky(1, seen.clone()))
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let response = client.send_request(get("/", "flaky")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "ok");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    let ok = [("response_code", "200"), ("response_flags", "-")];
    mesh.wait_for_sample("istio_requests_total", &ok, 1.0).await;
    assert_eq!(mesh.sample("istio_requests_total", &[]), 1.0);

    // Always failing: the last answer, flagged URX, after 1 + 2 tries.
    let broken = Arc::new(AtomicUsize::new(0));
    let _endpoints = mesh
        .service(
            "broken",
            101,
            &[(80, 8080)],
            &[11],
            flaky(usize::MAX, broken.clone()),
        )
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(101), 80)).await;
    let response = client.send_request(get("/", "broken")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let _ = text(response).await;
    assert_eq!(broken.load(Ordering::SeqCst), 3);
    let urx = [("response_code", "503"), ("response_flags", "URX")];
    mesh.wait_for_sample("istio_requests_total", &urx, 1.0)
        .await;
}

/// Holds every request until released.
fn held(release: Arc<Notify>, arrived: Arc<Notify>) -> App {
    App::http(move |_| {
        let release = release.clone();
        let arrived = arrived.clone();
        async move {
            arrived.notify_one();
            release.notified().await;
            text_response(200, "finally")
        }
    })
}

/// A service `name` at .100 whose endpoint holds every request until
/// `release`; one request from a client is already in flight there.
async fn one_request_held(
    mesh: &Mesh,
    name: &'static str,
) -> (
    Vec<harness::Endpoint>,
    Arc<Notify>,
    tokio::task::JoinHandle<hyper::Result<http::Response<hyper::body::Incoming>>>,
) {
    let (release, arrived) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let endpoints = mesh
        .service(
            name,
            100,
            &[(80, 8080)],
            &[10],
            held(release.clone(), arrived.clone()),
        )
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let in_flight = tokio::spawn(async move { client.send_request(get("/", name)).await });
    arrived.notified().await;
    (endpoints, release, in_flight)
}

#[tokio::test]
async fn a_request_past_its_timeout_gets_504() {
    let mesh = Mesh::start(|c| c.upstream.request_timeout = Some(Duration::from_millis(100))).await;
    let never = Arc::new(Notify::new());
    let _endpoints = mesh
        .service(
            "slow",
            100,
            &[(80, 8080)],
            &[10],
            held(never, Arc::new(Notify::new())),
        )
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let response = client.send_request(get("/", "slow")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(text(response).await, "upstream request timeout");
    mesh.wait_for_sample(
        "istio_requests_total",
        &[("response_code", "504"), ("response_flags", "UT")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn the_circuit_breaker_refuses_past_the_limit_at_once() {
    let mesh = Mesh::start(|c| c.upstream.max_requests_per_destination = 1).await;
    let (_endpoints, release, in_flight) = one_request_held(&mesh, "busy").await;
    let mut second = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let refused = second.send_request(get("/", "busy")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(text(refused).await.contains("overflow"));
    release.notify_one();
    let done = in_flight.await.unwrap().unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    mesh.wait_for_sample("istio_requests_total", &[("response_flags", "UO")], 1.0)
        .await;
}

#[tokio::test]
async fn a_service_without_ready_endpoints_gets_503_uh() {
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service("empty", 100, &[(80, 8080)], &[], App::echo("none"))
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let response = client.send_request(get("/", "empty")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text(response).await, "no healthy upstream");
    mesh.wait_for_sample("istio_requests_total", &[("response_flags", "UH")], 1.0)
        .await;
}

#[tokio::test]
async fn drain_finishes_requests_in_flight_and_refuses_new_tunnels() {
    let mesh = Mesh::start(|_| {}).await;
    let (_endpoints, release, in_flight) = one_request_held(&mesh, "held").await;
    let vip = SocketAddr::new(mesh.ip(100), 80);

    let data_path = Arc::new(mesh.data_path);
    let draining = tokio::spawn({
        let data_path = data_path.clone();
        async move { data_path.drain(PATIENCE).await }
    });
    // A new tunnel is refused while the old one finishes.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !data_path.drain.is_draining() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    let target = proxy_core::hbone::HboneTarget {
        identity: mesh.waypoint_identity.clone(),
        address: data_path.hbone,
        authority: vip,
    };
    let pool = proxy_core::hbone::HbonePool::new(
        Default::default(),
        Arc::new(proxy_core::hbone::DirectConnect),
    );
    let late = pool
        .connect(&mesh.ca.certificate(&mesh.client_identity), &target)
        .await;
    assert!(late.is_err(), "a CONNECT during drain is refused");

    release.notify_one();
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "finally");
    assert!(
        tokio::time::timeout(PATIENCE, draining)
            .await
            .unwrap()
            .unwrap(),
        "every tunnel ended before the deadline"
    );
}

#[tokio::test]
async fn a_try_past_the_per_try_timeout_is_retried() {
    let mesh = Mesh::start(|c| {
        c.upstream.per_try_timeout = Some(Duration::from_millis(100));
        c.upstream.retry.attempts = 1;
    })
    .await;
    let seen = Arc::new(AtomicUsize::new(0));
    let never = Arc::new(Notify::new());
    let app = App::http({
        let seen = seen.clone();
        move |_| {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            let never = never.clone();
            async move {
                if first {
                    never.notified().await;
                }
                text_response(200, "second try")
            }
        }
    });
    let _endpoints = mesh.service("slow", 100, &[(80, 8080)], &[10], app).await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let response = client.send_request(get("/", "slow")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "second try");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_http1_connect_passes_through_to_the_endpoint() {
    let mesh = Mesh::start(|_| {}).await;
    let app = App::http(|mut request| async move {
        assert_eq!(request.method(), http::Method::CONNECT);
        assert_eq!(request.uri().to_string(), "tunnel.example:443");
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let _ = io.write_all(b"inside").await;
            // Until the client is done: dropping an open tunnel resets it.
            let mut rest = Vec::new();
            let _ = io.read_to_end(&mut rest).await;
        });
        http::Response::new(empty())
    });
    let _endpoints = mesh
        .service("proxy", 100, &[(3128, 3128)], &[10], app)
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 3128)).await;
    let request = Request::builder()
        .method(http::Method::CONNECT)
        .uri("tunnel.example:443")
        .header(http::header::HOST, "tunnel.example:443")
        .body(empty())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let upgraded = tokio::time::timeout(PATIENCE, hyper::upgrade::on(response))
        .await
        .unwrap()
        .expect("tunnel open");
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    assert_eq!(read_n(&mut io, 6).await.unwrap(), b"inside");
}

#[tokio::test]
async fn connections_to_endpoints_unused_past_the_idle_timeout_are_dropped() {
    let idle = Duration::from_millis(20);
    let mesh = Mesh::start(|c| c.upstream.idle_timeout = idle).await;
    let endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-0"))
        .await;
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    for round in 1..=2 {
        let response = client.send_request(get("/", "echo")).await.unwrap();
        assert_eq!(text(response).await, "echo-0: GET / HTTP/1.1");
        assert_eq!(endpoints[0].accepted().len(), round);
        // Longer than the idle timeout: the next request needs a new one.
        tokio::time::sleep(idle * 5).await;
    }
}
