//! Waiting for what an install applied to be running: each Deployment and
//! DaemonSet of the manifest is read until it has rolled out (as `kubectl
//! rollout status` judges it), with a live display of each one's state:
//! lines redrawn in place on a terminal, a line per change otherwise.

use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::Client;
use serde_json::Value;

use crate::cluster::{self, ClusterError};
use crate::manifest::{InstallKind, ManifestObject};

/// Where a workload is in its rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Not created (yet).
    Missing,
    /// Rolling out: `ready` of `desired` pods ready, and why it is not
    /// done.
    Waiting {
        ready: i32,
        desired: i32,
        reason: String,
    },
    /// Every desired pod runs the current template and is ready.
    Ready { ready: i32, desired: i32 },
}

impl State {
    pub fn is_ready(&self) -> bool {
        matches!(self, State::Ready { .. })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Missing => f.write_str("waiting: not created yet"),
            State::Waiting {
                ready,
                desired,
                reason,
            } => write!(f, "waiting: {ready}/{desired} ready ({reason})"),
            State::Ready { ready, desired } => write!(f, "ready: {ready}/{desired}"),
        }
    }
}

/// A Deployment's rollout, as `kubectl rollout status` judges it: the
/// controller saw the latest spec, every replica is updated, old ones are
/// gone, and the updated ones are available.
pub fn deployment_state(deployment: &Deployment) -> State {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let pending = if updated < desired {
        Some(format!("{updated}/{desired} updated"))
    } else if total > updated {
        Some(format!("{} old pods terminating", total - updated))
    } else if available < updated {
        Some(format!("{available}/{updated} available"))
    } else {
        None
    };
    judged(
        (status.observed_generation, deployment.metadata.generation),
        ready,
        desired,
        pending,
    )
}

/// A DaemonSet's rollout: the controller saw the latest spec, every node
/// that should run it runs the current template, and each of those pods is
/// ready.
pub fn daemonset_state(daemonset: &DaemonSet) -> State {
    let status = daemonset.status.clone().unwrap_or_default();
    let desired = status.desired_number_scheduled;
    let ready = status.number_ready;
    let updated = status.updated_number_scheduled.unwrap_or(0);
    let pending = if updated < desired {
        Some(format!("{updated}/{desired} nodes updated"))
    } else if ready < desired {
        Some(format!("{ready}/{desired} nodes ready"))
    } else {
        None
    };
    judged(
        (status.observed_generation, daemonset.metadata.generation),
        ready,
        desired,
        pending,
    )
}

/// Ready unless the controller has not seen the latest spec (observed
/// generation, generation) or something is `pending`.
fn judged(
    (observed, generation): (Option<i64>, Option<i64>),
    ready: i32,
    desired: i32,
    pending: Option<String>,
) -> State {
    let reason = if observed < generation {
        Some("the controller has not seen the new spec yet".to_string())
    } else {
        pending
    };
    match reason {
        None => State::Ready { ready, desired },
        Some(reason) => State::Waiting {
            ready,
            desired,
            reason,
        },
    }
}

/// A workload to wait for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: InstallKind,
    pub namespace: String,
    pub name: String,
}

impl Workload {
    /// The Deployments and DaemonSets among `objects`.
    pub fn of(objects: &[ManifestObject]) -> Vec<Workload> {
        objects
            .iter()
            .filter(|o| matches!(o.kind, InstallKind::Deployment | InstallKind::DaemonSet))
            .map(|o| Workload {
                kind: o.kind,
                namespace: o.namespace.clone().unwrap_or_default(),
                name: o.name.clone(),
            })
            .collect()
    }

    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// Its state, from the API server.
    pub async fn state(&self, client: &Client) -> Result<State, ClusterError> {
        let Some(object) =
            cluster::get(client, self.kind, Some(&self.namespace), &self.name).await?
        else {
            return Ok(State::Missing);
        };
        Ok(state_of(self.kind, object))
    }
}

fn state_of(kind: InstallKind, object: Value) -> State {
    match kind {
        InstallKind::Deployment => serde_json::from_value::<Deployment>(object)
            .map(|d| deployment_state(&d))
            .unwrap_or(State::Missing),
        _ => serde_json::from_value::<DaemonSet>(object)
            .map(|d| daemonset_state(&d))
            .unwrap_or(State::Missing),
    }
}

/// The live display: one line per workload.
pub struct Progress<W: Write> {
    out: W,
    /// Redraw in place (a terminal) rather than a line per change.
    live: bool,
    drawn: Vec<String>,
}

impl<W: Write> Progress<W> {
    pub fn new(out: W, live: bool) -> Self {
        Progress {
            out,
            live,
            drawn: Vec::new(),
        }
    }

    /// Shows `states`: on a terminal the lines are redrawn in place; else
    /// only the lines that changed are printed.
    pub fn show(&mut self, states: &[(Workload, State)]) -> std::io::Result<()> {
        let width = states
            .iter()
            .map(|(w, _)| w.describe().len())
            .max()
            .unwrap_or(0);
        let lines: Vec<String> = states
            .iter()
            .map(|(w, s)| format!("  {:<width$}  {s}", w.describe()))
            .collect();
        if self.live {
            if !self.drawn.is_empty() {
                // Back to the first line drawn.
                write!(self.out, "\x1b[{}A", self.drawn.len())?;
            }
            for line in &lines {
                writeln!(self.out, "\x1b[2K{line}")?;
            }
        } else {
            for (i, line) in lines.iter().enumerate() {
                if self.drawn.get(i) != Some(line) {
                    writeln!(self.out, "{line}")?;
                }
            }
        }
        self.out.flush()?;
        self.drawn = lines;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Why waiting ended without every workload ready.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "not ready after {timeout:?}: {}; see `kubectl -n {namespace} get pods` and `kubectl -n {namespace} describe pods` for why (image pulls, scheduling, readiness probes)",
        pending.iter().map(|(w, s)| format!("{} {s}", w.describe())).collect::<Vec<_>>().join("; ")
    )]
    Timeout {
        timeout: Duration,
        namespace: String,
        pending: Vec<(Workload, State)>,
    },
    #[error("writing the progress display: {0}")]
    Display(#[from] std::io::Error),
}

/// Reads each workload every `poll` until all are ready or `timeout`
/// passes, showing their states.
pub async fn wait<W: Write>(
    client: &Client,
    workloads: &[Workload],
    timeout: Duration,
    poll: Duration,
    progress: &mut Progress<W>,
) -> Result<(), RolloutError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut states = Vec::new();
        for w in workloads {
            states.push((w.clone(), w.state(client).await?));
        }
        progress.show(&states)?;
        if states.iter().all(|(_, s)| s.is_ready()) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RolloutError::Timeout {
                timeout,
                namespace: workloads
                    .first()
                    .map(|w| w.namespace.clone())
                    .unwrap_or_default(),
                pending: states.into_iter().filter(|(_, s)| !s.is_ready()).collect(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(generation: i64, status: Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "istiod", "generation": generation},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_deployment_is_ready_once_every_replica_is_updated_and_available() {
        let cases = [
            (
                json!({"observedGeneration": 1}),
                "the controller has not seen",
            ),
            (
                json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1}),
                "1/2 updated",
            ),
            (
                json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2}),
                "1 old pods terminating",
            ),
            (
                json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1, "readyReplicas": 1}),
                "1/2 available",
            ),
        ];
        for (status, reason) in cases {
            let state = deployment_state(&deployment(2, status.clone()));
            assert!(!state.is_ready(), "{status}");
            assert!(state.to_string().contains(reason), "{status}: {state}");
        }
        let ready = deployment_state(&deployment(
            2,
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2, "readyReplicas": 2}),
        ));
        assert_eq!(
            ready,
            State::Ready {
                ready: 2,
                desired: 2
            }
        );
    }

    #[test]
    fn a_daemonset_is_ready_once_every_node_runs_a_ready_updated_pod() {
        let ds = |status: Value| -> DaemonSet {
            serde_json::from_value(json!({
                "metadata": {"name": "ztunnel", "generation": 4},
                "spec": {"selector": {}, "template": {}},
                "status": status,
            }))
            .unwrap()
        };
        let base = json!({"currentNumberScheduled": 3, "numberMisscheduled": 0, "desiredNumberScheduled": 3, "numberReady": 2, "observedGeneration": 4, "updatedNumberScheduled": 3});
        let state = daemonset_state(&ds(base.clone()));
        assert_eq!(state.to_string(), "waiting: 2/3 ready (2/3 nodes ready)");
        let mut old = base.clone();
        old["updatedNumberScheduled"] = json!(1);
        assert!(
            daemonset_state(&ds(old))
                .to_string()
                .contains("1/3 nodes updated")
        );
        let mut stale = base.clone();
        stale["observedGeneration"] = json!(3);
        stale["numberReady"] = json!(3);
        assert!(!daemonset_state(&ds(stale)).is_ready());
        let mut done = base;
        done["numberReady"] = json!(3);
        assert_eq!(
            daemonset_state(&ds(done)),
            State::Ready {
                ready: 3,
                desired: 3
            }
        );
    }

    fn workload(name: &str) -> Workload {
        Workload {
            kind: InstallKind::DaemonSet,
            namespace: "istio-system".into(),
            name: name.into(),
        }
    }

    #[test]
    fn without_a_terminal_only_changes_are_printed() {
        let mut progress = Progress::new(Vec::new(), false);
        let waiting = State::Waiting {
            ready: 0,
            desired: 2,
            reason: "0/2 nodes ready".into(),
        };
        let ready = State::Ready {
            ready: 2,
            desired: 2,
        };
        progress
            .show(&[
                (workload("ztunnel"), waiting.clone()),
                (workload("istio-cni-node"), State::Missing),
            ])
            .unwrap();
        progress
            .show(&[
                (workload("ztunnel"), waiting),
                (workload("istio-cni-node"), ready.clone()),
            ])
            .unwrap();
        progress
            .show(&[
                (workload("ztunnel"), ready.clone()),
                (workload("istio-cni-node"), ready),
            ])
            .unwrap();
        let text = String::from_utf8(progress.into_inner()).unwrap();
        assert_eq!(
            text,
            "  DaemonSet istio-system/ztunnel         waiting: 0/2 ready (0/2 nodes ready)\n\
             \x20 DaemonSet istio-system/istio-cni-node  waiting: not created yet\n\
             \x20 DaemonSet istio-system/istio-cni-node  ready: 2/2\n\
             \x20 DaemonSet istio-system/ztunnel         ready: 2/2\n"
        );
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn on_a_terminal_the_lines_are_redrawn_in_place() {
        let mut progress = Progress::new(Vec::new(), true);
        let states = [
            (workload("ztunnel"), State::Missing),
            (workload("istio-cni-node"), State::Missing),
        ];
        progress.show(&states).unwrap();
        progress.show(&states).unwrap();
        let text = String::from_utf8(progress.into_inner()).unwrap();
        assert_eq!(text.matches("\x1b[2A").count(), 1, "{text:?}");
        assert_eq!(text.matches("\x1b[2K").count(), 4, "{text:?}");
    }
}
