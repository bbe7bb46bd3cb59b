//! The local cluster, sample apps and scenarios.
