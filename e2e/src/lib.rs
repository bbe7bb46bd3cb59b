//! The local cluster: a whole Kubernetes-shaped cluster on one Linux machine,
//! built from network namespaces, plus the sample apps and the [`Cluster`]
//! interface that end-to-end scenarios are written against.
//!
//! Layers, bottom up:
//! - [`privilege`]: may this process build namespaces (root, or a fresh user
//!   namespace with mapped root), or must the caller skip?
//! - [`run`]: one run of the harness: its id, directories, the processes and
//!   namespaces it owns, cleanup on drop / Ctrl-C / panic, and removal of what
//!   crashed runs left behind.
//! - [`netns`] and [`process`]: named network namespaces and processes started
//!   inside them with their output captured.
//! - [`topology`]: fabric bridge, nodes, pods, and the address plan.
//! - [`objects`], [`state`], [`config_dir`]: the Kubernetes objects the local
//!   cluster keeps and writes as YAML for `istiod-rs --config-dir`.
//! - [`cluster`] (the trait) and [`local`] (its network-namespace
//!   implementation, with [`deployments`]: Deployments as it runs them);
//!   [`mesh`] and [`cni`] are where the mesh plugs in.
//! - [`apps`]: the `echo` and `client` sample apps and their JSON reports.
//! - [`probe`] and [`prometheus`]: driving traffic from pods, waiting with
//!   deadlines, and reading the mesh's evidence (metrics, certificates,
//!   config dumps); [`procfs`]: a component's memory and open descriptors;
//!   [`scenarios`]: the end-to-end scenarios on them (and the churn soak,
//!   [`scenarios::soak`]);
//!   [`demo`]: `cargo xtask demo`; [`bench`]: `cargo xtask bench l4`.
//! - [`binaries`]: finds (and builds when stale) the binaries to run.
//! - [`http`]: GETs to components' loopback ports from inside their namespace.
//! - [`kube`]: a real Kubernetes control plane (etcd, kube-apiserver,
//!   controller manager, scheduler built from Go modules) in the topology's
//!   control-plane namespace, and `kubectl` to drive it.

pub mod apps;
pub mod bench;
pub mod binaries;
pub mod cluster;
pub mod cni;
pub mod config_dir;
pub mod demo;
pub mod deployments;
pub mod http;
pub mod kube;
pub mod local;
pub mod mesh;
pub mod netns;
pub mod objects;
pub mod privilege;
pub mod probe;
pub mod process;
pub mod procfs;
pub mod prometheus;
pub mod run;
pub mod scenarios;
pub mod state;
pub mod topology;

pub use cluster::{
    AppCommand, Cluster, ClusterError, ExecOutput, HttpResponse, PodInfo, PodRequest, ProxyRef,
};
pub use local::{LocalCluster, LocalClusterConfig, Progress};
pub use objects::{Object, ObjectKey};
