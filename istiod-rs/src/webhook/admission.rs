//! AdmissionReview `admission.k8s.io/v1`: the request the API server sends
//! (the fields the webhook reads), the response it expects, and the
//! decision on one request. Pure: no I/O.
//!
//! Validated: `security.istio.io` AuthorizationPolicy and PeerAuthentication
//! (v1; v1beta1 has the same schema) and `networking.istio.io`
//! DestinationRule and VirtualService (v1, v1beta1, v1alpha3: one schema),
//! on CREATE and UPDATE, by the index's own readers
//! ([`crate::index::validate_authorization_policy`],
//! [`crate::index::validate_peer_authentication`],
//! [`crate::index::validate_destination_rule`],
//! [`crate::index::validate_virtual_service`]): what the webhook refuses
//! is exactly what the index would have to enforce more strictly than
//! written (for the networking kinds: values that cannot be read; fields
//! the waypoint does not honour are valid upstream and allowed). Any other kind is refused (the ValidatingWebhookConfiguration
//! sends only these); other operations are allowed, as upstream.
//! RequestAuthentication is not validated: nothing in the mesh reads its
//! fields yet (no waypoint serves JWT rules), so there is no reading to
//! share, and its CRD schema already checks the types.

use api::crd::networking::GROUP as NETWORKING_GROUP;
use api::crd::{AuthorizationPolicy, DestinationRule, PeerAuthentication, VirtualService};
use prometheus_client::encoding::EncodeLabelValue;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The AdmissionReview version served (the only one the webhook is
/// registered for).
pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";
/// The API group of the validated kinds.
pub const GROUP: &str = "security.istio.io";

/// An AdmissionReview as received.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub request: Option<AdmissionRequest>,
}

/// What the webhook reads of an `AdmissionRequest`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Copied into the response: the API server pairs them by it.
    pub uid: String,
    /// The object's kind as the request names it.
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// CREATE, UPDATE, DELETE, CONNECT.
    pub operation: String,
    /// The object as it would be stored.
    #[serde(default)]
    pub object: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
}

/// An `AdmissionResponse`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    /// Why it was refused (`metav1.Status`; its message is what `kubectl`
    /// shows after "denied the request:").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ResponseStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResponseStatus {
    pub message: String,
}

impl AdmissionResponse {
    /// The AdmissionReview that carries this response.
    pub fn into_review(self) -> Value {
        json!({"apiVersion": API_VERSION, "kind": KIND, "response": self})
    }
}

/// The validated kinds, as a bounded metrics label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Resource {
    authorizationpolicies,
    peerauthentications,
    destinationrules,
    virtualservices,
    other,
}

/// Why an object was refused, as a metrics label (upstream's reasons).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureReason {
    /// The object does not decode into its kind.
    yaml_decode_error,
    /// Not a kind this webhook validates.
    unknown_type,
    /// A value the mesh cannot enforce as written.
    invalid_resource,
}

/// The decision on one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub resource: Resource,
    /// `None`: allowed; otherwise why not, and the message for the user.
    pub refusal: Option<(FailureReason, String)>,
}

impl Decision {
    fn allow(resource: Resource) -> Self {
        Decision {
            resource,
            refusal: None,
        }
    }

    fn refuse(resource: Resource, reason: FailureReason, message: String) -> Self {
        Decision {
            resource,
            refusal: Some((reason, message)),
        }
    }

    pub fn allowed(&self) -> bool {
        self.refusal.is_none()
    }

    /// The response to the request with `uid`.
    pub fn response(&self, uid: &str) -> AdmissionResponse {
        AdmissionResponse {
            uid: uid.to_string(),
            allowed: self.allowed(),
            status: self.refusal.as_ref().map(|(_, message)| ResponseStatus {
                message: message.clone(),
            }),
        }
    }
}

/// Whether `request` may go ahead; policies in `root_namespace` apply
/// mesh-wide.
pub fn decide(request: &AdmissionRequest, root_namespace: &str) -> Decision {
    let gvk = &request.kind;
    let resource = match (gvk.group.as_str(), gvk.version.as_str(), gvk.kind.as_str()) {
        (GROUP, "v1" | "v1beta1", "AuthorizationPolicy") => Resource::authorizationpolicies,
        (GROUP, "v1" | "v1beta1", "PeerAuthentication") => Resource::peerauthentications,
        (NETWORKING_GROUP, "v1" | "v1beta1" | "v1alpha3", "DestinationRule") => {
            Resource::destinationrules
        }
        (NETWORKING_GROUP, "v1" | "v1beta1" | "v1alpha3", "VirtualService") => {
            Resource::virtualservices
        }
        _ => {
            return Decision::refuse(
                Resource::other,
                FailureReason::unknown_type,
                format!(
                    "istiod-rs validates {GROUP}/v1 AuthorizationPolicy and PeerAuthentication and {NETWORKING_GROUP}/v1 DestinationRule and VirtualService only, not {}/{} {}; the ValidatingWebhookConfiguration's rules should not send it here",
                    gvk.group, gvk.version, gvk.kind
                ),
            );
        }
    };
    if !matches!(request.operation.as_str(), "CREATE" | "UPDATE") {
        return Decision::allow(resource);
    }
    let name = format!("{} {}/{}", gvk.kind, request.namespace, request.name);
    let Some(object) = &request.object else {
        return Decision::refuse(
            resource,
            FailureReason::yaml_decode_error,
            format!("{name}: the admission request carries no object"),
        );
    };
    let problems = match resource {
        Resource::authorizationpolicies => {
            decode::<AuthorizationPolicy>(object, &name).map(|mut policy| {
                set_namespace(&mut policy.metadata, &request.namespace);
                crate::index::validate_authorization_policy(root_namespace, &policy)
            })
        }
        Resource::peerauthentications => {
            decode::<PeerAuthentication>(object, &name).map(|mut policy| {
                set_namespace(&mut policy.metadata, &request.namespace);
                crate::index::validate_peer_authentication(&policy)
            })
        }
        Resource::destinationrules => decode::<DestinationRule>(object, &name).map(|mut rule| {
            set_namespace(&mut rule.metadata, &request.namespace);
            crate::index::validate_destination_rule(&rule)
        }),
        Resource::virtualservices => decode::<VirtualService>(object, &name).map(|mut vs| {
            set_namespace(&mut vs.metadata, &request.namespace);
            crate::index::validate_virtual_service(&vs)
        }),
        Resource::other => unreachable!("refused above"),
    };
    match problems {
        Err(message) => Decision::refuse(resource, FailureReason::yaml_decode_error, message),
        Ok(problems) if problems.is_empty() => Decision::allow(resource),
        Ok(problems) => {
            let message = problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            Decision::refuse(resource, FailureReason::invalid_resource, message)
        }
    }
}

/// The object as its kind, or a message naming the field that does not fit.
fn decode<T: DeserializeOwned>(object: &Value, name: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        format!("{name}: {path}: {}", e.inner())
    })
}

/// Objects created in a namespace may not say so in their metadata; the
/// request does.
fn set_namespace(
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespace: &str,
) {
    if metadata.namespace.as_deref().unwrap_or_default().is_empty() && !namespace.is_empty() {
        metadata.namespace = Some(namespace.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(operation: &str, kind: &str, object: Option<Value>) -> AdmissionRequest {
        serde_json::from_value(json!({
            "uid": "u-1",
            "kind": {"group": GROUP, "version": "v1", "kind": kind},
            "name": "p",
            "namespace": "demo",
            "operation": operation,
            "object": object,
        }))
        .unwrap()
    }

    fn policy(kind: &str, spec: Value) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn decides_by_the_index_reading() {
        use FailureReason::*;
        use Resource::*;
        let ap = |spec| Some(policy("AuthorizationPolicy", spec));
        let pa = |spec| Some(policy("PeerAuthentication", spec));
        // (operation, kind, object) -> resource, refusal reason, words the message must hold
        type Case = (
            &'static str,
            &'static str,
            Option<Value>,
            Resource,
            Option<(FailureReason, &'static [&'static str])>,
        );
        let cases: Vec<Case> = vec![
            (
                "CREATE",
                "AuthorizationPolicy",
                ap(json!({"rules": [{"to": [{"operation": {"ports": ["80"]}}]}]})),
                authorizationpolicies,
                None,
            ),
            (
                "CREATE",
                "AuthorizationPolicy",
                ap(json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]})),
                authorizationpolicies,
                Some((
                    invalid_resource,
                    &[
                        "AuthorizationPolicy demo/p",
                        "rules[0].to[0].operation.ports[0]",
                    ],
                )),
            ),
            (
                "UPDATE",
                "AuthorizationPolicy",
                ap(json!({"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.0/33"]}]}]})),
                authorizationpolicies,
                Some((
                    invalid_resource,
                    &["rules[0].when[0].values[0]", "10.0.0.0/33"],
                )),
            ),
            (
                "CREATE",
                "AuthorizationPolicy",
                ap(json!({"rules": "all"})),
                authorizationpolicies,
                Some((
                    yaml_decode_error,
                    &["AuthorizationPolicy demo/p", "spec.rules"],
                )),
            ),
            (
                "CREATE",
                "AuthorizationPolicy",
                None,
                authorizationpolicies,
                Some((yaml_decode_error, &["carries no object"])),
            ),
            (
                "DELETE",
                "AuthorizationPolicy",
                None,
                authorizationpolicies,
                None,
            ),
            (
                "CONNECT",
                "PeerAuthentication",
                None,
                peerauthentications,
                None,
            ),
            (
                "CREATE",
                "PeerAuthentication",
                pa(json!({"mtls": {"mode": "PERMISSIVE"}})),
                peerauthentications,
                None,
            ),
            (
                "CREATE",
                "PeerAuthentication",
                pa(json!({"mtls": {"mode": "ON"}})),
                peerauthentications,
                Some((
                    invalid_resource,
                    &["PeerAuthentication demo/p", "mtls.mode"],
                )),
            ),
            (
                "CREATE",
                "RequestAuthentication",
                Some(json!({})),
                other,
                Some((unknown_type, &["RequestAuthentication"])),
            ),
        ];
        for (operation, kind, object, resource, refusal) in cases {
            let decision = decide(&request(operation, kind, object), "istio-system");
            let what = format!("{operation} {kind}: {decision:?}");
            assert_eq!(decision.resource, resource, "{what}");
            match (refusal, &decision.refusal) {
                (None, None) => {}
                (Some((reason, words)), Some((got, message))) => {
                    assert_eq!(*got, reason, "{what}");
                    for w in words {
                        assert!(message.contains(w), "{what}: should say {w:?}");
                    }
                }
                _ => panic!("{what}"),
            }
        }
    }

    #[test]
    fn networking_kinds_refuse_unreadable_values_only() {
        let review = |kind: &str, version: &str, spec: Value| -> AdmissionRequest {
            serde_json::from_value(json!({
                "uid": "u-1",
                "kind": {"group": "networking.istio.io", "version": version, "kind": kind},
                "name": "r",
                "namespace": "demo",
                "operation": "CREATE",
                "object": {
                    "apiVersion": format!("networking.istio.io/{version}"),
                    "kind": kind,
                    "metadata": {"name": "r"},
                    "spec": spec,
                },
            }))
            .unwrap()
        };
        // Fields the waypoint does not honour are valid: allowed.
        let dr = review(
            "DestinationRule",
            "v1alpha3",
            json!({"host": "reviews", "trafficPolicy": {"tls": {"mode": "SIMPLE"}, "loadBalancer": {"simple": "PASSTHROUGH"}}}),
        );
        let d = decide(&dr, "istio-system");
        assert_eq!(d.resource, Resource::destinationrules);
        assert!(d.allowed(), "{d:?}");
        // A value that cannot be read is refused, naming object and field.
        let dr = review(
            "DestinationRule",
            "v1",
            json!({"host": "reviews", "trafficPolicy": {"outlierDetection": {"interval": "ten seconds"}}}),
        );
        let (reason, message) = decide(&dr, "istio-system").refusal.unwrap();
        assert_eq!(reason, FailureReason::invalid_resource);
        assert!(message.contains("DestinationRule demo/r"), "{message}");
        assert!(
            message.contains("spec.trafficPolicy.outlierDetection.interval"),
            "{message}"
        );

        let vs = review(
            "VirtualService",
            "v1beta1",
            json!({"hosts": ["reviews"], "http": [{"corsPolicy": {}, "match": [{"sourceLabels": {"a": "b"}}], "route": [{"destination": {"host": "nowhere"}}]}]}),
        );
        let d = decide(&vs, "istio-system");
        assert_eq!(d.resource, Resource::virtualservices);
        assert!(d.allowed(), "{d:?}");
        let vs = review(
            "VirtualService",
            "v1",
            json!({"hosts": ["reviews"], "http": [{"match": [{"uri": {"regex": "(unclosed"}}], "fault": {"abort": {"grpcStatus": "NOPE", "percentage": {"value": 5}}}, "route": [{"destination": {"host": "reviews"}}]}]}),
        );
        let (reason, message) = decide(&vs, "istio-system").refusal.unwrap();
        assert_eq!(reason, FailureReason::invalid_resource);
        assert!(
            message.contains("spec.http[0].match[0].uri.regex"),
            "{message}"
        );
        assert!(
            message.contains("spec.http[0].fault.abort.grpcStatus"),
            "{message}"
        );
        // A version upstream does not serve is not validated here.
        let other = review("VirtualService", "v2", json!({}));
        assert_eq!(decide(&other, "istio-system").resource, Resource::other);
    }

    #[test]
    fn the_response_echoes_the_uid_and_carries_the_reason() {
        let decision = decide(
            &request(
                "CREATE",
                "AuthorizationPolicy",
                Some(policy(
                    "AuthorizationPolicy",
                    json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                )),
            ),
            "istio-system",
        );
        let review = decision.response("u-1").into_review();
        assert_eq!(review["apiVersion"], API_VERSION);
        assert_eq!(review["kind"], KIND);
        assert_eq!(review["response"]["uid"], "u-1");
        assert_eq!(review["response"]["allowed"], false);
        println!("{}", review["response"]["status"]["message"]);
        assert!(
            review["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("\"http\"")
        );
        let allowed = decide(
            &request("DELETE", "PeerAuthentication", None),
            "istio-system",
        );
        assert_eq!(
            allowed.response("u-2").into_review()["response"],
            json!({"uid": "u-2", "allowed": true})
        );
    }
}
