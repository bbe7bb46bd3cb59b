//! The node runtime: what a kubelet and its container runtime do, for one
//! network-namespace node of the topology, driven by the real API server.
//!
//! - It registers the Node (`spec.podCIDR` = the topology's pod range of the
//!   node, its fabric address, Ready, capacity), renews its Lease in
//!   `kube-node-lease` and re-reports its status ([`register`]).
//! - It watches the pods bound to it (`spec.nodeName`) and runs each on a
//!   thread of its own ([`pod`]): the pod's network namespace, the CNI
//!   chain of the node's configuration directory run as containerd runs it
//!   ([`crate::cni::run_chain`]), volumes ([`volumes`]: projected
//!   service-account tokens from the TokenRequest API, ConfigMaps, Secrets,
//!   emptyDir, hostPath on the node's own filesystem), each container a
//!   process from the image table ([`images`]) in a mount namespace of its
//!   own ([`launch`]), environment and command line as kubelet builds them
//!   ([`env`]), probes from the node's namespace, restarts with back-off,
//!   status, graceful deletion.
//! - It runs kube-proxy (iptables mode) in the node's namespace, so
//!   ClusterIP Services work for pods and the node ([`kube_proxy`]).
//! - It serves the kubelet's HTTPS port (10250) on the node's address,
//!   where the API server proxies port-forward requests ([`server`]).
//!
//! The node's filesystem: `<run dir>/nodes/<node>/fs` stands for the
//! node's own `/` where a kubelet and a CNI installer would write:
//! `etc/cni/net.d` (the CNI configuration, [`PRIMARY_CONFLIST`] written at
//! start), `opt/cni/bin` (the plugins), `var/lib/cni` (host-local's
//! leases), `var/lib/kubelet/pods/<uid>` (volumes, container roots), and
//! every other `hostPath` a pod uses. CNI plugins run with those paths
//! bind-mounted where a node has them, so a plugin and a hostPath pod (a
//! CNI installer, a node agent) see the same files.
//!
//! Timings (heartbeats, back-off, timeouts) live in [`NodeTimings`].

pub mod dns;
pub mod env;
pub mod images;
pub mod kube_proxy;
pub mod launch;
mod pod;
mod register;
pub mod server;
pub mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::binaries::Binaries;
use crate::netns::NetNs;
use crate::process::ProcessInfo;
use crate::run::RunHandle;

pub use images::{IMAGES, ImageEntry};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {node}: {what}: {source}")]
    Io {
        node: String,
        what: String,
        source: std::io::Error,
    },
    #[error("node {node}: the kubeconfig {path}: {reason}")]
    Kubeconfig {
        node: String,
        path: PathBuf,
        reason: String,
    },
    #[error("node {node}: {what}: {source}")]
    Api {
        node: String,
        what: String,
        source: kube::Error,
    },
    #[error(
        "node {node}: the API server has spec.podCIDR {found} for it, but its pod range in the \
         topology is {expected}; remove the stale Node object"
    )]
    PodCidr {
        node: String,
        found: String,
        expected: Ipv4Net,
    },
    #[error(transparent)]
    Binary(#[from] crate::binaries::BinaryError),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    KubeProxy(#[from] kube_proxy::KubeProxyError),
    #[error(transparent)]
    ControlPlane(#[from] super::ControlPlaneError),
    #[error("node {node}: no pod {namespace}/{name} runs here")]
    NoPod {
        node: String,
        namespace: String,
        name: String,
    },
    #[error("node {node}: pod {namespace}/{name} has no running container {container:?}")]
    NoContainer {
        node: String,
        namespace: String,
        name: String,
        container: String,
    },
    #[error(
        "node {node}: `client http {url}` in pod {namespace}/{name} printed no report ({source}); stdout: {stdout}; stderr: {stderr}"
    )]
    ClientReport {
        node: String,
        namespace: String,
        name: String,
        url: String,
        source: serde_json::Error,
        stdout: String,
        stderr: String,
    },
}

/// How often and how long things take; kubelet's defaults unless said.
#[derive(Clone, Debug)]
pub struct NodeTimings {
    /// The Lease's `leaseDurationSeconds` (kubelet: 40s); renewed every quarter of it.
    pub lease_duration: Duration,
    /// How often the Node's status is re-reported although nothing changed
    /// (kubelet's `nodeStatusReportFrequency`: 5m).
    pub status_report: Duration,
    /// How often a pod's thread looks at its containers and probes when
    /// nothing else wakes it.
    pub pod_sync: Duration,
    /// How long one CNI plugin invocation may take.
    pub cni_timeout: Duration,
    /// How long one API request may take.
    pub api_timeout: Duration,
    /// Restart back-off: first delay (after the first, immediate, restart)
    /// and ceiling (kubelet: 10s doubling to 5m).
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// How long kube-proxy may take to program its first rules.
    pub kube_proxy_ready: Duration,
    /// How soon a pod that could not start (no CNI configuration yet, a
    /// missing ConfigMap, an unknown image) is tried again.
    pub retry: Duration,
    /// How long the containers of a pod whose object vanished (force
    /// deletion) get between SIGTERM and SIGKILL.
    pub gone_grace: Duration,
}

impl Default for NodeTimings {
    fn default() -> Self {
        NodeTimings {
            lease_duration: Duration::from_secs(40),
            status_report: Duration::from_secs(300),
            pod_sync: Duration::from_millis(250),
            cni_timeout: Duration::from_secs(30),
            api_timeout: Duration::from_secs(30),
            restart_backoff: Duration::from_secs(10),
            restart_backoff_max: Duration::from_secs(300),
            kube_proxy_ready: Duration::from_secs(60),
            retry: Duration::from_secs(2),
            gone_grace: Duration::from_secs(2),
        }
    }
}

/// The node as the topology built it.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub netns: NetNs,
    /// Its address on the fabric (the Node's InternalIP).
    pub ip: Ipv4Addr,
    /// Its pod range (the Node's `spec.podCIDR`).
    pub pod_cidr: Ipv4Net,
}

impl NodeSpec {
    pub fn from_topology(node: &crate::topology::Node) -> NodeSpec {
        NodeSpec {
            name: node.name.clone(),
            netns: node.netns.clone(),
            ip: node.ip,
            pod_cidr: node.pod_range,
        }
    }
}

/// kube-proxy for the node: its binary and credentials.
#[derive(Clone, Debug)]
pub struct KubeProxyConfig {
    pub binary: PathBuf,
    /// A kubeconfig for `system:kube-proxy` (bound to `system:node-proxier`).
    pub kubeconfig: PathBuf,
    /// Every pod address of the cluster (`--cluster-cidr`).
    pub cluster_cidr: Ipv4Net,
    /// The ClusterIP range: routed out of the node's fabric link, as a
    /// node's default route would carry it, so a connection the node
    /// itself opens to a ClusterIP (a `hostNetwork` pod's) is routed at
    /// all and kube-proxy's OUTPUT rules can DNAT it.
    pub service_cidr: Ipv4Net,
}

/// Everything a node runtime needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node: NodeSpec,
    /// A kubeconfig for `system:node:<name>` in `system:nodes`.
    pub kubeconfig: PathBuf,
    /// The reference CNI plugins to install in the node's `/opt/cni/bin`
    /// (name, binary).
    pub cni_plugins: Vec<(String, PathBuf)>,
    /// None: no kube-proxy (ClusterIPs do not work on this node).
    pub kube_proxy: Option<KubeProxyConfig>,
    /// Where the images' binaries come from.
    pub binaries: Binaries,
    /// The version the Node reports (`status.nodeInfo.kubeletVersion`).
    pub kubelet_version: String,
    /// The kubelet server's certificates. None: no kubelet server (the
    /// Node reports port 0; port-forward cannot reach the node).
    pub kubelet_server: Option<server::KubeletTls>,
    pub timings: NodeTimings,
    /// What pods' resolv.conf say (kubelet's DNS flags).
    pub dns: dns::PodDns,
}

/// The ClusterIP pods' resolv.conf names as the cluster's DNS server (the
/// tenth of the Service range, as kubeadm's `kube-dns`). The cluster runs no
/// DNS server there: a scenario that needs one creates a Service with this
/// ClusterIP (`kube::scenarios::dns`); until then such queries go
/// unanswered, inside the test's namespaces.
pub fn cluster_dns_ip(service_cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(service_cidr.network()) + 10)
}

/// The node's primary network: the reference `ptp` plugin with
/// `host-local` IPAM over the node's pod range. `ptp` gives each pod a veth
/// with a /32-routed address and the range's first address as gateway on
/// the node side, exactly the routing [`crate::topology`] sets up between
/// nodes; no masquerading (pod addresses are routed across the fabric).
pub const PRIMARY_CONFLIST: &str = "10-ptp.conflist";
/// The network's name in it.
pub const NETWORK_NAME: &str = "k8s-pod-network";

/// The primary network configuration for a node's pod range.
pub fn primary_conflist(pod_cidr: Ipv4Net) -> serde_json::Value {
    let gateway = Ipv4Addr::from(u32::from(pod_cidr.network()) + 1);
    serde_json::json!({
        "cniVersion": crate::cni::CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": pod_cidr.to_string(), "gateway": gateway.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    })
}

/// One container as the runtime runs it, for the harness to look at.
#[derive(Clone, Debug)]
pub struct ContainerView {
    pub process: Option<ProcessInfo>,
    pub restart_count: u32,
    /// The launch spec of its current process (what `exec` reuses).
    pub launch: Option<PathBuf>,
}

/// A pod as the runtime runs it, for the harness to look at.
#[derive(Clone, Debug)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's own namespace (`None`: host network, or not built yet).
    pub netns: Option<NetNs>,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    pub containers: BTreeMap<String, ContainerView>,
    /// `<node fs>/var/lib/kubelet/pods/<uid>`.
    pub dir: PathBuf,
}

/// One step of a pod's life, in the order the runtime took it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub namespace: String,
    pub pod: String,
    pub step: String,
}

/// The most journal entries a node keeps.
const JOURNAL_LIMIT: usize = 10_000;

/// What the node's threads share.
pub(crate) struct Shared {
    pub spec: NodeSpec,
    pub fs: PathBuf,
    pub run: RunHandle,
    pub binaries: Binaries,
    pub container_init: PathBuf,
    pub client: kube::Client,
    pub handle: tokio::runtime::Handle,
    pub timings: NodeTimings,
    /// The kubelet server's port (0: none), reported in the Node's status.
    pub kubelet_port: u16,
    /// What pods' resolv.conf say.
    pub dns: dns::PodDns,
    /// Node-private paths (as the node sees them) a CNI plugin's view gets.
    pub node_paths: Mutex<BTreeSet<PathBuf>>,
    pub pods: Mutex<BTreeMap<String, pod::PodEntry>>,
    pub journal: Mutex<Vec<JournalEntry>>,
    /// Set when the runtime stops: pod threads end without touching their
    /// pods (the run removes those).
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn note(&self, namespace: &str, pod: &str, step: String) {
        tracing::info!(node = %self.spec.name, pod = %format!("{namespace}/{pod}"), "{step}");
        let mut journal = Shared::lock(&self.journal);
        if journal.len() >= JOURNAL_LIMIT {
            // The oldest half goes: a long run keeps its recent history.
            journal.drain(..JOURNAL_LIMIT / 2);
        }
        journal.push(JournalEntry {
            namespace: namespace.into(),
            pod: pod.into(),
            step,
        });
    }

    /// Runs an API call from the calling thread, which must live in the
    /// node's namespace (a pod's thread does), bounded by `api_timeout`.
    pub fn api<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, String> {
        if self.is_stopping() {
            return Err(format!("{what}: the node runtime is stopping"));
        }
        let timeout = self.timings.api_timeout;
        self.handle
            .block_on(async { tokio::time::timeout(timeout, fut).await })
            .map_err(|_| format!("{what}: no answer within {timeout:?}"))?
            .map_err(|e| format!("{what}: {e}"))
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.fs.join("etc/cni/net.d")
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn cni_bin_dir(&self) -> PathBuf {
        self.fs.join("opt/cni/bin")
    }

    /// Where pod `namespace/name` (with `uid`, if given) of this node is
    /// reached: its address (the node's for `hostNetwork`) and network
    /// namespace (none for `hostNetwork`), or why not.
    pub fn pod_target(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<server::PodTarget, String> {
        let node = &self.spec.name;
        let found = Shared::lock(&self.pods)
            .iter()
            .find_map(|(pod_uid, entry)| {
                let view = Shared::lock(&entry.view);
                (view.namespace == namespace
                    && view.name == name
                    && uid.is_none_or(|u| u == pod_uid))
                .then(|| {
                    let ip = view.ip.or(view.host_network.then_some(self.spec.ip))?;
                    let netns = if view.host_network {
                        None
                    } else {
                        Some(view.netns.clone()?)
                    };
                    Some(server::PodTarget { ip, netns })
                })
            });
        match found {
            Some(Some(target)) => Ok(target),
            Some(None) => Err(format!(
                "pod {namespace}/{name} on node {node} has no address yet"
            )),
            None => Err(match uid {
                Some(uid) => {
                    format!("pod {namespace}/{name} (uid {uid}) is not running on node {node}")
                }
                None => format!("pod {namespace}/{name} is not running on node {node}"),
            }),
        }
    }
}

/// A running node runtime. Dropping it stops its threads; the pods'
/// processes and namespaces belong to the run, which removes them.
pub struct NodeRuntime {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    kube_proxy: Option<ProcessInfo>,
}

impl std::fmt::Debug for NodeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRuntime")
            .field("node", &self.shared.spec.name)
            .finish()
    }
}

/// Paths under the node's filesystem the runtime creates.
const NODE_DIRS: &[&str] = &[
    "etc/cni/net.d",
    "opt/cni/bin",
    "var/lib/cni",
    "var/lib/kubelet/pods",
];

impl NodeRuntime {
    /// Prepares the node's filesystem and CNI configuration, registers the
    /// Node (Ready), starts kube-proxy and waits for its first rules, and
    /// starts watching the node's pods. `progress` hears each step.
    pub fn start(
        run: &RunHandle,
        config: NodeConfig,
        progress: &dyn Fn(&str),
    ) -> Result<NodeRuntime, NodeError> {
        let name = config.node.name.clone();
        let io = |what: String| {
            let node = name.clone();
            move |source| NodeError::Io { node, what, source }
        };
        let fs_root = run.dir().join("nodes").join(&name).join("fs");
        for d in NODE_DIRS {
            let dir = fs_root.join(d);
            std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        }
        for (plugin, binary) in &config.cni_plugins {
            let link = fs_root.join("opt/cni/bin").join(plugin);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(binary, &link).map_err(io(format!(
                "link {} to {}",
                link.display(),
                binary.display()
            )))?;
        }
        let conflist = fs_root.join("etc/cni/net.d").join(PRIMARY_CONFLIST);
        let text = serde_json::to_vec_pretty(&primary_conflist(config.node.pod_cidr))
            .expect("a conflist serializes");
        crate::run::write_atomic(&conflist, &text)?;
        let container_init = config.binaries.get("e2e", "container-init")?;

        progress(&format!(
            "{name}: connecting to the API server as system:node:{name}"
        ));
        let runtime = node_tokio_runtime(&config.node.netns, &name)
            .map_err(io("start the node's tokio runtime".to_string()))?;
        let client = on_node(
            &runtime,
            client_from(config.kubeconfig.clone(), name.clone()),
        )?;
        // The kubelet server's socket, made on a runtime thread: in the
        // node's namespace.
        let kubelet = match &config.kubelet_server {
            Some(tls) => {
                let tls = server::tls_config(tls).map_err(|e| NodeError::Io {
                    node: name.clone(),
                    what: "the kubelet server's TLS configuration".into(),
                    source: std::io::Error::other(e),
                })?;
                let addr = std::net::SocketAddr::from((config.node.ip, server::KUBELET_PORT));
                let node = name.clone();
                let listener = on_node(&runtime, async move {
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|source| NodeError::Io {
                            node,
                            what: format!("listen on {addr} (the kubelet server)"),
                            source,
                        })
                })?;
                Some((listener, tls))
            }
            None => None,
        };
        let node_paths: BTreeSet<PathBuf> = ["/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let shared = Arc::new(Shared {
            spec: config.node.clone(),
            fs: fs_root,
            run: run.clone(),
            binaries: config.binaries.clone(),
            container_init,
            client,
            handle: runtime.handle().clone(),
            timings: config.timings.clone(),
            dns: config.dns.clone(),
            kubelet_port: if kubelet.is_some() {
                server::KUBELET_PORT
            } else {
                0
            },
            node_paths: Mutex::new(node_paths),
            pods: Mutex::new(BTreeMap::new()),
            journal: Mutex::new(Vec::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });

        if let Some((listener, tls)) = kubelet {
            progress(&format!(
                "{name}: kubelet server on https://{}:{} (port-forward)",
                config.node.ip,
                server::KUBELET_PORT
            ));
            let lookup = shared.clone();
            let pods: server::PodLookup =
                Arc::new(move |namespace, pod, uid| lookup.pod_target(namespace, pod, uid));
            runtime.spawn(server::serve(listener, tls, pods, name.clone()));
        }

        progress(&format!(
            "{name}: registering the Node (podCIDR {}, address {})",
            config.node.pod_cidr, config.node.ip
        ));
        let node_uid = on_node(
            &runtime,
            register::register(shared.clone(), config.kubelet_version.clone()),
        )?;
        runtime.spawn(register::heartbeat(
            shared.clone(),
            config.kubelet_version.clone(),
            node_uid,
        ));

        let kube_proxy = match &config.kube_proxy {
            Some(kp) => {
                progress(&format!("{name}: starting kube-proxy (iptables mode)"));
                let p = kube_proxy::start(run, &config.node, kp, config.timings.kube_proxy_ready)?;
                Some(p)
            }
            None => None,
        };
        runtime.spawn(pod::watch_pods(shared.clone()));
        progress(&format!("{name}: Ready; watching its pods"));
        Ok(NodeRuntime {
            shared,
            runtime: Some(runtime),
            kube_proxy,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.spec.name
    }

    /// The node's filesystem (`<run dir>/nodes/<node>/fs`).
    pub fn fs_root(&self) -> &Path {
        &self.shared.fs
    }

    /// The node's CNI configuration directory (`/etc/cni/net.d` of the node).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.shared.cni_conf_dir()
    }

    /// The node's CNI plugin directory (`/opt/cni/bin` of the node).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.shared.cni_bin_dir()
    }

    pub fn kube_proxy(&self) -> Option<&ProcessInfo> {
        self.kube_proxy.as_ref()
    }

    /// A pod this node runs.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodView> {
        Shared::lock(&self.shared.pods)
            .values()
            .map(|e| Shared::lock(&e.view).clone())
            .find(|v| v.namespace == namespace && v.name == name)
    }

    /// The steps the runtime took, in order (the latest 5,000 to 10,000).
    pub fn journal(&self) -> Vec<JournalEntry> {
        Shared::lock(&self.shared.journal).clone()
    }

    /// Runs `argv` in a container of a pod, as `kubectl exec` would: in the
    /// pod's network namespace, with the container's filesystem view and
    /// environment. Killed if it outlives `timeout`.
    pub fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output, NodeError> {
        let node = self.name().to_string();
        let view = self.pod(namespace, pod).ok_or_else(|| NodeError::NoPod {
            node: node.clone(),
            namespace: namespace.into(),
            name: pod.into(),
        })?;
        let no_container = || NodeError::NoContainer {
            node: node.clone(),
            namespace: namespace.into(),
            name: pod.into(),
            container: container.into(),
        };
        let launch_file = view
            .containers
            .get(container)
            .and_then(|c| c.launch.clone())
            .ok_or_else(no_container)?;
        let mut launch = launch::Launch::read(&launch_file).map_err(|_| no_container())?;
        launch.argv = argv.iter().map(|s| s.to_string()).collect();
        let exec_file = launch_file.with_file_name(format!(
            "exec-{}.json",
            crate::kube::node::pod::random_hex(8)
        ));
        launch.write(&exec_file)?;
        let netns = view
            .netns
            .clone()
            .unwrap_or_else(|| self.shared.spec.netns.clone());
        let mut cmd = netns.command(&self.shared.container_init);
        cmd.arg("--spec").arg(&exec_file);
        let out = netns.exec(cmd, timeout);
        let _ = std::fs::remove_file(&exec_file);
        Ok(out?)
    }

    /// Kills a running container of a pod at once (SIGKILL to its process
    /// and everything it started), as the kernel's OOM killer or a crash
    /// ends a container: the pod's worker sees the exit and restarts it per
    /// `restartPolicy` (kubelet's back-off). Returns the killed process.
    pub fn kill_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<ProcessInfo, NodeError> {
        let process = self
            .pod(namespace, pod)
            .and_then(|v| v.containers.get(container).cloned())
            .and_then(|c| c.process)
            .ok_or_else(|| NodeError::NoContainer {
                node: self.name().to_string(),
                namespace: namespace.into(),
                name: pod.into(),
                container: container.into(),
            })?;
        crate::process::kill_recorded(&process);
        Ok(process)
    }

    /// `client http URL` in container `client` of pod `namespace/pod` (the
    /// client image): the request's report, whether it succeeded or not.
    pub fn client_http(
        &self,
        namespace: &str,
        pod: &str,
        url: &str,
        timeout: Duration,
    ) -> Result<crate::apps::HttpReport, NodeError> {
        let out = self.exec(namespace, pod, "client", &["client", "http", url], timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).map_err(|source| NodeError::ClientReport {
            node: self.name().to_string(),
            namespace: namespace.into(),
            name: pod.into(),
            url: url.into(),
            source,
            stdout: stdout.into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Stops watching and heart-beating (the Node goes NotReady once its
    /// Lease expires); pods keep running until the run ends.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Each pod thread sees the flag at its next wake-up; waking them
        // now makes them end before the runtime goes.
        for entry in Shared::lock(&self.shared.pods).values() {
            let _ = entry.tx.send(pod::PodEvent::Wake);
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Starts a node runtime (with kube-proxy) on every node of a [`KubeRun`]:
/// each gets a client certificate for `system:node:<name>` in
/// `system:nodes` (what the Node authorizer and NodeRestriction expect of
/// a kubelet) and kube-proxy one for `system:kube-proxy`; the reference CNI
/// plugins come from the same build as the control plane. Returns once
/// every Node is Ready and every kube-proxy has programmed its rules.
///
/// [`KubeRun`]: super::KubeRun
pub fn start_nodes(
    kube: &super::KubeRun,
    binaries: &Binaries,
    timings: &NodeTimings,
    progress: &dyn Fn(&str),
) -> Result<Vec<NodeRuntime>, NodeError> {
    let cp = &kube.control_plane;
    let k8s = &cp.config.binaries;
    let proxy_kubeconfig = cp.write_kubeconfig(
        "kube-proxy",
        &super::ClientIdentity::new("system:kube-proxy", &[]),
    )?;
    let version = super::build::Recipe::default().kubernetes;
    let mut nodes = Vec::with_capacity(kube.topology.nodes.len());
    for node in &kube.topology.nodes {
        let kubeconfig = cp.write_kubeconfig(
            &format!("node-{}", node.name),
            &super::ClientIdentity::new(&format!("system:node:{}", node.name), &["system:nodes"]),
        )?;
        let config = NodeConfig {
            node: NodeSpec::from_topology(node),
            kubeconfig,
            cni_plugins: super::build::CNI_PLUGINS
                .iter()
                .map(|p| (p.to_string(), k8s.cni_plugin(p)))
                .collect(),
            kube_proxy: Some(KubeProxyConfig {
                binary: k8s.kube_proxy(),
                kubeconfig: proxy_kubeconfig.clone(),
                cluster_cidr: cp.config.cluster_cidr,
                service_cidr: cp.config.service_cidr,
            }),
            binaries: binaries.clone(),
            kubelet_version: version.clone(),
            kubelet_server: Some(kubelet_tls(cp, &node.name, node.ip)?),
            timings: timings.clone(),
            dns: dns::PodDns {
                cluster_dns: vec![IpAddr::V4(cluster_dns_ip(cp.config.service_cidr))],
                ..dns::PodDns::default()
            },
        };
        nodes.push(NodeRuntime::start(&kube.run.handle(), config, progress)?);
    }
    Ok(nodes)
}

/// The kubelet server's certificate for a node, from the cluster CA, and
/// the CA its clients (the API server) must be signed by.
fn kubelet_tls(
    cp: &super::ControlPlane,
    node: &str,
    ip: Ipv4Addr,
) -> Result<server::KubeletTls, NodeError> {
    let (cert_pem, key_pem) = cp.kubelet_serving_cert(node, ip)?;
    Ok(server::KubeletTls {
        cert_pem,
        key_pem,
        client_ca_pem: cp.ca_pem().to_string(),
    })
}

/// A multi-threaded tokio runtime whose every thread lives in `netns`, so
/// every connection the node makes (to the API server, probes) leaves from
/// the node.
fn node_tokio_runtime(netns: &NetNs, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let ns = netns.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("{name}-kubelet"))
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = ns.enter_current_thread() {
                // Nothing in this runtime can work from the wrong namespace.
                panic!("node runtime thread: {e}");
            }
        })
        .build()
}

/// Runs `fut` on one of the runtime's threads (in the node's namespace)
/// and waits for it: `block_on` alone would run it on the caller's thread,
/// whose connections would leave from the caller's namespace.
fn on_node<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, NodeError>> + Send + 'static,
) -> Result<T, NodeError> {
    runtime
        .block_on(runtime.spawn(fut))
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

/// A client from the node's kubeconfig.
async fn client_from(path: PathBuf, node: String) -> Result<kube::Client, NodeError> {
    let bad = |reason: String| NodeError::Kubeconfig {
        node: node.clone(),
        path: path.clone(),
        reason,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).map_err(|e| bad(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| bad(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_network_is_ptp_over_the_nodes_range() {
        let conf = primary_conflist("10.244.1.0/24".parse().unwrap());
        let list =
            crate::cni::NetworkConfigList::parse(Path::new(PRIMARY_CONFLIST), &conf.to_string())
                .unwrap();
        assert_eq!(list.name, NETWORK_NAME);
        assert_eq!(list.kind(0), "ptp");
        assert_eq!(conf["plugins"][0]["ipMasq"], false);
        let range = &conf["plugins"][0]["ipam"]["ranges"][0][0];
        assert_eq!(range["subnet"], "10.244.1.0/24");
        assert_eq!(range["gateway"], "10.244.1.1");
    }
}
