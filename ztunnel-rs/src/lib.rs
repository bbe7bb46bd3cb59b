//! ztunnel-rs: the per-node L4 proxy and its node agent.
//!
//! - [`inpod`]: pods' network namespaces, the sockets the proxy creates in
//!   them, and the ZDS client that receives pods from the node agent.
//! - [`node_agent`]: `ztunnel-rs cni`, which enrols pods (in-pod rules, ZDS
//!   server, CNI plugin events); its plugin binary is `istio-cni-rs`.

pub mod inpod;
pub mod node_agent;
