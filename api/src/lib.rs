//! The contracts every component of the mesh shares: the upstream-compatible
//! wire types (workload API, authorization, xDS, CA, ZDS), the Istio CRD types,
//! the well-known labels and ports, and the SPIFFE identity type.

pub mod crd;
pub mod identity;
pub mod labels;
pub mod manifest;
pub mod ports;
mod proto;

pub use identity::{IdentityError, SpiffeId};

/// `envoy.service.discovery.v3`: the xDS transport.
pub use proto::envoy::service::discovery::v3 as discovery;
/// `google.rpc.Status`, carried in NACKs.
pub use proto::google::rpc;
/// `istio.security`: L4 authorization.
pub use proto::istio::security;
/// `istio.v1.auth`: the CA service.
pub use proto::istio::v1::auth as ca;
/// `istio.workload`: Address, Workload, Service and what they reference.
pub use proto::istio::workload;
/// `istio.workload.zds`: the node agent <-> ztunnel protocol.
pub use proto::istio::workload::zds;

/// xDS type URLs, exactly as upstream.
pub mod type_url {
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
}
