//! AuthorizationPolicy (`security.istio.io/v1`) -> `istio.security.Authorization`,
//! with upstream istiod's conversion semantics (pilot/pkg/serviceregistry/
//! kube/controller/ambient/authorization.go, convertAuthorizationPolicy and
//! handleRule), so upstream ztunnel enforces our output exactly as it would
//! enforce istiod's:
//!
//! - scope: a selector -> WORKLOAD_SELECTOR (listed on the workloads it
//!   selects, in its namespace or, from the root namespace, in any);
//!   otherwise NAMESPACE, or GLOBAL in the root namespace.
//! - each rule becomes one `Rule`: a `to` clause (its operations), a `from`
//!   clause (its sources) and one clause per `when` condition, all ANDed.
//! - principals keep the user's text without `spiffe://` (ztunnel strips
//!   that prefix from the peer identity before matching); `*` is presence,
//!   `*x` a suffix and `x*` a prefix match, as for namespaces.
//! - `targetRef(s)` policies belong to waypoints: [`super::l7`] decides what
//!   ztunnel does about them.
//! - `istio.io/dry-run` (read as Go's strconv.ParseBool, as upstream's
//!   `isDryRun` in pilot/pkg/security/authz/builder/builder.go; a value it
//!   cannot read leaves the policy enforced, the stricter reading): the
//!   policy is served with `dry_run` set, and ztunnel evaluates it and logs
//!   what it would decide without enforcing it (upstream ztunnel's
//!   `Authorization.dry_run`, src/rbac.rs). Upstream istiod's ambient index
//!   (`PolicyCollections`, pilot/pkg/serviceregistry/kube/controller/ambient/
//!   policies.go, in the version read) leaves such policies out of the
//!   workload API altogether; we serve them so that the dry run shows
//!   something.
//!
//! Where we differ from upstream, always towards denying more (the
//! fail-closed semantics in ARCHITECTURE.md):
//!
//! - A value that cannot be read (a port `"http"`, a CIDR `10.0.0.0/33`):
//!   upstream silently drops the value, which can widen an ALLOW (a rule
//!   `ports: ["http"]` becomes "any port") and narrow a DENY. Here, in an
//!   ALLOW policy the rule holding it matches nothing (its group is left
//!   out; the policy is still served, so it still applies and denies what
//!   it does not allow); in a DENY policy the field holding it is removed
//!   from its rule (a `when` condition as a whole), so the rule denies what
//!   it would deny without that condition.
//! - HTTP-only attributes: in an ALLOW policy the rule holding them matches
//!   nothing (as upstream); in a DENY policy they are removed the same way.
//!   An entry of `from` / `to` left with no L4 attribute constrains nothing,
//!   so its whole (ORed) clause is dropped: upstream keeps it as an empty
//!   match, which ztunnel never matches, so the DENY would stop denying.
//!   A rule left with no clause is an empty group, which matches every
//!   connection (in proxy-core and in upstream ztunnel's rbac.rs alike).
//! - CUSTOM: upstream does not serve it (its ext-authz provider is never
//!   called, so traffic it should vet passes). Here it is served as a DENY
//!   of what its rules match at L4, HTTP attributes handled as for DENY.
//! - AUDIT is not served (it never changes access), as upstream.
//!
//! Every departure is a [`PolicyProblem`] naming the policy and the field.

use std::collections::BTreeSet;
use std::net::IpAddr;

use api::crd::{AuthorizationAction, AuthorizationPolicy, Condition, Rule};
use api::manifest::Kind;
use api::security::{
    Action, Address, Authorization, Clause, Match, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};

use super::problem::{Effect, PolicyProblem, PolicyRef};
use super::selectors::Labels;

/// Annotation that marks a policy as dry-run (evaluated, not enforced).
const DRY_RUN: &str = "istio.io/dry-run";

/// `when` keys ztunnel can evaluate.
const L4_CONDITIONS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// What a port value must be.
pub(super) const PORT: &str = "a port number (0-65535)";
/// What an address value must be.
const CIDR: &str = "an IP address or CIDR";

/// A policy as ztunnel receives it, and whom it selects.
#[derive(Debug, Clone)]
pub(super) struct Converted {
    pub authorization: Authorization,
    /// For WORKLOAD_SELECTOR policies: the labels a workload must carry.
    pub selector: Option<Labels>,
}

/// Whether the policy is annotated dry-run (the spellings Go's
/// strconv.ParseBool reads as true, as upstream).
pub(crate) fn dry_run(policy: &AuthorizationPolicy) -> bool {
    policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN))
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

/// Whether the policy attaches to waypoints (`targetRef` / `targetRefs`).
pub(super) fn targets_waypoints(policy: &AuthorizationPolicy) -> bool {
    policy.spec.target_ref.is_some() || !policy.spec.target_refs.is_empty()
}

/// Whether a policy attached by selector or namespace is an L7 rule that a
/// waypoint enforces as written (on demand where none serves it, see
/// `l7.rs`): ALLOW or DENY, enforced (not dry-run), naming an HTTP-only
/// attribute in some rule. CUSTOM stays an L4 DENY (no waypoint calls an
/// external authorizer either).
pub(super) fn enforced_at_waypoints_by_selector(policy: &AuthorizationPolicy) -> bool {
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    !targets_waypoints(policy)
        && !dry_run(policy)
        && matches!(
            policy.spec.action,
            AuthorizationAction::Allow | AuthorizationAction::Deny
        )
        && policy.spec.rules.iter().enumerate().any(|(i, r)| {
            !read_rule(&format!("rules[{i}]"), r, namespace)
                .http
                .is_empty()
        })
}

/// The policy's reference in problems.
pub(super) fn policy_ref(policy: &AuthorizationPolicy) -> PolicyRef {
    PolicyRef::new(
        Kind::AuthorizationPolicy,
        policy.metadata.namespace.clone().unwrap_or_default(),
        policy.metadata.name.clone().unwrap_or_default(),
    )
}

/// The problems an admission webhook must refuse the policy for (values
/// that cannot be read, actions nothing in the mesh enforces), each naming
/// the field. The same reading as the conversion's, whatever the policy
/// attaches to.
pub fn validate_authorization_policy(
    root_namespace: &str,
    policy: &AuthorizationPolicy,
) -> Vec<PolicyProblem> {
    let mut problems = Vec::new();
    convert(root_namespace, policy, &mut problems);
    problems.retain(PolicyProblem::rejected_at_admission);
    problems
}

/// Converts one policy; `None`: nothing for ztunnel to enforce from it
/// (targetRefs, dry-run, AUDIT). Every problem found is pushed, including
/// those of policies not converted.
pub(super) fn convert(
    root_namespace: &str,
    policy: &AuthorizationPolicy,
    problems: &mut Vec<PolicyProblem>,
) -> Option<Converted> {
    let object = policy_ref(policy);
    let spec = &policy.spec;
    let (action, unsupported) = match spec.action {
        AuthorizationAction::Allow => (Some(Action::Allow), None),
        AuthorizationAction::Deny => (Some(Action::Deny), None),
        AuthorizationAction::Custom => {
            (Some(Action::Deny), Some(("CUSTOM", Effect::EnforcedAsDeny)))
        }
        AuthorizationAction::Audit => (None, Some(("AUDIT", Effect::NotServed))),
    };
    if let Some((action, effect)) = unsupported {
        problems.push(PolicyProblem::UnsupportedAction {
            object: object.clone(),
            action,
            effect,
        });
    }
    let read: Vec<ReadRule> = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| read_rule(&format!("rules[{i}]"), rule, &object.key.namespace))
        .collect();
    for (i, rule) in read.iter().enumerate() {
        for invalid in &rule.invalid {
            let effect = match action {
                Some(Action::Allow) => Effect::RuleMatchesNothing {
                    rule: format!("rules[{i}]"),
                },
                Some(Action::Deny) => Effect::DeniesWithout {
                    field: invalid.attribute.clone(),
                },
                None => Effect::NotServed,
            };
            problems.push(invalid.problem(&object, effect));
        }
    }
    let action = action?;
    if targets_waypoints(policy) {
        return None;
    }

    let mut http_attributes = BTreeSet::new();
    let mut rules = Vec::new();
    for rule in read {
        let fails = !rule.http.is_empty() || !rule.invalid.is_empty();
        http_attributes.extend(rule.http.iter().cloned());
        // An ALLOW rule that cannot be checked as written matches nothing.
        if action == Action::Allow && fails {
            continue;
        }
        rules.push(api::security::Rule {
            clauses: rule.clauses(),
        });
    }
    if !http_attributes.is_empty() {
        problems.push(PolicyProblem::HttpAttributes {
            object: object.clone(),
            attributes: http_attributes.into_iter().collect::<Vec<_>>().join(", "),
            effect: match action {
                Action::Allow => Effect::HttpRulesMatchNothing,
                Action::Deny => Effect::HttpAttributesIgnored,
            },
        });
    }
    let namespace = object.key.namespace;
    let scope = match (&spec.selector, namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    Some(Converted {
        authorization: Authorization {
            name: object.key.name,
            namespace,
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: dry_run(policy),
        },
        selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
    })
}

/// A value that could not be read.
#[derive(Debug)]
struct Invalid {
    /// The value's path: `rules[0].to[0].operation.ports[1]`.
    field: String,
    /// What is removed from a DENY rule because of it: the field
    /// (`rules[0].to[0].operation.ports`) or the `when` condition.
    attribute: String,
    value: String,
    expected: &'static str,
}

impl Invalid {
    fn problem(&self, object: &PolicyRef, effect: Effect) -> PolicyProblem {
        PolicyProblem::InvalidValue {
            object: object.clone(),
            field: self.field.clone(),
            value: self.value.clone(),
            expected: self.expected,
            effect,
        }
    }
}

/// One `from` / `to` entry as read.
#[derive(Debug)]
struct ReadEntry {
    /// Its L4 attributes, without those that could not be read.
    m: Match,
    /// Whether something was left out of it (an HTTP attribute, a field
    /// holding a value that could not be read).
    left_out: bool,
}

impl ReadEntry {
    /// Left with no L4 attribute after something was removed: it constrains
    /// nothing, so the clause it is one alternative of matches everything.
    fn unconstrained(&self) -> bool {
        self.left_out && self.m == Match::default()
    }
}

/// One rule as read: the L4 form of each entry and condition, the HTTP-only
/// attributes it names, and the values that could not be read.
#[derive(Debug, Default)]
struct ReadRule {
    to: Vec<ReadEntry>,
    from: Vec<ReadEntry>,
    /// One per `when` condition on an L4 key whose values all read.
    when: Vec<Match>,
    http: Vec<String>,
    invalid: Vec<Invalid>,
}

impl ReadRule {
    /// The rule's clauses with everything left out removed as if absent:
    /// exactly the rule for a rule that lost nothing, and one that matches
    /// more (possibly every connection: no clause) for one that did.
    fn clauses(self) -> Vec<Clause> {
        let mut clauses = Vec::new();
        for entries in [self.to, self.from] {
            if !entries.is_empty() && !entries.iter().any(ReadEntry::unconstrained) {
                clauses.push(Clause {
                    matches: entries.into_iter().map(|e| e.m).collect(),
                });
            }
        }
        clauses.extend(self.when.into_iter().map(|m| Clause { matches: vec![m] }));
        clauses
    }
}

/// Reads a field's values; any value that cannot be read removes the whole
/// field (empty result) and is recorded.
fn read_values<T>(
    field: &str,
    values: &[String],
    parse: fn(&str) -> Option<T>,
    expected: &'static str,
    invalid: &mut Vec<Invalid>,
) -> Vec<T> {
    parse_all(values, parse, |i, v| {
        invalid.push(Invalid {
            field: format!("{field}[{i}]"),
            attribute: field.to_string(),
            value: v.to_string(),
            expected,
        })
    })
}

/// Parses every value; when any cannot be read, `unreadable` is told each
/// one (its index and text) and the result is empty: the field is removed
/// as a whole, never narrowed to the values that read.
pub(super) fn parse_all<T>(
    values: &[String],
    parse: impl Fn(&str) -> Option<T>,
    mut unreadable: impl FnMut(usize, &str),
) -> Vec<T> {
    let mut failed = false;
    let read: Vec<T> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let parsed = parse(v);
            if parsed.is_none() {
                failed = true;
                unreadable(i, v);
            }
            parsed
        })
        .collect();
    if failed { Vec::new() } else { read }
}

/// Reads one rule; service accounts named without a namespace are in
/// `namespace` (the policy's).
fn read_rule(path: &str, rule: &Rule, namespace: &str) -> ReadRule {
    let mut read = ReadRule::default();
    for (i, t) in rule.to.iter().enumerate() {
        let op = &t.operation;
        let at = format!("{path}.to[{i}].operation");
        let before = (read.http.len(), read.invalid.len());
        for (attr, values) in [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ] {
            if !values.is_empty() {
                read.http.push(attr.to_string());
            }
        }
        let invalid = &mut read.invalid;
        let m = Match {
            destination_ports: read_values(
                &format!("{at}.ports"),
                &op.ports,
                parse_port,
                PORT,
                invalid,
            ),
            not_destination_ports: read_values(
                &format!("{at}.notPorts"),
                &op.not_ports,
                parse_port,
                PORT,
                invalid,
            ),
            ..Default::default()
        };
        let left_out = (read.http.len(), read.invalid.len()) != before;
        read.to.push(ReadEntry { m, left_out });
    }
    for (i, f) in rule.from.iter().enumerate() {
        let src = &f.source;
        let at = format!("{path}.from[{i}].source");
        let before = (read.http.len(), read.invalid.len());
        for (attr, values) in [
            ("remoteIpBlocks", &src.remote_ip_blocks),
            ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ("requestPrincipals", &src.request_principals),
            ("notRequestPrincipals", &src.not_request_principals),
        ] {
            if !values.is_empty() {
                read.http.push(attr.to_string());
            }
        }
        let invalid = &mut read.invalid;
        // Checked like ipBlocks, though only a waypoint can use them.
        for (attr, values) in [
            ("remoteIpBlocks", &src.remote_ip_blocks),
            ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
        ] {
            read_values(&format!("{at}.{attr}"), values, parse_cidr, CIDR, invalid);
        }
        let m = Match {
            namespaces: string_matches(&src.namespaces),
            not_namespaces: string_matches(&src.not_namespaces),
            principals: string_matches(&src.principals),
            not_principals: string_matches(&src.not_principals),
            source_ips: read_values(
                &format!("{at}.ipBlocks"),
                &src.ip_blocks,
                parse_cidr,
                CIDR,
                invalid,
            ),
            not_source_ips: read_values(
                &format!("{at}.notIpBlocks"),
                &src.not_ip_blocks,
                parse_cidr,
                CIDR,
                invalid,
            ),
            service_accounts: service_accounts(&src.service_accounts, namespace),
            not_service_accounts: service_accounts(&src.not_service_accounts, namespace),
            ..Default::default()
        };
        let left_out = (read.http.len(), read.invalid.len()) != before;
        read.from.push(ReadEntry { m, left_out });
    }
    for (i, when) in rule.when.iter().enumerate() {
        if !L4_CONDITIONS.contains(&when.key.as_str()) {
            read.http.push(when.key.clone());
            continue;
        }
        let before = read.invalid.len();
        let m = condition(&format!("{path}.when[{i}]"), when, &mut read.invalid);
        if read.invalid.len() == before {
            read.when.push(m);
        }
    }
    read
}

/// A `when` condition on an L4 key as one match; a value that cannot be
/// read removes the whole condition (recorded in `invalid`).
fn condition(path: &str, when: &Condition, invalid: &mut Vec<Invalid>) -> Match {
    let before = invalid.len();
    let values = format!("{path}.values");
    let not_values = format!("{path}.notValues");
    let mut m = Match::default();
    match when.key.as_str() {
        "source.namespace" => {
            m.namespaces = string_matches(&when.values);
            m.not_namespaces = string_matches(&when.not_values);
        }
        "source.principal" => {
            m.principals = string_matches(&when.values);
            m.not_principals = string_matches(&when.not_values);
        }
        "source.ip" => {
            m.source_ips = read_values(&values, &when.values, parse_cidr, CIDR, invalid);
            m.not_source_ips =
                read_values(&not_values, &when.not_values, parse_cidr, CIDR, invalid);
        }
        "destination.ip" => {
            m.destination_ips = read_values(&values, &when.values, parse_cidr, CIDR, invalid);
            m.not_destination_ips =
                read_values(&not_values, &when.not_values, parse_cidr, CIDR, invalid);
        }
        "destination.port" => {
            m.destination_ports = read_values(&values, &when.values, parse_port, PORT, invalid);
            m.not_destination_ports =
                read_values(&not_values, &when.not_values, parse_port, PORT, invalid);
        }
        _ => {}
    }
    // The whole condition goes, not only the field.
    for i in &mut invalid[before..] {
        i.attribute = path.to_string();
    }
    m
}

/// `*` -> presence, `*x` -> suffix `x`, `x*` -> prefix `x`, else exact.
pub(super) fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| {
            let t = if v == "*" {
                MatchType::Presence(())
            } else if let Some(suffix) = v.strip_prefix('*') {
                MatchType::Suffix(suffix.to_string())
            } else if let Some(prefix) = v.strip_suffix('*') {
                MatchType::Prefix(prefix.to_string())
            } else {
                MatchType::Exact(v.clone())
            };
            StringMatch {
                match_type: Some(t),
            }
        })
        .collect()
}

/// A port number as policies write it (`"8080"`).
pub(super) fn parse_port(v: &str) -> Option<u32> {
    v.parse::<u16>().ok().map(u32::from)
}

/// An address or CIDR; a bare address is a full-length prefix.
pub(super) fn parse_cidr(v: &str) -> Option<Address> {
    let (ip, length) = if v.contains('/') {
        let net: ipnet::IpNet = v.parse().ok()?;
        (net.addr(), u32::from(net.prefix_len()))
    } else {
        let ip: IpAddr = v.parse().ok()?;
        (ip, if ip.is_ipv4() { 32 } else { 128 })
    };
    Some(Address {
        address: super::ip_bytes(ip),
        length,
    })
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            },
            None => ServiceAccountMatch {
                namespace: namespace.to_string(),
                service_account: v.clone(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> AuthorizationPolicy {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\n{yaml}"
        );
        match api::manifest::parse(&text).unwrap().objects.remove(0) {
            api::manifest::Object::AuthorizationPolicy(p) => p,
            other => panic!("not a policy: {other:?}"),
        }
    }

    fn fields(problems: &[PolicyProblem]) -> Vec<&str> {
        problems.iter().filter_map(PolicyProblem::field).collect()
    }

    #[test]
    fn validation_names_every_unreadable_value_and_unsupported_action() {
        let p = policy(
            r#"spec:
  action: CUSTOM
  provider: {name: opa}
  rules:
  - to:
    - operation: {ports: ["80", "http"], notPorts: ["70000"], methods: [GET]}
    from:
    - source: {ipBlocks: [10.0.0.0/33], notIpBlocks: [10.0.0.0/8], remoteIpBlocks: [nope]}
    when:
    - {key: destination.ip, values: [1.2.3.4, "::1/129"]}
    - {key: source.namespace, values: ["*"]}
    - {key: "request.headers[x-user]", values: [a]}
"#,
        );
        let problems = validate_authorization_policy("istio-system", &p);
        assert_eq!(
            fields(&problems),
            [
                "action",
                "rules[0].to[0].operation.ports[1]",
                "rules[0].to[0].operation.notPorts[0]",
                "rules[0].from[0].source.remoteIpBlocks[0]",
                "rules[0].from[0].source.ipBlocks[0]",
                "rules[0].when[0].values[1]",
            ]
        );
        assert!(problems.iter().all(PolicyProblem::rejected_at_admission));
        let message = problems[1].to_string();
        assert!(
            message.starts_with(
                "AuthorizationPolicy shop/p: rules[0].to[0].operation.ports[1]: \"http\" is not a port number"
            ),
            "{message}"
        );
    }

    #[test]
    fn validation_covers_policies_ztunnel_does_not_enforce() {
        for spec in [
            "spec:\n  targetRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{to: [{operation: {ports: [x]}}]}]\n",
            "spec:\n  action: AUDIT\n  rules: [{to: [{operation: {ports: [x]}}]}]\n",
        ] {
            let problems = validate_authorization_policy("istio-system", &policy(spec));
            assert!(
                fields(&problems).contains(&"rules[0].to[0].operation.ports[0]"),
                "{spec}: {problems:?}"
            );
        }
        let mut fine =
            policy("spec:\n  rules: [{to: [{operation: {ports: [\"8080\"], paths: [/x]}}]}]\n");
        fine.metadata.annotations = Some([(DRY_RUN.to_string(), "true".to_string())].into());
        assert_eq!(validate_authorization_policy("istio-system", &fine), []);
    }

    fn converted(yaml: &str) -> (Option<Authorization>, Vec<PolicyProblem>) {
        let mut problems = Vec::new();
        let c = convert("istio-system", &policy(yaml), &mut problems);
        (c.map(|c| c.authorization), problems)
    }

    #[test]
    fn an_allow_rule_with_an_unreadable_value_matches_nothing() {
        let (a, problems) = converted(
            "spec:\n  rules:\n  - to: [{operation: {ports: [http]}}]\n  - from: [{source: {namespaces: [shop]}}]\n",
        );
        let a = a.expect("the ALLOW policy is still served");
        assert_eq!(a.action, Action::Allow as i32);
        // Only the second rule is left.
        assert_eq!(a.rules.len(), 1);
        assert_eq!(
            a.rules[0].clauses[0].matches[0].namespaces,
            string_matches(&["shop".into()])
        );
        assert!(matches!(
            problems[..],
            [PolicyProblem::InvalidValue {
                effect: Effect::RuleMatchesNothing { .. },
                ..
            }]
        ));
        // One bad rule alone: the policy still applies, with nothing allowed.
        let (a, _) = converted("spec:\n  rules:\n  - to: [{operation: {ports: [http]}}]\n");
        assert_eq!(a.expect("served").rules, []);
    }

    #[test]
    fn a_deny_rule_denies_as_if_the_unreadable_field_were_absent() {
        // ipBlocks goes; the principals of the same entry still constrain.
        let (a, _) = converted(
            "spec:\n  action: DENY\n  rules:\n  - from: [{source: {ipBlocks: [10.0.0.0/33], principals: [x]}}]\n    to: [{operation: {ports: [\"5432\"]}}]\n",
        );
        let rules = a.unwrap().rules;
        assert_eq!(rules.len(), 1);
        let clauses = &rules[0].clauses;
        assert_eq!(clauses.len(), 2);
        assert_eq!(clauses[0].matches[0].destination_ports, [5432]);
        assert_eq!(clauses[1].matches[0].source_ips, []);
        assert_eq!(
            clauses[1].matches[0].principals,
            string_matches(&["x".into()])
        );

        // An entry left with nothing drops its clause (it matched anyone);
        // a bad `when` goes as a whole; no clause left: the rule matches all.
        let (a, problems) = converted(
            "spec:\n  action: DENY\n  rules:\n  - from: [{source: {ipBlocks: [bad]}}, {source: {namespaces: [a]}}]\n    when: [{key: destination.port, values: [\"80\", \"99999\"]}]\n",
        );
        assert_eq!(a.unwrap().rules, [api::security::Rule { clauses: vec![] }]);
        let removed: Vec<_> = problems.iter().map(|p| p.effect().to_string()).collect();
        assert!(removed[0].contains("as if rules[0].from[0].source.ipBlocks were absent"));
        assert!(removed[1].contains("as if rules[0].when[0] were absent"));
    }

    #[test]
    fn custom_is_a_deny_and_audit_is_not_served() {
        let (a, problems) = converted(
            "spec:\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{to: [{operation: {ports: [\"80\"], paths: [/admin]}}]}]\n",
        );
        let a = a.unwrap();
        assert_eq!(a.action, Action::Deny as i32);
        assert_eq!(a.rules[0].clauses[0].matches[0].destination_ports, [80]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let (a, problems) = converted("spec:\n  action: AUDIT\n  rules: [{}]\n");
        assert!(a.is_none());
        assert!(problems[0].rejected());
    }
}
