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

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use rand::Rng;

use crate::binaries::Binaries;
use crate::cluster::{
    AppCommand, Cluster, ClusterError, ExecOutput, HttpResponse, PodInfo, PodRequest, ProbeOutcome,
    ProxyRef, ReadinessProbe,
};
use crate::cni::{self, CniCommand, CniPod};
use crate::config_dir::ConfigDir;
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
}

struct Inner {
    state: ClusterState,
    config_dir: ConfigDir,
    pools: Vec<PodAddressPool>,
    pods: BTreeMap<(String, String), LocalPod>,
    /// Pods started for waypoint Deployments.
    waypoints: BTreeSet<(String, String)>,
}

impl Inner {
    /// Writes the cluster state to the config directory.
    fn sync(&mut self) -> Result<(), ClusterError> {
        let files = self.state.render()?;
        self.config_dir.sync(&files)?;
        Ok(())
    }
}

/// The local cluster. Dropping it removes everything it created.
pub struct LocalCluster {
    topology: Topology,
    binaries: Binaries,
    ready_timeout: Duration,
    probe_timeout: Duration,
    mesh: Option<MeshRuntime>,
    inner: Mutex<Inner>,
    // Last: dropped after everything that refers to what it owns.
    run: Run,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("run", &self.run)
            .field("nodes", &self.topology.nodes.len())
            .field("mesh", &self.mesh.is_some())
            .finish()
    }
}

impl LocalCluster {
    /// Builds the cluster: topology, initial state, and the mesh if asked for.
    /// Anything built before a failure is removed again.
    pub fn start(config: LocalClusterConfig) -> Result<LocalCluster, ClusterError> {
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
            waypoints: BTreeSet::new(),
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
        Ok(LocalCluster {
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

    /// Starts or stops waypoint pods so they match the waypoint Deployments
    /// istiod-rs has written into `generated/`. Does nothing with the mesh off.
    pub fn sync_waypoints(&self) -> Result<(), ClusterError> {
        let Some(mesh) = &self.mesh else {
            return Ok(());
        };
        let wanted = mesh.waypoint_pods(&self.lock().config_dir.generated())?;
        let wanted_keys: BTreeSet<(String, String)> = wanted
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        let stale: Vec<(String, String)> = self
            .lock()
            .waypoints
            .difference(&wanted_keys)
            .cloned()
            .collect();
        for (ns, name) in stale {
            self.delete_pod(&ns, &name)?;
            self.lock().waypoints.remove(&(ns, name));
        }
        for pod in wanted {
            let key = (pod.namespace.clone(), pod.name.clone());
            if !self.lock().pods.contains_key(&key) {
                self.create_pod(&pod)?;
                self.lock().waypoints.insert(key);
            }
        }
        Ok(())
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
        let env = pod_env(req, &ip.to_string(), &node_name);
        let process = match &req.command {
            None => None,
            Some(command) => {
                let program = self
                    .program(&command.program)
                    .map_err(|e| (e, partial.clone()))?;
                let mut spec =
                    ProcessSpec::new(format!("pod-{}.{}", req.namespace, req.name), program)
                        .args(&command.args);
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
        })
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
}

impl Cluster for LocalCluster {
    fn nodes(&self) -> Vec<String> {
        self.topology.nodes.iter().map(|n| n.name.clone()).collect()
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
        let netns = match proxy {
            ProxyRef::Istiod => self.topology.control_plane.clone(),
            ProxyRef::Ztunnel { node } | ProxyRef::NodeAgent { node } => self
                .node_netns(node)
                .cloned()
                .ok_or_else(|| ClusterError::NoNode(node.clone(), self.nodes().join(", ")))?,
            ProxyRef::Pod { namespace, name } => self
                .pod_netns(namespace, name)
                .ok_or_else(|| ClusterError::NoPod(namespace.clone(), name.clone()))?,
        };
        crate::cluster::loopback_get(proxy, &netns, port, path, HTTP_TIMEOUT)
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
