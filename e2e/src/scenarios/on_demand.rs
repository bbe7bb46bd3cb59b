//! Waypoints on demand (issue 13): an L7 rule on a Service no waypoint
//! serves makes istiod-rs create one, and the rule is enforced from the
//! moment it exists: refused (fail closed) until the waypoint is ready, then
//! served through it.
//!
//! Each scenario builds its own world in namespace [`NS`] and removes it
//! when it ends, also when it fails ([`World`]):
//!
//! ```text
//! namespace od (ambient, no waypoint, no use-waypoint label)
//!   node0: echo-v1 (app=echo, version=v1, ServiceAccount echo-a)
//!   node1: echo-v2 (app=echo, version=v2, ServiceAccount echo-b)
//!   Service echo-a -> echo-v1     Service echo-b -> echo-v2
//!   Service echo   -> both (two ServiceAccounts behind one Service)
//! ```
//!
//! The rule is an HTTPRoute whose effect is visible in every answer:
//! requests with `x-to: b` go to echo-b, the rest stay where they were
//! sent. Before it applies, `x-to: b` to echo-a is answered by echo-v1;
//! once it does, by echo-v2; in between, refused. A [`Poller`] sends such
//! requests one after another while the cluster changes and records each
//! outcome with its time: the evidence for the measured times (rule applied
//! -> enforced, -> traffic through the new waypoint) and for "no request
//! refused" when a user's waypoint replaces the automatic one.
//!
//! Local cluster only for now, as the L7 scenarios.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Scenario;
use super::fixture::{ECHO_HTTP, echo_server, namespace_yaml, service_accounts_yaml};
use super::l4::failed;
use super::l7::{Caller, describe, from_first_client, tear_down};
use super::policies::Applied;
use crate::apps::HttpReport;
use crate::cluster::{Cluster, OnDemand, PodInfo, ProxyRef};
use crate::objects::ObjectKey;
use crate::probe::{self, ProbeError, eventually};

/// The namespace the scenarios build in.
pub const NS: &str = "od";
/// How long a waypoint may take to be created, started and Ready, or to go.
const WAYPOINT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a change of configuration may take to show in traffic.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one request may take in the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests checked per case once the configuration is in place.
const REPEAT: usize = 5;
/// The header the routes match.
const TO_B: &str = "x-to: b";

/// The scenarios, in the order they run.
pub fn all() -> Vec<Scenario> {
    from_first_client! {
        "on_demand_route_makes_a_waypoint_and_goes_with_it" => route_makes_a_waypoint_and_goes_with_it,
        "on_demand_two_accounts_behind_one_service" => two_accounts_behind_one_service,
        "on_demand_opt_out_fails_closed_with_the_reason" => opt_out_fails_closed_with_the_reason,
        "on_demand_user_waypoint_replaces_it_without_a_refusal" => user_waypoint_replaces_it_without_a_refusal,
    }
}

/// The pods, Services and namespace, removed on drop: rules first (by their
/// own guards, which the scenarios drop before the world), then pods, then
/// the namespace, retried until the on-demand waypoints' pods are gone.
struct World<'a> {
    cluster: &'a dyn Cluster,
    pods: Vec<PodInfo>,
    services: Option<Applied<'a>>,
    namespace: Vec<ObjectKey>,
    /// `http://<VIP>:<ECHO_HTTP>/` of echo-a, echo-b, echo.
    urls: [String; 3],
}

impl Drop for World<'_> {
    fn drop(&mut self) {
        tear_down(
            self.cluster,
            &self.pods,
            self.services.take(),
            &self.namespace,
            NS,
        );
    }
}

/// Service `name` selecting `selector`, with `labels` (`, k: v` or empty).
fn service_yaml(name: &str, selector: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}{labels}}}}}\n\
         spec:\n  selector: {{{selector}}}\n  ports:\n  - {{name: http, port: {ECHO_HTTP}, targetPort: http}}\n"
    )
}

/// Service echo-a, with `labels` (`, k: v` or empty).
fn echo_a_yaml(labels: &str) -> String {
    service_yaml("echo-a", "version: v1", labels)
}

/// An HTTPRoute on Service `parent`: `x-to: b` -> echo-b, the rest -> `parent`.
fn route_yaml(name: &str, parent: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: {ECHO_HTTP}}}]
  rules:
  - matches: [{{headers: [{{name: x-to, value: b}}]}}]
    backendRefs: [{{name: echo-b, port: {ECHO_HTTP}}}]
  - backendRefs: [{{name: {parent}, port: {ECHO_HTTP}}}]
"
    )
}

impl<'a> World<'a> {
    fn create(cluster: &'a dyn Cluster, f: &Caller) -> Result<World<'a>, ProbeError> {
        let namespace = cluster.apply_yaml(
            &[
                namespace_yaml(NS, true),
                service_accounts_yaml(NS, &["echo-a", "echo-b"]),
            ]
            .join("---\n"),
        )?;
        let services = [
            echo_a_yaml(""),
            service_yaml("echo-b", "version: v2", ""),
            service_yaml("echo", "app: echo", ""),
        ]
        .join("---\n");
        let services = Applied::new(cluster, &services).inspect_err(|_| {
            let _ = cluster.delete(&namespace);
        })?;
        let mut world = World {
            cluster,
            pods: Vec::new(),
            services: Some(services),
            namespace,
            urls: Default::default(),
        };
        let nodes = cluster.nodes();
        for ((version, account), node) in [("v1", "echo-a"), ("v2", "echo-b")]
            .into_iter()
            .zip(nodes.iter().cycle())
        {
            let pod = echo_server(NS, &format!("echo-{version}"), node, account)
                .label("app", "echo")
                .label("version", version);
            world.pods.push(cluster.create_pod(&pod)?);
        }
        let enrolled: Vec<(&PodInfo, &str)> = world.pods.iter().zip(["echo-a", "echo-b"]).collect();
        probe::until_in_mesh(cluster, &f.trust_domain, &enrolled, CHANGE_TIMEOUT)?;
        for (i, service) in ["echo-a", "echo-b", "echo"].into_iter().enumerate() {
            let vip = eventually(
                &format!("Service {NS}/{service}'s cluster IP"),
                CHANGE_TIMEOUT,
                || {
                    Ok(super::fixture::service_vip(cluster, NS, service)?
                        .ok_or("no VIP yet".to_string()))
                },
            )?;
            world.urls[i] = format!("http://{vip}:{ECHO_HTTP}/");
        }
        // No rule yet: x-to: b to echo-a goes straight to echo-v1.
        world
            .until(&f.client, 0, "GET", TO_B, Outcome::Direct)
            .map_err(|e| failed("echo-a before any rule", e.to_string()))?;
        Ok(world)
    }

    /// One request from `from` to the Service `urls[service]`.
    fn send(
        &self,
        from: &PodInfo,
        service: usize,
        method: &str,
        header: &str,
    ) -> Result<HttpReport, ProbeError> {
        let args: Vec<String> = [
            "http",
            &self.urls[service],
            "--method",
            method,
            "--timeout",
            &format!("{}ms", REQUEST_TIMEOUT.as_millis()),
            "--header",
            header,
        ]
        .into_iter()
        .map(str::to_string)
        .collect();
        probe::client(self.cluster, from, &args, REQUEST_TIMEOUT * 3)
    }

    /// Waits until a request answers as `want`.
    fn until(
        &self,
        from: &PodInfo,
        service: usize,
        method: &str,
        header: &str,
        want: Outcome,
    ) -> Result<(), ProbeError> {
        eventually(
            &format!(
                "{method} {} with {header:?} to be {want:?}",
                self.urls[service]
            ),
            WAYPOINT_TIMEOUT,
            || {
                let report = self.send(from, service, method, header)?;
                let got = Outcome::of(&report);
                Ok(if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}: {}", describe(&report)))
                })
            },
        )
    }

    /// Sends [`REPEAT`] requests; each must be `want`.
    fn every(
        &self,
        from: &PodInfo,
        service: usize,
        method: &str,
        header: &str,
        want: Outcome,
    ) -> Result<(), ProbeError> {
        for i in 0..REPEAT {
            let report = self.send(from, service, method, header)?;
            if Outcome::of(&report) != want {
                return Err(failed(
                    &format!("{method} {} with {header:?}", self.urls[service]),
                    format!(
                        "request {} of {REPEAT}: {}; expected {want:?}",
                        i + 1,
                        describe(&report)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What one request to echo-a (or echo) with `x-to: b` met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Answered by echo-v1: no rule in the way.
    Direct,
    /// Answered by echo-v2: routed by the HTTPRoute, in a waypoint.
    Routed,
    /// Refused or failed: the rule stands in at L4 (fail closed).
    Refused,
    /// Answered with this status by the waypoint (e.g. 403).
    Status(u16),
}

impl Outcome {
    fn of(r: &HttpReport) -> Outcome {
        match (r.status, r.echo.as_ref().map(|e| e.pod.as_str())) {
            (Some(200), Some("echo-v1")) => Outcome::Direct,
            (Some(200), Some("echo-v2")) => Outcome::Routed,
            (Some(status), _) => Outcome::Status(status),
            (None, _) => Outcome::Refused,
        }
    }
}

/// Requests sent one after another from another thread until stopped, each
/// outcome with the time it was seen.
struct Poller {
    outcomes: Vec<(Instant, Outcome)>,
}

impl Poller {
    /// Runs `during` while polling `service` with `x-to: b` from `from`;
    /// stops the polling `linger` after `during` returns.
    fn during<T>(
        world: &World<'_>,
        from: &PodInfo,
        service: usize,
        linger: Duration,
        during: impl FnOnce() -> Result<T, ProbeError>,
    ) -> (Poller, Result<T, ProbeError>) {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let polling = s.spawn(|| {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = match world.send(from, service, "GET", TO_B) {
                        Ok(report) => Outcome::of(&report),
                        Err(_) => Outcome::Refused,
                    };
                    outcomes.push((Instant::now(), outcome));
                }
                outcomes
            });
            let result = during();
            std::thread::sleep(linger);
            stop.store(true, Ordering::Relaxed);
            let outcomes = polling.join().unwrap_or_default();
            (Poller { outcomes }, result)
        })
    }

    /// The first outcome other than `Direct` after `start`, and the first
    /// `Routed` one, as durations since `start`.
    fn first(&self, start: Instant, want: impl Fn(Outcome) -> bool) -> Option<Duration> {
        self.outcomes
            .iter()
            .find(|(t, o)| *t >= start && want(*o))
            .map(|(t, _)| *t - start)
    }

    fn count(&self, want: Outcome) -> usize {
        self.outcomes.iter().filter(|(_, o)| *o == want).count()
    }

    fn summary(&self) -> String {
        format!(
            "{} requests: {} direct, {} refused, {} routed, {} other",
            self.outcomes.len(),
            self.count(Outcome::Direct),
            self.count(Outcome::Refused),
            self.count(Outcome::Routed),
            self.outcomes
                .iter()
                .filter(|(_, o)| matches!(o, Outcome::Status(_)))
                .count()
        )
    }
}

/// Waits until the on-demand waypoints of [`NS`] are exactly `want`
/// (`name` -> needed-by), and the pod of each is Ready.
fn until_on_demand(cluster: &dyn Cluster, want: &[(&str, &str)]) -> Result<(), ProbeError> {
    let want: Vec<OnDemand> = want
        .iter()
        .map(|(name, needed_by)| OnDemand {
            name: name.to_string(),
            needed_by: needed_by.to_string(),
        })
        .collect();
    eventually(
        &format!("the on-demand waypoints of {NS} to be {want:?}, each with a Ready pod"),
        WAYPOINT_TIMEOUT,
        || {
            let got = cluster.on_demand_waypoints(NS)?;
            if got != want {
                return Ok(Err(format!("{got:?}")));
            }
            for w in &got {
                let pod = format!("{}-0", w.name);
                if cluster.pod(NS, &pod).is_none() {
                    return Ok(Err(format!("no pod {pod} yet")));
                }
                let ready = cluster.probe_readiness(NS, &pod)?;
                if !ready.passed {
                    return Ok(Err(format!("{pod} not ready: {ready:?}")));
                }
            }
            Ok(Ok(()))
        },
    )
}

/// Waits until [`NS`] has no on-demand waypoint and none of their pods.
fn until_no_on_demand(cluster: &dyn Cluster, names: &[&str]) -> Result<(), ProbeError> {
    eventually(
        &format!("the on-demand waypoints {names:?} and their pods to be gone"),
        WAYPOINT_TIMEOUT,
        || {
            let left = cluster.on_demand_waypoints(NS)?;
            if !left.is_empty() {
                return Ok(Err(format!("still there: {left:?}")));
            }
            if let Some(name) = names
                .iter()
                .find(|n| cluster.pod(NS, &format!("{n}-0")).is_some())
            {
                return Ok(Err(format!("pod {name}-0 still runs")));
            }
            Ok(Ok(()))
        },
    )
}

/// Requests a waypoint counted (`reporter="waypoint"`).
fn waypoint_requests(cluster: &dyn Cluster, waypoint: &str) -> Result<f64, ProbeError> {
    let proxy = ProxyRef::Pod {
        namespace: NS.to_string(),
        name: format!("{waypoint}-0"),
    };
    let samples = probe::metrics(cluster, &proxy)?;
    Ok(crate::prometheus::sum(
        &samples,
        "istio_requests_total",
        &[("reporter", "waypoint")],
    ))
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or("never".to_string(), |d| format!("{:.2}s", d.as_secs_f64()))
}

/// An HTTPRoute on echo-a (one ServiceAccount) makes `echo-a-waypoint`
/// appear; requests are refused from the moment the route is enforced
/// until the waypoint serves it, then routed by it, and never answered as
/// if the route were not there once it is enforced. Deleting the route
/// brings the direct path back and removes the waypoint. Measures rule
/// applied -> enforced and -> traffic through the new waypoint.
pub fn route_makes_a_waypoint_and_goes_with_it(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let world = World::create(cluster, f)?;
    let route_name = "echo-a-by-header";
    let mut route = None;
    let start = Instant::now();
    let (poller, waited) = Poller::during(&world, &f.client, 0, Duration::ZERO, || {
        route = Some(Applied::new(cluster, &route_yaml(route_name, "echo-a"))?);
        eventually(
            "x-to: b to echo-a to be routed to echo-v2",
            WAYPOINT_TIMEOUT,
            || {
                let report = world.send(&f.client, 0, "GET", TO_B)?;
                Ok(match Outcome::of(&report) {
                    Outcome::Routed => Ok(()),
                    other => Err(format!("{other:?}")),
                })
            },
        )
    });
    waited?;
    let enforced = poller.first(start, |o| o != Outcome::Direct);
    let through = poller.first(start, |o| o == Outcome::Routed);
    // Once enforced, never answered as if the route were not there.
    let enforced_at = enforced.map(|d| start + d);
    if let Some(at) = enforced_at
        && let Some((t, _)) = poller
            .outcomes
            .iter()
            .find(|(t, o)| *t > at && *o == Outcome::Direct)
    {
        return Err(failed(
            "echo-a with the route",
            format!(
                "answered by echo-v1 (the route not applied) {:.2}s after it was first enforced ({})",
                (*t - at).as_secs_f64(),
                poller.summary()
            ),
        ));
    }
    let needed_by = format!("HTTPRoute {NS}/{route_name}");
    until_on_demand(cluster, &[("echo-a-waypoint", &needed_by)])?;
    world.every(&f.client, 0, "GET", TO_B, Outcome::Routed)?;
    world.every(&f.client, 0, "GET", "x-to: a", Outcome::Direct)?;
    let counted = waypoint_requests(cluster, "echo-a-waypoint")?;
    if counted < 1.0 {
        return Err(failed(
            "waypoint od/echo-a-waypoint",
            "counted no request".to_string(),
        ));
    }

    // Gone with the route.
    let removed = Instant::now();
    route.take().map(Applied::remove).transpose()?;
    world.until(&f.client, 0, "GET", TO_B, Outcome::Direct)?;
    let direct = removed.elapsed();
    until_no_on_demand(cluster, &["echo-a-waypoint"])?;
    let gone = removed.elapsed();
    Ok(format!(
        "HTTPRoute {NS}/{route_name} on Service echo-a (ServiceAccount echo-a) applied: enforced (first request not answered directly) after {}, \
         first request routed through the new waypoint {NS}/echo-a-waypoint after {} ({}; none answered directly once enforced); \
         Gateway needed by {needed_by:?}, its waypoint counted {counted} request(s); route deleted: direct again after {:.2}s, \
         Gateway and waypoint pod gone after {:.2}s",
        seconds(enforced),
        seconds(through),
        poller.summary(),
        direct.as_secs_f64(),
        gone.as_secs_f64(),
    ))
}

/// Service echo has pods of two ServiceAccounts: an HTTPRoute on it gets
/// one waypoint of its own (`waypoint-svc-echo`, no per-account waypoint
/// could serve it), while an AuthorizationPolicy on echo-a (one account)
/// gets that account's (`echo-a-waypoint`); each enforces its rule.
pub fn two_accounts_behind_one_service(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let world = World::create(cluster, f)?;
    let policy = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-a-no-delete, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: echo-a}}]
  action: DENY
  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]
"
    );
    let rules = Applied::new(
        cluster,
        &[route_yaml("echo-by-header", "echo"), policy].join("---\n"),
    )?;
    let route_by = format!("HTTPRoute {NS}/echo-by-header");
    let policy_by = format!("AuthorizationPolicy {NS}/echo-a-no-delete");
    until_on_demand(
        cluster,
        &[
            ("echo-a-waypoint", &policy_by),
            ("waypoint-svc-echo", &route_by),
        ],
    )?;
    world.until(&f.client, 2, "GET", TO_B, Outcome::Routed)?;
    let before = waypoint_requests(cluster, "waypoint-svc-echo")?;
    world.every(&f.client, 2, "GET", TO_B, Outcome::Routed)?;
    let after = eventually(
        "waypoint od/waypoint-svc-echo to count the requests",
        CHANGE_TIMEOUT,
        || {
            let now = waypoint_requests(cluster, "waypoint-svc-echo")?;
            Ok(if now >= before + REPEAT as f64 {
                Ok(now)
            } else {
                Err(format!("{now} (before: {before})"))
            })
        },
    )?;
    world.until(&f.client, 0, "DELETE", "x-to: a", Outcome::Status(403))?;
    world.every(&f.client, 0, "DELETE", "x-to: a", Outcome::Status(403))?;
    world.every(&f.client, 0, "GET", "x-to: a", Outcome::Direct)?;
    rules.remove()?;
    until_no_on_demand(cluster, &["echo-a-waypoint", "waypoint-svc-echo"])?;
    Ok(format!(
        "Service echo (ServiceAccounts echo-a, echo-b): waypoint {NS}/waypoint-svc-echo created for {route_by}, \
         x-to: b routed to echo-v2 {REPEAT}/{REPEAT}, {} request(s) counted by that waypoint; \
         Service echo-a (echo-a only): waypoint {NS}/echo-a-waypoint created for {policy_by}, DELETE 403 {REPEAT}/{REPEAT}, GET 200 from echo-v1; \
         both gone with their rules",
        after - before
    ))
}

/// In a namespace labelled `istio.io/auto-waypoint: disabled`, an L7 rule
/// gets no waypoint: connections to its Service are refused (fail closed)
/// and its status says why; removing it lets them through again.
pub fn opt_out_fails_closed_with_the_reason(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let world = World::create(cluster, f)?;
    let opted_out = namespace_yaml(NS, true).replace(
        "\n  labels:\n",
        "\n  labels:\n    istio.io/auto-waypoint: disabled\n",
    );
    if !opted_out.contains("auto-waypoint") {
        return Err(failed(
            "the namespace YAML",
            format!("has no labels to add to: {opted_out}"),
        ));
    }
    cluster.apply_yaml(&opted_out)?;
    let name = "echo-a-get-only";
    let policy = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: echo-a}}]
  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]
"
    );
    let applied = Applied::new(cluster, &policy)?;
    world.until(&f.client, 0, "GET", TO_B, Outcome::Refused)?;
    world.every(&f.client, 0, "GET", TO_B, Outcome::Refused)?;
    let condition = eventually(
        &format!("AuthorizationPolicy {NS}/{name}'s WaypointAccepted condition to say why"),
        CHANGE_TIMEOUT,
        || {
            let status = cluster.object_status("AuthorizationPolicy", NS, name)?;
            let condition = status
                .as_ref()
                .and_then(|s| s["conditions"].as_array())
                .and_then(|c| c.iter().find(|c| c["type"] == "WaypointAccepted"))
                .cloned();
            Ok(match condition {
                Some(c)
                    if c["status"] == "False"
                        && c["reason"] == "AncestorNotBound"
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("istio.io/auto-waypoint: disabled")) =>
                {
                    Ok(c)
                }
                other => Err(format!("{status:?} ({other:?})")),
            })
        },
    )?;
    let created = cluster.on_demand_waypoints(NS)?;
    if !created.is_empty() {
        return Err(failed(
            &format!("namespace {NS} (auto-waypoint disabled)"),
            format!("waypoints were created on demand: {created:?}"),
        ));
    }
    applied.remove()?;
    world.until(&f.client, 0, "GET", TO_B, Outcome::Direct)?;
    Ok(format!(
        "namespace {NS} labelled istio.io/auto-waypoint: disabled: AuthorizationPolicy {NS}/{name} on Service echo-a got no waypoint, \
         {REPEAT}/{REPEAT} requests refused; status WaypointAccepted {} {}: {}; removed: answered directly again",
        condition["status"].as_str().unwrap_or_default(),
        condition["reason"].as_str().unwrap_or_default(),
        condition["message"].as_str().unwrap_or_default(),
    ))
}

/// The route on echo-a is served by its on-demand waypoint; the user then
/// creates a waypoint `mine` and binds echo-a to it. While requests flow
/// without pause, `mine` takes over once it is ready, the on-demand one is
/// drained and removed, and no request is refused.
pub fn user_waypoint_replaces_it_without_a_refusal(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let world = World::create(cluster, f)?;
    let route_name = "echo-a-by-header";
    let route = Applied::new(cluster, &route_yaml(route_name, "echo-a"))?;
    let needed_by = format!("HTTPRoute {NS}/{route_name}");
    until_on_demand(cluster, &[("echo-a-waypoint", &needed_by)])?;
    world.until(&f.client, 0, "GET", TO_B, Outcome::Routed)?;
    let gateway = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: mine, namespace: {NS}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
    );
    let mut mine = None;
    let start = Instant::now();
    let (poller, switched) = Poller::during(&world, &f.client, 0, Duration::from_secs(3), || {
        mine = Some(Applied::new(cluster, &gateway)?);
        cluster.apply_yaml(&echo_a_yaml(", istio.io/use-waypoint: mine"))?;
        let counted = eventually("waypoint od/mine to serve echo-a", WAYPOINT_TIMEOUT, || {
            if cluster.pod(NS, "mine-0").is_none() {
                return Ok(Err("no pod mine-0 yet".into()));
            }
            let n = waypoint_requests(cluster, "mine")?;
            Ok(if n > 0.0 {
                Ok(n)
            } else {
                Err("no request counted yet".into())
            })
        })?;
        let served = start.elapsed();
        until_no_on_demand(cluster, &["echo-a-waypoint"])?;
        Ok((counted, served, start.elapsed()))
    });
    // Restore echo-a before judging, so a failure leaves no label behind.
    let restored = cluster.apply_yaml(&echo_a_yaml(""));
    let (counted, served, removed) = switched?;
    restored?;
    let refused = poller.count(Outcome::Refused);
    let other = poller
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Status(_)))
        .count();
    if refused > 0 || other > 0 || poller.outcomes.is_empty() {
        return Err(failed(
            "echo-a while waypoint mine replaced the on-demand one",
            poller.summary(),
        ));
    }
    drop(route);
    drop(mine);
    Ok(format!(
        "waypoint {NS}/mine bound to echo-a while requests flowed: it served after {:.2}s (counted {counted}), \
         the on-demand {NS}/echo-a-waypoint was drained and gone after {:.2}s; {} — none refused",
        served.as_secs_f64(),
        removed.as_secs_f64(),
        poller.summary(),
    ))
}
