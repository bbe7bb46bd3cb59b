//! The Kubernetes-only scenarios: what only a real cluster has (labels
//! changing on live namespaces, DaemonSet and Deployment rollouts, pods
//! deleted by the API, `istioctl-rs uninstall`). They run on an installed
//! [`KubeMesh`] with one [`KubeFixture`], one after the other, after the
//! shared L4 scenarios; each leaves the cluster as it found it, except the
//! last ones (uninstall), which run last.
//!
//! - [`enrolment`]: enrol running pods by label and release them; pod
//!   deletion cleans rules and certificates; uninstall leaves nothing.
//! - [`lifecycle`]: node agent restart, ztunnel-rs DaemonSet rolling
//!   restart, istiod-rs restart, under load.
//! - [`waypoints`]: `istioctl-rs waypoint`, and a waypoint istiod-rs
//!   creates on demand for an HTTPRoute, Programmed and removed with it.
//! - [`debugging`]: istioctl-rs's `ztunnel-config`, `proxy-status` and `x
//!   describe` reaching their pods through port-forwards.
//! - [`dns`]: a pod resolves a Service through its resolv.conf's search
//!   list, answered by ztunnel-rs's DNS proxy; other names forwarded.

pub mod debugging;
pub mod dns;
pub mod enrolment;
pub mod lifecycle;
pub mod waypoints;

use std::time::Duration;

use serde_json::Value;

use super::mesh::{KubeMesh, KubeMeshError};
use super::samples::{ECHO_APP, client_pod, condition};
use crate::scenarios::{Outcome, run_one};

/// The fixture's namespace.
pub const NAMESPACE: &str = "demo";
/// How long the fixture waits for pods and the mesh.
pub const PATIENCE: Duration = Duration::from_secs(120);
/// How long one command in a pod may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// One Kubernetes-only scenario: a line of evidence, or why it failed.
#[derive(Clone, Copy)]
pub struct KubeScenario {
    pub name: &'static str,
    pub run: fn(&KubeMesh, &KubeFixture) -> Result<String, KubeMeshError>,
}

impl std::fmt::Debug for KubeScenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every Kubernetes-only scenario, in the order they run: the debugging
/// views, DNS, the lifecycle ones, the waypoints', then enrolment's (which end
/// with uninstall).
pub fn all() -> Vec<KubeScenario> {
    debugging::scenarios()
        .into_iter()
        .chain(dns::scenarios())
        .chain(lifecycle::scenarios())
        .chain(waypoints::scenarios())
        .chain(enrolment::scenarios())
        .collect()
}

/// A pod of the fixture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixturePod {
    pub name: String,
    pub node: String,
    pub ip: String,
    pub uid: String,
}

/// Namespace `demo`, enrolled by label while its pods ran: the echo
/// Deployment ([`ECHO_APP`]: one replica per node behind Service `echo`,
/// HTTP 80 -> 8080, TCP echo 9000, hello 9001) and a client pod per node
/// (`client-<node>`, service account `client`, the client image idling).
#[derive(Clone, Debug)]
pub struct KubeFixture {
    pub echo: Vec<FixturePod>,
    pub clients: Vec<FixturePod>,
    /// The echo Service's ClusterIP.
    pub echo_vip: String,
}

impl KubeFixture {
    /// Deploys the app and the clients, waits until they are Ready, labels
    /// the namespace `istio.io/dataplane-mode=ambient`, and waits until
    /// every pod is marked redirected and a client's request to the echo
    /// Service goes through.
    pub fn create(mesh: &KubeMesh) -> Result<KubeFixture, KubeMeshError> {
        let kubectl = &mesh.kubectl;
        kubectl.apply(ECHO_APP)?;
        let nodes = mesh.node_names();
        for node in &nodes {
            kubectl.create(&client_pod(&format!("client-{node}"), node))?;
        }
        let expected = 2 + nodes.len();
        kubectl.wait_for(
            &format!("{expected} pods of {NAMESPACE} Ready"),
            PATIENCE,
            |k| {
                let items = items(&k.json(&["get", "pods", "-n", NAMESPACE])?);
                Ok((items.len() == expected
                    && items
                        .iter()
                        .all(|p| condition(p, "Ready").as_deref() == Some("True")))
                .then_some(()))
            },
        )?;
        kubectl.run(&[
            "label",
            "namespace",
            NAMESPACE,
            &format!(
                "{}={}",
                api::labels::DATAPLANE_MODE,
                api::labels::DATAPLANE_MODE_AMBIENT
            ),
        ])?;
        kubectl.wait_for(
            &format!("every pod of {NAMESPACE} marked {REDIRECTION}=enabled"),
            PATIENCE,
            |k| {
                let items = items(&k.json(&["get", "pods", "-n", NAMESPACE])?);
                Ok(items.iter().all(redirected).then_some(()))
            },
        )?;
        let pods = items(&kubectl.json(&["get", "pods", "-n", NAMESPACE])?);
        let pod = |p: &Value| FixturePod {
            name: p["metadata"]["name"].as_str().unwrap_or_default().into(),
            node: p["spec"]["nodeName"].as_str().unwrap_or_default().into(),
            ip: p["status"]["podIP"].as_str().unwrap_or_default().into(),
            uid: p["metadata"]["uid"].as_str().unwrap_or_default().into(),
        };
        let echo: Vec<FixturePod> = pods
            .iter()
            .filter(|p| p["metadata"]["labels"]["app"] == "echo")
            .map(pod)
            .collect();
        let clients: Vec<FixturePod> = nodes
            .iter()
            .filter_map(|n| {
                pods.iter()
                    .find(|p| p["metadata"]["name"] == format!("client-{n}").as_str())
            })
            .map(pod)
            .collect();
        let echo_vip = kubectl
            .get("service", Some(NAMESPACE), "echo")?
            .and_then(|s| s["spec"]["clusterIP"].as_str().map(str::to_string))
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("Service {NAMESPACE}/echo"),
                detail: "no ClusterIP".into(),
            })?;
        let fixture = KubeFixture {
            echo,
            clients,
            echo_vip,
        };
        let first = fixture
            .clients
            .first()
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: "the fixture".into(),
                detail: "no client pod".into(),
            })?;
        let url = format!("http://{}:80/", fixture.echo_vip);
        let node = mesh.node(&first.node)?;
        kubectl.wait_for("a client's request to the echo Service", PATIENCE, |_| {
            Ok(node
                .client_http(NAMESPACE, &first.name, &url, EXEC_TIMEOUT)
                .map(|r| r.ok)
                .unwrap_or(false)
                .then_some(()))
        })?;
        Ok(fixture)
    }
}

/// The annotation the node agent sets on a pod whose traffic it redirects.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

/// Whether a pod (JSON) is marked redirected by its node agent.
pub fn redirected(pod: &Value) -> bool {
    pod["metadata"]["annotations"][REDIRECTION] == "enabled"
}

/// The `items` of a list (JSON).
pub fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().cloned().unwrap_or_default()
}

/// Runs `scenarios` in order (those whose name contains `filter`, if
/// given); a failure does not stop the rest.
pub fn run_all(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
    scenarios: &[KubeScenario],
    filter: Option<&str>,
) -> Vec<Outcome> {
    scenarios
        .iter()
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .map(|s| run_one(s.name, || (s.run)(mesh, fixture).map_err(|e| e.to_string())))
        .collect()
}
