//! istiod-rs's integration tests, one test binary (each binary links the
//! whole dependency tree: one per file took gigabytes of disk and minutes of
//! linking). A test that changes process-wide state (descriptor limits, the
//! log subscriber) keeps a binary of its own in `tests/`.

mod support;

mod app;
mod app_kube;
mod ca;
mod ca_flood;
mod clients;
mod component;
mod config_dir;
mod debug_access;
mod fail_closed;
mod index_fixtures;
mod index_incremental;
mod index_pipeline;
mod index_scale;
mod jwks;
mod listeners;
mod provision_directory;
mod provision_kube;
mod samples;
mod service_entry;
mod state_directory;
mod state_kube;
mod status;
mod webhook;
mod webhook_configuration;
mod xds;
mod xds_scale;
mod xds_waypoint;
