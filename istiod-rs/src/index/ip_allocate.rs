//! VIPs for ServiceEntries that have none, as upstream's IP
//! auto-allocation (istio/istio pilot/pkg/controllers/ipallocate/ipallocate.go:
//! `IPAllocator`, `statusPatchForAddresses`, `resolveConflict`, `keepHost`;
//! pilot/pkg/networking/serviceentry/ip_autoallocation.go:
//! `shouldV2AutoAllocateIPFromPieces`, `GetHostAddressesFromServiceEntry`).
//!
//! - An entry gets addresses when allocation is on (`PILOT_ENABLE_IP_AUTOALLOCATE`,
//!   [`super::MeshConfig::auto_allocate_ips`]), its resolution is not
//!   `NONE` (unset is `NONE`), its label
//!   `networking.istio.io/enable-autoallocate-ip` is not `false` (any case)
//!   and `spec.addresses` is empty.
//! - Each host of `spec.hosts` gets one IPv4 address of [`IPV4_RANGE`] and
//!   one IPv6 address of [`IPV6_RANGE`]; wildcard hosts get none (upstream
//!   keeps them only for `DYNAMIC_DNS`, which this API version does not
//!   have), a host listed twice is served once.
//! - The status is the durable record: the addresses an entry's
//!   `status.addresses` gives a host are kept, and every address any entry
//!   carries (status, or a user's `spec.addresses`) is in use. What this
//!   allocator handed out and the status does not show yet is remembered, so
//!   a decision holds until its write lands (and, in local mode, the status
//!   files are read back at start: [`IpAllocator::with_recorded`]).
//! - A new address is the first free one after the last handed out,
//!   starting at the range's first address after the network address and
//!   wrapping around at its end.
//! - Two entries carrying the same address: a user's `spec.addresses` wins
//!   over every allocated one; otherwise the entry created first keeps it
//!   (then namespace/name). Each loser gets new addresses for all its
//!   hosts, as upstream's forced reassignment.
//!
//! No I/O: the caller writes the result to the entries' status
//! ([`crate::status`]) and serves it as the entries' VIPs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use api::crd::service_entry::{Resolution, ServiceEntry, ServiceEntryAddress};
use api::labels;
use api::manifest::ObjectKey;

use crate::state::ClusterState;

/// Where IPv4 VIPs come from: 240.240.0.0/16 (upstream's
/// `features.IPAutoallocateIPv4Prefix`).
pub const IPV4_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 240, 0, 0), 16);
/// Where IPv6 VIPs come from: 2001:2::/48 (upstream's
/// `features.IPAutoallocateIPv6Prefix`).
pub const IPV6_RANGE: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48);

/// The addresses each ServiceEntry should carry in `status.addresses`
/// (only entries that get addresses are listed).
pub type Allocations = BTreeMap<ObjectKey, Vec<ServiceEntryAddress>>;

/// Whether upstream's `shouldV2AutoAllocateIPFromPieces` holds for `se`,
/// with allocation turned on.
pub fn wants_addresses(se: &ServiceEntry) -> bool {
    let resolution_none = matches!(se.spec.resolution, None | Some(Resolution::None));
    let opted_out = se
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::ENABLE_AUTOALLOCATE_IP))
        .is_some_and(|v| v.eq_ignore_ascii_case("false"));
    // An unknown resolution leaves the entry unserved (index/service_entries.rs).
    let unknown = matches!(se.spec.resolution, Some(Resolution::Unknown(_)));
    !resolution_none && !unknown && !opted_out && se.spec.addresses.is_empty()
}

/// The hosts that get addresses, each once, in spec order (upstream's
/// `keepHost`: no wildcard host).
fn kept_hosts(se: &ServiceEntry) -> Vec<&str> {
    let mut seen = BTreeSet::new();
    se.spec
        .hosts
        .iter()
        .map(String::as_str)
        .filter(|h| !h.starts_with('*') && seen.insert(*h))
        .collect()
}

/// `status.addresses` grouped by host, values that do not parse skipped
/// (upstream's `GetHostAddressesFromServiceEntry`).
pub fn status_addresses(addresses: &[ServiceEntryAddress]) -> BTreeMap<&str, Vec<IpAddr>> {
    let mut out: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for a in addresses {
        if let Ok(ip) = a.value.parse::<IpAddr>() {
            out.entry(a.host.as_str()).or_default().push(ip);
        }
    }
    out
}

/// One address family's range and where the next search starts.
#[derive(Debug)]
struct Range {
    first: u128,
    last: u128,
    next: Option<u128>,
    v6: bool,
}

impl Range {
    fn v4() -> Self {
        let (net, len) = IPV4_RANGE;
        let base = u128::from(u32::from(net));
        Range {
            first: base + 1,
            last: base + (1u128 << (32 - len)) - 1,
            next: None,
            v6: false,
        }
    }

    fn v6() -> Self {
        let (net, len) = IPV6_RANGE;
        let base = u128::from(net);
        Range {
            first: base + 1,
            last: base + ((1u128 << (128 - len)) - 1),
            next: None,
            v6: true,
        }
    }

    fn addr(&self, n: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(n))
        } else {
            // The range is inside the IPv4 space.
            IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX)))
        }
    }

    /// The first free address from the search start, wrapping once; `None`
    /// when every address is in use.
    fn take(&mut self, used: &mut BTreeSet<IpAddr>) -> Option<IpAddr> {
        let start = self
            .next
            .filter(|n| (self.first..=self.last).contains(n))
            .unwrap_or(self.first);
        let mut n = start;
        loop {
            let ip = self.addr(n);
            if used.insert(ip) {
                self.next = Some(n + 1);
                return Some(ip);
            }
            n = if n == self.last { self.first } else { n + 1 };
            if n == start {
                return None;
            }
        }
    }
}

/// Hands out VIPs; keeps what it handed out until the status shows it.
#[derive(Debug)]
pub struct IpAllocator {
    v4: Range,
    v6: Range,
    /// The last decision for each entry, by host: what its status should
    /// carry.
    decided: BTreeMap<ObjectKey, BTreeMap<String, Vec<IpAddr>>>,
}

impl Default for IpAllocator {
    fn default() -> Self {
        IpAllocator {
            v4: Range::v4(),
            v6: Range::v6(),
            decided: BTreeMap::new(),
        }
    }
}

/// One ServiceEntry as the allocator sees it.
struct Entry<'a> {
    key: &'a ObjectKey,
    wants: bool,
    hosts: Vec<&'a str>,
    /// The addresses it carries now, by host.
    current: BTreeMap<String, Vec<IpAddr>>,
}

impl IpAllocator {
    /// An allocator that starts from the addresses recorded for each entry
    /// (local mode: the status files of a previous run), as if it had
    /// handed them out itself.
    pub fn with_recorded(recorded: Allocations) -> Self {
        let mut allocator = IpAllocator::default();
        for (key, addresses) in recorded {
            let by_host = status_addresses(&addresses)
                .into_iter()
                .map(|(h, ips)| (h.to_string(), ips))
                .collect();
            allocator.decided.insert(key, by_host);
        }
        allocator
    }

    /// The addresses of every entry that gets some, given the entries as
    /// they are now; `enabled` false: none (and nothing is remembered).
    pub fn allocate(&mut self, state: &ClusterState, enabled: bool) -> Allocations {
        if !enabled {
            self.decided.clear();
            return Allocations::new();
        }
        let mut entries: Vec<(&ServiceEntry, Entry<'_>)> = state
            .service_entries
            .iter()
            .map(|(key, se)| {
                let wants = wants_addresses(se);
                let status = se
                    .status
                    .as_ref()
                    .map(|s| status_addresses(&s.addresses))
                    .unwrap_or_default();
                let mut current: BTreeMap<String, Vec<IpAddr>> = status
                    .into_iter()
                    .map(|(h, ips)| (h.to_string(), ips))
                    .collect();
                let hosts = if wants { kept_hosts(se) } else { Vec::new() };
                if wants {
                    // What was decided and not yet written wins over the status.
                    if let Some(decided) = self.decided.get(key) {
                        for (host, ips) in decided {
                            current.insert(host.clone(), ips.clone());
                        }
                    }
                    current.retain(|h, _| hosts.contains(&h.as_str()));
                }
                (
                    &**se,
                    Entry {
                        key,
                        wants,
                        hosts,
                        current,
                    },
                )
            })
            .collect();
        // Oldest first; an entry of unknown age counts as the youngest.
        entries.sort_by(|(a, ea), (b, eb)| {
            let age = |se: &ServiceEntry| {
                let t = se.metadata.creation_timestamp.as_ref().map(|t| t.0);
                (t.is_none(), t)
            };
            age(a).cmp(&age(b)).then_with(|| ea.key.cmp(eb.key))
        });
        let entries: Vec<Entry<'_>> = entries.into_iter().map(|(_, e)| e).collect();

        // Addresses users wrote in spec.addresses (upstream's
        // checkInSpecAddresses) are never handed out, nor kept by entries.
        let mut used: BTreeSet<IpAddr> = state
            .service_entries
            .values()
            .flat_map(|se| se.spec.addresses.iter())
            .filter_map(|a| super::service_entries::single_address(a))
            .collect();
        // Oldest first: an entry keeps what it carries unless a user or an
        // older entry holds one of its addresses.
        let mut reassign = vec![false; entries.len()];
        for (i, e) in entries.iter().enumerate() {
            let mine: BTreeSet<IpAddr> = e.current.values().flatten().copied().collect();
            if mine.iter().any(|ip| used.contains(ip)) {
                reassign[i] = true;
            } else {
                used.extend(mine);
            }
        }

        let mut out = Allocations::new();
        let mut decided = BTreeMap::new();
        for (e, lost) in entries.iter().zip(reassign) {
            if !e.wants {
                continue;
            }
            let mut by_host: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
            let mut list = Vec::new();
            for host in &e.hosts {
                let ips = match e.current.get(*host) {
                    Some(ips) if !lost => ips.clone(),
                    _ => [self.v4.take(&mut used), self.v6.take(&mut used)]
                        .into_iter()
                        .flatten()
                        .collect(),
                };
                list.extend(ips.iter().map(|ip| ServiceEntryAddress {
                    value: ip.to_string(),
                    host: (*host).to_string(),
                }));
                by_host.insert((*host).to_string(), ips);
            }
            if !list.is_empty() {
                out.insert(e.key.clone(), list);
            }
            decided.insert(e.key.clone(), by_host);
        }
        self.decided = decided;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ServiceEntry of namespace `shop`: `extra` is spliced into its
    /// metadata, `spec` is its spec (flow YAML).
    fn entry(name: &str, extra: &str, spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: {name}, namespace: shop{extra}}}\nspec: {spec}\n"
        )
    }

    fn state(entries: &[String]) -> ClusterState {
        let text = entries.join("---\n");
        ClusterState::from_objects(api::manifest::parse(&text).unwrap().objects)
    }

    /// `(name, host) -> values`, for assertions.
    fn flat(a: &Allocations) -> Vec<(String, String, String)> {
        a.iter()
            .flat_map(|(k, list)| {
                list.iter()
                    .map(|x| (k.name.clone(), x.host.clone(), x.value.clone()))
            })
            .collect()
    }

    fn row(name: &str, host: &str, value: &str) -> (String, String, String) {
        (name.into(), host.into(), value.into())
    }

    const DNS: &str = "{hosts: [a.example.com], resolution: DNS}";

    #[test]
    fn hosts_get_one_address_of_each_range_in_age_then_host_order() {
        let s = state(&[
            entry(
                "young",
                ", creationTimestamp: '2024-01-02T00:00:00Z'",
                "{hosts: [z.example.com], resolution: STATIC}",
            ),
            entry(
                "old",
                ", creationTimestamp: '2024-01-01T00:00:00Z'",
                "{hosts: [y.example.com, x.example.com, y.example.com], resolution: DNS}",
            ),
        ]);
        let a = IpAllocator::default().allocate(&s, true);
        assert_eq!(
            flat(&a),
            vec![
                row("old", "y.example.com", "240.240.0.1"),
                row("old", "y.example.com", "2001:2::1"),
                row("old", "x.example.com", "240.240.0.2"),
                row("old", "x.example.com", "2001:2::2"),
                row("young", "z.example.com", "240.240.0.3"),
                row("young", "z.example.com", "2001:2::3"),
            ]
        );
    }

    #[test]
    fn only_entries_upstream_allocates_for_get_addresses() {
        let s = state(&[
            entry("unset", "", "{hosts: [a.example.com]}"),
            entry("none", "", "{hosts: [a.example.com], resolution: NONE}"),
            entry(
                "opted-out",
                ", labels: {networking.istio.io/enable-autoallocate-ip: 'FALSE'}",
                DNS,
            ),
            entry(
                "opted-in",
                ", labels: {networking.istio.io/enable-autoallocate-ip: 'true'}",
                DNS,
            ),
            entry(
                "own",
                "",
                "{hosts: [a.example.com], resolution: STATIC, addresses: [10.9.0.1]}",
            ),
            entry(
                "wildcard",
                "",
                "{hosts: ['*.example.com', w.example.com], resolution: DNS}",
            ),
        ]);
        let a = IpAllocator::default().allocate(&s, true);
        assert_eq!(
            flat(&a),
            vec![
                row("opted-in", "a.example.com", "240.240.0.1"),
                row("opted-in", "a.example.com", "2001:2::1"),
                row("wildcard", "w.example.com", "240.240.0.2"),
                row("wildcard", "w.example.com", "2001:2::2"),
            ]
        );
        // Turned off: nothing.
        assert!(IpAllocator::default().allocate(&s, false).is_empty());
    }

    #[test]
    fn a_decision_holds_until_the_status_shows_it() {
        let mut allocator = IpAllocator::default();
        let b = entry("b", "", DNS);
        let first = allocator.allocate(&state(std::slice::from_ref(&b)), true);
        assert_eq!(first[&ObjectKey::new("shop", "b")][0].value, "240.240.0.1");
        // "a" sorts first, but "b" keeps what it was given before its
        // status was written; "a" gets the next address.
        let both = state(&[entry("a", "", DNS), b]);
        let second = allocator.allocate(&both, true);
        assert_eq!(
            second[&ObjectKey::new("shop", "b")],
            first[&ObjectKey::new("shop", "b")]
        );
        assert_eq!(second[&ObjectKey::new("shop", "a")][0].value, "240.240.0.2");
        assert_eq!(allocator.allocate(&both, true), second);
    }

    #[test]
    fn after_a_restart_the_status_is_kept_and_new_addresses_are_free_ones() {
        let recorded = entry(
            "recorded",
            "",
            "{hosts: [a.example.com, b.example.com], resolution: DNS}\n\
             status: {addresses: [{host: a.example.com, value: 240.240.0.1}, \
             {host: a.example.com, value: '2001:2::1'}, {host: gone.example.com, value: 240.240.0.9}, \
             {host: b.example.com, value: not-an-ip}]}",
        );
        let s = state(&[recorded, entry("new", "", DNS)]);
        let a = IpAllocator::default().allocate(&s, true);
        assert_eq!(
            flat(&a),
            vec![
                row("new", "a.example.com", "240.240.0.2"),
                row("new", "a.example.com", "2001:2::2"),
                // Kept; the host no longer in spec dropped; the host whose
                // value does not parse gets new addresses.
                row("recorded", "a.example.com", "240.240.0.1"),
                row("recorded", "a.example.com", "2001:2::1"),
                row("recorded", "b.example.com", "240.240.0.3"),
                row("recorded", "b.example.com", "2001:2::3"),
            ]
        );
    }

    #[test]
    fn the_search_goes_on_after_the_last_address_given() {
        let mut allocator = IpAllocator::default();
        allocator.allocate(&state(&[entry("first", "", DNS)]), true);
        // "first" is gone: its address is free, but not handed out again
        // before the range wraps around.
        let a = allocator.allocate(&state(&[entry("second", "", DNS)]), true);
        assert_eq!(a[&ObjectKey::new("shop", "second")][0].value, "240.240.0.2");
    }

    #[test]
    fn the_range_wraps_around_and_can_run_out() {
        let mut range = Range::v4();
        let mut used = BTreeSet::new();
        range.next = Some(range.last);
        assert_eq!(
            range.take(&mut used),
            Some("240.240.255.255".parse().unwrap())
        );
        assert_eq!(range.take(&mut used), Some("240.240.0.1".parse().unwrap()));
        let mut full: BTreeSet<IpAddr> =
            (range.first..=range.last).map(|n| range.addr(n)).collect();
        assert_eq!(range.take(&mut full), None);
    }

    #[test]
    fn on_a_conflict_the_oldest_entry_keeps_the_address() {
        let status = "\nstatus: {addresses: [{host: a.example.com, value: 240.240.0.1}, \
             {host: a.example.com, value: '2001:2::1'}]}";
        let s = state(&[
            entry(
                "a-young",
                ", creationTimestamp: '2024-01-02T00:00:00Z'",
                &format!("{DNS}{status}"),
            ),
            entry(
                "z-old",
                ", creationTimestamp: '2024-01-01T00:00:00Z'",
                &format!("{DNS}{status}"),
            ),
        ]);
        let mut allocator = IpAllocator::default();
        let a = allocator.allocate(&s, true);
        assert_eq!(
            flat(&a),
            vec![
                row("a-young", "a.example.com", "240.240.0.2"),
                row("a-young", "a.example.com", "2001:2::2"),
                row("z-old", "a.example.com", "240.240.0.1"),
                row("z-old", "a.example.com", "2001:2::1"),
            ]
        );
        // The reassignment holds while the status still shows the conflict.
        assert_eq!(allocator.allocate(&s, true), a);
    }

    #[test]
    fn a_users_address_wins_and_is_never_handed_out() {
        let s = state(&[
            entry(
                "auto",
                ", creationTimestamp: '2024-01-01T00:00:00Z'",
                &format!(
                    "{DNS}\nstatus: {{addresses: [{{host: a.example.com, value: 240.240.0.1}}]}}"
                ),
            ),
            entry(
                "user",
                ", creationTimestamp: '2024-01-02T00:00:00Z'",
                "{hosts: [u.example.com], resolution: STATIC, addresses: [240.240.0.2/32, 240.240.0.1]}",
            ),
        ]);
        let a = IpAllocator::default().allocate(&s, true);
        assert_eq!(
            flat(&a),
            vec![
                row("auto", "a.example.com", "240.240.0.3"),
                row("auto", "a.example.com", "2001:2::1"),
            ]
        );
    }
}
