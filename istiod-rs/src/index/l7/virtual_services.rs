//! VirtualService -> `istio_rs.l7.v1.Route`s for the services its `hosts`
//! name, served as a `RouteTable` keyed `<svc ns>/<svc hostname>`.
//!
//! Contract with the Gateway API routes (`index/l7.rs` and its routes):
//! a service's RouteTable comes from the HTTPRoutes/GRPCRoutes that name it
//! as a parent when there are any, else from a VirtualService. Mixing the
//! two is not supported (upstream converts Gateway API routes to
//! VirtualServices itself), so a VirtualService for a service with a
//! Gateway API route is reported and not used for it. [`VirtualServices`]
//! gives the routes per service ([`VirtualServices::routes_for`]);
//! [`route_tables`] is what the index inserts: one table per service no
//! Gateway API route attaches to.
//!
//! Semantics follow upstream's translation (pilot/pkg/networking/core/route
//! `route.go`, `retry/retry.go`):
//! - routes keep their order (`http[]` is first-match); a route whose every
//!   match alternative cannot be honoured is left out (an empty match list
//!   would match everything);
//! - `retries` unset is upstream's `DefaultPolicy` (2 attempts on
//!   connect-failure, refused-stream, gRPC unavailable and cancelled, HTTP
//!   503); `attempts: 0` disables retries; `retryOn` numbers are status
//!   codes, the Envoy conditions are expanded (`5xx`, `gateway-error`,
//!   `retriable-4xx`, `reset`, ...);
//! - fault and mirror percentages become millionths; a fault without a
//!   percentage never fires (Envoy's default 0%), a mirror without one
//!   mirrors everything;
//! - `rewrite.uri` replaces the matched prefix of `prefix` matches, the whole
//!   path otherwise; `uriRegexRewrite` is passed as written (RE2 pattern,
//!   `\1` substitutions).
//!
//! Anything the waypoint cannot honour is reported by field path with its
//! effect: a field not applied (`corsPolicy`, `headers` of unknown shape),
//! a match alternative that matches nothing (`sourceLabels`, `authority`,
//! `scheme`, a regex that does not compile), or a route whose requests get
//! 500 (`delegate`, a destination that is no Service of the mesh).

use std::collections::BTreeMap;

use api::crd::VirtualService;
use api::crd::networking::{
    Destination, HeaderOperations, HttpMatchRequest, HttpRetry, HttpRoute, Percent, StringMatch,
};
use api::l7;
use api::manifest::{Kind, ObjectKey};
use base64::Engine;

use super::traffic::{Report, by_hostname, resolve_host};
use crate::index::MeshConfig;
use crate::index::problem::{Effect, PolicyProblem, PolicyRef};
use crate::index::services::Services;
use crate::state::ClusterState;

/// The `gateways` entry naming traffic inside the mesh.
const MESH_GATEWAY: &str = "mesh";

/// Largest compiled regex accepted: the waypoint's own bound, so a pattern
/// istiod accepts is never refused there.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// gRPC status names (`grpcStatus` of a fault abort) and their codes.
const GRPC_CODES: [(&str, u32); 17] = [
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

/// The routes VirtualServices give each service.
#[derive(Debug, Default)]
pub(in crate::index) struct VirtualServices {
    /// Service key (`<ns>/<hostname>`) -> the VirtualService used for it
    /// and its routes.
    by_service: BTreeMap<String, (ObjectKey, Vec<l7::Route>)>,
}

impl VirtualServices {
    /// Translates every VirtualService, reporting what cannot be honoured.
    pub fn build(
        state: &ClusterState,
        mesh: &MeshConfig,
        services: &Services<'_>,
        problems: &mut Vec<PolicyProblem>,
    ) -> Self {
        let hosts = by_hostname(services);
        let mut ordered: Vec<(&ObjectKey, &VirtualService)> = state
            .virtual_services
            .iter()
            .map(|(k, v)| (k, v.as_ref()))
            .collect();
        // Oldest first, as upstream orders them: the first for a host is used.
        ordered.sort_by(|(ka, a), (kb, b)| {
            let created = |v: &VirtualService| v.metadata.creation_timestamp.clone().map(|t| t.0);
            created(a).cmp(&created(b)).then_with(|| ka.cmp(kb))
        });
        let mut out = VirtualServices::default();
        for (key, vs) in ordered {
            let mut report = Report {
                object: PolicyRef::new(Kind::VirtualService, &key.namespace, &key.name),
                problems,
            };
            let spec = &vs.spec;
            if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == MESH_GATEWAY) {
                report.not_honoured(
                    "spec.gateways",
                    "the VirtualService applies to gateways only, not to traffic inside the mesh (add `mesh`)",
                    Effect::NotUsed,
                );
                continue;
            }
            for (i, g) in spec.gateways.iter().enumerate() {
                if g != MESH_GATEWAY {
                    report.not_honoured(
                        format!("spec.gateways[{i}]"),
                        "the mesh has no Istio Gateways; only `mesh` applies",
                        Effect::FieldNotApplied,
                    );
                }
            }
            let http_only = "waypoints route HTTP only";
            report.each_set(
                "spec",
                &[
                    ("tls", !spec.tls.is_empty(), http_only),
                    ("tcp", !spec.tcp.is_empty(), http_only),
                ],
                Effect::FieldNotApplied,
            );
            if !spec.export_to.is_empty() && !spec.export_to.iter().all(|e| e == "*") {
                report.not_honoured(
                    "spec.exportTo",
                    "the routes apply at the destination's waypoint, whatever namespace the client is in",
                    Effect::FieldNotApplied,
                );
            }
            let mut targets = Vec::new();
            for (i, host) in spec.hosts.iter().enumerate() {
                let resolved = resolve_host(mesh, &key.namespace, host);
                let Some(&service) = hosts.get(resolved.as_str()) else {
                    report.not_honoured(
                        format!("spec.hosts[{i}]"),
                        format!("{resolved:?} is not the hostname of a Service of the mesh"),
                        Effect::NotUsed,
                    );
                    continue;
                };
                let service_key = services.entries[service].key.clone();
                if let Some((first, _)) = out.by_service.get(&service_key) {
                    report.not_honoured(
                        format!("spec.hosts[{i}]"),
                        format!(
                            "VirtualService {first} is older and routes {resolved}; VirtualServices for one host are not merged"
                        ),
                        Effect::NotUsed,
                    );
                    continue;
                }
                targets.push(service_key);
            }
            if targets.is_empty() {
                continue;
            }
            let routes = Translate {
                report: &mut report,
                mesh,
                namespace: &key.namespace,
                hosts: &hosts,
                services,
                name: &key.name,
            }
            .routes(&spec.http);
            for service_key in targets {
                out.by_service
                    .insert(service_key, (key.clone(), routes.clone()));
            }
        }
        out
    }

    /// The routes for the service keyed `<ns>/<hostname>`, when a
    /// VirtualService names it.
    pub fn routes_for(&self, service: &str) -> Option<&[l7::Route]> {
        self.by_service.get(service).map(|(_, r)| r.as_slice())
    }

    /// The VirtualService used for the service keyed `<ns>/<hostname>`.
    pub fn source_of(&self, service: &str) -> Option<&ObjectKey> {
        self.by_service.get(service).map(|(k, _)| k)
    }
}

/// What an admission webhook must refuse in a VirtualService: the values
/// that cannot be read (durations, regexes, percentages, statuses), found by
/// the translation itself. Fields the waypoint does not honour, and hosts
/// that are no Service (yet), are valid upstream and not refused.
pub fn validate_virtual_service(vs: &VirtualService) -> Vec<PolicyProblem> {
    let mut problems = Vec::new();
    let namespace = vs.metadata.namespace.clone().unwrap_or_default();
    let name = vs.metadata.name.clone().unwrap_or_default();
    let mut report = Report {
        object: PolicyRef::new(Kind::VirtualService, &namespace, &name),
        problems: &mut problems,
    };
    let services = Services::default();
    Translate {
        report: &mut report,
        mesh: &MeshConfig::default(),
        namespace: &namespace,
        name: &name,
        hosts: &BTreeMap::new(),
        services: &services,
    }
    .routes(&vs.spec.http);
    problems.retain(PolicyProblem::rejected_at_admission);
    problems
}

/// The RouteTables VirtualServices give: one per service that has a
/// VirtualService and no HTTPRoute/GRPCRoute naming it as a parent. A
/// VirtualService not used for a service because of such a route is
/// reported.
pub(in crate::index) fn route_tables(
    state: &ClusterState,
    mesh: &MeshConfig,
    services: &Services<'_>,
    problems: &mut Vec<PolicyProblem>,
) -> Vec<l7::RouteTable> {
    let virtual_services = VirtualServices::build(state, mesh, services, problems);
    let gateway_routes = gateway_api_routes(state);
    let mut out = Vec::new();
    for entry in &services.entries {
        let Some(routes) = virtual_services.routes_for(&entry.key) else {
            continue;
        };
        let service = ObjectKey::new(entry.proto.namespace.clone(), entry.proto.name.clone());
        if let Some(route) = gateway_routes.get(&service) {
            let vs = virtual_services
                .source_of(&entry.key)
                .expect("a service with routes has their source");
            problems.push(PolicyProblem::NotHonoured {
                object: PolicyRef::new(Kind::VirtualService, &vs.namespace, &vs.name),
                field: "spec.hosts".to_string(),
                reason: format!(
                    "{route} has Service {service} as a parent and Gateway API routes take precedence; mixing them with VirtualServices for one service is not supported"
                ),
                effect: Effect::NotUsed,
            });
            continue;
        }
        out.push(l7::RouteTable {
            namespace: entry.proto.namespace.clone(),
            hostname: entry.proto.hostname.clone(),
            routes: routes.to_vec(),
        });
    }
    out
}

/// Services some HTTPRoute or GRPCRoute names as a parent, with the first
/// such route (`HTTPRoute ns/name`).
fn gateway_api_routes(state: &ClusterState) -> BTreeMap<ObjectKey, String> {
    let mut out = BTreeMap::new();
    macro_rules! parents {
        ($objects:ident, $kind:expr) => {
            for (key, route) in &state.$objects {
                for p in route.spec.parent_refs.iter().flatten() {
                    let service = p.kind.as_deref() == Some("Service")
                        && matches!(p.group.as_deref(), Some("" | "core"));
                    if service {
                        let namespace =
                            p.namespace.clone().unwrap_or_else(|| key.namespace.clone());
                        out.entry(ObjectKey::new(namespace, p.name.clone()))
                            .or_insert_with(|| format!("{} {key}", $kind));
                    }
                }
            }
        };
    }
    parents!(http_routes, Kind::HttpRoute);
    parents!(grpc_routes, Kind::GrpcRoute);
    out
}

/// Translates one VirtualService's `http[]`.
struct Translate<'r, 'p, 'a> {
    report: &'r mut Report<'p>,
    mesh: &'a MeshConfig,
    namespace: &'a str,
    name: &'a str,
    hosts: &'a BTreeMap<&'a str, usize>,
    services: &'a Services<'a>,
}

impl Translate<'_, '_, '_> {
    fn routes(&mut self, http: &[HttpRoute]) -> Vec<l7::Route> {
        http.iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(i, r))
            .collect()
    }

    fn route(&mut self, index: usize, r: &HttpRoute) -> Option<l7::Route> {
        let path = format!("spec.http[{index}]");
        let mut matches = Vec::new();
        let mut ports = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let at = format!("{path}.match[{j}]");
            if let Some(matched) = self.route_match(&at, m) {
                matches.push(matched);
                ports.push((at, m.port));
            }
        }
        let route_ports = self.ports(&mut matches, ports);
        // Every alternative matches nothing: so does the route (an empty
        // list would match everything). Still read whole, so every problem
        // of it is reported at once.
        let matches_nothing = !r.matches.is_empty() && matches.is_empty();
        let mut route = l7::Route {
            origin: Some(l7::Origin {
                kind: Kind::VirtualService.as_str().to_string(),
                namespace: self.namespace.to_string(),
                name: self.name.to_string(),
                rule: index as u32,
            }),
            ports: route_ports,
            matches,
            ..Default::default()
        };
        route.action = Some(self.action(&path, r));
        if let Some(h) = &r.headers {
            route.request_headers = h.request.as_ref().map(header_modifier);
            route.response_headers = h.response.as_ref().map(header_modifier);
        }
        route.rewrite = self.rewrite(&path, r);
        route.mirrors = self.mirrors(&path, r);
        let request = self.report.duration(
            || format!("{path}.timeout"),
            r.timeout.as_deref(),
            Effect::FieldNotApplied,
        );
        // 0s disables the timeout, as upstream.
        let request = request.filter(|d| d.seconds != 0 || d.nanos != 0);
        // Retries and per-try timeouts apply to forwarded requests only.
        let forwards = matches!(route.action, Some(l7::route::Action::Forward(_)));
        let (retry, per_try) = if forwards {
            self.retry(&path, r.retries.as_ref())
        } else {
            (None, None)
        };
        if request.is_some() || per_try.is_some() {
            route.timeouts = Some(l7::Timeouts { request, per_try });
        }
        route.retry = retry;
        route.fault = self.fault(&path, r);
        if r.cors_policy.is_some() {
            self.report.not_honoured(
                format!("{path}.corsPolicy"),
                "CORS is not supported at waypoints (responses carry no CORS headers, so browsers refuse cross-origin reads)",
                Effect::FieldNotApplied,
            );
        }
        (!matches_nothing).then_some(route)
    }

    /// One match alternative; `None` when it matches nothing.
    fn route_match(&mut self, at: &str, m: &HttpMatchRequest) -> Option<l7::RouteMatch> {
        let nothing = |report: &mut Report<'_>, field: &str, reason: &str| {
            report.not_honoured(format!("{at}.{field}"), reason, Effect::MatchMatchesNothing);
        };
        let mut ok = true;
        let unsupported = [
            (
                "scheme",
                m.scheme.is_some(),
                "the waypoint does not match on the scheme",
            ),
            (
                "authority",
                m.authority.is_some(),
                "the waypoint does not match on the authority; match the service host instead",
            ),
            (
                "sourceLabels",
                !m.source_labels.is_empty(),
                "the waypoint does not know its clients' labels",
            ),
            (
                "sourceNamespace",
                m.source_namespace.is_some(),
                "the waypoint does not match on the client's namespace",
            ),
        ];
        if self
            .report
            .each_set(at, &unsupported, Effect::MatchMatchesNothing)
        {
            ok = false;
        }
        if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == MESH_GATEWAY) {
            nothing(
                self.report,
                "gateways",
                "the match applies to gateways only, not to traffic inside the mesh",
            );
            ok = false;
        }
        if m.stat_prefix.is_some() {
            self.report.not_honoured(
                format!("{at}.statPrefix"),
                "per-route statistics prefixes are not supported",
                Effect::FieldNotApplied,
            );
        }
        let path = match &m.uri {
            None => None,
            Some(uri) => {
                let kind = match self.string_match(&format!("{at}.uri"), uri) {
                    Ok(Some(Matcher::Exact(v))) => Some(l7::path_match::Kind::Exact(v)),
                    Ok(Some(Matcher::Prefix(v))) => Some(l7::path_match::Kind::Prefix(v)),
                    Ok(Some(Matcher::Regex(v))) => Some(l7::path_match::Kind::Regex(v)),
                    Ok(None) => None,
                    Err(()) => {
                        ok = false;
                        None
                    }
                };
                kind.map(|kind| l7::PathMatch {
                    kind: Some(kind),
                    ignore_case: m.ignore_uri_case.unwrap_or(false),
                })
            }
        };
        let method = match &m.method {
            None => String::new(),
            Some(StringMatch {
                exact: Some(method),
                prefix: None,
                regex: None,
            }) => method.clone(),
            Some(_) => {
                nothing(self.report, "method", "only an exact method is supported");
                ok = false;
                String::new()
            }
        };
        let headers = self.header_matches(&format!("{at}.headers"), &m.headers, true);
        let query_params =
            self.header_matches(&format!("{at}.queryParams"), &m.query_params, false);
        let without_headers =
            self.header_matches(&format!("{at}.withoutHeaders"), &m.without_headers, true);
        let (Some(headers), Some(query_params), Some(without_headers)) =
            (headers, query_params, without_headers)
        else {
            return None;
        };
        ok.then_some(l7::RouteMatch {
            path,
            headers,
            query_params,
            method,
            grpc: None,
            without_headers,
        })
    }

    /// The route's ports from its alternatives' `port`: the waypoint takes
    /// ports per route, so alternatives must agree; those that do not are
    /// reported and left out.
    fn ports(
        &mut self,
        matches: &mut Vec<l7::RouteMatch>,
        ports: Vec<(String, Option<u32>)>,
    ) -> Vec<u32> {
        let first = ports.first().and_then(|(_, p)| *p);
        let mut keep = Vec::with_capacity(ports.len());
        for (at, port) in &ports {
            let agrees = *port == first;
            if !agrees {
                self.report.not_honoured(
                    format!("{at}.port"),
                    "match alternatives of one route must name the same port (or none)",
                    Effect::MatchMatchesNothing,
                );
            }
            keep.push(agrees);
        }
        let mut keep = keep.into_iter();
        matches.retain(|_| keep.next().unwrap_or(false));
        first.into_iter().collect()
    }

    fn header_matches(
        &mut self,
        at: &str,
        headers: &BTreeMap<String, StringMatch>,
        lower: bool,
    ) -> Option<Vec<l7::HeaderMatch>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (name, m) in headers {
            use l7::header_match::Kind;
            let kind = match self.string_match(&format!("{at}.{name}"), m) {
                Ok(Some(Matcher::Exact(v))) => Kind::Exact(v),
                Ok(Some(Matcher::Prefix(v))) => Kind::Prefix(v),
                Ok(Some(Matcher::Regex(v))) => Kind::Regex(v),
                Ok(None) => Kind::Present(true),
                Err(()) => {
                    ok = false;
                    continue;
                }
            };
            out.push(l7::HeaderMatch {
                name: if lower {
                    name.to_ascii_lowercase()
                } else {
                    name.clone()
                },
                kind: Some(kind),
            });
        }
        ok.then_some(out)
    }

    /// A StringMatch; `Ok(None)` when empty; `Err` (reported) when it
    /// cannot be matched.
    fn string_match(&mut self, at: &str, m: &StringMatch) -> Result<Option<Matcher>, ()> {
        let set: Vec<Matcher> = [
            m.exact.clone().map(Matcher::Exact),
            m.prefix.clone().map(Matcher::Prefix),
            m.regex.clone().map(Matcher::Regex),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() > 1 {
            self.report.invalid(
                at.to_string(),
                format!("{m:?}"),
                "one of exact, prefix or regex",
                Effect::MatchMatchesNothing,
            );
            return Err(());
        }
        let found = set.into_iter().next();
        if let Some(Matcher::Regex(pattern)) = &found
            && regex::RegexBuilder::new(pattern.as_str())
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .is_err()
        {
            self.report.invalid(
                format!("{at}.regex"),
                pattern.clone(),
                "a regular expression (RE2 syntax)",
                Effect::MatchMatchesNothing,
            );
            return Err(());
        }
        Ok(found)
    }

    fn action(&mut self, path: &str, r: &HttpRoute) -> l7::route::Action {
        use l7::route::Action;
        let fails = || {
            Action::DirectResponse(l7::DirectResponse {
                status: 500,
                body: Vec::new(),
            })
        };
        if r.delegate.is_some() {
            self.report.not_honoured(
                format!("{path}.delegate"),
                "delegate VirtualServices are not supported",
                Effect::RouteFails,
            );
            return fails();
        }
        if let Some(redirect) = &r.redirect {
            let at = format!("{path}.redirect");
            if let Some(derive) = &redirect.derive_port {
                self.report.not_honoured(
                    format!("{at}.derivePort"),
                    format!("{derive} is not supported; the request's port is kept"),
                    Effect::FieldNotApplied,
                );
            }
            return Action::Redirect(l7::Redirect {
                scheme: redirect.scheme.clone().unwrap_or_default(),
                hostname: redirect.authority.clone().unwrap_or_default(),
                path: redirect.uri.clone().map(|uri| l7::PathRewrite {
                    kind: Some(l7::path_rewrite::Kind::FullPath(uri)),
                }),
                port: redirect.port.unwrap_or(0),
                // Istio's default redirect code is 301 (MOVED_PERMANENTLY).
                status_code: redirect.redirect_code.unwrap_or(301),
            });
        }
        if let Some(direct) = &r.direct_response {
            let body = match &direct.body {
                None => Vec::new(),
                Some(b) => match (&b.string, &b.bytes) {
                    (Some(s), _) => s.clone().into_bytes(),
                    (None, Some(bytes)) => base64::engine::general_purpose::STANDARD
                        .decode(bytes)
                        .unwrap_or_else(|_| {
                            self.report.invalid(
                                format!("{path}.directResponse.body.bytes"),
                                bytes.clone(),
                                "base64",
                                Effect::FieldNotApplied,
                            );
                            Vec::new()
                        }),
                    (None, None) => Vec::new(),
                },
            };
            return Action::DirectResponse(l7::DirectResponse {
                status: direct.status,
                body,
            });
        }
        if r.route.is_empty() {
            self.report.not_honoured(
                path.to_string(),
                "a route needs a route, redirect, directResponse or delegate",
                Effect::RouteFails,
            );
            return fails();
        }
        let single = r.route.len() == 1;
        let backends: Vec<l7::Backend> = r
            .route
            .iter()
            .enumerate()
            .map(|(j, d)| {
                let at = format!("{path}.route[{j}]");
                let mut backend = self.backend(&format!("{at}.destination"), &d.destination);
                // A lone destination takes everything, weight or not.
                backend.weight = if single { 1 } else { d.weight.unwrap_or(0) };
                if let Some(h) = &d.headers {
                    backend.request_headers = h.request.as_ref().map(header_modifier);
                    backend.response_headers = h.response.as_ref().map(header_modifier);
                }
                backend
            })
            .collect();
        if backends.iter().all(|b| b.weight == 0) {
            self.report.not_honoured(
                format!("{path}.route"),
                "the destinations' weights sum to 0",
                Effect::RouteFails,
            );
        }
        Action::Forward(l7::Forward { backends })
    }

    /// A destination as a backend; one that is no Service of the mesh gets
    /// `invalid_reason` (its share of requests gets 500) and is reported.
    fn backend(&mut self, at: &str, d: &Destination) -> l7::Backend {
        let host = resolve_host(self.mesh, self.namespace, &d.host);
        let mut backend = l7::Backend {
            port: d.port.as_ref().map_or(0, |p| p.number),
            subset: d.subset.clone().unwrap_or_default(),
            ..Default::default()
        };
        match self.hosts.get(host.as_str()) {
            Some(&i) => backend.service = self.services.entries[i].key.clone(),
            None => {
                let reason = format!("{host:?} is not the hostname of a Service of the mesh");
                self.report.not_honoured(
                    format!("{at}.host"),
                    reason.clone(),
                    Effect::BackendFails,
                );
                backend.invalid_reason = reason;
            }
        }
        backend
    }

    fn rewrite(&mut self, path: &str, r: &HttpRoute) -> Option<l7::UrlRewrite> {
        use l7::path_rewrite::Kind;
        let rw = r.rewrite.as_ref()?;
        let at = format!("{path}.rewrite");
        let path_rewrite = match (&rw.uri, &rw.uri_regex_rewrite) {
            (Some(_), Some(_)) => {
                self.report.not_honoured(
                    format!("{at}.uriRegexRewrite"),
                    "uri and uriRegexRewrite are alternatives; uri applies",
                    Effect::FieldNotApplied,
                );
                rw.uri.clone().map(|u| self.uri_rewrite(r, u))
            }
            (Some(uri), None) => Some(self.uri_rewrite(r, uri.clone())),
            (None, Some(regex)) => {
                if regex::RegexBuilder::new(&regex.pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .is_err()
                {
                    self.report.invalid(
                        format!("{at}.uriRegexRewrite.match"),
                        regex.pattern.clone(),
                        "a regular expression (RE2 syntax)",
                        Effect::FieldNotApplied,
                    );
                    None
                } else {
                    Some(Kind::Regex(l7::RegexRewrite {
                        pattern: regex.pattern.clone(),
                        substitution: regex.rewrite.clone(),
                    }))
                }
            }
            (None, None) => None,
        };
        let hostname = rw.authority.clone().unwrap_or_default();
        if path_rewrite.is_none() && hostname.is_empty() {
            return None;
        }
        Some(l7::UrlRewrite {
            hostname,
            path: path_rewrite.map(|kind| l7::PathRewrite { kind: Some(kind) }),
        })
    }

    /// `rewrite.uri`: the matched prefix of `prefix` matches is replaced,
    /// the whole path otherwise (Envoy's prefix_rewrite on exact and regex
    /// matches).
    fn uri_rewrite(&self, r: &HttpRoute, uri: String) -> l7::path_rewrite::Kind {
        let prefix_matched = r
            .matches
            .iter()
            .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()));
        if prefix_matched {
            l7::path_rewrite::Kind::Prefix(uri)
        } else {
            l7::path_rewrite::Kind::FullPath(uri)
        }
    }

    fn mirrors(&mut self, path: &str, r: &HttpRoute) -> Vec<l7::Mirror> {
        let mut out = Vec::new();
        if let Some(d) = &r.mirror {
            let share = match (&r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => self.per_million(&format!("{path}.mirrorPercentage.value"), p),
                (None, Some(percent)) => self.per_million(
                    &format!("{path}.mirrorPercent"),
                    &Percent {
                        value: f64::from(percent),
                    },
                ),
                (None, None) => Some(1_000_000),
            };
            if let Some(m) = self.mirror(&format!("{path}.mirror"), d, share) {
                out.push(m);
            }
        }
        for (i, m) in r.mirrors.iter().enumerate() {
            let at = format!("{path}.mirrors[{i}]");
            let share = match &m.percentage {
                Some(p) => self.per_million(&format!("{at}.percentage.value"), p),
                None => Some(1_000_000),
            };
            if let Some(m) = self.mirror(&format!("{at}.destination"), &m.destination, share) {
                out.push(m);
            }
        }
        out
    }

    /// A mirror to a Service of the mesh; others are reported and left out
    /// (mirroring never changes the request's own fate).
    fn mirror(&mut self, at: &str, d: &Destination, share: Option<u32>) -> Option<l7::Mirror> {
        let per_million = share?;
        let host = resolve_host(self.mesh, self.namespace, &d.host);
        let Some(&i) = self.hosts.get(host.as_str()) else {
            self.report.not_honoured(
                format!("{at}.host"),
                format!("{host:?} is not the hostname of a Service of the mesh; nothing is mirrored there"),
                Effect::FieldNotApplied,
            );
            return None;
        };
        Some(l7::Mirror {
            backend: Some(l7::Backend {
                service: self.services.entries[i].key.clone(),
                port: d.port.as_ref().map_or(0, |p| p.number),
                weight: 1,
                subset: d.subset.clone().unwrap_or_default(),
                ..Default::default()
            }),
            per_million,
        })
    }

    /// A percentage (0-100) in millionths.
    fn per_million(&mut self, at: &str, p: &Percent) -> Option<u32> {
        if !(0.0..=100.0).contains(&p.value) {
            self.report.invalid(
                at.to_string(),
                p.value.to_string(),
                "a percentage (0-100)",
                Effect::FieldNotApplied,
            );
            return None;
        }
        Some((p.value * 10_000.0).round() as u32)
    }

    /// The retry policy and per-try timeout.
    fn retry(
        &mut self,
        path: &str,
        retries: Option<&HttpRetry>,
    ) -> (Option<l7::RetryPolicy>, Option<prost_types::Duration>) {
        let Some(r) = retries else {
            // Upstream's DefaultPolicy (retry/retry.go).
            return (
                Some(l7::RetryPolicy {
                    attempts: 2,
                    codes: vec![503],
                    on_connect_failure: true,
                    on_refused_stream: true,
                    grpc_codes: vec![1, 14],
                    ..Default::default()
                }),
                None,
            );
        };
        if r.attempts == 0 {
            // Said explicitly: a route without a policy gets the waypoint's
            // default retries.
            let none = l7::RetryPolicy {
                attempts: 0,
                ..Default::default()
            };
            return (Some(none), None);
        }
        let at = format!("{path}.retries");
        let per_try = self.report.duration(
            || format!("{at}.perTryTimeout"),
            r.per_try_timeout.as_deref(),
            Effect::FieldNotApplied,
        );
        let backoff = self.report.duration(
            || format!("{at}.backoff"),
            r.backoff.as_deref(),
            Effect::FieldNotApplied,
        );
        let hosts = "host selection across retries is the waypoint's own";
        self.report.each_set(
            &at,
            &[
                (
                    "retryRemoteLocalities",
                    r.retry_remote_localities.is_some(),
                    hosts,
                ),
                (
                    "retryIgnorePreviousHosts",
                    r.retry_ignore_previous_hosts.is_some(),
                    hosts,
                ),
            ],
            Effect::FieldNotApplied,
        );
        let mut policy = l7::RetryPolicy {
            attempts: r.attempts,
            backoff,
            ..Default::default()
        };
        match &r.retry_on {
            // Upstream keeps the default conditions when retryOn is unset.
            None => {
                policy.codes = vec![503];
                policy.on_connect_failure = true;
                policy.on_refused_stream = true;
                policy.grpc_codes = vec![1, 14];
            }
            Some(on) => self.retry_on(&format!("{at}.retryOn"), on, &mut policy),
        }
        (Some(policy), per_try)
    }

    /// `retryOn` expanded: numbers are status codes (upstream
    /// `parseRetryOn`), Envoy's conditions become codes and flags.
    fn retry_on(&mut self, at: &str, on: &str, policy: &mut l7::RetryPolicy) {
        let mut codes: Vec<u32> = Vec::new();
        for part in on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Ok(code) = part.parse::<u32>()
                && (100..=599).contains(&code)
            {
                codes.push(code);
                continue;
            }
            match part {
                "5xx" => {
                    codes.extend(500..=599);
                    policy.on_connect_failure = true;
                    policy.on_refused_stream = true;
                    policy.on_reset = true;
                }
                "gateway-error" => codes.extend([502, 503, 504]),
                "retriable-4xx" => codes.push(409),
                "reset" => policy.on_reset = true,
                "connect-failure" => policy.on_connect_failure = true,
                "refused-stream" => policy.on_refused_stream = true,
                // The codes are the numbers of the list.
                "retriable-status-codes" => {}
                "cancelled" => policy.grpc_codes.push(1),
                "deadline-exceeded" => policy.grpc_codes.push(4),
                "resource-exhausted" => policy.grpc_codes.push(8),
                "internal" => policy.grpc_codes.push(13),
                "unavailable" => policy.grpc_codes.push(14),
                other => self.report.not_honoured(
                    at.to_string(),
                    format!("retry condition {other:?} is not supported"),
                    Effect::FieldNotApplied,
                ),
            }
        }
        codes.sort_unstable();
        codes.dedup();
        policy.codes = codes;
        policy.grpc_codes.sort_unstable();
        policy.grpc_codes.dedup();
    }

    fn fault(&mut self, path: &str, r: &HttpRoute) -> Option<l7::Fault> {
        let f = r.fault.as_ref()?;
        let at = format!("{path}.fault");
        let share = |this: &mut Self, field: &str, p: &Option<Percent>, percent: Option<u32>| {
            match (p, percent) {
                (Some(p), _) => this.per_million(&format!("{field}.percentage.value"), p),
                (None, Some(percent)) => this.per_million(
                    &format!("{field}.percent"),
                    &Percent {
                        value: f64::from(percent),
                    },
                ),
                // Envoy's default: no request.
                (None, None) => Some(0),
            }
        };
        let delay = f.delay.as_ref().and_then(|d| {
            let field = format!("{at}.delay");
            if d.exponential_delay.is_some() {
                self.report.not_honoured(
                    format!("{field}.exponentialDelay"),
                    "exponential delays are not supported",
                    Effect::FieldNotApplied,
                );
            }
            if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                self.report.not_honoured(
                    field.clone(),
                    "a delay needs fixedDelay",
                    Effect::FieldNotApplied,
                );
            }
            let delay = self.report.duration(
                || format!("{field}.fixedDelay"),
                d.fixed_delay.as_deref(),
                Effect::FieldNotApplied,
            )?;
            let per_million = share(self, &field, &d.percentage, d.percent)?;
            Some(l7::fault::Delay {
                delay: Some(delay),
                per_million,
            })
        });
        let abort = f.abort.as_ref().and_then(|a| {
            use l7::fault::abort::Status;
            let field = format!("{at}.abort");
            let status = match (&a.http_status, &a.grpc_status, &a.http2_error) {
                (Some(code), _, _) if (200..=599).contains(code) => Status::HttpStatus(*code),
                (Some(code), _, _) => {
                    self.report.invalid(
                        format!("{field}.httpStatus"),
                        code.to_string(),
                        "an HTTP status (200-599)",
                        Effect::FieldNotApplied,
                    );
                    return None;
                }
                (None, Some(name), _) => match GRPC_CODES.iter().find(|(n, _)| n == name) {
                    Some((_, code)) => Status::GrpcStatus(*code),
                    None => {
                        self.report.invalid(
                            format!("{field}.grpcStatus"),
                            name.clone(),
                            "a gRPC status name such as UNAVAILABLE",
                            Effect::FieldNotApplied,
                        );
                        return None;
                    }
                },
                (None, None, Some(_)) => {
                    self.report.not_honoured(
                        format!("{field}.http2Error"),
                        "HTTP/2 error aborts are not supported",
                        Effect::FieldNotApplied,
                    );
                    return None;
                }
                (None, None, None) => {
                    self.report.not_honoured(
                        field.clone(),
                        "an abort needs httpStatus or grpcStatus",
                        Effect::FieldNotApplied,
                    );
                    return None;
                }
            };
            let per_million = share(self, &field, &a.percentage, None)?;
            Some(l7::fault::Abort {
                status: Some(status),
                per_million,
            })
        });
        (delay.is_some() || abort.is_some()).then_some(l7::Fault { delay, abort })
    }
}

/// What a StringMatch holds (one of them).
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(String),
}

fn header_modifier(ops: &HeaderOperations) -> l7::HeaderModifier {
    let headers = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(name, value)| l7::Header {
                name: name.to_ascii_lowercase(),
                value: value.clone(),
            })
            .collect()
    };
    l7::HeaderModifier {
        set: headers(&ops.set),
        add: headers(&ops.add),
        remove: ops.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes of a VirtualService's `http` (given as YAML), against a
    /// mesh without services, and the problems' field paths.
    fn routes(http: &str) -> (Vec<l7::Route>, Vec<String>) {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: shop}}\nspec:\n  hosts: [web]\n  http: {http}\n"
        );
        let mut objects = api::manifest::parse(&yaml).unwrap().objects;
        let Some(api::manifest::Object::VirtualService(vs)) = objects.pop() else {
            panic!("{yaml}")
        };
        let mut problems = Vec::new();
        let mut report = Report {
            object: PolicyRef::new(Kind::VirtualService, "shop", "v"),
            problems: &mut problems,
        };
        let services = Services::default();
        let routes = Translate {
            report: &mut report,
            mesh: &MeshConfig::default(),
            namespace: "shop",
            name: "v",
            hosts: &BTreeMap::new(),
            services: &services,
        }
        .routes(&vs.spec.http);
        let fields = problems
            .iter()
            .filter_map(|p| p.field().map(str::to_string))
            .collect();
        (routes, fields)
    }

    #[test]
    fn retry_conditions_expand_as_envoy_names_them() {
        let (r, fields) = routes(
            r#"[{route: [{destination: {host: web}}], retries: {attempts: 4, retryOn: "5xx,retriable-4xx,reset,deadline-exceeded,retriable-status-codes,envoy-ratelimited"}}]"#,
        );
        let retry = r[0].retry.clone().unwrap();
        assert_eq!(retry.attempts, 4);
        let mut codes: Vec<u32> = (500..=599).collect();
        codes.insert(0, 409);
        assert_eq!(retry.codes, codes);
        assert!(retry.on_connect_failure && retry.on_refused_stream && retry.on_reset);
        assert_eq!(retry.grpc_codes, [4]);
        // The unknown condition is reported; the destination is no Service.
        assert_eq!(
            fields,
            [
                "spec.http[0].route[0].destination.host",
                "spec.http[0].retries.retryOn"
            ]
        );
    }

    #[test]
    fn uri_rewrites_replace_the_matched_prefix_or_the_path() {
        use l7::path_rewrite::Kind;
        let (r, _) = routes(
            "[{match: [{uri: {prefix: /a}}], rewrite: {uri: /b}, route: [{destination: {host: web}}]}, {match: [{uri: {exact: /c}}], rewrite: {uri: /d}, route: [{destination: {host: web}}]}]",
        );
        let path = |i: usize| r[i].rewrite.clone().unwrap().path.unwrap().kind.unwrap();
        assert_eq!(path(0), Kind::Prefix("/b".into()));
        assert_eq!(path(1), Kind::FullPath("/d".into()));
    }

    #[test]
    fn a_fault_without_a_percentage_never_fires_and_bad_values_are_named() {
        let (r, fields) = routes(
            "[{fault: {abort: {httpStatus: 503}, delay: {exponentialDelay: 1s}}, route: [{destination: {host: web}}]}, {fault: {abort: {httpStatus: 503, percentage: {value: 120}}}, timeout: 1 minute, route: [{destination: {host: web}}]}]",
        );
        let abort = r[0].fault.unwrap().abort.unwrap();
        assert_eq!(abort.per_million, 0);
        assert!(r[1].fault.is_none());
        assert!(r[1].timeouts.is_none());
        assert_eq!(
            fields
                .iter()
                .filter(|f| !f.ends_with("destination.host"))
                .collect::<Vec<_>>(),
            [
                "spec.http[0].fault.delay.exponentialDelay",
                "spec.http[1].timeout",
                "spec.http[1].fault.abort.percentage.value",
            ]
        );
    }
}
