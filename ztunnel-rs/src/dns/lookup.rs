//! The answer to a query from the workload store, or "forward it": pure,
//! as upstream's `Store::lookup` / `find_server` / `get_addresses`
//! (`src/dns/server.rs`).
//!
//! - Only A and AAAA are answered here; every other type is forwarded.
//! - A name is ours when one of its aliases ([`Domains::aliases`]), or a
//!   wildcard of one, is a Service hostname (Services without a VIP only
//!   when they are Kubernetes headless Services), or a pod host of a
//!   headless Service. Anything else is forwarded: this proxy never answers
//!   NXDOMAIN itself.
//! - A name found with no address of the asked family gets an empty,
//!   authoritative NOERROR answer (the name exists).
//! - A Service answers with its VIPs on the client's network; a headless one
//!   with one address of each endpoint's workload; a pod host with its
//!   workload's addresses. The order is shuffled on every answer.
//! - A name found by stripping a search domain answers with a CNAME from
//!   the requested name to the stripped one, then the addresses.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use proxy_core::store::{IpFamily, Service, Snapshot, Workload};
use rand::seq::SliceRandom;

use super::TTL_SECONDS;
use super::names::{Alias, Domains, hostname, wildcards};

/// What to do with a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Not a name the mesh knows (or not an address query): ask upstream.
    Forward,
    /// Answered here, authoritatively (`records` may be empty).
    Answer(Vec<Record>),
}

/// What a name was found as.
#[derive(Clone, Debug)]
enum Found {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
}

#[derive(Clone, Debug)]
struct Match {
    found: Found,
    /// The store's name that matched (maybe a wildcard).
    name: Name,
    alias: Alias,
}

/// The answer for `name` of `record_type` asked by `client`.
pub fn lookup(
    snapshot: &Snapshot,
    domains: &Domains,
    client: &Workload,
    name: &Name,
    record_type: RecordType,
) -> Lookup {
    if !matches!(record_type, RecordType::A | RecordType::AAAA) {
        return Lookup::Forward;
    }
    let Some(found) = find(snapshot, domains, client, name) else {
        return Lookup::Forward;
    };
    if !family_allowed(&found.found, record_type) {
        return Lookup::Answer(Vec::new());
    }
    let mut addresses = addresses(snapshot, client, &found.found, record_type);
    if addresses.is_empty() {
        return Lookup::Answer(Vec::new());
    }
    addresses.shuffle(&mut rand::rng());
    let mut records = Vec::with_capacity(addresses.len() + 1);
    let mut record_name = name.clone();
    if let Some(stripped) = found.alias.stripped
        && !found.name.is_wildcard()
    {
        records.push(Record::from_rdata(
            name.clone(),
            TTL_SECONDS,
            RData::CNAME(CNAME(stripped.clone())),
        ));
        record_name = stripped;
    }
    records.extend(addresses.into_iter().map(|ip| {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(record_name.clone(), TTL_SECONDS, rdata)
    }));
    Lookup::Answer(records)
}

fn find(snapshot: &Snapshot, domains: &Domains, client: &Workload, name: &Name) -> Option<Match> {
    let kubernetes_suffix = domains.kubernetes_suffix();
    for alias in domains.aliases(&client.namespace, name) {
        for candidate in wildcards(&alias.name) {
            let host = hostname(&candidate);
            // A Service without a VIP is answered only when it is a
            // Kubernetes headless Service; other such Services (a DNS
            // ServiceEntry) are resolved upstream.
            let service = snapshot.service_by_hostname_where(&client.namespace, &host, |s| {
                !s.vips.is_empty() || s.hostname.ends_with(&kubernetes_suffix)
            });
            if let Some(service) = service {
                return Some(Match {
                    found: Found::Service(service),
                    name: candidate,
                    alias,
                });
            }
        }
        if alias.pod_host
            && let Some(workload) = headless_pod(snapshot, client, &alias.name, &kubernetes_suffix)
        {
            return Some(Match {
                found: Found::Workload(workload),
                name: alias.name.clone(),
                alias,
            });
        }
    }
    None
}

/// `<pod-hostname>.<service>` where `<service>` is a headless Kubernetes
/// Service with an endpoint whose workload has that hostname; the client's
/// namespace first (as upstream's `HeadlessServiceMatch::find_best_match`).
fn headless_pod(
    snapshot: &Snapshot,
    client: &Workload,
    name: &Name,
    kubernetes_suffix: &str,
) -> Option<Arc<Workload>> {
    let pod = name
        .iter()
        .next()
        .map(|l| String::from_utf8_lossy(l).to_lowercase())?;
    let service_host = hostname(&name.base_name());
    if !service_host.ends_with(kubernetes_suffix) {
        return None;
    }
    let mut pods: Vec<Arc<Workload>> = snapshot
        .services_by_hostname(&service_host)
        .iter()
        .filter(|s| s.vips.is_empty())
        .filter_map(|s| snapshot.endpoints(&s.key()))
        .flat_map(|eps| eps.values().map(|e| e.workload.clone()).collect::<Vec<_>>())
        .filter(|w| w.hostname.eq_ignore_ascii_case(&pod))
        .collect();
    pods.sort_by_key(|w| w.namespace != client.namespace);
    pods.into_iter().next()
}

/// A single-stack Service answers only its family; its headless pods may
/// be dual-stack, but the Service is not (upstream's
/// `service_family_allowed`).
fn family_allowed(found: &Found, record_type: RecordType) -> bool {
    match found {
        Found::Service(s) => !matches!(
            (s.ip_families, record_type),
            (Some(IpFamily::Ipv4), RecordType::AAAA) | (Some(IpFamily::Ipv6), RecordType::A)
        ),
        Found::Workload(_) => true,
    }
}

fn of_type(ip: &IpAddr, record_type: RecordType) -> bool {
    match ip {
        IpAddr::V4(_) => record_type == RecordType::A,
        IpAddr::V6(_) => record_type == RecordType::AAAA,
    }
}

fn addresses(
    snapshot: &Snapshot,
    client: &Workload,
    found: &Found,
    record_type: RecordType,
) -> Vec<IpAddr> {
    match found {
        Found::Workload(w) => w
            .addresses
            .iter()
            .copied()
            .filter(|ip| of_type(ip, record_type))
            .collect(),
        Found::Service(s) if s.vips.is_empty() => snapshot
            .endpoints(&s.key())
            .map(|eps| {
                eps.values()
                    .filter_map(|e| {
                        e.workload
                            .addresses
                            .iter()
                            .copied()
                            .find(|ip| of_type(ip, record_type))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Found::Service(s) => s
            .vips
            .iter()
            .filter(|v| v.network == client.network && of_type(&v.address, record_type))
            .map(|v| v.address)
            .collect(),
    }
}
