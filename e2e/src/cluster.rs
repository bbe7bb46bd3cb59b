//! The interface end-to-end scenarios are written against, so one scenario
//! list runs on the local cluster (network namespaces, [`crate::local`]) and
//! on the real Kubernetes control plane ([`crate::kube::cluster`]). It speaks Kubernetes' own words: apply and
//! delete objects, create and delete pods, exec a command in a pod, and read
//! a proxy's admin endpoints.
//!
//! Synchronous on purpose: the mesh runs in separate processes, so the
//! harness has nothing to multiplex, and teardown in `Drop` stays simple.
//! Scenarios that want concurrency use threads.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::objects::{Object, ObjectError, ObjectKey};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    ConfigDir(#[from] crate::config_dir::ConfigDirError),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Binary(#[from] crate::binaries::BinaryError),
    #[error(transparent)]
    Cni(#[from] crate::cni::CniError),
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("pod {namespace}/{name}: {field}: {problem}")]
    BadPod {
        namespace: String,
        name: String,
        field: &'static str,
        problem: String,
    },
    #[error("waypoint Deployment in {file}: {source}")]
    Waypoint {
        file: String,
        source: Box<ClusterError>,
    },
    #[error("pod of Deployment {deployment}: {source}")]
    Deployment {
        deployment: String,
        source: Box<ClusterError>,
    },
    /// A Deployment the local cluster cannot run as written (the
    /// Deployment, the field and why).
    #[error("{0}")]
    BadDeployment(String),
    #[error("no node named {0:?} (nodes: {1})")]
    NoNode(String, String),
    #[error("no pod {0}/{1}")]
    NoPod(String, String),
    #[error(
        "pod {namespace}/{name} did not become ready: {reason}\n--- last lines of {log} ---\n{tail}"
    )]
    NotReady {
        namespace: String,
        name: String,
        reason: String,
        log: String,
        tail: String,
    },
    #[error("GET http://{address}{path} in {place}: {reason}")]
    Http {
        place: String,
        address: String,
        path: String,
        reason: String,
    },
    #[error(
        "{0} is not a mesh component that can be stopped and started (istiod, a node's ztunnel or node agent)"
    )]
    NotAComponent(String),
    #[error("the cluster runs without the mesh; start it with the mesh on")]
    MeshOff,
    #[error("{0} is not running (stopped; start it first)")]
    NotRunning(String),
    #[error("this cluster cannot do it yet: {0}")]
    Unsupported(String),
    #[error("{what} is not the JSON expected: {reason}\n{text}")]
    Json {
        what: String,
        reason: String,
        text: String,
    },
    /// The API server refused the object at admission: a validating
    /// webhook (istiod-rs's) read it and said no. Only a real cluster
    /// refuses; the local cluster stores every well-formed object and
    /// leaves the verdict to istiod-rs.
    #[error("the API server refused {object}: {reason}")]
    Refused { object: String, reason: String },
    /// The API server refused the object because the webhook that must
    /// validate it could not be called (istiod-rs is away and the
    /// webhook's `failurePolicy` is `Fail`): nothing skips validation.
    #[error("the API server could not have {object} validated, so refused it: {reason}")]
    ValidatorUnavailable { object: String, reason: String },
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeMeshError),
}

/// A port a pod's app serves. Without a [`ReadinessProbe`], the pod becomes
/// Ready once kubelet can open a TCP connection to each of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    /// May be empty; a Service's named `targetPort` refers to it.
    pub name: String,
    pub port: u16,
}

/// How kubelet tells that a pod is ready (the container's `readinessProbe`),
/// always from the pod's node: its connections come from the node, as
/// kubelet's do.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReadinessProbe {
    /// `tcpSocket`: a TCP connection to the pod's address and port opens.
    Tcp { port: u16 },
    /// `httpGet`: `GET path` on the pod's address and port answers 2xx or 3xx.
    HttpGet { port: u16, path: String },
}

impl ReadinessProbe {
    /// One probe from `node` to the pod at `ip`, as kubelet makes it: a
    /// TCP connection that opens, or a GET answered 2xx/3xx, within `timeout`.
    pub fn run_from(
        &self,
        node: &crate::netns::NetNs,
        ip: std::net::Ipv4Addr,
        timeout: std::time::Duration,
    ) -> Result<ProbeOutcome, crate::netns::NetnsError> {
        Ok(match self {
            ReadinessProbe::Tcp { port } => match node.tcp_connects((ip, *port).into(), timeout)? {
                Ok(()) => ProbeOutcome {
                    passed: true,
                    detail: "connected".into(),
                },
                Err(detail) => ProbeOutcome {
                    passed: false,
                    detail,
                },
            },
            ReadinessProbe::HttpGet { port, path } => {
                match crate::http::get_at(node, (ip, *port).into(), path, timeout) {
                    Ok(resp) => ProbeOutcome {
                        passed: (200..400).contains(&resp.status),
                        detail: format!("{} {}", resp.status, resp.body.trim()),
                    },
                    Err(crate::http::HttpError::Get { reason, .. }) => ProbeOutcome {
                        passed: false,
                        detail: reason,
                    },
                    Err(crate::http::HttpError::Netns(e)) => return Err(e),
                }
            }
        })
    }
}

/// What one readiness probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub passed: bool,
    /// The response body of an HTTP probe, or why the probe failed.
    pub detail: String,
}

/// A command to run in a pod. `program` is either a sample app (`echo`,
/// `client`: the cluster finds its binary, or its image in a real cluster)
/// or a path / command name run as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppCommand {
    pub program: String,
    pub args: Vec<String>,
}

impl AppCommand {
    pub fn new<I, S>(program: &str, args: I) -> AppCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        AppCommand {
            program: program.to_string(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The `echo` sample server.
    pub fn echo<I, S>(args: I) -> AppCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        AppCommand::new("echo", args)
    }

    /// The `client` sample app.
    pub fn client<I, S>(args: I) -> AppCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        AppCommand::new("client", args)
    }

    /// The command as one line (the pod's `command` in its YAML).
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

/// A volume of a pod and where its container mounts it (`volumes[]` and
/// the container's `volumeMounts[]`, read-only). The node materializes it
/// as kubelet does (see [`crate::kube::node::volumes`]); the local cluster,
/// which has no mount namespaces, puts it in a directory of the run and
/// rewrites the container's environment values and arguments that name a
/// path under `mount_path` to that directory.
#[derive(Clone, Debug, PartialEq)]
pub struct PodVolume {
    pub volume: k8s_openapi::api::core::v1::Volume,
    pub mount_path: String,
}

/// What pod to create.
#[derive(Clone, Debug, PartialEq)]
pub struct PodRequest {
    pub namespace: String,
    pub name: String,
    /// `None`: the first node.
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The app; `None` for a pod that only holds its network (e.g. to exec clients in).
    pub command: Option<AppCommand>,
    pub ports: Vec<NamedPort>,
    /// `None`: a TCP probe of each port.
    pub readiness: Option<ReadinessProbe>,
    /// The container's `env`, after the variables every pod gets
    /// (`POD_NAME`, `POD_NAMESPACE`, `POD_IP`, `NODE_NAME`,
    /// `SERVICE_ACCOUNT`): values with kubelet's `$(VAR)` expansion, or
    /// `valueFrom` (`fieldRef`, `configMapKeyRef`, `secretKeyRef`) resolved by
    /// the pod's node.
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    pub volumes: Vec<PodVolume>,
}

impl PodRequest {
    /// What kubelet checks before the pod is Ready: its own readiness
    /// probe, else a TCP connection to each of its ports (all must pass).
    pub fn readiness_checks(&self) -> Vec<ReadinessProbe> {
        match &self.readiness {
            Some(probe) => vec![probe.clone()],
            None => self
                .ports
                .iter()
                .map(|p| ReadinessProbe::Tcp { port: p.port })
                .collect(),
        }
    }
}

impl PodRequest {
    pub fn new(namespace: &str, name: &str) -> PodRequest {
        PodRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: None,
            labels: BTreeMap::new(),
            service_account: "default".to_string(),
            command: None,
            ports: Vec::new(),
            readiness: None,
            env: Vec::new(),
            volumes: Vec::new(),
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_string();
        self
    }

    pub fn command(mut self, command: AppCommand) -> Self {
        self.command = Some(command);
        self
    }

    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.ports.push(NamedPort {
            name: name.to_string(),
            port,
        });
        self
    }

    pub fn readiness(mut self, probe: ReadinessProbe) -> Self {
        self.readiness = Some(probe);
        self
    }

    /// Adds an `env` entry (see [`PodRequest::env`]).
    pub fn env_var(mut self, var: k8s_openapi::api::core::v1::EnvVar) -> Self {
        self.env.push(var);
        self
    }

    /// Adds a volume mounted at `mount_path`.
    pub fn volume(mut self, volume: k8s_openapi::api::core::v1::Volume, mount_path: &str) -> Self {
        self.volumes.push(PodVolume {
            volume,
            mount_path: mount_path.to_string(),
        });
        self
    }
}

/// A running pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub ip: Ipv4Addr,
}

/// What a command run in a pod produced. A non-zero exit is not an error of
/// the cluster; check [`ExecOutput::success`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for ExecOutput {
    fn from(out: std::process::Output) -> ExecOutput {
        ExecOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Parses stdout as JSON (the sample `client` prints one report).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClusterError> {
        serde_json::from_str(self.stdout.trim()).map_err(|e| ClusterError::Json {
            what: format!(
                "stdout of a command (exit {:?}, stderr {:?})",
                self.code,
                self.stderr.trim()
            ),
            reason: e.to_string(),
            text: self.stdout.clone(),
        })
    }
}

/// Which proxy (or control plane) to ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyRef {
    /// The ztunnel-rs of a node.
    Ztunnel { node: String },
    /// The node agent (`ztunnel-rs cni`) of a node: metrics on 15014,
    /// readiness on 8000.
    NodeAgent { node: String },
    /// istiod-rs.
    Istiod,
    /// A process in a pod (a waypoint, or a sample app).
    Pod { namespace: String, name: String },
}

/// An HTTP response from a proxy's admin or metrics port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// A waypoint Gateway istiod-rs created on demand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnDemand {
    pub name: String,
    /// Its `istio-rs.io/needed-by` annotation.
    pub needed_by: String,
}

impl OnDemand {
    /// Of a Gateway (JSON).
    pub fn of(gateway: &serde_json::Value) -> OnDemand {
        let metadata = &gateway["metadata"];
        OnDemand {
            name: metadata["name"].as_str().unwrap_or_default().to_string(),
            needed_by: metadata["annotations"][api::labels::NEEDED_BY]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }
    }
}

/// A Kubernetes-shaped cluster that scenarios drive. `Sync`: scenarios run
/// traffic on one thread while they change the cluster on another.
pub trait Cluster: Send + Sync {
    /// Node names, in order.
    fn nodes(&self) -> Vec<String>;

    /// Creates or replaces objects (as `kubectl apply`). Pods are not
    /// objects here: use [`Cluster::create_pod`]. A real API server may
    /// refuse an object at admission ([`ClusterError::Refused`], or
    /// [`ClusterError::ValidatorUnavailable`] while istiod-rs, whose
    /// webhook validates policies, is away); the local cluster stores every
    /// well-formed object and leaves the verdict to istiod-rs.
    fn apply(&self, objects: &[Object]) -> Result<(), ClusterError>;

    /// Deletes objects; deleting an object that does not exist is not an error.
    fn delete(&self, keys: &[ObjectKey]) -> Result<(), ClusterError>;

    /// The waypoint Gateways istiod-rs created on demand in `namespace`
    /// (labelled `istio-rs.io/on-demand-waypoint: "true"`), by name, each
    /// with its `istio-rs.io/needed-by` annotation (empty while it drains).
    fn on_demand_waypoints(&self, namespace: &str) -> Result<Vec<OnDemand>, ClusterError>;

    /// The `status` istiod-rs wrote for an object (`kind` as in its YAML),
    /// when it has written one.
    fn object_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, ClusterError>;

    /// Creates a pod and returns once it is Ready (its readiness probe, run
    /// from its node, passes).
    fn create_pod(&self, pod: &PodRequest) -> Result<PodInfo, ClusterError>;

    /// Runs a running pod's readiness probe once, from its node, as kubelet
    /// does (see [`ReadinessProbe`]); a pod without one has none to run.
    fn probe_readiness(&self, namespace: &str, pod: &str) -> Result<ProbeOutcome, ClusterError>;

    /// Deletes a pod: it leaves its services' endpoints, its process is
    /// stopped, its network removed.
    fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError>;

    /// A running pod.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo>;

    /// Runs a one-shot command inside a pod (its network) and collects its
    /// output; it is killed after `timeout`, which is an error.
    fn exec(
        &self,
        namespace: &str,
        pod: &str,
        command: &AppCommand,
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError>;

    /// HTTP GET of `path` on a proxy's loopback `port` (admin 15000,
    /// metrics 15020, readiness 15021; istiod 15014).
    fn proxy_get(
        &self,
        proxy: &ProxyRef,
        port: u16,
        path: &str,
    ) -> Result<HttpResponse, ClusterError>;

    /// Runs the mesh's `istioctl-rs` with `args` where `beside`'s loopback
    /// ports (ztunnel admin 15000, istiod monitoring 15014) answer, as a
    /// port-forward gives an operator, and collects its output; killed
    /// after `timeout`, which is an error. A cluster that cannot returns
    /// [`ClusterError::Unsupported`].
    fn istioctl(
        &self,
        beside: &ProxyRef,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError> {
        let _ = (beside, args, timeout);
        Err(ClusterError::Unsupported(
            "running istioctl-rs beside a proxy".into(),
        ))
    }

    /// The directory of YAML istiod-rs reads the cluster from, when the
    /// cluster is one (the local cluster's `--config-dir`).
    fn config_directory(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// The plug-in CA directory istiod-rs signs with and watches, when the
    /// cluster runs it on one (the local cluster's `--cacerts-dir`).
    fn cacerts_directory(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Takes a mesh component down: istiod-rs (in Kubernetes: scaled to
    /// zero), a node's ztunnel-rs (SIGTERM: it drains), or a node's agent
    /// (SIGKILL, as a crash or an OOM kill would). What the proxies hold
    /// stays with them. In Kubernetes a node's ztunnel-rs is its DaemonSet
    /// pod, deleted: the DaemonSet controller starts the next one at once,
    /// so it stays down only until then; the killed node agent is
    /// restarted by kubelet at once.
    fn stop_component(&self, component: &ProxyRef) -> Result<(), ClusterError>;

    /// Takes a mesh component down as a crash would, with no grace: SIGKILL
    /// (local cluster); in Kubernetes istiod-rs is scaled to zero and its
    /// pods deleted with a zero grace period, a node's ztunnel-rs pod is
    /// deleted with a zero grace period (its DaemonSet starts the next one),
    /// the node agent's container is killed. [`Cluster::start_component`]
    /// brings it back.
    fn crash_component(&self, component: &ProxyRef) -> Result<(), ClusterError>;

    /// Brings a stopped mesh component back and returns once it is ready
    /// (istiod: `/ready`; ztunnel: `/healthz/ready`, i.e. it has its xDS
    /// state and its node's pods; node agent: `/readyz`, i.e. it has taken
    /// back its node's running pods).
    fn start_component(&self, component: &ProxyRef) -> Result<(), ClusterError>;

    /// Starts a stopped mesh component without waiting for it to be ready
    /// (a ztunnel started while istiod is down never is, on its own); a
    /// later [`Cluster::start_component`] waits for it.
    fn launch_component(&self, component: &ProxyRef) -> Result<(), ClusterError>;

    /// Replaces every node's ztunnel-rs, one node after the other, as a
    /// DaemonSet rolling update with `maxSurge: 1, maxUnavailable: 0` does
    /// (`manifests/install/ztunnel.yaml`): on each node the new ztunnel-rs
    /// starts beside the old one and becomes Ready (it has the control
    /// plane's state and every pod from the node agent, its in-pod
    /// listeners bound beside the old ones), then the old one gets SIGTERM
    /// and drains: its live connections go on until they end or its drain
    /// deadline passes. Returns once every node runs a new, Ready one; the
    /// old ones may still be draining.
    fn upgrade_ztunnels(&self) -> Result<(), ClusterError>;

    /// [`Cluster::stop_component`], then [`Cluster::start_component`].
    fn restart_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        self.stop_component(component)?;
        self.start_component(component)
    }

    /// [`Cluster::apply`] for YAML text; returns the keys applied.
    fn apply_yaml(&self, yaml: &str) -> Result<Vec<ObjectKey>, ClusterError> {
        let objects = Object::from_yaml(yaml)?;
        self.apply(&objects)?;
        Ok(objects.iter().map(|o| o.key().clone()).collect())
    }

    /// [`Cluster::delete`] for the objects of YAML text.
    fn delete_yaml(&self, yaml: &str) -> Result<(), ClusterError> {
        let keys: Vec<ObjectKey> = Object::from_yaml(yaml)?
            .iter()
            .map(|o| o.key().clone())
            .collect();
        self.delete(&keys)
    }

    /// A proxy's Prometheus metrics (text format).
    fn metrics(&self, proxy: &ProxyRef) -> Result<String, ClusterError> {
        let port = match proxy {
            ProxyRef::Istiod => api::ports::ISTIOD_MONITORING,
            ProxyRef::NodeAgent { .. } => NODE_AGENT_MONITORING,
            _ => api::ports::STATS,
        };
        ok_body(self.proxy_get(proxy, port, "/metrics")?, proxy, "/metrics")
    }

    /// A proxy's configuration dump (JSON).
    fn config_dump(&self, proxy: &ProxyRef) -> Result<serde_json::Value, ClusterError> {
        let (port, path) = match proxy {
            ProxyRef::Istiod => (api::ports::ISTIOD_MONITORING, "/debug/config_dump"),
            _ => (api::ports::ADMIN, "/config_dump"),
        };
        let body = ok_body(self.proxy_get(proxy, port, path)?, proxy, path)?;
        serde_json::from_str(&body).map_err(|e| ClusterError::Json {
            what: format!("{path} of {proxy:?}"),
            reason: e.to_string(),
            text: body.chars().take(2000).collect(),
        })
    }
}

/// The node agent's `/metrics` port (upstream istio-cni's monitoring port).
pub const NODE_AGENT_MONITORING: u16 = 15014;
/// The node agent's `/readyz` port (upstream istio-cni's).
pub const NODE_AGENT_READINESS: u16 = 8000;

/// GET of `path` on `127.0.0.1:port` in `netns`, where `proxy` listens.
pub(crate) fn loopback_get(
    proxy: &ProxyRef,
    netns: &crate::netns::NetNs,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, ClusterError> {
    crate::http::get(netns, port, path, timeout).map_err(|e| match e {
        crate::http::HttpError::Get {
            netns,
            address,
            path,
            reason,
        } => ClusterError::Http {
            place: format!("{proxy:?} (network namespace {netns})"),
            address: address.to_string(),
            path,
            reason,
        },
        crate::http::HttpError::Netns(e) => e.into(),
    })
}

fn ok_body(resp: HttpResponse, proxy: &ProxyRef, path: &str) -> Result<String, ClusterError> {
    if resp.status == 200 {
        return Ok(resp.body);
    }
    Err(ClusterError::Http {
        place: format!("{proxy:?}"),
        address: "127.0.0.1".into(),
        path: path.into(),
        reason: format!(
            "status {}: {}",
            resp.status,
            resp.body.chars().take(500).collect::<String>()
        ),
    })
}
