//! Labels, annotations and well-known names the mesh reads and writes, as upstream.

/// Namespace or pod label that enrols workloads into the mesh.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// `DATAPLANE_MODE` value that enrols.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// `DATAPLANE_MODE` value on a pod that opts it out.
pub const DATAPLANE_MODE_NONE: &str = "none";

/// Binds a namespace, service or pod to a waypoint (by Gateway name); `none` unbinds.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Namespace of the waypoint named by `USE_WAYPOINT`, when not the object's own.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint Gateway: which traffic it accepts (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// On a waypoint Gateway: serve every workload running as this ServiceAccount.
pub const FOR_SERVICE_ACCOUNT: &str = "istio.io/for-service-account";
/// On a waypoint Gateway: `"true"` (any case) has the waypoint put the client's identity in
/// `x-forwarded-client-cert`; otherwise it sends none.
pub const XFCC_INCLUDE_CLIENT_IDENTITY: &str = "ambient.istio.io/xfcc-include-client-identity";
/// Namespace label that turns waypoints-on-demand off (`disabled`).
pub const AUTO_WAYPOINT: &str = "istio.io/auto-waypoint";

/// Gateway class of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// Label on objects provisioned for a Gateway.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// Label on objects the control plane manages for a Gateway.
pub const GATEWAY_MANAGED: &str = "gateway.istio.io/managed";
/// Value of `GATEWAY_MANAGED`.
pub const GATEWAY_MANAGED_VALUE: &str = "istio.io-mesh-controller";

/// Annotation the node agent sets once a pod's traffic is redirected.
pub const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
/// Value of `AMBIENT_REDIRECTION` once redirection is in place.
pub const AMBIENT_REDIRECTION_ENABLED: &str = "enabled";

/// Canonical service name and revision labels (telemetry).
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
/// Fallback labels for canonical name and revision.
pub const APP_NAME: &str = "app.kubernetes.io/name";
pub const APP: &str = "app";
pub const APP_VERSION: &str = "app.kubernetes.io/version";
pub const VERSION: &str = "version";

/// Marks pods of the mesh's own components, which are never captured.
pub const ISTIO_COMPONENT: &str = "istio.io/component";

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default Kubernetes cluster DNS domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Default cluster id in workload uids.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The mesh's root namespace: policies here apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Audience of tokens presented to the CA and xDS.
pub const CA_TOKEN_AUDIENCE: &str = "istio-ca";
/// CSR metadata key through which a node agent asks for a pod's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
