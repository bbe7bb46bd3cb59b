//! waypoint-rs: the optional L7 proxy of the mesh.
//!
//! Layout (ARCHITECTURE.md has the data flow):
//! - `request`: the types the decision modules and the data path share.
//! - `config`: the L7 configuration from istiod-rs (validated, one snapshot).
//! - `http`: per-request decisions: JWT authentication, authorization,
//!   routing, header changes, faults.
//! - `balance`: endpoint choice and outlier detection.
//! - data path: HBONE termination on 15008 and protocol detection
//!   (`inbound`), the request path (`proxy`), TCP splicing (`tcp`),
//!   upstream connections over HBONE with retries and timeouts
//!   (`upstream`), `metrics`, `access_log`, `admin`, `drain`; `args` and
//!   `app` wire it all.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod args;
pub mod balance;
pub mod config;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod proxy;
pub mod request;
pub mod tcp;
pub mod upstream;

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), JSON lines
/// with `LOG_FORMAT=json`, as ztunnel-rs ([`proxy_core::logging`]).
pub fn init_logging() {
    use proxy_core::logging;
    logging::init(
        logging::filter_from_env(),
        logging::Output::Stdout,
        logging::Format::from_env(),
    );
}
