//! What both proxies (ztunnel-rs and waypoint-rs) and, for TLS, istiod-rs
//! share. TLS policy lives in [`tls`]: every rustls config in the tree is
//! built from [`tls::provider`].

pub mod admin;
pub mod authorization;
pub mod file;
pub mod hbone;
pub mod identity;
pub mod listener;
pub mod log_limit;
pub mod logging;
pub mod metrics;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod upstream_env;
pub mod xds;
