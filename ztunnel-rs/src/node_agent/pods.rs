//! Where the node agent learns pods' and namespaces' labels.
//!
//! A [`PodSource`] feeds [`PodEvent`]s into the agent. Sources: the Kubernetes
//! API ([`kube::KubePodSource`]: pods on this node and all namespaces), the
//! local mode's config directory ([`directory::DirectoryPodSource`]: the
//! same YAML files istiod-rs reads), and an in-memory source driven by its
//! owner ([`MemoryPodSource`], for tests and embedding).

pub mod directory;
pub mod kube;

use std::future::Future;

use tokio::sync::mpsc;

use super::enrolment::{NamespaceMeta, PodKey, PodMeta};

/// Errors of a pod source.
#[derive(Debug, thiserror::Error)]
pub enum PodSourceError {
    #[error("the node agent stopped listening to its pod source")]
    AgentGone,
    #[error("the thread reading the config directory stopped: {0}")]
    DirectoryReader(String),
    #[error("watching {kind} failed: {source}")]
    Watch {
        kind: &'static str,
        source: ::kube::runtime::watcher::Error,
    },
}

/// A change in what the source knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEvent {
    /// A pod appeared or changed.
    Pod(PodMeta),
    PodDeleted(PodKey),
    /// The source (re)listed all pods: any pod not named here is gone.
    PodsListed(Vec<PodKey>),
    Namespace(NamespaceMeta),
    NamespaceDeleted(String),
    /// The source (re)listed all namespaces: any other is gone.
    NamespacesListed(Vec<String>),
}

/// Feeds the agent until the source ends (or fails).
pub trait PodSource: Send + 'static {
    fn run(
        self,
        events: mpsc::Sender<PodEvent>,
    ) -> impl Future<Output = Result<(), PodSourceError>> + Send;
}

/// A source whose events come from its owner through a channel.
#[derive(Debug)]
pub struct MemoryPodSource {
    rx: mpsc::Receiver<PodEvent>,
}

impl MemoryPodSource {
    /// The source, and the sender its owner drives it with.
    pub fn new() -> (Self, mpsc::Sender<PodEvent>) {
        let (tx, rx) = mpsc::channel(64);
        (MemoryPodSource { rx }, tx)
    }
}

impl PodSource for MemoryPodSource {
    async fn run(mut self, events: mpsc::Sender<PodEvent>) -> Result<(), PodSourceError> {
        while let Some(event) = self.rx.recv().await {
            events
                .send(event)
                .await
                .map_err(|_| PodSourceError::AgentGone)?;
        }
        Ok(())
    }
}
