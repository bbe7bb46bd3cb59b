//! The DestinationRule load balancer over one destination's endpoints:
//! round robin, random, least request (power of two choices over in-flight
//! counts) and consistent hash (Maglev), all honouring endpoint weights.
//! The default is LEAST_REQUEST, as istiod's `defaultLBAlgorithm`
//! (istio/istio `cluster_traffic_policy.go`) programs Envoy.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::Request;
use http::header::COOKIE;
use rand::Rng;
use twox_hash::XxHash64;

use api::l7;

use super::maglev::{DEFAULT_TABLE_SIZE, Maglev};
use crate::request::{FieldError, FromProto};

/// `LoadBalancer.simple`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Simple {
    RoundRobin,
    #[default]
    LeastRequest,
    Random,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    Simple(Simple),
    ConsistentHash(ConsistentHash),
}

impl Default for LoadBalancer {
    fn default() -> Self {
        LoadBalancer::Simple(Simple::default())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistentHash {
    pub key: HashKey,
    /// A prime; Maglev needs it.
    pub table_size: usize,
}

/// What a request is hashed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

impl FromProto<l7::LoadBalancer> for LoadBalancer {
    fn from_proto(p: &l7::LoadBalancer) -> Result<Self, FieldError> {
        use l7::load_balancer::{Policy, Simple as S};
        match &p.policy {
            None => Ok(LoadBalancer::default()),
            Some(Policy::Simple(v)) => match S::try_from(*v) {
                // PASSTHROUGH cannot be served by a waypoint; istiod reports it.
                Ok(S::Default | S::LeastRequest | S::Passthrough) => {
                    Ok(LoadBalancer::Simple(Simple::LeastRequest))
                }
                Ok(S::RoundRobin) => Ok(LoadBalancer::Simple(Simple::RoundRobin)),
                Ok(S::Random) => Ok(LoadBalancer::Simple(Simple::Random)),
                Err(_) => Err(FieldError::new(
                    "simple",
                    format!("unknown value {v}; is this waypoint older than the control plane?"),
                )),
            },
            Some(Policy::ConsistentHash(c)) => ConsistentHash::from_proto(c)
                .map(LoadBalancer::ConsistentHash)
                .map_err(|e| e.within("consistent_hash")),
        }
    }
}

impl FromProto<l7::ConsistentHash> for ConsistentHash {
    fn from_proto(p: &l7::ConsistentHash) -> Result<Self, FieldError> {
        use l7::consistent_hash::Key;
        let key = match &p.key {
            Some(Key::Header(h)) => {
                HashKey::Header(crate::config::convert::header_name("header", h)?)
            }
            Some(Key::Cookie(c)) if !c.name.is_empty() => HashKey::Cookie(c.name.clone()),
            Some(Key::Cookie(_)) => {
                return Err(FieldError::new("cookie.name", "a cookie name is required"));
            }
            Some(Key::SourceIp(true)) => HashKey::SourceIp,
            Some(Key::QueryParameter(q)) if !q.is_empty() => HashKey::QueryParameter(q.clone()),
            Some(Key::SourceIp(false) | Key::QueryParameter(_)) | None => {
                return Err(FieldError::new(
                    "key",
                    "one of header, cookie, source_ip, query_parameter is required",
                ));
            }
        };
        let table_size = match p.table_size {
            0 => DEFAULT_TABLE_SIZE,
            n if n > 5_000_011 || !is_prime(n) => {
                return Err(FieldError::new(
                    "table_size",
                    format!("{n} must be a prime no larger than 5000011 (Maglev)"),
                ));
            }
            n => n as usize,
        };
        Ok(ConsistentHash { key, table_size })
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl HashKey {
    /// The request's hash; `None` when the key is absent (the request is
    /// then balanced at random).
    pub fn hash<B>(&self, req: &Request<B>, source: IpAddr) -> Option<u64> {
        let oneshot = |bytes: &[u8]| XxHash64::oneshot(0, bytes);
        match self {
            HashKey::Header(name) => req.headers().get(name).map(|v| oneshot(v.as_bytes())),
            HashKey::SourceIp => Some(oneshot(source.to_string().as_bytes())),
            HashKey::Cookie(name) => req
                .headers()
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(n, _)| n == name)
                .map(|(_, v)| oneshot(v.as_bytes())),
            HashKey::QueryParameter(name) => req
                .uri()
                .query()?
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(n, _)| n == name)
                .map(|(_, v)| oneshot(v.as_bytes())),
        }
    }
}

/// One endpoint the balancer may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Workload uid: stable identity for Maglev.
    pub uid: &'a str,
    /// Relative weight (workload capacity); 0 never chosen.
    pub weight: u32,
    /// Requests in flight to it now (least request).
    pub in_flight: u32,
}

/// The balancer of one destination (service + port + subset); lives as long
/// as the destination's configuration, keeps round-robin position and the
/// Maglev table between requests.
#[derive(Debug)]
pub struct Balancer {
    policy: LoadBalancer,
    next: AtomicUsize,
    maglev: Mutex<Option<Arc<Maglev>>>,
}

impl Balancer {
    pub fn new(policy: LoadBalancer) -> Self {
        Balancer {
            policy,
            next: AtomicUsize::new(0),
            maglev: Mutex::new(None),
        }
    }

    pub fn policy(&self) -> &LoadBalancer {
        &self.policy
    }

    /// The index in `candidates` of the endpoint to use; `None` when none
    /// has a weight above 0. `hash` is `HashKey::hash` of the request for a
    /// consistent-hash policy (ignored otherwise; `None` falls back to
    /// random).
    pub fn pick(
        &self,
        candidates: &[Candidate<'_>],
        hash: Option<u64>,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
        if total == 0 {
            return None;
        }
        match &self.policy {
            LoadBalancer::Simple(Simple::Random) => {
                Some(weighted(candidates, rng.random_range(0..total)))
            }
            LoadBalancer::Simple(Simple::RoundRobin) => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
                Some(weighted(candidates, turn))
            }
            LoadBalancer::Simple(Simple::LeastRequest) => {
                Some(least_request(candidates, total, rng))
            }
            LoadBalancer::ConsistentHash(c) => match hash {
                Some(h) => {
                    let table = self.maglev_for(candidates, c.table_size);
                    let uid = table.lookup(h)?;
                    candidates.iter().position(|c| c.uid == uid)
                }
                None => Some(weighted(candidates, rng.random_range(0..total))),
            },
        }
    }

    /// The cached table, rebuilt only when the endpoint set or weights change.
    fn maglev_for(&self, candidates: &[Candidate<'_>], size: usize) -> Arc<Maglev> {
        let mut cached = self.maglev.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = cached.as_ref().filter(|t| t.built_for(candidates)) {
            return table.clone();
        }
        let table = Arc::new(Maglev::new(
            candidates
                .iter()
                .map(|c| (c.uid.to_string(), c.weight))
                .collect(),
            size,
        ));
        *cached = Some(table.clone());
        table
    }
}

/// The candidate owning ticket `t` of `0..total weight`.
fn weighted(candidates: &[Candidate<'_>], mut t: u64) -> usize {
    for (i, c) in candidates.iter().enumerate() {
        let w = u64::from(c.weight);
        if t < w {
            return i;
        }
        t -= w;
    }
    unreachable!("tickets are below the total weight")
}

/// Power of two choices: two weighted draws, the one with fewer requests in
/// flight per unit of weight wins (ties: the first draw).
fn least_request(candidates: &[Candidate<'_>], total: u64, rng: &mut impl Rng) -> usize {
    let a = weighted(candidates, rng.random_range(0..total));
    let b = weighted(candidates, rng.random_range(0..total));
    let load = |i: usize| {
        let c = &candidates[i];
        // in_flight / weight, compared without division.
        (u64::from(c.in_flight), u64::from(c.weight))
    };
    let ((la, wa), (lb, wb)) = (load(a), load(b));
    if lb * wa < la * wb { b } else { a }
}

#[cfg(test)]
mod tests;
