//! Where the mesh plugs into the local cluster. With the mesh on, the local
//! cluster runs, as a Kubernetes cluster would:
//! - istiod-rs in the control-plane namespace, reading the cluster state from
//!   the config directory and the bearer tokens from a token file, keeping
//!   its CA's root in a state directory;
//! - per node, in the node's namespace, the node agent (`ztunnel-rs cni`);
//!   the proxy (`ztunnel-rs proxy`) in a pod network namespace of its own
//!   on the node (no hostNetwork, as the ztunnel DaemonSet's pod), at one
//!   of the node's [`crate::topology::ZTUNNEL_SLOTS`] addresses; they talk
//!   ZDS over a unix socket; the proxy reaches istiod over TLS (15012) with
//!   its node's bearer token. A rolling update
//!   ([`MeshRuntime::upgrade_ztunnel`]) starts the new proxy in a second
//!   pod network beside the old one, as the DaemonSet's `maxSurge: 1` does;
//! - for every pod, the CNI plugin `istio-cni-rs`, chained after the local
//!   cluster's own network setup (see [`crate::cni`]);
//! - the pods of each waypoint Deployment istiod-rs provisions into
//!   `generated/waypoints/<namespace>/<gateway>.yaml` ([`waypoint_pods`]
//!   translates them; the local cluster keeps them running). istiod-rs is
//!   told where waypoints reach it (`--waypoint-xds-address`), and each
//!   waypoint pod gets a bearer token of its own in the token file
//!   ([`MeshRuntime::issue_token`]), as Kubernetes' TokenRequest would.
//!
//! The command lines below are the one place that knows the components'
//! flags. Components are started in dependency order and each is waited for
//! until its own readiness endpoint says so (istiod `/ready` on 15014, each
//! ztunnel `/healthz/ready` on 15021, each node agent `/readyz` on 8000).
//! istiod, each node's ztunnel and each node's agent can be stopped (the
//! agent killed) and started again while the cluster runs (the restart
//! scenarios), and each node's ztunnel replaced (the upgrade scenario).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Map, Value};

use crate::binaries::{Binaries, BinaryError};
use crate::cluster::{AppCommand, PodRequest};
use crate::cni::CniPlugin;
use crate::netns::NetNs;
use crate::objects::{Object, ObjectKey};
use crate::process::{ProcessInfo, ProcessSpec, log_tail};
use crate::run::{Run, RunError};
use crate::topology::{self, AddressPlan, PodNetwork, Topology};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{component} did not become ready: {reason}\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        component: String,
        reason: String,
        log: String,
        tail: String,
    },
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Generated { file: String, reason: String },
    #[error("no node named {0:?} runs the mesh")]
    NoNode(String),
    #[error("cannot upgrade the ztunnel-rs of node {node}: {reason}")]
    Upgrade { node: String, reason: String },
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
}

/// Whether the local cluster runs the mesh.
#[derive(Clone, Debug, Default)]
pub enum MeshMode {
    /// Plain routing between pods; no mesh component runs.
    #[default]
    Off,
    On(MeshConfig),
}

/// A binary of the workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Component {
    pub package: String,
    pub binary: String,
}

impl Component {
    fn new(package: &str, binary: &str) -> Component {
        Component {
            package: package.into(),
            binary: binary.into(),
        }
    }

    fn path(&self, binaries: &Binaries) -> Result<PathBuf, BinaryError> {
        binaries.get(&self.package, &self.binary)
    }
}

/// How to run the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub istiod: Component,
    pub ztunnel: Component,
    pub cni_plugin: Component,
    pub waypoint: Component,
    pub trust_domain: String,
    /// Lifetime of workload certificates (ztunnel asks the CA for it and
    /// renews at half of it); `None`: the components' default.
    pub certificate_ttl: Option<Duration>,
    /// How long a ztunnel gives live connections when it stops.
    pub drain_deadline: Duration,
    /// `RUST_LOG` of every component.
    pub log: String,
    /// How long a component may take to become ready.
    pub ready_timeout: Duration,
    /// A plug-in CA directory (upstream's `cacerts` layout) istiod-rs
    /// signs with and watches, instead of its self-signed root; the
    /// proxies' root file is its `root-cert.pem`, as the
    /// `istio-ca-root-cert` ConfigMap would carry it.
    pub cacerts_dir: Option<PathBuf>,
    /// How long ztunnel-rs keeps exporting the traffic metrics of a
    /// workload that left the mesh; `None`: its default.
    pub metrics_retention: Option<Duration>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            istiod: Component::new("istiod-rs", "istiod-rs"),
            ztunnel: Component::new("ztunnel-rs", "ztunnel-rs"),
            cni_plugin: Component::new("ztunnel-rs", "istio-cni-rs"),
            waypoint: Component::new("waypoint-rs", "waypoint-rs"),
            trust_domain: api::labels::DEFAULT_TRUST_DOMAIN.into(),
            certificate_ttl: None,
            // Below the harness's grace between SIGTERM and SIGKILL, so a
            // stopped ztunnel finishes its drain on its own.
            drain_deadline: Duration::from_secs(2),
            log: "info".into(),
            ready_timeout: Duration::from_secs(60),
            cacerts_dir: None,
            metrics_retention: None,
        }
    }
}

/// Where the mesh's files live inside the run directory.
#[derive(Clone, Debug)]
pub struct MeshLayout {
    pub root: PathBuf,
}

impl MeshLayout {
    /// istiod-rs's own state (the CA's root certificate and key).
    pub fn istiod_dir(&self) -> PathBuf {
        self.root.join("istiod")
    }

    /// The mesh root certificate istiod-rs's CA keeps; every ztunnel trusts it.
    pub fn root_cert(&self) -> PathBuf {
        self.istiod_dir().join("root-cert.pem")
    }

    /// Bearer token -> identity, istiod-rs's stand-in for TokenReview.
    pub fn tokens_file(&self) -> PathBuf {
        self.root.join("tokens.yaml")
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }

    /// The node agent's ZDS socket, which the node's ztunnel-rs connects to.
    pub fn zds_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("zds.sock")
    }

    /// The node agent's socket for CNI plugin events.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cni.sock")
    }

    /// The node ztunnel's bearer token.
    pub fn node_token(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("token")
    }
}

/// The mesh's processes on one node (`None`: stopped).
#[derive(Clone, Debug)]
pub struct NodeMesh {
    pub node: String,
    pub node_agent: Option<ProcessInfo>,
    pub ztunnel: Option<ProcessInfo>,
    /// The network namespace of the running ztunnel-rs's pod.
    pub ztunnel_network: Option<PodNetwork>,
    /// ztunnel-rs pods an upgrade replaced, still draining: each exits once
    /// its connections end or its drain deadline passes.
    pub draining: Vec<(ProcessInfo, PodNetwork)>,
}

#[derive(Debug)]
struct Processes {
    istiod: Option<ProcessInfo>,
    nodes: Vec<NodeMesh>,
}

/// Paths of the binaries the mesh runs.
#[derive(Clone, Debug)]
struct MeshBinaries {
    istiod: PathBuf,
    ztunnel: PathBuf,
    cni_plugin: PathBuf,
    waypoint: PathBuf,
}

/// The running mesh.
#[derive(Debug)]
pub struct MeshRuntime {
    pub config: MeshConfig,
    pub layout: MeshLayout,
    config_dir: PathBuf,
    binaries: MeshBinaries,
    control_plane: NetNs,
    istiod_ip: Ipv4Addr,
    plan: AddressPlan,
    topology_nodes: Vec<topology::Node>,
    processes: Mutex<Processes>,
    tokens: Mutex<Tokens>,
}

impl MeshRuntime {
    /// Starts istiod-rs, then each node's agent and proxy, waiting for each
    /// to be ready before anything depends on it. `progress` hears one line
    /// per step.
    pub fn start(
        run: &Run,
        topology: &Topology,
        config_dir: &Path,
        binaries: &Binaries,
        config: &MeshConfig,
        progress: &dyn Fn(&str),
    ) -> Result<MeshRuntime, MeshError> {
        let layout = MeshLayout {
            root: run.dir().join("mesh"),
        };
        progress("finding (or building) istiod-rs, ztunnel-rs, istio-cni-rs, waypoint-rs");
        let bins = MeshBinaries {
            istiod: config.istiod.path(binaries)?,
            ztunnel: config.ztunnel.path(binaries)?,
            cni_plugin: config.cni_plugin.path(binaries)?,
            waypoint: config.waypoint.path(binaries)?,
        };
        let nodes: Vec<&str> = topology.nodes.iter().map(|n| n.name.as_str()).collect();
        let tokens = Tokens::for_nodes(&layout, &nodes)?;
        tokens.write(&layout)?;
        let mesh = MeshRuntime {
            config: config.clone(),
            layout,
            config_dir: config_dir.to_path_buf(),
            binaries: bins,
            control_plane: topology.control_plane.clone(),
            istiod_ip: topology.plan.control_plane_ip(),
            plan: topology.plan.clone(),
            topology_nodes: topology.nodes.clone(),
            processes: Mutex::new(Processes {
                istiod: None,
                nodes: Vec::new(),
            }),
            tokens: Mutex::new(tokens),
        };

        progress("starting istiod-rs (control plane, CA) and waiting for /ready");
        mesh.start_istiod(run)?;

        progress("starting the node agent and ztunnel-rs on every node");
        for node in &mesh.topology_nodes {
            let agent = run.spawn(&mesh.node_agent_spec(&node.name), &node.netns)?;
            mesh.lock().nodes.push(NodeMesh {
                node: node.name.clone(),
                node_agent: Some(agent),
                ztunnel: None,
                ztunnel_network: None,
                draining: Vec::new(),
            });
            mesh.launch_ztunnel(run, &node.name)?;
        }
        let started = mesh.nodes();
        for node in &started {
            progress(&format!(
                "waiting for ztunnel-rs on {} to be ready (xDS synced, ZDS snapshot)",
                node.node
            ));
            let ztunnel = node.ztunnel.as_ref().expect("just started");
            mesh.wait_ztunnel_ready(run, ztunnel)?;
        }
        Ok(mesh)
    }

    /// istiod-rs, while it runs.
    pub fn istiod(&self) -> Option<ProcessInfo> {
        self.lock().istiod.clone()
    }

    /// The mesh's processes on each node.
    pub fn nodes(&self) -> Vec<NodeMesh> {
        self.lock().nodes.clone()
    }

    /// Stops istiod-rs (SIGTERM, then SIGKILL). The proxies keep what they have.
    pub fn stop_istiod(&self, run: &Run) {
        if let Some(p) = self.lock().istiod.take() {
            run.stop(&p);
        }
    }

    /// Kills istiod-rs (SIGKILL, as a crash or an OOM kill would: no drain,
    /// no goodbye to the proxies). The proxies keep what they have.
    pub fn kill_istiod(&self, run: &Run) {
        if let Some(p) = self.lock().istiod.take() {
            run.kill(&p);
        }
    }

    /// Starts istiod-rs (if it is not running) and waits for `/ready`.
    pub fn start_istiod(&self, run: &Run) -> Result<(), MeshError> {
        if self.lock().istiod.is_some() {
            return Ok(());
        }
        let p = run.spawn(&self.istiod_spec(), &self.control_plane)?;
        self.lock().istiod = Some(p.clone());
        self.wait_http_ready(
            run,
            &p,
            &self.control_plane,
            api::ports::ISTIOD_MONITORING,
            "/ready",
        )
    }

    /// Stops a node's ztunnel-rs (SIGTERM: it drains, then exits) and
    /// removes its pod network.
    pub fn stop_ztunnel(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        self.end_ztunnel(run, node, false)
    }

    /// Kills a node's ztunnel-rs (SIGKILL, as a crash would: no drain).
    pub fn kill_ztunnel(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        self.end_ztunnel(run, node, true)
    }

    /// Ends a node's ztunnel-rs (SIGTERM and its drain, or SIGKILL) and
    /// removes its pod network.
    fn end_ztunnel(&self, run: &Run, node: &str, kill: bool) -> Result<(), MeshError> {
        let (process, network) =
            self.with_node(node, |n| (n.ztunnel.take(), n.ztunnel_network.take()))?;
        if let Some(p) = process {
            if kill {
                run.kill(&p);
            } else {
                run.stop(&p);
            }
        }
        if let Some(network) = network {
            self.topology_node(node)?.remove_pod(run, &network)?;
        }
        Ok(())
    }

    /// Replaces a node's running ztunnel-rs as a DaemonSet rolling update
    /// with `maxSurge: 1, maxUnavailable: 0` does (our manifest's, and
    /// upstream's ztunnel chart's): the new one starts in a pod network of
    /// its own beside the old one and is waited for until Ready (it has the
    /// control plane's state and every pod from the node agent, its
    /// listeners bound beside the old ones); only then does the old one get
    /// SIGTERM. This returns without waiting for the old one, which drains
    /// its live connections (see [`MeshRuntime::draining`]). A new one that
    /// does not become ready is stopped and the old one keeps the node.
    pub fn upgrade_ztunnel(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        self.reap_drained(run, node)?;
        let Some(old) = self.with_node(node, |n| n.ztunnel.clone())? else {
            return Err(MeshError::Upgrade {
                node: node.into(),
                reason: "no ztunnel-rs runs there".into(),
            });
        };
        let (new, network) = self.spawn_ztunnel(run, node)?;
        if let Err(e) = self.wait_ztunnel_ready(run, &new) {
            run.stop(&new);
            self.topology_node(node)?.remove_pod(run, &network)?;
            return Err(e);
        }
        let old_network = self.with_node(node, |n| {
            n.ztunnel = Some(new);
            n.ztunnel_network.replace(network)
        })?;
        run.terminate(&old);
        if let Some(old_network) = old_network {
            self.with_node(node, |n| n.draining.push((old, old_network)))?;
        }
        Ok(())
    }

    /// The ztunnel-rs processes an upgrade replaced on `node` that have not
    /// exited yet (after [`MeshRuntime::reap_drained`]).
    pub fn draining(&self, run: &Run, node: &str) -> Result<Vec<ProcessInfo>, MeshError> {
        self.reap_drained(run, node)?;
        self.with_node(node, |n| {
            n.draining.iter().map(|(p, _)| p.clone()).collect()
        })
    }

    /// Forgets the replaced ztunnel-rs processes on `node` that have exited
    /// and removes their pod networks.
    fn reap_drained(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        let exited = self.with_node(node, |n| {
            let (gone, left): (Vec<_>, Vec<_>) = n
                .draining
                .drain(..)
                .partition(|(p, _)| run.exited(p).is_some());
            n.draining = left;
            gone
        })?;
        for (p, network) in exited {
            run.stop(&p);
            self.topology_node(node)?.remove_pod(run, &network)?;
        }
        Ok(())
    }

    /// The network namespace of a node's running ztunnel-rs, where its
    /// loopback ports (admin, metrics, readiness) answer.
    pub fn ztunnel_netns(&self, node: &str) -> Result<Option<NetNs>, MeshError> {
        self.with_node(node, |n| {
            n.ztunnel_network.as_ref().map(|p| p.netns.clone())
        })
    }

    /// Starts a new ztunnel-rs pod on `node` at a free slot address.
    fn spawn_ztunnel(&self, run: &Run, node: &str) -> Result<(ProcessInfo, PodNetwork), MeshError> {
        let n = self.topology_node(node)?;
        let taken: Vec<Ipv4Addr> = self.with_node(node, |m| {
            m.ztunnel_network
                .iter()
                .chain(m.draining.iter().map(|(_, net)| net))
                .map(|net| net.ip)
                .collect()
        })?;
        let Some(slot) = (0..topology::ZTUNNEL_SLOTS)
            .find(|&s| !taken.contains(&self.plan.ztunnel_ip(n.index, s)))
        else {
            return Err(MeshError::Upgrade {
                node: node.into(),
                reason: format!(
                    "{} ztunnel-rs pods run there already (one still draining)",
                    taken.len()
                ),
            });
        };
        let ip = self.plan.ztunnel_ip(n.index, slot);
        let network = n.add_pod(run, &format!("istio-system.ztunnel-{node}-{slot}"), ip)?;
        let spec = self.ztunnel_spec(node, slot);
        match run.spawn(&spec, &network.netns) {
            Ok(p) => Ok((p, network)),
            Err(e) => {
                n.remove_pod(run, &network)?;
                Err(e.into())
            }
        }
    }

    /// Starts a node's ztunnel-rs (if it is not running) and waits until it
    /// is ready: it has the control plane's state and the node agent's pods.
    pub fn start_ztunnel(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        let p = self.launch_ztunnel(run, node)?;
        self.wait_ztunnel_ready(run, &p)
    }

    /// Starts a node's ztunnel-rs (if it is not running) without waiting for
    /// it to be ready, which it may not become on its own (istiod down).
    pub fn launch_ztunnel(&self, run: &Run, node: &str) -> Result<ProcessInfo, MeshError> {
        if let Some(p) = self.with_node(node, |n| n.ztunnel.clone())? {
            return Ok(p);
        }
        let (p, network) = self.spawn_ztunnel(run, node)?;
        self.with_node(node, |n| {
            n.ztunnel = Some(p.clone());
            n.ztunnel_network = Some(network);
        })?;
        Ok(p)
    }

    /// Kills a node's agent (SIGKILL, as a crash would): its pods, rules and
    /// ztunnel's proxies stay as they are.
    pub fn kill_node_agent(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        if let Some(p) = self.with_node(node, |n| n.node_agent.take())? {
            run.kill(&p);
        }
        Ok(())
    }

    /// Starts a node's agent (if it is not running) and waits until it is
    /// ready: it has taken back the node's running pods.
    pub fn start_node_agent(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        let spec = self.node_agent_spec(node);
        let p = self.launch_on_node(run, node, spec, |n| &mut n.node_agent)?;
        self.wait_http_ready(
            run,
            &p,
            self.netns_of(node)?,
            crate::cluster::NODE_AGENT_READINESS,
            "/readyz",
        )
    }

    /// Starts `spec` in the node's namespace as the process `slot` names,
    /// unless one runs there already; the process that runs.
    fn launch_on_node(
        &self,
        run: &Run,
        node: &str,
        spec: ProcessSpec,
        slot: impl FnOnce(&mut NodeMesh) -> &mut Option<ProcessInfo>,
    ) -> Result<ProcessInfo, MeshError> {
        let netns = self.netns_of(node)?.clone();
        self.with_node(node, |n| {
            let slot = slot(n);
            if let Some(p) = slot {
                return Ok(p.clone());
            }
            let p = run.spawn(&spec, &netns)?;
            *slot = Some(p.clone());
            Ok(p)
        })?
    }

    /// Runs `f` on a node's processes, under the lock.
    fn with_node<R>(&self, node: &str, f: impl FnOnce(&mut NodeMesh) -> R) -> Result<R, MeshError> {
        let mut processes = self.lock();
        let n = processes
            .nodes
            .iter_mut()
            .find(|n| n.node == node)
            .ok_or_else(|| MeshError::NoNode(node.to_string()))?;
        Ok(f(n))
    }

    /// The CNI plugin as node `node`'s runtime invokes it.
    pub fn cni_plugin(&self, node: &str) -> CniPlugin {
        let mut config = Map::new();
        config.insert(
            "agent_socket".into(),
            Value::String(self.layout.cni_socket(node).display().to_string()),
        );
        CniPlugin {
            binary: self.binaries.cni_plugin.clone(),
            network: "local-pod-network".into(),
            config,
        }
    }

    /// Pods for the waypoint Deployments istiod-rs provisioned into
    /// `generated/`, spread over `nodes`.
    pub fn waypoint_pods(&self, generated: &Path, nodes: &[String]) -> WaypointPods {
        waypoint_pods(generated, &self.binaries.waypoint, nodes)
    }

    /// A new bearer token for `namespace/service_account`, added to the
    /// token file istiod-rs re-reads when it changes (the local stand-in
    /// for a projected service-account token from TokenRequest). The entry
    /// names no node: its holder asks only for its own identity.
    pub fn issue_token(&self, namespace: &str, service_account: &str) -> Result<String, MeshError> {
        let token = random_token();
        let mut tokens = self.lock_tokens();
        tokens
            .pods
            .insert(token.clone(), format!("{namespace}/{service_account}"));
        if let Err(e) = tokens.write(&self.layout) {
            tokens.pods.remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    /// Takes tokens out of the token file (the pod holding them has gone).
    pub fn revoke_tokens(&self, revoked: &[String]) -> Result<(), MeshError> {
        if revoked.is_empty() {
            return Ok(());
        }
        let mut tokens = self.lock_tokens();
        for token in revoked {
            tokens.pods.remove(token);
        }
        tokens.write(&self.layout)
    }

    /// The mesh root istiod-rs's CA keeps (PEM): what the
    /// `istio-ca-root-cert` ConfigMap istiod-rs publishes in Kubernetes holds.
    pub fn root_cert_pem(&self) -> Result<String, MeshError> {
        let path = self.root_cert();
        fs::read_to_string(&path).map_err(|source| MeshError::Read { path, source })
    }

    /// The mesh root file the proxies trust istiod with.
    pub fn root_cert(&self) -> PathBuf {
        match &self.config.cacerts_dir {
            Some(dir) => dir.join("root-cert.pem"),
            None => self.layout.root_cert(),
        }
    }

    fn lock_tokens(&self) -> MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Processes> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn netns_of(&self, node: &str) -> Result<&NetNs, MeshError> {
        Ok(&self.topology_node(node)?.netns)
    }

    fn topology_node(&self, node: &str) -> Result<&topology::Node, MeshError> {
        self.topology_nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| MeshError::NoNode(node.to_string()))
    }

    fn wait_ztunnel_ready(&self, run: &Run, p: &ProcessInfo) -> Result<(), MeshError> {
        let netns = NetNs::named(&p.netns);
        self.wait_http_ready(run, p, &netns, api::ports::READINESS, "/healthz/ready")
    }

    /// Polls `GET path` on the component's loopback `port` until it answers
    /// 200; the last answer (or error) is the reason when it never does.
    fn wait_http_ready(
        &self,
        run: &Run,
        p: &ProcessInfo,
        netns: &NetNs,
        port: u16,
        path: &str,
    ) -> Result<(), MeshError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        let not_ready = |reason: String| MeshError::NotReady {
            component: p.name.clone(),
            reason,
            log: p.log.display().to_string(),
            tail: log_tail(&p.log, 30),
        };
        loop {
            let last = match crate::http::get(netns, port, path, Duration::from_secs(2)) {
                Ok(resp) if resp.status == 200 => return Ok(()),
                Ok(resp) => format!("{path} answered {}: {}", resp.status, resp.body.trim()),
                Err(e) => e.to_string(),
            };
            if let Some(status) = run.exited(p) {
                return Err(not_ready(format!("it exited ({status})")));
            }
            if start.elapsed() >= self.config.ready_timeout {
                return Err(not_ready(format!(
                    "not ready within {:?}; last: {last}",
                    self.config.ready_timeout
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    fn istiod_spec(&self) -> ProcessSpec {
        let spec = ProcessSpec::new("istiod", &self.binaries.istiod)
            .env("RUST_LOG", &self.config.log)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--token-file")
            .arg(self.layout.tokens_file())
            .arg("--data-dir")
            .arg(self.layout.istiod_dir())
            .arg("--trust-domain")
            .arg(&self.config.trust_domain)
            .arg("--waypoint-xds-address")
            .arg(format!("{}:{}", self.istiod_ip, api::ports::ISTIOD_TLS))
            .arg("--waypoint-log-level")
            .arg(&self.config.log);
        match &self.config.cacerts_dir {
            Some(dir) => spec
                .arg("--cacerts-dir")
                .arg(dir)
                .arg("--cacerts-poll-interval")
                .arg("1s"),
            None => spec,
        }
    }

    fn node_agent_spec(&self, node: &str) -> ProcessSpec {
        ProcessSpec::new(format!("node-agent-{node}"), &self.binaries.ztunnel)
            .arg("cni")
            .arg("--node-name")
            .arg(node)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--zds-socket")
            .arg(self.layout.zds_socket(node))
            .arg("--cni-socket")
            .arg(self.layout.cni_socket(node))
            .env("RUST_LOG", &self.config.log)
    }

    /// ztunnel-rs for `node` in pod slot `slot` (its log file is per slot:
    /// two run side by side during an upgrade).
    fn ztunnel_spec(&self, node: &str, slot: usize) -> ProcessSpec {
        let istiod = format!("https://{}:{}", self.istiod_ip, api::ports::ISTIOD_TLS);
        let name = match slot {
            0 => format!("ztunnel-{node}"),
            _ => format!("ztunnel-{node}-{slot}"),
        };
        let mut spec = ProcessSpec::new(&name, &self.binaries.ztunnel)
            .arg("proxy")
            .arg("--node-name")
            .arg(node)
            .arg("--pod-name")
            .arg(&name)
            .arg("--xds-address")
            .arg(&istiod)
            .arg("--token-file")
            .arg(self.layout.node_token(node))
            .arg("--root-cert")
            .arg(self.root_cert())
            .arg("--zds-socket")
            .arg(self.layout.zds_socket(node))
            .arg("--trust-domain")
            .arg(&self.config.trust_domain)
            .arg("--drain-deadline")
            .arg(format!("{}ms", self.config.drain_deadline.as_millis()))
            // The DNS proxy forwards from inside each pod's netns: this is
            // the pod's own loopback, where a scenario may run a stand-in
            // resolver (`scenarios::dns`); never the host's resolvers.
            .arg("--dns-server")
            .arg(crate::scenarios::dns::LOCAL_UPSTREAM)
            // Nor the host's search list: on-demand lookups ask exactly the
            // names the scenarios expect, whatever the machine's resolv.conf.
            .arg("--resolv-conf")
            .arg("/dev/null")
            .env("RUST_LOG", &self.config.log);
        if let Some(ttl) = self.config.certificate_ttl {
            spec = spec
                .arg("--certificate-ttl")
                .arg(format!("{}ms", ttl.as_millis()));
        }
        if let Some(retention) = self.config.metrics_retention {
            spec = spec
                .arg("--metrics-retention")
                .arg(format!("{}ms", retention.as_millis()));
        }
        spec
    }
}

/// What the token file holds: one token per node's ztunnel (identity
/// `istio-system/ztunnel` on that node) and one per pod that has asked for
/// one ([`MeshRuntime::issue_token`]).
#[derive(Debug)]
struct Tokens {
    /// (node, token)
    nodes: Vec<(String, String)>,
    /// token -> `<namespace>/<service account>`
    pods: BTreeMap<String, String>,
}

impl Tokens {
    /// A token for each node's ztunnel, each written to the node's token
    /// file (mode 0600).
    fn for_nodes(layout: &MeshLayout, nodes: &[&str]) -> Result<Tokens, MeshError> {
        let mut tokens = Tokens {
            nodes: Vec::new(),
            pods: BTreeMap::new(),
        };
        for node in nodes {
            let token = random_token();
            let dir = layout.node_dir(node);
            fs::create_dir_all(&dir).map_err(|source| MeshError::Write {
                path: dir.clone(),
                source,
            })?;
            write_secret(&layout.node_token(node), &token)?;
            tokens.nodes.push((node.to_string(), token));
        }
        Ok(tokens)
    }

    /// The token file's text (see istiod-rs `auth::token_file`).
    fn render(&self) -> String {
        let mut entries = String::from(
            "# bearer token -> identity (the local stand-in for TokenReview)\ntokens:\n",
        );
        for (node, token) in &self.nodes {
            entries.push_str(&format!(
                "- token: {token}\n  serviceAccount: {}/ztunnel\n  node: {node}\n",
                api::labels::DEFAULT_ROOT_NAMESPACE
            ));
        }
        for (token, service_account) in &self.pods {
            entries.push_str(&format!(
                "- token: {token}\n  serviceAccount: {service_account}\n"
            ));
        }
        entries
    }

    /// Replaces the token file at once (a complete file renamed over the
    /// old one, mode 0600): istiod-rs never reads half of it.
    fn write(&self, layout: &MeshLayout) -> Result<(), MeshError> {
        let dir = layout.istiod_dir();
        fs::create_dir_all(&dir).map_err(|source| MeshError::Write { path: dir, source })?;
        let path = layout.tokens_file();
        let tmp = path.with_file_name(".tokens.yaml.tmp");
        write_secret(&tmp, &self.render())?;
        fs::rename(&tmp, &path).map_err(|source| MeshError::Write { path, source })
    }
}

fn write_secret(path: &Path, content: &str) -> Result<(), MeshError> {
    use std::io::Write;
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .map_err(|source| MeshError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Under `generated/`: the waypoints istiod-rs provisions, one file per
/// Gateway, `<namespace>/<gateway>.yaml` (istiod-rs
/// `provision::directory::WAYPOINTS_DIR`).
pub const WAYPOINTS_DIR: &str = "waypoints";

/// The waypoint Deployments istiod-rs provisioned, as pods.
#[derive(Debug, Default)]
pub struct WaypointPods {
    /// The pods wanted, each with the file its Deployment is in.
    pub pods: Vec<(PathBuf, PodRequest)>,
    /// The ServiceAccounts the files hold: they exist in the cluster (pods
    /// may run as them), though the local cluster does not write them.
    pub service_accounts: BTreeSet<ObjectKey>,
    /// Files that could not be read or translated; their pods are left as
    /// they are, as a cluster keeps what it last had.
    pub failed: Vec<(PathBuf, MeshError)>,
}

/// Pods for the waypoint Deployments (labelled as managed by the mesh) in
/// `generated/waypoints/<namespace>/*.yaml` (hidden files, a write in
/// progress, are skipped): `spec.replicas` pods each (default 1), named
/// `<deployment>-<n>`, spread over `nodes` in turn; see [`deployment_pods`].
pub fn waypoint_pods(generated: &Path, waypoint: &Path, nodes: &[String]) -> WaypointPods {
    let mut out = WaypointPods::default();
    for file in waypoint_files(&generated.join(WAYPOINTS_DIR)) {
        let shown = file.display().to_string();
        let read = fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| Object::from_yaml(&text).map_err(|e| e.to_string()));
        let objects = match read {
            Ok(objects) => objects,
            Err(reason) => {
                out.failed.push((
                    file.clone(),
                    MeshError::Generated {
                        file: shown,
                        reason,
                    },
                ));
                continue;
            }
        };
        let mut pods = Vec::new();
        let mut failure = None;
        for obj in &objects {
            match (obj.key().group.as_str(), obj.kind()) {
                ("", "ServiceAccount") => {
                    out.service_accounts.insert(obj.key().clone());
                }
                ("apps", "Deployment") if is_managed(obj) => {
                    match deployment_pods(&file, obj, waypoint, nodes) {
                        Ok(more) => pods.extend(more),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        match failure {
            Some(e) => out.failed.push((file, e)),
            None => out.pods.extend(pods.into_iter().map(|p| (file.clone(), p))),
        }
    }
    out
}

/// `<dir>/<namespace>/<name>.yaml`, sorted; hidden files skipped.
fn waypoint_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(namespaces) = fs::read_dir(dir) else {
        return files;
    };
    for namespace in namespaces.flatten() {
        let Ok(entries) = fs::read_dir(namespace.path()) else {
            continue;
        };
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
        }));
    }
    files.sort();
    files
}

fn is_managed(obj: &Object) -> bool {
    obj.labels()
        .get(api::labels::GATEWAY_MANAGED)
        .map(String::as_str)
        == Some(api::labels::GATEWAY_MANAGED_VALUE)
}

/// The name of the image (and command) the local cluster runs as the
/// waypoint binary: `<hub>/waypoint-rs:<tag>` in manifests/templates/waypoint.yaml.
const WAYPOINT_IMAGE: &str = "waypoint-rs";

/// The pods of one waypoint Deployment, as its ReplicaSet would create
/// them ([`crate::deployments::deployment_pods`], the first replica on the
/// first node). The container must run the waypoint image (`command` empty
/// or the image's); its program is the `waypoint` binary, with the
/// container's `args`. Anything the local cluster cannot run as written is
/// an error naming the file, the Deployment and the field.
pub fn deployment_pods(
    file: &Path,
    deployment: &Object,
    waypoint: &Path,
    nodes: &[String],
) -> Result<Vec<PodRequest>, MeshError> {
    let image = |container: &k8s_openapi::api::core::v1::Container, _: &[_]| {
        let image = container.image.clone().unwrap_or_default();
        if crate::kube::node::images::image_name(&image) != WAYPOINT_IMAGE {
            return Err((
                "image".to_string(),
                format!(
                    "{image:?} is not {WAYPOINT_IMAGE}, the one waypoint image the local cluster runs"
                ),
            ));
        }
        match container.command.as_deref() {
            None | Some([]) => {}
            Some([program]) if program == WAYPOINT_IMAGE => {}
            Some(other) => {
                return Err((
                    "command".to_string(),
                    format!("{other:?}: the local cluster runs the image's {WAYPOINT_IMAGE} only"),
                ));
            }
        }
        Ok(Some(AppCommand {
            program: waypoint.display().to_string(),
            args: container.args.clone().unwrap_or_default(),
        }))
    };
    crate::deployments::deployment_pods(deployment, nodes, 0, &image).map_err(|reason| {
        MeshError::Generated {
            file: file.display().to_string(),
            reason,
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::ReadinessProbe;

    /// manifests/templates/waypoint.yaml rendered for Gateway demo/reviews-waypoint
    /// (what istiod-rs writes into `generated/waypoints/demo/`).
    pub(crate) fn rendered_template(replicas: Option<u32>) -> String {
        let mut text = include_str!("../../manifests/templates/waypoint.yaml").to_string();
        for (placeholder, value) in [
            ("hub", "istio-rs"),
            ("tag", "0.1.0"),
            ("imagePullPolicy", "IfNotPresent"),
            ("trustDomain", "cluster.local"),
            ("logLevel", "info"),
            ("xdsAddress", "10.0.0.2:15012"),
            ("gateway.name", "reviews-waypoint"),
            ("gateway.namespace", "demo"),
            ("gateway.uid", "u-1"),
            ("serviceAccount", "reviews-sa"),
        ] {
            text = text.replace(&format!("${{{placeholder}}}"), value);
        }
        assert!(!text.contains("${"), "a placeholder is left: {text}");
        if let Some(n) = replicas {
            text = text.replace(
                "spec:\n  selector:",
                &format!("spec:\n  replicas: {n}\n  selector:"),
            );
        }
        text
    }

    fn generated_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshe2e-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("waypoints/demo")).unwrap();
        dir
    }

    fn nodes() -> Vec<String> {
        vec!["node0".into(), "node1".into()]
    }

    #[test]
    fn the_waypoint_template_becomes_a_pod_with_its_env_volumes_and_probe() {
        let dir = generated_dir("waypoint-template");
        fs::write(
            dir.join("waypoints/demo/reviews-waypoint.yaml"),
            rendered_template(None),
        )
        .unwrap();
        // Not waypoints: a write in progress, the Gateway's status, a top-level file.
        fs::write(dir.join("waypoints/demo/.reviews-waypoint.yaml.tmp"), "{").unwrap();
        fs::create_dir_all(dir.join("status/Gateway/demo")).unwrap();
        fs::write(dir.join("status/Gateway/demo/reviews-waypoint.yaml"), "{").unwrap();
        fs::write(dir.join("old.yaml"), rendered_template(None)).unwrap();
        let out = waypoint_pods(&dir, Path::new("/bin/waypoint-rs"), &nodes());
        fs::remove_dir_all(&dir).unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        assert_eq!(
            out.service_accounts,
            BTreeSet::from([ObjectKey::core(
                "ServiceAccount",
                Some("demo"),
                "reviews-sa"
            )])
        );
        let [(file, p)] = out.pods.as_slice() else {
            panic!("one pod: {:?}", out.pods);
        };
        assert!(file.ends_with("waypoints/demo/reviews-waypoint.yaml"));
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.node.as_deref()),
            ("demo", "reviews-waypoint-0", Some("node0"))
        );
        assert_eq!(p.service_account, "reviews-sa");
        assert_eq!(p.labels[api::labels::DATAPLANE_MODE], "none");
        assert_eq!(
            p.labels[api::labels::GATEWAY_MANAGED],
            api::labels::GATEWAY_MANAGED_VALUE
        );
        assert_eq!(p.command.as_ref().unwrap().program, "/bin/waypoint-rs");
        assert_eq!(
            p.readiness,
            Some(ReadinessProbe::HttpGet {
                port: 15021,
                path: "/healthz/ready".into()
            })
        );
        assert_eq!(
            p.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            vec![15008, 15020]
        );
        let env: BTreeMap<&str, String> = p
            .env
            .iter()
            .map(|v| {
                let value = match &v.value_from {
                    Some(from) => {
                        format!("fieldRef:{}", from.field_ref.as_ref().unwrap().field_path)
                    }
                    None => v.value.clone().unwrap_or_default(),
                };
                (v.name.as_str(), value)
            })
            .collect();
        assert_eq!(env["XDS_ADDRESS"], "10.0.0.2:15012");
        assert_eq!(env["CA_ROOT_CA"], "/var/run/secrets/istio/root-cert.pem");
        assert_eq!(env["TOKEN_FILE"], "/var/run/secrets/tokens/istio-token");
        assert_eq!(env["INSTANCE_IP"], "fieldRef:status.podIP");
        assert_eq!(env["SERVICE_ACCOUNT"], "fieldRef:spec.serviceAccountName");
        let mounts: BTreeMap<&str, &str> = p
            .volumes
            .iter()
            .map(|v| (v.mount_path.as_str(), v.volume.name.as_str()))
            .collect();
        assert_eq!(
            mounts,
            BTreeMap::from([
                ("/var/run/secrets/istio", "istiod-ca-cert"),
                ("/var/run/secrets/tokens", "istio-token"),
            ])
        );
        let ca = p
            .volumes
            .iter()
            .find(|v| v.volume.name == "istiod-ca-cert")
            .unwrap();
        assert_eq!(
            ca.volume.config_map.as_ref().unwrap().name,
            "istio-ca-root-cert"
        );
    }

    #[test]
    fn replicas_spread_over_nodes_and_a_bad_file_names_its_field_and_spares_the_others() {
        let dir = generated_dir("waypoint-replicas");
        fs::write(
            dir.join("waypoints/demo/a.yaml"),
            rendered_template(Some(3)),
        )
        .unwrap();
        let exec = rendered_template(None)
            .replace("name: \"reviews-waypoint\"", "name: \"b\"")
            .replace(
                "httpGet:\n              path: /healthz/ready\n              port: 15021",
                "exec:\n              command: [\"true\"]",
            );
        fs::write(dir.join("waypoints/demo/b.yaml"), exec).unwrap();
        fs::write(dir.join("waypoints/demo/c.yaml"), "kind: [").unwrap();
        let out = waypoint_pods(&dir, Path::new("/bin/waypoint-rs"), &nodes());
        fs::remove_dir_all(&dir).unwrap();
        let placed: Vec<(&str, &str)> = out
            .pods
            .iter()
            .map(|(_, p)| (p.name.as_str(), p.node.as_deref().unwrap()))
            .collect();
        assert_eq!(
            placed,
            [
                ("reviews-waypoint-0", "node0"),
                ("reviews-waypoint-1", "node1"),
                ("reviews-waypoint-2", "node0")
            ]
        );
        let failed: Vec<String> = out.failed.iter().map(|(_, e)| e.to_string()).collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(
            failed[0].contains("waypoints/demo/b.yaml: Deployment demo/b: spec.template.spec.containers[0].readinessProbe: only httpGet and tcpSocket"),
            "{}",
            failed[0]
        );
        assert!(
            failed[1].contains("waypoints/demo/c.yaml: "),
            "{}",
            failed[1]
        );
    }

    #[test]
    fn a_deployment_of_another_image_is_refused() {
        let text = rendered_template(None).replace("istio-rs/waypoint-rs:0.1.0", "nginx:1");
        let objects = Object::from_yaml(&text).unwrap();
        let deployment = objects.iter().find(|o| o.kind() == "Deployment").unwrap();
        let err = deployment_pods(
            Path::new("w.yaml"),
            deployment,
            Path::new("/bin/w"),
            &nodes(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("w.yaml: Deployment demo/reviews-waypoint: spec.template.spec.containers[0].image: \"nginx:1\""),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_private_and_pod_tokens_name_no_node() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshe2e-tokens-{}", std::process::id()));
        let layout = MeshLayout { root: dir.clone() };
        let mut tokens = Tokens::for_nodes(&layout, &["node0", "node1"]).unwrap();
        tokens
            .pods
            .insert("pod-token".into(), "demo/reviews-sa".into());
        tokens.write(&layout).unwrap();
        let mode = fs::metadata(layout.tokens_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let token = fs::read_to_string(layout.node_token("node1")).unwrap();
        assert_eq!(token.len(), 48);
        let file = fs::read_to_string(layout.tokens_file()).unwrap();
        assert!(
            file.contains(&format!(
                "- token: {token}\n  serviceAccount: istio-system/ztunnel\n  node: node1\n"
            )),
            "{file}"
        );
        assert!(
            file.ends_with("- token: pod-token\n  serviceAccount: demo/reviews-sa\n"),
            "{file}"
        );
        tokens.pods.clear();
        tokens.write(&layout).unwrap();
        assert!(
            !fs::read_to_string(layout.tokens_file())
                .unwrap()
                .contains("pod-token")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
