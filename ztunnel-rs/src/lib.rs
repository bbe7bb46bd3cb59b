//! ztunnel-rs: the per-node L4 proxy and its node agent.
