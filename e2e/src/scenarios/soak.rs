//! The churn soak: for a bounded time (`e2e/tests/soak.rs`: three minutes;
//! `cargo xtask soak --minutes N`: as long as asked) pods are created and
//! deleted without pause on both nodes, enrolled through the node agent,
//! and an AuthorizationPolicy is edited back and forth, while the steady
//! traffic of the lifecycle scenarios ([`super::lifecycle::across`]: 1,000
//! requests a second across nodes, and a new connection every 25 ms) flows.
//!
//! Every few seconds the soak reads istiod-rs's, each ztunnel-rs's and each
//! node agent's resident memory (`VmRSS`) and open descriptors
//! (`/proc/<pid>/fd`). What it asserts:
//! - not one request of the steady traffic and not one new connection failed;
//! - memory: the least-squares slope of each component's RSS against the
//!   churn cycles done, over the second half of the samples (after
//!   warm-up), stays under [`RSS_GROWTH_PER_CYCLE_KB`]: a leak detector, a
//!   bound on growth per cycle, never on time;
//! - descriptors: once the churn is over, each component holds at most
//!   [`FD_SLACK`] more than before it started;
//! - leftovers: no network namespace of a deleted pod is left (by name, or
//!   held open by a process's descriptor), the iptables, ip6tables and
//!   ipset state of each node's namespace is what it was before the churn,
//!   and nothing in the host's mentions a deleted pod;
//! - certificates: no ztunnel-rs holds the certificate of a deleted pod's
//!   identity past its grace. ztunnel-rs forgets an identity's certificate
//!   when the last pod needing it has drained (`ztunnel-rs/src/proxy.rs`,
//!   `Node::release_identity`), as upstream forgets one no workload needs
//!   (istio/ztunnel `src/identity/manager.rs`,
//!   `SecretManager::forget_certificate`): the grace is the drain deadline.
//!   Each churn cycle's pods get a service account of their own, so a
//!   certificate kept would show;
//! - metrics: once the churn is over, no ztunnel-rs exports a traffic
//!   series naming a deleted pod past its retention (the soak's ztunnel-rs
//!   run with `--metrics-retention` [`METRICS_RETENTION`]); each cycle's
//!   pods have a workload name of their own, so series kept would pile up.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::fixture::{AMBIENT_NS, ECHO_HELLO, L4Fixture, echo_server, service_accounts_yaml};
use super::l4::{CHANGE_TIMEOUT, carried, failed, pod_name};
use super::lifecycle::{MARGIN, across};
use super::policies::{Applied, authorization, from_namespaces, from_principals, policy_principal};
use crate::cluster::{Cluster, PodInfo};
use crate::local::LocalCluster;
use crate::mesh::MeshConfig;
use crate::netns::NetNs;
use crate::objects::ObjectKey;
use crate::probe::{self, ProbeError, eventually};
use crate::procfs;

/// The CI form's churn (`e2e/tests/soak.rs`): the whole test stays under
/// about four minutes of runtime once the cluster is up.
pub const CI_CHURN: Duration = Duration::from_secs(3 * 60);
/// Pods created (and deleted) per churn cycle, spread over the nodes.
pub const DEFAULT_PODS: usize = 2;
/// How long the soak's ztunnel-rs keep the traffic series of a deleted
/// pod (`--metrics-retention`; 5 minutes by default, longer than the CI
/// form's churn): once the churn is over, none may be left past it.
pub const METRICS_RETENTION: Duration = Duration::from_secs(10);
/// How often the components are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The leak detector: the most a component's RSS may grow per churn cycle
/// (least-squares slope over the second half of the samples). A cycle
/// creates and deletes [`DEFAULT_PODS`] pods, each with an identity of its
/// own, and edits a policy; what a component keeps of that must be gone
/// once they are, so the steady-state slope is about zero. The bound is
/// generous (allocator noise on a short run; the CI form measured about
/// +15 kB per cycle for each ztunnel-rs and under +3 kB for the others)
/// yet below what keeping a pod's proxy, listeners, pools and certificate
/// per cycle would cost.
pub const RSS_GROWTH_PER_CYCLE_KB: f64 = 64.0;
/// Descriptors a component may hold above its count before the churn, once
/// the churn is over (connections of the steady traffic in flight).
pub const FD_SLACK: usize = 16;
/// Service accounts (and so identities) of the churned pods start so.
const CHURN_SA: &str = "churn-";
/// The policy the soak edits back and forth: it denies what the steady
/// traffic never is (`other`, then the legacy namespace), so every request
/// must still go through while each edit is pushed.
const POLICY: &str = "soak-deny";

/// What the soak runs.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long pods are churned.
    pub churn: Duration,
    /// Pods created and deleted per cycle, over the nodes in turn.
    pub pods_per_cycle: usize,
    pub sample_every: Duration,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            churn: CI_CHURN,
            pods_per_cycle: DEFAULT_PODS,
            sample_every: SAMPLE_EVERY,
        }
    }
}

/// A mesh process sampled.
#[derive(Clone, Debug)]
struct Component {
    name: String,
    pid: u32,
}

/// One reading of every component, in [`Component`] order.
#[derive(Clone, Debug)]
struct Sample {
    /// Since the churn started.
    at: Duration,
    /// Churn cycles completed by then.
    cycles: u64,
    rss_kb: Vec<u64>,
    fds: Vec<usize>,
}

/// One component's line of the table.
#[derive(Clone, Debug)]
pub struct ComponentReport {
    pub name: String,
    pub pid: u32,
    pub rss_start_kb: u64,
    pub rss_end_kb: u64,
    /// Least squares over the second half of the samples.
    pub rss_kb_per_cycle: Option<f64>,
    pub rss_kb_per_minute: Option<f64>,
    pub fds_start: usize,
    /// Once the churn was over and the deleted pods drained.
    pub fds_end: usize,
    pub fds_per_cycle: Option<f64>,
}

/// What the soak found and what failed; its [`std::fmt::Display`] is the
/// table `cargo xtask soak` prints.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    pub churn: Duration,
    pub cycles: u64,
    pub pods_created: u64,
    pub policy_edits: u64,
    pub samples: usize,
    /// Of the steady traffic.
    pub requests: u64,
    pub failed_requests: u64,
    pub connections: u64,
    pub failed_connections: u64,
    pub components: Vec<ComponentReport>,
    /// Most churned identities one ztunnel-rs held at one sample.
    pub most_churn_certificates: usize,
    /// From the last pod's deletion to no churned certificate on any node.
    pub certificates_gone_after: Option<Duration>,
    /// Network namespaces of deleted pods still there, or held open.
    pub leftover_netns: Vec<String>,
    /// iptables / ip6tables / ipset lines that differ from before the churn.
    pub leftover_rules: Vec<String>,
    /// Certificates of deleted pods' identities held past their grace.
    pub stale_certificates: Vec<String>,
    /// Each ztunnel-rs's metric series before the churn and once it is
    /// over (series naming a deleted pod must be gone by then).
    pub series: Vec<SeriesCount>,
    pub failures: Vec<String>,
}

/// One node's ztunnel-rs metric series before and after the churn.
#[derive(Clone, Debug, Default)]
pub struct SeriesCount {
    pub node: String,
    pub before: usize,
    pub after: usize,
    /// Of `after`: series with a churned (deleted) pod's identity in a label.
    pub after_churned: usize,
}

impl SoakReport {
    /// `Ok` unless something failed.
    pub fn verdict(&self) -> Result<(), String> {
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the churn soak failed:\n  {}",
                self.failures.join("\n  ")
            ))
        }
    }
}

fn kb_or_dash(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:+.1}"))
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "churn soak: {:.0?} of churn, {} cycles ({} pods created and deleted, {} policy edits), {} samples",
            self.churn, self.cycles, self.pods_created, self.policy_edits, self.samples
        )?;
        writeln!(
            f,
            "steady traffic: {} requests, {} failed; {} new connections, {} failed",
            self.requests, self.failed_requests, self.connections, self.failed_connections
        )?;
        writeln!(
            f,
            "{:<22} {:>8} {:>10} {:>10} {:>12} {:>11} {:>6} {:>6} {:>10}",
            "component",
            "pid",
            "RSS start",
            "RSS end",
            "kB/cycle",
            "kB/min",
            "fds",
            "fds",
            "fds/cycle"
        )?;
        writeln!(
            f,
            "{:<22} {:>8} {:>10} {:>10} {:>12} {:>11} {:>6} {:>6} {:>10}",
            "", "", "(kB)", "(kB)", "(slope)", "(slope)", "start", "end", "(slope)"
        )?;
        for c in &self.components {
            writeln!(
                f,
                "{:<22} {:>8} {:>10} {:>10} {:>12} {:>11} {:>6} {:>6} {:>10}",
                c.name,
                c.pid,
                c.rss_start_kb,
                c.rss_end_kb,
                kb_or_dash(c.rss_kb_per_cycle),
                kb_or_dash(c.rss_kb_per_minute),
                c.fds_start,
                c.fds_end,
                c.fds_per_cycle
                    .map_or_else(|| "-".to_string(), |v| format!("{v:+.3}"))
            )?;
        }
        writeln!(
            f,
            "bounds: RSS slope <= {RSS_GROWTH_PER_CYCLE_KB} kB per cycle; fds at the end <= start + {FD_SLACK}"
        )?;
        let list = |items: &[String]| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join("; ")
            }
        };
        writeln!(
            f,
            "leftovers: netns of deleted pods: {}; iptables/ipset changes: {}; certificates past grace: {}",
            list(&self.leftover_netns),
            list(&self.leftover_rules),
            list(&self.stale_certificates)
        )?;
        let series: Vec<String> = self
            .series
            .iter()
            .map(|c| {
                format!(
                    "{} {} -> {} ({} naming a deleted pod's identity)",
                    c.node, c.before, c.after, c.after_churned
                )
            })
            .collect();
        writeln!(
            f,
            "ztunnel-rs metric series before -> after the churn: {}",
            list(&series)
        )?;
        write!(
            f,
            "certificates of churned identities: at most {} on a node at a sample; all gone {} after the last deletion",
            self.most_churn_certificates,
            self.certificates_gone_after
                .map_or_else(|| "never".to_string(), |d| format!("{d:.1?}"))
        )?;
        if !self.failures.is_empty() {
            write!(f, "\nFAILED:\n  {}", self.failures.join("\n  "))?;
        }
        Ok(())
    }
}

/// Starts a local cluster with the mesh, creates the L4 fixture and soaks
/// it as `config` says. `Err` when the cluster could not be soaked or a
/// check failed (with the table and where the logs are, which are kept).
pub fn on_local_cluster(config: &SoakConfig) -> Result<SoakReport, String> {
    let mesh = MeshConfig {
        metrics_retention: Some(METRICS_RETENTION),
        ..MeshConfig::default()
    };
    super::with_local_fixture(mesh, |cluster, fixture| {
        let report = run(cluster, fixture, config).map_err(|e| e.to_string())?;
        eprintln!("{report}");
        report.verdict()?;
        Ok(report)
    })
}

/// The mesh's processes to sample: istiod-rs, then each node's ztunnel-rs
/// and node agent.
fn components(cluster: &LocalCluster) -> Result<Vec<Component>, ProbeError> {
    let mesh = cluster
        .mesh()
        .ok_or_else(|| failed("the churn soak", "the cluster runs without the mesh"))?;
    let istiod = mesh
        .istiod()
        .ok_or_else(|| failed("the churn soak", "istiod-rs is not running"))?;
    let mut all = vec![Component {
        name: "istiod-rs".into(),
        pid: istiod.pid,
    }];
    for node in mesh.nodes() {
        for (what, process) in [
            ("ztunnel-rs", &node.ztunnel),
            ("node agent", &node.node_agent),
        ] {
            let p = process.as_ref().ok_or_else(|| {
                failed(
                    "the churn soak",
                    format!("the {what} on {} is not running", node.node),
                )
            })?;
            all.push(Component {
                name: format!("{what} {}", node.node),
                pid: p.pid,
            });
        }
    }
    Ok(all)
}

fn sample(components: &[Component], at: Duration, cycles: u64) -> Result<Sample, ProbeError> {
    let gone = |c: &Component, e: procfs::ProcError| {
        failed(
            &format!("{} (pid {})", c.name, c.pid),
            format!("exited or restarted during the soak: {e}"),
        )
    };
    let mut s = Sample {
        at,
        cycles,
        rss_kb: Vec::new(),
        fds: Vec::new(),
    };
    for c in components {
        s.rss_kb
            .push(procfs::rss_kb(c.pid).map_err(|e| gone(c, e))?);
        s.fds
            .push(procfs::fd_targets(c.pid).map_err(|e| gone(c, e))?.len());
    }
    Ok(s)
}

/// The least-squares slope of `y` against `x`; `None` without two
/// distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    Some(sxy / sxx)
}

/// A pod the churn deleted, and what of it must not be left.
#[derive(Clone, Debug)]
struct Gone {
    pod: PodInfo,
    identity: String,
    netns: String,
    inode: Option<u64>,
    at: Instant,
}

/// What the churn shares with the sampler.
struct Shared {
    cycles: AtomicU64,
    stop: AtomicBool,
    gone: Mutex<Vec<Gone>>,
}

impl Shared {
    fn gone(&self) -> Vec<Gone> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A churned pod's identity.
fn is_churned(identity: &str) -> bool {
    identity.contains(&format!("/sa/{CHURN_SA}"))
}

/// Each node's ztunnel-rs's metric series: all of them, and those with a
/// churned identity in a label.
fn ztunnel_series(cluster: &LocalCluster) -> Result<Vec<(String, usize, usize)>, ProbeError> {
    cluster
        .nodes()
        .into_iter()
        .map(|node| {
            let samples = probe::metrics(cluster, &probe::ztunnel(&node))?;
            let churned = samples
                .iter()
                .filter(|s| s.labels.values().any(|v| is_churned(v)))
                .count();
            Ok((node, samples.len(), churned))
        })
        .collect()
}

/// Each node's ztunnel-rs's certificates of churned identities.
fn churn_certificates(cluster: &LocalCluster) -> Result<Vec<(String, String)>, ProbeError> {
    let mut held = Vec::new();
    for node in cluster.nodes() {
        for cert in probe::certificates(cluster, &node)? {
            if is_churned(&cert.identity) {
                held.push((node.clone(), cert.identity));
            }
        }
    }
    Ok(held)
}

/// The policy's rules for edit `n`: both deny only what the steady traffic
/// is not.
fn policy_yaml(f: &L4Fixture, n: u64) -> String {
    let rules = if n.is_multiple_of(2) {
        from_principals(&[policy_principal(&f.principal(AMBIENT_NS, "other"))])
    } else {
        from_namespaces(&[super::fixture::LEGACY_NS])
    };
    authorization(AMBIENT_NS, POLICY, "server", "DENY", &rules)
}

/// iptables, ip6tables and ipset state of a network namespace (`None`:
/// the soak's own), one line each, without counters and comments.
fn rule_lines(netns: Option<&NetNs>) -> Result<BTreeSet<String>, String> {
    let mut lines = BTreeSet::new();
    for (program, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("ipset", &["save"][..]),
    ] {
        let mut cmd = match netns {
            Some(ns) => ns.command(program),
            None => std::process::Command::new(program),
        };
        cmd.args(args);
        let shown = crate::process::display(&cmd);
        let out = match netns {
            Some(ns) => ns.exec(cmd, CHANGE_TIMEOUT).map_err(|e| e.to_string())?,
            None => {
                let child = cmd
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("{shown}: {e}"))?;
                crate::process::wait_with_timeout(child, CHANGE_TIMEOUT)
                    .ok_or_else(|| format!("{shown}: no answer within {CHANGE_TIMEOUT:?}"))?
            }
        };
        if !out.status.success() {
            return Err(format!(
                "{shown} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            // `:CHAIN POLICY [packets:bytes]`: the counters move.
            let line = match line.rsplit_once(" [") {
                Some((head, tail)) if line.starts_with(':') && tail.ends_with(']') => head,
                _ => line,
            };
            lines.insert(format!("{program}: {line}"));
        }
    }
    Ok(lines)
}

/// The rule state of each node's namespace and of the soak's own.
fn rules(cluster: &LocalCluster) -> Result<BTreeMap<String, BTreeSet<String>>, ProbeError> {
    let mut all = BTreeMap::new();
    for node in cluster.nodes() {
        let ns = cluster
            .node_netns(&node)
            .ok_or_else(|| failed("the churn soak", format!("no namespace for node {node}")))?;
        let lines = rule_lines(Some(ns)).map_err(|e| failed(&format!("node {node}"), e))?;
        all.insert(node, lines);
    }
    let host = rule_lines(None).map_err(|e| failed("the soak's own namespace", e))?;
    all.insert("host".to_string(), host);
    Ok(all)
}

/// Lines of the rule state that differ from `before`: on a node, any
/// (the deleted pods' entries left, or the remaining pods' lost); on the
/// host, which other programs may change, those naming a deleted pod.
fn rule_changes(
    before: &BTreeMap<String, BTreeSet<String>>,
    after: &BTreeMap<String, BTreeSet<String>>,
    gone: &[Gone],
) -> Vec<String> {
    let mut changes = Vec::new();
    for (place, now) in after {
        let was = before.get(place).cloned().unwrap_or_default();
        let names_gone = |line: &str| {
            gone.iter().any(|g| {
                line.contains(&g.pod.uid)
                    || line
                        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                        .any(|word| word == g.pod.ip.to_string())
            })
        };
        for line in now.difference(&was) {
            if place != "host" || names_gone(line) {
                changes.push(format!("{place}: added {line:?}"));
            }
        }
        if place != "host" {
            for line in was.difference(now) {
                changes.push(format!("{place}: lost {line:?}"));
            }
        }
    }
    changes
}

/// Deleted pods' namespaces still named under `/run/netns`, or held open
/// by a descriptor (or a process) of the mesh's components.
fn leftover_netns(cluster: &LocalCluster, components: &[Component], gone: &[Gone]) -> Vec<String> {
    let live: BTreeSet<u64> = crate::netns::names_with_prefix(&cluster.run().netns_name(""))
        .iter()
        .filter_map(|n| NetNs::named(n).inode())
        .collect();
    let mut held: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for c in components {
        for target in procfs::fd_targets(c.pid).unwrap_or_default() {
            if let Some(inode) = target
                .strip_prefix("net:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                held.entry(inode).or_default().push(c.name.clone());
            }
        }
    }
    let mut left = Vec::new();
    for g in gone {
        if NetNs::named(&g.netns).exists() {
            left.push(format!("{} ({}) still exists", g.netns, pod_name(&g.pod)));
        }
        let Some(inode) = g.inode.filter(|i| !live.contains(i)) else {
            continue;
        };
        if let Some(holders) = held.get(&inode) {
            left.push(format!(
                "net:[{inode}] of {} held open by {}",
                pod_name(&g.pod),
                holders.join(", ")
            ));
        }
        let pids = crate::netns::pids_in_namespace(inode);
        if !pids.is_empty() {
            left.push(format!(
                "net:[{inode}] of {} still has processes {pids:?}",
                pod_name(&g.pod)
            ));
        }
    }
    left
}

/// Pods each node's ztunnel-rs proxies (its `/config_dump` `pods`).
fn proxied_pods(cluster: &LocalCluster) -> Result<Vec<usize>, ProbeError> {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            let dump = cluster.config_dump(&probe::ztunnel(n))?;
            Ok(dump
                .get("pods")
                .and_then(serde_json::Value::as_array)
                .map_or(0, Vec::len))
        })
        .collect()
}

/// One churn cycle: a service account of its own, its pods created on the
/// nodes in turn and waited for in the mesh, one exchange into each from
/// the other node, a policy edit, then the pods and the account deleted.
fn cycle(
    cluster: &LocalCluster,
    f: &L4Fixture,
    config: &SoakConfig,
    n: u64,
    shared: &Shared,
) -> Result<(), ProbeError> {
    let nodes = cluster.nodes();
    let sa = format!("{CHURN_SA}{n}");
    let account = service_accounts_yaml(AMBIENT_NS, &[&sa]);
    cluster.apply_yaml(&account)?;
    let mut pods = Vec::new();
    let result = (|| {
        for i in 0..config.pods_per_cycle {
            let node = &nodes[i % nodes.len()];
            let request =
                echo_server(AMBIENT_NS, &format!("{sa}-{i}"), node, &sa).label("app", "churn");
            let pod = cluster.create_pod(&request)?;
            let netns = cluster
                .pod_netns(&pod.namespace, &pod.name)
                .map(|ns| (ns.name().to_string(), ns.inode()))
                .unwrap_or_default();
            pods.push((pod, netns));
        }
        let enrolled: Vec<(&PodInfo, &str)> = pods.iter().map(|(p, _)| (p, sa.as_str())).collect();
        probe::until_in_mesh(cluster, &f.trust_domain, &enrolled, CHANGE_TIMEOUT)?;
        for (pod, _) in &pods {
            let from = f
                .clients
                .iter()
                .find(|c| c.node != pod.node)
                .unwrap_or(&f.clients[0]);
            carried(cluster, from, pod, ECHO_HELLO)?;
        }
        cluster.apply_yaml(&policy_yaml(f, n + 1))?;
        Ok(())
    })();
    let identity = f.principal(AMBIENT_NS, &sa);
    for (pod, (netns, inode)) in pods {
        cluster.delete_pod(&pod.namespace, &pod.name)?;
        shared
            .gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Gone {
                pod,
                identity: identity.clone(),
                netns,
                inode,
                at: Instant::now(),
            });
    }
    cluster.delete(&[ObjectKey::core("ServiceAccount", Some(AMBIENT_NS), &sa)])?;
    result
}

/// Samples every `config.sample_every` until told to stop; also notes the
/// most churned certificates a node held and those of pods deleted more
/// than `grace` (plus [`CHANGE_TIMEOUT`] of slack) earlier.
fn sampler(
    cluster: &LocalCluster,
    components: &[Component],
    config: &SoakConfig,
    grace: Duration,
    shared: &Shared,
    start: Instant,
) -> Result<(Vec<Sample>, usize, BTreeSet<String>), ProbeError> {
    let mut samples = Vec::new();
    let mut most = 0;
    let mut stale = BTreeSet::new();
    let mut next = start;
    while !shared.stop.load(Ordering::SeqCst) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next += config.sample_every;
        let cycles = shared.cycles.load(Ordering::SeqCst);
        samples.push(sample(components, start.elapsed(), cycles)?);
        let held = churn_certificates(cluster)?;
        for node in cluster.nodes() {
            most = most.max(held.iter().filter(|(n, _)| *n == node).count());
        }
        let now = Instant::now();
        for g in shared.gone() {
            let past = now.saturating_duration_since(g.at) > grace + CHANGE_TIMEOUT;
            if past && held.iter().any(|(_, id)| *id == g.identity) {
                stale.insert(format!(
                    "{} (of {}, deleted {:.0?} before)",
                    g.identity,
                    pod_name(&g.pod),
                    now - g.at
                ));
            }
        }
    }
    Ok((samples, most, stale))
}

/// The churn and the checks after it, while the steady traffic flows.
fn soak(
    cluster: &LocalCluster,
    f: &L4Fixture,
    config: &SoakConfig,
    components: &[Component],
    report: &mut SoakReport,
) -> Result<(), ProbeError> {
    let grace = cluster
        .mesh()
        .map(|m| m.config.drain_deadline)
        .unwrap_or_default();
    let pods_before = proxied_pods(cluster)?;
    let rules_before = rules(cluster)?;
    let policy = Applied::new(cluster, &policy_yaml(f, 0))?;
    let shared = Shared {
        cycles: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        gone: Mutex::new(Vec::new()),
    };
    let series_before = ztunnel_series(cluster)?;
    let start = Instant::now();
    let baseline = sample(components, Duration::ZERO, 0)?;
    let (sampled, churned) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sampler(cluster, components, config, grace, &shared, start));
        let mut churned = Ok(());
        while start.elapsed() < config.churn {
            let n = shared.cycles.load(Ordering::SeqCst);
            churned = cycle(cluster, f, config, n, &shared);
            if churned.is_err() {
                break;
            }
            shared.cycles.fetch_add(1, Ordering::SeqCst);
        }
        shared.stop.store(true, Ordering::SeqCst);
        let sampled = sampler
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (sampled, churned)
    });
    report.churn = start.elapsed();
    report.cycles = shared.cycles.load(Ordering::SeqCst);
    report.pods_created = report.cycles * config.pods_per_cycle as u64;
    report.policy_edits = report.cycles;
    if let Err(e) = churned {
        report
            .failures
            .push(format!("churn cycle {}: {e}", report.cycles));
    }
    policy.remove()?;
    let (samples, most, stale) = sampled?;
    report.samples = samples.len();
    report.most_churn_certificates = most;
    report.stale_certificates = stale.into_iter().collect();
    let gone = shared.gone();
    let last_deleted = gone.iter().map(|g| g.at).max().unwrap_or(start);

    // The deleted pods drain; then nothing of theirs may be left.
    let settled = eventually(
        "every ztunnel-rs to proxy the pods it proxied before the churn",
        grace + CHANGE_TIMEOUT,
        || {
            let now = proxied_pods(cluster)?;
            Ok(if now == pods_before {
                Ok(())
            } else {
                Err(format!("{now:?}, not {pods_before:?}"))
            })
        },
    );
    if let Err(e) = settled {
        report.failures.push(e.to_string());
    }
    match eventually(
        "no ztunnel-rs to hold a churned identity's certificate",
        grace + CHANGE_TIMEOUT,
        || {
            let held = churn_certificates(cluster)?;
            Ok(if held.is_empty() {
                Ok(last_deleted.elapsed())
            } else {
                Err(format!("{held:?}"))
            })
        },
    ) {
        Ok(after) => report.certificates_gone_after = Some(after),
        Err(e) => report.failures.push(e.to_string()),
    }
    let mut end = sample(components, start.elapsed(), report.cycles)?;
    let fds_back = eventually(
        &format!("every component to hold at most {FD_SLACK} descriptors more than before"),
        CHANGE_TIMEOUT,
        || {
            end = sample(components, start.elapsed(), report.cycles)?;
            let over: Vec<String> = components
                .iter()
                .enumerate()
                .filter(|(i, _)| end.fds[*i] > baseline.fds[*i] + FD_SLACK)
                .map(|(i, c)| format!("{}: {} (was {})", c.name, end.fds[i], baseline.fds[i]))
                .collect();
            Ok(if over.is_empty() {
                Ok(())
            } else {
                Err(over.join(", "))
            })
        },
    );
    if let Err(e) = fds_back {
        report.failures.push(e.to_string());
    }
    // The deleted pods' traffic series go once unused for the retention
    // (ztunnel-rs sweeps every half retention).
    let series_gone = eventually(
        "no ztunnel-rs to export a series naming a deleted pod's identity",
        METRICS_RETENTION * 2 + CHANGE_TIMEOUT,
        || {
            let left: usize = ztunnel_series(cluster)?.iter().map(|(_, _, c)| c).sum();
            Ok(if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} left"))
            })
        },
    );
    if let Err(e) = series_gone {
        report.failures.push(e.to_string());
    }
    report.series = ztunnel_series(cluster)?
        .into_iter()
        .map(|(node, after, after_churned)| SeriesCount {
            before: series_before
                .iter()
                .find(|(n, _, _)| *n == node)
                .map_or(0, |(_, all, _)| *all),
            node,
            after,
            after_churned,
        })
        .collect();
    report.leftover_netns = leftover_netns(cluster, components, &gone);
    report.leftover_rules = rule_changes(&rules_before, &rules(cluster)?, &gone);

    let half = &samples[samples.len() / 2..];
    for (i, c) in components.iter().enumerate() {
        let against = |x: fn(&Sample) -> f64, y: &dyn Fn(&Sample) -> f64| {
            slope(&half.iter().map(|s| (x(s), y(s))).collect::<Vec<_>>())
        };
        let per_cycle = |s: &Sample| s.cycles as f64;
        let per_minute = |s: &Sample| s.at.as_secs_f64() / 60.0;
        let rss = |s: &Sample| s.rss_kb[i] as f64;
        let fds = |s: &Sample| s.fds[i] as f64;
        report.components.push(ComponentReport {
            name: c.name.clone(),
            pid: c.pid,
            rss_start_kb: baseline.rss_kb[i],
            rss_end_kb: end.rss_kb[i],
            rss_kb_per_cycle: against(per_cycle, &rss),
            rss_kb_per_minute: against(per_minute, &rss),
            fds_start: baseline.fds[i],
            fds_end: end.fds[i],
            fds_per_cycle: against(per_cycle, &fds),
        });
    }
    Ok(())
}

/// Runs the soak on `cluster` (see the module's documentation) and
/// returns its report, with what failed in [`SoakReport::failures`]; `Err`
/// when the cluster could not be driven at all.
pub fn run(
    cluster: &LocalCluster,
    f: &L4Fixture,
    config: &SoakConfig,
) -> Result<SoakReport, ProbeError> {
    if config.pods_per_cycle == 0 {
        return Err(failed(
            "the churn soak's pods per cycle",
            "must be at least 1",
        ));
    }
    let components = components(cluster)?;
    let mut report = SoakReport::default();
    // Traffic outlasts the churn by the settling and the checks after it.
    let duration = config.churn + MARGIN * 2 + CHANGE_TIMEOUT * 4;
    let ((), traffic) = across(cluster, f, duration, || {
        soak(cluster, f, config, &components, &mut report)
    })?;
    report.requests = traffic.load.requests;
    report.failed_requests = traffic.load.errors;
    report.connections = traffic.fresh.attempts;
    report.failed_connections = traffic.fresh.failures;
    if let Err(e) = traffic.lost_nothing("during the churn soak") {
        report.failures.push(e.to_string());
    }
    for c in &report.components {
        match c.rss_kb_per_cycle {
            Some(s) if s <= RSS_GROWTH_PER_CYCLE_KB => {}
            Some(s) => report.failures.push(format!(
                "{}: RSS grew {s:.1} kB per churn cycle over the second half (bound {RSS_GROWTH_PER_CYCLE_KB} kB): a leak",
                c.name
            )),
            None => report.failures.push(format!(
                "{}: too few samples over distinct churn cycles for a slope ({} samples, {} cycles)",
                c.name, report.samples, report.cycles
            )),
        }
    }
    for (what, items) in [
        (
            "network namespaces of deleted pods left",
            &report.leftover_netns,
        ),
        (
            "iptables/ipset state changed by the churn",
            &report.leftover_rules,
        ),
        (
            "certificates of deleted pods held past their grace",
            &report.stale_certificates,
        ),
    ] {
        if !items.is_empty() {
            let mut line = format!("{what}:");
            for item in items {
                let _ = write!(line, " {item};");
            }
            report.failures.push(line);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_least_squares() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        // Noise around a flat line averages out.
        let flat = [(0.0, 10.0), (1.0, 12.0), (2.0, 8.0), (3.0, 10.0)];
        assert!(slope(&flat).unwrap().abs() < 1.0);
        assert_eq!(slope(&[(1.0, 5.0)]), None);
        assert_eq!(slope(&[(2.0, 5.0), (2.0, 9.0)]), None);
    }

    #[test]
    fn churned_identities_are_told_apart() {
        assert!(is_churned("spiffe://cluster.local/ns/l4/sa/churn-12"));
        assert!(!is_churned("spiffe://cluster.local/ns/l4/sa/client"));
    }

    fn gone(ip: &str, uid: &str) -> Gone {
        Gone {
            pod: PodInfo {
                namespace: "l4".into(),
                name: "churn-1-0".into(),
                uid: uid.into(),
                node: "node0".into(),
                ip: ip.parse().unwrap(),
            },
            identity: "spiffe://cluster.local/ns/l4/sa/churn-1".into(),
            netns: "x".into(),
            inode: None,
            at: Instant::now(),
        }
    }

    #[test]
    fn rule_changes_on_nodes_are_all_reported_and_on_the_host_only_a_deleted_pods() {
        let set = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>();
        let before = BTreeMap::from([
            (
                "node0".to_string(),
                set(&["a", "add s 10.1.0.5 comment \"u5\""]),
            ),
            ("host".to_string(), set(&["h"])),
        ]);
        let after = BTreeMap::from([
            (
                "node0".to_string(),
                set(&["a", "add s 10.1.0.7 comment \"u7\""]),
            ),
            (
                "host".to_string(),
                set(&["h", "-A X -d 10.1.0.70/32", "-A Y -d 10.1.0.7/32", "other"]),
            ),
        ]);
        let changes = rule_changes(&before, &after, &[gone("10.1.0.7", "u7")]);
        assert_eq!(
            changes,
            [
                "host: added \"-A Y -d 10.1.0.7/32\"",
                "node0: added \"add s 10.1.0.7 comment \\\"u7\\\"\"",
                "node0: lost \"add s 10.1.0.5 comment \\\"u5\\\"\"",
            ]
        );
    }
}
