//! The workload store fed through the xDS handlers, as the client feeds it,
//! and queried as the proxies will: destination lookup, endpoints, and the
//! L4 decision for a connection.

use api::security::{self as sec, string_match::MatchType};
use api::workload::{self as wl, address};
use proxy_core::authorization::{ConnectionInfo, Decision};
use proxy_core::store::{Address, WorkloadStore};
use proxy_core::xds::handlers::{AddressHandler, AuthorizationHandler};
use proxy_core::xds::{Handler, Update};

fn pod(ns: &str, name: &str, ip: [u8; 4], services: &[&str]) -> Update<wl::Address> {
    let uid = format!("Kubernetes//Pod/{ns}/{name}");
    Update {
        name: uid.clone(),
        resource: Some(wl::Address {
            r#type: Some(address::Type::Workload(wl::Workload {
                uid,
                name: name.into(),
                namespace: ns.into(),
                addresses: vec![ip.to_vec()],
                service_account: name.into(),
                tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
                authorization_policies: vec![format!("{ns}/only-client")],
                services: services
                    .iter()
                    .map(|s| {
                        (
                            s.to_string(),
                            wl::PortList {
                                ports: vec![wl::Port {
                                    service_port: 80,
                                    target_port: 8080,
                                    app_protocol: 0,
                                }],
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            })),
        }),
    }
}

fn service(ns: &str, host: &str, vip: [u8; 4]) -> Update<wl::Address> {
    Update {
        name: format!("{ns}/{host}"),
        resource: Some(wl::Address {
            r#type: Some(address::Type::Service(wl::Service {
                name: host.split('.').next().unwrap().into(),
                namespace: ns.into(),
                hostname: host.into(),
                addresses: vec![wl::NetworkAddress {
                    network: String::new(),
                    address: vip.to_vec(),
                }],
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 0,
                    app_protocol: 0,
                }],
                ..Default::default()
            })),
        }),
    }
}

fn policy(
    ns: &str,
    name: &str,
    scope: sec::Scope,
    action: sec::Action,
    m: sec::Match,
) -> Update<sec::Authorization> {
    Update {
        name: format!("{ns}/{name}"),
        resource: Some(sec::Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope: scope as i32,
            action: action as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause { matches: vec![m] }],
            }],
            dry_run: false,
        }),
    }
}

fn conn(from: Option<&str>, to: &str) -> ConnectionInfo {
    ConnectionInfo {
        source_ip: "10.0.0.100".parse().unwrap(),
        source_identity: from.map(|s| s.parse().unwrap()),
        destination: to.parse().unwrap(),
    }
}

#[test]
fn a_connection_is_resolved_and_judged_from_what_xds_delivered() {
    let store = WorkloadStore::new();
    let addresses = AddressHandler::new(store.clone());
    let policies = AuthorizationHandler::new(store.clone());
    let svc = "web.server.svc.cluster.local";

    addresses
        .apply(vec![
            pod(
                "server",
                "web-1",
                [10, 0, 0, 1],
                &["server/web.server.svc.cluster.local"],
            ),
            pod(
                "server",
                "web-2",
                [10, 0, 0, 2],
                &["server/web.server.svc.cluster.local"],
            ),
            service("server", svc, [10, 96, 0, 1]),
        ])
        .unwrap();
    let exact = |s: &str| sec::StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    };
    policies
        .apply(vec![
            // Mesh-wide: nobody from namespace "evil".
            policy(
                "istio-system",
                "no-evil",
                sec::Scope::Global,
                sec::Action::Deny,
                sec::Match {
                    namespaces: vec![exact("evil")],
                    ..Default::default()
                },
            ),
            // Selected by the server pods: only the client identity.
            policy(
                "server",
                "only-client",
                sec::Scope::WorkloadSelector,
                sec::Action::Allow,
                sec::Match {
                    principals: vec![exact("cluster.local/ns/client/sa/client")],
                    ..Default::default()
                },
            ),
            // Another namespace's policy never applies here.
            policy(
                "other",
                "deny-all",
                sec::Scope::Namespace,
                sec::Action::Deny,
                sec::Match {
                    destination_ports: vec![8080],
                    ..Default::default()
                },
            ),
        ])
        .unwrap();

    let snap = store.snapshot();
    // The VIP resolves to the service; its endpoints resolve the target port.
    let Some(Address::Service(service)) = snap.address("", "10.96.0.1".parse().unwrap()) else {
        panic!("the VIP is a service");
    };
    let endpoints = snap.ready_endpoints(&service);
    assert_eq!(endpoints.len(), 2);
    assert!(
        endpoints
            .iter()
            .all(|e| e.target_port(&service, 80) == Some(8080))
    );

    // The chosen endpoint's policies judge the connection.
    let dest = snap
        .workload_by_address("", "10.0.0.1".parse().unwrap())
        .unwrap();
    let applicable = snap.policies_for(&dest);
    let mut keys: Vec<String> = applicable.applied.iter().map(|p| p.key()).collect();
    keys.sort();
    assert_eq!(keys, ["istio-system/no-evil", "server/only-client"]);
    assert_eq!(
        applicable.check(&conn(
            Some("spiffe://cluster.local/ns/client/sa/client"),
            "10.0.0.1:8080"
        )),
        Decision::Allowed {
            policy: "server/only-client".into()
        }
    );
    assert_eq!(
        applicable.check(&conn(
            Some("spiffe://cluster.local/ns/evil/sa/client"),
            "10.0.0.1:8080"
        )),
        Decision::Denied {
            policy: "istio-system/no-evil".into()
        }
    );
    assert_eq!(
        applicable.check(&conn(None, "10.0.0.1:8080")),
        Decision::NotAllowed
    );

    // Removing the ALLOW while the workload still lists it fails closed.
    let remove_allow = || {
        policies
            .apply(vec![Update {
                name: "server/only-client".into(),
                resource: None,
            }])
            .unwrap()
    };
    remove_allow();
    assert_eq!(
        store
            .snapshot()
            .policies_for(&dest)
            .check(&conn(None, "10.0.0.1:8080")),
        Decision::MissingPolicy {
            policy: "server/only-client".into()
        }
    );
    // As istiod sends it: the workload stops listing it, then it goes. The
    // workload is then open to everyone but "evil".
    let mut unlisted = pod("server", "web-1", [10, 0, 0, 1], &[]);
    if let Some(wl::Address {
        r#type: Some(address::Type::Workload(w)),
    }) = unlisted.resource.as_mut()
    {
        w.authorization_policies.clear();
    }
    addresses.apply(vec![unlisted]).unwrap();
    remove_allow();
    let now = store
        .snapshot()
        .workload_by_address("", "10.0.0.1".parse().unwrap())
        .unwrap();
    let applicable = store.snapshot().policies_for(&now);
    assert_eq!(
        applicable.check(&conn(None, "10.0.0.1:8080")),
        Decision::AllowedByDefault
    );
    // The snapshot taken earlier still judges with the old policies.
    assert_eq!(
        snap.policies_for(&dest).check(&conn(None, "10.0.0.1:8080")),
        Decision::NotAllowed
    );
}

#[test]
fn a_rejected_resource_leaves_the_previous_version_in_place() {
    let store = WorkloadStore::new();
    let addresses = AddressHandler::new(store.clone());
    addresses
        .apply(vec![pod("ns", "a", [10, 0, 0, 1], &[])])
        .unwrap();
    let mut broken = pod("ns", "a", [10, 0, 0, 2], &[]);
    if let Some(wl::Address {
        r#type: Some(address::Type::Workload(w)),
    }) = &mut broken.resource
    {
        w.network_mode = 99;
    }
    let rejected = addresses
        .apply(vec![broken, pod("ns", "b", [10, 0, 0, 3], &[])])
        .unwrap_err();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].name, "Kubernetes//Pod/ns/a");
    assert!(
        rejected[0]
            .reason
            .contains("network_mode: unknown value 99"),
        "{}",
        rejected[0].reason
    );
    let snap = store.snapshot();
    assert_eq!(
        snap.workload_by_uid("Kubernetes//Pod/ns/a")
            .unwrap()
            .addresses,
        ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(snap.workload_by_uid("Kubernetes//Pod/ns/b").is_some());
}

/// A selector policy the workload lists, NACKed when it first arrived (so
/// the proxy never held a good version), denies until a good one comes.
#[test]
fn a_listed_policy_that_was_rejected_denies() {
    let store = WorkloadStore::new();
    AddressHandler::new(store.clone())
        .apply(vec![pod("server", "web-1", [10, 0, 0, 1], &[])])
        .unwrap();
    let policies = AuthorizationHandler::new(store.clone());
    let mut bad = policy(
        "server",
        "only-client",
        sec::Scope::WorkloadSelector,
        sec::Action::Allow,
        sec::Match::default(),
    );
    if let Some(p) = bad.resource.as_mut() {
        p.action = 42;
    }
    let rejected = policies.apply(vec![bad]).unwrap_err();
    assert_eq!(rejected[0].name, "server/only-client");
    let dest = store
        .snapshot()
        .workload_by_address("", "10.0.0.1".parse().unwrap())
        .unwrap();
    let check = || {
        store.snapshot().policies_for(&dest).check(&conn(
            Some("spiffe://cluster.local/ns/client/sa/client"),
            "10.0.0.1:8080",
        ))
    };
    assert_eq!(
        check(),
        Decision::MissingPolicy {
            policy: "server/only-client".into()
        }
    );

    policies
        .apply(vec![policy(
            "server",
            "only-client",
            sec::Scope::WorkloadSelector,
            sec::Action::Allow,
            sec::Match {
                namespaces: vec![sec::StringMatch {
                    match_type: Some(MatchType::Exact("client".into())),
                }],
                ..Default::default()
            },
        )])
        .unwrap();
    assert!(check().is_allowed());
}

/// What the newer workload API fields do once delivered: an AppProtocol
/// this proxy does not know refuses the service (NACK naming the field), a
/// known one is kept; a dry-run DENY is held but does not deny, and says
/// what it would have done.
#[test]
fn app_protocols_are_checked_and_dry_run_policies_are_held_unenforced() {
    let store = WorkloadStore::new();
    let addresses = AddressHandler::new(store.clone());
    let policies = AuthorizationHandler::new(store.clone());
    let with_protocol = |p: i32| {
        let mut s = service("server", "web.server.svc.cluster.local", [10, 96, 0, 1]);
        if let Some(wl::Address {
            r#type: Some(address::Type::Service(s)),
        }) = &mut s.resource
        {
            s.ports[0].app_protocol = p;
        }
        s
    };
    let rejected = addresses.apply(vec![with_protocol(42)]).unwrap_err();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0]
            .reason
            .contains("ports[0].app_protocol: unknown value 42"),
        "{}",
        rejected[0].reason
    );
    let mut web = pod("server", "web-1", [10, 0, 0, 1], &[]);
    if let Some(wl::Address {
        r#type: Some(address::Type::Workload(w)),
    }) = &mut web.resource
    {
        // Only the namespace's dry-run policy applies.
        w.authorization_policies.clear();
    }
    addresses
        .apply(vec![with_protocol(wl::AppProtocol::Grpc as i32), web])
        .unwrap();
    let snap = store.snapshot();
    let svc = snap
        .service_by_vip("", [10, 96, 0, 1].into())
        .expect("the good version is taken");
    assert_eq!(
        svc.app_protocols.get(&80),
        Some(&proxy_core::store::AppProtocol::Grpc)
    );

    let mut dry = policy(
        "server",
        "trying-out",
        sec::Scope::Namespace,
        sec::Action::Deny,
        sec::Match {
            destination_ports: vec![8080],
            ..Default::default()
        },
    );
    if let Some(a) = &mut dry.resource {
        a.dry_run = true;
    }
    policies.apply(vec![dry]).unwrap();
    let snap = store.snapshot();
    let w = snap
        .workload_by_uid("Kubernetes//Pod/server/web-1")
        .unwrap();
    let held = snap.policies_for(&w);
    let c = conn(
        Some("spiffe://cluster.local/ns/client/sa/c"),
        "10.0.0.1:8080",
    );
    assert_eq!(held.check(&c), Decision::AllowedByDefault);
    assert_eq!(
        held.dry_run(&c),
        Some(Decision::Denied {
            policy: "server/trying-out".into()
        })
    );
}
