//! ztunnel-rs's integration tests, one test binary (each binary links the
//! whole dependency tree: one per file took gigabytes of disk and minutes of
//! linking). A test that changes process-wide state (descriptor limits, the
//! log subscriber) keeps a binary of its own in `tests/`.

mod binaries;
mod cni;
mod cni_install;
mod dns;
mod inpod;
mod node_agent;
mod node_agent_config_dir;
mod on_demand_dns;
mod overload;
mod proxy;
mod proxy_app;
mod proxy_inpod;
mod zds;
