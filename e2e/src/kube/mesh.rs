//! The mesh installed the way users install it, on the real control plane
//! ([`super::KubeRun`]) with netns nodes running pods ([`super::node`]):
//! [`KubeMesh::install`] runs `istioctl-rs install -y` and returns once
//! istiod-rs, and ztunnel-rs and the node agent on every node, are Ready.
//! What the Kubernetes tests and `cargo xtask e2e` build on.
//!
//! The test cluster has no DNS: ztunnel-rs and the waypoints istiod-rs
//! provisions are given istiod's Service ClusterIP with `--set
//! ztunnel.xdsAddress=<ip>:15012` and `--set waypoint.xdsAddress=<ip>:15012`. The Service
//! exists only once a first install applied it, so [`KubeMesh::install`]
//! installs, reads the ClusterIP, and installs again: an upgrade in place,
//! as a user without cluster DNS would.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::{NodeError, NodeRuntime, NodeTimings, start_nodes};
use super::samples::condition;
use super::{KubeError, KubeRun, Kubectl, KubectlError};
use crate::binaries::{Binaries, BinaryError};
use crate::netns::NetNs;

/// How long one istioctl-rs command may take (its own waits are shorter).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(360);
/// The system namespace the install uses.
pub const SYSTEM_NAMESPACE: &str = "istio-system";
/// Pod selectors of the mesh's components (the install manifests' labels).
pub const ISTIOD: &str = "app=istiod";
pub const ZTUNNEL: &str = "app=ztunnel";
pub const NODE_AGENT: &str = "k8s-app=istio-cni-node";

#[derive(Debug, thiserror::Error)]
pub enum KubeMeshError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(transparent)]
    Kubectl(#[from] KubectlError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("`istioctl-rs {args}` failed:\n{stdout}{stderr}\n{state}\nlogs: {logs}")]
    Istioctl {
        args: String,
        stdout: String,
        stderr: String,
        /// Where the mesh's pods stand.
        state: String,
        logs: String,
    },
    #[error("{what}: {detail}")]
    Unexpected { what: String, detail: String },
}

/// A control plane, its nodes and (once [`KubeMesh::install`] ran) the
/// mesh. Dropping it stops the nodes, then the control plane and the run.
pub struct KubeMesh {
    /// Declared before `kube`: the node runtimes stop first.
    pub nodes: Vec<NodeRuntime>,
    pub kube: KubeRun,
    pub kubectl: Kubectl,
    pub binaries: Binaries,
    /// The `istioctl-rs` binary.
    pub istioctl: PathBuf,
    /// The `--set` values the last install used.
    pub install_values: Vec<String>,
    /// How long [`KubeMesh::start`] took for the control plane and for the nodes.
    pub start_timings: StartTimings,
}

/// How long bringing up the cluster took (binaries were built before).
#[derive(Clone, Copy, Debug, Default)]
pub struct StartTimings {
    /// Network, etcd, API server, controller manager, scheduler.
    pub control_plane: Duration,
    /// Every node runtime registered, Ready, kube-proxy programmed.
    pub nodes: Duration,
}

impl std::fmt::Debug for KubeMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMesh")
            .field("run", &self.kube.run.dir())
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl KubeMesh {
    /// Builds the binaries the images stand for (before any clock starts:
    /// an "image pull" is not a cargo build), starts the control plane and
    /// `nodes` node runtimes. The mesh is not installed yet.
    pub fn start(nodes: usize) -> Result<KubeMesh, KubeMeshError> {
        let binaries = Binaries::default();
        let istioctl = binaries.get("istioctl-rs", "istioctl-rs")?;
        for (package, bin) in [
            ("istiod-rs", "istiod-rs"),
            ("ztunnel-rs", "ztunnel-rs"),
            ("e2e", "echo"),
            ("e2e", "client"),
        ] {
            binaries.get(package, bin)?;
        }
        let started = Instant::now();
        let kube = KubeRun::start(nodes)?;
        let control_plane = started.elapsed();
        let kubectl = kube.control_plane.kubectl();
        let started = Instant::now();
        let nodes = start_nodes(&kube, &binaries, &NodeTimings::default(), &|s| {
            eprintln!("e2e: node: {s}")
        });
        let nodes = match nodes {
            Ok(nodes) => nodes,
            Err(e) => {
                kube.run.keep_dir();
                return Err(e.into());
            }
        };
        Ok(KubeMesh {
            nodes,
            kube,
            kubectl,
            binaries,
            istioctl,
            install_values: Vec::new(),
            start_timings: StartTimings {
                control_plane,
                nodes: started.elapsed(),
            },
        })
    }

    /// Where the run keeps the control plane's and the nodes' logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.kube.run.dir().join("logs")
    }

    /// The run's directory (nodes' filesystems under `nodes/`).
    pub fn run_dir(&self) -> &Path {
        self.kube.run.dir()
    }

    /// Runs `istioctl-rs <args>` against the cluster (in the control
    /// plane's network namespace, with the admin kubeconfig).
    pub fn istioctl(&self, args: &[&str]) -> Result<std::process::Output, KubeMeshError> {
        Ok(self
            .kubectl
            .run_client(&self.istioctl, args, COMMAND_TIMEOUT)?)
    }

    /// `istioctl-rs install -y` from nothing (or over an existing install)
    /// until every component is Ready on every node; returns how long that
    /// took. See the module's note on `ztunnel.xdsAddress`.
    pub fn install(&mut self, extra_values: &[&str]) -> Result<Duration, KubeMeshError> {
        let started = Instant::now();
        let existing = self
            .kubectl
            .get("service", Some(SYSTEM_NAMESPACE), "istiod")?;
        if existing.is_none() {
            // The first install applies everything; ztunnel-rs cannot find
            // istiod by name, so its wait ends short.
            let first = self.istioctl(&["install", "-y", "--timeout", "1s"])?;
            if !first.status.success() {
                let stderr = text(&first.stderr);
                if !stderr.contains("not ready after") {
                    return Err(self.istioctl_failed("install -y --timeout 1s", &first));
                }
            }
        }
        let ip = self.istiod_cluster_ip()?;
        let mut values = vec![
            format!("ztunnel.xdsAddress={ip}:15012"),
            format!("waypoint.xdsAddress={ip}:15012"),
        ];
        values.extend(extra_values.iter().map(|v| v.to_string()));
        let mut args = vec!["install", "-y", "--timeout", "300s"];
        for v in &values {
            args.extend(["--set", v.as_str()]);
        }
        let out = self.istioctl(&args)?;
        if !out.status.success() {
            return Err(self.istioctl_failed(&args.join(" "), &out));
        }
        self.install_values = values;
        Ok(started.elapsed())
    }

    fn istioctl_failed(&self, args: &str, out: &std::process::Output) -> KubeMeshError {
        self.kube.run.keep_dir();
        KubeMeshError::Istioctl {
            args: args.to_string(),
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
            state: self.describe_mesh(),
            logs: self.logs_dir().display().to_string(),
        }
    }

    /// The istiod Service's ClusterIP.
    pub fn istiod_cluster_ip(&self) -> Result<String, KubeMeshError> {
        let service = self
            .kubectl
            .get("service", Some(SYSTEM_NAMESPACE), "istiod")?
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: "the istiod Service".into(),
                detail: "install did not apply it".into(),
            })?;
        service["spec"]["clusterIP"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: "the istiod Service".into(),
                detail: format!("no spec.clusterIP: {}", service["spec"]),
            })
    }

    /// The node runtime of node `name`.
    pub fn node(&self, name: &str) -> Result<&NodeRuntime, KubeMeshError> {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("node {name:?}"),
                detail: format!(
                    "not a node of this cluster ({})",
                    self.node_names().join(", ")
                ),
            })
    }

    /// Node names, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name().to_string()).collect()
    }

    /// The network namespace of node `name` (where kubelet's probes and
    /// hostNetwork pods live).
    pub fn node_netns(&self, name: &str) -> Result<&NetNs, KubeMeshError> {
        self.kube
            .topology
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| &n.netns)
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("node {name:?}"),
                detail: "not in the topology".into(),
            })
    }

    /// The pods of `namespace` matching label `selector`.
    pub fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Value>, KubeMeshError> {
        let list = self
            .kubectl
            .json(&["get", "pods", "-n", namespace, "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The mesh component pod (`selector` of istio-system) on `node` (any
    /// node when `None`) that is not being deleted, if any.
    pub fn component_pod(
        &self,
        selector: &str,
        node: Option<&str>,
    ) -> Result<Option<Value>, KubeMeshError> {
        Ok(self
            .pods(SYSTEM_NAMESPACE, selector)?
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .find(|p| node.is_none_or(|n| p["spec"]["nodeName"] == n)))
    }

    /// The node running pod `namespace/name` and the pod's network
    /// namespace (its node's for a hostNetwork pod).
    pub fn pod_network(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(&NodeRuntime, NetNs), KubeMeshError> {
        let (node, view) = self
            .nodes
            .iter()
            .find_map(|n| n.pod(namespace, name).map(|v| (n, v)))
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("pod {namespace}/{name}"),
                detail: "no node runs it".into(),
            })?;
        let netns = match view.netns {
            Some(ns) => ns,
            None => self.node_netns(node.name())?.clone(),
        };
        Ok((node, netns))
    }

    /// Where each of the mesh's pods stands, for a failure message.
    pub fn describe_mesh(&self) -> String {
        [ISTIOD, ZTUNNEL, NODE_AGENT]
            .iter()
            .map(|s| format!("{s}:\n{}", self.describe(SYSTEM_NAMESPACE, s)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Where each pod of `selector` stands, one line each.
    pub fn describe(&self, namespace: &str, selector: &str) -> String {
        match self.pods(namespace, selector) {
            Ok(pods) => pods
                .iter()
                .map(|p| {
                    format!(
                        "  {} on {}: phase {}, Ready {:?}, containers {}",
                        p["metadata"]["name"],
                        p["spec"]["nodeName"],
                        p["status"]["phase"],
                        condition(p, "Ready"),
                        p["status"]["containerStatuses"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("  (could not list: {e})"),
        }
    }

    /// HTTP GET of `path` on `port` of the pod `namespace/name`, from its
    /// node (as kubelet's probes and Prometheus reach a pod).
    pub fn pod_get(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<crate::cluster::HttpResponse, KubeMeshError> {
        let pod = self
            .kubectl
            .get("pod", Some(namespace), name)?
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("pod {namespace}/{name}"),
                detail: "does not exist".into(),
            })?;
        let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        let ip: IpAddr = pod["status"]["podIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("pod {namespace}/{name}"),
                detail: format!("no podIP: {}", pod["status"]),
            })?;
        crate::http::get_at(self.node_netns(node)?, (ip, port).into(), path, timeout).map_err(|e| {
            KubeMeshError::Unexpected {
                what: format!("GET {path} on {namespace}/{name}:{port}"),
                detail: e.to_string(),
            }
        })
    }

    /// HTTP GET of `path` on `127.0.0.1:port` inside the network of pod
    /// `namespace/name` (as `kubectl port-forward` reaches a pod's loopback
    /// admin port); a hostNetwork pod's loopback is its node's.
    pub fn pod_loopback_get(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<crate::cluster::HttpResponse, KubeMeshError> {
        let (_, netns) = self.pod_network(namespace, name)?;
        crate::http::get(&netns, port, path, timeout).map_err(|e| KubeMeshError::Unexpected {
            what: format!("GET {path} on {namespace}/{name} 127.0.0.1:{port}"),
            detail: e.to_string(),
        })
    }

    /// The mesh component pod of `selector` on `node`, which must exist.
    pub fn required_component(&self, selector: &str, node: &str) -> Result<Value, KubeMeshError> {
        self.component_pod(selector, Some(node))?
            .ok_or_else(|| KubeMeshError::Unexpected {
                what: format!("the {selector} pod on {node}"),
                detail: format!("none:\n{}", self.describe(SYSTEM_NAMESPACE, selector)),
            })
    }

    /// GET `path` of the admin port (127.0.0.1:15000 in its pod) of the
    /// ztunnel-rs on `node`, as JSON (`/config_dump`, `/certs`).
    pub fn ztunnel_admin(&self, node: &str, path: &str) -> Result<Value, KubeMeshError> {
        let pod = self.required_component(ZTUNNEL, node)?;
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let resp = self.pod_loopback_get(
            SYSTEM_NAMESPACE,
            name,
            api::ports::ADMIN,
            path,
            Duration::from_secs(10),
        )?;
        let what = format!("GET {path} of ztunnel-rs {SYSTEM_NAMESPACE}/{name} on {node}");
        if resp.status != 200 {
            return Err(KubeMeshError::Unexpected {
                what,
                detail: format!("{}: {}", resp.status, resp.body),
            });
        }
        serde_json::from_str(&resp.body).map_err(|e| KubeMeshError::Unexpected {
            what,
            detail: format!("not JSON ({e}): {}", resp.body),
        })
    }

    /// The Prometheus text of the ztunnel-rs on `node` (its pod's 15020).
    pub fn ztunnel_metrics(&self, node: &str) -> Result<String, KubeMeshError> {
        let pod = self.required_component(ZTUNNEL, node)?;
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let resp = self.pod_get(
            SYSTEM_NAMESPACE,
            name,
            api::ports::STATS,
            "/metrics",
            Duration::from_secs(10),
        )?;
        Ok(resp.body)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
