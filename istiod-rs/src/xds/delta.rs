//! Delta xDS bookkeeping for one resource type on one proxy connection: what
//! the proxy subscribed to, what it has confirmed holding (by ACK), and the
//! response in flight. Pure: no I/O and no clock; the connection task feeds it
//! requests, snapshots and timestamps, and sends the pushes it returns.
//!
//! One response per type is in flight at a time. Snapshots that arrive while
//! a response is unanswered only mark the type dirty; the next push (after the
//! ACK or NACK) is computed against the newest snapshot, so a slow proxy gets
//! fewer, coalesced pushes instead of a queue of intermediate states.
//!
//! While the proxy is known to hold exactly what some earlier snapshot gave
//! it (its `base`), a push looks only at the names the [`ChangeLog`] says
//! changed since then; otherwise it merges over every resource.

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use api::discovery::DeltaDiscoveryRequest;

use super::scope::{AliasTable, is_alias};
use super::served::ChangeLog;
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

/// A resource the proxy holds: the served resource itself (shared, so a
/// proxy's held set costs a pointer per resource), ordered by name so the set
/// can be looked up by name.
#[derive(Clone, Debug)]
struct Held(Arc<Resource>);

impl Held {
    /// A version the proxy claims to hold from before this stream.
    fn claimed(name: &str, version: &str) -> Self {
        Held(Arc::new(Resource {
            name: name.to_string(),
            version: version.to_string(),
            body: prost_types::Any::default(),
        }))
    }

    fn is(&self, resource: &Arc<Resource>) -> bool {
        Arc::ptr_eq(&self.0, resource) || self.0.version == resource.version
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name.cmp(&other.0.name)
    }
}

impl Borrow<str> for Held {
    fn borrow(&self) -> &str {
        &self.0.name
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
    /// The snapshot generation the response brings the proxy to.
    generation: u64,
    /// No subscription change since it was sent: after the ACK the proxy
    /// holds exactly what that generation gives it.
    exact: bool,
    /// What the response carries (shared resources: no copies).
    delta: Delta,
}

/// What the proxy should be told to reach the snapshot's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// New or changed resources.
    pub upserts: Vec<Arc<Resource>>,
    /// Names the proxy holds that no longer exist, and explicitly subscribed
    /// names that do not exist and the proxy has not yet been told about.
    pub removed: Vec<String>,
    /// Upserted resource name -> the subscribed address names
    /// (`<network>/<ip>`) it answers, sent as the resource's `aliases`.
    pub aliases: BTreeMap<String, Vec<String>>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// Resolves on-demand address names (`<network>/<ip>`) to the workloads
/// holding them, among every served Address (not only a scope's): upstream
/// answers such a name with the workload under its own name, the address
/// name in its `aliases` (pilot/pkg/xds/workload.go, `GenerateDeltas`).
#[derive(Clone, Copy, Debug)]
pub struct AliasLookup<'a> {
    pub table: &'a AliasTable,
    pub resources: &'a Resources,
}

impl<'a> AliasLookup<'a> {
    pub fn resolve(&self, name: &str) -> Option<&'a Arc<Resource>> {
        self.table
            .get(name)?
            .iter()
            .find_map(|uid| self.resources.get(uid))
    }
}

/// The snapshot a push is computed against, for one type.
#[derive(Clone, Copy, Debug)]
pub struct Current<'a> {
    pub type_url: &'a str,
    pub generation: u64,
    /// What this proxy may hold (a waypoint's scope, or everything).
    pub resources: &'a Resources,
    pub changes: &'a ChangeLog,
    /// The waypoint whose scope `resources` is, for the change log.
    pub scope: Option<&'a str>,
    /// Set where this proxy may look workloads up by address.
    pub aliases: Option<AliasLookup<'a>>,
}

/// A response to send, already recorded as in flight.
#[derive(Clone, Debug)]
pub struct Push {
    pub nonce: String,
    pub version: String,
    pub delta: Delta,
    /// When the oldest snapshot this push carries arrived; `None` when the
    /// push answers a subscription rather than a snapshot change.
    pub pending_since: Option<Pending>,
}

/// When the oldest snapshot not yet pushed arrived at the xDS server, and
/// when the pipeline saw the change it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub arrived: Instant,
    pub changed: Instant,
}

impl Pending {
    /// A snapshot whose change is seen as it arrives.
    pub fn at(now: Instant) -> Self {
        Pending {
            arrived: now,
            changed: now,
        }
    }
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
    held: BTreeSet<Held>,
    /// Explicitly subscribed names the proxy has been told do not exist.
    known_absent: BTreeSet<String>,
    /// Subscribed address names the proxy has been answered for -> the
    /// workload (held under its own name) that answered.
    told_aliases: BTreeMap<String, String>,
    /// A snapshot generation whose resources the proxy holds exactly (for
    /// its subscription), so later pushes need only the changed names.
    base: Option<u64>,
    in_flight: Option<InFlight>,
    /// The answer may differ from what was last sent (new snapshot,
    /// subscription change, first request).
    dirty: bool,
    /// The first request is answered even when there is nothing to send, so
    /// the proxy learns it holds the full state.
    must_answer: bool,
    /// Arrival of the oldest snapshot not yet pushed.
    pending_since: Option<Pending>,
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
            .map(|(name, version)| Held::claimed(name, version))
            .collect();
        TypeState {
            subscription,
            held,
            known_absent: BTreeSet::new(),
            told_aliases: BTreeMap::new(),
            base: None,
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
                    self.base = in_flight.exact.then_some(in_flight.generation);
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
            self.told_aliases
                .retain(|alias, _| sub.names.contains(alias));
            let targets: BTreeSet<&String> = self.told_aliases.values().collect();
            self.held
                .retain(|h| sub.wants(&h.0.name) || targets.contains(&h.0.name));
            self.known_absent.retain(|name| sub.names.contains(name));
            self.dirty = true;
            self.base = None;
            if let Some(in_flight) = &mut self.in_flight {
                in_flight.exact = false;
            }
        }
        answer
    }

    fn apply(&mut self, in_flight: &InFlight) {
        for (target, aliases) in &in_flight.delta.aliases {
            for alias in aliases {
                // The proxy may have unsubscribed while the response was in flight.
                if self.subscription.names.contains(alias) {
                    self.told_aliases.insert(alias.clone(), target.clone());
                    self.known_absent.remove(alias);
                }
            }
        }
        for r in &in_flight.delta.upserts {
            if self.wants(&r.name) {
                self.held.replace(Held(r.clone()));
                self.known_absent.remove(&r.name);
            }
        }
        for name in &in_flight.delta.removed {
            self.held.remove(name.as_str());
            self.told_aliases.remove(name);
            if self.subscription.names.contains(name) {
                self.known_absent.insert(name.clone());
            }
        }
    }

    /// Whether the proxy asked for `name`: subscribed to it, or to an
    /// address that it answered.
    fn wants(&self, name: &str) -> bool {
        self.subscription.wants(name) || self.told_aliases.values().any(|t| t == name)
    }

    /// The subscribed address names that resolve now, to what.
    fn resolve(&self, aliases: Option<AliasLookup<'_>>) -> BTreeMap<String, Arc<Resource>> {
        let Some(lookup) = aliases else {
            return BTreeMap::new();
        };
        self.subscription
            .names
            .iter()
            .filter(|name| is_alias(name))
            .filter_map(|name| lookup.resolve(name).map(|r| (name.clone(), r.clone())))
            .collect()
    }

    /// A new snapshot arrived.
    pub fn mark_snapshot(&mut self, pending: Pending) {
        self.dirty = true;
        self.pending_since.get_or_insert(pending);
    }

    /// What the proxy needs to go from what it holds to `resources`.
    pub fn diff(&self, resources: &Resources) -> Delta {
        self.diff_resolved(resources, &BTreeMap::new())
    }

    /// [`Self::diff`] for a proxy that may look workloads up by address
    /// through `aliases`.
    pub fn diff_with_aliases(
        &self,
        resources: &Resources,
        aliases: Option<AliasLookup<'_>>,
    ) -> Delta {
        self.diff_resolved(resources, &self.resolve(aliases))
    }

    /// [`Self::diff`] where the subscribed address names in `resolved`
    /// bring the workloads they resolve to.
    fn diff_resolved(
        &self,
        resources: &Resources,
        resolved: &BTreeMap<String, Arc<Resource>>,
    ) -> Delta {
        let resources: Cow<'_, Resources> = if resolved.is_empty() {
            Cow::Borrowed(resources)
        } else {
            let mut all = resources.clone();
            for r in resolved.values() {
                all.entry(r.name.clone()).or_insert_with(|| r.clone());
            }
            Cow::Owned(all)
        };
        let resources = resources.as_ref();
        let mut delta = Delta::default();
        if self.subscription.wildcard {
            // Both maps are sorted by name: one merge pass finds changes and removals.
            let mut held = self.held.iter().peekable();
            for (name, resource) in resources {
                while let Some(gone) = held.next_if(|h| h.0.name < *name) {
                    delta.removed.push(gone.0.name.clone());
                }
                match held.next_if(|h| h.0.name == *name) {
                    Some(h) if h.is(resource) => {}
                    _ => delta.upserts.push(resource.clone()),
                }
            }
            delta.removed.extend(held.map(|gone| gone.0.name.clone()));
            for name in &self.subscription.names {
                if !resources.contains_key(name)
                    && !resolved.contains_key(name)
                    && !self.held.contains(name.as_str())
                    && !self.known_absent.contains(name)
                {
                    delta.removed.push(name.clone());
                }
            }
        } else {
            // Everything held is subscribed (unsubscribed names are pruned)
            // or a workload a subscribed address resolved to.
            for name in &self.subscription.names {
                if resolved.contains_key(name) {
                    continue;
                }
                match resources.get(name) {
                    Some(resource) => {
                        if !self.held.get(name.as_str()).is_some_and(|h| h.is(resource)) {
                            delta.upserts.push(resource.clone());
                        }
                    }
                    None => {
                        if self.held.contains(name.as_str()) || !self.known_absent.contains(name) {
                            delta.removed.push(name.clone());
                        }
                    }
                }
            }
            let targets: BTreeSet<&str> = resolved.values().map(|r| r.name.as_str()).collect();
            for target in &targets {
                let resource = &resources[*target];
                if !self.subscription.names.contains(*target)
                    && !self.held.get(*target).is_some_and(|h| h.is(resource))
                {
                    delta.upserts.push(resource.clone());
                }
            }
            for h in &self.held {
                let name = h.0.name.as_str();
                if !self.subscription.names.contains(name) && !targets.contains(name) {
                    delta.removed.push(name.to_string());
                }
            }
        }
        // An address answered for the first time, or now by another
        // workload, brings that workload even if the proxy holds it.
        for (alias, target) in resolved {
            if self.told_aliases.get(alias) != Some(&target.name) {
                if !delta.upserts.iter().any(|u| u.name == target.name) {
                    delta.upserts.push(target.clone());
                }
                delta
                    .aliases
                    .entry(target.name.clone())
                    .or_default()
                    .push(alias.clone());
            }
        }
        delta
    }

    /// [`Self::diff`] restricted to `names`: enough when the proxy holds
    /// exactly what an earlier snapshot gave it and only `names` changed since.
    fn diff_names<'n>(
        &self,
        names: impl IntoIterator<Item = &'n str>,
        resources: &Resources,
    ) -> Delta {
        let mut delta = Delta::default();
        for name in names {
            if !self.subscription.wants(name) {
                continue;
            }
            match resources.get(name) {
                Some(resource) => {
                    if !self.held.get(name).is_some_and(|h| h.is(resource)) {
                        delta.upserts.push(resource.clone());
                    }
                }
                None => {
                    let untold =
                        self.subscription.names.contains(name) && !self.known_absent.contains(name);
                    if self.held.contains(name) || untold {
                        delta.removed.push(name.to_string());
                    }
                }
            }
        }
        delta
    }

    /// What the proxy needs to reach `current`, over the changed names when
    /// its base is known and still in the change log. Address names are
    /// resolved afresh each time (what they resolve to is not in the log).
    pub fn diff_current(&self, current: &Current<'_>) -> Delta {
        let looks_up =
            current.aliases.is_some() && self.subscription.names.iter().any(|name| is_alias(name));
        if looks_up {
            return self.diff_resolved(current.resources, &self.resolve(current.aliases));
        }
        let changed = self.base.and_then(|base| {
            current
                .changes
                .since(base, current.generation, current.type_url, current.scope)
        });
        match changed {
            Some(names) => self.diff_names(names, current.resources),
            None => self.diff(current.resources),
        }
    }

    /// The next response to send, if one is due: nothing is in flight and
    /// something may have changed. Records it as in flight.
    pub fn next_push(
        &mut self,
        current: &Current<'_>,
        nonce: impl FnOnce() -> String,
        now: SystemTime,
    ) -> Option<Push> {
        if self.in_flight.is_some() || !self.dirty {
            return None;
        }
        self.dirty = false;
        let delta = self.diff_current(current);
        let pending_since = self.pending_since.take();
        if delta.is_empty() {
            self.base = Some(current.generation);
            if !self.must_answer {
                return None;
            }
        }
        self.must_answer = false;
        let sent = Sent {
            nonce: nonce(),
            version: current.generation.to_string(),
            at: now,
        };
        self.in_flight = Some(InFlight {
            sent: sent.clone(),
            generation: current.generation,
            exact: true,
            delta: delta.clone(),
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

    /// What the proxy has confirmed holding: (name, version), by name.
    pub fn held(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.held
            .iter()
            .map(|h| (h.0.name.as_str(), h.0.version.as_str()))
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

/// What the randomized diff tests share.
#[cfg(test)]
pub(super) mod test_support {
    use super::Delta;

    /// A small deterministic generator (xorshift), so failures reproduce:
    /// each call gives a number below its argument.
    pub fn xorshift(mut seed: u64) -> impl FnMut(usize) -> usize {
        move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        }
    }

    /// A delta as sorted (name, version) upserts and sorted removals.
    pub fn comparable(d: &Delta) -> (Vec<(String, String)>, Vec<String>) {
        let mut up: Vec<(String, String)> = d
            .upserts
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        up.sort();
        let mut rm = d.removed.clone();
        rm.sort();
        (up, rm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use crate::xds::served::Served;
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

    /// Snapshots as the relay publishes them: numbered, with their change log.
    struct Feed {
        served: Served,
        generation: u64,
        log: ChangeLog,
    }

    impl Feed {
        fn new(items: &[(&str, &str)]) -> Self {
            Feed {
                served: Served::default().next(&snapshot(items)).0,
                generation: 1,
                log: ChangeLog::default(),
            }
        }

        /// Publishes a new snapshot and tells `states` it arrived.
        fn publish(&mut self, items: &[(&str, &str)], states: &mut [&mut TypeState]) {
            let next = snapshot(items);
            self.generation += 1;
            let (served, changes) = self.served.next(&next);
            self.log
                .record(self.generation, changes, Default::default());
            self.served = served;
            for st in states {
                st.mark_snapshot(Pending::at(Instant::now()));
            }
        }

        fn current(&self) -> Current<'_> {
            Current {
                type_url: T,
                generation: self.generation,
                resources: self.served.of_type(T),
                changes: &self.log,
                scope: None,
                aliases: None,
            }
        }

        fn push(&self, state: &mut TypeState, nonce: &str) -> Option<Push> {
            state.next_push(&self.current(), || nonce.into(), SystemTime::UNIX_EPOCH)
        }
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

    fn names(delta: &Delta) -> (Vec<&str>, Vec<&str>) {
        (
            delta.upserts.iter().map(|r| r.name.as_str()).collect(),
            delta.removed.iter().map(String::as_str).collect(),
        )
    }

    fn held(st: &TypeState) -> Vec<&str> {
        st.held().map(|(name, _)| name).collect()
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
        let mut feed = Feed::new(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        let p = feed.push(&mut st, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a", "b", "c"], vec![]));
        assert!(p.pending_since.is_none());
        // Nothing more while the response is unanswered, even on a new snapshot.
        feed.publish(&[("a", "1"), ("b", "1"), ("c", "1")], &mut [&mut st]);
        assert!(feed.push(&mut st, "x").is_none());
        assert_eq!(st.on_request(&ack("n1"), SystemTime::now()), Answer::Ack);
        assert_eq!(st.held().len(), 3);
        // The snapshot that arrived in flight was the same: nothing to send.
        assert!(feed.push(&mut st, "x").is_none());

        feed.publish(&[("a", "1"), ("b", "2"), ("d", "1")], &mut [&mut st]);
        let p = feed.push(&mut st, "n2").unwrap();
        assert_eq!(names(&p.delta), (vec!["b", "d"], vec!["c"]));
        assert!(p.pending_since.is_some());
        assert_eq!(p.version, "3");
        st.on_request(&ack("n2"), SystemTime::now());
        assert_eq!(held(&st), ["a", "b", "d"]);
        assert!(st.diff(feed.served.of_type(T)).is_empty());
    }

    #[test]
    fn first_response_is_sent_even_when_empty() {
        let mut feed = Feed::new(&[]);
        let mut st = TypeState::new(&request(&[], &[]));
        let p = feed.push(&mut st, "n1").unwrap();
        assert!(p.delta.is_empty());
        st.on_request(&ack("n1"), SystemTime::now());
        feed.publish(&[], &mut [&mut st]);
        assert!(feed.push(&mut st, "n2").is_none());
    }

    #[test]
    fn nack_keeps_last_good_versions_and_waits_for_a_change() {
        let mut feed = Feed::new(&[("a", "1"), ("b", "1")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        feed.push(&mut st, "n1").unwrap();
        st.on_request(&ack("n1"), SystemTime::now());
        let good: Vec<(String, String)> = st
            .held()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();

        feed.publish(&[("a", "2"), ("b", "1")], &mut [&mut st]);
        feed.push(&mut st, "n2").unwrap();
        let answer = st.on_request(&nack("n2", "bad address"), SystemTime::now());
        assert_eq!(answer, Answer::Nack("bad address".into()));
        let now: Vec<(String, String)> = st
            .held()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(now, good);
        assert_eq!(st.last_nack().unwrap().message, "bad address");
        assert_eq!(st.last_acked().unwrap().nonce, "n1");
        // The rejected content is not re-sent in a loop...
        assert!(feed.push(&mut st, "n3").is_none());
        // ...but the next snapshot brings everything still missing.
        feed.publish(&[("a", "2"), ("b", "3")], &mut [&mut st]);
        let p = feed.push(&mut st, "n3").unwrap();
        assert_eq!(names(&p.delta), (vec!["a", "b"], vec![]));
    }

    #[test]
    fn stale_or_unknown_nonce_changes_nothing() {
        let feed = Feed::new(&[("a", "1")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        feed.push(&mut st, "n1").unwrap();
        let mut stale = nack("n0", "old");
        stale.resource_names_unsubscribe = vec!["*".into()];
        assert_eq!(st.on_request(&stale, SystemTime::now()), Answer::Stale);
        assert!((st.held().len() == 0));
        assert!(st.subscription().wildcard);
        assert_eq!(st.in_flight_nonce(), Some("n1"));
        assert!(st.last_nack().is_none());
        assert_eq!(st.on_request(&ack("n1"), SystemTime::now()), Answer::Ack);
        // Answering the same nonce twice: the second is stale.
        assert_eq!(st.on_request(&ack("n1"), SystemTime::now()), Answer::Stale);
    }

    #[test]
    fn resuming_proxy_gets_only_the_difference() {
        let feed = Feed::new(&[("a", "1"), ("b", "2")]);
        let a = feed.served.of_type(T)["a"].version.clone();
        let mut req = request(&["*"], &[]);
        req.initial_resource_versions = [
            ("a".to_string(), a),
            ("b".to_string(), "old".to_string()),
            ("gone".to_string(), "v".to_string()),
        ]
        .into_iter()
        .collect();
        let mut st = TypeState::new(&req);
        let p = feed.push(&mut st, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["b"], vec!["gone"]));
    }

    #[test]
    fn explicit_names_and_missing_ones() {
        let mut feed = Feed::new(&[("a", "1"), ("b", "1")]);
        let mut st = TypeState::new(&request(&["a", "missing"], &[]));
        let p = feed.push(&mut st, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a"], vec!["missing"]));
        st.on_request(&ack("n1"), SystemTime::now());
        // Told once that `missing` does not exist; not again on every change.
        feed.publish(&[("a", "1"), ("b", "2")], &mut [&mut st]);
        assert!(feed.push(&mut st, "n2").is_none());
        // It appears later: sent.
        feed.publish(&[("a", "1"), ("missing", "1")], &mut [&mut st]);
        let p = feed.push(&mut st, "n3").unwrap();
        assert_eq!(names(&p.delta), (vec!["missing"], vec![]));
        st.on_request(&ack("n3"), SystemTime::now());

        // Subscribing `b` (gone by now) says so; unsubscribing `a` forgets it
        // without a push.
        st.on_request(&request(&["b"], &["a"]), SystemTime::now());
        let p = feed.push(&mut st, "n4").unwrap();
        assert_eq!(names(&p.delta), (vec![], vec!["b"]));
        st.on_request(&ack("n4"), SystemTime::now());
        assert_eq!(held(&st), ["missing"]);
    }

    #[test]
    fn wildcard_plus_explicit_missing_name() {
        let feed = Feed::new(&[("a", "1")]);
        let mut st = TypeState::new(&request(&["*", "nope"], &[]));
        let p = feed.push(&mut st, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a"], vec!["nope"]));
        st.on_request(&ack("n1"), SystemTime::now());
        assert!(st.diff(feed.served.of_type(T)).is_empty());
        // Leaving the wildcard drops what only it covered.
        st.on_request(&request(&[], &["*"]), SystemTime::now());
        assert!((st.held().len() == 0));
    }

    #[test]
    fn subscription_changes_while_in_flight() {
        let mut feed = Feed::new(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let mut st = TypeState::new(&request(&["a", "b"], &[]));
        feed.push(&mut st, "n1").unwrap();
        // `b` dropped and `c` added before the ACK: `b` is not held, and
        // `c` is still sent although only `a` changes afterwards.
        st.on_request(&request(&["c"], &["b"]), SystemTime::now());
        st.on_request(&ack("n1"), SystemTime::now());
        assert_eq!(held(&st), ["a"]);
        feed.publish(&[("a", "2"), ("b", "1"), ("c", "1")], &mut [&mut st]);
        let p = feed.push(&mut st, "n2").unwrap();
        assert_eq!(names(&p.delta), (vec!["a", "c"], vec![]));
    }

    #[test]
    fn address_names_bring_the_workload_under_its_own_name() {
        let arc = |r: Resource| Arc::new(r);
        let (a, w1, w2) = (
            arc(policy("a", "1")),
            arc(policy("w1", "1")),
            arc(policy("w2", "1")),
        );
        // The proxy's scope holds `a`; `w1` and `w2` exist outside it.
        let scope: Resources = [("a".to_string(), a.clone())].into();
        let mut all: Resources = [
            ("a".to_string(), a.clone()),
            ("w1".to_string(), w1.clone()),
            ("w2".to_string(), w2.clone()),
        ]
        .into();
        let mut table = AliasTable::new();
        table.insert("net/10.0.0.1".into(), ["w1".to_string()].into());
        let log = ChangeLog::default();
        let mut generation = 1;
        let push = |st: &mut TypeState, all: &Resources, table: &AliasTable, g: u64, n: &str| {
            let current = Current {
                type_url: T,
                generation: g,
                resources: &scope,
                changes: &log,
                scope: Some("ns/wp"),
                aliases: Some(AliasLookup {
                    table,
                    resources: all,
                }),
            };
            st.next_push(&current, || n.into(), SystemTime::UNIX_EPOCH)
        };
        let mut st = TypeState::new(&request(&["*"], &[]));
        let p = push(&mut st, &all, &table, generation, "n1").unwrap();
        assert_eq!(names(&p.delta), (vec!["a"], vec![]));
        st.on_request(&ack("n1"), SystemTime::now());

        // Looked up by address: sent as `w1`, answering the address name.
        st.on_request(
            &request(&["net/10.0.0.1", "net/10.0.0.9"], &[]),
            SystemTime::now(),
        );
        let p = push(&mut st, &all, &table, generation, "n2").unwrap();
        assert_eq!(names(&p.delta), (vec!["w1"], vec!["net/10.0.0.9"]));
        assert_eq!(p.delta.aliases["w1"], ["net/10.0.0.1"]);
        st.on_request(&ack("n2"), SystemTime::now());
        assert_eq!(held(&st), ["a", "w1"]);
        st.mark_snapshot(Pending::at(Instant::now()));
        generation += 1;
        assert!(push(&mut st, &all, &table, generation, "x").is_none());

        // The address moves to another workload: that one answers it, the
        // first one is no longer held.
        table.insert("net/10.0.0.1".into(), ["w2".to_string()].into());
        st.mark_snapshot(Pending::at(Instant::now()));
        generation += 1;
        let p = push(&mut st, &all, &table, generation, "n3").unwrap();
        assert_eq!(names(&p.delta), (vec!["w2"], vec!["w1"]));
        assert_eq!(p.delta.aliases["w2"], ["net/10.0.0.1"]);
        st.on_request(&ack("n3"), SystemTime::now());

        // The workload goes: it and the address name are removed.
        all.remove("w2");
        table.clear();
        st.mark_snapshot(Pending::at(Instant::now()));
        generation += 1;
        let p = push(&mut st, &all, &table, generation, "n4").unwrap();
        assert_eq!(names(&p.delta), (vec![], vec!["w2", "net/10.0.0.1"]));
        st.on_request(&ack("n4"), SystemTime::now());
        assert_eq!(held(&st), ["a"]);
        // Unsubscribing the address names forgets them without a push.
        st.on_request(
            &request(&[], &["net/10.0.0.1", "net/10.0.0.9"]),
            SystemTime::now(),
        );
        assert!(st.subscription().names.is_empty());
    }

    /// Pushes over the change log must equal full diffs. Drives one state
    /// through pseudo-random snapshots, subscriptions, ACKs and NACKs and
    /// checks every push against a full merge diff.
    #[test]
    fn changed_name_diffs_equal_full_diffs() {
        let names = ["a", "b", "c", "d", "e", "f"];
        // A small deterministic generator (xorshift), so failures reproduce.
        let mut next = test_support::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut feed = Feed::new(&[("a", "0"), ("b", "0")]);
        let mut st = TypeState::new(&request(&["*"], &[]));
        let mut nonce = 0;
        let mut over_changes = 0;
        for round in 0..2_000 {
            match next(6) {
                0 | 1 => {
                    let revs: Vec<String> = names.iter().map(|_| next(3).to_string()).collect();
                    let items: Vec<(&str, &str)> = names
                        .iter()
                        .zip(&revs)
                        .filter(|_| next(4) != 0)
                        .map(|(n, r)| (*n, r.as_str()))
                        .collect();
                    feed.publish(&items, &mut [&mut st]);
                }
                2 => {
                    let name = names[next(names.len())];
                    let wildcard = ["*"];
                    let target: &[&str] = if next(5) == 0 { &wildcard } else { &[name] };
                    let req = if next(2) == 0 {
                        request(target, &[])
                    } else {
                        request(&[], target)
                    };
                    st.on_request(&req, SystemTime::now());
                }
                3 | 4 => {
                    if let Some(n) = st.in_flight_nonce().map(str::to_string) {
                        let req = if next(4) == 0 {
                            nack(&n, "no")
                        } else {
                            ack(&n)
                        };
                        st.on_request(&req, SystemTime::now());
                    }
                }
                _ => {}
            }
            let full = st.diff(feed.served.of_type(T));
            if st
                .base
                .and_then(|base| feed.log.since(base, feed.generation, T, None))
                .is_some_and(|changed| !changed.is_empty())
            {
                over_changes += 1;
            }
            let fast = st.diff_current(&feed.current());
            let key = test_support::comparable;
            assert_eq!(key(&fast), key(&full), "round {round}: {st:?}");
            nonce += 1;
            feed.push(&mut st, &format!("n{nonce}"));
        }
        // Both paths were exercised.
        assert!((100..1_500).contains(&over_changes), "{over_changes}");
    }
}
