use std::collections::BTreeMap;
use std::net::IpAddr;

use api::workload as xds;

use super::*;
use crate::authorization::{Action, Authorization, Scope};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn bytes(s: &str) -> Vec<u8> {
    match ip(s) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn xds_pod(ns: &str, name: &str, addr: &str) -> xds::Workload {
    xds::Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        addresses: vec![bytes(addr)],
        service_account: "sa".into(),
        tunnel_protocol: xds::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, addr: &str) -> Workload {
    Workload::try_from(xds_pod(ns, name, addr)).unwrap()
}

fn backing(mut w: Workload, service: &str, ports: &[(u16, u16)]) -> Workload {
    w.services.insert(
        service.parse().unwrap(),
        ports
            .iter()
            .map(|&(service_port, target_port)| PortMapping {
                service_port,
                target_port,
            })
            .collect(),
    );
    w
}

fn xds_service(ns: &str, host: &str, vip: &str) -> xds::Service {
    xds::Service {
        name: host.split('.').next().unwrap().into(),
        namespace: ns.into(),
        hostname: host.into(),
        addresses: vec![xds::NetworkAddress {
            network: String::new(),
            address: bytes(vip),
        }],
        ports: vec![xds::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    }
}

fn service(ns: &str, host: &str, vip: &str) -> Service {
    Service::try_from(xds_service(ns, host, vip)).unwrap()
}

fn policy(ns: &str, name: &str, scope: Scope) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action: Action::Deny,
        rules: vec![],
        dry_run: false,
    }
}

#[test]
fn converts_a_workload_with_defaults_and_typed_fields() {
    let mut x = xds_pod("ns", "a", "10.0.0.1");
    x.service_account = String::new();
    x.addresses.push(bytes("fd00::1"));
    x.waypoint = Some(xds::GatewayAddress {
        destination: Some(xds::gateway_address::Destination::Hostname(
            xds::NamespacedHostname {
                namespace: "ns".into(),
                hostname: "wp.ns.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    });
    x.services.insert(
        "ns/svc.ns.svc.cluster.local".into(),
        xds::PortList {
            ports: vec![xds::Port {
                service_port: 80,
                target_port: 9090,
                app_protocol: 0,
            }],
        },
    );
    let w = Workload::try_from(x).unwrap();
    assert_eq!(w.addresses, [ip("10.0.0.1"), ip("fd00::1")]);
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/ns/sa/default"
    );
    assert_eq!(w.protocol, InboundProtocol::Hbone);
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.capacity, 1);
    assert_eq!(
        w.waypoint.unwrap().destination,
        GatewayDestination::Hostname(NamespacedHostname::new("ns", "wp.ns.svc.cluster.local"))
    );
    assert_eq!(
        w.services[&NamespacedHostname::new("ns", "svc.ns.svc.cluster.local")],
        [PortMapping {
            service_port: 80,
            target_port: 9090
        }]
    );
}

#[test]
fn invalid_workloads_are_refused_naming_the_field() {
    type Mutation = Box<dyn Fn(&mut xds::Workload)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|w| w.addresses.push(vec![1, 2, 3])),
            "addresses[1]: 3 bytes",
        ),
        (Box::new(|w| w.uid.clear()), "uid is required"),
        (Box::new(|w| w.namespace.clear()), "namespace is required"),
        (
            Box::new(|w| w.tunnel_protocol = 7),
            "tunnel_protocol: unknown value 7",
        ),
        (Box::new(|w| w.status = 9), "status: unknown value 9"),
        (
            Box::new(|w| w.trust_domain = "Bad Domain".into()),
            "identity: trust domain",
        ),
        (
            Box::new(|w| w.service_account = "a/b".into()),
            "identity: service account",
        ),
        (
            Box::new(|w| {
                w.services.insert("no-slash".into(), Default::default());
            }),
            "services: \"no-slash\"",
        ),
        (
            Box::new(|w| {
                w.services.insert(
                    "ns/h".into(),
                    xds::PortList {
                        ports: vec![xds::Port {
                            service_port: 70000,
                            target_port: 1,
                            app_protocol: 0,
                        }],
                    },
                );
            }),
            "services[ns/h].ports[0].service_port: port 70000",
        ),
        (
            Box::new(|w| {
                w.services.insert(
                    "ns/h".into(),
                    xds::PortList {
                        ports: vec![xds::Port {
                            service_port: 80,
                            target_port: 80,
                            app_protocol: 9,
                        }],
                    },
                );
            }),
            "services[ns/h].ports[0].app_protocol: unknown value 9",
        ),
        (
            Box::new(|w| {
                w.waypoint = Some(xds::GatewayAddress {
                    destination: None,
                    hbone_mtls_port: 15008,
                })
            }),
            "waypoint.destination is required",
        ),
        (
            Box::new(|w| {
                w.network_gateway = Some(xds::GatewayAddress {
                    destination: Some(xds::gateway_address::Destination::Address(
                        xds::NetworkAddress {
                            network: "n".into(),
                            address: vec![1],
                        },
                    )),
                    hbone_mtls_port: 15008,
                })
            }),
            "network_gateway.address.address: 1 bytes",
        ),
    ];
    for (mutate, want) in cases {
        let mut w = xds_pod("ns", "a", "10.0.0.1");
        mutate(&mut w);
        let err = Workload::try_from(w).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}

#[test]
fn invalid_services_are_refused_naming_the_field() {
    let mut s = xds_service("ns", "h", "10.96.0.1");
    s.addresses[0].address = vec![0; 5];
    assert!(
        Service::try_from(s)
            .unwrap_err()
            .to_string()
            .contains("addresses[0].address: 5 bytes")
    );
    let mut s = xds_service("ns", "h", "10.96.0.1");
    s.load_balancing = Some(xds::LoadBalancing {
        routing_preference: vec![42],
        ..Default::default()
    });
    assert!(
        Service::try_from(s)
            .unwrap_err()
            .to_string()
            .contains("load_balancing.routing_preference[0]: unknown value 42")
    );
    let mut s = xds_service("ns", "h", "10.96.0.1");
    s.ports[0].app_protocol = 6;
    assert!(
        Service::try_from(s)
            .unwrap_err()
            .to_string()
            .contains("ports[0].app_protocol: unknown value 6")
    );
    let mut s = xds_service("ns", "h", "10.96.0.1");
    s.hostname.clear();
    assert_eq!(
        Service::try_from(s).unwrap_err().to_string(),
        "hostname is required"
    );
}

#[test]
fn carries_app_protocols_ingress_use_waypoint_and_legacy_mtls() {
    let mut x = xds_service("ns", "web.ns.svc.cluster.local", "10.96.0.1");
    x.ports[0].app_protocol = xds::AppProtocol::Http2 as i32;
    x.ports.push(xds::Port {
        service_port: 81,
        target_port: 81,
        app_protocol: xds::AppProtocol::Unknown as i32,
    });
    x.ports.push(xds::Port {
        service_port: 443,
        target_port: 8443,
        app_protocol: xds::AppProtocol::Tls as i32,
    });
    x.ingress_use_waypoint = true;
    let s = Service::try_from(x).unwrap();
    // UNKNOWN is left out.
    assert_eq!(
        s.app_protocols,
        BTreeMap::from([(80, AppProtocol::Http2), (443, AppProtocol::Tls)])
    );
    assert!(s.ingress_use_waypoint);

    let mut sidecar = xds_pod("ns", "sidecar", "10.0.0.9");
    sidecar.tunnel_protocol = xds::TunnelProtocol::LegacyIstioMtls as i32;
    let sidecar = Workload::try_from(sidecar).unwrap();
    assert_eq!(sidecar.protocol, InboundProtocol::LegacyIstioMtls);

    let store = WorkloadStore::new();
    store.update(|b| {
        b.insert_service(s);
        b.insert_service(service("ns", "plain.ns.svc.cluster.local", "10.96.0.2"));
        b.insert_workload(sidecar);
    });
    let json = serde_json::to_value(store.snapshot().dump()).unwrap();
    assert_eq!(json["workloads"][0]["protocol"], "LegacyIstioMtls");
    let plain = &json["services"][0];
    assert_eq!(plain["hostname"], "plain.ns.svc.cluster.local");
    assert!(plain.get("appProtocols").is_none(), "{plain}");
    assert!(plain.get("ingressUseWaypoint").is_none(), "{plain}");
    let web = &json["services"][1];
    assert_eq!(
        web["appProtocols"],
        serde_json::json!({"80": "HTTP2", "443": "TLS"})
    );
    assert_eq!(web["ingressUseWaypoint"], true);
}

#[test]
fn finds_workloads_by_address_and_uid() {
    let store = WorkloadStore::new();
    store.update(|b| {
        b.insert_workload(pod("ns", "a", "10.0.0.1"));
        b.insert_workload(pod("ns", "b", "10.0.0.2"));
    });
    let s = store.snapshot();
    assert_eq!(s.workload_by_address("", ip("10.0.0.1")).unwrap().name, "a");
    assert!(
        s.workload_by_address("other-network", ip("10.0.0.1"))
            .is_none()
    );
    assert!(s.workload_by_address("", ip("10.0.0.3")).is_none());
    assert_eq!(
        s.workload_by_uid("Kubernetes//Pod/ns/b").unwrap().addresses,
        [ip("10.0.0.2")]
    );

    // Replacing a workload moves its address index with it.
    store.update(|b| b.insert_workload(pod("ns", "a", "10.0.0.9")));
    let s2 = store.snapshot();
    assert!(s2.workload_by_address("", ip("10.0.0.1")).is_none());
    assert_eq!(
        s2.workload_by_address("", ip("10.0.0.9")).unwrap().name,
        "a"
    );
    // The earlier snapshot is untouched.
    assert_eq!(s.workload_by_address("", ip("10.0.0.1")).unwrap().name, "a");

    store.update(|b| assert!(b.remove_address("Kubernetes//Pod/ns/a")));
    assert!(
        store
            .snapshot()
            .workload_by_address("", ip("10.0.0.9"))
            .is_none()
    );
    assert_eq!(store.snapshot().workload_count(), 1);
}

#[test]
fn shared_addresses_prefer_pods_in_the_mesh_and_skip_host_network() {
    let store = WorkloadStore::new();
    let mut entry = pod("ns", "entry", "10.0.0.1");
    entry.uid = "Kubernetes//WorkloadEntry/ns/entry".into();
    let mut plain = pod("ns", "plain", "10.0.0.1");
    plain.protocol = InboundProtocol::Tcp;
    let mut host = pod("ns", "host", "10.0.0.7");
    host.network_mode = NetworkMode::HostNetwork;
    store.update(|b| {
        b.insert_workload(entry);
        b.insert_workload(plain);
        b.insert_workload(pod("ns", "meshed", "10.0.0.1"));
        b.insert_workload(host);
    });
    let s = store.snapshot();
    assert_eq!(
        s.workload_by_address("", ip("10.0.0.1")).unwrap().name,
        "meshed"
    );
    assert!(s.workload_by_address("", ip("10.0.0.7")).is_none());
    assert!(s.workload_by_uid("Kubernetes//Pod/ns/host").is_some());
}

#[test]
fn finds_services_by_vip_and_hostname() {
    let store = WorkloadStore::new();
    let mut other = service("other", "db.example.com", "10.96.0.2");
    other.canonical = true;
    store.update(|b| {
        b.insert_service(service("ns", "web.ns.svc.cluster.local", "10.96.0.1"));
        b.insert_service(service("ns", "db.example.com", "10.96.0.3"));
        b.insert_service(other);
    });
    let s = store.snapshot();
    assert_eq!(
        s.service_by_vip("", ip("10.96.0.1")).unwrap().hostname,
        "web.ns.svc.cluster.local"
    );
    assert!(s.service_by_vip("remote", ip("10.96.0.1")).is_none());
    assert!(matches!(
        s.address("", ip("10.96.0.1")),
        Some(Address::Service(_))
    ));
    let key = NamespacedHostname::new("ns", "web.ns.svc.cluster.local");
    assert_eq!(s.service(&key).unwrap().vips[0].address, ip("10.96.0.1"));
    assert_eq!(s.services_by_hostname("db.example.com").len(), 2);
    assert_eq!(
        s.service_by_hostname("ns", "db.example.com")
            .unwrap()
            .namespace,
        "ns"
    );
    assert_eq!(
        s.service_by_hostname("elsewhere", "db.example.com")
            .unwrap()
            .namespace,
        "other"
    );

    store.update(|b| assert!(b.remove_address("ns/web.ns.svc.cluster.local")));
    let s = store.snapshot();
    assert!(s.service_by_vip("", ip("10.96.0.1")).is_none());
    assert!(s.service(&key).is_none());
    assert!(
        s.services_by_hostname("web.ns.svc.cluster.local")
            .is_empty()
    );
}

#[test]
fn endpoints_follow_workloads_in_any_order_with_their_own_ports() {
    let store = WorkloadStore::new();
    let key = "ns/web.ns.svc.cluster.local";
    // The workloads arrive before their service.
    let mut sick = backing(pod("ns", "sick", "10.0.0.3"), key, &[(80, 0)]);
    sick.status = HealthStatus::Unhealthy;
    store.update(|b| {
        b.insert_workload(backing(pod("ns", "a", "10.0.0.1"), key, &[(80, 9090)]));
        b.insert_workload(backing(pod("ns", "b", "10.0.0.2"), key, &[(80, 0)]));
        b.insert_workload(sick);
    });
    let svc_key: NamespacedHostname = key.parse().unwrap();
    assert_eq!(store.snapshot().endpoints(&svc_key).unwrap().len(), 3);
    store.update(|b| b.insert_service(service("ns", "web.ns.svc.cluster.local", "10.96.0.1")));

    let s = store.snapshot();
    let svc = s.service(&svc_key).unwrap();
    let ready = s.ready_endpoints(&svc);
    let mut ports: Vec<(String, Option<u16>)> = ready
        .iter()
        .map(|e| (e.workload.name.clone(), e.target_port(&svc, 80)))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [("a".to_string(), Some(9090)), ("b".to_string(), Some(8080))]
    );
    assert_eq!(ready[0].target_port(&svc, 443), None);

    // A service that accepts unhealthy endpoints gets all three.
    let mut lenient = service("ns", "web.ns.svc.cluster.local", "10.96.0.1");
    lenient.load_balancing = Some(LoadBalancing {
        routing_preference: vec![],
        mode: LoadBalancingMode::Standard,
        health_policy: HealthPolicy::AllowAll,
    });
    store.update(|b| b.insert_service(lenient));
    let s = store.snapshot();
    assert_eq!(s.ready_endpoints(&s.service(&svc_key).unwrap()).len(), 3);

    // A workload that stops backing the service leaves it.
    store.update(|b| {
        b.insert_workload(pod("ns", "a", "10.0.0.1"));
        b.remove_workload("Kubernetes//Pod/ns/b");
    });
    let eps = store.snapshot().endpoints(&svc_key).unwrap();
    assert_eq!(eps.keys().collect::<Vec<_>>(), ["Kubernetes//Pod/ns/sick"]);
    store.update(|b| b.remove_workload("Kubernetes//Pod/ns/sick"));
    assert!(store.snapshot().endpoints(&svc_key).is_none());
}

#[test]
fn resolves_waypoints_by_hostname_and_address() {
    let store = WorkloadStore::new();
    let mut w = pod("ns", "a", "10.0.0.1");
    w.waypoint = Some(GatewayAddress {
        destination: GatewayDestination::Hostname(NamespacedHostname::new(
            "ns",
            "waypoint.ns.svc.cluster.local",
        )),
        hbone_mtls_port: 15008,
    });
    let mut svc = service("ns", "web.ns.svc.cluster.local", "10.96.0.1");
    svc.waypoint = Some(GatewayAddress {
        destination: GatewayDestination::Address(NetworkAddress {
            network: String::new(),
            address: ip("10.0.0.50"),
        }),
        hbone_mtls_port: 15008,
    });
    store.update(|b| {
        b.insert_workload(w.clone());
        b.insert_service(svc.clone());
        b.insert_service(service("ns", "waypoint.ns.svc.cluster.local", "10.96.0.9"));
        b.insert_workload(pod("ns", "waypoint-pod", "10.0.0.50"));
    });
    let s = store.snapshot();
    match s.workload_waypoint(&w) {
        Some(Address::Service(wp)) => assert_eq!(wp.hostname, "waypoint.ns.svc.cluster.local"),
        other => panic!("expected the waypoint service, got {other:?}"),
    }
    match s.service_waypoint(&svc) {
        Some(Address::Workload(wp)) => assert_eq!(wp.name, "waypoint-pod"),
        other => panic!("expected the waypoint workload, got {other:?}"),
    }
    assert!(s.workload_waypoint(&pod("ns", "b", "10.0.0.2")).is_none());
}

#[test]
fn policies_for_a_workload_are_global_namespace_and_its_selected_ones() {
    let store = WorkloadStore::new();
    store.update(|b| {
        b.insert_policy(policy("istio-system", "mesh", Scope::Global));
        b.insert_policy(policy("ns", "ns-wide", Scope::Namespace));
        b.insert_policy(policy("other", "other-ns", Scope::Namespace));
        b.insert_policy(policy("ns", "selected", Scope::WorkloadSelector));
        b.insert_policy(policy("ns", "not-selected", Scope::WorkloadSelector));
    });
    let mut w = pod("ns", "a", "10.0.0.1");
    w.authorization_policies = vec!["ns/selected".into(), "ns/missing".into()];
    let keys = |w: &Workload| {
        let mut k: Vec<String> = store
            .snapshot()
            .policies_for(w)
            .applied
            .iter()
            .map(|p| p.key())
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&w), ["istio-system/mesh", "ns/ns-wide", "ns/selected"]);
    // The listed key the store does not hold is reported, not skipped.
    assert_eq!(store.snapshot().policies_for(&w).missing, ["ns/missing"]);

    store.update(|b| {
        assert!(b.remove_policy("ns/ns-wide"));
        assert!(!b.remove_policy("ns/never-there"));
    });
    assert_eq!(keys(&w), ["istio-system/mesh", "ns/selected"]);
}

#[test]
fn a_listed_policy_the_store_does_not_hold_denies_until_it_arrives() {
    let store = WorkloadStore::new();
    let allow_all = Authorization {
        rules: vec![vec![]],
        action: crate::authorization::Action::Allow,
        ..policy("ns", "selected", Scope::WorkloadSelector)
    };
    let mut w = pod("ns", "a", "10.0.0.1");
    w.authorization_policies = vec!["ns/selected".into()];
    let conn = crate::authorization::ConnectionInfo {
        source_ip: "10.0.0.9".parse().unwrap(),
        source_identity: None,
        destination: "10.0.0.1:80".parse().unwrap(),
    };
    let decision = store.snapshot().policies_for(&w).check(&conn);
    assert_eq!(
        decision,
        crate::authorization::Decision::MissingPolicy {
            policy: "ns/selected".into()
        }
    );
    assert!(!decision.is_allowed());
    assert!(
        decision.to_string().contains("failing closed"),
        "{decision}"
    );

    store.update(|b| b.insert_policy(allow_all));
    assert!(store.snapshot().policies_for(&w).check(&conn).is_allowed());
}

#[test]
fn one_update_among_many_copies_only_the_touched_shards() {
    let store = WorkloadStore::new();
    store.update(|b| {
        for i in 0..10_000u32 {
            let [_, _, hi, lo] = i.to_be_bytes();
            let w = pod("ns", &format!("p{i}"), &format!("10.1.{hi}.{lo}"));
            b.insert_workload(backing(w, &format!("ns/s{}", i % 1000), &[(80, 8080)]));
        }
    });
    let before = store.snapshot();
    store.update(|b| b.insert_workload(pod("ns", "p42", "10.9.9.9")));
    let after = store.snapshot();
    // Re-inserting one workload touches one shard of each index it is in
    // (by uid; its old and new IP; its old service's endpoints).
    assert!(after.workloads.shared_shards(&before.workloads) >= 63);
    assert!(after.workloads_by_ip.shared_shards(&before.workloads_by_ip) >= 62);
    assert!(after.endpoints.shared_shards(&before.endpoints) >= 63);
    assert!(after.services.shared_shards(&before.services) == 64);
    assert_eq!(after.workload_count(), 10_000);
    assert_eq!(
        after.endpoints(&"ns/s42".parse().unwrap()).map(|e| e.len()),
        Some(9)
    );
}

#[test]
fn the_dump_has_upstream_keys_and_shapes() {
    let store = WorkloadStore::new();
    let key = "ns/web.ns.svc.cluster.local";
    store.update(|b| {
        b.insert_workload(backing(pod("ns", "a", "10.0.0.1"), key, &[(80, 9090)]));
        b.insert_workload(backing(pod("ns", "b", "10.0.0.2"), "ns/later", &[(80, 1)]));
        b.insert_service(service("ns", "web.ns.svc.cluster.local", "10.96.0.1"));
        b.insert_policy(policy("ns", "deny", Scope::Namespace));
    });
    let json = serde_json::to_value(store.snapshot().dump()).unwrap();
    let w = &json["workloads"][0];
    assert_eq!(w["uid"], "Kubernetes//Pod/ns/a");
    assert_eq!(w["workloadIps"], serde_json::json!(["10.0.0.1"]));
    assert_eq!(w["protocol"], "HBONE");
    assert_eq!(w["trustDomain"], "cluster.local");
    assert_eq!(w["serviceAccount"], "sa");
    assert_eq!(w["status"], "Healthy");
    assert_eq!(w["clusterId"], "Kubernetes");
    assert_eq!(w["workloadType"], "deployment");
    assert_eq!(w["services"], serde_json::json!([key]));
    let s = &json["services"][0];
    assert_eq!(s["hostname"], "web.ns.svc.cluster.local");
    assert_eq!(s["vips"], serde_json::json!(["/10.96.0.1"]));
    assert_eq!(s["ports"], serde_json::json!({"80": 8080}));
    assert_eq!(
        s["endpoints"]["Kubernetes//Pod/ns/a"],
        serde_json::json!({"workloadUid": "Kubernetes//Pod/ns/a", "port": {"80": 9090}, "status": "Healthy"})
    );
    assert_eq!(
        json["policies"][0],
        serde_json::json!({"name": "deny", "namespace": "ns", "scope": "Namespace", "action": "Deny", "rules": [], "dryRun": false})
    );
    assert!(json["stagedServices"]["ns/later"]["Kubernetes//Pod/ns/b"].is_object());
    let _: BTreeMap<String, serde_json::Value> = serde_json::from_value(json).unwrap();
}

#[tokio::test]
async fn waiting_for_a_workload_returns_when_a_batch_brings_it_or_gives_up() {
    let store = WorkloadStore::new();
    let find = |s: &Snapshot| s.workload_by_uid(&pod("ns", "late", "10.0.0.7").uid);
    // Not there and nothing comes: gives up after the deadline.
    assert!(
        store
            .wait_for(std::time::Duration::from_millis(20), find)
            .await
            .is_none()
    );
    // Arrives while waiting.
    let writer = store.clone();
    let waiting = tokio::spawn(async move {
        store
            .wait_for(std::time::Duration::from_secs(30), find)
            .await
            .map(|w| w.name.clone())
    });
    tokio::task::yield_now().await;
    writer.update(|b| b.insert_workload(pod("ns", "other", "10.0.0.8")));
    writer.update(|b| b.insert_workload(pod("ns", "late", "10.0.0.7")));
    assert_eq!(waiting.await.unwrap().as_deref(), Some("late"));
}

#[tokio::test]
async fn synced_is_set_once_and_stays() {
    let store = WorkloadStore::new();
    assert!(!store.is_synced());
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.synced().await })
    };
    store.mark_synced();
    waiter.await.unwrap();
    store.mark_synced();
    assert!(store.is_synced());
    // An update after sync does not unset it.
    store.update(|b| b.insert_workload(pod("ns", "a", "10.0.0.1")));
    assert!(store.is_synced());
}
