//! The pods and namespaces the L4 scenarios share, created once per cluster:
//!
//! ```text
//! namespace l4 (ambient)      node0: server-0, client-0, other-0, opted-out (dataplane-mode=none)
//!                             node1: server-1, client-1
//!                             Service server -> server-0, server-1
//! namespace l4-peer (ambient) node1: peer-1
//! namespace l4-legacy (not enrolled)  node0: legacy-0
//! ```
//!
//! Service accounts give each role its own identity: `server`, `client`,
//! `other` in `l4`, `default` elsewhere.

use std::time::Duration;

use crate::cluster::{AppCommand, Cluster, PodInfo, PodRequest};
use crate::probe::{self, ProbeError};

/// The echo server's ports (see [`echo_server`]).
pub const ECHO_TCP: u16 = 9000;
pub const ECHO_HELLO: u16 = 9001;
pub const ECHO_SINK: u16 = 9002;
/// A second hello port, for policies that differ by port.
pub const ECHO_HELLO_ALT: u16 = 9003;
pub const ECHO_HTTP: u16 = 8080;
/// gRPC over h2c (`echo --grpc`).
pub const ECHO_GRPC: u16 = 7070;

pub const AMBIENT_NS: &str = "l4";
pub const PEER_NS: &str = "l4-peer";
pub const LEGACY_NS: &str = "l4-legacy";
pub const SERVICE: &str = "server";

/// How long the fixture waits for the mesh to know its pods.
const KNOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod running the sample echo server on every [`ECHO_TCP`]-style port.
pub fn echo_server(namespace: &str, name: &str, node: &str, service_account: &str) -> PodRequest {
    let args: Vec<String> = [
        ("--tcp", ECHO_TCP),
        ("--tcp-hello", ECHO_HELLO),
        ("--tcp-hello", ECHO_HELLO_ALT),
        ("--sink", ECHO_SINK),
        ("--http", ECHO_HTTP),
        ("--grpc", ECHO_GRPC),
    ]
    .iter()
    .flat_map(|(flag, port)| [flag.to_string(), port.to_string()])
    .collect();
    PodRequest::new(namespace, name)
        .on_node(node)
        .service_account(service_account)
        .command(AppCommand::echo(args))
        .port("tcp", ECHO_TCP)
        .port("hello", ECHO_HELLO)
        .port("sink", ECHO_SINK)
        .port("hello-alt", ECHO_HELLO_ALT)
        .port("http", ECHO_HTTP)
        .port("grpc", ECHO_GRPC)
}

/// A pod that only holds a network, to run clients in.
pub fn client_pod(namespace: &str, name: &str, node: &str, service_account: &str) -> PodRequest {
    PodRequest::new(namespace, name)
        .on_node(node)
        .service_account(service_account)
}

/// YAML for a namespace, enrolled in the mesh or not.
pub fn namespace_yaml(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        format!(
            "\n  labels:\n    {}: {}",
            api::labels::DATAPLANE_MODE,
            api::labels::DATAPLANE_MODE_AMBIENT
        )
    } else {
        String::new()
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

/// YAML for service accounts.
pub fn service_accounts_yaml(namespace: &str, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {n}\n  namespace: {namespace}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// YAML for a ClusterIP service over the echo ports of pods labelled `app: <selector>`.
pub fn echo_service_yaml(namespace: &str, name: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  \
         selector:\n    app: {selector}\n  ports:\n  - name: hello\n    port: {ECHO_HELLO}\n    targetPort: hello\n  \
         - name: tcp\n    port: {ECHO_TCP}\n"
    )
}

/// The L4 scenarios' pods.
#[derive(Clone, Debug)]
pub struct L4Fixture {
    pub trust_domain: String,
    /// `server-0` on the first node, `server-1` on the second.
    pub servers: [PodInfo; 2],
    /// `client-0`, `client-1` (service account `client`).
    pub clients: [PodInfo; 2],
    /// `other-0`: service account `other`, first node.
    pub other: PodInfo,
    /// In an ambient namespace but labelled out of the mesh.
    pub opted_out: PodInfo,
    /// In another ambient namespace, second node.
    pub peer: PodInfo,
    /// In a namespace that is not enrolled, first node.
    pub legacy: PodInfo,
    /// The service's cluster IP.
    pub service_vip: String,
}

impl L4Fixture {
    /// Creates the namespaces, service and pods (the cluster needs two
    /// nodes) and waits until every ztunnel knows every pod.
    pub fn create(cluster: &dyn Cluster, trust_domain: &str) -> Result<L4Fixture, ProbeError> {
        let nodes = cluster.nodes();
        let [n0, n1] = [0, 1].map(|i| nodes.get(i).cloned().unwrap_or_default());
        if n1.is_empty() {
            return Err(ProbeError::Unexpected {
                what: "the L4 fixture".into(),
                detail: format!("needs two nodes; the cluster has {nodes:?}"),
            });
        }
        let yaml = [
            namespace_yaml(AMBIENT_NS, true),
            namespace_yaml(PEER_NS, true),
            namespace_yaml(LEGACY_NS, false),
            service_accounts_yaml(AMBIENT_NS, &["server", "client", "other"]),
            echo_service_yaml(AMBIENT_NS, SERVICE, "server"),
        ]
        .join("---\n");
        cluster.apply_yaml(&yaml)?;
        let server = |name: &str, node: &str| {
            cluster
                .create_pod(&echo_server(AMBIENT_NS, name, node, "server").label("app", "server"))
        };
        let servers = [server("server-0", &n0)?, server("server-1", &n1)?];
        let clients = [
            cluster.create_pod(&client_pod(AMBIENT_NS, "client-0", &n0, "client"))?,
            cluster.create_pod(&client_pod(AMBIENT_NS, "client-1", &n1, "client"))?,
        ];
        let other = cluster.create_pod(&client_pod(AMBIENT_NS, "other-0", &n0, "other"))?;
        let opted_out =
            cluster.create_pod(&client_pod(AMBIENT_NS, "opted-out", &n0, "client").label(
                api::labels::DATAPLANE_MODE,
                api::labels::DATAPLANE_MODE_NONE,
            ))?;
        let peer = cluster.create_pod(&client_pod(PEER_NS, "peer-1", &n1, "default"))?;
        let legacy = cluster.create_pod(&client_pod(LEGACY_NS, "legacy-0", &n0, "default"))?;

        let enrolled = [
            (&servers[0], "server"),
            (&servers[1], "server"),
            (&clients[0], "client"),
            (&clients[1], "client"),
            (&other, "other"),
            (&peer, "default"),
        ];
        probe::until_in_mesh(cluster, trust_domain, &enrolled, KNOWN_TIMEOUT)?;
        probe::until_known(cluster, &[&opted_out, &legacy], "TCP", KNOWN_TIMEOUT)?;
        let service_vip = probe::eventually("the service's cluster IP", KNOWN_TIMEOUT, || {
            Ok(service_vip(cluster, AMBIENT_NS, SERVICE)?.ok_or("no VIP yet".to_string()))
        })?;
        Ok(L4Fixture {
            trust_domain: trust_domain.to_string(),
            servers,
            clients,
            other,
            opted_out,
            peer,
            legacy,
            service_vip,
        })
    }

    /// The SPIFFE id of a service account of the fixture.
    pub fn principal(&self, namespace: &str, service_account: &str) -> String {
        probe::principal(&self.trust_domain, namespace, service_account)
    }

    /// `<ip>:<port>` of a pod.
    pub fn at(pod: &PodInfo, port: u16) -> String {
        format!("{}:{port}", pod.ip)
    }
}

/// A service's cluster IP, as the first node's ztunnel-rs has it.
pub fn service_vip(
    cluster: &dyn Cluster,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, ProbeError> {
    let node = cluster.nodes().into_iter().next().unwrap_or_default();
    let dump = cluster.config_dump(&probe::ztunnel(&node))?;
    let vip = dump
        .get("services")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .find(|s| s["namespace"] == namespace && s["name"] == name)
        .and_then(|s| s.get("vips"))
        .and_then(serde_json::Value::as_array)
        .and_then(|vips| vips.first())
        // `<network>/<ip>`, as upstream prints a network address.
        .and_then(serde_json::Value::as_str)
        .and_then(|v| v.rsplit('/').next())
        .map(str::to_string);
    Ok(vip)
}
