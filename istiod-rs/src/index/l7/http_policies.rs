//! AuthorizationPolicy with `targetRefs`, or attached by selector or
//! namespace with HTTP attributes (ALLOW, DENY: see `l7.rs`) ->
//! `HttpAuthorization`, key `<ns>/<name>`, every field of the policy (L4
//! and L7 attributes alike) in the waypoint's terms.
//!
//! - action: ALLOW, DENY; CUSTOM is served as DENY of what its rules match
//!   (the waypoint calls no external authorizer); AUDIT and dry-run
//!   policies are not served (they never change access), as for ztunnel.
//! - `from.source`: principals, requestPrincipals, namespaces, ipBlocks,
//!   remoteIpBlocks and their `not` forms; `serviceAccounts` (`ns/sa`, or
//!   `sa` in the policy's namespace) become principal suffixes
//!   `/ns/<ns>/sa/<sa>` (any trust domain, as ztunnel matches them).
//! - `to.operation`: hosts, ports, methods, paths and their `not` forms;
//!   paths `{*}` / `{**}` templates are split into segments.
//! - `when`: `request.headers[<name>]`, `request.auth.claims[a][b]...`,
//!   `request.auth.principal` / `audiences` / `presenter`, `source.ip`,
//!   `remote.ip`, `source.namespace`, `source.principal`, `destination.ip`,
//!   `destination.port`, `connection.sni`, typed once here.
//!
//! Values `*`, `x*`, `*x` are presence, prefix and suffix matches, as for
//! ztunnel. A value that cannot be read (a port `"http"`, a CIDR, an unknown
//! `when` key, a malformed claim key or path template) makes the policy
//! stricter, never looser, as for ztunnel (`authorization.rs`): in an ALLOW
//! policy the rule holding it is left out (it matches nothing); in a DENY
//! policy the field (or `when` condition) is removed, so the rule denies as
//! without it. The unreadable ports and CIDRs are already reported by the L4
//! reading of the same policy; the L7-only ones are reported here, and every
//! one is listed in `HttpAuthorization.problems`.

use api::crd::{AuthorizationAction, AuthorizationPolicy, Condition as WhenCondition, Rule};
use api::l7::{
    Action, ClaimPath, Condition, HttpAuthorization, PathPattern, PathTemplate, RequestOperation,
    RequestSource, Rule as L7Rule, condition, path_pattern,
};
use api::security::{StringMatch, string_match::MatchType};

use super::super::authorization::{self, parse_all, parse_cidr, parse_port, string_matches};
use super::super::problem::{Effect, PolicyProblem};

/// Converts one policy; `None` when it is not served by waypoints (dry-run,
/// AUDIT, and a policy attached by selector or namespace that is CUSTOM or
/// names no HTTP attribute: ztunnel enforces those as written).
pub(in crate::index) fn convert(
    policy: &AuthorizationPolicy,
    problems: &mut Vec<PolicyProblem>,
) -> Option<HttpAuthorization> {
    let served = authorization::targets_waypoints(policy)
        || authorization::enforced_at_waypoints_by_selector(policy);
    if !served || authorization::dry_run(policy) {
        return None;
    }
    let action = match policy.spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny | AuthorizationAction::Custom => Action::Deny,
        AuthorizationAction::Audit => return None,
    };
    let object = authorization::policy_ref(policy);
    let namespace = object.key.namespace.clone();
    let mut notes = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        let mut reader = Reader {
            invalid: Vec::new(),
            namespace: &namespace,
        };
        let converted = reader.rule(&path, rule);
        for inv in &reader.invalid {
            let effect = match action {
                Action::Allow => Effect::L7Stricter {
                    what: format!("{path} matches nothing"),
                },
                Action::Deny => Effect::L7Stricter {
                    what: format!("the rule denies as if {} were absent", inv.removed),
                },
            };
            if inv.l7_only {
                problems.push(PolicyProblem::UntranslatableL7 {
                    object: object.clone(),
                    field: inv.field.clone(),
                    reason: inv.reason.clone(),
                    effect: effect.clone(),
                });
            }
            notes.push(format!("{}: {}; {effect}", inv.field, inv.reason));
        }
        if action == Action::Allow && !reader.invalid.is_empty() {
            continue;
        }
        rules.push(converted);
    }
    Some(HttpAuthorization {
        namespace,
        name: object.key.name,
        action: action as i32,
        rules,
        problems: notes,
    })
}

/// A value that could not be read.
struct Invalid {
    field: String,
    /// What a DENY rule loses because of it (the field or the condition).
    removed: String,
    reason: String,
    /// Not reported by the L4 reading of the policy.
    l7_only: bool,
}

struct Reader<'a> {
    invalid: Vec<Invalid>,
    namespace: &'a str,
}

impl Reader<'_> {
    fn rule(&mut self, path: &str, rule: &Rule) -> L7Rule {
        let from = rule
            .from
            .iter()
            .enumerate()
            .map(|(i, f)| self.source(&format!("{path}.from[{i}].source"), &f.source))
            .collect();
        let to = rule
            .to
            .iter()
            .enumerate()
            .map(|(i, t)| self.operation(&format!("{path}.to[{i}].operation"), &t.operation))
            .collect();
        let when = rule
            .when
            .iter()
            .enumerate()
            .filter_map(|(i, w)| self.condition(&format!("{path}.when[{i}]"), w))
            .collect();
        L7Rule { from, to, when }
    }

    /// Reads a field's values; one that cannot be read removes the field.
    fn values<T>(
        &mut self,
        field: &str,
        values: &[String],
        parse: impl Fn(&str) -> Option<T>,
        expected: &str,
        l7_only: bool,
    ) -> Vec<T> {
        let invalid = &mut self.invalid;
        parse_all(values, parse, |i, v| {
            invalid.push(Invalid {
                field: format!("{field}[{i}]"),
                removed: field.to_string(),
                reason: format!("{v:?} is not {expected}"),
                l7_only,
            })
        })
    }

    fn source(&mut self, at: &str, s: &api::crd::Source) -> RequestSource {
        let cidr = "an IP address or CIDR";
        let mut principals = string_matches(&s.principals);
        principals.extend(service_accounts(&s.service_accounts, self.namespace));
        let mut not_principals = string_matches(&s.not_principals);
        not_principals.extend(service_accounts(&s.not_service_accounts, self.namespace));
        RequestSource {
            principals,
            not_principals,
            request_principals: string_matches(&s.request_principals),
            not_request_principals: string_matches(&s.not_request_principals),
            namespaces: string_matches(&s.namespaces),
            not_namespaces: string_matches(&s.not_namespaces),
            ip_blocks: self.values(
                &format!("{at}.ipBlocks"),
                &s.ip_blocks,
                parse_cidr,
                cidr,
                false,
            ),
            not_ip_blocks: self.values(
                &format!("{at}.notIpBlocks"),
                &s.not_ip_blocks,
                parse_cidr,
                cidr,
                false,
            ),
            remote_ip_blocks: self.values(
                &format!("{at}.remoteIpBlocks"),
                &s.remote_ip_blocks,
                parse_cidr,
                cidr,
                false,
            ),
            not_remote_ip_blocks: self.values(
                &format!("{at}.notRemoteIpBlocks"),
                &s.not_remote_ip_blocks,
                parse_cidr,
                cidr,
                false,
            ),
        }
    }

    fn operation(&mut self, at: &str, o: &api::crd::Operation) -> RequestOperation {
        let port = authorization::PORT;
        let template = "a path (exact, prefix*, *suffix, *) or a template of {*} / {**} segments";
        RequestOperation {
            hosts: string_matches(&o.hosts),
            not_hosts: string_matches(&o.not_hosts),
            ports: self.values(&format!("{at}.ports"), &o.ports, parse_port, port, false),
            not_ports: self.values(
                &format!("{at}.notPorts"),
                &o.not_ports,
                parse_port,
                port,
                false,
            ),
            methods: string_matches(&o.methods),
            not_methods: string_matches(&o.not_methods),
            paths: self.values(
                &format!("{at}.paths"),
                &o.paths,
                path_pattern,
                template,
                true,
            ),
            not_paths: self.values(
                &format!("{at}.notPaths"),
                &o.not_paths,
                path_pattern,
                template,
                true,
            ),
        }
    }

    /// One `when` condition; `None` when it cannot be read (removed).
    fn condition(&mut self, at: &str, w: &WhenCondition) -> Option<Condition> {
        use condition::Key;
        let key = w.key.as_str();
        let (key, ip) = match key {
            "request.auth.principal" => (Key::RequestPrincipal(true), false),
            "request.auth.audiences" => (Key::RequestAudiences(true), false),
            "request.auth.presenter" => (Key::RequestPresenter(true), false),
            "source.ip" => (Key::SourceIp(true), true),
            "remote.ip" => (Key::RemoteIp(true), true),
            "source.namespace" => (Key::SourceNamespace(true), false),
            "source.principal" => (Key::SourcePrincipal(true), false),
            "destination.ip" => (Key::DestinationIp(true), true),
            "destination.port" => (Key::DestinationPort(true), false),
            "connection.sni" => (Key::ConnectionSni(true), false),
            k => match bracketed(k, "request.headers") {
                Some(names) if names.len() == 1 => {
                    (Key::RequestHeader(names[0].to_ascii_lowercase()), false)
                }
                _ => match bracketed(k, "request.auth.claims") {
                    Some(path) if !path.is_empty() => {
                        (Key::RequestClaim(ClaimPath { path }), false)
                    }
                    _ => {
                        self.invalid.push(Invalid {
                            field: format!("{at}.key"),
                            removed: at.to_string(),
                            reason: format!("{k:?} is not a condition key the waypoint knows"),
                            l7_only: true,
                        });
                        return None;
                    }
                },
            },
        };
        let before = self.invalid.len();
        let mut c = Condition {
            key: Some(key.clone()),
            ..Condition::default()
        };
        let values = format!("{at}.values");
        let not_values = format!("{at}.notValues");
        if ip {
            let cidr = "an IP address or CIDR";
            c.ip_values = self.values(&values, &w.values, parse_cidr, cidr, false);
            c.not_ip_values = self.values(&not_values, &w.not_values, parse_cidr, cidr, false);
        } else if matches!(key, Key::DestinationPort(_)) {
            let port = authorization::PORT;
            let exact = |v: &str| {
                parse_port(v).map(|p| StringMatch {
                    match_type: Some(MatchType::Exact(p.to_string())),
                })
            };
            c.values = self.values(&values, &w.values, exact, port, false);
            c.not_values = self.values(&not_values, &w.not_values, exact, port, false);
        } else {
            c.values = string_matches(&w.values);
            c.not_values = string_matches(&w.not_values);
        }
        // The whole condition goes with an unreadable value.
        for i in &mut self.invalid[before..] {
            i.removed = at.to_string();
        }
        (self.invalid.len() == before).then_some(c)
    }
}

/// `prefix[a][b]` -> `["a", "b"]`; `None` when `key` is not of that form.
fn bracketed(key: &str, prefix: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix(prefix)?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let part = &inner[..end];
        if part.is_empty() {
            return None;
        }
        parts.push(part.to_string());
        rest = &inner[end + 1..];
    }
    Some(parts)
}

/// A path as Istio writes it: a template when it has `{*}` / `{**}`
/// segments, else exact / `prefix*` / `*suffix` / `*`.
fn path_pattern(v: &str) -> Option<PathPattern> {
    if !v.contains('{') {
        let m = string_matches(std::slice::from_ref(&v.to_string())).pop()?;
        return Some(PathPattern {
            kind: Some(path_pattern::Kind::Match(m)),
        });
    }
    let segments: Vec<String> = v
        .strip_prefix('/')?
        .split('/')
        .map(str::to_string)
        .collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        let ok = match s.as_str() {
            "{*}" => true,
            // `{**}` only as the last segment, as Istio's templates allow.
            "{**}" => i == last,
            other => !other.contains(['{', '}', '*']),
        };
        if !ok {
            return None;
        }
    }
    Some(PathPattern {
        kind: Some(path_pattern::Kind::Template(PathTemplate { segments })),
    })
}

/// `ns/sa` or `sa` (in the policy's namespace) as a principal suffix.
fn service_accounts(values: &[String], namespace: &str) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            StringMatch {
                match_type: Some(MatchType::Suffix(format!("/ns/{ns}/sa/{sa}"))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bracketed_keys_are_split_and_malformed_ones_refused() {
        let claims = "request.auth.claims";
        assert_eq!(
            bracketed("request.auth.claims[groups][admin]", claims),
            Some(vec!["groups".to_string(), "admin".to_string()])
        );
        assert_eq!(bracketed("request.auth.claims", claims), Some(vec![]));
        for bad in [
            "request.auth.claims[]",
            "request.auth.claims[a",
            "request.auth.claims.a",
            "request.auth.claims[a]b",
        ] {
            assert_eq!(bracketed(bad, claims), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_matches_or_templates() {
        let m = |v: &str| match path_pattern(v).and_then(|p| p.kind) {
            Some(path_pattern::Kind::Match(m)) => format!("{:?}", m.match_type.unwrap()),
            Some(path_pattern::Kind::Template(t)) => t.segments.join("|"),
            None => "refused".to_string(),
        };
        assert_eq!(m("/a/b"), "Exact(\"/a/b\")");
        assert_eq!(m("/a/*"), "Prefix(\"/a/\")");
        assert_eq!(m("*.json"), "Suffix(\".json\")");
        assert_eq!(m("/api/{*}/items/{**}"), "api|{*}|items|{**}");
        assert_eq!(m("/api/{**}/x"), "refused");
        assert_eq!(m("/api/{x}"), "refused");
        assert_eq!(m("api/{*}"), "refused");
    }
}
