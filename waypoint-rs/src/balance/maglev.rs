//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of a prime size in which every endpoint owns a share of entries
//! proportional to its weight, filled from per-endpoint permutations so that
//! removing one endpoint moves few keys. Endpoint names and request keys are
//! hashed with xxHash64, which is specified, so every waypoint replica and
//! release builds the same table.

use twox_hash::XxHash64;

use super::pick::Candidate;

/// Envoy's default Maglev table size.
pub const DEFAULT_TABLE_SIZE: usize = 65537;

const OFFSET_SEED: u64 = 0;
const SKIP_SEED: u64 = 1;

#[derive(Debug)]
pub struct Maglev {
    /// `(uid, weight)` in the order given; the table refers to it by index.
    endpoints: Vec<(String, u32)>,
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table. Endpoints with weight 0 own no entry. `size` must
    /// be a prime (checked by configuration).
    pub fn new(endpoints: Vec<(String, u32)>, size: usize) -> Self {
        let mut table = vec![u32::MAX; size];
        let live: Vec<usize> = (0..endpoints.len())
            .filter(|i| endpoints[*i].1 > 0)
            .collect();
        if live.is_empty() || size == 0 {
            return Maglev {
                endpoints,
                table: Vec::new(),
            };
        }
        let m = size as u64;
        let max_weight = live.iter().map(|i| endpoints[*i].1).max().unwrap_or(1) as f64;
        let perm: Vec<(u64, u64)> = live
            .iter()
            .map(|i| {
                let name = endpoints[*i].0.as_bytes();
                let offset = XxHash64::oneshot(OFFSET_SEED, name) % m;
                let skip = XxHash64::oneshot(SKIP_SEED, name) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; live.len()];
        // Weighted Maglev: each round an endpoint earns weight/max_weight of a
        // turn and places one entry per whole turn earned.
        let mut credit = vec![0f64; live.len()];
        let mut filled = 0;
        'fill: loop {
            for (k, i) in live.iter().enumerate() {
                credit[k] += f64::from(endpoints[*i].1) / max_weight;
                while credit[k] >= 1.0 {
                    credit[k] -= 1.0;
                    let (offset, skip) = perm[k];
                    let mut slot = ((offset + skip * next[k]) % m) as usize;
                    while table[slot] != u32::MAX {
                        next[k] += 1;
                        slot = ((offset + skip * next[k]) % m) as usize;
                    }
                    table[slot] = *i as u32;
                    next[k] += 1;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { endpoints, table }
    }

    /// The endpoint owning `hash`.
    pub fn lookup(&self, hash: u64) -> Option<&str> {
        if self.table.is_empty() {
            return None;
        }
        let i = self.table[(hash % self.table.len() as u64) as usize];
        Some(self.endpoints[i as usize].0.as_str())
    }

    /// Whether this table was built for exactly these endpoints and weights.
    pub fn built_for(&self, candidates: &[Candidate<'_>]) -> bool {
        self.endpoints.len() == candidates.len()
            && self
                .endpoints
                .iter()
                .zip(candidates)
                .all(|((uid, w), c)| uid == c.uid && *w == c.weight)
    }

    /// How many entries each endpoint owns, in the order given.
    pub fn shares(&self) -> Vec<usize> {
        let mut counts = vec![0; self.endpoints.len()];
        for i in &self.table {
            counts[*i as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests;
