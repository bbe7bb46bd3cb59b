//! Golden wire tests: fully populated messages must encode to bytes built
//! here by hand from upstream Istio's field numbers (a tiny independent
//! encoder, no prost). A renumbered or retyped field fails these tests.
//! Field numbers are the literals in the `f(..)` calls below.

use api::{ca, discovery, l7, security, workload, zds};
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
                    app_protocol: AppProtocol::Grpc as i32,
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
        // map entry: key = 1, value = 2 (PortList.ports = 1; Port: service_port = 1,
        // target_port = 2, app_protocol = 3)
        f(
            22,
            cat(&[
                f(1, "bookinfo/productpage.bookinfo.svc.cluster.local"),
                f(2, f(1, cat(&[v(1, 9080), v(2, 9081), v(3, 3)]))), // GRPC 3
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
            app_protocol: AppProtocol::Http2 as i32,
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
        ingress_use_waypoint: true,
    };
    let want = cat(&[
        f(1, "productpage"),
        f(2, "bookinfo"),
        f(3, "productpage.bookinfo.svc.cluster.local"),
        f(4, cat(&[f(1, "net1"), f(2, [10, 96, 0, 10])])),
        f(5, cat(&[v(1, 80), v(2, 9080), v(3, 2)])), // Port.app_protocol = 3: HTTP2 2
        f(6, "spiffe://cluster.local/ns/bookinfo/sa/pp"),
        f(7, waypoint_wire()),
        // LoadBalancing: routing_preference = 1 (packed: ZONE 2, NODE 4), mode = 2 (FAILOVER 2),
        // health_policy = 3 (ALLOW_ALL 1), dns_connect_strategy = 4 (FIRST_HEALTHY_RACE 1)
        f(8, cat(&[f(1, packed(&[2, 4])), v(2, 2), v(3, 1), v(4, 1)])),
        v(9, 3), // DUAL
        f(10, extension_wire()),
        v(11, 1), // canonical
        v(12, 1), // ingress_use_waypoint
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
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
        dry_run: true,
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
        // rules = 5 -> Rule.clauses = 1 -> Clause.matches = 2
        f(5, f(1, f(2, match_wire))),
        v(6, 1), // dry_run
    ]);
    assert_wire(&auth, want);
}

/// Every enum value the workload API defines beyond those the messages
/// above use, each against its upstream number.
#[test]
fn workload_enum_values_match_upstream() {
    use workload::*;
    let tunnel = |t: TunnelProtocol| Workload {
        tunnel_protocol: t as i32,
        ..Default::default()
    };
    assert_wire(&tunnel(TunnelProtocol::None), vec![]);
    assert_wire(&tunnel(TunnelProtocol::LegacyIstioMtls), v(5, 2));
    for (p, n) in [
        (AppProtocol::Unknown, 0),
        (AppProtocol::Http11, 1),
        (AppProtocol::Http2, 2),
        (AppProtocol::Grpc, 3),
        (AppProtocol::Tcp, 4),
        (AppProtocol::Tls, 5),
    ] {
        let port = Port {
            service_port: 1,
            target_port: 0,
            app_protocol: p as i32,
        };
        let want = if n == 0 {
            v(1, 1)
        } else {
            cat(&[v(1, 1), v(3, n)])
        };
        assert_wire(&port, want);
    }
    for (s, n) in [
        (load_balancing::Scope::Region, 1),
        (load_balancing::Scope::Subzone, 3),
        (load_balancing::Scope::Cluster, 5),
        (load_balancing::Scope::Network, 6),
    ] {
        let lb = LoadBalancing {
            routing_preference: vec![s as i32],
            mode: load_balancing::Mode::Passthrough as i32,
            health_policy: 0,
            dns_connect_strategy: 0,
        };
        assert_wire(&lb, cat(&[f(1, packed(&[n])), v(2, 3)]));
    }
    for (family, n) in [(IpFamilies::Ipv4Only, 1), (IpFamilies::Ipv6Only, 2)] {
        let s = Service {
            ip_families: family as i32,
            ..Default::default()
        };
        assert_wire(&s, v(9, n));
    }
    for (t, n) in [
        (WorkloadType::Deployment, 0),
        (WorkloadType::Cronjob, 1),
        (WorkloadType::Job, 3),
    ] {
        let w = Workload {
            workload_type: t as i32,
            ..Default::default()
        };
        assert_wire(&w, if n == 0 { vec![] } else { v(12, n) });
    }
    let allow = security::Authorization {
        scope: security::Scope::Namespace as i32,
        action: security::Action::Allow as i32,
        ..Default::default()
    };
    assert_wire(&allow, v(3, 1)); // NAMESPACE 1; ALLOW 0 is not encoded
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

/// The state-of-the-world messages and the fields the delta test leaves
/// unset (Node.metadata / build_version, Resource.aliases / ttl /
/// cache_control, Status.details), against Envoy's numbers.
#[test]
fn sotw_discovery_and_remaining_fields_match_upstream_field_numbers() {
    use discovery::*;
    use prost_types::{Struct, Value, value::Kind};
    let node = Node {
        id: "n".into(),
        cluster: "c".into(),
        metadata: Some(Struct {
            fields: [(
                "ISTIO_VERSION".to_string(),
                Value {
                    kind: Some(Kind::StringValue("1".into())),
                },
            )]
            .into(),
        }),
        build_version: "b".into(),
    };
    // Node: id = 1, cluster = 2, metadata = 3 (Struct.fields = 1, Value.string_value = 3),
    // build_version = 5 (4 is reserved)
    let node_wire = cat(&[
        f(1, "n"),
        f(2, "c"),
        f(3, f(1, cat(&[f(1, "ISTIO_VERSION"), f(2, f(3, "1"))]))),
        f(5, "b"),
    ]);
    let status = api::rpc::Status {
        code: 13,
        message: "m".into(),
        details: vec![prost_types::Any {
            type_url: EMPTY_URL.into(),
            value: vec![],
        }],
    };
    // Status: code = 1, message = 2, details = 3
    let status_wire = cat(&[v(1, 13), f(2, "m"), f(3, f(1, EMPTY_URL))]);
    let req = DiscoveryRequest {
        version_info: "v1".into(),
        node: Some(node),
        resource_names: vec!["a".into(), "b".into()],
        type_url: api::type_url::ADDRESS.into(),
        response_nonce: "n1".into(),
        error_detail: Some(status),
    };
    assert_wire(
        &req,
        cat(&[
            f(1, "v1"),
            f(2, node_wire),
            f(3, "a"),
            f(3, "b"),
            f(4, "type.googleapis.com/istio.workload.Address"),
            f(5, "n1"),
            f(6, status_wire),
        ]),
    );
    let resp = DiscoveryResponse {
        version_info: "v2".into(),
        resources: vec![prost_types::Any {
            type_url: EMPTY_URL.into(),
            value: vec![],
        }],
        canary: true,
        type_url: api::type_url::ADDRESS.into(),
        nonce: "n2".into(),
    };
    assert_wire(
        &resp,
        cat(&[
            f(1, "v2"),
            f(2, f(1, EMPTY_URL)),
            v(3, 1),
            f(4, "type.googleapis.com/istio.workload.Address"),
            f(5, "n2"),
        ]),
    );
    let resource = Resource {
        version: "h".into(),
        resource: None,
        name: "ns/x".into(),
        aliases: vec!["alias".into()],
        ttl: Some(duration(30, 5)),
        cache_control: Some(resource::CacheControl { do_not_cache: true }),
    };
    // Resource: version = 1, name = 3, aliases = 4, ttl = 6 (Duration: seconds = 1,
    // nanos = 2), cache_control = 7 (do_not_cache = 1)
    assert_wire(
        &resource,
        cat(&[
            f(1, "h"),
            f(3, "ns/x"),
            f(4, "alias"),
            f(6, duration_wire(30, 5)),
            f(7, v(1, 1)),
        ]),
    );
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

// --- our own L7 contract (api/proto/l7.proto): its field numbers are a
// contract with deployed waypoints, pinned here the same way ---

fn string_match_wire() -> (Vec<security::StringMatch>, Vec<u8>) {
    use security::string_match::MatchType;
    let sm = |m: MatchType| security::StringMatch {
        match_type: Some(m),
    };
    (
        vec![
            sm(MatchType::Exact("e".into())),
            sm(MatchType::Prefix("p".into())),
            sm(MatchType::Suffix("s".into())),
            sm(MatchType::Presence(())),
        ],
        // one StringMatch per variant: exact = 1, prefix = 2, suffix = 3, presence = 4
        cat(&[f(1, "e"), f(2, "p"), f(3, "s"), f(4, [])]),
    )
}

/// `n` repeated StringMatch fields, one element per variant.
fn string_matches(n: u64) -> Vec<u8> {
    cat(&[
        f(n, f(1, "e")),
        f(n, f(2, "p")),
        f(n, f(3, "s")),
        f(n, f(4, [])),
    ])
}

fn l7_addr(a: [u8; 4], l: u32) -> security::Address {
    security::Address {
        address: a.to_vec(),
        length: l,
    }
}

fn l7_addr_wire(a: [u8; 4], l: u64) -> Vec<u8> {
    cat(&[f(1, a), v(2, l)])
}

fn duration(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

/// google.protobuf.Duration: seconds = 1, nanos = 2 (zero values omitted).
fn duration_wire(seconds: u64, nanos: u64) -> Vec<u8> {
    if nanos == 0 {
        return v(1, seconds);
    }
    cat(&[v(1, seconds), v(2, nanos)])
}

#[test]
fn l7_http_authorization_field_numbers() {
    use l7::condition::Key;
    use l7::*;
    let (sms, _) = string_match_wire();
    let source = RequestSource {
        principals: sms.clone(),
        not_principals: sms.clone(),
        request_principals: sms.clone(),
        not_request_principals: sms.clone(),
        namespaces: sms.clone(),
        not_namespaces: sms.clone(),
        ip_blocks: vec![l7_addr([10, 0, 0, 0], 8)],
        not_ip_blocks: vec![l7_addr([10, 1, 0, 0], 16)],
        remote_ip_blocks: vec![l7_addr([10, 2, 0, 0], 16)],
        not_remote_ip_blocks: vec![l7_addr([10, 3, 0, 0], 24)],
    };
    let source_wire = cat(&[
        string_matches(1),
        string_matches(2),
        string_matches(3),
        string_matches(4),
        string_matches(5),
        string_matches(6),
        f(7, l7_addr_wire([10, 0, 0, 0], 8)),
        f(8, l7_addr_wire([10, 1, 0, 0], 16)),
        f(9, l7_addr_wire([10, 2, 0, 0], 16)),
        f(10, l7_addr_wire([10, 3, 0, 0], 24)),
    ]);
    let pattern = |m: security::StringMatch| PathPattern {
        kind: Some(path_pattern::Kind::Match(m)),
    };
    let template = PathPattern {
        kind: Some(path_pattern::Kind::Template(PathTemplate {
            segments: vec!["api".into(), "{*}".into(), "{**}".into()],
        })),
    };
    let operation = RequestOperation {
        hosts: sms.clone(),
        not_hosts: sms.clone(),
        ports: vec![80, 8080],
        not_ports: vec![22],
        methods: sms.clone(),
        not_methods: sms.clone(),
        paths: vec![pattern(sms[0].clone()), template.clone()],
        not_paths: vec![pattern(sms[3].clone())],
    };
    // PathPattern: match = 1, template = 2 (PathTemplate.segments = 1)
    let template_wire = f(2, cat(&[f(1, "api"), f(1, "{*}"), f(1, "{**}")]));
    let operation_wire = cat(&[
        string_matches(1),
        string_matches(2),
        f(3, packed(&[80, 8080])),
        f(4, packed(&[22])),
        string_matches(5),
        string_matches(6),
        f(7, f(1, f(1, "e"))),
        f(7, template_wire),
        f(8, f(1, f(4, []))),
    ]);
    // One Condition per key variant; values = 13, not_values = 14,
    // ip_values = 15, not_ip_values = 16.
    let condition = |key: Key| Condition {
        key: Some(key),
        values: vec![sms[0].clone()],
        not_values: vec![sms[1].clone()],
        ip_values: vec![l7_addr([10, 0, 0, 1], 32)],
        not_ip_values: vec![l7_addr([10, 0, 0, 2], 32)],
    };
    let condition_tail = cat(&[
        f(13, f(1, "e")),
        f(14, f(2, "p")),
        f(15, l7_addr_wire([10, 0, 0, 1], 32)),
        f(16, l7_addr_wire([10, 0, 0, 2], 32)),
    ]);
    let keys = vec![
        (Key::RequestHeader("x-user".into()), f(1, "x-user")),
        (
            Key::RequestClaim(ClaimPath {
                path: vec!["org".into(), "team".into()],
            }),
            f(2, cat(&[f(1, "org"), f(1, "team")])),
        ),
        (Key::RequestPrincipal(true), v(3, 1)),
        (Key::RequestAudiences(true), v(4, 1)),
        (Key::RequestPresenter(true), v(5, 1)),
        (Key::SourceIp(true), v(6, 1)),
        (Key::RemoteIp(true), v(7, 1)),
        (Key::SourceNamespace(true), v(8, 1)),
        (Key::SourcePrincipal(true), v(9, 1)),
        (Key::DestinationIp(true), v(10, 1)),
        (Key::DestinationPort(true), v(11, 1)),
        (Key::ConnectionSni(true), v(12, 1)),
    ];
    let when: Vec<Condition> = keys.iter().map(|(k, _)| condition(k.clone())).collect();
    let when_wire: Vec<Vec<u8>> = keys
        .iter()
        .map(|(_, w)| f(3, cat(&[w.clone(), condition_tail.clone()])))
        .collect();
    let policy = HttpAuthorization {
        namespace: "shop".into(),
        name: "deny-delete".into(),
        action: Action::Deny as i32,
        rules: vec![Rule {
            from: vec![source],
            to: vec![operation],
            when,
        }],
        problems: vec!["rules[1]: unknown key".into()],
    };
    let rule_wire = cat(&[f(1, source_wire), f(2, operation_wire), cat(&when_wire)]);
    let want = cat(&[
        f(1, "shop"),
        f(2, "deny-delete"),
        v(3, 1), // DENY
        f(4, rule_wire),
        f(5, "rules[1]: unknown key"),
    ]);
    assert_wire(&policy, want);
}

#[test]
fn l7_jwt_authentication_field_numbers() {
    use l7::*;
    let auth = JwtAuthentication {
        namespace: "shop".into(),
        name: "jwt".into(),
        rules: vec![JwtRule {
            issuer: "https://issuer.example".into(),
            audiences: vec!["reviews".into(), "ratings".into()],
            jwks: r#"{"keys":[]}"#.into(),
            jwks_error: "fetch failed".into(),
            from_headers: vec![JwtHeader {
                name: "x-jwt".into(),
                prefix: "Bearer ".into(),
            }],
            from_params: vec!["token".into()],
            from_cookies: vec!["session".into()],
            forward_original_token: true,
            output_payload_to_header: "x-payload".into(),
            output_claim_to_headers: vec![ClaimToHeader {
                header: "x-sub".into(),
                claim: "sub".into(),
            }],
        }],
    };
    let rule_wire = cat(&[
        f(1, "https://issuer.example"),
        f(2, "reviews"),
        f(2, "ratings"),
        f(3, r#"{"keys":[]}"#),
        f(4, "fetch failed"),
        f(5, cat(&[f(1, "x-jwt"), f(2, "Bearer ")])),
        f(6, "token"),
        f(7, "session"),
        v(8, 1),
        f(9, "x-payload"),
        f(10, cat(&[f(1, "x-sub"), f(2, "sub")])),
    ]);
    let want = cat(&[f(1, "shop"), f(2, "jwt"), f(3, rule_wire)]);
    assert_wire(&auth, want);
}

#[test]
fn l7_waypoint_field_numbers() {
    use l7::*;
    let port = |p, protocol: Protocol| ServedPort {
        port: p,
        protocol: protocol as i32,
    };
    let w = Waypoint {
        namespace: "shop".into(),
        name: "waypoint".into(),
        services: vec![ServedService {
            namespace: "shop".into(),
            hostname: "reviews.shop.svc.cluster.local".into(),
            ports: vec![port(80, Protocol::Http), port(9090, Protocol::Grpc)],
            route_table: "shop/reviews.shop.svc.cluster.local".into(),
            authorizations: vec!["shop/deny-delete".into()],
            authentications: vec!["shop/jwt".into()],
            deny_all_reason: "route could not be served".into(),
        }],
        workloads: vec![ServedWorkload {
            uid: "Kubernetes//Pod/shop/db-0".into(),
            addresses: vec![V4.to_vec()],
            ports: vec![port(5432, Protocol::Tcp), port(8080, Protocol::Http2)],
            authorizations: vec!["shop/db".into()],
            authentications: vec!["shop/jwt-db".into()],
            deny_all_reason: "no".into(),
        }],
        gateway_authorizations: vec!["shop/gw".into()],
        gateway_authentications: vec!["shop/gw-jwt".into()],
        forward_client_identity: true,
    };
    let port_wire = |p: u64, protocol: u64| cat(&[v(1, p), v(2, protocol)]);
    let want = cat(&[
        f(1, "shop"),
        f(2, "waypoint"),
        f(
            3,
            cat(&[
                f(1, "shop"),
                f(2, "reviews.shop.svc.cluster.local"),
                f(3, port_wire(80, 1)),   // HTTP
                f(3, port_wire(9090, 3)), // GRPC
                f(4, "shop/reviews.shop.svc.cluster.local"),
                f(5, "shop/deny-delete"),
                f(6, "shop/jwt"),
                f(7, "route could not be served"),
            ]),
        ),
        f(
            4,
            cat(&[
                f(1, "Kubernetes//Pod/shop/db-0"),
                f(2, V4),
                f(3, port_wire(5432, 4)), // TCP
                f(3, port_wire(8080, 2)), // HTTP2
                f(4, "shop/db"),
                f(5, "shop/jwt-db"),
                f(6, "no"),
            ]),
        ),
        f(5, "shop/gw"),
        f(6, "shop/gw-jwt"),
        v(7, 1),
    ]);
    assert_wire(&w, want);
}

#[test]
fn l7_traffic_policy_field_numbers() {
    use l7::*;
    let u32v = |value: u32| Some(value);
    let u32w = |value: u64| v(1, value);
    let pool = ConnectionPool {
        max_connections: u32v(100),
        connect_timeout: Some(duration(1, 500)),
        tcp_idle_timeout: Some(duration(3600, 0)),
        http1_max_pending_requests: u32v(10),
        http2_max_requests: u32v(1000),
        max_requests_per_connection: u32v(5),
        max_retries: u32v(3),
        http_idle_timeout: Some(duration(300, 0)),
        h2_upgrade: H2Upgrade::Upgrade as i32,
        use_client_protocol: true,
        max_concurrent_streams: u32v(128),
    };
    let pool_wire = cat(&[
        f(1, u32w(100)),
        f(2, duration_wire(1, 500)),
        f(3, duration_wire(3600, 0)),
        f(4, u32w(10)),
        f(5, u32w(1000)),
        f(6, u32w(5)),
        f(7, u32w(3)),
        f(8, duration_wire(300, 0)),
        v(9, 2), // UPGRADE
        v(10, 1),
        f(11, u32w(128)),
    ]);
    let outlier = OutlierDetection {
        consecutive_5xx_errors: u32v(5),
        consecutive_gateway_errors: u32v(4),
        consecutive_local_origin_failures: u32v(3),
        split_external_local_origin_errors: true,
        interval: Some(duration(10, 0)),
        base_ejection_time: Some(duration(30, 0)),
        max_ejection_percent: u32v(10),
        min_health_percent: u32v(50),
    };
    let outlier_wire = cat(&[
        f(1, u32w(5)),
        f(2, u32w(4)),
        f(3, u32w(3)),
        v(4, 1),
        f(5, duration_wire(10, 0)),
        f(6, duration_wire(30, 0)),
        f(7, u32w(10)),
        f(8, u32w(50)),
    ]);
    let lb = |policy| LoadBalancer {
        policy: Some(policy),
    };
    let hash = |key| {
        lb(load_balancer::Policy::ConsistentHash(ConsistentHash {
            key: Some(key),
            table_size: 65537,
        }))
    };
    // One Policy per load balancer variant; the first carries the pool and
    // the outlier detection.
    let balancers = [
        (
            lb(load_balancer::Policy::Simple(
                load_balancer::Simple::RoundRobin as i32,
            )),
            v(1, 1),
        ),
        (
            hash(consistent_hash::Key::Header("x-user".into())),
            f(2, cat(&[f(1, "x-user"), v(5, 65537)])),
        ),
        (
            hash(consistent_hash::Key::Cookie(consistent_hash::Cookie {
                name: "sticky".into(),
                path: "/".into(),
                ttl: Some(duration(60, 0)),
            })),
            f(
                2,
                cat(&[
                    f(
                        2,
                        cat(&[f(1, "sticky"), f(2, "/"), f(3, duration_wire(60, 0))]),
                    ),
                    v(5, 65537),
                ]),
            ),
        ),
        (
            hash(consistent_hash::Key::SourceIp(true)),
            f(2, cat(&[v(3, 1), v(5, 65537)])),
        ),
        (
            hash(consistent_hash::Key::QueryParameter("user".into())),
            f(2, cat(&[f(4, "user"), v(5, 65537)])),
        ),
    ];
    let policy = |lb: LoadBalancer| Policy {
        load_balancer: Some(lb),
        connection_pool: Some(pool),
        outlier_detection: Some(outlier),
    };
    let policy_wire = |lb: &[u8]| {
        cat(&[
            f(1, lb),
            f(2, pool_wire.clone()),
            f(3, outlier_wire.clone()),
        ])
    };
    let mut ports = Vec::new();
    let mut ports_wire = Vec::new();
    for (i, (b, w)) in balancers.iter().enumerate() {
        let port = 8000 + i as u32;
        ports.push(PortPolicy {
            port,
            policy: Some(policy(b.clone())),
        });
        ports_wire.push(f(5, cat(&[v(1, port as u64), f(2, policy_wire(w))])));
    }
    let tp = TrafficPolicy {
        namespace: "shop".into(),
        hostname: "reviews.shop.svc.cluster.local".into(),
        origin: Some(Origin {
            kind: "DestinationRule".into(),
            namespace: "shop".into(),
            name: "reviews".into(),
            rule: 2,
        }),
        default_policy: Some(policy(balancers[0].0.clone())),
        ports,
        subsets: vec![Subset {
            name: "v1".into(),
            workload_uids: vec!["uid-1".into(), "uid-2".into()],
            policy: Some(policy(balancers[0].0.clone())),
            ports: vec![PortPolicy {
                port: 9080,
                policy: Some(policy(balancers[1].0.clone())),
            }],
        }],
    };
    let want = cat(&[
        f(1, "shop"),
        f(2, "reviews.shop.svc.cluster.local"),
        f(
            3,
            cat(&[
                f(1, "DestinationRule"),
                f(2, "shop"),
                f(3, "reviews"),
                v(4, 2),
            ]),
        ),
        f(4, policy_wire(&balancers[0].1)),
        cat(&ports_wire),
        f(
            6,
            cat(&[
                f(1, "v1"),
                f(2, "uid-1"),
                f(2, "uid-2"),
                f(3, policy_wire(&balancers[0].1)),
                f(4, cat(&[v(1, 9080), f(2, policy_wire(&balancers[1].1))])),
            ]),
        ),
    ]);
    assert_wire(&tp, want);
}

#[test]
fn l7_route_table_field_numbers() {
    use l7::*;
    let header = |n: &str, v: &str| Header {
        name: n.into(),
        value: v.into(),
    };
    let header_wire = |n: &str, v: &str| cat(&[f(1, n), f(2, v)]);
    let modifier = HeaderModifier {
        set: vec![header("x-set", "1")],
        add: vec![header("x-add", "2")],
        remove: vec!["x-remove".into()],
    };
    let modifier_wire = cat(&[
        f(1, header_wire("x-set", "1")),
        f(2, header_wire("x-add", "2")),
        f(3, "x-remove"),
    ]);
    let backend = Backend {
        service: "shop/reviews.shop.svc.cluster.local".into(),
        port: 9080,
        weight: 90,
        subset: "v1".into(),
        request_headers: Some(modifier.clone()),
        response_headers: Some(modifier.clone()),
        invalid_reason: "no ReferenceGrant".into(),
    };
    let backend_wire = cat(&[
        f(1, "shop/reviews.shop.svc.cluster.local"),
        v(2, 9080),
        v(3, 90),
        f(4, "v1"),
        f(5, modifier_wire.clone()),
        f(6, modifier_wire.clone()),
        f(7, "no ReferenceGrant"),
    ]);
    let path = |kind| PathMatch {
        kind: Some(kind),
        ignore_case: true,
    };
    let matches = [
        (path_match::Kind::Exact("/a".into()), f(1, "/a")),
        (path_match::Kind::SegmentPrefix("/b".into()), f(2, "/b")),
        (path_match::Kind::Prefix("/c".into()), f(3, "/c")),
        (path_match::Kind::Regex("/d.*".into()), f(4, "/d.*")),
    ];
    let header_match = |kind| HeaderMatch {
        name: "x-h".into(),
        kind: Some(kind),
    };
    let header_matches = vec![
        header_match(header_match::Kind::Exact("e".into())),
        header_match(header_match::Kind::Regex("r.*".into())),
        header_match(header_match::Kind::Prefix("p".into())),
        header_match(header_match::Kind::Present(true)),
    ];
    let header_matches_wire = |n: u64| {
        cat(&[
            f(n, cat(&[f(1, "x-h"), f(2, "e")])),
            f(n, cat(&[f(1, "x-h"), f(3, "r.*")])),
            f(n, cat(&[f(1, "x-h"), f(4, "p")])),
            f(n, cat(&[f(1, "x-h"), v(5, 1)])),
        ])
    };
    let route_matches: Vec<RouteMatch> = matches
        .iter()
        .map(|(kind, _)| RouteMatch {
            path: Some(path(kind.clone())),
            headers: header_matches.clone(),
            query_params: header_matches.clone(),
            method: "GET".into(),
            grpc: Some(GrpcMethodMatch {
                service: "shop.Reviews".into(),
                method: "List".into(),
                regex: true,
            }),
            without_headers: header_matches.clone(),
        })
        .collect();
    let route_matches_wire: Vec<u8> = matches
        .iter()
        .flat_map(|(_, kind_wire)| {
            f(
                3,
                cat(&[
                    f(1, cat(&[kind_wire.clone(), v(5, 1)])),
                    header_matches_wire(2),
                    header_matches_wire(3),
                    f(4, "GET"),
                    f(5, cat(&[f(1, "shop.Reviews"), f(2, "List"), v(3, 1)])),
                    header_matches_wire(6),
                ]),
            )
        })
        .collect();
    let rewrite = |kind| PathRewrite { kind: Some(kind) };
    let fault = |abort| Fault {
        delay: Some(fault::Delay {
            delay: Some(duration(2, 0)),
            per_million: 500_000,
        }),
        abort: Some(fault::Abort {
            status: Some(abort),
            per_million: 100_000,
        }),
    };
    let fault_wire = |abort: Vec<u8>| {
        cat(&[
            f(1, cat(&[f(1, duration_wire(2, 0)), v(2, 500_000)])),
            f(2, cat(&[abort, v(3, 100_000)])),
        ])
    };
    // Everything but the action is the same on every route.
    let route = |action, rewrite_kind, abort| Route {
        origin: Some(Origin {
            kind: "HTTPRoute".into(),
            namespace: "shop".into(),
            name: "reviews".into(),
            rule: 1,
        }),
        ports: vec![80, 9080],
        matches: route_matches.clone(),
        action: Some(action),
        request_headers: Some(modifier.clone()),
        response_headers: Some(modifier.clone()),
        rewrite: Some(UrlRewrite {
            hostname: "reviews.internal".into(),
            path: Some(rewrite(rewrite_kind)),
        }),
        mirrors: vec![Mirror {
            backend: Some(backend.clone()),
            per_million: 250_000,
        }],
        timeouts: Some(Timeouts {
            request: Some(duration(10, 0)),
            per_try: Some(duration(2, 500_000_000)),
        }),
        retry: Some(RetryPolicy {
            attempts: 3,
            codes: vec![502, 503],
            on_connect_failure: true,
            on_refused_stream: true,
            on_reset: true,
            grpc_codes: vec![14, 4],
            backoff: Some(duration(0, 25_000_000)),
        }),
        fault: Some(fault(abort)),
    };
    let route_wire = |action: Vec<u8>, rewrite_wire: Vec<u8>, abort: Vec<u8>| {
        cat(&[
            f(
                1,
                cat(&[f(1, "HTTPRoute"), f(2, "shop"), f(3, "reviews"), v(4, 1)]),
            ),
            f(2, packed(&[80, 9080])),
            route_matches_wire.clone(),
            action,
            f(7, modifier_wire.clone()),
            f(8, modifier_wire.clone()),
            f(9, cat(&[f(1, "reviews.internal"), f(2, rewrite_wire)])),
            f(10, cat(&[f(1, backend_wire.clone()), v(2, 250_000)])),
            f(
                11,
                cat(&[
                    f(1, duration_wire(10, 0)),
                    f(2, duration_wire(2, 500_000_000)),
                ]),
            ),
            f(
                12,
                cat(&[
                    v(1, 3),
                    f(2, packed(&[502, 503])),
                    v(3, 1),
                    v(4, 1),
                    v(5, 1),
                    f(6, packed(&[14, 4])),
                    f(7, v(2, 25_000_000)), // Duration with seconds 0
                ]),
            ),
            f(13, fault_wire(abort)),
        ])
    };
    let redirect = Redirect {
        scheme: "https".into(),
        hostname: "shop.example".into(),
        path: Some(rewrite(path_rewrite::Kind::Prefix("/new".into()))),
        port: 8443,
        status_code: 301,
    };
    let redirect_wire = cat(&[
        f(1, "https"),
        f(2, "shop.example"),
        f(3, f(2, "/new")),
        v(4, 8443),
        v(5, 301),
    ]);
    let table = RouteTable {
        namespace: "shop".into(),
        hostname: "reviews.shop.svc.cluster.local".into(),
        routes: vec![
            route(
                route::Action::Forward(Forward {
                    backends: vec![backend.clone()],
                }),
                path_rewrite::Kind::FullPath("/full".into()),
                fault::abort::Status::HttpStatus(503),
            ),
            route(
                route::Action::Redirect(redirect),
                path_rewrite::Kind::Prefix("/p".into()),
                fault::abort::Status::GrpcStatus(14),
            ),
            route(
                route::Action::DirectResponse(DirectResponse {
                    status: 418,
                    body: b"teapot".to_vec(),
                }),
                path_rewrite::Kind::Regex(RegexRewrite {
                    pattern: "^/x/(.*)".into(),
                    substitution: "/\\1".into(),
                }),
                fault::abort::Status::HttpStatus(500),
            ),
        ],
    };
    let want = cat(&[
        f(1, "shop"),
        f(2, "reviews.shop.svc.cluster.local"),
        f(
            3,
            route_wire(f(4, f(1, backend_wire.clone())), f(1, "/full"), v(1, 503)),
        ),
        f(3, route_wire(f(5, redirect_wire), f(2, "/p"), v(2, 14))),
        f(
            3,
            route_wire(
                f(6, cat(&[v(1, 418), f(2, b"teapot")])),
                f(3, cat(&[f(1, "^/x/(.*)"), f(2, "/\\1")])),
                v(1, 500),
            ),
        ),
    ]);
    assert_wire(&table, want);
}
