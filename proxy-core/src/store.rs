//! The workload store: every workload, service and L4 policy the proxy
//! knows, in our own validated types, with the lookups the data path needs.
//!
//! It knows nothing about xDS. Readers take an immutable [`Snapshot`]
//! (lock-free, via arc-swap); a writer applies a whole batch of updates (one
//! xDS response) to a copy of the current snapshot and publishes it at once.
//! The indexes are copy-on-write sharded maps, so the copy shares everything
//! the batch did not touch: updating one workload among 10,000 copies a few
//! small shards, not the store.

mod dump;
mod service;
mod shards;
mod workload;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::authorization::{Authorization, Policies, Scope};
use shards::ShardedMap;

pub use dump::SnapshotDump;
pub use service::{
    AppProtocol, Endpoint, Endpoints, HealthPolicy, IpFamily, LoadBalancing, LoadBalancingMode,
    LoadBalancingScope, Service,
};
pub(crate) use workload::ip_from_bytes;
pub use workload::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus,
    InboundProtocol, Locality, NamespacedHostname, NetworkAddress, NetworkMode, PortMapping,
    Workload, WorkloadType,
};

/// Why a resource could not be taken into the store. Each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{field}: {len} bytes is not an IP address (IPv4 has 4 bytes, IPv6 16)")]
    AddressLength { field: String, len: usize },
    #[error("identity: {source}")]
    Identity {
        #[source]
        source: api::IdentityError,
    },
    #[error("{field}: unknown value {value}; is this proxy older than the control plane?")]
    UnknownEnum { field: String, value: i32 },
    #[error("{field} is required")]
    Missing { field: String },
    #[error("{field}: {value:?} is not of the form <namespace>/<hostname>")]
    NamespacedHostname { field: String, value: String },
    #[error("{field}: port {value} is out of range (0-65535)")]
    Port { field: String, value: u32 },
}

/// A workload or a service, as found by address or hostname.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// Workloads and services of one IP, usually exactly one.
type ByIp<T> = ShardedMap<IpAddr, Vec<Arc<T>>>;

/// Where a policy applies, for the scope index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PolicyScope {
    Global,
    Namespace(String),
}

/// One immutable view of the store. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    workloads: ShardedMap<String, Arc<Workload>>,
    workloads_by_ip: ByIp<Workload>,
    services: ShardedMap<NamespacedHostname, Arc<Service>>,
    services_by_vip: ByIp<Service>,
    services_by_hostname: ShardedMap<String, Vec<Arc<Service>>>,
    /// By service key, whether or not the service itself has arrived yet
    /// (workloads and services come in any order).
    endpoints: ShardedMap<NamespacedHostname, Arc<Endpoints>>,
    policies: ShardedMap<String, Arc<Authorization>>,
    policies_by_scope: ShardedMap<PolicyScope, BTreeSet<String>>,
    /// Bumped whenever a policy is inserted or removed.
    policy_generation: u64,
}

impl Snapshot {
    /// Changes whenever any policy was added, replaced or removed: whoever
    /// re-evaluates decisions can skip snapshots where it stayed the same
    /// (together with the workload itself, compared by `Arc` identity).
    pub fn policy_generation(&self) -> u64 {
        self.policy_generation
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    /// The workload holding `ip` in `network`. When several claim it (a pod
    /// and a WorkloadEntry, say), pods win, then workloads in the mesh, as
    /// upstream ranks them. Host-network workloads are never found by IP.
    pub fn workload_by_address(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workloads_by_ip
            .get(&ip)?
            .iter()
            .filter(|w| w.network == network)
            .max_by_key(|w| {
                (
                    w.uid.contains("//Pod/"),
                    w.protocol == InboundProtocol::Hbone,
                )
            })
            .cloned()
    }

    pub fn service_by_vip(&self, network: &str, vip: IpAddr) -> Option<Arc<Service>> {
        self.services_by_vip
            .get(&vip)?
            .iter()
            .find(|s| {
                s.vips
                    .iter()
                    .any(|v| v.address == vip && v.network == network)
            })
            .cloned()
    }

    /// A workload first, then a service VIP: the destination of a connection.
    pub fn address(&self, network: &str, ip: IpAddr) -> Option<Address> {
        self.workload_by_address(network, ip)
            .map(Address::Workload)
            .or_else(|| self.service_by_vip(network, ip).map(Address::Service))
    }

    /// The service `namespace/hostname`.
    pub fn service(&self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// Every service with this hostname (one per namespace defining it).
    pub fn services_by_hostname(&self, hostname: &str) -> Vec<Arc<Service>> {
        self.services_by_hostname
            .get(hostname)
            .cloned()
            .unwrap_or_default()
    }

    /// The service a client in `client_namespace` means by `hostname`: the
    /// one in its own namespace, else the canonical one, else any.
    pub fn service_by_hostname(
        &self,
        client_namespace: &str,
        hostname: &str,
    ) -> Option<Arc<Service>> {
        self.service_by_hostname_where(client_namespace, hostname, |_| true)
    }

    /// As [`Self::service_by_hostname`], among the services `accept` takes.
    pub fn service_by_hostname_where(
        &self,
        client_namespace: &str,
        hostname: &str,
        accept: impl Fn(&Service) -> bool,
    ) -> Option<Arc<Service>> {
        let candidates: Vec<&Arc<Service>> = self
            .services_by_hostname
            .get(hostname)?
            .iter()
            .filter(|s| accept(s))
            .collect();
        candidates
            .iter()
            .find(|s| s.namespace == client_namespace)
            .or_else(|| candidates.iter().find(|s| s.canonical))
            .or_else(|| candidates.first())
            .map(|s| Arc::clone(s))
    }

    /// All endpoints of a service, healthy or not.
    pub fn endpoints(&self, service: &NamespacedHostname) -> Option<Arc<Endpoints>> {
        self.endpoints.get(service).cloned()
    }

    /// The endpoints that take traffic: healthy ones, or all when the
    /// service's health policy allows it.
    pub fn ready_endpoints(&self, service: &Service) -> Vec<Endpoint> {
        self.endpoints
            .get(&service.key())
            .map(|eps| {
                eps.values()
                    .filter(|e| service.accepts(e.workload.status))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What a gateway address (a waypoint, a network gateway) points at.
    pub fn resolve_gateway(&self, gateway: &GatewayAddress) -> Option<Address> {
        match &gateway.destination {
            GatewayDestination::Address(a) => self.address(&a.network, a.address),
            GatewayDestination::Hostname(h) => self.service(h).map(Address::Service),
        }
    }

    /// The waypoint a workload's inbound traffic must go through, if any.
    pub fn workload_waypoint(&self, workload: &Workload) -> Option<Address> {
        self.resolve_gateway(workload.waypoint.as_ref()?)
    }

    /// The waypoint a service's traffic must go through, if any.
    pub fn service_waypoint(&self, service: &Service) -> Option<Address> {
        self.resolve_gateway(service.waypoint.as_ref()?)
    }

    pub fn policy(&self, key: &str) -> Option<Arc<Authorization>> {
        self.policies.get(key).cloned()
    }

    /// The policies that apply to a workload: mesh-wide ones, its namespace's,
    /// and the selector-scoped ones it lists. Listed keys the store does not
    /// hold are reported as missing (the check then fails closed).
    pub fn policies_for(&self, workload: &Workload) -> Policies {
        let scoped = |scope: &PolicyScope| {
            self.policies_by_scope
                .get(scope)
                .into_iter()
                .flat_map(|keys| keys.iter())
        };
        let keys: BTreeSet<&str> = scoped(&PolicyScope::Global)
            .chain(scoped(&PolicyScope::Namespace(workload.namespace.clone())))
            .map(String::as_str)
            .chain(workload.authorization_policies.iter().map(String::as_str))
            .collect();
        let mut policies = Policies::default();
        for key in keys {
            match self.policies.get(key) {
                // A selector-scoped policy applies only where listed; a
                // workload listing a global policy must not apply it twice
                // (the keys are a set).
                Some(p)
                    if p.scope.applies(
                        &p.namespace,
                        &p.key(),
                        &workload.namespace,
                        &workload.authorization_policies,
                    ) =>
                {
                    policies.applied.push(p.clone());
                }
                Some(_) => {}
                None => policies.missing.push(key.to_string()),
            }
        }
        policies
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    /// The JSON view `/config_dump` serves.
    pub fn dump(&self) -> SnapshotDump<'_> {
        SnapshotDump::new(self)
    }

    fn insert_workload(&mut self, workload: Workload) {
        self.remove_workload(&workload.uid);
        let workload = Arc::new(workload);
        if workload.network_mode != NetworkMode::HostNetwork {
            for ip in &workload.addresses {
                let w = workload.clone();
                self.workloads_by_ip
                    .update(ip, Vec::new, |ws| ws.push(w), Vec::is_empty);
            }
        }
        for (service, ports) in &workload.services {
            let endpoint = Endpoint {
                workload: workload.clone(),
                ports: ports.clone(),
            };
            self.endpoints.update(
                service,
                Default::default,
                |eps| {
                    Arc::make_mut(eps).insert(workload.uid.clone(), endpoint);
                },
                |eps| eps.is_empty(),
            );
        }
        self.workloads.insert(workload.uid.clone(), workload);
    }

    fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        for ip in &old.addresses {
            self.workloads_by_ip.update(
                ip,
                Vec::new,
                |ws| ws.retain(|w| w.uid != old.uid),
                Vec::is_empty,
            );
        }
        for service in old.services.keys() {
            self.endpoints.update(
                service,
                Default::default,
                |eps| {
                    Arc::make_mut(eps).remove(uid);
                },
                |eps| eps.is_empty(),
            );
        }
        Some(old)
    }

    fn insert_service(&mut self, service: Service) {
        let key = service.key();
        self.remove_service(&key);
        let service = Arc::new(service);
        for vip in &service.vips {
            let s = service.clone();
            self.services_by_vip
                .update(&vip.address, Vec::new, |ss| ss.push(s), Vec::is_empty);
        }
        let s = service.clone();
        self.services_by_hostname.update(
            service.hostname.as_str(),
            Vec::new,
            |ss| ss.push(s),
            Vec::is_empty,
        );
        self.services.insert(key, service);
    }

    fn remove_service(&mut self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        for vip in &old.vips {
            self.services_by_vip.update(
                &vip.address,
                Vec::new,
                |ss| ss.retain(|s| !Arc::ptr_eq(s, &old)),
                Vec::is_empty,
            );
        }
        self.services_by_hostname.update(
            old.hostname.as_str(),
            Vec::new,
            |ss| ss.retain(|s| !Arc::ptr_eq(s, &old)),
            Vec::is_empty,
        );
        Some(old)
    }

    fn insert_policy(&mut self, policy: Authorization) {
        let key = policy.key();
        self.remove_policy(&key);
        self.policy_generation += 1;
        if let Some(scope) = policy_scope(&policy) {
            self.policies_by_scope.update(
                &scope,
                BTreeSet::new,
                |keys| {
                    keys.insert(key.clone());
                },
                BTreeSet::is_empty,
            );
        }
        self.policies.insert(key, Arc::new(policy));
    }

    fn remove_policy(&mut self, key: &str) -> Option<Arc<Authorization>> {
        let old = self.policies.remove(key)?;
        self.policy_generation += 1;
        if let Some(scope) = policy_scope(&old) {
            self.policies_by_scope.update(
                &scope,
                BTreeSet::new,
                |keys| {
                    keys.remove(key);
                },
                BTreeSet::is_empty,
            );
        }
        Some(old)
    }
}

fn policy_scope(policy: &Authorization) -> Option<PolicyScope> {
    match policy.scope {
        Scope::Global => Some(PolicyScope::Global),
        Scope::Namespace => Some(PolicyScope::Namespace(policy.namespace.clone())),
        Scope::WorkloadSelector => None,
    }
}

/// A batch of changes, published as one new snapshot when the batch ends.
pub struct Batch {
    next: Snapshot,
}

impl Batch {
    /// Adds or replaces the workload with this uid.
    pub fn insert_workload(&mut self, workload: Workload) {
        self.next.insert_workload(workload);
    }

    pub fn remove_workload(&mut self, uid: &str) -> bool {
        self.next.remove_workload(uid).is_some()
    }

    /// Adds or replaces the service with this `namespace/hostname`.
    pub fn insert_service(&mut self, service: Service) {
        self.next.insert_service(service);
    }

    pub fn remove_service(&mut self, key: &NamespacedHostname) -> bool {
        self.next.remove_service(key).is_some()
    }

    /// Removes whatever an `Address` resource name refers to: a workload by
    /// uid, else a service by `namespace/hostname`.
    pub fn remove_address(&mut self, name: &str) -> bool {
        self.remove_workload(name)
            || name
                .parse::<NamespacedHostname>()
                .is_ok_and(|key| self.remove_service(&key))
    }

    /// Adds or replaces the policy with this `namespace/name`.
    pub fn insert_policy(&mut self, policy: Authorization) {
        self.next.insert_policy(policy);
    }

    pub fn remove_policy(&mut self, key: &str) -> bool {
        self.next.remove_policy(key).is_some()
    }

    /// What the batch has built so far.
    pub fn snapshot(&self) -> &Snapshot {
        &self.next
    }
}

/// The store handle: clone it freely; all clones share one state.
#[derive(Clone, Default)]
pub struct WorkloadStore {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Snapshot>,
    /// Serialises writers; readers never take it.
    writer: Mutex<()>,
    /// Bumped after every published batch.
    changes: watch::Sender<u64>,
    /// Whether the store has held a complete state once (set by whoever
    /// feeds it: the xDS client's first full sync). Never unset: after a
    /// lost connection the last complete state keeps serving.
    synced: watch::Sender<bool>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            current: ArcSwap::default(),
            writer: Mutex::default(),
            changes: watch::Sender::new(0),
            synced: watch::Sender::new(false),
        }
    }
}

impl std::fmt::Debug for WorkloadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("WorkloadStore")
            .field("workloads", &s.workload_count())
            .field("services", &s.service_count())
            .field("policies", &s.policy_count())
            .finish()
    }
}

impl WorkloadStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state: lock-free, and unaffected by later updates.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// Applies `f`'s changes and publishes them as one new snapshot.
    pub fn update<R>(&self, f: impl FnOnce(&mut Batch) -> R) -> R {
        let _writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut batch = Batch {
            next: Snapshot::clone(&self.inner.current.load()),
        };
        let result = f(&mut batch);
        self.inner.current.store(Arc::new(batch.next));
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        result
    }

    /// Wakes on every published batch (see [`watch::Receiver::changed`]).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The store now holds a complete state (the first full sync). Data
    /// paths that must not act on a partial view wait for this.
    pub fn mark_synced(&self) {
        self.inner
            .synced
            .send_if_modified(|synced| !std::mem::replace(synced, true));
    }

    pub fn is_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Returns once [`Self::mark_synced`] has been called.
    pub async fn synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// The first snapshot for which `find` returns something, waiting for
    /// later batches up to `deadline`; `None` if none came in time.
    pub async fn wait_for<T>(
        &self,
        deadline: std::time::Duration,
        mut find: impl FnMut(&Snapshot) -> Option<T>,
    ) -> Option<T> {
        // Subscribe before looking, so a batch published in between wakes us.
        let mut changes = self.subscribe();
        if let Some(found) = find(&self.snapshot()) {
            return Some(found);
        }
        let waiting = async {
            loop {
                if changes.changed().await.is_err() {
                    return None;
                }
                if let Some(found) = find(&self.snapshot()) {
                    return Some(found);
                }
            }
        };
        tokio::time::timeout(deadline, waiting).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests;
