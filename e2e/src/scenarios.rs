//! The L4 end-to-end scenarios, written against the [`Cluster`] trait so the
//! local cluster ([`on_local_cluster`]) and the real Kubernetes control
//! plane ([`on_kube_cluster`], `cargo xtask e2e`) run the same list. The L7
//! scenarios ([`l7`]) run on the local cluster only for now (`tests/l4.rs`
//! appends them; `cargo xtask e2e` does not).
//! Each scenario drives real traffic between pods and takes its evidence
//! from the mesh itself (ztunnel-rs's metrics, certificates, config dump);
//! it waits with generous deadlines and never asserts on time.
//!
//! Scenarios share one cluster and one [`L4Fixture`] and run one after the
//! other: each leaves the cluster as it found it (policies it applies are
//! removed by an [`policies::Applied`] guard, also when it fails). The
//! disruptive ones (restarting istiod-rs or a ztunnel) come last.

pub mod bookinfo;
pub mod dns;
pub mod fail_closed;
pub mod fixture;
pub mod istioctl;
pub mod l4;
pub mod l7;
pub mod lifecycle;
pub mod node_agent;
pub mod on_demand;
pub mod policies;
pub mod rotation;
pub mod service_entry;
pub mod soak;
pub mod upgrade;

use std::time::{Duration, Instant};

pub use fixture::L4Fixture;

use crate::cluster::Cluster;
use crate::kube::scenarios::{self as kube_only, KubeFixture};
use crate::kube::{KubeCluster, KubeClusterConfig, KubeMesh};
use crate::local::{LocalCluster, LocalClusterConfig};
use crate::mesh::{MeshConfig, MeshMode};
use crate::probe::ProbeError;

/// One scenario: it returns a line of evidence, or why it failed.
#[derive(Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&dyn Cluster, &L4Fixture) -> Result<String, ProbeError>,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// How a scenario went.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub took: Duration,
    /// The evidence, or the failure.
    pub result: Result<String, String>,
}

/// Runs `scenarios` in order (those whose name contains `filter`, if
/// given), printing a line as each ends; a failure does not stop the rest.
pub fn run_all(
    cluster: &dyn Cluster,
    fixture: &L4Fixture,
    scenarios: &[Scenario],
    filter: Option<&str>,
) -> Vec<Outcome> {
    scenarios
        .iter()
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .map(|s| {
            run_one(s.name, || {
                (s.run)(cluster, fixture).map_err(|e| e.to_string())
            })
        })
        .collect()
}

/// Runs one named scenario, printing a line when it starts and one when it
/// ends (PASS with its evidence, or FAIL with why).
pub fn run_one(name: &'static str, run: impl FnOnce() -> Result<String, String>) -> Outcome {
    eprintln!("scenario {name} ...");
    let start = Instant::now();
    let result = run();
    let took = start.elapsed();
    match &result {
        Ok(evidence) => eprintln!("scenario {name}: PASS ({took:.1?}): {evidence}"),
        Err(why) => eprintln!("scenario {name}: FAIL ({took:.1?}): {why}"),
    }
    Outcome { name, took, result }
}

/// A summary of outcomes: one line each, failures with their reason.
pub fn summary(outcomes: &[Outcome]) -> String {
    outcomes
        .iter()
        .map(|o| match &o.result {
            Ok(_) => format!("  PASS {} ({:.1?})", o.name, o.took),
            Err(why) => format!("  FAIL {} ({:.1?}): {why}", o.name, o.took),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts a local cluster with the mesh as `mesh` says, creates the
/// [`L4Fixture`] and runs `scenarios` on it (see [`run_all`]). `Err` holds
/// the summary of what failed and where the components' logs are, which
/// are then kept after the cluster is gone.
pub fn on_local_cluster(
    mesh: MeshConfig,
    scenarios: &[Scenario],
    filter: Option<&str>,
) -> Result<Vec<Outcome>, String> {
    with_local_fixture(mesh, |cluster, fixture| {
        let outcomes = run_all(cluster, fixture, scenarios, filter);
        if outcomes.is_empty() {
            return Err(format!("no scenario matches {filter:?}"));
        }
        if outcomes.iter().any(|o| o.result.is_err()) {
            return Err(format!("scenarios failed:\n{}", summary(&outcomes)));
        }
        Ok(outcomes)
    })
}

/// Starts a local cluster with the mesh as `mesh` says, creates the
/// [`L4Fixture`] and hands both to `run`. When `run` (or the fixture)
/// fails, the run's directory is kept and the error names where the
/// components' logs are.
pub fn with_local_fixture<T>(
    mesh: MeshConfig,
    run: impl FnOnce(&LocalCluster, &L4Fixture) -> Result<T, String>,
) -> Result<T, String> {
    let trust_domain = mesh.trust_domain.clone();
    let cluster = LocalCluster::start(LocalClusterConfig {
        mesh: MeshMode::On(mesh),
        ..LocalClusterConfig::default()
    })
    .map_err(|e| format!("the local cluster with the mesh did not start: {e}"))?;
    let logs = cluster.run().dir().join("logs");
    let fixture = L4Fixture::create(&cluster, &trust_domain).map_err(|e| {
        cluster.run().keep_dir();
        format!(
            "the scenarios' pods did not join the mesh: {e}\n(component logs: {})",
            logs.display()
        )
    })?;
    run(&cluster, &fixture).map_err(|why| {
        cluster.run().keep_dir();
        format!("{why}\n(component logs: {})", logs.display())
    })
}

/// How long each stage of a run on the real control plane took.
#[derive(Clone, Debug, Default)]
pub struct KubeTimings {
    /// Network, etcd, API server, controller manager, scheduler.
    pub control_plane: Duration,
    /// The node runtimes registered and Ready, kube-proxy programmed.
    pub nodes: Duration,
    /// `istioctl-rs install` from nothing to every component Ready.
    pub install: Duration,
    /// The L4 fixture's pods created and known to every ztunnel.
    pub l4_fixture: Option<Duration>,
    /// The Kubernetes-only fixture deployed and enrolled by label.
    pub kube_fixture: Option<Duration>,
}

impl std::fmt::Display for KubeTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  control plane started      {:.1?}", self.control_plane)?;
        writeln!(f, "  nodes Ready                {:.1?}", self.nodes)?;
        writeln!(f, "  install to all Ready       {:.1?}", self.install)?;
        if let Some(t) = self.l4_fixture {
            writeln!(f, "  L4 fixture in the mesh     {t:.1?}")?;
        }
        if let Some(t) = self.kube_fixture {
            writeln!(f, "  Kubernetes fixture         {t:.1?}")?;
        }
        Ok(())
    }
}

/// The shared L4 `scenarios` and then the Kubernetes-only ones
/// ([`crate::kube::scenarios::all`]) on the real control plane with two
/// netns nodes and the mesh installed by `istioctl-rs install`, through
/// [`KubeCluster`] (those whose name contains `filter`, if given). `Err`
/// holds the summary of what failed, the timings, and where the logs are
/// (the run's directory is kept).
pub fn on_kube_cluster(
    scenarios: &[Scenario],
    filter: Option<&str>,
) -> Result<(KubeTimings, Vec<Outcome>), String> {
    let matches = |name: &str| filter.is_none_or(|f| name.contains(f));
    let kube_scenarios: Vec<_> = kube_only::all()
        .into_iter()
        .filter(|s| matches(s.name))
        .collect();
    let shared: Vec<Scenario> = scenarios
        .iter()
        .filter(|s| matches(s.name))
        .copied()
        .collect();
    if shared.is_empty() && kube_scenarios.is_empty() {
        return Err(format!("no scenario matches {filter:?}"));
    }
    let mut mesh = KubeMesh::start(2).map_err(|e| format!("the cluster did not start: {e}"))?;
    let mut timings = KubeTimings {
        control_plane: mesh.start_timings.control_plane,
        nodes: mesh.start_timings.nodes,
        ..KubeTimings::default()
    };
    let failed = |mesh: &KubeMesh, what: String| {
        mesh.kube.run.keep_dir();
        format!("{what}\n(logs: {})", mesh.logs_dir().display())
    };
    timings.install = mesh
        .install(&[])
        .map_err(|e| failed(&mesh, format!("istioctl-rs install failed: {e}")))?;
    let mut outcomes = Vec::new();
    if !shared.is_empty() {
        let cluster = KubeCluster::new(&mesh, KubeClusterConfig::default());
        let start = Instant::now();
        let fixture =
            L4Fixture::create(&cluster, api::labels::DEFAULT_TRUST_DOMAIN).map_err(|e| {
                failed(
                    &mesh,
                    format!(
                        "the L4 scenarios' pods did not join the mesh: {e}\ntimings:\n{timings}"
                    ),
                )
            })?;
        timings.l4_fixture = Some(start.elapsed());
        outcomes.extend(run_all(&cluster, &fixture, &shared, None));
        // The Kubernetes-only scenarios get the cluster with no other
        // enrolled pods (they count the mesh's connections from `demo`);
        // deleting enrolled pods with their namespaces is checked on the way.
        outcomes.push(run_one("l4_fixture_namespaces_deleted", || {
            let keys = [fixture::AMBIENT_NS, fixture::PEER_NS, fixture::LEGACY_NS]
                .map(|ns| crate::objects::ObjectKey::core("Namespace", None, ns));
            cluster
                .delete(&keys)
                .map(|()| format!("namespaces {:?} and their pods gone", keys.map(|k| k.name)))
                .map_err(|e| e.to_string())
        }));
    }
    if !kube_scenarios.is_empty() {
        let start = Instant::now();
        match KubeFixture::create(&mesh) {
            Ok(fixture) => {
                timings.kube_fixture = Some(start.elapsed());
                outcomes.extend(kube_only::run_all(&mesh, &fixture, &kube_scenarios, None));
            }
            Err(e) => {
                outcomes.push(Outcome {
                    name: "kube_fixture",
                    took: start.elapsed(),
                    result: Err(format!("the Kubernetes-only fixture: {e}")),
                });
            }
        }
    }
    if outcomes.iter().any(|o| o.result.is_err()) {
        return Err(failed(
            &mesh,
            format!(
                "scenarios failed:\n{}\ntimings:\n{timings}",
                summary(&outcomes)
            ),
        ));
    }
    Ok((timings, outcomes))
}
