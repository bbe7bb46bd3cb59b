use super::*;

use api::l7;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::request::FromProto;

fn header(name: &str, kind: l7::header_match::Kind) -> l7::HeaderMatch {
    l7::HeaderMatch {
        name: name.into(),
        kind: Some(kind),
    }
}

fn backend(service: &str, weight: u32) -> l7::Backend {
    l7::Backend {
        service: service.into(),
        weight,
        ..Default::default()
    }
}

fn forward(backends: Vec<l7::Backend>) -> Option<l7::route::Action> {
    Some(l7::route::Action::Forward(l7::Forward { backends }))
}

fn table(routes: Vec<l7::Route>) -> RouteTable {
    RouteTable::from_proto(&l7::RouteTable {
        namespace: "default".into(),
        hostname: "reviews.default.svc.cluster.local".into(),
        routes,
    })
    .unwrap()
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder().method("GET").uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap()
}

fn target(port: u16) -> Target {
    Target::Service {
        namespace: "default".into(),
        hostname: "reviews.default.svc.cluster.local".into(),
        port,
        protocol: crate::request::Protocol::Http1,
    }
}

/// v2 for `end-user: jason`, v1 for the rest (the Bookinfo header route).
fn v1_v2() -> RouteTable {
    table(vec![
        l7::Route {
            matches: vec![l7::RouteMatch {
                headers: vec![header(
                    "end-user",
                    l7::header_match::Kind::Exact("jason".into()),
                )],
                ..Default::default()
            }],
            action: forward(vec![backend(
                "default/reviews-v2.default.svc.cluster.local",
                1,
            )]),
            ..Default::default()
        },
        l7::Route {
            action: forward(vec![backend(
                "default/reviews-v1.default.svc.cluster.local",
                1,
            )]),
            ..Default::default()
        },
    ])
}

fn destination_of(r: &Routing<'_>) -> String {
    match r {
        Routing::Forward {
            destination: Destination::Service { service, .. },
            ..
        } => service.hostname.clone(),
        other => panic!("not forwarded to a service: {other:?}"),
    }
}

#[test]
fn header_route_picks_v2_for_jason_and_v1_otherwise() {
    let t = v1_v2();
    let mut rng = StdRng::seed_from_u64(1);
    let cases = [
        (
            vec![("end-user", "jason")],
            "reviews-v2.default.svc.cluster.local",
        ),
        (
            vec![("end-user", "alice")],
            "reviews-v1.default.svc.cluster.local",
        ),
        (vec![], "reviews-v1.default.svc.cluster.local"),
    ];
    for (headers, want) in cases {
        let req = get("/reviews/1", &headers);
        let r = route(Some(&t), &target(9080), &req, &mut rng).unwrap();
        assert_eq!(destination_of(&r), want, "headers {headers:?}");
    }
}

#[test]
fn no_matching_route_is_404_nr() {
    let t = table(vec![l7::Route {
        matches: vec![l7::RouteMatch {
            path: Some(l7::PathMatch {
                kind: Some(l7::path_match::Kind::SegmentPrefix("/api".into())),
                ignore_case: false,
            }),
            ..Default::default()
        }],
        action: forward(vec![backend("default/a.default.svc.cluster.local", 1)]),
        ..Default::default()
    }]);
    let mut rng = StdRng::seed_from_u64(1);
    let err = route(Some(&t), &target(80), &get("/other", &[]), &mut rng).unwrap_err();
    assert_eq!(err.status, StatusCode::NOT_FOUND);
    assert_eq!(err.flag, ResponseFlag::NoRoute);
}

#[test]
fn no_route_table_forwards_to_the_addressed_target() {
    let mut rng = StdRng::seed_from_u64(1);
    let r = route(None, &target(9080), &get("/", &[]), &mut rng).unwrap();
    match r {
        Routing::Forward {
            route: None,
            destination,
            ..
        } => assert_eq!(
            destination,
            Destination::Service {
                service: NamespacedHostname::new("default", "reviews.default.svc.cluster.local"),
                port: 9080,
                subset: None
            }
        ),
        other => panic!("{other:?}"),
    }
    let workload = Target::Workload {
        uid: "Kubernetes//Pod/default/a".into(),
        port: 8080,
        protocol: crate::request::Protocol::Detect,
    };
    match route(None, &workload, &get("/", &[]), &mut rng).unwrap() {
        Routing::Forward { destination, .. } => assert_eq!(
            destination,
            Destination::Workload {
                uid: "Kubernetes//Pod/default/a".into(),
                port: 8080
            }
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn weighted_split_90_10_within_one_point_over_100k_seeded_picks() {
    let f = Forward::from_proto(&l7::Forward {
        backends: vec![
            backend("default/v1.default.svc.cluster.local", 90),
            backend("default/v2.default.svc.cluster.local", 10),
            backend("default/v3.default.svc.cluster.local", 0),
        ],
    })
    .unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut counts = [0u32; 3];
    for _ in 0..100_000 {
        let b = f.pick(&mut rng).unwrap();
        let i = f
            .backends
            .iter()
            .position(|x| x.service == b.service)
            .unwrap();
        counts[i] += 1;
    }
    let share = |n: u32| f64::from(n) / 1000.0; // percent of 100,000
    assert!(
        (share(counts[0]) - 90.0).abs() <= 1.0,
        "v1 {}%",
        share(counts[0])
    );
    assert!(
        (share(counts[1]) - 10.0).abs() <= 1.0,
        "v2 {}%",
        share(counts[1])
    );
    assert_eq!(counts[2], 0, "a weight-0 backend is never picked");
}

#[test]
fn all_zero_weights_and_invalid_backends_answer_500() {
    let mut rng = StdRng::seed_from_u64(3);
    let zero = Forward::from_proto(&l7::Forward {
        backends: vec![backend("default/v1.default.svc.cluster.local", 0)],
    })
    .unwrap();
    assert_eq!(
        zero.pick(&mut rng).unwrap_err().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        Forward::default().pick(&mut rng).unwrap_err().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let half_invalid = Forward::from_proto(&l7::Forward {
        backends: vec![
            backend("default/v1.default.svc.cluster.local", 1),
            l7::Backend {
                service: "other/missing".into(),
                weight: 1,
                invalid_reason: "no ReferenceGrant".into(),
                ..Default::default()
            },
        ],
    })
    .unwrap();
    let errors = (0..10_000)
        .filter(|_| half_invalid.pick(&mut rng).is_err())
        .count();
    assert!(
        (4_500..=5_500).contains(&errors),
        "{errors} of 10000 got 500"
    );
}

fn path(kind: l7::path_match::Kind, ignore_case: bool) -> PathMatch {
    PathMatch::from_proto(&l7::PathMatch {
        kind: Some(kind),
        ignore_case,
    })
    .unwrap()
}

#[test]
fn path_matches() {
    use l7::path_match::Kind::*;
    let cases: Vec<(PathMatch, &str, bool)> = vec![
        // Gateway API segment prefix
        (path(SegmentPrefix("/foo".into()), false), "/foo", true),
        (path(SegmentPrefix("/foo".into()), false), "/foo/", true),
        (path(SegmentPrefix("/foo".into()), false), "/foo/bar", true),
        (path(SegmentPrefix("/foo".into()), false), "/foobar", false),
        (path(SegmentPrefix("/foo/".into()), false), "/foo", true),
        (path(SegmentPrefix("/".into()), false), "/anything", true),
        // VirtualService string prefix
        (path(Prefix("/foo".into()), false), "/foobar", true),
        (path(Prefix("/foo".into()), false), "/fo", false),
        (path(Prefix("/FOO".into()), true), "/foobar", true),
        // exact
        (path(Exact("/a".into()), false), "/a", true),
        (path(Exact("/a".into()), false), "/a/", false),
        (path(Exact("/A".into()), true), "/a", true),
        (path(Exact("/A".into()), false), "/a", false),
        // regex: full match
        (path(Regex("/v[0-9]+".into()), false), "/v12", true),
        (path(Regex("/v[0-9]+".into()), false), "/v12/x", false),
        (path(Regex("/V1".into()), true), "/v1", true),
    ];
    for (m, p, want) in cases {
        assert_eq!(m.matches(p), want, "{m:?} on {p}");
    }
}

fn one_match(m: l7::RouteMatch) -> RouteMatch {
    RouteMatch::from_proto(&m).unwrap()
}

#[test]
fn request_matches() {
    use l7::header_match::Kind::*;
    let post = |uri: &str, headers: &[(&str, &str)]| {
        let mut r = get(uri, headers);
        *r.method_mut() = Method::POST;
        r
    };
    let cases: Vec<(&str, RouteMatch, Request<()>, bool)> = vec![
        (
            "header regex",
            one_match(l7::RouteMatch {
                headers: vec![header("x-v", Regex("v[12]".into()))],
                ..Default::default()
            }),
            get("/", &[("x-v", "v2")]),
            true,
        ),
        (
            "header regex is a full match",
            one_match(l7::RouteMatch {
                headers: vec![header("x-v", Regex("v[12]".into()))],
                ..Default::default()
            }),
            get("/", &[("x-v", "v22")]),
            false,
        ),
        (
            "header prefix",
            one_match(l7::RouteMatch {
                headers: vec![header("x-v", Prefix("abc".into()))],
                ..Default::default()
            }),
            get("/", &[("x-v", "abcd")]),
            true,
        ),
        (
            "header present",
            one_match(l7::RouteMatch {
                headers: vec![header("x-v", Present(true))],
                ..Default::default()
            }),
            get("/", &[("x-v", "")]),
            true,
        ),
        (
            "header absent",
            one_match(l7::RouteMatch {
                headers: vec![header("x-v", Present(true))],
                ..Default::default()
            }),
            get("/", &[]),
            false,
        ),
        (
            "header name case-insensitive",
            one_match(l7::RouteMatch {
                headers: vec![header("X-V", Exact("a".into()))],
                ..Default::default()
            }),
            get("/", &[("x-v", "a")]),
            true,
        ),
        (
            "query exact",
            one_match(l7::RouteMatch {
                query_params: vec![header("v", Exact("2".into()))],
                ..Default::default()
            }),
            get("/p?a=1&v=2", &[]),
            true,
        ),
        (
            "query first occurrence",
            one_match(l7::RouteMatch {
                query_params: vec![header("v", Exact("2".into()))],
                ..Default::default()
            }),
            get("/p?v=1&v=2", &[]),
            false,
        ),
        (
            "query missing",
            one_match(l7::RouteMatch {
                query_params: vec![header("v", Exact("2".into()))],
                ..Default::default()
            }),
            get("/p", &[]),
            false,
        ),
        (
            "method",
            one_match(l7::RouteMatch {
                method: "POST".into(),
                ..Default::default()
            }),
            post("/", &[]),
            true,
        ),
        (
            "method mismatch",
            one_match(l7::RouteMatch {
                method: "POST".into(),
                ..Default::default()
            }),
            get("/", &[]),
            false,
        ),
        (
            "grpc service+method",
            one_match(l7::RouteMatch {
                grpc: Some(l7::GrpcMethodMatch {
                    service: "helloworld.Greeter".into(),
                    method: "SayHello".into(),
                    regex: false,
                }),
                ..Default::default()
            }),
            post("/helloworld.Greeter/SayHello", &[]),
            true,
        ),
        (
            "grpc method only",
            one_match(l7::RouteMatch {
                grpc: Some(l7::GrpcMethodMatch {
                    service: "".into(),
                    method: "SayHello".into(),
                    regex: false,
                }),
                ..Default::default()
            }),
            post("/x.Y/SayBye", &[]),
            false,
        ),
        (
            "grpc regex",
            one_match(l7::RouteMatch {
                grpc: Some(l7::GrpcMethodMatch {
                    service: "helloworld\\..*".into(),
                    method: "".into(),
                    regex: true,
                }),
                ..Default::default()
            }),
            post("/helloworld.Greeter/Any", &[]),
            true,
        ),
        (
            "without_headers",
            one_match(l7::RouteMatch {
                without_headers: vec![header("x-canary", Present(true))],
                ..Default::default()
            }),
            get("/", &[("x-canary", "1")]),
            false,
        ),
        (
            "host from :authority",
            one_match(l7::RouteMatch {
                headers: vec![header("host", Exact("reviews:9080".into()))],
                ..Default::default()
            }),
            get("http://reviews:9080/", &[]),
            true,
        ),
        (
            "host header wins over :authority",
            one_match(l7::RouteMatch {
                headers: vec![header("host", Exact("reviews:9080".into()))],
                ..Default::default()
            }),
            get("http://reviews:9080/", &[("host", "other")]),
            false,
        ),
        (
            "without_headers absent",
            one_match(l7::RouteMatch {
                without_headers: vec![header("x-canary", Present(true))],
                ..Default::default()
            }),
            get("/", &[]),
            true,
        ),
    ];
    for (name, m, req, want) in cases {
        assert_eq!(m.matches(&req), want, "{name}");
    }
}

#[test]
fn route_ports_restrict_and_order_is_first_match() {
    let t = table(vec![
        l7::Route {
            ports: vec![8080],
            action: forward(vec![backend("default/a.default.svc.cluster.local", 1)]),
            ..Default::default()
        },
        l7::Route {
            action: forward(vec![backend("default/b.default.svc.cluster.local", 1)]),
            ..Default::default()
        },
        l7::Route {
            action: forward(vec![backend("default/c.default.svc.cluster.local", 1)]),
            ..Default::default()
        },
    ]);
    let mut rng = StdRng::seed_from_u64(1);
    let on = |port| {
        destination_of(
            &route(
                Some(&t),
                &target(port),
                &get("/", &[]),
                &mut StdRng::seed_from_u64(1),
            )
            .unwrap(),
        )
    };
    assert_eq!(on(8080), "a.default.svc.cluster.local");
    assert_eq!(on(9090), "b.default.svc.cluster.local");
    let _ = &mut rng;
}

#[test]
fn backend_port_zero_keeps_the_request_port() {
    let t = table(vec![l7::Route {
        action: forward(vec![l7::Backend {
            port: 7070,
            ..backend("default/a.default.svc.cluster.local", 1)
        }]),
        ..Default::default()
    }]);
    let mut rng = StdRng::seed_from_u64(1);
    match route(Some(&t), &target(80), &get("/", &[]), &mut rng).unwrap() {
        Routing::Forward {
            destination: Destination::Service { port, .. },
            ..
        } => assert_eq!(port, 7070),
        other => panic!("{other:?}"),
    }
    let t = v1_v2();
    match route(Some(&t), &target(9080), &get("/", &[]), &mut rng).unwrap() {
        Routing::Forward {
            destination: Destination::Service { port, .. },
            ..
        } => assert_eq!(port, 9080),
        other => panic!("{other:?}"),
    }
}

#[test]
fn conversion_errors_name_the_field() {
    let bad_regex = l7::RouteTable {
        namespace: "default".into(),
        hostname: "r".into(),
        routes: vec![
            l7::Route {
                action: forward(vec![]),
                ..Default::default()
            },
            l7::Route {
                matches: vec![l7::RouteMatch {
                    path: Some(l7::PathMatch {
                        kind: Some(l7::path_match::Kind::Regex("(".into())),
                        ignore_case: false,
                    }),
                    ..Default::default()
                }],
                action: forward(vec![]),
                ..Default::default()
            },
        ],
    };
    let e = RouteTable::from_proto(&bad_regex).unwrap_err();
    assert_eq!(e.field, "routes[1].matches[0].path.regex");
    assert!(e.reason.contains("not valid RE2"), "{e}");

    let cases: Vec<(l7::Route, &str)> = vec![
        (l7::Route::default(), "action"),
        (
            l7::Route {
                ports: vec![70000],
                action: forward(vec![]),
                ..Default::default()
            },
            "ports[0]",
        ),
        (
            l7::Route {
                action: forward(vec![backend("no-slash", 1)]),
                ..Default::default()
            },
            "forward.backends[0].service",
        ),
        (
            l7::Route {
                action: forward(vec![]),
                request_headers: Some(l7::HeaderModifier {
                    set: vec![l7::Header {
                        name: "bad name".into(),
                        value: "v".into(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            "request_headers.set[0].name",
        ),
        (
            l7::Route {
                action: forward(vec![]),
                timeouts: Some(l7::Timeouts {
                    request: Some(prost_types::Duration {
                        seconds: -1,
                        nanos: 0,
                    }),
                    per_try: None,
                }),
                ..Default::default()
            },
            "timeouts.request",
        ),
        (
            l7::Route {
                action: Some(l7::route::Action::Redirect(l7::Redirect {
                    status_code: 200,
                    ..Default::default()
                })),
                ..Default::default()
            },
            "redirect.status_code",
        ),
        (
            l7::Route {
                action: forward(vec![]),
                fault: Some(l7::Fault {
                    delay: None,
                    abort: Some(l7::fault::Abort {
                        per_million: 2_000_000,
                        status: Some(l7::fault::abort::Status::HttpStatus(503)),
                    }),
                }),
                ..Default::default()
            },
            "fault.abort.per_million",
        ),
        (
            l7::Route {
                action: forward(vec![]),
                retry: Some(l7::RetryPolicy {
                    codes: vec![503, 1000],
                    ..Default::default()
                }),
                ..Default::default()
            },
            "retry.codes[1]",
        ),
    ];
    for (r, field) in cases {
        let e = Route::from_proto(&r).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
}

#[test]
fn oversized_regex_is_refused_with_the_limit() {
    let huge = format!("({}){{1000}}", "[a-z]".repeat(50));
    let e = PathMatch::from_proto(&l7::PathMatch {
        kind: Some(l7::path_match::Kind::Regex(huge)),
        ignore_case: false,
    })
    .unwrap_err();
    assert_eq!(e.field, "regex");
    assert!(e.reason.contains("limit"), "{e}");
}

#[test]
fn mirror_share_is_sampled_per_million() {
    let m = Mirror::from_proto(&l7::Mirror {
        backend: Some(backend("default/shadow.default.svc.cluster.local", 0)),
        per_million: 250_000,
    })
    .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let n = (0..10_000).filter(|_| m.sampled(&mut rng)).count();
    assert!((2_300..=2_700).contains(&n), "{n} of 10000 mirrored");
    let e = Mirror::from_proto(&l7::Mirror {
        backend: None,
        per_million: 1,
    })
    .unwrap_err();
    assert_eq!(e.field, "backend");
}
