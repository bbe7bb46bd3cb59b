//! Pods and namespaces from the Kubernetes API: a watch of the pods scheduled
//! on this node (field selector `spec.nodeName`) and of all namespaces.

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use super::{PodEvent, PodSource, PodSourceError};
use crate::node_agent::enrolment::{NamespaceMeta, PodMeta};

/// Watches the API server for the pods of one node.
#[derive(Clone)]
pub struct KubePodSource {
    client: Client,
    node_name: String,
}

impl std::fmt::Debug for KubePodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KubePodSource(node {})", self.node_name)
    }
}

impl KubePodSource {
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        KubePodSource {
            client,
            node_name: node_name.into(),
        }
    }
}

impl PodSource for KubePodSource {
    async fn run(self, events: mpsc::Sender<PodEvent>) -> Result<(), PodSourceError> {
        let pods = watcher::watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name)),
        )
        .default_backoff();
        let namespaces = watcher::watcher(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        tokio::try_join!(
            forward(
                pods,
                "pods",
                &events,
                pod_meta,
                PodEvent::Pod,
                |m| { PodEvent::PodDeleted(m.key()) },
                |all| PodEvent::PodsListed(all.iter().map(PodMeta::key).collect())
            ),
            forward(
                namespaces,
                "namespaces",
                &events,
                namespace_meta,
                PodEvent::Namespace,
                |n| { PodEvent::NamespaceDeleted(n.name) },
                |all| PodEvent::NamespacesListed(all.iter().map(|n| n.name.clone()).collect())
            ),
        )?;
        Ok(())
    }
}

/// Turns a watch into agent events; a relist is buffered until complete and
/// then reported as a whole, so objects deleted while the watch was down are
/// noticed.
async fn forward<K, M>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    kind: &'static str,
    events: &mpsc::Sender<PodEvent>,
    to_meta: impl Fn(K) -> M,
    applied: impl Fn(M) -> PodEvent,
    deleted: impl Fn(M) -> PodEvent,
    listed: impl Fn(&[M]) -> PodEvent,
) -> Result<(), PodSourceError>
where
    M: Clone,
{
    let send = |event| async move {
        events
            .send(event)
            .await
            .map_err(|_| PodSourceError::AgentGone)
    };
    let mut relisting: Vec<M> = Vec::new();
    let mut stream =
        std::pin::pin!(stream.map_err(|source| PodSourceError::Watch { kind, source }));
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(obj)) => send(applied(to_meta(obj))).await?,
            Ok(Event::Delete(obj)) => send(deleted(to_meta(obj))).await?,
            Ok(Event::Init) => relisting.clear(),
            Ok(Event::InitApply(obj)) => relisting.push(to_meta(obj)),
            Ok(Event::InitDone) => {
                for meta in relisting.iter().cloned() {
                    send(applied(meta)).await?;
                }
                send(listed(&relisting)).await?;
                relisting.clear();
            }
            // The watcher retries on its own (with backoff); keep going.
            Err(e) => tracing::warn!(error = %e, "watch error"),
        }
    }
    Ok(())
}

/// What the agent needs of a Pod object. An address that does not parse is
/// left out (with a warning): the pod is still known, only not recognisable
/// by that address.
pub fn pod_meta(pod: Pod) -> PodMeta {
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let listed: Vec<String> = match status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.into_iter().map(|p| p.ip).collect(),
        _ => status.pod_ip.into_iter().collect(),
    };
    let ips = listed
        .iter()
        .filter_map(|ip| match ip.parse() {
            Ok(ip) => Some(ip),
            Err(e) => {
                tracing::warn!(
                    pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.name.as_deref().unwrap_or_default()),
                    field = "status.podIPs",
                    value = %ip,
                    error = %e,
                    "ignoring a pod address that is not an IP address"
                );
                None
            }
        })
        .collect();
    PodMeta {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".to_string()),
        labels: pod.metadata.labels.unwrap_or_default(),
        annotations: pod.metadata.annotations.unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
        ips,
    }
}

/// What the agent needs of a Namespace object.
pub fn namespace_meta(ns: Namespace) -> NamespaceMeta {
    NamespaceMeta {
        name: ns.name_any(),
        labels: ns.metadata.labels.unwrap_or_default(),
    }
}
