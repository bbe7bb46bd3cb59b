//! Implicit ALLOW-from-waypoint policies: with
//! [`MeshConfig::auto_allow_waypoint_policy`] (upstream's
//! `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`, off by default), every waypoint that
//! has instances gets one ALLOW Authorization admitting its own identities,
//! and every workload behind it lists that policy. Unless another ALLOW
//! policy applies to the workload too, only the waypoint may then reach it:
//! traffic that skips the waypoint is refused by the destination's ztunnel.
//!
//! As upstream (`implicitWaypointPolicy`, `implicitWaypointPolicyName` and
//! `implicitWaypointPolicies` in
//! pilot/pkg/serviceregistry/kube/controller/ambient/):
//! - key `<waypoint ns>/istio_allow_waypoint_<waypoint ns>_<waypoint name>`
//!   (`_` never appears in a Kubernetes name, so it cannot collide with a
//!   user's policy), WORKLOAD_SELECTOR scope (listed by name, never selected
//!   by labels), action ALLOW, one group with one rule whose one match lists
//!   the principals `<trust domain>/ns/<waypoint ns>/sa/<account>` of the
//!   service accounts its instances run as (sorted, each once: upstream
//!   repeats an account per pod, which admits the same identities);
//! - a waypoint without instances has no policy, and nothing lists one for
//!   it (no identity to admit: upstream leaves such workloads open);
//! - a workload lists the policies of the waypoints its services are bound
//!   to, then that of the waypoint it is bound to itself (a waypoint
//!   instance is bound to none, and the waypoint's own Service never is).
//!   istiod-rs sorts the services' waypoints by key and lists each policy
//!   once, where upstream's order follows its collection.

use std::collections::BTreeMap;

use api::security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match};

use super::MeshConfig;
use super::waypoints::{Waypoint, Waypoints};

/// Prefix of the names of the implicit ALLOW-from-waypoint policies.
const ALLOW_WAYPOINT_PREFIX: &str = "istio_allow_waypoint_";

/// The identities of a waypoint's instances, as policies name them:
/// `<trust domain>/ns/<waypoint ns>/sa/<account>`, sorted, each once.
pub(super) fn principal_names<'a>(
    mesh: &'a MeshConfig,
    w: &'a Waypoint,
) -> impl Iterator<Item = String> + 'a {
    (w.service_accounts.iter())
        .map(move |sa| format!("{}/ns/{}/sa/{sa}", mesh.trust_domain, w.namespace()))
}

/// The same as exact matches.
pub(super) fn principals(mesh: &MeshConfig, w: &Waypoint) -> Vec<StringMatch> {
    exact(principal_names(mesh, w))
}

/// Each name as an exact match, in order.
pub(super) fn exact(names: impl IntoIterator<Item = String>) -> Vec<StringMatch> {
    names
        .into_iter()
        .map(|name| StringMatch {
            match_type: Some(string_match::MatchType::Exact(name)),
        })
        .collect()
}

/// The implicit policies of one translation.
#[derive(Debug, Default)]
pub(super) struct WaypointPolicies {
    /// Waypoint (`ns/name`) -> its policy's key and the policy.
    by_waypoint: BTreeMap<String, (String, Authorization)>,
}

/// What the policy keys of a workload depend on besides its own pod and the
/// non-pod inputs: both can change with another pod. A waypoint has a
/// policy only while it has instances, and a per-ServiceAccount waypoint
/// binds a service only while all the service's pods run as its account.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Dependencies {
    waypoints: Vec<String>,
    service_waypoints: Vec<Option<String>>,
    service_also_served_by: Vec<Vec<String>>,
}

impl WaypointPolicies {
    /// One policy per waypoint with instances; none when the mesh does not
    /// ask for them.
    pub fn build(mesh: &MeshConfig, waypoints: &Waypoints) -> Self {
        if !mesh.auto_allow_waypoint_policy {
            return WaypointPolicies::default();
        }
        let by_waypoint = waypoints
            .iter()
            .filter(|w| !w.service_accounts.is_empty())
            .map(|w| {
                let namespace = w.namespace();
                let name = format!("{ALLOW_WAYPOINT_PREFIX}{namespace}_{}", w.name());
                let principals = principals(mesh, w);
                let authorization = Authorization {
                    name: name.clone(),
                    namespace: namespace.to_string(),
                    scope: Scope::WorkloadSelector as i32,
                    action: Action::Allow as i32,
                    rules: vec![Rule {
                        clauses: vec![Clause {
                            matches: vec![Match {
                                principals,
                                ..Match::default()
                            }],
                        }],
                    }],
                    dry_run: false,
                };
                (w.key(), (format!("{namespace}/{name}"), authorization))
            })
            .collect();
        WaypointPolicies { by_waypoint }
    }

    /// The policies to serve, by key.
    pub fn authorizations(&self) -> impl Iterator<Item = (&str, &Authorization)> {
        self.by_waypoint.values().map(|(k, a)| (k.as_str(), a))
    }

    /// The policies a workload lists: those of the waypoints its services
    /// are bound to (`services`, sorted by waypoint, each once, without its
    /// own), then that of its own waypoint (`own`, `ns/name`).
    pub fn keys_for<'a>(
        &self,
        own: Option<&str>,
        services: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        if self.by_waypoint.is_empty() {
            return Vec::new();
        }
        let mut waypoints: Vec<&str> = services.into_iter().filter(|w| Some(*w) != own).collect();
        waypoints.sort_unstable();
        waypoints.dedup();
        waypoints
            .into_iter()
            .chain(own)
            .filter_map(|w| self.by_waypoint.get(w))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// What the workloads' keys depend on beyond their own pods, given the
    /// waypoint each service is bound to and the others serving it;
    /// `None` while there are no implicit policies (nothing depends on
    /// anything).
    pub fn dependencies(
        &self,
        service_waypoints: &[Option<String>],
        service_also_served_by: &[Vec<String>],
    ) -> Option<Dependencies> {
        (!self.by_waypoint.is_empty()).then(|| Dependencies {
            waypoints: self.by_waypoint.keys().cloned().collect(),
            service_waypoints: service_waypoints.to_vec(),
            service_also_served_by: service_also_served_by.to_vec(),
        })
    }
}
