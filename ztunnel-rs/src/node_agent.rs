//! The node agent (`ztunnel-rs cni`): enrols the pods on its node into the
//! mesh. It learns pods' labels from a pod source and their sandboxes (netns,
//! IPs) from the CNI plugin (`istio-cni-rs`), installs the redirection rules
//! inside each enrolled pod's netns, and hands the pod to ztunnel over ZDS.
//!
//! Pods' labels come from the Kubernetes API, or in local mode
//! (`--config-dir`) from the YAML files istiod-rs reads. In the node's own
//! network namespace it keeps the rules that let kubelet's probes reach
//! enrolled pods uncaptured ([`host_probe`]). When it starts while pods run
//! (a restart, an upgrade) it finds their namespaces again ([`discovery`])
//! before ztunnel may have its snapshot. It serves its metrics on
//! `--monitoring-port` (`/metrics`) and its readiness on `--readiness-port`
//! (`/readyz`: 200 once running pods were taken back), as upstream's
//! istio-cni does.
//!
//! ```text
//! kube watch | config dir ──PodEvent──┐
//! istio-cni-rs ──────unix/JSON─────────┼─> NodeAgent ─iptables (in pod netns)
//!                                      │            ├─iptables + ipset (node netns: probes)
//!                                      │            └─ZDS (SOCK_SEQPACKET, netns fd)─> ztunnel-rs
//! ```

pub mod agent;
pub mod annotate;
pub mod cni_event;
pub mod cni_install;
pub mod cni_plugin;
pub mod discovery;
pub mod enrolment;
pub mod host_probe;
pub mod iptables;
pub mod pods;
pub mod zds_server;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use agent::{AgentConfig, AgentError, AgentHandle, AgentMetrics, NodeAgent};
pub use enrolment::{Enrolment, NamespaceMeta, PodKey, PodMeta};
pub use pods::{MemoryPodSource, PodEvent, PodSource};
pub use zds_server::{ZdsPod, ZdsServer, ZdsServerError};

use crate::inpod::seqpacket::SeqpacketListener;

/// Flags of `ztunnel-rs cni`.
#[derive(clap::Args, Clone, Debug)]
pub struct CniArgs {
    /// Where ztunnel connects for ZDS.
    #[arg(long, env = "ZDS_SOCKET", default_value = crate::inpod::zds::DEFAULT_ZDS_SOCKET)]
    pub zds_socket: PathBuf,
    /// Where the CNI plugin reaches the agent (`agent_socket` in its netconf).
    #[arg(
        long,
        visible_alias = "plugin-socket",
        env = "CNI_EVENT_SOCKET",
        default_value = cni_event::DEFAULT_CNI_EVENT_SOCKET
    )]
    pub cni_socket: PathBuf,
    /// This node's name: only its pods are watched.
    #[arg(long, visible_alias = "node", env = "NODE_NAME")]
    pub node_name: String,
    /// Local mode: read pods and namespaces from the YAML files of this
    /// directory (the one istiod-rs reads) instead of the Kubernetes API.
    #[arg(long, env = "CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Local mode: largest --config-dir file read, in bytes; a larger one is
    /// reported and keeps its last good pods and namespaces.
    #[arg(long, env = "MAX_CONFIG_FILE_SIZE", default_value_t = api::manifest::DEFAULT_MAX_FILE_SIZE)]
    pub max_config_file_size: u64,
    /// Redirect pods' DNS (port 53, UDP and TCP) to ztunnel's DNS proxy
    /// (15053). On by default, as upstream's `ISTIO_META_DNS_CAPTURE`;
    /// `DNS_CAPTURE` is read when that is unset. ztunnel-rs must run its
    /// DNS proxy too (its own `--dns-capture`, on by default).
    #[arg(long, env = crate::dns::CAPTURE_ENV, default_value_t = crate::dns::capture_default(),
          action = clap::ArgAction::Set)]
    pub dns_capture: bool,
    /// Install the IPv6 rules as well.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,
    /// iptables binary: `iptables` (the distribution's default backend),
    /// `iptables-nft` or `iptables-legacy`.
    #[arg(long, env = "IPTABLES", default_value = "iptables")]
    pub iptables: String,
    /// ipset binary, for the node's set of enrolled pods that kubelet probes.
    #[arg(long, env = "IPSET", default_value = "ipset")]
    pub ipset: String,
    /// Port of `/metrics` (upstream istio-cni's `--monitoring-port`).
    #[arg(long, env = "MONITORING_PORT", default_value_t = DEFAULT_MONITORING_PORT)]
    pub monitoring_port: u16,
    /// Port of `/readyz`.
    #[arg(long, env = "READINESS_PORT", default_value_t = DEFAULT_READINESS_PORT)]
    pub readiness_port: u16,
    /// procfs where running pods' processes are looked for when the agent
    /// starts (a host mount when it runs in a container).
    #[arg(long, env = "PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,
    /// Directories of network namespace bind mounts looked in when the agent
    /// starts (repeat the flag for several).
    #[arg(long = "netns-dir", env = "NETNS_DIRS", value_delimiter = ',', default_values = ["/run/netns", "/var/run/netns"])]
    pub netns_dirs: Vec<PathBuf>,
    /// Seconds to wait for ztunnel's Ack of each pod.
    #[arg(long, default_value_t = 10)]
    pub ack_timeout_secs: u64,
    /// Seconds a CNI ADD waits for its pod to appear in the watch.
    #[arg(long, default_value_t = 10)]
    pub pod_wait_secs: u64,
    /// Seconds between checks for sandboxes gone without a CNI DEL (and for
    /// the namespaces of pods not found on start).
    #[arg(long, default_value_t = 10)]
    pub sweep_secs: u64,
    /// The node's CNI configuration directory, as mounted here: when set,
    /// the agent chains istio-cni-rs into the configuration the runtime
    /// uses and keeps it chained (upstream's install-cni).
    #[arg(
        long,
        env = "MOUNTED_CNI_NET_DIR",
        value_name = "DIR",
        requires = "cni_bin_dir"
    )]
    pub cni_conf_dir: Option<PathBuf>,
    /// The node's CNI binary directory, as mounted here: istio-cni-rs is
    /// copied into it.
    #[arg(long, env = "CNI_BIN_DIR", value_name = "DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Chain into this file of --cni-conf-dir rather than the one the
    /// runtime uses (the first that loads, by name).
    #[arg(long, env = "CNI_CONF_NAME")]
    pub cni_conf_name: Option<String>,
    /// The istio-cni-rs binary to install (default: next to this binary).
    #[arg(long, env = "CNI_PLUGIN_BINARY", value_name = "FILE")]
    pub cni_plugin_binary: Option<PathBuf>,
    /// Namespaces whose pods the plugin lets start without asking the
    /// agent, comma-separated (upstream's EXCLUDED_NAMESPACES).
    #[arg(
        long,
        env = "EXCLUDED_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub excluded_namespaces: Vec<String>,
    /// The agent's own DaemonSet: on SIGTERM, while it exists the CNI plugin
    /// stays chained (an upgrade); once it is gone the plugin is taken out.
    #[arg(long, env = "DAEMONSET_NAME", default_value = "istio-cni-node")]
    pub daemonset_name: String,
    /// The namespace of the agent's DaemonSet.
    #[arg(long, env = "POD_NAMESPACE", default_value = api::labels::DEFAULT_ROOT_NAMESPACE)]
    pub pod_namespace: String,
}

impl CniArgs {
    /// The CNI installer's configuration, when --cni-conf-dir asks for one.
    fn cni_install(&self) -> anyhow::Result<Option<cni_install::CniInstallConfig>> {
        let (Some(conf_dir), Some(bin_dir)) = (&self.cni_conf_dir, &self.cni_bin_dir) else {
            return Ok(None);
        };
        let plugin_binary = match &self.cni_plugin_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("finding this binary's directory, where istio-cni-rs is")?
                .with_file_name(cni_install::PLUGIN_BINARY),
        };
        Ok(Some(cni_install::CniInstallConfig {
            conf_dir: conf_dir.clone(),
            bin_dir: bin_dir.clone(),
            plugin_binary,
            conf_name: self.cni_conf_name.clone(),
            agent_socket: self.cni_socket.clone(),
            exclude_namespaces: self
                .excluded_namespaces
                .iter()
                .filter(|n| !n.is_empty())
                .cloned()
                .collect(),
        }))
    }
}

/// Upstream istio-cni's default monitoring port.
pub const DEFAULT_MONITORING_PORT: u16 = 15014;
/// Upstream istio-cni's readiness port (`/readyz`).
pub const DEFAULT_READINESS_PORT: u16 = 8000;

/// Runs the node agent until it fails: in local mode with `--config-dir`,
/// otherwise against the Kubernetes API.
pub async fn run(args: CniArgs) -> anyhow::Result<()> {
    let redirection = iptables::RedirectionConfig {
        dns_capture: args.dns_capture,
        ipv6: args.ipv6,
        iptables: args.iptables.clone(),
        ipset: args.ipset.clone(),
        ..iptables::RedirectionConfig::default()
    };
    let installer = args.cni_install()?.map(cni_install::CniInstaller::new);
    let backend = iptables::version(&redirection).context("checking the iptables binary")?;
    info!(%backend, binary = %args.iptables, "in-pod rules will be installed with this iptables");

    let mut registry = proxy_core::metrics::new_registry();
    let (kube, source) = match args.config_dir {
        Some(dir) if !dir.is_dir() => anyhow::bail!(
            "--config-dir {}: not a directory; point it at the directory istiod-rs reads",
            dir.display()
        ),
        Some(dir) => (
            None,
            Pods::Directory(
                pods::directory::DirectoryPodSource::new(dir, args.node_name)
                    .with_reading(api::manifest::FileReading {
                        max_file_size: args.max_config_file_size,
                        ..Default::default()
                    })
                    .with_metrics(pods::directory::ConfigFileMetrics::register(&mut registry)),
            ),
        ),
        None => {
            let client = kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (in-cluster config or KUBECONFIG); use --config-dir DIR for local mode",
            )?;
            let source = pods::kube::KubePodSource::new(client.clone(), args.node_name);
            (Some(client), Pods::Kube(source))
        }
    };
    let (zds, acked) = ZdsServer::new(Duration::from_secs(args.ack_timeout_secs));
    let zds_listener = SeqpacketListener::bind(&args.zds_socket)
        .with_context(|| format!("binding the ZDS socket {}", args.zds_socket.display()))?;
    let cni_listener = cni_event::bind(&args.cni_socket)
        .with_context(|| format!("binding the CNI event socket {}", args.cni_socket.display()))?;

    let metrics = AgentMetrics::register(&mut registry);
    zds.register_metrics(&mut registry);
    let monitoring = listen(args.monitoring_port, "/metrics (--monitoring-port)").await?;
    let readiness = listen(args.readiness_port, "/readyz (--readiness-port)").await?;

    let config = AgentConfig {
        redirection,
        pod_wait: Duration::from_secs(args.pod_wait_secs),
        sweep_interval: Duration::from_secs(args.sweep_secs),
        node_netns: None,
        discovery: discovery::DiscoveryConfig {
            proc_dir: args.proc_dir,
            netns_dirs: args.netns_dirs,
        },
    };
    let kube_client = kube.clone();
    let agent = NodeAgent::new(config, zds.clone(), kube).with_metrics(metrics);
    let handle = agent.handle();
    let stats = proxy_core::admin::stats_router(Arc::new(registry));
    let (chained, cni_chained) = tokio::sync::watch::channel(false);
    let ready = axum::Router::new()
        .route("/readyz", axum::routing::get(readyz))
        .with_state(Readiness {
            agent: agent.readiness(),
            cni_chained: installer.as_ref().map(|_| cni_chained),
        });
    // The plugin is chained only now that its socket is bound: a pod
    // created from here on reaches the agent (and waits for its pod
    // source's first listing, not for a connection refused).
    let installing = CancellationToken::new();
    let install = async {
        match &installer {
            Some(installer) => installer.run(chained, installing.clone()).await,
            None => std::future::pending().await,
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    // Its own task: on uninstall it still releases the pods after the
    // servers below are gone.
    let mut agent_task = tokio::spawn(agent.run(source, acked));
    let stopping = Stopping {
        installer: installer.as_ref(),
        kube: kube_client.as_ref(),
        namespace: &args.pod_namespace,
        daemonset: &args.daemonset_name,
        agent: &handle,
    };
    let stopped = tokio::select! {
        r = zds.serve(zds_listener) => r.context("ZDS server stopped"),
        r = cni_event::serve(cni_listener, handle.clone()) => r.context("CNI event server stopped"),
        r = axum::serve(monitoring, stats) => r.context("the /metrics server stopped"),
        r = axum::serve(readiness, ready) => r.context("the /readyz server stopped"),
        r = &mut agent_task => match r {
            Ok(r) => r.context("node agent stopped"),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        },
        r = install => r.context("CNI installer stopped"),
        _ = sigterm.recv() => {
            info!("SIGTERM: stopping");
            return stopping.stop().await;
        }
        _ = tokio::signal::ctrl_c() => {
            info!("SIGINT: stopping");
            return stopping.stop().await;
        }
    };
    installing.cancel();
    agent_task.abort();
    stopped
}

/// What the agent looks at and acts on when it is told to stop.
struct Stopping<'a> {
    installer: Option<&'a cni_install::CniInstaller>,
    kube: Option<&'a kube::Client>,
    namespace: &'a str,
    daemonset: &'a str,
    agent: &'a AgentHandle,
}

impl Stopping<'_> {
    /// On SIGTERM: through an upgrade or a reboot the CNI plugin stays
    /// chained and the pods stay captured; when the mesh is uninstalled the
    /// plugin is taken out (with its binary), then the running pods are
    /// released and the node's rules removed ([`AgentHandle::uninstall`]).
    /// When that cannot be told, the plugin comes out and the pods stay
    /// captured.
    async fn stop(self) -> anyhow::Result<()> {
        let Stopping {
            installer,
            kube,
            namespace,
            daemonset,
            agent,
        } = self;
        if installer.is_none() && kube.is_none() {
            return Ok(());
        }
        let decision = cni_install::on_shutdown(kube, namespace, daemonset).await;
        if decision == cni_install::OnShutdown::Keep {
            info!(%namespace, %daemonset, "the DaemonSet remains (upgrade or reboot): istio-cni-rs stays chained and the pods captured; new pods wait for the next agent");
            return Ok(());
        }
        if let Some(installer) = installer {
            let files = installer
                .uninstall()
                .context("taking istio-cni-rs out of the node's CNI configuration")?;
            info!(?files, "istio-cni-rs uninstalled from this node");
        }
        if decision == cni_install::OnShutdown::Uninstall {
            agent
                .uninstall()
                .await
                .context("releasing the node's pods on uninstall")?;
        }
        Ok(())
    }
}

async fn listen(port: u16, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for {what}"))?;
    info!(%addr, "serving {what}");
    Ok(listener)
}

/// What `/readyz` waits for.
#[derive(Clone)]
struct Readiness {
    /// The pods that ran before the agent started are taken back.
    agent: tokio::sync::watch::Receiver<bool>,
    /// With the CNI installer: the plugin is chained.
    cni_chained: Option<tokio::sync::watch::Receiver<bool>>,
}

async fn readyz(
    axum::extract::State(ready): axum::extract::State<Readiness>,
) -> (http::StatusCode, &'static str) {
    if !*ready.agent.borrow() {
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "not ready: taking back the pods that ran before the agent started\n",
        )
    } else if ready.cni_chained.as_ref().is_some_and(|c| !*c.borrow()) {
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "not ready: istio-cni-rs is not chained into the node's CNI configuration yet (the log says why)\n",
        )
    } else {
        (http::StatusCode::OK, "ready\n")
    }
}

/// Where `ztunnel-rs cni` learns its pods.
enum Pods {
    Kube(pods::kube::KubePodSource),
    Directory(pods::directory::DirectoryPodSource),
}

impl PodSource for Pods {
    async fn run(
        self,
        events: tokio::sync::mpsc::Sender<PodEvent>,
    ) -> Result<(), pods::PodSourceError> {
        match self {
            Pods::Kube(source) => source.run(events).await,
            Pods::Directory(source) => source.run(events).await,
        }
    }
}
