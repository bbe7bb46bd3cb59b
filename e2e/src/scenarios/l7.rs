//! The L7 scenarios: HTTP through a provisioned waypoint (waypoint-rs,
//! programmed by istiod-rs from Gateway API and Istio security objects).
//!
//! Each scenario builds its own small world in namespace [`L7_NS`] and
//! removes it when it ends, also when it fails ([`Backends`]):
//!
//! ```text
//! namespace l7 (ambient)   Gateway echo-waypoint (class istio-waypoint) -> pod echo-waypoint-0
//!                          node0: echo-v1 (app=echo, version=v1)
//!                          node1: echo-v2 (app=echo, version=v2)
//!                          Service echo (istio.io/use-waypoint: echo-waypoint) -> both
//!                          Services echo-v1, echo-v2 -> one each
//!                          (each Service: port http 8080, port grpc 7070 appProtocol grpc)
//! ```
//!
//! The mesh client is the [`L4Fixture`]'s `l4/client-0`, talking HTTP/1.1
//! to the Service's VIP on [`ECHO_HTTP`] (gRPC on [`ECHO_GRPC`]); its
//! node's ztunnel hands the connection to the waypoint, whose evidence
//! (routing, refusals, its `istio_requests_total{reporter="waypoint"}`)
//! each scenario checks. Misbehaving backends are asked for by request
//! headers (`x-echo-status`, `-status-on`, `-fail-first`, `-delay-ms`, see
//! [`crate::apps`]); shares are counted with `client tally` and checked
//! within a binomial tolerance stated at each constant.
//!
//! The scenarios: a header route to v1/v2; ALLOW GET / DENY DELETE; JWT
//! missing/invalid/valid; a 90/10 weighted split; VirtualService and HTTPRoute retries
//! each recovering a backend that fails twice; an HTTPRoute timeout answering
//! 504 (`UT`); a VirtualService fault abort at 50% (`FI`); outlier
//! detection ejecting an endpoint that answers 500; the direct path to a
//! pod refused by an L4 ALLOW of the waypoint's identity while the Service
//! answers through the waypoint with the client's principal in its
//! metrics, then an L4 DENY on the pods refusing the waypoint too; a
//! GRPCRoute by method with `grpc_response_status` in the metrics;
//! `x-forwarded-client-cert` forged by the client never reaching the pod,
//! none sent by default and the waypoint's one element once the Gateway
//! opts in.
//!
//! Local cluster only for now: `cargo xtask e2e` (the real control plane)
//! runs [`super::l4::all`], which does not include these.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{KeyPair, PKCS_ED25519, SigningKey};

use super::Scenario;
use super::fixture::{
    ECHO_GRPC, ECHO_HTTP, L4Fixture, echo_server, namespace_yaml, service_accounts_yaml,
};
use super::l4::{failed, pod_name};
use super::policies::{self, Applied};
use crate::apps::{GrpcReport, HttpReport, TallyReport};
use crate::cluster::{Cluster, PodInfo, ProxyRef};
use crate::objects::ObjectKey;
use crate::probe::{self, ProbeError, eventually};

/// The namespace the L7 scenarios build in.
pub const L7_NS: &str = "l7";
/// The waypoint Gateway; its pod is `<name>-0`.
const WAYPOINT: &str = "echo-waypoint";
/// The Service bound to the waypoint.
const SERVICE: &str = "echo";
/// The requests metric waypoint-rs reports (Istio's standard name).
const REQUESTS: &str = "istio_requests_total";
/// The body of a request an AuthorizationPolicy refused (upstream's).
const DENIED_BODY: &str = "RBAC: access denied";
/// The issuer of the tokens [`l7_jwt_missing_invalid_valid`] signs.
pub(super) const ISSUER: &str = "https://issuer.l7.example";

/// How long the waypoint (provisioned, started, Ready) and a change of
/// configuration may take to show in traffic. Generous: CI machines are slow.
const WAYPOINT_TIMEOUT: Duration = Duration::from_secs(120);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one HTTP request may take in the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests sent per checked case, once the configuration is in place.
const REPEAT: usize = 10;
/// How long one `client tally` run may take.
const TALLY_TIMEOUT: Duration = Duration::from_secs(90);

/// Scenarios (`"name" => function,`) each run from the L4 fixture's first
/// client ([`Caller::of`]).
macro_rules! from_first_client {
    ($($name:literal => $run:ident,)*) => {
        vec![$($crate::scenarios::Scenario {
            name: $name,
            run: |c, f| $run(c, &$crate::scenarios::l7::Caller::of(f)),
        }),*]
    };
}
pub(super) use from_first_client;

/// The L7 scenarios, in the order they run; each sends from the L4
/// fixture's first client ([`Caller::of`]).
pub fn all() -> Vec<Scenario> {
    from_first_client! {
        "l7_header_route_to_v1_v2" => header_route,
        "l7_allow_get_deny_delete" => allow_get_deny_delete,
        "l7_jwt_missing_invalid_valid" => jwt_missing_invalid_valid,
        "l7_weighted_90_10" => weighted_90_10,
        "l7_retry_recovers_flaky_backend" => retry_recovers_flaky_backend,
        "l7_timeout_504" => timeout_504,
        "l7_fault_abort_percentage" => fault_abort_percentage,
        "l7_outlier_ejects_failing_endpoint" => outlier_ejects_failing_endpoint,
        "l7_direct_path_refused_and_l4_policy_applies" => direct_path_refused_and_l4_policy_applies,
        "l7_grpc_route_and_status" => grpc_route_and_status,
        "l7_xfcc_only_when_the_gateway_opts_in" => xfcc_only_when_the_gateway_opts_in,
    }
}

/// Who sends a scenario's requests: a pod in the mesh (service account
/// `client`) and the mesh's trust domain. The scenarios need nothing else
/// from their fixture, so the demo runs them with its own client.
#[derive(Clone, Debug)]
pub struct Caller {
    pub trust_domain: String,
    pub client: PodInfo,
}

impl Caller {
    /// The L4 fixture's first client.
    pub fn of(f: &L4Fixture) -> Caller {
        Caller {
            trust_domain: f.trust_domain.clone(),
            client: f.clients[0].clone(),
        }
    }

    /// The SPIFFE id of a service account.
    fn principal(&self, namespace: &str, service_account: &str) -> String {
        probe::principal(&self.trust_domain, namespace, service_account)
    }
}

/// The waypoint, the echo pods and their Services, removed on drop: pods
/// first, then the Gateway and Services, then the namespace, which cannot
/// go while it has pods: its deletion is tried until the waypoint pod is
/// gone (so the next scenario's waypoint is a pod of its own Gateway).
struct Backends<'a> {
    cluster: &'a dyn Cluster,
    pods: Vec<PodInfo>,
    waypoint: PodInfo,
    /// `http://<echo VIP>:<ECHO_HTTP>/`.
    url: String,
    /// The echo Service's cluster IP.
    vip: String,
    objects: Option<Applied<'a>>,
    /// The namespace and service account.
    namespace: Vec<ObjectKey>,
}

impl Drop for Backends<'_> {
    fn drop(&mut self) {
        tear_down(
            self.cluster,
            &self.pods,
            self.objects.take(),
            &self.namespace,
            L7_NS,
        );
    }
}

/// Removes a scenario's world: its pods, then its objects, then its
/// namespace, whose deletion is tried until its waypoint pods are gone
/// (so the next scenario's waypoints are pods of their own Gateways).
/// Failures are printed: this runs on drop.
pub(super) fn tear_down(
    cluster: &dyn Cluster,
    pods: &[PodInfo],
    objects: Option<Applied<'_>>,
    namespace: &[ObjectKey],
    name: &str,
) {
    for p in pods {
        if let Err(e) = cluster.delete_pod(&p.namespace, &p.name) {
            eprintln!("e2e: could not delete {}: {e}", pod_name(p));
        }
    }
    if let Some(Err(e)) = objects.map(Applied::remove) {
        eprintln!("e2e: could not remove the objects of namespace {name}: {e}");
        return;
    }
    let deleted = eventually(
        &format!("namespace {name} to be deleted once its waypoint pods are gone"),
        WAYPOINT_TIMEOUT,
        || Ok(cluster.delete(namespace).map_err(|e| e.to_string())),
    );
    if let Err(e) = deleted {
        eprintln!("e2e: {e}");
    }
}

fn namespace_and_accounts_yaml() -> String {
    [
        namespace_yaml(L7_NS, true),
        service_accounts_yaml(L7_NS, &["echo"]),
    ]
    .join("---\n")
}

fn objects_yaml() -> String {
    let service = |name: &str, selector: &str, waypoint: bool| {
        let label = if waypoint {
            format!(", labels: {{istio.io/use-waypoint: {WAYPOINT}}}")
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {L7_NS}{label}}}\n\
             spec:\n  selector: {{{selector}}}\n  ports:\n  - {{name: http, port: {ECHO_HTTP}, targetPort: http}}\n  \
             - {{name: grpc, port: {ECHO_GRPC}, targetPort: grpc, appProtocol: grpc}}\n"
        )
    };
    [
        gateway_yaml(""),
        service(SERVICE, "app: echo", true),
        service("echo-v1", "app: echo, version: v1", false),
        service("echo-v2", "app: echo, version: v2", false),
    ]
    .join("---\n")
}

/// The waypoint Gateway; `annotations`: `, annotations: {...}` or empty.
fn gateway_yaml(annotations: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {WAYPOINT}, namespace: {L7_NS}{annotations}}}\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
    )
}

impl<'a> Backends<'a> {
    /// Creates everything and waits until the echo pods are in the mesh,
    /// the waypoint pod is Ready and the Service has its VIP.
    fn create(cluster: &'a dyn Cluster, f: &Caller) -> Result<Backends<'a>, ProbeError> {
        let nodes = cluster.nodes();
        let namespace = cluster.apply_yaml(&namespace_and_accounts_yaml())?;
        let objects = Applied::new(cluster, &objects_yaml()).inspect_err(|_| {
            let _ = cluster.delete(&namespace);
        })?;
        let mut backends = Backends {
            cluster,
            pods: Vec::new(),
            // Replaced by the waypoint pod once it is Ready.
            waypoint: f.client.clone(),
            url: String::new(),
            vip: String::new(),
            objects: Some(objects),
            namespace,
        };
        for (version, node) in ["v1", "v2"].iter().zip(nodes.iter().cycle()) {
            let pod = echo_server(L7_NS, &format!("echo-{version}"), node, "echo")
                .label("app", "echo")
                .label("version", version);
            backends.pods.push(cluster.create_pod(&pod)?);
        }
        let enrolled: Vec<(&PodInfo, &str)> = backends.pods.iter().map(|p| (p, "echo")).collect();
        probe::until_in_mesh(cluster, &f.trust_domain, &enrolled, CHANGE_TIMEOUT)?;
        let pod_name = format!("{WAYPOINT}-0");
        backends.waypoint = eventually(
            &format!("the waypoint pod {L7_NS}/{pod_name} to be Ready"),
            WAYPOINT_TIMEOUT,
            || {
                let Some(pod) = cluster.pod(L7_NS, &pod_name) else {
                    return Ok(Err("not running yet".into()));
                };
                let outcome = cluster.probe_readiness(L7_NS, &pod_name)?;
                Ok(if outcome.passed {
                    Ok(pod)
                } else {
                    Err(format!("readiness: {outcome:?}"))
                })
            },
        )?;
        let vip = eventually("the echo Service's cluster IP", CHANGE_TIMEOUT, || {
            Ok(super::fixture::service_vip(cluster, L7_NS, SERVICE)?
                .ok_or("no VIP yet".to_string()))
        })?;
        backends.url = format!("http://{vip}:{ECHO_HTTP}/");
        backends.vip = vip;
        // The first requests of a new waypoint may still meet the mesh's
        // state of the last scenario's (same pod name and address): each
        // scenario starts once a request gets through.
        backends.get(&f.client).until(
            "the echo Service to answer through the new waypoint",
            status(200),
        )?;
        Ok(backends)
    }

    /// The echo pod of a version (`v1`, `v2`).
    fn pod(&self, version: &str) -> &PodInfo {
        let name = format!("echo-{version}");
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("Backends::create makes echo-v1 and echo-v2")
    }

    /// Applies `yaml` (an L7 object named `name`) and waits until the
    /// waypoint's route table for the echo Service holds it; returns the
    /// guard and that table, each route as `origin -> forwards`.
    fn route<'b>(
        &'b self,
        yaml: &str,
        name: &str,
    ) -> Result<(Applied<'b>, Vec<String>), ProbeError> {
        let applied = Applied::new(self.cluster, yaml)?;
        let table = self.until_in_dump(name, |l7| l7["routeTables"][service_key()].clone())?;
        let routes = table
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let forwards: Vec<String> = r["action"]["forward"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let service = b["service"].as_str().unwrap_or_default();
                        format!("{service} weight {}", b["weight"])
                    })
                    .collect();
                let origin = r["origin"].as_str().unwrap_or_default();
                let mut line = format!("{origin} -> [{}]", forwards.join(", "));
                if r["fault"] == true {
                    line.push_str(" with fault");
                }
                if let Some(n) = r["retryAttempts"].as_u64() {
                    line.push_str(&format!(" retry attempts {n}"));
                }
                line
            })
            .collect();
        Ok((applied, routes))
    }

    /// A GET of the Service from `from`.
    fn get<'b>(&'b self, from: &'b PodInfo) -> Request<'b> {
        Request {
            cluster: self.cluster,
            from,
            url: &self.url,
            method: "GET",
            headers: &[],
        }
    }

    fn waypoint_proxy(&self) -> ProxyRef {
        ProxyRef::Pod {
            namespace: self.waypoint.namespace.clone(),
            name: self.waypoint.name.clone(),
        }
    }

    /// Waits until the part of the waypoint's `/config_dump` `l7` section
    /// that `part` picks mentions `name`; returns that part.
    fn until_in_dump(
        &self,
        name: &str,
        part: impl Fn(&serde_json::Value) -> serde_json::Value,
    ) -> Result<serde_json::Value, ProbeError> {
        eventually(
            &format!("the waypoint's /config_dump to hold {name}"),
            CHANGE_TIMEOUT,
            || {
                let dump = self.cluster.config_dump(&self.waypoint_proxy())?;
                let part = part(&dump["l7"]);
                Ok(if part.to_string().contains(name) {
                    Ok(part)
                } else {
                    Err(format!("not yet: {part}"))
                })
            },
        )
    }

    /// Requests the waypoint counted with all of `filter`'s labels
    /// (and `reporter="waypoint"`).
    fn requests(&self, filter: &[(&str, &str)]) -> Result<f64, ProbeError> {
        let samples = probe::metrics(self.cluster, &self.waypoint_proxy())?;
        let mut labels = vec![("reporter", "waypoint")];
        labels.extend_from_slice(filter);
        Ok(crate::prometheus::sum(&samples, REQUESTS, &labels))
    }

    /// Waits until the waypoint has counted at least `at_least` requests
    /// with `filter`'s labels (a scrape right after a request may miss it).
    fn until_requests(&self, filter: &[(&str, &str)], at_least: f64) -> Result<f64, ProbeError> {
        eventually(
            &format!("the waypoint to count {at_least} request(s) {filter:?}"),
            CHANGE_TIMEOUT,
            || {
                let now = self.requests(filter)?;
                Ok(if now >= at_least {
                    Ok(now)
                } else {
                    Err(format!("{now} so far"))
                })
            },
        )
    }
}

/// The waypoint's key of the echo Service (route tables, traffic policies).
fn service_key() -> String {
    format!("{L7_NS}/{SERVICE}.{L7_NS}.svc.cluster.local")
}

/// One kind of HTTP request from a pod, sent with the sample client.
#[derive(Clone, Copy)]
struct Request<'a> {
    cluster: &'a dyn Cluster,
    from: &'a PodInfo,
    url: &'a str,
    method: &'a str,
    headers: &'a [String],
}

impl Request<'_> {
    fn send(&self) -> Result<HttpReport, ProbeError> {
        let mut args = vec![
            "http".to_string(),
            self.url.to_string(),
            "--method".into(),
            self.method.into(),
            "--timeout".into(),
            format!("{}ms", REQUEST_TIMEOUT.as_millis()),
        ];
        for h in self.headers {
            args.extend(["--header".to_string(), h.clone()]);
        }
        probe::client(self.cluster, self.from, &args, REQUEST_TIMEOUT * 3)
    }

    /// Sends it `count` times one after another on one kept-alive
    /// connection (`client tally`); every one must get an answer.
    fn tally(&self, count: u64) -> Result<TallyReport, ProbeError> {
        let mut args = vec![
            "tally".to_string(),
            self.url.to_string(),
            "--count".into(),
            count.to_string(),
            "--method".into(),
            self.method.into(),
            "--timeout".into(),
            format!("{}ms", REQUEST_TIMEOUT.as_millis()),
        ];
        for h in self.headers {
            args.extend(["--header".to_string(), h.clone()]);
        }
        let report: TallyReport = probe::client(self.cluster, self.from, &args, TALLY_TIMEOUT)?;
        if !report.ok {
            return Err(failed(
                &format!(
                    "{} {} x{count} {}",
                    pod_name(self.from),
                    self.method,
                    self.url
                ),
                format!("{:?}; answers {:?}", report.error, report.answers),
            ));
        }
        Ok(report)
    }

    /// Waits until the request answers as `want` says.
    fn until(
        &self,
        what: &str,
        want: impl Fn(&HttpReport) -> bool,
    ) -> Result<HttpReport, ProbeError> {
        eventually(what, CHANGE_TIMEOUT, || {
            let report = self.send()?;
            Ok(if want(&report) {
                Ok(report)
            } else {
                Err(describe(&report))
            })
        })
    }

    /// Sends it [`REPEAT`] times; each must answer as `want` says.
    fn every(
        &self,
        what: &str,
        want: impl Fn(&HttpReport) -> bool,
    ) -> Result<HttpReport, ProbeError> {
        let mut last = None;
        for i in 0..REPEAT {
            let report = self.send()?;
            if !want(&report) {
                return Err(failed(
                    &format!(
                        "{} {} {} {:?}",
                        pod_name(self.from),
                        self.method,
                        self.url,
                        self.headers
                    ),
                    format!(
                        "request {} of {REPEAT}: {}; expected {what}",
                        i + 1,
                        describe(&report)
                    ),
                ));
            }
            last = Some(report);
        }
        Ok(last.expect("REPEAT > 0"))
    }
}

/// One request's outcome in words.
pub(super) fn describe(report: &HttpReport) -> String {
    match (&report.status, &report.echo, &report.error) {
        (_, _, Some(e)) => format!("error: {e}"),
        (Some(s), Some(echo), _) => format!("{s} from {}", echo.pod),
        (Some(s), None, _) => format!("{s} {:?}", report.body),
        (None, _, _) => "no status".into(),
    }
}

fn answered_by(pod: &'static str) -> impl Fn(&HttpReport) -> bool {
    move |r| r.status == Some(200) && r.echo.as_ref().is_some_and(|e| e.pod == pod)
}

fn status(code: u16) -> impl Fn(&HttpReport) -> bool {
    move |r| r.status == Some(code)
}

pub fn header_route(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let get = backends.get(client);
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-by-version, namespace: {L7_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: {SERVICE}, port: {ECHO_HTTP}}}]
  rules:
  - matches: [{{headers: [{{name: x-version, value: v2}}]}}]
    backendRefs: [{{name: echo-v2, port: {ECHO_HTTP}}}]
  - backendRefs: [{{name: echo-v1, port: {ECHO_HTTP}}}]
"
    );
    // Without the route the waypoint balances over both versions, so a
    // lucky answer proves nothing: wait until the waypoint holds the route.
    let (_route, routes) = backends.route(&route, "echo-by-version")?;
    let v2 = ["x-version: v2".to_string()];
    let principal = f.principal(&client.namespace, "client");
    let filter = [("source_principal", principal.as_str())];
    let before = backends.requests(&filter)?;
    Request {
        headers: &v2,
        ..get
    }
    .every("200 from echo-v2", answered_by("echo-v2"))?;
    get.every("200 from echo-v1", answered_by("echo-v1"))?;
    let sent = 2 * REPEAT;
    let after = backends.until_requests(&filter, before + sent as f64)?;
    let to_v2 = backends.requests(&[
        ("source_principal", principal.as_str()),
        ("destination_workload", "echo-v2"),
        ("response_code", "200"),
    ])?;
    Ok(format!(
        "waypoint routes {routes:?}; {} -> {}: {REPEAT}/{REPEAT} with x-version: v2 answered by echo-v2, {REPEAT}/{REPEAT} without answered by echo-v1; \
         waypoint {} counted {} request(s) from {principal} ({to_v2} to echo-v2 with 200 in all)",
        pod_name(client),
        backends.url,
        pod_name(&backends.waypoint),
        after - before,
    ))
}

pub fn allow_get_deny_delete(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let get = backends.get(client);
    let delete = Request {
        method: "DELETE",
        ..get
    };
    delete.until("DELETE to be answered before any policy", status(200))?;
    let policy = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-get-only, namespace: {L7_NS}}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: {SERVICE}}}]
  action: ALLOW
  rules:
  - to:
    - operation: {{methods: [GET]}}
"
    );
    let applied = Applied::new(cluster, &policy)?;
    let refused = |r: &HttpReport| r.status == Some(403) && r.body.trim() == DENIED_BODY;
    delete.until("DELETE to be refused with 403", refused)?;
    let principal = f.principal(&client.namespace, "client");
    let denied_filter = [
        ("source_principal", principal.as_str()),
        ("response_code", "403"),
    ];
    let before = backends.requests(&denied_filter)?;
    let denied = delete.every("403 RBAC: access denied", refused)?;
    let got = get.every("200", status(200))?;
    let after = backends.until_requests(&denied_filter, before + REPEAT as f64)?;
    applied.remove()?;
    delete.until(
        "DELETE to be answered again once the policy is removed",
        status(200),
    )?;
    Ok(format!(
        "ALLOW GET on Service {SERVICE}: {REPEAT}/{REPEAT} GET {}, {REPEAT}/{REPEAT} DELETE {} (waypoint {} counted {} 403s from {principal}); DELETE 200 again once removed",
        describe(&got),
        describe(&denied),
        pod_name(&backends.waypoint),
        after - before,
    ))
}

/// An Ed25519 key that signs JWTs, as an issuer would.
pub(super) struct Issuer {
    kid: &'static str,
    key: KeyPair,
}

impl Issuer {
    fn new(kid: &'static str) -> Result<Issuer, ProbeError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)
            .map_err(|e| failed("an Ed25519 signing key", e))?;
        Ok(Issuer { kid, key })
    }

    /// The JWKS with the public key (RFC 8037 `OKP`).
    pub(super) fn jwks(&self) -> String {
        serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
            "kid": self.kid, "x": B64.encode(self.key.public_key_raw()),
        }]})
        .to_string()
    }

    /// A compact JWS of `claims`.
    fn token(&self, claims: &serde_json::Value) -> Result<String, ProbeError> {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(input.as_bytes())
            .map_err(|e| failed("signing a token", e))?;
        Ok(format!("{input}.{}", B64.encode(signature)))
    }
}

/// An issuer of [`ISSUER`] and two tokens for `alice`, valid for an hour:
/// one it signed, and one signed by another key under the same kid (its
/// signature does not verify).
pub(super) struct Tokens {
    pub issuer: Issuer,
    pub valid: String,
    pub invalid: String,
}

impl Tokens {
    pub(super) fn new(kid: &'static str) -> Result<Tokens, ProbeError> {
        let issuer = Issuer::new(kid)?;
        let impostor = Issuer::new(kid)?;
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| failed("the clock", e))?
            .as_secs()
            + 3600;
        let claims = serde_json::json!({"iss": ISSUER, "sub": "alice", "exp": exp});
        Ok(Tokens {
            valid: issuer.token(&claims)?,
            invalid: impostor.token(&claims)?,
            issuer,
        })
    }
}

pub fn jwt_missing_invalid_valid(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let get = backends.get(client);
    let tokens = Tokens::new("l7-1")?;
    let issuer = &tokens.issuer;
    let bearer = |token: &str| vec![format!("authorization: Bearer {token}")];
    let valid = bearer(&tokens.valid);
    let invalid = bearer(&tokens.invalid);
    let policies = format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: echo-jwt, namespace: {L7_NS}}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: {SERVICE}}}]
  jwtRules:
  - issuer: \"{ISSUER}\"
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-require-jwt, namespace: {L7_NS}}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: {SERVICE}}}]
  action: ALLOW
  rules:
  - from:
    - source: {{requestPrincipals: [\"{ISSUER}/alice\"]}}
",
        jwks = issuer.jwks()
    );
    let _applied = Applied::new(cluster, &policies)?;
    get.until(
        "a request without a token to be refused with 403",
        status(403),
    )?;
    Request {
        headers: &invalid,
        ..get
    }
    .until(
        "a request with a bad token to be refused with 401",
        status(401),
    )?;
    let missing = get.every("403", status(403))?;
    let bad = Request {
        headers: &invalid,
        ..get
    }
    .every("401", status(401))?;
    let good = Request {
        headers: &valid,
        ..get
    }
    .every("200", status(200))?;
    Ok(format!(
        "RequestAuthentication {ISSUER} (inline Ed25519 JWKS) + ALLOW requestPrincipals {ISSUER}/alice: \
         {REPEAT}/{REPEAT} each: no token {}, token signed by another key {}, valid token {}",
        describe(&missing),
        describe(&bad),
        describe(&good),
    ))
}

/// An HTTPRoute on the echo Service (port [`ECHO_HTTP`]) with `rules`
/// (YAML list items, indented by two).
fn http_route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {L7_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: {SERVICE}, port: {ECHO_HTTP}}}]
  rules:
{rules}"
    )
}

/// A VirtualService for the echo Service with one `http` route: `route`
/// (YAML mapping entries, indented by four).
fn virtual_service(name: &str, route: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {L7_NS}}}
spec:
  hosts: [{SERVICE}]
  http:
  - {route}"
    )
}

/// Requests of the weighted split. With p = 0.1 and n = 400 the count to
/// echo-v2 is Binomial(400, 0.1): mean 40, standard deviation 6 (1.5
/// points); [`WEIGHT_TOLERANCE`] of 5 points is 3.3 deviations each side,
/// so a correct split fails about once in a thousand runs, while an
/// unweighted split (50%) or one backend only (0% / 100%) always fails.
pub(super) const SPLIT_REQUESTS: u64 = 400;
pub(super) const WEIGHT_TOLERANCE: f64 = 5.0;

fn weighted_90_10(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let route = http_route(
        "echo-weighted",
        &format!(
            "  - backendRefs:\n    - {{name: echo-v1, port: {ECHO_HTTP}, weight: 90}}\n    \
             - {{name: echo-v2, port: {ECHO_HTTP}, weight: 10}}\n"
        ),
    );
    let (_route, routes) = backends.route(&route, "echo-weighted")?;
    let filter = [
        ("destination_workload", "echo-v2"),
        ("response_code", "200"),
    ];
    let before = backends.requests(&filter)?;
    let tally = backends.get(client).tally(SPLIT_REQUESTS)?;
    let (v1, v2) = (
        tally.from_pod(200, "echo-v1"),
        tally.from_pod(200, "echo-v2"),
    );
    let what = format!("{SPLIT_REQUESTS} GETs of {}: echo-v2", backends.url);
    let share = share_within(
        &what,
        v2,
        (v1, "echo-v1"),
        SPLIT_REQUESTS,
        10.0,
        WEIGHT_TOLERANCE,
        &tally,
    )?;
    let counted = backends.until_requests(&filter, before + v2 as f64)? - before;
    Ok(format!(
        "waypoint routes {routes:?}; {SPLIT_REQUESTS} GETs from {}: echo-v1 {v1}, echo-v2 {v2} ({share:.1}%, \
         within 10% ± {WEIGHT_TOLERANCE} points); waypoint counted {counted} 200s to echo-v2",
        pod_name(client),
    ))
}

/// The share (percent) of `n` answers that `counted` is, checked to be
/// `expected` ± `tolerance` points, when every answer is `counted` or
/// `rest` (the other kind, named for the error).
pub(super) fn share_within(
    what: &str,
    counted: u64,
    (rest, rest_name): (u64, &str),
    n: u64,
    expected: f64,
    tolerance: f64,
    tally: &TallyReport,
) -> Result<f64, ProbeError> {
    if counted + rest != n {
        return Err(failed(
            what,
            format!(
                "answers other than these and {rest_name}: {:?}",
                tally.answers
            ),
        ));
    }
    let share = 100.0 * counted as f64 / n as f64;
    if (share - expected).abs() > tolerance {
        return Err(failed(
            what,
            format!("{counted} of {n} ({share:.1}%), expected {expected}% ± {tolerance} points"),
        ));
    }
    Ok(share)
}

/// A request key no other request of this run has (`x-echo-key`).
fn fresh_key(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{what}-{nanos}")
}

/// Headers making echo answer `status` to the first `first` requests with a fresh key.
fn flaky(status: u16, first: u32, what: &str) -> Vec<String> {
    vec![
        format!("x-echo-status: {status}"),
        format!("x-echo-fail-first: {first}"),
        format!("x-echo-key: {}", fresh_key(what)),
    ]
}

fn retry_recovers_flaky_backend(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let get = backends.get(client);
    // 500, not 503: the waypoint's default policy (upstream's) retries 503
    // only, so without the VirtualService the failure reaches the client.
    let headers = flaky(500, 2, "no-retries");
    let unretried = Request {
        headers: &headers,
        ..get
    }
    .send()?;
    if unretried.status != Some(500) {
        return Err(failed(
            "a request the backend fails once without a retry policy",
            format!("{}; expected its 500", describe(&unretried)),
        ));
    }
    let vs = virtual_service(
        "echo-retry",
        &format!(
            "route: [{{destination: {{host: echo-v1, port: {{number: {ECHO_HTTP}}}}}}}]\n    \
             retries: {{attempts: 3, retryOn: 5xx}}\n"
        ),
    );
    let principal = f.principal(&client.namespace, "client");
    let filter = [
        ("source_principal", principal.as_str()),
        ("destination_workload", "echo-v1"),
        ("response_code", "200"),
    ];
    // REPEAT GETs, each to a backend failing its key twice: 200 on the
    // third attempt. Returns the attempts the backend saw and the 200s the
    // waypoint counted.
    let retried = |leg: &str| -> Result<(Vec<u64>, f64), ProbeError> {
        let before = backends.requests(&filter)?;
        let mut attempts = Vec::new();
        for i in 0..REPEAT {
            let headers = flaky(500, 2, &format!("{leg}-{i}"));
            let report = Request {
                headers: &headers,
                ..get
            }
            .send()?;
            let seen = report.echo.as_ref().and_then(|e| e.key_seen);
            if report.status != Some(200) || seen != Some(3) {
                return Err(failed(
                    &format!(
                        "{leg}: request {} of {REPEAT} to a backend failing twice",
                        i + 1
                    ),
                    format!(
                        "{} (backend saw the key {seen:?} times); expected 200 on the third attempt",
                        describe(&report)
                    ),
                ));
            }
            attempts.push(seen.unwrap_or_default());
        }
        let counted = backends.until_requests(&filter, before + REPEAT as f64)? - before;
        Ok((attempts, counted))
    };
    let (vs, vs_routes) = backends.route(&vs, "echo-retry")?;
    let (vs_attempts, vs_counted) = retried("vs")?;
    vs.remove()?;
    // The same through an HTTPRoute's retry (GEP-1731).
    let route = http_route(
        "echo-retry-route",
        &format!(
            "  - backendRefs: [{{name: echo-v1, port: {ECHO_HTTP}}}]\n    \
             retry: {{codes: [500], attempts: 2, backoff: 10ms}}\n"
        ),
    );
    let (_route, route_routes) = backends.route(&route, "echo-retry-route")?;
    let (route_attempts, route_counted) = retried("httproute")?;
    Ok(format!(
        "without retries: {} (echo answers 500 twice per key); \
         VirtualService retries (waypoint routes {vs_routes:?}): {REPEAT}/{REPEAT} GETs 200 from echo-v1 \
         after {} backend attempts in all ({vs_attempts:?} per request), waypoint counted {vs_counted} 200s from {principal}; \
         HTTPRoute retry codes [500] attempts 2 (waypoint routes {route_routes:?}): {REPEAT}/{REPEAT} GETs 200 \
         after {} attempts ({route_attempts:?}), waypoint counted {route_counted} 200s",
        describe(&unretried),
        vs_attempts.iter().sum::<u64>(),
        route_attempts.iter().sum::<u64>(),
    ))
}

/// Requests past the route's timeout, and how slow the backend answers them.
const TIMED_OUT: usize = 3;
const SLOW_MS: u64 = 3_000;

fn timeout_504(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let get = backends.get(client);
    let route = http_route(
        "echo-timeout",
        &format!(
            "  - backendRefs: [{{name: echo-v1, port: {ECHO_HTTP}}}]\n    timeouts: {{request: 1s}}\n"
        ),
    );
    let (_route, routes) = backends.route(&route, "echo-timeout")?;
    let quick = get.until(
        "a quick request to be answered under the timeout",
        answered_by("echo-v1"),
    )?;
    let filter = [("response_code", "504"), ("response_flags", "UT")];
    let before = backends.requests(&filter)?;
    let slow_header = [format!("x-echo-delay-ms: {SLOW_MS}")];
    let slow = Request {
        headers: &slow_header,
        ..get
    };
    let mut took = Vec::new();
    for i in 0..TIMED_OUT {
        let report = slow.send()?;
        if report.status != Some(504) {
            return Err(failed(
                &format!(
                    "slow request {} of {TIMED_OUT} (backend answers after {SLOW_MS} ms)",
                    i + 1
                ),
                format!(
                    "{}; expected 504 from the 1s route timeout",
                    describe(&report)
                ),
            ));
        }
        took.push(format!(
            "{:.0}ms",
            report.total_us.unwrap_or_default() / 1e3
        ));
    }
    let counted = backends.until_requests(&filter, before + TIMED_OUT as f64)? - before;
    Ok(format!(
        "waypoint routes {routes:?} (timeouts.request 1s); quick GET {}; {TIMED_OUT}/{TIMED_OUT} GETs \
         answered after {SLOW_MS} ms by the backend got 504 (client saw them after {took:?}); \
         waypoint counted {counted} with response_code=504 response_flags=UT",
        describe(&quick),
    ))
}

/// Requests of the fault abort at 50%: Binomial(200, 0.5) aborts, standard
/// deviation 7.1 (3.5 points); [`ABORT_TOLERANCE`] of 12 points is 3.4
/// deviations each side (a correct abort fails under once in a thousand
/// runs), while no abort (0%) or every request aborted (100%) always fails.
const ABORT_REQUESTS: u64 = 200;
const ABORT_TOLERANCE: f64 = 12.0;
/// The abort's status: one neither echo nor the waypoint otherwise answers.
const ABORT_STATUS: u16 = 418;

fn fault_abort_percentage(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let vs = virtual_service(
        "echo-fault",
        &format!(
            "fault: {{abort: {{httpStatus: {ABORT_STATUS}, percentage: {{value: 50}}}}}}\n    \
             route: [{{destination: {{host: {SERVICE}}}}}]\n"
        ),
    );
    let (_vs, routes) = backends.route(&vs, "echo-fault")?;
    let code = ABORT_STATUS.to_string();
    let filter = [("response_code", code.as_str()), ("response_flags", "FI")];
    let before = backends.requests(&filter)?;
    let tally = backends.get(client).tally(ABORT_REQUESTS)?;
    let (aborted, answered) = (tally.with_status(ABORT_STATUS), tally.with_status(200));
    let what = format!("{ABORT_REQUESTS} GETs of {}: {ABORT_STATUS}", backends.url);
    let share = share_within(
        &what,
        aborted,
        (answered, "200"),
        ABORT_REQUESTS,
        50.0,
        ABORT_TOLERANCE,
        &tally,
    )?;
    let counted = backends.until_requests(&filter, before + aborted as f64)? - before;
    Ok(format!(
        "waypoint routes {routes:?} (abort {ABORT_STATUS} at 50%); {ABORT_REQUESTS} GETs from {}: \
         {aborted} {ABORT_STATUS} ({share:.1}%, within 50% ± {ABORT_TOLERANCE} points), {answered} 200 {:?}; \
         waypoint counted {counted} with response_code={ABORT_STATUS} response_flags=FI",
        pod_name(client),
        tally.answers,
    ))
}

/// Requests while echo-v2 fails (before its ejection, about half reach
/// it), and after: without the ejection about half would fail again.
const BEFORE_EJECTION: u64 = 30;
const AFTER_EJECTION: u64 = 40;
/// Consecutive 5xx answers that eject an endpoint.
const CONSECUTIVE_5XX: u64 = 3;

fn outlier_ejects_failing_endpoint(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    // 500, not 503: the default retry policy retries 503 on another
    // endpoint, which would hide the failing one without any ejection.
    let failing = [
        "x-echo-status: 500".to_string(),
        "x-echo-status-on: echo-v2".into(),
    ];
    let get = Request {
        headers: &failing,
        ..backends.get(client)
    };
    let rule = format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo-outlier, namespace: {L7_NS}}}
spec:
  host: {SERVICE}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: {CONSECUTIVE_5XX}, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 50}}
"
    );
    let _rule = Applied::new(cluster, &rule)?;
    let policy = backends.until_in_dump("echo-outlier", |l7| {
        l7["trafficPolicies"][service_key()].clone()
    })?;
    if policy["outlierDetection"] != true {
        return Err(failed(
            "the waypoint's traffic policy for echo",
            format!("no outlier detection: {policy}"),
        ));
    }
    let filter = [
        ("destination_workload", "echo-v2"),
        ("response_code", "500"),
    ];
    let before = backends.requests(&filter)?;
    let first = get.tally(BEFORE_EJECTION)?;
    let failed_first = first.from_pod(500, "echo-v2");
    if failed_first < CONSECUTIVE_5XX {
        return Err(failed(
            &format!("{BEFORE_EJECTION} GETs failing on echo-v2"),
            format!(
                "echo-v2 answered only {failed_first} of them ({:?}): too few to eject it",
                first.answers
            ),
        ));
    }
    let after = get.tally(AFTER_EJECTION)?;
    if after.from_pod(200, "echo-v1") != AFTER_EJECTION {
        return Err(failed(
            &format!("{AFTER_EJECTION} GETs after echo-v2's {CONSECUTIVE_5XX} consecutive 500s"),
            format!(
                "{:?}; expected all 200 from echo-v1 (echo-v2 ejected)",
                after.answers
            ),
        ));
    }
    let counted = backends.until_requests(&filter, before + failed_first as f64)? - before;
    Ok(format!(
        "waypoint traffic policy {policy}; echo-v2 answers 500: first {BEFORE_EJECTION} GETs {:?}, \
         then {AFTER_EJECTION}/{AFTER_EJECTION} 200 from echo-v1 (echo-v2 ejected); waypoint counted {counted} 500s from echo-v2 in all",
        first.answers,
    ))
}

fn direct_path_refused_and_l4_policy_applies(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let via_waypoint = backends.get(client);
    let pod_url = format!("http://{}:{ECHO_HTTP}/", backends.pod("v1").ip);
    let direct = Request {
        url: &pod_url,
        ..via_waypoint
    };
    // Before any policy the pod answers directly: the refusal below is the policy's.
    let direct_before = direct.until(
        "echo-v1 to answer its pod IP directly",
        answered_by("echo-v1"),
    )?;
    let waypoint_principal = f.principal(L7_NS, WAYPOINT);
    let allow = policies::authorization(
        L7_NS,
        "echo-from-waypoint",
        "echo",
        "ALLOW",
        &policies::from_principals(&[policies::policy_principal(&waypoint_principal)]),
    );
    let _allow = Applied::new(cluster, &allow)?;
    let refused = |r: &HttpReport| r.status.is_none() && r.error.is_some();
    direct.until("the direct path to be refused", refused)?;
    let direct_after = direct.every("refused", refused)?;
    let principal = f.principal(&client.namespace, "client");
    let filter = [
        ("source_principal", principal.as_str()),
        ("response_code", "200"),
    ];
    let before = backends.requests(&filter)?;
    let through = via_waypoint.every("200 through the waypoint", status(200))?;
    let counted = backends.until_requests(&filter, before + REPEAT as f64)? - before;

    let deny = policies::authorization(
        L7_NS,
        "echo-deny-http",
        "echo",
        "DENY",
        &policies::to_ports(&[ECHO_HTTP]),
    );
    let _deny = Applied::new(cluster, &deny)?;
    let server_error = |r: &HttpReport| r.status.is_some_and(|s| s >= 500);
    via_waypoint.until(
        "the waypoint's requests to be refused by the echo pods' DENY",
        server_error,
    )?;
    let denied = via_waypoint.every("5xx", server_error)?;
    Ok(format!(
        "direct {} before any policy; with ALLOW from {waypoint_principal} only on app=echo: direct to {pod_url} {REPEAT}/{REPEAT} {}, \
         through {} {REPEAT}/{REPEAT} {} (waypoint counted {counted} with source_principal={principal}); \
         with DENY port {ECHO_HTTP} on app=echo: through the waypoint {REPEAT}/{REPEAT} {}",
        describe(&direct_before),
        describe(&direct_after),
        backends.url,
        describe(&through),
        describe(&denied),
    ))
}

/// One gRPC call of the echo Service, sent with the sample client.
fn grpc_call(
    cluster: &dyn Cluster,
    from: &PodInfo,
    url: &str,
    metadata: &[&str],
) -> Result<GrpcReport, ProbeError> {
    let mut args = vec![
        "grpc".to_string(),
        url.to_string(),
        "--timeout".into(),
        format!("{}ms", REQUEST_TIMEOUT.as_millis()),
    ];
    for m in metadata {
        args.extend(["--metadata".to_string(), m.to_string()]);
    }
    probe::client(cluster, from, &args, REQUEST_TIMEOUT * 3)
}

fn grpc_route_and_status(cluster: &dyn Cluster, f: &Caller) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: echo-grpc, namespace: {L7_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: {SERVICE}, port: {ECHO_GRPC}}}]
  rules:
  - matches: [{{method: {{service: e2e.Echo, method: Echo}}}}]
    backendRefs: [{{name: echo-v2, port: {ECHO_GRPC}}}]
  - backendRefs: [{{name: echo-v1, port: {ECHO_GRPC}}}]
"
    );
    let (_route, routes) = backends.route(&route, "echo-grpc")?;
    let base = format!("http://{}:{ECHO_GRPC}", backends.vip);
    let echo_url = format!("{base}{}", crate::apps::grpc::ECHO_METHOD);
    let other_url = format!("{base}/e2e.Echo/Other");
    let call = |url: &str, metadata: &[&str], want: u32, pod: &str| {
        let report = grpc_call(cluster, client, url, metadata)?;
        if report.grpc_status != Some(want) || report.pod.as_deref() != Some(pod) {
            return Err(failed(
                &format!("gRPC {url} {metadata:?} from {}", pod_name(client)),
                format!(
                    "grpc-status {:?} from {:?} (HTTP {:?}, error {:?}); expected {want} from {pod}",
                    report.grpc_status, report.pod, report.http_status, report.error
                ),
            ));
        }
        Ok(report)
    };
    let ok = (0..REPEAT)
        .map(|_| call(&echo_url, &[], 0, "echo-v2"))
        .collect::<Result<Vec<_>, _>>()?;
    let asked = call(&echo_url, &["x-echo-grpc-status: 5"], 5, "echo-v2")?;
    let unimplemented = call(&other_url, &[], crate::apps::grpc::UNIMPLEMENTED, "echo-v1")?;
    let count = |workload: &str, status: &str, at_least: usize| {
        backends.until_requests(
            &[
                ("destination_workload", workload),
                ("grpc_response_status", status),
            ],
            at_least as f64,
        )
    };
    let (ok_n, asked_n, other_n) = (
        count("echo-v2", "0", REPEAT)?,
        count("echo-v2", "5", 1)?,
        count("echo-v1", "12", 1)?,
    );
    Ok(format!(
        "waypoint routes {routes:?}; {REPEAT}/{REPEAT} {} grpc-status 0 from echo-v2 ({} bytes echoed); \
         with x-echo-grpc-status: 5: grpc-status {:?} from echo-v2; /e2e.Echo/Other: grpc-status {:?} from echo-v1; \
         waypoint istio_requests_total: echo-v2 grpc_response_status=0 {ok_n}, =5 {asked_n}; echo-v1 =12 {other_n}",
        crate::apps::grpc::ECHO_METHOD,
        ok.last().map(|r| r.received_bytes).unwrap_or_default(),
        asked.grpc_status,
        unimplemented.grpc_status,
    ))
}

/// `x-forwarded-client-cert`: a value the client forges never reaches the
/// echo pod. By default the waypoint sends none; once its
/// Gateway is annotated `ambient.istio.io/xfcc-include-client-identity:
/// "true"` it sends exactly one element of its own: `By=` the waypoint's
/// identity, `URI=` the client's.
fn xfcc_only_when_the_gateway_opts_in(
    cluster: &dyn Cluster,
    f: &Caller,
) -> Result<String, ProbeError> {
    const XFCC: &str = "x-forwarded-client-cert";
    let backends = Backends::create(cluster, f)?;
    let client = &f.client;
    let forged = [format!(
        "{XFCC}: By=spiffe://forged;URI={}",
        f.principal("kube-system", "admin")
    )];
    let request = Request {
        headers: &forged,
        ..backends.get(client)
    };
    let seen = |r: &HttpReport| -> Option<Vec<String>> {
        let echo = r.echo.as_ref().filter(|_| r.status == Some(200))?;
        Some(echo.headers.get(XFCC).cloned().unwrap_or_default())
    };
    request.every("200 without x-forwarded-client-cert", |r| {
        seen(r).is_some_and(|v| v.is_empty())
    })?;

    // Opted in: the Gateway (removed with the scenario's objects) annotated.
    cluster.apply_yaml(&gateway_yaml(&format!(
        ", annotations: {{{}: \"true\"}}",
        api::labels::XFCC_INCLUDE_CLIENT_IDENTITY
    )))?;
    backends.until_in_dump("true", |l7| {
        l7["waypoints"][0]["forwardClientIdentity"].clone()
    })?;
    let by = format!("By={};Hash=", f.principal(L7_NS, WAYPOINT));
    let uri = format!(";URI={}", f.principal(&client.namespace, "client"));
    let one_element = |r: &HttpReport| {
        seen(r).is_some_and(|v| {
            v.len() == 1 && v[0].starts_with(&by) && v[0].contains(&uri) && !v[0].contains("forged")
        })
    };
    let report = request.every("200 with the waypoint's one element", one_element)?;
    let element = seen(&report).unwrap_or_default().join(", ");
    Ok(format!(
        "{} -> {} with a forged {XFCC}: {REPEAT}/{REPEAT} reached the pod without one; \
         with the Gateway annotated {}: \"true\", {REPEAT}/{REPEAT} carried only {element:?}",
        pod_name(client),
        backends.url,
        api::labels::XFCC_INCLUDE_CLIENT_IDENTITY,
    ))
}
