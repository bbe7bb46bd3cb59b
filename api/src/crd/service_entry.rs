//! `networking.istio.io` ServiceEntry and WorkloadEntry, as users write
//! them.
//!
//! Field names and enum values are upstream's (istio/api
//! `networking/v1alpha3/service_entry.proto`, `workload_entry.proto`; v1,
//! v1beta1 and v1alpha3 share the schema). Decoding is strict as for every
//! kind the mesh reads: a field these types do not have refuses the object,
//! naming the field. Enum values this version does not know are kept as
//! written ([`Location::Unknown`], [`Resolution::Unknown`]) so istiod-rs can
//! name the field instead of losing the object.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::PolicyCondition;

/// Selects workloads (pods and WorkloadEntries) in the ServiceEntry's
/// namespace by their labels. Upstream's networking `WorkloadSelector`:
/// the field is `labels`, not `matchLabels`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceEntrySelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A structural schema for a number or a string (upstream's
/// `IstioStatus.observedGeneration`).
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"x-kubernetes-int-or-string": true})
}

// ---------------------------------------------------------------------------
// ServiceEntry

/// Adds entries to the mesh's service registry: hosts (usually outside the
/// cluster) with their addresses, ports and endpoints.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "ServiceEntry",
    plural = "serviceentries",
    shortname = "se",
    category = "istio-io",
    category = "networking-istio-io",
    namespaced,
    status = "ServiceEntryStatus",
    printcolumn = r#"{"name":"Hosts","type":"string","description":"The hosts associated with the ServiceEntry","jsonPath":".spec.hosts"}"#,
    printcolumn = r#"{"name":"Location","type":"string","description":"Whether the service is external to the mesh or part of the mesh (MESH_EXTERNAL or MESH_INTERNAL)","jsonPath":".spec.location"}"#,
    printcolumn = r#"{"name":"Resolution","type":"string","description":"Service resolution mode for the hosts (NONE, STATIC, or DNS)","jsonPath":".spec.resolution"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// The hosts: DNS names, possibly with a wildcard prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Virtual IPs (or CIDRs) of the hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<KnownLocation>")]
    pub location: Option<Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<KnownResolution>")]
    pub resolution: Option<Resolution>,
    /// Endpoints of the hosts, written inline (exclusive with
    /// `workloadSelector`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Pods and WorkloadEntries of the namespace that are the endpoints
    /// (exclusive with `endpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<ServiceEntrySelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Identities the endpoints may present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u32,
    /// `HTTP`, `HTTPS`, `GRPC`, `HTTP2`, `MONGO`, `TCP`, `TLS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The endpoints' port; absent: the port's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// Whether the hosts are inside the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
    /// A value this version does not know, kept as written.
    #[serde(untagged)]
    Unknown(String),
}

/// How the hosts' endpoints are found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    /// The connection's own destination address.
    #[default]
    #[serde(rename = "NONE")]
    None,
    /// The `endpoints` (or selected workloads') addresses.
    #[serde(rename = "STATIC")]
    Static,
    /// Names resolved by DNS.
    #[serde(rename = "DNS")]
    Dns,
    #[serde(rename = "DNS_ROUND_ROBIN")]
    DnsRoundRobin,
    /// A value this version does not know, kept as written.
    #[serde(untagged)]
    Unknown(String),
}

// The schemas of the two enums: the values the API server accepts.
#[derive(JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(dead_code)]
enum KnownLocation {
    MeshExternal,
    MeshInternal,
}

#[derive(JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(dead_code)]
enum KnownResolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// What the control plane writes on a ServiceEntry (upstream's
/// `ServiceEntryStatus`): conditions, and the addresses it allocated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
    /// Upstream writes it as a number or a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string")]
    pub observed_generation: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::networking::opaque_objects")]
    pub validation_messages: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<ServiceEntryAddress>,
}

// An address the control plane allocated to one host (upstream's
// `ServiceEntryAddress`); no doc comment: it would change the CRD schema.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceEntryAddress {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
}

// ---------------------------------------------------------------------------
// WorkloadEntry

/// A workload that is not a pod (a VM, a bare-metal host): its address,
/// labels and identity. Also the form of a ServiceEntry's inline endpoints.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "WorkloadEntry",
    plural = "workloadentries",
    shortname = "we",
    category = "istio-io",
    category = "networking-istio-io",
    namespaced,
    status = "WorkloadEntryStatus",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Address","type":"string","description":"Address associated with the network endpoint.","jsonPath":".spec.address"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// An IP address, or a DNS name (resolved by the proxy), or a unix
    /// socket path (`unix://...`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Port name (a ServiceEntry port's `name`) -> the port the workload
    /// listens on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// `region/zone/subzone`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// What the control plane writes on a WorkloadEntry (upstream's
/// `IstioStatus`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntryStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
    /// Upstream writes it as a number or a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string")]
    pub observed_generation: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::networking::opaque_objects")]
    pub validation_messages: Vec<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_addresses_decode_strictly() {
        let entry = |address: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {{name: ext, namespace: shop}}\nspec: {{hosts: [a.example.com]}}\n\
                 status: {{addresses: [{address}]}}\n"
            )
        };
        let m =
            crate::manifest::parse(&entry("{host: a.example.com, value: 240.240.0.1}")).unwrap();
        let crate::manifest::Object::ServiceEntry(se) = &m.objects[0] else {
            panic!("{:?}", m.objects);
        };
        assert_eq!(
            se.status.as_ref().unwrap().addresses,
            [ServiceEntryAddress {
                value: "240.240.0.1".into(),
                host: "a.example.com".into()
            }]
        );
        let m = crate::manifest::parse(&entry("{host: a.example.com, ip: 240.240.0.1}")).unwrap();
        assert!(m.objects.is_empty(), "{:?}", m.objects);
        match &m.refused[..] {
            [crate::manifest::Refused::UnknownFields { fields, .. }] => {
                assert_eq!(fields, &["status.addresses[0].ip"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_enum_values_decode_and_unknown_ones_are_kept() {
        let spec: ServiceEntrySpec = serde_json::from_value(serde_json::json!({
            "hosts": ["a.example.com"],
            "location": "MESH_INTERNAL",
            "resolution": "DNS_ROUND_ROBIN",
            "endpoints": [{"address": "10.0.0.1", "ports": {"http": 8080}, "weight": 2}],
        }))
        .unwrap();
        assert_eq!(spec.location, Some(Location::MeshInternal));
        assert_eq!(spec.resolution, Some(Resolution::DnsRoundRobin));
        assert_eq!(spec.endpoints[0].ports["http"], 8080);
        let spec: ServiceEntrySpec = serde_json::from_value(serde_json::json!({
            "location": "MESH_SOMEWHERE",
            "resolution": "DNS_ROUNDROBIN",
        }))
        .unwrap();
        assert_eq!(
            spec.location,
            Some(Location::Unknown("MESH_SOMEWHERE".into()))
        );
        assert_eq!(
            spec.resolution,
            Some(Resolution::Unknown("DNS_ROUNDROBIN".into()))
        );
        for (r, s) in [
            (Resolution::None, "NONE"),
            (Resolution::Static, "STATIC"),
            (Resolution::Dns, "DNS"),
        ] {
            assert_eq!(serde_json::to_value(&r).unwrap(), s);
        }
    }
}
