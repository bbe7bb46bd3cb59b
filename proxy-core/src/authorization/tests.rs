//! Table tests of policy evaluation: every field and its `not_` form, for a
//! peer with an identity, another identity, and plaintext.

use std::sync::Arc;

use super::*;

fn id(s: &str) -> Option<SpiffeId> {
    Some(s.parse().unwrap())
}

/// `spiffe://td/ns/ns-a/sa/sa-a` from 10.0.0.1 to 10.0.1.1:8080.
fn tls() -> ConnectionInfo {
    ConnectionInfo {
        source_ip: "10.0.0.1".parse().unwrap(),
        source_identity: id("spiffe://td/ns/ns-a/sa/sa-a"),
        destination: "10.0.1.1:8080".parse().unwrap(),
    }
}

/// `spiffe://other.td/ns/ns-b/sa/sa-b` from 10.0.0.2 to 10.0.1.2:9090.
fn tls_other() -> ConnectionInfo {
    ConnectionInfo {
        source_ip: "10.0.0.2".parse().unwrap(),
        source_identity: id("spiffe://other.td/ns/ns-b/sa/sa-b"),
        destination: "10.0.1.2:9090".parse().unwrap(),
    }
}

/// No identity, from 10.0.0.1 to 10.0.1.1:8080 (as `tls()`).
fn plaintext() -> ConnectionInfo {
    ConnectionInfo {
        source_identity: None,
        ..tls()
    }
}

fn policy(action: Action, groups: Vec<Vec<Vec<Match>>>) -> Arc<Authorization> {
    Arc::new(Authorization {
        name: format!("{action:?}").to_lowercase(),
        namespace: "ns".into(),
        scope: Scope::Namespace,
        action,
        rules: groups,
        dry_run: false,
    })
}

fn one(m: Match) -> Arc<Authorization> {
    policy(Action::Allow, vec![vec![vec![m]]])
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn sa(ns: &str, name: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    }
}

#[test]
fn every_field_and_its_negation() {
    // (what, match, [tls, tls_other, plaintext])
    let table: Vec<(&str, Match, [bool; 3])> = vec![
        (
            "principals",
            Match {
                principals: vec![exact("td/ns/ns-a/sa/sa-a")],
                ..Default::default()
            },
            [true, false, false],
        ),
        (
            "not_principals",
            Match {
                not_principals: vec![exact("td/ns/ns-a/sa/sa-a")],
                ..Default::default()
            },
            [false, true, true],
        ),
        (
            "principal stored with spiffe:// never matches (istiod strips it)",
            Match {
                principals: vec![exact("spiffe://td/ns/ns-a/sa/sa-a")],
                ..Default::default()
            },
            [false, false, false],
        ),
        (
            "principal prefix",
            Match {
                principals: vec![StringMatch::Prefix("td/".into())],
                ..Default::default()
            },
            [true, false, false],
        ),
        (
            "principal suffix",
            Match {
                principals: vec![StringMatch::Suffix("/sa/sa-b".into())],
                ..Default::default()
            },
            [false, true, false],
        ),
        (
            "principal presence: any identity",
            Match {
                principals: vec![StringMatch::Presence()],
                ..Default::default()
            },
            [true, true, false],
        ),
        (
            "not principal presence: plaintext only",
            Match {
                not_principals: vec![StringMatch::Presence()],
                ..Default::default()
            },
            [false, false, true],
        ),
        (
            "principals are alternatives",
            Match {
                principals: vec![exact("nope"), exact("other.td/ns/ns-b/sa/sa-b")],
                ..Default::default()
            },
            [false, true, false],
        ),
        (
            "namespaces",
            Match {
                namespaces: vec![exact("ns-a")],
                ..Default::default()
            },
            [true, false, false],
        ),
        (
            "not_namespaces",
            Match {
                not_namespaces: vec![exact("ns-a")],
                ..Default::default()
            },
            [false, true, true],
        ),
        (
            "namespace presence",
            Match {
                namespaces: vec![StringMatch::Presence()],
                ..Default::default()
            },
            [true, true, false],
        ),
        (
            "service_accounts",
            Match {
                service_accounts: vec![sa("ns-b", "sa-b")],
                ..Default::default()
            },
            [false, true, false],
        ),
        (
            "not_service_accounts",
            Match {
                not_service_accounts: vec![sa("ns-b", "sa-b")],
                ..Default::default()
            },
            [true, false, true],
        ),
        (
            "service account needs both namespace and name",
            Match {
                service_accounts: vec![sa("ns-a", "sa-b")],
                ..Default::default()
            },
            [false, false, false],
        ),
        (
            "source_ips",
            Match {
                source_ips: vec![net("10.0.0.1/32")],
                ..Default::default()
            },
            [true, false, true],
        ),
        (
            "not_source_ips",
            Match {
                not_source_ips: vec![net("10.0.0.1/32")],
                ..Default::default()
            },
            [false, true, false],
        ),
        (
            "source CIDR",
            Match {
                source_ips: vec![net("10.0.0.0/24")],
                ..Default::default()
            },
            [true, true, true],
        ),
        (
            "IPv6 CIDR never holds an IPv4 source",
            Match {
                source_ips: vec![net("::/0")],
                ..Default::default()
            },
            [false, false, false],
        ),
        (
            "destination_ips",
            Match {
                destination_ips: vec![net("10.0.1.2/32")],
                ..Default::default()
            },
            [false, true, false],
        ),
        (
            "not_destination_ips",
            Match {
                not_destination_ips: vec![net("10.0.1.2/32")],
                ..Default::default()
            },
            [true, false, true],
        ),
        (
            "destination_ports",
            Match {
                destination_ports: vec![8080],
                ..Default::default()
            },
            [true, false, true],
        ),
        (
            "not_destination_ports",
            Match {
                not_destination_ports: vec![8080],
                ..Default::default()
            },
            [false, true, false],
        ),
        (
            "fields are all required",
            Match {
                namespaces: vec![exact("ns-a")],
                destination_ports: vec![9090],
                ..Default::default()
            },
            [false, false, false],
        ),
        (
            "a field and its negation together",
            Match {
                source_ips: vec![net("10.0.0.0/24")],
                not_source_ips: vec![net("10.0.0.2/32")],
                ..Default::default()
            },
            [true, false, true],
        ),
        (
            "a match with no fields is skipped",
            Match::default(),
            [false, false, false],
        ),
    ];
    for (what, m, want) in table {
        let p = one(m);
        for (conn, want) in [tls(), tls_other(), plaintext()].iter().zip(want) {
            assert_eq!(p.matches(conn), want, "{what}: {conn:?}");
        }
    }
}

#[test]
fn string_matches() {
    let table = [
        (exact("foo"), "foo", true),
        (exact("foo"), "foobar", false),
        (exact("foo"), "", false),
        (StringMatch::Prefix("foo".into()), "foobar", true),
        (StringMatch::Prefix("foo".into()), "barfoo", false),
        (StringMatch::Suffix("foo".into()), "barfoo", true),
        (StringMatch::Suffix("foo".into()), "foobar", false),
        (StringMatch::Presence(), "x", true),
        (StringMatch::Presence(), "", false),
    ];
    for (m, value, want) in table {
        assert_eq!(m.matches(value), want, "{m:?} on {value:?}");
    }
}

#[test]
fn groups_are_alternatives_rules_are_all_required_matches_are_alternatives() {
    let ns = |n: &str| Match {
        namespaces: vec![exact(n)],
        ..Default::default()
    };
    let port = |p: u16| Match {
        destination_ports: vec![p],
        ..Default::default()
    };
    // One group: (ns-a or ns-b) and port 8080.
    let and = policy(
        Action::Allow,
        vec![vec![vec![ns("ns-a"), ns("ns-b")], vec![port(8080)]]],
    );
    assert!(and.matches(&tls()));
    assert!(!and.matches(&tls_other()), "ns-b but port 9090");
    // Two groups: ns-a, or port 9090.
    let or = policy(
        Action::Allow,
        vec![vec![vec![ns("ns-a")]], vec![vec![port(9090)]]],
    );
    assert!(or.matches(&tls()));
    assert!(or.matches(&tls_other()));
    assert!(!or.matches(&plaintext().with_port(1)));
}

impl ConnectionInfo {
    fn with_port(mut self, port: u16) -> Self {
        self.destination.set_port(port);
        self
    }
}

#[test]
fn empty_policies_groups_and_rules() {
    // No groups: matches nothing (an ALLOW of this kind allows nothing).
    assert!(!policy(Action::Allow, vec![]).matches(&tls()));
    // An empty group, or a group with an empty rule: matches everything.
    assert!(policy(Action::Allow, vec![vec![]]).matches(&plaintext()));
    assert!(policy(Action::Allow, vec![vec![vec![]]]).matches(&plaintext()));
}

#[test]
fn decisions() {
    let from_ns_b = Match {
        namespaces: vec![exact("ns-b")],
        ..Default::default()
    };
    let from_ns_a = Match {
        namespaces: vec![exact("ns-a")],
        ..Default::default()
    };
    let allow_all = policy(Action::Allow, vec![vec![]]);
    let allow_nothing = policy(Action::Allow, vec![]);
    let deny_b = policy(Action::Deny, vec![vec![vec![from_ns_b.clone()]]]);
    let allow_a = policy(Action::Allow, vec![vec![vec![from_ns_a]]]);

    // No policies: allowed.
    assert_eq!(
        Policies::default().check(&tls()),
        Decision::AllowedByDefault
    );
    // Only a DENY that does not match: allowed by default.
    let p = Policies::new(vec![deny_b.clone()]);
    assert_eq!(p.check(&tls()), Decision::AllowedByDefault);
    assert_eq!(
        p.check(&tls_other()),
        Decision::Denied {
            policy: "ns/deny".into()
        }
    );
    // DENY wins over a matching ALLOW.
    let p = Policies::new(vec![allow_all.clone(), deny_b.clone()]);
    assert!(!p.check(&tls_other()).is_allowed());
    assert_eq!(
        p.check(&tls()),
        Decision::Allowed {
            policy: "ns/allow".into()
        }
    );
    // An ALLOW that applies but does not match denies.
    let p = Policies::new(vec![allow_a.clone()]);
    assert!(p.check(&tls()).is_allowed());
    assert_eq!(p.check(&tls_other()), Decision::NotAllowed);
    assert_eq!(p.check(&plaintext()), Decision::NotAllowed);
    // An ALLOW with no rules denies everything; another ALLOW can still admit.
    assert_eq!(
        Policies::new(vec![allow_nothing.clone()]).check(&tls()),
        Decision::NotAllowed
    );
    assert!(
        Policies::new(vec![allow_nothing, allow_a])
            .check(&tls())
            .is_allowed()
    );
    // Plaintext and a DENY on not_principals presence: denied (no identity).
    let deny_plaintext = policy(
        Action::Deny,
        vec![vec![vec![Match {
            not_principals: vec![StringMatch::Presence()],
            ..Default::default()
        }]]],
    );
    let p = Policies::new(vec![deny_plaintext]);
    assert!(!p.check(&plaintext()).is_allowed());
    assert!(p.check(&tls()).is_allowed());
    assert_eq!(
        Decision::NotAllowed.to_string(),
        "deny (no ALLOW policy matched)"
    );
}

fn xds_policy(m: xds::Match) -> xds::Authorization {
    xds::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: xds::Scope::WorkloadSelector as i32,
        action: xds::Action::Deny as i32,
        rules: vec![xds::Rule {
            clauses: vec![xds::Clause { matches: vec![m] }],
        }],
        dry_run: false,
    }
}

#[test]
fn converts_from_the_wire() {
    use xds::string_match::MatchType;
    let a = Authorization::try_from(xds_policy(xds::Match {
        principals: vec![xds::StringMatch {
            match_type: Some(MatchType::Prefix("td/".into())),
        }],
        not_namespaces: vec![xds::StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        source_ips: vec![xds::Address {
            address: vec![10, 0, 0, 0],
            length: 8,
        }],
        destination_ports: vec![443],
        service_accounts: vec![xds::ServiceAccountMatch {
            namespace: "n".into(),
            service_account: "s".into(),
        }],
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(a.key(), "ns/p");
    assert_eq!(a.scope, Scope::WorkloadSelector);
    assert_eq!(a.action, Action::Deny);
    assert!(!a.dry_run);
    let m = &a.rules[0][0][0];
    assert_eq!(m.principals, [StringMatch::Prefix("td/".into())]);
    assert_eq!(m.not_namespaces, [StringMatch::Presence()]);
    assert_eq!(m.source_ips, [net("10.0.0.0/8")]);
    assert_eq!(m.destination_ports, [443]);
    assert_eq!(m.service_accounts, [sa("n", "s")]);
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(
        json["rules"][0][0][0],
        serde_json::json!({
            "notNamespaces": [{"Presence": []}],
            "serviceAccounts": [{"namespace": "n", "serviceAccount": "s"}],
            "principals": [{"Prefix": "td/"}],
            "sourceIps": ["10.0.0.0/8"],
            "destinationPorts": [443],
        })
    );
}

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let cases: Vec<(xds::Authorization, &str)> = vec![
        (
            xds_policy(xds::Match {
                source_ips: vec![xds::Address {
                    address: vec![1, 2],
                    length: 8,
                }],
                ..Default::default()
            }),
            "rules[0].clauses[0].matches[0].source_ips[0].address: 2 bytes",
        ),
        (
            xds_policy(xds::Match {
                not_destination_ips: vec![xds::Address {
                    address: vec![10, 0, 0, 0],
                    length: 33,
                }],
                ..Default::default()
            }),
            "matches[0].not_destination_ips[0].length: prefix length 33",
        ),
        (
            xds_policy(xds::Match {
                destination_ports: vec![65536],
                ..Default::default()
            }),
            "matches[0].destination_ports[0]: port 65536",
        ),
        (
            xds_policy(xds::Match {
                namespaces: vec![xds::StringMatch { match_type: None }],
                ..Default::default()
            }),
            "matches[0].namespaces[0]: a string match needs",
        ),
        (
            xds::Authorization {
                action: 5,
                ..xds_policy(Default::default())
            },
            "action: unknown value 5",
        ),
        (
            xds::Authorization {
                scope: 9,
                ..xds_policy(Default::default())
            },
            "scope: unknown value 9",
        ),
        (
            xds::Authorization {
                name: String::new(),
                ..xds_policy(Default::default())
            },
            "name is required",
        ),
    ];
    for (policy, want) in cases {
        let err = Authorization::try_from(policy).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}

/// `policy` named `name`, dry-run.
fn dry(name: &str, action: Action, rules: Vec<Vec<Vec<Match>>>) -> Arc<Authorization> {
    Arc::new(Authorization {
        name: name.into(),
        dry_run: true,
        ..(*policy(action, rules)).clone()
    })
}

fn from_ns_a() -> Vec<Vec<Vec<Match>>> {
    vec![vec![vec![Match {
        namespaces: vec![exact("ns-a")],
        ..Default::default()
    }]]]
}

#[test]
fn dry_run_is_read_from_the_wire() {
    let mut x = xds_policy(xds::Match {
        destination_ports: vec![80],
        ..Default::default()
    });
    x.dry_run = true;
    let a = Authorization::try_from(x).unwrap();
    assert!(a.dry_run);
    assert_eq!(serde_json::to_value(&a).unwrap()["dryRun"], true);
}

#[test]
fn a_dry_run_deny_does_not_deny() {
    let p = Policies::new(vec![dry("would-deny", Action::Deny, from_ns_a())]);
    // It matches tls() (ns-a): enforced, the connection is still allowed.
    assert_eq!(p.check(&tls()), Decision::AllowedByDefault);
    assert_eq!(
        p.dry_run(&tls()),
        Some(Decision::Denied {
            policy: "ns/would-deny".into()
        })
    );
    // Not matched: it would not have changed anything either.
    assert_eq!(p.dry_run(&tls_other()), Some(Decision::AllowedByDefault));
}

#[test]
fn a_dry_run_allow_does_not_allow() {
    // An enforced ALLOW for port 9090 only; the dry-run ALLOW would let ns-a in.
    let enforced = policy(
        Action::Allow,
        vec![vec![vec![Match {
            destination_ports: vec![9090],
            ..Default::default()
        }]]],
    );
    let would_allow = dry("would-allow", Action::Allow, from_ns_a());
    let p = Policies::new(vec![enforced, would_allow.clone()]);
    assert_eq!(p.check(&tls()), Decision::NotAllowed);
    assert_eq!(
        p.dry_run(&tls()),
        Some(Decision::Allowed {
            policy: "ns/would-allow".into()
        })
    );
    // Alone, a dry-run ALLOW does not make "ALLOW policies apply" either:
    // enforced, a peer it does not match is still allowed by default.
    let alone = Policies::new(vec![would_allow]);
    assert_eq!(alone.check(&tls_other()), Decision::AllowedByDefault);
    assert_eq!(alone.dry_run(&tls_other()), Some(Decision::NotAllowed));
}

#[test]
fn no_dry_run_policy_no_dry_run_decision() {
    let p = Policies::new(vec![policy(Action::Deny, from_ns_a())]);
    assert_eq!(p.dry_run(&tls()), None);
    // A missing policy still decides first, dry run or not.
    let missing = Policies {
        applied: vec![dry("d", Action::Deny, from_ns_a())],
        missing: vec!["ns/gone".into()],
    };
    assert!(matches!(
        missing.check(&tls()),
        Decision::MissingPolicy { .. }
    ));
}

/// Captures what `log_dry_run` writes.
fn logged(p: &Policies, conn: &ConnectionInfo) -> String {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || p.log_dry_run(conn, &p.check(conn)));
    String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn dry_run_decisions_are_logged() {
    let deny = Policies::new(vec![dry("would-deny", Action::Deny, from_ns_a())]);
    let line = logged(&deny, &tls());
    assert!(
        line.contains("dry-run authorization: deny if enforced, allow as enforced"),
        "{line}"
    );
    assert!(line.contains("ns/would-deny (DENY, matched)"), "{line}");
    assert!(line.contains("deny (policy ns/would-deny)"), "{line}");

    let allow = Policies::new(vec![
        policy(
            Action::Allow,
            vec![vec![vec![Match {
                destination_ports: vec![9090],
                ..Default::default()
            }]]],
        ),
        dry("would-allow", Action::Allow, from_ns_a()),
    ]);
    let line = logged(&allow, &tls());
    assert!(
        line.contains("dry-run authorization: allow if enforced, deny as enforced"),
        "{line}"
    );
    assert!(line.contains("ns/would-allow (ALLOW, matched)"), "{line}");

    // No dry-run policy: nothing logged.
    assert_eq!(
        logged(&Policies::new(vec![one(Match::default())]), &tls()),
        ""
    );
}
