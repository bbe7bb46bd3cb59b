//! The body of istiod-rs's `/debug/syncz` (monitoring port 15014): every
//! connected proxy and, per resource type, whether it holds the current
//! snapshot. istiod-rs serializes it; `istioctl-rs proxy-status` reads it:
//! one definition, so the two cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `/debug/syncz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Syncz {
    /// The snapshot generation istiod-rs serves now.
    pub snapshot_version: String,
    /// How many proxies are connected (the length of `proxies`).
    pub connected: usize,
    pub proxies: Vec<ProxySync>,
    /// Every waypoint Gateway's scope in the current generation.
    #[serde(default)]
    pub waypoints: Vec<WaypointSync>,
}

/// Where one proxy stands for one resource type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncState {
    /// It holds the current snapshot of this type.
    #[serde(rename = "SYNCED")]
    Synced,
    /// It subscribed but was sent nothing of this type yet.
    #[serde(rename = "NOT SENT")]
    NotSent,
    /// A response is unanswered, or it acked or kept older versions.
    #[serde(rename = "STALE")]
    Stale,
}

impl SyncState {
    /// The word `/debug/syncz` and `proxy-status` show.
    pub fn word(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::NotSent => "NOT SENT",
            SyncState::Stale => "STALE",
        }
    }
}

/// One connected proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySync {
    /// The node id the proxy sent
    /// (`<kind>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`).
    pub proxy: String,
    /// The authenticated SPIFFE identity; absent on an unauthenticated listener.
    pub identity: Option<String>,
    /// The node the token was bound to, when it said.
    pub node: Option<String>,
    pub peer: Option<String>,
    pub connected_since: String,
    /// Set for a waypoint: the Gateway it serves and its scope.
    pub waypoint: Option<WaypointSync>,
    pub types: Vec<TypeSync>,
    /// The most recent NACK of any type.
    pub last_nack: Option<NackReport>,
}

/// One waypoint's scope in the current generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaypointSync {
    /// The waypoint Gateway, `<ns>/<name>`.
    pub gateway: String,
    /// Resources in its scope, by type (`istio.workload.Address`, `istio_rs.l7.v1.RouteTable`, ...).
    pub scope: BTreeMap<String, usize>,
}

/// One resource type of one proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSync {
    pub type_url: String,
    pub status: SyncState,
    pub wildcard: bool,
    /// Explicitly subscribed names.
    pub subscribed_names: usize,
    /// Resources the proxy has acknowledged holding.
    pub resources_held: usize,
    /// Changes and removals the proxy lacks against the current snapshot.
    pub resources_behind: usize,
    pub nonce_in_flight: Option<String>,
    pub sent: Option<ResponseReport>,
    pub acked: Option<ResponseReport>,
    pub last_nack: Option<NackReport>,
}

/// A response sent, or the last one acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseReport {
    pub nonce: String,
    /// The snapshot generation the response was computed from.
    pub version: String,
    /// RFC 3339 UTC with milliseconds: sorts chronologically as text.
    pub at: String,
}

/// A response the proxy refused, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NackReport {
    pub type_url: String,
    pub nonce: String,
    pub message: String,
    pub at: String,
}
