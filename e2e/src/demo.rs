//! `cargo xtask demo`: the mesh on a local cluster of network namespaces,
//! driven through every L4 path and through a waypoint at L7, with a table
//! of what happened.
//!
//! Two nodes; namespace `demo` (ambient: every pod in the mesh) and
//! `legacy` (not enrolled); in `demo` a client and an echo server on each
//! node and a service in front of the servers, in `legacy` one client.
//! Checks, each with its evidence taken from the mesh itself:
//! 1. ambient -> ambient on one node and across nodes: carried in mutual
//!    TLS, with both SPIFFE ids as ztunnel-rs's metrics report them; the
//!    service VIP spreads over both nodes;
//! 2. legacy -> ambient: plaintext admitted under PERMISSIVE, refused once a
//!    STRICT PeerAuthentication is applied while traffic runs, and a
//!    plaintext connection open at that moment is cut;
//! 3. a DENY AuthorizationPolicy by source namespace, applied while running,
//!    takes effect within a second (measured) for new connections and for a
//!    connection already open, and traffic returns when it is removed.
//!    Both refusals are shown to come from policy by ztunnel's counters
//!    (`policy_denied` for new connections, `policy_revoked` for the cut
//!    one), not from some other reset;
//! 4. the certificates each node's ztunnel holds: identities and expiry;
//! 5. L7 through a waypoint istiod-rs provisions from a Gateway of class
//!    `istio-waypoint`: an HTTPRoute by header, an AuthorizationPolicy
//!    refusing DELETE with 403, a JWT check (401/403/200), each with the
//!    waypoint's own evidence (its routes, its `istio_requests_total`).
//!
//! With `--keep` the cluster stays up and the demo prints how to look
//! inside; Ctrl-C removes everything.

pub mod table;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::apps::HoldReport;

use crate::cluster::{Cluster, ClusterError, PodInfo};
use crate::local::{LocalCluster, LocalClusterConfig, Progress};
use crate::mesh::{MeshConfig, MeshMode};
use crate::probe::{
    self, CONNECTION_FAILURES, ProbeError, counted, describe_exchange, mtls_from_to, principal,
    tcp_hello, time_until_exchange, ztunnel,
};
use crate::prometheus;
use crate::scenarios::fixture::{
    ECHO_HELLO, ECHO_TCP, L4Fixture, client_pod, echo_server, echo_service_yaml, namespace_yaml,
    service_accounts_yaml,
};
use crate::scenarios::policies::{Applied, authorization, from_namespaces, peer_authentication};
use crate::scenarios::{l7, on_demand};
use table::Column;

pub const AMBIENT_NS: &str = "demo";
pub const LEGACY_NS: &str = "legacy";
const SERVICE: &str = "server";
/// The propagation goal a policy change is held to.
const POLICY_GOAL: Duration = Duration::from_secs(1);
/// How long the demo waits for anything before calling it failed.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

/// Command line of the `demo` binary.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "demo",
    about = "Runs the mesh on a local two-node cluster, drives every L4 path and L7 through a waypoint, and prints what happened"
)]
pub struct DemoArgs {
    /// Leave the cluster running afterwards and print how to look inside; Ctrl-C removes it.
    #[arg(long)]
    pub keep: bool,
    /// `RUST_LOG` of the mesh's components (their logs are files in the run directory).
    #[arg(long, default_value = "info")]
    pub log: String,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Check {
    pub check: String,
    pub happened: String,
    pub pass: bool,
    pub evidence: String,
}

/// The demo's pods.
#[derive(Clone, Debug)]
pub struct DemoPods {
    pub trust_domain: String,
    /// `demo/server-<node>` for the first two nodes.
    pub servers: Vec<PodInfo>,
    /// `demo/client-<node>`.
    pub clients: Vec<PodInfo>,
    /// `legacy/client`, on the second node.
    pub legacy: PodInfo,
    pub service_vip: String,
}

impl DemoPods {
    pub fn create(cluster: &dyn Cluster, trust_domain: &str) -> Result<DemoPods, DemoError> {
        let yaml = [
            namespace_yaml(AMBIENT_NS, true),
            namespace_yaml(LEGACY_NS, false),
            service_accounts_yaml(AMBIENT_NS, &["client", "server"]),
            echo_service_yaml(AMBIENT_NS, SERVICE, "server"),
        ]
        .join("---\n");
        cluster.apply_yaml(&yaml)?;
        let nodes: Vec<String> = cluster.nodes().into_iter().take(2).collect();
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        for node in &nodes {
            servers.push(
                cluster.create_pod(
                    &echo_server(AMBIENT_NS, &format!("server-{node}"), node, "server")
                        .label("app", "server"),
                )?,
            );
            clients.push(cluster.create_pod(&client_pod(
                AMBIENT_NS,
                &format!("client-{node}"),
                node,
                "client",
            ))?);
        }
        let last = nodes.last().cloned().unwrap_or_default();
        let legacy = cluster.create_pod(&client_pod(LEGACY_NS, "client", &last, "default"))?;
        let enrolled: Vec<(&PodInfo, &str)> = servers
            .iter()
            .map(|p| (p, "server"))
            .chain(clients.iter().map(|p| (p, "client")))
            .collect();
        probe::until_in_mesh(cluster, trust_domain, &enrolled, TIMEOUT)?;
        probe::until_known(cluster, &[&legacy], "TCP", TIMEOUT)?;
        let service_vip = probe::eventually("the service's cluster IP", TIMEOUT, || {
            Ok(
                crate::scenarios::fixture::service_vip(cluster, AMBIENT_NS, SERVICE)?
                    .ok_or("no VIP yet".to_string()),
            )
        })?;
        Ok(DemoPods {
            trust_domain: trust_domain.to_string(),
            servers,
            clients,
            legacy,
            service_vip,
        })
    }

    fn principal(&self, sa: &str) -> String {
        principal(&self.trust_domain, AMBIENT_NS, sa)
    }
}

/// Prints a progress line with the time since the demo started.
struct Steps(Instant);

impl Steps {
    fn say(&self, step: &str) {
        println!("[{:>5.1}s] {step}", self.0.elapsed().as_secs_f64());
    }
}

/// Runs the demo; `Ok(true)` when every check passed.
pub fn run(args: &DemoArgs) -> Result<bool, DemoError> {
    let steps = Steps(Instant::now());
    steps
        .say("starting the local cluster with the mesh (a first run builds the binaries: minutes)");
    let mesh = MeshConfig {
        log: args.log.clone(),
        ..MeshConfig::default()
    };
    let trust_domain = mesh.trust_domain.clone();
    let started = Instant::now();
    let cluster = LocalCluster::start(LocalClusterConfig {
        mesh: MeshMode::On(mesh),
        progress: Progress::new(move |step| {
            println!("[{:>5.1}s]   {step}", started.elapsed().as_secs_f64())
        }),
        ..LocalClusterConfig::default()
    })?;
    steps.say(
        "creating namespaces demo (ambient) and legacy (not enrolled), a service, and client and server pods on both nodes (through the CNI plugin)",
    );
    let pods = DemoPods::create(&cluster, &trust_domain)?;
    steps.say("driving traffic through every path");
    let checks = checks(&cluster, &pods, &steps);
    println!();
    println!("{}", render(&checks));
    let passed = checks.iter().filter(|c| c.pass).count();
    println!(
        "{passed} of {} checks passed. Component logs: {}",
        checks.len(),
        cluster.run().dir().join("logs").display()
    );
    let all = passed == checks.len();
    if !all {
        // Printed above; keep them to look into after the cluster is gone.
        cluster.run().keep_dir();
    }
    if args.keep {
        println!("\n{}", hints(&cluster, &pods));
        // The run's signal handler removes the cluster on Ctrl-C and exits.
        loop {
            std::thread::park();
        }
    }
    Ok(all)
}

/// The table of checks.
pub fn render(checks: &[Check]) -> String {
    let columns = [
        Column {
            heading: "CHECK",
            width: 26,
        },
        Column {
            heading: "WHAT HAPPENED",
            width: 46,
        },
        Column {
            heading: "RESULT",
            width: 6,
        },
        Column {
            heading: "EVIDENCE",
            width: 62,
        },
    ];
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            vec![
                c.check.clone(),
                c.happened.clone(),
                if c.pass { "PASS" } else { "FAIL" }.to_string(),
                c.evidence.clone(),
            ]
        })
        .collect();
    table::render(&columns, &rows)
}

/// Runs a check; a probe that fails outright is a failed row with its error.
fn check(name: &str, f: impl FnOnce() -> Result<Check, ProbeError>) -> Check {
    f().unwrap_or_else(|e| Check {
        check: name.to_string(),
        happened: "the check could not complete".into(),
        pass: false,
        evidence: e.to_string(),
    })
}

fn name(p: &PodInfo) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Every check, in order.
fn checks(cluster: &dyn Cluster, pods: &DemoPods, steps: &Steps) -> Vec<Check> {
    let mut out = Vec::new();
    let (client, near, far) = (&pods.clients[0], &pods.servers[0], &pods.servers[1]);
    steps.say("1. ambient -> ambient, same node and across nodes");
    out.push(check("ambient -> ambient, same node", || {
        mtls(cluster, pods, "ambient -> ambient, same node", client, near)
    }));
    out.push(check("ambient -> ambient, cross node", || {
        mtls(cluster, pods, "ambient -> ambient, cross node", client, far)
    }));
    out.push(check("ambient -> service VIP", || service(cluster, pods)));
    steps.say("2. legacy -> ambient, PERMISSIVE then STRICT");
    out.push(check("legacy -> ambient, PERMISSIVE", || {
        permissive(cluster, pods)
    }));
    out.push(check("legacy -> ambient, STRICT applied", || {
        strict(cluster, pods)
    }));
    steps.say("3. DENY by source namespace, applied and removed while running");
    out.extend(deny(cluster, pods));
    steps.say("4. certificates on each node");
    for node in cluster.nodes() {
        out.push(check(&format!("certificates on {node}"), || {
            certificates(cluster, pods, &node)
        }));
    }
    steps.say(
        "5. L7 through a provisioned waypoint: a route, an L7 deny, a JWT check; a waypoint created on demand",
    );
    out.extend(l7(cluster, pods));
    out
}

/// The L7 rows: each runs one of the L7 scenarios (its own namespace `l7`
/// with a waypoint Gateway istiod-rs provisions, two echo versions and a
/// Service bound to the waypoint, removed afterwards), then the on-demand
/// one (namespace `od`, no waypoint until the route needs one), from the
/// demo's first client; the scenario's evidence is the row's.
fn l7(cluster: &dyn Cluster, pods: &DemoPods) -> Vec<Check> {
    let caller = l7::Caller {
        trust_domain: pods.trust_domain.clone(),
        client: pods.clients[0].clone(),
    };
    type Run = fn(&dyn Cluster, &l7::Caller) -> Result<String, ProbeError>;
    let rows: [(&str, &str, Run); 4] = [
        (
            "L7 route by header",
            "HTTPRoute on Service echo: x-version: v2 -> echo-v2, the rest -> echo-v1",
            l7::header_route,
        ),
        (
            "L7 deny (AuthorizationPolicy)",
            "ALLOW GET only on Service echo: DELETE refused with 403 by the waypoint, GET served",
            l7::allow_get_deny_delete,
        ),
        (
            "L7 JWT check",
            "RequestAuthentication + required principal: no token 403, bad signature 401, valid token 200",
            l7::jwt_missing_invalid_valid,
        ),
        (
            "L7 waypoint on demand",
            "HTTPRoute on a Service with no waypoint: refused until istiod-rs's waypoint is Ready, then routed by it; deleted: direct again, waypoint gone",
            on_demand::route_makes_a_waypoint_and_goes_with_it,
        ),
    ];
    rows.into_iter()
        .map(|(name, happened, run)| match run(cluster, &caller) {
            Ok(evidence) => Check {
                check: name.into(),
                happened: happened.into(),
                pass: true,
                evidence,
            },
            Err(e) => Check {
                check: name.into(),
                happened: format!("{happened}: did not hold"),
                pass: false,
                evidence: e.to_string(),
            },
        })
        .collect()
}

fn mtls(
    cluster: &dyn Cluster,
    pods: &DemoPods,
    label: &str,
    from: &PodInfo,
    to: &PodInfo,
) -> Result<Check, ProbeError> {
    let (src, dst) = (pods.principal("client"), pods.principal("server"));
    let filter = mtls_from_to(&src, &dst);
    let proxy = ztunnel(&to.node);
    let target = L4Fixture::at(to, ECHO_HELLO);
    let (report, count) = counted(cluster, &proxy, &filter, || {
        tcp_hello(cluster, from, &target)
    })?;
    let answered = report.hello.as_ref().map(|h| h.pod.as_str());
    // The ids as the metrics carry them (the series the filter matched).
    let samples = probe::metrics(cluster, &proxy)?;
    let series = samples
        .iter()
        .find(|s| s.name == probe::CONNECTIONS_OPENED && s.matches(&filter));
    let ids = series.map_or_else(
        || "no matching series".to_string(),
        |s| {
            format!(
                "source_principal={} destination_principal={}",
                s.label("source_principal").unwrap_or("?"),
                s.label("destination_principal").unwrap_or("?")
            )
        },
    );
    Ok(Check {
        check: label.into(),
        happened: format!(
            "{} ({}) -> {} ({}) port {ECHO_HELLO}: {}",
            name(from),
            from.node,
            name(to),
            to.node,
            describe_exchange(&report)
        ),
        // The server sees the client pod's own address (original source).
        pass: report.ok && answered == Some(to.name.as_str()) && probe::saw_caller(&report, from),
        evidence: format!(
            "ztunnel on {}: {} connection(s) reporter=destination connection_security_policy=mutual_tls {ids}",
            to.node, count
        ),
    })
}

fn service(cluster: &dyn Cluster, pods: &DemoPods) -> Result<Check, ProbeError> {
    let wanted: Vec<&str> = pods.servers.iter().map(|s| s.name.as_str()).collect();
    let target = format!("{}:{ECHO_HELLO}", pods.service_vip);
    let answered = probe::who_answers(cluster, &pods.clients[0], &target, &wanted, 40)?;
    let all = wanted.iter().all(|w| answered.iter().any(|(p, _)| p == w));
    let spread: Vec<String> = answered.iter().map(|(p, n)| format!("{p} x{n}")).collect();
    Ok(Check {
        check: "ambient -> service VIP".into(),
        happened: format!(
            "{} -> service {AMBIENT_NS}/{SERVICE} ({target}): answered by {}",
            name(&pods.clients[0]),
            spread.join(", ")
        ),
        pass: all,
        evidence: "ztunnel picks a healthy endpoint of the service on either node and carries the connection in HBONE".into(),
    })
}

/// Plaintext connections a node's ztunnel admitted for the server identity.
fn plaintext_admitted(cluster: &dyn Cluster, node: &str, dst: &str) -> Result<f64, ProbeError> {
    probe::connections_opened(
        cluster,
        &ztunnel(node),
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "unknown"),
            ("destination_principal", dst),
        ],
    )
}

fn permissive(cluster: &dyn Cluster, pods: &DemoPods) -> Result<Check, ProbeError> {
    let to = &pods.servers[0];
    let dst = pods.principal("server");
    let before = plaintext_admitted(cluster, &to.node, &dst)?;
    let report = tcp_hello(cluster, &pods.legacy, &L4Fixture::at(to, ECHO_HELLO))?;
    let after = probe::eventually("the plaintext connection to be counted", TIMEOUT, || {
        let now = plaintext_admitted(cluster, &to.node, &dst)?;
        Ok(if now > before || !report.ok {
            Ok(now)
        } else {
            Err(format!("still {now}"))
        })
    })?;
    Ok(Check {
        check: "legacy -> ambient, PERMISSIVE (the default)".into(),
        happened: format!(
            "{} (not in the mesh) -> {}: {}",
            name(&pods.legacy),
            name(to),
            describe_exchange(&report)
        ),
        pass: report.ok,
        evidence: format!(
            "ztunnel on {}: {after} plaintext connection(s) admitted (connection_security_policy=unknown, destination_principal={dst})",
            to.node
        ),
    })
}

/// A node's ztunnel's failures of `direction` by reason: (`policy_denied`,
/// `policy_revoked`).
fn policy_failures(
    cluster: &dyn Cluster,
    node: &str,
    direction: &str,
) -> Result<(f64, f64), ProbeError> {
    let samples = probe::metrics(cluster, &ztunnel(node))?;
    let count = |reason: &str| {
        prometheus::sum(
            &samples,
            CONNECTION_FAILURES,
            &[("direction", direction), ("reason", reason)],
        )
    };
    Ok((count("policy_denied"), count("policy_revoked")))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// What applying a policy did to new connections and to one held open.
struct PolicyEffect {
    /// Time to the first refused new connection, and that exchange.
    took: Duration,
    refused: crate::apps::TcpReport,
    /// The connection held open across the change.
    held: HoldReport,
    /// From the change to the held connection's end, when it ended.
    cut_after: Option<Duration>,
    /// `(policy_denied, policy_revoked)` of the destination's ztunnel, before and after.
    before: (f64, f64),
    after: (f64, f64),
}

impl PolicyEffect {
    /// Refusals within the goal, both shown by the policy counters.
    fn pass(&self) -> bool {
        let cut = self.cut_after.is_some_and(|d| d <= POLICY_GOAL) && !self.held.ok;
        !self.refused.ok
            && self.took <= POLICY_GOAL
            && cut
            && self.after.0 > self.before.0
            && self.after.1 > self.before.1
    }

    fn happened(&self) -> String {
        format!(
            "new connection: {} after {} ms; connection open before: {}",
            describe_exchange(&self.refused),
            self.took.as_millis(),
            match (&self.held.error, self.cut_after) {
                (Some(e), Some(after)) =>
                    format!("cut {} ms after the change ({e})", after.as_millis()),
                (Some(e), None) => format!("ended ({e})"),
                (None, _) => "NOT CUT".to_string(),
            }
        )
    }

    fn evidence(&self, node: &str, direction: &str) -> String {
        format!(
            "ztunnel on {node}: {CONNECTION_FAILURES}{{direction=\"{direction}\"}} reason policy_denied {} -> {}, policy_revoked {} -> {} (goal: both within {} ms)",
            self.before.0,
            self.after.0,
            self.before.1,
            self.after.1,
            POLICY_GOAL.as_millis()
        )
    }
}

/// Holds a connection `from` -> `to`'s echo port, applies `apply` once it is
/// up, and measures the refusal of new connections to `target` and the cut
/// of the held one.
fn policy_effect(
    cluster: &dyn Cluster,
    from: &PodInfo,
    to: &PodInfo,
    target: &str,
    direction: &str,
    apply: impl FnOnce() -> Result<(), ProbeError>,
) -> Result<PolicyEffect, ProbeError> {
    let held_target = L4Fixture::at(to, ECHO_TCP);
    let opened = |c: &dyn Cluster| {
        probe::connections_opened(
            c,
            &ztunnel(&to.node),
            &[
                ("reporter", "destination"),
                ("source_workload", from.name.as_str()),
            ],
        )
    };
    let opened_before = opened(cluster)?;
    let before = policy_failures(cluster, &to.node, direction)?;
    std::thread::scope(|s| {
        let holding = s.spawn(|| probe::hold(cluster, from, &held_target, TIMEOUT));
        probe::eventually("the held connection to be up", TIMEOUT, || {
            let now = opened(cluster)?;
            Ok(if now > opened_before {
                Ok(())
            } else {
                Err(format!("{now} connection(s) from {}", name(from)))
            })
        })?;
        let (applied_wall, applied_at) = (SystemTime::now(), Instant::now());
        apply()?;
        let (took, refused) =
            time_until_exchange(cluster, from, target, false, applied_at, TIMEOUT)?;
        // That first refusal may be a connection opened just before the
        // policy reached the ztunnel and then cut (counted
        // policy_revoked); one more new connection meets the policy itself
        // (policy_denied).
        let again = probe::tcp_hello(cluster, from, target)?;
        if again.ok {
            return Err(ProbeError::Unexpected {
                what: format!("{} -> {target}", name(from)),
                detail: format!(
                    "carried again after the first refusal: {}",
                    probe::describe_exchange(&again)
                ),
            });
        }
        let held = holding
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        let cut_after = held
            .ended_at_ms
            .map(|end| Duration::from_millis(end.saturating_sub(unix_ms(applied_wall))));
        let after = probe::eventually("the policy counters", TIMEOUT, || {
            let now = policy_failures(cluster, &to.node, direction)?;
            Ok(if now.0 > before.0 && now.1 > before.1 {
                Ok(now)
            } else {
                Err(format!("policy_denied, policy_revoked: {now:?}"))
            })
        })
        .or_else(|_| policy_failures(cluster, &to.node, direction))?;
        Ok(PolicyEffect {
            took,
            refused,
            held,
            cut_after,
            before,
            after,
        })
    })
}

fn strict(cluster: &dyn Cluster, pods: &DemoPods) -> Result<Check, ProbeError> {
    let to = &pods.servers[0];
    let target = L4Fixture::at(to, ECHO_HELLO);
    let mut policy = None;
    let effect = policy_effect(
        cluster,
        &pods.legacy,
        to,
        &target,
        "inbound_plaintext",
        || {
            policy = Some(Applied::new(
                cluster,
                &peer_authentication(AMBIENT_NS, "strict", "STRICT"),
            )?);
            Ok(())
        },
    )?;
    let mtls = tcp_hello(cluster, &pods.clients[0], &target)?;
    if let Some(policy) = policy {
        policy.remove()?;
    }
    probe::until_exchange(cluster, &pods.legacy, &target, true, TIMEOUT)?;
    Ok(Check {
        check: "legacy -> ambient, STRICT applied while running".into(),
        happened: format!(
            "PeerAuthentication {AMBIENT_NS}/strict (mode STRICT) applied; {} -> {}: {}; {} still {}; STRICT removed again",
            name(&pods.legacy),
            name(to),
            effect.happened(),
            name(&pods.clients[0]),
            if mtls.ok {
                "carried in mTLS"
            } else {
                "REFUSED"
            }
        ),
        pass: effect.pass() && mtls.ok,
        evidence: effect.evidence(&to.node, "inbound_plaintext"),
    })
}

fn deny(cluster: &dyn Cluster, pods: &DemoPods) -> Vec<Check> {
    let (from, to) = (&pods.clients[0], &pods.servers[1]);
    let target = L4Fixture::at(to, ECHO_HELLO);
    let policy_yaml = authorization(
        AMBIENT_NS,
        "deny-from-demo",
        "server",
        "DENY",
        &from_namespaces(&[AMBIENT_NS]),
    );
    let mut rows = Vec::new();
    let mut policy = None;
    rows.push(check("DENY by source namespace, applied", || {
        probe::until_exchange(cluster, from, &target, true, TIMEOUT)?;
        let effect = policy_effect(cluster, from, to, &target, "inbound", || {
            policy = Some(Applied::new(cluster, &policy_yaml)?);
            Ok(())
        })?;
        Ok(Check {
            check: "DENY by source namespace, applied while running".into(),
            happened: format!(
                "AuthorizationPolicy {AMBIENT_NS}/deny-from-demo (DENY from namespace {AMBIENT_NS}) applied; {} -> {}: {}",
                name(from),
                name(to),
                effect.happened()
            ),
            pass: effect.pass(),
            evidence: effect.evidence(&to.node, "inbound"),
        })
    }));
    rows.push(check("DENY removed", || {
        let removed_at = Instant::now();
        match policy.take() {
            Some(p) => p.remove()?,
            None => cluster.delete_yaml(&policy_yaml)?,
        }
        let (took, carried) =
            time_until_exchange(cluster, from, &target, true, removed_at, TIMEOUT)?;
        Ok(Check {
            check: "DENY removed while running".into(),
            happened: format!(
                "AuthorizationPolicy deleted; {} -> {}: {}",
                name(from),
                name(to),
                describe_exchange(&carried)
            ),
            pass: carried.ok,
            evidence: format!(
                "traffic returned {} ms after the policy was deleted",
                took.as_millis()
            ),
        })
    }));
    rows
}

fn certificates(cluster: &dyn Cluster, pods: &DemoPods, node: &str) -> Result<Check, ProbeError> {
    let certs = probe::certificates(cluster, node)?;
    let wanted: Vec<String> = ["client", "server"]
        .iter()
        .map(|sa| pods.principal(sa))
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| {
            !certs
                .iter()
                .any(|c| &c.identity == *w && c.state == "Available")
        })
        .collect();
    let listed: Vec<String> = certs
        .iter()
        .map(|c| {
            format!(
                "{} [{}] serial {} expires {}",
                c.identity, c.state, c.serial, c.expires
            )
        })
        .collect();
    Ok(Check {
        check: format!("certificates on {node}"),
        happened: format!(
            "ztunnel on {node} holds {} certificate(s), one per identity of its pods{}",
            certs.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; MISSING: {missing:?}")
            }
        ),
        pass: missing.is_empty(),
        evidence: listed.join("\n"),
    })
}

/// How to look inside the running cluster.
pub fn hints(cluster: &LocalCluster, pods: &DemoPods) -> String {
    let run = cluster.run();
    let logs = run.dir().join("logs");
    let client_bin = crate::binaries::Binaries::default().path("client");
    let nodes = cluster.nodes();
    let node = nodes.first().cloned().unwrap_or_default();
    // ztunnel-rs runs in a pod network of its own on each node, as the
    // DaemonSet's pod (no hostNetwork).
    let ztunnel_ns = |n: &str| {
        cluster
            .mesh()
            .and_then(|m| m.ztunnel_netns(n).ok().flatten())
            .map(|ns| ns.name().to_string())
            .unwrap_or_else(|| run.netns_name(n))
    };
    let node_ns = ztunnel_ns(&node);
    let cp_ns = run.netns_name("control-plane");
    let pod = &pods.clients[0];
    let pod_ns = run.netns_name(&format!("{}.{}", pod.namespace, pod.name));
    let mut out = String::from(
        "The cluster keeps running; Ctrl-C removes it.\n\nLook inside (as root; every address lives in these network namespaces):\n",
    );
    if crate::privilege::in_user_namespace() {
        out.push_str(&format!(
            "  (not root: the cluster lives in a private user namespace; enter it first with\n   nsenter --target {} --user --mount --preserve-credentials)\n",
            std::process::id()
        ));
    }
    out.push_str(&format!(
        "  istiod-rs:   ip netns exec {cp_ns} curl -s localhost:15014/ready   (also /metrics, /debug/syncz, /debug/config_dump)\n\
         \x20 ztunnel-rs:  ip netns exec {node_ns} curl -s localhost:15000/config_dump   (also /certs; :15020/metrics; :15021/healthz/ready)\n\
         \x20              other nodes: {}\n\
         \x20 a client:    ip netns exec {pod_ns} {} tcp {}:{ECHO_HELLO} --hello\n\
         \x20              ({} in namespace {}; service {AMBIENT_NS}/{SERVICE} is {}:{ECHO_HELLO})\n\
         \x20 logs:        {}/  (istiod.log, ztunnel-<node>.log, node-agent-<node>.log, pod-<ns>.<pod>.log)\n\
         \x20 state:       {}  (the YAML istiod-rs reads: add a policy there and watch it apply)\n\
         \x20 all names:   ip netns list | grep {}",
        nodes
            .iter()
            .skip(1)
            .map(|n| ztunnel_ns(n.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
        client_bin.display(),
        pods.servers[pods.servers.len() - 1].ip,
        name(pod),
        pod_ns,
        pods.service_vip,
        logs.display(),
        cluster.config_dir().display(),
        run.netns_name(""),
    ));
    out
}
