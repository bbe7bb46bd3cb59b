//! What `/debug/syncz` shows: every connected proxy, and per resource type
//! whether it holds the current snapshot (SYNCED), has not been sent this
//! type (NOT SENT), or is behind (STALE: a response unanswered, or it acked or
//! kept older versions), with nonces, versions and its last NACK. A
//! waypoint's entry names its Gateway and the size of its scope per type,
//! and is compared against that scope only.

use std::sync::Arc;
use std::time::SystemTime;

pub use api::syncz::{NackReport, ProxySync, ResponseReport, SyncState, TypeSync, WaypointSync};

use super::delta::{AliasLookup, Nack, Sent, TypeState};
use super::scope::{L7_TYPES, WaypointScope};
use super::{Shared, lock};
use crate::snapshot::{Resources, Snapshot};

/// A handle on the xDS server's state for the debug endpoints.
#[derive(Clone)]
pub struct SyncStatus {
    shared: Arc<Shared>,
}

/// One waypoint's scope: its resources by short type name.
fn waypoint_sync(gateway: &str, scope: Option<&WaypointScope>) -> WaypointSync {
    let empty = WaypointScope::default();
    let sizes = scope.unwrap_or(&empty).sizes();
    WaypointSync {
        gateway: gateway.to_string(),
        scope: sizes
            .into_iter()
            .map(|(type_url, n)| (short_type(type_url).to_string(), n))
            .collect(),
    }
}

fn short_type(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, name)| name)
}

impl SyncStatus {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        SyncStatus { shared }
    }

    /// The snapshot being served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.feed.borrow().snapshot.clone()
    }

    /// How many snapshots the server has received (the `system_version_info` it sends).
    pub fn generation(&self) -> u64 {
        self.shared.feed.borrow().generation
    }

    /// Every waypoint's scope in the current generation, by Gateway.
    pub fn waypoints(&self) -> Vec<WaypointSync> {
        let published = self.shared.feed.borrow().clone();
        published
            .scopes
            .iter()
            .map(|(key, scope)| waypoint_sync(key, Some(scope)))
            .collect()
    }

    /// Every connected proxy, against the current snapshot (a waypoint:
    /// against its scope).
    pub fn proxies(&self) -> Vec<ProxySync> {
        let published = self.shared.feed.borrow().clone();
        let snapshot = &published.snapshot;
        let connections: Vec<_> = lock(&self.shared.connections).values().cloned().collect();
        connections
            .iter()
            .map(|connection| {
                let conn = lock(connection);
                let waypoint = conn.waypoint.as_deref();
                // Only the types the proxy may be sent, and those it asked for.
                let mut type_urls: Vec<&str> = snapshot
                    .type_urls()
                    .filter(|url| waypoint.is_some() || !L7_TYPES.contains(url))
                    .chain(conn.types.keys().map(String::as_str))
                    .collect();
                type_urls.sort_unstable();
                type_urls.dedup();
                let types: Vec<TypeSync> = type_urls
                    .into_iter()
                    .map(|url| {
                        type_sync(
                            url,
                            conn.types.get(url),
                            published.resources(waypoint, url),
                            published.alias_lookup(waypoint, url),
                        )
                    })
                    .collect();
                let last_nack = types
                    .iter()
                    .filter_map(|t| t.last_nack.clone())
                    .max_by(|a, b| a.at.cmp(&b.at));
                ProxySync {
                    proxy: conn.proxy.clone(),
                    identity: conn.caller.as_ref().map(|c| c.identity.to_string()),
                    node: conn.caller.as_ref().and_then(|c| c.node.clone()),
                    peer: conn.peer.map(|p| p.to_string()),
                    connected_since: rfc3339(conn.since),
                    waypoint: waypoint
                        .map(|key| waypoint_sync(key, published.scopes.get(key).map(Arc::as_ref))),
                    types,
                    last_nack,
                }
            })
            .collect()
    }
}

fn type_sync(
    type_url: &str,
    state: Option<&TypeState>,
    resources: &Resources,
    aliases: Option<AliasLookup<'_>>,
) -> TypeSync {
    let Some(state) = state.filter(|s| s.last_sent().is_some()) else {
        return TypeSync {
            type_url: type_url.to_string(),
            status: SyncState::NotSent,
            wildcard: state.is_some_and(|s| s.subscription().wildcard),
            subscribed_names: state.map_or(0, |s| s.subscription().names.len()),
            resources_held: state.map_or(0, |s| s.held().len()),
            resources_behind: 0,
            nonce_in_flight: None,
            sent: None,
            acked: None,
            last_nack: None,
        };
    };
    let delta = state.diff_with_aliases(resources, aliases);
    let behind = delta.upserts.len() + delta.removed.len();
    let status = if state.in_flight_nonce().is_some() || behind > 0 {
        SyncState::Stale
    } else {
        SyncState::Synced
    };
    TypeSync {
        type_url: type_url.to_string(),
        status,
        wildcard: state.subscription().wildcard,
        subscribed_names: state.subscription().names.len(),
        resources_held: state.held().len(),
        resources_behind: behind,
        nonce_in_flight: state.in_flight_nonce().map(str::to_string),
        sent: state.last_sent().map(report),
        acked: state.last_acked().map(report),
        last_nack: state.last_nack().map(|n| nack_report(type_url, n)),
    }
}

fn report(sent: &Sent) -> ResponseReport {
    ResponseReport {
        nonce: sent.nonce.clone(),
        version: sent.version.clone(),
        at: rfc3339(sent.at),
    }
}

fn nack_report(type_url: &str, nack: &Nack) -> NackReport {
    NackReport {
        type_url: type_url.to_string(),
        nonce: nack.nonce.clone(),
        message: nack.message.clone(),
        at: rfc3339(nack.at),
    }
}

/// `2024-05-01T12:00:00.123Z`. (Sorts chronologically as text.)
fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
    }
}
