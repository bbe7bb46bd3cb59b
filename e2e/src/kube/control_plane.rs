//! A real Kubernetes control plane for tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler (built by [`super::build`]),
//! run as processes of a [`Run`] inside the topology's control-plane
//! network namespace.
//!
//! etcd listens on that namespace's loopback only; the API server on every
//! address of it, advertising the control plane's fabric address
//! ([`AddressPlan::control_plane_ip`], 172.30.0.2:6443): the address the
//! `kubernetes` Service's endpoints name, which nodes reach over the fabric
//! bridge and pods through their node (the topology routes both ways). The
//! service and cluster CIDRs are the address plan's: ClusterIPs from
//! `service_range`, node pod CIDRs (`/24`s allocated by the controller
//! manager) from `pod_supernet`, clear of the fabric.
//!
//! State (etcd's data, the PKI, kubeconfigs) lives in `<run dir>/kube/`,
//! logs in `<run dir>/logs/`; both are kept when the run fails.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;

use super::build::KubeBinaries;
use super::kubectl::{Kubectl, KubectlError};
use super::pki::{ClientIdentity, Pki, PkiError};
use crate::netns::NetNs;
use crate::process::{ProcessInfo, ProcessSpec, log_tail};
use crate::run::{Run, RunError};
use crate::topology::AddressPlan;

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{component} did not become ready: {reason}\nits log ({log}) ends with:\n{tail}")]
    NotReady {
        component: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error(transparent)]
    Kubectl(#[from] KubectlError),
}

/// Where the control plane listens and which address ranges it hands out.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    pub binaries: KubeBinaries,
    /// The API server's address on the fabric (what nodes and the
    /// `kubernetes` Service use).
    pub advertise_address: Ipv4Addr,
    pub port: u16,
    /// ClusterIPs; the first is the `kubernetes` Service's.
    pub service_cidr: Ipv4Net,
    /// Pod addresses; the controller manager gives each node a `/24` of it.
    pub cluster_cidr: Ipv4Net,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
    /// How long one kubectl command may take.
    pub kubectl_timeout: Duration,
}

/// The API server's secure port (as kubeadm's).
pub const API_SERVER_PORT: u16 = 6443;
/// The cluster DNS domain Kubernetes names Services under.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// etcd's client port, on the control plane's loopback.
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// kube-controller-manager's and kube-scheduler's secure ports.
const CONTROLLER_MANAGER_PORT: u16 = 10257;
const SCHEDULER_PORT: u16 = 10259;

impl ControlPlaneConfig {
    /// The control plane for the topology's address plan.
    pub fn for_plan(binaries: KubeBinaries, plan: &AddressPlan) -> Self {
        ControlPlaneConfig {
            binaries,
            advertise_address: plan.control_plane_ip(),
            port: API_SERVER_PORT,
            service_cidr: plan.service_range,
            cluster_cidr: plan.pod_supernet,
            ready_timeout: Duration::from_secs(120),
            kubectl_timeout: Duration::from_secs(60),
        }
    }

    /// The `kubernetes` Service's ClusterIP: the service range's first address.
    pub fn kubernetes_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.service_cidr.network()) + 1)
    }

    /// `https://<advertise address>:<port>`.
    pub fn server(&self) -> String {
        format!("https://{}:{}", self.advertise_address, self.port)
    }
}

/// A running control plane. Its processes belong to the [`Run`], which
/// stops them when it ends; [`ControlPlane::stop`] stops them earlier.
#[derive(Debug)]
pub struct ControlPlane {
    pub config: ControlPlaneConfig,
    /// `<run dir>/kube`: etcd's data, the PKI, kubeconfigs.
    pub dir: PathBuf,
    pki: Pki,
    netns: NetNs,
    admin_kubeconfig: PathBuf,
    /// In start order: etcd, API server, controller manager, scheduler.
    processes: Vec<ProcessInfo>,
}

/// The admin: `system:masters`, as kubeadm's `admin.conf`.
fn admin() -> ClientIdentity {
    ClientIdentity::new("kubernetes-admin", &["system:masters"])
}

impl ControlPlane {
    /// Makes the PKI and starts etcd, the API server (waiting for
    /// `/readyz`), the controller manager and the scheduler, inside
    /// `netns`; returns once the controllers work (the `default`
    /// ServiceAccount exists) and the scheduler listens. `progress` hears
    /// one line per step.
    pub fn start(
        run: &Run,
        netns: &NetNs,
        config: ControlPlaneConfig,
        progress: &dyn Fn(&str),
    ) -> Result<ControlPlane, ControlPlaneError> {
        let dir = run.dir().join("kube");
        let pki_dir = dir.join("pki");
        let service_ip = config.kubernetes_service_ip();
        let dns_names: Vec<String> = [
            "kubernetes".to_string(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            format!("kubernetes.default.svc.{CLUSTER_DOMAIN}"),
            "localhost".into(),
        ]
        .into();
        let ips = [
            IpAddr::V4(service_ip),
            IpAddr::V4(config.advertise_address),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ];
        progress("making the cluster CA, serving and client certificates, service-account keys");
        let pki = Pki::create(&pki_dir, &dns_names, &ips)?;
        let server = config.server();
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        pki.write_kubeconfig(&admin_kubeconfig, &server, &admin())?;
        let cm_kubeconfig = dir.join("controller-manager.kubeconfig");
        pki.write_kubeconfig(
            &cm_kubeconfig,
            &server,
            &ClientIdentity::new("system:kube-controller-manager", &[]),
        )?;
        let scheduler_kubeconfig = dir.join("scheduler.kubeconfig");
        pki.write_kubeconfig(
            &scheduler_kubeconfig,
            &server,
            &ClientIdentity::new("system:kube-scheduler", &[]),
        )?;
        let mut cp = ControlPlane {
            config,
            dir,
            pki,
            netns: netns.clone(),
            admin_kubeconfig,
            processes: Vec::new(),
        };

        progress("starting etcd");
        let etcd = run.spawn(&cp.etcd_spec(), netns)?;
        cp.processes.push(etcd.clone());
        cp.wait_listening(run, &etcd, ETCD_CLIENT_PORT)?;

        progress("starting kube-apiserver and waiting for /readyz");
        let apiserver = run.spawn(&cp.apiserver_spec(), netns)?;
        cp.processes.push(apiserver.clone());
        cp.wait_apiserver_ready(run, &apiserver)?;

        progress("starting kube-controller-manager and kube-scheduler");
        let cm = run.spawn(&cp.controller_manager_spec(&cm_kubeconfig), netns)?;
        cp.processes.push(cm.clone());
        let scheduler = run.spawn(&cp.scheduler_spec(&scheduler_kubeconfig), netns)?;
        cp.processes.push(scheduler.clone());
        cp.wait_listening(run, &cm, CONTROLLER_MANAGER_PORT)?;
        cp.wait_listening(run, &scheduler, SCHEDULER_PORT)?;
        // The service-account controller at work: the controllers run.
        cp.wait_component(
            run,
            &cm,
            "the `default` ServiceAccount to be created",
            || {
                Ok(cp
                    .kubectl()
                    .get("serviceaccount", Some("default"), "default")?
                    .map(|_| ()))
            },
        )?;
        progress(&format!(
            "control plane ready at {} (kubeconfig {})",
            cp.config.server(),
            cp.admin_kubeconfig.display()
        ));
        Ok(cp)
    }

    /// The admin's kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The cluster CA certificate (PEM): what verifies the API server.
    pub fn ca_pem(&self) -> &str {
        self.pki.ca_pem()
    }

    /// The network namespace the control plane runs in.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// kubectl as the admin, from the control plane's namespace.
    pub fn kubectl(&self) -> Kubectl {
        self.kubectl_with(&self.admin_kubeconfig)
    }

    /// kubectl with another kubeconfig, from the control plane's namespace.
    pub fn kubectl_with(&self, kubeconfig: &Path) -> Kubectl {
        Kubectl {
            program: self.config.binaries.kubectl(),
            kubeconfig: kubeconfig.to_path_buf(),
            netns: self.netns.clone(),
            cache_dir: self.dir.join("kubectl-cache"),
            timeout: self.config.kubectl_timeout,
        }
    }

    /// Writes `<dir>/<name>.kubeconfig` with a client certificate for `who`
    /// (e.g. a node: `system:node:node0` in `system:nodes`).
    pub fn write_kubeconfig(
        &self,
        name: &str,
        who: &ClientIdentity,
    ) -> Result<PathBuf, ControlPlaneError> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        self.pki
            .write_kubeconfig(&path, &self.config.server(), who)?;
        Ok(path)
    }

    /// A kubelet serving certificate and key (PEM) for node `name` at `ip`
    /// (`system:node:<name>` in `system:nodes`, the subject the
    /// `kubernetes.io/kubelet-serving` signer requires), which
    /// the API server verifies with `--kubelet-certificate-authority`.
    pub fn kubelet_serving_cert(
        &self,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<(String, String), ControlPlaneError> {
        Ok(self.pki.serving_cert(
            &format!("system:node:{name}"),
            &["system:nodes"],
            &[name.to_string()],
            &[IpAddr::V4(ip)],
        )?)
    }

    /// One HTTP/1.1 `GET path` (`Connection: close`) to port `port` of pod
    /// `namespace/pod` through the API server's pods/portforward (kube-rs,
    /// as the admin, from the control plane's namespace): the raw answer,
    /// read until the forward ends (the pod closed the connection). An
    /// error when the forward is refused (no such pod: 404), when the
    /// kubelet server could not reach the port (its error channel's text)
    /// or after `timeout`.
    pub fn port_forward_get(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        use k8s_openapi::api::core::v1::Pod;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let kubeconfig = self.admin_kubeconfig.clone();
        let (namespace, pod, path) = (namespace.to_string(), pod.to_string(), path.to_string());
        let exchange = async move {
            let options = kube::config::KubeConfigOptions::default();
            let kubeconfig =
                kube::config::Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?;
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| e.to_string())?;
            let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
            let pods: kube::Api<Pod> = kube::Api::namespaced(client, &namespace);
            let mut forward = pods
                .portforward(&pod, &[port])
                .await
                .map_err(|e| format!("port-forward to {namespace}/{pod}:{port}: {e}"))?;
            let mut stream = forward.take_stream(port).ok_or("no stream")?;
            let error = forward.take_error(port).ok_or("no error channel")?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {pod}\r\nConnection: close\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            stream
                .read_to_end(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            drop(stream);
            let answer = String::from_utf8_lossy(&answer).into_owned();
            if answer.is_empty()
                && let Some(message) = error.await
            {
                return Err(format!("port-forward error: {message}"));
            }
            // kube-rs 4.2 reports SendAfterClosing here when the server
            // closed first (it did: the pod closed): not a failure.
            let _ = forward.join().await;
            Ok(answer)
        };
        self.netns
            .block_on(move || async move {
                tokio::time::timeout(timeout, exchange)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
            })
            .map_err(|e| e.to_string())?
    }

    /// The control plane's processes and their log files.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.processes
            .iter()
            .map(|p| (p.name.clone(), p.log.clone()))
            .collect()
    }

    /// Stops the components, last started first (etcd last): SIGTERM, then
    /// SIGKILL after the run's grace period.
    pub fn stop(mut self, run: &Run) {
        while let Some(p) = self.processes.pop() {
            run.stop(&p);
        }
    }

    fn etcd_spec(&self) -> ProcessSpec {
        let client = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        ProcessSpec::new("etcd", self.config.binaries.etcd()).args([
            "--name=e2e".to_string(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=e2e={peer}"),
            // A throwaway test cluster on a shared machine: no fsync per
            // write (what makes a cold etcd slow on a busy disk).
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ])
    }

    fn apiserver_spec(&self) -> ProcessSpec {
        let c = &self.config;
        let files = &self.pki.files;
        let issuer = format!("https://kubernetes.default.svc.{CLUSTER_DOMAIN}");
        ProcessSpec::new("kube-apiserver", c.binaries.kube_apiserver()).args([
            format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={}", c.port),
            format!("--advertise-address={}", c.advertise_address),
            format!("--service-cluster-ip-range={}", c.service_cidr),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", files.apiserver_cert().display()),
            format!("--tls-private-key-file={}", files.apiserver_key().display()),
            format!("--client-ca-file={}", files.ca_cert().display()),
            format!("--service-account-issuer={issuer}"),
            format!(
                "--service-account-key-file={}",
                files.service_account_pub().display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                files.service_account_key().display()
            ),
            // Kubelets' servers (port-forward): the API server presents
            // its own client certificate and verifies theirs against the
            // cluster CA at the Node's InternalIP.
            format!(
                "--kubelet-client-certificate={}",
                files.apiserver_kubelet_client_cert().display()
            ),
            format!(
                "--kubelet-client-key={}",
                files.apiserver_kubelet_client_key().display()
            ),
            format!(
                "--kubelet-certificate-authority={}",
                files.ca_cert().display()
            ),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            // Node agents and the CNI installer run privileged.
            "--allow-privileged=true".into(),
            // Webhooks and aggregated APIs are called at their endpoints
            // (there is no ClusterIP routing on the control plane's node).
            "--enable-aggregator-routing=true".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ])
    }

    fn controller_manager_spec(&self, kubeconfig: &Path) -> ProcessSpec {
        let c = &self.config;
        let files = &self.pki.files;
        let kubeconfig = kubeconfig.display();
        ProcessSpec::new(
            "kube-controller-manager",
            c.binaries.kube_controller_manager(),
        )
        .args([
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={CONTROLLER_MANAGER_PORT}"),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!("--root-ca-file={}", files.ca_cert().display()),
            format!(
                "--service-account-private-key-file={}",
                files.service_account_key().display()
            ),
            format!("--cluster-signing-cert-file={}", files.ca_cert().display()),
            format!("--cluster-signing-key-file={}", files.ca_key().display()),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", c.cluster_cidr),
            "--node-cidr-mask-size=24".into(),
            format!("--service-cluster-ip-range={}", c.service_cidr),
            "--profiling=false".into(),
            "--v=1".into(),
        ])
    }

    fn scheduler_spec(&self, kubeconfig: &Path) -> ProcessSpec {
        let kubeconfig = kubeconfig.display();
        ProcessSpec::new("kube-scheduler", self.config.binaries.kube_scheduler()).args([
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={SCHEDULER_PORT}"),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ])
    }

    /// Why `p` is not running, if it is not.
    fn exited(run: &Run, p: &ProcessInfo) -> Option<String> {
        run.exited(p)
            .map(|status| format!("{} exited ({status})", p.name))
    }

    fn not_ready(&self, p: &ProcessInfo, reason: String) -> ControlPlaneError {
        ControlPlaneError::NotReady {
            component: p.name.clone(),
            reason,
            log: p.log.clone(),
            tail: log_tail(&p.log, 30),
        }
    }

    fn wait_listening(
        &self,
        run: &Run,
        p: &ProcessInfo,
        port: u16,
    ) -> Result<(), ControlPlaneError> {
        self.netns
            .wait_for_listener(port, self.config.ready_timeout, &|| Self::exited(run, p))
            .map_err(|e| self.not_ready(p, e.to_string()))
    }

    fn wait_apiserver_ready(&self, run: &Run, p: &ProcessInfo) -> Result<(), ControlPlaneError> {
        self.wait_component(run, p, "GET /readyz to answer ok", || {
            let out = self.kubectl().run(&["get", "--raw", "/readyz"])?;
            Ok((out.trim() == "ok").then_some(()))
        })
    }

    /// Polls `check` until it answers, failing early when `p` exits.
    fn wait_component(
        &self,
        run: &Run,
        p: &ProcessInfo,
        what: &str,
        mut check: impl FnMut() -> Result<Option<()>, KubectlError>,
    ) -> Result<(), ControlPlaneError> {
        let mut gone = None;
        let waited = super::kubectl::wait_until(what, self.config.ready_timeout, || {
            if let Some(why) = Self::exited(run, p) {
                gone = Some(why);
                // Stop waiting: nothing will answer now.
                return Ok(Some(()));
            }
            check()
        });
        match (gone, waited) {
            (Some(why), _) => Err(self.not_ready(p, why)),
            (None, Ok(())) => Ok(()),
            (None, Err(e)) => Err(self.not_ready(p, e.to_string())),
        }
    }
}
