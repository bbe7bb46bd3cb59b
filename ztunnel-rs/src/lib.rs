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

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), JSON lines
/// with `LOG_FORMAT=json`: the same set-up for the proxy and the node agent
/// binaries ([`proxy_core::logging`]).
pub fn init_logging() {
    use proxy_core::logging;
    logging::init(
        logging::filter_from_env(),
        logging::Output::Stdout,
        logging::Format::from_env(),
    );
}
