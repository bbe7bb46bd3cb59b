//! Where the mesh plugs into the local cluster. With the mesh on, the local
//! cluster runs, as a Kubernetes cluster would:
//! - istiod-rs in the control-plane namespace, reading the cluster state from
//!   the config directory and the bearer tokens from a token file;
//! - per node, in the node's namespace, the node agent (`ztunnel-rs cni`) and
//!   the proxy (`ztunnel-rs proxy`), talking ZDS over a unix socket;
//! - for every pod, the CNI plugin `istio-cni-rs`, chained after the local
//!   cluster's own network setup (see [`crate::cni`]);
//! - a pod per waypoint Deployment istiod-rs provisions into `generated/`.
//!
//! The command lines below are the one place that knows the components'
//! flags. They are the expected interface, written before the components
//! existed; when a component settles its flags, adjust them here only.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// `RUST_LOG` of every component.
    pub log: String,
    /// How long a component may take to start listening.
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
    pub fn istiod_dir(&self) -> PathBuf {
        self.root.join("istiod")
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

/// The mesh's processes on one node.
#[derive(Clone, Debug)]
pub struct NodeMesh {
    pub node_agent: ProcessInfo,
    pub ztunnel: ProcessInfo,
}

/// The running mesh.
#[derive(Debug)]
pub struct MeshRuntime {
    pub config: MeshConfig,
    pub layout: MeshLayout,
    pub istiod: ProcessInfo,
    pub nodes: Vec<NodeMesh>,
    cni_binary: PathBuf,
    waypoint_binary: PathBuf,
}

impl MeshRuntime {
    /// Starts istiod-rs, then each node's agent and proxy, waiting for each
    /// to listen before the next depends on it.
    pub fn start(
        run: &Run,
        topology: &Topology,
        config_dir: &Path,
        binaries: &Binaries,
        config: &MeshConfig,
    ) -> Result<MeshRuntime, MeshError> {
        let layout = MeshLayout {
            root: run.dir().join("mesh"),
        };
        let istiod_bin = config.istiod.path(binaries)?;
        let ztunnel_bin = config.ztunnel.path(binaries)?;
        let cni_binary = config.cni_plugin.path(binaries)?;
        let waypoint_binary = config.waypoint.path(binaries)?;
        let nodes: Vec<&str> = topology.nodes.iter().map(|n| n.name.as_str()).collect();
        write_tokens(&layout, &nodes)?;

        let istiod = run.spawn(
            &istiod_spec(&istiod_bin, config_dir, &layout, config),
            &topology.control_plane,
        )?;
        wait_ready(
            run,
            &istiod,
            &topology.control_plane,
            api::ports::ISTIOD_TLS,
            config.ready_timeout,
        )?;

        let mut started = Vec::new();
        for node in &topology.nodes {
            let agent = run.spawn(
                &node_agent_spec(&ztunnel_bin, &node.name, config_dir, &layout, config),
                &node.netns,
            )?;
            let ztunnel = run.spawn(
                &ztunnel_spec(
                    &ztunnel_bin,
                    &node.name,
                    topology.plan.control_plane_ip(),
                    &layout,
                    config,
                ),
                &node.netns,
            )?;
            started.push((
                node.netns.clone(),
                NodeMesh {
                    node_agent: agent,
                    ztunnel,
                },
            ));
        }
        for (netns, mesh) in &started {
            wait_ready(
                run,
                &mesh.ztunnel,
                netns,
                api::ports::READINESS,
                config.ready_timeout,
            )?;
        }
        Ok(MeshRuntime {
            config: config.clone(),
            layout,
            istiod,
            nodes: started.into_iter().map(|(_, m)| m).collect(),
            cni_binary,
            waypoint_binary,
        })
    }

    /// The CNI plugin as node `node`'s runtime invokes it.
    pub fn cni_plugin(&self, node: &str) -> CniPlugin {
        let mut config = Map::new();
        config.insert(
            "plugin_event_socket".into(),
            Value::String(self.layout.cni_socket(node).display().to_string()),
        );
        config.insert("ambient_enabled".into(), Value::Bool(true));
        CniPlugin {
            binary: self.cni_binary.clone(),
            network: "local-pod-network".into(),
            config,
        }
    }

    /// Pods for the waypoint Deployments istiod-rs provisioned into `generated/`.
    pub fn waypoint_pods(&self, generated: &Path) -> Result<Vec<PodRequest>, MeshError> {
        waypoint_pods(generated, &self.waypoint_binary)
    }
}

fn istiod_spec(
    bin: &Path,
    config_dir: &Path,
    layout: &MeshLayout,
    config: &MeshConfig,
) -> ProcessSpec {
    ProcessSpec::new("istiod", bin)
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--token-file")
        .arg(layout.tokens_file())
        .arg("--data-dir")
        .arg(layout.istiod_dir())
        .arg("--trust-domain")
        .arg(&config.trust_domain)
        .arg("--plaintext")
        .env("RUST_LOG", &config.log)
}

fn node_agent_spec(
    bin: &Path,
    node: &str,
    config_dir: &Path,
    layout: &MeshLayout,
    config: &MeshConfig,
) -> ProcessSpec {
    ProcessSpec::new(format!("node-agent-{node}"), bin)
        .arg("cni")
        .arg("--node")
        .arg(node)
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--zds-socket")
        .arg(layout.zds_socket(node))
        .arg("--plugin-socket")
        .arg(layout.cni_socket(node))
        .env("RUST_LOG", &config.log)
}

fn ztunnel_spec(
    bin: &Path,
    node: &str,
    istiod: std::net::Ipv4Addr,
    layout: &MeshLayout,
    config: &MeshConfig,
) -> ProcessSpec {
    let istiod = format!("https://{istiod}:{}", api::ports::ISTIOD_TLS);
    ProcessSpec::new(format!("ztunnel-{node}"), bin)
        .arg("proxy")
        .arg("--node")
        .arg(node)
        .arg("--xds-address")
        .arg(&istiod)
        .arg("--ca-address")
        .arg(&istiod)
        .arg("--token-file")
        .arg(layout.node_token(node))
        .arg("--root-cert")
        .arg(layout.istiod_dir().join("root-cert.pem"))
        .arg("--zds-socket")
        .arg(layout.zds_socket(node))
        .arg("--trust-domain")
        .arg(&config.trust_domain)
        .env("RUST_LOG", &config.log)
}

fn wait_ready(
    run: &Run,
    p: &ProcessInfo,
    netns: &NetNs,
    port: u16,
    timeout: Duration,
) -> Result<(), MeshError> {
    let exited = || run.exited(p).map(|s| format!("it exited ({s})"));
    netns
        .wait_for_listener(port, timeout, &exited)
        .map_err(|e| MeshError::NotReady {
            component: p.name.clone(),
            reason: e.to_string(),
            log: p.log.display().to_string(),
            tail: log_tail(&p.log, 30),
        })
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
            "- token: {token}\n  namespace: {}\n  serviceAccount: ztunnel\n  node: {node}\n",
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
