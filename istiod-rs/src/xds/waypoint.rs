//! Who a waypoint stream is: its node id
//! (`waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, proxy-core's
//! `waypoint_node_id`) names a pod; the pod's label
//! `gateway.networking.k8s.io/gateway-name` names the waypoint Gateway whose
//! scope the stream is served. The node id is the proxy's claim, so it is
//! bound to the stream's authenticated identity: the bearer token's service
//! account must be the pod's (and a token bound to a pod must be bound to
//! that one), the pod must hold the address the node id claims. Otherwise
//! the stream is refused, saying why: a waypoint reads only its own
//! configuration. (The xDS server authenticated tokens before but never tied
//! the node id to them; the CA does the same binding for certificates.)

use std::net::IpAddr;

use api::manifest::ObjectKey;

use crate::auth::Caller;
use crate::state::{Store, pod_is_terminal, pod_service_account};

/// The node type prefix of a waypoint's node id (upstream's `model.Waypoint`).
const NODE_TYPE: &str = "waypoint~";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    #[error(
        "waypoint node id {node:?} is not `waypoint~<pod ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`"
    )]
    BadNodeId { node: String },
    #[error(
        "waypoint {node} sent no bearer token: a waypoint must authenticate with its pod's service account token (TLS port 15012)"
    )]
    Anonymous { node: String },
    #[error(
        "this istiod-rs has no pod source to bind waypoint streams to: waypoints are not served"
    )]
    NoPods,
    #[error("the cluster state has not synced yet: cannot check waypoint {node}; retry")]
    NotSynced { node: String },
    #[error(
        "pod {namespace}/{pod} named by waypoint node id {node} is not running in the cluster state (yet); retry"
    )]
    PodMissing {
        node: String,
        namespace: String,
        pod: String,
    },
    #[error("pod {namespace}/{pod} has no IP address yet: cannot check waypoint {node}; retry")]
    PodWithoutAddress {
        node: String,
        namespace: String,
        pod: String,
    },
    #[error(
        "waypoint node id {node} claims address {claimed}, but pod {namespace}/{pod} has {actual}"
    )]
    AddressMismatch {
        node: String,
        namespace: String,
        pod: String,
        claimed: IpAddr,
        actual: String,
    },
    #[error(
        "waypoint node id {node} names pod {namespace}/{pod}, which runs as service account {namespace}/{service_account}, but the stream's token is {identity}: a waypoint may only read its own configuration"
    )]
    IdentityMismatch {
        node: String,
        namespace: String,
        pod: String,
        service_account: String,
        identity: String,
    },
    #[error(
        "waypoint node id {node} names pod {namespace}/{pod}, but the stream's token is bound to pod {namespace}/{token_pod}"
    )]
    OtherPod {
        node: String,
        namespace: String,
        pod: String,
        token_pod: String,
    },
    #[error(
        "pod {namespace}/{pod} (waypoint node id {node}) has no label `{label}`: it is not a waypoint instance",
        label = api::labels::GATEWAY_NAME
    )]
    NotAWaypoint {
        node: String,
        namespace: String,
        pod: String,
    },
}

impl WaypointError {
    /// The gRPC status code: retry where the state may catch up, refuse
    /// where the claim is wrong.
    pub fn code(&self) -> tonic::Code {
        match self {
            WaypointError::BadNodeId { .. } => tonic::Code::InvalidArgument,
            WaypointError::Anonymous { .. } => tonic::Code::Unauthenticated,
            WaypointError::NotSynced { .. }
            | WaypointError::PodMissing { .. }
            | WaypointError::PodWithoutAddress { .. } => tonic::Code::Unavailable,
            WaypointError::NoPods
            | WaypointError::AddressMismatch { .. }
            | WaypointError::IdentityMismatch { .. }
            | WaypointError::OtherPod { .. }
            | WaypointError::NotAWaypoint { .. } => tonic::Code::PermissionDenied,
        }
    }
}

/// What a waypoint's node id claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointNode {
    pub ip: IpAddr,
    pub pod: String,
    pub namespace: String,
}

/// The waypoint a node id claims to be; `None` for other proxies
/// (ztunnel), which are served as before.
pub fn parse_node(node: &str) -> Option<Result<WaypointNode, WaypointError>> {
    let rest = node.strip_prefix(NODE_TYPE)?;
    let bad = || WaypointError::BadNodeId {
        node: node.to_string(),
    };
    let parsed = (|| {
        let mut parts = rest.split('~');
        let ip = parts.next()?.parse().ok()?;
        // A pod name may hold dots; a namespace may not.
        let (pod, namespace) = parts.next()?.rsplit_once('.')?;
        (!pod.is_empty() && !namespace.is_empty()).then(|| WaypointNode {
            ip,
            pod: pod.to_string(),
            namespace: namespace.to_string(),
        })
    })();
    Some(parsed.ok_or_else(bad))
}

/// A pod as far as binding a waypoint stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointPod {
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    /// The value of `gateway.networking.k8s.io/gateway-name`.
    pub gateway: Option<String>,
}

/// What a pod lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodLookup {
    Found(WaypointPod),
    /// Not there (or finished) in a synced state.
    Missing,
    /// The state has not synced: a missing pod may just not be known yet.
    NotSynced,
}

/// Where the xDS server looks pods up (the cluster state in istiod-rs).
pub trait WaypointPods: Send + Sync + 'static {
    fn waypoint_pod(&self, namespace: &str, name: &str) -> PodLookup;
}

impl WaypointPods for Store {
    fn waypoint_pod(&self, namespace: &str, name: &str) -> PodLookup {
        // Read `synced` first: a pod missing from a state that was synced
        // when we looked is really missing.
        let synced = self.is_synced();
        let state = self.read();
        let Some(pod) = state
            .pods
            .get(&ObjectKey::new(namespace, name))
            .filter(|p| !pod_is_terminal(p))
        else {
            return if synced {
                PodLookup::Missing
            } else {
                PodLookup::NotSynced
            };
        };
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .chain(
                status
                    .and_then(|s| s.pod_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|p| p.ip.as_str()),
            )
            .filter_map(|ip| ip.parse().ok())
            .collect();
        PodLookup::Found(WaypointPod {
            ips,
            service_account: pod_service_account(pod).to_string(),
            gateway: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(api::labels::GATEWAY_NAME))
                .cloned(),
        })
    }
}

/// The waypoint Gateway key (`<ns>/<name>`) a stream with node id `node`,
/// claiming `claim`, is served, once its caller is shown to be that pod.
pub fn bind(
    node: &str,
    claim: &WaypointNode,
    caller: Option<&Caller>,
    pods: Option<&dyn WaypointPods>,
) -> Result<String, WaypointError> {
    let node = node.to_string();
    let WaypointNode { ip, pod, namespace } = claim.clone();
    let caller = caller.ok_or_else(|| WaypointError::Anonymous { node: node.clone() })?;
    let pods = pods.ok_or(WaypointError::NoPods)?;
    let found = match pods.waypoint_pod(&namespace, &pod) {
        PodLookup::Found(found) => found,
        PodLookup::Missing => {
            return Err(WaypointError::PodMissing {
                node,
                namespace,
                pod,
            });
        }
        PodLookup::NotSynced => return Err(WaypointError::NotSynced { node }),
    };
    let identity = &caller.identity;
    if identity.namespace() != namespace || identity.service_account() != found.service_account {
        return Err(WaypointError::IdentityMismatch {
            node,
            namespace,
            pod,
            service_account: found.service_account,
            identity: identity.to_string(),
        });
    }
    if let Some(bound) = caller.pod.as_ref().filter(|p| p.name != pod) {
        return Err(WaypointError::OtherPod {
            node,
            namespace,
            pod,
            token_pod: bound.name.clone(),
        });
    }
    if found.ips.is_empty() {
        return Err(WaypointError::PodWithoutAddress {
            node,
            namespace,
            pod,
        });
    }
    if !found.ips.contains(&ip) {
        let actual = found
            .ips
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(WaypointError::AddressMismatch {
            node,
            namespace,
            pod,
            claimed: ip,
            actual,
        });
    }
    let Some(gateway) = found.gateway.filter(|g| !g.is_empty()) else {
        return Err(WaypointError::NotAWaypoint {
            node,
            namespace,
            pod,
        });
    };
    Ok(format!("{namespace}/{gateway}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::CallerPod;
    use api::SpiffeId;
    use std::collections::BTreeMap;

    struct Pods(BTreeMap<(String, String), WaypointPod>);

    impl WaypointPods for Pods {
        fn waypoint_pod(&self, namespace: &str, name: &str) -> PodLookup {
            self.0
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
                .map_or(PodLookup::Missing, PodLookup::Found)
        }
    }

    fn pods() -> Pods {
        let pod = |sa: &str, gw: Option<&str>, ip: &str| WaypointPod {
            ips: vec![ip.parse().unwrap()],
            service_account: sa.into(),
            gateway: gw.map(str::to_string),
        };
        Pods(BTreeMap::from([
            (
                ("ns".into(), "wp-1.x".into()),
                pod("wp", Some("wp"), "10.1.0.5"),
            ),
            (("ns".into(), "app-1".into()), pod("app", None, "10.1.0.6")),
        ]))
    }

    fn caller(sa: &str, pod: Option<&str>) -> Caller {
        Caller {
            identity: SpiffeId::new("cluster.local", "ns", sa).unwrap(),
            pod: pod.map(|p| CallerPod {
                name: p.into(),
                uid: "u".into(),
            }),
            node: None,
        }
    }

    fn check(node: &str, caller: Option<&Caller>) -> Result<String, WaypointError> {
        let claim = parse_node(node).expect("a waypoint node id")?;
        bind(node, &claim, caller, Some(&pods()))
    }

    #[test]
    fn parses_waypoint_node_ids_only() {
        let ip = "10.1.0.5".parse().unwrap();
        let id = proxy_core::xds::waypoint_node_id(ip, "wp-1.x", "ns");
        assert_eq!(
            parse_node(&id),
            Some(Ok(WaypointNode {
                ip,
                pod: "wp-1.x".into(),
                namespace: "ns".into()
            }))
        );
        assert_eq!(parse_node("ztunnel~10.0.0.1~z.istio-system~x"), None);
        for bad in [
            "waypoint~",
            "waypoint~nope~a.b~c",
            "waypoint~10.0.0.1~nodots~c",
        ] {
            let err = parse_node(bad).unwrap().unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn binds_the_node_id_to_the_token() {
        let node = "waypoint~10.1.0.5~wp-1.x.ns~ns.svc.cluster.local";
        assert_eq!(check(node, Some(&caller("wp", None))).unwrap(), "ns/wp");
        assert_eq!(
            check(node, Some(&caller("wp", Some("wp-1.x")))).unwrap(),
            "ns/wp"
        );
        let refused = |c: Option<&Caller>, node: &str| check(node, c).unwrap_err();
        assert!(matches!(
            refused(Some(&caller("app", None)), node),
            WaypointError::IdentityMismatch { .. }
        ));
        assert!(matches!(
            refused(Some(&caller("wp", Some("wp-2"))), node),
            WaypointError::OtherPod { .. }
        ));
        assert!(matches!(
            refused(None, node),
            WaypointError::Anonymous { .. }
        ));
        assert!(matches!(
            refused(
                Some(&caller("wp", None)),
                "waypoint~10.1.0.9~wp-1.x.ns~ns.svc.cluster.local"
            ),
            WaypointError::AddressMismatch { .. }
        ));
        assert!(matches!(
            refused(
                Some(&caller("app", None)),
                "waypoint~10.1.0.6~app-1.ns~ns.svc.cluster.local"
            ),
            WaypointError::NotAWaypoint { .. }
        ));
        let missing = refused(
            Some(&caller("wp", None)),
            "waypoint~10.1.0.5~gone.ns~ns.svc.cluster.local",
        );
        assert_eq!(missing.code(), tonic::Code::Unavailable);
        let claim = parse_node(node).unwrap().unwrap();
        assert_eq!(
            bind(node, &claim, Some(&caller("wp", None)), None),
            Err(WaypointError::NoPods)
        );
    }
}
