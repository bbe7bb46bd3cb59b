//! Per-request decisions, each pure (no I/O, randomness injected): routing,
//! header and URL changes, fault injection, and (owned elsewhere) JWT
//! authentication and authorization. The data path calls them in the order
//! ARCHITECTURE.md gives.

pub mod fault;
pub mod modify;
pub mod route;

// Owned by wp-security; declared here so this branch compiles alone.
pub mod authorization;
pub mod jwt;
