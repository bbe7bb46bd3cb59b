//! [`Cluster`] on the real control plane: the shared scenarios
//! (`crate::scenarios`) driven through Kubernetes' own mechanisms on an
//! installed [`KubeMesh`].
//!
//! - `apply` / `delete`: `kubectl apply --server-side` (field manager
//!   [`FIELD_MANAGER`]) one object at a time, stopping at the first error
//!   as the local cluster does; `kubectl delete --ignore-not-found
//!   --wait`. Server-side: the same mechanism `istioctl-rs install` uses,
//!   no `last-applied-configuration` annotation copied into every object
//!   the mesh reads, and a conflict with another manager is the API
//!   server's to resolve (`--force-conflicts`: the scenario's object is
//!   the one wanted). An applied Namespace is waited for until its
//!   `default` ServiceAccount exists (the controller manager creates it;
//!   a pod of that account is refused before), as a script would `kubectl
//!   wait` before using it. istiod-rs's validating webhook answers for
//!   policies: a refusal is [`ClusterError::Refused`] (the webhook said no)
//!   or [`ClusterError::ValidatorUnavailable`] (istiod-rs is away and the
//!   webhook fails closed).
//! - `create_pod`: a real Pod (see [`pod_manifest`]) placed by the
//!   scheduler through a `kubernetes.io/hostname` nodeSelector, Ready as
//!   the API reports it (kubelet's probe from the node), then every
//!   readiness check of the request passes from the node.
//! - `exec`, `probe_readiness`, `proxy_get`: through the node runtimes
//!   (`NodeRuntime::exec` in the pod's container; probes and GETs from the
//!   node's or the pod's network namespace, as kubelet and `kubectl
//!   port-forward` reach them).
//! - components: istiod-rs is its Deployment scaled to 0 and back; a
//!   node's ztunnel-rs is its DaemonSet pod deleted (SIGTERM, grace
//!   period: it drains), which the DaemonSet controller replaces at once;
//!   a node's agent is its container SIGKILLed on the node, which kubelet
//!   restarts. See [`Cluster::stop_component`] for what differs from the
//!   local cluster.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::mesh::{ISTIOD, KubeMesh, KubeMeshError, NODE_AGENT, SYSTEM_NAMESPACE, ZTUNNEL};
use super::node::NodeRuntime;
use super::samples::condition;
use super::{Kubectl, KubectlError};
use crate::cluster::{
    AppCommand, Cluster, ClusterError, ExecOutput, HttpResponse, NODE_AGENT_READINESS, OnDemand,
    PodInfo, PodRequest, ProbeOutcome, ProxyRef, ReadinessProbe,
};
use crate::netns::NetNs;
use crate::objects::{Object, ObjectKey};

/// The field manager of the scenarios' server-side applies.
pub const FIELD_MANAGER: &str = "e2e";
/// The annotation a pod created by [`KubeCluster`] carries its readiness
/// checks in (JSON list of [`ReadinessProbe`]): what the harness checks
/// from the node beyond the one probe kubelet runs (see [`pod_manifest`]).
pub const READINESS_CHECKS: &str = "e2e.istio-rs.io/readiness-checks";
/// The sample apps' images (the node runtime's image table).
pub const ECHO_IMAGE: &str = "istio-rs/echo:dev";
pub const CLIENT_IMAGE: &str = "istio-rs/client:dev";
/// The istiod-rs Deployment.
pub const ISTIOD_DEPLOYMENT: &str = "istiod";

/// How long things may take on the real control plane.
#[derive(Clone, Debug)]
pub struct KubeClusterConfig {
    /// A pod from creation to Ready and every readiness check passing.
    pub pod_ready: Duration,
    /// A pod's deletion, a namespace's default ServiceAccount.
    pub settle: Duration,
    /// A mesh component going away or coming back Ready.
    pub component: Duration,
    /// One readiness check from the node (kubelet's `timeoutSeconds`).
    pub probe_timeout: Duration,
    /// One admin / metrics GET.
    pub http_timeout: Duration,
    /// The pods' `terminationGracePeriodSeconds`.
    pub pod_grace: Duration,
}

impl Default for KubeClusterConfig {
    fn default() -> Self {
        KubeClusterConfig {
            pod_ready: Duration::from_secs(120),
            settle: Duration::from_secs(60),
            component: Duration::from_secs(180),
            probe_timeout: Duration::from_secs(1),
            http_timeout: Duration::from_secs(10),
            pod_grace: Duration::from_secs(2),
        }
    }
}

/// The [`Cluster`] of an installed [`KubeMesh`].
pub struct KubeCluster<'a> {
    mesh: &'a KubeMesh,
    config: KubeClusterConfig,
    /// Per node: the node agent's restart count when it was killed.
    killed_agents: Mutex<BTreeMap<String, i64>>,
}

impl<'a> KubeCluster<'a> {
    pub fn new(mesh: &'a KubeMesh, config: KubeClusterConfig) -> KubeCluster<'a> {
        KubeCluster {
            mesh,
            config,
            killed_agents: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn mesh(&self) -> &KubeMesh {
        self.mesh
    }

    fn killed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, i64>> {
        self.killed_agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kubectl(&self) -> &Kubectl {
        &self.mesh.kubectl
    }

    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut(&Kubectl) -> Result<Option<T>, KubectlError>,
    ) -> Result<T, ClusterError> {
        Ok(self
            .kubectl()
            .wait_for(what, timeout, check)
            .map_err(KubeMeshError::from)?)
    }

    fn api_pod(&self, namespace: &str, name: &str) -> Result<Option<Value>, ClusterError> {
        Ok(self
            .kubectl()
            .get("pod", Some(namespace), name)
            .map_err(KubeMeshError::from)?)
    }

    fn apply_one(&self, object: &Object) -> Result<(), ClusterError> {
        let args = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            "-",
        ];
        let manifest = object.value().to_string();
        if let Err(e) = self.kubectl().run_with_input(&args, Some(&manifest)) {
            let refusal = match &e {
                KubectlError::Failed { stderr, .. } => {
                    admission_refusal(&object.key().to_string(), stderr)
                }
                _ => None,
            };
            return Err(refusal.unwrap_or_else(|| KubeMeshError::from(e).into()));
        }
        if object.kind() == "Namespace" && object.key().group.is_empty() {
            let ns = object.name().to_string();
            self.wait(
                &format!("the default ServiceAccount of namespace {ns}"),
                self.config.settle,
                |k| Ok(k.get("serviceaccount", Some(&ns), "default")?.map(|_| ())),
            )?;
        }
        Ok(())
    }

    /// A pod of the API as [`PodInfo`], if it runs (has an address and is
    /// not being deleted).
    fn pod_info(pod: &Value) -> Option<PodInfo> {
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            return None;
        }
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Some(PodInfo {
            namespace: s(&pod["metadata"]["namespace"]),
            name: s(&pod["metadata"]["name"]),
            uid: s(&pod["metadata"]["uid"]),
            node: s(&pod["spec"]["nodeName"]),
            ip: pod["status"]["podIP"].as_str()?.parse().ok()?,
        })
    }

    /// The node runtime running pod `namespace/name` and the pod's network
    /// namespace there (the node's for a hostNetwork pod).
    fn pod_network(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(&NodeRuntime, NetNs), ClusterError> {
        self.mesh
            .pod_network(namespace, name)
            .map_err(|_| ClusterError::NoPod(namespace.into(), name.into()))
    }

    fn node_netns(&self, node: &str) -> Result<&NetNs, ClusterError> {
        self.mesh
            .node_netns(node)
            .map_err(|_| ClusterError::NoNode(node.into(), self.nodes().join(", ")))
    }

    /// Every readiness check of a pod, from its node, until all pass at
    /// once; `Err` with the last failure once `timeout` is over.
    fn until_checks_pass(
        &self,
        node: &NetNs,
        ip: Ipv4Addr,
        checks: &[ReadinessProbe],
        timeout: Duration,
    ) -> Result<Result<(), String>, ClusterError> {
        let start = Instant::now();
        loop {
            let outcome = run_checks(node, ip, checks, self.config.probe_timeout)?;
            if outcome.passed {
                return Ok(Ok(()));
            }
            if start.elapsed() >= timeout {
                return Ok(Err(format!(
                    "not ready within {timeout:?}; last: {}",
                    outcome.detail
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn not_ready(&self, req: &PodRequest, reason: String) -> ClusterError {
        let (log, tail) = self
            .mesh
            .nodes
            .iter()
            .find_map(|n| n.pod(&req.namespace, &req.name))
            .and_then(|v| v.containers.into_values().next())
            .and_then(|c| c.process)
            .map(|p| {
                (
                    p.log.display().to_string(),
                    crate::process::log_tail(&p.log, 20),
                )
            })
            .unwrap_or_else(|| ("(no container started)".into(), String::new()));
        ClusterError::NotReady {
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            reason,
            log,
            tail,
        }
    }

    /// The mesh component pod of `selector` on `node` (any node: `None`).
    fn component(&self, selector: &str, node: Option<&str>) -> Result<Option<Value>, ClusterError> {
        Ok(self.mesh.component_pod(selector, node)?)
    }

    fn component_name(&self, selector: &str, node: Option<&str>) -> Result<String, ClusterError> {
        let pod = self.component(selector, node)?.ok_or_else(|| {
            ClusterError::NoPod(
                SYSTEM_NAMESPACE.into(),
                format!(
                    "({selector}{})",
                    node.map(|n| format!(" on {n}")).unwrap_or_default()
                ),
            )
        })?;
        Ok(name_of(&pod))
    }

    fn scale_istiod(&self, replicas: u32) -> Result<(), ClusterError> {
        self.kubectl()
            .run(&[
                "scale",
                "deployment",
                ISTIOD_DEPLOYMENT,
                "-n",
                SYSTEM_NAMESPACE,
                &format!("--replicas={replicas}"),
            ])
            .map_err(KubeMeshError::from)?;
        Ok(())
    }

    /// Waits until the component of `selector` on `node` is Ready in the API.
    fn until_component_ready(
        &self,
        selector: &str,
        node: Option<&str>,
    ) -> Result<(), ClusterError> {
        let where_ = node.map(|n| format!(" on {n}")).unwrap_or_default();
        self.wait(
            &format!("a Ready {selector} pod{where_}"),
            self.config.component,
            |k| {
                let pods = k.json(&["get", "pods", "-n", SYSTEM_NAMESPACE, "-l", selector])?;
                Ok(pods["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| {
                        p["metadata"]["deletionTimestamp"].is_null()
                            && node.is_none_or(|n| p["spec"]["nodeName"] == n)
                            && condition(p, "Ready").as_deref() == Some("True")
                    })
                    .then_some(()))
            },
        )
    }

    /// Waits until the API server reaches istiod-rs's webhook again: a
    /// dry-run create of a policy it must refuse comes back "denied the
    /// request" (istiod-rs's own proof before it sets `Fail`). Before,
    /// every policy write is refused as [`ClusterError::ValidatorUnavailable`].
    fn until_webhook_serves(&self) -> Result<(), ClusterError> {
        let probe = json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "e2e-webhook-probe", "namespace": SYSTEM_NAMESPACE},
            "spec": {"rules": [{"to": [{"operation": {"ports": ["e2e-not-a-port"]}}]}]},
        })
        .to_string();
        self.wait(
            "istiod-rs's validating webhook to answer the API server",
            self.config.component,
            |k| match k.run_with_input(&["create", "--dry-run=server", "-f", "-"], Some(&probe)) {
                Err(KubectlError::Failed { stderr, .. }) if stderr.contains(DENIED) => Ok(Some(())),
                Ok(_) => Err(KubectlError::Wait {
                    what: "the webhook probe".into(),
                    waited: Duration::ZERO,
                    last: "an invalid policy was admitted (is the webhook installed?)".into(),
                }),
                Err(e) => Err(e),
            },
        )
    }

    fn node_agent_container(&self, node: &str) -> Result<(String, String, i64), ClusterError> {
        let pod = self.component(NODE_AGENT, Some(node))?.ok_or_else(|| {
            ClusterError::NoPod(SYSTEM_NAMESPACE.into(), format!("(node agent on {node})"))
        })?;
        let container = pod["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let restarts = restart_count(&pod, &container);
        Ok((name_of(&pod), container, restarts))
    }

    fn node_runtime(&self, node: &str) -> Result<&super::node::NodeRuntime, ClusterError> {
        self.mesh
            .node(node)
            .map_err(|_| ClusterError::NoNode(node.into(), self.nodes().join(", ")))
    }

    /// Waits until the node's ztunnel pod (a new one, after a deletion)
    /// has its container running.
    fn until_ztunnel_runs(&self, node: &str) -> Result<(), ClusterError> {
        let runtime = self.node_runtime(node)?;
        self.wait(
            &format!("a ztunnel-rs pod running on {node}"),
            self.config.component,
            |_| {
                let Some(pod) = self.component(ZTUNNEL, Some(node)).ok().flatten() else {
                    return Ok(None);
                };
                let running = runtime
                    .pod(SYSTEM_NAMESPACE, &name_of(&pod))
                    .is_some_and(|v| v.containers.values().any(|c| c.process.is_some()));
                Ok(running.then_some(()))
            },
        )
    }

    fn until_agent_back(&self, node: &str) -> Result<(), ClusterError> {
        let before = self.killed().get(node).copied();
        let netns = self.node_netns(node)?.clone();
        let timeout = self.config.http_timeout;
        self.wait(
            &format!("the node agent on {node} restarted and ready (/readyz)"),
            self.config.component,
            |_| {
                let Some(pod) = self.component(NODE_AGENT, Some(node)).ok().flatten() else {
                    return Ok(None);
                };
                let container = pod["spec"]["containers"][0]["name"]
                    .as_str()
                    .unwrap_or_default();
                let restarted = before.is_none_or(|b| restart_count(&pod, container) > b);
                let ready = condition(&pod, "Ready").as_deref() == Some("True");
                let readyz = crate::http::get(&netns, NODE_AGENT_READINESS, "/readyz", timeout)
                    .is_ok_and(|r| r.status == 200);
                Ok((restarted && ready && readyz).then_some(()))
            },
        )?;
        self.killed().remove(node);
        Ok(())
    }
}

/// What the API server says when a webhook refuses an object.
const DENIED: &str = "denied the request";
/// What it says when it could not call one whose failurePolicy is Fail.
const WEBHOOK_UNREACHABLE: &str = "failed calling webhook";

/// The refusal of `object` at admission that kubectl's `stderr` reports, if any.
pub fn admission_refusal(object: &str, stderr: &str) -> Option<ClusterError> {
    let reason = |marker: &str| {
        stderr
            .split_once(marker)
            .map(|(_, rest)| rest.trim_start_matches(':').trim().to_string())
            .unwrap_or_default()
    };
    if stderr.contains(DENIED) {
        Some(ClusterError::Refused {
            object: object.to_string(),
            reason: reason(DENIED),
        })
    } else if stderr.contains(WEBHOOK_UNREACHABLE) {
        Some(ClusterError::ValidatorUnavailable {
            object: object.to_string(),
            reason: stderr.trim().to_string(),
        })
    } else {
        None
    }
}

fn name_of(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn restart_count(pod: &Value, container: &str) -> i64 {
    pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == container)
        .and_then(|c| c["restartCount"].as_i64())
        .unwrap_or(0)
}

/// Runs `checks` once from `node` against `ip`: the first failure, or
/// every success's detail.
fn run_checks(
    node: &NetNs,
    ip: Ipv4Addr,
    checks: &[ReadinessProbe],
    timeout: Duration,
) -> Result<ProbeOutcome, ClusterError> {
    let mut details = Vec::new();
    for check in checks {
        let outcome = check.run_from(node, ip, timeout)?;
        if !outcome.passed {
            return Ok(ProbeOutcome {
                passed: false,
                detail: format!("readiness probe {check:?}: {}", outcome.detail),
            });
        }
        details.push(outcome.detail);
    }
    Ok(ProbeOutcome {
        passed: true,
        detail: if details.is_empty() {
            "the pod has no readiness probe".into()
        } else {
            details.join("; ")
        },
    })
}

/// What a request's container runs.
#[derive(Debug)]
struct ContainerRun {
    image: &'static str,
    name: &'static str,
    /// Replaces the image's entrypoint.
    command: Option<Vec<String>>,
    args: Vec<String>,
}

/// A sample app is its image's entrypoint with the request's arguments;
/// no command is the client image idling (a pod that only holds its
/// network, as `e2e::kube::samples::client_pod`); any other program runs
/// as the client image's `command` (containers see the node's files, see
/// `e2e::kube::node::launch`).
fn container_of(command: Option<&AppCommand>) -> ContainerRun {
    let image = |image, name, command, args| ContainerRun {
        image,
        name,
        command,
        args,
    };
    match command {
        None => image(
            CLIENT_IMAGE,
            "client",
            Some(vec!["sleep".into(), "infinity".into()]),
            Vec::new(),
        ),
        Some(c) if c.program == "echo" => image(ECHO_IMAGE, "echo", None, c.args.clone()),
        Some(c) if c.program == "client" => image(CLIENT_IMAGE, "client", None, c.args.clone()),
        Some(c) => image(CLIENT_IMAGE, "client", Some(c.argv()), Vec::new()),
    }
}

/// A readiness probe as a container's `readinessProbe`: checked every
/// second from the node, as the local cluster's kubelet polls.
fn probe_json(probe: &ReadinessProbe) -> Value {
    let handler = match probe {
        ReadinessProbe::Tcp { port } => json!({"tcpSocket": {"port": port}}),
        ReadinessProbe::HttpGet { port, path } => {
            json!({"httpGet": {"port": port, "path": path}})
        }
    };
    let mut v = handler;
    v["periodSeconds"] = 1.into();
    v["timeoutSeconds"] = 1.into();
    v["failureThreshold"] = 3.into();
    v
}

/// The Pod for `req` (on `node`, picked by the scheduler through the
/// `kubernetes.io/hostname` label every Node carries).
///
/// Readiness: Kubernetes runs one `readinessProbe` per container, and a
/// request without one means "a TCP connection to each port". The
/// container gets a `tcpSocket` probe of the first port (what kubelet
/// runs, what the Ready condition and the Service's endpoints follow), and
/// the pod carries every check in [`READINESS_CHECKS`]: `create_pod` and
/// `probe_readiness` run them all from the node, so a pod is not handed to
/// a scenario before each of its ports answers. A request's own probe is
/// the container's probe, and the only check.
pub fn pod_manifest(req: &PodRequest, node: &str, grace: Duration) -> Value {
    let run = container_of(req.command.as_ref());
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut c = json!({
        "name": run.name,
        "image": run.image,
        "env": [
            field("POD_NAME", "metadata.name"),
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_IP", "status.podIP"),
            field("NODE_NAME", "spec.nodeName"),
            field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ],
    });
    if let Some(env) = c["env"].as_array_mut() {
        env.extend(req.env.iter().map(|v| json!(v)));
    }
    if !req.volumes.is_empty() {
        c["volumeMounts"] = req
            .volumes
            .iter()
            .map(|v| json!({"name": v.volume.name, "mountPath": v.mount_path, "readOnly": true}))
            .collect();
    }
    if let Some(command) = run.command {
        c["command"] = json!(command);
    }
    if !run.args.is_empty() {
        c["args"] = json!(run.args);
    }
    if !req.ports.is_empty() {
        c["ports"] = req
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({"containerPort": p.port, "protocol": "TCP"});
                if !p.name.is_empty() {
                    port["name"] = p.name.clone().into();
                }
                port
            })
            .collect();
    }
    let probe = req.readiness.clone().or_else(|| {
        req.ports
            .first()
            .map(|p| ReadinessProbe::Tcp { port: p.port })
    });
    if let Some(probe) = &probe {
        c["readinessProbe"] = probe_json(probe);
    }
    let checks = serde_json::to_string(&req.readiness_checks()).expect("probes serialize");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": req.name,
            "namespace": req.namespace,
            "labels": req.labels,
            "annotations": {READINESS_CHECKS: checks},
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "serviceAccountName": req.service_account,
            "terminationGracePeriodSeconds": grace.as_secs(),
            "containers": [c],
            "volumes": req.volumes.iter().map(|v| json!(v.volume)).collect::<Vec<_>>(),
        },
    })
}

/// The readiness checks a pod made by [`pod_manifest`] carries.
pub fn readiness_checks(pod: &Value) -> Vec<ReadinessProbe> {
    pod["metadata"]["annotations"][READINESS_CHECKS]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// `kind.group` as kubectl names a resource type (`endpointslice.discovery.k8s.io`).
fn resource_of(key: &ObjectKey) -> String {
    let kind = key.kind.to_ascii_lowercase();
    if key.group.is_empty() {
        kind
    } else {
        format!("{kind}.{}", key.group)
    }
}

impl Cluster for KubeCluster<'_> {
    fn nodes(&self) -> Vec<String> {
        self.mesh.node_names()
    }

    fn apply(&self, objects: &[Object]) -> Result<(), ClusterError> {
        objects.iter().try_for_each(|o| self.apply_one(o))
    }

    fn on_demand_waypoints(&self, namespace: &str) -> Result<Vec<OnDemand>, ClusterError> {
        let selector = format!(
            "{}={}",
            api::labels::ON_DEMAND_WAYPOINT,
            api::labels::ON_DEMAND_WAYPOINT_VALUE
        );
        let list = self
            .kubectl()
            .json(&[
                "get",
                "gateways.gateway.networking.k8s.io",
                "-n",
                namespace,
                "-l",
                &selector,
            ])
            .map_err(KubeMeshError::from)?;
        let mut out: Vec<OnDemand> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(OnDemand::of)
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn object_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, ClusterError> {
        let object = self
            .kubectl()
            .get(kind, Some(namespace), name)
            .map_err(KubeMeshError::from)?;
        Ok(object.map(|o| o["status"].clone()).filter(|s| !s.is_null()))
    }

    /// Consecutive keys of one kind and namespace go in one `kubectl
    /// delete`, so their deletions (and waits) overlap.
    fn delete(&self, keys: &[ObjectKey]) -> Result<(), ClusterError> {
        for group in keys
            .chunk_by(|a, b| a.group == b.group && a.kind == b.kind && a.namespace == b.namespace)
        {
            let resource = resource_of(&group[0]);
            let mut args = vec!["delete", resource.as_str()];
            args.extend(group.iter().map(|k| k.name.as_str()));
            if let Some(ns) = &group[0].namespace {
                args.extend(["-n", ns.as_str()]);
            }
            args.extend(["--ignore-not-found", "--wait=true"]);
            self.kubectl().run(&args).map_err(KubeMeshError::from)?;
        }
        Ok(())
    }

    fn create_pod(&self, req: &PodRequest) -> Result<PodInfo, ClusterError> {
        let nodes = self.nodes();
        let node = match &req.node {
            Some(n) if nodes.contains(n) => n.clone(),
            Some(n) => return Err(ClusterError::NoNode(n.clone(), nodes.join(", "))),
            None => nodes.first().cloned().unwrap_or_default(),
        };
        let manifest = pod_manifest(req, &node, self.config.pod_grace);
        let created = self
            .kubectl()
            .create(&manifest.to_string())
            .map_err(KubeMeshError::from)?;
        let uid = created["metadata"]["uid"].clone();
        let (ns, name) = (req.namespace.clone(), req.name.clone());
        let ready = self.kubectl().wait_for(
            &format!("pod {ns}/{name} Ready"),
            self.config.pod_ready,
            |k| {
                let pod = k.get("pod", Some(&ns), &name)?;
                Ok(pod.filter(|p| {
                    p["metadata"]["uid"] == uid && condition(p, "Ready").as_deref() == Some("True")
                }))
            },
        );
        let pod = match ready {
            Ok(pod) => pod,
            Err(e) => {
                let status = self
                    .api_pod(&ns, &name)
                    .ok()
                    .flatten()
                    .map(|p| p["status"].to_string())
                    .unwrap_or_default();
                return Err(self.not_ready(req, format!("{e}; status: {status}")));
            }
        };
        let info = Self::pod_info(&pod).ok_or_else(|| {
            self.not_ready(req, format!("Ready without an address: {}", pod["status"]))
        })?;
        let netns = self.node_netns(&info.node)?.clone();
        let checks = req.readiness_checks();
        if let Err(reason) =
            self.until_checks_pass(&netns, info.ip, &checks, self.config.pod_ready)?
        {
            return Err(self.not_ready(req, reason));
        }
        Ok(info)
    }

    fn probe_readiness(&self, namespace: &str, pod: &str) -> Result<ProbeOutcome, ClusterError> {
        let api = self
            .api_pod(namespace, pod)?
            .ok_or_else(|| ClusterError::NoPod(namespace.into(), pod.into()))?;
        let info = Self::pod_info(&api)
            .ok_or_else(|| ClusterError::NoPod(namespace.into(), pod.into()))?;
        let netns = self.node_netns(&info.node)?;
        run_checks(
            netns,
            info.ip,
            &readiness_checks(&api),
            self.config.probe_timeout,
        )
    }

    fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        match self
            .kubectl()
            .run(&["delete", "pod", name, "-n", namespace, "--wait=true"])
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Err(ClusterError::NoPod(namespace.into(), name.into())),
            Err(e) => Err(KubeMeshError::from(e).into()),
        }
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.api_pod(namespace, name)
            .ok()
            .flatten()
            .and_then(|p| Self::pod_info(&p))
    }

    fn exec(
        &self,
        namespace: &str,
        pod: &str,
        command: &AppCommand,
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError> {
        let (node, _) = self.pod_network(namespace, pod)?;
        let container = node
            .pod(namespace, pod)
            .and_then(|v| v.containers.keys().next().cloned())
            .ok_or_else(|| ClusterError::NoPod(namespace.into(), pod.into()))?;
        let argv = command.argv();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = node
            .exec(namespace, pod, &container, &argv, timeout)
            .map_err(KubeMeshError::from)?;
        Ok(out.into())
    }

    fn proxy_get(
        &self,
        proxy: &ProxyRef,
        port: u16,
        path: &str,
    ) -> Result<HttpResponse, ClusterError> {
        let netns = match proxy {
            ProxyRef::Ztunnel { node } => {
                let name = self.component_name(ZTUNNEL, Some(node))?;
                self.pod_network(SYSTEM_NAMESPACE, &name)?.1
            }
            // hostNetwork: the node's own loopback.
            ProxyRef::NodeAgent { node } => self.node_netns(node)?.clone(),
            ProxyRef::Istiod => {
                let name = self.component_name(ISTIOD, None)?;
                self.pod_network(SYSTEM_NAMESPACE, &name)?.1
            }
            ProxyRef::Pod { namespace, name } => self.pod_network(namespace, name)?.1,
        };
        crate::cluster::loopback_get(proxy, &netns, port, path, self.config.http_timeout)
    }

    /// istiod-rs: its Deployment scaled to 0, returning once its pod is
    /// gone. A node's ztunnel-rs: its pod deleted (SIGTERM: it drains for
    /// up to its grace period), returning once the pod is gone; the
    /// DaemonSet controller creates the node's next ztunnel at once (the
    /// node's own label cannot take ztunnel alone off it: the node agent's
    /// DaemonSet selects nodes by the same `kubernetes.io/os: linux`). A
    /// node's agent: its container SIGKILLed on the node; kubelet restarts
    /// it (its first restart is immediate).
    fn stop_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Istiod => {
                self.scale_istiod(0)?;
                self.wait("no istiod-rs pod left", self.config.component, |k| {
                    let pods = k.json(&["get", "pods", "-n", SYSTEM_NAMESPACE, "-l", ISTIOD])?;
                    Ok(pods["items"]
                        .as_array()
                        .is_none_or(|a| a.is_empty())
                        .then_some(()))
                })
            }
            ProxyRef::Ztunnel { node } => {
                let name = self.component_name(ZTUNNEL, Some(node))?;
                self.kubectl()
                    .run(&[
                        "delete",
                        "pod",
                        &name,
                        "-n",
                        SYSTEM_NAMESPACE,
                        "--wait=true",
                    ])
                    .map_err(KubeMeshError::from)?;
                Ok(())
            }
            ProxyRef::NodeAgent { node } => {
                let (pod, container, restarts) = self.node_agent_container(node)?;
                self.killed().insert(node.clone(), restarts);
                self.node_runtime(node)?
                    .kill_container(SYSTEM_NAMESPACE, &pod, &container)
                    .map_err(KubeMeshError::from)?;
                Ok(())
            }
            ProxyRef::Pod { namespace, name } => Err(ClusterError::NotAComponent(format!(
                "pod {namespace}/{name}"
            ))),
        }
    }

    /// istiod-rs: its pods deleted with a zero grace period (SIGKILL, no
    /// drain), then scaled to zero so none comes back until started.
    /// ztunnel-rs: the node's pod deleted with a zero grace period. Node
    /// agent: its container killed, as [`Cluster::stop_component`] does.
    fn crash_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        let force = ["--grace-period=0", "--force", "--wait=false"];
        match component {
            ProxyRef::Istiod => {
                let mut args = vec!["delete", "pods", "-n", SYSTEM_NAMESPACE, "-l", ISTIOD];
                args.extend(force);
                self.kubectl().run(&args).map_err(KubeMeshError::from)?;
                self.stop_component(component)
            }
            ProxyRef::Ztunnel { node } => {
                let name = self.component_name(ZTUNNEL, Some(node))?;
                let mut args = vec!["delete", "pod", &name, "-n", SYSTEM_NAMESPACE];
                args.extend(force);
                self.kubectl().run(&args).map_err(KubeMeshError::from)?;
                Ok(())
            }
            ProxyRef::NodeAgent { .. } | ProxyRef::Pod { .. } => self.stop_component(component),
        }
    }

    /// istiod-rs: scaled back to 1, returning once its pod is Ready and
    /// the API server reaches its webhook again (policy writes are
    /// admitted). ztunnel-rs: once the node's (new) pod is Ready. Node
    /// agent: once the restarted container is Ready and answers `/readyz`.
    fn start_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Istiod => {
                self.scale_istiod(1)?;
                self.until_component_ready(ISTIOD, None)?;
                self.until_webhook_serves()
            }
            ProxyRef::Ztunnel { node } => self.until_component_ready(ZTUNNEL, Some(node)),
            ProxyRef::NodeAgent { node } => self.until_agent_back(node),
            ProxyRef::Pod { namespace, name } => Err(ClusterError::NotAComponent(format!(
                "pod {namespace}/{name}"
            ))),
        }
    }

    /// `kubectl rollout restart` of the ztunnel DaemonSet: its update
    /// strategy (`maxSurge: 1, maxUnavailable: 0`) starts each node's new
    /// pod beside the old one, and deletes the old one (which drains within
    /// its termination grace period) once the new one is Ready, node after
    /// node. Returns once every node has a Ready ztunnel pod that was not
    /// there before.
    fn upgrade_ztunnels(&self) -> Result<(), ClusterError> {
        let names = |pods: &Value| -> Vec<String> {
            pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(name_of)
                .collect()
        };
        let before = names(
            &self
                .kubectl()
                .json(&["get", "pods", "-n", SYSTEM_NAMESPACE, "-l", ZTUNNEL])
                .map_err(KubeMeshError::from)?,
        );
        self.kubectl()
            .run(&[
                "rollout",
                "restart",
                "daemonset/ztunnel",
                "-n",
                SYSTEM_NAMESPACE,
            ])
            .map_err(KubeMeshError::from)?;
        let nodes = self.nodes();
        self.wait(
            "a new, Ready ztunnel pod on every node",
            self.config.component * nodes.len().max(1) as u32,
            |k| {
                let pods = k.json(&["get", "pods", "-n", SYSTEM_NAMESPACE, "-l", ZTUNNEL])?;
                let fresh_ready = |node: &String| {
                    pods["items"].as_array().into_iter().flatten().any(|p| {
                        !before.contains(&name_of(p))
                            && p["metadata"]["deletionTimestamp"].is_null()
                            && p["spec"]["nodeName"] == node.as_str()
                            && condition(p, "Ready").as_deref() == Some("True")
                    })
                };
                Ok(nodes.iter().all(fresh_ready).then_some(()))
            },
        )
    }

    /// istiod-rs: scaled to 1. ztunnel-rs: returns once the DaemonSet's
    /// new pod on the node runs its container. Node agent: kubelet
    /// restarts it on its own; nothing to launch.
    fn launch_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Istiod => self.scale_istiod(1),
            ProxyRef::Ztunnel { node } => self.until_ztunnel_runs(node),
            ProxyRef::NodeAgent { .. } => Ok(()),
            ProxyRef::Pod { namespace, name } => Err(ClusterError::NotAComponent(format!(
                "pod {namespace}/{name}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::fixture::{client_pod, echo_server};

    #[test]
    fn an_echo_server_is_its_image_with_every_port_checked() {
        let req = echo_server("l4", "server-0", "node0", "server").label("app", "server");
        let pod = pod_manifest(&req, "node0", Duration::from_secs(2));
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["image"], ECHO_IMAGE);
        assert!(c["command"].is_null(), "the image's entrypoint runs: {c}");
        assert_eq!(c["args"][0], "--tcp");
        assert_eq!(
            pod["spec"]["nodeSelector"]["kubernetes.io/hostname"],
            "node0"
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "server");
        assert_eq!(pod["metadata"]["labels"]["app"], "server");
        let ports: Vec<u64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, [9000, 9001, 9002, 9003, 8080, 7070]);
        assert_eq!(c["ports"][3]["name"], "hello-alt");
        // kubelet probes the first port; the harness checks all six.
        assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], 9000);
        let checks = readiness_checks(&pod);
        assert_eq!(checks.len(), 6);
        assert_eq!(checks[4], ReadinessProbe::Tcp { port: 8080 });
        assert_eq!(checks[5], ReadinessProbe::Tcp { port: 7070 });
        let env: Vec<&str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            env,
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "POD_IP",
                "NODE_NAME",
                "SERVICE_ACCOUNT"
            ]
        );
    }

    #[test]
    fn a_pod_without_a_command_is_the_client_image_idling_without_probes() {
        let pod = pod_manifest(
            &client_pod("l4", "client-0", "node1", "client"),
            "node1",
            Duration::from_secs(2),
        );
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["image"], CLIENT_IMAGE);
        assert_eq!(c["command"], json!(["sleep", "infinity"]));
        assert!(c["readinessProbe"].is_null());
        assert!(c["ports"].is_null());
        assert!(readiness_checks(&pod).is_empty());
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 2);
    }

    #[test]
    fn a_requested_probe_is_the_containers_probe_and_the_only_check() {
        let probe = ReadinessProbe::HttpGet {
            port: 8080,
            path: "/ready".into(),
        };
        let req = echo_server("l4", "probed-0", "node0", "server").readiness(probe.clone());
        let pod = pod_manifest(&req, "node0", Duration::from_secs(2));
        let p = &pod["spec"]["containers"][0]["readinessProbe"];
        assert_eq!(p["httpGet"], json!({"port": 8080, "path": "/ready"}));
        assert!(p["tcpSocket"].is_null());
        assert_eq!(readiness_checks(&pod), vec![probe]);
    }

    #[test]
    fn another_program_runs_as_the_client_images_command() {
        let req = PodRequest::new("l4", "x").command(AppCommand::new("/bin/true", ["-v"]));
        let pod = pod_manifest(&req, "node0", Duration::from_secs(2));
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["image"], CLIENT_IMAGE);
        assert_eq!(c["command"], json!(["/bin/true", "-v"]));
        let client = PodRequest::new("l4", "y").command(AppCommand::client(["load"]));
        let pod = pod_manifest(&client, "node0", Duration::from_secs(2));
        assert_eq!(pod["spec"]["containers"][0]["args"], json!(["load"]));
    }

    #[test]
    fn a_requests_env_and_volumes_go_into_the_pod_spec() {
        let token: k8s_openapi::api::core::v1::Volume = serde_json::from_value(json!({
            "name": "istio-token",
            "projected": {"sources": [{"serviceAccountToken": {"path": "istio-token", "audience": "istio-ca"}}]},
        }))
        .unwrap();
        let ip: k8s_openapi::api::core::v1::EnvVar = serde_json::from_value(
            json!({"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        )
        .unwrap();
        let req = PodRequest::new("l7", "w-0")
            .command(AppCommand::new("/bin/true", ["-v"]))
            .env_var(ip)
            .volume(token, "/var/run/secrets/tokens");
        let pod = pod_manifest(&req, "node0", Duration::from_secs(2));
        let c = &pod["spec"]["containers"][0];
        assert_eq!(
            c["env"][5],
            json!({"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        );
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}])
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "istio-ca"
        );
    }

    #[test]
    fn admission_refusals_are_told_apart_from_other_errors() {
        let denied = "Error from server (Forbidden): error when creating \"STDIN\": admission webhook \
                      \"validation.istio.io\" denied the request: AuthorizationPolicy l4/p: \
                      rules[0].to[0].operation.ports[0]: \"http\" is not a port number";
        match admission_refusal("AuthorizationPolicy l4/p", denied) {
            Some(ClusterError::Refused { object, reason }) => {
                assert_eq!(object, "AuthorizationPolicy l4/p");
                assert!(
                    reason.starts_with("AuthorizationPolicy l4/p: rules[0]"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let away = "Error from server (InternalError): Internal error occurred: failed calling webhook \
                    \"validation.istio.io\": failed to call webhook: no endpoints available for service \"istiod\"";
        assert!(matches!(
            admission_refusal("AuthorizationPolicy l4/p", away),
            Some(ClusterError::ValidatorUnavailable { .. })
        ));
        assert!(admission_refusal("x", "error: the server doesn't have a resource type").is_none());
    }

    #[test]
    fn resources_are_named_kind_dot_group() {
        let slice = ObjectKey::new("discovery.k8s.io", "EndpointSlice", Some("l4"), "s");
        assert_eq!(resource_of(&slice), "endpointslice.discovery.k8s.io");
        assert_eq!(
            resource_of(&ObjectKey::core("Service", Some("l4"), "s")),
            "service"
        );
    }
}
