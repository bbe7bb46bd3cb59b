//! Endpoint choice for one destination: the DestinationRule's load balancer
//! (`pick`, `maglev`) over the endpoints outlier detection (`outlier`) has
//! not ejected. Pure: randomness and the clock are passed in.
//!
//! The data path keeps one [`DestinationBalancer`] per (service, port,
//! subset) and rebuilds it when the destination's effective `Policy`
//! changes; per request: `pick`, then `record` the attempt's outcome.

pub mod maglev;
pub mod outlier;
pub mod pick;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;

pub use maglev::Maglev;
pub use outlier::{Outcome, OutlierConfig, OutlierDetector};
pub use pick::{Balancer, Candidate, ConsistentHash, HashKey, LoadBalancer, Simple};

use crate::config::Policy;

/// An endpoint the caller offers: the workload uid and its weight
/// (`Workload::capacity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weighted<'a> {
    pub uid: &'a str,
    pub weight: u32,
}

/// Balancing state of one destination: its load balancer, its outlier
/// detector (when the DestinationRule has outlier detection) and the
/// requests in flight per endpoint (for LEAST_REQUEST).
#[derive(Debug)]
pub struct DestinationBalancer {
    balancer: Balancer,
    outlier: Option<OutlierDetector>,
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

/// The chosen endpoint; holding it counts one request in flight to it.
#[derive(Debug)]
pub struct Picked {
    /// Index into the endpoints given to `pick`.
    pub index: usize,
    in_flight: Arc<AtomicU32>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DestinationBalancer {
    /// For the destination's effective policy (`TrafficPolicy::effective`,
    /// or `Policy::default()` without a DestinationRule).
    pub fn new(policy: &Policy, now: Instant) -> Self {
        DestinationBalancer {
            balancer: Balancer::new(policy.load_balancer()),
            outlier: policy
                .outlier_detection
                .map(|c| OutlierDetector::new(c, now)),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    pub fn outlier(&self) -> Option<&OutlierDetector> {
        self.outlier.as_ref()
    }

    /// Picks among `endpoints` minus those ejected (all of them in panic
    /// mode). `hash` is `HashKey::hash` of the request when the policy is a
    /// consistent hash. `None`: no endpoint can take the request (503 UH).
    pub fn pick(
        &self,
        endpoints: &[Weighted<'_>],
        hash: Option<u64>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<Picked> {
        let usable = match &self.outlier {
            Some(o) => o.usable(&endpoints.iter().map(|e| e.uid).collect::<Vec<_>>(), now),
            None => vec![true; endpoints.len()],
        };
        let mut counters = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        counters.retain(|uid, c| {
            c.load(Ordering::Relaxed) > 0 || endpoints.iter().any(|e| e.uid == uid)
        });
        let counter = |uid: &str, counters: &mut HashMap<String, Arc<AtomicU32>>| {
            counters.entry(uid.to_string()).or_default().clone()
        };
        let offered: Vec<usize> = (0..endpoints.len()).filter(|i| usable[*i]).collect();
        let candidates: Vec<Candidate<'_>> = offered
            .iter()
            .map(|i| Candidate {
                uid: endpoints[*i].uid,
                weight: endpoints[*i].weight,
                in_flight: counter(endpoints[*i].uid, &mut counters).load(Ordering::Relaxed),
            })
            .collect();
        let chosen = offered[self.balancer.pick(&candidates, hash, rng)?];
        let in_flight = counter(endpoints[chosen].uid, &mut counters);
        in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            index: chosen,
            in_flight,
        })
    }

    /// Feeds an attempt's outcome to outlier detection (no-op without it).
    /// `total` is the number of endpoints of the destination.
    pub fn record(&self, uid: &str, outcome: Outcome, total: usize, now: Instant) {
        if let Some(o) = &self.outlier {
            o.record(uid, outcome, total, now);
        }
    }
}

#[cfg(test)]
mod tests;
