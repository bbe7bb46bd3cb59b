//! The local cluster: [`Cluster`] on network namespaces. It plays every role
//! Kubernetes would: API server and controllers (the cluster state, written
//! as YAML into the config directory istiod-rs reads), scheduler (pods go to
//! the node asked for), kubelet and container runtime (for each pod: build
//! its namespace and veth, run the CNI plugin when the mesh is on, start the
//! app, report it Ready once its readiness probe passes), and the endpoint
//! controller. Readiness probes run as kubelet runs them: from the pod's
//! node, to the pod's address (a TCP connection to each port, or the pod's
//! own [`ReadinessProbe`]), so with the mesh on they cross the node's
//! kubelet-probe rules exactly as kubelet's would.
//!
//! With the mesh off (today's default) pods talk over plain routing; with it
//! on, istiod-rs and each node's ztunnel-rs and node agent run too (see
//! [`crate::mesh`]). A pod's life:
//!
//! ```text
//! create_pod: Pod (Pending) -> netns + veth -> [CNI ADD] -> podIP written
//!             -> app started -> readiness probe from the node passes -> Ready written
//! delete_pod: terminating written (endpoints not ready) -> app stopped
//!             -> [CNI DEL] -> netns removed -> Pod removed
//! ```
//!
//! Kubelet's part for a pod's container: its `env` (values, `$(VAR)`
//! expansion, `valueFrom` fieldRef / configMapKeyRef / secretKeyRef) and its
//! volumes are resolved by the same code as the Kubernetes node runtime's
//! ([`crate::kube::node::env`], [`crate::kube::node::volumes`]), into a
//! directory per pod in the run. Pods share the host's filesystem (no mount
//! namespaces), so an env value or argument naming a path under a volume's
//! `mountPath` is rewritten to the volume's directory. A
//! `serviceAccountToken` is a new token in the mesh's token file
//! ([`MeshRuntime::issue_token`]), revoked when the pod goes; ConfigMap
//! `istio-ca-root-cert` holds the root istiod-rs keeps, as istiod-rs
//! publishes it in Kubernetes; other ConfigMaps and Secrets come from the
//! cluster state.
//!
//! A background thread, the Deployment controller, keeps one pod per
//! replica (named `<deployment>-<n>`) of each Deployment applied to the
//! cluster whose image the local cluster knows ([`crate::deployments`]:
//! the e2e apps, stand-ins for upstream's Bookinfo and curl images) and,
//! with the mesh on, of each waypoint Deployment istiod-rs provisions into
//! `generated/waypoints/` ([`crate::mesh::waypoint_pods`]): every poll it
//! starts pods for new Deployments (and again when one was deleted),
//! replaces those whose Deployment changed, deletes those whose Deployment
//! went away, logs what fails (Deployment or file, and field) and tries
//! again on the next poll; it stops with the cluster. An applied
//! Deployment's pods go on the nodes in turn from a node chosen by its
//! name (the same every time).
//!
//! kubelet's Docker-link variables (`<SERVICE>_SERVICE_HOST` and the rest,
//! [`kubelet_env::service_env`]) are in every pod's environment for the
//! Services of its namespace that have a cluster IP when it starts, and
//! `$(VAR)` in a pod's arguments is expanded from its environment, as
//! kubelet does.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::jiff::Timestamp;
use rand::Rng;

use crate::binaries::Binaries;
use crate::cluster::{
    AppCommand, Cluster, ClusterError, ExecOutput, HttpResponse, OnDemand, PodInfo, PodRequest,
    ProbeOutcome, ProxyRef, ReadinessProbe,
};
use crate::cni::{self, CniCommand, CniPod};
use crate::config_dir::ConfigDir;
use crate::kube::node::{env as kubelet_env, volumes as kubelet_volumes};
use crate::mesh::{MeshMode, MeshRuntime};
use crate::netns::NetNs;
use crate::objects::{Object, ObjectKey, is_dns_label, is_dns_subdomain};
use crate::process::{ProcessInfo, ProcessSpec, log_tail};
use crate::run::Run;
use crate::state::{ClusterState, NodeRecord, PodRecord};
use crate::topology::{AddressPlan, PodAddressPool, PodNetwork, Topology};

/// How long a CNI plugin invocation may take.
const CNI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an admin/metrics GET may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Sample apps the cluster knows how to find (in a real cluster: their image).
const SAMPLE_APPS: &[&str] = &["echo", "client"];

/// Where the cluster reports each step while it starts (a first start
/// builds the binaries, which takes a while).
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<ProgressFn>>);

type ProgressFn = dyn Fn(&str) + Send + Sync;

impl Progress {
    pub fn new(report: impl Fn(&str) + Send + Sync + 'static) -> Progress {
        Progress(Some(Arc::new(report)))
    }

    pub fn say(&self, step: &str) {
        if let Some(report) = &self.0 {
            report(step);
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(reported)"
        } else {
            "Progress(silent)"
        })
    }
}

/// How to build the local cluster.
#[derive(Clone, Debug)]
pub struct LocalClusterConfig {
    pub nodes: usize,
    pub mesh: MeshMode,
    pub plan: AddressPlan,
    pub binaries: Binaries,
    /// How long a pod may take to pass its readiness probe.
    pub ready_timeout: Duration,
    /// How long one readiness probe may take (kubelet's `timeoutSeconds`
    /// default).
    pub probe_timeout: Duration,
    /// How often the Deployment controller looks at the applied
    /// Deployments and, with the mesh on, `generated/waypoints/`.
    pub deployment_poll: Duration,
    pub progress: Progress,
}

impl Default for LocalClusterConfig {
    fn default() -> Self {
        LocalClusterConfig {
            nodes: 2,
            mesh: MeshMode::Off,
            plan: AddressPlan::default(),
            binaries: Binaries::default(),
            ready_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(1),
            deployment_poll: Duration::from_millis(250),
            progress: Progress::default(),
        }
    }
}

/// A pod the local cluster runs.
#[derive(Clone, Debug)]
struct LocalPod {
    info: PodInfo,
    network: PodNetwork,
    process: Option<ProcessInfo>,
    container_id: String,
    env: BTreeMap<String, String>,
    /// What kubelet probes to tell it is ready.
    probes: Vec<ReadinessProbe>,
    /// Its volumes' directory, and the tokens issued for them.
    files: PodFiles,
}

/// A pod's files on the host: its volumes, and the bearer tokens issued
/// for its `serviceAccountToken` volumes.
#[derive(Clone, Debug, Default)]
struct PodFiles {
    dir: Option<PathBuf>,
    tokens: Vec<String>,
}

/// What asked for a pod the Deployment controller keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// A waypoint Deployment istiod-rs provisioned (its file).
    Waypoint,
    /// A Deployment applied to the cluster (its key).
    Deployment,
}

/// A pod the Deployment controller keeps, and where its Deployment is.
#[derive(Clone, Debug)]
struct OwnedPod {
    owner: Owner,
    /// The file (waypoints) or object key (applied) of the Deployment.
    source: String,
    request: PodRequest,
}

struct Inner {
    state: ClusterState,
    config_dir: ConfigDir,
    pools: Vec<PodAddressPool>,
    pods: BTreeMap<(String, String), LocalPod>,
    /// Pods started for Deployments.
    owned: BTreeMap<(String, String), OwnedPod>,
}

impl Inner {
    /// Writes the cluster state to the config directory.
    fn sync(&mut self) -> Result<(), ClusterError> {
        let files = self.state.render()?;
        self.config_dir.sync(&files)?;
        Ok(())
    }
}

/// The local cluster. Dropping it stops the Deployment controller, then
/// removes everything the cluster created. Everything but the controller is
/// in [`ClusterCore`], which it derefs to.
pub struct LocalCluster {
    controller: Option<DeploymentController>,
    core: Arc<ClusterCore>,
}

impl Deref for LocalCluster {
    type Target = ClusterCore;

    fn deref(&self) -> &ClusterCore {
        &self.core
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(controller) = self.controller.take() {
            controller.stop();
        }
    }
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.core.fmt(f)
    }
}

/// The cluster's network, state and processes, shared by [`LocalCluster`]
/// and its Deployment controller thread.
pub struct ClusterCore {
    topology: Topology,
    binaries: Binaries,
    ready_timeout: Duration,
    probe_timeout: Duration,
    mesh: Option<MeshRuntime>,
    inner: Mutex<Inner>,
    // Last: dropped after everything that refers to what it owns.
    run: Run,
}

impl std::fmt::Debug for ClusterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("run", &self.run)
            .field("nodes", &self.topology.nodes.len())
            .field("mesh", &self.mesh.is_some())
            .finish()
    }
}

impl LocalCluster {
    /// Builds the cluster: topology, initial state, the mesh if asked
    /// for, and the Deployment controller. Anything built before a failure
    /// is removed again.
    pub fn start(config: LocalClusterConfig) -> Result<LocalCluster, ClusterError> {
        let poll = config.deployment_poll;
        let core = Arc::new(ClusterCore::start(config)?);
        let controller = Some(DeploymentController::start(Arc::clone(&core), poll)?);
        Ok(LocalCluster { controller, core })
    }
}

impl ClusterCore {
    /// Builds the cluster: topology, initial state, and the mesh if asked for.
    /// Anything built before a failure is removed again.
    fn start(config: LocalClusterConfig) -> Result<ClusterCore, ClusterError> {
        let progress = &config.progress;
        progress.say("cleaning up after crashed runs, if any");
        let run = Run::start()?;
        progress.say(&format!(
            "building the network: fabric bridge, control plane, {} node(s) (run {}, namespaces {})",
            config.nodes,
            run.id(),
            run.netns_name("*")
        ));
        let topology = Topology::build(&run, config.nodes, config.plan.clone())?;
        let nodes = topology
            .nodes
            .iter()
            .map(|n| NodeRecord {
                name: n.name.clone(),
                ip: n.ip,
                pod_range: n.pod_range,
                labels: BTreeMap::new(),
            })
            .collect();
        let state = ClusterState::new(nodes, config.plan.service_range);
        let config_dir = ConfigDir::create(&run.dir().join("config"))?;
        let mut inner = Inner {
            state,
            config_dir,
            pools: topology
                .nodes
                .iter()
                .map(|n| PodAddressPool::new(n.pod_range))
                .collect(),
            pods: BTreeMap::new(),
            owned: BTreeMap::new(),
        };
        inner.sync()?;
        let mesh = match &config.mesh {
            MeshMode::Off => None,
            MeshMode::On(mesh) => Some(MeshRuntime::start(
                &run,
                &topology,
                inner.config_dir.path(),
                &config.binaries,
                mesh,
                &|step: &str| progress.say(step),
            )?),
        };
        Ok(ClusterCore {
            topology,
            binaries: config.binaries,
            ready_timeout: config.ready_timeout,
            probe_timeout: config.probe_timeout,
            mesh,
            inner: Mutex::new(inner),
            run,
        })
    }

    pub fn run(&self) -> &Run {
        &self.run
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The running mesh, when the cluster runs with the mesh on.
    pub fn mesh(&self) -> Option<&MeshRuntime> {
        self.mesh.as_ref()
    }

    /// The directory holding the cluster state (istiod-rs's `--config-dir`).
    pub fn config_dir(&self) -> PathBuf {
        self.lock().config_dir.path().to_path_buf()
    }

    /// A node's namespace.
    pub fn node_netns(&self, node: &str) -> Option<&NetNs> {
        self.topology
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| &n.netns)
    }

    /// A running pod's namespace.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<NetNs> {
        self.local_pod(namespace, name).map(|p| p.network.netns)
    }

    /// A running pod's log file (its app's stdout and stderr).
    pub fn pod_log(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        self.local_pod(namespace, name)?.process.map(|p| p.log)
    }

    /// Starts, replaces or deletes waypoint pods so they match the waypoint
    /// Deployments istiod-rs has written into `generated/waypoints/` (see
    /// [`crate::mesh::waypoint_pods`]); what failed, every step tried. The
    /// pods of a file that cannot be read or translated are left as they
    /// are. Does nothing with the mesh off. The Deployment controller calls
    /// it on every poll.
    pub fn sync_waypoints(&self) -> Vec<ClusterError> {
        let Some(mesh) = &self.mesh else {
            return Vec::new();
        };
        let generated = self.lock().config_dir.generated();
        let wanted = mesh.waypoint_pods(&generated, &self.nodes());
        let mut errors: Vec<ClusterError> = Vec::new();
        let failed: Vec<String> = wanted
            .failed
            .iter()
            .map(|(f, _)| f.display().to_string())
            .collect();
        errors.extend(wanted.failed.into_iter().map(|(_, e)| e.into()));
        self.lock().state.set_provisioned(wanted.service_accounts);
        let pods = wanted
            .pods
            .into_iter()
            .map(|(file, pod)| (file.display().to_string(), pod))
            .collect();
        errors.extend(self.reconcile(Owner::Waypoint, pods, &failed));
        errors
    }

    /// Starts, replaces or deletes pods so they match the Deployments
    /// applied to the cluster (see [`crate::deployments`]); what failed,
    /// every step tried. The pods of a Deployment that cannot be translated
    /// are left as they are. The Deployment controller calls it on every poll.
    pub fn sync_deployments(&self) -> Vec<ClusterError> {
        let deployments = self.lock().state.of_kind("apps", "Deployment");
        let nodes = self.nodes();
        let mut errors = Vec::new();
        let mut failed = Vec::new();
        let mut wanted = Vec::new();
        for deployment in &deployments {
            let source = deployment.key().to_string();
            let first = stable_index(&source, nodes.len());
            match crate::deployments::deployment_pods(
                deployment,
                &nodes,
                first,
                &crate::deployments::sample_image,
            ) {
                Ok(pods) => wanted.extend(pods.into_iter().map(|p| (source.clone(), p))),
                Err(reason) => {
                    failed.push(source);
                    errors.push(ClusterError::BadDeployment(reason));
                }
            }
        }
        errors.extend(self.reconcile(Owner::Deployment, wanted, &failed));
        errors
    }

    /// The ReplicaSets' work for `owner`'s pods: each pod in `wanted` (with
    /// the Deployment it comes from) runs as asked, a pod that runs
    /// otherwise is replaced, a pod no longer wanted is deleted unless its
    /// Deployment is one of `failed` (it could not be read: the pod is left
    /// as it is). A pod deleted by someone else is started again.
    fn reconcile(
        &self,
        owner: Owner,
        wanted: Vec<(String, PodRequest)>,
        failed: &[String],
    ) -> Vec<ClusterError> {
        let mut errors = Vec::new();
        let by_key: BTreeMap<(String, String), (String, PodRequest)> = wanted
            .into_iter()
            .map(|(source, pod)| ((pod.namespace.clone(), pod.name.clone()), (source, pod)))
            .collect();
        let running: Vec<((String, String), OwnedPod)> = {
            let mut inner = self.lock();
            let Inner { pods, owned, .. } = &mut *inner;
            owned.retain(|key, _| pods.contains_key(key));
            owned
                .iter()
                .filter(|(_, p)| p.owner == owner)
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect()
        };
        for (key, pod) in &running {
            let stale = match by_key.get(key) {
                Some((_, request)) => *request != pod.request,
                None => !failed.contains(&pod.source),
            };
            if stale {
                match self.delete_pod(&key.0, &key.1) {
                    Ok(()) | Err(ClusterError::NoPod(..)) => {
                        self.lock().owned.remove(key);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        for (key, (source, request)) in by_key {
            if self.lock().owned.contains_key(&key) {
                continue;
            }
            match self.create_pod(&request) {
                Ok(_) => {
                    let pod = OwnedPod {
                        owner,
                        source,
                        request,
                    };
                    self.lock().owned.insert(key, pod);
                }
                Err(e) => errors.push(match owner {
                    Owner::Waypoint => ClusterError::Waypoint {
                        file: source,
                        source: Box::new(e),
                    },
                    Owner::Deployment => ClusterError::Deployment {
                        deployment: source,
                        source: Box::new(e),
                    },
                }),
            }
        }
        errors
    }

    fn running_mesh(&self) -> Result<&MeshRuntime, ClusterError> {
        self.mesh.as_ref().ok_or(ClusterError::MeshOff)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn local_pod(&self, namespace: &str, name: &str) -> Option<LocalPod> {
        self.lock()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    fn node_index(&self, node: Option<&str>) -> Result<usize, ClusterError> {
        match node {
            None => Ok(0),
            Some(name) => self
                .topology
                .nodes
                .iter()
                .position(|n| n.name == name)
                .ok_or_else(|| ClusterError::NoNode(name.to_string(), self.nodes().join(", "))),
        }
    }

    /// A sample app's binary, or the program as given.
    /// The network namespace where a proxy's loopback ports answer.
    fn proxy_netns(&self, proxy: &ProxyRef) -> Result<NetNs, ClusterError> {
        Ok(match proxy {
            ProxyRef::Istiod => self.topology.control_plane.clone(),
            ProxyRef::Ztunnel { node } => self
                .running_mesh()?
                .ztunnel_netns(node)?
                .ok_or_else(|| ClusterError::NotRunning(format!("the ztunnel-rs of {node}")))?,
            ProxyRef::NodeAgent { node } => self
                .node_netns(node)
                .cloned()
                .ok_or_else(|| ClusterError::NoNode(node.clone(), self.nodes().join(", ")))?,
            ProxyRef::Pod { namespace, name } => self
                .pod_netns(namespace, name)
                .ok_or_else(|| ClusterError::NoPod(namespace.clone(), name.clone()))?,
        })
    }

    fn program(&self, program: &str) -> Result<PathBuf, ClusterError> {
        if SAMPLE_APPS.contains(&program) {
            return Ok(self.binaries.get("e2e", program)?);
        }
        Ok(PathBuf::from(program))
    }

    fn validate(&self, req: &PodRequest) -> Result<(), ClusterError> {
        let bad = |field, problem: String| ClusterError::BadPod {
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            field,
            problem,
        };
        if !is_dns_label(&req.namespace) {
            return Err(bad("namespace", "is not a valid namespace name".into()));
        }
        if !is_dns_subdomain(&req.name) {
            return Err(bad(
                "name",
                "is not a valid pod name (lower-case letters, digits, '-', '.')".into(),
            ));
        }
        let netns = self.run.netns_name(&pod_role(&req.namespace, &req.name));
        if netns.len() > 200 {
            return Err(bad(
                "name",
                format!("is too long for a network namespace name ({netns})"),
            ));
        }
        if req.command.is_none() && !req.ports.is_empty() {
            return Err(bad(
                "ports",
                "a pod without a command cannot listen on ports".into(),
            ));
        }
        if req.command.is_none() && req.readiness.is_some() {
            return Err(bad(
                "readinessProbe",
                "a pod without a command has nothing to probe".into(),
            ));
        }
        if !is_dns_subdomain(&req.service_account) {
            return Err(bad("serviceAccountName", "is not a valid name".into()));
        }
        Ok(())
    }

    /// Everything after the pod's record exists: network, CNI, app, readiness.
    fn bring_up(
        &self,
        req: &PodRequest,
        node: usize,
        ip: Ipv4Addr,
        uid: &str,
    ) -> Result<LocalPod, (ClusterError, Partial)> {
        let mut partial = Partial::default();
        let container_id = random_hex(32);
        let node_name = self.topology.nodes[node].name.clone();
        let net = self
            .topology
            .add_pod(&self.run, node, &pod_role(&req.namespace, &req.name), ip)
            .map_err(|e| (e.into(), partial.clone()))?;
        partial.network = Some(net.clone());
        if let Err(e) = net.netns.sysctl("net/ipv4/tcp_tw_reuse", "1") {
            // Only matters for connection-rate benchmarks; the pod still works.
            eprintln!("e2e: pod {}/{}: {e}", req.namespace, req.name);
        }
        if let Some(mesh) = &self.mesh {
            let pod = CniPod {
                namespace: &req.namespace,
                name: &req.name,
                uid,
                container_id: &container_id,
                netns: net.netns.path(),
                ifname: "eth0",
            };
            cni::invoke(
                &mesh.cni_plugin(&node_name),
                &self.topology.nodes[node].netns,
                CniCommand::Add,
                &pod,
                Some(&cni::prev_result(&net)),
                CNI_TIMEOUT,
            )
            .map_err(|e| (e.into(), partial.clone()))?;
            partial.cni_added = true;
            partial.container_id = container_id.clone();
        }
        {
            let mut inner = self.lock();
            let synced = inner
                .state
                .pod_mut(&req.namespace, &req.name)
                .map(|p| p.ip = Some(ip))
                .map_err(ClusterError::from)
                .and_then(|()| inner.sync());
            synced.map_err(|e| (e, partial.clone()))?;
        }
        let (env, mounts) = self
            .container_files(req, uid, node, ip, &mut partial.files)
            .map_err(|e| (e, partial.clone()))?;
        let process = match &req.command {
            None => None,
            Some(command) => {
                let program = self
                    .program(&command.program)
                    .map_err(|e| (e, partial.clone()))?;
                let args = command
                    .args
                    .iter()
                    .map(|a| on_host(&kubelet_env::expand(a, &env), &mounts));
                let mut spec =
                    ProcessSpec::new(format!("pod-{}.{}", req.namespace, req.name), program)
                        .args(args);
                for (k, v) in &env {
                    spec = spec.env(k, v);
                }
                let p = self
                    .run
                    .spawn(&spec, &net.netns)
                    .map_err(|e| (e.into(), partial.clone()))?;
                partial.process = Some(p.clone());
                Some(p)
            }
        };
        let probes = req.readiness_checks();
        if let Some(p) = &process {
            let exited = || self.run.exited(p).map(|s| format!("its app exited ({s})"));
            let node_netns = &self.topology.nodes[node].netns;
            self.until_ready(node_netns, ip, &probes, &exited)
                .map_err(|e| (e, partial.clone()))?
                .map_err(|reason| {
                    let err = ClusterError::NotReady {
                        namespace: req.namespace.clone(),
                        name: req.name.clone(),
                        reason,
                        log: p.log.display().to_string(),
                        tail: log_tail(&p.log, 20),
                    };
                    (err, partial.clone())
                })?;
        }
        Ok(LocalPod {
            info: PodInfo {
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                uid: uid.to_string(),
                node: node_name,
                ip,
            },
            network: net,
            process,
            container_id,
            env,
            probes,
            files: partial.files,
        })
    }

    /// Plays kubelet for the pod's files and environment: materializes
    /// its volumes under `<run>/pods/<namespace>.<name>/volumes/` (tokens
    /// issued go into `files` at once, so a failure revokes them), then
    /// resolves its `env` after the variables every pod gets. Returns the
    /// environment and each mount path with the directory it stands for.
    fn container_files(
        &self,
        req: &PodRequest,
        uid: &str,
        node: usize,
        ip: Ipv4Addr,
        files: &mut PodFiles,
    ) -> Result<Prepared, ClusterError> {
        let n = &self.topology.nodes[node];
        let mut env = pod_env(req, &ip.to_string(), &n.name);
        env.extend(self.service_links(&req.namespace));
        if req.volumes.is_empty() && req.env.is_empty() {
            return Ok((env, Vec::new()));
        }
        let bad = |field, problem: String| ClusterError::BadPod {
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            field,
            problem,
        };
        let pod = pod_object(req, uid, &n.name);
        let facts = kubelet_env::PodFacts {
            pod_ip: Some(ip),
            host_ip: n.ip,
            kubernetes_service: None,
        };
        let mut sources = LocalSources {
            cluster: self,
            namespace: &req.namespace,
            service_account: &req.service_account,
            tokens: &mut files.tokens,
        };
        let dir = self
            .run
            .dir()
            .join("pods")
            .join(pod_role(&req.namespace, &req.name));
        if !req.volumes.is_empty() {
            files.dir = Some(dir.clone());
        }
        let node_fs = self.run.dir().join("nodes").join(&n.name).join("fs");
        let (env, mounts) = kubelet_container(req, &pod, &facts, &dir, &node_fs, env, &mut sources)
            .map_err(|(field, problem)| bad(field, problem))?;
        Ok((env, mounts))
    }

    /// kubelet's Docker-link variables for the Services of `namespace` that
    /// have a cluster IP now.
    fn service_links(&self, namespace: &str) -> Vec<(String, String)> {
        let services = self.lock().state.of_kind("", "Service");
        services
            .iter()
            .filter(|o| o.namespace() == Some(namespace))
            .filter_map(|o| o.to_typed::<core::Service>().ok())
            .flat_map(|svc| {
                let name = svc.metadata.name.unwrap_or_default();
                let spec = svc.spec.unwrap_or_default();
                let ip = spec.cluster_ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok());
                let ports: Vec<kubelet_env::ServicePortVar> = spec
                    .ports
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        Some(kubelet_env::ServicePortVar {
                            name: p.name,
                            port: u16::try_from(p.port).ok()?,
                            protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                        })
                    })
                    .collect();
                ip.map(|ip| kubelet_env::service_env(&name, ip, &ports))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Probes from the node until every probe passes at once (Ok(Err) with
    /// the last failure once `ready_timeout` is over, or as soon as `exited`
    /// says why the app will never pass).
    fn until_ready(
        &self,
        node: &NetNs,
        ip: Ipv4Addr,
        probes: &[ReadinessProbe],
        exited: &dyn Fn() -> Option<String>,
    ) -> Result<Result<(), String>, ClusterError> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let mut failed = None;
            for probe in probes {
                let outcome = self.probe(node, ip, probe)?;
                if !outcome.passed {
                    failed = Some(format!("readiness probe {probe:?}: {}", outcome.detail));
                    break;
                }
            }
            let Some(failure) = failed else {
                return Ok(Ok(()));
            };
            if let Some(reason) = exited() {
                return Ok(Err(format!("{reason}; {failure}")));
            }
            if start.elapsed() >= self.ready_timeout {
                return Ok(Err(format!(
                    "not ready within {:?}; last {failure}",
                    self.ready_timeout
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// One probe from `node` to the pod at `ip`, as kubelet makes it.
    fn probe(
        &self,
        node: &NetNs,
        ip: Ipv4Addr,
        probe: &ReadinessProbe,
    ) -> Result<ProbeOutcome, ClusterError> {
        Ok(probe.run_from(node, ip, self.probe_timeout)?)
    }

    /// Undoes what exists of a pod, outside-in; the first error is returned
    /// but every step is tried.
    fn tear_down(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: usize,
        partial: &Partial,
    ) -> Result<(), ClusterError> {
        let mut first: Option<ClusterError> = None;
        if let Some(p) = &partial.process {
            self.run.stop(p);
        }
        if let (Some(mesh), Some(net), true) = (&self.mesh, &partial.network, partial.cni_added) {
            let n = &self.topology.nodes[node];
            let pod = CniPod {
                namespace,
                name,
                uid,
                container_id: &partial.container_id,
                netns: net.netns.path(),
                ifname: "eth0",
            };
            if let Err(e) = cni::invoke(
                &mesh.cni_plugin(&n.name),
                &n.netns,
                CniCommand::Del,
                &pod,
                None,
                CNI_TIMEOUT,
            ) {
                first.get_or_insert(e.into());
            }
        }
        if let Some(net) = &partial.network
            && let Err(e) = self.topology.remove_pod(&self.run, net)
        {
            first.get_or_insert(e.into());
        }
        if let Some(mesh) = &self.mesh
            && let Err(e) = mesh.revoke_tokens(&partial.files.tokens)
        {
            first.get_or_insert(e.into());
        }
        if let Some(dir) = &partial.files.dir
            && let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "e2e: pod {namespace}/{name}: could not remove {}: {e}",
                dir.display()
            );
        }
        let mut inner = self.lock();
        if let Ok(record) = inner.state.remove_pod(namespace, name)
            && let Some(ip) = record.ip
        {
            inner.pools[node].release(ip);
        }
        if let Err(e) = inner.sync() {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}

/// What exists of a pod being brought up or torn down.
#[derive(Clone, Debug, Default)]
struct Partial {
    network: Option<PodNetwork>,
    cni_added: bool,
    container_id: String,
    process: Option<ProcessInfo>,
    files: PodFiles,
}

impl Cluster for ClusterCore {
    fn nodes(&self) -> Vec<String> {
        self.topology.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The files istiod-rs writes, `generated/on-demand/<namespace>/<name>.yaml`.
    fn on_demand_waypoints(&self, namespace: &str) -> Result<Vec<OnDemand>, ClusterError> {
        let dir = self
            .lock()
            .config_dir
            .generated()
            .join("on-demand")
            .join(namespace);
        let Ok(files) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for file in files.flatten() {
            let path = file.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.') || !n.ends_with(".yaml"));
            if hidden {
                continue;
            }
            if let Some(gateway) = read_generated(&path)? {
                out.push(OnDemand::of(&gateway));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The file istiod-rs writes, `generated/status/<Kind>/<namespace>/<name>.yaml`.
    fn object_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, ClusterError> {
        let path = self
            .lock()
            .config_dir
            .generated()
            .join("status")
            .join(kind)
            .join(namespace)
            .join(format!("{name}.yaml"));
        Ok(read_generated(&path)?.map(|object| object["status"].clone()))
    }

    fn apply(&self, objects: &[Object]) -> Result<(), ClusterError> {
        let mut inner = self.lock();
        let mut result = Ok(());
        for obj in objects {
            if let Err(e) = inner.state.apply(obj.clone()) {
                result = Err(e.into());
                break;
            }
        }
        // What was applied before an error stays applied (as with kubectl).
        inner.sync()?;
        result
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<(), ClusterError> {
        let mut inner = self.lock();
        let mut result = Ok(());
        for key in keys {
            if let Err(e) = inner.state.delete(key) {
                result = Err(e.into());
                break;
            }
        }
        inner.sync()?;
        result
    }

    fn create_pod(&self, req: &PodRequest) -> Result<PodInfo, ClusterError> {
        self.validate(req)?;
        let node = self.node_index(req.node.as_deref())?;
        let uid = new_uid();
        let ip = {
            let mut inner = self.lock();
            let n = &self.topology.nodes[node];
            inner.state.add_pod(PodRecord {
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                uid: uid.clone(),
                node: n.name.clone(),
                node_ip: n.ip,
                ip: None,
                labels: req.labels.clone(),
                service_account: req.service_account.clone(),
                ports: req.ports.iter().map(|p| (p.name.clone(), p.port)).collect(),
                command: req
                    .command
                    .as_ref()
                    .map(AppCommand::argv)
                    .unwrap_or_default(),
                readiness: req.readiness.clone(),
                ready: false,
                terminating: false,
                created: Timestamp::now(),
            })?;
            let Some(ip) = inner.pools[node].allocate() else {
                let _ = inner.state.remove_pod(&req.namespace, &req.name);
                return Err(crate::topology::TopologyError::PodRangeFull {
                    node: n.name.clone(),
                    range: n.pod_range,
                }
                .into());
            };
            if let Err(e) = inner.sync() {
                inner.pools[node].release(ip);
                let _ = inner.state.remove_pod(&req.namespace, &req.name);
                return Err(e);
            }
            ip
        };
        // The IP is in the pool's used set but not yet on the record; make
        // sure a failure releases it.
        let pod = match self.bring_up(req, node, ip, &uid) {
            Ok(pod) => pod,
            Err((e, partial)) => {
                let _ = self.tear_down(&req.namespace, &req.name, &uid, node, &partial);
                self.lock().pools[node].release(ip);
                return Err(e);
            }
        };
        let mut inner = self.lock();
        inner.state.pod_mut(&req.namespace, &req.name)?.ready = true;
        inner
            .pods
            .insert((req.namespace.clone(), req.name.clone()), pod.clone());
        inner.sync()?;
        Ok(pod.info)
    }

    fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        let pod = {
            let mut inner = self.lock();
            let pod = inner
                .pods
                .remove(&(namespace.to_string(), name.to_string()))
                .ok_or_else(|| ClusterError::NoPod(namespace.into(), name.into()))?;
            inner.state.pod_mut(namespace, name)?.terminating = true;
            inner.sync()?;
            pod
        };
        let partial = Partial {
            network: Some(pod.network.clone()),
            cni_added: self.mesh.is_some(),
            container_id: pod.container_id.clone(),
            process: pod.process.clone(),
            files: pod.files.clone(),
        };
        self.tear_down(namespace, name, &pod.info.uid, pod.network.node, &partial)
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.local_pod(namespace, name).map(|p| p.info)
    }

    fn probe_readiness(&self, namespace: &str, pod: &str) -> Result<ProbeOutcome, ClusterError> {
        let p = self
            .local_pod(namespace, pod)
            .ok_or_else(|| ClusterError::NoPod(namespace.into(), pod.into()))?;
        let node = &self.topology.nodes[p.network.node].netns;
        let mut details = Vec::new();
        for probe in &p.probes {
            let outcome = self.probe(node, p.info.ip, probe)?;
            if !outcome.passed {
                return Ok(outcome);
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

    fn exec(
        &self,
        namespace: &str,
        pod: &str,
        command: &AppCommand,
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError> {
        let p = self
            .local_pod(namespace, pod)
            .ok_or_else(|| ClusterError::NoPod(namespace.into(), pod.into()))?;
        let mut cmd = p.network.netns.command(self.program(&command.program)?);
        cmd.args(&command.args).envs(&p.env);
        let out = p.network.netns.exec(cmd, timeout)?;
        Ok(out.into())
    }

    fn proxy_get(
        &self,
        proxy: &ProxyRef,
        port: u16,
        path: &str,
    ) -> Result<HttpResponse, ClusterError> {
        let netns = self.proxy_netns(proxy)?;
        crate::cluster::loopback_get(proxy, &netns, port, path, HTTP_TIMEOUT)
    }

    fn config_directory(&self) -> Option<PathBuf> {
        Some(self.config_dir())
    }

    fn cacerts_directory(&self) -> Option<PathBuf> {
        self.running_mesh().ok()?.config.cacerts_dir.clone()
    }

    fn istioctl(
        &self,
        beside: &ProxyRef,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError> {
        let netns = self.proxy_netns(beside)?;
        let mut cmd = netns.command(self.binaries.get("istioctl-rs", "istioctl-rs")?);
        cmd.args(args);
        Ok(netns.exec(cmd, timeout)?.into())
    }

    fn stop_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Istiod => self.running_mesh()?.stop_istiod(&self.run),
            ProxyRef::Ztunnel { node } => self.running_mesh()?.stop_ztunnel(&self.run, node)?,
            ProxyRef::NodeAgent { node } => {
                self.running_mesh()?.kill_node_agent(&self.run, node)?
            }
            ProxyRef::Pod { namespace, name } => {
                return Err(ClusterError::NotAComponent(format!(
                    "pod {namespace}/{name}"
                )));
            }
        }
        Ok(())
    }

    fn crash_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Istiod => self.running_mesh()?.kill_istiod(&self.run),
            ProxyRef::Ztunnel { node } => self.running_mesh()?.kill_ztunnel(&self.run, node)?,
            ProxyRef::NodeAgent { node } => {
                self.running_mesh()?.kill_node_agent(&self.run, node)?
            }
            ProxyRef::Pod { namespace, name } => {
                return Err(ClusterError::NotAComponent(format!(
                    "pod {namespace}/{name}"
                )));
            }
        }
        Ok(())
    }

    fn start_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Istiod => self.running_mesh()?.start_istiod(&self.run)?,
            ProxyRef::Ztunnel { node } => self.running_mesh()?.start_ztunnel(&self.run, node)?,
            ProxyRef::NodeAgent { node } => {
                self.running_mesh()?.start_node_agent(&self.run, node)?
            }
            ProxyRef::Pod { namespace, name } => {
                return Err(ClusterError::NotAComponent(format!(
                    "pod {namespace}/{name}"
                )));
            }
        }
        Ok(())
    }

    fn upgrade_ztunnels(&self) -> Result<(), ClusterError> {
        let mesh = self.running_mesh()?;
        for node in self.nodes() {
            mesh.upgrade_ztunnel(&self.run, &node)?;
        }
        Ok(())
    }

    fn launch_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        match component {
            ProxyRef::Ztunnel { node } => {
                self.running_mesh()?.launch_ztunnel(&self.run, node)?;
            }
            // These need nothing else to become ready: starting is launching.
            ProxyRef::Istiod => self.running_mesh()?.start_istiod(&self.run)?,
            ProxyRef::NodeAgent { node } => {
                self.running_mesh()?.start_node_agent(&self.run, node)?
            }
            ProxyRef::Pod { namespace, name } => {
                return Err(ClusterError::NotAComponent(format!(
                    "pod {namespace}/{name}"
                )));
            }
        }
        Ok(())
    }
}

/// Everything is [`ClusterCore`]'s.
impl Cluster for LocalCluster {
    fn nodes(&self) -> Vec<String> {
        self.core.nodes()
    }

    fn apply(&self, objects: &[Object]) -> Result<(), ClusterError> {
        self.core.apply(objects)
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<(), ClusterError> {
        self.core.delete(keys)
    }

    fn on_demand_waypoints(&self, namespace: &str) -> Result<Vec<OnDemand>, ClusterError> {
        self.core.on_demand_waypoints(namespace)
    }

    fn object_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, ClusterError> {
        self.core.object_status(kind, namespace, name)
    }

    fn create_pod(&self, req: &PodRequest) -> Result<PodInfo, ClusterError> {
        self.core.create_pod(req)
    }

    fn probe_readiness(&self, namespace: &str, pod: &str) -> Result<ProbeOutcome, ClusterError> {
        self.core.probe_readiness(namespace, pod)
    }

    fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        self.core.delete_pod(namespace, name)
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.core.pod(namespace, name)
    }

    fn exec(
        &self,
        namespace: &str,
        pod: &str,
        command: &AppCommand,
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError> {
        self.core.exec(namespace, pod, command, timeout)
    }

    fn proxy_get(
        &self,
        proxy: &ProxyRef,
        port: u16,
        path: &str,
    ) -> Result<HttpResponse, ClusterError> {
        self.core.proxy_get(proxy, port, path)
    }

    fn istioctl(
        &self,
        beside: &ProxyRef,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, ClusterError> {
        self.core.istioctl(beside, args, timeout)
    }

    fn config_directory(&self) -> Option<PathBuf> {
        self.core.config_directory()
    }

    fn cacerts_directory(&self) -> Option<PathBuf> {
        self.core.cacerts_directory()
    }

    fn stop_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        self.core.stop_component(component)
    }

    fn crash_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        self.core.crash_component(component)
    }

    fn start_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        self.core.start_component(component)
    }

    fn launch_component(&self, component: &ProxyRef) -> Result<(), ClusterError> {
        self.core.launch_component(component)
    }

    fn upgrade_ztunnels(&self) -> Result<(), ClusterError> {
        self.core.upgrade_ztunnels()
    }
}

/// The run-local role (namespace name suffix) of a pod.
fn pod_role(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// What a pod's app finds in its environment (the downward API's usual variables).
fn pod_env(req: &PodRequest, ip: &str, node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("POD_NAME".into(), req.name.clone()),
        ("POD_NAMESPACE".into(), req.namespace.clone()),
        ("POD_IP".into(), ip.into()),
        ("NODE_NAME".into(), node.into()),
        ("SERVICE_ACCOUNT".into(), req.service_account.clone()),
    ])
}

/// kubelet's work for a pod's container before it starts: materializes
/// the pod's volumes under `dir/volumes/` (hostPath volumes under `node_fs`),
/// then adds the container's `env` to `env` (the variables every pod gets),
/// each value expanded and, if it names a path under a mount, rewritten to
/// the volume's directory. An error is the pod's field and the problem.
fn kubelet_container<S>(
    req: &PodRequest,
    pod: &core::Pod,
    facts: &kubelet_env::PodFacts,
    dir: &Path,
    node_fs: &Path,
    mut env: BTreeMap<String, String>,
    sources: &mut S,
) -> Result<Prepared, (&'static str, String)>
where
    S: kubelet_volumes::VolumeSources + kubelet_env::EnvSources,
{
    let mut mounts = Vec::new();
    if !req.volumes.is_empty() {
        let set = kubelet_volumes::materialize(pod, dir, node_fs, facts, sources)
            .map_err(|e| ("volumes", e.to_string()))?;
        for v in &req.volumes {
            let host = set.sources.get(&v.volume.name).cloned().ok_or_else(|| {
                (
                    "volumes",
                    format!("volume {:?} was not made", v.volume.name),
                )
            })?;
            mounts.push((v.mount_path.trim_end_matches('/').to_string(), host));
        }
    }
    for (i, var) in req.env.iter().enumerate() {
        let value = kubelet_env::value_of(pod, var, facts, sources)
            .map_err(|problem| ("env", format!("env[{i}] ({}): {problem}", var.name)))?;
        if let Some(value) = value {
            let expanded = kubelet_env::expand(&value, &env);
            env.insert(var.name.clone(), on_host(&expanded, &mounts));
        }
    }
    Ok((env, mounts))
}

/// Each volume's mount path with the directory holding it on the host.
type Mounts = Vec<(String, PathBuf)>;

/// A container's environment, and its mounts.
type Prepared = (BTreeMap<String, String>, Mounts);

/// `value` with a leading volume mount path replaced by the directory
/// holding that volume on the host (the longest mount path that matches).
fn on_host(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut best: Option<(&str, &Path, &str)> = None;
    for (mount, host) in mounts {
        let rest = match value.strip_prefix(mount.as_str()) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => continue,
        };
        if best.is_none_or(|(m, _, _)| m.len() < mount.len()) {
            best = Some((mount, host, rest));
        }
    }
    match best {
        Some((_, host, rest)) => format!("{}{rest}", host.display()),
        None => value.to_string(),
    }
}

/// The Pod object the node resolves `env` and volumes against.
fn pod_object(req: &PodRequest, uid: &str, node: &str) -> core::Pod {
    core::Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(req.name.clone()),
            namespace: Some(req.namespace.clone()),
            uid: Some(uid.to_string()),
            labels: Some(req.labels.clone()),
            ..Default::default()
        },
        spec: Some(core::PodSpec {
            node_name: Some(node.to_string()),
            service_account_name: Some(req.service_account.clone()),
            volumes: Some(req.volumes.iter().map(|v| v.volume.clone()).collect()),
            ..Default::default()
        }),
        status: None,
    }
}

/// Where the local kubelet finds what volumes and `valueFrom` refer to:
/// ConfigMaps and Secrets in the cluster state, ConfigMap
/// `istio-ca-root-cert` from the mesh's root, tokens from the mesh's token file.
struct LocalSources<'a> {
    cluster: &'a ClusterCore,
    namespace: &'a str,
    service_account: &'a str,
    /// Tokens issued so far for this pod.
    tokens: &'a mut Vec<String>,
}

/// The ConfigMap istiod-rs publishes the mesh root in (upstream's name and key).
const ROOT_CERT_CONFIG_MAP: &str = "istio-ca-root-cert";
const ROOT_CERT_KEY: &str = "root-cert.pem";

impl LocalSources<'_> {
    fn object<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<T>, String> {
        let key = ObjectKey::core(kind, Some(self.namespace), name);
        let obj = self.cluster.lock().state.get(&key).cloned();
        obj.map(|o| o.to_typed().map_err(|e| e.to_string()))
            .transpose()
    }

    fn typed_config_map(&mut self, name: &str) -> Result<Option<core::ConfigMap>, String> {
        if name == ROOT_CERT_CONFIG_MAP
            && let Some(mesh) = &self.cluster.mesh
        {
            let pem = mesh.root_cert_pem().map_err(|e| e.to_string())?;
            return Ok(Some(core::ConfigMap {
                data: Some(BTreeMap::from([(ROOT_CERT_KEY.to_string(), pem)])),
                ..Default::default()
            }));
        }
        self.object("ConfigMap", name)
    }
}

impl kubelet_volumes::VolumeSources for LocalSources<'_> {
    fn config_map(&mut self, name: &str) -> Result<Option<core::ConfigMap>, String> {
        self.typed_config_map(name)
    }

    fn secret(&mut self, name: &str) -> Result<Option<core::Secret>, String> {
        self.object("Secret", name)
    }

    fn token(
        &mut self,
        _audiences: &[String],
        expiration_seconds: i64,
    ) -> Result<(String, i64), String> {
        let mesh = self.cluster.mesh.as_ref().ok_or(
            "the local cluster issues service-account tokens through the mesh's token file; start it with the mesh on",
        )?;
        let token = mesh
            .issue_token(self.namespace, self.service_account)
            .map_err(|e| e.to_string())?;
        self.tokens.push(token.clone());
        Ok((token, expiration_seconds))
    }
}

impl kubelet_env::EnvSources for LocalSources<'_> {
    fn config_map(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        Ok(self
            .typed_config_map(name)?
            .map(|c| c.data.unwrap_or_default()))
    }

    fn secret(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        let secret: Option<core::Secret> = self.object("Secret", name)?;
        Ok(secret.map(|s| {
            let mut data: BTreeMap<String, String> = s.string_data.unwrap_or_default();
            for (k, v) in s.data.unwrap_or_default() {
                data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            data
        }))
    }
}

/// The Deployment controller: a thread calling
/// [`ClusterCore::sync_deployments`] and [`ClusterCore::sync_waypoints`]
/// every poll until stopped. Each error is
/// reported once, when it first appears (the same error on the next poll
/// is not repeated).
struct DeploymentController {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: std::thread::JoinHandle<()>,
}

impl DeploymentController {
    fn start(core: Arc<ClusterCore>, poll: Duration) -> Result<DeploymentController, ClusterError> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("deployment-controller".into())
            .spawn(move || {
                let mut reported = std::collections::BTreeSet::new();
                loop {
                    let mut errors = core.sync_deployments();
                    errors.extend(core.sync_waypoints());
                    let errors: std::collections::BTreeSet<String> =
                        errors.iter().map(|e| e.to_string()).collect();
                    for e in errors.difference(&reported) {
                        eprintln!("e2e: Deployment controller: {e}");
                    }
                    reported = errors;
                    let (lock, cvar) = &*signal;
                    let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (stopped, _) = cvar
                        .wait_timeout_while(stopped, poll, |s| !*s)
                        .unwrap_or_else(|e| e.into_inner());
                    if *stopped {
                        return;
                    }
                }
            })
            .map_err(|source| crate::run::RunError::Io {
                what: "could not start the Deployment controller thread",
                path: PathBuf::from("deployment-controller"),
                source,
            })?;
        Ok(DeploymentController { stop, thread })
    }

    /// Stops the thread (after the sync it may be in) and waits for it.
    fn stop(self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        if self.thread.join().is_err() {
            eprintln!("e2e: the Deployment controller thread panicked");
        }
    }
}

/// A number in `0..n` that depends on `text` only (FNV-1a), to spread
/// Deployments over the nodes the same way every time.
fn stable_index(text: &str, n: usize) -> usize {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(hash % n.max(1) as u64).unwrap_or(0)
}

fn random_hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// A UUID-shaped uid, as the API server assigns.
fn new_uid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A YAML file istiod-rs wrote under `generated/`, as JSON; `None` when it
/// is not there (it may go between a listing and the read).
fn read_generated(path: &Path) -> Result<Option<serde_json::Value>, ClusterError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ClusterError::Json {
                what: path.display().to_string(),
                reason: e.to_string(),
                text: String::new(),
            });
        }
    };
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&text).map_err(|e| ClusterError::Json {
            what: path.display().to_string(),
            reason: e.to_string(),
            text: text.chars().take(2000).collect(),
        })?;
    Ok(documents.into_iter().find(|d| d.is_object()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Object;

    /// What the local kubelet's sources hand out, recorded.
    #[derive(Default)]
    struct Sources {
        issued: Vec<(String, String)>,
    }

    impl kubelet_volumes::VolumeSources for Sources {
        fn config_map(&mut self, name: &str) -> Result<Option<core::ConfigMap>, String> {
            Ok((name == ROOT_CERT_CONFIG_MAP).then(|| core::ConfigMap {
                data: Some(BTreeMap::from([(ROOT_CERT_KEY.into(), "ROOT PEM".into())])),
                ..Default::default()
            }))
        }
        fn secret(&mut self, _: &str) -> Result<Option<core::Secret>, String> {
            Ok(None)
        }
        fn token(&mut self, audiences: &[String], seconds: i64) -> Result<(String, i64), String> {
            let token = format!("token-{}", self.issued.len());
            self.issued.push((token.clone(), audiences.join(",")));
            Ok((token, seconds))
        }
    }

    impl kubelet_env::EnvSources for Sources {
        fn config_map(&mut self, _: &str) -> Result<Option<BTreeMap<String, String>>, String> {
            Ok(None)
        }
        fn secret(&mut self, _: &str) -> Result<Option<BTreeMap<String, String>>, String> {
            Ok(None)
        }
    }

    fn waypoint_request() -> PodRequest {
        let objects = Object::from_yaml(&crate::mesh::tests::rendered_template(None)).unwrap();
        let deployment = objects.iter().find(|o| o.kind() == "Deployment").unwrap();
        let nodes = ["node0".to_string()];
        crate::mesh::deployment_pods(Path::new("w.yaml"), deployment, Path::new("/bin/w"), &nodes)
            .unwrap()
            .remove(0)
    }

    #[test]
    fn a_waypoint_pod_gets_its_env_root_cert_and_token_as_kubelet_gives_them() {
        let req = waypoint_request();
        let dir = std::env::temp_dir().join(format!("meshe2e-kubelet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ip = Ipv4Addr::new(10, 244, 0, 7);
        let pod = pod_object(&req, "uid-1", "node0");
        let facts = kubelet_env::PodFacts {
            pod_ip: Some(ip),
            host_ip: Ipv4Addr::new(172, 30, 0, 10),
            kubernetes_service: None,
        };
        let mut sources = Sources::default();
        let base = pod_env(&req, &ip.to_string(), "node0");
        let (env, mounts) = kubelet_container(
            &req,
            &pod,
            &facts,
            &dir,
            &dir.join("fs"),
            base,
            &mut sources,
        )
        .unwrap();
        let read = |path: &str| std::fs::read_to_string(path).unwrap();
        assert_eq!(
            env["CA_ROOT_CA"],
            dir.join("volumes/istiod-ca-cert/root-cert.pem")
                .display()
                .to_string()
        );
        assert_eq!(read(&env["CA_ROOT_CA"]), "ROOT PEM");
        assert_eq!(
            env["TOKEN_FILE"],
            dir.join("volumes/istio-token/istio-token")
                .display()
                .to_string()
        );
        assert_eq!(read(&env["TOKEN_FILE"]), "token-0");
        assert_eq!(
            sources.issued,
            [("token-0".to_string(), "istio-ca".to_string())]
        );
        assert_eq!(env["INSTANCE_IP"], "10.244.0.7");
        assert_eq!(env["POD_NAME"], "reviews-waypoint-0");
        assert_eq!(env["POD_NAMESPACE"], "demo");
        assert_eq!(env["SERVICE_ACCOUNT"], "reviews-sa");
        assert_eq!(env["XDS_ADDRESS"], "10.0.0.2:15012");
        assert_eq!(env["TRUST_DOMAIN"], "cluster.local");
        assert_eq!(env["RUST_LOG"], "info");
        assert_eq!(mounts.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unresolvable_env_entry_names_its_index_and_variable() {
        let mut req = waypoint_request();
        req.volumes.clear();
        req.env.push(
            serde_json::from_value(serde_json::json!(
                {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}}
            ))
            .unwrap(),
        );
        let pod = pod_object(&req, "uid-1", "node0");
        let facts = kubelet_env::PodFacts {
            pod_ip: None,
            host_ip: Ipv4Addr::new(172, 30, 0, 10),
            kubernetes_service: None,
        };
        let dir = Path::new("/nonexistent");
        let (field, problem) = kubelet_container(
            &req,
            &pod,
            &facts,
            dir,
            dir,
            BTreeMap::new(),
            &mut Sources::default(),
        )
        .unwrap_err();
        assert_eq!(field, "env");
        assert!(
            problem.starts_with(
                "env[9] (LEVEL): valueFrom.configMapKeyRef: \"settings\" does not exist"
            ),
            "{problem}"
        );
    }

    #[test]
    fn mount_paths_are_rewritten_to_their_volume_directory() {
        let mounts = vec![
            ("/var/run/secrets".to_string(), PathBuf::from("/run/x/a")),
            (
                "/var/run/secrets/tokens".to_string(),
                PathBuf::from("/run/x/b"),
            ),
        ];
        assert_eq!(on_host("/var/run/secrets/tokens/t", &mounts), "/run/x/b/t");
        assert_eq!(
            on_host("/var/run/secrets/ca.pem", &mounts),
            "/run/x/a/ca.pem"
        );
        assert_eq!(on_host("/var/run/secrets", &mounts), "/run/x/a");
        assert_eq!(on_host("/var/run/secretsX", &mounts), "/var/run/secretsX");
        assert_eq!(on_host("info", &mounts), "info");
    }
}
