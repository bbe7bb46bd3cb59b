//! Which pods the mesh captures, decided from labels alone: pure, so the
//! rules can be tested as a table.
//!
//! `istio.io/dataplane-mode=ambient` on the pod or its namespace enrols it;
//! `none` on the pod opts it out; the pod's label beats the namespace's. Pods
//! of the mesh's own components, host-network pods and pods that already run a
//! sidecar are never captured.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use api::labels;

/// Annotation upstream's injector sets on pods that run a sidecar; such a pod
/// captures its own traffic and must not be captured twice.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the node agent needs to know about a pod from its source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
    /// `status.podIPs` (empty until the pod's sandbox has its network).
    pub ips: Vec<IpAddr>,
}

impl PodMeta {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }
}

/// What the node agent needs to know about a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceMeta {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The decision for one pod, with the reason (logged, and returned to CNI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrolment {
    /// Captured: the pod's or its namespace's label says ambient.
    Enrolled,
    NotEnrolled(NotEnrolledReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotEnrolledReason {
    /// Neither pod nor namespace is labelled ambient.
    NotLabelled,
    /// The pod is labelled `istio.io/dataplane-mode=none`.
    OptedOut,
    /// One of the mesh's own components (ztunnel, a waypoint, istiod).
    MeshComponent,
    HostNetwork,
    HasSidecar,
}

impl Enrolment {
    pub fn is_enrolled(self) -> bool {
        self == Enrolment::Enrolled
    }
}

impl fmt::Display for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Enrolment::Enrolled => "enrolled",
            Enrolment::NotEnrolled(NotEnrolledReason::NotLabelled) => {
                "not enrolled: neither pod nor namespace is labelled istio.io/dataplane-mode=ambient"
            }
            Enrolment::NotEnrolled(NotEnrolledReason::OptedOut) => {
                "not enrolled: pod is labelled istio.io/dataplane-mode=none"
            }
            Enrolment::NotEnrolled(NotEnrolledReason::MeshComponent) => {
                "not enrolled: pod is one of the mesh's own components"
            }
            Enrolment::NotEnrolled(NotEnrolledReason::HostNetwork) => {
                "not enrolled: pod uses the host network"
            }
            Enrolment::NotEnrolled(NotEnrolledReason::HasSidecar) => {
                "not enrolled: pod runs a sidecar"
            }
        };
        f.write_str(text)
    }
}

/// Decides whether `pod` (in namespace `namespace`, if known) is captured.
pub fn decide(pod: &PodMeta, namespace: Option<&NamespaceMeta>) -> Enrolment {
    use NotEnrolledReason::*;
    let is_mesh_component = pod.labels.contains_key(labels::ISTIO_COMPONENT)
        || pod.labels.contains_key(labels::GATEWAY_MANAGED);
    if is_mesh_component {
        return Enrolment::NotEnrolled(MeshComponent);
    }
    if pod.host_network {
        return Enrolment::NotEnrolled(HostNetwork);
    }
    if pod.annotations.contains_key(SIDECAR_STATUS) {
        return Enrolment::NotEnrolled(HasSidecar);
    }
    match pod.labels.get(labels::DATAPLANE_MODE).map(String::as_str) {
        Some(labels::DATAPLANE_MODE_AMBIENT) => return Enrolment::Enrolled,
        Some(labels::DATAPLANE_MODE_NONE) => return Enrolment::NotEnrolled(OptedOut),
        _ => {}
    }
    let namespace_mode = namespace.and_then(|ns| ns.labels.get(labels::DATAPLANE_MODE));
    match namespace_mode.map(String::as_str) {
        Some(labels::DATAPLANE_MODE_AMBIENT) => Enrolment::Enrolled,
        _ => Enrolment::NotEnrolled(NotLabelled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(pod_labels: &[(&str, &str)]) -> PodMeta {
        PodMeta {
            namespace: "shop".into(),
            name: "cart-0".into(),
            uid: "u1".into(),
            labels: labels(pod_labels),
            ..Default::default()
        }
    }

    fn ns(ns_labels: &[(&str, &str)]) -> NamespaceMeta {
        NamespaceMeta {
            name: "shop".into(),
            labels: labels(ns_labels),
        }
    }

    type Labels = &'static [(&'static str, &'static str)];

    #[test]
    fn enrolment_table() {
        use NotEnrolledReason::*;
        const MODE: &str = labels::DATAPLANE_MODE;
        let cases: &[(Labels, Option<Labels>, Enrolment)] = &[
            (&[], None, Enrolment::NotEnrolled(NotLabelled)),
            (&[], Some(&[]), Enrolment::NotEnrolled(NotLabelled)),
            (&[], Some(&[(MODE, "ambient")]), Enrolment::Enrolled),
            (&[(MODE, "ambient")], None, Enrolment::Enrolled),
            (
                &[(MODE, "ambient")],
                Some(&[(MODE, "none")]),
                Enrolment::Enrolled,
            ),
            (
                &[(MODE, "none")],
                Some(&[(MODE, "ambient")]),
                Enrolment::NotEnrolled(OptedOut),
            ),
            // An unknown pod value does not override the namespace.
            (
                &[(MODE, "sidecar")],
                Some(&[(MODE, "ambient")]),
                Enrolment::Enrolled,
            ),
            (
                &[],
                Some(&[(MODE, "sidecar")]),
                Enrolment::NotEnrolled(NotLabelled),
            ),
            (
                &[(MODE, "ambient"), (labels::ISTIO_COMPONENT, "ztunnel")],
                Some(&[(MODE, "ambient")]),
                Enrolment::NotEnrolled(MeshComponent),
            ),
            (
                &[(labels::GATEWAY_MANAGED, labels::GATEWAY_MANAGED_VALUE)],
                Some(&[(MODE, "ambient")]),
                Enrolment::NotEnrolled(MeshComponent),
            ),
        ];
        for (pod_labels, ns_labels, want) in cases {
            let namespace = ns_labels.map(ns);
            let got = decide(&pod(pod_labels), namespace.as_ref());
            assert_eq!(got, *want, "pod {pod_labels:?} namespace {ns_labels:?}");
        }
    }

    #[test]
    fn host_network_and_sidecar_pods_are_never_captured() {
        let ambient = ns(&[(labels::DATAPLANE_MODE, "ambient")]);
        let mut host = pod(&[]);
        host.host_network = true;
        assert_eq!(
            decide(&host, Some(&ambient)),
            Enrolment::NotEnrolled(NotEnrolledReason::HostNetwork)
        );
        let mut sidecar = pod(&[]);
        sidecar
            .annotations
            .insert(SIDECAR_STATUS.into(), "{}".into());
        assert_eq!(
            decide(&sidecar, Some(&ambient)),
            Enrolment::NotEnrolled(NotEnrolledReason::HasSidecar)
        );
    }
}
