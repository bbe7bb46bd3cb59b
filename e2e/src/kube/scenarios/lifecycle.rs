//! See [`super`]: the mesh's own pods replaced the Kubernetes way while the
//! fixture's clients keep traffic flowing, every request and every error
//! counted by the `client` app in the pods ([`crate::apps`]).
//!
//! - `node_agent_pod_restart_loses_nothing`: `kubectl delete pod` of a
//!   node's agent; its DaemonSet makes a new one, which takes the running
//!   pods back. Not one request fails.
//! - `ztunnel_rolling_restart`: `kubectl rollout restart
//!   daemonset/ztunnel`. New connections are probed every 25 ms from both
//!   nodes: the longest stretch without one is reported (the goal is under
//!   a second; a figure, never asserted), and what became of long-lived
//!   connections. It fails only if new connections do not come back.
//! - `istiod_restart_no_failed_request`: `kubectl rollout restart
//!   deployment/istiod` under load: not one request fails, every ztunnel
//!   reconnects, and a policy applied afterwards takes effect.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{EXEC_TIMEOUT, FixturePod, KubeFixture, KubeScenario, NAMESPACE, PATIENCE};
use crate::apps::{ConnectProbeReport, HoldReport, LoadReport, Outage, steady_load};
use crate::kube::kubectl::wait_until;
use crate::kube::mesh::{ISTIOD, KubeMesh, KubeMeshError, NODE_AGENT, SYSTEM_NAMESPACE, ZTUNNEL};
use crate::kube::samples::condition;
use crate::scenarios::policies::{authorization, from_principals};

/// This module's scenarios, in the order they run.
pub fn scenarios() -> Vec<KubeScenario> {
    vec![
        KubeScenario {
            name: "node_agent_pod_restart_loses_nothing",
            run: node_agent_pod_restart,
        },
        KubeScenario {
            name: "ztunnel_rolling_restart",
            run: ztunnel_rolling_restart,
        },
        KubeScenario {
            name: "istiod_restart_no_failed_request",
            run: istiod_restart,
        },
    ]
}

/// The echo app's TCP echo port (container and Service).
const ECHO_TCP: u16 = 9000;
/// The node agent DaemonSet's `metrics` port (hostNetwork: the node's).
const NODE_AGENT_METRICS: u16 = 15014;
/// How long a rollout may take before the scenario gives up on it.
const ROLLOUT_PATIENCE: Duration = Duration::from_secs(240);

fn unexpected(what: impl Into<String>, detail: impl std::fmt::Display) -> KubeMeshError {
    KubeMeshError::Unexpected {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// Polls `check` until it returns `Some` (as [`wait_until`]); an error is
/// remembered and named if the wait runs out.
fn until<T>(
    what: &str,
    patience: Duration,
    mut check: impl FnMut() -> Result<Option<T>, KubeMeshError>,
) -> Result<T, KubeMeshError> {
    let mut last = None;
    wait_until(what, patience, || {
        Ok(check().unwrap_or_else(|e| {
            last = Some(e.to_string());
            None
        }))
    })
    .map_err(|e| {
        let last = last.map(|l| format!("; last: {l}")).unwrap_or_default();
        unexpected(what, format!("{e}{last}"))
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// `t` (Unix ms) as seconds after `zero`, signed, for evidence.
fn since(zero: u64, t: u64) -> String {
    format!("{:+.2}s", (t as f64 - zero as f64) / 1e3)
}

/// Runs `client <args>` in a fixture pod and parses its one JSON report,
/// whether the run succeeded or not.
fn client<T: DeserializeOwned>(
    mesh: &KubeMesh,
    pod: &FixturePod,
    args: &[String],
    runs_for: Duration,
) -> Result<T, KubeMeshError> {
    let mut argv = vec!["client"];
    argv.extend(args.iter().map(String::as_str));
    let out = mesh.node(&pod.node)?.exec(
        NAMESPACE,
        &pod.name,
        "client",
        &argv,
        runs_for + EXEC_TIMEOUT,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        unexpected(
            format!("`{}` in pod {NAMESPACE}/{}", argv.join(" "), pod.name),
            format!(
                "printed no report ({e}): stdout {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
}

/// What a scoped thread returned (its panic goes on).
fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `client connect-probe`: a new connection every `interval`.
fn probe_args(target: &str, duration: Duration, interval: Duration) -> Vec<String> {
    args(&[
        "connect-probe",
        target,
        "--interval",
        &format!("{}ms", interval.as_millis()),
        "--duration",
        &format!("{}ms", duration.as_millis()),
    ])
}

/// `client hold`: one connection, a round trip every 100 ms.
fn hold_args(target: &str, duration: Duration) -> Vec<String> {
    args(&[
        "hold",
        target,
        "--interval",
        "100ms",
        "--duration",
        &format!("{}ms", duration.as_millis()),
    ])
}

fn load_clean(what: &str, load: &LoadReport) -> Result<(), KubeMeshError> {
    match load.trouble() {
        Some(trouble) => Err(unexpected(what, trouble)),
        None => Ok(()),
    }
}

fn probe_clean(what: &str, probe: &ConnectProbeReport) -> Result<(), KubeMeshError> {
    if !probe.ok || probe.failures > 0 {
        return Err(unexpected(
            what,
            format!(
                "{} of {} new connections failed in {} outage(s) (the first ones: {:?}); error {:?}",
                probe.failures,
                probe.attempts,
                probe.outages.len(),
                &probe.outages[..probe.outages.len().min(3)],
                probe.error
            ),
        ));
    }
    Ok(())
}

fn name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or_default()
}

fn uid(pod: &Value) -> &str {
    pod["metadata"]["uid"].as_str().unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && condition(pod, "Ready").as_deref() == Some("True")
}

/// The mesh's pods of `selector` (all of them, terminating ones too).
fn system_pods(mesh: &KubeMesh, selector: &str) -> Result<Vec<Value>, KubeMeshError> {
    mesh.pods(SYSTEM_NAMESPACE, selector)
}

/// Waits for a Ready pod of `selector` on `node` that is not `old_uid`.
fn replacement(
    mesh: &KubeMesh,
    selector: &str,
    node: &str,
    old_uid: &str,
) -> Result<Value, KubeMeshError> {
    until(
        &format!("a new Ready {selector} pod on {node} (not {old_uid})"),
        PATIENCE,
        || {
            Ok(system_pods(mesh, selector)?
                .into_iter()
                .find(|p| p["spec"]["nodeName"] == node && uid(p) != old_uid && ready(p)))
        },
    )
}

/// The pods the ztunnel-rs on `node` proxies: uid -> the network namespace
/// its sockets live in.
fn proxied(mesh: &KubeMesh, node: &str) -> Result<BTreeMap<String, String>, KubeMeshError> {
    let dump = mesh.ztunnel_admin(node, "/config_dump")?;
    Ok(dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["info"]["uid"].as_str()?.to_string(),
                p["sockets"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// A metric of the node agent on `node` (summed over labels).
fn agent_gauge(mesh: &KubeMesh, node: &str, metric: &str) -> Result<f64, KubeMeshError> {
    let pod = mesh.required_component(NODE_AGENT, node)?;
    let resp = mesh.pod_get(
        SYSTEM_NAMESPACE,
        name(&pod),
        NODE_AGENT_METRICS,
        "/metrics",
        Duration::from_secs(10),
    )?;
    let samples = crate::prometheus::parse(&resp.body)
        .map_err(|e| unexpected(format!("the metrics of {}", name(&pod)), e))?;
    Ok(crate::prometheus::sum(&samples, metric, &[]))
}

/// The fixture's pods on `node`.
fn fixture_pods_on<'f>(f: &'f KubeFixture, node: &str) -> Vec<&'f FixturePod> {
    f.echo
        .iter()
        .chain(&f.clients)
        .filter(|p| p.node == node)
        .collect()
}

fn pair<'f>(pods: &'f [FixturePod], what: &str) -> Result<[&'f FixturePod; 2], KubeMeshError> {
    match pods {
        [a, b, ..] if a.node != b.node => Ok([a, b]),
        _ => Err(unexpected(
            "the fixture",
            format!("needs {what} on two nodes, has {pods:?}"),
        )),
    }
}

/// Deletes a node's agent pod (`kubectl delete pod`, its grace period
/// honoured) while long-lived connections and new connections flow into
/// and out of that node: not one fails; the DaemonSet's new pod is Ready,
/// has handed the node's pods to ztunnel again (its snapshot acked, every
/// running pod rediscovered, none without a namespace) and ztunnel proxies
/// the same pods in the same namespaces as before.
fn node_agent_pod_restart(mesh: &KubeMesh, f: &KubeFixture) -> Result<String, KubeMeshError> {
    let [client_a, client_b] = pair(&f.clients, "clients")?;
    let [echo_a, echo_b] = pair(&f.echo, "echo pods")?;
    // The node whose agent restarts: B. Into it from A, out of it to A.
    let node = client_b.node.clone();
    let (echo_b, echo_a) = if echo_a.node == node {
        (echo_a, echo_b)
    } else {
        (echo_b, echo_a)
    };
    let here = fixture_pods_on(f, &node);
    let before = proxied(mesh, &node)?;
    if let Some(missing) = here.iter().find(|p| !before.contains_key(&p.uid)) {
        return Err(unexpected(
            format!("the ztunnel on {node}"),
            format!("does not proxy {} before the restart", missing.name),
        ));
    }
    let old = mesh.required_component(NODE_AGENT, &node)?;
    let old_name = name(&old).to_string();
    let old_uid = uid(&old).to_string();
    let window = Duration::from_secs(45);
    let vip = format!("{}:{ECHO_TCP}", f.echo_vip);
    let into = format!("{}:{ECHO_TCP}", echo_b.ip);
    let out_of = format!("{}:{ECHO_TCP}", echo_a.ip);
    let started = Instant::now();
    let (during, loads, probes) = std::thread::scope(|s| {
        let loads = [(client_a, &into), (client_b, &out_of)].map(|(from, to)| {
            let a = steady_load(to, window);
            s.spawn(move || client::<LoadReport>(mesh, from, &a, window))
        });
        let probes = [client_a, client_b].map(|from| {
            let a = probe_args(&vip, window, Duration::from_millis(50));
            s.spawn(move || client::<ConnectProbeReport>(mesh, from, &a, window))
        });
        let during = (|| {
            // Let the connections come up before the agent goes.
            std::thread::sleep(Duration::from_secs(3));
            let deleting = Instant::now();
            mesh.kubectl
                .run(&["delete", "pod", "-n", SYSTEM_NAMESPACE, &old_name])?;
            let deleted = deleting.elapsed();
            let new = replacement(mesh, NODE_AGENT, &node, &old_uid)?;
            let ready_after = deleting.elapsed();
            until(
                &format!("the new node agent on {node} synced with ztunnel and took its pods back"),
                PATIENCE,
                || {
                    let synced = agent_gauge(mesh, &node, "istio_node_agent_ztunnel_connected")?;
                    let found = agent_gauge(mesh, &node, "istio_node_agent_rediscovered_pods")?;
                    Ok((synced >= 1.0 && found >= here.len() as f64).then_some(()))
                },
            )?;
            let synced_after = deleting.elapsed();
            let rediscovered = agent_gauge(mesh, &node, "istio_node_agent_rediscovered_pods")?;
            let without_netns = agent_gauge(mesh, &node, "istio_node_agent_pods_without_netns")?;
            let after = proxied(mesh, &node)?;
            Ok::<_, KubeMeshError>((
                name(&new).to_string(),
                deleted,
                ready_after,
                synced_after,
                rediscovered,
                without_netns,
                after,
            ))
        })();
        (during, loads.map(joined), probes.map(joined))
    });
    let (new_name, deleted, ready_after, synced_after, rediscovered, without_netns, after) =
        during?;
    if started.elapsed() > window + EXEC_TIMEOUT || synced_after + Duration::from_secs(5) > window {
        return Err(unexpected(
            "the traffic window",
            format!(
                "the agent was back only {synced_after:?} after the delete: the {window:?} of traffic did not cover it"
            ),
        ));
    }
    let [load_in, load_out] = loads;
    let (load_in, load_out) = (load_in?, load_out?);
    load_clean(
        &format!(
            "long-lived connections {} -> {}",
            client_a.name, echo_b.name
        ),
        &load_in,
    )?;
    load_clean(
        &format!(
            "long-lived connections {} -> {}",
            client_b.name, echo_a.name
        ),
        &load_out,
    )?;
    let mut new_connections = 0;
    for (from, probe) in [client_a, client_b].iter().zip(probes) {
        let probe = probe?;
        probe_clean(
            &format!("new connections {} -> Service echo {vip}", from.name),
            &probe,
        )?;
        new_connections += probe.attempts;
    }
    if rediscovered < here.len() as f64 || without_netns > 0.0 {
        return Err(unexpected(
            format!("the new node agent {new_name} on {node}"),
            format!(
                "took back {rediscovered} running pod(s) of {} and found no namespace for {without_netns}",
                here.len()
            ),
        ));
    }
    if after != before {
        return Err(unexpected(
            format!("the ztunnel on {node} after the agent's restart"),
            format!("proxies {after:?}, not {before:?} as before"),
        ));
    }
    Ok(format!(
        "`kubectl delete pod {old_name}` on {node} (returned in {deleted:.1?}); {new_name} Ready {ready_after:.1?} after, \
         synced with ztunnel by {synced_after:.1?}, took back {rediscovered} running pod(s), 0 without a namespace; \
         {} requests over 2 long-lived connections into {node} and {} out of it, 0 errors; \
         {new_connections} new connections to Service echo {vip} from both nodes, 0 failed; \
         ztunnel on {node} proxies the same {} pod(s) in the same namespaces",
        load_in.requests,
        load_out.requests,
        after.len()
    ))
}

/// What the scenario saw of one node's ztunnel pods during a rollout, in
/// Unix ms (first seen).
#[derive(Debug, Default)]
struct NodeRollout {
    new_ready_ms: Option<u64>,
    old_terminating_ms: Option<u64>,
    old_gone_ms: Option<u64>,
}

/// Waits until `kubectl rollout status <what> --watch=false` says it rolled
/// out, recording on the way when each node's ztunnel pods changed (old
/// pods: `old`, uid by node).
fn rollout(
    mesh: &KubeMesh,
    what: &str,
    old: &BTreeMap<String, String>,
    nodes: &mut BTreeMap<String, NodeRollout>,
) -> Result<(), KubeMeshError> {
    until(
        &format!("`kubectl rollout status {what}`"),
        ROLLOUT_PATIENCE,
        || {
            if !old.is_empty() {
                let pods = system_pods(mesh, ZTUNNEL)?;
                let now = unix_ms();
                for (node, old_uid) in old {
                    let seen = nodes.entry(node.clone()).or_default();
                    let old_pod = pods.iter().find(|p| uid(p) == old_uid);
                    match old_pod {
                        None => {
                            seen.old_gone_ms.get_or_insert(now);
                            seen.old_terminating_ms.get_or_insert(now);
                        }
                        Some(p) if !p["metadata"]["deletionTimestamp"].is_null() => {
                            seen.old_terminating_ms.get_or_insert(now);
                        }
                        Some(_) => {}
                    }
                    if pods.iter().any(|p| {
                        p["spec"]["nodeName"] == node.as_str() && uid(p) != old_uid && ready(p)
                    }) {
                        seen.new_ready_ms.get_or_insert(now);
                    }
                }
            }
            let status = mesh.kubectl.run(&[
                "rollout",
                "status",
                what,
                "-n",
                SYSTEM_NAMESPACE,
                "--watch=false",
            ])?;
            Ok(status.contains("successfully rolled out").then_some(()))
        },
    )
}

/// `kubectl rollout restart daemonset/ztunnel` and its rollout, while a
/// client on each node opens a new connection to the echo Service every
/// 25 ms and holds a long-lived one. Reports, per node, the longest
/// stretch without a new connection and what became of the live ones;
/// fails only if the rollout does not finish or new connections do not
/// come back.
fn ztunnel_rolling_restart(mesh: &KubeMesh, f: &KubeFixture) -> Result<String, KubeMeshError> {
    let clients = pair(&f.clients, "clients")?;
    let old: BTreeMap<String, String> = clients
        .iter()
        .map(|c| {
            Ok((
                c.node.clone(),
                uid(&mesh.required_component(ZTUNNEL, &c.node)?).to_string(),
            ))
        })
        .collect::<Result<_, KubeMeshError>>()?;
    let window = Duration::from_secs(90);
    let vip = format!("{}:{ECHO_TCP}", f.echo_vip);
    let mut nodes: BTreeMap<String, NodeRollout> = BTreeMap::new();
    let zero = unix_ms();
    let (rolled, probes, holds) = std::thread::scope(|s| {
        let probes = clients.map(|from| {
            let a = probe_args(&vip, window, Duration::from_millis(25));
            s.spawn(move || client::<ConnectProbeReport>(mesh, from, &a, window))
        });
        let holds = clients.map(|from| {
            let a = hold_args(&vip, window);
            s.spawn(move || client::<HoldReport>(mesh, from, &a, window))
        });
        let rolled = (|| {
            std::thread::sleep(Duration::from_secs(3));
            let restart = unix_ms();
            mesh.kubectl.run(&[
                "rollout",
                "restart",
                "daemonset/ztunnel",
                "-n",
                SYSTEM_NAMESPACE,
            ])?;
            rollout(mesh, "daemonset/ztunnel", &old, &mut nodes)?;
            Ok::<_, KubeMeshError>((restart, unix_ms()))
        })();
        (rolled, probes.map(joined), holds.map(joined))
    });
    let (restart, done) = rolled?;
    let mut lines = vec![format!(
        "`kubectl rollout restart daemonset/ztunnel` rolled out in {:.1}s",
        (done - restart) as f64 / 1e3
    )];
    let mut failure = None;
    for ((client, probe), hold) in clients.iter().zip(probes).zip(holds) {
        let (probe, hold) = (probe?, hold?);
        let node = &client.node;
        let seen = nodes.get(node.as_str());
        let at = |t: Option<u64>| t.map_or("unseen".to_string(), |t| since(restart, t));
        let describe = |o: &Outage| {
            format!(
                "{} failed from {} to {} ({})",
                o.failures,
                since(restart, o.from_ms),
                o.until_ms.map_or("the end".into(), |t| since(restart, t)),
                o.first_error
            )
        };
        let longest = probe
            .outages
            .iter()
            .max_by_key(|o| o.until_ms.unwrap_or(u64::MAX).saturating_sub(o.from_ms));
        let outages = match longest {
            None => String::new(),
            Some(o) => format!(
                " in {} outage(s), the longest: {}",
                probe.outages.len(),
                describe(o)
            ),
        };
        let live = if hold.ok {
            format!("kept ({} round trips)", hold.exchanges)
        } else {
            // The old ztunnel whose termination came last before the break.
            // Either end's old ztunnel may have cut it (the Service's pod
            // may be on either node): each one terminating before the break.
            let cause = hold.ended_at_ms.and_then(|end| {
                let before: Vec<String> = nodes
                    .iter()
                    .filter_map(|(n, r)| Some((n, r.old_terminating_ms?)))
                    .filter(|(_, t)| *t <= end)
                    .map(|(n, t)| format!("{:.1}s after {n}'s", (end - t) as f64 / 1e3))
                    .collect();
                (!before.is_empty()).then(|| {
                    format!(
                        ", {} old ztunnel was seen terminating",
                        before.join(" and ")
                    )
                })
            });
            format!(
                "broke at {} after {} round trips ({}){}",
                hold.ended_at_ms.map_or("?".into(), |t| since(restart, t)),
                hold.exchanges,
                hold.error.as_deref().unwrap_or_default(),
                cause.unwrap_or_default()
            )
        };
        lines.push(format!(
            "{node}: new ztunnel seen Ready {}, old one seen terminating {} and gone {}; \
             new connections from {}: {} attempts, {} failed{outages}, longest gap {:.0} ms; \
             its long-lived connection {live}",
            at(seen.and_then(|s| s.new_ready_ms)),
            at(seen.and_then(|s| s.old_terminating_ms)),
            at(seen.and_then(|s| s.old_gone_ms)),
            client.name,
            probe.attempts,
            probe.failures,
            probe.longest_gap_ms,
        ));
        if failure.is_none() {
            if !probe.ok {
                failure = Some(unexpected(
                    format!("new connections from {} to Service echo {vip}", client.name),
                    format!(
                        "did not come back after the ztunnel rollout: {}",
                        probe.error.as_deref().unwrap_or_default()
                    ),
                ));
            } else if probe.last_ok_at_ms.is_none_or(|t| t < done) {
                failure = Some(unexpected(
                    "the traffic window",
                    format!(
                        "the {window:?} of probing ended before the rollout did ({:.1}s)",
                        (done - zero) as f64 / 1e3
                    ),
                ));
            }
        }
    }
    let evidence = lines.join("\n  ");
    match failure {
        Some(KubeMeshError::Unexpected { what, detail }) => {
            Err(unexpected(what, format!("{detail}\n  {evidence}")))
        }
        Some(e) => Err(e),
        None => {
            // After the rollout every node's ztunnel proxies its pods.
            for client in clients {
                let now = proxied(mesh, &client.node)?;
                if let Some(missing) = fixture_pods_on(f, &client.node)
                    .into_iter()
                    .find(|p| !now.contains_key(&p.uid))
                {
                    return Err(unexpected(
                        format!("the new ztunnel on {}", client.node),
                        format!("does not proxy {}\n  {evidence}", missing.name),
                    ));
                }
            }
            Ok(evidence)
        }
    }
}

/// The xDS connection state (`Connected`, ...) and the number of streams
/// opened, of the ztunnel-rs on `node`.
fn xds(mesh: &KubeMesh, node: &str) -> Result<(String, u64), KubeMeshError> {
    let dump = mesh.ztunnel_admin(node, "/config_dump")?;
    let x = &dump["xds"];
    Ok((
        x["connection"].as_str().unwrap_or_default().to_string(),
        x["connectionAttempts"].as_u64().unwrap_or_default(),
    ))
}

/// The policy `istiod_restart` applies once istiod is back.
const DENY_CLIENT: &str = "deny-client-after-istiod-restart";

/// `kubectl rollout restart deployment/istiod` under steady load (40
/// requests/s over 2 long-lived connections, a new connection every 50
/// ms): not one fails; the new istiod is Ready, every ztunnel opened a new
/// xDS stream and is Connected, and a DENY policy for the clients applied
/// afterwards refuses them, and traffic flows again once it is removed.
fn istiod_restart(mesh: &KubeMesh, f: &KubeFixture) -> Result<String, KubeMeshError> {
    let [client_a, client_b] = pair(&f.clients, "clients")?;
    let nodes = [client_a.node.clone(), client_b.node.clone()];
    let old = system_pods(mesh, ISTIOD)?;
    let old_uids: Vec<String> = old.iter().map(|p| uid(p).to_string()).collect();
    let streams_before = nodes
        .iter()
        .map(|n| Ok(xds(mesh, n)?.1))
        .collect::<Result<Vec<u64>, KubeMeshError>>()?;
    let window = Duration::from_secs(60);
    let vip = format!("{}:{ECHO_TCP}", f.echo_vip);
    let (during, load, probe) = std::thread::scope(|s| {
        let load = {
            let a = steady_load(&vip, window);
            s.spawn(move || client::<LoadReport>(mesh, client_a, &a, window))
        };
        let probe = {
            let a = probe_args(&vip, window, Duration::from_millis(50));
            s.spawn(move || client::<ConnectProbeReport>(mesh, client_b, &a, window))
        };
        let during = (|| {
            std::thread::sleep(Duration::from_secs(3));
            let started = Instant::now();
            mesh.kubectl.run(&[
                "rollout",
                "restart",
                "deployment/istiod",
                "-n",
                SYSTEM_NAMESPACE,
            ])?;
            rollout(
                mesh,
                "deployment/istiod",
                &BTreeMap::new(),
                &mut BTreeMap::new(),
            )?;
            let rolled = started.elapsed();
            let new = until("a new istiod Ready", PATIENCE, || {
                Ok(system_pods(mesh, ISTIOD)?
                    .into_iter()
                    .find(|p| !old_uids.iter().any(|u| u == uid(p)) && ready(p)))
            })?;
            for (node, before) in nodes.iter().zip(&streams_before) {
                until(
                    &format!("the ztunnel on {node} connected to the new istiod"),
                    PATIENCE,
                    || {
                        let (state, streams) = xds(mesh, node)?;
                        Ok((state == "Connected" && streams > *before).then_some(()))
                    },
                )?;
            }
            Ok::<_, KubeMeshError>((name(&new).to_string(), rolled, started.elapsed()))
        })();
        (during, joined(load), joined(probe))
    });
    let (new_istiod, rolled, reconnected) = during?;
    if reconnected + Duration::from_secs(5) > window {
        return Err(unexpected(
            "the traffic window",
            format!(
                "istiod and the ztunnels were back only after {reconnected:?}: the {window:?} of traffic did not cover it"
            ),
        ));
    }
    let (load, probe) = (load?, probe?);
    load_clean(
        &format!(
            "long-lived connections {} -> Service echo {vip}",
            client_a.name
        ),
        &load,
    )?;
    probe_clean(
        &format!("new connections {} -> Service echo {vip}", client_b.name),
        &probe,
    )?;
    let streams_after = nodes
        .iter()
        .map(|n| Ok(xds(mesh, n)?.1))
        .collect::<Result<Vec<u64>, KubeMeshError>>()?;
    let (denied_after, allowed_after) = policy_takes_effect(mesh, f, client_a)?;
    Ok(format!(
        "`kubectl rollout restart deployment/istiod` rolled out in {rolled:.1?}, {new_istiod} Ready; \
         ztunnels on {} reopened xDS (streams {streams_before:?} -> {streams_after:?}), Connected {reconnected:.1?} after the restart; \
         {} requests over 2 long-lived connections and {} new connections to Service echo {vip}, 0 failed; \
         then a DENY for the clients refused {} in {denied_after:.1?}, and its removal let it through in {allowed_after:.1?}",
        nodes.join(", "),
        load.requests,
        probe.attempts,
        client_a.name,
    ))
}

/// Applies a DENY AuthorizationPolicy for the clients' principal on the
/// echo pods until `from`'s request to the echo Service is refused, then
/// removes it until the request goes through again (also when something
/// fails in between: the cluster is left as found). Returns how long each
/// took to take effect.
fn policy_takes_effect(
    mesh: &KubeMesh,
    f: &KubeFixture,
    from: &FixturePod,
) -> Result<(Duration, Duration), KubeMeshError> {
    let trust_domain = mesh
        .install_values
        .iter()
        .find_map(|v| v.strip_prefix("trustDomain="))
        .unwrap_or(api::labels::DEFAULT_TRUST_DOMAIN);
    let principal = format!("{trust_domain}/ns/{NAMESPACE}/sa/client");
    let policy = authorization(
        NAMESPACE,
        DENY_CLIENT,
        "echo",
        "DENY",
        &from_principals(&[&principal]),
    );
    let url = format!("http://{}:80/", f.echo_vip);
    let node = mesh.node(&from.node)?;
    let passes = || -> Result<bool, KubeMeshError> {
        Ok(node
            .client_http(NAMESPACE, &from.name, &url, EXEC_TIMEOUT)?
            .ok)
    };
    if !passes()? {
        return Err(unexpected(
            format!("{} -> {url}", from.name),
            "refused before any policy was applied",
        ));
    }
    let applied = Instant::now();
    mesh.kubectl.apply(&policy)?;
    let denied = until(
        &format!(
            "the DENY policy {NAMESPACE}/{DENY_CLIENT} to refuse {}",
            from.name
        ),
        PATIENCE,
        || Ok((!passes()?).then(|| applied.elapsed())),
    );
    let removed = Instant::now();
    let deleted = mesh.kubectl.run(&[
        "delete",
        "authorizationpolicy",
        "-n",
        NAMESPACE,
        DENY_CLIENT,
        "--ignore-not-found",
    ]);
    let allowed = until(
        &format!(
            "{} -> {url} to pass once {DENY_CLIENT} is removed",
            from.name
        ),
        PATIENCE,
        || Ok(passes()?.then(|| removed.elapsed())),
    );
    let denied = denied?;
    deleted?;
    Ok((denied, allowed?))
}
