//! What both proxies (ztunnel-rs and waypoint-rs) and, for TLS, istiod-rs
//! share. TLS policy lives in [`tls`]: every rustls config in the tree is
//! built from [`tls::provider`].

pub mod hbone;
pub mod identity;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
