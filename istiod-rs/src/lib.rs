//! istiod-rs: the control plane. Cluster state in, workload API out over delta
//! xDS; the embedded CA; waypoint provisioning.
//!
//! Flow: `state` (kube watch | YAML directory) -> `index` (pure translation)
//! -> [`snapshot::Snapshot`] (published by `pipeline`) -> `xds` (delta ADS to
//! every proxy). `status` writes each policy's and route's conditions;
//! `provision` turns waypoint Gateways into their objects and status.
//! [`app`] wires them into the running program.

pub mod app;
pub mod auth;
pub mod ca;
pub mod grpc;
pub mod index;
pub mod jwks;
pub mod monitoring;
pub mod pipeline;
pub mod provision;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod webhook;
pub mod xds;
