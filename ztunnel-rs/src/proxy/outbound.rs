//! Outbound (15001): the pod's own connections, redirected here by its
//! rules. Each one is routed ([`super::route`]) and carried: in HBONE as
//! the pod's identity, from inside the pod (so it leaves with the pod's
//! address), or as plain TCP when the destination is outside the mesh.
//! A connection that cannot be carried is closed ([`super::splice::refuse`]:
//! the application reads EOF, as from upstream ztunnel). An HBONE CONNECT
//! carries `baggage`, `forwarded` and `traceparent`
//! ([`super::connect_headers`]). A service endpoint known only by a
//! hostname is looked up first ([`crate::dns::on_demand`], from the pod);
//! when that fails the connection is refused, naming the service, the
//! endpoint and the hostname.
//!
//! Nothing leaves before the pod's own workload is known: the listener
//! accepts only once the store holds a complete state, and a pod whose
//! workload is still missing then is waited for (bounded, as upstream's
//! wait-for-workload) and refused if it does not come. Routing on an
//! incomplete view could send an enrolled destination plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use proxy_core::hbone::HboneError;
use proxy_core::identity::FetchError;
use proxy_core::store::{NamespacedHostname, Workload};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::connect_headers::{self, TraceParent};
use super::connections::{Carried, Direction as Listed, Protocol};
use super::metrics::{
    ConnectionRecord, Direction, FailureReason, Reporter, ResponseFlags, SecurityPolicy,
    TrafficLabels,
};
use super::route::{self, NextHop, Plan, Route, Unresolved};
use super::sockets::{ConnectError, canonical};
use super::splice::{refuse, splice};
use super::{Pod, accept_loop};
use crate::dns::on_demand::{self, lookup_order};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no original destination: {0}")]
    OriginalDestination(#[source] std::io::Error),
    #[error(
        "pod {0}'s own workload is not in the workload store; its traffic is refused rather than sent unidentified (is istiod reachable, and does it know the pod?)"
    )]
    UnknownSource(String),
    #[error(transparent)]
    Route(#[from] route::Error),
    #[error(
        "service {service}: endpoint {workload} is known by hostname {hostname} only, and it did not resolve ({source}); check the hostname (a ServiceEntry endpoint's address, or its host) and ztunnel's DNS servers"
    )]
    Resolve {
        service: NamespacedHostname,
        workload: String,
        hostname: String,
        #[source]
        source: on_demand::Error,
    },
    #[error(transparent)]
    Certificate(#[from] FetchError),
    #[error(transparent)]
    Hbone(#[from] HboneError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl Error {
    fn reason(&self) -> FailureReason {
        match self {
            Error::OriginalDestination(_) => FailureReason::NoOriginalDestination,
            Error::UnknownSource(_) => FailureReason::UnknownWorkload,
            Error::Route(route::Error::UnknownWaypoint { .. })
            | Error::Route(route::Error::NoWaypointEndpoint { .. }) => {
                FailureReason::UnknownWaypoint
            }
            Error::Route(_) => FailureReason::NoHealthyEndpoint,
            Error::Resolve { .. } => FailureReason::UnresolvedHostname,
            Error::Certificate(_) | Error::Hbone(HboneError::Certificate(_)) => {
                FailureReason::Certificate
            }
            Error::Hbone(HboneError::Refused { .. }) => FailureReason::Refused,
            Error::Hbone(
                HboneError::Tls { .. }
                | HboneError::TlsConfig(_)
                | HboneError::NoAlpn { .. }
                | HboneError::NoPeerIdentity { .. },
            ) => FailureReason::Handshake,
            Error::Hbone(_) | Error::Connect(_) => FailureReason::Connect,
        }
    }
}

pub(super) async fn serve(pod: Arc<Pod>, listener: TcpListener, stop: CancellationToken) {
    let limits = pod.node.config.pod_connections.local();
    accept_loop("outbound", limits, &pod, listener, stop, handle).await;
}

async fn handle(pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &pod.node.metrics;
    let src = canonical(peer);
    let dst = match pod.sockets.original_dst(&client) {
        Ok(dst) => canonical(dst),
        Err(e) => {
            let e = Error::OriginalDestination(e);
            metrics.early_failure(Direction::Outbound, src, None, e.reason(), &e);
            return refuse(client);
        }
    };
    let config = &pod.node.config;
    let Some(source) = pod.wait_for_workload(src.ip()).await else {
        let e = Error::UnknownSource(pod.workload_uid.clone());
        metrics.early_failure(Direction::Outbound, src, Some(dst), e.reason(), &e);
        return refuse(client);
    };
    let snapshot = pod.node.store.snapshot();
    let route = route::outbound(
        &snapshot,
        &config.network,
        &route::Source {
            identity: &pod.identity,
            ip: src.ip(),
            workload: &source,
        },
        dst,
        config.ports.hbone,
        &pod.node.balancer,
    );
    let route = match route {
        Ok(Plan::Ready(route)) => Ok(route),
        Ok(Plan::Resolve(unresolved)) => resolve(&pod, &source, unresolved).await,
        Err(e) => Err(Error::Route(e)),
    };
    let route = match route {
        Ok(route) => route,
        Err(e) => {
            metrics.early_failure(Direction::Outbound, src, Some(dst), e.reason(), &e);
            return refuse(client);
        }
    };
    let (security, next_hop, authority) = match &route.next_hop {
        NextHop::Tcp(target) => (SecurityPolicy::Unknown, *target, None),
        NextHop::Hbone { target, .. } => (
            SecurityPolicy::MutualTls,
            target.address,
            Some(target.authority),
        ),
    };
    let labels = TrafficLabels::new(Reporter::Source, security)
        .with_source(Some(&source))
        .with_source_principal(Some(&pod.identity))
        .with_destination(route.workload.as_deref())
        .with_destination_service(route.service.as_deref());
    let mut record = ConnectionRecord::open(
        metrics,
        Direction::Outbound,
        src,
        next_hop,
        authority,
        labels,
    );
    let trace = TraceParent::random();
    record.set_trace(trace);
    // Listed from the moment the next hop answers until the splice ends.
    let original_dst = Some(dst.to_string());
    let carried = match route.next_hop {
        NextHop::Tcp(target) => match pod.connect(target).await {
            Ok(server) => {
                let carried = Carried {
                    direction: Listed::Outbound,
                    protocol: Protocol::Tcp,
                    src,
                    original_dst,
                    actual_dst: target,
                    src_identity: None,
                    dst_identity: None,
                };
                let _tracked = pod.track(carried, &record);
                Ok(splice(client, server, &record).await)
            }
            Err(e) => Err((client, Error::Connect(e))),
        },
        NextHop::Hbone { target, .. } => {
            // Within the connect timeout (the pool's): a CONNECT not
            // answered in time retires its HBONE connection.
            let headers = connect_headers::outbound(
                &source,
                &config.cluster_id,
                src,
                route.service.as_deref(),
                &trace,
            );
            let tunnel = async {
                let cert = pod.certificate().await?;
                Ok::<_, Error>(
                    pod.pool
                        .connect_with_headers(&cert, &target, &headers)
                        .await?,
                )
            };
            match tunnel.await {
                Ok(server) => {
                    let carried = Carried {
                        direction: Listed::Outbound,
                        protocol: Protocol::Hbone,
                        src,
                        original_dst,
                        actual_dst: target.address,
                        src_identity: Some(pod.identity.clone()),
                        // The pool verified the peer presented it.
                        dst_identity: Some(target.identity.clone()),
                    };
                    let _tracked = pod.track(carried, &record);
                    Ok(splice(client, server, &record).await)
                }
                Err(e) => Err((client, e)),
            }
        }
    };
    match carried {
        Ok(Ok(())) => record.close(None),
        Ok(Err(e)) => record.close(Some(&e)),
        Err((client, e)) => {
            refuse(client);
            record.fail(ResponseFlags::Connect, e.reason(), &e);
        }
    }
}

/// The route to an endpoint known by hostname: looked up from the pod
/// (counted as upstream's `istio_on_demand_dns_total`, cache hit or not).
async fn resolve(pod: &Pod, source: &Workload, unresolved: Unresolved) -> Result<Route, Error> {
    let hostname = unresolved.hostname().to_string();
    pod.node
        .metrics
        .on_demand_dns(source, &pod.identity, &hostname);
    let order = lookup_order(unresolved.ip_families, unresolved.client_dst.ip());
    match pod
        .on_demand
        .resolve(&*pod.sockets, &hostname, &order)
        .await
    {
        Ok(ip) => Ok(unresolved.resolved(ip)),
        Err(source) => Err(Error::Resolve {
            service: unresolved.service.key(),
            workload: unresolved.workload.uid.clone(),
            hostname,
            source,
        }),
    }
}
