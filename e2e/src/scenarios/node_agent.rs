//! The node agent's scenarios: kubelet's probes reach an enrolled pod under
//! STRICT mTLS (through the node's kubelet-probe rules), and killing a
//! node's agent under steady traffic loses no request and no pod.

use std::time::Duration;

use super::Scenario;
use super::fixture::{AMBIENT_NS, ECHO_HELLO, ECHO_HTTP, ECHO_TCP, L4Fixture, echo_server};
use super::l4::{
    CHANGE_TIMEOUT, carried, failed, load_flowed, pod_name, under_load, until_connections,
};
use super::policies::{Applied, peer_authentication};
use crate::apps::EchoReply;
use crate::cluster::{Cluster, PodInfo, ProxyRef, ReadinessProbe};
use crate::probe::{self, ProbeError, describe_exchange, eventually, mtls_from_to, ztunnel};

/// The pod the probe scenario creates.
const PROBED: &str = "probed-0";
/// Where kubelet's probes come from once the node's rules rewrote them
/// (upstream's `HostProbeSNATIP`).
const KUBELET_PROBE_ADDRESS: &str = "169.254.7.127";

pub fn probe_under_strict() -> Scenario {
    Scenario {
        name: "kubelet_probe_reaches_a_strict_pod",
        run: kubelet_probe_under_strict,
    }
}

pub fn agent_restart() -> Scenario {
    Scenario {
        name: "node_agent_restart_keeps_every_pod",
        run: node_agent_restart,
    }
}

/// Under STRICT, a new enrolled pod with an HTTP readiness probe becomes
/// Ready (kubelet's GET from the node reached its app, from the probe
/// address) while plaintext to it from outside the mesh is refused.
/// Without the node's rule, the probe would be captured like that plaintext
/// and refused: the pod would never be Ready.
fn kubelet_probe_under_strict(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let node = f.servers[0].node.clone();
    let strict = Applied::new(cluster, &peer_authentication(AMBIENT_NS, "mtls", "STRICT"))?;
    let result = (|| {
        let target = L4Fixture::at(&f.servers[0], ECHO_HELLO);
        probe::until_exchange(cluster, &f.legacy, &target, false, CHANGE_TIMEOUT)?;
        let request =
            echo_server(AMBIENT_NS, PROBED, &node, "server").readiness(ReadinessProbe::HttpGet {
                port: ECHO_HTTP,
                path: "/ready".into(),
            });
        // Returns once kubelet's probe from the node passed.
        let pod = cluster.create_pod(&request)?;
        if !probe::proxies_pod(cluster, &node, &pod)? {
            return Err(failed(
                &pod_name(&pod),
                format!("the ztunnel on {node} does not proxy it: it is not captured"),
            ));
        }
        let outcome = cluster.probe_readiness(AMBIENT_NS, PROBED)?;
        if !outcome.passed {
            return Err(failed(
                &format!("kubelet's readiness probe of {}", pod_name(&pod)),
                &outcome.detail,
            ));
        }
        let body = outcome.detail.split_once(' ').map_or("", |(_, body)| body);
        let reply: EchoReply = serde_json::from_str(body).map_err(|e| {
            failed(
                "kubelet's readiness probe",
                format!("not the echo app's answer ({e}): {}", outcome.detail),
            )
        })?;
        if !reply.peer.contains(KUBELET_PROBE_ADDRESS) {
            return Err(failed(
                &format!("kubelet's readiness probe of {}", pod_name(&pod)),
                format!(
                    "the app saw it come from {}, not from {KUBELET_PROBE_ADDRESS}: the node did not rewrite it",
                    reply.peer
                ),
            ));
        }
        let plaintext = probe::tcp_hello(cluster, &f.legacy, &L4Fixture::at(&pod, ECHO_HELLO))?;
        if plaintext.ok {
            return Err(failed(
                &format!("{} -> {} under STRICT", pod_name(&f.legacy), pod_name(&pod)),
                describe_exchange(&plaintext),
            ));
        }
        Ok(format!(
            "{} Ready under STRICT: kubelet's GET :{ECHO_HTTP}/ready from {node} reached the app from {}; plaintext from {} {}",
            pod_name(&pod),
            reply.peer,
            pod_name(&f.legacy),
            describe_exchange(&plaintext)
        ))
    })();
    if cluster.pod(AMBIENT_NS, PROBED).is_some() {
        let _ = cluster.delete_pod(AMBIENT_NS, PROBED);
    }
    strict.remove()?;
    result
}

/// The pods a node's ztunnel proxies: uid and the network namespace its
/// sockets live in, sorted.
fn proxied(cluster: &dyn Cluster, node: &str) -> Result<Vec<(String, String)>, ProbeError> {
    let dump = cluster.config_dump(&ztunnel(node))?;
    let mut pods: Vec<(String, String)> = dump
        .get("pods")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let uid = p.get("info")?.get("uid")?.as_str()?;
            let sockets = p.get("sockets")?.as_str()?;
            Some((uid.to_string(), sockets.to_string()))
        })
        .collect();
    pods.sort();
    Ok(pods)
}

/// A gauge of a node agent's metrics.
fn agent_gauge(cluster: &dyn Cluster, agent: &ProxyRef, name: &str) -> Result<f64, ProbeError> {
    let samples = probe::metrics(cluster, agent)?;
    Ok(crate::prometheus::sum(&samples, name, &[]))
}

/// Steady traffic into a node's pod while that node's agent is killed
/// (SIGKILL) and started again: not one request fails, the node's ztunnel
/// keeps proxying every pod throughout (new connections while the agent is
/// away) and afterwards (its `/config_dump` pods, once the new agent's
/// snapshot was acked: the same pods in the same namespaces), and the new
/// agent found every pod again.
fn node_agent_restart(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let server = &f.servers[1];
    let node = server.node.clone();
    let agent = ProxyRef::NodeAgent { node: node.clone() };
    let here: Vec<&PodInfo> = [&f.servers[1], &f.clients[1], &f.peer]
        .into_iter()
        .filter(|p| p.node == node)
        .collect();
    let before = proxied(cluster, &node)?;
    if let Some(missing) = here
        .iter()
        .find(|p| !before.iter().any(|(uid, _)| *uid == p.uid))
    {
        return Err(failed(
            &format!("the ztunnel on {node}"),
            format!("does not proxy {} before the restart", pod_name(missing)),
        ));
    }
    let src = f.principal(AMBIENT_NS, "client");
    let dst = f.principal(AMBIENT_NS, "server");
    let filter = mtls_from_to(&src, &dst);
    let opened = probe::connections_opened(cluster, &ztunnel(&node), &filter)?;
    let (after, load) = under_load(
        cluster,
        &f.clients[0],
        &L4Fixture::at(server, ECHO_TCP),
        Duration::from_secs(20),
        || {
            until_connections(cluster, &node, &filter, opened + 2.0)?;
            cluster.stop_component(&agent)?;
            // With the agent gone, ztunnel still serves the node's pods,
            // out of the node and into it.
            carried(cluster, &f.clients[1], &f.servers[0], ECHO_HELLO)?;
            carried(cluster, &f.clients[0], server, ECHO_HELLO)?;
            cluster.start_component(&agent)?;
            eventually(
                &format!("the ztunnel on {node} to ack the new agent's snapshot"),
                CHANGE_TIMEOUT,
                || {
                    let synced =
                        agent_gauge(cluster, &agent, "istio_node_agent_ztunnel_connected")?;
                    Ok(if synced >= 1.0 {
                        Ok(())
                    } else {
                        Err(format!("{synced} ztunnel(s) synced"))
                    })
                },
            )?;
            proxied(cluster, &node)
        },
    )?;
    load_flowed(
        "the long-lived connections while the node agent restarted",
        &load,
    )?;
    if after != before {
        return Err(failed(
            &format!("the ztunnel on {node} after the agent's restart"),
            format!("proxies {after:?}, not {before:?} as before"),
        ));
    }
    let rediscovered = agent_gauge(cluster, &agent, "istio_node_agent_rediscovered_pods")?;
    let missing = agent_gauge(cluster, &agent, "istio_node_agent_pods_without_netns")?;
    if rediscovered < here.len() as f64 || missing > 0.0 {
        return Err(failed(
            &format!("the restarted node agent on {node}"),
            format!(
                "took back {rediscovered} running pod(s) of {} and found no namespace for {missing}",
                here.len()
            ),
        ));
    }
    carried(cluster, &f.clients[1], &f.servers[0], ECHO_HELLO)?;
    carried(cluster, &f.clients[0], server, ECHO_HELLO)?;
    Ok(format!(
        "{} requests over 2 long-lived connections into {}, 0 errors, across a SIGKILL of the node agent on {node} and its restart; \
         new connections carried while it was away; it took back {rediscovered} running pod(s); ztunnel proxies the same {} pod(s) after",
        load.requests,
        pod_name(server),
        after.len()
    ))
}
