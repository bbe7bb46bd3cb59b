//! Writes the seed corpus (`fuzz/corpus/<target>/`): a few valid inputs per
//! target, made with the products' own encoders from istiod-rs's test
//! fixtures. Run by `cargo xtask fuzz --seeds`; the output is committed.

use std::path::{Path, PathBuf};

use api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use api::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    workload_request,
};
use base64::Engine as _;
use mesh_fuzz::{FIXTURES, frame, resources_of};
use prost::Message as _;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: seeds <corpus dir>"));
    xds(&out, "xds_address", api::type_url::ADDRESS);
    xds(&out, "xds_authorization", api::type_url::AUTHORIZATION);
    zds(&out);
    hbone(&out);
    cni(&out);
    csr(&out);
    tokens(&out);
    config(&out);
    requests(&out);
    waypoint(&out);
}

fn write(out: &Path, target: &str, name: &str, data: impl AsRef<[u8]>) {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir).expect("the corpus dir can be made");
    std::fs::write(dir.join(name), data).expect("a seed can be written");
}

/// One response per fixture with its resources of `type_url`, and one that
/// removes what the first named.
fn xds(out: &Path, target: &str, type_url: &str) {
    let mut removed = Vec::new();
    for (fixture, yaml) in FIXTURES {
        let resources = resources_of(yaml, type_url);
        if resources.is_empty() {
            continue;
        }
        removed.extend(resources.iter().take(2).map(|r| r.name.clone()));
        let response = DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            nonce: "1".into(),
            resources,
            ..Default::default()
        };
        write(out, target, fixture, response.encode_to_vec());
    }
    let response = DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        nonce: "2".into(),
        removed_resources: removed,
        ..Default::default()
    };
    write(out, target, "removals", response.encode_to_vec());
}

/// Node-agent conversations: a flag byte (1: a netns fd rides along), then
/// the WorkloadRequest.
fn zds(out: &Path) {
    let request = |fd: bool, payload: workload_request::Payload| {
        let mut m = vec![u8::from(fd)];
        m.extend(
            WorkloadRequest {
                payload: Some(payload),
            }
            .encode_to_vec(),
        );
        m
    };
    let add = |uid: &str| {
        request(
            true,
            workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(WorkloadInfo {
                    name: "productpage-v1-6b746f74dc-9stvs".into(),
                    namespace: "default".into(),
                    service_account: "bookinfo-productpage".into(),
                }),
            }),
        )
    };
    let keep = |uid: &str| {
        request(
            false,
            workload_request::Payload::Keep(KeepWorkload { uid: uid.into() }),
        )
    };
    let del = |uid: &str| {
        request(
            false,
            workload_request::Payload::Del(DelWorkload { uid: uid.into() }),
        )
    };
    let sent = request(
        false,
        workload_request::Payload::SnapshotSent(SnapshotSent {}),
    );
    write(
        out,
        "zds_request",
        "snapshot-then-live",
        frame(&[
            add("pod-a"),
            keep("pod-b"),
            sent.clone(),
            add("pod-c"),
            del("pod-a"),
        ]),
    );
    write(
        out,
        "zds_request",
        "keep-after-snapshot",
        frame(&[sent.clone(), keep("pod-b")]),
    );
    let mut without_fd = add("pod-d");
    without_fd[0] = 0;
    write(out, "zds_request", "add-without-fd", frame(&[without_fd]));
}

/// CONNECT heads to a fixture pod, with the headers ztunnel reads.
fn hbone(out: &Path) {
    let store = mesh_fuzz::fixture_workload_store();
    let snapshot = store.snapshot();
    let workload = snapshot
        .workloads()
        .find(|w| !w.addresses.is_empty())
        .expect("a fixture workload with an address");
    let ip = workload.addresses[0];
    let authority = std::net::SocketAddr::new(ip, 9080);
    let host = snapshot
        .services()
        .next()
        .map(|s| s.hostname.clone())
        .unwrap_or_default();
    write(
        out,
        "hbone_connect",
        "plain",
        format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n"),
    );
    write(
        out,
        "hbone_connect",
        "headers",
        format!(
            "CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
             baggage: k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1\r\n\
             forwarded: host={host}\r\n\r\n"
        ),
    );
    write(
        out,
        "hbone_connect",
        "wrong-target",
        "CONNECT 192.0.2.1:15008 HTTP/1.1\r\nhost: 192.0.2.1:15008\r\n\r\n",
    );
}

/// Command byte (0 ADD, 1 DEL, 2 CHECK, 5 VERSION), CNI_ARGS, netconf.
fn cni(out: &Path) {
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=sleep-1;K8S_POD_UID=1234";
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "istio-cni-rs",
        "agent_socket": "/nonexistent/fuzz/cni.sock",
        "exclude_namespaces": ["kube-system"],
        "agent_timeout_secs": 1,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/fuzz"}],
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
        },
    });
    for (name, command) in [("add", 0u8), ("del", 1), ("check", 2), ("version", 5)] {
        let mut data = vec![command];
        data.extend_from_slice(args.as_bytes());
        data.push(b'\n');
        data.extend(serde_json::to_vec_pretty(&conf).expect("JSON encodes"));
        write(out, "cni_plugin", name, data);
    }
}

/// Form byte 0 and the PEM; form byte 1 and the DER.
fn csr(out: &Path) {
    for (name, key) in [
        (
            "ecdsa-p256",
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        ),
        (
            "ed25519",
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
        ),
    ] {
        let key = key.expect("a key pair");
        let params = rcgen::CertificateParams::new(vec![]).expect("empty params");
        let csr = params.serialize_request(&key).expect("a CSR");
        let mut pem = vec![0u8];
        pem.extend(csr.pem().expect("PEM").into_bytes());
        write(out, "ca_csr", &format!("{name}-pem"), pem);
        let mut der = vec![1u8];
        der.extend_from_slice(csr.der());
        write(out, "ca_csr", &format!("{name}-der"), der);
    }
}

fn jwt(claims: serde_json::Value) -> String {
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(v).expect("JSON"))
    };
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(&serde_json::json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})),
        b64(&claims)
    )
}

fn tokens(out: &Path) {
    write(
        out,
        "token_file",
        "tokens",
        "tokens:\n  - token: node-1-secret\n    serviceAccount: istio-system/ztunnel\n    node: node-1\n  - token: \"client secret\"\n    serviceAccount: demo/client\n",
    );
    write(out, "token_file", "empty", "tokens: []\n");
    let token = jwt(serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:istio-system:ztunnel",
        "aud": ["istio-ca"],
        "exp": 4102444800u64,
    }));
    let status = serde_json::json!({
        "authenticated": true,
        "audiences": ["istio-ca"],
        "user": {
            "username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["ztunnel-abcde"],
                "authentication.kubernetes.io/pod-uid": ["0c9d5b8e-1111-2222-3333-444455556666"],
                "authentication.kubernetes.io/node-name": ["node-1"],
            },
        },
    });
    write(
        out,
        "bearer_token",
        "reviewed-jwt",
        format!("Bearer {token}\n{status}"),
    );
    write(
        out,
        "bearer_token",
        "rejected",
        "bearer opaque-token\n{\"authenticated\":false,\"error\":\"token expired\"}",
    );
}

fn config(out: &Path) {
    for (fixture, yaml) in FIXTURES {
        write(out, "config_yaml", fixture, yaml);
    }
}

/// A waypoint's stream: subscribe to its types, then ACK and NACK.
fn requests(out: &Path) {
    let node = api::discovery::Node {
        id: "waypoint~10.244.1.7~waypoint-5d9c8b7f4-abcde.shop~shop.svc.cluster.local".into(),
        ..Default::default()
    };
    let subscribe = |type_url: &str, names: &[&str]| DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    let ack = |type_url: &str, nonce: &str| DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let mut nack = ack(api::type_url::ROUTE_TABLE, "2");
    nack.error_detail = Some(api::rpc::Status {
        code: 3,
        message: "route table shop/reviews: bad regex".into(),
        ..Default::default()
    });
    let stream = [
        subscribe(api::type_url::ADDRESS, &["*"]),
        subscribe(api::type_url::ROUTE_TABLE, &[]),
        ack(api::type_url::ADDRESS, "1"),
        nack,
        subscribe(api::type_url::ADDRESS, &["Kubernetes//Pod/shop/reviews-v1"]),
    ];
    let encoded: Vec<Vec<u8>> = stream.iter().map(|r| r.encode_to_vec()).collect();
    write(out, "xds_requests", "waypoint-stream", frame(&encoded));
    let ztunnel = DeltaDiscoveryRequest {
        node: Some(api::discovery::Node {
            id: "ztunnel~10.244.1.3~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local"
                .into(),
            ..Default::default()
        }),
        type_url: api::type_url::AUTHORIZATION.into(),
        initial_resource_versions: [("istio-system/deny-all".to_string(), "abc".to_string())]
            .into(),
        ..Default::default()
    };
    write(
        out,
        "xds_requests",
        "ztunnel-resume",
        frame(&[ztunnel.encode_to_vec()]),
    );
}

/// Requests for the fixtures' services: the route matches, the JWT
/// locations and the authorization fields they use.
fn waypoint(out: &Path) {
    let config = mesh_fuzz::waypoint_config();
    let token = jwt(serde_json::json!({
        "iss": "https://issuer.example",
        "sub": "alice",
        "aud": ["reviews"],
        "exp": 4102444800u64,
    }));
    for (i, table) in config.routes.iter().enumerate() {
        let host = &table.service.hostname;
        write(
            out,
            "waypoint_http",
            &format!("route-{i}-header"),
            format!(
                "\u{2}GET /reviews/1?u=jason HTTP/1.1\r\nhost: {host}:9080\r\nend-user: jason\r\n\r\n"
            ),
        );
        write(
            out,
            "waypoint_http",
            &format!("route-{i}-jwt"),
            format!(
                "\u{0}POST /v1/api?token={token} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\ncookie: session={token}\r\nx-forwarded-client-cert: By=spiffe://x\r\n\r\n"
            ),
        );
    }
    write(
        out,
        "waypoint_jwt",
        "bearer",
        format!(
            "\u{0}GET /?access_token={token} HTTP/1.1\r\nhost: reviews\r\nauthorization: Bearer {token}\r\n\r\n"
        ),
    );
    write(
        out,
        "waypoint_jwt",
        "locations",
        format!(
            "\u{0}GET /?token={token} HTTP/1.1\r\nhost: reviews\r\nx-jwt-assertion: Bearer {token}\r\ncookie: a=b; session={token}\r\n\r\n"
        ),
    );
    for (i, proto) in config.jwt_protos.iter().enumerate() {
        for (j, rule) in proto.rules.iter().enumerate() {
            if !rule.jwks.is_empty() {
                let mut data = vec![1u8];
                data.extend_from_slice(rule.jwks.as_bytes());
                write(out, "waypoint_jwt", &format!("jwks-{i}-{j}"), data);
            }
        }
    }
}
