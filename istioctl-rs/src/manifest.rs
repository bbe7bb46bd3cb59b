//! The install manifest: the embedded files of manifests/crds/ (with the
//! Gateway API's standard channel in manifests/crds/gateway-api/, created
//! only where absent) and manifests/install/, rendered with the values, every document decoded as
//! its Kubernetes type with strict field validation (a field the kind does
//! not have is an error naming the file, the line and the field path, as
//! `kubectl apply --validate=strict` would refuse it), labelled as ours,
//! and put in the order they are applied.

use std::collections::BTreeMap;

use api::manifest::{Document, ManifestError as DocumentError, UnknownField, decode_document};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, GroupVersionKind};
use serde_json::Value;

use crate::render::{RenderError, render};
use crate::values::Values;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/manifests.rs"));
}
pub use embedded::{CRD_FILES, GATEWAY_API_FILES, INSTALL_FILES};

/// The field manager of istioctl-rs's server-side applies.
pub const FIELD_MANAGER: &str = "istioctl-rs";
/// The label istioctl-rs puts on everything it applies; `uninstall` finds
/// what to delete by it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// [`MANAGED_BY`]'s value.
pub const MANAGED_BY_VALUE: &str = FIELD_MANAGER;
/// `MANAGED_BY=MANAGED_BY_VALUE`, as a label selector.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGED_BY_VALUE}")
}

/// The kinds an install holds, declared in the order they are applied:
/// the namespace, the CRDs (established before anything could use them),
/// identities and RBAC, configuration, Services, the webhook (before
/// istiod-rs, which keeps it), then the workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InstallKind {
    Namespace,
    CustomResourceDefinition,
    ServiceAccount,
    ClusterRole,
    ClusterRoleBinding,
    Role,
    RoleBinding,
    ConfigMap,
    Secret,
    Service,
    ValidatingWebhookConfiguration,
    Deployment,
    DaemonSet,
}

/// The type of every [`InstallKind`]: one list, from which the accessors and
/// the strict decoder are generated.
macro_rules! install_kinds {
    ($($kind:ident($ty:ty, $group:literal, $version:literal, $plural:literal, $namespaced:literal)),* $(,)?) => {
        impl InstallKind {
            pub const ALL: &'static [InstallKind] = &[$(InstallKind::$kind),*];

            pub fn as_str(self) -> &'static str {
                match self { $(InstallKind::$kind => stringify!($kind),)* }
            }

            pub fn group(self) -> &'static str {
                match self { $(InstallKind::$kind => $group,)* }
            }

            pub fn version(self) -> &'static str {
                match self { $(InstallKind::$kind => $version,)* }
            }

            /// The resource's name in API paths and RBAC rules.
            pub fn plural(self) -> &'static str {
                match self { $(InstallKind::$kind => $plural,)* }
            }

            pub fn namespaced(self) -> bool {
                match self { $(InstallKind::$kind => $namespaced,)* }
            }

            /// The fields of `doc` its type does not have.
            fn unknown_fields(self, doc: &Document<'_>) -> Result<Vec<UnknownField>, DocumentError> {
                match self {
                    $(InstallKind::$kind => decode_document::<$ty>(doc).map(|(_, unknown)| unknown),)*
                }
            }
        }
    };
}

install_kinds!(
    Namespace(Namespace, "", "v1", "namespaces", false),
    CustomResourceDefinition(
        CustomResourceDefinition,
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        false
    ),
    ServiceAccount(ServiceAccount, "", "v1", "serviceaccounts", true),
    ClusterRole(
        ClusterRole,
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        false
    ),
    ClusterRoleBinding(
        ClusterRoleBinding,
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        false
    ),
    Role(Role, "rbac.authorization.k8s.io", "v1", "roles", true),
    RoleBinding(
        RoleBinding,
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        true
    ),
    ConfigMap(ConfigMap, "", "v1", "configmaps", true),
    Secret(Secret, "", "v1", "secrets", true),
    Service(Service, "", "v1", "services", true),
    ValidatingWebhookConfiguration(
        ValidatingWebhookConfiguration,
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        false
    ),
    Deployment(Deployment, "apps", "v1", "deployments", true),
    DaemonSet(DaemonSet, "apps", "v1", "daemonsets", true),
);

impl InstallKind {
    /// `apiVersion` as written in manifests.
    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            group => format!("{group}/{}", self.version()),
        }
    }

    /// The kind a document declares, when an install may hold it.
    pub fn of(api_version: &str, kind: &str) -> Option<InstallKind> {
        InstallKind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == kind && k.api_version() == api_version)
    }

    /// For kube's dynamic API.
    pub fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group(), self.version(), self.as_str()),
            self.plural(),
        )
    }

    /// `deployments.apps`, as RBAC errors and `kubectl auth can-i` name it.
    pub fn resource(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            group => format!("{}.{group}", self.plural()),
        }
    }
}

impl std::fmt::Display for InstallKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestObject {
    pub kind: InstallKind,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
    /// `file:line` it comes from.
    pub source: String,
    /// The object as applied: the document, with our label.
    pub body: Value,
    /// Created only when no object of its name exists, and then never
    /// changed: the Gateway API CRDs, which a cluster may already have at
    /// another version (installed by its provider or its users, who own
    /// their upgrades).
    pub if_absent: bool,
}

impl ManifestObject {
    /// `Deployment istio-system/istiod`.
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// Why the manifest could not be made. Each names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("{file}:{}: {}", error.line, error.reason)]
    Document { file: String, error: DocumentError },
    #[error(
        "{file}:{line}: {api_version} {kind} is not a kind istioctl-rs installs ({})",
        InstallKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    )]
    UnknownKind {
        file: String,
        line: usize,
        api_version: String,
        kind: String,
    },
    #[error("{file}:{line}: {kind} has no metadata.name")]
    NoName {
        file: String,
        line: usize,
        kind: InstallKind,
    },
    #[error("{file}:{line}: {kind} {name} has no metadata.namespace; install manifests name it")]
    NoNamespace {
        file: String,
        line: usize,
        kind: InstallKind,
        name: String,
    },
    #[error("{file}: {object} has fields its kind does not have: {}", fields.iter().map(|f| format!("{} (line {})", f.path, f.line)).collect::<Vec<_>>().join(", "))]
    UnknownFields {
        file: String,
        object: String,
        fields: Vec<UnknownField>,
    },
    #[error("{object} is defined twice: at {first} and at {second}")]
    Duplicate {
        object: String,
        first: String,
        second: String,
    },
}

/// What an install applies, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub objects: Vec<ManifestObject>,
}

/// The install manifest of these values: the CRDs (ours, then the Gateway
/// API's, marked [`ManifestObject::if_absent`]) and the install files this
/// binary embeds.
pub fn generate(values: &Values) -> Result<Manifest, ManifestError> {
    let files: Vec<(&str, &str)> = CRD_FILES
        .iter()
        .chain(GATEWAY_API_FILES)
        .chain(INSTALL_FILES)
        .copied()
        .collect();
    let mut manifest = from_files(&files, values)?;
    for object in &mut manifest.objects {
        object.if_absent = GATEWAY_API_FILES
            .iter()
            .any(|(file, _)| object.source.starts_with(&format!("{file}:")));
    }
    Ok(manifest)
}

/// The manifest of `files` (name, template).
pub fn from_files(files: &[(&str, &str)], values: &Values) -> Result<Manifest, ManifestError> {
    let mut objects = Vec::new();
    let lookup = |key: &str| values.get(key).map(String::from);
    for (file, template) in files {
        let text = render(file, template, &lookup)?;
        for doc in api::manifest::documents(&text) {
            objects.push(object(file, &doc)?);
        }
    }
    let mut seen: BTreeMap<(InstallKind, Option<String>, String), String> = BTreeMap::new();
    for o in &objects {
        let key = (o.kind, o.namespace.clone(), o.name.clone());
        if let Some(first) = seen.insert(key, o.source.clone()) {
            return Err(ManifestError::Duplicate {
                object: o.describe(),
                first,
                second: o.source.clone(),
            });
        }
    }
    // Stable: within a kind, the files' order.
    objects.sort_by_key(|o| o.kind);
    Ok(Manifest { objects })
}

fn object(file: &str, doc: &Document<'_>) -> Result<ManifestObject, ManifestError> {
    let document_error = |error| ManifestError::Document {
        file: file.to_string(),
        error,
    };
    let mut body: Value = serde_saphyr::from_str(doc.body).map_err(|e| {
        document_error(DocumentError {
            line: doc.first_line,
            reason: e.to_string(),
        })
    })?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let (api_version, kind_name) = (text(&body["apiVersion"]), text(&body["kind"]));
    let Some(kind) = InstallKind::of(&api_version, &kind_name) else {
        return Err(ManifestError::UnknownKind {
            file: file.to_string(),
            line: doc.first_line,
            api_version,
            kind: kind_name,
        });
    };
    let unknown = kind.unknown_fields(doc).map_err(document_error)?;
    let name = text(&body["metadata"]["name"]);
    if name.is_empty() {
        return Err(ManifestError::NoName {
            file: file.to_string(),
            line: doc.first_line,
            kind,
        });
    }
    let namespace = match (kind.namespaced(), text(&body["metadata"]["namespace"])) {
        (false, _) => None,
        (true, ns) if ns.is_empty() => {
            return Err(ManifestError::NoNamespace {
                file: file.to_string(),
                line: doc.first_line,
                kind,
                name,
            });
        }
        (true, ns) => Some(ns),
    };
    let object = ManifestObject {
        kind,
        namespace,
        name,
        source: format!("{file}:{}", doc.first_line),
        body: Value::Null,
        if_absent: false,
    };
    if !unknown.is_empty() {
        return Err(ManifestError::UnknownFields {
            file: file.to_string(),
            object: object.describe(),
            fields: unknown,
        });
    }
    label(&mut body);
    Ok(ManifestObject { body, ..object })
}

/// Puts our label on an object.
pub fn label(body: &mut Value) {
    let metadata = &mut body["metadata"];
    if !metadata["labels"].is_object() {
        metadata["labels"] = Value::Object(Default::default());
    }
    metadata["labels"][MANAGED_BY] = Value::String(MANAGED_BY_VALUE.into());
}

impl Manifest {
    /// Every object as YAML documents, in apply order (`manifest generate`).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for object in &self.objects {
            out.push_str(&format!("# {}\n", object.source));
            if object.if_absent {
                out.push_str(
                    "# install creates it only if absent: skip it where the cluster has it\n",
                );
            }
            out.push_str(
                &serde_saphyr::to_string(&object.body).expect("JSON values serialise as YAML"),
            );
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("---\n");
        }
        out
    }

    /// The objects of one kind.
    pub fn of_kind(&self, kind: InstallKind) -> impl Iterator<Item = &ManifestObject> {
        self.objects.iter().filter(move |o| o.kind == kind)
    }
}
