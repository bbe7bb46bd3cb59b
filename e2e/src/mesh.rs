//! Where the mesh plugs into the local cluster. With the mesh on, the local
//! cluster runs, as a Kubernetes cluster would:
//! - istiod-rs in the control-plane namespace, reading the cluster state from
//!   the config directory and the bearer tokens from a token file, keeping
//!   its CA's root in a state directory;
//! - per node, in the node's namespace, the node agent (`ztunnel-rs cni`) and
//!   the proxy (`ztunnel-rs proxy`), talking ZDS over a unix socket; the
//!   proxy reaches istiod over TLS (15012) with its node's bearer token;
//! - for every pod, the CNI plugin `istio-cni-rs`, chained after the local
//!   cluster's own network setup (see [`crate::cni`]);
//! - a pod per waypoint Deployment istiod-rs provisions into `generated/`.
//!
//! The command lines below are the one place that knows the components'
//! flags. Components are started in dependency order and each is waited for
//! until its own readiness endpoint says so (istiod `/ready` on 15014, each
//! ztunnel `/healthz/ready` on 15021, each node agent `/readyz` on 8000).
//! istiod, each node's ztunnel and each node's agent can be stopped (the
//! agent killed) and started again while the cluster runs (the restart
//! scenarios).

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Map, Value};

use crate::binaries::{Binaries, BinaryError};
use crate::cluster::{AppCommand, NamedPort, PodRequest};
use crate::cni::CniPlugin;
use crate::netns::NetNs;
use crate::objects::Object;
use crate::process::{ProcessInfo, ProcessSpec, log_tail};
use crate::run::{Run, RunError};
use crate::topology::Topology;

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
    #[error("{file}: {reason}")]
    Generated { file: String, reason: String },
    #[error("no node named {0:?} runs the mesh")]
    NoNode(String),
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
    node_netns: Vec<(String, NetNs)>,
    processes: Mutex<Processes>,
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
        write_tokens(&layout, &nodes)?;
        let mesh = MeshRuntime {
            config: config.clone(),
            layout,
            config_dir: config_dir.to_path_buf(),
            binaries: bins,
            control_plane: topology.control_plane.clone(),
            istiod_ip: topology.plan.control_plane_ip(),
            node_netns: topology
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.netns.clone()))
                .collect(),
            processes: Mutex::new(Processes {
                istiod: None,
                nodes: Vec::new(),
            }),
        };

        progress("starting istiod-rs (control plane, CA) and waiting for /ready");
        mesh.start_istiod(run)?;

        progress("starting the node agent and ztunnel-rs on every node");
        let mut started = Vec::new();
        for (node, netns) in &mesh.node_netns {
            let agent = run.spawn(&mesh.node_agent_spec(node), netns)?;
            let ztunnel = run.spawn(&mesh.ztunnel_spec(node), netns)?;
            started.push(NodeMesh {
                node: node.clone(),
                node_agent: Some(agent),
                ztunnel: Some(ztunnel),
            });
        }
        mesh.lock().nodes = started.clone();
        for node in &started {
            progress(&format!(
                "waiting for ztunnel-rs on {} to be ready (xDS synced, ZDS snapshot)",
                node.node
            ));
            let ztunnel = node.ztunnel.as_ref().expect("just started");
            mesh.wait_ztunnel_ready(run, &node.node, ztunnel)?;
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

    /// Stops a node's ztunnel-rs (SIGTERM: it drains, then exits).
    pub fn stop_ztunnel(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        if let Some(p) = self.with_node(node, |n| n.ztunnel.take())? {
            run.stop(&p);
        }
        Ok(())
    }

    /// Starts a node's ztunnel-rs (if it is not running) and waits until it
    /// is ready: it has the control plane's state and the node agent's pods.
    pub fn start_ztunnel(&self, run: &Run, node: &str) -> Result<(), MeshError> {
        let p = self.launch_ztunnel(run, node)?;
        self.wait_ztunnel_ready(run, node, &p)
    }

    /// Starts a node's ztunnel-rs (if it is not running) without waiting for
    /// it to be ready, which it may not become on its own (istiod down).
    pub fn launch_ztunnel(&self, run: &Run, node: &str) -> Result<ProcessInfo, MeshError> {
        let spec = self.ztunnel_spec(node);
        self.launch_on_node(run, node, spec, |n| &mut n.ztunnel)
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

    /// Pods for the waypoint Deployments istiod-rs provisioned into `generated/`.
    pub fn waypoint_pods(&self, generated: &Path) -> Result<Vec<PodRequest>, MeshError> {
        waypoint_pods(generated, &self.binaries.waypoint)
    }

    fn lock(&self) -> MutexGuard<'_, Processes> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn netns_of(&self, node: &str) -> Result<&NetNs, MeshError> {
        self.node_netns
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, ns)| ns)
            .ok_or_else(|| MeshError::NoNode(node.to_string()))
    }

    fn wait_ztunnel_ready(&self, run: &Run, node: &str, p: &ProcessInfo) -> Result<(), MeshError> {
        self.wait_http_ready(
            run,
            p,
            self.netns_of(node)?,
            api::ports::READINESS,
            "/healthz/ready",
        )
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
        ProcessSpec::new("istiod", &self.binaries.istiod)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--token-file")
            .arg(self.layout.tokens_file())
            .arg("--data-dir")
            .arg(self.layout.istiod_dir())
            .arg("--trust-domain")
            .arg(&self.config.trust_domain)
            .env("RUST_LOG", &self.config.log)
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

    fn ztunnel_spec(&self, node: &str) -> ProcessSpec {
        let istiod = format!("https://{}:{}", self.istiod_ip, api::ports::ISTIOD_TLS);
        let mut spec = ProcessSpec::new(format!("ztunnel-{node}"), &self.binaries.ztunnel)
            .arg("proxy")
            .arg("--node-name")
            .arg(node)
            .arg("--xds-address")
            .arg(&istiod)
            .arg("--token-file")
            .arg(self.layout.node_token(node))
            .arg("--root-cert")
            .arg(self.layout.root_cert())
            .arg("--zds-socket")
            .arg(self.layout.zds_socket(node))
            .arg("--trust-domain")
            .arg(&self.config.trust_domain)
            .arg("--drain-deadline")
            .arg(format!("{}ms", self.config.drain_deadline.as_millis()))
            .env("RUST_LOG", &self.config.log);
        if let Some(ttl) = self.config.certificate_ttl {
            spec = spec
                .arg("--certificate-ttl")
                .arg(format!("{}ms", ttl.as_millis()));
        }
        spec
    }
}

/// Writes the token file (one token per node's ztunnel, identity
/// `istio-system/ztunnel` on that node) and each node's token, mode 0600.
fn write_tokens(layout: &MeshLayout, nodes: &[&str]) -> Result<(), MeshError> {
    let mut entries =
        String::from("# bearer token -> identity (the local stand-in for TokenReview)\ntokens:\n");
    for node in nodes {
        let token = random_token();
        let dir = layout.node_dir(node);
        fs::create_dir_all(&dir).map_err(|source| MeshError::Write {
            path: dir.clone(),
            source,
        })?;
        write_secret(&layout.node_token(node), &token)?;
        entries.push_str(&format!(
            "- token: {token}\n  serviceAccount: {}/ztunnel\n  node: {node}\n",
            api::labels::DEFAULT_ROOT_NAMESPACE
        ));
    }
    let dir = layout.istiod_dir();
    fs::create_dir_all(&dir).map_err(|source| MeshError::Write { path: dir, source })?;
    write_secret(&layout.tokens_file(), &entries)
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

/// Pods for the waypoint Deployments (labelled as managed by the mesh) in
/// `generated`: one pod per Deployment, named `<deployment>-0`, with the
/// template's labels, service account, ports and arguments, running the
/// waypoint binary.
pub fn waypoint_pods(generated: &Path, waypoint: &Path) -> Result<Vec<PodRequest>, MeshError> {
    use k8s_openapi::api::apps::v1::Deployment;
    let mut pods = Vec::new();
    let Ok(entries) = fs::read_dir(generated) else {
        return Ok(pods);
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    for file in files {
        let shown = file.display().to_string();
        let text = fs::read_to_string(&file).map_err(|e| MeshError::Generated {
            file: shown.clone(),
            reason: e.to_string(),
        })?;
        let objects = Object::from_yaml(&text).map_err(|e| MeshError::Generated {
            file: shown.clone(),
            reason: e.to_string(),
        })?;
        for obj in objects
            .iter()
            .filter(|o| o.kind() == "Deployment" && o.key().group == "apps")
        {
            let managed = obj
                .labels()
                .get(api::labels::GATEWAY_MANAGED)
                .map(String::as_str)
                == Some(api::labels::GATEWAY_MANAGED_VALUE);
            if !managed {
                continue;
            }
            let deployment: Deployment = obj.to_typed().map_err(|e| MeshError::Generated {
                file: shown.clone(),
                reason: e.to_string(),
            })?;
            let template = deployment.spec.map(|s| s.template).unwrap_or_default();
            let meta = template.metadata.unwrap_or_default();
            let spec = template.spec.unwrap_or_default();
            let container = spec.containers.into_iter().next().unwrap_or_default();
            let mut pod = PodRequest::new(
                obj.namespace().unwrap_or("default"),
                &format!("{}-0", obj.name()),
            );
            pod.labels = meta.labels.unwrap_or_default();
            if let Some(sa) = spec.service_account_name {
                pod.service_account = sa;
            }
            pod.command = Some(AppCommand {
                program: waypoint.display().to_string(),
                args: container.args.unwrap_or_default(),
            });
            pod.ports = container
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    Some(NamedPort {
                        name: p.name.unwrap_or_default(),
                        port: u16::try_from(p.container_port).ok()?,
                    })
                })
                .collect();
            pods.push(pod);
        }
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waypoint_deployments_become_pods() {
        let dir = std::env::temp_dir().join(format!("meshe2e-generated-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("waypoint.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: reviews-waypoint\n  namespace: demo\n  labels:\n    \
             gateway.istio.io/managed: istio.io-mesh-controller\n    gateway.networking.k8s.io/gateway-name: reviews-waypoint\n\
             spec:\n  selector:\n    matchLabels:\n      gateway.networking.k8s.io/gateway-name: reviews-waypoint\n  template:\n    \
             metadata:\n      labels:\n        gateway.networking.k8s.io/gateway-name: reviews-waypoint\n    spec:\n      \
             serviceAccountName: reviews-waypoint\n      containers:\n      - name: waypoint\n        args: [\"--gateway\", \"reviews-waypoint\"]\n        \
             ports:\n        - name: mesh\n          containerPort: 15008\n\
             ---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: unrelated\n  namespace: demo\nspec:\n  selector: {}\n  template: {}\n",
        )
        .unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let pods = waypoint_pods(&dir, Path::new("/bin/waypoint-rs")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(pods.len(), 1);
        let p = &pods[0];
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("demo", "reviews-waypoint-0")
        );
        assert_eq!(p.service_account, "reviews-waypoint");
        assert_eq!(
            p.labels["gateway.networking.k8s.io/gateway-name"],
            "reviews-waypoint"
        );
        assert_eq!(p.command.as_ref().unwrap().program, "/bin/waypoint-rs");
        assert_eq!(
            p.command.as_ref().unwrap().args,
            vec!["--gateway", "reviews-waypoint"]
        );
        assert_eq!(
            p.ports,
            vec![NamedPort {
                name: "mesh".into(),
                port: 15008
            }]
        );
    }

    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshe2e-tokens-{}", std::process::id()));
        let layout = MeshLayout { root: dir.clone() };
        write_tokens(&layout, &["node0", "node1"]).unwrap();
        let mode = fs::metadata(layout.tokens_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let token = fs::read_to_string(layout.node_token("node1")).unwrap();
        assert_eq!(token.len(), 48);
        assert!(
            fs::read_to_string(layout.tokens_file())
                .unwrap()
                .contains(&format!("token: {token}"))
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
