//! On-demand DNS: the address of a workload known only by a hostname (a
//! ServiceEntry endpoint written as a DNS name, or a `resolution: DNS`
//! entry without endpoints), looked up when a connection is routed to it.
//! Upstream ztunnel does the same in `DemandProxyState::resolve_on_demand_dns`
//! (istio/ztunnel `src/state.rs`): a lookup per connection that needs one,
//! an address picked at random, the client's IP family preferred.
//!
//! - The query goes to the DNS proxy's upstream resolvers ([`Forwarder`]:
//!   `--dns-server`, else ztunnel's own resolv.conf) through the pod's
//!   sockets, as forwarded queries do, so it leaves from where the
//!   connection will (the pod's network namespace in in-pod mode).
//! - Which record types ([`lookup_order`]): a service restricted to one IP
//!   family asks for that one only; otherwise the client's family first,
//!   and the other only when the first has no address.
//! - Each answer is cached per pod, per (hostname, record type), for the
//!   lowest TTL of its address records; a failed or empty lookup for
//!   [`OnDemandConfig::negative_ttl`]. The cache holds at most
//!   [`OnDemandConfig::capacity`] entries: past that, expired ones go, then
//!   the one closest to expiry. The clock is injected ([`Clock`]).
//! - Concurrent misses for one (hostname, record type) share one query: the
//!   first asks, the others wait for its answer and read it from the cache,
//!   so a burst of new connections to a cold name sends one query.
//!
//! - The name is expanded as a stub resolver expands it, with the search
//!   list and `ndots` of ztunnel's resolv.conf ([`OnDemandConfig::search`],
//!   [`SearchList::candidates`]): a name with fewer dots than `ndots` is
//!   asked with each search domain first, then as written; one with more,
//!   as written first; a trailing dot makes it absolute. The next name is
//!   asked only when one has no address (NXDOMAIN or an empty answer); a
//!   failure or another answer code ends the lookup. Upstream ztunnel
//!   resolves with hickory-resolver configured by `read_system_conf()`
//!   (istio/ztunnel `src/config.rs`, `construct_config`, its
//!   `dns_resolver_cfg` / `dns_resolver_opts`): the same file's search
//!   list and ndots; the order here is glibc's (resolv.conf(5)).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::resolv_conf::SearchList;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use proxy_core::store::IpFamily;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};

use super::Forwarder;
use super::forwarder::Protocol;
use crate::proxy::PodSockets;

/// How many answers one pod keeps, by default.
pub const DEFAULT_CAPACITY: usize = 256;
/// How long a failed or empty lookup is remembered, by default.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{hostname:?} is not a DNS name: {reason}")]
    BadName { hostname: String, reason: String },
    #[error("the resolvers have no {record_type} record for {hostname} (answer: {rcode})")]
    NoAddress {
        hostname: String,
        record_type: RecordType,
        rcode: ResponseCode,
    },
    #[error("looking up {record_type} {hostname} failed: {reason}")]
    Failed {
        hostname: String,
        record_type: RecordType,
        reason: String,
    },
}

/// Bounds of the per-pod cache, and how names are expanded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OnDemandConfig {
    /// Entries kept per pod.
    pub capacity: usize,
    /// How long a failed or empty lookup is answered from the cache.
    #[serde(serialize_with = "seconds")]
    pub negative_ttl: Duration,
    /// The search list and `ndots` of ztunnel's resolv.conf.
    pub search: SearchList,
}

impl Default for OnDemandConfig {
    fn default() -> Self {
        OnDemandConfig {
            capacity: DEFAULT_CAPACITY,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            search: SearchList::default(),
        }
    }
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Where "now" comes from: the system's monotonic clock in production, a
/// hand-moved one in tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The record types to ask for, in order: only the family a service is
/// restricted to, else the client's family (that of the address it
/// connected to) first.
pub fn lookup_order(families: Option<IpFamily>, client: IpAddr) -> Vec<RecordType> {
    match families {
        Some(IpFamily::Ipv4) => vec![RecordType::A],
        Some(IpFamily::Ipv6) => vec![RecordType::AAAA],
        Some(IpFamily::Dual) | None if client.is_ipv6() => vec![RecordType::AAAA, RecordType::A],
        Some(IpFamily::Dual) | None => vec![RecordType::A, RecordType::AAAA],
    }
}

type InFlight = Mutex<HashMap<(String, RecordType), Arc<tokio::sync::Mutex<()>>>>;

/// The right to ask for one key while others wait. Dropping it (answer
/// stored, or the asker cancelled) forgets the key's lock before releasing
/// it, so the map holds only keys being asked.
struct Turn<'a> {
    in_flight: &'a InFlight,
    key: &'a (String, RecordType),
    lock: Arc<tokio::sync::Mutex<()>>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl<'a> Turn<'a> {
    async fn take(in_flight: &'a InFlight, key: &'a (String, RecordType)) -> Turn<'a> {
        let lock = Arc::clone(
            in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let held = Arc::clone(&lock).lock_owned().await;
        Turn {
            in_flight,
            key,
            lock,
            _held: held,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight
            .get(self.key)
            .is_some_and(|l| Arc::ptr_eq(l, &self.lock))
        {
            in_flight.remove(self.key);
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    answer: Result<Vec<IpAddr>, Error>,
    expires: Instant,
}

/// One pod's on-demand lookups and their cache.
#[derive(Debug)]
pub struct OnDemand {
    forwarder: Forwarder,
    config: OnDemandConfig,
    clock: Arc<dyn Clock>,
    entries: Mutex<HashMap<(String, RecordType), Entry>>,
    /// Lookups being asked now, one lock per key: held by the asker,
    /// awaited by the others.
    in_flight: InFlight,
}

impl OnDemand {
    pub fn new(forwarder: Forwarder, config: OnDemandConfig, clock: Arc<dyn Clock>) -> Self {
        OnDemand {
            forwarder,
            config,
            clock,
            entries: Mutex::default(),
            in_flight: Mutex::default(),
        }
    }

    /// One address of `hostname`, asked from `sockets` for the record types
    /// of `order` ([`lookup_order`]) until one has addresses: picked at
    /// random among them. The error is the first record type's.
    pub async fn resolve(
        &self,
        sockets: &dyn PodSockets,
        hostname: &str,
        order: &[RecordType],
    ) -> Result<IpAddr, Error> {
        let mut first_error = None;
        for &record_type in order {
            match self.addresses(sockets, hostname, record_type).await {
                Ok(ips) => {
                    if let Some(ip) = ips.choose(&mut rand::rng()) {
                        return Ok(*ip);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::Failed {
            hostname: hostname.to_string(),
            record_type: RecordType::A,
            reason: "no record type to ask for".into(),
        }))
    }

    /// The `record_type` addresses of `hostname`: from the cache while its
    /// entry lives, else asked (and cached). Never empty when `Ok`.
    pub async fn addresses(
        &self,
        sockets: &dyn PodSockets,
        hostname: &str,
        record_type: RecordType,
    ) -> Result<Vec<IpAddr>, Error> {
        let key = (hostname.to_ascii_lowercase(), record_type);
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let names = self.names(hostname)?;
        let _turn = Turn::take(&self.in_flight, &key).await;
        // Whoever held the turn before has stored its answer.
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let (answer, ttl) = match self.ask_each(sockets, names, record_type).await {
            Ok((ips, ttl)) if !ips.is_empty() => (Ok(ips), ttl),
            Ok((_, _)) => (
                Err(Error::NoAddress {
                    hostname: hostname.to_string(),
                    record_type,
                    rcode: ResponseCode::NoError,
                }),
                self.config.negative_ttl,
            ),
            Err(Asked::Rcode(rcode)) => (
                Err(Error::NoAddress {
                    hostname: hostname.to_string(),
                    record_type,
                    rcode,
                }),
                self.config.negative_ttl,
            ),
            Err(Asked::Failed(reason)) => (
                Err(Error::Failed {
                    hostname: hostname.to_string(),
                    record_type,
                    reason,
                }),
                self.config.negative_ttl,
            ),
        };
        self.store(key.clone(), answer.clone(), ttl);
        answer
    }

    fn cached(&self, key: &(String, RecordType)) -> Option<Result<Vec<IpAddr>, Error>> {
        let now = self.clock.now();
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|e| e.expires > now)
            .map(|e| e.answer.clone())
    }

    fn store(&self, key: (String, RecordType), answer: Result<Vec<IpAddr>, Error>, ttl: Duration) {
        if self.config.capacity == 0 {
            return;
        }
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if !entries.contains_key(&key) && entries.len() >= self.config.capacity {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.config.capacity
                && let Some(soonest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&soonest);
            }
        }
        entries.insert(
            key,
            Entry {
                answer,
                expires: now + ttl,
            },
        );
    }

    /// The names asked for `hostname`, in order: its search-list expansions
    /// ([`SearchList::candidates`]); one that grows past a DNS name's
    /// length with a search domain is left out.
    fn names(&self, hostname: &str) -> Result<Vec<Name>, Error> {
        absolute(hostname)?;
        Ok(self
            .config
            .search
            .candidates(hostname)
            .iter()
            .filter_map(|n| Name::from_ascii(n).ok())
            .collect())
    }

    /// The first of `names` with an address; asking stops at a failure or
    /// an answer code other than NXDOMAIN. With no name answering, the last
    /// one's outcome.
    async fn ask_each(
        &self,
        sockets: &dyn PodSockets,
        names: Vec<Name>,
        record_type: RecordType,
    ) -> Result<(Vec<IpAddr>, Duration), Asked> {
        let mut last = Ok((Vec::new(), Duration::ZERO));
        for name in names {
            match self.ask(sockets, name, record_type).await {
                Ok((ips, ttl)) if !ips.is_empty() => return Ok((ips, ttl)),
                none @ (Ok(_) | Err(Asked::Rcode(ResponseCode::NXDomain))) => last = none,
                ended => return ended,
            }
        }
        last
    }

    /// The addresses and lowest TTL of the upstream answer; UDP first, TCP
    /// when the answer is truncated.
    async fn ask(
        &self,
        sockets: &dyn PodSockets,
        name: Name,
        record_type: RecordType,
    ) -> Result<(Vec<IpAddr>, Duration), Asked> {
        let mut query = Message::new();
        query
            .set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name, record_type));
        let mut answer = self
            .forwarder
            .forward(sockets, &query, Protocol::Udp)
            .await
            .map_err(|e| Asked::Failed(e.to_string()))?;
        if answer.truncated() {
            answer = self
                .forwarder
                .forward(sockets, &query, Protocol::Tcp)
                .await
                .map_err(|e| Asked::Failed(e.to_string()))?;
        }
        if answer.response_code() != ResponseCode::NoError {
            return Err(Asked::Rcode(answer.response_code()));
        }
        let mut ttl = u32::MAX;
        let ips: Vec<IpAddr> = answer
            .answers()
            .iter()
            .filter_map(|r| {
                let ip = match (r.data(), record_type) {
                    (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
                    (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
                    _ => return None,
                };
                ttl = ttl.min(r.ttl());
                Some(ip)
            })
            .collect();
        Ok((ips, Duration::from_secs(u64::from(ttl))))
    }

    /// The live cache entries, for `/config_dump`: hostname, record type,
    /// addresses or error, seconds left.
    pub fn dump(&self) -> Value {
        let now = self.clock.now();
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut live: Vec<(&(String, RecordType), &Entry)> =
            entries.iter().filter(|(_, e)| e.expires > now).collect();
        live.sort_by(|a, b| a.0.0.cmp(&b.0.0).then(a.0.1.cmp(&b.0.1)));
        Value::Array(
            live.into_iter()
                .map(|((hostname, record_type), e)| {
                    let left = e.expires.saturating_duration_since(now).as_secs();
                    match &e.answer {
                        Ok(ips) => json!({
                            "hostname": hostname,
                            "recordType": record_type.to_string(),
                            "addresses": ips,
                            "expiresInSeconds": left,
                        }),
                        Err(error) => json!({
                            "hostname": hostname,
                            "recordType": record_type.to_string(),
                            "error": error.to_string(),
                            "expiresInSeconds": left,
                        }),
                    }
                })
                .collect(),
        )
    }
}

enum Asked {
    Rcode(ResponseCode),
    Failed(String),
}

fn absolute(hostname: &str) -> Result<Name, Error> {
    let bad = |reason: String| Error::BadName {
        hostname: hostname.to_string(),
        reason,
    };
    if hostname.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let mut name = Name::from_ascii(hostname).map_err(|e| bad(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::testing::{DUAL_TTL_A, DUAL_V4, DUAL_V6, KNOWN_ADDRESS, TestResolver};
    use crate::proxy::LocalSockets;

    /// A clock that moves only when told.
    #[derive(Debug)]
    struct HandClock(Mutex<Instant>);

    impl HandClock {
        fn new() -> Arc<Self> {
            Arc::new(HandClock(Mutex::new(Instant::now())))
        }
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for HandClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn setup(config: OnDemandConfig) -> (TestResolver, OnDemand, Arc<HandClock>) {
        let resolver = TestResolver::start(ip("127.0.0.1")).await;
        let clock = HandClock::new();
        let forwarder = Forwarder::new(vec![resolver.addr], Duration::from_secs(5));
        let on_demand = OnDemand::new(forwarder, config, clock.clone());
        (resolver, on_demand, clock)
    }

    fn sockets() -> LocalSockets {
        LocalSockets::new(ip("127.0.0.1"))
    }

    fn asked(resolver: &TestResolver, name: &str) -> Vec<RecordType> {
        resolver
            .seen_types()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, t)| t)
            .collect()
    }

    #[test]
    fn the_service_family_restricts_and_the_client_family_comes_first() {
        use RecordType::{A, AAAA};
        let v4 = ip("10.96.0.1");
        let v6 = ip("fd00::1");
        assert_eq!(lookup_order(Some(IpFamily::Ipv4), v6), [A]);
        assert_eq!(lookup_order(Some(IpFamily::Ipv6), v4), [AAAA]);
        assert_eq!(lookup_order(Some(IpFamily::Dual), v4), [A, AAAA]);
        assert_eq!(lookup_order(Some(IpFamily::Dual), v6), [AAAA, A]);
        assert_eq!(lookup_order(None, v4), [A, AAAA]);
        assert_eq!(lookup_order(None, v6), [AAAA, A]);
    }

    #[tokio::test]
    async fn answers_are_cached_for_their_ttl() {
        let (resolver, on_demand, clock) = setup(OnDemandConfig::default()).await;
        let order = lookup_order(None, ip("10.96.0.1"));
        for _ in 0..3 {
            let got = on_demand.resolve(&sockets(), "Dual.Example", &order).await;
            assert_eq!(got, Ok(IpAddr::V4(DUAL_V4)));
        }
        assert_eq!(asked(&resolver, "dual.example."), [RecordType::A]);

        clock.advance(Duration::from_secs(u64::from(DUAL_TTL_A) - 1));
        on_demand
            .resolve(&sockets(), "dual.example", &order)
            .await
            .unwrap();
        assert_eq!(asked(&resolver, "dual.example.").len(), 1);

        clock.advance(Duration::from_secs(1));
        on_demand
            .resolve(&sockets(), "dual.example", &order)
            .await
            .unwrap();
        assert_eq!(
            asked(&resolver, "dual.example."),
            [RecordType::A, RecordType::A]
        );
    }

    #[tokio::test]
    async fn the_other_family_is_asked_when_the_first_has_no_address() {
        let (resolver, on_demand, _) = setup(OnDemandConfig::default()).await;
        let v6_client = lookup_order(None, ip("fd00::1"));
        assert_eq!(
            on_demand
                .resolve(&sockets(), "dual.example", &v6_client)
                .await,
            Ok(IpAddr::V6(DUAL_V6))
        );
        // No AAAA for known.example: its A record serves.
        assert_eq!(
            on_demand
                .resolve(&sockets(), "known.example", &v6_client)
                .await,
            Ok(IpAddr::V4(KNOWN_ADDRESS))
        );
        assert_eq!(
            asked(&resolver, "known.example."),
            [RecordType::AAAA, RecordType::A]
        );
        // Restricted to IPv6: no fallback.
        let v6_only = lookup_order(Some(IpFamily::Ipv6), ip("10.96.0.1"));
        let err = on_demand
            .resolve(&sockets(), "known.example", &v6_only)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the resolvers have no AAAA record for known.example (answer: No Error)"
        );
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_query() {
        let (resolver, on_demand, _) = setup(OnDemandConfig::default()).await;
        let order = lookup_order(None, ip("10.96.0.1"));
        let sockets = sockets();
        let lookups = (0..16).map(|_| on_demand.resolve(&sockets, "dual.example", &order));
        for got in futures::future::join_all(lookups).await {
            assert_eq!(got, Ok(IpAddr::V4(DUAL_V4)));
        }
        assert_eq!(asked(&resolver, "dual.example."), [RecordType::A]);
        assert!(on_demand.in_flight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_lookup_is_cached_briefly() {
        let config = OnDemandConfig {
            negative_ttl: Duration::from_secs(5),
            ..OnDemandConfig::default()
        };
        let (resolver, on_demand, clock) = setup(config.clone()).await;
        let order = [RecordType::A];
        for _ in 0..2 {
            let err = on_demand
                .resolve(&sockets(), "missing.example", &order)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::NoAddress {
                        rcode: ResponseCode::NXDomain,
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert_eq!(asked(&resolver, "missing.example.").len(), 1);
        clock.advance(Duration::from_secs(5));
        on_demand
            .resolve(&sockets(), "missing.example", &order)
            .await
            .unwrap_err();
        assert_eq!(asked(&resolver, "missing.example.").len(), 2);

        // Nothing answering at all: a failure naming the resolver.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let forwarder = Forwarder::new(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(100),
        );
        let on_demand = OnDemand::new(forwarder, config.clone(), HandClock::new());
        let err = on_demand
            .resolve(&sockets(), "known.example", &order)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err}");
        assert!(err.to_string().contains("did not answer"), "{err}");
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_dumped() {
        let config = OnDemandConfig {
            capacity: 2,
            ..OnDemandConfig::default()
        };
        let (resolver, on_demand, _) = setup(config).await;
        let a = [RecordType::A];
        let aaaa = [RecordType::AAAA];
        // dual AAAA (TTL 30) expires before dual A (60) and known A (60).
        on_demand
            .resolve(&sockets(), "dual.example", &aaaa)
            .await
            .unwrap();
        on_demand
            .resolve(&sockets(), "dual.example", &a)
            .await
            .unwrap();
        on_demand
            .resolve(&sockets(), "known.example", &a)
            .await
            .unwrap();
        let dump = on_demand.dump();
        let kept: Vec<(String, String)> = dump
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["hostname"].as_str().unwrap().to_string(),
                    e["recordType"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("dual.example".to_string(), "A".to_string()),
                ("known.example".to_string(), "A".to_string())
            ]
        );
        assert_eq!(dump[1]["addresses"][0], KNOWN_ADDRESS.to_string());
        // The evicted one is asked again.
        on_demand
            .resolve(&sockets(), "dual.example", &aaaa)
            .await
            .unwrap();
        assert_eq!(asked(&resolver, "dual.example.").len(), 3);
    }

    #[tokio::test]
    async fn a_hostname_that_is_not_a_name_is_refused_without_a_query() {
        let (resolver, on_demand, _) = setup(OnDemandConfig::default()).await;
        let too_long = format!("{}.example", "a".repeat(64));
        let err = on_demand
            .resolve(&sockets(), &too_long, &[RecordType::A])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BadName { .. }), "{err}");
        assert!(resolver.seen().is_empty());
    }

    fn searching(domains: &[&str], ndots: u8) -> OnDemandConfig {
        OnDemandConfig {
            search: SearchList {
                domains: domains.iter().map(|d| d.to_string()).collect(),
                ndots,
            },
            ..OnDemandConfig::default()
        }
    }

    /// One A lookup of `hostname` with a search list: its answer and the
    /// names the resolver was asked, in order.
    async fn lookup_with(
        domains: &[&str],
        ndots: u8,
        hostname: &str,
    ) -> (Result<IpAddr, Error>, Vec<String>) {
        let (resolver, on_demand, _) = setup(searching(domains, ndots)).await;
        let got = on_demand
            .resolve(&sockets(), hostname, &[RecordType::A])
            .await;
        let asked = resolver.seen().into_iter().map(|(n, _)| n).collect();
        (got, asked)
    }

    #[tokio::test]
    async fn a_short_name_tries_the_search_domains_first() {
        let (got, asked) = lookup_with(&["demo.svc.cluster.local", "example"], 2, "known").await;
        assert_eq!(got, Ok(IpAddr::V4(KNOWN_ADDRESS)));
        assert_eq!(asked, ["known.demo.svc.cluster.local.", "known.example."]);
    }

    #[tokio::test]
    async fn ndots_decides_whether_the_name_as_written_goes_first() {
        let (got, asked) = lookup_with(&["svc.cluster.local"], 1, "known.example").await;
        assert_eq!(got, Ok(IpAddr::V4(KNOWN_ADDRESS)));
        assert_eq!(asked, ["known.example."]);

        let (got, asked) = lookup_with(&["svc.cluster.local"], 5, "known.example").await;
        assert_eq!(got, Ok(IpAddr::V4(KNOWN_ADDRESS)));
        assert_eq!(
            asked,
            ["known.example.svc.cluster.local.", "known.example."]
        );
    }

    #[tokio::test]
    async fn a_trailing_dot_is_asked_alone() {
        let (got, asked) = lookup_with(&["svc.cluster.local"], 5, "missing.example.").await;
        let rcode = match got {
            Err(Error::NoAddress { rcode, .. }) => rcode,
            other => panic!("expected no address, got {other:?}"),
        };
        assert_eq!(rcode, ResponseCode::NXDomain);
        assert_eq!(asked, ["missing.example."]);
    }
}
