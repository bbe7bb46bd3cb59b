use std::net::SocketAddr;

use api::SpiffeId;
use api::l7::{self, condition::Key};
use api::security as xds;
use xds::string_match::MatchType;

use super::*;
use crate::request::{Authenticated, Authz, Downstream, Protocol, Target};

// --- proto builders ---

fn exact(s: &str) -> xds::StringMatch {
    xds::StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}
fn prefix(s: &str) -> xds::StringMatch {
    xds::StringMatch {
        match_type: Some(MatchType::Prefix(s.into())),
    }
}
fn suffix(s: &str) -> xds::StringMatch {
    xds::StringMatch {
        match_type: Some(MatchType::Suffix(s.into())),
    }
}
fn presence() -> xds::StringMatch {
    xds::StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}
fn net(ip: [u8; 4], length: u32) -> xds::Address {
    xds::Address {
        address: ip.to_vec(),
        length,
    }
}
fn path(m: xds::StringMatch) -> l7::PathPattern {
    l7::PathPattern {
        kind: Some(l7::path_pattern::Kind::Match(m)),
    }
}
fn template(segments: &[&str]) -> l7::PathPattern {
    l7::PathPattern {
        kind: Some(l7::path_pattern::Kind::Template(l7::PathTemplate {
            segments: segments.iter().map(|s| s.to_string()).collect(),
        })),
    }
}
fn cond(key: Key, values: Vec<xds::StringMatch>) -> l7::Condition {
    l7::Condition {
        key: Some(key),
        values,
        ..Default::default()
    }
}
fn not_cond(key: Key, not_values: Vec<xds::StringMatch>) -> l7::Condition {
    l7::Condition {
        key: Some(key),
        not_values,
        ..Default::default()
    }
}
fn ip_cond(key: Key, ip_values: Vec<xds::Address>) -> l7::Condition {
    l7::Condition {
        key: Some(key),
        ip_values,
        ..Default::default()
    }
}
fn from(s: l7::RequestSource) -> l7::Rule {
    l7::Rule {
        from: vec![s],
        ..Default::default()
    }
}
fn to(o: l7::RequestOperation) -> l7::Rule {
    l7::Rule {
        to: vec![o],
        ..Default::default()
    }
}
fn when(c: l7::Condition) -> l7::Rule {
    l7::Rule {
        when: vec![c],
        ..Default::default()
    }
}
fn policy(name: &str, action: l7::Action, rules: Vec<l7::Rule>) -> Policy {
    Policy::from_proto(&l7::HttpAuthorization {
        namespace: "shop".into(),
        name: name.into(),
        action: action as i32,
        rules,
        problems: vec![],
    })
    .expect("valid policy")
}

// --- the request under test ---

struct Request {
    downstream: Downstream,
    target: Target,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
    authenticated: Option<Authenticated>,
    sni: Option<&'static str>,
}

fn request() -> Request {
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("alice"));
    headers.append("x-tag", HeaderValue::from_static("a"));
    headers.append("x-tag", HeaderValue::from_static("b"));
    Request {
        downstream: Downstream {
            identity: SpiffeId::new("cluster.local", "client-ns", "client-sa").unwrap(),
            address: "10.1.2.3:40000".parse().unwrap(),
            connect: "10.96.0.10:8080".parse().unwrap(),
            client_cert: Default::default(),
        },
        target: Target::Service {
            namespace: "shop".into(),
            hostname: "reviews.shop.svc.cluster.local".into(),
            port: 8080,
            protocol: Protocol::Http1,
        },
        method: "GET",
        path: "/api/v1/items/42",
        host: "Reviews.Shop.svc.cluster.local:8080",
        headers,
        authenticated: Some(Authenticated {
            principal: "https://issuer.example/alice".into(),
            issuer: "https://issuer.example".into(),
            subject: "alice".into(),
            audiences: vec!["reviews".into(), "ratings".into()],
            presenter: Some("web-app".into()),
            claims: serde_json::json!({
                "groups": ["admins", "dev"],
                "org": {"team": "core", "level": 3},
                "email": "alice@example.com",
            }),
        }),
        sni: Some("reviews.shop"),
    }
}

impl Request {
    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            downstream: &self.downstream,
            target: &self.target,
            destination: self.downstream.connect,
            method: self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
            authenticated: self.authenticated.as_ref(),
            sni: self.sni,
        }
    }

    fn connection(&self) -> ConnectionFacts<'_> {
        ConnectionFacts {
            downstream: &self.downstream,
            target: &self.target,
            destination: self.downstream.connect,
            sni: self.sni,
        }
    }
}

/// Whether one ALLOW policy with this single rule lets the request through.
fn allows(req: &Request, rule: l7::Rule) -> bool {
    let p = policy("allow", l7::Action::Allow, vec![rule]);
    authorize([&p], &req.facts()) == Authz::Allowed
}

/// Every L7 field: a value that holds for the request, and one that does not.
/// Each row is checked in both directions: (rule, holds).
fn field_rows() -> Vec<(&'static str, l7::Rule, bool)> {
    use l7::{RequestOperation as Op, RequestSource as Src};
    vec![
        (
            "principals exact",
            from(Src {
                principals: vec![exact("cluster.local/ns/client-ns/sa/client-sa")],
                ..Default::default()
            }),
            true,
        ),
        (
            "principals other",
            from(Src {
                principals: vec![exact("cluster.local/ns/other/sa/client-sa")],
                ..Default::default()
            }),
            false,
        ),
        (
            "principals with spiffe:// never match",
            from(Src {
                principals: vec![exact("spiffe://cluster.local/ns/client-ns/sa/client-sa")],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_principals hit",
            from(Src {
                not_principals: vec![suffix("/sa/client-sa")],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_principals miss",
            from(Src {
                not_principals: vec![suffix("/sa/other")],
                ..Default::default()
            }),
            true,
        ),
        (
            "namespaces",
            from(Src {
                namespaces: vec![exact("client-ns")],
                ..Default::default()
            }),
            true,
        ),
        (
            "namespaces other",
            from(Src {
                namespaces: vec![exact("shop")],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_namespaces hit",
            from(Src {
                not_namespaces: vec![prefix("client")],
                ..Default::default()
            }),
            false,
        ),
        (
            "request_principals",
            from(Src {
                request_principals: vec![exact("https://issuer.example/alice")],
                ..Default::default()
            }),
            true,
        ),
        (
            "request_principals other",
            from(Src {
                request_principals: vec![exact("https://issuer.example/bob")],
                ..Default::default()
            }),
            false,
        ),
        (
            "request_principals *",
            from(Src {
                request_principals: vec![presence()],
                ..Default::default()
            }),
            true,
        ),
        (
            "not_request_principals hit",
            from(Src {
                not_request_principals: vec![prefix("https://issuer.example/")],
                ..Default::default()
            }),
            false,
        ),
        (
            "ip_blocks",
            from(Src {
                ip_blocks: vec![net([10, 1, 0, 0], 16)],
                ..Default::default()
            }),
            true,
        ),
        (
            "ip_blocks other",
            from(Src {
                ip_blocks: vec![net([10, 2, 0, 0], 16)],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_ip_blocks hit",
            from(Src {
                not_ip_blocks: vec![net([10, 1, 2, 3], 32)],
                ..Default::default()
            }),
            false,
        ),
        (
            "remote_ip_blocks",
            from(Src {
                remote_ip_blocks: vec![net([10, 1, 2, 0], 24)],
                ..Default::default()
            }),
            true,
        ),
        (
            "remote_ip_blocks other",
            from(Src {
                remote_ip_blocks: vec![net([192, 168, 0, 0], 16)],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_remote_ip_blocks hit",
            from(Src {
                not_remote_ip_blocks: vec![net([10, 0, 0, 0], 8)],
                ..Default::default()
            }),
            false,
        ),
        (
            "hosts case-insensitive, port ignored",
            to(Op {
                hosts: vec![exact("reviews.shop.svc.cluster.local")],
                ..Default::default()
            }),
            true,
        ),
        (
            "hosts upper-case value",
            to(Op {
                hosts: vec![exact("REVIEWS.shop.svc.cluster.local")],
                ..Default::default()
            }),
            true,
        ),
        (
            "hosts suffix",
            to(Op {
                hosts: vec![suffix(".svc.cluster.local")],
                ..Default::default()
            }),
            true,
        ),
        (
            "hosts with the request's port",
            to(Op {
                hosts: vec![exact("reviews.shop.svc.cluster.local:8080")],
                ..Default::default()
            }),
            true,
        ),
        (
            "hosts with another port",
            to(Op {
                hosts: vec![exact("reviews.shop.svc.cluster.local:9090")],
                ..Default::default()
            }),
            false,
        ),
        (
            "hosts other",
            to(Op {
                hosts: vec![exact("ratings.shop.svc.cluster.local")],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_hosts hit",
            to(Op {
                not_hosts: vec![prefix("reviews.")],
                ..Default::default()
            }),
            false,
        ),
        (
            "ports",
            to(Op {
                ports: vec![8080],
                ..Default::default()
            }),
            true,
        ),
        (
            "ports other",
            to(Op {
                ports: vec![9090],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_ports hit",
            to(Op {
                not_ports: vec![8080],
                ..Default::default()
            }),
            false,
        ),
        (
            "methods",
            to(Op {
                methods: vec![exact("GET")],
                ..Default::default()
            }),
            true,
        ),
        (
            "methods other",
            to(Op {
                methods: vec![exact("DELETE")],
                ..Default::default()
            }),
            false,
        ),
        (
            "methods case-sensitive",
            to(Op {
                methods: vec![exact("get")],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_methods hit",
            to(Op {
                not_methods: vec![exact("GET")],
                ..Default::default()
            }),
            false,
        ),
        (
            "paths exact",
            to(Op {
                paths: vec![path(exact("/api/v1/items/42"))],
                ..Default::default()
            }),
            true,
        ),
        (
            "paths prefix*",
            to(Op {
                paths: vec![path(prefix("/api/"))],
                ..Default::default()
            }),
            true,
        ),
        (
            "paths *suffix",
            to(Op {
                paths: vec![path(suffix("/42"))],
                ..Default::default()
            }),
            true,
        ),
        (
            "paths *",
            to(Op {
                paths: vec![path(presence())],
                ..Default::default()
            }),
            true,
        ),
        (
            "paths other",
            to(Op {
                paths: vec![path(exact("/api/v1/items"))],
                ..Default::default()
            }),
            false,
        ),
        (
            "paths template {*}",
            to(Op {
                paths: vec![template(&["api", "{*}", "items", "{*}"])],
                ..Default::default()
            }),
            true,
        ),
        (
            "paths template {*} is one segment",
            to(Op {
                paths: vec![template(&["api", "{*}", "{*}"])],
                ..Default::default()
            }),
            false,
        ),
        (
            "paths template {**}",
            to(Op {
                paths: vec![template(&["api", "{**}"])],
                ..Default::default()
            }),
            true,
        ),
        (
            "paths template other",
            to(Op {
                paths: vec![template(&["web", "{**}"])],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_paths hit",
            to(Op {
                not_paths: vec![path(prefix("/api"))],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_paths template hit",
            to(Op {
                not_paths: vec![template(&["api", "v1", "{**}"])],
                ..Default::default()
            }),
            false,
        ),
        (
            "when request.headers",
            when(cond(
                Key::RequestHeader("x-user".into()),
                vec![exact("alice")],
            )),
            true,
        ),
        (
            "when request.headers other",
            when(cond(
                Key::RequestHeader("x-user".into()),
                vec![exact("bob")],
            )),
            false,
        ),
        (
            "when request.headers joined",
            when(cond(Key::RequestHeader("x-tag".into()), vec![exact("a,b")])),
            true,
        ),
        (
            "when request.headers absent",
            when(cond(Key::RequestHeader("x-none".into()), vec![presence()])),
            false,
        ),
        (
            "when request.headers absent, not_values",
            when(not_cond(
                Key::RequestHeader("x-none".into()),
                vec![exact("x")],
            )),
            true,
        ),
        (
            "when request.auth.claims list",
            when(cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["groups".into()],
                }),
                vec![exact("dev")],
            )),
            true,
        ),
        (
            "when request.auth.claims list other",
            when(cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["groups".into()],
                }),
                vec![exact("ops")],
            )),
            false,
        ),
        (
            "when request.auth.claims nested",
            when(cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["org".into(), "team".into()],
                }),
                vec![exact("core")],
            )),
            true,
        ),
        (
            "when request.auth.claims number never matches",
            when(cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["org".into(), "level".into()],
                }),
                vec![exact("3")],
            )),
            false,
        ),
        (
            "when request.auth.claims absent",
            when(cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["missing".into()],
                }),
                vec![presence()],
            )),
            false,
        ),
        (
            "when request.auth.claims not_values hit",
            when(not_cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["groups".into()],
                }),
                vec![exact("admins")],
            )),
            false,
        ),
        (
            "when request.auth.principal",
            when(cond(
                Key::RequestPrincipal(true),
                vec![exact("https://issuer.example/alice")],
            )),
            true,
        ),
        (
            "when request.auth.principal other",
            when(cond(Key::RequestPrincipal(true), vec![exact("x/y")])),
            false,
        ),
        (
            "when request.auth.audiences",
            when(cond(Key::RequestAudiences(true), vec![exact("ratings")])),
            true,
        ),
        (
            "when request.auth.audiences other",
            when(cond(Key::RequestAudiences(true), vec![exact("details")])),
            false,
        ),
        (
            "when request.auth.presenter",
            when(cond(Key::RequestPresenter(true), vec![exact("web-app")])),
            true,
        ),
        (
            "when request.auth.presenter other",
            when(cond(Key::RequestPresenter(true), vec![exact("cli")])),
            false,
        ),
        (
            "when source.ip",
            when(ip_cond(Key::SourceIp(true), vec![net([10, 1, 2, 3], 32)])),
            true,
        ),
        (
            "when source.ip other",
            when(ip_cond(Key::SourceIp(true), vec![net([10, 9, 0, 0], 16)])),
            false,
        ),
        (
            "when remote.ip",
            when(ip_cond(Key::RemoteIp(true), vec![net([10, 0, 0, 0], 8)])),
            true,
        ),
        (
            "when remote.ip other",
            when(ip_cond(Key::RemoteIp(true), vec![net([172, 16, 0, 0], 12)])),
            false,
        ),
        (
            "when source.namespace",
            when(cond(Key::SourceNamespace(true), vec![exact("client-ns")])),
            true,
        ),
        (
            "when source.namespace other",
            when(cond(Key::SourceNamespace(true), vec![exact("shop")])),
            false,
        ),
        (
            "when source.principal",
            when(cond(
                Key::SourcePrincipal(true),
                vec![exact("cluster.local/ns/client-ns/sa/client-sa")],
            )),
            true,
        ),
        (
            "when source.principal other",
            when(cond(
                Key::SourcePrincipal(true),
                vec![exact("cluster.local/ns/x/sa/y")],
            )),
            false,
        ),
        (
            "when destination.ip",
            when(ip_cond(
                Key::DestinationIp(true),
                vec![net([10, 96, 0, 0], 12)],
            )),
            true,
        ),
        (
            "when destination.ip other",
            when(ip_cond(
                Key::DestinationIp(true),
                vec![net([10, 1, 0, 0], 16)],
            )),
            false,
        ),
        (
            "when destination.ip not_ip_values hit",
            when(l7::Condition {
                key: Some(Key::DestinationIp(true)),
                not_ip_values: vec![net([10, 96, 0, 10], 32)],
                ..Default::default()
            }),
            false,
        ),
        (
            "when destination.port",
            when(cond(Key::DestinationPort(true), vec![exact("8080")])),
            true,
        ),
        (
            "when destination.port other",
            when(cond(Key::DestinationPort(true), vec![exact("80")])),
            false,
        ),
        (
            "when connection.sni",
            when(cond(Key::ConnectionSni(true), vec![exact("reviews.shop")])),
            true,
        ),
        (
            "when connection.sni other",
            when(cond(Key::ConnectionSni(true), vec![exact("ratings.shop")])),
            false,
        ),
    ]
}

#[test]
fn every_l7_field_matches_and_mismatches() {
    let req = request();
    for (name, rule, holds) in field_rows() {
        assert_eq!(allows(&req, rule), holds, "{name}");
    }
}

#[test]
fn without_a_token_request_fields_fail_and_their_not_forms_hold() {
    let mut req = request();
    req.authenticated = None;
    let rows = vec![
        (
            "request_principals *",
            from(l7::RequestSource {
                request_principals: vec![presence()],
                ..Default::default()
            }),
            false,
        ),
        (
            "not_request_principals *",
            from(l7::RequestSource {
                not_request_principals: vec![presence()],
                ..Default::default()
            }),
            true,
        ),
        (
            "claims",
            when(cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["groups".into()],
                }),
                vec![presence()],
            )),
            false,
        ),
        (
            "claims not_values",
            when(not_cond(
                Key::RequestClaim(l7::ClaimPath {
                    path: vec!["groups".into()],
                }),
                vec![exact("dev")],
            )),
            true,
        ),
        (
            "principal",
            when(cond(Key::RequestPrincipal(true), vec![presence()])),
            false,
        ),
        (
            "audiences",
            when(cond(Key::RequestAudiences(true), vec![presence()])),
            false,
        ),
        (
            "presenter",
            when(cond(Key::RequestPresenter(true), vec![presence()])),
            false,
        ),
    ];
    for (name, rule, holds) in rows {
        assert_eq!(allows(&req, rule), holds, "{name}");
    }
    req.sni = None;
    assert!(!allows(
        &req,
        when(cond(Key::ConnectionSni(true), vec![presence()]))
    ));
}

#[test]
fn fields_of_one_source_all_hold_values_are_alternatives_and_rules_are_alternatives() {
    let req = request();
    let both = l7::RequestSource {
        namespaces: vec![exact("client-ns")],
        ip_blocks: vec![net([10, 9, 0, 0], 16), net([10, 1, 0, 0], 16)],
        ..Default::default()
    };
    assert!(
        allows(&req, from(both.clone())),
        "values of one field are alternatives"
    );
    let wrong_ns = l7::RequestSource {
        namespaces: vec![exact("other")],
        ..both
    };
    assert!(
        !allows(&req, from(wrong_ns.clone())),
        "every field must hold"
    );
    // from AND to AND when.
    let rule = l7::Rule {
        from: vec![
            wrong_ns.clone(),
            l7::RequestSource {
                namespaces: vec![exact("client-ns")],
                ..Default::default()
            },
        ],
        to: vec![l7::RequestOperation {
            methods: vec![exact("GET")],
            ..Default::default()
        }],
        when: vec![cond(
            Key::RequestHeader("x-user".into()),
            vec![exact("alice")],
        )],
    };
    assert!(allows(&req, rule.clone()));
    let failing_when = l7::Rule {
        when: vec![cond(
            Key::RequestHeader("x-user".into()),
            vec![exact("bob")],
        )],
        ..rule
    };
    assert!(!allows(&req, failing_when.clone()));
    // A second rule that holds makes the policy match.
    let p = policy(
        "allow",
        l7::Action::Allow,
        vec![failing_when, l7::Rule::default()],
    );
    assert_eq!(authorize([&p], &req.facts()), Authz::Allowed);
}

#[test]
fn allow_get_deny_delete_is_the_scenario_decision() {
    let allow_get = policy(
        "allow-get",
        l7::Action::Allow,
        vec![to(l7::RequestOperation {
            methods: vec![exact("GET")],
            ..Default::default()
        })],
    );
    let deny_delete = policy(
        "deny-delete",
        l7::Action::Deny,
        vec![to(l7::RequestOperation {
            methods: vec![exact("DELETE")],
            ..Default::default()
        })],
    );
    let mut req = request();
    assert_eq!(
        authorize([&allow_get, &deny_delete], &req.facts()),
        Authz::Allowed
    );
    req.method = "DELETE";
    assert_eq!(
        authorize([&allow_get, &deny_delete], &req.facts()),
        Authz::Denied {
            policy: "shop/deny-delete".into()
        }
    );
    req.method = "POST";
    assert_eq!(
        authorize([&allow_get, &deny_delete], &req.facts()),
        Authz::Denied {
            policy: "no ALLOW policy matched (shop/allow-get)".into()
        }
    );
    let refusal = denied();
    assert_eq!(refusal.status, StatusCode::FORBIDDEN);
    assert_eq!(refusal.body, "RBAC: access denied");
    assert_eq!(refusal.headers[CONTENT_TYPE], "text/plain");
}

#[test]
fn deny_wins_over_allow_whatever_the_order() {
    let req = request();
    let allow_all = policy("allow-all", l7::Action::Allow, vec![l7::Rule::default()]);
    let deny_all = policy("deny-all", l7::Action::Deny, vec![l7::Rule::default()]);
    for order in [[&allow_all, &deny_all], [&deny_all, &allow_all]] {
        assert_eq!(
            authorize(order, &req.facts()),
            Authz::Denied {
                policy: "shop/deny-all".into()
            }
        );
    }
}

#[test]
fn no_policy_allows_and_a_policy_without_rules_matches_nothing() {
    let req = request();
    assert_eq!(authorize([], &req.facts()), Authz::Allowed);
    let allow_nothing = policy("allow-nothing", l7::Action::Allow, vec![]);
    assert!(matches!(
        authorize([&allow_nothing], &req.facts()),
        Authz::Denied { .. }
    ));
    let deny_nothing = policy("deny-nothing", l7::Action::Deny, vec![]);
    assert_eq!(authorize([&deny_nothing], &req.facts()), Authz::Allowed);
}

#[test]
fn requested_principal_allow_denies_a_request_without_a_token() {
    let require_jwt = policy(
        "require-jwt",
        l7::Action::Allow,
        vec![from(l7::RequestSource {
            request_principals: vec![exact("https://issuer.example/alice")],
            ..Default::default()
        })],
    );
    let mut req = request();
    assert_eq!(authorize([&require_jwt], &req.facts()), Authz::Allowed);
    req.authenticated = None;
    assert!(matches!(
        authorize([&require_jwt], &req.facts()),
        Authz::Denied { .. }
    ));
}

#[test]
fn tcp_allow_rules_with_http_fields_match_nothing_deny_rules_ignore_them() {
    let req = request();
    let http_rows: Vec<l7::Rule> = vec![
        from(l7::RequestSource {
            request_principals: vec![presence()],
            ..Default::default()
        }),
        to(l7::RequestOperation {
            methods: vec![exact("GET")],
            ..Default::default()
        }),
        to(l7::RequestOperation {
            hosts: vec![presence()],
            ..Default::default()
        }),
        to(l7::RequestOperation {
            not_paths: vec![path(exact("/x"))],
            ..Default::default()
        }),
        when(cond(
            Key::RequestHeader("x-user".into()),
            vec![exact("alice")],
        )),
        when(cond(
            Key::RequestClaim(l7::ClaimPath {
                path: vec!["a".into()],
            }),
            vec![exact("b")],
        )),
    ];
    for rule in http_rows {
        // Same namespace requirement in both, so the L4 part holds.
        let mut with_l4 = rule.clone();
        with_l4.from.push(l7::RequestSource::default());
        let allow = policy("allow", l7::Action::Allow, vec![with_l4.clone()]);
        assert!(
            matches!(
                authorize_tcp([&allow], &req.connection()),
                Authz::Denied { .. }
            ),
            "ALLOW {rule:?} must not match TCP"
        );
        let deny = policy("deny", l7::Action::Deny, vec![with_l4]);
        assert_eq!(
            authorize_tcp([&deny], &req.connection()),
            Authz::Denied {
                policy: "shop/deny".into()
            },
            "DENY {rule:?} must deny TCP without its HTTP fields"
        );
    }
    // L4 fields still decide for TCP.
    let allow_ns = policy(
        "allow-ns",
        l7::Action::Allow,
        vec![l7::Rule {
            from: vec![l7::RequestSource {
                namespaces: vec![exact("client-ns")],
                ..Default::default()
            }],
            to: vec![l7::RequestOperation {
                ports: vec![8080],
                ..Default::default()
            }],
            when: vec![ip_cond(Key::SourceIp(true), vec![net([10, 1, 0, 0], 16)])],
        }],
    );
    assert_eq!(
        authorize_tcp([&allow_ns], &req.connection()),
        Authz::Allowed
    );
    let deny_other_ns = policy(
        "deny-other",
        l7::Action::Deny,
        vec![l7::Rule {
            from: vec![l7::RequestSource {
                namespaces: vec![exact("other")],
                ..Default::default()
            }],
            to: vec![l7::RequestOperation {
                methods: vec![exact("DELETE")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert_eq!(
        authorize_tcp([&deny_other_ns], &req.connection()),
        Authz::Allowed
    );
}

#[test]
fn path_templates_follow_envoy_uri_template() {
    let rows: Vec<(&[&str], &str, bool)> = vec![
        (&["foo", "{*}"], "/foo/bar", true),
        (&["foo", "{*}"], "/foo/bar/baz", false),
        (&["foo", "{*}"], "/foo/", false),
        (&["foo", "{**}", ""], "/foo/bar/", true),
        (&["foo", "{**}", ""], "/foo//", true),
        (&["foo", "{**}", ""], "/foo/bar", false),
        (&["foo", "{*}", "bar", "{**}"], "/foo/buzz/bar/", true),
        (&["foo", "{*}", "bar", "{**}"], "/foo/buzz/bar/baz", true),
        (&["foo", "{*}", "bar", "{**}"], "/foo/buzz/baz/x", false),
        (&["a.b", "{*}"], "/aXb/c", false),
    ];
    for (segments, p, want) in rows {
        let pattern = path_pattern("paths[0]", &template(segments)).unwrap();
        assert_eq!(pattern.matches(p), want, "{segments:?} vs {p}");
    }
}

#[test]
fn host_port_is_stripped_for_names_and_ipv6() {
    assert_eq!(host_without_port("example.com:8080"), "example.com");
    assert_eq!(host_without_port("example.com"), "example.com");
    assert_eq!(host_without_port("[fd00::1]:80"), "[fd00::1]");
    assert_eq!(host_without_port("fd00::1"), "fd00::1");
}

#[test]
fn bad_fields_are_named_with_their_path() {
    let bad_cidr = l7::Rule {
        from: vec![l7::RequestSource {
            ip_blocks: vec![net([10, 0, 0, 0], 8), net([10, 0, 0, 0], 40)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let empty_match = from(l7::RequestSource {
        principals: vec![xds::StringMatch { match_type: None }],
        ..Default::default()
    });
    let rows: Vec<(Vec<l7::Rule>, &str, &str)> = vec![
        (
            vec![l7::Rule::default(), l7::Rule::default(), bad_cidr],
            "rules[2].from[0].ip_blocks[1].length",
            "prefix length 40 is too long for 10.0.0.0",
        ),
        (
            vec![empty_match],
            "rules[0].from[0].principals[0]",
            "a string match needs one of exact, prefix, suffix or presence",
        ),
        (
            vec![to(l7::RequestOperation {
                ports: vec![70000],
                ..Default::default()
            })],
            "rules[0].to[0].ports[0]",
            "port 70000 is out of range (0-65535)",
        ),
        (
            vec![to(l7::RequestOperation {
                paths: vec![template(&["a", "{**}", "{*}"])],
                ..Default::default()
            })],
            "rules[0].to[0].paths[0].template.segments[2]",
            "{**} must be the last operator",
        ),
        (
            vec![to(l7::RequestOperation {
                paths: vec![template(&["a*"])],
                ..Default::default()
            })],
            "rules[0].to[0].paths[0].template.segments[0]",
            "\"a*\": a segment is {*}, {**} or literal text without '*', '{', '}' or '/'",
        ),
        (
            vec![to(l7::RequestOperation {
                paths: vec![l7::PathPattern { kind: None }],
                ..Default::default()
            })],
            "rules[0].to[0].paths[0]",
            "a path needs a match or a template",
        ),
        (
            vec![when(l7::Condition {
                key: None,
                values: vec![exact("x")],
                ..Default::default()
            })],
            "rules[0].when[0].key",
            "is required",
        ),
        (
            vec![when(cond(
                Key::RequestHeader("bad header".into()),
                vec![exact("x")],
            ))],
            "rules[0].when[0].request_header",
            "\"bad header\" is not a valid header name",
        ),
        (
            vec![when(cond(Key::SourceIp(true), vec![exact("10.0.0.1")]))],
            "rules[0].when[0].values",
            "this key takes CIDRs in ip_values / not_ip_values",
        ),
        (
            vec![when(ip_cond(
                Key::SourceNamespace(true),
                vec![net([10, 0, 0, 0], 8)],
            ))],
            "rules[0].when[0].ip_values",
            "only source_ip, remote_ip and destination_ip take CIDRs",
        ),
        (
            vec![when(cond(Key::RequestPrincipal(true), vec![]))],
            "rules[0].when[0].values",
            "a condition needs values or not_values",
        ),
        (
            vec![when(cond(
                Key::RequestClaim(l7::ClaimPath { path: vec![] }),
                vec![exact("x")],
            ))],
            "rules[0].when[0].request_claim.path",
            "a claim path needs at least one step and no empty step",
        ),
    ];
    for (rules, field, reason) in rows {
        let err = Policy::from_proto(&l7::HttpAuthorization {
            namespace: "shop".into(),
            name: "p".into(),
            action: l7::Action::Allow as i32,
            rules,
            problems: vec![],
        })
        .unwrap_err();
        assert_eq!(err, FieldError::new(field, reason));
    }
    let unknown_action = Policy::from_proto(&l7::HttpAuthorization {
        namespace: "shop".into(),
        name: "p".into(),
        action: 7,
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(unknown_action.field, "action");
    let no_name = Policy::from_proto(&l7::HttpAuthorization {
        namespace: "shop".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(no_name, FieldError::new("name", "is required"));
}

#[test]
fn tcp_and_http_share_the_destination_port_of_the_target() {
    let req = request();
    let p = policy(
        "p",
        l7::Action::Allow,
        vec![when(cond(Key::DestinationPort(true), vec![exact("8080")]))],
    );
    assert_eq!(authorize_tcp([&p], &req.connection()), Authz::Allowed);
    let workload = Target::Workload {
        uid: "w".into(),
        port: 9090,
        protocol: Protocol::Tcp,
    };
    let facts = ConnectionFacts {
        target: &workload,
        ..req.connection()
    };
    assert!(matches!(authorize_tcp([&p], &facts), Authz::Denied { .. }));
    let _: SocketAddr = facts.destination;
}
