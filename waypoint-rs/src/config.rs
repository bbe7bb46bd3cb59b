//! The waypoint's L7 configuration from istiod-rs (`api::l7`): every
//! resource validated into its ready-to-evaluate form when it arrives
//! (`request::FromProto`: regexes compiled, durations and ports checked),
//! held in one immutable [`L7Snapshot`] that the request path reads without
//! locking. One xDS response is one new snapshot; a resource that does not
//! validate is NACKed by name (with the field path) and its last good
//! version stays.
//!
//! What the data path asks: [`L7Snapshot::served`] for a CONNECT (is it
//! ours, and with which routes, policies and traffic policy), then
//! [`L7Snapshot::traffic_policy`] for a routed backend.

pub mod convert;
mod dump;
mod handlers;
mod store;
mod traffic;
mod waypoint;

pub use handlers::{
    AuthenticationHandler, AuthorizationHandler, HttpAuthorizations, JwtAuthentications, Kind,
    L7Handler, RouteTableHandler, RouteTables, TrafficPolicies, TrafficPolicyHandler,
    WaypointHandler, subscribe,
};
pub use store::{L7Snapshot, L7Store, Served, Unservable};
pub use traffic::{ConnectionPool, H2Upgrade, Policy, Subset, TrafficPolicy};
pub use waypoint::{ServedService, ServedWorkload, Waypoint};

#[cfg(test)]
mod tests;
