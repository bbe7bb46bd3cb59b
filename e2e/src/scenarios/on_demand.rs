//! Waypoints on demand (issue 13): an L7 rule on a Service no waypoint
//! serves, or attached by selector or namespace to workloads no waypoint
//! serves, makes istiod-rs create one, and the rule is enforced from the
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
use super::l7::{Caller, ISSUER, Tokens, describe, from_first_client, tear_down};
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
        "on_demand_selector_policy_is_enforced_by_waypoints" => selector_policy_is_enforced_by_waypoints,
        "on_demand_namespace_jwt_is_checked_by_waypoints" => namespace_jwt_is_checked_by_waypoints,
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
        self.send_to(from, &self.urls[service], method, header)
    }

    /// One request from `from` to `url`.
    fn send_to(
        &self,
        from: &PodInfo,
        url: &str,
        method: &str,
        header: &str,
    ) -> Result<HttpReport, ProbeError> {
        let args: Vec<String> = [
            "http",
            url,
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

    /// Waits until a request to the Service `urls[service]` answers as `want`.
    fn until(
        &self,
        from: &PodInfo,
        service: usize,
        method: &str,
        header: &str,
        want: Outcome,
    ) -> Result<(), ProbeError> {
        self.until_at(from, &self.urls[service], method, header, want)
    }

    /// Waits until a request to `url` answers as `want`.
    fn until_at(
        &self,
        from: &PodInfo,
        url: &str,
        method: &str,
        header: &str,
        want: Outcome,
    ) -> Result<(), ProbeError> {
        eventually(
            &format!("{method} {url} with {header:?} to be {want:?}"),
            WAYPOINT_TIMEOUT,
            || {
                let report = self.send_to(from, url, method, header)?;
                let got = Outcome::of(&report);
                Ok(if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}: {}", describe(&report)))
                })
            },
        )
    }

    /// Sends [`REPEAT`] requests to the Service `urls[service]`; each must be `want`.
    fn every(
        &self,
        from: &PodInfo,
        service: usize,
        method: &str,
        header: &str,
        want: Outcome,
    ) -> Result<(), ProbeError> {
        self.every_at(from, &self.urls[service], method, header, want)
    }

    /// Sends [`REPEAT`] requests to `url`; each must be `want`.
    fn every_at(
        &self,
        from: &PodInfo,
        url: &str,
        method: &str,
        header: &str,
        want: Outcome,
    ) -> Result<(), ProbeError> {
        for i in 0..REPEAT {
            let report = self.send_to(from, url, method, header)?;
            if Outcome::of(&report) != want {
                return Err(failed(
                    &format!("{method} {url} with {header:?}"),
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
    /// Runs `during` while polling `service` with `GET` and `x-to: b` from
    /// `from`; stops the polling `linger` after `during` returns.
    fn during<T>(
        world: &World<'_>,
        from: &PodInfo,
        service: usize,
        linger: Duration,
        during: impl FnOnce() -> Result<T, ProbeError>,
    ) -> (Poller, Result<T, ProbeError>) {
        Poller::sending(world, from, service, "GET", TO_B, linger, during)
    }

    /// [`Poller::during`] with this method and header.
    fn sending<T>(
        world: &World<'_>,
        from: &PodInfo,
        service: usize,
        method: &str,
        header: &str,
        linger: Duration,
        during: impl FnOnce() -> Result<T, ProbeError>,
    ) -> (Poller, Result<T, ProbeError>) {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let polling = s.spawn(|| {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = match world.send(from, service, method, header) {
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

    /// Fails if a request was answered directly (as if the rule were not
    /// there) after the rule was first `enforced` (a duration since `start`).
    fn never_direct_after(
        &self,
        start: Instant,
        enforced: Option<Duration>,
        what: &str,
    ) -> Result<(), ProbeError> {
        let Some(at) = enforced.map(|d| start + d) else {
            return Ok(());
        };
        match self
            .outcomes
            .iter()
            .find(|(t, o)| *t > at && *o == Outcome::Direct)
        {
            Some((t, _)) => Err(failed(
                what,
                format!(
                    "answered by echo-v1 (the rule not applied) {:.2}s after it was first enforced ({})",
                    (*t - at).as_secs_f64(),
                    self.summary()
                ),
            )),
            None => Ok(()),
        }
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

/// What one request sent again and again to echo-a is, while a rule goes in.
struct Probe<'p> {
    method: &'p str,
    header: &'p str,
    /// The outcome once a waypoint serves the rule.
    served: Outcome,
}

/// A rule applied while [`Probe`] requests to echo-a flow: when it was
/// first enforced (a request not answered directly) and first served by a
/// waypoint, and every outcome.
struct Timed<'a> {
    applied: Applied<'a>,
    poller: Poller,
    enforced: Option<Duration>,
    served: Option<Duration>,
}

impl<'a> Timed<'a> {
    /// Applies `yaml` while polling echo-a with `probe` until a request is
    /// served by a waypoint; fails if one is answered directly after the
    /// rule was first enforced.
    fn apply(
        world: &World<'a>,
        f: &Caller,
        yaml: &str,
        probe: &Probe<'_>,
    ) -> Result<Timed<'a>, ProbeError> {
        let mut applied = None;
        let start = Instant::now();
        let (poller, waited) = Poller::sending(
            world,
            &f.client,
            0,
            probe.method,
            probe.header,
            Duration::ZERO,
            || {
                applied = Some(Applied::new(world.cluster, yaml)?);
                world.until(&f.client, 0, probe.method, probe.header, probe.served)
            },
        );
        waited?;
        let applied = applied.ok_or_else(|| failed("the rule", "was not applied"))?;
        let enforced = poller.first(start, |o| o != Outcome::Direct);
        let served = poller.first(start, |o| o == probe.served);
        poller.never_direct_after(start, enforced, "echo-a with the rule")?;
        Ok(Timed {
            applied,
            poller,
            enforced,
            served,
        })
    }

    /// Removes the rule: how long until echo-a answers `probe` directly
    /// again, and until the on-demand `waypoints` and their pods are gone.
    fn remove(
        self,
        world: &World<'_>,
        f: &Caller,
        probe: &Probe<'_>,
        waypoints: &[&str],
    ) -> Result<(Duration, Duration), ProbeError> {
        let removed = Instant::now();
        self.applied.remove()?;
        world.until(&f.client, 0, probe.method, probe.header, Outcome::Direct)?;
        let direct = removed.elapsed();
        until_no_on_demand(world.cluster, waypoints)?;
        Ok((direct, removed.elapsed()))
    }

    /// `enforced after X, served after Y (poller summary)`.
    fn times(&self) -> String {
        format!(
            "enforced (first request not answered directly) after {}, served by the new waypoint after {} ({}; none answered directly once enforced)",
            seconds(self.enforced),
            seconds(self.served),
            self.poller.summary()
        )
    }
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
    let probe = Probe {
        method: "GET",
        header: TO_B,
        served: Outcome::Routed,
    };
    let timed = Timed::apply(&world, f, &route_yaml(route_name, "echo-a"), &probe)?;
    let needed_by = format!("HTTPRoute {NS}/{route_name}");
    until_on_demand(cluster, &[("echo-a-waypoint", &needed_by)])?;
    world.every(&f.client, 0, "GET", TO_B, Outcome::Routed)?;
    world.every(&f.client, 0, "GET", "x-to: a", Outcome::Direct)?;
    let counted = counted_by(cluster, "echo-a-waypoint")?;
    let times = timed.times();
    let (direct, gone) = timed.remove(&world, f, &probe, &["echo-a-waypoint"])?;
    Ok(format!(
        "HTTPRoute {NS}/{route_name} on Service echo-a (ServiceAccount echo-a) applied: {times}; \
         Gateway {NS}/echo-a-waypoint needed by {needed_by:?}, its waypoint counted {counted} request(s); route deleted: direct again after {:.2}s, \
         Gateway and waypoint pod gone after {:.2}s",
        direct.as_secs_f64(),
        gone.as_secs_f64(),
    ))
}

/// The requests waypoint `name` counted; fails when none.
fn counted_by(cluster: &dyn Cluster, name: &str) -> Result<f64, ProbeError> {
    let counted = waypoint_requests(cluster, name)?;
    if counted < 1.0 {
        return Err(failed(
            &format!("waypoint {NS}/{name}"),
            "counted no request".to_string(),
        ));
    }
    Ok(counted)
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

/// An AuthorizationPolicy attached by selector (`version: v1`: pod echo-v1,
/// ServiceAccount echo-a) that allows only GET. Only a waypoint sees the
/// method, so istiod-rs creates echo-a's waypoint (pod echo-v1 and Service
/// echo-a, all of echo-a) and one for Service echo (two accounts behind it,
/// one of its endpoints selected). DELETE to echo-a is refused at L4 from
/// the moment the policy is enforced, then answered 403 by the waypoint;
/// GET flows through it; so for the pod's own address; Service echo's
/// waypoint applies it to all of echo (stricter than written for echo-v2);
/// echo-b, not selected, is untouched. Deleting the policy removes both
/// waypoints. Measures policy applied -> enforced and -> served by the
/// waypoint.
pub fn selector_policy_is_enforced_by_waypoints(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let world = World::create(cluster, f)?;
    let name = "echo-v1-get-only";
    let policy = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{version: v1}}}}
  action: ALLOW
  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]
"
    );
    let to_a = "x-to: a";
    let probe = Probe {
        method: "DELETE",
        header: to_a,
        served: Outcome::Status(403),
    };
    world.until(&f.client, 0, "DELETE", to_a, Outcome::Direct)?;
    let timed = Timed::apply(&world, f, &policy, &probe)?;
    let needed_by = format!("AuthorizationPolicy {NS}/{name}");
    until_on_demand(
        cluster,
        &[
            ("echo-a-waypoint", &needed_by),
            ("waypoint-svc-echo", &needed_by),
        ],
    )?;
    world.every(&f.client, 0, "DELETE", to_a, Outcome::Status(403))?;
    world.every(&f.client, 0, "GET", to_a, Outcome::Direct)?;
    let pod_url = format!("http://{}:{ECHO_HTTP}/", world.pods[0].ip);
    world.every_at(&f.client, &pod_url, "DELETE", to_a, Outcome::Status(403))?;
    world.every_at(&f.client, &pod_url, "GET", to_a, Outcome::Direct)?;
    // Service echo's own waypoint (waypoint-svc-echo) may become ready after
    // echo-a's: until then echo's requests are refused at L4 (fail closed).
    world.until(&f.client, 2, "DELETE", to_a, Outcome::Status(403))?;
    world.every(&f.client, 2, "DELETE", to_a, Outcome::Status(403))?;
    // echo-b is not selected: answered by echo-v2 (`Routed` names that pod).
    world.every(&f.client, 1, "DELETE", to_a, Outcome::Routed)?;
    let counted = counted_by(cluster, "echo-a-waypoint")?;
    let times = timed.times();
    let (direct, gone) =
        timed.remove(&world, f, &probe, &["echo-a-waypoint", "waypoint-svc-echo"])?;
    Ok(format!(
        "AuthorizationPolicy {NS}/{name} (selector version=v1, ALLOW GET) applied, DELETE to echo-a: {times}; \
         waypoints echo-a-waypoint and waypoint-svc-echo needed by it; {REPEAT}/{REPEAT} each: DELETE 403 and GET 200 to echo-a and to echo-v1's address, \
         DELETE 403 to echo, DELETE 200 to echo-b (not selected); echo-a-waypoint counted {counted} request(s); \
         policy deleted: direct again after {:.2}s, Gateways and waypoint pods gone after {:.2}s",
        direct.as_secs_f64(),
        gone.as_secs_f64(),
    ))
}

/// A RequestAuthentication for the whole namespace (no selector): every
/// account's workloads need a waypoint to check tokens, so istiod-rs
/// creates echo-a's, echo-b's and one for Service echo. A request with a
/// token signed by another key is refused at L4 until they are ready, then
/// answered 401 by them; valid tokens and requests without a token reach
/// the pods. Deleting it removes the three waypoints.
pub fn namespace_jwt_is_checked_by_waypoints(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let world = World::create(cluster, f)?;
    let tokens = Tokens::new("od-1")?;
    let valid = format!("authorization: Bearer {}", tokens.valid);
    let invalid = format!("authorization: Bearer {}", tokens.invalid);
    let name = "od-jwt";
    let ra = format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: {name}, namespace: {NS}}}
spec:
  jwtRules:
  - issuer: \"{ISSUER}\"
    jwks: '{jwks}'
",
        jwks = tokens.issuer.jwks()
    );
    let probe = Probe {
        method: "GET",
        header: &invalid,
        served: Outcome::Status(401),
    };
    world.until(&f.client, 0, "GET", &invalid, Outcome::Direct)?;
    let timed = Timed::apply(&world, f, &ra, &probe)?;
    let needed_by = format!("RequestAuthentication {NS}/{name}");
    let waypoints = ["echo-a-waypoint", "echo-b-waypoint", "waypoint-svc-echo"];
    let want: Vec<(&str, &str)> = waypoints.iter().map(|w| (*w, needed_by.as_str())).collect();
    until_on_demand(cluster, &want)?;
    for (service, answered_by) in [(0, Outcome::Direct), (1, Outcome::Routed)] {
        world.until(&f.client, service, "GET", &invalid, Outcome::Status(401))?;
        world.every(&f.client, service, "GET", &invalid, Outcome::Status(401))?;
        world.every(&f.client, service, "GET", &valid, answered_by)?;
        world.every(&f.client, service, "GET", "x-to: a", answered_by)?;
    }
    world.until(&f.client, 2, "GET", &invalid, Outcome::Status(401))?;
    world.every(&f.client, 2, "GET", &invalid, Outcome::Status(401))?;
    let times = timed.times();
    let (direct, gone) = timed.remove(&world, f, &probe, &waypoints)?;
    Ok(format!(
        "RequestAuthentication {NS}/{name} (whole namespace, inline Ed25519 JWKS) applied, a bad token to echo-a: {times}; \
         waypoints {waypoints:?} needed by it; {REPEAT}/{REPEAT} each on echo-a and echo-b: bad token 401, valid token 200, no token 200; \
         echo: bad token 401; deleted: direct again after {:.2}s, Gateways and waypoint pods gone after {:.2}s",
        direct.as_secs_f64(),
        gone.as_secs_f64(),
    ))
}
