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

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), as ztunnel-rs;
/// colour codes only when stdout is a terminal (not in a pod's log, where
/// they cost CPU on every access-log line and clutter the text).
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}
