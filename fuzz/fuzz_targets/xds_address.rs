//! ztunnel-rs (and waypoint-rs) workload xDS: a DeltaDiscoveryResponse of
//! `istio.workload.Address` resources, as the xDS client receives it from
//! istiod, applied to a workload store; then the store is read the way the
//! proxy reads it per connection.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use proxy_core::authorization::ConnectionInfo;

fuzz_target!(|data: &[u8]| {
    let Some(store) = mesh_fuzz::apply_to_store(data, api::type_url::ADDRESS) else {
        return;
    };
    let snapshot = store.snapshot();
    let conn = ConnectionInfo {
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        source_identity: None,
        destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080),
    };
    for workload in snapshot.workloads() {
        let _ = snapshot.workload_waypoint(workload);
        let _ = snapshot.policies_for(workload).check(&conn);
        for ip in &workload.addresses {
            let _ = snapshot.address(&workload.network, *ip);
        }
    }
    for service in snapshot.services() {
        let _ = snapshot.service_waypoint(service);
        let _ = snapshot.ready_endpoints(service);
    }
    let _ = serde_json::to_string(&snapshot.dump());
});
