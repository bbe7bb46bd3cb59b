//! What the demo, the scenarios and the benchmark do to a [`Cluster`] and
//! how they read back what the mesh did: run the sample `client` in a pod,
//! wait for a condition with a deadline (never a fixed sleep), and take the
//! mesh's own evidence: ztunnel-rs's traffic metrics, its certificates, and
//! what its `/config_dump` says about workloads and services.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::apps::{HoldReport, TcpReport};
use crate::cluster::{AppCommand, Cluster, ClusterError, PodInfo, ProxyRef};
use crate::prometheus::{self, PrometheusError, Sample};

/// `istio_tcp_connections_opened_total`, as ztunnel-rs (and upstream) names it.
pub const CONNECTIONS_OPENED: &str = "istio_tcp_connections_opened_total";
/// ztunnel-rs's count of connections it refused or could not carry.
pub const CONNECTION_FAILURES: &str = "istio_ztunnel_connection_failures_total";

/// How long one sample client exchange may take before it counts as hung.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("metrics of {proxy}: {source}")]
    Metrics {
        proxy: String,
        source: PrometheusError,
    },
    #[error("timed out after {waited:?} waiting for {what}; last: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("{what}: {detail}")]
    Unexpected { what: String, detail: String },
}

/// Waits until the pod `namespace/name` exists (a controller may still be
/// starting it, as for a provisioned waypoint) and passes its readiness
/// probe; returns it.
pub fn until_pod_ready(
    cluster: &dyn Cluster,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<PodInfo, ProbeError> {
    eventually(
        &format!("the pod {namespace}/{name} to be Ready"),
        timeout,
        || {
            let Some(pod) = cluster.pod(namespace, name) else {
                return Ok(Err("not running yet".into()));
            };
            let outcome = cluster.probe_readiness(namespace, name)?;
            Ok(if outcome.passed {
                Ok(pod)
            } else {
                Err(format!("readiness: {outcome:?}"))
            })
        },
    )
}

/// Polls `check` until it returns `Ok(value)`; `Err(why)` means "not yet,
/// because ...", reported if `timeout` passes first. Errors of the cluster
/// itself end the wait at once.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Result<T, String>, ProbeError>,
) -> Result<T, ProbeError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match check()? {
            Ok(value) => return Ok(value),
            Err(why) => why,
        };
        if start.elapsed() >= timeout {
            return Err(ProbeError::Timeout {
                what: what.to_string(),
                waited: start.elapsed(),
                last,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Runs the sample client in a pod and parses its one JSON report, which it
/// prints also when it fails (`ok: false`, `error`).
pub fn client<T: DeserializeOwned>(
    cluster: &dyn Cluster,
    from: &PodInfo,
    args: &[String],
    timeout: Duration,
) -> Result<T, ProbeError> {
    let out = cluster.exec(
        &from.namespace,
        &from.name,
        &AppCommand::client(args.to_vec()),
        timeout,
    )?;
    Ok(out.json()?)
}

/// One TCP exchange from `from` to an `echo --tcp-hello` port: connect, read
/// the server's hello (which pod answered, whom it saw), send a line, read
/// the echo. `ok` is false when anything on the way refused or reset it.
pub fn tcp_hello(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
) -> Result<TcpReport, ProbeError> {
    let args = [
        "tcp",
        target,
        "--hello",
        "--message",
        "hello through the mesh\n",
        "--timeout",
        &format!("{}ms", EXCHANGE_TIMEOUT.as_millis()),
    ]
    .map(String::from);
    client(cluster, from, &args, EXCHANGE_TIMEOUT * 3)
}

/// Holds one connection from `from` to an echo `--tcp` port open for up to
/// `duration` (a small round trip every 20 ms) and reports when and how it
/// ended; blocks, so run it on a thread of its own.
pub fn hold(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
    duration: Duration,
) -> Result<HoldReport, ProbeError> {
    let args = [
        "hold",
        target,
        "--duration",
        &format!("{}ms", duration.as_millis()),
    ]
    .map(String::from);
    client(cluster, from, &args, duration + EXCHANGE_TIMEOUT * 3)
}

/// Waits until exchanges from `from` to `target` succeed (`want_ok`) or are
/// refused (`!want_ok`); returns the first report that does.
pub fn until_exchange(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
    want_ok: bool,
    timeout: Duration,
) -> Result<TcpReport, ProbeError> {
    let what = format!(
        "{}/{} -> {target} to be {}",
        from.namespace,
        from.name,
        if want_ok { "carried" } else { "refused" }
    );
    eventually(&what, timeout, || {
        let report = tcp_hello(cluster, from, target)?;
        Ok(if report.ok == want_ok {
            Ok(report)
        } else {
            Err(describe_exchange(&report))
        })
    })
}

/// [`until_exchange`] polled as fast as exchanges complete, to measure how
/// long a change took to reach the data plane: returns the time from
/// `since` to the first exchange that came out as wanted, and that exchange.
pub fn time_until_exchange(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
    want_ok: bool,
    since: Instant,
    timeout: Duration,
) -> Result<(Duration, TcpReport), ProbeError> {
    loop {
        let report = tcp_hello(cluster, from, target)?;
        let took = since.elapsed();
        if report.ok == want_ok {
            return Ok((took, report));
        }
        if took >= timeout {
            return Err(ProbeError::Timeout {
                what: format!(
                    "{}/{} -> {target} to be {}",
                    from.namespace,
                    from.name,
                    if want_ok { "carried" } else { "refused" }
                ),
                waited: took,
                last: describe_exchange(&report),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Exchanges from `from` to `target` (a service, say) until each pod named
/// in `wanted` has answered or `tries` are used up; returns who answered
/// how often. Any exchange that is not carried is an error.
pub fn who_answers(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
    wanted: &[&str],
    tries: usize,
) -> Result<Vec<(String, usize)>, ProbeError> {
    let mut answered: Vec<(String, usize)> = Vec::new();
    for _ in 0..tries {
        let report = tcp_hello(cluster, from, target)?;
        let Some(hello) = report.hello.as_ref().filter(|_| report.ok) else {
            return Err(ProbeError::Unexpected {
                what: format!("{}/{} -> {target}", from.namespace, from.name),
                detail: describe_exchange(&report),
            });
        };
        match answered.iter_mut().find(|(pod, _)| *pod == hello.pod) {
            Some((_, n)) => *n += 1,
            None => answered.push((hello.pod.clone(), 1)),
        }
        if wanted.iter().all(|w| answered.iter().any(|(p, _)| p == w)) {
            break;
        }
    }
    Ok(answered)
}

/// One line saying how an exchange went.
pub fn describe_exchange(report: &TcpReport) -> String {
    match (&report.error, &report.hello) {
        (Some(e), _) => format!("refused: {e}"),
        (None, Some(h)) => format!(
            "carried: answered by {}/{}, which saw {}",
            h.namespace, h.pod, h.peer
        ),
        (None, None) => "carried".to_string(),
    }
}

/// Whether the server answered and saw the connection come from `caller`'s
/// own address (the mesh keeps the original source).
pub fn saw_caller(report: &TcpReport, caller: &PodInfo) -> bool {
    let seen = report
        .hello
        .as_ref()
        .and_then(|h| h.peer.parse::<std::net::SocketAddr>().ok());
    seen.is_some_and(|addr| match addr.ip() {
        std::net::IpAddr::V4(ip) => ip == caller.ip,
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped() == Some(caller.ip),
    })
}

/// A node's ztunnel-rs.
pub fn ztunnel(node: &str) -> ProxyRef {
    ProxyRef::Ztunnel {
        node: node.to_string(),
    }
}

/// Every sample a proxy's `/metrics` shows now.
pub fn metrics(cluster: &dyn Cluster, proxy: &ProxyRef) -> Result<Vec<Sample>, ProbeError> {
    let text = cluster.metrics(proxy)?;
    prometheus::parse(&text).map_err(|source| ProbeError::Metrics {
        proxy: format!("{proxy:?}"),
        source,
    })
}

/// The SPIFFE id of a service account, as the metrics and certificates show it.
pub fn principal(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Labels of the connections ztunnel-rs reports as the destination side, in
/// mutual TLS, from `source` to `destination` (SPIFFE ids).
pub fn mtls_from_to<'a>(source: &'a str, destination: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", source),
        ("destination_principal", destination),
    ]
}

/// Connections opened, as a proxy counts them, with all of `filter`'s labels.
pub fn connections_opened(
    cluster: &dyn Cluster,
    proxy: &ProxyRef,
    filter: &[(&str, &str)],
) -> Result<f64, ProbeError> {
    Ok(prometheus::sum(
        &metrics(cluster, proxy)?,
        CONNECTIONS_OPENED,
        filter,
    ))
}

/// Runs `exchange` and waits until `proxy`'s count of connections with
/// `filter`'s labels has gone up (the counter moves when the connection
/// opens; a scrape right after may still miss it). Returns the exchange's
/// result and the new count.
pub fn counted<T>(
    cluster: &dyn Cluster,
    proxy: &ProxyRef,
    filter: &[(&str, &str)],
    exchange: impl FnOnce() -> Result<T, ProbeError>,
) -> Result<(T, f64), ProbeError> {
    let before = connections_opened(cluster, proxy, filter)?;
    let result = exchange()?;
    let what = format!("{proxy:?} to count a connection with {filter:?}");
    let after = eventually(&what, Duration::from_secs(10), || {
        let now = connections_opened(cluster, proxy, filter)?;
        Ok(if now > before {
            Ok(now)
        } else {
            Err(format!("still {now}"))
        })
    })?;
    Ok((result, after))
}

/// One identity's certificate on a node, from ztunnel-rs's `/certs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSummary {
    pub identity: String,
    /// `Available`, `Initializing`, `Unavailable: ...`.
    pub state: String,
    pub serial: String,
    pub valid_from: String,
    pub expires: String,
    /// Serial numbers of the roots it is verified against.
    pub roots: Vec<String>,
    /// Serial numbers of the intermediates sent with it (its chain after
    /// the leaf).
    pub intermediates: Vec<String>,
}

/// The certificates a node's ztunnel-rs holds, by identity.
pub fn certificates(
    cluster: &dyn Cluster,
    node: &str,
) -> Result<Vec<CertificateSummary>, ProbeError> {
    let proxy = ztunnel(node);
    let resp = cluster.proxy_get(&proxy, api::ports::ADMIN, "/certs")?;
    let unexpected = |detail: String| ProbeError::Unexpected {
        what: format!("/certs of the ztunnel on {node}"),
        detail,
    };
    if resp.status != 200 {
        return Err(unexpected(format!("status {}: {}", resp.status, resp.body)));
    }
    let dump: Value = serde_json::from_str(&resp.body).map_err(|e| unexpected(e.to_string()))?;
    let entries = dump
        .as_array()
        .or_else(|| dump.get("certificates").and_then(Value::as_array))
        .ok_or_else(|| unexpected(format!("not a list of certificates: {dump}")))?;
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    Ok(entries
        .iter()
        .map(|entry| {
            let chain = entry
                .get("certChain")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let leaf = chain.first().cloned().unwrap_or(Value::Null);
            let roots = entry
                .get("rootCerts")
                .and_then(Value::as_array)
                .map(|roots| roots.iter().map(|r| text(r, "serialNumber")).collect())
                .unwrap_or_default();
            CertificateSummary {
                identity: text(entry, "identity"),
                state: text(entry, "state"),
                serial: text(&leaf, "serialNumber"),
                valid_from: text(&leaf, "validFrom"),
                expires: text(&leaf, "expirationTime"),
                roots,
                intermediates: chain
                    .iter()
                    .skip(1)
                    .map(|c| text(c, "serialNumber"))
                    .collect(),
            }
        })
        .collect())
}

/// Waits until a node's ztunnel-rs holds a valid certificate for
/// `identity` (a SPIFFE id) and returns it. A pod joins the mesh only then:
/// its ztunnel asks for the certificate when the pod is handed over, and the
/// CA may refuse until the control plane has seen the pod on that node.
pub fn until_certificate(
    cluster: &dyn Cluster,
    node: &str,
    identity: &str,
    timeout: Duration,
) -> Result<CertificateSummary, ProbeError> {
    eventually(
        &format!("the ztunnel on {node} to hold a certificate for {identity}"),
        timeout,
        || {
            let certs = certificates(cluster, node)?;
            Ok(match certs.into_iter().find(|c| c.identity == identity) {
                Some(c) if c.state == "Available" => Ok(c),
                Some(c) => Err(c.state),
                None => Err("none".to_string()),
            })
        },
    )
}

/// A workload as a ztunnel-rs's `/config_dump` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownWorkload {
    pub uid: String,
    /// `HBONE` for pods in the mesh, `TCP` for the others.
    pub protocol: String,
    pub authorization_policies: Vec<String>,
}

/// What a node's ztunnel-rs knows about a pod (matched by namespace, name
/// and address), if anything.
pub fn known_workload(
    cluster: &dyn Cluster,
    node: &str,
    pod: &PodInfo,
) -> Result<Option<KnownWorkload>, ProbeError> {
    let dump = cluster.config_dump(&ztunnel(node))?;
    let ip = pod.ip.to_string();
    let found = dump
        .get("workloads")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|w| {
            w.get("namespace").and_then(Value::as_str) == Some(pod.namespace.as_str())
                && w.get("name").and_then(Value::as_str) == Some(pod.name.as_str())
                && w.get("workloadIps")
                    .and_then(Value::as_array)
                    .is_some_and(|ips| ips.iter().any(|a| a.as_str() == Some(ip.as_str())))
        });
    Ok(found.map(|w| KnownWorkload {
        uid: w
            .get("uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        protocol: w
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        authorization_policies: w
            .get("authorizationPolicies")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect(),
    }))
}

/// Waits until every node's ztunnel-rs knows each pod, as `protocol`
/// (`HBONE`: in the mesh; `TCP`: not), so the next connection does not race
/// the control plane's push.
pub fn until_known(
    cluster: &dyn Cluster,
    pods: &[&PodInfo],
    protocol: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    for node in cluster.nodes() {
        for pod in pods {
            let what = format!(
                "the ztunnel on {node} to know {}/{} as {protocol}",
                pod.namespace, pod.name
            );
            eventually(&what, timeout, || {
                Ok(match known_workload(cluster, &node, pod)? {
                    Some(w) if w.protocol == protocol => Ok(()),
                    Some(w) => Err(format!("known as {}", w.protocol)),
                    None => Err("not known".into()),
                })
            })?;
        }
    }
    Ok(())
}

/// Waits until pods have joined the mesh: every node's ztunnel-rs knows
/// each as an HBONE workload, and each pod's own ztunnel holds a certificate
/// for its identity (`(pod, service account)` pairs).
pub fn until_in_mesh(
    cluster: &dyn Cluster,
    trust_domain: &str,
    pods: &[(&PodInfo, &str)],
    timeout: Duration,
) -> Result<(), ProbeError> {
    let all: Vec<&PodInfo> = pods.iter().map(|(p, _)| *p).collect();
    until_known(cluster, &all, "HBONE", timeout)?;
    for (pod, sa) in pods {
        let id = principal(trust_domain, &pod.namespace, sa);
        until_certificate(cluster, &pod.node, &id, timeout)?;
    }
    Ok(())
}

/// Whether a node's ztunnel-rs proxies a pod (it was handed the pod's
/// network namespace over ZDS).
pub fn proxies_pod(cluster: &dyn Cluster, node: &str, pod: &PodInfo) -> Result<bool, ProbeError> {
    let dump = cluster.config_dump(&ztunnel(node))?;
    let text = serde_json::to_string(dump.get("pods").unwrap_or(&Value::Null)).unwrap_or_default();
    Ok(text.contains(&pod.uid))
}

/// The endpoints (workload uids) a node's ztunnel-rs has for a service.
pub fn service_endpoints(
    cluster: &dyn Cluster,
    node: &str,
    namespace: &str,
    name: &str,
) -> Result<Vec<String>, ProbeError> {
    let dump = cluster.config_dump(&ztunnel(node))?;
    let service = dump
        .get("services")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|s| {
            s.get("namespace").and_then(Value::as_str) == Some(namespace)
                && s.get("name").and_then(Value::as_str) == Some(name)
        });
    Ok(service
        .and_then(|s| s.get("endpoints"))
        .and_then(Value::as_object)
        .map(|eps| eps.keys().cloned().collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_reports_the_last_reason() {
        let mut n = 0;
        let got = eventually("three tries", Duration::from_secs(5), || {
            n += 1;
            Ok(if n == 3 {
                Ok(n)
            } else {
                Err(format!("try {n}"))
            })
        })
        .unwrap();
        assert_eq!(got, 3);
        let err = eventually::<()>("never", Duration::from_millis(30), || {
            Ok(Err("still no".into()))
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("waiting for never") && err.contains("last: still no"),
            "{err}"
        );
    }

    #[test]
    fn principals_are_spiffe_ids() {
        assert_eq!(
            principal("cluster.local", "demo", "client"),
            "spiffe://cluster.local/ns/demo/sa/client"
        );
    }
}
