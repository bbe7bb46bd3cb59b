//! Kubernetes manifests as a user would `kubectl apply` them: multi-document
//! YAML turned into the typed objects the mesh reads (namespaces, pods,
//! services, Gateway API and Istio security resources).
//!
//! istiod-rs reads its whole cluster state this way in local mode
//! (`--config-dir`), and ztunnel-rs's node agent reads the same directory to
//! find its pods. Errors carry the line they were found on, so the caller can
//! report `file:line: reason`. Documents of kinds the mesh does not read are
//! returned as [`Ignored`] rather than failing the file.

use std::fmt;
use std::path::{Path, PathBuf};

mod dir;
pub use dir::{DirScan, FileProblem, ManifestDir};

use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::crd::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};

/// Namespace kubectl assumes for a namespaced object that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where, under a manifest directory, istiod-rs's local mode writes the
/// status of each object. The files describe objects, they are not objects:
/// [`yaml_files`] never lists them.
pub const STATUS_DIR: &str = "generated/status";

/// The kinds of object the mesh reads, in the order a cluster is usually
/// applied (namespaces first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    ServiceAccount,
    Pod,
    Service,
    EndpointSlice,
    Gateway,
    HttpRoute,
    GrpcRoute,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Namespace,
        Kind::Node,
        Kind::ServiceAccount,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
    ];

    /// The `kind` field, as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// The API group (empty for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::ServiceAccount | Kind::Pod | Kind::Service => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Gateway | Kind::HttpRoute | Kind::GrpcRoute => "gateway.networking.k8s.io",
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => {
                crate::crd::GROUP
            }
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// The kind a document declares, when the mesh reads it. Only the API
    /// versions whose schema the typed objects decode are accepted.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let found = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind && k.group() == group)?;
        let version_ok = match found {
            // These were promoted to v1 unchanged; older manifests still
            // say v1beta1.
            Kind::AuthorizationPolicy
            | Kind::PeerAuthentication
            | Kind::RequestAuthentication
            | Kind::Gateway
            | Kind::HttpRoute => matches!(version, "v1" | "v1beta1"),
            // GRPCRoute went from v1alpha2 straight to v1.
            Kind::GrpcRoute => version == "v1",
            _ => version == "v1",
        };
        version_ok.then_some(found)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Namespace (empty for cluster-scoped kinds) and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a cluster-scoped object.
    pub fn cluster(name: impl Into<String>) -> Self {
        Self::new("", name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The object type of every [`Kind`]: one list, from which the enum, its
/// accessors, the conversions and the decoder are generated.
macro_rules! objects {
    ($($kind:ident($ty:ty)),* $(,)?) => {
        /// One object of a kind the mesh reads.
        #[derive(Clone, Debug)]
        pub enum Object {
            $($kind($ty),)*
        }

        impl Object {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Object::$kind(_) => Kind::$kind,)*
                }
            }

            pub fn metadata(&self) -> &ObjectMeta {
                match self {
                    $(Object::$kind(o) => &o.metadata,)*
                }
            }

            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self {
                    $(Object::$kind(o) => &mut o.metadata,)*
                }
            }
        }

        $(impl From<$ty> for Object {
            fn from(o: $ty) -> Self {
                Object::$kind(o)
            }
        })*

        fn decode_object(doc: &Document<'_>, kind: Kind) -> Result<Object, ManifestError> {
            Ok(match kind {
                $(Kind::$kind => Object::$kind(decode(doc)?),)*
            })
        }
    };
}

objects!(
    Namespace(Namespace),
    Node(Node),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(RequestAuthentication),
);

impl Object {
    /// The object's key; namespaced objects without a namespace are in
    /// [`DEFAULT_NAMESPACE`] (see [`parse`], which fills it in).
    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        let namespace = if self.kind().namespaced() {
            meta.namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
        } else {
            String::new()
        };
        ObjectKey::new(namespace, meta.name.clone().unwrap_or_default())
    }
}

/// A document of a kind the mesh does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    /// Line (1-based) the document starts on.
    pub line: usize,
    pub api_version: String,
    pub kind: String,
}

/// What one YAML text holds.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    pub objects: Vec<Object>,
    pub ignored: Vec<Ignored>,
}

/// Why a manifest could not be read. `line` is 1-based and counts from the
/// start of the whole text, not of the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ManifestError {
    pub line: usize,
    pub reason: String,
}

/// Parses every document of a (multi-document) YAML text. The first bad
/// document fails the whole text: a half-read file would silently drop
/// objects, which is worse than keeping its last good version.
pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
    let mut manifest = Manifest::default();
    for doc in split_documents(text) {
        let header: Header = decode(&doc)?;
        let (Some(api_version), Some(kind)) = (header.api_version, header.kind) else {
            return Err(ManifestError {
                line: doc.first_line,
                reason: "the document has no apiVersion or kind; every object needs both, e.g. `apiVersion: v1` and `kind: Pod`".into(),
            });
        };
        let Some(known) = Kind::from_type(&api_version, &kind) else {
            manifest.ignored.push(Ignored {
                line: doc.first_line,
                api_version,
                kind,
            });
            continue;
        };
        let mut object = decode_object(&doc, known)?;
        let meta = object.metadata_mut();
        if meta.name.as_deref().unwrap_or_default().is_empty() {
            return Err(ManifestError {
                line: doc.first_line,
                reason: format!("{kind} has no metadata.name; give the object a name"),
            });
        }
        if known.namespaced() && meta.namespace.as_deref().unwrap_or_default().is_empty() {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
        }
        manifest.objects.push(object);
    }
    Ok(manifest)
}

/// Parses a file's bytes: [`parse`], after checking they are UTF-8 text.
pub fn parse_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ManifestError {
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        reason: "the file is not UTF-8 text; save it as UTF-8".into(),
    })?;
    parse(text)
}

/// Every `*.yaml` / `*.yml` file under `dir`, recursively, in path order,
/// and the directories that could not be read. Hidden entries are skipped:
/// editor swap files, VCS data, and the `..data` indirection of ConfigMap
/// volumes (whose files are also linked from the top level). So is
/// [`STATUS_DIR`].
pub fn yaml_files(dir: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, std::io::Error)>) {
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    collect_yaml_files(dir, &dir.join(STATUS_DIR), &mut files, &mut unreadable);
    (files, unreadable)
}

fn collect_yaml_files(
    dir: &Path,
    skipped: &Path,
    files: &mut Vec<PathBuf>,
    unreadable: &mut Vec<(PathBuf, std::io::Error)>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            unreadable.push((dir.to_path_buf(), e));
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            if path != skipped {
                collect_yaml_files(&path, skipped, files, unreadable);
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            files.push(path);
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

/// One document of a multi-document text.
struct Document<'a> {
    /// Line (1-based) of the document's first line within the whole text.
    first_line: usize,
    body: &'a str,
}

fn decode<T: DeserializeOwned>(doc: &Document<'_>) -> Result<T, ManifestError> {
    serde_saphyr::from_str(doc.body).map_err(|_| {
        // Decode again with the document placed at its real position in the
        // text, so the parser's own location and message name the line the
        // user sees in their editor. Only paid on the error path.
        let padded: String = "\n".repeat(doc.first_line - 1) + doc.body;
        match serde_saphyr::from_str::<T>(&padded) {
            Ok(_) => ManifestError {
                line: doc.first_line,
                reason: "the document could not be decoded".into(),
            },
            Err(e) => {
                let line = e
                    .location()
                    .map(|l| l.line() as usize)
                    .filter(|l| *l > 0)
                    .unwrap_or(doc.first_line);
                let reason = e.without_snippet().to_string();
                ManifestError { line, reason }
            }
        }
    })
}

/// Splits a text at `---` separators (and `...` document ends), dropping
/// documents that hold only comments and blank lines.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let is_separator = trimmed == "---"
            || trimmed == "..."
            || trimmed.starts_with("--- #")
            || trimmed.starts_with("---\t");
        if is_separator {
            push_document(&mut docs, &text[start_byte..offset], start_line);
            start_byte = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    push_document(&mut docs, &text[start_byte..], start_line);
    docs
}

fn push_document<'a>(docs: &mut Vec<Document<'a>>, body: &'a str, first_line: usize) {
    let has_content = body.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
    });
    if has_content {
        docs.push(Document { first_line, body });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "\
# a comment before anything
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: demo
spec:
  nodeName: node-a
  containers:
  - name: app
    image: client
status:
  podIP: 10.0.0.5
---
# only a comment
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ignored
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
spec:
  action: DENY
  rules:
  - {}
...
";

    #[test]
    fn parses_multi_document_text() {
        let m = parse(CLUSTER).unwrap();
        let kinds: Vec<Kind> = m.objects.iter().map(Object::kind).collect();
        assert_eq!(
            kinds,
            [Kind::Namespace, Kind::Pod, Kind::AuthorizationPolicy]
        );
        assert_eq!(m.objects[0].key(), ObjectKey::cluster("demo"));
        assert_eq!(m.objects[1].key(), ObjectKey::new("demo", "client"));
        // No namespace: kubectl's default.
        assert_eq!(m.objects[2].key(), ObjectKey::new("default", "deny-all"));
        let Object::Pod(pod) = &m.objects[1] else {
            panic!("not a pod")
        };
        assert_eq!(
            pod.status.as_ref().unwrap().pod_ip.as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(
            m.ignored,
            [Ignored {
                line: 24,
                api_version: "apps/v1".into(),
                kind: "Deployment".into()
            }]
        );
    }

    #[test]
    fn errors_name_the_line_in_the_whole_text() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata:
  name: ok
---
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  containers: 12
";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, 11, "{err}");
        let syntax = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n";
        let err = parse(syntax).unwrap_err();
        assert!(err.line >= 4, "{err}");
    }

    #[test]
    fn older_api_versions_of_promoted_kinds_decode() {
        let m = parse(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: Gateway\nmetadata: {name: w, namespace: a}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: a}\nspec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        assert_eq!(m.objects.len(), 2);
    }

    #[test]
    fn rejects_documents_without_type_or_name() {
        let err = parse("---\nmetadata:\n  name: x\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.contains("apiVersion"), "{err}");
        let err = parse("apiVersion: v1\nkind: Service\nmetadata: {}\n").unwrap_err();
        assert!(err.reason.contains("metadata.name"), "{err}");
    }

    #[test]
    fn bytes_must_be_utf8() {
        let err =
            parse_bytes(b"apiVersion: v1\nkind: Namespace\nmetadata: {name: \xff}\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.reason.contains("UTF-8"), "{err}");
    }

    #[test]
    fn finds_yaml_files_recursively_skipping_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "b.yaml",
            "a/z.yml",
            "a/notes.txt",
            ".swp.yaml",
            "..data/x.yaml",
            "generated/status/AuthorizationPolicy/shop/p.yaml",
            "generated/w.yaml",
            "c.json",
        ] {
            let path = root.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        let (files, unreadable) = yaml_files(root);
        assert!(unreadable.is_empty());
        assert_eq!(
            files,
            [
                root.join("a/z.yml"),
                root.join("b.yaml"),
                root.join("generated/w.yaml")
            ]
        );
        let (files, unreadable) = yaml_files(&root.join("missing"));
        assert!(files.is_empty());
        assert_eq!(unreadable.len(), 1);
    }

    #[test]
    fn knows_kinds_by_group_and_version() {
        assert_eq!(Kind::from_type("v1", "Pod"), Some(Kind::Pod));
        assert_eq!(
            Kind::from_type("gateway.networking.k8s.io/v1", "HTTPRoute"),
            Some(Kind::HttpRoute)
        );
        assert_eq!(
            Kind::from_type("security.istio.io/v1beta1", "PeerAuthentication"),
            Some(Kind::PeerAuthentication)
        );
        assert_eq!(
            Kind::from_type("gateway.networking.k8s.io/v1beta1", "Gateway"),
            Some(Kind::Gateway)
        );
        assert_eq!(
            Kind::from_type("gateway.networking.k8s.io/v1", "GRPCRoute"),
            Some(Kind::GrpcRoute)
        );
        assert_eq!(Kind::from_type("apps/v1", "Pod"), None);
        assert_eq!(Kind::from_type("v2", "Pod"), None);
    }
}
