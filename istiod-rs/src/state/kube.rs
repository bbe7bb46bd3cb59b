//! The Kubernetes source: one kube-runtime watcher per kind, all feeding the
//! [`Store`]. A watcher lists, then watches; on an error it backs off
//! (kube-runtime's default backoff) and resumes or relists. The store is
//! marked synced once the initial list of **every** kind has arrived.
//!
//! A kind whose CRD is not installed (the list answers 404) counts as
//! listed and empty, so a cluster without the Gateway API or Istio CRDs still
//! syncs; its watcher keeps retrying in the background.
//!
//! Objects are stored without `managedFields` and the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation: nothing
//! reads them and they are most of a pod's size.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use api::crd::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, RequestAuthentication, ServiceEntry,
    VirtualService, WorkloadEntry,
};
use api::manifest::{Kind, Object};
use futures::{StreamExt, TryStreamExt};
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::{ClusterState, Store};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Tracks which kinds have delivered their initial list.
#[derive(Debug)]
struct SyncTracker {
    store: Arc<Store>,
    done: Mutex<BTreeSet<Kind>>,
}

impl SyncTracker {
    /// Records that `kind` has delivered its initial list; true the first time.
    fn listed(&self, kind: Kind) -> bool {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let first = done.insert(kind);
        if first {
            debug!(%kind, synced = done.len(), of = Kind::ALL.len(), "initial list received");
            if done.len() == Kind::ALL.len() {
                info!("initial state of every kind received from the Kubernetes API");
                self.store.mark_synced();
            }
        }
        first
    }
}

/// Watches every kind the mesh reads until the process ends. Spawns one
/// task per kind and returns their handles.
pub fn spawn(client: Client, store: Arc<Store>) -> Vec<tokio::task::JoinHandle<()>> {
    let tracker = Arc::new(SyncTracker {
        store,
        done: Mutex::new(BTreeSet::new()),
    });
    Kind::ALL
        .into_iter()
        .map(|kind| {
            let client = client.clone();
            let tracker = tracker.clone();
            tokio::spawn(async move {
                match kind {
                    Kind::Namespace => watch::<Namespace>(client, kind, tracker).await,
                    Kind::Node => watch::<Node>(client, kind, tracker).await,
                    Kind::ServiceAccount => watch::<ServiceAccount>(client, kind, tracker).await,
                    Kind::Pod => watch::<Pod>(client, kind, tracker).await,
                    Kind::Service => watch::<Service>(client, kind, tracker).await,
                    Kind::EndpointSlice => watch::<EndpointSlice>(client, kind, tracker).await,
                    Kind::Gateway => watch::<Gateway>(client, kind, tracker).await,
                    Kind::HttpRoute => watch::<HttpRoute>(client, kind, tracker).await,
                    Kind::GrpcRoute => watch::<GrpcRoute>(client, kind, tracker).await,
                    Kind::AuthorizationPolicy => {
                        watch::<AuthorizationPolicy>(client, kind, tracker).await
                    }
                    Kind::PeerAuthentication => {
                        watch::<PeerAuthentication>(client, kind, tracker).await
                    }
                    Kind::RequestAuthentication => {
                        watch::<RequestAuthentication>(client, kind, tracker).await
                    }
                    Kind::DestinationRule => watch::<DestinationRule>(client, kind, tracker).await,
                    Kind::VirtualService => watch::<VirtualService>(client, kind, tracker).await,
                    Kind::ServiceEntry => watch::<ServiceEntry>(client, kind, tracker).await,
                    Kind::WorkloadEntry => watch::<WorkloadEntry>(client, kind, tracker).await,
                }
            })
        })
        .collect()
}

async fn watch<K>(client: Client, kind: Kind, tracker: Arc<SyncTracker>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Object: From<K>,
{
    let api: Api<K> = Api::all(client);
    let store = tracker.store.clone();
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map_ok(|e| e.modify(slim))
        .boxed();
    // Objects of a relist, replacing the kind's objects at once when the list
    // is complete, so a relist never shows a half-empty cluster.
    let mut relist: Vec<Object> = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(o)) => relist.push(o.into()),
            Ok(Event::InitDone) => {
                let objects = std::mem::take(&mut relist);
                store.update(|s| s.replace_kind(kind, objects));
                tracker.listed(kind);
            }
            Ok(Event::Apply(o)) => store.update(|s| s.apply(o.into())),
            Ok(Event::Delete(o)) => {
                let key = Object::from(o).key();
                store.update(|s| s.delete(kind, &key));
            }
            Err(watcher::Error::InitialListFailed(e)) if is_not_found(&e) => {
                // The kind's CRD is not installed (Gateway API, Istio
                // security): there are none of them. Count the kind as
                // listed so istiod-rs can become ready; the watcher keeps
                // retrying and picks the objects up once the CRD appears.
                // Said once: the watcher retries with backoff for as long
                // as the CRD is missing (a cluster without the Gateway API).
                if tracker.listed(kind) {
                    info!(%kind, "the API server does not serve this kind (CRD not installed?); treating it as empty until it does");
                } else {
                    debug!(%kind, "the API server still does not serve this kind");
                }
            }
            Err(e) => warn!(%kind, error = %e, "watch failed; retrying with backoff"),
        }
    }
}

/// Whether the API server answered 404. A kind whose group is not served
/// at all (no Gateway API CRD installed) gets a plain-text `404 page not
/// found`, which kube-rs turns into a Status without the `NotFound`
/// reason, so the code decides.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_not_found() || status.code == 404)
}

fn slim<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// The whole state at once, by one list of every kind the mesh reads (no
/// watch): what `istioctl-rs analyze` reads of a live cluster. A kind whose
/// CRD is not installed is empty, as for the watchers. Errors name the kind.
pub async fn list(client: Client) -> Result<ClusterState, ListError> {
    let mut state = ClusterState::default();
    for kind in Kind::ALL {
        let objects = match kind {
            Kind::Namespace => list_kind::<Namespace>(&client, kind).await?,
            Kind::Node => list_kind::<Node>(&client, kind).await?,
            Kind::ServiceAccount => list_kind::<ServiceAccount>(&client, kind).await?,
            Kind::Pod => list_kind::<Pod>(&client, kind).await?,
            Kind::Service => list_kind::<Service>(&client, kind).await?,
            Kind::EndpointSlice => list_kind::<EndpointSlice>(&client, kind).await?,
            Kind::Gateway => list_kind::<Gateway>(&client, kind).await?,
            Kind::HttpRoute => list_kind::<HttpRoute>(&client, kind).await?,
            Kind::GrpcRoute => list_kind::<GrpcRoute>(&client, kind).await?,
            Kind::AuthorizationPolicy => list_kind::<AuthorizationPolicy>(&client, kind).await?,
            Kind::PeerAuthentication => list_kind::<PeerAuthentication>(&client, kind).await?,
            Kind::RequestAuthentication => {
                list_kind::<RequestAuthentication>(&client, kind).await?
            }
            Kind::DestinationRule => list_kind::<DestinationRule>(&client, kind).await?,
            Kind::VirtualService => list_kind::<VirtualService>(&client, kind).await?,
            Kind::ServiceEntry => list_kind::<ServiceEntry>(&client, kind).await?,
            Kind::WorkloadEntry => list_kind::<WorkloadEntry>(&client, kind).await?,
        };
        state.replace_kind(kind, objects);
    }
    Ok(state)
}

/// A list of one kind that failed.
#[derive(Debug, thiserror::Error)]
// The kube::Error is in the message, not a source: `{:#}` would print it twice.
#[error("listing {kind} in all namespaces: {error}")]
pub struct ListError {
    pub kind: Kind,
    pub error: kube::Error,
}

async fn list_kind<K>(client: &Client, kind: Kind) -> Result<Vec<Object>, ListError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    Object: From<K>,
{
    let api: Api<K> = Api::all(client.clone());
    match api.list(&kube::api::ListParams::default()).await {
        Ok(list) => Ok(list
            .items
            .into_iter()
            .map(|mut o| {
                slim(&mut o);
                o.into()
            })
            .collect()),
        Err(e) if is_not_found(&e) => Ok(Vec::new()),
        Err(error) => Err(ListError { kind, error }),
    }
}
