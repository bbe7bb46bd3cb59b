//! Delta xDS bookkeeping for one resource type on one proxy connection: what
//! the proxy subscribed to, what it has confirmed holding (by ACK), and the
//! response in flight. Pure: no I/O and no clock; the connection task feeds it
//! requests, snapshots and timestamps, and sends the pushes it returns.
//!
//! One response per type is in flight at a time. Snapshots that arrive while
//! a response is unanswered only mark the type dirty; the next push (after the
//! ACK or NACK) is computed against the newest snapshot, so a slow proxy gets
//! fewer, coalesced pushes instead of a queue of intermediate states.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use api::discovery::DeltaDiscoveryRequest;

use crate::snapshot::{Resource, Resources};

/// The resource name that subscribes to every resource of a type.
pub const WILDCARD: &str = "*";

/// Which resources of a type the proxy asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Everything of this type (an explicit `*`, or the legacy empty first request).
    pub wildcard: bool,
    /// Explicitly subscribed names (in addition to the wildcard, if any).
    pub names: BTreeSet<String>,
    /// Legacy wildcard mode: the first request named nothing and no name has
    /// been subscribed since. It ends with the first explicit subscription,
    /// after which only an explicit `*` means everything (as the xDS spec says).
    legacy: bool,
}

impl Subscription {
    fn first(subscribe: &[String], unsubscribe: &[String]) -> Self {
        let legacy = subscribe.is_empty();
        let mut sub = Subscription {
            wildcard: legacy,
            names: BTreeSet::new(),
            legacy,
        };
        sub.update(subscribe, unsubscribe);
        sub
    }

    /// Applies a request's subscribe/unsubscribe lists.
    fn update(&mut self, subscribe: &[String], unsubscribe: &[String]) {
        if self.legacy {
            if subscribe.is_empty() && !unsubscribe.iter().any(|n| n == WILDCARD) {
                return;
            }
            self.legacy = false;
            self.wildcard = false;
        }
        for name in subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
        }
    }

    pub fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// A response sent for this type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub nonce: String,
    /// The response's `system_version_info`: the snapshot generation it was computed from.
    pub version: String,
    pub at: SystemTime,
}

/// The proxy's last rejection of a response of this type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    pub nonce: String,
    pub message: String,
    pub at: SystemTime,
}

#[derive(Clone, Debug)]
struct InFlight {
    sent: Sent,
    /// name -> version of every resource in the response.
    upserts: Vec<(String, String)>,
    removed: Vec<String>,
}

/// What the proxy should be told to reach the snapshot's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// New or changed resources.
    pub upserts: Vec<Arc<Resource>>,
    /// Names the proxy holds that no longer exist, and explicitly subscribed
    /// names that do not exist and the proxy has not yet been told about.
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// A response to send, already recorded as in flight.
#[derive(Clone, Debug)]
pub struct Push {
    pub nonce: String,
    pub version: String,
    pub delta: Delta,
    /// When the oldest snapshot this push carries arrived; `None` when the
    /// push answers a subscription rather than a snapshot change.
    pub pending_since: Option<Instant>,
}

/// How a request related to the response in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The proxy applied the response: it now holds those versions.
    Ack,
    /// The proxy rejected the response and keeps its previous versions.
    Nack(String),
    /// The nonce is not the one in flight (an older response, or unknown):
    /// the whole request is ignored.
    Stale,
    /// No nonce: a subscription change only.
    Subscription,
}

/// The per-type state of one connection.
#[derive(Clone, Debug)]
pub struct TypeState {
    subscription: Subscription,
    /// What the proxy has confirmed holding: name -> version.
    held: BTreeMap<String, String>,
    /// Explicitly subscribed names the proxy has been told do not exist.
    known_absent: BTreeSet<String>,
    in_flight: Option<InFlight>,
    /// The answer may differ from what was last sent (new snapshot,
    /// subscription change, first request).
    dirty: bool,
    /// The first request is answered even when there is nothing to send, so
    /// the proxy learns it holds the full state.
    must_answer: bool,
    /// Arrival of the oldest snapshot not yet pushed.
    pending_since: Option<Instant>,
    last_sent: Option<Sent>,
    last_acked: Option<Sent>,
    last_nack: Option<Nack>,
}

impl TypeState {
    /// The state after the first request for a type on a stream. A resuming
    /// proxy's `initial_resource_versions` seed what it holds, so it is sent
    /// only what differs.
    pub fn new(req: &DeltaDiscoveryRequest) -> Self {
        let subscription = Subscription::first(
            &req.resource_names_subscribe,
            &req.resource_names_unsubscribe,
        );
        let held = req
            .initial_resource_versions
            .iter()
            .filter(|(name, _)| subscription.wants(name))
            .map(|(name, version)| (name.clone(), version.clone()))
            .collect();
        TypeState {
            subscription,
            held,
            known_absent: BTreeSet::new(),
            in_flight: None,
            dirty: true,
            must_answer: true,
            pending_since: None,
            last_sent: None,
            last_acked: None,
            last_nack: None,
        }
    }

    /// Applies a later request for this type: ACK/NACK of the response in
    /// flight and subscription changes. A request whose nonce is not the one
    /// in flight changes nothing.
    pub fn on_request(&mut self, req: &DeltaDiscoveryRequest, now: SystemTime) -> Answer {
        let mut answer = Answer::Subscription;
        if !req.response_nonce.is_empty() {
            let in_flight = match self.in_flight.take() {
                Some(f) if f.sent.nonce == req.response_nonce => f,
                other => {
                    self.in_flight = other;
                    return Answer::Stale;
                }
            };
            answer = match &req.error_detail {
                Some(status) => {
                    let message = if status.message.is_empty() {
                        format!("(no message; error code {})", status.code)
                    } else {
                        status.message.clone()
                    };
                    self.last_nack = Some(Nack {
                        nonce: in_flight.sent.nonce.clone(),
                        message: message.clone(),
                        at: now,
                    });
                    Answer::Nack(message)
                }
                None => {
                    self.apply(&in_flight);
                    self.last_acked = Some(in_flight.sent);
                    Answer::Ack
                }
            };
        }
        let before = self.subscription.clone();
        self.subscription.update(
            &req.resource_names_subscribe,
            &req.resource_names_unsubscribe,
        );
        if self.subscription != before {
            // The xDS spec lets the proxy forget unsubscribed resources on its own.
            let sub = &self.subscription;
            self.held.retain(|name, _| sub.wants(name));
            self.known_absent.retain(|name| sub.names.contains(name));
            self.dirty = true;
        }
        answer
    }

    fn apply(&mut self, in_flight: &InFlight) {
        for (name, version) in &in_flight.upserts {
            // The proxy may have unsubscribed while the response was in flight.
            if self.subscription.wants(name) {
                self.held.insert(name.clone(), version.clone());
                self.known_absent.remove(name);
            }
        }
        for name in &in_flight.removed {
            self.held.remove(name);
            if self.subscription.names.contains(name) {
                self.known_absent.insert(name.clone());
            }
        }
    }

    /// A new snapshot arrived.
    pub fn mark_snapshot(&mut self, arrived: Instant) {
        self.dirty = true;
        self.pending_since.get_or_insert(arrived);
    }

    /// What the proxy needs to go from what it holds to `resources`.
    pub fn diff(&self, resources: &Resources) -> Delta {
        let mut delta = Delta::default();
        if self.subscription.wildcard {
            // Both maps are sorted by name: one merge pass finds changes and removals.
            let mut held = self.held.iter().peekable();
            for (name, resource) in resources {
                while let Some((gone, _)) = held.next_if(|(h, _)| h.as_str() < name.as_str()) {
                    delta.removed.push(gone.clone());
                }
                match held.next_if(|(h, _)| *h == name) {
                    Some((_, version)) if *version == resource.version => {}
                    _ => delta.upserts.push(resource.clone()),
                }
            }
            delta.removed.extend(held.map(|(gone, _)| gone.clone()));
            for name in &self.subscription.names {
                if !resources.contains_key(name)
                    && !self.held.contains_key(name)
                    && !self.known_absent.contains(name)
                {
                    delta.removed.push(name.clone());
                }
            }
        } else {
            // Everything held is subscribed (unsubscribed names are pruned).
            for name in &self.subscription.names {
                match resources.get(name) {
                    Some(resource) => {
                        if self.held.get(name) != Some(&resource.version) {
                            delta.upserts.push(resource.clone());
                        }
                    }
                    None => {
                        if self.held.contains_key(name) || !self.known_absent.contains(name) {
                            delta.removed.push(name.clone());
                        }
                    }
                }
            }
        }
        delta
    }

    /// The next response to send, if one is due: nothing is in flight and
    /// something may have changed. Records it as in flight.
    pub fn next_push(
        &mut self,
        resources: &Resources,
        version: &str,
        nonce: impl FnOnce() -> String,
        now: SystemTime,
    ) -> Option<Push> {
        if self.in_flight.is_some() || !self.dirty {
            return None;
        }
        self.dirty = false;
        let delta = self.diff(resources);
        let pending_since = self.pending_since.take();
        if delta.is_empty() && !self.must_answer {
            return None;
        }
        self.must_answer = false;
        let sent = Sent {
            nonce: nonce(),
            version: version.to_string(),
            at: now,
        };
        self.in_flight = Some(InFlight {
            sent: sent.clone(),
            upserts: delta
                .upserts
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
            removed: delta.removed.clone(),
        });
        self.last_sent = Some(sent.clone());
        Some(Push {
            nonce: sent.nonce,
            version: sent.version,
            delta,
            pending_since,
        })
    }

    pub fn subscription(&self) -> &Subscription {
        &self.subscription
    }

    pub fn held(&self) -> &BTreeMap<String, String> {
        &self.held
    }

    /// The nonce of the unanswered response, if any.
    pub fn in_flight_nonce(&self) -> Option<&str> {
        self.in_flight.as_ref().map(|f| f.sent.nonce.as_str())
    }

    pub fn last_sent(&self) -> Option<&Sent> {
        self.last_sent.as_ref()
    }

    pub fn last_acked(&self) -> Option<&Sent> {
        self.last_acked.as_ref()
    }

    pub fn last_nack(&self) -> Option<&Nack> {
        self.last_nack.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use api::rpc::Status;
    use api::security::Authorization;

    const T: &str = api::type_url::AUTHORIZATION;

    fn policy(name: &str, rev: &str) -> Resource {
        let msg = Authorization {
            name: name.into(),
            namespace: rev.into(),
            ..Default::default()
        };
        Resource::new(T, name, &msg)
    }

    fn snapshot(items: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (name, rev) in items {
            s.insert(policy(name, rev));
        }
        s
    }

    fn request(subscribe: &[&str], unsubscribe: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ack(nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(nonce: &str, message: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: message.into(),
                details: vec![],
            }),
            ..ack(nonce)
        }
    }

    fn push(state: &mut TypeState, snap: &Snapshot, nonce: &str) -> Option<Push> {
        state.next_push(
            snap.of_type(T),
            "1",
            || nonce.into(),
            SystemTime::UNIX_EPOCH,
        )
    }

    fn names(delta: &Delta) -> (Vec<&str>, Vec<&str>) {
        (
            delta.upserts.iter().map(|r| r.name.as_str()).collect(),
            delta.removed.iter().map(String::as_str).collect(),
        )
    }

    #[test]
    fn empty_first_request_is_a_legacy_wildcard() {
        let sub = Subscription::first(&[], &[]);
        assert!(sub.wildcard);
        // Subscribing a name ends legacy mode: only `*` keeps the wildcard.
        let mut sub2 = sub.clone();
        sub2.update(&["a".into()], &[]);
        assert!(!sub2.wildcard);
        assert!(sub2.wants("a") && !sub2.wants("b"));
        let mut sub3 = sub;
        sub3.update(&["*".into(), "a".into()], &[]);
        assert!(sub3.wildcard);
        sub3.update(&[], &["*".into()]);
        assert!(!sub3.wildcard && sub3.wants("a"));
    }

    #[test]
    fn initial_state_then_only_changed_keys_and_removals() {
        let s1 = snapshot(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        let p = push(&mut st, &s1, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a", "b", "c"], vec![]));
        // Nothing more while the response is unanswered, even on a new snapshot.
        st.mark_snapshot(Instant::now());
        assert!(push(&mut st, &s1, "x").is_none());
        assert_eq!(st.on_request(&ack("n1"), SystemTime::now()), Answer::Ack);
        assert_eq!(st.held().len(), 3);
        // The snapshot that arrived in flight was the same: nothing to send.
        assert!(push(&mut st, &s1, "x").is_none());

        let s2 = snapshot(&[("a", "1"), ("b", "2"), ("d", "1")]);
        st.mark_snapshot(Instant::now());
        let p = push(&mut st, &s2, "n2").unwrap();
        assert_eq!(names(&p.delta), (vec!["b", "d"], vec!["c"]));
        assert!(p.pending_since.is_some());
        st.on_request(&ack("n2"), SystemTime::now());
        assert_eq!(
            st.held().keys().map(String::as_str).collect::<Vec<_>>(),
            ["a", "b", "d"]
        );
        assert!(st.diff(s2.of_type(T)).is_empty());
    }

    #[test]
    fn first_response_is_sent_even_when_empty() {
        let mut st = TypeState::new(&request(&[], &[]));
        let p = push(&mut st, &Snapshot::default(), "n1").unwrap();
        assert!(p.delta.is_empty());
        st.on_request(&ack("n1"), SystemTime::now());
        st.mark_snapshot(Instant::now());
        assert!(push(&mut st, &Snapshot::default(), "n2").is_none());
    }

    #[test]
    fn nack_keeps_last_good_versions_and_waits_for_a_change() {
        let s1 = snapshot(&[("a", "1")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        push(&mut st, &s1, "n1").unwrap();
        st.on_request(&ack("n1"), SystemTime::now());
        let good = st.held().clone();

        let s2 = snapshot(&[("a", "2")]);
        st.mark_snapshot(Instant::now());
        push(&mut st, &s2, "n2").unwrap();
        let answer = st.on_request(&nack("n2", "bad address"), SystemTime::now());
        assert_eq!(answer, Answer::Nack("bad address".into()));
        assert_eq!(st.held(), &good);
        assert_eq!(st.last_nack().unwrap().message, "bad address");
        assert_eq!(st.last_acked().unwrap().nonce, "n1");
        // The rejected content is not re-sent in a loop...
        assert!(push(&mut st, &s2, "n3").is_none());
        // ...but the next snapshot brings everything still missing.
        let s3 = snapshot(&[("a", "3")]);
        st.mark_snapshot(Instant::now());
        let p = push(&mut st, &s3, "n3").unwrap();
        assert_eq!(names(&p.delta), (vec!["a"], vec![]));
    }

    #[test]
    fn stale_or_unknown_nonce_changes_nothing() {
        let s1 = snapshot(&[("a", "1")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        push(&mut st, &s1, "n1").unwrap();
        let mut stale = nack("n0", "old");
        stale.resource_names_unsubscribe = vec!["*".into()];
        assert_eq!(st.on_request(&stale, SystemTime::now()), Answer::Stale);
        assert!(st.held().is_empty());
        assert!(st.subscription().wildcard);
        assert_eq!(st.in_flight_nonce(), Some("n1"));
        assert!(st.last_nack().is_none());
        assert_eq!(st.on_request(&ack("n1"), SystemTime::now()), Answer::Ack);
        // Answering the same nonce twice: the second is stale.
        assert_eq!(st.on_request(&ack("n1"), SystemTime::now()), Answer::Stale);
    }

    #[test]
    fn resuming_proxy_gets_only_the_difference() {
        let s = snapshot(&[("a", "1"), ("b", "2")]);
        let a = s.of_type(T)["a"].version.clone();
        let mut req = request(&["*"], &[]);
        req.initial_resource_versions = [
            ("a".to_string(), a),
            ("b".to_string(), "old".to_string()),
            ("gone".to_string(), "v".to_string()),
        ]
        .into_iter()
        .collect();
        let mut st = TypeState::new(&req);
        let p = push(&mut st, &s, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["b"], vec!["gone"]));
    }

    #[test]
    fn explicit_names_and_missing_ones() {
        let s1 = snapshot(&[("a", "1"), ("b", "1")]);
        let mut st = TypeState::new(&request(&["a", "missing"], &[]));
        let p = push(&mut st, &s1, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a"], vec!["missing"]));
        st.on_request(&ack("n1"), SystemTime::now());
        // Told once that `missing` does not exist; not again on every change.
        let s2 = snapshot(&[("a", "1"), ("b", "2")]);
        st.mark_snapshot(Instant::now());
        assert!(push(&mut st, &s2, "n2").is_none());
        // It appears later: sent.
        let s3 = snapshot(&[("a", "1"), ("missing", "1")]);
        st.mark_snapshot(Instant::now());
        let p = push(&mut st, &s3, "n3").unwrap();
        assert_eq!(names(&p.delta), (vec!["missing"], vec![]));
        st.on_request(&ack("n3"), SystemTime::now());

        // Subscribing `b` sends it; unsubscribing `a` forgets it without a push.
        st.on_request(&request(&["b"], &["a"]), SystemTime::now());
        let p = push(&mut st, &s3, "n4").unwrap();
        assert_eq!(names(&p.delta), (vec![], vec!["b"]));
        st.on_request(&ack("n4"), SystemTime::now());
        assert_eq!(
            st.held().keys().map(String::as_str).collect::<Vec<_>>(),
            ["missing"]
        );
    }

    #[test]
    fn wildcard_plus_explicit_missing_name() {
        let s = snapshot(&[("a", "1")]);
        let mut st = TypeState::new(&request(&["*", "nope"], &[]));
        let p = push(&mut st, &s, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a"], vec!["nope"]));
        st.on_request(&ack("n1"), SystemTime::now());
        assert!(st.diff(s.of_type(T)).is_empty());
        // Leaving the wildcard drops what only it covered.
        st.on_request(&request(&[], &["*"]), SystemTime::now());
        assert!(st.held().is_empty());
    }

    #[test]
    fn unsubscribed_while_in_flight_is_not_held() {
        let s = snapshot(&[("a", "1"), ("b", "1")]);
        let mut st = TypeState::new(&request(&["a", "b"], &[]));
        push(&mut st, &s, "n1").unwrap();
        st.on_request(&request(&[], &["b"]), SystemTime::now());
        st.on_request(&ack("n1"), SystemTime::now());
        assert_eq!(
            st.held().keys().map(String::as_str).collect::<Vec<_>>(),
            ["a"]
        );
    }
}
