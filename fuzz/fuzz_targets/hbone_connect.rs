//! ztunnel-rs inbound HBONE: what a CONNECT request's head decides before
//! any byte reaches the application. The request (framed as an HTTP/1 head:
//! method, target, headers) goes through proxy-core's CONNECT check, then
//! ztunnel-rs's target check, the `forwarded`/`baggage`/`traceparent`
//! readers and the policy decision, as `inbound::handle` calls them, for a
//! pod from istiod-rs's fixture translation.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use proxy_core::authorization::ConnectionInfo;
use proxy_core::store::{Workload, WorkloadStore};
use ztunnel_rs::proxy::connect_headers::{self, Baggage, TraceParent};
use ztunnel_rs::proxy::metrics::{Reporter, SecurityPolicy, TrafficLabels};
use ztunnel_rs::proxy::sockets::canonical;
use ztunnel_rs::proxy::{Ports, admission, inbound, route};

/// A store holding the fixtures' workloads, services and policies, and the
/// pod whose HBONE listener receives the CONNECTs.
fn pod() -> &'static (WorkloadStore, Arc<Workload>) {
    static POD: OnceLock<(WorkloadStore, Arc<Workload>)> = OnceLock::new();
    POD.get_or_init(|| {
        let store = mesh_fuzz::fixture_workload_store();
        let workload = store
            .snapshot()
            .workloads()
            .find(|w| !w.addresses.is_empty())
            .cloned()
            .expect("the fixtures hold a workload with an address");
        (store, workload)
    })
}

fuzz_target!(|data: &[u8]| {
    let (store, workload) = pod();
    let Some(request) = mesh_fuzz::http1_request(data) else {
        return;
    };
    let Ok(authority) = proxy_core::hbone::connect_target(request.method(), request.uri()) else {
        return;
    };
    let authority = canonical(authority);
    let local = SocketAddr::new(workload.addresses[0], api::ports::HBONE);
    if inbound::check_target(authority, local, &Ports::default()).is_err() {
        return;
    }
    let snapshot = store.snapshot();
    let headers = request.headers();
    let service = connect_headers::forwarded_host(headers)
        .and_then(|host| route::backed_service(&snapshot, workload, &host))
        .or_else(|| route::inbound_service(&snapshot, workload, authority.port()));
    let labels = TrafficLabels::new(Reporter::Destination, SecurityPolicy::MutualTls)
        .with_derived_source(&Baggage::from_headers(headers))
        .with_destination(Some(workload.as_ref()))
        .with_destination_service(service.as_deref());
    let _ = labels;
    let _ = TraceParent::from_headers(headers).map(|t| t.header());
    let conn = ConnectionInfo {
        source_ip: "10.0.0.99".parse().expect("an IPv4 literal"),
        source_identity: api::SpiffeId::new("cluster.local", "default", "sleep").ok(),
        destination: authority,
    };
    let _ = admission::decide(&snapshot, workload, &conn);
});
