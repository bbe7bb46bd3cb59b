//! Inbound HBONE (15008): mutual TLS with the pod's own certificate (the
//! peer must be in the trust domain), then for each CONNECT:
//!
//! 1. the target must be this pod (the address the connection arrived on)
//!    and not one of the proxy's own ports, else 400 ([`check_target`]);
//! 2. the pod's workload must be in the store (waited for briefly), else
//!    503;
//! 3. the pod's Authorization policies decide ([`super::admission`]), with
//!    the peer's identity and address, whoever the peer is: a client's
//!    ztunnel, the pod's waypoint, an ingress gateway or a sidecar. Deny is
//!    401, as upstream ztunnel answers it (`Inbound::serve_connect` maps
//!    `assert_rbac`'s refusal to `StatusCode::UNAUTHORIZED`); upstream too
//!    refuses nothing by waypoint binding alone; making traffic go
//!    through a waypoint is a policy's job (upstream istiod's
//!    `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`);
//! 4. the peer (identity and address) and the node must be under their
//!    ceilings of connections held to applications ([`super::held`]), else
//!    503;
//! 5. the application is dialled inside the pod (refused: 503), and bytes
//!    flow both ways until the end, or until a policy change denies the
//!    connection ([`super::revocation`]): then it is reset.
//!
//! The CONNECT's `traceparent` names the connection in the access log (a
//! new one when absent), its `forwarded` host picks which of the pod's
//! services the client addressed, and its `baggage` describes a source
//! the store does not know ([`super::connect_headers`]); none of them
//! counts for policy.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use proxy_core::authorization::{ConnectionInfo, Decision};
use proxy_core::hbone::{HboneError, HboneServer, InboundConnect, InboundHandler};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::connect_headers::{self, Baggage, TraceParent};
use super::connections::{Carried, Direction as Listed, Protocol};
use super::metrics::{
    ConnectionRecord, Direction, FailureReason, Reporter, ResponseFlags, SecurityPolicy,
    TrafficLabels,
};
use super::route;
use super::sockets::{ConnectError, canonical};
use super::splice::{refuse, reset};
use super::{Pod, accept_loop, admission, held, revocation};

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
    #[error("the application in the pod: {0}")]
    App(#[from] ConnectError),
    #[error(transparent)]
    Ceiling(#[from] held::Error),
}

/// Step 1: a CONNECT must name this pod's own address (the one the HBONE
/// connection arrived on) and a port that is not the proxy's own.
pub fn check_target(
    authority: SocketAddr,
    local: SocketAddr,
    proxy_ports: &super::Ports,
) -> Result<(), (FailureReason, Error)> {
    if authority.ip() != local.ip() {
        return Err((
            FailureReason::WrongTarget,
            Error::WrongTarget { authority, local },
        ));
    }
    if proxy_ports.contains(authority.port()) {
        return Err((FailureReason::ProxyPort, Error::ProxyPort(authority)));
    }
    Ok(())
}

pub(super) async fn serve(
    pod: Arc<Pod>,
    server: HboneServer<Handler>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let limits = pod.node.config.pod_connections.inbound();
    accept_loop(
        "hbone",
        limits,
        &pod,
        listener,
        stop,
        move |pod, tcp, peer| serve_connection(pod, server.clone(), tcp, peer),
    )
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
            return refuse(tcp);
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
    if let Err((reason, error)) = check_target(authority, local, &config.ports) {
        return early(StatusCode::BAD_REQUEST, reason, error, connect);
    }
    let Some(workload) = pod.wait_for_workload(local.ip()).await else {
        let error = Error::UnknownWorkload(pod.workload_uid.clone());
        return early(
            StatusCode::SERVICE_UNAVAILABLE,
            FailureReason::UnknownWorkload,
            error,
            connect,
        );
    };
    let peer_identity = connect.peer_identity().clone();
    let conn = ConnectionInfo {
        source_ip: peer.ip(),
        source_identity: Some(peer_identity.clone()),
        destination: authority,
    };
    // Registered before the decision is read, so no policy change is missed.
    let live = pod.node.live.register(&workload.uid, conn.clone());
    let snapshot = pod.node.store.snapshot();
    let workload = snapshot.workload_by_uid(&workload.uid).unwrap_or(workload);
    let source = snapshot.workload_by_address(&config.network, peer.ip());
    let headers = connect.headers();
    let service = connect_headers::forwarded_host(headers)
        .and_then(|host| route::backed_service(&snapshot, &workload, &host))
        .or_else(|| route::inbound_service(&snapshot, &workload, authority.port()));
    let mut labels = TrafficLabels::new(Reporter::Destination, SecurityPolicy::MutualTls);
    labels = match &source {
        Some(source) => labels.with_source(Some(source)),
        None => labels.with_derived_source(&Baggage::from_headers(headers)),
    };
    let labels = labels
        .with_source_principal(Some(&peer_identity))
        .with_destination(Some(&workload))
        .with_destination_service(service.as_deref());
    let mut record = ConnectionRecord::open(
        metrics,
        Direction::Inbound,
        peer,
        local,
        Some(authority),
        labels,
    );
    record.set_trace(TraceParent::from_headers(headers).unwrap_or_else(TraceParent::random));

    let decision = admission::decide(&snapshot, &workload, &conn);
    record.set_decision(&decision);
    if !decision.is_allowed() {
        connect.refuse(StatusCode::UNAUTHORIZED);
        let reason = admission::denial_reason(&decision);
        return record.fail(ResponseFlags::Deny, reason, &Error::Denied(decision));
    }

    let held = pod.hold_socket(held::Peer {
        identity: Some(peer_identity.clone()),
        ip: peer.ip(),
    });
    let _held = match held {
        Ok(held) => held,
        Err(error) => {
            connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            let reason = error.reason();
            return record.fail(ResponseFlags::Overflow, reason, &Error::Ceiling(error));
        }
    };
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
    let carried = Carried {
        direction: Listed::Inbound,
        protocol: Protocol::Hbone,
        src: peer,
        original_dst: service.map(|s| s.hostname.clone()),
        actual_dst: authority,
        src_identity: Some(peer_identity),
        dst_identity: Some(pod.identity.clone()),
    };
    let _tracked = pod.track(carried, &record);
    revocation::carry(tunnel, app, record, live).await;
}
