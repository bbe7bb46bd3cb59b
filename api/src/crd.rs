//! `security.istio.io/v1` custom resources, as users write them:
//! AuthorizationPolicy, PeerAuthentication and RequestAuthentication; and,
//! in [`networking`], `networking.istio.io` DestinationRule and
//! VirtualService; in [`service_entry`], ServiceEntry and WorkloadEntry.
//!
//! Field names follow upstream's CRDs so existing manifests apply unchanged.
//! The CRD YAML under `manifests/crds/` is generated from these types
//! (`cargo xtask codegen`) and checked by a test.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod networking;
pub mod service_entry;

pub use networking::{DestinationRule, VirtualService};
pub use service_entry::{ServiceEntry, WorkloadEntry};

pub const GROUP: &str = "security.istio.io";
pub const VERSION: &str = "v1";

/// Selects workloads in the policy's namespace by pod labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Attaches a policy to a Gateway (waypoint), Service or ServiceEntry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Status the control plane writes on policies: why a policy is (not) enforced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// e.g. `Accepted`, `WaypointAccepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------
// AuthorizationPolicy

/// Access control for workloads: L4 rules are enforced by ztunnel, rules with
/// HTTP attributes (or `targetRefs`) by waypoints.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; absent means every workload in the
    /// namespace (or the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Rules are alternatives; no rules: an ALLOW matches nothing, a DENY nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub action: AuthorizationAction,
    /// Extension provider, for CUSTOM only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExtensionProvider {
    pub name: String,
}

/// All of `from`, `to` and `when` must match (each list: any entry).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

/// Who is calling. Fields must all match; values within a field are alternatives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities without `spiffe://`, e.g. `cluster.local/ns/default/sa/sleep`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT `iss/sub` (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// `namespace/name` of service accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs from X-Forwarded-For (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What is being called.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Host header (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP paths (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// An extra condition on a request attribute, e.g. `source.ip`, `request.headers[x]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

// ---------------------------------------------------------------------------
// PeerAuthentication

/// Whether workloads accept plaintext: STRICT (mTLS only), PERMISSIVE (both), DISABLE.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    shortname = "pa",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per-port overrides (container port -> mode); needs a selector.
    // Keys are kept as written: one that is not a port number is reported
    // and enforced more strictly, never dropped with the rest of the object.
    // The schema still lets the API server refuse it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "port_level_mtls_schema")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// Most ports one PeerAuthentication overrides: bounds the cost of the key
/// rule below, which the API server checks before it accepts the CRD.
const MAX_PORT_LEVEL_MTLS: u64 = 1024;

/// `portLevelMtls`: a map from port number to mode. Structural schemas
/// (what `apiextensions.k8s.io/v1` accepts) have no `patternProperties`, so
/// the keys are checked by a CEL rule instead (the API server refused the
/// `patternProperties` a `BTreeMap<u32, _>` schema gives).
fn port_level_mtls_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<BTreeMap<String, MutualTls>>();
    schema.insert("maxProperties".into(), MAX_PORT_LEVEL_MTLS.into());
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "self.all(port, port.matches('^[0-9]{1,5}$') && int(port) >= 1 && int(port) <= 65535)",
            "message": "portLevelMtls keys must be port numbers (1-65535)",
        }]),
    );
    schema
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MutualTls {
    #[serde(default)]
    #[schemars(with = "KnownMtlsMode")]
    pub mode: MtlsMode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope (namespace, then mesh); PERMISSIVE at the top.
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
    /// A mode this version does not know (a typo, a newer mode), kept as
    /// written so the object is still read: the control plane reports it
    /// and enforces it as STRICT. Not part of the CRD schema, which lets the
    /// API server reject it.
    #[serde(untagged)]
    Unknown(String),
}

// MtlsMode's schema: the modes the API server accepts. (A comment, not a
// doc comment: a doc comment would become the CRD field's description.)
#[derive(JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(dead_code)]
enum KnownMtlsMode {
    /// Inherit from the parent scope (namespace, then mesh); PERMISSIVE at the top.
    Unset,
    Disable,
    Permissive,
    Strict,
}

// ---------------------------------------------------------------------------
// RequestAuthentication

/// JWT validation at waypoints: which issuers are trusted and where tokens are found.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "RequestAuthentication",
    plural = "requestauthentications",
    shortname = "ra",
    namespaced,
    status = "PolicyStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Inline JWKS document (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    #[serde(default)]
    pub forward_original_token: bool,
    /// Timeout for fetching `jwksUri`, e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// The CRDs of this module as YAML, with the file name each is committed as
/// under `manifests/crds/`.
pub fn crd_yaml() -> Result<Vec<(&'static str, String)>, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    let crds = [
        (
            "security.istio.io_authorizationpolicies.yaml",
            AuthorizationPolicy::crd(),
        ),
        (
            "security.istio.io_peerauthentications.yaml",
            PeerAuthentication::crd(),
        ),
        (
            "security.istio.io_requestauthentications.yaml",
            RequestAuthentication::crd(),
        ),
        (
            "networking.istio.io_destinationrules.yaml",
            networking::served_as_upstream(DestinationRule::crd()),
        ),
        (
            "networking.istio.io_virtualservices.yaml",
            networking::served_as_upstream(VirtualService::crd()),
        ),
        (
            "networking.istio.io_serviceentries.yaml",
            networking::served_as_upstream(ServiceEntry::crd()),
        ),
        (
            "networking.istio.io_workloadentries.yaml",
            networking::served_as_upstream(WorkloadEntry::crd()),
        ),
    ];
    crds.into_iter()
        .map(|(file, crd)| {
            let mut yaml = serde_saphyr::to_string(&crd)?;
            yaml.insert_str(
                0,
                "# Generated by `cargo xtask codegen` from api/src/crd.rs. Do not edit.\n",
            );
            yaml.push('\n');
            Ok((file, yaml))
        })
        .collect()
}
