//! The L7 configuration applied by the data path, in order, on loopback:
//! the served lookup from the `Waypoint` resource, authorization (403),
//! routing (header route, 404 `NR`, direct response), response header
//! changes, and the fallback refused once L7 configuration is served.

use crate::support::harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use api::l7;
use api::security::{StringMatch, string_match};
use harness::{App, Mesh, PATIENCE, empty, service};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use waypoint_rs::config::{
    AuthenticationHandler, AuthorizationHandler, RouteTableHandler, TrafficPolicyHandler,
};

const ECHO: &str = "default/echo.default.svc.cluster.local";
const ECHO_V2: &str = "default/echo-v2.default.svc.cluster.local";

fn exact(value: &str) -> StringMatch {
    StringMatch {
        match_type: Some(string_match::MatchType::Exact(value.to_string())),
    }
}

fn forward_to(service: &str) -> Option<l7::route::Action> {
    Some(l7::route::Action::Forward(l7::Forward {
        backends: vec![l7::Backend {
            service: service.to_string(),
            port: 80,
            weight: 1,
            ..Default::default()
        }],
    }))
}

/// `echo` (v1 at .10) and `echo-v2` (at .11); echo's routes: `x-version:
/// v2` to echo-v2 (marked by a response header), `/api` to echo,
/// `/teapot` answered directly; DELETE denied.
async fn routed_mesh() -> (Mesh, Vec<harness::Endpoint>) {
    let mesh = Mesh::start(|_| {}).await;
    let mut endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-v1"))
        .await;
    endpoints.extend(
        mesh.service("echo-v2", 101, &[(80, 8080)], &[11], App::echo("echo-v2"))
            .await,
    );
    mesh.apply_l7(
        AuthorizationHandler::new,
        "default/deny-delete",
        l7::HttpAuthorization {
            namespace: "default".into(),
            name: "deny-delete".into(),
            action: l7::Action::Deny as i32,
            rules: vec![l7::Rule {
                to: vec![l7::RequestOperation {
                    methods: vec![exact("DELETE")],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let header_route = l7::Route {
        matches: vec![l7::RouteMatch {
            headers: vec![l7::HeaderMatch {
                name: "x-version".into(),
                kind: Some(l7::header_match::Kind::Exact("v2".into())),
            }],
            ..Default::default()
        }],
        action: forward_to(ECHO_V2),
        response_headers: Some(l7::HeaderModifier {
            set: vec![l7::Header {
                name: "x-routed".into(),
                value: "v2".into(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let api_route = l7::Route {
        matches: vec![l7::RouteMatch {
            path: Some(l7::PathMatch {
                kind: Some(l7::path_match::Kind::SegmentPrefix("/api".into())),
                ..Default::default()
            }),
            ..Default::default()
        }],
        action: forward_to(ECHO),
        ..Default::default()
    };
    let teapot = l7::Route {
        matches: vec![l7::RouteMatch {
            path: Some(l7::PathMatch {
                kind: Some(l7::path_match::Kind::Exact("/teapot".into())),
                ..Default::default()
            }),
            ..Default::default()
        }],
        action: Some(l7::route::Action::DirectResponse(l7::DirectResponse {
            status: 418,
            body: b"short".to_vec(),
        })),
        ..Default::default()
    };
    mesh.apply_l7(
        RouteTableHandler::new,
        ECHO,
        l7::RouteTable {
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            routes: vec![header_route, api_route, teapot],
        },
    );
    mesh.list(l7::ServedService {
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        ports: vec![l7::ServedPort {
            port: 80,
            protocol: l7::Protocol::Http as i32,
        }],
        route_table: ECHO.into(),
        authorizations: vec!["default/deny-delete".into()],
        ..Default::default()
    });
    (mesh, endpoints)
}

async fn call(
    mesh: &Mesh,
    method: &str,
    path: &str,
    version: Option<&str>,
) -> (StatusCode, http::HeaderMap, String) {
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "echo.default");
    if let Some(v) = version {
        request = request.header("x-version", v);
    }
    let response = client
        .send_request(request.body(empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn requests_are_authorized_then_routed_by_the_l7_configuration() {
    let (mesh, _endpoints) = routed_mesh().await;

    let (status, _, body) = call(&mesh, "GET", "/api/items", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "echo-v1: GET /api/items HTTP/1.1")
    );

    let (status, headers, body) = call(&mesh, "GET", "/api/items", Some("v2")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "echo-v2: GET /api/items HTTP/1.1")
    );
    assert_eq!(headers["x-routed"], "v2");

    // Authorization comes before routing: denied even where no route matches.
    for path in ["/api/items", "/nowhere"] {
        let (status, _, body) = call(&mesh, "DELETE", path, None).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, "RBAC: access denied")
        );
    }

    let (status, _, _) = call(&mesh, "GET", "/nowhere", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = call(&mesh, "GET", "/teapot", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::IM_A_TEAPOT, "short"));

    mesh.wait_for_sample(
        "istio_requests_total",
        &[("response_code", "404"), ("response_flags", "NR")],
        1.0,
    )
    .await;
    mesh.wait_for_sample(
        "istio_requests_total",
        &[
            ("response_code", "403"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/client-ns/sa/client",
            ),
            ("destination_service", "echo.default.svc.cluster.local"),
        ],
        2.0,
    )
    .await;
    mesh.wait_for_sample(
        "istio_requests_total",
        &[
            ("response_code", "200"),
            ("destination_service", "echo-v2.default.svc.cluster.local"),
            ("destination_workload", "echo-v2-0"),
        ],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn only_what_the_waypoint_resource_lists_is_accepted() {
    let (mesh, _endpoints) = routed_mesh().await;
    // Bound to this waypoint in the workload API, but no longer listed by
    // the Waypoint resource (e.g. its rules are not handed over yet): refused.
    mesh.unlist("echo-v2.default.svc.cluster.local");
    let refused = mesh
        .connect(SocketAddr::new(mesh.ip(101), 80))
        .await
        .expect_err("not listed");
    assert_eq!(refused.status(), Some(StatusCode::BAD_REQUEST));
    // So is a service bound in the workload API after the fact.
    mesh.apply(vec![
        service("other", "default", mesh.ip(102), &[(80, 8080)])
            .waypoint(mesh.ip(1))
            .into(),
    ]);
    assert!(
        mesh.connect(SocketAddr::new(mesh.ip(102), 80))
            .await
            .is_err()
    );
    // What is still listed is served.
    assert!(
        mesh.connect(SocketAddr::new(mesh.ip(100), 80))
            .await
            .is_ok()
    );
}

/// `svc` at VIP .100 bound and listed, its endpoints serving `apps`, with
/// one route (matching everything) built by `route` and `traffic` as its
/// DestinationRule.
async fn one_route(
    apps: Vec<App>,
    route: l7::Route,
    traffic: Option<l7::Policy>,
) -> (Mesh, Vec<harness::Endpoint>) {
    let mesh = Mesh::start(|_| {}).await;
    let key = "default/svc.default.svc.cluster.local";
    let hosts: Vec<u8> = (0..apps.len() as u8).map(|i| 10 + i).collect();
    mesh.apply(vec![
        service("svc", "default", mesh.ip(100), &[(80, 8080)])
            .waypoint(mesh.ip(1))
            .into(),
    ]);
    let mut endpoints = Vec::new();
    let mut workloads = Vec::new();
    for (i, app) in apps.into_iter().enumerate() {
        let pod = format!("svc-{i}");
        workloads.push(
            harness::workload(&pod, "default", mesh.ip(hosts[i]))
                .in_service(key, &[(80, 8080)])
                .into(),
        );
        endpoints.push(mesh.endpoint(&pod, hosts[i], app).await);
    }
    mesh.apply(workloads);
    if let Some(policy) = traffic {
        mesh.apply_l7(
            TrafficPolicyHandler::new,
            key,
            l7::TrafficPolicy {
                namespace: "default".into(),
                hostname: "svc.default.svc.cluster.local".into(),
                default_policy: Some(policy),
                ..Default::default()
            },
        );
    }
    mesh.apply_l7(
        RouteTableHandler::new,
        key,
        l7::RouteTable {
            namespace: "default".into(),
            hostname: "svc.default.svc.cluster.local".into(),
            routes: vec![route],
        },
    );
    mesh.list(l7::ServedService {
        namespace: "default".into(),
        hostname: "svc.default.svc.cluster.local".into(),
        route_table: key.into(),
        ..Default::default()
    });
    (mesh, endpoints)
}

fn to_svc() -> l7::Route {
    l7::Route {
        action: forward_to("default/svc.default.svc.cluster.local"),
        ..Default::default()
    }
}

async fn get(mesh: &Mesh) -> (StatusCode, String) {
    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let request = Request::builder()
        .uri("/")
        .header(http::header::HOST, "svc.default")
        .body(empty())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn status_app(status: u16) -> App {
    App::http(move |_| async move { harness::text_response(status, "from the app") })
}

#[tokio::test]
async fn a_fault_abort_answers_in_place_of_the_backend() {
    let route = l7::Route {
        fault: Some(l7::Fault {
            abort: Some(l7::fault::Abort {
                status: Some(l7::fault::abort::Status::HttpStatus(418)),
                per_million: 1_000_000,
            }),
            ..Default::default()
        }),
        ..to_svc()
    };
    let (mesh, endpoints) = one_route(vec![status_app(200)], route, None).await;
    let (status, _) = get(&mesh).await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert!(endpoints[0].accepted().is_empty(), "never forwarded");
    mesh.wait_for_sample(
        "istio_requests_total",
        &[("response_code", "418"), ("response_flags", "FI")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_route_retry_policy_and_timeout_apply() {
    let seen = Arc::new(AtomicUsize::new(0));
    let flaky = App::http({
        let seen = seen.clone();
        move |_| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    harness::text_response(500, "first fails")
                } else {
                    harness::text_response(200, "then works")
                }
            }
        }
    });
    let route = l7::Route {
        retry: Some(l7::RetryPolicy {
            attempts: 1,
            codes: vec![500],
            ..Default::default()
        }),
        ..to_svc()
    };
    let (mesh, _endpoints) = one_route(vec![flaky], route, None).await;
    assert_eq!(get(&mesh).await, (StatusCode::OK, "then works".to_string()));
    assert_eq!(seen.load(Ordering::SeqCst), 2);

    let never = Arc::new(tokio::sync::Notify::new());
    let slow = App::http(move |_| {
        let never = never.clone();
        async move {
            never.notified().await;
            harness::text_response(200, "too late")
        }
    });
    let route = l7::Route {
        timeouts: Some(l7::Timeouts {
            request: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        }),
        ..to_svc()
    };
    let (mesh, _endpoints) = one_route(vec![slow], route, None).await;
    assert_eq!(
        get(&mesh).await,
        (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout".to_string()
        )
    );
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint() {
    let policy = l7::Policy {
        load_balancer: Some(l7::LoadBalancer {
            policy: Some(l7::load_balancer::Policy::Simple(
                l7::load_balancer::Simple::RoundRobin as i32,
            )),
        }),
        outlier_detection: Some(l7::OutlierDetection {
            consecutive_5xx_errors: Some(1),
            base_ejection_time: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            max_ejection_percent: Some(100),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (mesh, _endpoints) = one_route(
        vec![status_app(200), status_app(500)],
        to_svc(),
        Some(policy),
    )
    .await;
    let mut failures = 0;
    for _ in 0..10 {
        let (status, _) = get(&mesh).await;
        if status != StatusCode::OK {
            failures += 1;
        }
    }
    // The failing endpoint answers once at most, then is ejected.
    assert!(failures <= 1, "{failures} failures");
    mesh.wait_for_sample(
        "istio_requests_total",
        &[("response_code", "200"), ("destination_workload", "svc-0")],
        9.0,
    )
    .await;
}

#[tokio::test]
async fn an_invalid_token_is_401_before_authorization_and_no_token_passes() {
    let mesh = Mesh::start(|_| {}).await;
    let _endpoints = mesh
        .service("echo", 100, &[(80, 8080)], &[10], App::echo("echo-v1"))
        .await;
    // RFC 7517 appendix A.1's P-256 public key.
    let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"1","alg":"ES256",
        "x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
        "y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}"#;
    mesh.apply_l7(
        AuthenticationHandler::new,
        "default/jwt",
        l7::JwtAuthentication {
            namespace: "default".into(),
            name: "jwt".into(),
            rules: vec![l7::JwtRule {
                issuer: "https://issuer.example".into(),
                jwks: jwks.into(),
                ..Default::default()
            }],
        },
    );
    mesh.list(l7::ServedService {
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        authentications: vec!["default/jwt".into()],
        ..Default::default()
    });
    let (status, _, body) = call(&mesh, "GET", "/", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "echo-v1: GET / HTTP/1.1")
    );

    let mut client = mesh.http1(SocketAddr::new(mesh.ip(100), 80)).await;
    let request = Request::builder()
        .uri("/")
        .header(http::header::HOST, "echo.default")
        .header(http::header::AUTHORIZATION, "Bearer not.a.token")
        .body(empty())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response
            .headers()
            .contains_key(http::header::WWW_AUTHENTICATE)
    );
}

#[tokio::test]
async fn a_mirror_gets_a_copy_with_a_shadow_authority() {
    let route = l7::Route {
        mirrors: vec![l7::Mirror {
            backend: Some(l7::Backend {
                service: "default/shadow.default.svc.cluster.local".into(),
                port: 80,
                weight: 1,
                ..Default::default()
            }),
            per_million: 1_000_000,
        }],
        ..to_svc()
    };
    let (mesh, _endpoints) = one_route(vec![status_app(200)], route, None).await;
    let hosts = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let shadow = App::http({
        let hosts = hosts.clone();
        move |request| {
            let host = request.headers()[http::header::HOST]
                .to_str()
                .unwrap()
                .to_string();
            hosts.lock().unwrap().push(host);
            async move { harness::text_response(500, "the mirror's answer is dropped") }
        }
    });
    let _shadow = mesh
        .service("shadow", 101, &[(80, 8080)], &[20], shadow)
        .await;
    assert_eq!(
        get(&mesh).await,
        (StatusCode::OK, "from the app".to_string())
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while hosts.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mirror got nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(hosts.lock().unwrap().clone(), ["svc.default-shadow"]);
}

#[tokio::test]
async fn tcp_connections_follow_the_destination_rule_too() {
    let mesh = Mesh::start(|_| {}).await;
    let key = "default/db.default.svc.cluster.local";
    let _endpoints = mesh
        .service("db", 100, &[(3306, 3306)], &[10], App::Greeting(b"hello"))
        .await;
    // A second endpoint whose ztunnel is gone: every tunnel to it fails.
    mesh.apply(vec![
        harness::workload("db-dead", "default", mesh.ip(11))
            .in_service(key, &[(3306, 3306)])
            .into(),
    ]);
    mesh.apply_l7(
        TrafficPolicyHandler::new,
        key,
        l7::TrafficPolicy {
            namespace: "default".into(),
            hostname: "db.default.svc.cluster.local".into(),
            default_policy: Some(l7::Policy {
                load_balancer: Some(l7::LoadBalancer {
                    policy: Some(l7::load_balancer::Policy::Simple(
                        l7::load_balancer::Simple::RoundRobin as i32,
                    )),
                }),
                outlier_detection: Some(l7::OutlierDetection {
                    consecutive_5xx_errors: Some(1),
                    base_ejection_time: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    max_ejection_percent: Some(100),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let mut failures = 0;
    for _ in 0..6 {
        let mut tunnel = mesh
            .connect(SocketAddr::new(mesh.ip(100), 3306))
            .await
            .unwrap();
        if harness::read_n(&mut tunnel, 5).await.is_err() {
            failures += 1;
        }
    }
    // The dead endpoint is tried once at most, then ejected.
    assert!(failures <= 1, "{failures} failures");
}

// ---- DestinationRule connectionPool ----

fn pool(pool: l7::ConnectionPool) -> Option<l7::Policy> {
    Some(l7::Policy {
        connection_pool: Some(pool),
        ..Default::default()
    })
}

fn millis(ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    })
}

/// Answers 200 once `release` gives it a permit; `arrived` counts the
/// requests that reached it.
fn gated(release: Arc<tokio::sync::Semaphore>, arrived: Arc<AtomicUsize>) -> App {
    App::http(move |_| {
        let release = release.clone();
        let arrived = arrived.clone();
        async move {
            arrived.fetch_add(1, Ordering::SeqCst);
            release.acquire().await.unwrap().forget();
            harness::text_response(200, "released")
        }
    })
}

/// [`one_route`] to one [`gated`] endpoint with `limits`.
async fn gated_route(
    limits: l7::ConnectionPool,
) -> (
    Mesh,
    Vec<harness::Endpoint>,
    Arc<tokio::sync::Semaphore>,
    Arc<AtomicUsize>,
) {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let app = gated(release.clone(), arrived.clone());
    let (mesh, endpoints) = one_route(vec![app], to_svc(), pool(limits)).await;
    (mesh, endpoints, release, arrived)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn max_connections_queue_requests_up_to_the_pending_limit() {
    let (mesh, endpoints, release, arrived) = gated_route(l7::ConnectionPool {
        max_connections: Some(1),
        http1_max_pending_requests: Some(1),
        ..Default::default()
    })
    .await;
    let mesh = Arc::new(mesh);
    let call = || {
        let mesh = mesh.clone();
        tokio::spawn(async move { get(&mesh).await })
    };
    let first = call();
    until("the first request reaches the endpoint", || {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    // The one connection is busy: one request may wait for it, the next
    // is refused at once.
    let (mut second, mut third) = (call(), call());
    let (refused, waiting) = tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            r = &mut second => (r.unwrap(), third),
            r = &mut third => (r.unwrap(), second),
        }
    })
    .await
    .expect("one request is refused at once");
    assert_eq!(refused.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.1.contains("overflow"), "{}", refused.1);
    release.add_permits(2);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert_eq!(waiting.await.unwrap().0, StatusCode::OK);
    assert_eq!(arrived.load(Ordering::SeqCst), 2);
    assert_eq!(endpoints[0].accepted().len(), 1, "one connection for all");
    mesh.wait_for_sample("istio_requests_total", &[("response_flags", "UO")], 1.0)
        .await;
}

#[tokio::test]
async fn max_requests_per_connection_closes_a_connection_after_that_many() {
    let limits = l7::ConnectionPool {
        max_requests_per_connection: Some(1),
        ..Default::default()
    };
    let (mesh, endpoints) = one_route(vec![App::echo("svc-0")], to_svc(), pool(limits)).await;
    for _ in 0..3 {
        assert_eq!(get(&mesh).await.0, StatusCode::OK);
    }
    assert_eq!(
        endpoints[0].accepted().len(),
        3,
        "HTTP/1.1: one tunnel each"
    );
    let mut client = mesh.http2(SocketAddr::new(mesh.ip(100), 80)).await;
    for _ in 0..2 {
        let request = Request::builder()
            .uri("http://svc.default/")
            .body(empty())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(endpoints[0].accepted().len(), 5, "HTTP/2: one tunnel each");
}

#[tokio::test]
async fn max_concurrent_streams_opens_another_http2_connection() {
    let (mesh, endpoints, release, arrived) = gated_route(l7::ConnectionPool {
        max_concurrent_streams: Some(1),
        ..Default::default()
    })
    .await;
    let client = mesh.http2(SocketAddr::new(mesh.ip(100), 80)).await;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = Request::builder()
                    .uri("http://svc.default/")
                    .body(empty())
                    .unwrap();
                client.send_request(request).await.unwrap().status()
            })
        })
        .collect();
    until("both requests reach the endpoint", || {
        arrived.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        endpoints[0].accepted().len(),
        2,
        "one stream per connection"
    );
    release.add_permits(2);
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn the_retry_budget_bounds_retries_in_progress() {
    // First request: 503, then its retry is held. Second request: 503,
    // and its retry would succeed.
    let seen = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let app = App::http({
        let (seen, release) = (seen.clone(), release.clone());
        move |_| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let release = release.clone();
            async move {
                match n {
                    0 | 2 => harness::text_response(503, "from the app"),
                    1 => {
                        release.acquire().await.unwrap().forget();
                        harness::text_response(200, "retried")
                    }
                    _ => harness::text_response(200, "retried"),
                }
            }
        }
    });
    let limits = l7::ConnectionPool {
        max_retries: Some(1),
        ..Default::default()
    };
    let route = l7::Route {
        retry: Some(l7::RetryPolicy {
            attempts: 2,
            codes: vec![503],
            ..Default::default()
        }),
        ..to_svc()
    };
    let (mesh, _endpoints) = one_route(vec![app], route, pool(limits)).await;
    let mesh = Arc::new(mesh);
    let first = tokio::spawn({
        let mesh = mesh.clone();
        async move { get(&mesh).await }
    });
    until("the first request's retry is in progress", || {
        seen.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        get(&mesh).await,
        (StatusCode::SERVICE_UNAVAILABLE, "from the app".to_string()),
        "the budget is spent: the answer is final"
    );
    release.add_permits(1);
    assert_eq!(
        first.await.unwrap(),
        (StatusCode::OK, "retried".to_string())
    );
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_connect_timeout_bounds_the_tunnel_set_up() {
    let limits = l7::ConnectionPool {
        connect_timeout: millis(200),
        ..Default::default()
    };
    let (mesh, _endpoints) = one_route(vec![], to_svc(), pool(limits)).await;
    // An endpoint whose ztunnel takes the TCP connection and never answers
    // the TLS handshake.
    let _silent = tokio::net::TcpListener::bind(SocketAddr::new(mesh.ip(10), mesh.hbone_port()))
        .await
        .unwrap();
    mesh.apply(vec![
        harness::workload("svc-0", "default", mesh.ip(10))
            .in_service("default/svc.default.svc.cluster.local", &[(80, 8080)])
            .into(),
    ]);
    let (status, body) = tokio::time::timeout(PATIENCE, get(&mesh)).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
    );
}

#[tokio::test]
async fn an_idle_connection_closes_after_the_idle_timeout() {
    let limits = l7::ConnectionPool {
        http_idle_timeout: millis(300),
        ..Default::default()
    };
    let (mesh, endpoints) = one_route(vec![App::echo("svc-0")], to_svc(), pool(limits)).await;
    assert_eq!(get(&mesh).await.0, StatusCode::OK);
    let endpoint = SocketAddr::new(mesh.ip(10), 8080);
    let upstream = &mesh.data_path.proxy.upstream;
    assert_eq!(upstream.connections_to(endpoint), 1);
    until("the idle connection closes", || {
        upstream.connections_to(endpoint) == 0
    })
    .await;
    assert_eq!(get(&mesh).await.0, StatusCode::OK);
    assert_eq!(
        endpoints[0].accepted().len(),
        2,
        "a new tunnel after idling"
    );
}

#[tokio::test]
async fn h2_upgrade_sends_http1_requests_to_the_endpoint_as_http2() {
    let limits = l7::ConnectionPool {
        h2_upgrade: l7::H2Upgrade::Upgrade as i32,
        ..Default::default()
    };
    let (mesh, _endpoints) = one_route(vec![App::echo("svc-0")], to_svc(), pool(limits)).await;
    assert_eq!(
        get(&mesh).await,
        (StatusCode::OK, "svc-0: GET / HTTP/2.0".to_string())
    );
}

#[tokio::test]
async fn a_tcp_connection_idle_past_the_tcp_idle_timeout_is_closed() {
    let mesh = Mesh::start(|_| {}).await;
    let key = "default/db.default.svc.cluster.local";
    let _endpoints = mesh
        .service("db", 100, &[(3306, 3306)], &[10], App::Greeting(b"hello"))
        .await;
    mesh.apply_l7(
        TrafficPolicyHandler::new,
        key,
        l7::TrafficPolicy {
            namespace: "default".into(),
            hostname: "db.default.svc.cluster.local".into(),
            default_policy: pool(l7::ConnectionPool {
                tcp_idle_timeout: millis(300),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let mut tunnel = mesh
        .connect(SocketAddr::new(mesh.ip(100), 3306))
        .await
        .unwrap();
    assert_eq!(harness::read_n(&mut tunnel, 5).await.unwrap(), b"hello");
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    let read = tokio::time::timeout(PATIENCE, tunnel.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "ended by the waypoint: {read:?}");
}
