//! waypoint-rs: the optional L7 proxy of the mesh.
//!
//! Layout (ARCHITECTURE.md has the data flow):
//! - `request`: the types the decision modules and the data path share.
//! - `config`: the L7 configuration from istiod-rs (validated, one snapshot).
//! - `http`: per-request decisions: JWT authentication, authorization,
//!   routing, header changes, faults.
//! - `balance`: endpoint choice and outlier detection.
//! - data path: HBONE termination on 15008, protocol detection, the HTTP
//!   server, upstream connections over HBONE, metrics, admin, drain.

pub mod http;
pub mod request;
