//! What is wrong with a cluster's mesh configuration, in the mesh's own
//! semantics: the translation's [`PolicyProblem`]s plus the mistakes that
//! translate fine but do nothing or refuse traffic (a `use-waypoint` label
//! naming no Gateway, a waypoint nothing uses, a selector matching no pod,
//! STRICT mTLS where clients outside the mesh call, a port whose protocol
//! an L7 rule needs but is left to detection). `istioctl-rs analyze` shows
//! these as findings; this module decides them so that the CLI and
//! istiod-rs share one reading of bindings, selectors and enrolment.
//!
//! Pure, as the rest of the index: state in, findings out.

use std::collections::{BTreeMap, BTreeSet};

use api::labels;
use api::manifest::{Kind, ObjectKey};
use gateway_api::gateways::{GatewayStatus, GatewayStatusAddresses};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::l7::binding;
use super::problem::{PolicyProblem, PolicyRef};
use super::selectors::{Labels, labels_of, subset_of};
use super::services::Services;
use super::waypoints::{Traffic, Waypoints};
use super::{MeshConfig, workloads};
use crate::state::{ClusterState, in_namespace, pod_service_account};

/// How many clients a STRICT finding names before it says "and N more".
const CLIENTS_NAMED: usize = 3;

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// What the translation reports about a policy or route.
    Problem(PolicyProblem),
    /// An `istio.io/use-waypoint` label (on a Namespace, Service or Pod)
    /// naming a Gateway that does not exist, or is not a waypoint (class
    /// `istio-waypoint`): the object has no waypoint.
    MissingWaypoint {
        object: PolicyRef,
        /// The Gateway named (`use-waypoint-namespace` applied).
        gateway: ObjectKey,
        /// The Gateway exists with another class.
        class: Option<String>,
    },
    /// A waypoint Gateway (made by a user, not on demand) that no Service
    /// or workload is bound to and no rule is served by.
    UnusedWaypoint { gateway: ObjectKey },
    /// A `selector.matchLabels` that matches no pod in the policy's scope
    /// (its namespace; every namespace for the root namespace's).
    NoMatchingWorkloads {
        object: PolicyRef,
        /// `key=value` pairs, sorted, comma-separated.
        labels: String,
    },
    /// A PeerAuthentication enforcing STRICT on mesh workloads that clients
    /// outside the mesh call: their plaintext is refused.
    StrictWithPlaintextClients {
        object: PolicyRef,
        /// The clients, described (`Pod shop/legacy (not in the mesh)`),
        /// at most [`CLIENTS_NAMED`].
        clients: Vec<String>,
        /// How many more there are.
        more: usize,
    },
    /// A Service port an L7 rule applies to whose protocol is neither
    /// named nor set (`appProtocol`): the waypoint must detect it.
    PortWithoutProtocol {
        service: ObjectKey,
        port_name: String,
        port: i32,
        target_port: String,
        /// The L7 rules applying to the Service.
        rules: Vec<PolicyRef>,
    },
}

impl Finding {
    /// The object the finding is about.
    pub fn object(&self) -> PolicyRef {
        match self {
            Finding::Problem(p) => p.object().clone(),
            Finding::MissingWaypoint { object, .. }
            | Finding::NoMatchingWorkloads { object, .. }
            | Finding::StrictWithPlaintextClients { object, .. } => object.clone(),
            Finding::UnusedWaypoint { gateway } => PolicyRef {
                kind: Kind::Gateway,
                key: gateway.clone(),
            },
            Finding::PortWithoutProtocol { service, .. } => PolicyRef {
                kind: Kind::Service,
                key: service.clone(),
            },
        }
    }
}

/// How the state was obtained, which decides what can be known of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from a running cluster: what istiod-rs sees.
    Cluster,
    /// Read from files: objects as a user writes them, before istiod-rs
    /// provisions waypoints. Each waypoint Gateway without an address is
    /// given the one istiod-rs would give it (its Service's hostname), so
    /// bindings to it are read as they will be once it is provisioned.
    Files,
}

/// Every finding about `state`, in a stable order (translation problems
/// first, as the translation reports them; then by check and object).
pub fn analyze(state: &ClusterState, mesh: &MeshConfig, source: Source) -> Vec<Finding> {
    let provisioned;
    let state = match source {
        Source::Cluster => state,
        Source::Files => {
            provisioned = as_provisioned(state, mesh);
            &provisioned
        }
    };
    let translation = super::translate(state, mesh);
    let waypoints = Waypoints::build(state, mesh);
    let services = Services::build(state, mesh);

    let mut findings: Vec<Finding> = translation
        .problems
        .into_iter()
        .map(Finding::Problem)
        .collect();
    findings.extend(missing_waypoints(state));
    findings.extend(unused_waypoints(
        state,
        &waypoints,
        &translation.l7,
        &services,
    ));
    findings.extend(selectors_matching_nothing(state, mesh));
    findings.extend(strict_with_plaintext_clients(state, mesh, &waypoints));
    findings.extend(ports_without_protocol(&translation.l7, &services));
    findings
}

/// `state` with an address on every waypoint Gateway that has none yet: the
/// cluster once the provisioner has deployed each waypoint and written its
/// status.
pub fn as_provisioned(state: &ClusterState, mesh: &MeshConfig) -> ClusterState {
    let mut state = state.clone();
    for (key, gw) in state.gateways.iter_mut() {
        let has_address = gw
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .is_some_and(|a| !a.is_empty());
        if gw.spec.gateway_class_name != labels::WAYPOINT_GATEWAY_CLASS || has_address {
            continue;
        }
        let gw = std::sync::Arc::make_mut(gw);
        gw.status = Some(GatewayStatus {
            addresses: Some(vec![GatewayStatusAddresses {
                r#type: Some("Hostname".to_string()),
                value: mesh.service_hostname(&key.name, &key.namespace),
            }]),
            ..GatewayStatus::default()
        });
    }
    state
}

/// The Gateway an object's own `use-waypoint` label names, if any, read as
/// the bindings read it (`waypoints::use_waypoint`).
fn named_waypoint(labels: &Labels, own_namespace: &str) -> Option<ObjectKey> {
    match super::waypoints::use_waypoint(labels, own_namespace) {
        super::waypoints::UseWaypoint::Named(namespace, name) => {
            Some(ObjectKey::new(namespace, name))
        }
        _ => None,
    }
}

/// Every object labelled `use-waypoint`, with the Gateway it names.
fn waypoint_users(state: &ClusterState) -> Vec<(PolicyRef, ObjectKey)> {
    let mut users = Vec::new();
    for (key, ns) in &state.namespaces {
        if let Some(gw) = named_waypoint(labels_of(&ns.metadata.labels), &key.name) {
            users.push((PolicyRef::new(Kind::Namespace, "", &key.name), gw));
        }
    }
    for (key, svc) in &state.services {
        if let Some(gw) = named_waypoint(labels_of(&svc.metadata.labels), &key.namespace) {
            users.push((
                PolicyRef {
                    kind: Kind::Service,
                    key: key.clone(),
                },
                gw,
            ));
        }
    }
    for (key, pod) in &state.pods {
        if let Some(gw) = named_waypoint(labels_of(&pod.metadata.labels), &key.namespace) {
            users.push((
                PolicyRef {
                    kind: Kind::Pod,
                    key: key.clone(),
                },
                gw,
            ));
        }
    }
    users
}

fn missing_waypoints(state: &ClusterState) -> Vec<Finding> {
    waypoint_users(state)
        .into_iter()
        .filter_map(|(object, gateway)| {
            let class = match state.gateways.get(&gateway) {
                None => None,
                Some(gw) if gw.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS => {
                    return None;
                }
                Some(gw) => Some(gw.spec.gateway_class_name.clone()),
            };
            Some(Finding::MissingWaypoint {
                object,
                gateway,
                class,
            })
        })
        .collect()
}

fn unused_waypoints(
    state: &ClusterState,
    waypoints: &Waypoints,
    rules: &[super::L7Rule],
    services: &Services<'_>,
) -> Vec<Finding> {
    let mut used: BTreeSet<String> = BTreeSet::new();
    // Named by a label, even where the binding does not hold (another
    // finding says why): the user meant it to be used.
    used.extend(
        waypoint_users(state)
            .into_iter()
            .map(|(_, gw)| gw.to_string()),
    );
    for entry in &services.entries {
        let sa = single_service_account(state, entry.service, entry.namespace);
        if let Some(w) = waypoints.bound(
            state,
            entry.namespace,
            entry.labels(),
            sa,
            entry.service.metadata.name.as_deref(),
            Traffic::Service,
        ) {
            used.insert(w.key());
        }
    }
    for (key, pod) in &state.pods {
        let labels = labels_of(&pod.metadata.labels);
        if waypoints.is_instance(&key.namespace, labels) {
            continue;
        }
        if let Some(w) = waypoints.bound(
            state,
            &key.namespace,
            labels,
            Some(pod_service_account(pod)),
            None,
            Traffic::Workload,
        ) {
            used.insert(w.key());
        }
    }
    for rule in rules {
        for t in &rule.targets {
            if let Ok(w) = &t.serving {
                used.insert(w.clone());
            }
        }
    }
    state
        .gateways
        .iter()
        .filter(|(_, gw)| {
            gw.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS
                && !super::is_on_demand_waypoint(gw)
        })
        .filter(|(key, _)| !used.contains(&key.to_string()))
        .map(|(key, _)| Finding::UnusedWaypoint {
            gateway: key.clone(),
        })
        .collect()
}

/// The one service account every pod a Service selects runs as.
fn single_service_account<'a>(
    state: &'a ClusterState,
    svc: &Service,
    namespace: &str,
) -> Option<&'a str> {
    let selector = svc.spec.as_ref()?.selector.as_ref()?;
    if selector.is_empty() {
        return None;
    }
    let mut accounts = in_namespace(&state.pods, namespace)
        .filter(|pod| subset_of(selector, labels_of(&pod.metadata.labels)))
        .map(|pod| pod_service_account(pod));
    let first = accounts.next()?;
    accounts.all(|a| a == first).then_some(first)
}

/// The pods a policy in `namespace` with `selector` may select: its
/// namespace's, or every pod for the root namespace's.
fn pods_in_scope<'a>(
    state: &'a ClusterState,
    mesh: &MeshConfig,
    namespace: &'a str,
) -> Box<dyn Iterator<Item = (&'a ObjectKey, &'a Pod)> + 'a> {
    if namespace == mesh.root_namespace {
        Box::new(state.pods.iter().map(|(k, p)| (k, p.as_ref())))
    } else {
        Box::new(
            state
                .pods
                .iter()
                .filter(move |(k, _)| k.namespace == namespace)
                .map(|(k, p)| (k, p.as_ref())),
        )
    }
}

fn selectors_matching_nothing(state: &ClusterState, mesh: &MeshConfig) -> Vec<Finding> {
    let mut selectors: Vec<(PolicyRef, &BTreeMap<String, String>)> = Vec::new();
    for (key, p) in &state.authorization_policies {
        if let Some(s) = &p.spec.selector {
            selectors.push((policy(Kind::AuthorizationPolicy, key), &s.match_labels));
        }
    }
    for (key, p) in &state.peer_authentications {
        if let Some(s) = &p.spec.selector {
            selectors.push((policy(Kind::PeerAuthentication, key), &s.match_labels));
        }
    }
    for (key, p) in &state.request_authentications {
        if let Some(s) = &p.spec.selector {
            selectors.push((policy(Kind::RequestAuthentication, key), &s.match_labels));
        }
    }
    selectors
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .filter(|(object, selector)| {
            !pods_in_scope(state, mesh, &object.key.namespace)
                .any(|(_, pod)| subset_of(selector, labels_of(&pod.metadata.labels)))
        })
        .map(|(object, selector)| Finding::NoMatchingWorkloads {
            labels: selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            object,
        })
        .collect()
}

fn policy(kind: Kind, key: &ObjectKey) -> PolicyRef {
    PolicyRef {
        kind,
        key: key.clone(),
    }
}

fn strict_with_plaintext_clients(
    state: &ClusterState,
    mesh: &MeshConfig,
    waypoints: &Waypoints,
) -> Vec<Finding> {
    use api::crd::MtlsMode;
    let enrolled =
        |key: &ObjectKey, pod: &Pod| workloads::enrolled(state, waypoints, &key.namespace, pod);
    let mut findings = Vec::new();
    for (key, pa) in &state.peer_authentications {
        let strict = pa
            .spec
            .mtls
            .as_ref()
            .is_some_and(|m| m.mode == MtlsMode::Strict)
            || pa
                .spec
                .port_level_mtls
                .values()
                .any(|m| m.mode == MtlsMode::Strict);
        if !strict {
            continue;
        }
        let selector = pa.spec.selector.as_ref().map(|s| &s.match_labels);
        let covered: Vec<(&ObjectKey, &Pod)> = pods_in_scope(state, mesh, &key.namespace)
            .filter(|(_, pod)| {
                selector.is_none_or(|s| subset_of(s, labels_of(&pod.metadata.labels)))
            })
            .filter(|(k, pod)| enrolled(k, pod))
            .collect();
        if covered.is_empty() {
            continue;
        }
        let mut clients = Vec::new();
        // Services exposed outside the cluster: their clients have no
        // mesh identity.
        for (svc_key, svc) in &state.services {
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let exposed = matches!(
                spec.type_.as_deref(),
                Some("NodePort") | Some("LoadBalancer")
            ) || spec
                .external_ips
                .as_ref()
                .is_some_and(|ips| !ips.is_empty());
            let Some(svc_selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
                continue;
            };
            let selects_covered = covered.iter().any(|(k, pod)| {
                k.namespace == svc_key.namespace
                    && subset_of(svc_selector, labels_of(&pod.metadata.labels))
            });
            if exposed && selects_covered {
                clients.push(format!(
                    "Service {svc_key} (type {}, reached from outside the mesh)",
                    spec.type_.as_deref().unwrap_or("ClusterIP")
                ));
            }
        }
        // Pods beside the covered ones that are not in the mesh.
        let namespaces: BTreeSet<&str> =
            covered.iter().map(|(k, _)| k.namespace.as_str()).collect();
        for (pod_key, pod) in &state.pods {
            if !namespaces.contains(pod_key.namespace.as_str())
                || enrolled(pod_key, pod)
                || workloads::is_mesh_component(waypoints, &pod_key.namespace, pod)
                || crate::state::pod_is_terminal(pod)
            {
                continue;
            }
            clients.push(format!("Pod {pod_key} (not in the mesh)"));
        }
        if clients.is_empty() {
            continue;
        }
        let more = clients.len().saturating_sub(CLIENTS_NAMED);
        clients.truncate(CLIENTS_NAMED);
        findings.push(Finding::StrictWithPlaintextClients {
            object: policy(Kind::PeerAuthentication, key),
            clients,
            more,
        });
    }
    findings
}

fn ports_without_protocol(rules: &[super::L7Rule], services: &Services<'_>) -> Vec<Finding> {
    let mut by_service: BTreeMap<usize, Vec<PolicyRef>> = BTreeMap::new();
    for rule in rules {
        let mut indices: BTreeSet<usize> =
            rule.targets.iter().filter_map(|t| t.service()).collect();
        if let Some(c) = rule.coverage() {
            indices.extend(c.services.iter().copied());
        }
        for i in indices {
            let refs = by_service.entry(i).or_default();
            if !refs.contains(&rule.object) {
                refs.push(rule.object.clone());
            }
        }
    }
    let mut findings = Vec::new();
    for (i, rules) in by_service {
        let entry = &services.entries[i];
        let ports = entry
            .service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default();
        for port in ports {
            if binding::protocol(port) != Some(api::l7::Protocol::Detect) {
                continue;
            }
            let target_port = match &port.target_port {
                Some(IntOrString::Int(n)) => n.to_string(),
                Some(IntOrString::String(s)) => s.clone(),
                None => port.port.to_string(),
            };
            findings.push(Finding::PortWithoutProtocol {
                service: ObjectKey::new(
                    entry.namespace,
                    entry.service.metadata.name.clone().unwrap_or_default(),
                ),
                port_name: port.name.clone().unwrap_or_default(),
                port: port.port,
                target_port,
                rules: rules.clone(),
            });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> ClusterState {
        ClusterState::from_objects(api::manifest::parse(yaml).unwrap().objects)
    }

    fn findings(yaml: &str) -> Vec<Finding> {
        analyze(&state(yaml), &MeshConfig::default(), Source::Files)
    }

    const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.40.0.3, conditions: [{type: Ready, status: "True"}]}
"#;

    #[test]
    fn a_per_service_account_waypoint_with_workloads_is_used_an_on_demand_one_never_reported() {
        let yaml = format!(
            r#"{SHOP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web-waypoint, namespace: shop, annotations: {{istio.io/for-service-account: web}}}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: auto, namespace: shop, labels: {{istio-rs.io/on-demand-waypoint: "true"}}}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: nobody-waypoint, namespace: shop, annotations: {{istio.io/for-service-account: nobody}}}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
"#
        );
        assert_eq!(
            findings(&yaml),
            vec![Finding::UnusedWaypoint {
                gateway: ObjectKey::new("shop", "nobody-waypoint")
            }]
        );
    }

    #[test]
    fn strict_is_reported_only_where_clients_outside_the_mesh_are() {
        let strict = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;
        // Mesh-wide STRICT, every pod in the mesh: nothing to say.
        assert_eq!(findings(&format!("{SHOP}{strict}")), vec![]);
        // A pod opted out beside the mesh's workloads.
        let legacy = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.40.0.4, conditions: [{type: Ready, status: "True"}]}
"#;
        assert_eq!(
            findings(&format!("{SHOP}{strict}{legacy}")),
            vec![Finding::StrictWithPlaintextClients {
                object: PolicyRef::new(Kind::PeerAuthentication, "istio-system", "strict"),
                clients: vec!["Pod shop/legacy (not in the mesh)".into()],
                more: 0,
            }]
        );
    }

    #[test]
    fn root_namespace_selectors_look_at_every_namespace() {
        let policy = |ns: &str| {
            format!(
                r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: {ns}}}
spec: {{selector: {{matchLabels: {{app: web}}}}, action: DENY, rules: [{{from: [{{source: {{namespaces: [x]}}}}]}}]}}
"#
            )
        };
        assert_eq!(
            findings(&format!("{SHOP}{}", policy("istio-system"))),
            vec![]
        );
        assert_eq!(
            findings(&format!("{SHOP}{}", policy("other"))),
            vec![Finding::NoMatchingWorkloads {
                object: PolicyRef::new(Kind::AuthorizationPolicy, "other", "web"),
                labels: "app=web".into(),
            }]
        );
    }
}
