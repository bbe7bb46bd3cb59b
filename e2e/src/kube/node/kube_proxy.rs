//! kube-proxy (the real one, built by `cargo xtask k8s build`) for one
//! node, in iptables mode inside the node's network namespace: pods' and
//! the node's connections to ClusterIPs are DNATed to the Service's
//! endpoints there (pods of the mesh are redirected by their own in-pod
//! rules first, as on any cluster). It authenticates as `system:kube-proxy`
//! (bound to `system:node-proxier` by the API server's default RBAC), names
//! itself after the node, and leaves the machine-wide conntrack settings
//! alone (every node shares this machine's kernel).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::{KubeProxyConfig, NodeSpec};
use crate::process::{ProcessInfo, ProcessSpec, log_tail};
use crate::run::RunHandle;

/// kube-proxy's health port (its default), on the node's address.
pub const HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's metrics port (its default), on the node's loopback.
pub const METRICS_PORT: u16 = 10249;

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyError {
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error("node {node}: routing the service range {range}: {source}")]
    ServiceRoute {
        node: String,
        range: ipnet::Ipv4Net,
        source: crate::netns::NetnsError,
    },
    #[error(
        "kube-proxy on node {node} did not report healthy within {waited:?} (last: {last}); its log ({log}) ends with:\n{tail}"
    )]
    NotReady {
        node: String,
        waited: Duration,
        last: String,
        log: String,
        tail: String,
    },
}

/// kube-proxy's command line for `node`.
pub fn spec(node: &NodeSpec, config: &KubeProxyConfig) -> ProcessSpec {
    ProcessSpec::new(format!("kube-proxy-{}", node.name), &config.binary).args([
        format!("--kubeconfig={}", config.kubeconfig.display()),
        format!("--hostname-override={}", node.name),
        format!("--cluster-cidr={}", config.cluster_cidr),
        "--proxy-mode=iptables".into(),
        format!("--bind-address={}", node.ip),
        format!("--healthz-bind-address={}:{HEALTHZ_PORT}", node.ip),
        format!("--metrics-bind-address=127.0.0.1:{METRICS_PORT}"),
        // conntrack's table size is the machine's (the init namespace's):
        // leave it, and the timeouts, as they are.
        "--conntrack-max-per-core=0".into(),
        "--conntrack-min=0".into(),
        "--conntrack-tcp-timeout-established=0s".into(),
        // NodePorts on 127.0.0.1 would need route_localnet: not used here.
        "--iptables-localhost-nodeports=false".into(),
        "--oom-score-adj=0".into(),
        "--v=1".into(),
    ])
}

/// Starts kube-proxy in the node's namespace and waits until its health
/// endpoint says it has programmed the rules (`200` on `/healthz`).
pub fn start(
    run: &RunHandle,
    node: &NodeSpec,
    config: &KubeProxyConfig,
    ready_within: Duration,
) -> Result<ProcessInfo, KubeProxyError> {
    // The topology routes only pod ranges; without a route the node's own
    // connect() to a ClusterIP fails before kube-proxy's OUTPUT DNAT.
    node.netns
        .ip_batch(&[format!(
            "route replace {} dev {}",
            config.service_cidr,
            crate::topology::UPLINK
        )])
        .map_err(|source| KubeProxyError::ServiceRoute {
            node: node.name.clone(),
            range: config.service_cidr,
            source,
        })?;
    let p = run.spawn(&spec(node, config), &node.netns)?;
    let started = Instant::now();
    let mut last;
    loop {
        if let Some(status) = run.exited(&p) {
            last = format!("it exited ({status})");
            break;
        }
        match healthz(node, node.ip) {
            Ok(()) => return Ok(p),
            Err(why) => last = why,
        }
        if started.elapsed() >= ready_within {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(KubeProxyError::NotReady {
        node: node.name.clone(),
        waited: started.elapsed(),
        last,
        log: p.log.display().to_string(),
        tail: log_tail(&p.log, 30),
    })
}

fn healthz(node: &NodeSpec, ip: Ipv4Addr) -> Result<(), String> {
    match crate::http::get_at(
        &node.netns,
        (ip, HEALTHZ_PORT).into(),
        "/healthz",
        Duration::from_secs(2),
    ) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("/healthz answered {}: {}", r.status, r.body.trim())),
        Err(e) => Err(e.to_string()),
    }
}
