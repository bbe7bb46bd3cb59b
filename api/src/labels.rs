//! Labels, annotations and well-known names the mesh reads and writes, as upstream.

/// Namespace or pod label that enrols workloads into the mesh.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// `DATAPLANE_MODE` value that enrols.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// `DATAPLANE_MODE` value on a pod that opts it out.
pub const DATAPLANE_MODE_NONE: &str = "none";

/// ServiceEntry label: `false` (any case) opts the entry out of VIP
/// auto-allocation (istio/api `label.NetworkingEnableAutoallocateIp`).
pub const ENABLE_AUTOALLOCATE_IP: &str = "networking.istio.io/enable-autoallocate-ip";

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
/// `AUTO_WAYPOINT` value that turns waypoints-on-demand off in the namespace.
pub const AUTO_WAYPOINT_DISABLED: &str = "disabled";
/// Label (`"true"`) on a waypoint Gateway istiod-rs created on demand (ours, not upstream's):
/// it ranks below every binding a user made, and istiod-rs deletes it when no rule needs it.
pub const ON_DEMAND_WAYPOINT: &str = "istio-rs.io/on-demand-waypoint";
/// Value of `ON_DEMAND_WAYPOINT`.
pub const ON_DEMAND_WAYPOINT_VALUE: &str = "true";
/// Annotation on an on-demand waypoint Gateway: the L7 rules that need it,
/// `Kind namespace/name` joined by `,`, sorted (ours, not upstream's).
pub const NEEDED_BY: &str = "istio-rs.io/needed-by";
/// Annotation on an on-demand waypoint Gateway made for one Service whose
/// workloads run as several ServiceAccounts (no per-ServiceAccount waypoint
/// can serve it): the Service's name (ours, not upstream's).
pub const FOR_SERVICE: &str = "istio-rs.io/for-service";

/// Gateway class of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// Label on a Service, ServiceEntry or their namespace: ingress gateways
/// send the service's traffic through its waypoint (Go ParseBool value).
pub const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";
/// Label on a pod: its sidecar accepts Istio's mutual TLS (`istio`).
pub const TLS_MODE: &str = "security.istio.io/tlsMode";
/// Value of `TLS_MODE` for a pod with a sidecar.
pub const TLS_MODE_ISTIO: &str = "istio";

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

/// The name of the waypoint Gateway istiod-rs creates on demand for the
/// workloads of a namespace running as ServiceAccount `service_account`:
/// `<sa>-waypoint` when that is a valid Service name (a DNS-1035 label:
/// lower-case letters, digits and `-`, starting with a letter, ending with a
/// letter or digit, at most 63 characters); otherwise
/// `waypoint-<hash>-<rest>`, `<hash>` the 32-bit FNV-1a hash of the
/// ServiceAccount name as 8 lower-case hex digits, `<rest>` the name with
/// every character other than a lower-case letter or digit replaced by `-`,
/// cut to 45 characters and trimmed of `-` (left out, with its `-`, when
/// nothing remains). Both forms are valid Service names, and distinct
/// accounts get distinct names (the hash tells apart those the replacement
/// would merge).
pub fn on_demand_waypoint_name(service_account: &str) -> String {
    let plain = format!("{service_account}-waypoint");
    if is_service_name(&plain) {
        return plain;
    }
    hashed_name("waypoint", service_account, 45)
}

/// Name of the waypoint Gateway istiod-rs creates on demand for Service
/// `service` when its workloads run as several ServiceAccounts:
/// `waypoint-svc-<service>` when that is a valid Service name (at most 63
/// characters), otherwise `waypoint-svc-<hash>-<rest>`, `<hash>` and
/// `<rest>` as in [`on_demand_waypoint_name`], `<rest>` cut to 41
/// characters. Never the name of a per-ServiceAccount one: those end in
/// `-waypoint` or carry 8 hex digits after `waypoint-`, and `svc` is not 8
/// hex digits; a Service named `<x>-waypoint` is the one exception, for a
/// ServiceAccount named `waypoint-svc-<x>`, and istiod-rs reports the clash.
pub fn on_demand_service_waypoint_name(service: &str) -> String {
    let plain = format!("waypoint-svc-{service}");
    if is_service_name(&plain) {
        return plain;
    }
    hashed_name("waypoint-svc", service, 41)
}

/// A DNS-1035 label: lower-case letters, digits and `-`, starting with a
/// letter, ending with a letter or digit, at most 63 characters.
fn is_service_name(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `<prefix>-<fnv1a32 of name, 8 hex>-<name, other characters as '-', cut
/// to keep characters, trimmed of '-'>` (the last part left out, with its
/// `-`, when nothing remains).
fn hashed_name(prefix: &str, name: &str, keep: usize) -> String {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let rest: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(keep)
        .collect();
    let rest = rest.trim_matches('-');
    if rest.is_empty() {
        format!("{prefix}-{hash:08x}")
    } else {
        format!("{prefix}-{hash:08x}-{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_waypoint_names_are_service_names() {
        assert_eq!(on_demand_waypoint_name("reviews"), "reviews-waypoint");
        assert_eq!(
            on_demand_waypoint_name("bookinfo-v2"),
            "bookinfo-v2-waypoint"
        );
        // The dotted and dashed accounts must differ.
        let dotted = on_demand_waypoint_name("a.b");
        let dashed = on_demand_waypoint_name("a-b");
        assert_eq!(dashed, "a-b-waypoint");
        assert!(
            dotted.starts_with("waypoint-") && dotted.ends_with("-a-b"),
            "{dotted}"
        );
        assert_ne!(dotted, dashed);
        // A leading digit is no Service name.
        assert!(on_demand_waypoint_name("9lives").starts_with("waypoint-"));
        let long = "x".repeat(60);
        let name = on_demand_waypoint_name(&long);
        assert_eq!(name.len(), 63, "{name}");
        assert!(name.ends_with(&"x".repeat(45)));
        for sa in ["a.b", "9lives", long.as_str(), "-", "web"] {
            let n = on_demand_waypoint_name(sa);
            assert!(n.len() <= 63 && n.starts_with(|c: char| c.is_ascii_lowercase()));
            assert!(n.ends_with(|c: char| c.is_ascii_alphanumeric()), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
        }
        // The hash is FNV-1a 32 (test vector: "a" -> e40c292c).
        assert_eq!(on_demand_waypoint_name("A"), "waypoint-c40bf6cc");
    }

    #[test]
    fn on_demand_service_waypoint_names_are_service_names() {
        assert_eq!(
            on_demand_service_waypoint_name("reviews"),
            "waypoint-svc-reviews"
        );
        // Never a per-account name, for the same word.
        assert_ne!(
            on_demand_service_waypoint_name("reviews"),
            on_demand_waypoint_name("reviews")
        );
        let long = "s".repeat(63);
        let name = on_demand_service_waypoint_name(&long);
        assert!(name.starts_with("waypoint-svc-"), "{name}");
        assert_eq!(name.len(), 63, "{name}");
        assert!(name.ends_with(&"s".repeat(41)));
        assert_ne!(
            on_demand_service_waypoint_name(&"s".repeat(62)),
            name,
            "the hash tells cut names apart"
        );
    }
}
