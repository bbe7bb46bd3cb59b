//! The L4 scenarios (`e2e::scenarios::l4`), then the L7 ones through a
//! provisioned waypoint (`e2e::scenarios::l7`), then upstream's Bookinfo
//! and its policy and route samples (`e2e::scenarios::bookinfo`), then those of waypoints
//! created on demand (`e2e::scenarios::on_demand`), then istioctl-rs's views
//! of the running mesh (`e2e::scenarios::istioctl`), with ztunnel-rs's DNS
//! proxy (`e2e::scenarios::dns`) after the L4 ones, on the local cluster with the
//! whole mesh running: istiod-rs, and per node the node agent and
//! ztunnel-rs, pods enrolled through the CNI plugin. One cluster is shared
//! by every scenario, run in order; `E2E_SCENARIO=<part of a name>` runs
//! only the matching ones.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use e2e::mesh::MeshConfig;
use e2e::privilege;
use e2e::scenarios::{self, bookinfo, dns, istioctl, l4, l7, on_demand, service_entry};

#[test]
fn l4_scenarios_on_the_local_cluster() {
    if !privilege::enter_for_test() {
        return;
    }
    let filter = std::env::var("E2E_SCENARIO").ok();
    // The DNS, ServiceEntry, L7, Bookinfo, on-demand and istioctl-rs
    // scenarios run on the local cluster only (see `dns`, `service_entry`,
    // `l7`, `bookinfo`, `istioctl`), after the L4 ones.
    let all = [
        l4::all(),
        l4::local_only(),
        dns::all(),
        service_entry::all(),
        l7::all(),
        bookinfo::all(),
        on_demand::all(),
        istioctl::all(),
    ]
    .concat();
    match scenarios::on_local_cluster(MeshConfig::default(), &all, filter.as_deref()) {
        Ok(outcomes) => eprintln!("L4 and L7 scenarios:\n{}", scenarios::summary(&outcomes)),
        Err(failure) => panic!("{failure}"),
    }
}
