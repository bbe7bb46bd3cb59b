//! The delta xDS client: one `DeltaAggregatedResources` stream to istiod-rs,
//! wildcard subscriptions to the types it has handlers for, ACK/NACK per
//! response, and reconnection with jittered exponential backoff that resumes
//! from what the proxy already holds (`initial_resource_versions`).
//!
//! The client knows nothing about the data model: each resource type has a
//! [`Handler`] that takes a batch of decoded resources and applies the valid
//! ones; [`handlers`] joins the workload store to it. A resource the handler
//! rejects is NACKed by name without disturbing the rest of its response, and
//! the proxy keeps serving the last good state while istiod-rs is away.

mod client;
pub mod handlers;
mod status;

use std::net::IpAddr;

pub use client::{MAX_ON_DEMAND_NAMES, MetadataFn, OnDemand, XdsClient, XdsConfig, XdsMetrics};
pub use status::{ConnectionState, StatusWatch, TypeStatus, XdsStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the control plane refused the xDS stream: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the control plane closed the xDS stream")]
    StreamClosed,
    #[error("could not attach credentials to the xDS stream: {0}")]
    Metadata(String),
}

/// One resource of a response: its name and its new content, or `None` when
/// the control plane removed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Update<T> {
    pub name: String,
    pub resource: Option<T>,
}

/// A resource a handler refused, and why (naming the offending field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

impl Rejected {
    pub fn new(name: impl Into<String>, reason: impl ToString) -> Self {
        Rejected {
            name: name.into(),
            reason: reason.to_string(),
        }
    }
}

/// `Ok` when nothing was rejected: what a [`Handler`] returns.
pub fn rejections(rejected: Vec<Rejected>) -> Result<(), Vec<Rejected>> {
    if rejected.is_empty() {
        Ok(())
    } else {
        Err(rejected)
    }
}

/// Applies one response's worth of one resource type.
pub trait Handler<T>: Send + Sync + 'static {
    /// Applies every valid update (in one step, so readers see the whole
    /// response or none of it) and returns those it refused.
    fn apply(&self, updates: Vec<Update<T>>) -> Result<(), Vec<Rejected>>;
}

/// ztunnel's node id: `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
pub fn ztunnel_node_id(pod_ip: IpAddr, pod_name: &str, pod_namespace: &str) -> String {
    node_id("ztunnel", pod_ip, pod_name, pod_namespace)
}

/// A waypoint's node id: `waypoint~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
/// (node type `waypoint` as upstream's `model.Waypoint` in pilot/pkg/model/context.go).
pub fn waypoint_node_id(pod_ip: IpAddr, pod_name: &str, pod_namespace: &str) -> String {
    node_id("waypoint", pod_ip, pod_name, pod_namespace)
}

fn node_id(kind: &str, pod_ip: IpAddr, pod_name: &str, pod_namespace: &str) -> String {
    format!("{kind}~{pod_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local")
}
