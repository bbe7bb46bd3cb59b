//! Who may reach a pod: one decision for HBONE (15008) and plaintext
//! (15006) alike, made from the pod's Authorization policies alone.
//!
//! The peer is whoever connected: a client's ztunnel, the pod's waypoint,
//! an ingress gateway or a sidecar over HBONE, or a plaintext client. Each
//! is subject to every L4 policy that applies to the pod; a waypoint gets
//! no exemption (it is the source of what it forwards). As in upstream
//! ztunnel (`state.rs` `assert_rbac`, called by `proxy/inbound.rs` and
//! `proxy/inbound_passthrough.rs`), being bound to a waypoint does not by
//! itself refuse traffic that arrives some other way: upstream leaves that to
//! policy, and istiod can generate it (`PILOT_AUTO_ALLOW_WAYPOINT_POLICY`:
//! an ALLOW of the waypoint's identities listed on the bound workloads).
//!
//! Beyond upstream, a selector policy the workload refers to but the proxy
//! does not hold denies (see [`proxy_core::authorization`]).
//!
//! Dry-run policies (`istio.io/dry-run`) take no part in the decision; when
//! one applies, what it would have decided is logged next to the decision
//! (target `authorization`).

use proxy_core::authorization::{ConnectionInfo, Decision};
use proxy_core::store::{Snapshot, Workload};

use super::metrics::FailureReason;

/// Whether `conn` may reach `workload`.
pub fn decide(snapshot: &Snapshot, workload: &Workload, conn: &ConnectionInfo) -> Decision {
    let policies = snapshot.policies_for(workload);
    let decision = policies.check(conn);
    policies.log_dry_run(conn, &decision);
    decision
}

/// The failure reason a denial is counted under.
pub fn denial_reason(decision: &Decision) -> FailureReason {
    match decision {
        Decision::MissingPolicy { .. } => FailureReason::MissingPolicy,
        _ => FailureReason::PolicyDenied,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use api::security::{self as sec, Match};
    use proxy_core::store::WorkloadStore;

    use super::*;
    use crate::proxy::testing::xds;

    const WAYPOINT_SA: &str = "spiffe://cluster.local/ns/ns/sa/waypoint";
    const CLIENT_SA: &str = "spiffe://cluster.local/ns/ns/sa/client";
    const INGRESS_SA: &str = "spiffe://cluster.local/ns/istio-system/sa/ingress";
    const SIDECAR_SA: &str = "spiffe://cluster.local/ns/other/sa/sidecar";

    /// The upstream istiod name of the implicit allow-from-waypoint policy.
    const IMPLICIT: &str = "istio_allow_waypoint_ns_waypoint";

    /// client 10.0.0.1; waypoint pod 10.0.0.5 (service account `waypoint`)
    /// behind 10.96.0.5; ingress 10.0.0.7, sidecar 10.0.0.8; servers:
    /// - `bound` (10.0.0.2): its own waypoint (`waypoint-for: workload`/`all`);
    /// - `svc-only` (10.0.0.3): only its service has the waypoint
    ///   (`waypoint-for: service`);
    /// - `mixed-a` (10.0.0.4, service account a) behind a service whose other
    ///   endpoint runs as b: a per-service-account waypoint serves the pod,
    ///   not the service;
    /// - `free` (10.0.0.6): no waypoint anywhere.
    ///
    /// With `implicit_waypoint_policy`, istiod's allow-from-waypoint policy
    /// is listed where upstream lists it: on every workload whose own
    /// waypoint or whose services' waypoint it is.
    fn store(implicit_waypoint_policy: bool) -> WorkloadStore {
        let store = WorkloadStore::new();
        let implicit = |w: xds::TestWorkload| {
            if implicit_waypoint_policy {
                w.policy(&format!("ns/{IMPLICIT}"))
            } else {
                w
            }
        };
        xds::apply(
            &store,
            vec![
                xds::workload("client", "ns", "10.0.0.1").hbone().into(),
                xds::workload("waypoint", "ns", "10.0.0.5")
                    .hbone()
                    .in_service("ns/waypoint.ns.svc.cluster.local", &[(15008, 15008)])
                    .into(),
                xds::service("waypoint", "ns", "10.96.0.5", &[(15008, 15008)]).into(),
                implicit(
                    xds::workload("bound", "ns", "10.0.0.2")
                        .hbone()
                        .waypoint_service("ns", "waypoint.ns.svc.cluster.local"),
                )
                .into(),
                implicit(
                    xds::workload("svc-only", "ns", "10.0.0.3")
                        .hbone()
                        .in_service("ns/svc.ns.svc.cluster.local", &[(80, 8080)]),
                )
                .into(),
                xds::service("svc", "ns", "10.96.0.3", &[(80, 8080)])
                    .waypoint_service("ns", "waypoint.ns.svc.cluster.local")
                    .into(),
                implicit(
                    xds::workload("mixed-a", "ns", "10.0.0.4")
                        .hbone()
                        .service_account("a")
                        .in_service("ns/mixed.ns.svc.cluster.local", &[(80, 8080)])
                        .waypoint_service("ns", "waypoint.ns.svc.cluster.local"),
                )
                .into(),
                xds::service("mixed", "ns", "10.96.0.4", &[(80, 8080)]).into(),
                xds::workload("free", "ns", "10.0.0.6").hbone().into(),
            ],
        );
        if implicit_waypoint_policy {
            xds::apply_policies(
                &store,
                vec![sec::Authorization {
                    scope: sec::Scope::WorkloadSelector as i32,
                    ..xds::policy(
                        IMPLICIT,
                        "ns",
                        sec::Action::Allow,
                        Match {
                            principals: vec![xds::exact(
                                WAYPOINT_SA.trim_start_matches("spiffe://"),
                            )],
                            ..Match::default()
                        },
                    )
                }],
            );
        }
        store
    }

    fn decide_for(store: &WorkloadStore, from: &str, identity: Option<&str>, to: &str) -> Decision {
        let snapshot = store.snapshot();
        let destination: std::net::SocketAddr = to.parse().unwrap();
        let workload = snapshot
            .workload_by_address("", destination.ip())
            .expect("the destination is a workload");
        decide(
            &snapshot,
            &workload,
            &ConnectionInfo {
                source_ip: from.parse::<IpAddr>().unwrap(),
                source_identity: identity.map(|i| i.parse().unwrap()),
                destination,
            },
        )
    }

    /// Upstream's cases. Without policies nothing is refused, whoever the
    /// peer and whatever the waypoint binding; with istiod's implicit
    /// allow-from-waypoint policy, exactly the workloads it is listed on
    /// take only the waypoint (and plaintext is refused there as HBONE is).
    #[test]
    fn admission_follows_policy_alone_as_upstream() {
        struct Case {
            name: &'static str,
            from: &'static str,
            identity: Option<&'static str>,
            to: &'static str,
            allowed: bool,
            allowed_with_implicit_policy: bool,
        }
        let cases = [
            Case {
                name: "the waypoint reaches the pod it serves",
                from: "10.0.0.5",
                identity: Some(WAYPOINT_SA),
                to: "10.0.0.2:8080",
                allowed: true,
                allowed_with_implicit_policy: true,
            },
            Case {
                name: "a mesh client straight to a waypoint-bound pod",
                from: "10.0.0.1",
                identity: Some(CLIENT_SA),
                to: "10.0.0.2:8080",
                allowed: true,
                allowed_with_implicit_policy: false,
            },
            Case {
                name: "plaintext to a waypoint-bound pod obeys the same rule",
                from: "10.0.0.9",
                identity: None,
                to: "10.0.0.2:8080",
                allowed: true,
                allowed_with_implicit_policy: false,
            },
            Case {
                name: "waypoint-for service: a pod's own address reached directly",
                from: "10.0.0.1",
                identity: Some(CLIENT_SA),
                to: "10.0.0.3:8080",
                allowed: true,
                allowed_with_implicit_policy: false,
            },
            Case {
                name: "waypoint-for service: the service's waypoint reaches the pod",
                from: "10.0.0.5",
                identity: Some(WAYPOINT_SA),
                to: "10.0.0.3:8080",
                allowed: true,
                allowed_with_implicit_policy: true,
            },
            Case {
                name: "per-service-account waypoint, mixed-account service: service traffic reaches the pod directly",
                from: "10.0.0.1",
                identity: Some(CLIENT_SA),
                to: "10.0.0.4:8080",
                allowed: true,
                allowed_with_implicit_policy: false,
            },
            Case {
                name: "ingress gateway HBONE straight to a pod",
                from: "10.0.0.7",
                identity: Some(INGRESS_SA),
                to: "10.0.0.2:8080",
                allowed: true,
                allowed_with_implicit_policy: false,
            },
            Case {
                name: "sidecar HBONE to a pod without a waypoint",
                from: "10.0.0.8",
                identity: Some(SIDECAR_SA),
                to: "10.0.0.6:8080",
                allowed: true,
                allowed_with_implicit_policy: true,
            },
            Case {
                name: "plaintext to a pod without a waypoint",
                from: "10.0.0.9",
                identity: None,
                to: "10.0.0.6:8080",
                allowed: true,
                allowed_with_implicit_policy: true,
            },
        ];
        let plain = store(false);
        let implicit = store(true);
        for c in &cases {
            let d = decide_for(&plain, c.from, c.identity, c.to);
            assert_eq!(d.is_allowed(), c.allowed, "{}: {d}", c.name);
            let d = decide_for(&implicit, c.from, c.identity, c.to);
            assert_eq!(
                d.is_allowed(),
                c.allowed_with_implicit_policy,
                "{} (implicit waypoint policy): {d}",
                c.name
            );
        }
    }

    /// Item 4 of the fail-closed review: the waypoint is a source like any
    /// other, so the destination's DENY policies apply to what it forwards.
    #[test]
    fn traffic_from_the_waypoint_is_subject_to_the_pods_policies() {
        let store = store(false);
        xds::apply_policies(
            &store,
            vec![xds::policy(
                "deny-waypoint",
                "ns",
                sec::Action::Deny,
                Match {
                    principals: vec![xds::exact(WAYPOINT_SA.trim_start_matches("spiffe://"))],
                    ..Match::default()
                },
            )],
        );
        let d = decide_for(&store, "10.0.0.5", Some(WAYPOINT_SA), "10.0.0.2:8080");
        assert_eq!(
            d,
            Decision::Denied {
                policy: "ns/deny-waypoint".into()
            }
        );
        assert_eq!(denial_reason(&d), FailureReason::PolicyDenied);
    }

    #[test]
    fn a_missing_policy_is_its_own_reason() {
        let d = Decision::MissingPolicy {
            policy: "ns/x".into(),
        };
        assert_eq!(denial_reason(&d), FailureReason::MissingPolicy);
    }

    /// A dry-run DENY that matches the client is evaluated, not enforced:
    /// the client is admitted; the same policy enforced refuses it.
    #[test]
    fn a_dry_run_deny_admits_what_it_matches() {
        let deny_client = |dry_run| sec::Authorization {
            dry_run,
            ..xds::policy(
                "no-client",
                "ns",
                sec::Action::Deny,
                Match {
                    principals: vec![xds::exact(CLIENT_SA.trim_start_matches("spiffe://"))],
                    ..Match::default()
                },
            )
        };
        let store = store(false);
        xds::apply_policies(&store, vec![deny_client(true)]);
        assert_eq!(
            decide_for(&store, "10.0.0.1", Some(CLIENT_SA), "10.0.0.6:8080"),
            Decision::AllowedByDefault
        );
        xds::apply_policies(&store, vec![deny_client(false)]);
        assert_eq!(
            decide_for(&store, "10.0.0.1", Some(CLIENT_SA), "10.0.0.6:8080"),
            Decision::Denied {
                policy: "ns/no-client".into()
            }
        );
    }
}
