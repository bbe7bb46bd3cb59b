//! The node agent's brain: joins what the pod source says (labels) with what
//! the CNI plugin says (sandboxes: netns path, IPs), decides enrolment, and
//! for each pod whose answer changes installs or removes the in-pod rules and
//! tells ztunnel over ZDS.
//!
//! One task owns all state and handles one event at a time (pod source,
//! plugin requests, ztunnel acks, the periodic sandbox sweep), so decisions
//! never race. Every sandbox the plugin reported is remembered, enrolled or
//! not, so a pod enrolled later by a label change can still be captured.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use api::zds::WorkloadInfo;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::annotate;
use super::cni_event::{CniHandler, CniPod, CniReply, CniRequest};
use super::enrolment::{self, Enrolment, NamespaceMeta, PodKey, PodMeta};
use super::iptables::{self, IptablesError, RedirectionConfig};
use super::pods::{PodEvent, PodSource};
use super::zds_server::{ZdsPod, ZdsServer, ZdsServerError};
use crate::inpod::{Netns, NetnsError};

/// Errors enrolling or unenrolling a pod.
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
    #[error("the node agent has stopped")]
    Stopped,
}

/// Settings of the agent's decisions.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub redirection: RedirectionConfig,
    /// How long a plugin ADD waits for its pod to show up in the pod source.
    pub pod_wait: Duration,
    /// How often sandboxes are checked for having gone away.
    pub sweep_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            redirection: RedirectionConfig::default(),
            pod_wait: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(10),
        }
    }
}

/// A sandbox reported by the plugin.
#[derive(Clone, Debug)]
struct Sandbox {
    container_id: String,
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
}

#[derive(Debug, Default)]
struct PodRecord {
    meta: Option<PodMeta>,
    sandbox: Option<Sandbox>,
    captured: Option<Captured>,
}

enum Message {
    Cni(CniRequest, oneshot::Sender<CniReply>),
    AddWaitOver(PodKey, String),
    Sweep(oneshot::Sender<()>),
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

/// The node agent.
pub struct NodeAgent {
    config: AgentConfig,
    zds: ZdsServer,
    kube: Option<kube::Client>,
    pods: BTreeMap<PodKey, PodRecord>,
    namespaces: BTreeMap<String, NamespaceMeta>,
    waiting: BTreeMap<PodKey, Vec<WaitingAdd>>,
    tx: mpsc::Sender<Message>,
    rx: mpsc::Receiver<Message>,
}

impl NodeAgent {
    /// `kube`: in Kubernetes mode, the client that annotates pods.
    pub fn new(config: AgentConfig, zds: ZdsServer, kube: Option<kube::Client>) -> Self {
        let (tx, rx) = mpsc::channel(64);
        NodeAgent {
            config,
            zds,
            kube,
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            waiting: BTreeMap::new(),
            tx,
            rx,
        }
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            tx: self.tx.clone(),
        }
    }

    /// Runs until the pod source fails. `acked` is the ZDS server's stream of
    /// pods ztunnel has acked.
    pub async fn run(
        mut self,
        source: impl PodSource,
        mut acked: mpsc::UnboundedReceiver<String>,
    ) -> Result<(), super::pods::PodSourceError> {
        let (events_tx, mut events) = mpsc::channel(256);
        let mut source = tokio::spawn(source.run(events_tx));
        let mut sweep = tokio::time::interval(self.config.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source_done = false;
        loop {
            tokio::select! {
                result = &mut source, if !source_done => {
                    source_done = true;
                    match result {
                        Ok(Ok(())) => info!("pod source ended; keeping the pods as they are"),
                        Ok(Err(e)) => return Err(e),
                        Err(join) => std::panic::resume_unwind(join.into_panic()),
                    }
                }
                Some(event) = events.recv() => self.on_pod_event(event).await,
                Some(message) = self.rx.recv() => self.on_message(message).await,
                Some(uid) = acked.recv() => self.on_acked(uid),
                _ = sweep.tick() => self.sweep().await,
            }
        }
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
                if let Some(record) = self.pods.get_mut(&key) {
                    let same = record
                        .sandbox
                        .as_ref()
                        .is_some_and(|s| s.container_id == pod.container_id);
                    if same {
                        record.sandbox = None;
                        info!(pod = %key, "sandbox deleted");
                        // The netns goes with the sandbox, and the rules with it.
                        self.release(&key, false).await;
                    }
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
            container_id: pod.container_id,
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

    /// Enrolled by labels, with a sandbox to capture.
    fn wants_capture(&self, record: &PodRecord) -> bool {
        record.sandbox.is_some()
            && record
                .meta
                .as_ref()
                .is_some_and(|m| self.enrolment(m).is_enrolled())
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
                c.uid != m.uid
                    || Netns::open(&s.netns_path)
                        .map(|n| n != c.netns)
                        .unwrap_or(true)
            }
            _ => false,
        };
        if record.captured.is_some() && (!wants || stale) {
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
        let uid = if meta.uid.is_empty() {
            sandbox.uid.clone().unwrap_or_else(|| key.to_string())
        } else {
            meta.uid.clone()
        };
        let info = WorkloadInfo {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            service_account: meta.service_account.clone(),
        };
        let rules = self.config.redirection.clone();
        netns
            .run_async(move || iptables::install(&rules))
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
        });
        // Rules stay in place whatever ztunnel answers: until it takes the
        // pod, the pod's traffic fails rather than leaving uncaptured.
        self.zds
            .add(ZdsPod { uid, info, netns })
            .await
            .map_err(|e| AgentError::Ztunnel(key.clone(), e))?;
        // The ack itself arrives through `on_acked`; reflect it now so the
        // CNI reply can say so.
        if let Some(c) = self.pods.get_mut(key).and_then(|r| r.captured.as_mut()) {
            c.acked = true;
        }
        Ok(())
    }

    /// Undoes a capture; `remove_rules` when the sandbox stays.
    async fn release(&mut self, key: &PodKey, remove_rules: bool) {
        let Some(captured) = self.pods.get_mut(key).and_then(|r| r.captured.take()) else {
            return;
        };
        if remove_rules {
            let rules = self.config.redirection.clone();
            match captured
                .netns
                .run_async(move || iptables::remove(&rules))
                .await
            {
                Ok(Ok(())) => info!(pod = %key, "redirection rules removed"),
                Ok(Err(e)) => warn!(pod = %key, error = %e, "cannot remove redirection rules"),
                Err(e) => warn!(pod = %key, error = %e, "cannot enter the pod to remove its rules"),
            }
        }
        match self.zds.del(&captured.uid).await {
            Ok(()) | Err(ZdsServerError::ConnectionLost) => {}
            Err(e) => warn!(pod = %key, error = %e, "ztunnel did not confirm dropping the pod"),
        }
        if self.pods.get(key).is_some_and(|r| r.meta.is_some()) {
            self.annotate(key, false);
        }
        info!(pod = %key, uid = %captured.uid, "pod released");
    }

    fn on_acked(&mut self, uid: String) {
        let found = self.pods.iter_mut().find_map(|(key, record)| {
            let captured = record.captured.as_mut().filter(|c| c.uid == uid)?;
            captured.acked = true;
            Some(key.clone())
        });
        if let Some(key) = found {
            self.annotate(&key, true);
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
    /// reaching us, releasing their pods.
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
    }

    fn forget_if_empty(&mut self, key: &PodKey) {
        if self
            .pods
            .get(key)
            .is_some_and(|r| r.meta.is_none() && r.sandbox.is_none() && r.captured.is_none())
        {
            self.pods.remove(key);
        }
    }
}
