//! Kubernetes objects as the harness handles them: any kind, as parsed from
//! YAML a user would `kubectl apply` or serialized from a typed value
//! (k8s-openapi types, the mesh's CRD types), with the few fields every
//! object has checked up front so bad input is reported by object and field.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("YAML document {doc}: {reason}")]
    Yaml { doc: usize, reason: String },
    #[error("{what}: {field} {problem}")]
    Field {
        what: String,
        field: &'static str,
        problem: String,
    },
    #[error("could not serialize {what}: {reason}")]
    Serialize { what: String, reason: String },
    #[error("{key}: {reason}")]
    Typed { key: ObjectKey, reason: String },
}

/// Kinds that are not namespaced (the ones a mesh scenario may touch).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "GatewayClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

/// Identifies an object: API group, kind, namespace (for namespaced kinds), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Empty for the core group (`v1`).
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn new(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> ObjectKey {
        ObjectKey {
            group: group.to_string(),
            kind: kind.to_string(),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    /// A core-group (`v1`) object's key.
    pub fn core(kind: &str, namespace: Option<&str>, name: &str) -> ObjectKey {
        ObjectKey::new("", kind, namespace, name)
    }

    /// The file the object is written to in a config directory:
    /// `<Kind>[.<group>]_<namespace>_<name>.yaml` (`_` never occurs in
    /// Kubernetes names, so the parts cannot run into each other).
    pub fn file_name(&self) -> String {
        let kind = if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        };
        format!(
            "{kind}_{}_{}.yaml",
            self.namespace.as_deref().unwrap_or("_cluster"),
            self.name
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One Kubernetes object with a valid `apiVersion`, `kind` and `metadata.name`
/// (and `metadata.namespace`, defaulted to `default`, for namespaced kinds).
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    key: ObjectKey,
    value: Value,
}

impl Object {
    /// Parses every document of a (multi-document) YAML text. Empty documents are skipped.
    pub fn from_yaml(text: &str) -> Result<Vec<Object>, ObjectError> {
        // YAML 1.2 booleans (only true/false): a name like `y` or `on` stays a string.
        let options = serde_saphyr::options! { strict_booleans: true };
        let docs: Vec<Value> =
            serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
                ObjectError::Yaml {
                    doc: 1,
                    reason: e.to_string(),
                }
            })?;
        docs.into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_null())
            .map(|(i, v)| Object::from_value(v, &format!("YAML document {}", i + 1)))
            .collect()
    }

    /// Serializes a typed object (it must carry `apiVersion` and `kind`, as
    /// k8s-openapi and kube-derived types do).
    pub fn from_typed<T: Serialize>(obj: &T) -> Result<Object, ObjectError> {
        let what = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("object")
            .to_string();
        let value = serde_json::to_value(obj).map_err(|e| ObjectError::Serialize {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        Object::from_value(value, &what)
    }

    /// Checks a parsed object; `what` names it in errors (say, "YAML document 2").
    pub fn from_value(mut value: Value, what: &str) -> Result<Object, ObjectError> {
        let field = |field, problem: &str| ObjectError::Field {
            what: what.to_string(),
            field,
            problem: problem.to_string(),
        };
        let map = value
            .as_object_mut()
            .ok_or_else(|| field("(top level)", "is not a mapping"))?;
        let api_version =
            required_str(map.get("apiVersion")).map_err(|p| field("apiVersion", p))?;
        let kind = required_str(map.get("kind")).map_err(|p| field("kind", p))?;
        let group = match api_version.split_once('/') {
            Some((group, _)) => group.to_string(),
            None => String::new(),
        };
        let what = format!("{what} ({kind})");
        let field = |field, problem: &str| ObjectError::Field {
            what: what.clone(),
            field,
            problem: problem.to_string(),
        };
        let metadata = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or_else(|| field("metadata", "is not a mapping"))?;
        let name = required_str(metadata.get("name")).map_err(|p| field("metadata.name", p))?;
        if !is_dns_subdomain(&name) {
            return Err(field(
                "metadata.name",
                &format!("{name:?} is not a valid name (lower-case letters, digits, '-' and '.')"),
            ));
        }
        let namespace = if CLUSTER_SCOPED.contains(&kind.as_str()) {
            metadata.remove("namespace");
            None
        } else {
            let ns =
                non_empty_str(metadata.get("namespace")).unwrap_or_else(|| "default".to_string());
            if !is_dns_label(&ns) {
                return Err(field(
                    "metadata.namespace",
                    &format!("{ns:?} is not a valid namespace name"),
                ));
            }
            metadata.insert("namespace".into(), Value::String(ns.clone()));
            Some(ns)
        };
        Ok(Object {
            key: ObjectKey {
                group,
                kind,
                namespace,
                name,
            },
            value,
        })
    }

    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    pub fn kind(&self) -> &str {
        &self.key.kind
    }

    pub fn name(&self) -> &str {
        &self.key.name
    }

    pub fn namespace(&self) -> Option<&str> {
        self.key.namespace.as_deref()
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The object as a typed value (say, `k8s_openapi::api::core::v1::Service`);
    /// errors name the object.
    pub fn to_typed<T: DeserializeOwned>(&self) -> Result<T, ObjectError> {
        serde_json::from_value(self.value.clone()).map_err(|e| ObjectError::Typed {
            key: self.key.clone(),
            reason: e.to_string(),
        })
    }

    /// `metadata.labels`.
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.value
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mutable access for the cluster's own defaulting (cluster IPs, uids).
    pub(crate) fn value_mut(&mut self) -> &mut Value {
        &mut self.value
    }

    /// The object as a YAML document.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(&self.value).expect("a JSON value always serializes to YAML")
    }
}

/// A field that must be a non-empty string; the error says what it is instead.
fn required_str(v: Option<&Value>) -> Result<String, &'static str> {
    match v {
        None | Some(Value::Null) => Err("is missing"),
        Some(Value::String(s)) if s.is_empty() => Err("is empty"),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("is not a string (quote it)"),
    }
}

fn non_empty_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// RFC 1123 label: what namespaces (and service names) must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what most object names must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_and_defaults_the_namespace() {
        let objs = Object::from_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n\
             ---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny\nspec:\n  action: DENY\n",
        )
        .unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].key(), &ObjectKey::core("Namespace", None, "demo"));
        assert_eq!(objs[0].labels()["istio.io/dataplane-mode"], "ambient");
        assert_eq!(
            objs[1].key(),
            &ObjectKey::new(
                "security.istio.io",
                "AuthorizationPolicy",
                Some("default"),
                "deny"
            )
        );
        assert_eq!(
            objs[1].key().file_name(),
            "AuthorizationPolicy.security.istio.io_default_deny.yaml"
        );
        assert_eq!(objs[0].key().file_name(), "Namespace__cluster_demo.yaml");
    }

    #[test]
    fn bad_objects_are_reported_by_document_and_field() {
        let err = Object::from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n---\nkind: Service\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "YAML document 2: apiVersion is missing");
        let err = Object::from_yaml("apiVersion: v1\nkind: Service\nmetadata: {}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "YAML document 1 (Service): metadata.name is missing");
        let err = Object::from_yaml("apiVersion: v1\nkind: Service\nmetadata:\n  name: Bad_Name\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metadata.name \"Bad_Name\" is not a valid name"),
            "{err}"
        );
        let err = Object::from_yaml("apiVersion: v1\nkind: Service\nmetadata:\n  name: 42\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "YAML document 1 (Service): metadata.name is not a string (quote it)"
        );
        assert!(Object::from_yaml("apiVersion: v1\nkind: [").is_err());
        // YAML 1.2 booleans: `y` and `on` are names, not booleans.
        let objs = Object::from_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: y\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: on\n",
        )
        .unwrap();
        assert_eq!((objs[0].name(), objs[1].name()), ("y", "on"));
        assert_eq!(
            Object::from_yaml(&objs[1].to_yaml()).unwrap()[0].name(),
            "on"
        );
    }

    #[test]
    fn typed_objects_round_trip() {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let sa = ServiceAccount {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("reviews".into()),
                namespace: Some("demo".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let obj = Object::from_typed(&sa).unwrap();
        assert_eq!(
            obj.key(),
            &ObjectKey::core("ServiceAccount", Some("demo"), "reviews")
        );
        let back: ServiceAccount = Object::from_yaml(&obj.to_yaml()).unwrap()[0]
            .to_typed()
            .unwrap();
        assert_eq!(back, sa);
    }
}
