//! Ports that are not HTTP (declared TCP, or detected as not HTTP): the
//! client's bytes are spliced to one endpoint of the destination over
//! HBONE (the waypoint's own identity, as for HTTP), with upstream's TCP
//! metrics and one access log line per connection. An endpoint that cannot
//! be reached is skipped for the next one, up to the retry attempts.

use std::net::SocketAddr;
use std::time::Instant;

use proxy_core::hbone::HboneStream;
use proxy_core::log_limit::LogLimit;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::access_log;
use crate::config::Served;
use crate::http::authorization::{ConnectionFacts, authorize_tcp};
use crate::http::route;
use crate::metrics::{Peers, TcpLabels};
use crate::proxy::Proxy;
use crate::request::{Authz, Downstream, ResponseFlag, Target};
use crate::upstream::Error;
use proxy_core::store::NamespacedHostname;

static FAILED: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));

/// Carries one connection to its end: refused when the target is
/// unservable or an authorization policy denies it (HTTP-only fields read
/// as istiod's TCP translation reads them), else spliced.
pub async fn serve<S>(proxy: &Proxy, downstream: Downstream, served: &Served, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = &served.target;
    let refused = match &served.refusal {
        Some(unservable) => Some(unservable.to_string()),
        None => {
            let facts = ConnectionFacts {
                downstream: &downstream,
                target,
                destination: downstream.connect,
                sni: None,
            };
            match authorize_tcp(served.authorizations.iter().map(|p| p.as_ref()), &facts) {
                Authz::Denied { policy } => Some(format!("denied by {policy}")),
                Authz::Allowed => None,
            }
        }
    };
    let start = Instant::now();
    let snapshot = proxy.store.snapshot();
    let mut peers = Peers {
        source_identity: Some(downstream.identity.clone()),
        source: snapshot.workload_by_address(&proxy.config.network, downstream.address.ip()),
        ..Peers::default()
    };
    if let Some(reason) = refused {
        let labels = TcpLabels::new(&peers, ResponseFlag::None);
        proxy.metrics.tcp_opened(&labels);
        proxy.metrics.tcp_closed(&labels, 0, 0);
        access_log::connection(
            &downstream,
            None,
            &labels,
            start.elapsed(),
            0,
            0,
            Some(&reason),
        );
        return;
    }
    let connected = async {
        // The addressed service with its DestinationRule (balancer, outlier
        // detection, limits), as for HTTP; a request-less hash key (source IP)
        // still applies.
        let routed = match target {
            Target::Service {
                namespace,
                hostname,
                port,
                ..
            } => route::Destination::Service {
                service: NamespacedHostname::new(namespace, hostname),
                port: *port,
                subset: None,
            },
            Target::Workload { uid, port, .. } => route::Destination::Workload {
                uid: uid.clone(),
                port: *port,
            },
        };
        let destination =
            proxy.destination(&snapshot, &routed, &http::Request::new(()), &downstream)?;
        peers.service = destination.service.clone();
        let permit = proxy.upstream.admit(&destination)?;
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let (endpoint, picked) = proxy.upstream.pick(&destination, &tried)?;
            tried.push(endpoint.target);
            peers.destination = Some(endpoint.workload.clone());
            let tunnel = proxy.upstream.tunnel(endpoint).await;
            destination.record_connect(endpoint, tunnel.as_ref().err());
            match tunnel {
                Ok(stream) => return Ok::<_, Error>((stream, endpoint.target, (permit, picked))),
                Err(error)
                    if tried.len() <= proxy.config.upstream.retry.attempts as usize
                        && tried.len() < destination.endpoints.len() =>
                {
                    tracing::debug!(%error, "trying the next endpoint");
                }
                Err(error) => return Err(error),
            }
        }
    }
    .await;
    let (mut server, endpoint, _permit): (HboneStream, _, _) = match connected {
        Ok(connected) => connected,
        Err(error) => {
            let labels = TcpLabels::new(&peers, error.flag());
            proxy.metrics.tcp_opened(&labels);
            proxy.metrics.tcp_closed(&labels, 0, 0);
            if let Some(suppressed) = FAILED.allow() {
                tracing::warn!(src = %downstream.address, dst = %downstream.connect, %error, suppressed, "TCP connection not carried");
            }
            let error = error.to_string();
            access_log::connection(
                &downstream,
                None,
                &labels,
                start.elapsed(),
                0,
                0,
                Some(&error),
            );
            return;
        }
    };
    let labels = TcpLabels::new(&peers, ResponseFlag::None);
    proxy.metrics.tcp_opened(&labels);
    let copied = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    let (received, sent, error) = match copied {
        Ok((received, sent)) => (received, sent, None),
        Err(error) => (0, 0, Some(error.to_string())),
    };
    proxy.metrics.tcp_closed(&labels, received, sent);
    access_log::connection(
        &downstream,
        Some(endpoint),
        &labels,
        start.elapsed(),
        received,
        sent,
        error.as_deref(),
    );
}
