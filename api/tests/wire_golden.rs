//! Golden wire tests: fully populated messages must encode to bytes built
//! here by hand from upstream Istio's field numbers (a tiny independent
//! encoder, no prost). A renumbered or retyped field fails these tests.
//! Field numbers are the literals in the `f(..)` calls below.

use api::{ca, discovery, security, workload, zds};
use prost::Message;

// --- a minimal protobuf encoder, independent of prost ---

const VARINT: u64 = 0;
const LEN: u64 = 2;

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Field `n` as a varint (ints, enums, bools).
fn v(n: u64, value: u64) -> Vec<u8> {
    let mut out = varint((n << 3) | VARINT);
    out.extend(varint(value));
    out
}

/// Field `n` as length-delimited bytes (strings, bytes, messages, packed).
fn f(n: u64, body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut out = varint((n << 3) | LEN);
    out.extend(varint(body.len() as u64));
    out.extend(body);
    out
}

/// Packed repeated varints.
fn packed(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|x| varint(*x)).collect()
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn assert_wire<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, want: Vec<u8>) {
    let got = msg.encode_to_vec();
    assert_eq!(
        hex(&got),
        hex(&want),
        "encoding differs from the upstream field layout"
    );
    assert_eq!(&M::decode(want.as_slice()).unwrap(), msg);
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

const V4: [u8; 4] = [10, 0, 0, 5];
const V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
const WAYPOINT_IP: [u8; 4] = [10, 0, 0, 9];
const EMPTY_URL: &str = "type.googleapis.com/google.protobuf.Empty";

fn extension() -> workload::Extension {
    workload::Extension {
        name: "ext".into(),
        config: Some(prost_types::Any {
            type_url: EMPTY_URL.into(),
            value: vec![],
        }),
    }
}

fn extension_wire() -> Vec<u8> {
    // Extension: name = 1, config = 2 (Any: type_url = 1, value = 2)
    cat(&[f(1, "ext"), f(2, f(1, EMPTY_URL))])
}

fn waypoint() -> workload::GatewayAddress {
    workload::GatewayAddress {
        destination: Some(workload::gateway_address::Destination::Address(
            workload::NetworkAddress {
                network: "net1".into(),
                address: WAYPOINT_IP.to_vec(),
            },
        )),
        hbone_mtls_port: 15008,
    }
}

fn waypoint_wire() -> Vec<u8> {
    // GatewayAddress: address = 2 (NetworkAddress: network = 1, address = 2), hbone_mtls_port = 3
    cat(&[f(2, cat(&[f(1, "net1"), f(2, WAYPOINT_IP)])), v(3, 15008)])
}

#[test]
fn workload_matches_upstream_field_numbers() {
    use workload::*;
    let w = Workload {
        name: "productpage-v1-abc".into(),
        namespace: "bookinfo".into(),
        addresses: vec![V4.to_vec(), V6.to_vec()],
        network: "net1".into(),
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: "bookinfo-productpage".into(),
        waypoint: Some(waypoint()),
        node: "node-1".into(),
        canonical_name: "productpage".into(),
        canonical_revision: "v1".into(),
        workload_type: WorkloadType::Pod as i32,
        workload_name: "productpage-v1".into(),
        native_tunnel: true,
        authorization_policies: vec!["bookinfo/allow-gw".into()],
        status: WorkloadStatus::Unhealthy as i32,
        cluster_id: "Kubernetes".into(),
        network_gateway: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "istio-system".into(),
                hostname: "eastwest.istio-system.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 15008,
        }),
        uid: "Kubernetes//Pod/bookinfo/productpage-v1-abc".into(),
        hostname: "pp.example.com".into(),
        services: [(
            "bookinfo/productpage.bookinfo.svc.cluster.local".to_string(),
            PortList {
                ports: vec![Port {
                    service_port: 9080,
                    target_port: 9081,
                }],
            },
        )]
        .into(),
        application_tunnel: Some(ApplicationTunnel {
            protocol: application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        locality: Some(Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into(),
        }),
        network_mode: NetworkMode::HostNetwork as i32,
        extensions: vec![extension()],
        capacity: Some(3),
    };
    let want = cat(&[
        f(1, "productpage-v1-abc"),
        f(2, "bookinfo"),
        f(3, V4),
        f(3, V6),
        f(4, "net1"),
        v(5, 1), // HBONE
        f(6, "cluster.local"),
        f(7, "bookinfo-productpage"),
        f(8, waypoint_wire()),
        f(9, "node-1"),
        f(10, "productpage"),
        f(11, "v1"),
        v(12, 2), // POD
        f(13, "productpage-v1"),
        v(14, 1),
        f(16, "bookinfo/allow-gw"),
        v(17, 1), // UNHEALTHY
        f(18, "Kubernetes"),
        // NamespacedHostname: namespace = 1, hostname = 2, under GatewayAddress.hostname = 1
        f(
            19,
            cat(&[
                f(
                    1,
                    cat(&[
                        f(1, "istio-system"),
                        f(2, "eastwest.istio-system.svc.cluster.local"),
                    ]),
                ),
                v(3, 15008),
            ]),
        ),
        f(20, "Kubernetes//Pod/bookinfo/productpage-v1-abc"),
        f(21, "pp.example.com"),
        // map entry: key = 1, value = 2 (PortList.ports = 1; Port: service_port = 1, target_port = 2)
        f(
            22,
            cat(&[
                f(1, "bookinfo/productpage.bookinfo.svc.cluster.local"),
                f(2, f(1, cat(&[v(1, 9080), v(2, 9081)]))),
            ]),
        ),
        f(23, cat(&[v(1, 1), v(2, 15088)])), // ApplicationTunnel: protocol = 1 (PROXY), port = 2
        f(24, cat(&[f(1, "r"), f(2, "z"), f(3, "s")])),
        v(25, 1), // HOST_NETWORK
        f(26, extension_wire()),
        f(27, v(1, 3)), // UInt32Value.value = 1
    ]);
    assert_wire(&w, want.clone());

    // Wrapped in Address: workload = 1.
    let addr = Address {
        r#type: Some(address::Type::Workload(w)),
    };
    assert_wire(&addr, f(1, want));
}

#[test]
fn service_matches_upstream_field_numbers() {
    use workload::*;
    let s = Service {
        name: "productpage".into(),
        namespace: "bookinfo".into(),
        hostname: "productpage.bookinfo.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: "net1".into(),
            address: vec![10, 96, 0, 10],
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 9080,
        }],
        subject_alt_names: vec!["spiffe://cluster.local/ns/bookinfo/sa/pp".into()],
        waypoint: Some(waypoint()),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![
                load_balancing::Scope::Zone as i32,
                load_balancing::Scope::Node as i32,
            ],
            mode: load_balancing::Mode::Failover as i32,
            health_policy: load_balancing::HealthPolicy::AllowAll as i32,
            dns_connect_strategy: load_balancing::DnsConnectStrategy::FirstHealthyRace as i32,
        }),
        ip_families: IpFamilies::Dual as i32,
        extensions: vec![extension()],
        canonical: true,
    };
    let want = cat(&[
        f(1, "productpage"),
        f(2, "bookinfo"),
        f(3, "productpage.bookinfo.svc.cluster.local"),
        f(4, cat(&[f(1, "net1"), f(2, [10, 96, 0, 10])])),
        f(5, cat(&[v(1, 80), v(2, 9080)])),
        f(6, "spiffe://cluster.local/ns/bookinfo/sa/pp"),
        f(7, waypoint_wire()),
        // LoadBalancing: routing_preference = 1 (packed: ZONE 2, NODE 4), mode = 2 (FAILOVER 2),
        // health_policy = 3 (ALLOW_ALL 1), dns_connect_strategy = 4 (FIRST_HEALTHY_RACE 1)
        f(8, cat(&[f(1, packed(&[2, 4])), v(2, 2), v(3, 1), v(4, 1)])),
        v(9, 3), // DUAL
        f(10, extension_wire()),
        v(11, 1),
    ]);
    assert_wire(&s, want.clone());
    let addr = Address {
        r#type: Some(address::Type::Service(s)),
    };
    assert_wire(&addr, f(2, want));
}

#[test]
fn authorization_matches_upstream_field_numbers() {
    use security::*;
    let sm = |m: string_match::MatchType| StringMatch {
        match_type: Some(m),
    };
    let cidr = |a: [u8; 4], l| security::Address {
        address: a.to_vec(),
        length: l,
    };
    let sa = |ns: &str, sa: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    let m = Match {
        namespaces: vec![sm(string_match::MatchType::Exact("foo".into()))],
        not_namespaces: vec![sm(string_match::MatchType::Prefix("kube-".into()))],
        principals: vec![sm(string_match::MatchType::Suffix("/sa/admin".into()))],
        not_principals: vec![sm(string_match::MatchType::Presence(()))],
        source_ips: vec![cidr([10, 0, 0, 0], 8)],
        not_source_ips: vec![cidr([10, 1, 0, 0], 16)],
        destination_ips: vec![cidr([10, 2, 0, 1], 32)],
        not_destination_ips: vec![cidr([10, 3, 0, 0], 24)],
        destination_ports: vec![80, 443],
        not_destination_ports: vec![22],
        service_accounts: vec![sa("ns1", "sa1")],
        not_service_accounts: vec![sa("ns2", "sa2")],
    };
    let auth = Authorization {
        name: "deny-foo".into(),
        namespace: "bookinfo".into(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        groups: vec![Group {
            rules: vec![Rules { matches: vec![m] }],
        }],
    };
    let addr = |a: [u8; 4], l| cat(&[f(1, a), v(2, l)]);
    let match_wire = cat(&[
        f(1, f(1, "foo")),       // StringMatch.exact = 1
        f(2, f(2, "kube-")),     // prefix = 2
        f(3, f(3, "/sa/admin")), // suffix = 3
        f(4, f(4, [])),          // presence = 4 (Empty)
        f(5, addr([10, 0, 0, 0], 8)),
        f(6, addr([10, 1, 0, 0], 16)),
        f(7, addr([10, 2, 0, 1], 32)),
        f(8, addr([10, 3, 0, 0], 24)),
        f(9, packed(&[80, 443])),
        f(10, packed(&[22])),
        f(11, cat(&[f(1, "ns1"), f(2, "sa1")])),
        f(12, cat(&[f(1, "ns2"), f(2, "sa2")])),
    ]);
    let want = cat(&[
        f(1, "deny-foo"),
        f(2, "bookinfo"),
        v(3, 2), // WORKLOAD_SELECTOR
        v(4, 1), // DENY
        // groups = 5 -> Group.rules = 1 -> Rules.matches = 2
        f(5, f(1, f(2, match_wire))),
    ]);
    assert_wire(&auth, want);
}

#[test]
fn delta_discovery_matches_upstream_field_numbers() {
    use discovery::*;
    let req = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local".into(),
            cluster: "Kubernetes".into(),
            metadata: None,
            build_version: String::new(),
        }),
        type_url: api::type_url::ADDRESS.into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["gone".into()],
        initial_resource_versions: [("a".to_string(), "v1".to_string())].into(),
        response_nonce: "n1".into(),
        error_detail: Some(api::rpc::Status {
            code: 3,
            message: "bad".into(),
            details: vec![],
        }),
    };
    let want = cat(&[
        f(
            1,
            cat(&[
                f(
                    1,
                    "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local",
                ),
                f(2, "Kubernetes"),
            ]),
        ),
        f(2, "type.googleapis.com/istio.workload.Address"),
        f(3, "*"),
        f(4, "gone"),
        f(5, cat(&[f(1, "a"), f(2, "v1")])),
        f(6, "n1"),
        f(7, cat(&[v(1, 3), f(2, "bad")])),
    ]);
    assert_wire(&req, want);

    let resp = DeltaDiscoveryResponse {
        system_version_info: "sv".into(),
        resources: vec![Resource {
            version: "h1".into(),
            resource: Some(prost_types::Any {
                type_url: api::type_url::AUTHORIZATION.into(),
                value: vec![0x0a, 0x01, b'x'],
            }),
            name: "ns/p".into(),
            aliases: vec![],
            ttl: None,
            cache_control: None,
        }],
        type_url: api::type_url::AUTHORIZATION.into(),
        nonce: "n2".into(),
        removed_resources: vec!["ns/old".into()],
    };
    let want = cat(&[
        f(1, "sv"),
        f(
            2,
            cat(&[
                f(1, "h1"),
                f(
                    2,
                    cat(&[
                        f(1, "type.googleapis.com/istio.security.Authorization"),
                        f(2, [0x0a, 0x01, b'x']),
                    ]),
                ),
                f(3, "ns/p"),
            ]),
        ),
        f(4, "type.googleapis.com/istio.security.Authorization"),
        f(5, "n2"),
        f(6, "ns/old"),
    ]);
    assert_wire(&resp, want);
}

#[test]
fn ca_request_matches_upstream_field_numbers() {
    use prost_types::{Struct, Value, value::Kind};
    let req = ca::IstioCertificateRequest {
        csr: "PEM".into(),
        validity_duration: 3600,
        metadata: Some(Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue("spiffe://cluster.local/ns/a/sa/b".into())),
                },
            )]
            .into(),
        }),
    };
    // Struct.fields = 1 (map<string, Value>); Value.string_value = 3
    let want = cat(&[
        f(1, "PEM"),
        v(3, 3600),
        f(
            4,
            f(
                1,
                cat(&[
                    f(1, "ImpersonatedIdentity"),
                    f(2, f(3, "spiffe://cluster.local/ns/a/sa/b")),
                ]),
            ),
        ),
    ]);
    assert_wire(&req, want);
    let resp = ca::IstioCertificateResponse {
        cert_chain: vec!["leaf".into(), "root".into()],
    };
    assert_wire(&resp, cat(&[f(1, "leaf"), f(1, "root")]));
}

#[test]
fn zds_matches_upstream_field_numbers() {
    use zds::*;
    let add = WorkloadRequest {
        payload: Some(workload_request::Payload::Add(AddWorkload {
            uid: "pod-uid".into(),
            workload_info: Some(WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        })),
    };
    assert_wire(
        &add,
        f(
            1,
            cat(&[
                f(1, "pod-uid"),
                f(2, cat(&[f(1, "p"), f(2, "ns"), f(3, "sa")])),
            ]),
        ),
    );
    let keep = WorkloadRequest {
        payload: Some(workload_request::Payload::Keep(KeepWorkload {
            uid: "u".into(),
        })),
    };
    assert_wire(&keep, f(5, f(1, "u")));
    let del = WorkloadRequest {
        payload: Some(workload_request::Payload::Del(DelWorkload {
            uid: "u".into(),
        })),
    };
    assert_wire(&del, f(2, f(2, "u"))); // DelWorkload.uid is field 2 upstream
    let snap = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    assert_wire(&snap, f(3, []));
    let ack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: "no netns".into(),
        })),
    };
    assert_wire(&ack, f(1, f(1, "no netns")));
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    assert_wire(&hello, v(1, 1));
}
