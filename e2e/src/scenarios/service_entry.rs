//! ServiceEntry and WorkloadEntry reached through ztunnel: a client in the
//! ambient namespace connects to a ServiceEntry's address (inside the
//! local cluster's service range, so inside the test's own namespaces) and
//! is answered by an endpoint the ServiceEntry selects. istiod-rs serves
//! the entry as a workload API Service (see `istiod-rs/src/index/
//! service_entries.rs`); ztunnel-rs routes its VIP like a Service's.
//!
//! `resolution: DNS` with an endpoint given as a DNS name: ztunnel-rs looks
//! the name up when the client connects (on-demand DNS), from the client
//! pod, through the upstream resolver the local cluster gives it
//! (`127.0.0.1:5353` in each pod, see [`super::dns`]): there the client
//! runs a stand-in that maps the name to a server pod's address. Local
//! cluster only, as the DNS scenario.

use std::time::Duration;

use super::Scenario;
use super::dns::LOCAL_UPSTREAM;
use super::fixture::{AMBIENT_NS, ECHO_HELLO, L4Fixture};
use super::l4::{CHANGE_TIMEOUT, failed, pod_name};
use crate::apps::DnsReport;
use crate::cluster::{Cluster, PodInfo};
use crate::probe::{
    self, ProbeError, counted, describe_exchange, eventually, mtls_from_to, ztunnel,
};
use crate::prometheus;

/// The ServiceEntries' port: not the servers' own, so the targetPort (or
/// the WorkloadEntry's port) is what reaches them.
const SE_PORT: u16 = 9101;
/// Addresses at the top of the local cluster's service range
/// (10.96.0.0/16), which its allocator hands out from the bottom.
const PODS_VIP: &str = "10.96.255.201";
const ENTRY_VIP: &str = "10.96.255.202";
/// The `resolution: DNS` entry: its host, VIP, port, and the DNS name of
/// its one endpoint (known only to the client's stand-in resolver).
const DNS_ENTRY_HOST: &str = "echo-dns.mesh.test";
const DNS_ENTRY_VIP: &str = "10.96.255.211";
const DNS_ENTRY_PORT: u16 = 9102;
const DNS_ENDPOINT: &str = "echo-backend.dns.test";

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "service_entry_reached_through_ztunnel",
            run: service_entry_reached,
        },
        Scenario {
            name: "service_entry_dns_endpoint_resolved_by_ztunnel",
            run: dns_endpoint_resolved,
        },
        Scenario {
            name: "service_entry_auto_allocated_vip_resolved_and_reached",
            run: auto_allocated_vip_reached,
        },
    ]
}

/// A ServiceEntry selecting the server pods, and one selecting a
/// WorkloadEntry that stands for server-1 (its address, its identity,
/// annotated for HBONE as upstream's `setTunnelProtocol` reads it).
fn entries_yaml(f: &L4Fixture) -> String {
    let server1 = &f.servers[1];
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: echo-pods\n  namespace: {AMBIENT_NS}\n\
         spec:\n  hosts: [echo-pods.mesh.test]\n  addresses: [{PODS_VIP}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  \
         ports:\n  - {{number: {SE_PORT}, name: hello, protocol: TCP, targetPort: {ECHO_HELLO}}}\n  \
         workloadSelector:\n    labels:\n      app: server\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: echo-entry\n  namespace: {AMBIENT_NS}\n\
         spec:\n  hosts: [echo-entry.mesh.test]\n  addresses: [{ENTRY_VIP}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  \
         ports:\n  - {{number: {SE_PORT}, name: hello, protocol: TCP}}\n  \
         workloadSelector:\n    labels:\n      app: echo-entry\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: echo-entry-1\n  namespace: {AMBIENT_NS}\n  \
         labels:\n    app: echo-entry\n  annotations:\n    {}: {}\n\
         spec:\n  address: {}\n  serviceAccount: server\n  ports:\n    hello: {ECHO_HELLO}\n",
        api::labels::AMBIENT_REDIRECTION,
        api::labels::AMBIENT_REDIRECTION_ENABLED,
        server1.ip,
    )
}

fn service_entry_reached(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let yaml = entries_yaml(f);
    cluster.apply_yaml(&yaml)?;
    let result = (|| {
        let client = &f.clients[0];
        let servers: Vec<&str> = f.servers.iter().map(|s| s.name.as_str()).collect();
        // Pods selected: answered by one of the servers, which sees the
        // client's own address.
        let to_pods = format!("{PODS_VIP}:{SE_PORT}");
        let what = format!("{} -> ServiceEntry echo-pods ({to_pods})", pod_name(client));
        let report = eventually(&what, CHANGE_TIMEOUT, || {
            let report = probe::tcp_hello(cluster, client, &to_pods)?;
            Ok(if report.ok && report.hello.is_some() {
                Ok(report)
            } else {
                Err(describe_exchange(&report))
            })
        })?;
        let hello = report.hello.as_ref().expect("checked above");
        if !servers.contains(&hello.pod.as_str()) || !probe::saw_caller(&report, client) {
            return Err(failed(
                &what,
                format!("want a server seeing {}, got {hello:?}", client.ip),
            ));
        }
        let first = format!("{what}: answered by {}", hello.pod);

        // A WorkloadEntry selected: server-1 answers, in mutual TLS
        // (counted by its node's ztunnel with both identities).
        let server1: &PodInfo = &f.servers[1];
        let to_entry = format!("{ENTRY_VIP}:{SE_PORT}");
        let what = format!(
            "{} -> ServiceEntry echo-entry ({to_entry})",
            pod_name(client)
        );
        let src = f.principal(AMBIENT_NS, "client");
        let dst = f.principal(AMBIENT_NS, "server");
        eventually(&what, CHANGE_TIMEOUT, || {
            let report = probe::tcp_hello(cluster, client, &to_entry)?;
            Ok(if report.ok {
                Ok(())
            } else {
                Err(describe_exchange(&report))
            })
        })?;
        let (report, count) = counted(
            cluster,
            &ztunnel(&server1.node),
            &mtls_from_to(&src, &dst),
            || probe::tcp_hello(cluster, client, &to_entry),
        )?;
        match &report.hello {
            Some(h) if report.ok && h.pod == server1.name => Ok(format!(
                "{first}; {what}: answered by {} in mTLS {src} -> {dst} ({count} at the destination)",
                h.pod
            )),
            _ => Err(failed(&what, describe_exchange(&report))),
        }
    })();
    let _ = cluster.delete_yaml(&yaml);
    result
}

/// A `resolution: DNS` ServiceEntry whose one endpoint is [`DNS_ENDPOINT`],
/// with an explicit VIP (not auto-allocated).
fn dns_entry_yaml() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: echo-dns\n  namespace: {AMBIENT_NS}\n\
         spec:\n  hosts: [{DNS_ENTRY_HOST}]\n  addresses: [{DNS_ENTRY_VIP}]\n  location: MESH_EXTERNAL\n  resolution: DNS\n  \
         ports:\n  - {{number: {DNS_ENTRY_PORT}, name: hello, protocol: TCP, targetPort: {ECHO_HELLO}}}\n  \
         endpoints:\n  - address: {DNS_ENDPOINT}\n"
    )
}

/// The client resolves the entry's host (the DNS proxy answers its VIP)
/// and connects to it, its stand-in resolver mapping [`DNS_ENDPOINT`] to
/// server-0 meanwhile: server-0 answers, seeing the client, and the
/// stand-in was asked for the endpoint's name (from the client's pod, by
/// ztunnel-rs), which ztunnel-rs counts in `istio_on_demand_dns_total`.
fn dns_endpoint_resolved(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let yaml = dns_entry_yaml();
    cluster.apply_yaml(&yaml)?;
    let result = (|| {
        let client = &f.clients[0];
        let server = &f.servers[0];
        let what = format!(
            "{} -> ServiceEntry echo-dns ({DNS_ENTRY_HOST}:{DNS_ENTRY_PORT}, endpoint {DNS_ENDPOINT})",
            pod_name(client)
        );
        // Any destination off the pod is captured by the DNS proxy; the
        // entry's VIP serves no DNS itself.
        let dns_server = format!("{}:53", f.service_vip);
        let port = DNS_ENTRY_PORT.to_string();
        let record = format!("{DNS_ENDPOINT}={}", server.ip);
        let args: Vec<String> = [
            "dns",
            DNS_ENTRY_HOST,
            "--server",
            &dns_server,
            "--upstream",
            LOCAL_UPSTREAM,
            "--upstream-record",
            &record,
            "--connect-port",
            &port,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let report: DnsReport = eventually(&what, CHANGE_TIMEOUT, || {
            let report: DnsReport = probe::client(cluster, client, &args, CLIENT_TIMEOUT)?;
            Ok(if report.ok {
                Ok(report)
            } else {
                Err(format!("{report:?}"))
            })
        })?;
        if report.addresses != [DNS_ENTRY_VIP] {
            return Err(failed(
                &what,
                format!(
                    "the DNS proxy answered {:?}, not the entry's VIP",
                    report.addresses
                ),
            ));
        }
        let connection = report.connection.as_ref().expect("ok means connected");
        let answered = match &connection.hello {
            Some(h) if h.pod == server.name && probe::saw_caller(connection, client) => h,
            other => {
                return Err(failed(
                    &what,
                    format!("want {} seeing {}, got {other:?}", server.name, client.ip),
                ));
            }
        };
        let endpoint = format!("{DNS_ENDPOINT}.");
        if !report.upstream_asked.contains(&endpoint) {
            return Err(failed(
                &what,
                format!(
                    "the pod's stand-in resolver was not asked for {endpoint}: {:?}",
                    report.upstream_asked
                ),
            ));
        }
        let samples = probe::metrics(cluster, &ztunnel(&client.node))?;
        let lookups = prometheus::sum(
            &samples,
            "istio_on_demand_dns_total",
            &[("hostname", DNS_ENDPOINT)],
        );
        if lookups < 1.0 {
            return Err(failed(
                &format!("the ztunnel on {}", client.node),
                format!("istio_on_demand_dns_total{{hostname={DNS_ENDPOINT:?}}} is {lookups}"),
            ));
        }
        Ok(format!(
            "{what}: {DNS_ENTRY_HOST} -> {DNS_ENTRY_VIP}, {DNS_ENDPOINT} resolved from the pod -> {}, answered by {}; {lookups} on-demand lookups counted",
            server.ip, answered.pod
        ))
    })();
    let _ = cluster.delete_yaml(&yaml);
    result
}

/// The ServiceEntry without addresses of [`auto_allocated_vip_reached`].
const AUTO_NAME: &str = "echo-auto";
const AUTO_HOST: &str = "echo-auto.mesh.test";
const AUTO_PORT: u16 = 9103;

/// A ServiceEntry selecting the server pods, with no `addresses`: istiod-rs
/// gives its host VIPs (`istiod-rs/src/index/ip_allocate.rs`).
fn auto_entry_yaml() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {AUTO_NAME}\n  namespace: {AMBIENT_NS}\n\
         spec:\n  hosts: [{AUTO_HOST}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  \
         ports:\n  - {{number: {AUTO_PORT}, name: hello, protocol: TCP, targetPort: {ECHO_HELLO}}}\n  \
         workloadSelector:\n    labels:\n      app: server\n"
    )
}

/// The IPv4 VIP of [`AUTO_HOST`] in the entry's `status.addresses`, once
/// istiod-rs wrote one of 240.240.0.0/16.
fn allocated_vip(cluster: &dyn Cluster) -> Result<Result<String, String>, ProbeError> {
    let status = cluster.object_status("ServiceEntry", AMBIENT_NS, AUTO_NAME)?;
    let v4 = status
        .as_ref()
        .and_then(|s| s.get("addresses"))
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .filter(|a| a.get("host").and_then(|h| h.as_str()) == Some(AUTO_HOST))
        .filter_map(|a| a.get("value")?.as_str()?.parse::<std::net::Ipv4Addr>().ok())
        .find(|ip| ip.octets()[..2] == [240, 240]);
    Ok(v4
        .map(|ip| ip.to_string())
        .ok_or_else(|| format!("no IPv4 VIP of 240.240.0.0/16 in its status: {status:?}")))
}

/// A ServiceEntry without addresses gets a VIP of 240.240.0.0/16 in its
/// status; a client resolves the host through ztunnel-rs's DNS proxy to
/// that VIP and connects to it; a server pod answers, through ztunnel.
fn auto_allocated_vip_reached(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let yaml = auto_entry_yaml();
    cluster.apply_yaml(&yaml)?;
    let result = (|| {
        let client = &f.clients[0];
        let what = format!("ServiceEntry {AMBIENT_NS}/{AUTO_NAME}");
        let vip = eventually(&what, CHANGE_TIMEOUT, || allocated_vip(cluster))?;
        // Any destination off the pod is captured: the query goes to the
        // DNS proxy whatever server it is addressed to.
        let server = format!("{}:53", f.service_vip);
        let port = AUTO_PORT.to_string();
        let args: Vec<String> = [
            "dns",
            AUTO_HOST,
            "--server",
            &server,
            "--connect-port",
            &port,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let what = format!(
            "{} resolving {AUTO_HOST:?} and connecting",
            pod_name(client)
        );
        let report = eventually(&what, CHANGE_TIMEOUT, || {
            let report: crate::apps::DnsReport =
                probe::client(cluster, client, &args, Duration::from_secs(30))?;
            let answered = report
                .connection
                .as_ref()
                .filter(|c| c.ok)
                .and_then(|c| c.hello.as_ref());
            Ok(match answered {
                Some(_) if report.addresses == [vip.clone()] && report.authoritative => Ok(report),
                _ => Err(format!(
                    "want {vip} (authoritative) and an answer, got {report:?}"
                )),
            })
        })?;
        let connection = report.connection.as_ref().expect("checked above");
        let hello = connection.hello.as_ref().expect("checked above");
        let servers: Vec<&str> = f.servers.iter().map(|s| s.name.as_str()).collect();
        if !servers.contains(&hello.pod.as_str()) || !probe::saw_caller(connection, client) {
            return Err(failed(
                &what,
                format!("want a server seeing {}, got {hello:?}", client.ip),
            ));
        }
        Ok(format!(
            "{what}: status VIP {vip}, resolved to it by the DNS proxy, answered by {}",
            hello.pod
        ))
    })();
    let _ = cluster.delete_yaml(&yaml);
    result
}
