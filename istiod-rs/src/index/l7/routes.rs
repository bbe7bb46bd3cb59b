//! HTTPRoute and GRPCRoute with a Service parent (GAMMA) -> one `RouteTable`
//! per Service, key `<svc ns>/<svc hostname>` (the Service's workload API
//! key), routes in match order.
//!
//! Both kinds are read through one view of their JSON (the generated Rust
//! types differ only in their names): parentRefs, rules, matches, filters,
//! backendRefs, timeouts. A parent is a Service (group `""`/`core`) in the
//! route's namespace (consumer routes are not served, see `l7.rs`);
//! `port` / `sectionName` (the port's name) restrict the route to that port.
//! `hostnames` do not apply to Service parents (GEP-1426) and are not read.
//!
//! Each rule becomes one `Route` per match (a rule without matches matches
//! every request), and the table is sorted in Gateway API's precedence order
//! (HTTPRoute spec, as upstream's `sortHTTPRoutes` in
//! pilot/pkg/config/kube/gateway/conversion.go): Exact path, then prefix,
//! then regex; then the longer path; then a method match; then more header
//! matches; then more query parameter matches; then the older route
//! (creationTimestamp), then `namespace/name`, then rule and match order. A
//! GRPCRoute match ranks as the path it stands for: service + method exact
//! as an Exact `/service/method`, service only as a prefix `/service/`,
//! anything else (method only, regular expressions) as a regex.
//!
//! What cannot be served as written is answered, never skipped, as Gateway
//! API asks: a backendRef that does not resolve (missing Service, kind not
//! supported, another namespace: istiod-rs reads no ReferenceGrants, port
//! missing) keeps its weight with `invalid_reason` (500 for its share); a
//! filter kind the waypoint does not implement (CORS, ExtensionRef) makes the
//! rule answer 500; a regular expression that does not compile drops its
//! match. Each is a problem naming the field. HTTPRoute `retry` (GEP-1731)
//! is in Gateway API's experimental channel: istiod-rs reads it when it is
//! there (local mode; on Kubernetes, once the experimental HTTPRoute CRD is
//! installed: the standard one has no such field).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use api::l7::{
    Backend, DirectResponse, Forward, GrpcMethodMatch, Header, HeaderMatch, HeaderModifier, Mirror,
    Origin, PathMatch, PathRewrite, Redirect, RetryPolicy, Route, RouteMatch, RouteTable, Timeouts,
    UrlRewrite, header_match, path_match, path_rewrite, route,
};
use api::manifest::Kind;
use serde::Deserialize;
use serde_json::Value;

use super::super::problem::{Effect, PolicyProblem, PolicyRef};
use super::super::services::Services;
use crate::state::ClusterState;

/// Longest regular expression accepted (bytes of its source).
const MAX_REGEX_LEN: usize = 1024;
/// Retries of an HTTPRoute rule whose `retry` leaves `attempts` unset
/// (GEP-1731: implementation-specific); the same count istiod-rs gives a
/// VirtualService route without `retries`.
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Most retries one rule may ask for; more is a mistake, not a policy.
const MAX_RETRY_ATTEMPTS: i64 = 1000;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct SpecView {
    parent_refs: Vec<ParentView>,
    rules: Vec<RuleView>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ParentView {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
    section_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RuleView {
    matches: Vec<MatchView>,
    filters: Vec<FilterView>,
    backend_refs: Vec<BackendView>,
    timeouts: Option<TimeoutsView>,
    retry: Option<RetryView>,
}

/// HTTPRoute `rules[].retry` (GEP-1731, Gateway API's experimental channel).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RetryView {
    attempts: Option<i64>,
    backoff: Option<String>,
    codes: Option<Vec<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct MatchView {
    path: Option<TypedValue>,
    headers: Vec<NamedMatch>,
    query_params: Vec<NamedMatch>,
    /// HTTPRoute: a string; GRPCRoute: `{type, service, method}`.
    method: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct TypedValue {
    #[serde(rename = "type")]
    type_: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct NamedMatch {
    #[serde(rename = "type")]
    type_: Option<String>,
    name: String,
    value: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct GrpcMethodView {
    #[serde(rename = "type")]
    type_: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct FilterView {
    #[serde(rename = "type")]
    type_: String,
    request_header_modifier: Option<HeaderModView>,
    response_header_modifier: Option<HeaderModView>,
    request_redirect: Option<RedirectView>,
    url_rewrite: Option<RewriteView>,
    request_mirror: Option<MirrorView>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct HeaderModView {
    set: Vec<NameValue>,
    add: Vec<NameValue>,
    remove: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RedirectView {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModView>,
    port: Option<i32>,
    status_code: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct PathModView {
    #[serde(rename = "type")]
    type_: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RewriteView {
    hostname: Option<String>,
    path: Option<PathModView>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct MirrorView {
    backend_ref: BackendView,
    percent: Option<i32>,
    fraction: Option<FractionView>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FractionView {
    numerator: i32,
    denominator: Option<i32>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct BackendView {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
    weight: Option<i32>,
    filters: Vec<FilterView>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct TimeoutsView {
    request: Option<String>,
    backend_request: Option<String>,
}

/// The route tables of one translation.
#[derive(Debug, Default)]
pub(in crate::index) struct RouteTables {
    /// Service key -> its table.
    pub tables: BTreeMap<String, RouteTable>,
    /// Service index -> why it must be refused (a route that could not be
    /// read at all).
    pub deny_all: BTreeMap<usize, Vec<String>>,
}

impl RouteTables {
    pub fn keys(&self) -> BTreeSet<String> {
        self.tables.keys().cloned().collect()
    }
}

/// Precedence of one route (smaller first).
type Rank = (
    u8,
    Reverse<usize>,
    Reverse<bool>,
    Reverse<usize>,
    Reverse<usize>,
    (bool, i128),
    String,
    usize,
    usize,
);

/// Builds every Service's route table.
pub(in crate::index) fn build(
    state: &ClusterState,
    services: &Services<'_>,
    problems: &mut Vec<PolicyProblem>,
) -> RouteTables {
    let mut out = RouteTables::default();
    let mut ranked: BTreeMap<usize, Vec<(Rank, Route)>> = BTreeMap::new();
    macro_rules! read {
        ($objects:ident, $kind:expr) => {
            for (key, r) in &state.$objects {
                let object = PolicyRef {
                    kind: $kind,
                    key: key.clone(),
                };
                let view =
                    serde_json::to_value(&r.spec).and_then(serde_json::from_value::<SpecView>);
                let route = RouteObject {
                    object: &object,
                    kind: $kind,
                    created: r
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.as_nanosecond()),
                };
                match view {
                    Ok(view) => route.translate(services, &view, &mut ranked, problems),
                    Err(e) => {
                        // Not expected for an object the API server accepted:
                        // its parent Services are refused rather than
                        // misrouted.
                        let reason = format!("{} {key}: spec cannot be read: {e}", $kind);
                        let parents = r.spec.parent_refs.iter().flatten().filter(|p| {
                            p.kind.as_deref() == Some("Service")
                                && p.namespace.as_deref().is_none_or(|ns| ns == key.namespace)
                        });
                        for p in parents {
                            if let Some(i) = services.named(&key.namespace, &p.name) {
                                out.deny_all.entry(i).or_default().push(reason.clone());
                            }
                        }
                        problems.push(PolicyProblem::UntranslatableL7 {
                            object: object.clone(),
                            field: "spec".to_string(),
                            reason: format!("cannot be read: {e}"),
                            effect: Effect::L7Stricter {
                                what: "the waypoint refuses its parent Services".to_string(),
                            },
                        });
                    }
                }
            }
        };
    }
    read!(http_routes, Kind::HttpRoute);
    read!(grpc_routes, Kind::GrpcRoute);
    for (i, mut routes) in ranked {
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        let entry = &services.entries[i];
        out.tables.insert(
            entry.key.clone(),
            RouteTable {
                namespace: entry.namespace.to_string(),
                hostname: entry.proto.hostname.clone(),
                routes: routes.into_iter().map(|(_, r)| r).collect(),
            },
        );
    }
    out
}

struct RouteObject<'a> {
    object: &'a PolicyRef,
    kind: Kind,
    created: Option<i128>,
}

impl RouteObject<'_> {
    fn problem(
        &self,
        problems: &mut Vec<PolicyProblem>,
        field: String,
        reason: String,
        what: &str,
    ) {
        let effect = Effect::L7Stricter {
            what: what.to_string(),
        };
        self.report(problems, field, reason, effect);
    }

    fn report(
        &self,
        problems: &mut Vec<PolicyProblem>,
        field: String,
        reason: String,
        effect: Effect,
    ) {
        problems.push(PolicyProblem::UntranslatableL7 {
            object: self.object.clone(),
            field,
            reason,
            effect,
        });
    }

    fn translate(
        &self,
        services: &Services<'_>,
        view: &SpecView,
        ranked: &mut BTreeMap<usize, Vec<(Rank, Route)>>,
        problems: &mut Vec<PolicyProblem>,
    ) {
        let namespace = &self.object.key.namespace;
        let mut parents: Vec<(usize, Vec<u32>)> = Vec::new();
        for p in &view.parent_refs {
            let is_service = p.kind.as_deref() == Some("Service")
                && matches!(p.group.as_deref(), Some("" | "core"));
            let ns = p.namespace.as_deref().unwrap_or(namespace);
            if !is_service || ns != namespace {
                continue;
            }
            let Some(i) = services.named(ns, &p.name) else {
                continue;
            };
            let mut ports = Vec::new();
            if let Some(port) = p.port.and_then(|p| u32::try_from(p).ok()) {
                ports.push(port);
            }
            if let Some(section) = &p.section_name {
                // A port name the Service lacks: the parent does not attach
                // (`l7.rs` reports it as NoMatchingParent).
                match services.entries[i].port_named(section) {
                    Some(port) if ports.is_empty() || ports == [port] => ports = vec![port],
                    _ => continue,
                }
            }
            parents.push((i, ports));
        }
        if parents.is_empty() {
            return;
        }
        let grpc = self.kind == Kind::GrpcRoute;
        for (ri, rule) in view.rules.iter().enumerate() {
            let path = format!("spec.rules[{ri}]");
            let base = self.rule(services, &path, ri, rule, problems);
            let matches: Vec<Option<&MatchView>> = if rule.matches.is_empty() {
                vec![None]
            } else {
                rule.matches.iter().map(Some).collect()
            };
            for (mi, m) in matches.into_iter().enumerate() {
                let (matched, rank) = match m {
                    None => (
                        None,
                        (1, Reverse(1), Reverse(false), Reverse(0), Reverse(0)),
                    ),
                    Some(m) => {
                        let at = format!("{path}.matches[{mi}]");
                        let Some(read) = self.read_match(&at, m, grpc, problems) else {
                            continue;
                        };
                        read
                    }
                };
                for (i, ports) in &parents {
                    let mut route = base.clone();
                    route.ports = ports.clone();
                    route.matches = matched.clone().into_iter().collect();
                    let full: Rank = (
                        rank.0,
                        rank.1,
                        rank.2,
                        rank.3,
                        rank.4,
                        (self.created.is_none(), self.created.unwrap_or_default()),
                        self.object.key.to_string(),
                        ri,
                        mi,
                    );
                    ranked.entry(*i).or_default().push((full, route));
                }
            }
        }
    }

    /// One match and its precedence (class, path length, method, headers,
    /// query parameters); `None` when it cannot match anything.
    #[allow(clippy::type_complexity)]
    fn read_match(
        &self,
        at: &str,
        m: &MatchView,
        grpc: bool,
        problems: &mut Vec<PolicyProblem>,
    ) -> Option<(
        Option<RouteMatch>,
        (
            u8,
            Reverse<usize>,
            Reverse<bool>,
            Reverse<usize>,
            Reverse<usize>,
        ),
    )> {
        let mut out = RouteMatch::default();
        let mut ok = true;
        let mut check = |field: String, re: &str| {
            if let Err(e) = compile(re) {
                self.problem(
                    problems,
                    field,
                    format!("{re:?} is not a valid regular expression: {e}"),
                    "this match matches nothing",
                );
                ok = false;
            }
        };
        let (class, len) = if grpc {
            let view: GrpcMethodView = m
                .method
                .clone()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            let regex = view.type_.as_deref() == Some("RegularExpression");
            let service = view.service.clone().unwrap_or_default();
            let method = view.method.clone().unwrap_or_default();
            if regex {
                for (f, v) in [("service", &service), ("method", &method)] {
                    if !v.is_empty() {
                        check(format!("{at}.method.{f}"), v);
                    }
                }
            }
            let rank = match (regex, service.is_empty(), method.is_empty()) {
                (false, false, false) => (0, service.len() + method.len() + 2),
                (false, false, true) => (1, service.len() + 2),
                (false, true, true) => (1, 1),
                _ => (2, service.len() + method.len()),
            };
            if m.method.is_some() {
                out.grpc = Some(GrpcMethodMatch {
                    service,
                    method,
                    regex,
                });
            }
            rank
        } else {
            if let Some(method) = m.method.as_ref().and_then(Value::as_str) {
                out.method = method.to_string();
            }
            match &m.path {
                None => (1, 1),
                Some(p) => {
                    let value = p.value.clone().unwrap_or_else(|| "/".to_string());
                    let (class, kind) = match p.type_.as_deref().unwrap_or("PathPrefix") {
                        "Exact" => (0, path_match::Kind::Exact(value.clone())),
                        "RegularExpression" => {
                            check(format!("{at}.path.value"), &value);
                            (2, path_match::Kind::Regex(value.clone()))
                        }
                        _ => (1, path_match::Kind::SegmentPrefix(value.clone())),
                    };
                    out.path = Some(PathMatch {
                        kind: Some(kind),
                        ignore_case: false,
                    });
                    (class, value.len())
                }
            }
        };
        for (field, list, target) in [
            ("headers", &m.headers, &mut out.headers),
            ("queryParams", &m.query_params, &mut out.query_params),
        ] {
            for (i, h) in list.iter().enumerate() {
                let kind = if h.type_.as_deref() == Some("RegularExpression") {
                    check(format!("{at}.{field}[{i}].value"), &h.value);
                    header_match::Kind::Regex(h.value.clone())
                } else {
                    header_match::Kind::Exact(h.value.clone())
                };
                let name = if field == "headers" {
                    h.name.to_ascii_lowercase()
                } else {
                    h.name.clone()
                };
                target.push(HeaderMatch {
                    name,
                    kind: Some(kind),
                });
            }
        }
        if !ok {
            return None;
        }
        let rank = (
            class,
            Reverse(len),
            Reverse(!out.method.is_empty()),
            Reverse(out.headers.len()),
            Reverse(out.query_params.len()),
        );
        Some((Some(out), rank))
    }

    /// Everything of a rule but its matches and ports.
    fn rule(
        &self,
        services: &Services<'_>,
        path: &str,
        index: usize,
        rule: &RuleView,
        problems: &mut Vec<PolicyProblem>,
    ) -> Route {
        let mut route = Route {
            origin: Some(Origin {
                kind: self.kind.as_str().to_string(),
                namespace: self.object.key.namespace.clone(),
                name: self.object.key.name.clone(),
                rule: u32::try_from(index).unwrap_or(u32::MAX),
            }),
            ..Route::default()
        };
        let mut action = None;
        let mut refused = false;
        for (fi, f) in rule.filters.iter().enumerate() {
            let at = format!("{path}.filters[{fi}]");
            match f.type_.as_str() {
                "RequestHeaderModifier" => merge(
                    &mut route.request_headers,
                    f.request_header_modifier.as_ref(),
                ),
                "ResponseHeaderModifier" => merge(
                    &mut route.response_headers,
                    f.response_header_modifier.as_ref(),
                ),
                "RequestRedirect" => {
                    let r = f.request_redirect.as_ref();
                    action = Some(route::Action::Redirect(Redirect {
                        scheme: r.and_then(|r| r.scheme.clone()).unwrap_or_default(),
                        hostname: r.and_then(|r| r.hostname.clone()).unwrap_or_default(),
                        path: r.and_then(|r| r.path.as_ref()).and_then(path_rewrite_of),
                        port: r
                            .and_then(|r| r.port)
                            .and_then(|p| u32::try_from(p).ok())
                            .unwrap_or_default(),
                        status_code: r
                            .and_then(|r| r.status_code)
                            .and_then(|c| u32::try_from(c).ok())
                            .unwrap_or(302),
                    }));
                }
                "URLRewrite" => {
                    let r = f.url_rewrite.as_ref();
                    route.rewrite = Some(UrlRewrite {
                        hostname: r.and_then(|r| r.hostname.clone()).unwrap_or_default(),
                        path: r.and_then(|r| r.path.as_ref()).and_then(path_rewrite_of),
                    });
                }
                "RequestMirror" => {
                    let Some(m) = &f.request_mirror else { continue };
                    let per_million = match (&m.fraction, m.percent) {
                        (Some(fr), _) => {
                            let den = i64::from(fr.denominator.unwrap_or(100).max(1));
                            (i64::from(fr.numerator.max(0)) * 1_000_000 / den).min(1_000_000)
                        }
                        (None, Some(p)) => i64::from(p.clamp(0, 100)) * 10_000,
                        (None, None) => 1_000_000,
                    };
                    let backend = self.backend(
                        services,
                        &format!("{at}.requestMirror.backendRef"),
                        &m.backend_ref,
                        problems,
                    );
                    route.mirrors.push(Mirror {
                        backend: Some(backend),
                        per_million: u32::try_from(per_million).unwrap_or(1_000_000),
                    });
                }
                other => {
                    self.problem(
                        problems,
                        format!("{at}.type"),
                        format!("filter {other} is not supported by the waypoint"),
                        "requests matching the rule are answered 500",
                    );
                    refused = true;
                }
            }
        }
        if let Some(t) = &rule.timeouts {
            let request = self.duration(
                &format!("{path}.timeouts.request"),
                &t.request,
                no_timeout(),
                problems,
            );
            let per_try = self.duration(
                &format!("{path}.timeouts.backendRequest"),
                &t.backend_request,
                no_timeout(),
                problems,
            );
            if request.is_some() || per_try.is_some() {
                route.timeouts = Some(Timeouts { request, per_try });
            }
        }
        if let Some(r) = &rule.retry {
            route.retry = self.retry(&format!("{path}.retry"), r, problems);
        }
        route.action = Some(if refused {
            route::Action::DirectResponse(DirectResponse {
                status: 500,
                body: Vec::new(),
            })
        } else if let Some(a) = action {
            a
        } else {
            let backends = rule
                .backend_refs
                .iter()
                .enumerate()
                .map(|(bi, b)| {
                    self.backend(services, &format!("{path}.backendRefs[{bi}]"), b, problems)
                })
                .collect();
            route::Action::Forward(Forward { backends })
        });
        route
    }

    /// `retry` (GEP-1731): `attempts` retries after the first try (unset or
    /// unreadable: [`DEFAULT_RETRY_ATTEMPTS`]; 0: none), each after at least
    /// `backoff`, of a try answered with one of `codes`, that timed out
    /// (`timeouts.backendRequest`), could not connect, or was reset or
    /// refused by the backend. A code outside 400-599 (the CRD's bounds) is
    /// dropped and reported; the rest applies.
    fn retry(
        &self,
        at: &str,
        r: &RetryView,
        problems: &mut Vec<PolicyProblem>,
    ) -> Option<RetryPolicy> {
        let backoff = self.duration(
            &format!("{at}.backoff"),
            &r.backoff,
            Effect::DefaultApplies {
                what: "the waypoint's default backoff applies".into(),
            },
            problems,
        );
        let attempts = match r.attempts {
            None => DEFAULT_RETRY_ATTEMPTS,
            // Said explicitly: a route without a policy gets the
            // waypoint's default retries.
            Some(0) => {
                return Some(RetryPolicy {
                    attempts: 0,
                    ..RetryPolicy::default()
                });
            }
            Some(n @ 1..=MAX_RETRY_ATTEMPTS) => u32::try_from(n).unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            Some(n) => {
                self.report(
                    problems,
                    format!("{at}.attempts"),
                    format!("{n} is not a number of retries (0 to {MAX_RETRY_ATTEMPTS})"),
                    Effect::DefaultApplies {
                        what: format!("the default of {DEFAULT_RETRY_ATTEMPTS} retries applies"),
                    },
                );
                DEFAULT_RETRY_ATTEMPTS
            }
        };
        let mut codes = Vec::new();
        for (i, &code) in r.codes.iter().flatten().enumerate() {
            match u32::try_from(code) {
                Ok(c) if (400..=599).contains(&c) => codes.push(c),
                _ => self.report(
                    problems,
                    format!("{at}.codes[{i}]"),
                    format!("{code} is not an HTTP status between 400 and 599"),
                    Effect::FieldNotApplied,
                ),
            }
        }
        Some(RetryPolicy {
            attempts,
            codes,
            on_connect_failure: true,
            on_refused_stream: true,
            on_reset: true,
            backoff,
            ..RetryPolicy::default()
        })
    }

    /// A GEP-2257 duration; `0s` (and an unreadable value, reported) is none.
    fn duration(
        &self,
        field: &str,
        value: &Option<String>,
        unread: Effect,
        problems: &mut Vec<PolicyProblem>,
    ) -> Option<prost_types::Duration> {
        let v = value.as_ref()?;
        match v.parse::<gateway_api::Duration>() {
            Ok(d) if d.as_secs() == 0 && d.subsec_nanos() == 0 => None,
            Ok(d) => Some(prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or_default(),
            }),
            Err(e) => {
                self.report(
                    problems,
                    field.to_string(),
                    format!("{v:?} is not a Gateway API duration: {e}"),
                    unread,
                );
                None
            }
        }
    }

    /// One backendRef, resolved to a Service of the mesh or marked invalid.
    fn backend(
        &self,
        services: &Services<'_>,
        field: &str,
        b: &BackendView,
        problems: &mut Vec<PolicyProblem>,
    ) -> Backend {
        let namespace = b.namespace.as_deref().unwrap_or(&self.object.key.namespace);
        let kind = b.kind.as_deref().unwrap_or("Service");
        let group = b.group.as_deref().unwrap_or("");
        let mut backend = Backend {
            port: b
                .port
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or_default(),
            weight: b.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(1),
            ..Backend::default()
        };
        let invalid = if !(kind == "Service" && matches!(group, "" | "core")) {
            Some(format!(
                "backendRef kind {kind} (group {group:?}) is not supported"
            ))
        } else if namespace != self.object.key.namespace {
            Some(format!(
                "Service {namespace}/{} is in another namespace: that needs a ReferenceGrant, which istiod-rs does not read",
                b.name
            ))
        } else if let Some(i) = services.named(namespace, &b.name) {
            backend.service = services.entries[i].key.clone();
            b.port
                .is_none()
                .then(|| format!("Service {namespace}/{}: a port is required", b.name))
        } else {
            Some(format!("Service {namespace}/{} was not found", b.name))
        };
        for (fi, f) in b.filters.iter().enumerate() {
            match f.type_.as_str() {
                "RequestHeaderModifier" => merge(
                    &mut backend.request_headers,
                    f.request_header_modifier.as_ref(),
                ),
                "ResponseHeaderModifier" => merge(
                    &mut backend.response_headers,
                    f.response_header_modifier.as_ref(),
                ),
                other => {
                    self.problem(
                        problems,
                        format!("{field}.filters[{fi}].type"),
                        format!("backend filter {other} is not supported by the waypoint"),
                        "the backend's share of the traffic is answered 500",
                    );
                    if backend.invalid_reason.is_empty() {
                        backend.invalid_reason = format!("backend filter {other} is not supported");
                    }
                }
            }
        }
        if let Some(reason) = invalid {
            self.problem(
                problems,
                field.to_string(),
                reason.clone(),
                "the backend's share of the traffic is answered 500",
            );
            backend.invalid_reason = reason;
        }
        backend
    }
}

/// What an unreadable timeout leaves.
fn no_timeout() -> Effect {
    Effect::L7Stricter {
        what: "no timeout applies".into(),
    }
}

fn path_rewrite_of(p: &PathModView) -> Option<PathRewrite> {
    let kind = match p.type_.as_str() {
        "ReplaceFullPath" => path_rewrite::Kind::FullPath(p.replace_full_path.clone()?),
        "ReplacePrefixMatch" => path_rewrite::Kind::Prefix(p.replace_prefix_match.clone()?),
        _ => return None,
    };
    Some(PathRewrite { kind: Some(kind) })
}

fn merge(target: &mut Option<HeaderModifier>, m: Option<&HeaderModView>) {
    let Some(m) = m else { return };
    let t = target.get_or_insert_with(HeaderModifier::default);
    let header = |h: &NameValue| Header {
        name: h.name.to_ascii_lowercase(),
        value: h.value.clone(),
    };
    t.set.extend(m.set.iter().map(header));
    t.add.extend(m.add.iter().map(header));
    t.remove
        .extend(m.remove.iter().map(|h| h.to_ascii_lowercase()));
}

/// Compiles a regular expression as the waypoint will (full match, size
/// limited), to refuse one it would refuse.
fn compile(re: &str) -> Result<(), String> {
    if re.len() > MAX_REGEX_LEN {
        return Err(format!("longer than {MAX_REGEX_LEN} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        // The syntax error's last line says what is wrong (the lines above
        // draw the position).
        .map_err(|e| {
            let text = e.to_string();
            let last = text.lines().rev().find(|l| !l.trim().is_empty());
            last.unwrap_or(&text)
                .trim()
                .trim_start_matches("error: ")
                .to_string()
        })
}
