//! Routing: the first route of a service's RouteTable whose ports and one of
//! whose matches hold (istiod already sorted the table in Gateway API
//! precedence order), then a weighted backend. A served service without a
//! RouteTable forwards to itself: that is a real default route, not an error.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use rand::Rng;
use regex::Regex;

use api::l7;
use proxy_core::store::NamespacedHostname;

use crate::config::convert;
use crate::http::fault::Fault;
use crate::http::modify::{HeaderModifier, Redirect, UrlRewrite};
use crate::request::{FieldError, FromProto, Refusal, ResponseFlag, Target};

/// Where a piece of configuration came from (`kind/namespace/name` and the
/// rule index), for the access log and `/config_dump`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub rule: u32,
}

impl From<&l7::Origin> for Origin {
    fn from(o: &l7::Origin) -> Self {
        Origin {
            kind: o.kind.clone(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            rule: o.rule,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{} rule {}",
            self.kind, self.namespace, self.name, self.rule
        )
    }
}

/// Every route of one service, in match order.
#[derive(Clone, Debug)]
pub struct RouteTable {
    pub service: NamespacedHostname,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub origin: Origin,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// Alternatives; empty: every request.
    pub matches: Vec<RouteMatch>,
    pub action: Action,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
    pub timeouts: Timeouts,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
}

#[derive(Clone, Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    DirectResponse { status: StatusCode, body: Bytes },
}

#[derive(Clone, Debug, Default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<HeaderMatch>,
    pub method: Option<Method>,
    pub grpc: Option<GrpcMatch>,
    pub without_headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact {
        value: String,
        ignore_case: bool,
    },
    /// Whole path segments; `value` has no trailing `/` (`""` = everything).
    SegmentPrefix {
        value: String,
        ignore_case: bool,
    },
    Prefix {
        value: String,
        ignore_case: bool,
    },
    /// Full match (case folding compiled in).
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub struct HeaderMatch {
    /// Header name (lower case) or query parameter name.
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    /// Full match.
    Regex(Regex),
    Prefix(String),
    Present,
}

#[derive(Clone, Debug)]
pub enum GrpcMatch {
    Exact {
        service: Option<String>,
        method: Option<String>,
    },
    Regex {
        service: Option<Regex>,
        method: Option<Regex>,
    },
}

#[derive(Clone, Debug, Default)]
pub struct Forward {
    pub backends: Vec<Backend>,
    total_weight: u64,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub service: NamespacedHostname,
    /// `None`: the port the request was addressed to.
    pub port: Option<u16>,
    pub weight: u32,
    pub subset: Option<String>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    /// Requests routed here get 500 (Gateway API's rule for an unresolved
    /// backendRef), the reason goes to the log.
    pub invalid_reason: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Mirror {
    pub backend: Backend,
    pub per_million: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries included.
    pub request: Option<Duration>,
    /// One attempt.
    pub per_try: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub on_connect_failure: bool,
    pub on_refused_stream: bool,
    pub on_reset: bool,
    pub grpc_codes: Vec<u32>,
    /// First backoff; `None`: the binary's default.
    pub backoff: Option<Duration>,
}

// ------------------------------------------------------------------------------------------
// Conversion

impl FromProto<l7::RouteTable> for RouteTable {
    fn from_proto(p: &l7::RouteTable) -> Result<Self, FieldError> {
        Ok(RouteTable {
            service: NamespacedHostname::new(&p.namespace, &p.hostname),
            routes: convert::each("routes", &p.routes)?,
        })
    }
}

impl FromProto<l7::Route> for Route {
    fn from_proto(p: &l7::Route) -> Result<Self, FieldError> {
        use l7::route::Action as A;
        let action = match &p.action {
            Some(A::Forward(f)) => {
                Action::Forward(Forward::from_proto(f).map_err(|e| e.within("forward"))?)
            }
            Some(A::Redirect(r)) => {
                Action::Redirect(Redirect::from_proto(r).map_err(|e| e.within("redirect"))?)
            }
            Some(A::DirectResponse(d)) => Action::DirectResponse {
                status: u16::try_from(d.status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .filter(|s| s.as_u16() >= 200)
                    .ok_or_else(|| {
                        FieldError::new(
                            "direct_response.status",
                            format!("{} is not an HTTP status in 200-599", d.status),
                        )
                    })?,
                body: Bytes::copy_from_slice(&d.body),
            },
            None => {
                return Err(FieldError::new(
                    "action",
                    "one of forward, redirect, direct_response is required",
                ));
            }
        };
        let ports = p
            .ports
            .iter()
            .enumerate()
            .map(|(i, port)| convert::port(&format!("ports[{i}]"), *port))
            .collect::<Result<_, _>>()?;
        Ok(Route {
            origin: p.origin.as_ref().map(Origin::from).unwrap_or_default(),
            ports,
            matches: convert::each("matches", &p.matches)?,
            action,
            request_headers: convert::nested("request_headers", p.request_headers.as_ref())?
                .unwrap_or_default(),
            response_headers: convert::nested("response_headers", p.response_headers.as_ref())?
                .unwrap_or_default(),
            rewrite: convert::nested("rewrite", p.rewrite.as_ref())?,
            mirrors: convert::each("mirrors", &p.mirrors)?,
            timeouts: match &p.timeouts {
                Some(t) => Timeouts {
                    request: convert::optional_duration("timeouts.request", t.request.as_ref())?,
                    per_try: convert::optional_duration("timeouts.per_try", t.per_try.as_ref())?,
                },
                None => Timeouts::default(),
            },
            retry: convert::nested("retry", p.retry.as_ref())?,
            fault: convert::nested("fault", p.fault.as_ref())?,
        })
    }
}

impl FromProto<l7::RouteMatch> for RouteMatch {
    fn from_proto(p: &l7::RouteMatch) -> Result<Self, FieldError> {
        let method = (!p.method.is_empty())
            .then(|| {
                Method::from_bytes(p.method.as_bytes()).map_err(|_| {
                    FieldError::new("method", format!("{:?} is not an HTTP method", p.method))
                })
            })
            .transpose()?;
        Ok(RouteMatch {
            path: convert::nested("path", p.path.as_ref())?,
            headers: convert::each("headers", &p.headers)?,
            query_params: convert::each("query_params", &p.query_params)?,
            method,
            grpc: convert::nested("grpc", p.grpc.as_ref())?,
            without_headers: convert::each("without_headers", &p.without_headers)?,
        })
    }
}

impl FromProto<l7::PathMatch> for PathMatch {
    fn from_proto(p: &l7::PathMatch) -> Result<Self, FieldError> {
        use l7::path_match::Kind;
        let ignore_case = p.ignore_case;
        let absolute = |field: &str, v: &str| {
            if v.starts_with('/') {
                Ok(v.to_string())
            } else {
                Err(FieldError::new(field, format!("{v:?} must start with /")))
            }
        };
        match &p.kind {
            Some(Kind::Exact(v)) => Ok(PathMatch::Exact {
                value: absolute("exact", v)?,
                ignore_case,
            }),
            Some(Kind::SegmentPrefix(v)) => Ok(PathMatch::SegmentPrefix {
                value: absolute("segment_prefix", v)?
                    .trim_end_matches('/')
                    .to_string(),
                ignore_case,
            }),
            Some(Kind::Prefix(v)) => Ok(PathMatch::Prefix {
                value: v.clone(),
                ignore_case,
            }),
            Some(Kind::Regex(r)) => Ok(PathMatch::Regex(convert::full_match_regex(
                "regex",
                r,
                ignore_case,
            )?)),
            None => Err(FieldError::new(
                "kind",
                "one of exact, segment_prefix, prefix, regex is required",
            )),
        }
    }
}

impl FromProto<l7::HeaderMatch> for HeaderMatch {
    fn from_proto(p: &l7::HeaderMatch) -> Result<Self, FieldError> {
        use l7::header_match::Kind;
        if p.name.is_empty() {
            return Err(FieldError::new("name", "a name is required"));
        }
        let value = match &p.kind {
            Some(Kind::Exact(v)) => ValueMatch::Exact(v.clone()),
            Some(Kind::Regex(r)) => {
                ValueMatch::Regex(convert::full_match_regex("regex", r, false)?)
            }
            Some(Kind::Prefix(v)) => ValueMatch::Prefix(v.clone()),
            Some(Kind::Present(true)) => ValueMatch::Present,
            Some(Kind::Present(false)) => {
                return Err(FieldError::new("present", "present must be true when set"));
            }
            None => {
                return Err(FieldError::new(
                    "kind",
                    "one of exact, regex, prefix, present is required",
                ));
            }
        };
        Ok(HeaderMatch {
            name: p.name.to_ascii_lowercase(),
            value,
        })
    }
}

impl FromProto<l7::GrpcMethodMatch> for GrpcMatch {
    fn from_proto(p: &l7::GrpcMethodMatch) -> Result<Self, FieldError> {
        let text = |v: &str| (!v.is_empty()).then(|| v.to_string());
        if p.regex {
            let re = |field: &str, v: &str| {
                (!v.is_empty())
                    .then(|| convert::full_match_regex(field, v, false))
                    .transpose()
            };
            Ok(GrpcMatch::Regex {
                service: re("service", &p.service)?,
                method: re("method", &p.method)?,
            })
        } else {
            Ok(GrpcMatch::Exact {
                service: text(&p.service),
                method: text(&p.method),
            })
        }
    }
}

impl FromProto<l7::Forward> for Forward {
    fn from_proto(p: &l7::Forward) -> Result<Self, FieldError> {
        let backends: Vec<Backend> = convert::each("backends", &p.backends)?;
        let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
        Ok(Forward {
            backends,
            total_weight,
        })
    }
}

impl FromProto<l7::Backend> for Backend {
    fn from_proto(p: &l7::Backend) -> Result<Self, FieldError> {
        let invalid_reason = (!p.invalid_reason.is_empty()).then(|| p.invalid_reason.clone());
        // An unresolved backend may name nothing usable: it only takes its share of 500s.
        let service = match p.service.parse::<NamespacedHostname>() {
            Ok(s) => s,
            Err(_) if invalid_reason.is_some() => NamespacedHostname::new("", ""),
            Err(_) => {
                return Err(FieldError::new(
                    "service",
                    format!("{:?} is not of the form <namespace>/<hostname>", p.service),
                ));
            }
        };
        Ok(Backend {
            service,
            port: convert::optional_port("port", p.port)?,
            weight: p.weight,
            subset: (!p.subset.is_empty()).then(|| p.subset.clone()),
            request_headers: convert::nested("request_headers", p.request_headers.as_ref())?
                .unwrap_or_default(),
            response_headers: convert::nested("response_headers", p.response_headers.as_ref())?
                .unwrap_or_default(),
            invalid_reason,
        })
    }
}

impl FromProto<l7::Mirror> for Mirror {
    fn from_proto(p: &l7::Mirror) -> Result<Self, FieldError> {
        Ok(Mirror {
            backend: convert::nested("backend", p.backend.as_ref())?
                .ok_or_else(|| FieldError::new("backend", "a mirror needs a backend"))?,
            per_million: convert::per_million("per_million", p.per_million)?,
        })
    }
}

impl FromProto<l7::RetryPolicy> for RetryPolicy {
    fn from_proto(p: &l7::RetryPolicy) -> Result<Self, FieldError> {
        let codes = p
            .codes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                u16::try_from(*c)
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| {
                        FieldError::new(format!("codes[{i}]"), format!("{c} is not an HTTP status"))
                    })
            })
            .collect::<Result<_, _>>()?;
        if let Some((i, c)) = p.grpc_codes.iter().enumerate().find(|(_, c)| **c > 16) {
            return Err(FieldError::new(
                format!("grpc_codes[{i}]"),
                format!("{c} is not a gRPC status code (0-16)"),
            ));
        }
        Ok(RetryPolicy {
            attempts: p.attempts,
            codes,
            on_connect_failure: p.on_connect_failure,
            on_refused_stream: p.on_refused_stream,
            on_reset: p.on_reset,
            grpc_codes: p.grpc_codes.clone(),
            backoff: convert::optional_duration("backoff", p.backoff.as_ref())?,
        })
    }
}

// ------------------------------------------------------------------------------------------
// Matching

impl RouteTable {
    /// The first route for a request to `port` (the port the client
    /// addressed), with the match that held (for prefix rewrites).
    pub fn find<B>(&self, req: &Request<B>, port: u16) -> Option<(&Route, Option<&RouteMatch>)> {
        self.routes.iter().find_map(|route| {
            if !route.ports.is_empty() && !route.ports.contains(&port) {
                return None;
            }
            if route.matches.is_empty() {
                return Some((route, None));
            }
            route
                .matches
                .iter()
                .find(|m| m.matches(req))
                .map(|m| (route, Some(m)))
        })
    }
}

impl RouteMatch {
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        let headers = req.headers();
        let authority = req.uri().authority().map(|a| a.as_str());
        self.path
            .as_ref()
            .is_none_or(|p| p.matches(req.uri().path()))
            && self.method.as_ref().is_none_or(|m| m == req.method())
            && self
                .headers
                .iter()
                .all(|h| h.matches_header(headers, authority))
            && self
                .query_params
                .iter()
                .all(|q| q.matches_query(req.uri().query()))
            && self
                .grpc
                .as_ref()
                .is_none_or(|g| g.matches(req.uri().path()))
            && !self
                .without_headers
                .iter()
                .any(|h| h.matches_header(headers, authority))
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact { value, ignore_case } => eq(path, value, *ignore_case),
            PathMatch::Prefix { value, ignore_case } => starts_with(path, value, *ignore_case),
            PathMatch::SegmentPrefix { value, ignore_case } => {
                starts_with(path, value, *ignore_case)
                    && matches!(path.as_bytes().get(value.len()), None | Some(b'/'))
            }
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

fn eq(a: &str, b: &str, ignore_case: bool) -> bool {
    if ignore_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

fn starts_with(s: &str, prefix: &str, ignore_case: bool) -> bool {
    s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && eq(&s[..prefix.len()], prefix, ignore_case)
}

impl HeaderMatch {
    /// Against every value of the header joined with `,` (one logical
    /// value, as HTTP defines repeated fields); absent: no match. `host`
    /// is HTTP/2's `:authority` when the request has no `Host` header.
    fn matches_header(&self, headers: &HeaderMap, authority: Option<&str>) -> bool {
        let mut values = headers.get_all(self.name.as_str()).iter().peekable();
        if values.peek().is_none() {
            return match (self.name.as_str(), authority) {
                ("host", Some(authority)) => self.value.matches(authority),
                _ => false,
            };
        }
        if matches!(self.value, ValueMatch::Present) {
            return true;
        }
        let joined: Option<Vec<&str>> = values.map(|v| v.to_str().ok()).collect();
        joined.is_some_and(|parts| self.value.matches(&parts.join(",")))
    }

    /// Against the first occurrence of the parameter (Gateway API), compared
    /// as sent (no percent-decoding).
    fn matches_query(&self, query: Option<&str>) -> bool {
        let Some(query) = query else { return false };
        query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(name, _)| *name == self.name)
            .is_some_and(|(_, value)| self.value.matches(value))
    }
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => value == v,
            ValueMatch::Regex(re) => re.is_match(value),
            ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
            ValueMatch::Present => true,
        }
    }
}

impl GrpcMatch {
    /// gRPC paths are `/<package.Service>/<Method>`.
    pub fn matches(&self, path: &str) -> bool {
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return false;
        };
        match self {
            GrpcMatch::Exact {
                service: s,
                method: m,
            } => {
                s.as_deref().is_none_or(|s| s == service)
                    && m.as_deref().is_none_or(|m| m == method)
            }
            GrpcMatch::Regex {
                service: s,
                method: m,
            } => {
                s.as_ref().is_none_or(|s| s.is_match(service))
                    && m.as_ref().is_none_or(|m| m.is_match(method))
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Backend choice

impl Mirror {
    /// Whether this request is copied to the mirror backend.
    pub fn sampled(&self, rng: &mut impl Rng) -> bool {
        super::drawn(self.per_million, rng)
    }
}

impl Forward {
    /// A backend by weight; `rng` is injected so tests can seed it.
    /// No backend or all weights 0: 500. A backend with an `invalid_reason`
    /// answers 500 for its share.
    pub fn pick(&self, rng: &mut impl Rng) -> Result<&Backend, Refusal> {
        if self.total_weight == 0 {
            return Err(internal_error());
        }
        let mut ticket = rng.random_range(0..self.total_weight);
        let backend = self
            .backends
            .iter()
            .find(|b| {
                let w = u64::from(b.weight);
                if ticket < w {
                    true
                } else {
                    ticket -= w;
                    false
                }
            })
            .expect("tickets are below the total weight");
        match &backend.invalid_reason {
            Some(_) => Err(internal_error()),
            None => Ok(backend),
        }
    }
}

/// 500 with no flag: Gateway API's answer for traffic to an invalid backend.
fn internal_error() -> Refusal {
    Refusal {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: "".into(),
        flag: ResponseFlag::None,
        headers: HeaderMap::new(),
    }
}

/// 404 `NR`: no route matched (Gateway API: "404 when no route matches").
pub fn no_route() -> Refusal {
    Refusal {
        status: StatusCode::NOT_FOUND,
        body: "".into(),
        flag: ResponseFlag::NoRoute,
        headers: HeaderMap::new(),
    }
}

/// Where a forwarded request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A service (the addressed one, or a route's backend), its port and
    /// optional DestinationRule subset.
    Service {
        service: NamespacedHostname,
        port: u16,
        subset: Option<String>,
    },
    /// The addressed workload itself (a workload target has no routes).
    Workload { uid: String, port: u16 },
}

/// The routing decision for one request.
#[derive(Debug)]
pub enum Routing<'a> {
    Forward {
        /// `None`: the default route (no RouteTable).
        route: Option<&'a Route>,
        /// The match that held, for rewrites.
        matched: Option<&'a RouteMatch>,
        /// The chosen backend (its per-backend header filters), `None` on the
        /// default route.
        backend: Option<&'a Backend>,
        destination: Destination,
    },
    /// Answer with a redirect (`Redirect::response`).
    Redirect {
        route: &'a Route,
        matched: Option<&'a RouteMatch>,
        redirect: &'a Redirect,
    },
    /// Answer with this status and body.
    Direct {
        route: &'a Route,
        status: StatusCode,
        body: Bytes,
    },
}

/// Routes one request for `target`. `table` is the served service's
/// RouteTable (`Served::routes`); `None` forwards to what the client
/// addressed. Errors are the responses to write (404 NR, 500).
pub fn route<'a, B>(
    table: Option<&'a RouteTable>,
    target: &Target,
    req: &Request<B>,
    rng: &mut impl Rng,
) -> Result<Routing<'a>, Refusal> {
    let port = target.port();
    let Some(table) = table else {
        let destination = match target {
            Target::Service {
                namespace,
                hostname,
                port,
                ..
            } => Destination::Service {
                service: NamespacedHostname::new(namespace, hostname),
                port: *port,
                subset: None,
            },
            Target::Workload { uid, port, .. } => Destination::Workload {
                uid: uid.clone(),
                port: *port,
            },
        };
        return Ok(Routing::Forward {
            route: None,
            matched: None,
            backend: None,
            destination,
        });
    };
    let (route, matched) = table.find(req, port).ok_or_else(no_route)?;
    match &route.action {
        Action::Forward(forward) => {
            let backend = forward.pick(rng)?;
            Ok(Routing::Forward {
                route: Some(route),
                matched,
                backend: Some(backend),
                destination: Destination::Service {
                    service: backend.service.clone(),
                    port: backend.port.unwrap_or(port),
                    subset: backend.subset.clone(),
                },
            })
        }
        Action::Redirect(redirect) => Ok(Routing::Redirect {
            route,
            matched,
            redirect,
        }),
        Action::DirectResponse { status, body } => Ok(Routing::Direct {
            route,
            status: *status,
            body: body.clone(),
        }),
    }
}

#[cfg(test)]
mod tests;
