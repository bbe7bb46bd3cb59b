//! Per-request decisions, each pure (no I/O; randomness and the clock are
//! passed in): JWT authentication, authorization, routing, header and URL
//! changes, fault injection. Each module reads one kind of L7 resource
//! (`FromProto`); the data path calls them in the order ARCHITECTURE.md gives.

use rand::Rng;

pub mod authorization;
pub mod fault;
pub mod jwt;
pub mod modify;
pub mod route;

/// True for `per_million` of a million uniform draws: fault shares and
/// mirror percentages (`0` never, `1_000_000` always).
pub fn drawn(per_million: u32, rng: &mut impl Rng) -> bool {
    per_million > 0 && rng.random_range(0..1_000_000) < per_million
}
