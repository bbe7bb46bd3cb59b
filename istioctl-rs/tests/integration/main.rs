//! istioctl-rs's integration tests, one test binary (each binary links the
//! whole dependency tree: one per file took gigabytes of disk and minutes of
//! linking). A test that changes process-wide state (descriptor limits, the
//! log subscriber) keeps a binary of its own in `tests/`.

mod support;

mod analyze;
mod cli;
mod commands;
mod install;
mod manifest;
mod pods;
mod proxy_status;
mod uninstall;
mod waypoint;
mod ztunnel_config;
