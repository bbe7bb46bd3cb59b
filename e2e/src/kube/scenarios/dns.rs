//! ztunnel-rs's DNS proxy on Kubernetes: a pod of the enrolled namespace
//! resolves the echo Service as an application does, through the
//! resolv.conf the node runtime wrote for it as the kubelet would
//! (`nameserver` the cluster DNS ClusterIP, `search demo.svc.cluster.local
//! svc.cluster.local cluster.local`, `ndots:5`; `kube::node::dns`), by its
//! short name, `echo.demo` and its FQDN: each is answered with the
//! Service's ClusterIP by the pod's ztunnel-rs (authoritative, on the first
//! name of the search list), and the connection to it goes through the mesh.
//!
//! The cluster DNS is a stand-in the scenario starts: the client image's
//! `dns-server` in a pod of `kube-system` (not enrolled) behind a Service
//! with the cluster DNS ClusterIP, knowing only [`OUTSIDE_NAME`]. So a
//! Service name answered proves the proxy answered it (the stand-in would
//! say NXDOMAIN, and the proxy never does); [`OUTSIDE_NAME`] is forwarded
//! by ztunnel-rs to the nameserver of its own resolv.conf (the same
//! ClusterIP; ztunnel-rs's pod is `ClusterFirst` too, as upstream's) from
//! the client pod's netns, each of the search list's names NXDOMAIN until
//! the name as written answers. ztunnel-rs's `istio_dns_requests_total` and
//! `istio_dns_upstream_requests_total` on the client's node are read
//! before and after.

use std::time::Instant;

use serde_json::json;

use super::enrolment::{poll, unexpected};
use super::{EXEC_TIMEOUT, FixturePod, KubeFixture, KubeScenario, NAMESPACE, PATIENCE};
use crate::apps::DnsReport;
use crate::kube::mesh::{KubeMesh, KubeMeshError, SYSTEM_NAMESPACE, ZTUNNEL};
use crate::kube::node::cluster_dns_ip;

/// The only name the stand-in cluster DNS knows, and its address.
pub const OUTSIDE_NAME: &str = "outside.example";
const OUTSIDE_ADDRESS: &str = "192.0.2.10";
const STAND_IN: &str = "dns-stand-in";
const STAND_IN_NAMESPACE: &str = "kube-system";
/// The echo Service's hello port (`echo --tcp-hello`).
const HELLO_PORT: &str = "9001";

pub fn scenarios() -> Vec<KubeScenario> {
    vec![KubeScenario {
        name: "dns_proxy_answers_service_names_through_the_search_list",
        run: answers_service_names,
    }]
}

fn stand_in(cluster_ip: &str) -> String {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": STAND_IN, "namespace": STAND_IN_NAMESPACE, "labels": {"app": STAND_IN}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "dns", "image": "istio-rs/client:dev",
                "command": ["client", "dns-server", "--listen", "0.0.0.0:53",
                            "--record", format!("{OUTSIDE_NAME}={OUTSIDE_ADDRESS}")]}],
        },
    });
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": STAND_IN, "namespace": STAND_IN_NAMESPACE},
        "spec": {
            "clusterIP": cluster_ip,
            "selector": {"app": STAND_IN},
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}],
        },
    });
    format!("{pod}\n---\n{service}\n")
}

/// `client dns NAME` in `pod` (no `--server`: through its resolv.conf).
fn resolve(
    mesh: &KubeMesh,
    pod: &FixturePod,
    name: &str,
    connect: bool,
) -> Result<DnsReport, KubeMeshError> {
    let mut argv = vec!["client", "dns", name, "--timeout", "5s"];
    if connect {
        argv.extend(["--connect-port", HELLO_PORT]);
    }
    let out = mesh
        .node(&pod.node)?
        .exec(NAMESPACE, &pod.name, "client", &argv, EXEC_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        unexpected(
            format!("`client dns {name}` in {}", pod.name),
            format!(
                "{e}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )
    })
}

/// `cat /etc/resolv.conf` in a container.
fn resolv_conf(
    mesh: &KubeMesh,
    node: &str,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<String, KubeMeshError> {
    let out = mesh.node(node)?.exec(
        namespace,
        pod,
        container,
        &["cat", "/etc/resolv.conf"],
        EXEC_TIMEOUT,
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// ztunnel-rs's DNS counters on `node` (UDP, type A): requests, forwarded.
fn dns_counters(mesh: &KubeMesh, node: &str) -> Result<(f64, f64), KubeMeshError> {
    let text = mesh.ztunnel_metrics(node)?;
    let samples = crate::prometheus::parse(&text).map_err(|e| {
        unexpected(
            format!("the metrics of the ztunnel on {node}"),
            e.to_string(),
        )
    })?;
    let filter = [("request_protocol", "udp"), ("request_query_type", "a")];
    Ok((
        crate::prometheus::sum(&samples, "istio_dns_requests_total", &filter),
        crate::prometheus::sum(&samples, "istio_dns_upstream_requests_total", &filter),
    ))
}

fn answers_service_names(mesh: &KubeMesh, f: &KubeFixture) -> Result<String, KubeMeshError> {
    let client = f
        .clients
        .first()
        .ok_or_else(|| unexpected("the fixture", "no client pod"))?;
    let dns_ip = cluster_dns_ip(mesh.kube.control_plane.config.service_cidr).to_string();
    let domain = "cluster.local";
    let mut evidence = Vec::new();

    // The files the kubelet stand-in wrote: the client's and ztunnel-rs's.
    let conf = resolv_conf(mesh, &client.node, NAMESPACE, &client.name, "client")?;
    let search = format!("search {NAMESPACE}.svc.{domain} svc.{domain} {domain}");
    if !conf.lines().any(|l| l.starts_with(&search))
        || !conf.contains(&format!("nameserver {dns_ip}\n"))
        || !conf.contains("ndots:5")
    {
        return Err(unexpected(
            format!("{}'s /etc/resolv.conf", client.name),
            format!("expected {search:?}, nameserver {dns_ip}, ndots:5; got {conf:?}"),
        ));
    }
    let ztunnel = mesh.required_component(ZTUNNEL, &client.node)?;
    let ztunnel_name = ztunnel["metadata"]["name"].as_str().unwrap_or_default();
    let ztunnel_conf = resolv_conf(
        mesh,
        &client.node,
        SYSTEM_NAMESPACE,
        ztunnel_name,
        "istio-proxy",
    )?;
    if !ztunnel_conf.contains(&format!("nameserver {dns_ip}\n")) {
        return Err(unexpected(
            format!("{ztunnel_name}'s /etc/resolv.conf"),
            format!("expected nameserver {dns_ip}; got {ztunnel_conf:?}"),
        ));
    }
    evidence.push(format!(
        "{}: {:?}; {ztunnel_name}: {:?}",
        client.name,
        conf.trim(),
        ztunnel_conf.trim()
    ));

    mesh.kubectl.apply(&stand_in(&dns_ip))?;
    let result = (|| {
        // Forwarded: each search name NXDOMAIN from the stand-in, then the
        // name as written. Polled: the stand-in and its Service's rules
        // come up meanwhile.
        let started = Instant::now();
        let (outside, _) = poll(
            &format!("{OUTSIDE_NAME} answered by the stand-in cluster DNS"),
            PATIENCE,
            |seen| {
                let r = resolve(mesh, client, OUTSIDE_NAME, false)?;
                *seen = format!("{r:?}");
                Ok(r.ok.then_some(r))
            },
        )?;
        let forwarded_after = started.elapsed();
        let expected_tried: Vec<(String, String)> = [
            format!("{OUTSIDE_NAME}.{NAMESPACE}.svc.{domain}."),
            format!("{OUTSIDE_NAME}.svc.{domain}."),
            format!("{OUTSIDE_NAME}.{domain}."),
        ]
        .into_iter()
        .map(|n| (n, "NXDomain".to_string()))
        .chain([(format!("{OUTSIDE_NAME}."), "NoError".to_string())])
        .collect();
        if outside.addresses != [OUTSIDE_ADDRESS]
            || outside.authoritative
            || outside.tried != expected_tried
        {
            return Err(unexpected(
                format!("{} resolving {OUTSIDE_NAME}", client.name),
                format!("expected {OUTSIDE_ADDRESS} after {expected_tried:?}; got {outside:?}"),
            ));
        }

        let (requests_before, forwarded_before) = dns_counters(mesh, &client.node)?;
        let mut answered = Vec::new();
        let fqdn = format!("echo.{NAMESPACE}.svc.{domain}");
        for name in ["echo", &format!("echo.{NAMESPACE}"), &fqdn] {
            let r = resolve(mesh, client, name, true)?;
            let hello = r
                .connection
                .as_ref()
                .filter(|c| c.ok)
                .and_then(|c| c.hello.as_ref());
            let first_tried = r.tried.first().map(|(n, _)| n.as_str());
            let expected_first = format!("{name}.{NAMESPACE}.svc.{domain}.");
            match hello {
                Some(hello)
                    if r.addresses == [f.echo_vip.clone()]
                        && r.authoritative
                        && r.tried.len() == 1
                        && first_tried == Some(expected_first.as_str()) =>
                {
                    answered.push(format!(
                        "{name:?} -> {} (as {expected_first}) -> {}",
                        f.echo_vip, hello.pod
                    ));
                }
                _ => {
                    return Err(unexpected(
                        format!("{} resolving {name:?} and connecting", client.name),
                        format!(
                            "expected the ClusterIP {} from ztunnel-rs on the first search name {expected_first:?} and a hello; got {r:?}",
                            f.echo_vip
                        ),
                    ));
                }
            }
        }
        let again = resolve(mesh, client, OUTSIDE_NAME, false)?;
        if !again.ok {
            return Err(unexpected(
                format!("{} resolving {OUTSIDE_NAME} again", client.name),
                format!("{again:?}"),
            ));
        }
        let (requests_after, forwarded_after_count) = dns_counters(mesh, &client.node)?;
        let requests = requests_after - requests_before;
        let forwarded = forwarded_after_count - forwarded_before;
        // 3 Service names on their first try, 4 names for the outside one,
        // of which all 4 forwarded and none of the Service names.
        if requests < 7.0 || forwarded < 4.0 {
            return Err(unexpected(
                format!("the ztunnel on {}", client.node),
                format!(
                    "counted {requests} DNS requests and {forwarded} forwarded; expected at least 7 and 4"
                ),
            ));
        }
        Ok(format!(
            "{}; {OUTSIDE_NAME} forwarded to the stand-in cluster DNS {dns_ip} after 3 NXDOMAIN search names -> {OUTSIDE_ADDRESS} ({} ms from the stand-in's creation); ztunnel counted +{requests} requests, +{forwarded} forwarded",
            answered.join("; "),
            forwarded_after.as_millis()
        ))
    })();
    let cleanup = mesh.kubectl.run(&[
        "delete",
        "pod,service",
        "-n",
        STAND_IN_NAMESPACE,
        STAND_IN,
        "--ignore-not-found",
        "--wait=false",
    ]);
    let line = result?;
    cleanup?;
    evidence.push(line);
    Ok(evidence.join("; "))
}
