use std::net::SocketAddr;

use api::l7;
use proxy_core::store::{NetworkAddress, PortMapping, Service, WorkloadStore};
use proxy_core::xds::{Handler, Rejected, Update};

use super::*;
use crate::request::{FromProto, Protocol, Target};

const HOST: &str = "reviews.default.svc.cluster.local";

fn update<T>(name: &str, resource: T) -> Update<T> {
    Update {
        name: name.into(),
        resource: Some(resource),
    }
}

fn removal<T>(name: &str) -> Update<T> {
    Update {
        name: name.into(),
        resource: None,
    }
}

fn workloads() -> WorkloadStore {
    let store = WorkloadStore::new();
    store.update(|b| {
        b.insert_service(Service {
            name: "reviews".into(),
            namespace: "default".into(),
            hostname: HOST.into(),
            vips: vec![NetworkAddress {
                network: "".into(),
                address: "10.96.0.10".parse().unwrap(),
            }],
            ports: vec![PortMapping {
                service_port: 9080,
                target_port: 9080,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: None,
            ip_families: None,
            canonical: true,
            app_protocols: Default::default(),
            ingress_use_waypoint: false,
        })
    });
    store
}

fn served_service(p: impl FnOnce(&mut l7::ServedService)) -> l7::ServedService {
    let mut s = l7::ServedService {
        namespace: "default".into(),
        hostname: HOST.into(),
        ports: vec![l7::ServedPort {
            port: 9080,
            protocol: l7::Protocol::Http as i32,
        }],
        ..Default::default()
    };
    p(&mut s);
    s
}

fn waypoint(services: Vec<l7::ServedService>) -> l7::Waypoint {
    l7::Waypoint {
        namespace: "default".into(),
        name: "waypoint".into(),
        services,
        workloads: vec![l7::ServedWorkload {
            uid: "Kubernetes//Pod/default/db-0".into(),
            addresses: vec![vec![10, 244, 0, 9]],
            ..Default::default()
        }],
        gateway_authorizations: vec!["default/gw-policy".into()],
        gateway_authentications: vec![],
        forward_client_identity: false,
    }
}

fn route_table() -> l7::RouteTable {
    l7::RouteTable {
        namespace: "default".into(),
        hostname: HOST.into(),
        routes: vec![l7::Route {
            action: Some(l7::route::Action::Forward(l7::Forward {
                backends: vec![l7::Backend {
                    service: format!("default/{HOST}"),
                    weight: 1,
                    ..Default::default()
                }],
            })),
            ..Default::default()
        }],
    }
}

fn authorization(name: &str) -> l7::HttpAuthorization {
    l7::HttpAuthorization {
        namespace: "default".into(),
        name: name.into(),
        ..Default::default()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A store with the Waypoint, its RouteTable and both policies.
fn full_store(service: l7::ServedService) -> L7Store {
    let store = L7Store::new();
    WaypointHandler::new(store.clone())
        .apply(vec![update("default/waypoint", waypoint(vec![service]))])
        .unwrap();
    RouteTableHandler::new(store.clone())
        .apply(vec![update(&format!("default/{HOST}"), route_table())])
        .unwrap();
    AuthorizationHandler::new(store.clone())
        .apply(vec![
            update("default/gw-policy", authorization("gw-policy")),
            update("default/svc-policy", authorization("svc-policy")),
        ])
        .unwrap();
    store
}

fn with_refs(s: &mut l7::ServedService) {
    s.route_table = format!("default/{HOST}");
    s.authorizations = vec!["default/svc-policy".into()];
}

#[test]
fn served_carries_the_waypoint_client_identity_opt_in() {
    let w = workloads().snapshot();
    let store = full_store(served_service(with_refs));
    let served = |store: &L7Store, connect| store.snapshot().served(addr(connect), &w).unwrap();
    assert!(!served(&store, "10.96.0.10:9080").forward_client_identity);
    assert!(!served(&store, "10.244.0.9:5432").forward_client_identity);

    let opted_in = l7::Waypoint {
        forward_client_identity: true,
        ..waypoint(vec![served_service(with_refs)])
    };
    WaypointHandler::new(store.clone())
        .apply(vec![update("default/waypoint", opted_in)])
        .unwrap();
    assert!(served(&store, "10.96.0.10:9080").forward_client_identity);
    assert!(served(&store, "10.244.0.9:5432").forward_client_identity);
}

#[test]
fn served_by_service_vip_and_port() {
    let store = full_store(served_service(with_refs));
    let w = workloads().snapshot();
    let served = store
        .snapshot()
        .served(addr("10.96.0.10:9080"), &w)
        .unwrap();
    assert_eq!(
        served.target,
        Target::Service {
            namespace: "default".into(),
            hostname: HOST.into(),
            port: 9080,
            protocol: Protocol::Http1,
        }
    );
    assert_eq!(served.waypoint, "default/waypoint");
    assert!(served.routes.is_some());
    assert_eq!(
        served.authorizations.len(),
        2,
        "gateway policy then the service's"
    );
    let snapshot = store.snapshot();
    let order: Vec<_> = ["default/gw-policy", "default/svc-policy"]
        .iter()
        .map(|k| std::sync::Arc::as_ptr(&snapshot.authorizations[*k]))
        .collect();
    assert_eq!(
        served
            .authorizations
            .iter()
            .map(std::sync::Arc::as_ptr)
            .collect::<Vec<_>>(),
        order,
        "evaluation order: waypoint's gateway_authorizations first"
    );
    assert!(served.refusal.is_none());
    // A port the service does not have is not ours.
    assert!(store.snapshot().served(addr("10.96.0.10:80"), &w).is_none());
}

#[test]
fn served_by_workload_ip_on_any_port() {
    let store = full_store(served_service(with_refs));
    let w = workloads().snapshot();
    let served = store
        .snapshot()
        .served(addr("10.244.0.9:5432"), &w)
        .unwrap();
    assert_eq!(
        served.target,
        Target::Workload {
            uid: "Kubernetes//Pod/default/db-0".into(),
            port: 5432,
            protocol: Protocol::Detect,
        }
    );
    assert!(served.routes.is_none());
    assert_eq!(served.authorizations.len(), 1);
}

#[test]
fn unserved_addresses_are_refused() {
    let store = full_store(served_service(with_refs));
    let w = workloads().snapshot();
    for a in ["10.96.0.11:9080", "10.244.0.8:5432", "[::1]:9080"] {
        assert!(store.snapshot().served(addr(a), &w).is_none(), "{a}");
    }
    // Nothing served before the Waypoint arrives.
    assert!(
        L7Store::new()
            .snapshot()
            .served(addr("10.96.0.10:9080"), &w)
            .is_none()
    );
}

#[test]
fn deny_all_reason_refuses_every_request_with_403() {
    let store = full_store(served_service(|s| {
        with_refs(s);
        s.deny_all_reason = "HTTPRoute default/r uses an unsupported filter".into();
    }));
    let served = store
        .snapshot()
        .served(addr("10.96.0.10:9080"), &workloads().snapshot())
        .unwrap();
    let refusal = served.refusal.unwrap();
    assert!(matches!(refusal, Unservable::DenyAll { .. }));
    assert_eq!(refusal.refusal().status, http::StatusCode::FORBIDDEN);
}

#[test]
fn missing_config_denies_instead_of_meaning_no_policy() {
    let w = workloads().snapshot();
    type Edit = Box<dyn Fn(&mut l7::ServedService)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|s| s.route_table = "default/absent".into()),
            "RouteTable",
            "default/absent",
        ),
        (
            Box::new(|s| s.authorizations = vec!["default/absent".into()]),
            "HttpAuthorization",
            "default/absent",
        ),
        (
            Box::new(|s| s.authentications = vec!["default/absent-jwt".into()]),
            "JwtAuthentication",
            "default/absent-jwt",
        ),
    ];
    for (edit, kind, key) in cases {
        let store = full_store(served_service(|s| edit(s)));
        let served = store
            .snapshot()
            .served(addr("10.96.0.10:9080"), &w)
            .unwrap();
        let refusal = served.refusal.expect(kind);
        assert_eq!(
            refusal,
            Unservable::MissingConfig {
                kind,
                key: key.into()
            }
        );
        assert_eq!(
            refusal.refusal().status,
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
    // The waypoint's own gateway policy missing denies too.
    let store = L7Store::new();
    WaypointHandler::new(store.clone())
        .apply(vec![update(
            "default/waypoint",
            waypoint(vec![served_service(|_| {})]),
        )])
        .unwrap();
    let served = store
        .snapshot()
        .served(addr("10.96.0.10:9080"), &w)
        .unwrap();
    assert_eq!(
        served.refusal,
        Some(Unservable::MissingConfig {
            kind: "HttpAuthorization",
            key: "default/gw-policy".into()
        })
    );
}

#[test]
fn a_rejected_resource_is_nacked_with_its_field_path_and_keeps_the_last_good_version() {
    let store = full_store(served_service(with_refs));
    let name = format!("default/{HOST}");
    let good = store.snapshot().route_table(&name).unwrap().clone();
    let generation = store.snapshot().generation();

    let mut bad = route_table();
    bad.routes.push(l7::Route {
        matches: vec![l7::RouteMatch {
            path: Some(l7::PathMatch {
                kind: Some(l7::path_match::Kind::Regex("a(".into())),
                ignore_case: false,
            }),
            ..Default::default()
        }],
        action: bad.routes[0].action.clone(),
        ..Default::default()
    });
    let mut other = route_table();
    other.hostname = "ratings.default.svc.cluster.local".into();
    let err = RouteTableHandler::new(store.clone())
        .apply(vec![
            update(&name, bad),
            update("default/ratings.default.svc.cluster.local", other),
        ])
        .unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err[0].name, name);
    assert!(
        err[0]
            .reason
            .starts_with("route table routes[1].matches[0].path.regex: regex \"a(\""),
        "{}",
        err[0].reason
    );
    let snapshot = store.snapshot();
    assert!(std::sync::Arc::ptr_eq(
        snapshot.route_table(&name).unwrap(),
        &good
    ));
    assert!(
        snapshot
            .route_table("default/ratings.default.svc.cluster.local")
            .is_some()
    );
    assert_eq!(
        snapshot.generation(),
        generation + 1,
        "one response, one snapshot"
    );
}

#[test]
fn rejections_name_the_field_for_every_type() {
    let store = L7Store::new();
    let mut bad_port = waypoint(vec![served_service(|s| s.ports[0].port = 70000)]);
    bad_port.name = "waypoint".into();
    let cases: Vec<(Result<(), Vec<Rejected>>, &str)> = vec![
        (
            WaypointHandler::new(store.clone()).apply(vec![update("default/waypoint", bad_port)]),
            "waypoint services[0].ports[0].port: port 70000 is not in 1-65535",
        ),
        (
            WaypointHandler::new(store.clone()).apply(vec![update(
                "default/waypoint",
                waypoint(vec![served_service(|s| {
                    s.authorizations = vec!["no-namespace".into()]
                })]),
            )]),
            "waypoint services[0].authorizations[0]: \"no-namespace\" is not a resource key <namespace>/<name>",
        ),
        (
            WaypointHandler::new(store.clone())
                .apply(vec![update("default/other", waypoint(vec![]))]),
            "waypoint names itself \"default/waypoint\"; it must equal the resource name",
        ),
        (
            TrafficPolicyHandler::new(store.clone()).apply(vec![update(
                &format!("default/{HOST}"),
                l7::TrafficPolicy {
                    namespace: "default".into(),
                    hostname: HOST.into(),
                    default_policy: Some(l7::Policy {
                        outlier_detection: Some(l7::OutlierDetection {
                            min_health_percent: Some(150),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )]),
            "traffic policy default_policy.outlier_detection.min_health_percent: 150 is more than 100",
        ),
        (
            AuthorizationHandler::new(store.clone())
                .apply(vec![update("default/x", authorization("y"))]),
            "authorization names itself \"default/y\"; it must equal the resource name",
        ),
    ];
    for (result, reason) in cases {
        let err = result.unwrap_err();
        assert_eq!(err[0].reason, reason);
    }
    assert_eq!(
        store.snapshot().waypoints().count(),
        0,
        "nothing bad was taken"
    );
}

#[test]
fn removal_drops_the_resource() {
    let store = full_store(served_service(with_refs));
    AuthorizationHandler::new(store.clone())
        .apply(vec![removal("default/svc-policy")])
        .unwrap();
    let served = store
        .snapshot()
        .served(addr("10.96.0.10:9080"), &workloads().snapshot())
        .unwrap();
    assert!(matches!(
        served.refusal,
        Some(Unservable::MissingConfig { .. })
    ));
    WaypointHandler::new(store.clone())
        .apply(vec![removal("default/waypoint")])
        .unwrap();
    assert!(
        store
            .snapshot()
            .served(addr("10.96.0.10:9080"), &workloads().snapshot())
            .is_none()
    );
}

#[test]
fn traffic_policy_picks_subset_then_port_then_default() {
    use crate::balance::{LoadBalancer, Simple};
    let lb = |s: l7::load_balancer::Simple| l7::Policy {
        load_balancer: Some(l7::LoadBalancer {
            policy: Some(l7::load_balancer::Policy::Simple(s as i32)),
        }),
        ..Default::default()
    };
    let tp = TrafficPolicy::from_proto(&l7::TrafficPolicy {
        namespace: "default".into(),
        hostname: HOST.into(),
        default_policy: Some(l7::Policy {
            outlier_detection: Some(l7::OutlierDetection::default()),
            ..lb(l7::load_balancer::Simple::RoundRobin)
        }),
        ports: vec![l7::PortPolicy {
            port: 9080,
            policy: Some(lb(l7::load_balancer::Simple::Random)),
        }],
        subsets: vec![l7::Subset {
            name: "v2".into(),
            workload_uids: vec!["Kubernetes//Pod/default/reviews-v2".into()],
            policy: Some(lb(l7::load_balancer::Simple::LeastRequest)),
            ports: vec![l7::PortPolicy {
                port: 9090,
                policy: Some(lb(l7::load_balancer::Simple::Random)),
            }],
        }],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        tp.effective(80, None).load_balancer(),
        LoadBalancer::Simple(Simple::RoundRobin)
    );
    assert_eq!(
        tp.effective(9080, None).load_balancer(),
        LoadBalancer::Simple(Simple::Random)
    );
    let v2 = tp.effective(9080, Some("v2"));
    assert_eq!(
        v2.load_balancer(),
        LoadBalancer::Simple(Simple::LeastRequest)
    );
    assert_eq!(
        v2.outlier_detection, None,
        "istiod merged the levels: the subset's policy is taken whole"
    );
    assert_eq!(
        tp.effective(9090, Some("v2")).load_balancer(),
        LoadBalancer::Simple(Simple::Random),
        "the subset's own port entry"
    );
    assert_eq!(
        TrafficPolicy::from_proto(&l7::TrafficPolicy::default())
            .unwrap()
            .effective(1, None)
            .load_balancer(),
        LoadBalancer::Simple(Simple::LeastRequest),
        "no DestinationRule: LEAST_REQUEST"
    );
    assert!(
        tp.subset("v2")
            .unwrap()
            .workload_uids
            .contains("Kubernetes//Pod/default/reviews-v2")
    );
}

#[test]
fn config_dump_names_what_is_served_and_routed() {
    use proxy_core::admin::DumpSection;
    let store = full_store(served_service(with_refs));
    let dump = store.dump();
    assert_eq!(store.key(), "l7");
    assert_eq!(dump["waypoints"][0]["waypoint"], "default/waypoint");
    assert_eq!(dump["waypoints"][0]["forwardClientIdentity"], false);
    assert_eq!(
        dump["waypoints"][0]["services"][0]["service"],
        format!("default/{HOST}")
    );
    assert_eq!(
        dump["waypoints"][0]["services"][0]["ports"][0]["protocol"],
        "HTTP"
    );
    let route = &dump["routeTables"][format!("default/{HOST}")][0];
    assert_eq!(
        route["action"]["forward"][0]["service"],
        format!("default/{HOST}")
    );
    assert_eq!(
        dump["authorizations"],
        serde_json::json!(["default/gw-policy", "default/svc-policy"])
    );
}
