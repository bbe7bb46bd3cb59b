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
//! ```
//!
//! The mesh client is the [`L4Fixture`]'s `l4/client-0`, talking HTTP/1.1
//! to the Service's VIP on [`ECHO_HTTP`]; its node's ztunnel hands the
//! connection to the waypoint, whose evidence (routing, refusals, its
//! `istio_requests_total{reporter="waypoint"}`) each scenario checks.
//!
//! Local cluster only for now: `cargo xtask e2e` (the real control plane)
//! runs [`super::l4::all`], which does not include these.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{KeyPair, PKCS_ED25519, SigningKey};

use super::Scenario;
use super::fixture::{ECHO_HTTP, L4Fixture, echo_server, namespace_yaml, service_accounts_yaml};
use super::l4::{failed, pod_name};
use super::policies::Applied;
use crate::apps::HttpReport;
use crate::cluster::{Cluster, PodInfo, ProxyRef};
use crate::objects::ObjectKey;
use crate::probe::{self, ProbeError, eventually};

/// The namespace the L7 scenarios build in.
pub const L7_NS: &str = "l7";
/// The waypoint Gateway; its pod is `<name>-0`.
const WAYPOINT: &str = "echo-waypoint";
/// The Service bound to the waypoint.
const SERVICE: &str = "echo";
/// The requests metric waypoint-rs reports, as upstream names it.
const REQUESTS: &str = "istio_requests_total";
/// The body of a request an AuthorizationPolicy refused (upstream's).
const DENIED_BODY: &str = "RBAC: access denied";
/// The issuer of the tokens [`l7_jwt_missing_invalid_valid`] signs.
const ISSUER: &str = "https://issuer.l7.example";

/// How long the waypoint (provisioned, started, Ready) and a change of
/// configuration may take to show in traffic. Generous: CI machines are slow.
const WAYPOINT_TIMEOUT: Duration = Duration::from_secs(120);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one HTTP request may take in the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests sent per checked case, once the configuration is in place.
const REPEAT: usize = 10;

/// The L7 scenarios, in the order they run.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "l7_header_route_to_v1_v2",
            run: header_route,
        },
        Scenario {
            name: "l7_allow_get_deny_delete",
            run: allow_get_deny_delete,
        },
        Scenario {
            name: "l7_jwt_missing_invalid_valid",
            run: jwt_missing_invalid_valid,
        },
    ]
}

/// The waypoint, the echo pods and their Services, removed on drop: pods
/// first, then the Gateway and Services, then the namespace, which cannot
/// go while it has pods: its deletion is tried until the waypoint pod is
/// gone (so the next scenario's waypoint is a pod of its own Gateway).
struct Backends<'a> {
    cluster: &'a dyn Cluster,
    pods: Vec<PodInfo>,
    waypoint: PodInfo,
    /// `http://<echo VIP>:<ECHO_HTTP>`.
    url: String,
    objects: Option<Applied<'a>>,
    /// The namespace and service account.
    namespace: Vec<ObjectKey>,
}

impl Drop for Backends<'_> {
    fn drop(&mut self) {
        for p in &self.pods {
            if let Err(e) = self.cluster.delete_pod(&p.namespace, &p.name) {
                eprintln!("e2e: could not delete {}: {e}", pod_name(p));
            }
        }
        if let Some(Err(e)) = self.objects.take().map(Applied::remove) {
            eprintln!("e2e: could not remove the L7 scenario's objects: {e}");
            return;
        }
        let deleted = eventually(
            &format!("namespace {L7_NS} to be deleted once its waypoint pod is gone"),
            WAYPOINT_TIMEOUT,
            || {
                Ok(self
                    .cluster
                    .delete(&self.namespace)
                    .map_err(|e| e.to_string()))
            },
        );
        if let Err(e) = deleted {
            eprintln!("e2e: {e}");
        }
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
             spec:\n  selector: {{{selector}}}\n  ports: [{{name: http, port: {ECHO_HTTP}, targetPort: http}}]\n"
        )
    };
    [
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {WAYPOINT}, namespace: {L7_NS}}}\n\
             spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        ),
        service(SERVICE, "app: echo", true),
        service("echo-v1", "app: echo, version: v1", false),
        service("echo-v2", "app: echo, version: v2", false),
    ]
    .join("---\n")
}

impl<'a> Backends<'a> {
    /// Creates everything and waits until the echo pods are in the mesh,
    /// the waypoint pod is Ready and the Service has its VIP.
    fn create(cluster: &'a dyn Cluster, f: &L4Fixture) -> Result<Backends<'a>, ProbeError> {
        let nodes = cluster.nodes();
        let namespace = cluster.apply_yaml(&namespace_and_accounts_yaml())?;
        let objects = Applied::new(cluster, &objects_yaml()).inspect_err(|_| {
            let _ = cluster.delete(&namespace);
        })?;
        let mut backends = Backends {
            cluster,
            pods: Vec::new(),
            // Replaced by the waypoint pod once it is Ready.
            waypoint: f.clients[0].clone(),
            url: String::new(),
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
        Ok(backends)
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

fn describe(report: &HttpReport) -> String {
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

fn header_route(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.clients[0];
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
    let _route = Applied::new(cluster, &route)?;
    // Without the route the waypoint balances over both versions, so a
    // lucky answer proves nothing: wait until the waypoint holds the route.
    let routes = backends.until_in_dump("echo-by-version", |l7| {
        l7["routeTables"][format!("{L7_NS}/{SERVICE}.{L7_NS}.svc.cluster.local")].clone()
    })?;
    let routes: Vec<String> = routes
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} -> {}",
                r["origin"], r["action"]["forward"][0]["service"]
            )
        })
        .collect();
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

fn allow_get_deny_delete(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.clients[0];
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
struct Issuer {
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
    fn jwks(&self) -> String {
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

fn jwt_missing_invalid_valid(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let backends = Backends::create(cluster, f)?;
    let client = &f.clients[0];
    let get = backends.get(client);
    let issuer = Issuer::new("l7-1")?;
    // Same kid, another key: a token whose signature does not verify.
    let impostor = Issuer::new("l7-1")?;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| failed("the clock", e))?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"iss": ISSUER, "sub": "alice", "exp": exp});
    let bearer = |token: String| vec![format!("authorization: Bearer {token}")];
    let valid = bearer(issuer.token(&claims)?);
    let invalid = bearer(impostor.token(&claims)?);
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
