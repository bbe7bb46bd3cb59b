//! The node agent's brain: joins what the pod source says (labels) with what
//! the CNI plugin says (sandboxes: netns path, IPs), decides enrolment, and
//! for each pod whose answer changes installs or removes the in-pod rules and
//! tells ztunnel over ZDS.
//!
//! One task owns all state and handles one event at a time (pod source,
//! plugin requests, ztunnel acks, the periodic sandbox sweep), so decisions
//! never race. Every sandbox the plugin reported is remembered, enrolled or
//! not, so a pod enrolled later by a label change can still be captured.
//!
//! Starting (also after a crash or an upgrade, while pods keep running):
//! 1. the node's kubelet-probe rules are installed ([`super::host_probe`]);
//! 2. the pod source's first complete listing is awaited (pods and
//!    namespaces), CNI requests waiting meanwhile;
//! 3. the enrolled pods' network namespaces are rediscovered
//!    ([`super::discovery`]), their in-pod rules refreshed and each handed to
//!    the ZDS server; an enrolled pod whose namespace is not found is logged,
//!    counted (`istio_node_agent_pods_without_netns`) and kept: ztunnel is told
//!    to keep what it runs for it (fail closed: its traffic stays captured,
//!    and fails if ztunnel has nothing for it), and it is looked for again at
//!    every sweep;
//! 4. the node's probe set is reconciled with those pods;
//! 5. only then may ztunnel have its snapshot (the ZDS server held it back
//!    since [`NodeAgent::new`]), so a restarted agent never makes ztunnel drop
//!    a pod it has not finished looking for.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use api::zds::WorkloadInfo;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::annotate;
use super::cni_event::{CniHandler, CniPod, CniReply, CniRequest};
use super::discovery::{self, DiscoveryConfig, DiscoveryError, FoundNetns, WantedPod};
use super::enrolment::{self, Enrolment, NamespaceMeta, PodKey, PodMeta};
use super::host_probe::{self, HostProbeError, ProbeEntry};
use super::iptables::{self, IptablesError, RedirectionConfig};
use super::pods::{PodEvent, PodSource, PodSourceError};
use super::zds_server::{ZdsPod, ZdsServer, ZdsServerError};
use crate::inpod::{Netns, NetnsError};

/// Errors of the node agent: enrolling or unenrolling a pod, or starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("pod {0}: its network namespace is gone: {1}")]
    SandboxGone(PodKey, NetnsError),
    #[error("pod {0}: cannot work inside its network namespace: {1}")]
    Netns(PodKey, NetnsError),
    #[error("pod {0}: cannot install the redirection rules: {1}")]
    Rules(PodKey, IptablesError),
    #[error("pod {0}: rules are in place but ztunnel has not taken the pod: {1}")]
    Ztunnel(PodKey, ZdsServerError),
    #[error(
        "pod {0} is not known to the node agent's pod source (waited {1:?}); cannot tell whether it is enrolled"
    )]
    UnknownPod(PodKey, Duration),
    #[error("pod {0} should be captured but is not")]
    NotCaptured(PodKey),
    #[error(
        "cannot install the node's kubelet-probe rules (chain ISTIO_POSTRT, sets istio-inpod-probes-v4/-v6): {0}"
    )]
    HostProbe(HostProbeError),
    #[error("cannot work inside the node's network namespace: {0}")]
    NodeNetns(NetnsError),
    #[error("the pod source failed: {0}")]
    Source(#[from] PodSourceError),
    #[error("the node agent has stopped")]
    Stopped,
}

/// Settings of the agent's decisions.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub redirection: RedirectionConfig,
    /// How long a plugin ADD waits for its pod to show up in the pod source.
    pub pod_wait: Duration,
    /// How often sandboxes are checked for having gone away (and pods kept
    /// without a namespace looked for again).
    pub sweep_interval: Duration,
    /// The node's network namespace, where the kubelet-probe rules live;
    /// `None`: the agent's own.
    pub node_netns: Option<Netns>,
    /// Where running pods' namespaces are looked for on start.
    pub discovery: DiscoveryConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            redirection: RedirectionConfig::default(),
            pod_wait: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(10),
            node_netns: None,
            discovery: DiscoveryConfig::default(),
        }
    }
}

/// The agent's metrics (registered with the `istio_` prefix).
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// Enrolled pods whose namespace the agent has not found (kept).
    pods_without_netns: Gauge,
    /// Pods the agent found running and took back when it last started.
    rediscovered_pods: Gauge,
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AgentMetrics::default();
        registry.register(
            "node_agent_pods_without_netns",
            "Enrolled pods of this node whose network namespace the node agent cannot find; ztunnel keeps what it runs for them",
            metrics.pods_without_netns.clone(),
        );
        registry.register(
            "node_agent_rediscovered_pods",
            "Running enrolled pods the node agent found and took back when it last started",
            metrics.rediscovered_pods.clone(),
        );
        metrics
    }
}

/// A sandbox reported by the plugin, or found running on start.
#[derive(Clone, Debug)]
struct Sandbox {
    /// `None` for a sandbox found on start rather than reported by an ADD.
    container_id: Option<String>,
    netns_path: PathBuf,
    uid: Option<String>,
    ips: Vec<IpAddr>,
}

/// A pod whose rules are installed and which was handed to ztunnel.
#[derive(Clone, Debug)]
struct Captured {
    netns: Netns,
    uid: String,
    acked: bool,
    /// Its addresses are in the node's probe set.
    probed: bool,
}

#[derive(Debug, Default)]
struct PodRecord {
    meta: Option<PodMeta>,
    sandbox: Option<Sandbox>,
    captured: Option<Captured>,
    /// Enrolled, but its namespace was not found on start: the uid ztunnel
    /// is told to keep.
    kept: Option<String>,
}

impl PodRecord {
    /// The pod's addresses: the plugin's, else the pod source's.
    fn ips(&self) -> Vec<IpAddr> {
        match &self.sandbox {
            Some(s) if !s.ips.is_empty() => s.ips.clone(),
            _ => self
                .meta
                .as_ref()
                .map(|m| m.ips.clone())
                .unwrap_or_default(),
        }
    }
}

enum Message {
    Cni(CniRequest, oneshot::Sender<CniReply>),
    AddWaitOver(PodKey, String),
    Sweep(oneshot::Sender<()>),
    Uninstall(oneshot::Sender<()>),
}

struct WaitingAdd {
    pod: CniPod,
    reply: oneshot::Sender<CniReply>,
}

/// A handle on a running agent: answers the CNI plugin, triggers sweeps.
#[derive(Clone, Debug)]
pub struct AgentHandle {
    tx: mpsc::Sender<Message>,
}

impl AgentHandle {
    /// Checks every sandbox for having gone away now, and waits for it.
    pub async fn sweep(&self) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Message::Sweep(tx))
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)
    }

    /// The mesh is being uninstalled from the node: lets every pod go and
    /// clears the node (see [`NodeAgent::run`]), then the agent stops.
    /// Returns once that is done.
    pub async fn uninstall(&self) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Message::Uninstall(tx))
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)
    }
}

impl CniHandler for AgentHandle {
    async fn handle(&self, request: CniRequest) -> CniReply {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Cni(request, tx)).await.is_err() {
            return CniReply::error(AgentError::Stopped.to_string());
        }
        rx.await
            .unwrap_or_else(|_| CniReply::error(AgentError::Stopped.to_string()))
    }
}

type SourceTask = JoinHandle<Result<(), PodSourceError>>;

/// The node agent.
pub struct NodeAgent {
    config: AgentConfig,
    zds: ZdsServer,
    kube: Option<kube::Client>,
    metrics: AgentMetrics,
    pods: BTreeMap<PodKey, PodRecord>,
    namespaces: BTreeMap<String, NamespaceMeta>,
    waiting: BTreeMap<PodKey, Vec<WaitingAdd>>,
    /// True once running pods were taken back and ztunnel may connect.
    ready: watch::Sender<bool>,
    tx: mpsc::Sender<Message>,
    rx: mpsc::Receiver<Message>,
}

impl NodeAgent {
    /// `kube`: in Kubernetes mode, the client that annotates pods. From now
    /// on `zds` holds snapshots back until [`Self::run`] has rediscovered the
    /// pods.
    pub fn new(config: AgentConfig, zds: ZdsServer, kube: Option<kube::Client>) -> Self {
        zds.hold_snapshots();
        let (tx, rx) = mpsc::channel(64);
        NodeAgent {
            config,
            zds,
            kube,
            metrics: AgentMetrics::default(),
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            waiting: BTreeMap::new(),
            ready: watch::Sender::new(false),
            tx,
            rx,
        }
    }

    /// Becomes true once the agent has taken back the pods that ran before
    /// it started and serves ztunnel and the CNI plugin (upstream's
    /// `/readyz`).
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Reports into `metrics` (see [`AgentMetrics::register`]).
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            tx: self.tx.clone(),
        }
    }

    /// Runs until the pod source fails, or until [`AgentHandle::uninstall`]:
    /// then every pod the agent captured or kept is let go while it keeps
    /// running (its in-pod rules removed, its annotation removed, ztunnel
    /// told) and the node's probe chain and sets are removed. Upstream's
    /// agent removes only the node's rules and set on uninstall (istio/istio
    /// `cni/pkg/nodeagent/meshdataplane_linux.go` `meshDataplane.Stop`;
    /// `NetServer.Stop` leaves in-pod rules) and so leaves running pods
    /// redirected to a ztunnel that is gone; here their traffic flows again,
    /// in plaintext. `acked` is the ZDS server's stream of pods ztunnel has
    /// acked.
    pub async fn run(
        mut self,
        source: impl PodSource,
        mut acked: mpsc::UnboundedReceiver<String>,
    ) -> Result<(), AgentError> {
        let (events_tx, mut events) = mpsc::channel(256);
        let mut source = tokio::spawn(source.run(events_tx));
        self.on_node(host_probe::install)
            .await?
            .map_err(AgentError::HostProbe)?;
        info!(
            chain = host_probe::CHAIN_POSTROUTING,
            set = host_probe::PROBE_SET,
            "kubelet-probe rules installed in the node's network namespace"
        );
        let mut source_done = self.until_listed(&mut source, &mut events).await?;
        self.rediscover().await;
        self.zds.release_snapshots();
        self.ready.send_replace(true);
        let mut sweep = tokio::time::interval(self.config.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; rediscovery just looked.
        sweep.tick().await;
        loop {
            tokio::select! {
                result = &mut source, if !source_done => {
                    source_done = true;
                    source_ended(result)?;
                }
                Some(event) = events.recv() => self.on_pod_event(event).await,
                Some(message) = self.rx.recv() => {
                    if let Message::Uninstall(done) = message {
                        self.uninstall().await;
                        let _ = done.send(());
                        return Ok(());
                    }
                    self.on_message(message).await
                }
                Some(uid) = acked.recv() => self.on_acked(uid).await,
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    /// Takes in the source's events until it has listed both pods and
    /// namespaces once; Ok(true) if the source ended meanwhile.
    async fn until_listed(
        &mut self,
        source: &mut SourceTask,
        events: &mut mpsc::Receiver<PodEvent>,
    ) -> Result<bool, AgentError> {
        let (mut pods_listed, mut namespaces_listed) = (false, false);
        let mut reminder = tokio::time::interval(Duration::from_secs(10));
        reminder.tick().await;
        while !(pods_listed && namespaces_listed) {
            tokio::select! {
                result = &mut *source => {
                    source_ended(result)?;
                    while let Ok(event) = events.try_recv() {
                        self.absorb(event);
                    }
                    return Ok(true);
                }
                Some(event) = events.recv() => {
                    match &event {
                        PodEvent::PodsListed(_) => pods_listed = true,
                        PodEvent::NamespacesListed(_) => namespaces_listed = true,
                        _ => {}
                    }
                    self.absorb(event);
                }
                _ = reminder.tick() => info!(
                    pods_listed,
                    namespaces_listed,
                    "waiting for the pod source's first listing before taking back running pods; ztunnel keeps its pods meanwhile"
                ),
            }
        }
        Ok(false)
    }

    /// Records what the source says, deciding nothing yet (before
    /// rediscovery, the agent has no sandbox to act on).
    fn absorb(&mut self, event: PodEvent) {
        match event {
            PodEvent::Pod(meta) => {
                let key = meta.key();
                self.pods.entry(key).or_default().meta = Some(meta);
            }
            PodEvent::PodDeleted(key) => {
                self.pods.remove(&key);
            }
            PodEvent::PodsListed(keys) => self.pods.retain(|k, _| keys.contains(k)),
            PodEvent::Namespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns);
            }
            PodEvent::NamespaceDeleted(name) => {
                self.namespaces.remove(&name);
            }
            PodEvent::NamespacesListed(names) => self.namespaces.retain(|n, _| names.contains(n)),
        }
    }

    /// Takes back the enrolled pods that run on the node: finds their
    /// namespaces, refreshes their rules, hands them to the ZDS server, and
    /// reconciles the probe set.
    async fn rediscover(&mut self) {
        let wanted = self.wanted(|r| r.sandbox.is_none() && r.captured.is_none());
        let mut rediscovered = 0;
        for (key, found) in self.discover(wanted).await {
            match found {
                Ok(found) => {
                    self.found_sandbox(&key, found);
                    match self.capture(&key).await {
                        // No ztunnel may connect before the snapshot is
                        // released: the pod goes in it.
                        Ok(()) | Err(AgentError::Ztunnel(_, ZdsServerError::NoZtunnel)) => {
                            rediscovered += 1
                        }
                        Err(error) => {
                            warn!(%error, "a running pod could not be taken back; ztunnel keeps what it runs for it");
                            self.keep(&key);
                        }
                    }
                }
                Err(DiscoveryError::NoAddress(_)) => {
                    debug!(pod = %key, "enrolled pod without an address yet: its sandbox's CNI ADD will bring it")
                }
                Err(reason) => {
                    warn!(
                        pod = %key,
                        %reason,
                        "enrolled pod's network namespace not found; ztunnel keeps what it runs for it (its traffic stays captured, or fails if ztunnel has nothing for it); looked for again every sweep"
                    );
                    self.keep(&key);
                }
            }
        }
        self.metrics.rediscovered_pods.set(rediscovered);
        self.count_kept();
        self.reconcile_probe_set().await;
        info!(
            rediscovered,
            kept = self.metrics.pods_without_netns.get(),
            "running pods taken back; ztunnel may have its snapshot"
        );
    }

    /// Enrolled pods, with addresses or not, matching `filter`.
    fn wanted(&self, filter: impl Fn(&PodRecord) -> bool) -> Vec<WantedPod> {
        self.pods
            .iter()
            .filter(|(_, r)| filter(r))
            .filter_map(|(key, r)| {
                let meta = r.meta.as_ref()?;
                self.enrolment(meta).is_enrolled().then(|| WantedPod {
                    key: key.clone(),
                    uid: uid_of(meta, None, key),
                    ips: meta.ips.clone(),
                })
            })
            .collect()
    }

    /// Looks for the namespaces of `wanted` (see [`discovery::find`]), off
    /// the agent's task.
    async fn discover(
        &self,
        wanted: Vec<WantedPod>,
    ) -> Vec<(PodKey, Result<FoundNetns, DiscoveryError>)> {
        if wanted.is_empty() {
            return Vec::new();
        }
        let mut exclude = Vec::new();
        match Netns::current() {
            Ok(own) => exclude.push(own.inode()),
            Err(error) => warn!(%error, "cannot tell the agent's own network namespace"),
        }
        exclude.extend(self.config.node_netns.as_ref().map(Netns::inode));
        let node = discovery::Node {
            netns: self.config.node_netns.clone(),
            exclude,
            ip: self.config.redirection.ip.clone(),
        };
        let config = self.config.discovery.clone();
        let looking = tokio::task::spawn_blocking(move || discovery::find(&config, &node, &wanted));
        match looking.await {
            Ok(found) => found,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    fn found_sandbox(&mut self, key: &PodKey, found: FoundNetns) {
        let Some(record) = self.pods.get_mut(key) else {
            return;
        };
        info!(pod = %key, netns = %found.path.display(), inode = found.netns.inode(), "found a running pod's network namespace");
        record.sandbox = Some(Sandbox {
            container_id: None,
            netns_path: found.path,
            uid: record.meta.as_ref().map(|m| m.uid.clone()),
            ips: record
                .meta
                .as_ref()
                .map(|m| m.ips.clone())
                .unwrap_or_default(),
        });
    }

    /// An enrolled pod without a namespace: ztunnel keeps what it has.
    fn keep(&mut self, key: &PodKey) {
        let Some(record) = self.pods.get_mut(key) else {
            return;
        };
        let Some(meta) = &record.meta else {
            return;
        };
        let uid = uid_of(meta, None, key);
        self.zds.keep(&uid);
        record.kept = Some(uid);
    }

    fn count_kept(&self) {
        let kept = self.pods.values().filter(|r| r.kept.is_some()).count();
        self.metrics
            .pods_without_netns
            .set(i64::try_from(kept).unwrap_or(i64::MAX));
    }

    /// Brings the node's probe set to the addresses of the captured and kept
    /// pods.
    async fn reconcile_probe_set(&mut self) {
        let mut wanted = Vec::new();
        for record in self.pods.values() {
            let uid = record
                .captured
                .as_ref()
                .map(|c| c.uid.clone())
                .or_else(|| record.kept.clone());
            if let Some(uid) = uid {
                wanted.extend(record.ips().into_iter().map(|ip| ProbeEntry {
                    ip,
                    uid: uid.clone(),
                }));
            }
        }
        match self
            .on_node(move |config| host_probe::reconcile(config, &wanted))
            .await
        {
            Ok(Ok(changes)) => {
                for captured in self.pods.values_mut().filter_map(|r| r.captured.as_mut()) {
                    captured.probed = true;
                }
                info!(added = ?changes.added, removed = ?changes.removed, "node probe set reconciled");
            }
            Ok(Err(error)) => {
                warn!(%error, "cannot reconcile the node probe set; probes of pods missing from it are captured (and fail under STRICT)")
            }
            Err(error) => warn!(%error, "cannot enter the node's network namespace"),
        }
    }

    /// Runs `f` with the redirection settings on a thread inside the node's
    /// network namespace.
    async fn on_node<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RedirectionConfig) -> T + Send + 'static,
    ) -> Result<T, AgentError> {
        let node = match &self.config.node_netns {
            Some(netns) => netns.clone(),
            None => Netns::current().map_err(AgentError::NodeNetns)?,
        };
        let config = self.config.redirection.clone();
        node.run_async(move || f(&config))
            .await
            .map_err(AgentError::NodeNetns)
    }

    async fn on_message(&mut self, message: Message) {
        match message {
            Message::Cni(request, reply) => self.on_cni(request, reply).await,
            Message::AddWaitOver(key, container_id) => {
                let Some(waiting) = self.waiting.get_mut(&key) else {
                    return;
                };
                let (over, rest): (Vec<_>, Vec<_>) = waiting
                    .drain(..)
                    .partition(|w| w.pod.container_id == container_id);
                *waiting = rest;
                if waiting.is_empty() {
                    self.waiting.remove(&key);
                }
                for w in over {
                    let error = AgentError::UnknownPod(key.clone(), self.config.pod_wait);
                    warn!(%error, "refusing CNI ADD");
                    let _ = w.reply.send(CniReply::error(error.to_string()));
                }
            }
            Message::Sweep(done) => {
                self.sweep().await;
                let _ = done.send(());
            }
            // Handled by the run loop, which then ends.
            Message::Uninstall(done) => drop(done),
        }
    }

    async fn on_cni(&mut self, request: CniRequest, reply: oneshot::Sender<CniReply>) {
        match request {
            CniRequest::Add(pod) => {
                let key = pod.key();
                if self.knows(&key, pod.uid.as_deref()) {
                    let answer = self.cni_add(pod).await;
                    let _ = reply.send(answer);
                } else {
                    debug!(pod = %key, "CNI ADD before the pod source knows the pod; waiting");
                    let tx = self.tx.clone();
                    let wait = self.config.pod_wait;
                    let container_id = pod.container_id.clone();
                    let wait_key = key.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(Message::AddWaitOver(wait_key, container_id)).await;
                    });
                    self.waiting
                        .entry(key)
                        .or_default()
                        .push(WaitingAdd { pod, reply });
                }
            }
            CniRequest::Del(pod) => {
                let key = pod.key();
                let same = self
                    .pods
                    .get(&key)
                    .and_then(|r| Some((r.sandbox.as_ref()?, r.captured.as_ref())))
                    .is_some_and(|(sandbox, captured)| is_this_sandbox(sandbox, captured, &pod));
                if same && let Some(record) = self.pods.get_mut(&key) {
                    record.sandbox = None;
                    info!(pod = %key, "sandbox deleted");
                    // The netns goes with the sandbox, and the rules with it.
                    self.release(&key, false).await;
                }
                self.forget_if_empty(&key);
                let _ = reply.send(CniReply::ok(false));
            }
            CniRequest::Check(pod) => {
                let _ = reply.send(self.cni_check(&pod));
            }
            CniRequest::Status => {
                let _ = reply.send(CniReply::ok(false));
            }
        }
    }

    /// The source knows this pod (and, when the runtime named the uid, this
    /// very instance of it).
    fn knows(&self, key: &PodKey, uid: Option<&str>) -> bool {
        let meta = self.pods.get(key).and_then(|r| r.meta.as_ref());
        match (meta, uid) {
            (Some(meta), Some(uid)) => meta.uid == uid,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    async fn cni_add(&mut self, pod: CniPod) -> CniReply {
        let key = pod.key();
        let record = self.pods.entry(key.clone()).or_default();
        record.sandbox = Some(Sandbox {
            container_id: Some(pod.container_id),
            netns_path: pod.netns,
            uid: pod.uid,
            ips: pod.ips,
        });
        info!(pod = %key, ips = ?record.sandbox.as_ref().map(|s| &s.ips), "sandbox added");
        match self.reconcile(&key).await {
            Ok(captured) => CniReply::ok(captured),
            Err(e) => {
                warn!(error = %e, "CNI ADD failed");
                CniReply::error(e.to_string())
            }
        }
    }

    fn cni_check(&self, pod: &CniPod) -> CniReply {
        let key = pod.key();
        let Some(record) = self.pods.get(&key) else {
            return CniReply::error(format!("pod {key} is not known to the node agent"));
        };
        match (self.wants_capture(record), &record.captured) {
            (false, _) => CniReply::ok(false),
            (true, Some(c)) if c.acked => CniReply::ok(true),
            (true, _) => CniReply::error(AgentError::NotCaptured(key).to_string()),
        }
    }

    async fn on_pod_event(&mut self, event: PodEvent) {
        match event {
            PodEvent::Pod(meta) => {
                let key = meta.key();
                let record = self.pods.entry(key.clone()).or_default();
                if record.meta.as_ref() == Some(&meta) {
                    return;
                }
                record.meta = Some(meta);
                self.reconcile_logged(&key).await;
                self.release_waiting(&key).await;
            }
            PodEvent::PodDeleted(key) => self.pod_gone(&key).await,
            PodEvent::PodsListed(keys) => {
                let gone: Vec<PodKey> = self
                    .pods
                    .iter()
                    .filter(|(k, r)| r.meta.is_some() && !keys.contains(k))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in gone {
                    self.pod_gone(&key).await;
                }
            }
            PodEvent::Namespace(ns) => {
                let name = ns.name.clone();
                if self.namespaces.get(&name) != Some(&ns) {
                    self.namespaces.insert(name.clone(), ns);
                    self.reconcile_namespace(&name).await;
                }
            }
            PodEvent::NamespaceDeleted(name) => {
                if self.namespaces.remove(&name).is_some() {
                    self.reconcile_namespace(&name).await;
                }
            }
            PodEvent::NamespacesListed(names) => {
                let gone: Vec<String> = self
                    .namespaces
                    .keys()
                    .filter(|n| !names.contains(n))
                    .cloned()
                    .collect();
                for name in gone {
                    self.namespaces.remove(&name);
                    self.reconcile_namespace(&name).await;
                }
            }
        }
    }

    async fn pod_gone(&mut self, key: &PodKey) {
        if let Some(record) = self.pods.get_mut(key) {
            record.meta = None;
            info!(pod = %key, "pod deleted");
            self.release(key, false).await;
            self.pods.remove(key);
        }
    }

    async fn release_waiting(&mut self, key: &PodKey) {
        let Some(waiting) = self.waiting.remove(key) else {
            return;
        };
        let (ready, still): (Vec<_>, Vec<_>) = waiting
            .into_iter()
            .partition(|w| self.knows(key, w.pod.uid.as_deref()));
        if !still.is_empty() {
            self.waiting.insert(key.clone(), still);
        }
        for w in ready {
            let answer = self.cni_add(w.pod).await;
            let _ = w.reply.send(answer);
        }
    }

    async fn reconcile_namespace(&mut self, namespace: &str) {
        let keys: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| k.namespace == namespace)
            .cloned()
            .collect();
        for key in keys {
            self.reconcile_logged(&key).await;
        }
    }

    async fn reconcile_logged(&mut self, key: &PodKey) {
        if let Err(e) = self.reconcile(key).await {
            warn!(error = %e, "cannot bring pod to its enrolment state");
        }
    }

    fn enrolment(&self, meta: &PodMeta) -> Enrolment {
        enrolment::decide(meta, self.namespaces.get(&meta.namespace))
    }

    fn enrolled(&self, record: &PodRecord) -> bool {
        record
            .meta
            .as_ref()
            .is_some_and(|m| self.enrolment(m).is_enrolled())
    }

    /// Enrolled by labels, with a sandbox to capture.
    fn wants_capture(&self, record: &PodRecord) -> bool {
        record.sandbox.is_some() && self.enrolled(record)
    }

    /// Brings one pod to the state its labels and sandbox call for. Ok(true)
    /// when it ends up captured.
    async fn reconcile(&mut self, key: &PodKey) -> Result<bool, AgentError> {
        let Some(record) = self.pods.get(key) else {
            return Ok(false);
        };
        let wants = self.wants_capture(record);
        if let Some(meta) = &record.meta {
            debug!(pod = %key, decision = %self.enrolment(meta), has_sandbox = record.sandbox.is_some(), "reconcile");
        }
        let stale = match (&record.captured, &record.sandbox, &record.meta) {
            (Some(c), Some(s), Some(m)) => {
                c.uid != uid_of(m, s.uid.as_deref(), key)
                    || Netns::open(&s.netns_path)
                        .map(|n| n != c.netns)
                        .unwrap_or(true)
            }
            _ => false,
        };
        // A kept pod unenrolled by its labels: ztunnel drops it.
        let kept_unwanted = record.kept.is_some() && !self.enrolled(record);
        if (record.captured.is_some() && (!wants || stale)) || kept_unwanted {
            // A sandbox that is still the captured one keeps living: take the
            // rules out; a replaced one takes its rules with it.
            self.release(key, !stale).await;
        }
        if !wants {
            return Ok(false);
        }
        if self.pods.get(key).is_some_and(|r| r.captured.is_some()) {
            return Ok(true);
        }
        self.capture(key).await.map(|()| true)
    }

    async fn capture(&mut self, key: &PodKey) -> Result<(), AgentError> {
        let Some(record) = self.pods.get_mut(key) else {
            return Ok(());
        };
        let (Some(meta), Some(sandbox)) = (record.meta.clone(), record.sandbox.clone()) else {
            return Ok(());
        };
        let netns = match Netns::open(&sandbox.netns_path) {
            Ok(netns) => netns,
            Err(e) => {
                record.sandbox = None;
                return Err(AgentError::SandboxGone(key.clone(), e));
            }
        };
        let uid = uid_of(&meta, sandbox.uid.as_deref(), key);
        let info = WorkloadInfo {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            service_account: meta.service_account.clone(),
        };
        let rules = self.config.redirection.clone();
        netns
            .run_async(move || {
                migrate_queued_connections();
                iptables::install(&rules)
            })
            .await
            .map_err(|e| AgentError::Netns(key.clone(), e))?
            .map_err(|e| AgentError::Rules(key.clone(), e))?;
        info!(pod = %key, %uid, netns = netns.inode(), "redirection rules installed");
        let Some(record) = self.pods.get_mut(key) else {
            return Ok(());
        };
        record.captured = Some(Captured {
            netns: netns.clone(),
            uid: uid.clone(),
            acked: false,
            probed: false,
        });
        // From here on the pod is in every snapshot with its namespace.
        if record.kept.take().is_some() {
            self.count_kept();
        }
        // Rules stay in place whatever ztunnel answers: until it takes the
        // pod, the pod's traffic fails rather than leaving uncaptured.
        self.zds
            .add(ZdsPod { uid, info, netns })
            .await
            .map_err(|e| AgentError::Ztunnel(key.clone(), e))?;
        // The ack itself arrives through `on_acked`; reflect it now so the
        // CNI reply can say so, and so kubelet can probe the pod as soon as
        // the runtime starts it.
        if let Some(c) = self.pods.get_mut(key).and_then(|r| r.captured.as_mut()) {
            c.acked = true;
        }
        self.add_to_probe_set(key).await;
        Ok(())
    }

    /// Puts a captured pod's addresses in the node's probe set, once.
    async fn add_to_probe_set(&mut self, key: &PodKey) {
        let Some(record) = self.pods.get(key) else {
            return;
        };
        let Some(captured) = record.captured.as_ref().filter(|c| !c.probed) else {
            return;
        };
        let (uid, ips) = (captured.uid.clone(), record.ips());
        let added = self
            .on_node(move |config| host_probe::add_pod(config, &uid, &ips))
            .await;
        match added {
            Ok(Ok(())) => {
                if let Some(c) = self.pods.get_mut(key).and_then(|r| r.captured.as_mut()) {
                    c.probed = true;
                }
            }
            Ok(Err(error)) => {
                warn!(pod = %key, %error, "pod not added to the node probe set: kubelet's probes of it are captured (and fail under STRICT)")
            }
            Err(error) => warn!(pod = %key, %error, "cannot enter the node's network namespace"),
        }
    }

    /// Undoes a capture (or a keep); `remove_rules` when the sandbox stays.
    async fn release(&mut self, key: &PodKey, remove_rules: bool) {
        let Some(record) = self.pods.get_mut(key) else {
            return;
        };
        let (captured, kept) = (record.captured.take(), record.kept.take());
        let Some(uid) = captured.as_ref().map(|c| c.uid.clone()).or(kept) else {
            return;
        };
        self.count_kept();
        // The probe entry goes first, as upstream: whatever fails later,
        // no stale entry stays behind.
        let owner = uid.clone();
        match self
            .on_node(move |config| host_probe::remove_pod(config, &owner))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(pod = %key, %error, "cannot remove the pod from the node probe set")
            }
            Err(error) => warn!(pod = %key, %error, "cannot enter the node's network namespace"),
        }
        if let (Some(captured), true) = (&captured, remove_rules) {
            self.remove_rules(key, &captured.netns).await;
        }
        match self.zds.del(&uid).await {
            Ok(()) | Err(ZdsServerError::ConnectionLost) => {}
            Err(e) => warn!(pod = %key, error = %e, "ztunnel did not confirm dropping the pod"),
        }
        if self.pods.get(key).is_some_and(|r| r.meta.is_some()) {
            self.annotate(key, false);
        }
        info!(pod = %key, %uid, "pod released");
    }

    /// Takes the redirection rules out of a pod that keeps running.
    async fn remove_rules(&self, key: &PodKey, netns: &Netns) {
        let rules = self.config.redirection.clone();
        match netns.run_async(move || iptables::remove(&rules)).await {
            Ok(Ok(())) => info!(pod = %key, "redirection rules removed"),
            Ok(Err(e)) => warn!(pod = %key, error = %e, "cannot remove redirection rules"),
            Err(e) => warn!(pod = %key, error = %e, "cannot enter the pod to remove its rules"),
        }
    }

    /// The mesh leaves the node (see [`Self::run`]): the rules go first,
    /// then the annotations (awaited: the process ends next), then ztunnel
    /// is told, all pods at once, as ztunnel may be stopping too.
    async fn uninstall(&mut self) {
        let keys: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(_, r)| r.captured.is_some() || r.kept.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        info!(
            pods = keys.len(),
            "the mesh is being uninstalled: releasing every pod of the node"
        );
        let mut uids = Vec::new();
        for key in &keys {
            let Some(record) = self.pods.get_mut(key) else {
                continue;
            };
            let (captured, kept) = (record.captured.take(), record.kept.take());
            if let Some(captured) = captured {
                self.remove_rules(key, &captured.netns).await;
                uids.push(captured.uid);
            } else if let Some(uid) = kept {
                uids.push(uid);
            }
        }
        self.count_kept();
        match self.on_node(host_probe::remove).await {
            Ok(Ok(())) => info!(
                chain = host_probe::CHAIN_POSTROUTING,
                set = host_probe::PROBE_SET,
                "kubelet-probe rules and sets removed from the node"
            ),
            Ok(Err(error)) => {
                warn!(%error, "cannot remove the node's kubelet-probe rules and sets")
            }
            Err(error) => warn!(%error, "cannot enter the node's network namespace"),
        }
        if let Some(client) = &self.kube {
            let annotated: Vec<&PodKey> = keys
                .iter()
                .filter(|k| self.pods.get(*k).is_some_and(|r| r.meta.is_some()))
                .collect();
            let patches = annotated
                .iter()
                .map(|key| annotate::set_redirection(client, key, false));
            for result in futures::future::join_all(patches).await {
                if let Err(error) = result {
                    warn!(%error, "pod annotation not removed");
                }
            }
        }
        let dels = uids.iter().map(|uid| self.zds.del(uid));
        for (uid, result) in uids.iter().zip(futures::future::join_all(dels).await) {
            match result {
                Ok(()) | Err(ZdsServerError::ConnectionLost) => {}
                Err(error) => warn!(%uid, %error, "ztunnel did not confirm dropping the pod"),
            }
        }
        info!(
            pods = keys.len(),
            "every pod released; the node agent stops"
        );
    }

    async fn on_acked(&mut self, uid: String) {
        let found = self.pods.iter_mut().find_map(|(key, record)| {
            let captured = record.captured.as_mut().filter(|c| c.uid == uid)?;
            captured.acked = true;
            Some(key.clone())
        });
        if let Some(key) = found {
            self.annotate(&key, true);
            self.add_to_probe_set(&key).await;
        }
    }

    /// Kubernetes mode: (un)sets the redirection annotation, off the agent's
    /// task so a slow API server does not hold up enrolment.
    fn annotate(&self, key: &PodKey, enabled: bool) {
        let Some(client) = self.kube.clone() else {
            return;
        };
        let key = key.clone();
        tokio::spawn(async move {
            if let Err(e) = annotate::set_redirection(&client, &key, enabled).await {
                warn!(error = %e, "pod annotation not updated");
            }
        });
    }

    /// Forgets sandboxes whose netns has gone (or was replaced) without a DEL
    /// reaching us, releasing their pods; looks again for the namespaces of
    /// kept pods.
    async fn sweep(&mut self) {
        let gone: Vec<PodKey> = self
            .pods
            .iter()
            .filter_map(|(key, record)| {
                let sandbox = record.sandbox.as_ref()?;
                let current = Netns::open(&sandbox.netns_path).ok();
                let vanished = match (&current, &record.captured) {
                    (None, _) => true,
                    (Some(now), Some(c)) => *now != c.netns,
                    (Some(_), None) => false,
                };
                vanished.then(|| key.clone())
            })
            .collect();
        for key in gone {
            info!(pod = %key, "sandbox netns has gone; cleaning up");
            if let Some(record) = self.pods.get_mut(&key) {
                record.sandbox = None;
            }
            self.release(&key, false).await;
            self.forget_if_empty(&key);
        }
        let kept = self.wanted(|r| r.kept.is_some() && r.sandbox.is_none());
        for (key, found) in self.discover(kept).await {
            match found {
                Ok(found) => {
                    self.found_sandbox(&key, found);
                    self.reconcile_logged(&key).await;
                }
                Err(reason) => {
                    debug!(pod = %key, %reason, "kept pod's network namespace still not found")
                }
            }
        }
    }

    fn forget_if_empty(&mut self, key: &PodKey) {
        if self.pods.get(key).is_some_and(|r| {
            r.meta.is_none() && r.sandbox.is_none() && r.captured.is_none() && r.kept.is_none()
        }) {
            self.pods.remove(key);
        }
    }
}

/// How the source's task ended: a failure ends the agent.
fn source_ended(
    result: Result<Result<(), PodSourceError>, tokio::task::JoinError>,
) -> Result<(), AgentError> {
    match result {
        Ok(Ok(())) => {
            info!("pod source ended; keeping the pods as they are");
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// The uid a pod is handed to ztunnel under: the API's, else the runtime's,
/// else its name.
fn uid_of(meta: &PodMeta, runtime_uid: Option<&str>, key: &PodKey) -> String {
    if !meta.uid.is_empty() {
        return meta.uid.clone();
    }
    runtime_uid
        .map(str::to_string)
        .unwrap_or_else(|| key.to_string())
}

/// Whether a DEL is for the sandbox the agent has: the same container, or,
/// for a sandbox found on start (container unknown), the same namespace (a
/// DEL without a namespace path, or whose namespace is gone, is taken as
/// this sandbox's: it is the only one the agent knows of).
fn is_this_sandbox(sandbox: &Sandbox, captured: Option<&Captured>, del: &CniPod) -> bool {
    if let Some(id) = &sandbox.container_id {
        return *id == del.container_id;
    }
    if del.netns.as_os_str().is_empty() || del.netns == sandbox.netns_path {
        return true;
    }
    match (Netns::open(&del.netns), captured) {
        (Ok(theirs), Some(c)) => theirs == c.netns,
        (Ok(theirs), None) => Netns::open(&sandbox.netns_path).is_ok_and(|ours| ours == theirs),
        (Err(_), _) => true,
    }
}

/// Turns on `net.ipv4.tcp_migrate_req` in the pod's network namespace
/// (must run on a thread inside it): when a ztunnel closes its in-pod
/// listeners on drain, the connections still queued on them (handshake done,
/// not yet accepted) move to another listener of the same `SO_REUSEPORT`
/// group, the new ztunnel's, instead of being reset (Linux 5.14+, see the
/// kernel's `ip-sysctl` documentation; the setting is per network namespace,
/// so the node's own does not reach pods). Without it a rolling upgrade can
/// reset a few new connections; capture still works, so a kernel without
/// the setting is only warned about, once.
fn migrate_queued_connections() {
    const SETTING: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if let Err(error) = std::fs::write(SETTING, "1") {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            warn!(
                %error,
                setting = SETTING,
                "cannot have connections queued on a draining ztunnel's listeners moved to \
                 its successor's (Linux 5.14+); an upgrade may reset some new connections"
            )
        });
    }
}
