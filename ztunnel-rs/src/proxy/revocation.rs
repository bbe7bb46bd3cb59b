//! Policy applies to live connections too: every inbound connection a
//! policy admitted is registered here with what the decision was made on,
//! and each time the workload store changes the decision is made again; a
//! connection it now denies is cut (RST / RST_STREAM) and counted, with the
//! policy that denied it in the access log.
//!
//! A connection registers *before* its admission decision is read from the
//! store, so a change published in between is either seen by that decision
//! or re-evaluated here: no connection slips through a policy change.
//! Re-evaluation skips connections whose workload (by `Arc` identity) and
//! the store's policies are unchanged since their last check, so a store
//! change that touches neither costs a map walk, not a policy evaluation.
//!
//! A policy the workload refers to but the proxy does not hold denies new
//! connections, yet does not cut live ones: nothing new has been decided
//! (the workload's list can run ahead of the policy itself for the length of
//! one xDS response), and the policy is applied to them once it arrives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use proxy_core::authorization::{ConnectionInfo, Decision};
use proxy_core::store::{Snapshot, Workload, WorkloadStore};
use tokio::sync::oneshot;
use tracing::info;

use super::metrics::{ConnectionRecord, FailureReason, ResponseFlags};
use super::splice::{Side, splice_until};

/// Why a live connection was cut.
#[derive(Debug, thiserror::Error)]
#[error("closed after it was admitted: a policy change denies it: {0}")]
pub struct Revoked(pub Decision);

/// Carries an admitted connection until it ends or a policy change revokes
/// it (then both sides are reset), and records how it ended.
pub(super) async fn carry<C: Side, S: Side>(
    client: C,
    server: S,
    record: ConnectionRecord,
    mut registration: Registration,
) {
    match splice_until(client, server, &record, registration.revoked()).await {
        Ok(Ok(())) => record.close(None),
        Ok(Err(error)) => record.close(Some(&error)),
        Err(decision) => record.fail(
            ResponseFlags::Deny,
            FailureReason::PolicyRevoked,
            &Revoked(decision),
        ),
    }
}

/// The inbound connections a policy decision admitted, on one node.
#[derive(Default)]
pub struct LiveConnections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

struct Live {
    workload_uid: String,
    conn: ConnectionInfo,
    /// What the last decision was made on.
    checked: Option<(Arc<Workload>, u64)>,
    revoke: oneshot::Sender<Decision>,
}

impl std::fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConnections")
            .field("live", &self.len())
            .finish()
    }
}

impl LiveConnections {
    /// Registers a connection to `workload_uid`; drop the returned handle
    /// when the connection ends.
    pub fn register(self: &Arc<Self>, workload_uid: &str, conn: ConnectionInfo) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = oneshot::channel();
        self.lock().insert(
            id,
            Live {
                workload_uid: workload_uid.to_string(),
                conn,
                checked: None,
                revoke,
            },
        );
        Registration {
            id,
            registry: Arc::downgrade(self),
            revoked: Some(revoked),
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every registered connection again against `snapshot` and
    /// revokes the ones it denies. Returns how many were revoked.
    pub fn reevaluate(&self, snapshot: &Snapshot) -> usize {
        let generation = snapshot.policy_generation();
        let mut revoked = Vec::new();
        {
            let mut live = self.lock();
            for (id, entry) in live.iter_mut() {
                // A workload gone from the store is being deleted: its
                // connections end with the pod's drain, not here.
                let Some(workload) = snapshot.workload_by_uid(&entry.workload_uid) else {
                    continue;
                };
                let unchanged = entry
                    .checked
                    .as_ref()
                    .is_some_and(|(w, g)| *g == generation && Arc::ptr_eq(w, &workload));
                if unchanged {
                    continue;
                }
                let decision = snapshot.policies_for(&workload).check(&entry.conn);
                if matches!(decision, Decision::MissingPolicy { .. }) {
                    // Not decided yet: looked at again when the policy comes.
                    continue;
                }
                entry.checked = Some((workload, generation));
                if !decision.is_allowed() {
                    revoked.push((*id, decision));
                }
            }
            for (id, decision) in &revoked {
                if let Some(entry) = live.remove(id) {
                    info!(
                        src = %entry.conn.source_ip,
                        src.identity = entry.conn.source_identity.as_ref().map(tracing::field::display),
                        dst = %entry.conn.destination,
                        workload = %entry.workload_uid,
                        %decision,
                        "closing a live connection: a policy change denies it"
                    );
                    // The connection may have just ended; nothing to cut then.
                    let _ = entry.revoke.send(decision.clone());
                }
            }
        }
        revoked.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Re-evaluates `live` after every change of `store` from now on, until the
/// registry is dropped.
pub fn watch(store: WorkloadStore, live: Weak<LiveConnections>) -> tokio::task::JoinHandle<()> {
    // Subscribed before the task runs: no change after this call is missed.
    let mut changes = store.subscribe();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let Some(live) = live.upgrade() else { break };
            if !live.is_empty() {
                live.reevaluate(&store.snapshot());
            }
        }
    })
}

/// One registered connection. Dropping it unregisters the connection.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    registry: Weak<LiveConnections>,
    revoked: Option<oneshot::Receiver<Decision>>,
}

impl Registration {
    /// Resolves with the denying decision once a policy change revokes the
    /// connection; never resolves otherwise.
    pub async fn revoked(&mut self) -> Decision {
        if let Some(rx) = self.revoked.as_mut()
            && let Ok(decision) = rx.await
        {
            self.revoked = None;
            return decision;
        }
        self.revoked = None;
        std::future::pending().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.lock().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::xds;
    use std::time::Duration;

    fn conn(src: &str, dst: &str) -> ConnectionInfo {
        ConnectionInfo {
            source_ip: src.parse().unwrap(),
            source_identity: Some("spiffe://cluster.local/ns/a/sa/client".parse().unwrap()),
            destination: dst.parse().unwrap(),
        }
    }

    fn deny_from(name: &str, ip: &str) -> api::security::Authorization {
        let address = match ip.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        xds::policy(
            name,
            "ns",
            api::security::Action::Deny,
            api::security::Match {
                source_ips: vec![api::security::Address {
                    address,
                    length: 32,
                }],
                ..Default::default()
            },
        )
    }

    fn store_with_server() -> WorkloadStore {
        let store = WorkloadStore::new();
        xds::apply(
            &store,
            vec![xds::workload("server", "ns", "10.0.0.2").hbone().into()],
        );
        store
    }

    const SERVER: &str = "Kubernetes//Pod/ns/server";

    #[tokio::test]
    async fn a_policy_that_now_denies_revokes_the_connection_and_only_it() {
        let store = store_with_server();
        let live = Arc::new(LiveConnections::default());
        let mut from_a = live.register(SERVER, conn("10.0.0.1", "10.0.0.2:80"));
        let other = live.register(SERVER, conn("10.0.0.3", "10.0.0.2:80"));
        assert_eq!(live.reevaluate(&store.snapshot()), 0);

        xds::apply_policies(&store, vec![deny_from("deny-a", "10.0.0.1")]);
        assert_eq!(live.reevaluate(&store.snapshot()), 1);
        assert_eq!(live.len(), 1, "the revoked connection is unregistered");
        let decision = from_a.revoked().await;
        assert_eq!(
            decision,
            Decision::Denied {
                policy: "ns/deny-a".into()
            }
        );
        drop(other);
        assert!(live.is_empty());
    }

    #[tokio::test]
    async fn a_policy_not_yet_held_does_not_cut_but_is_applied_once_it_arrives() {
        let store = store_with_server();
        let live = Arc::new(LiveConnections::default());
        let mut registration = live.register(SERVER, conn("10.0.0.1", "10.0.0.2:80"));
        // The workload now lists a policy that has not arrived.
        xds::apply(
            &store,
            vec![
                xds::workload("server", "ns", "10.0.0.2")
                    .hbone()
                    .policy("ns/deny-a")
                    .into(),
            ],
        );
        assert_eq!(live.reevaluate(&store.snapshot()), 0);
        let deny = api::security::Authorization {
            scope: api::security::Scope::WorkloadSelector as i32,
            ..deny_from("deny-a", "10.0.0.1")
        };
        xds::apply_policies(&store, vec![deny]);
        assert_eq!(live.reevaluate(&store.snapshot()), 1);
        assert!(!registration.revoked().await.is_allowed());
    }

    #[test]
    fn unchanged_policies_and_workload_are_not_evaluated_again() {
        let store = store_with_server();
        let live = Arc::new(LiveConnections::default());
        let _c = live.register(SERVER, conn("10.0.0.1", "10.0.0.2:80"));
        live.reevaluate(&store.snapshot());
        let checked = |live: &LiveConnections| {
            live.lock()
                .values()
                .map(|l| l.checked.as_ref().map(|(w, g)| (Arc::as_ptr(w), *g)))
                .collect::<Vec<_>>()
        };
        let before = checked(&live);
        // An unrelated workload changes: nothing to decide again.
        xds::apply(
            &store,
            vec![xds::workload("other", "ns", "10.0.0.9").into()],
        );
        live.reevaluate(&store.snapshot());
        assert_eq!(checked(&live), before);
    }

    #[tokio::test]
    async fn the_watch_reacts_to_store_changes() {
        let store = store_with_server();
        let live = Arc::new(LiveConnections::default());
        let mut registration = live.register(SERVER, conn("10.0.0.1", "10.0.0.2:80"));
        let watcher = watch(store.clone(), Arc::downgrade(&live));
        xds::apply_policies(&store, vec![deny_from("deny-a", "10.0.0.1")]);
        let decision =
            tokio::time::timeout(crate::proxy::testing::PATIENCE, registration.revoked())
                .await
                .expect("the watch revokes the connection");
        assert!(!decision.is_allowed());
        drop(live);
        // The next change finds the registry gone and the watch ends.
        xds::apply(&store, vec![xds::workload("x", "ns", "10.0.0.8").into()]);
        tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .expect("the watch ends with its registry")
            .unwrap();
    }
}
