//! The `Waypoint` resource: what one waypoint serves, the root of its scope.
//!
//! One per Gateway of class `istio-waypoint`, key `<ns>/<name>`:
//! - `services`: every Service bound to it (the bindings of
//!   `index/waypoints.rs`; for an on-demand waypoint, also those it is
//!   handing over, `Waypoints::serving`), each with its ports and their protocol, the key
//!   of its RouteTable (when a route attaches), the HttpAuthorization and
//!   JwtAuthentication keys that target it (`targetRefs` kind Service), and a
//!   `deny_all_reason` when an L7 rule for it cannot be translated at all;
//! - `workloads`: the pods bound to it directly (`waypoint-for: workload` or
//!   `all`; handed over too), protocol detected on every port;
//! - `gateway_authorizations` / `gateway_authentications`: the keys of the
//!   policies whose `targetRefs` name the waypoint Gateway itself;
//! - `forward_client_identity`: the Gateway's annotation
//!   `ambient.istio.io/xfcc-include-client-identity` is `true` (any case), as
//!   upstream's `xfccIncludeClientIdentityEnabled` (istio/istio
//!   pilot/pkg/networking/core/listener_waypoint.go). Upstream reads it from
//!   the waypoint pod, whose annotations are the Gateway's
//!   `spec.infrastructure.annotations` when that map is set, else its
//!   `metadata.annotations` (`extractInfrastructureMetadata`,
//!   pilot/pkg/config/kube/gateway/deploymentcontroller.go): the same map is
//!   read here. `false` (any case) or no annotation: off. Any other value is
//!   off too (no identity leaves on a typo) and reported on the Gateway.
//!
//! Policies are listed by target, whether or not the waypoint is ready: its
//! configuration holds them before the L4 stand-in DENY goes away.
//!
//! A rule attached by selector or namespace (see `l7.rs`) is listed by every
//! `ServedWorkload` of a workload it covers, and by every `ServedService`
//! through which a request can reach an endpoint it covers: the Service
//! itself when it has a covered endpoint, or any Service whose RouteTable
//! forwards or mirrors to one that has (the waypoint sends requests to the
//! backends' endpoints directly, so the rule must be checked where the
//! route is). Such a Service's requests that reach no covered endpoint are
//! then checked too: stricter than written, reported once per Service
//! ([`PolicyProblem::AppliedToWholeService`]). The waypoints with a ready
//! instance that list the rule enforce it ([`Bindings::enforced_by`]).
//!
//! Protocol of a service port, as upstream's `ConvertProtocol`
//! (istio/istio pkg/config/kube/conversion.go) and `protocol.Parse`
//! (pkg/config/protocol/instance.go): UDP ports are not served; the name
//! read is `appProtocol` when set, else the port name; `grpc-web...` is
//! gRPC-Web, otherwise the part before the first `-` is parsed case-
//! insensitively: `http` / `http_proxy` -> HTTP, `http2` -> HTTP2, `grpc` /
//! `grpc-web` -> GRPC, `tcp` / `tls` / `https` / `mongo` / `redis` / `mysql` ->
//! TCP (opaque), anything else -> DETECT, except on the server-first ports
//! 25, 53, 3306 and 27017 which upstream never sniffs (TCP). Beyond
//! upstream's list, Gateway API's `kubernetes.io/h2c` and a name `h2c` are
//! HTTP2 (prior knowledge) and `kubernetes.io/ws` is HTTP; `kubernetes.io/wss`
//! is TCP (TLS inside).

use std::collections::{BTreeMap, BTreeSet};

use api::l7::{Protocol, ServedPort, ServedService, ServedWorkload, Waypoint};
use api::labels;
use api::manifest::{Kind, ObjectKey};
use gateway_api::gateways::Gateway;
use k8s_openapi::api::core::v1::ServicePort;

use super::super::problem::{Effect, PolicyProblem, PolicyRef};
use super::super::selectors::labels_of;
use super::super::services::Services;
use super::super::waypoints::{Traffic, Waypoints};
use super::super::{MeshConfig, ip_bytes, workloads};
use super::{L7Rule, TargetOutcome};
use crate::state::{ClusterState, pod_service_account};

/// Waypoints (`ns/name`) with at least one ready instance: a pod in the
/// Gateway's namespace labelled `gateway.networking.k8s.io/gateway-name:
/// <name>`, condition Ready True and not being deleted.
pub(in crate::index) fn ready_waypoints(state: &ClusterState) -> BTreeSet<String> {
    state
        .pods
        .iter()
        .filter(|(_, pod)| workloads::healthy(pod) && workloads::addresses(pod).is_some())
        .filter_map(|(key, pod)| {
            let name = labels_of(&pod.metadata.labels).get(labels::GATEWAY_NAME)?;
            let gateway = state.gateways.get(&api::manifest::ObjectKey::new(
                &key.namespace,
                name.as_str(),
            ))?;
            (gateway.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS)
                .then(|| format!("{}/{name}", key.namespace))
        })
        .collect()
}

/// The protocol a waypoint speaks on a service port (see the module doc).
/// `None`: not served (UDP, SCTP).
pub(in crate::index) fn protocol(port: &ServicePort) -> Option<Protocol> {
    let name = super::super::services::protocol_name(port)?;
    let parsed = match name.as_str() {
        "kubernetes.io/h2c" => Some(Protocol::Http2),
        "kubernetes.io/ws" => Some(Protocol::Http),
        "kubernetes.io/wss" => Some(Protocol::Tcp),
        n if n.starts_with("grpc-web") => Some(Protocol::Grpc),
        n => match n.split('-').next().unwrap_or_default() {
            "http" | "http_proxy" => Some(Protocol::Http),
            "http2" | "h2c" => Some(Protocol::Http2),
            "grpc" => Some(Protocol::Grpc),
            "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" => Some(Protocol::Tcp),
            _ => None,
        },
    };
    Some(parsed.unwrap_or(match port.port {
        25 | 53 | 3306 | 27017 => Protocol::Tcp,
        _ => Protocol::Detect,
    }))
}

/// What the other L7 translations produced that the bindings name.
pub(in crate::index) struct Named<'a> {
    pub rules: &'a [L7Rule],
    /// Keys of the HttpAuthorization resources served.
    pub authorizations: &'a BTreeSet<String>,
    /// Keys of the JwtAuthentication resources served.
    pub authentications: &'a BTreeSet<String>,
    /// Keys of the RouteTable resources served (service keys).
    pub route_tables: &'a BTreeSet<String>,
    /// Service index -> why it must be refused entirely.
    pub deny_all: &'a BTreeMap<usize, Vec<String>>,
    /// Service key -> where its RouteTable sends requests.
    pub reaches: &'a BTreeMap<String, Reach>,
}

/// Where a RouteTable sends requests.
#[derive(Debug, Default)]
pub(in crate::index) struct Reach {
    /// The services (keys) its routes forward or mirror to.
    pub backends: BTreeSet<String>,
    /// Some route answers itself (redirect, direct response, no backend).
    pub answers_itself: bool,
}

impl Reach {
    pub fn of(table: &api::l7::RouteTable) -> Reach {
        use api::l7::route::Action;
        let mut reach = Reach::default();
        for route in &table.routes {
            match &route.action {
                Some(Action::Forward(f)) if !f.backends.is_empty() => {
                    reach
                        .backends
                        .extend(f.backends.iter().map(|b| b.service.clone()));
                }
                _ => reach.answers_itself = true,
            }
            let mirrors = route.mirrors.iter().filter_map(|m| m.backend.as_ref());
            reach.backends.extend(mirrors.map(|b| b.service.clone()));
        }
        reach
    }
}

/// The Waypoint resources, and who enforces the rules attached by selector
/// or namespace.
#[derive(Debug, Default)]
pub(in crate::index) struct Bindings {
    pub waypoints: BTreeMap<String, Waypoint>,
    /// By index of [`Named::rules`]: the waypoints (`ns/name`, sorted) with
    /// a ready instance that list the rule.
    pub enforced_by: Vec<Vec<String>>,
}

/// One `Waypoint` per waypoint Gateway, by key.
pub(in crate::index) fn waypoints(
    state: &ClusterState,
    mesh: &MeshConfig,
    waypoints: &Waypoints,
    services: &Services<'_>,
    ctx: &super::Context<'_>,
    named: &Named<'_>,
    problems: &mut Vec<PolicyProblem>,
) -> Bindings {
    let service_waypoints = ctx.service_waypoints;
    let mut out: BTreeMap<String, Waypoint> = state
        .gateways
        .iter()
        .filter(|(_, gw)| gw.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS)
        .map(|(key, gw)| {
            (
                key.to_string(),
                Waypoint {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    forward_client_identity: forward_client_identity(key, gw, problems),
                    ..Waypoint::default()
                },
            )
        })
        .collect();

    // Policy keys by what they target.
    let mut by_service: BTreeMap<usize, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for rule in named.rules.iter().filter(|r| r.coverage().is_none()) {
        let Some((key, list)) = policy_list(rule, named) else {
            continue;
        };
        for t in &rule.targets {
            if let Some(i) = TargetOutcome::service(t) {
                let lists = by_service.entry(i).or_default();
                list.add(&mut lists.0, &mut lists.1, &key);
            }
            if let Some(w) = t.waypoint()
                && let Some(wp) = out.get_mut(w)
            {
                list.add(
                    &mut wp.gateway_authorizations,
                    &mut wp.gateway_authentications,
                    &key,
                );
            }
        }
    }

    let mut enforced_by = vec![BTreeSet::new(); named.rules.len()];
    let ready = |w: &str| waypoints.ready.contains(w);
    let index_of: BTreeMap<&str, usize> = services
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.key.as_str(), i))
        .collect();
    for (r, rule) in named.rules.iter().enumerate() {
        let (Some(coverage), Some((key, list))) = (rule.coverage(), policy_list(rule, named))
        else {
            continue;
        };
        for (i, (entry, bound)) in services.entries.iter().zip(service_waypoints).enumerate() {
            let also = &ctx.service_also_served_by[i];
            if bound.is_none() && also.is_empty() {
                continue;
            }
            let reach = named.reaches.get(&entry.key);
            let backends: Vec<Option<usize>> = reach
                .into_iter()
                .flat_map(|r| &r.backends)
                .map(|b| index_of.get(b.as_str()).copied())
                .collect();
            let direct = coverage.services.contains(&i);
            let routed = backends
                .iter()
                .any(|b| b.is_some_and(|j| coverage.services.contains(&j)));
            if !direct && !routed {
                continue;
            }
            let lists = by_service.entry(i).or_default();
            list.add(&mut lists.0, &mut lists.1, &key);
            for w in bound.iter().chain(also).filter(|w| ready(w)) {
                enforced_by[r].insert(w.clone());
            }
            // Reported once, for the waypoint the service is bound to.
            let Some(waypoint) = bound else { continue };
            let why = match reach {
                Some(reach)
                    if reach.answers_itself
                        || backends
                            .iter()
                            .any(|b| b.is_none_or(|j| !coverage.covers_service(j))) =>
                {
                    "its routes send some of its requests elsewhere than to endpoints the rule covers"
                }
                None if coverage.uncovered.contains(&i) => {
                    "it also has endpoints the rule does not cover"
                }
                _ => continue,
            };
            problems.push(PolicyProblem::AppliedToWholeService {
                object: rule.object.clone(),
                service: format!("{}/{}", entry.namespace, entry.proto.name),
                why: why.to_string(),
                effect: Effect::L7Stricter {
                    what: format!(
                        "waypoint {waypoint} checks every request to it against the rule"
                    ),
                },
            });
        }
    }

    for (i, (entry, bound)) in services.entries.iter().zip(service_waypoints).enumerate() {
        let serving: Vec<&String> = bound.iter().chain(&ctx.service_also_served_by[i]).collect();
        if serving.is_empty() {
            continue;
        }
        let spec = entry.service.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(ServedPort {
                    port: u32::try_from(p.port).ok()?,
                    protocol: protocol(p)? as i32,
                })
            })
            .collect();
        let (authorizations, authentications) = by_service.remove(&i).unwrap_or_default();
        let served = ServedService {
            namespace: entry.namespace.to_string(),
            hostname: entry.proto.hostname.clone(),
            ports,
            route_table: if named.route_tables.contains(&entry.key) {
                entry.key.clone()
            } else {
                String::new()
            },
            authorizations,
            authentications,
            deny_all_reason: named
                .deny_all
                .get(&i)
                .map(|r| r.join("; "))
                .unwrap_or_default(),
        };
        for w in serving {
            if let Some(wp) = out.get_mut(w) {
                wp.services.push(served.clone());
            }
        }
    }

    for (key, pod) in &state.pods {
        let pod_labels = labels_of(&pod.metadata.labels);
        if waypoints.is_instance(&key.namespace, pod_labels) {
            continue;
        }
        let Some(addresses) = workloads::addresses(pod) else {
            continue;
        };
        let account = Some(pod_service_account(pod));
        let namespace = &key.namespace;
        let (service, traffic) = (None, Traffic::Workload);
        let also = waypoints.serving(state, namespace, pod_labels, account, service, traffic);
        let bound = also.bound.map(|w| w.key());
        let serving: Vec<String> = bound.into_iter().chain(also.also).collect();
        if serving.is_empty() {
            continue;
        }
        let mut served = ServedWorkload {
            uid: mesh.pod_uid(&key.namespace, &key.name),
            addresses: addresses.into_iter().map(ip_bytes).collect(),
            ..ServedWorkload::default()
        };
        for (r, rule) in named.rules.iter().enumerate() {
            let covered = rule.coverage().is_some_and(|c| c.workloads.contains(key));
            let Some((policy, list)) = policy_list(rule, named).filter(|_| covered) else {
                continue;
            };
            list.add(
                &mut served.authorizations,
                &mut served.authentications,
                &policy,
            );
            for w in serving.iter().filter(|w| ready(w)) {
                enforced_by[r].insert(w.clone());
            }
        }
        for w in &serving {
            if let Some(wp) = out.get_mut(w) {
                wp.workloads.push(served.clone());
            }
        }
    }
    Bindings {
        waypoints: out,
        enforced_by: enforced_by
            .into_iter()
            .map(|e| e.into_iter().collect())
            .collect(),
    }
}

/// Which of an entry's lists names a policy.
#[derive(Clone, Copy)]
enum PolicyList {
    /// HttpAuthorization keys.
    Authorizations,
    /// JwtAuthentication keys.
    Authentications,
}

impl PolicyList {
    /// Adds `key`, once, to this list of an entry.
    fn add(self, authorizations: &mut Vec<String>, authentications: &mut Vec<String>, key: &str) {
        push_unique(
            match self {
                PolicyList::Authorizations => authorizations,
                PolicyList::Authentications => authentications,
            },
            key,
        );
    }
}

/// The key of the resource a rule becomes and which list names it, when it
/// is served.
fn policy_list(rule: &L7Rule, named: &Named<'_>) -> Option<(String, PolicyList)> {
    let key = rule.object.key.to_string();
    let list = match rule.object.kind {
        Kind::AuthorizationPolicy if named.authorizations.contains(&key) => {
            PolicyList::Authorizations
        }
        Kind::RequestAuthentication if named.authentications.contains(&key) => {
            PolicyList::Authentications
        }
        _ => return None,
    };
    Some((key, list))
}

/// Whether the waypoint Gateway opted in to `x-forwarded-client-cert` (see
/// the module doc); a value that is not a boolean is reported and is off.
fn forward_client_identity(
    key: &ObjectKey,
    gateway: &Gateway,
    problems: &mut Vec<PolicyProblem>,
) -> bool {
    let infrastructure = gateway
        .spec
        .infrastructure
        .as_ref()
        .and_then(|i| i.annotations.as_ref());
    let (annotations, path) = match infrastructure {
        Some(a) => (Some(a), "spec.infrastructure.annotations"),
        None => (
            gateway.metadata.annotations.as_ref(),
            "metadata.annotations",
        ),
    };
    let Some(value) = annotations.and_then(|a| a.get(labels::XFCC_INCLUDE_CLIENT_IDENTITY)) else {
        return false;
    };
    if value.eq_ignore_ascii_case("true") {
        return true;
    }
    if !value.eq_ignore_ascii_case("false") {
        problems.push(PolicyProblem::InvalidValue {
            object: PolicyRef {
                kind: Kind::Gateway,
                key: key.clone(),
            },
            field: format!("{path}[{}]", labels::XFCC_INCLUDE_CLIENT_IDENTITY),
            value: value.clone(),
            expected: "\"true\" or \"false\"",
            effect: Effect::DefaultApplies {
                what: "the waypoint sends no x-forwarded-client-cert, as without the annotation"
                    .into(),
            },
        });
    }
    false
}

fn push_unique(list: &mut Vec<String>, key: &str) {
    if !list.iter().any(|k| k == key) {
        list.push(key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(
        name: Option<&str>,
        app: Option<&str>,
        number: i32,
        proto: Option<&str>,
    ) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            app_protocol: app.map(str::to_string),
            port: number,
            protocol: proto.map(str::to_string),
            ..ServicePort::default()
        }
    }

    #[test]
    fn protocol_follows_app_protocol_then_the_port_name_prefix() {
        let cases = [
            (port(Some("http-web"), None, 80, None), Some(Protocol::Http)),
            (port(Some("HTTP2"), None, 80, None), Some(Protocol::Http2)),
            (
                port(Some("grpc-web-ui"), None, 80, None),
                Some(Protocol::Grpc),
            ),
            (port(Some("grpc"), None, 80, None), Some(Protocol::Grpc)),
            (port(Some("h2c-api"), None, 80, None), Some(Protocol::Http2)),
            (port(Some("tcp-db"), None, 80, None), Some(Protocol::Tcp)),
            (port(Some("https"), None, 443, None), Some(Protocol::Tcp)),
            (port(Some("web"), None, 80, None), Some(Protocol::Detect)),
            (port(None, None, 80, None), Some(Protocol::Detect)),
            // appProtocol wins over the name.
            (
                port(Some("tcp"), Some("http"), 80, None),
                Some(Protocol::Http),
            ),
            (
                port(Some("web"), Some("kubernetes.io/h2c"), 80, None),
                Some(Protocol::Http2),
            ),
            (
                port(Some("web"), Some("kubernetes.io/ws"), 80, None),
                Some(Protocol::Http),
            ),
            (
                port(Some("web"), Some("kubernetes.io/wss"), 80, None),
                Some(Protocol::Tcp),
            ),
            // Server-first ports are never sniffed.
            (port(Some("db"), None, 3306, None), Some(Protocol::Tcp)),
            (port(Some("http"), None, 3306, None), Some(Protocol::Http)),
            // UDP is not served.
            (port(Some("dns"), None, 53, Some("UDP")), None),
        ];
        for (p, want) in cases {
            assert_eq!(protocol(&p), want, "{p:?}");
        }
    }

    /// A waypoint Gateway with these `metadata.annotations` and, when
    /// given, `spec.infrastructure.annotations`.
    fn gateway(
        annotations: serde_json::Value,
        infrastructure: Option<serde_json::Value>,
    ) -> Gateway {
        let mut spec = serde_json::json!({
            "gatewayClassName": labels::WAYPOINT_GATEWAY_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        });
        if let Some(a) = infrastructure {
            spec["infrastructure"] = serde_json::json!({"annotations": a});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn opted_in(gw: &Gateway) -> (bool, Vec<PolicyProblem>) {
        let mut problems = Vec::new();
        let key = ObjectKey::new("shop", "waypoint");
        (forward_client_identity(&key, gw, &mut problems), problems)
    }

    #[test]
    fn client_identity_is_forwarded_when_the_gateway_says_true_in_any_case() {
        for value in ["true", "TRUE", "True"] {
            let gw = gateway(
                serde_json::json!({labels::XFCC_INCLUDE_CLIENT_IDENTITY: value}),
                None,
            );
            assert_eq!(opted_in(&gw), (true, vec![]), "{value}");
        }
        // Read where upstream's waypoint pod takes its annotations from.
        let gw = gateway(
            serde_json::json!({}),
            Some(serde_json::json!({labels::XFCC_INCLUDE_CLIENT_IDENTITY: "true"})),
        );
        assert_eq!(opted_in(&gw), (true, vec![]));
    }

    #[test]
    fn client_identity_is_not_forwarded_when_absent_or_false() {
        let absent = gateway(serde_json::json!({"example.com/owner": "shop"}), None);
        assert_eq!(opted_in(&absent), (false, vec![]));
        for value in ["false", "FALSE"] {
            let gw = gateway(
                serde_json::json!({labels::XFCC_INCLUDE_CLIENT_IDENTITY: value}),
                None,
            );
            assert_eq!(opted_in(&gw), (false, vec![]), "{value}");
        }
        // spec.infrastructure.annotations, once set, is the whole map.
        let shadowed = gateway(
            serde_json::json!({labels::XFCC_INCLUDE_CLIENT_IDENTITY: "true"}),
            Some(serde_json::json!({"example.com/owner": "shop"})),
        );
        assert_eq!(opted_in(&shadowed), (false, vec![]));
    }

    #[test]
    fn a_value_that_is_not_a_boolean_is_off_and_reported_on_the_gateway() {
        for (value, infrastructure) in [("yes", false), ("1", false), ("", true)] {
            let annotations = serde_json::json!({labels::XFCC_INCLUDE_CLIENT_IDENTITY: value});
            let gw = if infrastructure {
                gateway(serde_json::json!({}), Some(annotations))
            } else {
                gateway(annotations, None)
            };
            let (on, problems) = opted_in(&gw);
            assert!(!on, "{value:?}");
            let path = if infrastructure {
                "spec.infrastructure.annotations"
            } else {
                "metadata.annotations"
            };
            assert_eq!(
                problems,
                vec![PolicyProblem::InvalidValue {
                    object: PolicyRef::new(Kind::Gateway, "shop", "waypoint"),
                    field: format!("{path}[ambient.istio.io/xfcc-include-client-identity]"),
                    value: value.to_string(),
                    expected: "\"true\" or \"false\"",
                    effect: Effect::DefaultApplies {
                        what: "the waypoint sends no x-forwarded-client-cert, as without the annotation".into(),
                    },
                }],
                "{value:?}"
            );
            let message = problems[0].to_string();
            let names = format!(
                "Gateway shop/waypoint: {path}[ambient.istio.io/xfcc-include-client-identity]: {value:?}"
            );
            assert!(message.starts_with(&names), "{message}");
        }
    }
}
