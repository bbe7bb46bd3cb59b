//! The pods of a node: a watch on the pods bound to it, and one thread per
//! pod living in the node's network namespace that does what kubelet's pod
//! worker and the container runtime do:
//!
//! ```text
//! sandbox: network namespace -> CNI ADD (loopback, then the node's chain) -> pod IP
//! volumes: tokens (TokenRequest), ConfigMaps, Secrets, emptyDir, hostPath
//! containers: image -> env -> argv -> container-init in the pod's namespace
//! loop: exits -> restart per restartPolicy with back-off; startup, liveness,
//!       readiness probes from the node; token renewal; status patched when it changes
//! deletion: SIGTERM -> grace period -> SIGKILL -> final status -> CNI DEL
//!           -> namespace removed -> pod directory removed -> Pod deleted (grace 0, uid precondition)
//! ```
//!
//! Not supported (each fails the pod's containers with a reason naming
//! it): init containers, `exec` and `grpc` probes, volume kinds other than
//! those of [`super::volumes`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Pod, Probe, Secret, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use rand::Rng;
use serde_json::{Value, json};

use super::env::{self, EnvSources, PodFacts};
use super::launch::{Launch, Mount};
use super::volumes::{self, VolumeSet, VolumeSources};
use super::{ContainerView, PodView, Shared, images};
use crate::cluster::ReadinessProbe;
use crate::cni::{self, CniCommand, CniPod, NetworkConfigList, PluginLauncher};
use crate::netns::NetNs;
use crate::process::{ProcessInfo, ProcessSpec, log_tail};

/// What the watch tells a pod's thread.
pub(crate) enum PodEvent {
    Updated(Box<Pod>),
    /// The object is gone from the API (deleted without us).
    Gone,
    /// Look again (the runtime is stopping).
    Wake,
}

/// A pod's thread, as the node keeps it.
pub(crate) struct PodEntry {
    pub tx: mpsc::Sender<PodEvent>,
    pub view: Arc<Mutex<PodView>>,
}

/// Watches the pods bound to the node and hands each to its thread.
pub async fn watch_pods(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", shared.spec.name));
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => dispatch(&shared, pod),
            Ok(Event::Delete(pod)) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(entry) = Shared::lock(&shared.pods).get(&uid) {
                    let _ = entry.tx.send(PodEvent::Gone);
                }
            }
            Ok(Event::Init | Event::InitDone) => {}
            Err(e) => tracing::warn!(node = %shared.spec.name, "watching pods: {e}"),
        }
    }
}

fn watcher(
    api: Api<Pod>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<Event<Pod>, watcher::Error>> {
    watcher::watcher(api, config)
}

fn dispatch(shared: &Arc<Shared>, pod: Pod) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut pods = Shared::lock(&shared.pods);
    if let Some(entry) = pods.get(&uid) {
        let _ = entry.tx.send(PodEvent::Updated(Box::new(pod)));
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    if matches!(phase.as_deref(), Some("Succeeded" | "Failed"))
        && pod.metadata.deletion_timestamp.is_none()
    {
        // Finished before this runtime started: nothing to run.
        return;
    }
    let (tx, rx) = mpsc::channel();
    let worker = Worker::new(shared.clone(), pod, rx);
    let view = worker.view.clone();
    let name = format!("{}-pod-{}", shared.spec.name, worker.name);
    let spawned = std::thread::Builder::new()
        .name(name)
        .spawn(move || worker.run());
    match spawned {
        Ok(_) => {
            pods.insert(uid, PodEntry { tx, view });
        }
        Err(e) => tracing::warn!(node = %shared.spec.name, "could not start a pod thread: {e}"),
    }
}

pub fn random_hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// A probe as the runtime runs it.
#[derive(Clone, Debug)]
struct ProbeRun {
    check: ReadinessProbe,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    due: Instant,
    successes: u32,
    failures: u32,
}

impl ProbeRun {
    fn from_spec(probe: &Probe, container: &Container, field: &str) -> Result<ProbeRun, String> {
        let port = |p: &IntOrString| -> Result<u16, String> {
            match p {
                IntOrString::Int(n) => {
                    u16::try_from(*n).map_err(|_| format!("{field}: port {n} is out of range"))
                }
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|cp| cp.name.as_deref() == Some(name))
                    .and_then(|cp| u16::try_from(cp.container_port).ok())
                    .ok_or_else(|| format!("{field}: the container has no port named {name:?}")),
            }
        };
        let check = if let Some(h) = &probe.http_get {
            if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return Err(format!(
                    "{field}.httpGet.scheme: only HTTP is supported by the node runtime"
                ));
            }
            ReadinessProbe::HttpGet {
                port: port(&h.port)?,
                path: h.path.clone().unwrap_or_else(|| "/".into()),
            }
        } else if let Some(t) = &probe.tcp_socket {
            ReadinessProbe::Tcp {
                port: port(&t.port)?,
            }
        } else {
            return Err(format!(
                "{field}: only httpGet and tcpSocket probes are supported by the node runtime"
            ));
        };
        let secs =
            |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Ok(ProbeRun {
            check,
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
            due: Instant::now(),
            successes: 0,
            failures: 0,
        })
    }

    fn reset(&mut self, now: Instant) {
        self.due = now + self.initial_delay;
        self.successes = 0;
        self.failures = 0;
    }
}

#[derive(Clone, Debug)]
struct Terminated {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started_at: String,
    finished_at: String,
    container_id: String,
}

#[derive(Clone, Debug)]
enum State {
    Waiting { reason: String, message: String },
    Running { started_at: String },
    Terminated(Terminated),
}

struct ContainerRun {
    spec: Container,
    process: Option<ProcessInfo>,
    container_id: String,
    launch: Option<PathBuf>,
    state: State,
    /// The latest exit, and the one before it (kubelet's `lastState` is
    /// the previous instance's exit: `last` while a new instance waits or
    /// runs, `prior` once the current one has exited for good).
    last: Option<Terminated>,
    prior: Option<Terminated>,
    restart_count: u32,
    ready: bool,
    started: bool,
    next_start: Option<Instant>,
    backoff: Duration,
    startup: Option<ProbeRun>,
    liveness: Option<ProbeRun>,
    readiness: Option<ProbeRun>,
    /// Why the runtime killed the current process, if it did.
    killed_for: Option<String>,
}

struct Sandbox {
    netns: Option<NetNs>,
    ip: Ipv4Addr,
    id: String,
    /// The chain and its ADD result (DEL needs both).
    cni: Option<(NetworkConfigList, Value)>,
    loopback: bool,
}

struct Worker {
    shared: Arc<Shared>,
    pod: Pod,
    namespace: String,
    name: String,
    uid: String,
    rx: mpsc::Receiver<PodEvent>,
    view: Arc<Mutex<PodView>>,
    dir: PathBuf,
    host_network: bool,
    sandbox: Option<Sandbox>,
    volumes: Option<VolumeSet>,
    containers: Vec<ContainerRun>,
    /// Condition type -> (status, lastTransitionTime).
    conditions: BTreeMap<&'static str, (bool, String)>,
    start_time: String,
    last_status: Option<Value>,
    /// Why the pod cannot start (sandbox or volumes), retried.
    blocked: Option<(String, String)>,
    retry_at: Instant,
    network_down: bool,
    /// Being deleted: nothing restarts.
    terminating: bool,
}

/// Container and sandbox ids look like a runtime's (64 hex digits).
const ID_LEN: usize = 64;

impl Worker {
    fn new(shared: Arc<Shared>, pod: Pod, rx: mpsc::Receiver<PodEvent>) -> Worker {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = shared.fs.join("var/lib/kubelet/pods").join(&uid);
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        let view = Arc::new(Mutex::new(PodView {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            netns: None,
            ip: None,
            host_network,
            containers: BTreeMap::new(),
            dir: dir.clone(),
        }));
        let containers = spec
            .containers
            .iter()
            .map(|c| ContainerRun {
                spec: c.clone(),
                process: None,
                container_id: String::new(),
                launch: None,
                state: State::Waiting {
                    reason: "ContainerCreating".into(),
                    message: String::new(),
                },
                last: None,
                prior: None,
                restart_count: 0,
                ready: false,
                started: false,
                next_start: Some(Instant::now()),
                backoff: shared.timings.restart_backoff,
                startup: None,
                liveness: None,
                readiness: None,
                killed_for: None,
            })
            .collect();
        Worker {
            namespace,
            name,
            uid,
            rx,
            view,
            dir,
            host_network,
            sandbox: None,
            volumes: None,
            containers,
            conditions: BTreeMap::new(),
            start_time: super::register::now(),
            last_status: None,
            blocked: None,
            retry_at: Instant::now(),
            network_down: false,
            terminating: false,
            pod,
            shared,
        }
    }

    fn note(&self, step: String) {
        self.shared.note(&self.namespace, &self.name, step);
    }

    fn run(mut self) {
        if let Err(e) = self.shared.spec.netns.enter_current_thread() {
            tracing::error!("pod {}/{}: {e}", self.namespace, self.name);
            return;
        }
        let mut gone = false;
        loop {
            // Every pending event first: act on the newest view of the pod.
            loop {
                match self.rx.try_recv() {
                    Ok(PodEvent::Updated(p)) => self.pod = *p,
                    Ok(PodEvent::Gone) => gone = true,
                    Ok(PodEvent::Wake) => {}
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if self.shared.is_stopping() {
                return;
            }
            if gone || self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate(gone);
                Shared::lock(&self.shared.pods).remove(&self.uid);
                return;
            }
            self.sync();
            self.report();
            match self.rx.recv_timeout(self.shared.timings.pod_sync) {
                Ok(PodEvent::Updated(p)) => self.pod = *p,
                Ok(PodEvent::Gone) => gone = true,
                Ok(PodEvent::Wake) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn grace_period(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64)
    }

    fn node_netns(&self) -> &NetNs {
        &self.shared.spec.netns
    }

    fn pod_ip(&self) -> Option<Ipv4Addr> {
        self.sandbox.as_ref().map(|s| s.ip)
    }

    /// One pass: sandbox and volumes, then containers.
    fn sync(&mut self) {
        if self.network_down {
            return;
        }
        if self.sandbox.is_none() || self.volumes.is_none() {
            if Instant::now() < self.retry_at {
                return;
            }
            if let Err((reason, message)) = self.prepare() {
                if self.blocked.as_ref() != Some(&(reason.clone(), message.clone())) {
                    self.note(format!("cannot start yet: {reason}: {message}"));
                    self.event("Warning", &reason, &message, None);
                }
                for c in &mut self.containers {
                    c.state = State::Waiting {
                        reason: reason.clone(),
                        message: message.clone(),
                    };
                }
                self.blocked = Some((reason, message));
                self.retry_at = Instant::now() + self.shared.timings.retry;
                return;
            }
            self.blocked = None;
        }
        let now = Instant::now();
        if let Some(v) = self.volumes.as_mut() {
            let mut sources = ApiSources::new(&self.shared, &self.pod);
            match volumes::renew_tokens(v, &mut sources, now, self.shared.timings.retry) {
                Ok(0) => {}
                Ok(n) => self.shared.note(
                    &self.namespace,
                    &self.name,
                    format!("renewed {n} projected token(s)"),
                ),
                Err(e) => tracing::warn!("pod {}/{}: {e}", self.namespace, self.name),
            }
        }
        for i in 0..self.containers.len() {
            self.sync_container(i);
        }
        if self.is_terminal() && !self.network_down {
            self.note("all containers finished; tearing the sandbox down".into());
            self.teardown_network();
        }
        self.update_view();
    }

    fn has_init_containers(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|c| !c.is_empty())
    }

    /// Builds the sandbox and the volumes.
    fn prepare(&mut self) -> Result<(), (String, String)> {
        if self.has_init_containers() {
            return Err((
                "CreateContainerConfigError".into(),
                "spec.initContainers: init containers are not supported by the node runtime".into(),
            ));
        }
        if self.sandbox.is_none() {
            let sandbox = self
                .create_sandbox()
                .map_err(|e| ("FailedCreatePodSandBox".to_string(), e))?;
            self.sandbox = Some(sandbox);
            self.update_view();
        }
        if self.volumes.is_none() {
            let facts = self.facts();
            let mut sources = ApiSources::new(&self.shared, &self.pod);
            let set =
                volumes::materialize(&self.pod, &self.dir, &self.shared.fs, &facts, &mut sources)
                    .map_err(|e| ("FailedMount".to_string(), e.to_string()))?;
            {
                let mut paths = Shared::lock(&self.shared.node_paths);
                paths.extend(set.host_paths.iter().cloned());
            }
            self.volumes = Some(set);
        }
        Ok(())
    }

    fn facts(&self) -> PodFacts {
        PodFacts {
            pod_ip: self.pod_ip(),
            host_ip: self.shared.spec.ip,
            kubernetes_service: kubernetes_service(&self.shared),
        }
    }

    fn cni_pod<'a>(
        &'a self,
        netns: &'a Path,
        container_id: &'a str,
        ifname: &'a str,
    ) -> CniPod<'a> {
        CniPod {
            namespace: &self.namespace,
            name: &self.name,
            uid: &self.uid,
            container_id,
            netns,
            ifname,
        }
    }

    /// The pod's network namespace and address, from the node's CNI chain.
    fn create_sandbox(&mut self) -> Result<Sandbox, String> {
        let id = random_hex(ID_LEN);
        if self.host_network {
            self.note(format!(
                "sandbox {}: host network ({})",
                &id[..12],
                self.shared.spec.ip
            ));
            return Ok(Sandbox {
                netns: None,
                ip: self.shared.spec.ip,
                id,
                cni: None,
                loopback: false,
            });
        }
        let conf_dir = self.shared.cni_conf_dir();
        let list = NetworkConfigList::load_dir(&conf_dir)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "network not ready: no CNI configuration in {}",
                    conf_dir.display()
                )
            })?;
        let role = format!(
            "{}.{}.{}",
            self.namespace,
            self.name,
            &self.uid[..self.uid.len().min(8)]
        );
        let netns = self
            .shared
            .run
            .create_netns(&role)
            .map_err(|e| e.to_string())?;
        let launcher = NodeLauncher {
            shared: &self.shared,
            dir: self.dir.join("cni"),
        };
        let timeout = self.shared.timings.cni_timeout;
        let lo = loopback_list();
        let loopback = launcher.command("loopback").is_some();
        let added = (|| {
            if loopback {
                let pod = self.cni_pod(netns.path(), &id, "lo");
                cni::run_chain(&lo, &launcher, CniCommand::Add, &pod, None, timeout)
                    .map_err(|e| e.to_string())?;
            }
            let pod = self.cni_pod(netns.path(), &id, "eth0");
            let result = cni::run_chain(&list, &launcher, CniCommand::Add, &pod, None, timeout)
                .map_err(|e| e.to_string())?
                .ok_or("the CNI chain returned no result")?;
            let ip = first_ipv4(&result).ok_or_else(|| {
                format!(
                    "the CNI result of {} has no IPv4 address: {result}",
                    list.file.display()
                )
            })?;
            Ok::<_, String>((result, ip))
        })();
        match added {
            Ok((result, ip)) => {
                let kinds: Vec<&str> = (0..list.plugins.len()).map(|i| list.kind(i)).collect();
                self.note(format!(
                    "sandbox {}: network namespace {}, CNI ADD {} ({}) -> {ip}",
                    &id[..12],
                    netns.name(),
                    list.name,
                    kinds.join(" -> ")
                ));
                Ok(Sandbox {
                    netns: Some(netns),
                    ip,
                    id,
                    cni: Some((list, result)),
                    loopback,
                })
            }
            Err(e) => {
                // Whatever was set up goes again.
                let pod = self.cni_pod(netns.path(), &id, "eth0");
                let _ = cni::run_chain(&list, &launcher, CniCommand::Del, &pod, None, timeout);
                let _ = self.shared.run.delete_netns(&netns);
                Err(format!("CNI ADD ({}): {e}", list.file.display()))
            }
        }
    }

    fn sync_container(&mut self, i: usize) {
        let now = Instant::now();
        // An exit.
        if let Some(p) = self.containers[i].process.clone()
            && self.shared.run.exited(&p).is_some()
        {
            let status = self.shared.run.stop(&p);
            self.container_exited(i, status);
        }
        let c = &self.containers[i];
        if c.process.is_none() {
            if c.next_start.is_some_and(|at| now >= at) {
                self.start_container(i);
            }
            return;
        }
        self.run_probes(i);
    }

    /// Records an exit and decides about a restart.
    fn container_exited(&mut self, i: usize, status: Option<ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        let policy = self.restart_policy();
        let max = self.shared.timings.restart_backoff_max;
        let pod_name = self.name.clone();
        let terminating = self.terminating;
        let c = &mut self.containers[i];
        let signal = status.and_then(|s| s.signal());
        let code = status
            .and_then(|s| s.code())
            .unwrap_or_else(|| 128 + signal.unwrap_or(9));
        let started_at = match &c.state {
            State::Running { started_at } => started_at.clone(),
            _ => String::new(),
        };
        let log = c.process.as_ref().map(|p| p.log.clone());
        let message = (code != 0)
            .then(|| log.map(|l| log_tail(&l, 3)).unwrap_or_default())
            .filter(|m| !m.is_empty());
        let term = Terminated {
            exit_code: code,
            signal,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            message,
            started_at,
            finished_at: super::register::now(),
            container_id: c.container_id.clone(),
        };
        let how = match signal {
            Some(s) => format!("signal {s}"),
            None => format!("exit code {code}"),
        };
        let why = c.killed_for.take();
        c.process = None;
        c.ready = false;
        c.started = false;
        let restart = match policy.as_str() {
            _ if terminating => false,
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        let name = c.spec.name.clone();
        c.state = State::Terminated(term.clone());
        c.prior = c.last.replace(term);
        if restart {
            let delay = if c.restart_count == 0 {
                Duration::ZERO
            } else {
                let d = c.backoff;
                c.backoff = (c.backoff * 2).min(max);
                d
            };
            c.next_start = Some(Instant::now() + delay);
            if !delay.is_zero() {
                c.state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "back-off {}s restarting failed container={name} pod={pod_name}",
                        delay.as_secs()
                    ),
                };
            }
        } else {
            c.next_start = None;
        }
        let step = match why {
            Some(w) => format!("container {name} exited: {how} (killed: {w})"),
            None => format!("container {name} exited: {how}"),
        };
        self.note(if restart {
            format!("{step}; restarting per restartPolicy {policy}")
        } else {
            step
        });
    }

    /// Starts container `i` (or records why it cannot start).
    fn start_container(&mut self, i: usize) {
        match self.launch_container(i) {
            Ok(()) => {}
            Err((reason, message)) => {
                let retry = self.shared.timings.retry;
                let c = &mut self.containers[i];
                let name = c.spec.name.clone();
                let changed = !matches!(&c.state, State::Waiting { reason: r, message: m } if *r == reason && *m == message);
                c.state = State::Waiting {
                    reason: reason.clone(),
                    message: message.clone(),
                };
                c.next_start = Some(Instant::now() + retry);
                if changed {
                    self.note(format!(
                        "container {name} cannot start: {reason}: {message}"
                    ));
                    self.event(
                        "Warning",
                        if reason == "ErrImagePull" {
                            "Failed"
                        } else {
                            &reason
                        },
                        &message,
                        Some(&name),
                    );
                }
            }
        }
    }

    fn launch_container(&mut self, i: usize) -> Result<(), (String, String)> {
        let spec = self.containers[i].spec.clone();
        let image = spec.image.clone().unwrap_or_default();
        let config_err = |m: String| ("CreateContainerConfigError".to_string(), m);
        let (entry, image_binaries) = images::resolve(&self.shared.binaries, &image)
            .map_err(|e| ("ErrImagePull".to_string(), e.to_string()))?;
        let facts = self.facts();
        let mut sources = ApiSources::new(&self.shared, &self.pod);
        let env = env::environment(&self.pod, &spec, &facts, &mut sources)
            .map_err(|e| config_err(e.to_string()))?;
        let argv = env::argv(&spec, entry.path, &env);
        let probe = |p: &Option<Probe>, field: &str| {
            p.as_ref()
                .map(|p| {
                    ProbeRun::from_spec(p, &spec, &format!("container {}: {field}", spec.name))
                })
                .transpose()
                .map_err(config_err)
        };
        let startup = probe(&spec.startup_probe, "startupProbe")?;
        let liveness = probe(&spec.liveness_probe, "livenessProbe")?;
        let readiness = probe(&spec.readiness_probe, "readinessProbe")?;

        let volumes = self
            .volumes
            .as_ref()
            .expect("volumes are ready before containers");
        let mut mounts: Vec<Mount> = image_binaries
            .into_iter()
            .map(|b| Mount {
                source: b.host,
                target: b.path,
                read_only: true,
            })
            .collect();
        // The pod's resolv.conf (the kubelet's), before the volumes: a
        // volume mounted over /etc wins, as it does under a real runtime.
        let resolv_conf = self.dir.join("resolv.conf");
        let node_file = match std::fs::read_to_string(&self.shared.dns.resolv_conf) {
            Ok(text) => text,
            Err(e) => {
                self.shared.note(
                    &self.namespace,
                    &self.name,
                    format!(
                        "cannot read the node's {} ({e}); the pod's resolv.conf has no node entries",
                        self.shared.dns.resolv_conf.display()
                    ),
                );
                String::new()
            }
        };
        let text = super::dns::pod_resolv_conf(&self.pod, &self.shared.dns, &node_file);
        crate::run::write_atomic(&resolv_conf, text.as_bytes())
            .map_err(|e| config_err(format!("{}: {e}", resolv_conf.display())))?;
        mounts.push(Mount {
            source: resolv_conf,
            target: PathBuf::from("/etc/resolv.conf"),
            read_only: true,
        });
        for (k, vm) in spec.volume_mounts.iter().flatten().enumerate() {
            let source = volumes.sources.get(&vm.name).ok_or_else(|| {
                config_err(format!(
                    "container {}: volumeMounts[{k}].name: no volume {:?} in the pod",
                    spec.name, vm.name
                ))
            })?;
            let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                None => source.clone(),
                Some(sub) => {
                    let p = Path::new(sub);
                    if p.is_absolute()
                        || p.components()
                            .any(|c| matches!(c, std::path::Component::ParentDir))
                    {
                        return Err(config_err(format!(
                            "container {}: volumeMounts[{k}].subPath {sub:?} must be relative, without `..`",
                            spec.name
                        )));
                    }
                    let s = source.join(p);
                    if !s.exists() {
                        std::fs::create_dir_all(&s).map_err(|e| config_err(e.to_string()))?;
                    }
                    s
                }
            };
            mounts.push(Mount {
                source,
                target: vm.mount_path.clone().into(),
                read_only: vm.read_only.unwrap_or(false),
            });
        }
        let cdir = self.dir.join("containers").join(&spec.name);
        let root = cdir.join("root");
        std::fs::create_dir_all(&root)
            .map_err(|e| config_err(format!("{}: {e}", root.display())))?;
        let restart_count = {
            let c = &self.containers[i];
            if c.last.is_some() {
                c.restart_count + 1
            } else {
                0
            }
        };
        let launch = Launch {
            root,
            mounts,
            argv: argv.clone(),
            env: Some(env),
            workdir: spec.working_dir.clone().map(PathBuf::from),
            hostname: (!self.host_network).then(|| self.name.clone()),
        };
        let file = cdir.join(format!("launch-{restart_count}.json"));
        launch.write(&file).map_err(|e| config_err(e.to_string()))?;
        let netns = self
            .sandbox
            .as_ref()
            .and_then(|s| s.netns.clone())
            .unwrap_or_else(|| self.node_netns().clone());
        let process = ProcessSpec::new(
            format!("pod-{}.{}.{}", self.namespace, self.name, spec.name),
            &self.shared.container_init,
        )
        .arg("--spec")
        .arg(&file);
        let p = self
            .shared
            .run
            .spawn(&process, &netns)
            .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
        let now = Instant::now();
        let c = &mut self.containers[i];
        c.restart_count = restart_count;
        c.container_id = random_hex(ID_LEN);
        c.process = Some(p.clone());
        c.launch = Some(file);
        c.state = State::Running {
            started_at: super::register::now(),
        };
        c.next_start = None;
        c.ready = false;
        c.started = startup.is_none();
        c.startup = startup;
        c.liveness = liveness;
        c.readiness = readiness;
        for p in [&mut c.startup, &mut c.liveness, &mut c.readiness]
            .into_iter()
            .flatten()
        {
            p.reset(now);
        }
        let name = spec.name.clone();
        self.note(format!(
            "container {name} started (pid {}, restart {restart_count}): {}",
            p.pid,
            argv.join(" ")
        ));
        self.event(
            "Normal",
            "Pulled",
            &format!("Container image {image:?} already present on machine"),
            Some(&name),
        );
        self.event(
            "Normal",
            "Created",
            &format!("Created container: {name}"),
            Some(&name),
        );
        self.event(
            "Normal",
            "Started",
            &format!("Started container {name}"),
            Some(&name),
        );
        Ok(())
    }

    /// Runs the probes that are due; a failed startup or liveness probe
    /// kills the container (restarted per policy when its exit is seen).
    fn run_probes(&mut self, i: usize) {
        let Some(ip) = self.pod_ip() else { return };
        let node = self.node_netns().clone();
        let now = Instant::now();
        let mut kill: Option<String> = None;
        let mut events: Vec<(String, String)> = Vec::new();
        let c = &mut self.containers[i];
        let name = c.spec.name.clone();
        let kinds: [(&str, &mut Option<ProbeRun>); 3] = [
            ("Startup", &mut c.startup),
            ("Liveness", &mut c.liveness),
            ("Readiness", &mut c.readiness),
        ];
        let mut started = c.started;
        let mut ready = c.ready;
        for (kind, probe) in kinds {
            let Some(probe) = probe.as_mut() else {
                continue;
            };
            if kind != "Startup" && !started {
                continue;
            }
            if kind == "Startup" && started {
                continue;
            }
            if now < probe.due {
                continue;
            }
            probe.due = now + probe.period;
            let outcome = probe.check.run_from(&node, ip, probe.timeout);
            let (passed, detail) = match outcome {
                Ok(o) => (o.passed, o.detail),
                Err(e) => (false, e.to_string()),
            };
            if passed {
                probe.successes += 1;
                probe.failures = 0;
            } else {
                probe.failures += 1;
                probe.successes = 0;
                events.push(("Unhealthy".into(), format!("{kind} probe failed: {detail}")));
            }
            match kind {
                "Startup" => {
                    if probe.successes >= 1 {
                        started = true;
                    } else if probe.failures >= probe.failure_threshold {
                        kill = Some(format!("failed startup probe ({detail})"));
                    }
                }
                "Liveness" => {
                    if probe.failures >= probe.failure_threshold {
                        kill = Some(format!("failed liveness probe ({detail})"));
                    }
                }
                _ => {
                    if probe.successes >= probe.success_threshold {
                        ready = true;
                    } else if probe.failures >= probe.failure_threshold {
                        ready = false;
                    }
                }
            }
        }
        if c.readiness.is_none() {
            ready = started;
        }
        let became_ready = ready && !c.ready;
        c.started = started;
        c.ready = ready;
        if became_ready {
            self.note(format!("container {name} is ready"));
        }
        for (reason, message) in events {
            self.event("Warning", &reason, &message, Some(&name));
        }
        if let Some(why) = kill {
            let grace = self.grace_period();
            let c = &mut self.containers[i];
            let Some(p) = c.process.clone() else { return };
            c.killed_for = Some(why.clone());
            self.note(format!(
                "container {name} {why}: stopping it (SIGTERM, grace {}s)",
                grace.as_secs()
            ));
            self.event(
                "Normal",
                "Killing",
                &format!("Container {name} {why}, will be restarted"),
                Some(&name),
            );
            let status = self.shared.run.stop_within(&p, grace);
            self.container_exited(i, status);
        }
    }

    fn is_terminal(&self) -> bool {
        self.phase() == "Succeeded" || self.phase() == "Failed"
    }

    fn phase(&self) -> &'static str {
        let policy = self.restart_policy();
        let all_done = self.containers.iter().all(|c| {
            c.process.is_none() && c.next_start.is_none() && matches!(c.state, State::Terminated(_))
        });
        if all_done && policy != "Always" && !self.containers.is_empty() {
            let ok = self
                .containers
                .iter()
                .all(|c| matches!(&c.state, State::Terminated(t) if t.exit_code == 0));
            return if ok { "Succeeded" } else { "Failed" };
        }
        if self.containers.iter().any(|c| c.process.is_some()) {
            return "Running";
        }
        if self.containers.iter().any(|c| c.last.is_some()) {
            // Between a crash and its restart the pod still runs.
            return "Running";
        }
        "Pending"
    }

    fn set_condition(&mut self, kind: &'static str, value: bool) {
        let now = super::register::now();
        let entry = self.conditions.entry(kind).or_insert((value, now.clone()));
        if entry.0 != value {
            *entry = (value, now);
        }
    }

    /// The status as kubelet reports it.
    fn status(&mut self, terminating: bool) -> Value {
        let sandbox_ready = self.sandbox.is_some() && !self.network_down;
        let all_ready = !self.containers.is_empty() && self.containers.iter().all(|c| c.ready);
        // Init containers are refused (the pod never initializes); else
        // there is nothing to initialize.
        let initialized = !self.has_init_containers();
        self.set_condition("PodReadyToStartContainers", sandbox_ready);
        self.set_condition("Initialized", initialized);
        self.set_condition("ContainersReady", all_ready && !terminating);
        self.set_condition("Ready", all_ready && !terminating);
        let scheduled = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
            .map(|c| serde_json::to_value(c).unwrap_or(Value::Null));
        let mut conditions: Vec<Value> = self
            .conditions
            .iter()
            .map(|(kind, (ok, at))| {
                let mut c = json!({
                    "type": kind, "status": if *ok { "True" } else { "False" }, "lastTransitionTime": at,
                    "lastProbeTime": null,
                });
                if !*ok && (*kind == "Ready" || *kind == "ContainersReady") {
                    let unready: Vec<&str> = self
                        .containers
                        .iter()
                        .filter(|c| !c.ready)
                        .map(|c| c.spec.name.as_str())
                        .collect();
                    c["reason"] = "ContainersNotReady".into();
                    c["message"] = format!("containers with unready status: [{}]", unready.join(" ")).into();
                }
                c
            })
            .collect();
        conditions.extend(scheduled);
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let image = c.spec.image.clone().unwrap_or_default();
                let mut s = json!({
                    "name": c.spec.name,
                    "image": image,
                    "imageID": format!("e2e-image://{}", images::image_name(&image)),
                    "ready": c.ready,
                    "started": c.process.is_some() && c.started,
                    "restartCount": c.restart_count,
                    "state": state_json(&c.state),
                    "lastState": match c.state {
                        State::Terminated(_) => c.prior.as_ref(),
                        _ => c.last.as_ref(),
                    }
                    .map(|t| json!({"terminated": terminated_json(t)}))
                    .unwrap_or(json!({})),
                });
                if !c.container_id.is_empty() {
                    s["containerID"] = format!("e2e://{}", c.container_id).into();
                }
                s
            })
            .collect();
        let host_ip = self.shared.spec.ip.to_string();
        let mut status = json!({
            "phase": self.phase(),
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        });
        if let Some(ip) = self.pod_ip().filter(|_| !self.network_down) {
            status["podIP"] = ip.to_string().into();
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        status
    }

    /// Patches the status when it changed.
    fn report(&mut self) {
        let status = self.status(false);
        self.patch_status(status);
    }

    fn patch_status(&mut self, status: Value) {
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let body = json!({"status": status});
        let name = self.name.clone();
        match self.shared.api(
            &format!("patch the status of pod {}/{name}", self.namespace),
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&body)),
        ) {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    fn update_view(&self) {
        let mut v = Shared::lock(&self.view);
        v.netns = self
            .sandbox
            .as_ref()
            .and_then(|s| s.netns.clone())
            .filter(|_| !self.network_down);
        v.ip = self.pod_ip();
        v.containers = self
            .containers
            .iter()
            .map(|c| {
                (
                    c.spec.name.clone(),
                    ContainerView {
                        process: c.process.clone(),
                        restart_count: c.restart_count,
                        launch: c.launch.clone(),
                    },
                )
            })
            .collect();
    }

    /// CNI DEL (the chain, then loopback) and the namespace removed.
    fn teardown_network(&mut self) {
        self.network_down = true;
        let Some(sandbox) = &self.sandbox else { return };
        let Some(netns) = sandbox.netns.clone() else {
            return;
        };
        let launcher = NodeLauncher {
            shared: &self.shared,
            dir: self.dir.join("cni"),
        };
        let timeout = self.shared.timings.cni_timeout;
        if let Some((list, result)) = &sandbox.cni {
            let pod = self.cni_pod(netns.path(), &sandbox.id, "eth0");
            match cni::run_chain(
                list,
                &launcher,
                CniCommand::Del,
                &pod,
                Some(result),
                timeout,
            ) {
                Ok(_) => self.note(format!("CNI DEL {} done", list.name)),
                Err(e) => self.note(format!("CNI DEL {} failed: {e}", list.name)),
            }
        }
        if sandbox.loopback {
            let pod = self.cni_pod(netns.path(), &sandbox.id, "lo");
            let _ = cni::run_chain(
                &loopback_list(),
                &launcher,
                CniCommand::Del,
                &pod,
                None,
                timeout,
            );
        }
        match self.shared.run.delete_netns(&netns) {
            Ok(()) => self.note(format!("network namespace {} removed", netns.name())),
            Err(e) => self.note(format!(
                "network namespace {} not removed: {e}",
                netns.name()
            )),
        }
        self.update_view();
    }

    /// Graceful deletion (or the object vanished: `gone`).
    fn terminate(&mut self, gone: bool) {
        self.terminating = true;
        let grace = if gone {
            self.shared.timings.gone_grace
        } else {
            self.grace_period()
        };
        let running: Vec<(usize, ProcessInfo)> = self
            .containers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.process.clone().map(|p| (i, p)))
            .collect();
        if !running.is_empty() {
            self.note(format!(
                "stopping {} container(s): SIGTERM, grace period {}s, then SIGKILL",
                running.len(),
                grace.as_secs()
            ));
            for (i, _) in &running {
                let name = self.containers[*i].spec.name.clone();
                self.event(
                    "Normal",
                    "Killing",
                    &format!("Stopping container {name}"),
                    Some(&name),
                );
            }
            let run = self.shared.run.clone();
            let statuses: Vec<(usize, Option<ExitStatus>)> = std::thread::scope(|s| {
                let handles: Vec<_> = running
                    .iter()
                    .map(|(i, p)| {
                        let run = run.clone();
                        (*i, s.spawn(move || run.stop_within(p, grace)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(i, h)| (i, h.join().ok().flatten()))
                    .collect()
            });
            for (i, status) in statuses {
                self.container_exited(i, status);
            }
        }
        for c in &mut self.containers {
            c.next_start = None;
            c.ready = false;
        }
        if !gone {
            let status = self.status(true);
            self.patch_status(status);
        }
        if !self.network_down {
            self.teardown_network();
        }
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if gone {
            self.note("pod object was already gone".into());
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let name = self.name.clone();
        match self.shared.api(
            &format!("delete pod {}/{name}", self.namespace),
            api.delete(&name, &params),
        ) {
            Ok(_) => self.note("pod object deleted (grace period 0)".into()),
            Err(e) => self.note(format!("pod object not deleted: {e}")),
        }
    }

    /// Posts a core/v1 Event about the pod (or one of its containers), as
    /// kubelet's recorder does; best effort.
    fn event(&self, kind: &str, reason: &str, message: &str, container: Option<&str>) {
        if self.shared.is_stopping() {
            return;
        }
        let mut involved = json!({
            "apiVersion": "v1", "kind": "Pod", "namespace": self.namespace,
            "name": self.name, "uid": self.uid,
        });
        if let Some(c) = container {
            involved["fieldPath"] = format!("spec.containers{{{c}}}").into();
        }
        let now = super::register::now();
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", self.name), "namespace": self.namespace},
            "involvedObject": involved,
            "reason": reason, "message": message, "type": kind,
            "source": {"component": "kubelet", "host": self.shared.spec.name},
            "reportingComponent": "kubelet", "reportingInstance": self.shared.spec.name,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        let Ok(event) = serde_json::from_value::<k8s_openapi::api::core::v1::Event>(event) else {
            return;
        };
        let api: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.shared.client.clone(), &self.namespace);
        self.shared.handle.spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::debug!("could not post an event: {e}");
            }
        });
    }
}

fn state_json(s: &State) -> Value {
    match s {
        State::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if !message.is_empty() {
                w["message"] = message.clone().into();
            }
            json!({"waiting": w})
        }
        State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        State::Terminated(t) => json!({"terminated": terminated_json(t)}),
    }
}

fn terminated_json(t: &Terminated) -> Value {
    let mut v = json!({
        "exitCode": t.exit_code, "reason": t.reason,
        "startedAt": if t.started_at.is_empty() { Value::Null } else { t.started_at.clone().into() },
        "finishedAt": t.finished_at,
        "containerID": format!("e2e://{}", t.container_id),
    });
    if let Some(s) = t.signal {
        v["signal"] = s.into();
    }
    if let Some(m) = &t.message {
        v["message"] = m.clone().into();
    }
    v
}

/// containerd's loopback network (its own, not from the conf dir).
fn loopback_list() -> NetworkConfigList {
    NetworkConfigList {
        file: PathBuf::from("(built in: loopback)"),
        cni_version: cni::CNI_VERSION.into(),
        name: "cni-loopback".into(),
        plugins: vec![serde_json::Map::from_iter([(
            "type".to_string(),
            Value::from("loopback"),
        )])],
    }
}

/// The first IPv4 address of a CNI result.
fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

/// The `kubernetes` Service's ClusterIP and port.
fn kubernetes_service(shared: &Shared) -> Option<(Ipv4Addr, u16)> {
    let api: Api<Service> = Api::namespaced(shared.client.clone(), "default");
    let svc = shared
        .api("read the kubernetes Service", api.get("kubernetes"))
        .ok()?;
    let spec = svc.spec?;
    let ip = spec.cluster_ip?.parse().ok()?;
    let port = spec.ports?.first()?.port;
    Some((ip, u16::try_from(port).ok()?))
}

/// Runs a CNI plugin of the node's `/opt/cni/bin` with the node's view of
/// the filesystem (its private paths bind-mounted where a node has them),
/// through `container-init`, in the node's network namespace.
struct NodeLauncher<'a> {
    shared: &'a Shared,
    /// Where the launch specs of this pod's invocations go.
    dir: PathBuf,
}

impl PluginLauncher for NodeLauncher<'_> {
    fn cni_path(&self) -> String {
        "/opt/cni/bin".into()
    }

    fn command(&self, kind: &str) -> Option<(Command, PathBuf)> {
        if kind.contains('/') {
            return None;
        }
        let binary = self.shared.cni_bin_dir().join(kind);
        if !binary.exists() {
            return None;
        }
        let paths: Vec<PathBuf> = Shared::lock(&self.shared.node_paths)
            .iter()
            .cloned()
            .collect();
        let mounts = paths
            .iter()
            .filter_map(|p| {
                let source = self.shared.fs.join(p.strip_prefix("/").ok()?);
                source.exists().then(|| Mount {
                    source,
                    target: p.clone(),
                    read_only: false,
                })
            })
            .collect();
        let root = self.shared.fs.join("var/lib/kubelet/cni-root");
        std::fs::create_dir_all(&root).ok()?;
        std::fs::create_dir_all(&self.dir).ok()?;
        let launch = Launch {
            root,
            mounts,
            argv: vec![format!("/opt/cni/bin/{kind}")],
            env: None,
            workdir: None,
            hostname: None,
        };
        let file = self.dir.join(format!("{kind}-{}.json", random_hex(8)));
        launch.write(&file).ok()?;
        let mut cmd = self.shared.spec.netns.command(&self.shared.container_init);
        cmd.arg("--spec").arg(&file);
        Some((cmd, binary))
    }
}

/// The API as a source of env values and volumes, with the node's
/// credentials (the Node authorizer lets it read what its pods refer to).
struct ApiSources<'a> {
    shared: &'a Shared,
    pod: &'a Pod,
    namespace: String,
}

impl<'a> ApiSources<'a> {
    fn new(shared: &'a Shared, pod: &'a Pod) -> Self {
        ApiSources {
            shared,
            pod,
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        }
    }

    fn get<K>(&self, kind: &str, name: &str) -> Result<Option<K>, String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        self.shared.api(
            &format!("read {kind} {}/{name}", self.namespace),
            api.get_opt(name),
        )
    }
}

impl EnvSources for ApiSources<'_> {
    fn config_map(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        Ok(self
            .get::<ConfigMap>("ConfigMap", name)?
            .map(|cm| cm.data.unwrap_or_default()))
    }

    fn secret(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        Ok(self.get::<Secret>("Secret", name)?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        }))
    }
}

impl VolumeSources for ApiSources<'_> {
    fn config_map(&mut self, name: &str) -> Result<Option<ConfigMap>, String> {
        self.get("ConfigMap", name)
    }

    fn secret(&mut self, name: &str) -> Result<Option<Secret>, String> {
        self.get("Secret", name)
    }

    fn token(
        &mut self,
        audiences: &[String],
        expiration_seconds: i64,
    ) -> Result<(String, i64), String> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let request: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": audiences,
                "expirationSeconds": expiration_seconds,
                "boundObjectRef": {
                    "apiVersion": "v1", "kind": "Pod",
                    "name": self.pod.metadata.name, "uid": self.pod.metadata.uid,
                },
            },
        }))
        .map_err(|e| e.to_string())?;
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let answer = self.shared.api(
            &format!("TokenRequest for ServiceAccount {}/{sa}", self.namespace),
            api.create_token_request(&sa, &PostParams::default(), &request),
        )?;
        let status = answer
            .status
            .ok_or("the TokenRequest came back without a status")?;
        let token = status
            .token
            .ok_or("the TokenRequest came back without a token")?;
        let lifetime = status
            .expiration_timestamp
            .map(|t| t.0.as_second() - k8s_openapi::jiff::Timestamp::now().as_second())
            .unwrap_or(expiration_seconds);
        Ok((token, lifetime.max(1)))
    }
}
