//! Helpers the integration tests share.

pub mod ads;
pub mod ca_client;
pub mod http_client;
pub mod istiod;
pub mod kube_mock;
pub mod xds_server;
