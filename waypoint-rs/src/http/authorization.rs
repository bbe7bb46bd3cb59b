//! L7 AuthorizationPolicy as the waypoint enforces it: `l7::HttpAuthorization`
//! read into [`Policy`] once (CIDRs parsed, string matches and path templates
//! validated), then the pure decisions [`authorize`] (HTTP requests) and
//! [`authorize_tcp`] (connections the waypoint does not read as HTTP).
//!
//! Semantics (Istio's, as Envoy's RBAC filter evaluates what istiod builds):
//! - over every policy that applies, in order: any DENY matching denies; else,
//!   when at least one ALLOW applies, one must match; else the request is
//!   allowed;
//! - a policy matches when any rule does; a policy without rules matches
//!   nothing (istio/istio `builder.go`, `rbacPolicyMatchNever`);
//! - a rule matches when `from` is empty or one source matches, `to` is empty
//!   or one operation matches, and every `when` holds;
//! - within a source/operation/condition every field set must hold (values of
//!   one field are alternatives) and no value of its `not_` form may match;
//!   an empty source or operation matches everything.
//! - `hosts` are case-insensitive; a value without a port matches the host
//!   on any port;
//! - a request without a verified JWT has no request principal, audiences,
//!   presenter or claims: a field requiring one fails, its `not_` form holds.
//!
//! The string and CIDR matching is proxy-core's ([`proxy_core::authorization`]),
//! so L4 and L7 policies read the same value the same way.
//!
//! TCP traffic (istio/istio `pilot/pkg/security/authz/model/model.go`,
//! `rule.checkError`, and `builder.go` `Builder.build`): a field that only an
//! HTTP request has (request principals, hosts, methods, paths,
//! `request.*` conditions) makes an ALLOW rule match nothing (the rule is left
//! out: the policy allows less) and is ignored in a DENY rule (the rule
//! denies more).

use std::net::{IpAddr, SocketAddr};

use api::l7;
use api::security as xds;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use ipnet::IpNet;
use proxy_core::authorization::{StringMatch, cidr, field, string_match};
use regex::Regex;

use crate::request::{
    Authenticated, Authz, Downstream, FieldError, FromProto, Refusal, ResponseFlag, Target,
};

/// The body of a 403 written for a denied request: Envoy's RBAC filter
/// (`source/extensions/filters/http/rbac/rbac_filter.cc`,
/// `RoleBasedAccessControlFilter::decodeHeaders`).
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Upper bound on a compiled path template, so one policy cannot make the
/// waypoint build a huge automaton.
const TEMPLATE_REGEX_SIZE_LIMIT: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// One AuthorizationPolicy with targetRefs, ready to evaluate.
#[derive(Clone, Debug)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// What istiod could not translate (for /config_dump and denial logs).
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
}

#[derive(Clone, Debug, Default)]
pub struct Operation {
    /// Lower-cased at conversion; compared with the request's host
    /// lower-cased, with and without its port (a value without a port matches
    /// any port, one with a port only that port).
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<PathPattern>,
    pub not_paths: Vec<PathPattern>,
}

/// A `paths` value: a string match (exact, `prefix*`, `*suffix`, `*`) or a
/// path template with `{*}` / `{**}`.
#[derive(Clone, Debug)]
pub enum PathPattern {
    Match(StringMatch),
    Template(PathTemplate),
}

/// A path template as Envoy's `uri_template` matcher reads it: `{*}` is one
/// non-empty segment, `{**}` any remaining text (zero or more segments,
/// slashes included) and must be the last operator.
#[derive(Clone, Debug)]
pub struct PathTemplate {
    pub segments: Vec<String>,
    regex: Regex,
}

/// What a `when` condition reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[<name>]`; several values are joined with `,`.
    RequestHeader(HeaderName),
    /// `request.auth.claims[a][b]...`; a list claim matches when any string
    /// element does.
    RequestClaim(Vec<String>),
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

impl ConditionKey {
    /// Keys whose values are CIDRs (`ip_values`), not strings.
    fn takes_ips(&self) -> bool {
        matches!(
            self,
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp
        )
    }

    /// Keys only an HTTP request has.
    fn http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestClaim(_)
                | ConditionKey::RequestPrincipal
                | ConditionKey::RequestAudiences
                | ConditionKey::RequestPresenter
        )
    }
}

#[derive(Clone, Debug)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
    pub ip_values: Vec<IpNet>,
    pub not_ip_values: Vec<IpNet>,
}

/// What the data path knows about one HTTP request when it authorizes it
/// (after [`crate::http::jwt::authenticate`]).
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// The client, from the HBONE session.
    pub downstream: &'a Downstream,
    /// What the CONNECT addressed: `ports` and `destination.port` compare
    /// with its port.
    pub target: &'a Target,
    /// `destination.ip`: the address the client addressed (the CONNECT
    /// authority: service VIP or workload IP).
    pub destination: SocketAddr,
    pub method: &'a str,
    /// The request path without the query.
    pub path: &'a str,
    /// `:authority` / `Host` as received.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// The verified JWT, if any.
    pub authenticated: Option<&'a Authenticated>,
    /// `connection.sni`; `None` when the request came without one.
    pub sni: Option<&'a str>,
}

/// What the data path knows about a connection it forwards as opaque bytes.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionFacts<'a> {
    pub downstream: &'a Downstream,
    pub target: &'a Target,
    pub destination: SocketAddr,
    pub sni: Option<&'a str>,
}

/// The HTTP part of the facts; absent for TCP.
struct HttpFacts<'a> {
    method: &'a str,
    path: &'a str,
    /// Lower-cased, as received (with its port, if any).
    host: String,
    /// Lower-cased, without the port.
    host_name: String,
    headers: &'a HeaderMap,
    authenticated: Option<&'a Authenticated>,
}

/// Everything a match reads, computed once per decision.
struct Facts<'a> {
    principal: String,
    namespace: &'a str,
    source_ip: IpAddr,
    destination: SocketAddr,
    port: u16,
    sni: Option<&'a str>,
    http: Option<HttpFacts<'a>>,
}

impl<'a> Facts<'a> {
    fn new(
        downstream: &'a Downstream,
        target: &Target,
        destination: SocketAddr,
        sni: Option<&'a str>,
        http: Option<HttpFacts<'a>>,
    ) -> Self {
        let id = &downstream.identity;
        Facts {
            principal: format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            ),
            namespace: id.namespace(),
            source_ip: downstream.address.ip(),
            destination,
            port: target.port(),
            sni,
            http,
        }
    }
}

/// Decides one HTTP request over the policies that apply to it, in the order
/// the configuration lists them (the waypoint's Gateway-wide ones, then the
/// service's or workload's).
pub fn authorize<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    request: &RequestFacts<'_>,
) -> Authz {
    let http = HttpFacts {
        method: request.method,
        path: request.path,
        host: request.host.to_ascii_lowercase(),
        host_name: host_without_port(request.host).to_ascii_lowercase(),
        headers: request.headers,
        authenticated: request.authenticated,
    };
    let facts = Facts::new(
        request.downstream,
        request.target,
        request.destination,
        request.sni,
        Some(http),
    );
    decide(policies, &facts)
}

/// Decides a connection the waypoint forwards as TCP (a port declared TCP, or
/// bytes that are not HTTP). HTTP-only fields: see the module docs.
pub fn authorize_tcp<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    connection: &ConnectionFacts<'_>,
) -> Authz {
    let facts = Facts::new(
        connection.downstream,
        connection.target,
        connection.destination,
        connection.sni,
        None,
    );
    decide(policies, &facts)
}

fn decide<'p>(policies: impl IntoIterator<Item = &'p Policy>, facts: &Facts<'_>) -> Authz {
    let mut allows = Vec::new();
    for policy in policies {
        match policy.action {
            Action::Deny if policy.matches(facts) => {
                return Authz::Denied {
                    policy: policy.key(),
                };
            }
            Action::Deny => {}
            Action::Allow => allows.push(policy),
        }
    }
    if allows.is_empty() || allows.iter().any(|p| p.matches(facts)) {
        return Authz::Allowed;
    }
    let keys: Vec<String> = allows.iter().map(|p| p.key()).collect();
    Authz::Denied {
        policy: format!("no ALLOW policy matched ({})", keys.join(", ")),
    }
}

/// The response for a denied request: 403 with Envoy's body, `text/plain`
/// as Envoy's local replies. No response flag (Envoy sets none for RBAC).
pub fn denied() -> Refusal {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Refusal {
        status: StatusCode::FORBIDDEN,
        body: DENIED_BODY.into(),
        flag: ResponseFlag::None,
        headers,
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

impl Policy {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn matches(&self, facts: &Facts<'_>) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(self.action, facts))
    }
}

impl Rule {
    /// Whether any field of the rule needs an HTTP request.
    fn http_only(&self) -> bool {
        self.from
            .iter()
            .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
            || self.to.iter().any(|o| {
                !o.hosts.is_empty()
                    || !o.not_hosts.is_empty()
                    || !o.methods.is_empty()
                    || !o.not_methods.is_empty()
                    || !o.paths.is_empty()
                    || !o.not_paths.is_empty()
            })
            || self.when.iter().any(|c| c.key.http_only())
    }

    fn matches(&self, action: Action, facts: &Facts<'_>) -> bool {
        if facts.http.is_none() && action == Action::Allow && self.http_only() {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(facts)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(facts)))
            && self.when.iter().all(|c| c.holds(facts))
    }
}

impl Source {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let ip = facts.source_ip;
        field(&self.principals, &self.not_principals, |m| {
            m.matches(&facts.principal)
        }) && field(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(facts.namespace)
        }) && field(&self.ip_blocks, &self.not_ip_blocks, |n| n.contains(&ip))
            && field(&self.remote_ip_blocks, &self.not_remote_ip_blocks, |n| {
                n.contains(&ip)
            })
            && match &facts.http {
                // TCP: ignored here; an ALLOW rule using it never gets here.
                None => true,
                Some(http) => field(
                    &self.request_principals,
                    &self.not_request_principals,
                    |m| http.authenticated.is_some_and(|a| m.matches(&a.principal)),
                ),
            }
    }
}

impl Operation {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        if !field(&self.ports, &self.not_ports, |p| *p == facts.port) {
            return false;
        }
        let Some(http) = &facts.http else {
            return true;
        };
        field(&self.hosts, &self.not_hosts, |m| {
            m.matches(&http.host_name) || m.matches(&http.host)
        }) && field(&self.methods, &self.not_methods, |m| m.matches(http.method))
            && field(&self.paths, &self.not_paths, |p| p.matches(http.path))
    }
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Match(m) => m.matches(path),
            PathPattern::Template(t) => t.regex.is_match(path),
        }
    }
}

impl Condition {
    fn holds(&self, facts: &Facts<'_>) -> bool {
        let ip = |ip: IpAddr| field(&self.ip_values, &self.not_ip_values, |n| n.contains(&ip));
        let one = |value: Option<&str>| {
            field(&self.values, &self.not_values, |m| {
                value.is_some_and(|v| m.matches(v))
            })
        };
        let any = |values: &[&str]| {
            field(&self.values, &self.not_values, |m| {
                values.iter().any(|v| m.matches(v))
            })
        };
        match &self.key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp => ip(facts.source_ip),
            ConditionKey::DestinationIp => ip(facts.destination.ip()),
            ConditionKey::DestinationPort => one(Some(&facts.port.to_string())),
            ConditionKey::SourceNamespace => one(Some(facts.namespace)),
            ConditionKey::SourcePrincipal => one(Some(&facts.principal)),
            ConditionKey::ConnectionSni => one(facts.sni),
            key => {
                // HTTP-only: ignored for TCP (an ALLOW rule using it never
                // gets here).
                let Some(http) = &facts.http else {
                    return true;
                };
                let auth = http.authenticated;
                match key {
                    ConditionKey::RequestHeader(name) => {
                        one(joined_header(http.headers, name).as_deref())
                    }
                    ConditionKey::RequestPrincipal => one(auth.map(|a| a.principal.as_str())),
                    ConditionKey::RequestPresenter => {
                        one(auth.and_then(|a| a.presenter.as_deref()))
                    }
                    ConditionKey::RequestAudiences => {
                        let auds: Vec<&str> = auth
                            .map(|a| a.audiences.iter().map(String::as_str).collect())
                            .unwrap_or_default();
                        any(&auds)
                    }
                    ConditionKey::RequestClaim(path) => {
                        let values = auth
                            .map(|a| claim_strings(&a.claims, path))
                            .unwrap_or_default();
                        any(&values)
                    }
                    _ => unreachable!("non-HTTP keys are handled above"),
                }
            }
        }
    }
}

/// Every value of `name`, joined with `,` as Envoy's header matcher sees
/// them; `None` when the header is absent.
fn joined_header(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    Some(
        values
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// The string values at `path` in the claims: a string claim, or the string
/// elements of a list claim. Anything else (absent, number, object) has none.
fn claim_strings<'c>(claims: &'c serde_json::Value, path: &[String]) -> Vec<&'c str> {
    let mut at = claims;
    for step in path {
        match at.get(step) {
            Some(next) => at = next,
            None => return Vec::new(),
        }
    }
    match at {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    }
}

// --- conversion from the wire ---

fn core(e: proxy_core::authorization::Error) -> FieldError {
    let field = e.field().to_string();
    let message = e.to_string();
    let reason = message
        .strip_prefix(&format!("{field}: "))
        .unwrap_or(&message)
        .to_string();
    FieldError::new(field, reason)
}

fn strings(path: &str, name: &str, v: &[xds::StringMatch]) -> Result<Vec<StringMatch>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| string_match(&format!("{path}{name}[{i}]"), s).map_err(core))
        .collect()
}

fn nets(path: &str, name: &str, v: &[xds::Address]) -> Result<Vec<IpNet>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, a)| cidr(&format!("{path}{name}[{i}]"), a).map_err(core))
        .collect()
}

fn ports(path: &str, name: &str, v: &[u32]) -> Result<Vec<u16>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p).map_err(|_| {
                FieldError::new(
                    format!("{path}{name}[{i}]"),
                    format!("port {p} is out of range (0-65535)"),
                )
            })
        })
        .collect()
}

fn lowercase(m: StringMatch) -> StringMatch {
    match m {
        StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
        StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
        StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
        StringMatch::Presence() => StringMatch::Presence(),
    }
}

impl FromProto<l7::HttpAuthorization> for Policy {
    fn from_proto(p: &l7::HttpAuthorization) -> Result<Self, FieldError> {
        if p.namespace.is_empty() {
            return Err(FieldError::new("namespace", "is required"));
        }
        if p.name.is_empty() {
            return Err(FieldError::new("name", "is required"));
        }
        let action = match l7::Action::try_from(p.action) {
            Ok(l7::Action::Allow) => Action::Allow,
            Ok(l7::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(FieldError::new(
                    "action",
                    format!(
                        "unknown value {}; is this waypoint older than the control plane?",
                        p.action
                    ),
                ));
            }
        };
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(&format!("rules[{i}]."), r))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            action,
            rules,
            problems: p.problems.clone(),
        })
    }
}

fn rule(path: &str, r: &l7::Rule) -> Result<Rule, FieldError> {
    Ok(Rule {
        from: r
            .from
            .iter()
            .enumerate()
            .map(|(i, s)| source(&format!("{path}from[{i}]."), s))
            .collect::<Result<_, _>>()?,
        to: r
            .to
            .iter()
            .enumerate()
            .map(|(i, o)| operation(&format!("{path}to[{i}]."), o))
            .collect::<Result<_, _>>()?,
        when: r
            .when
            .iter()
            .enumerate()
            .map(|(i, c)| condition(&format!("{path}when[{i}]."), c))
            .collect::<Result<_, _>>()?,
    })
}

fn source(path: &str, s: &l7::RequestSource) -> Result<Source, FieldError> {
    Ok(Source {
        principals: strings(path, "principals", &s.principals)?,
        not_principals: strings(path, "not_principals", &s.not_principals)?,
        request_principals: strings(path, "request_principals", &s.request_principals)?,
        not_request_principals: strings(path, "not_request_principals", &s.not_request_principals)?,
        namespaces: strings(path, "namespaces", &s.namespaces)?,
        not_namespaces: strings(path, "not_namespaces", &s.not_namespaces)?,
        ip_blocks: nets(path, "ip_blocks", &s.ip_blocks)?,
        not_ip_blocks: nets(path, "not_ip_blocks", &s.not_ip_blocks)?,
        remote_ip_blocks: nets(path, "remote_ip_blocks", &s.remote_ip_blocks)?,
        not_remote_ip_blocks: nets(path, "not_remote_ip_blocks", &s.not_remote_ip_blocks)?,
    })
}

fn operation(path: &str, o: &l7::RequestOperation) -> Result<Operation, FieldError> {
    let paths = |name: &str, v: &[l7::PathPattern]| {
        v.iter()
            .enumerate()
            .map(|(i, p)| path_pattern(&format!("{path}{name}[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()
    };
    let hosts = |name: &str, v: &[xds::StringMatch]| {
        strings(path, name, v).map(|v| v.into_iter().map(lowercase).collect())
    };
    Ok(Operation {
        hosts: hosts("hosts", &o.hosts)?,
        not_hosts: hosts("not_hosts", &o.not_hosts)?,
        ports: ports(path, "ports", &o.ports)?,
        not_ports: ports(path, "not_ports", &o.not_ports)?,
        methods: strings(path, "methods", &o.methods)?,
        not_methods: strings(path, "not_methods", &o.not_methods)?,
        paths: paths("paths", &o.paths)?,
        not_paths: paths("not_paths", &o.not_paths)?,
    })
}

fn path_pattern(path: &str, p: &l7::PathPattern) -> Result<PathPattern, FieldError> {
    use l7::path_pattern::Kind;
    match &p.kind {
        Some(Kind::Match(m)) => string_match(&format!("{path}.match"), m)
            .map(PathPattern::Match)
            .map_err(core),
        Some(Kind::Template(t)) => path_template(&format!("{path}.template.segments"), &t.segments)
            .map(PathPattern::Template),
        None => Err(FieldError::new(path, "a path needs a match or a template")),
    }
}

fn path_template(path: &str, segments: &[String]) -> Result<PathTemplate, FieldError> {
    if segments.is_empty() {
        return Err(FieldError::new(
            path,
            "a template needs at least one segment",
        ));
    }
    let mut regex = String::from("^");
    let mut after_any = false;
    for (i, segment) in segments.iter().enumerate() {
        let at = || format!("{path}[{i}]");
        regex.push('/');
        match segment.as_str() {
            "{*}" | "{**}" if after_any => {
                return Err(FieldError::new(at(), "{**} must be the last operator"));
            }
            "{*}" => regex.push_str("[^/]+"),
            "{**}" => {
                regex.push_str(".*");
                after_any = true;
            }
            literal if literal.contains(['*', '{', '}', '/']) => {
                return Err(FieldError::new(
                    at(),
                    format!(
                        "{literal:?}: a segment is {{*}}, {{**}} or literal text without '*', '{{', '}}' or '/'"
                    ),
                ));
            }
            literal => regex.push_str(&regex::escape(literal)),
        }
    }
    regex.push('$');
    let regex = regex::RegexBuilder::new(&regex)
        .size_limit(TEMPLATE_REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| FieldError::new(path, format!("template does not compile: {e}")))?;
    Ok(PathTemplate {
        segments: segments.to_vec(),
        regex,
    })
}

fn condition(path: &str, c: &l7::Condition) -> Result<Condition, FieldError> {
    use l7::condition::Key;
    let key = match &c.key {
        None => return Err(FieldError::new(format!("{path}key"), "is required")),
        Some(Key::RequestHeader(name)) => {
            ConditionKey::RequestHeader(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                FieldError::new(
                    format!("{path}request_header"),
                    format!("{name:?} is not a valid header name"),
                )
            })?)
        }
        Some(Key::RequestClaim(claim)) => {
            if claim.path.is_empty() || claim.path.iter().any(String::is_empty) {
                return Err(FieldError::new(
                    format!("{path}request_claim.path"),
                    "a claim path needs at least one step and no empty step",
                ));
            }
            ConditionKey::RequestClaim(claim.path.clone())
        }
        Some(Key::RequestPrincipal(_)) => ConditionKey::RequestPrincipal,
        Some(Key::RequestAudiences(_)) => ConditionKey::RequestAudiences,
        Some(Key::RequestPresenter(_)) => ConditionKey::RequestPresenter,
        Some(Key::SourceIp(_)) => ConditionKey::SourceIp,
        Some(Key::RemoteIp(_)) => ConditionKey::RemoteIp,
        Some(Key::SourceNamespace(_)) => ConditionKey::SourceNamespace,
        Some(Key::SourcePrincipal(_)) => ConditionKey::SourcePrincipal,
        Some(Key::DestinationIp(_)) => ConditionKey::DestinationIp,
        Some(Key::DestinationPort(_)) => ConditionKey::DestinationPort,
        Some(Key::ConnectionSni(_)) => ConditionKey::ConnectionSni,
    };
    let condition = Condition {
        values: strings(path, "values", &c.values)?,
        not_values: strings(path, "not_values", &c.not_values)?,
        ip_values: nets(path, "ip_values", &c.ip_values)?,
        not_ip_values: nets(path, "not_ip_values", &c.not_ip_values)?,
        key,
    };
    let has_strings = !condition.values.is_empty() || !condition.not_values.is_empty();
    let has_ips = !condition.ip_values.is_empty() || !condition.not_ip_values.is_empty();
    if condition.key.takes_ips() {
        if has_strings {
            return Err(FieldError::new(
                format!("{path}values"),
                "this key takes CIDRs in ip_values / not_ip_values",
            ));
        }
        if !has_ips {
            return Err(FieldError::new(
                format!("{path}ip_values"),
                "a condition needs ip_values or not_ip_values",
            ));
        }
    } else {
        if has_ips {
            return Err(FieldError::new(
                format!("{path}ip_values"),
                "only source_ip, remote_ip and destination_ip take CIDRs",
            ));
        }
        if !has_strings {
            return Err(FieldError::new(
                format!("{path}values"),
                "a condition needs values or not_values",
            ));
        }
    }
    Ok(condition)
}

#[cfg(test)]
mod tests;
