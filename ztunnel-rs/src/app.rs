//! `ztunnel-rs proxy`: wiring (being written).
