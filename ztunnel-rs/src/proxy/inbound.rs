//! Inbound HBONE (15008): mutual TLS with the pod's own certificate (the
//! peer must be in the trust domain), then for each CONNECT:
//!
//! 1. the target must be this pod (the address the connection arrived on),
//!    else 400;
//! 2. a pod bound to a waypoint takes traffic only from that waypoint (its
//!    identity, from its address), else 401; the waypoint has enforced the
//!    pod's policies, so they are not applied again to its traffic (as
//!    upstream);
//! 3. otherwise the pod's Authorization policies decide, with the peer's
//!    identity and address: deny is 403;
//! 4. the application is dialled inside the pod (refused: 503), and bytes
//!    flow both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use api::SpiffeId;
use http::StatusCode;
use proxy_core::authorization::{ConnectionInfo, Decision};
use proxy_core::hbone::{HboneError, HboneServer, InboundConnect, InboundHandler};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::metrics::{
    ConnectionRecord, Direction, FailureReason, Reporter, ResponseFlags, SecurityPolicy,
    TrafficLabels,
};
use super::route;
use super::sockets::{ConnectError, canonical};
use super::splice::{reset, splice};
use super::{Pod, accept_loop};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "CONNECT target {authority} is not this pod ({local}); HBONE to a pod must name the pod's own address"
    )]
    WrongTarget {
        authority: SocketAddr,
        local: SocketAddr,
    },
    #[error("CONNECT target {0} is one of the proxy's own ports")]
    ProxyPort(SocketAddr),
    #[error("pod {0} is not in the workload store yet; is the control plane reachable?")]
    UnknownWorkload(String),
    #[error("denied by policy: {0}")]
    Denied(Decision),
    #[error(
        "pod {pod} takes traffic only through its waypoint; {peer} at {address} is not the waypoint"
    )]
    WaypointBypassed {
        pod: String,
        peer: SpiffeId,
        address: SocketAddr,
    },
    #[error("the application in the pod: {0}")]
    App(#[from] ConnectError),
}

pub(super) async fn serve(
    pod: Arc<Pod>,
    server: HboneServer<Handler>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    accept_loop("hbone", &pod, listener, stop, move |pod, tcp, peer| {
        serve_connection(pod, server.clone(), tcp, peer)
    })
    .await;
}

/// One HBONE connection: TLS as the pod, then HTTP/2 until it ends.
async fn serve_connection(
    pod: Arc<Pod>,
    server: HboneServer<Handler>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let metrics = &pod.node.metrics;
    let (src, local) = (canonical(peer), tcp.local_addr().ok().map(canonical));
    let config = match pod.server_config().await {
        Ok(config) => config,
        Err(error) => {
            metrics.early_failure(
                Direction::Inbound,
                src,
                local,
                FailureReason::Certificate,
                &error,
            );
            return reset(tcp);
        }
    };
    match server.serve_connection(tcp, config).await {
        Ok(()) => {}
        Err(
            error @ (HboneError::Tls { .. }
            | HboneError::NoPeerIdentity { .. }
            | HboneError::NoAlpn { .. }
            | HboneError::Timeout { .. }),
        ) => metrics.early_failure(
            Direction::Inbound,
            src,
            local,
            FailureReason::Handshake,
            &error,
        ),
        Err(error) => {
            tracing::debug!(pod = %pod.info.uid, %src, %error, "HBONE connection ended with an error")
        }
    }
}

/// Answers the CONNECTs of one pod.
pub struct Handler {
    pod: Arc<Pod>,
}

impl Handler {
    pub(super) fn new(pod: Arc<Pod>) -> Self {
        Handler { pod }
    }
}

impl InboundHandler for Handler {
    async fn handle(&self, connect: InboundConnect) {
        let pod = self.pod.clone();
        // Counted with the pod's connections, so a drain waits for it.
        let _tracked = pod.connections.token();
        tokio::select! {
            () = handle(&pod, connect) => {}
            () = pod.force.cancelled() => {}
        }
    }
}

async fn handle(pod: &Pod, connect: InboundConnect) {
    let metrics = &pod.node.metrics;
    let config = &pod.node.config;
    let authority = canonical(connect.authority());
    let local = canonical(connect.local_address());
    let peer = canonical(connect.peer_address());
    let early =
        |status: StatusCode, reason: FailureReason, error: Error, connect: InboundConnect| {
            connect.refuse(status);
            metrics.early_failure(Direction::Inbound, peer, Some(authority), reason, &error);
        };
    if authority.ip() != local.ip() {
        let error = Error::WrongTarget { authority, local };
        return early(
            StatusCode::BAD_REQUEST,
            FailureReason::WrongTarget,
            error,
            connect,
        );
    }
    if config.ports.contains(authority.port()) {
        let error = Error::ProxyPort(authority);
        return early(
            StatusCode::BAD_REQUEST,
            FailureReason::ProxyPort,
            error,
            connect,
        );
    }
    let snapshot = pod.node.store.snapshot();
    let Some(workload) = pod.workload(&snapshot, local.ip()) else {
        let error = Error::UnknownWorkload(pod.workload_uid.clone());
        return early(
            StatusCode::SERVICE_UNAVAILABLE,
            FailureReason::UnknownWorkload,
            error,
            connect,
        );
    };
    let peer_identity = connect.peer_identity().clone();
    let source = snapshot.workload_by_address(&config.network, peer.ip());
    let labels = TrafficLabels::new(Reporter::Destination, SecurityPolicy::MutualTls)
        .with_source(source.as_deref())
        .with_source_principal(Some(&peer_identity))
        .with_destination(Some(&workload))
        .with_destination_service(
            route::inbound_service(&snapshot, &workload, authority.port()).as_deref(),
        );
    let mut record = ConnectionRecord::open(
        metrics,
        Direction::Inbound,
        peer,
        local,
        Some(authority),
        labels,
    );

    let waypoint = workload.waypoint.as_ref();
    let from_waypoint =
        waypoint.is_some_and(|w| route::is_gateway(&snapshot, w, &peer_identity, peer.ip()));
    if from_waypoint {
        record.set_decision("allow (from the pod's waypoint, which enforces its policies)");
    } else {
        let decision = snapshot.policies_for(&workload).check(&ConnectionInfo {
            source_ip: peer.ip(),
            source_identity: Some(peer_identity.clone()),
            destination: authority,
        });
        record.set_decision(&decision);
        if !decision.is_allowed() {
            connect.refuse(StatusCode::FORBIDDEN);
            let error = Error::Denied(decision);
            return record.fail(ResponseFlags::Deny, FailureReason::PolicyDenied, &error);
        }
        if waypoint.is_some() {
            connect.refuse(StatusCode::UNAUTHORIZED);
            let error = Error::WaypointBypassed {
                pod: workload.uid.clone(),
                peer: peer_identity,
                address: peer,
            };
            return record.fail(ResponseFlags::Deny, FailureReason::WaypointBypassed, &error);
        }
    }

    let app = match pod.connect_app(authority, peer.ip()).await {
        Ok(app) => app,
        Err(error) => {
            connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            let error = Error::App(error);
            return record.fail(ResponseFlags::Connect, FailureReason::AppRefused, &error);
        }
    };
    let tunnel = match connect.accept() {
        Ok(tunnel) => tunnel,
        Err(error) => {
            // The client went away between CONNECT and the answer.
            reset(app);
            return record.close(Some(&error));
        }
    };
    match splice(tunnel, app, &record).await {
        Ok(()) => record.close(None),
        Err(error) => record.close(Some(&error)),
    }
}
