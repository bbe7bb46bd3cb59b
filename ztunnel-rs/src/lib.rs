//! ztunnel-rs: the per-node L4 proxy and its node agent.
//!
//! - [`proxy`]: one proxy per enrolled pod (outbound 15001, inbound HBONE
//!   15008, inbound plaintext 15006), certificates, metrics, access log.
//! - [`app`]: `ztunnel-rs proxy`, wiring the proxy to istiod (xDS + CA),
//!   the admin, stats and readiness servers, and SIGTERM drain.

pub mod app;
pub mod proxy;
