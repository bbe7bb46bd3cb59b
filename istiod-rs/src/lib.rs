//! istiod-rs: the control plane. Cluster state in, workload API out over delta
//! xDS; the embedded CA. (Waypoint provisioning is not built yet.)
//!
//! Flow: `state` (kube watch | YAML directory) -> `index` (pure translation)
//! -> [`snapshot::Snapshot`] (published by `pipeline`) -> `xds` (delta ADS to
//! every proxy). `status` writes each policy's and route's conditions.
//! [`app`] wires them into the running program.

pub mod app;
pub mod auth;
pub mod ca;
pub mod grpc;
pub mod index;
pub mod jwks;
pub mod monitoring;
pub mod pipeline;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod webhook;
pub mod xds;
