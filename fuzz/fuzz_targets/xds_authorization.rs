//! ztunnel-rs workload xDS: a DeltaDiscoveryResponse of
//! `istio.security.Authorization` resources, as the xDS client receives it
//! from istiod, applied to a workload store; every stored policy is then
//! evaluated for a connection, as the inbound path does.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use proxy_core::authorization::{ConnectionInfo, Policies};

fuzz_target!(|data: &[u8]| {
    let Some(store) = mesh_fuzz::apply_to_store(data, api::type_url::AUTHORIZATION) else {
        return;
    };
    let snapshot = store.snapshot();
    let applied: Vec<Arc<_>> = snapshot.policies().cloned().collect();
    let policies = Policies::new(applied);
    for source_ip in [
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        "fd00::1".parse().expect("an IPv6 literal"),
    ] {
        let conn = ConnectionInfo {
            source_ip,
            source_identity: api::SpiffeId::new("cluster.local", "default", "sleep").ok(),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080),
        };
        let decision = policies.check(&conn);
        let _ = policies.dry_run(&conn);
        let _ = decision.to_string();
    }
    let _ = serde_json::to_string(&snapshot.dump());
});
