//! ztunnel-rs's DNS proxy in the local cluster: a pod of an ambient
//! namespace resolves a Service by its short name (its DNS capture sends the
//! query to 15053, whatever server it was addressed to) and connects to the
//! answer through the mesh; a name outside the mesh is forwarded to the
//! upstream resolver, here a stand-in the client runs on its own pod's
//! loopback (the local cluster starts ztunnel-rs with
//! `--dns-server 127.0.0.1:5353`, an address inside each pod's netns, so no
//! query leaves the test's namespaces).
//!
//! Local cluster only: on Kubernetes ztunnel-rs forwards to its own
//! resolv.conf's nameservers (the cluster DNS), and the Kubernetes
//! scenario `kube::scenarios::dns` stands one in there instead.

use std::time::Duration;

use super::Scenario;
use super::fixture::{ECHO_HELLO, L4Fixture, SERVICE};
use super::l4::failed;
use crate::apps::DnsReport;
use crate::cluster::Cluster;
use crate::probe::{self, ProbeError, ztunnel};
use crate::prometheus;

/// Where the local cluster's ztunnel-rs forwards: each pod's own loopback.
pub const LOCAL_UPSTREAM: &str = "127.0.0.1:5353";
/// A name only the stand-in upstream resolver knows, and its answer.
const OUTSIDE_NAME: &str = "outside.example";
const OUTSIDE_ADDRESS: &str = "192.0.2.10";

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn all() -> Vec<Scenario> {
    vec![Scenario {
        name: "dns_proxy_resolves_a_service_name_and_forwards_the_rest",
        run: resolves_and_forwards,
    }]
}

fn dns(cluster: &dyn Cluster, f: &L4Fixture, args: &[&str]) -> Result<DnsReport, ProbeError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    probe::client(cluster, &f.clients[0], &args, CLIENT_TIMEOUT)
}

fn resolves_and_forwards(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let client = &f.clients[0];
    // Any destination off the pod is captured; the Service's own VIP is an
    // address the cluster made, and nothing serves DNS there.
    let server = format!("{}:53", f.service_vip);
    let hello = ECHO_HELLO.to_string();
    let by_name = dns(
        cluster,
        f,
        &[
            "dns",
            SERVICE,
            "--server",
            &server,
            "--connect-port",
            &hello,
        ],
    )?;
    let what = format!("{} resolving {SERVICE:?}", client.name);
    if by_name.addresses != [f.service_vip.clone()] || !by_name.authoritative {
        return Err(failed(
            &what,
            format!(
                "expected the VIP {} from the mesh, got {by_name:?}",
                f.service_vip
            ),
        ));
    }
    let Some(answered) = by_name
        .connection
        .as_ref()
        .filter(|c| c.ok)
        .and_then(|c| c.hello.as_ref())
    else {
        return Err(failed(
            &what,
            format!("the connection to the answer failed: {by_name:?}"),
        ));
    };
    let forwarded = dns(
        cluster,
        f,
        &[
            "dns",
            OUTSIDE_NAME,
            "--server",
            &server,
            "--upstream",
            LOCAL_UPSTREAM,
            "--upstream-record",
            &format!("{OUTSIDE_NAME}={OUTSIDE_ADDRESS}"),
        ],
    )?;
    let what = format!("{} resolving {OUTSIDE_NAME:?}", client.name);
    if forwarded.addresses != [OUTSIDE_ADDRESS] || forwarded.authoritative {
        return Err(failed(
            &what,
            format!("expected {OUTSIDE_ADDRESS} from upstream, got {forwarded:?}"),
        ));
    }
    if forwarded.upstream_asked != [format!("{OUTSIDE_NAME}.")] {
        return Err(failed(
            &what,
            format!(
                "the upstream resolver was asked {:?}",
                forwarded.upstream_asked
            ),
        ));
    }
    let samples = probe::metrics(cluster, &ztunnel(&client.node))?;
    let filter = [("request_protocol", "udp"), ("request_query_type", "a")];
    let requests = prometheus::sum(&samples, "istio_dns_requests_total", &filter);
    let upstream = prometheus::sum(&samples, "istio_dns_upstream_requests_total", &filter);
    if requests < 2.0 || upstream < 1.0 {
        return Err(failed(
            &format!("the ztunnel on {}", client.node),
            format!(
                "counted {requests} DNS requests and {upstream} forwarded; expected at least 2 and 1"
            ),
        ));
    }
    Ok(format!(
        "{SERVICE:?} -> {} (authoritative) -> connected, answered by {}; {OUTSIDE_NAME:?} forwarded to the pod's stand-in resolver -> {OUTSIDE_ADDRESS}; ztunnel counted {requests} requests, {upstream} forwarded",
        f.service_vip, answered.pod
    ))
}
