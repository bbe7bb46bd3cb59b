//! The cluster state: every object istiod-rs reads, typed and keyed, in one
//! store fed by either source (the Kubernetes API through [`kube`] watchers,
//! or a YAML directory through [`directory`]). Nothing downstream can tell
//! which source filled it.
//!
//! Each change bumps a generation counter on a watch channel; the pipeline
//! subscribes to it, debounces, and re-translates. A separate `synced` flag
//! turns true once the source has delivered its initial state of every kind,
//! which is when istiod-rs may call itself ready.

pub mod directory;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use api::crd::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, RequestAuthentication, ServiceEntry,
    VirtualService, WorkloadEntry,
};
use api::manifest::{FileContent, Kind, Object, ObjectKey};
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

/// Objects of one kind by key. Shared (`Arc`) so snapshots of the state and
/// the translation can hold them without copying.
pub type Objects<K> = BTreeMap<ObjectKey, Arc<K>>;

/// Everything istiod-rs knows about the cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub namespaces: Objects<Namespace>,
    pub nodes: Objects<Node>,
    pub service_accounts: Objects<ServiceAccount>,
    pub pods: Objects<Pod>,
    pub services: Objects<Service>,
    pub endpoint_slices: Objects<EndpointSlice>,
    pub gateways: Objects<Gateway>,
    pub http_routes: Objects<HttpRoute>,
    pub grpc_routes: Objects<GrpcRoute>,
    pub authorization_policies: Objects<AuthorizationPolicy>,
    pub peer_authentications: Objects<PeerAuthentication>,
    pub request_authentications: Objects<RequestAuthentication>,
    /// Not an object: the JWKS istiod-rs fetched for RequestAuthentications
    /// (`crate::jwks`), input of the translation like the objects.
    pub jwks: Arc<crate::jwks::JwksState>,
    pub destination_rules: Objects<DestinationRule>,
    pub virtual_services: Objects<VirtualService>,
    pub service_entries: Objects<ServiceEntry>,
    pub workload_entries: Objects<WorkloadEntry>,
}

impl ClusterState {
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut state = ClusterState::default();
        for o in objects {
            state.apply(o);
        }
        state
    }

    /// Replaces every object of `kind` (a watch's relist) with `objects`,
    /// which must all be of that kind.
    pub fn replace_kind(&mut self, kind: Kind, objects: impl IntoIterator<Item = Object>) {
        self.clear(kind);
        for o in objects {
            debug_assert_eq!(o.kind(), kind);
            self.apply(o);
        }
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces
            .get(&ObjectKey::cluster(name))
            .map(Arc::as_ref)
    }

    /// Whether a pod running as `namespace/service_account` is scheduled on
    /// `node` and not finished: the CA's test before it signs a certificate
    /// for a node agent impersonating that identity.
    pub fn has_pod_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        in_namespace(&self.pods, namespace).any(|pod| {
            let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
            on_node && pod_service_account(pod) == service_account && !pod_is_terminal(pod)
        })
    }
}

/// The field holding each kind: one list, from which the per-kind
/// operations are generated.
macro_rules! by_kind {
    ($($kind:ident => $field:ident),* $(,)?) => {
        impl ClusterState {
            /// Adds or replaces an object.
            pub fn apply(&mut self, object: Object) {
                let key = object.key();
                match object {
                    $(Object::$kind(o) => {
                        self.$field.insert(key, Arc::new(o));
                    })*
                }
            }

            /// Removes an object; true when it was there.
            pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> bool {
                match kind {
                    $(Kind::$kind => self.$field.remove(key).is_some(),)*
                }
            }

            /// How many objects of `kind` are held.
            pub fn count(&self, kind: Kind) -> usize {
                match kind {
                    $(Kind::$kind => self.$field.len(),)*
                }
            }

            /// Adds every object of `other`, sharing them (no copies).
            /// Objects already present are replaced, and reported.
            pub fn merge(&mut self, other: &ClusterState, mut replaced: impl FnMut(Kind, &ObjectKey)) {
                $(for (key, object) in &other.$field {
                    if self.$field.insert(key.clone(), object.clone()).is_some() {
                        replaced(Kind::$kind, key);
                    }
                })*
            }

            /// The object of `kind` named `key`, copied out.
            pub fn object(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
                match kind {
                    $(Kind::$kind => self.$field.get(key).map(|o| Object::$kind(o.as_ref().clone())),)*
                }
            }

            fn clear(&mut self, kind: Kind) {
                match kind {
                    $(Kind::$kind => self.$field.clear(),)*
                }
            }
        }
    };
}

by_kind!(
    Namespace => namespaces,
    Node => nodes,
    ServiceAccount => service_accounts,
    Pod => pods,
    Service => services,
    EndpointSlice => endpoint_slices,
    Gateway => gateways,
    HttpRoute => http_routes,
    GrpcRoute => grpc_routes,
    AuthorizationPolicy => authorization_policies,
    PeerAuthentication => peer_authentications,
    RequestAuthentication => request_authentications,
    DestinationRule => destination_rules,
    VirtualService => virtual_services,
    ServiceEntry => service_entries,
    WorkloadEntry => workload_entries,
);

/// A file's objects in local mode: what an object refused in a new version
/// of its file falls back to.
impl FileContent for ClusterState {
    fn last_good(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
        self.object(kind, key)
    }
}

/// The service account a pod runs as when it names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The service account a pod runs as.
pub fn pod_service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}

/// A pod that has finished (Succeeded or Failed) holds no workload.
pub fn pod_is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The objects of one namespace, in name order.
pub fn in_namespace<'a, K>(
    objects: &'a Objects<K>,
    namespace: &str,
) -> impl Iterator<Item = &'a Arc<K>> + 'a {
    let start = ObjectKey::new(namespace, "");
    let namespace = namespace.to_string();
    objects
        .range(start..)
        .take_while(move |(k, _)| k.namespace == namespace)
        .map(|(_, v)| v)
}

/// The one store of cluster state, shared by the source that writes it and
/// the pipeline (and CA) that read it.
///
/// Readers get the state as an `Arc` and hold no lock while they use it: a
/// translation that takes seconds never keeps the source from writing, nor
/// (through a writer waiting on it) the CA from reading. A write while a
/// reader holds the previous state copies the maps (of `Arc`s, not the
/// objects) once.
#[derive(Debug)]
pub struct Store {
    state: RwLock<Arc<ClusterState>>,
    generation: watch::Sender<u64>,
    synced: watch::Sender<bool>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            state: RwLock::default(),
            generation: watch::Sender::new(0),
            synced: watch::Sender::new(false),
        }
    }
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Store::default())
    }

    /// The state as it is now.
    pub fn read(&self) -> Arc<ClusterState> {
        // A writer that panicked left a state that is still a valid map of
        // objects; keep serving it rather than taking istiod-rs down.
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the state and tells subscribers.
    pub fn update<R>(&self, change: impl FnOnce(&mut ClusterState) -> R) -> R {
        let result = {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            change(Arc::make_mut(&mut state))
        };
        self.generation.send_modify(|g| *g += 1);
        result
    }

    /// Replaces the whole state (a directory source's rebuild) and tells
    /// subscribers; readers keep the state they hold, nothing is copied.
    /// The JWKS fetched are not the source's: they are kept.
    pub fn replace(&self, mut state: ClusterState) {
        let mut current = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.jwks = current.jwks.clone();
        *current = Arc::new(state);
        drop(current);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Ticks (the generation number) after every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Called by the source once the initial state of every kind is in.
    pub fn mark_synced(&self) {
        self.synced
            .send_if_modified(|s| !std::mem::replace(s, true));
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Turns true once, when the source has synced.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// See [`ClusterState::has_pod_on_node`].
    pub fn has_pod_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.read()
            .has_pod_on_node(namespace, service_account, node)
    }
}

/// The CA's pod -> node lookup is the cluster state itself.
impl crate::ca::impersonation::NodeLookup for Store {
    fn has_pod_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.read()
            .has_pod_on_node(namespace, service_account, node)
    }

    fn pod(&self, namespace: &str, name: &str) -> crate::ca::impersonation::PodLookup {
        use crate::ca::impersonation::{PodLookup, PodPlacement};
        // Read `synced` first: a pod missing from a state that was synced
        // when we looked is really missing.
        let synced = self.is_synced();
        match self.read().pods.get(&ObjectKey::new(namespace, name)) {
            Some(pod) => PodLookup::Found(PodPlacement {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                service_account: pod_service_account(pod).to_string(),
                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            }),
            None if synced => PodLookup::Missing,
            None => PodLookup::NotSynced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, sa: Option<&str>, node: &str, phase: &str) -> Object {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  nodeName: {node}\n{}  containers: []\nstatus:\n  phase: {phase}\n",
            sa.map(|s| format!("  serviceAccountName: {s}\n"))
                .unwrap_or_default()
        );
        api::manifest::parse(&yaml).unwrap().objects.remove(0)
    }

    #[test]
    fn finds_pods_by_identity_and_node() {
        let store = Store::new();
        store.update(|s| {
            s.apply(pod("shop", "web-1", Some("web"), "node-a", "Running"));
            s.apply(pod("shop", "db-1", None, "node-b", "Running"));
            s.apply(pod("shop", "job-1", Some("batch"), "node-a", "Succeeded"));
            s.apply(pod("shopping", "web-2", Some("web"), "node-c", "Running"));
        });
        assert!(store.has_pod_on_node("shop", "web", "node-a"));
        assert!(!store.has_pod_on_node("shop", "web", "node-b"));
        assert!(store.has_pod_on_node("shop", "default", "node-b"));
        // Finished pods need no certificates.
        assert!(!store.has_pod_on_node("shop", "batch", "node-a"));
        // Namespaces are matched exactly, not by prefix.
        assert!(!store.has_pod_on_node("shop", "web", "node-c"));
        assert!(store.has_pod_on_node("shopping", "web", "node-c"));
    }

    #[test]
    fn looks_up_a_pod_for_the_ca_once_synced() {
        use crate::ca::impersonation::{NodeLookup, PodLookup, PodPlacement};
        let store = Store::new();
        store.update(|s| {
            s.apply(pod(
                "istio-system",
                "ztunnel-1",
                Some("ztunnel"),
                "node-a",
                "Running",
            ))
        });
        // Before the source synced, absence proves nothing.
        assert_eq!(store.pod("istio-system", "ztunnel-2"), PodLookup::NotSynced);
        store.mark_synced();
        assert_eq!(store.pod("istio-system", "ztunnel-2"), PodLookup::Missing);
        assert_eq!(
            store.pod("istio-system", "ztunnel-1"),
            PodLookup::Found(PodPlacement {
                uid: String::new(),
                service_account: "ztunnel".into(),
                node: Some("node-a".into()),
            })
        );
    }

    #[test]
    fn changes_bump_the_generation_and_relists_replace_a_kind() {
        let store = Store::new();
        let mut changes = store.changes();
        store.update(|s| s.apply(pod("a", "p1", None, "n", "Running")));
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), 1);
        store.update(|s| {
            s.replace_kind(Kind::Pod, [pod("a", "p2", None, "n", "Running")]);
        });
        let state = store.read();
        assert_eq!(state.count(Kind::Pod), 1);
        assert!(state.pods.contains_key(&ObjectKey::new("a", "p2")));
        // A reader holding the state never holds writers back, and keeps
        // what it read.
        assert!(store.update(|s| s.delete(Kind::Pod, &ObjectKey::new("a", "p2"))));
        assert_eq!(store.generation(), 3);
        assert_eq!(state.count(Kind::Pod), 1);
        assert_eq!(store.read().count(Kind::Pod), 0);
    }

    #[test]
    fn synced_turns_true_once() {
        let store = Store::new();
        let synced = store.synced();
        assert!(!store.is_synced());
        store.mark_synced();
        store.mark_synced();
        assert!(*synced.borrow());
    }
}
