//! Enrolment as users do it, seen from every side: the label on the
//! namespace (the node agents' annotation, the in-pod rules, what the
//! node's ztunnel-rs proxies, how a request is carried), a pod's deletion
//! (ztunnel-rs, its certificate, the node's probe set, the pod's netns and
//! address) and `istioctl-rs uninstall` (nothing of the mesh left on the
//! nodes or in the API, the apps still running).
//!
//! Each check is made first where it must hold the other way (the fixture
//! enrolled, the pod running, the mesh installed), so a check that could
//! not see what it looks for fails there rather than passing after.
//!
//! The in-pod rules are what the node agent writes
//! (`ztunnel-rs/src/node_agent/iptables.rs`): chains `ISTIO_PRERT` /
//! `ISTIO_OUTPUT` (iptables and ip6tables) and the policy routing rule to
//! table [`api::ports::PROXY_ROUTE_TABLE`]. The node's are
//! `host_probe.rs`'s: chain `ISTIO_POSTRT` and the ipsets
//! `istio-inpod-probes-v4` / `-v6`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    EXEC_TIMEOUT, FixturePod, KubeFixture, KubeScenario, NAMESPACE, PATIENCE, REDIRECTION, items,
    redirected,
};
use crate::kube::mesh::{KubeMesh, KubeMeshError, SYSTEM_NAMESPACE};
use crate::kube::node::{NETWORK_NAME, PRIMARY_CONFLIST, primary_conflist};
use crate::kube::samples::{client_pod, condition};

/// This module's scenarios, in the order they run (uninstall last: it
/// removes the mesh).
pub fn scenarios() -> Vec<KubeScenario> {
    vec![
        KubeScenario {
            name: "release_by_removing_the_label",
            run: release_by_removing_the_label,
        },
        KubeScenario {
            name: "pod_deletion_cleans_rules_and_certificates",
            run: pod_deletion_cleans_rules_and_certificates,
        },
        KubeScenario {
            name: "uninstall_leaves_nothing",
            run: uninstall_leaves_nothing,
        },
    ]
}

/// The in-pod chains' prefix and the node's.
const IN_POD_CHAINS: [&str; 2] = ["ISTIO_PRERT", "ISTIO_OUTPUT"];
const HOST_CHAIN: &str = "ISTIO_POSTRT";
const PROBE_SET: &str = "istio-inpod-probes";
/// The CNI plugin's name (its netconf `type` and its binary).
const PLUGIN: &str = "istio-cni-rs";
/// How long the checks of a released or deleted pod wait.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(60);

pub(super) fn unexpected(what: impl Into<String>, detail: impl Into<String>) -> KubeMeshError {
    KubeMeshError::Unexpected {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Polls `check` until it returns `Some`, for at most `timeout`; returns
/// the value and how long it took. On timeout the error names `what` and
/// the last answer (`Ok(None)` answers say "not yet", with `last` telling
/// what was seen).
pub(super) fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&mut String) -> Result<Option<T>, KubeMeshError>,
) -> Result<(T, Duration), KubeMeshError> {
    let start = Instant::now();
    let mut seen = String::new();
    let mut pause = Duration::from_millis(50);
    loop {
        match check(&mut seen) {
            Ok(Some(v)) => return Ok((v, start.elapsed())),
            Ok(None) => {}
            Err(e) => seen = e.to_string(),
        }
        if start.elapsed() >= timeout {
            return Err(unexpected(
                what,
                format!("not so after {:?}; last seen: {seen}", start.elapsed()),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Runs `program args` in the network namespace of the pod (or node) and
/// returns its stdout; a failure names `what`.
fn run_in(
    netns: &crate::netns::NetNs,
    what: &str,
    program: &str,
    args: &[&str],
) -> Result<String, KubeMeshError> {
    let mut cmd = netns.command(program);
    cmd.args(args);
    let out = netns.exec(cmd, EXEC_TIMEOUT)?;
    if !out.status.success() {
        return Err(unexpected(
            format!("{what}: `{program} {}`", args.join(" ")),
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The redirection rules in a pod's netns: every iptables / ip6tables line
/// naming an in-pod chain, and the policy routing rules to the proxy's
/// table.
fn in_pod_rules(mesh: &KubeMesh, pod: &FixturePod) -> Result<Vec<String>, KubeMeshError> {
    let what = format!("pod {NAMESPACE}/{} on {}", pod.name, pod.node);
    let view = mesh
        .node(&pod.node)?
        .pod(NAMESPACE, &pod.name)
        .ok_or_else(|| unexpected(&what, "its node runs no such pod"))?;
    let netns = view
        .netns
        .ok_or_else(|| unexpected(&what, "has no network namespace of its own"))?;
    let mut found = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let text = run_in(&netns, &what, save, &[])?;
        found.extend(
            text.lines()
                .filter(|l| IN_POD_CHAINS.iter().any(|c| l.contains(c)))
                .map(|l| format!("{save}: {l}")),
        );
    }
    let table = format!("lookup {}", api::ports::PROXY_ROUTE_TABLE);
    for family in ["-4", "-6"] {
        let text = run_in(&netns, &what, "ip", &[family, "rule", "show"])?;
        found.extend(
            text.lines()
                .filter(|l| l.contains(&table))
                .map(|l| format!("ip {family} rule: {}", l.trim())),
        );
    }
    Ok(found)
}

/// The redirection rules left in any of `pods`, each line named by its pod.
fn rules_left(mesh: &KubeMesh, pods: &[&FixturePod]) -> Result<Vec<String>, KubeMeshError> {
    let mut left = Vec::new();
    for p in pods {
        left.extend(
            in_pod_rules(mesh, p)?
                .into_iter()
                .map(|r| format!("pod {}: {r}", p.name)),
        );
    }
    Ok(left)
}

/// The pods of namespace `demo` still carrying the redirection annotation.
fn annotated_pods(mesh: &KubeMesh) -> Result<Vec<String>, KubeMeshError> {
    Ok(
        items(&mesh.kubectl.json(&["get", "pods", "-n", NAMESPACE])?)
            .iter()
            .filter(|p| !p["metadata"]["annotations"][REDIRECTION].is_null())
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect(),
    )
}

/// The node agent's node-level state on `node`: its chain in the nat
/// tables and its ipsets (with their entries).
fn host_state(mesh: &KubeMesh, node: &str) -> Result<Vec<String>, KubeMeshError> {
    let what = format!("node {node}");
    let netns = mesh.node_netns(node)?;
    let mut found = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let text = run_in(netns, &what, save, &["-t", "nat"])?;
        found.extend(
            text.lines()
                .filter(|l| l.contains(HOST_CHAIN))
                .map(|l| format!("{save}: {l}")),
        );
    }
    let text = run_in(netns, &what, "ipset", &["save"])?;
    found.extend(
        text.lines()
            .filter(|l| l.contains(PROBE_SET))
            .map(|l| format!("ipset: {l}")),
    );
    Ok(found)
}

/// The pod uids the ztunnel-rs on `node` proxies (`/config_dump` `pods`).
fn proxied_uids(mesh: &KubeMesh, node: &str) -> Result<Vec<String>, KubeMeshError> {
    let dump = mesh.ztunnel_admin(node, "/config_dump")?;
    Ok(dump["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .filter_map(|p| p["info"]["uid"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The identities the ztunnel-rs on `node` holds a certificate for, with
/// their state (`/certs`).
fn certificates(mesh: &KubeMesh, node: &str) -> Result<Vec<(String, String)>, KubeMeshError> {
    let certs = mesh.ztunnel_admin(node, "/certs")?;
    Ok(certs["certificates"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|c| {
                    (
                        c["identity"].as_str().unwrap_or_default().to_string(),
                        c["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Connections from namespace `demo` the ztunnel-rs of every node counted
/// as opened in mutual TLS (`istio_tcp_connections_opened_total`).
fn mtls_opened(mesh: &KubeMesh) -> Result<f64, KubeMeshError> {
    let mut total = 0.0;
    for node in mesh.node_names() {
        let metrics = mesh.ztunnel_metrics(&node)?;
        total += metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
                    && l.contains(&format!("source_workload_namespace=\"{NAMESPACE}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

/// A client's request to the echo Service's ClusterIP (port 80), retried
/// until it goes through; how long that took.
fn request_goes_through(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
    client: &FixturePod,
) -> Result<Duration, KubeMeshError> {
    let url = format!("http://{}:80/", fixture.echo_vip);
    let node = mesh.node(&client.node)?;
    let what = format!(
        "{NAMESPACE}/{}'s request to the echo Service ({url})",
        client.name
    );
    poll(&what, PATIENCE, |seen| {
        let report = node.client_http(NAMESPACE, &client.name, &url, EXEC_TIMEOUT)?;
        if report.ok {
            return Ok(Some(()));
        }
        *seen = format!("{:?} {:?}", report.status, report.error);
        Ok(None)
    })
    .map(|((), took)| took)
}

/// Each pod of namespace `demo` by name: (uid, restarts of its containers).
fn pod_lives(mesh: &KubeMesh) -> Result<BTreeMap<String, (String, i64)>, KubeMeshError> {
    let pods = items(&mesh.kubectl.json(&["get", "pods", "-n", NAMESPACE])?);
    Ok(pods
        .iter()
        .map(|p| {
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["restartCount"].as_i64()).sum())
                .unwrap_or(0);
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                (
                    p["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    restarts,
                ),
            )
        })
        .collect())
}

/// Err naming every pod whose uid or restart count differs from `before`.
fn same_lives(
    before: &BTreeMap<String, (String, i64)>,
    after: &BTreeMap<String, (String, i64)>,
    during: &str,
) -> Result<(), KubeMeshError> {
    let changed: Vec<String> = before
        .iter()
        .filter(|(name, life)| after.get(*name) != Some(life))
        .map(|(name, life)| format!("{name}: {life:?} -> {:?}", after.get(name)))
        .collect();
    if changed.is_empty() {
        Ok(())
    } else {
        Err(unexpected(
            format!("pods of {NAMESPACE} {during}"),
            format!(
                "restarted or replaced (uid, restarts): {}",
                changed.join("; ")
            ),
        ))
    }
}

/// The fixture's pods: the echo replicas, then the clients.
fn fixture_pods(fixture: &KubeFixture) -> Vec<&FixturePod> {
    fixture.echo.iter().chain(&fixture.clients).collect()
}

/// Err unless every fixture pod is marked redirected, has its rules, and
/// is proxied by its node's ztunnel-rs (the fixture as it was).
fn fixture_enrolled(mesh: &KubeMesh, fixture: &KubeFixture) -> Result<(), KubeMeshError> {
    let pods = items(&mesh.kubectl.json(&["get", "pods", "-n", NAMESPACE])?);
    for p in fixture_pods(fixture) {
        let json = pods
            .iter()
            .find(|j| j["metadata"]["name"] == p.name.as_str());
        if !json.is_some_and(redirected) {
            return Err(unexpected(
                format!("pod {NAMESPACE}/{}", p.name),
                format!(
                    "not marked {REDIRECTION}=enabled: {:?}",
                    json.map(|j| &j["metadata"]["annotations"])
                ),
            ));
        }
        if in_pod_rules(mesh, p)?.is_empty() {
            return Err(unexpected(
                format!("pod {NAMESPACE}/{} on {}", p.name, p.node),
                "no redirection rule in its network namespace",
            ));
        }
        if !proxied_uids(mesh, &p.node)?.contains(&p.uid) {
            return Err(unexpected(
                format!("pod {NAMESPACE}/{} (uid {})", p.name, p.uid),
                format!("the ztunnel-rs of {} does not proxy it", p.node),
            ));
        }
    }
    Ok(())
}

/// One request, and whether the ztunnel-rs counted it in mutual TLS: the
/// count before and after (polled a while for an increase when `expect_mtls`).
fn request_and_mtls(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
    client: &FixturePod,
    expect_mtls: bool,
) -> Result<(f64, f64), KubeMeshError> {
    let before = mtls_opened(mesh)?;
    request_goes_through(mesh, fixture, client)?;
    let after = if expect_mtls {
        poll(
            "the ztunnel-rs count of mutual_tls connections from demo to grow",
            Duration::from_secs(10),
            |seen| {
                let now = mtls_opened(mesh)?;
                *seen = format!("{before} before, {now} now");
                Ok((now > before).then_some(now))
            },
        )?
        .0
    } else {
        mtls_opened(mesh)?
    };
    Ok((before, after))
}

fn label_namespace(mesh: &KubeMesh, enrol: bool) -> Result<(), KubeMeshError> {
    let label = if enrol {
        format!(
            "{}={}",
            api::labels::DATAPLANE_MODE,
            api::labels::DATAPLANE_MODE_AMBIENT
        )
    } else {
        format!("{}-", api::labels::DATAPLANE_MODE)
    };
    mesh.kubectl
        .run(&["label", "namespace", NAMESPACE, &label])?;
    Ok(())
}

/// 1. `kubectl label namespace demo istio.io/dataplane-mode-` releases the
///    running pods without restarting them: the annotation goes, the in-pod
///    rules go, the node's ztunnel-rs stops proxying them, and a client's
///    request to the echo Service still goes through, no longer in mutual
///    TLS. Then the label comes back and the fixture is enrolled again.
fn release_by_removing_the_label(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
) -> Result<String, KubeMeshError> {
    let client = fixture
        .clients
        .first()
        .ok_or_else(|| unexpected("the fixture", "no client pod"))?;
    let pods = fixture_pods(fixture);
    let lives = pod_lives(mesh)?;
    // Every check below, first where it must see the pods enrolled.
    fixture_enrolled(mesh, fixture)?;
    let (mtls_before, mtls_enrolled) = request_and_mtls(mesh, fixture, client, true)?;

    let started = Instant::now();
    label_namespace(mesh, false)?;
    let (_, unannotated) = poll(
        "every pod of demo without the redirection annotation",
        CLEANUP_PATIENCE,
        |seen| {
            let still = annotated_pods(mesh)?;
            *seen = format!("still annotated: {still:?}");
            Ok(still.is_empty().then_some(()))
        },
    )?;
    let (_, unruled) = poll(
        "no redirection rule in any demo pod's netns",
        CLEANUP_PATIENCE,
        |seen| {
            let left = rules_left(mesh, &pods)?;
            *seen = left.join("; ");
            Ok(left.is_empty().then_some(()))
        },
    )?;
    let (_, unproxied) = poll(
        "no ztunnel-rs proxying a demo pod",
        CLEANUP_PATIENCE,
        |seen| {
            let mut still = Vec::new();
            for p in &pods {
                if proxied_uids(mesh, &p.node)?.contains(&p.uid) {
                    still.push(format!("{} (ztunnel-rs of {})", p.name, p.node));
                }
            }
            *seen = format!("still proxied: {}", still.join(", "));
            Ok(still.is_empty().then_some(()))
        },
    )?;
    let released = started.elapsed();
    let (mtls_released_before, mtls_released_after) =
        request_and_mtls(mesh, fixture, client, false)?;
    if mtls_released_after != mtls_released_before {
        return Err(unexpected(
            format!("{NAMESPACE}/{}'s request after release", client.name),
            format!(
                "counted as mutual_tls by a ztunnel-rs ({mtls_released_before} -> {mtls_released_after})"
            ),
        ));
    }
    same_lives(&lives, &pod_lives(mesh)?, "released by label")?;

    // Back as it was, for the scenarios that follow.
    let again = Instant::now();
    label_namespace(mesh, true)?;
    poll(
        "the fixture enrolled again",
        PATIENCE,
        |seen| match fixture_enrolled(mesh, fixture) {
            Ok(()) => Ok(Some(())),
            Err(e) => {
                *seen = e.to_string();
                Ok(None)
            }
        },
    )?;
    let reenrolled = again.elapsed();
    let (mtls_again_before, mtls_again) = request_and_mtls(mesh, fixture, client, true)?;
    same_lives(&lives, &pod_lives(mesh)?, "released and enrolled again")?;
    Ok(format!(
        "{} pods released by label removal in {released:.1?} (annotation gone {unannotated:.1?}, \
         in-pod rules gone {:.1?} later, ztunnel-rs dropped them {:.1?} later); \
         request after release plaintext (mutual_tls opened {mtls_released_before} -> {mtls_released_after}, \
         enrolled: {mtls_before} -> {mtls_enrolled}); no restart; enrolled again in {reenrolled:.1?} \
         (mutual_tls {mtls_again_before} -> {mtls_again})",
        pods.len(),
        unruled,
        unproxied,
    ))
}

/// 2. A pod with its own ServiceAccount on one node: while it runs, its
///    node's ztunnel-rs proxies it and holds its identity's certificate,
///    and the node's probe set has its address; `kubectl delete pod`
///    takes all of that away, with its netns and its address.
fn pod_deletion_cleans_rules_and_certificates(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
) -> Result<String, KubeMeshError> {
    const NAME: &str = "lonely";
    let node_name = mesh
        .node_names()
        .into_iter()
        .next()
        .ok_or_else(|| unexpected("the cluster", "no node"))?;
    let what = format!("pod {NAMESPACE}/{NAME} on {node_name}");
    let kubectl = &mesh.kubectl;
    kubectl.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {NAME}, namespace: {NAMESPACE}}}\n"
    ))?;
    let mut pod: Value = serde_json::from_str(&client_pod(NAME, &node_name))
        .map_err(|e| unexpected(&what, format!("manifest: {e}")))?;
    pod["spec"]["serviceAccountName"] = NAME.into();
    kubectl.create(&pod.to_string())?;
    let (json, _) = poll(&format!("{what} Ready and redirected"), PATIENCE, |seen| {
        let Some(p) = kubectl.get("pod", Some(NAMESPACE), NAME)? else {
            return Ok(None);
        };
        *seen = format!(
            "Ready {:?}, annotations {}",
            condition(&p, "Ready"),
            p["metadata"]["annotations"]
        );
        Ok((condition(&p, "Ready").as_deref() == Some("True") && redirected(&p)).then_some(p))
    })?;
    let lonely = FixturePod {
        name: NAME.into(),
        node: node_name.clone(),
        ip: json["status"]["podIP"].as_str().unwrap_or_default().into(),
        uid: json["metadata"]["uid"].as_str().unwrap_or_default().into(),
    };
    let identity_suffix = format!("/ns/{NAMESPACE}/sa/{NAME}");
    let holds_certificate =
        |certs: &[(String, String)]| certs.iter().any(|(id, _)| id.ends_with(&identity_suffix));

    // While it runs: its traffic needs the certificate (one request makes
    // sure it was fetched), ztunnel-rs proxies it, the node's probe set
    // has its address, its netns and its IPAM reservation exist.
    let netns = mesh
        .node(&node_name)?
        .pod(NAMESPACE, NAME)
        .and_then(|v| v.netns)
        .ok_or_else(|| unexpected(&what, "its node shows no network namespace for it"))?;
    let ipam = mesh
        .node(&node_name)?
        .fs_root()
        .join("var/lib/cni/networks")
        .join(NETWORK_NAME)
        .join(&lonely.ip);
    let url = format!("http://{}:80/", fixture.echo_vip);
    let report = mesh
        .node(&node_name)?
        .client_http(NAMESPACE, NAME, &url, EXEC_TIMEOUT)?;
    if !report.ok {
        return Err(unexpected(
            format!("{what}: its request to {url}"),
            format!("{:?} {:?}", report.status, report.error),
        ));
    }
    poll(
        &format!("the ztunnel-rs of {node_name} holding a certificate for ...{identity_suffix}"),
        PATIENCE,
        |seen| {
            let certs = certificates(mesh, &node_name)?;
            *seen = format!("{certs:?}");
            Ok(certs
                .iter()
                .any(|(id, state)| id.ends_with(&identity_suffix) && state == "Available")
                .then_some(()))
        },
    )?;
    if !proxied_uids(mesh, &node_name)?.contains(&lonely.uid) {
        return Err(unexpected(
            &what,
            format!(
                "the ztunnel-rs of {node_name} does not proxy uid {}",
                lonely.uid
            ),
        ));
    }
    let probe_entry = |state: &[String]| {
        state
            .iter()
            .any(|l| l.contains(&format!(" {} ", lonely.ip)) && l.contains(&lonely.uid))
    };
    let host = host_state(mesh, &node_name)?;
    if !probe_entry(&host) {
        return Err(unexpected(
            &what,
            format!(
                "no entry {} (comment {}) in the node's probe set: {host:?}",
                lonely.ip, lonely.uid
            ),
        ));
    }
    if in_pod_rules(mesh, &lonely)?.is_empty() {
        return Err(unexpected(&what, "no redirection rule in its netns"));
    }
    if !netns.exists() || !ipam.exists() {
        return Err(unexpected(
            &what,
            format!(
                "netns {} exists: {}, IPAM reservation {} exists: {}",
                netns.name(),
                netns.exists(),
                ipam.display(),
                ipam.exists()
            ),
        ));
    }

    let started = Instant::now();
    kubectl.run(&["delete", "pod", "-n", NAMESPACE, NAME, "--wait=false"])?;
    poll(&format!("{what} gone from the API"), PATIENCE, |_| {
        Ok(kubectl
            .get("pod", Some(NAMESPACE), NAME)?
            .is_none()
            .then_some(()))
    })?;
    let api_gone = started.elapsed();
    poll(
        &format!("the ztunnel-rs of {node_name} no longer proxying {what}"),
        CLEANUP_PATIENCE,
        |seen| {
            let uids = proxied_uids(mesh, &node_name)?;
            *seen = format!("proxies {uids:?}");
            Ok((!uids.contains(&lonely.uid)).then_some(()))
        },
    )?;
    let unproxied = started.elapsed();
    // ztunnel-rs forgets an identity once its last pod's connections have
    // drained (no grace period for the certificate itself).
    poll(
        &format!("the ztunnel-rs of {node_name} dropping the certificate of ...{identity_suffix}"),
        CLEANUP_PATIENCE,
        |seen| {
            let certs = certificates(mesh, &node_name)?;
            *seen = format!("{certs:?}");
            Ok((!holds_certificate(&certs)).then_some(()))
        },
    )?;
    let uncertified = started.elapsed();
    poll(
        &format!(
            "{}'s entry gone from the probe set of {node_name}",
            lonely.ip
        ),
        CLEANUP_PATIENCE,
        |seen| {
            let host = host_state(mesh, &node_name)?;
            *seen = format!("{host:?}");
            Ok((!probe_entry(&host)).then_some(()))
        },
    )?;
    let unprobed = started.elapsed();
    poll(
        &format!("{what}'s netns {} gone", netns.name()),
        CLEANUP_PATIENCE,
        |_| Ok((!netns.exists()).then_some(())),
    )?;
    let netns_gone = started.elapsed();
    poll(
        &format!("host-local's reservation {} released", ipam.display()),
        CLEANUP_PATIENCE,
        |_| Ok((!ipam.exists()).then_some(())),
    )?;
    let ipam_released = started.elapsed();
    kubectl.run(&[
        "delete",
        "serviceaccount",
        "-n",
        NAMESPACE,
        NAME,
        "--ignore-not-found",
    ])?;
    Ok(format!(
        "after `kubectl delete pod` (grace 1s): gone from the API in {api_gone:.1?}; \
         ztunnel-rs stopped proxying it at {unproxied:.1?}, dropped ...{identity_suffix}'s certificate \
         at {uncertified:.1?}; probe-set entry gone at {unprobed:.1?}; netns gone at {netns_gone:.1?}; \
         address {} released at {ipam_released:.1?} (times from the delete, each polled after the previous)",
        lonely.ip
    ))
}

/// 3. `istioctl-rs uninstall --purge -y`: once the mesh's pods are gone,
///    no app pod has a redirection rule left, every node's CNI
///    configuration is the runtime's own again with no plugin binary, no
///    node has the node agent's chain or sets, the API has no webhook,
///    object or CRD of ours, and the apps kept running and still talk
///    (plaintext now).
fn uninstall_leaves_nothing(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
) -> Result<String, KubeMeshError> {
    let pods = fixture_pods(fixture);
    let lives = pod_lives(mesh)?;
    let nodes = mesh.node_names();
    // The checks, first where they must see the mesh.
    fixture_enrolled(mesh, fixture)?;
    for node in &nodes {
        if host_state(mesh, node)?.is_empty() {
            return Err(unexpected(
                format!("node {node}"),
                "no node-agent chain or set while the mesh runs",
            ));
        }
        if !cni_leftovers(mesh, node)?
            .iter()
            .any(|l| l.contains(PLUGIN))
        {
            return Err(unexpected(
                format!("node {node}"),
                format!("{PLUGIN} is not installed while the mesh runs"),
            ));
        }
    }
    if ours_in_api(mesh)?.is_empty() {
        return Err(unexpected("the API", "nothing of the mesh while it runs"));
    }

    let started = Instant::now();
    let out = mesh.istioctl(&["uninstall", "--purge", "-y"])?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(unexpected(
            "`istioctl-rs uninstall --purge -y`",
            format!("{}: {said}", out.status),
        ));
    }
    let uninstall_took = started.elapsed();
    let (_, pods_gone) = poll(
        &format!("no pod left in {SYSTEM_NAMESPACE}"),
        PATIENCE,
        |seen| {
            let left = items(
                &mesh
                    .kubectl
                    .json(&["get", "pods", "-n", SYSTEM_NAMESPACE])?,
            );
            *seen = left
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str())
                .collect::<Vec<_>>()
                .join(", ");
            Ok(left.is_empty().then_some(()))
        },
    )?;
    // What the API deletes in the background (the namespace's contents).
    let (_, api_clean) = poll("nothing of the mesh left in the API", PATIENCE, |seen| {
        let left = ours_in_api(mesh)?;
        *seen = left.join(", ");
        Ok(left.is_empty().then_some(()))
    })?;

    let mut left = rules_left(mesh, &pods)?;
    for node in &nodes {
        left.extend(
            host_state(mesh, node)?
                .into_iter()
                .map(|r| format!("node {node}: {r}")),
        );
        left.extend(
            cni_leftovers(mesh, node)?
                .into_iter()
                .map(|r| format!("node {node}: {r}")),
        );
    }
    left.extend(
        annotated_pods(mesh)?
            .into_iter()
            .map(|p| format!("pod {p}: still annotated {REDIRECTION}")),
    );
    if !left.is_empty() {
        return Err(unexpected(
            "after `istioctl-rs uninstall --purge -y`",
            format!("left behind:\n  {}", left.join("\n  ")),
        ));
    }
    same_lives(&lives, &pod_lives(mesh)?, "through uninstall")?;
    let client = fixture
        .clients
        .first()
        .ok_or_else(|| unexpected("the fixture", "no client pod"))?;
    let request = request_goes_through(mesh, fixture, client)?;
    Ok(format!(
        "uninstall --purge took {uninstall_took:.1?} (mesh pods gone {pods_gone:.1?} after it returned, \
         API clean {api_clean:.1?} after that); {} app pods: no rule, annotation or restart left; \
         {} nodes: conflist as the runtime wrote it, no {PLUGIN} binary, no {HOST_CHAIN} or {PROBE_SET} sets; \
         request to the echo Service in plaintext after {request:.1?}",
        pods.len(),
        nodes.len()
    ))
}

/// What of the CNI plugin is on `node`: the runtime's conflist differing
/// from what the runtime wrote, any configuration naming the plugin, the
/// plugin binary.
fn cni_leftovers(mesh: &KubeMesh, node: &str) -> Result<Vec<String>, KubeMeshError> {
    let runtime = mesh.node(node)?;
    let range = mesh
        .kube
        .topology
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.pod_range)
        .ok_or_else(|| unexpected(format!("node {node}"), "not in the topology"))?;
    let dir = runtime.cni_conf_dir();
    let io = |path: &std::path::Path, e: std::io::Error| {
        unexpected(format!("node {node}: {}", path.display()), e.to_string())
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
        let path = entry.map_err(|e| io(&dir, e))?.path();
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        if text.contains(PLUGIN) {
            found.push(format!("{} names {PLUGIN}", path.display()));
        }
    }
    let primary = dir.join(PRIMARY_CONFLIST);
    let text = std::fs::read_to_string(&primary).map_err(|e| io(&primary, e))?;
    let now: Value = serde_json::from_str(&text)
        .map_err(|e| unexpected(primary.display().to_string(), e.to_string()))?;
    if now != primary_conflist(range) {
        found.push(format!(
            "{} is not the runtime's own: {now}",
            primary.display()
        ));
    }
    let binary = runtime.cni_bin_dir().join(PLUGIN);
    if binary.exists() {
        found.push(format!("{} exists", binary.display()));
    }
    Ok(found)
}

/// What of the mesh the API still has: objects of `istio-system`, its
/// namespace, webhooks, cluster-wide RBAC and CRDs that are ours (by the
/// install's label, or an `istio.io` group / `istio` name).
fn ours_in_api(mesh: &KubeMesh) -> Result<Vec<String>, KubeMeshError> {
    let kubectl = &mesh.kubectl;
    let mut found = Vec::new();
    if kubectl.get("namespace", None, SYSTEM_NAMESPACE)?.is_some() {
        found.push(format!("Namespace {SYSTEM_NAMESPACE}"));
        let all = kubectl.json(&[
            "get",
            "all,configmaps,secrets,serviceaccounts,roles,rolebindings",
            "-n",
            SYSTEM_NAMESPACE,
        ])?;
        found.extend(items(&all).iter().filter_map(|o| {
            let name = o["metadata"]["name"].as_str()?;
            // Every namespace has these two; the namespace itself is listed.
            (name != "kube-root-ca.crt" && name != "default").then(|| {
                format!(
                    "{} {SYSTEM_NAMESPACE}/{name}",
                    o["kind"].as_str().unwrap_or("?")
                )
            })
        }));
    }
    let cluster_wide = kubectl.json(&[
        "get",
        "validatingwebhookconfigurations,mutatingwebhookconfigurations,clusterroles,clusterrolebindings,customresourcedefinitions",
    ])?;
    found.extend(items(&cluster_wide).iter().filter_map(|o| {
        let name = o["metadata"]["name"].as_str()?;
        let kind = o["kind"].as_str().unwrap_or("?");
        let labelled = !o["metadata"]["labels"]["app.kubernetes.io/managed-by"].is_null()
            && o["metadata"]["labels"]["app.kubernetes.io/managed-by"]
                .as_str()
                .is_some_and(|v| v.contains("istio"));
        let webhook = kind.ends_with("WebhookConfiguration") && name.contains("istio");
        let istio_crd = kind == "CustomResourceDefinition" && name.ends_with("istio.io");
        let istio_rbac = kind.starts_with("ClusterRole") && name.starts_with("istio");
        (labelled || webhook || istio_crd || istio_rbac).then(|| format!("{kind} {name}"))
    }));
    Ok(found)
}
