//! The churn soak in its CI form (see `e2e::scenarios::soak`): three
//! minutes of pods created and deleted on both nodes and a policy edited
//! back and forth under 1,000 requests a second; zero failed requests, the
//! components' memory slope per churn cycle under its bound, their
//! descriptors back near where they were, nothing of a deleted pod left
//! (network namespace, iptables/ipset entries, certificate past its grace).
//! `cargo xtask soak --minutes N` runs the same soak longer. A cluster of
//! its own.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use e2e::privilege;
use e2e::scenarios::soak::{self, SoakConfig};

#[test]
fn churn_soak_leaks_nothing_and_loses_no_request() {
    if !privilege::enter_for_test() {
        return;
    }
    if let Err(failure) = soak::on_local_cluster(&SoakConfig::default()) {
        panic!("{failure}");
    }
}
