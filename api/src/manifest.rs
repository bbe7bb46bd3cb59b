//! Kubernetes manifests as a user would `kubectl apply` them: multi-document
//! YAML turned into the typed objects the mesh reads (namespaces, pods,
//! services, Gateway API, Istio security and networking resources).
//!
//! istiod-rs reads its whole cluster state this way in local mode
//! (`--config-dir`), and ztunnel-rs's node agent reads the same directory to
//! find its pods. Errors carry the line they were found on, so the caller can
//! report `file:line: reason`. Documents of kinds the mesh does not read are
//! returned as [`Ignored`] rather than failing the file; documents it would
//! read but cannot as written (a kind its group does not have, an apiVersion
//! its kind does not have, a field its schema does not have) are
//! [`Refused`], each on its own: the text's other documents still count.

use std::fmt;

mod dir;
mod strict;
#[cfg(feature = "testing")]
pub mod testing;
pub use dir::{
    DEFAULT_MAX_FILE_SIZE, DirScan, FileContent, FileProblem, FileReading, ManifestDir, Poller,
    ReadFiles, RegularFiles, yaml_files,
};

use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::crd::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, RequestAuthentication, ServiceEntry,
    VirtualService, WorkloadEntry,
};

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
    DestinationRule,
    VirtualService,
    ServiceEntry,
    WorkloadEntry,
}

impl Kind {
    pub const ALL: [Kind; 16] = [
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
        Kind::DestinationRule,
        Kind::VirtualService,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
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
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
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
            Kind::DestinationRule
            | Kind::VirtualService
            | Kind::ServiceEntry
            | Kind::WorkloadEntry => crate::crd::networking::GROUP,
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// The versions of its group the mesh decodes this kind from: those
    /// whose schema the typed objects have.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            // These were promoted to v1 unchanged; older manifests still
            // say v1beta1.
            Kind::AuthorizationPolicy
            | Kind::PeerAuthentication
            | Kind::RequestAuthentication
            | Kind::Gateway
            | Kind::HttpRoute => &["v1", "v1beta1"],
            // GRPCRoute went from v1alpha2 straight to v1.
            Kind::GrpcRoute => &["v1"],
            // Upstream serves all three with one schema.
            Kind::DestinationRule
            | Kind::VirtualService
            | Kind::ServiceEntry
            | Kind::WorkloadEntry => &crate::crd::networking::VERSIONS,
            _ => &["v1"],
        }
    }

    /// The `apiVersion`s the mesh reads this kind as, e.g. `security.istio.io/v1`.
    pub fn api_versions(self) -> Vec<String> {
        self.versions()
            .iter()
            .map(|v| match self.group() {
                "" => v.to_string(),
                group => format!("{group}/{v}"),
            })
            .collect()
    }

    /// The kind a document declares, when the mesh reads it. Only the API
    /// versions whose schema the typed objects decode are accepted.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        match DocumentType::of(api_version, kind) {
            DocumentType::Read(kind) => Some(kind),
            _ => None,
        }
    }
}

/// Every kind of the API groups the mesh reads from (Kubernetes 1.32+,
/// Gateway API 1.4, istio/api): a kind of one of these groups that is not
/// listed does not exist, so it is a typo rather than something to skip.
const GROUP_KINDS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "Binding",
            "ComponentStatus",
            "ConfigMap",
            "Endpoints",
            "Event",
            "LimitRange",
            "Namespace",
            "Node",
            "PersistentVolume",
            "PersistentVolumeClaim",
            "Pod",
            "PodTemplate",
            "ReplicationController",
            "ResourceQuota",
            "Secret",
            "Service",
            "ServiceAccount",
        ],
    ),
    ("discovery.k8s.io", &["EndpointSlice"]),
    (
        "gateway.networking.k8s.io",
        &[
            "BackendTLSPolicy",
            "GRPCRoute",
            "Gateway",
            "GatewayClass",
            "HTTPRoute",
            "ListenerSet",
            "ReferenceGrant",
            "TCPRoute",
            "TLSRoute",
            "UDPRoute",
        ],
    ),
    (
        crate::crd::GROUP,
        &[
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RequestAuthentication",
        ],
    ),
    (
        // Istio's own `Gateway` is one of these, not the Gateway API's.
        crate::crd::networking::GROUP,
        &[
            "DestinationRule",
            "EnvoyFilter",
            "Gateway",
            "ProxyConfig",
            "ServiceEntry",
            "Sidecar",
            "VirtualService",
            "WorkloadEntry",
            "WorkloadGroup",
        ],
    ),
];

/// What a document's `apiVersion` and `kind` make of it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DocumentType {
    /// A kind the mesh reads, in a version it decodes.
    Read(Kind),
    /// A kind the mesh does not read: skipped.
    Other,
    /// `kind` is no kind of a group the mesh reads from.
    UnknownKind,
    /// A kind the mesh reads, in an `apiVersion` it does not read it as.
    UnknownApiVersion(Kind),
}

impl DocumentType {
    fn of(api_version: &str, kind: &str) -> DocumentType {
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let same_name = Kind::ALL.into_iter().find(|k| k.as_str() == kind);
        if let Some(read) = same_name.filter(|k| k.group() == group) {
            return if read.versions().contains(&version) {
                DocumentType::Read(read)
            } else {
                DocumentType::UnknownApiVersion(read)
            };
        }
        match GROUP_KINDS.iter().find(|(g, _)| *g == group) {
            Some((_, kinds)) if kinds.contains(&kind) => DocumentType::Other,
            Some(_) => DocumentType::UnknownKind,
            None => match same_name {
                Some(read) => DocumentType::UnknownApiVersion(read),
                None => DocumentType::Other,
            },
        }
    }
}

/// The kinds the mesh reads from `group`.
pub fn kinds_read_from(group: &str) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| k.group() == group)
        .collect()
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

        /// The object, and the fields its kind does not have.
        fn decode_object(
            doc: &Document<'_>,
            kind: Kind,
        ) -> Result<(Object, Vec<strict::FieldPath>), ManifestError> {
            Ok(match kind {
                $(Kind::$kind => {
                    let (object, unknown) = decode_strict(doc)?;
                    (Object::$kind(object), unknown)
                })*
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
    DestinationRule(DestinationRule),
    VirtualService(VirtualService),
    ServiceEntry(ServiceEntry),
    WorkloadEntry(WorkloadEntry),
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

/// A document the mesh would read but cannot as written. The text's other
/// documents are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `kind` is no kind of `api_version`'s group, one the mesh reads from
    /// (a typo such as `AuthorizationPolcy`).
    UnknownKind {
        line: usize,
        api_version: String,
        kind: String,
    },
    /// A kind the mesh reads, declared with an `apiVersion` it does not
    /// read that kind as.
    UnknownApiVersion {
        line: usize,
        api_version: String,
        kind: Kind,
    },
    /// An object with fields its kind does not have (`rule:` for
    /// `rules:`): refused whole, as strict field validation refuses it.
    UnknownFields {
        /// Of the first unknown field when it can be found, else of the
        /// document.
        line: usize,
        kind: Kind,
        key: ObjectKey,
        /// Paths such as `spec.rule`.
        fields: Vec<String>,
        /// How many of the text's objects come before it: where its last
        /// good version, if the caller has one, goes back in.
        position: usize,
    },
}

/// What one YAML text holds.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    pub objects: Vec<Object>,
    pub ignored: Vec<Ignored>,
    pub refused: Vec<Refused>,
}

/// Why a manifest could not be read. `line` is 1-based and counts from the
/// start of the whole text, not of the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ManifestError {
    pub line: usize,
    pub reason: String,
}

/// Parses every document of a (multi-document) YAML text. A document that
/// is not YAML, or does not decode as its kind, fails the whole text: a
/// half-read file would silently drop objects, which is worse than keeping
/// its last good version. Documents of unknown kinds or with unknown fields
/// are [`Refused`] one by one.
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
        let line = doc.first_line;
        let known = match DocumentType::of(&api_version, &kind) {
            DocumentType::Read(known) => known,
            DocumentType::Other => {
                manifest.ignored.push(Ignored {
                    line,
                    api_version,
                    kind,
                });
                continue;
            }
            DocumentType::UnknownKind => {
                manifest.refused.push(Refused::UnknownKind {
                    line,
                    api_version,
                    kind,
                });
                continue;
            }
            DocumentType::UnknownApiVersion(kind) => {
                manifest.refused.push(Refused::UnknownApiVersion {
                    line,
                    api_version,
                    kind,
                });
                continue;
            }
        };
        let (mut object, unknown) = decode_object(&doc, known)?;
        let meta = object.metadata_mut();
        if meta.name.as_deref().unwrap_or_default().is_empty() {
            return Err(ManifestError {
                line,
                reason: format!("{kind} has no metadata.name; give the object a name"),
            });
        }
        if known.namespaced() && meta.namespace.as_deref().unwrap_or_default().is_empty() {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
        }
        if let Some(first) = unknown.first() {
            manifest.refused.push(Refused::UnknownFields {
                line: strict::line_of(doc.body, first).map_or(line, |l| line + l),
                kind: known,
                key: object.key(),
                fields: unknown.iter().map(ToString::to_string).collect(),
                position: manifest.objects.len(),
            });
            continue;
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

/// One document of a multi-document text.
#[derive(Clone, Copy, Debug)]
pub struct Document<'a> {
    /// Line (1-based) of the document's first line within the whole text.
    pub first_line: usize,
    pub body: &'a str,
}

/// The documents of a multi-document text, as [`parse`] splits it: at `---`
/// separators, without documents of only comments and blank lines. For
/// callers that decode kinds the mesh does not read itself (istioctl-rs's
/// install manifests) with [`decode_document`].
pub fn documents(text: &str) -> Vec<Document<'_>> {
    split_documents(text)
}

/// A field a document has and its type does not, found by
/// [`decode_document`]: its path (`spec.template.spec.containers[0].imagee`)
/// and the line (1-based, in the whole text) it is on, when it can be found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownField {
    pub path: String,
    pub line: usize,
}

/// Decodes one document as `T` with strict field validation, as [`parse`]
/// does for the kinds the mesh reads: `T` is the schema, and every field it
/// does not have is returned (apart from `apiVersion` and `kind`). A
/// document that does not decode at all is an error at its line.
pub fn decode_document<T: DeserializeOwned>(
    doc: &Document<'_>,
) -> Result<(T, Vec<UnknownField>), ManifestError> {
    let (value, unknown) = decode_strict::<T>(doc)?;
    let unknown = unknown
        .iter()
        .map(|path| UnknownField {
            path: path.to_string(),
            line: strict::line_of(doc.body, path).map_or(doc.first_line, |l| doc.first_line + l),
        })
        .collect();
    Ok((value, unknown))
}

fn decode<T: DeserializeOwned>(doc: &Document<'_>) -> Result<T, ManifestError> {
    serde_saphyr::from_str(doc.body).map_err(|_| located_error::<T>(doc))
}

/// [`decode`], also returning the fields `T` does not have.
fn decode_strict<T: DeserializeOwned>(
    doc: &Document<'_>,
) -> Result<(T, Vec<strict::FieldPath>), ManifestError> {
    strict::decode(doc.body).map_err(|_| located_error::<T>(doc))
}

/// Why `doc` does not decode as `T`, at the line the user sees in their
/// editor: decoded again with the document placed at its real position in
/// the text, so the parser's own location and message name it. Only paid
/// on the error path.
fn located_error<T: DeserializeOwned>(doc: &Document<'_>) -> ManifestError {
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

    /// Upstream's examples as written (istio.io traffic-management docs),
    /// in each version upstream serves: every field the mesh does not
    /// honour is still read, so it can be reported rather than refused.
    const NETWORKING: &str = "\
apiVersion: networking.istio.io/VERSION
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  exportTo: [\".\"]
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: user, ttl: 0s}
      localityLbSetting: {enabled: true}
      warmupDurationSecs: 10s
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s}}
      http: {http2MaxRequests: 1000, maxRequestsPerConnection: 10, h2UpgradePolicy: UPGRADE}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m}
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/VERSION
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /api}
      ignoreUriCase: true
      withoutHeaders: {x-canary: {}}
    fault:
      delay: {percentage: {value: 0.1}, fixedDelay: 5s}
      abort: {percentage: {value: 10}, httpStatus: 400}
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      weight: 75
      headers: {response: {remove: [foo]}}
    - destination: {host: reviews, subset: v1}
      weight: 25
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,connect-failure\"}
    timeout: 10s
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 50.0}
    corsPolicy: {allowOrigins: [{exact: https://example.com}]}
    headers: {request: {set: {x-a: b}, add: {x-c: d}, remove: [x-e]}}
  - match: [{uri: {regex: \"^/old/.*\"}}]
    rewrite: {uriRegexRewrite: {match: ^/old/(.*), rewrite: /new/\\1}, authority: new}
    redirect: {uri: /x, redirectCode: 301}
    directResponse: {status: 503, body: {string: unavailable}}
";

    #[test]
    fn networking_kinds_decode_in_every_upstream_version() {
        for version in ["v1", "v1beta1", "v1alpha3"] {
            let m = parse(&NETWORKING.replace("VERSION", version)).unwrap();
            assert!(m.refused.is_empty(), "{version}: {:?}", m.refused);
            let [Object::DestinationRule(dr), Object::VirtualService(vs)] = &m.objects[..] else {
                panic!("{version}: {:?}", m.objects)
            };
            assert_eq!(dr.spec.host, "reviews.shop.svc.cluster.local");
            let policy = dr.spec.traffic_policy.as_ref().unwrap();
            let outlier = policy.outlier_detection.as_ref().unwrap();
            assert_eq!(outlier.consecutive_5xx_errors, Some(7));
            assert_eq!(
                policy.tls,
                Some(serde_json::json!({"mode": "ISTIO_MUTUAL"}))
            );
            assert_eq!(
                policy.port_level_settings[0].port.as_ref().unwrap().number,
                80
            );
            assert_eq!(dr.spec.subsets[0].labels["version"], "v1");
            let route = &vs.spec.http[0];
            assert_eq!(
                route.matches[0].headers["end-user"].exact.as_deref(),
                Some("jason")
            );
            assert_eq!(
                route.matches[0].without_headers["x-canary"],
                Default::default()
            );
            assert_eq!(route.route[0].weight, Some(75));
            assert_eq!(route.retries.as_ref().unwrap().attempts, 3);
            let fault = route.fault.as_ref().unwrap();
            assert_eq!(fault.abort.as_ref().unwrap().http_status, Some(400));
            let rewrite = vs.spec.http[1].rewrite.as_ref().unwrap();
            assert_eq!(
                rewrite.uri_regex_rewrite.as_ref().unwrap().pattern,
                "^/old/(.*)"
            );
        }
        let m = parse(&NETWORKING.replace("VERSION", "v1alpha1")).unwrap();
        assert!(m.objects.is_empty());
        assert!(matches!(
            &m.refused[..],
            [
                Refused::UnknownApiVersion {
                    kind: Kind::DestinationRule,
                    ..
                },
                Refused::UnknownApiVersion {
                    kind: Kind::VirtualService,
                    ..
                },
            ]
        ));
    }

    #[test]
    fn networking_typos_are_refused_with_their_paths_and_lines() {
        let text = NETWORKING
            .replace("VERSION", "v1")
            .replace("maxRequestsPerConnection", "maxRequestPerConnection")
            .replace("ignoreUriCase", "ignoreURICase");
        let m = parse(&text).unwrap();
        assert!(m.objects.is_empty());
        let refused: Vec<(Kind, Vec<String>, usize)> = m
            .refused
            .iter()
            .map(|r| match r {
                Refused::UnknownFields {
                    kind, fields, line, ..
                } => (*kind, fields.clone(), *line),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            refused,
            [
                (
                    Kind::DestinationRule,
                    vec![
                        "spec.trafficPolicy.connectionPool.http.maxRequestPerConnection"
                            .to_string()
                    ],
                    15
                ),
                (
                    Kind::VirtualService,
                    vec!["spec.http[0].match[0].ignoreURICase".to_string()],
                    36
                ),
            ]
        );
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

    #[test]
    fn tells_typos_from_kinds_the_mesh_does_not_read() {
        let of = DocumentType::of;
        assert_eq!(of("v1", "ConfigMap"), DocumentType::Other);
        assert_eq!(of("apps/v1", "Deployment"), DocumentType::Other);
        assert_eq!(
            of("gateway.networking.k8s.io/v1", "GatewayClass"),
            DocumentType::Other
        );
        // Istio's own Gateway is another kind.
        assert_eq!(of("networking.istio.io/v1", "Gateway"), DocumentType::Other);
        assert_eq!(of("networking.istio.io/v1", "Sidecar"), DocumentType::Other);
        assert_eq!(
            of("networking.istio.io/v1beta1", "ServiceEntry"),
            DocumentType::Read(Kind::ServiceEntry)
        );
        assert_eq!(
            of("networking.istio.io/v1", "VirtualServce"),
            DocumentType::UnknownKind
        );
        assert_eq!(
            of("networking.istio.io/v2", "DestinationRule"),
            DocumentType::UnknownApiVersion(Kind::DestinationRule)
        );
        assert_eq!(of("v1", "Servce"), DocumentType::UnknownKind);
        assert_eq!(
            of("security.istio.io/v1", "AuthorizationPolcy"),
            DocumentType::UnknownKind
        );
        assert_eq!(
            of("gateway.networking.k8s.io/v1alpha2", "GRPCRoute"),
            DocumentType::UnknownApiVersion(Kind::GrpcRoute)
        );
        assert_eq!(
            of("security.istio/v1", "PeerAuthentication"),
            DocumentType::UnknownApiVersion(Kind::PeerAuthentication)
        );
        assert_eq!(of("v2", "Pod"), DocumentType::UnknownApiVersion(Kind::Pod));
    }

    #[test]
    fn documents_of_other_kinds_decode_strictly_with_lines() {
        use k8s_openapi::api::apps::v1::Deployment;
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
# the deployment
apiVersion: apps/v1
kind: Deployment
metadata:
  name: d
spec:
  selector: {matchLabels: {app: d}}
  template:
    metadata: {labels: {app: d}}
    spec:
      containers:
      - name: c
        imagee: x
";
        let docs = documents(text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].first_line, 5);
        let (deployment, unknown) = decode_document::<Deployment>(&docs[1]).unwrap();
        assert_eq!(deployment.metadata.name.as_deref(), Some("d"));
        assert_eq!(
            unknown,
            [UnknownField {
                path: "spec.template.spec.containers[0].imagee".into(),
                line: 17
            }]
        );
        let err = decode_document::<Deployment>(&Document {
            first_line: 3,
            body: "spec: {replicas: many}\n",
        })
        .unwrap_err();
        assert_eq!(err.line, 3, "{err}");
    }

    /// One object of every kind, each with a field its kind does not have.
    const EVERY_KIND: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: a, labelz: {}}
---
apiVersion: v1
kind: Node
metadata: {name: n}
spec: {podCIDRz: x}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: s, namespace: a}
secretz: []
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a}
spec:
  containers:
  - name: app
    imagee: app
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: a}
spec: {ports: [{port: 80, targetPrt: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: e, namespace: a}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1], ready: true}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: w, namespace: a}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, hostnme: x}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: a}
spec: {parentRefs: [{name: s, kind: Service, group: \"\"}], rule: []}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: a}
spec: {parentRef: []}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: a}
spec: {rule: []}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: a}
spec: {mtls: {mod: STRICT}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: r, namespace: a}
spec: {jwtRules: [{issuer: i, jwksUrl: x}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d, namespace: a}
spec:
  host: s
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderNam: x}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: a}
spec:
  hosts: [s]
  http: [{route: [{destination: {host: s}, wieght: 10}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: e, namespace: a}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS, targetPrt: 8443}]
  workloadSelector: {matchLabels: {app: x}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: w, namespace: a}
spec: {address: 10.0.0.1, ports: {https: 8443}, serviceAcount: vm}
";

    #[test]
    fn unknown_fields_of_every_kind_are_refused_by_path() {
        let m = parse(EVERY_KIND).unwrap();
        assert!(m.objects.is_empty(), "{:?}", m.objects);
        let refused: Vec<(Kind, String)> = m
            .refused
            .iter()
            .map(|r| match r {
                Refused::UnknownFields { kind, fields, .. } => (*kind, fields.join(",")),
                other => panic!("{other:?}"),
            })
            .collect();
        let expected = [
            (Kind::Namespace, "metadata.labelz"),
            (Kind::Node, "spec.podCIDRz"),
            (Kind::ServiceAccount, "secretz"),
            (Kind::Pod, "spec.containers[0].imagee"),
            (Kind::Service, "spec.ports[0].targetPrt"),
            (Kind::EndpointSlice, "endpoints[0].ready"),
            (Kind::Gateway, "spec.listeners[0].hostnme"),
            (Kind::HttpRoute, "spec.rule"),
            (Kind::GrpcRoute, "spec.parentRef"),
            (Kind::AuthorizationPolicy, "spec.rule"),
            (Kind::PeerAuthentication, "spec.mtls.mod"),
            (Kind::RequestAuthentication, "spec.jwtRules[0].jwksUrl"),
            (
                Kind::DestinationRule,
                "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderNam",
            ),
            (Kind::VirtualService, "spec.http[0].route[0].wieght"),
            (
                Kind::ServiceEntry,
                "spec.ports[0].targetPrt,spec.workloadSelector.matchLabels",
            ),
            (Kind::WorkloadEntry, "spec.serviceAcount"),
        ];
        let expected: Vec<(Kind, String)> =
            expected.iter().map(|(k, f)| (*k, f.to_string())).collect();
        assert_eq!(refused, expected);

        // Without the typos, every object is read: `apiVersion` and `kind`
        // are never unknown fields.
        let fixed = EVERY_KIND
            .replace(", labelz: {}", "")
            .replace("{podCIDRz: x}", "{}")
            .replace("secretz: []\n", "")
            .replace("imagee", "image")
            .replace("targetPrt", "targetPort")
            .replace(", ready: true", "")
            .replace(", hostnme: x", "")
            .replace(", rule: []", "")
            .replace("{parentRef: []}", "{}")
            .replace("{rule: []}", "{}")
            .replace("mod:", "mode:")
            .replace("jwksUrl", "jwksUri")
            .replace("httpHeaderNam:", "httpHeaderName:")
            .replace("wieght", "weight")
            .replace("{matchLabels:", "{labels:")
            .replace("serviceAcount", "serviceAccount");
        let m = parse(&fixed).unwrap();
        assert!(m.refused.is_empty(), "{:?}", m.refused);
        assert_eq!(m.objects.len(), Kind::ALL.len());
    }
}
