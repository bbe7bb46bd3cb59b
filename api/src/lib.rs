//! The contracts every component of the mesh shares: the upstream-compatible
//! wire types (workload API, authorization, xDS, CA, ZDS), the Istio CRD types,
//! the well-known labels and ports, and the SPIFFE identity type.

pub mod crd;
pub mod identity;
pub mod labels;
pub mod manifest;
pub mod ports;
mod proto;
pub mod resolv_conf;
pub mod syncz;
pub mod workload_state;

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
/// The waypoint's L7 configuration: our own contract (`api/proto/l7.proto`),
/// not upstream's.
pub use proto::istio_rs::l7::v1 as l7;

/// xDS type URLs: the workload API's exactly as upstream, then our own L7 ones.
pub mod type_url {
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";

    // Our own L7 contract (`api/proto/l7.proto`), served only to waypoints.
    pub const WAYPOINT: &str = "type.googleapis.com/istio_rs.l7.v1.Waypoint";
    pub const ROUTE_TABLE: &str = "type.googleapis.com/istio_rs.l7.v1.RouteTable";
    pub const HTTP_AUTHORIZATION: &str = "type.googleapis.com/istio_rs.l7.v1.HttpAuthorization";
    pub const JWT_AUTHENTICATION: &str = "type.googleapis.com/istio_rs.l7.v1.JwtAuthentication";
    pub const TRAFFIC_POLICY: &str = "type.googleapis.com/istio_rs.l7.v1.TrafficPolicy";
}
