//! The L4 scenarios: capture and mTLS, opt-out, PeerAuthentication,
//! AuthorizationPolicy (DENY by principal, namespace, port; ALLOW lists),
//! service load balancing, endpoint removal, `internalTrafficPolicy:
//! Local` and `trafficDistribution: PreferClose`, control-plane and proxy
//! restarts, and certificate rotation.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::Scenario;
use super::fixture::{
    AMBIENT_NS, ECHO_HELLO, ECHO_HELLO_ALT, ECHO_TCP, L4Fixture, PEER_NS, SERVICE, echo_server,
    service_vip,
};
use super::policies::{
    Applied, authorization, from_namespaces, from_principals, peer_authentication,
    policy_principal, to_ports,
};
use crate::apps::{LoadReport, TcpReport};
use crate::cluster::{Cluster, ClusterError, PodInfo, ProxyRef};
use crate::probe::{
    self, CONNECTION_FAILURES, ProbeError, counted, describe_exchange, eventually, mtls_from_to,
    tcp_hello, until_exchange, ztunnel,
};

/// How long a change (a policy, a pod, a restart) may take to reach the
/// data plane before a scenario gives up. Generous: CI machines are slow.
pub(super) const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The scenarios that share one cluster with default certificate lifetimes,
/// in the order they run (disruptive ones last).
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "captured_in_mtls_same_node",
            run: captured_same_node,
        },
        Scenario {
            name: "captured_in_mtls_cross_node",
            run: captured_cross_node,
        },
        Scenario {
            name: "opted_out_pod_is_not_captured",
            run: opted_out_not_captured,
        },
        Scenario {
            name: "strict_rejects_plaintext_permissive_allows_it",
            run: strict_and_permissive,
        },
        Scenario {
            name: "deny_by_principal",
            run: deny_by_principal,
        },
        Scenario {
            name: "deny_by_namespace",
            run: deny_by_namespace,
        },
        Scenario {
            name: "deny_by_port",
            run: deny_by_port,
        },
        Scenario {
            name: "allow_list_admits_only_listed_identities",
            run: allow_list,
        },
        Scenario {
            name: "allow_with_a_bad_port_still_refuses_others",
            run: super::fail_closed::allow_with_a_bad_port,
        },
        Scenario {
            name: "l7_policy_on_a_service_refuses_its_pods",
            run: super::fail_closed::l7_policy_on_a_service,
        },
        Scenario {
            name: "service_vip_balances_across_nodes",
            run: service_balances,
        },
        Scenario {
            name: "deleted_pod_leaves_the_service",
            run: deleted_pod_leaves_service,
        },
        Scenario {
            name: "internal_traffic_policy_local_stays_on_the_node",
            run: internal_traffic_policy_local,
        },
        Scenario {
            name: "ztunnel_without_istiod_refuses_then_carries_in_mtls",
            run: ztunnel_without_istiod,
        },
        Scenario {
            name: "istiod_restart_keeps_traffic_flowing",
            run: istiod_restart,
        },
        Scenario {
            name: "ztunnel_restart_serves_new_connections",
            run: ztunnel_restart,
        },
        super::node_agent::probe_under_strict(),
        super::node_agent::agent_restart(),
    ]
}

/// L4 scenarios that run on the local cluster only for now (after
/// [`all`]): labelling nodes through [`Cluster::apply`] has not been tried
/// on the Kubernetes run (`cargo xtask e2e`).
pub fn local_only() -> Vec<Scenario> {
    vec![Scenario {
        name: "prefer_close_keeps_traffic_in_the_zone",
        run: prefer_close,
    }]
}

/// Needs a cluster whose workload certificates live only seconds (see the
/// mesh's certificate TTL); it waits for a renewal on both sides.
pub fn rotation() -> Scenario {
    Scenario {
        name: "certificate_rotation_keeps_connections",
        run: certificate_rotation,
    }
}

pub(super) fn failed(what: &str, detail: impl std::fmt::Display) -> ProbeError {
    ProbeError::Unexpected {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

pub(super) fn pod_name(p: &PodInfo) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// An exchange that must go through, answered by `to`, which sees it come
/// from `from`'s own address.
pub(super) fn carried(
    cluster: &dyn Cluster,
    from: &PodInfo,
    to: &PodInfo,
    port: u16,
) -> Result<TcpReport, ProbeError> {
    let report = tcp_hello(cluster, from, &L4Fixture::at(to, port))?;
    let what = format!("{} -> {}:{port}", pod_name(from), pod_name(to));
    if !report.ok {
        return Err(failed(&what, describe_exchange(&report)));
    }
    match &report.hello {
        Some(h) if h.pod != to.name => {
            Err(failed(&what, format!("answered by the wrong pod: {h:?}")))
        }
        // The application sees the calling pod's address, mesh or not.
        Some(h) if !probe::saw_caller(&report, from) => Err(failed(
            &what,
            format!(
                "the server saw the connection come from {}, not from the client pod's {}",
                h.peer, from.ip
            ),
        )),
        Some(_) => Ok(report),
        None => Err(failed(&what, "no hello from the server")),
    }
}

/// An exchange in mutual TLS: carried, and counted by the destination's
/// ztunnel with both SPIFFE ids (and by the source's as the source).
fn in_mtls(
    cluster: &dyn Cluster,
    f: &L4Fixture,
    from: (&PodInfo, &str),
    to: (&PodInfo, &str),
) -> Result<String, ProbeError> {
    let (src_pod, src_sa) = from;
    let (dst_pod, dst_sa) = to;
    let src = f.principal(&src_pod.namespace, src_sa);
    let dst = f.principal(&dst_pod.namespace, dst_sa);
    let filter = mtls_from_to(&src, &dst);
    let (_, count) = counted(cluster, &ztunnel(&dst_pod.node), &filter, || {
        carried(cluster, src_pod, dst_pod, ECHO_HELLO)
    })?;
    let mut source_side = filter;
    source_side[0] = ("reporter", "source");
    let outbound = probe::connections_opened(cluster, &ztunnel(&src_pod.node), &source_side)?;
    if outbound < 1.0 {
        return Err(failed(
            &format!("the ztunnel on {}", src_pod.node),
            format!("reported no outbound mTLS connection {src} -> {dst}"),
        ));
    }
    Ok(format!(
        "{} ({}) -> {} ({}): {count} mTLS connection(s) {src} -> {dst} at the destination",
        pod_name(src_pod),
        src_pod.node,
        pod_name(dst_pod),
        dst_pod.node
    ))
}

fn captured_same_node(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    in_mtls(
        cluster,
        f,
        (&f.clients[0], "client"),
        (&f.servers[0], "server"),
    )
}

fn captured_cross_node(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let there = in_mtls(
        cluster,
        f,
        (&f.clients[0], "client"),
        (&f.servers[1], "server"),
    )?;
    let back = in_mtls(
        cluster,
        f,
        (&f.clients[1], "client"),
        (&f.servers[0], "server"),
    )?;
    Ok(format!("{there}; {back}"))
}

fn opted_out_not_captured(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let node = &f.opted_out.node;
    if probe::proxies_pod(cluster, node, &f.opted_out)? {
        return Err(failed(
            &pod_name(&f.opted_out),
            format!("the ztunnel on {node} proxies it despite dataplane-mode=none"),
        ));
    }
    if !probe::proxies_pod(cluster, node, &f.clients[0])? {
        return Err(failed(
            &pod_name(&f.clients[0]),
            format!("the ztunnel on {node} does not proxy this enrolled pod"),
        ));
    }
    // Its traffic leaves as plaintext and arrives at the server's ztunnel
    // without an identity (PERMISSIVE lets it in).
    let server = &f.servers[1];
    let dst = f.principal(AMBIENT_NS, "server");
    let filter = [
        ("reporter", "destination"),
        ("connection_security_policy", "unknown"),
        ("destination_principal", dst.as_str()),
    ];
    let (report, count) = counted(cluster, &ztunnel(&server.node), &filter, || {
        carried(cluster, &f.opted_out, server, ECHO_HELLO)
    })?;
    Ok(format!(
        "not handed to its node's ztunnel; its connection reached {} in plaintext ({count} plaintext connection(s) counted there): {}",
        pod_name(server),
        describe_exchange(&report)
    ))
}

fn strict_and_permissive(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let server = &f.servers[0];
    let target = L4Fixture::at(server, ECHO_HELLO);
    until_exchange(cluster, &f.legacy, &target, true, CHANGE_TIMEOUT)?;
    let strict = Applied::new(cluster, &peer_authentication(AMBIENT_NS, "mtls", "STRICT"))?;
    let refused = until_exchange(cluster, &f.legacy, &target, false, CHANGE_TIMEOUT)?;
    in_mtls(cluster, f, (&f.clients[0], "client"), (server, "server"))?;
    cluster.apply_yaml(&peer_authentication(AMBIENT_NS, "mtls", "PERMISSIVE"))?;
    until_exchange(cluster, &f.legacy, &target, true, CHANGE_TIMEOUT)?;
    strict.remove()?;
    Ok(format!(
        "plaintext from {}: carried under PERMISSIVE, {} under STRICT, carried again under PERMISSIVE; mTLS carried throughout",
        pod_name(&f.legacy),
        describe_exchange(&refused)
    ))
}

/// Connections a node's ztunnel refused on policy so far.
pub(super) fn policy_denials(cluster: &dyn Cluster, node: &str) -> Result<f64, ProbeError> {
    let samples = probe::metrics(cluster, &ztunnel(node))?;
    Ok(crate::prometheus::sum(
        &samples,
        CONNECTION_FAILURES,
        &[("reason", "policy_denied")],
    ))
}

/// Applies `policy`, waits until `denied` is refused while `allowed` is
/// still carried, removes it and waits until `denied` is carried again.
pub(super) fn denial(
    cluster: &dyn Cluster,
    policy: &str,
    denied: (&PodInfo, &str),
    allowed: (&PodInfo, &str),
) -> Result<String, ProbeError> {
    let (denied_pod, denied_target) = denied;
    let (allowed_pod, allowed_target) = allowed;
    until_exchange(cluster, denied_pod, denied_target, true, CHANGE_TIMEOUT)?;
    let node = server_node(cluster, denied_target)?;
    let applied = Applied::new(cluster, policy)?;
    until_exchange(cluster, denied_pod, denied_target, false, CHANGE_TIMEOUT)?;
    // The first refusal may be a connection in flight when the policy
    // arrived, which ztunnel closes (revocation) rather than denies at
    // admission: the evidence is a fresh connection, refused and counted.
    let before = policy_denials(cluster, &node)?;
    let refused = tcp_hello(cluster, denied_pod, denied_target)?;
    if refused.ok {
        return Err(failed(
            &format!("{} -> {denied_target}", pod_name(denied_pod)),
            format!(
                "carried again after the policy refused it: {}",
                describe_exchange(&refused)
            ),
        ));
    }
    let after = eventually(
        &format!("the ztunnel on {node} to count the refusal as a policy denial"),
        CHANGE_TIMEOUT,
        || {
            let now = policy_denials(cluster, &node)?;
            Ok(if now > before {
                Ok(now)
            } else {
                Err(format!("still {now}"))
            })
        },
    )?;
    let ok = tcp_hello(cluster, allowed_pod, allowed_target)?;
    if !ok.ok {
        return Err(failed(
            &format!(
                "{} -> {allowed_target} under the policy",
                pod_name(allowed_pod)
            ),
            describe_exchange(&ok),
        ));
    }
    applied.remove()?;
    until_exchange(cluster, denied_pod, denied_target, true, CHANGE_TIMEOUT)?;
    Ok(format!(
        "{} -> {denied_target} {} ({} policy denial(s) counted on {node}); {} -> {allowed_target} carried; carried again once removed",
        pod_name(denied_pod),
        describe_exchange(&refused),
        after - before,
        pod_name(allowed_pod),
    ))
}

/// The node whose pod has the address of `target` (`ip:port`).
fn server_node(cluster: &dyn Cluster, target: &str) -> Result<String, ProbeError> {
    let ip = target.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(target);
    ["server-0", "server-1"]
        .iter()
        .filter_map(|name| cluster.pod(AMBIENT_NS, name))
        .find(|p| p.ip.to_string() == ip)
        .map(|p| p.node)
        .ok_or_else(|| failed(target, "is not one of the fixture's servers"))
}

fn deny_by_principal(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let other = f.principal(AMBIENT_NS, "other");
    let policy = authorization(
        AMBIENT_NS,
        "deny-other",
        "server",
        "DENY",
        &from_principals(&[policy_principal(&other)]),
    );
    let target = L4Fixture::at(&f.servers[1], ECHO_HELLO);
    denial(
        cluster,
        &policy,
        (&f.other, &target),
        (&f.clients[0], &target),
    )
}

fn deny_by_namespace(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let policy = authorization(
        AMBIENT_NS,
        "deny-peer-namespace",
        "server",
        "DENY",
        &from_namespaces(&[PEER_NS]),
    );
    let target = L4Fixture::at(&f.servers[0], ECHO_HELLO);
    denial(
        cluster,
        &policy,
        (&f.peer, &target),
        (&f.clients[1], &target),
    )
}

fn deny_by_port(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let policy = authorization(
        AMBIENT_NS,
        "deny-alt-port",
        "server",
        "DENY",
        &to_ports(&[ECHO_HELLO_ALT]),
    );
    let server = &f.servers[1];
    denial(
        cluster,
        &policy,
        (&f.clients[0], &L4Fixture::at(server, ECHO_HELLO_ALT)),
        (&f.clients[0], &L4Fixture::at(server, ECHO_HELLO)),
    )
}

fn allow_list(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let client = f.principal(AMBIENT_NS, "client");
    let policy = authorization(
        AMBIENT_NS,
        "allow-clients",
        "server",
        "ALLOW",
        &from_principals(&[policy_principal(&client)]),
    );
    let target = L4Fixture::at(&f.servers[0], ECHO_HELLO);
    let evidence = {
        let applied = Applied::new(cluster, &policy)?;
        until_exchange(cluster, &f.other, &target, false, CHANGE_TIMEOUT)?;
        let mut seen = Vec::new();
        for (pod, want_ok) in [
            (&f.clients[0], true),
            (&f.clients[1], true),
            (&f.peer, false),
            (&f.legacy, false),
            (&f.other, false),
        ] {
            let report = tcp_hello(cluster, pod, &target)?;
            if report.ok != want_ok {
                return Err(failed(
                    &format!(
                        "{} -> {target} under an ALLOW list of {client}",
                        pod_name(pod)
                    ),
                    describe_exchange(&report),
                ));
            }
            seen.push(format!(
                "{} {}",
                pod_name(pod),
                if report.ok { "admitted" } else { "refused" }
            ));
        }
        applied.remove()?;
        seen.join(", ")
    };
    until_exchange(cluster, &f.other, &target, true, CHANGE_TIMEOUT)?;
    Ok(format!(
        "ALLOW {client} only: {evidence}; all admitted again once removed"
    ))
}

/// Who answers exchanges through the service VIP (see [`probe::who_answers`]).
fn spread(
    cluster: &dyn Cluster,
    from: &PodInfo,
    vip: &str,
    servers: &[&str],
    tries: usize,
) -> Result<Vec<(String, usize)>, ProbeError> {
    probe::who_answers(
        cluster,
        from,
        &format!("{vip}:{ECHO_HELLO}"),
        servers,
        tries,
    )
}

fn service_balances(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let answered = spread(
        cluster,
        &f.clients[0],
        &f.service_vip,
        &["server-0", "server-1"],
        60,
    )?;
    let who: BTreeSet<&str> = answered.iter().map(|(p, _)| p.as_str()).collect();
    if who != BTreeSet::from(["server-0", "server-1"]) {
        return Err(failed(
            &format!("service {SERVICE} ({})", f.service_vip),
            format!("only these endpoints answered: {answered:?}"),
        ));
    }
    Ok(format!(
        "{}:{ECHO_HELLO} answered by {answered:?} (one endpoint per node)",
        f.service_vip
    ))
}

fn deleted_pod_leaves_service(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let node = f.servers[1].node.clone();
    let extra = cluster.create_pod(
        &echo_server(AMBIENT_NS, "server-extra", &node, "server").label("app", "server"),
    )?;
    let result = (|| {
        probe::until_in_mesh(
            cluster,
            &f.trust_domain,
            &[(&extra, "server")],
            CHANGE_TIMEOUT,
        )?;
        let uid = probe::known_workload(cluster, &f.clients[0].node, &extra)?
            .map(|w| w.uid)
            .unwrap_or_default();
        let has_extra = |present: bool| {
            for n in cluster.nodes() {
                let what = format!(
                    "the ztunnel on {n} to {} {uid} as an endpoint of {SERVICE}",
                    if present { "have" } else { "drop" }
                );
                eventually(&what, CHANGE_TIMEOUT, || {
                    let eps = probe::service_endpoints(cluster, &n, AMBIENT_NS, SERVICE)?;
                    Ok(if eps.contains(&uid) == present {
                        Ok(())
                    } else {
                        Err(format!("endpoints: {eps:?}"))
                    })
                })?;
            }
            Ok::<(), ProbeError>(())
        };
        has_extra(true)?;
        let before = spread(
            cluster,
            &f.clients[0],
            &f.service_vip,
            &["server-0", "server-1", "server-extra"],
            90,
        )?;
        if !before.iter().any(|(p, _)| p == "server-extra") {
            return Err(failed(
                "server-extra",
                format!("never answered through the service: {before:?}"),
            ));
        }
        cluster.delete_pod(AMBIENT_NS, "server-extra")?;
        has_extra(false)?;
        let after = spread(
            cluster,
            &f.clients[0],
            &f.service_vip,
            &["server-extra"],
            20,
        )?;
        if after.iter().any(|(p, _)| p == "server-extra") {
            return Err(failed(
                "server-extra",
                format!("still answered after its deletion: {after:?}"),
            ));
        }
        Ok(format!(
            "with server-extra: {before:?}; after deleting it, 20 of 20 connections carried by {after:?}"
        ))
    })();
    if cluster.pod(AMBIENT_NS, "server-extra").is_some() {
        let _ = cluster.delete_pod(AMBIENT_NS, "server-extra");
    }
    result
}

/// The service `server-local`: the fixture's servers (one per node) with
/// `internalTrafficPolicy: Local`.
const LOCAL_SERVICE: &str = "server-local";

fn local_service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {LOCAL_SERVICE}\n  namespace: {AMBIENT_NS}\nspec:\n  \
         internalTrafficPolicy: Local\n  selector:\n    app: server\n  ports:\n  - name: hello\n    \
         port: {ECHO_HELLO}\n    targetPort: hello\n"
    )
}

/// A Service with `internalTrafficPolicy: Local` over a server on each node:
/// each client only ever reaches the server on its own node (istiod-rs sends
/// routing preference NODE, mode STRICT; ztunnel-rs keeps the endpoints on
/// the client's node).
fn internal_traffic_policy_local(
    cluster: &dyn Cluster,
    f: &L4Fixture,
) -> Result<String, ProbeError> {
    let yaml = local_service_yaml();
    cluster.apply_yaml(&yaml)?;
    let result = (|| {
        let uids: Vec<String> = f
            .servers
            .iter()
            .map(|s| {
                Ok(probe::known_workload(cluster, &s.node, s)?
                    .map(|w| w.uid)
                    .unwrap_or_default())
            })
            .collect::<Result<_, ProbeError>>()?;
        for n in cluster.nodes() {
            let what = format!("the ztunnel on {n} to have both servers behind {LOCAL_SERVICE}");
            eventually(&what, CHANGE_TIMEOUT, || {
                let eps = probe::service_endpoints(cluster, &n, AMBIENT_NS, LOCAL_SERVICE)?;
                Ok(if uids.iter().all(|u| eps.contains(u)) {
                    Ok(())
                } else {
                    Err(format!("endpoints: {eps:?}, want {uids:?}"))
                })
            })?;
        }
        let vip = eventually("the local service's cluster IP", CHANGE_TIMEOUT, || {
            Ok(service_vip(cluster, AMBIENT_NS, LOCAL_SERVICE)?.ok_or("no VIP yet".to_string()))
        })?;
        let mut seen = Vec::new();
        for (client, tries) in [(&f.clients[0], 50), (&f.clients[1], 20)] {
            let own = f
                .servers
                .iter()
                .find(|s| s.node == client.node)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let what = format!(
                "{} on {} -> {LOCAL_SERVICE} ({vip})",
                pod_name(client),
                client.node
            );
            // Stops early only if both servers answered, which is the failure.
            let answered = spread(cluster, client, &vip, &["server-0", "server-1"], tries)?;
            if answered != [(own.clone(), tries)] {
                return Err(failed(
                    &what,
                    format!(
                        "want all {tries} connections answered by {own} on the same node, got {answered:?}"
                    ),
                ));
            }
            seen.push(format!("{what}: {tries} of {tries} answered by {own}"));
        }
        Ok(seen.join("; "))
    })();
    let _ = cluster.delete_yaml(&yaml);
    result
}

/// The service `close` of [`prefer_close`] and its pods' label.
const CLOSE_SERVICE: &str = "close";
/// The region of every node and the zone of each, `zone-<n>`.
const REGION: &str = "region-1";

/// `Node` objects giving the cluster's nodes a region and a zone each
/// (`zone-0`, `zone-1`, ...), or, with `zoned` false, no such label (what
/// they had before: the scenario applies them back).
fn node_labels_yaml(nodes: &[String], zoned: bool) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let labels = if zoned {
                format!(
                    "\n  labels:\n    topology.kubernetes.io/region: {REGION}\n    topology.kubernetes.io/zone: zone-{i}"
                )
            } else {
                String::new()
            };
            format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {n}{labels}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The zone of a pod's workload as a node's ztunnel-rs has it.
fn workload_zone(cluster: &dyn Cluster, node: &str, pod: &PodInfo) -> Result<String, ProbeError> {
    let dump = cluster.config_dump(&ztunnel(node))?;
    Ok(dump
        .get("workloads")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .find(|w| w["namespace"] == pod.namespace.as_str() && w["name"] == pod.name.as_str())
        .and_then(|w| w["locality"]["zone"].as_str())
        .unwrap_or_default()
        .to_string())
}

/// A Service with `trafficDistribution: PreferClose` over a server in each
/// zone (the nodes labelled with a region and a zone each, which istiod-rs
/// reads into the workloads' locality): each client only reaches the server
/// in its own zone (routing preference network, region, zone, subzone in
/// FAILOVER mode); once that server is deleted, the client fails over to
/// the other zone's. The node labels, the pods and the Service are removed
/// again.
fn prefer_close(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let nodes = cluster.nodes();
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {CLOSE_SERVICE}\n  namespace: {AMBIENT_NS}\nspec:\n  \
         trafficDistribution: PreferClose\n  selector:\n    app: {CLOSE_SERVICE}\n  ports:\n  - name: hello\n    \
         port: {ECHO_HELLO}\n    targetPort: hello\n"
    );
    let names: Vec<String> = (0..2).map(|i| format!("{CLOSE_SERVICE}-{i}")).collect();
    let result = (|| {
        cluster.apply_yaml(&node_labels_yaml(&nodes, true))?;
        let _service = Applied::new(cluster, &service)?;
        let mut servers = Vec::new();
        for (name, node) in names.iter().zip(&nodes) {
            let pod = echo_server(AMBIENT_NS, name, node, "server").label("app", CLOSE_SERVICE);
            servers.push(cluster.create_pod(&pod)?);
        }
        let enrolled: Vec<(&PodInfo, &str)> = servers.iter().map(|s| (s, "server")).collect();
        probe::until_in_mesh(cluster, &f.trust_domain, &enrolled, CHANGE_TIMEOUT)?;
        // Every ztunnel has each client's and server's zone from its node.
        for n in &nodes {
            for (i, pod) in f.clients.iter().chain(&servers).enumerate() {
                let want = format!("zone-{}", i % 2);
                eventually(
                    &format!("the ztunnel on {n} to place {} in {want}", pod_name(pod)),
                    CHANGE_TIMEOUT,
                    || {
                        let zone = workload_zone(cluster, n, pod)?;
                        Ok(if zone == want {
                            Ok(())
                        } else {
                            Err(format!("zone {zone:?}"))
                        })
                    },
                )?;
            }
        }
        let vip = eventually("the close service's cluster IP", CHANGE_TIMEOUT, || {
            Ok(service_vip(cluster, AMBIENT_NS, CLOSE_SERVICE)?.ok_or("no VIP yet".to_string()))
        })?;
        let mut seen = Vec::new();
        for (client, own) in f.clients.iter().zip(&names) {
            let what = format!(
                "{} ({}) -> {CLOSE_SERVICE} ({vip})",
                pod_name(client),
                client.node
            );
            // Stops early only if both servers answered, which is the failure.
            let answered = spread(
                cluster,
                client,
                &vip,
                &[names[0].as_str(), names[1].as_str()],
                30,
            )?;
            if answered != [(own.clone(), 30)] {
                return Err(failed(
                    &what,
                    format!(
                        "want all 30 connections answered by {own} in the same zone, got {answered:?}"
                    ),
                ));
            }
            seen.push(format!("{what}: 30 of 30 answered by {own}"));
        }
        // Failover: the first zone's server goes; its client is served by
        // the other zone's.
        let client = &f.clients[0];
        let uid = probe::known_workload(cluster, &client.node, &servers[0])?
            .map(|w| w.uid)
            .unwrap_or_default();
        cluster.delete_pod(AMBIENT_NS, &names[0])?;
        eventually(
            &format!(
                "the ztunnel on {} to drop {} from {CLOSE_SERVICE}",
                client.node, names[0]
            ),
            CHANGE_TIMEOUT,
            || {
                let eps =
                    probe::service_endpoints(cluster, &client.node, AMBIENT_NS, CLOSE_SERVICE)?;
                Ok(if eps.contains(&uid) {
                    Err(format!("endpoints: {eps:?}"))
                } else {
                    Ok(())
                })
            },
        )?;
        let answered = spread(
            cluster,
            client,
            &vip,
            &[names[0].as_str(), names[1].as_str()],
            10,
        )?;
        if answered != [(names[1].clone(), 10)] {
            return Err(failed(
                &format!(
                    "{} -> {CLOSE_SERVICE} without {}",
                    pod_name(client),
                    names[0]
                ),
                format!(
                    "want all 10 connections answered by {} in the other zone, got {answered:?}",
                    names[1]
                ),
            ));
        }
        seen.push(format!(
            "{} deleted: {} fails over, 10 of 10 answered by {}",
            names[0],
            pod_name(client),
            names[1]
        ));
        Ok(seen.join("; "))
    })();
    for name in &names {
        if cluster.pod(AMBIENT_NS, name).is_some()
            && let Err(e) = cluster.delete_pod(AMBIENT_NS, name)
        {
            eprintln!("e2e: could not delete {AMBIENT_NS}/{name}: {e}");
        }
    }
    if let Err(e) = cluster.apply_yaml(&node_labels_yaml(&nodes, false)) {
        eprintln!("e2e: could not take the zone labels off the nodes: {e}");
    }
    result
}

/// `client load` over long-lived connections, in the background while
/// `during` runs; returns what `during` returned and the load's report.
pub(super) fn under_load<T>(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
    duration: Duration,
    during: impl FnOnce() -> Result<T, ProbeError>,
) -> Result<(T, LoadReport), ProbeError> {
    let args = crate::apps::steady_load(target, duration);
    std::thread::scope(|s| {
        let load = s.spawn(|| {
            probe::client::<LoadReport>(cluster, from, &args, duration + Duration::from_secs(60))
        });
        let result = during();
        let report = load
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((result?, report?))
    })
}

/// Waits until a node's ztunnel has counted `n` more mTLS connections from
/// `src` to `dst` than `before` (the load's connections are up).
pub(super) fn until_connections(
    cluster: &dyn Cluster,
    node: &str,
    filter: &[(&str, &str)],
    at_least: f64,
) -> Result<(), ProbeError> {
    eventually(
        &format!("the ztunnel on {node} to count {at_least} connection(s) {filter:?}"),
        CHANGE_TIMEOUT,
        || {
            let now = probe::connections_opened(cluster, &ztunnel(node), filter)?;
            Ok(if now >= at_least {
                Ok(())
            } else {
                Err(format!("{now} so far"))
            })
        },
    )
}

pub(super) fn load_flowed(what: &str, load: &LoadReport) -> Result<(), ProbeError> {
    match load.trouble() {
        Some(trouble) => Err(failed(what, trouble)),
        None => Ok(()),
    }
}

fn istiod_restart(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let server = &f.servers[1];
    let src = f.principal(AMBIENT_NS, "client");
    let dst = f.principal(AMBIENT_NS, "server");
    let filter = mtls_from_to(&src, &dst);
    let before = probe::connections_opened(cluster, &ztunnel(&server.node), &filter)?;
    let other = f.principal(AMBIENT_NS, "other");
    let policy = authorization(
        AMBIENT_NS,
        "deny-other-while-away",
        "server",
        "DENY",
        &from_principals(&[policy_principal(&other)]),
    );
    let target = L4Fixture::at(server, ECHO_HELLO);
    let (evidence, load) = under_load(
        cluster,
        &f.clients[0],
        &L4Fixture::at(server, ECHO_TCP),
        Duration::from_secs(10),
        || {
            until_connections(cluster, &server.node, &filter, before + 2.0)?;
            cluster.stop_component(&ProxyRef::Istiod)?;
            // Proxies work from what they hold: new connections, both ways.
            let cross = carried(cluster, &f.clients[1], &f.servers[0], ECHO_HELLO);
            let same = cross.and_then(|_| carried(cluster, &f.clients[0], server, ECHO_HELLO));
            // A change made while istiod is away reaches the proxies once it is back.
            let applied = Applied::new(cluster, &policy);
            let started = cluster.start_component(&ProxyRef::Istiod);
            same?;
            started?;
            let (applied, when) = match applied {
                Ok(applied) => (applied, "written while it was down".to_string()),
                // Kubernetes: istiod-rs's webhook fails closed, so the API
                // server admits no policy while istiod is away; the write
                // is made again once it is back.
                Err(ClusterError::ValidatorUnavailable { reason, .. }) => (
                    Applied::new(cluster, &policy)?,
                    format!(
                        "refused by the API server while it was down ({reason}), written again"
                    ),
                ),
                Err(e) => return Err(e.into()),
            };
            let refused = until_exchange(cluster, &f.other, &target, false, CHANGE_TIMEOUT)?;
            applied.remove()?;
            until_exchange(cluster, &f.other, &target, true, CHANGE_TIMEOUT)?;
            Ok((when, describe_exchange(&refused)))
        },
    )?;
    let (when, evidence) = evidence;
    load_flowed("the long-lived connections while istiod restarted", &load)?;
    Ok(format!(
        "{} requests over 2 long-lived connections, 0 errors, across the restart; new connections carried while istiod was down; \
         a policy {when} took effect after it came back ({evidence})",
        load.requests
    ))
}

/// Issue 9, item 1: a ztunnel that starts while istiod is down gets its
/// pods back from the node agent but carries nothing for them (no plaintext
/// on a partial view) until istiod returns; then it carries in mTLS.
fn ztunnel_without_istiod(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let (client, server) = (&f.clients[0], &f.servers[1]);
    let node = client.node.clone();
    let target = L4Fixture::at(server, ECHO_HELLO);
    // Plaintext from the client would reach the server's ztunnel on 15006.
    let plaintext = [
        ("reporter", "destination"),
        ("connection_security_policy", "unknown"),
        ("source_workload", client.name.as_str()),
    ];
    let plaintext_before = probe::connections_opened(cluster, &ztunnel(&server.node), &plaintext)?;
    cluster.stop_component(&ProxyRef::Istiod)?;
    let while_down = (|| {
        cluster.stop_component(&ztunnel(&node))?;
        cluster.launch_component(&ztunnel(&node))?;
        eventually(
            &format!(
                "the new ztunnel on {node} to get {} back from the node agent",
                pod_name(client)
            ),
            CHANGE_TIMEOUT,
            // Its admin endpoint comes up shortly after the process.
            || {
                Ok(match probe::proxies_pod(cluster, &node, client) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("not in its /config_dump pods yet".to_string()),
                    Err(e) => Err(e.to_string()),
                })
            },
        )?;
        let refused = tcp_hello(cluster, client, &target)?;
        if refused.ok {
            return Err(failed(
                &format!("{} -> {target} with istiod down", pod_name(client)),
                format!(
                    "carried before the ztunnel had any xDS state: {}",
                    describe_exchange(&refused)
                ),
            ));
        }
        Ok(refused)
    })();
    let started = cluster.start_component(&ProxyRef::Istiod);
    let refused = while_down?;
    started?;
    let plaintext_after = probe::connections_opened(cluster, &ztunnel(&server.node), &plaintext)?;
    if plaintext_after > plaintext_before {
        return Err(failed(
            &format!("the ztunnel on {}", server.node),
            format!(
                "counted {} plaintext connection(s) from {} while its ztunnel had no xDS state",
                plaintext_after - plaintext_before,
                pod_name(client)
            ),
        ));
    }
    cluster.start_component(&ztunnel(&node))?;
    let after = in_mtls(cluster, f, (client, "client"), (server, "server"))?;
    // Leave the node as it was: every identity it serves has its
    // certificate again (the next scenarios stop istiod once more).
    eventually(
        &format!("every certificate on {node} to be available again"),
        CHANGE_TIMEOUT,
        || {
            let certs = probe::certificates(cluster, &node)?;
            let missing: Vec<String> = certs
                .iter()
                .filter(|c| c.state != "Available")
                .map(|c| format!("{}: {}", c.identity, c.state))
                .collect();
            Ok(if missing.is_empty() && !certs.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet: {missing:?}"))
            })
        },
    )?;
    Ok(format!(
        "ztunnel on {node} started with istiod down and took its pods from the node agent; {} -> {target}: {} and no plaintext reached {}; once istiod was back: {after}",
        pod_name(client),
        describe_exchange(&refused),
        server.node
    ))
}

fn ztunnel_restart(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let node = f.servers[1].node.clone();
    cluster.restart_component(&ztunnel(&node))?;
    let inbound = in_mtls(
        cluster,
        f,
        (&f.clients[0], "client"),
        (&f.servers[1], "server"),
    )?;
    let outbound = in_mtls(
        cluster,
        f,
        (&f.clients[1], "client"),
        (&f.servers[0], "server"),
    )?;
    Ok(format!(
        "ztunnel on {node} restarted and ready; first new connections: {inbound}; {outbound}"
    ))
}

/// A certificate's lifetime from its RFC 3339 validity.
fn lifetime(cert: &probe::CertificateSummary) -> Option<Duration> {
    let from: Timestamp = cert.valid_from.parse().ok()?;
    let to: Timestamp = cert.expires.parse().ok()?;
    let secs = to.as_second() - from.as_second();
    u64::try_from(secs).ok().map(Duration::from_secs)
}

fn certificate(
    cluster: &dyn Cluster,
    node: &str,
    identity: &str,
) -> Result<probe::CertificateSummary, ProbeError> {
    probe::until_certificate(cluster, node, identity, CHANGE_TIMEOUT)
}

fn certificate_rotation(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let (client, server) = (&f.clients[0], &f.servers[1]);
    let src = f.principal(AMBIENT_NS, "client");
    let dst = f.principal(AMBIENT_NS, "server");
    let client_cert = certificate(cluster, &client.node, &src)?;
    let server_cert = certificate(cluster, &server.node, &dst)?;
    let life = lifetime(&client_cert).ok_or_else(|| {
        failed(
            "the client's certificate",
            format!("no validity: {client_cert:?}"),
        )
    })?;
    if life > Duration::from_secs(120) {
        return Err(failed(
            "certificate rotation",
            format!(
                "certificates live {life:?}; run this scenario on a cluster with a short certificate TTL"
            ),
        ));
    }
    let filter = mtls_from_to(&src, &dst);
    let before = probe::connections_opened(cluster, &ztunnel(&server.node), &filter)?;
    // Long enough to span a renewal (at half the lifetime) on both sides.
    let duration = life + Duration::from_secs(2);
    let rotated = |node: &str, identity: &str, old: &str| {
        eventually(
            &format!("the certificate for {identity} on {node} to be renewed"),
            life * 2,
            || {
                let now = certificate(cluster, node, identity)?;
                Ok(if now.serial != old {
                    Ok(now)
                } else {
                    Err(format!("serial still {old}"))
                })
            },
        )
    };
    let ((new_client, new_server, fresh), load) = under_load(
        cluster,
        client,
        &L4Fixture::at(server, ECHO_TCP),
        duration,
        || {
            until_connections(cluster, &server.node, &filter, before + 2.0)?;
            let new_client = rotated(&client.node, &src, &client_cert.serial)?;
            let new_server = rotated(&server.node, &dst, &server_cert.serial)?;
            let fresh = in_mtls(cluster, f, (client, "client"), (server, "server"))?;
            Ok((new_client, new_server, fresh))
        },
    )?;
    load_flowed(
        "the long-lived connections across certificate renewals",
        &load,
    )?;
    Ok(format!(
        "certificates live {life:?}; {src} renewed (serial {} -> {}), {dst} renewed (serial {} -> {}); \
         {} requests over 2 long-lived connections with 0 errors; new connection after renewal: {fresh}",
        client_cert.serial, new_client.serial, server_cert.serial, new_server.serial, load.requests
    ))
}
