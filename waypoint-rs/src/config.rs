//! The waypoint's L7 configuration from istiod-rs (`api::l7`).

pub mod convert;
