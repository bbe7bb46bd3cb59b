//! Helpers the integration tests share.

pub mod api_server;
pub mod binary;
pub mod golden;
