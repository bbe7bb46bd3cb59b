//! ztunnel-rs: the per-node L4 proxy and its node agent.
//!
//! - [`proxy`]: one proxy per enrolled pod (outbound 15001, inbound HBONE
//!   15008, inbound plaintext 15006), certificates, metrics, access log.
//! - [`dns`]: the DNS proxy on 15053 in each pod (answers from the
//!   workload store, forwards the rest).
//! - [`app`]: `ztunnel-rs proxy`, wiring the proxy to istiod (xDS + CA),
//!   the node agent (ZDS), the admin, stats and readiness servers, and
//!   SIGTERM drain.
//! - [`inpod`]: pods' network namespaces, the sockets the proxy creates in
//!   them, and the ZDS client that receives pods from the node agent.
//! - [`node_agent`]: `ztunnel-rs cni`, which enrols pods (in-pod rules, ZDS
//!   server, CNI plugin events); its plugin binary is `istio-cni-rs`.

pub mod app;
pub mod dns;
pub mod inpod;
pub mod node_agent;
pub mod proxy;
pub mod upstream;

/// Logs to stdout, filtered by `RUST_LOG` (default `info`): the same set-up
/// for the proxy and the node agent binaries; colour codes only when stdout
/// is a terminal (not in a pod's log, where they cost CPU on every line and
/// clutter the text).
pub fn init_logging() {
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    // LOG_FORMAT=json: one JSON object per line, as upstream's DaemonSet
    // asks with `logAsJson`.
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json().init();
    } else {
        logs.init();
    }
}
