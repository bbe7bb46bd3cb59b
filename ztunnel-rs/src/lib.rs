//! ztunnel-rs: the per-node L4 proxy and its node agent.
//!
//! - [`proxy`]: one proxy per enrolled pod (outbound 15001, inbound HBONE
//!   15008, inbound plaintext 15006), certificates, metrics, access log.
//! - [`app`]: `ztunnel-rs proxy`, wiring the proxy to istiod (xDS + CA),
//!   the node agent (ZDS), the admin, stats and readiness servers, and
//!   SIGTERM drain.
//! - [`inpod`]: pods' network namespaces, the sockets the proxy creates in
//!   them, and the ZDS client that receives pods from the node agent.
//! - [`node_agent`]: `ztunnel-rs cni`, which enrols pods (in-pod rules, ZDS
//!   server, CNI plugin events); its plugin binary is `istio-cni-rs`.

pub mod app;
pub mod inpod;
pub mod node_agent;
pub mod proxy;
