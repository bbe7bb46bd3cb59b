//! Inbound plaintext (15006): connections to the pod that arrived without
//! HBONE, redirected here by its rules. There is no identity, so the pod's
//! Authorization policies decide on addresses and ports alone, with the
//! same decision as HBONE ([`super::admission`]): PERMISSIVE lets such
//! traffic through subject to them, and STRICT (which istiod turns into a
//! policy requiring an identity) refuses it. The client's address and the
//! node must be under their ceilings of connections held to applications
//! ([`super::held`]). A refused connection is closed
//! ([`super::splice::refuse`]: the client reads EOF, as from upstream
//! ztunnel); one a later policy change denies is reset.

use std::net::SocketAddr;
use std::sync::Arc;

use proxy_core::authorization::{ConnectionInfo, Decision};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::connections::{Carried, Direction as Listed, Protocol};
use super::metrics::{
    ConnectionRecord, Direction, FailureReason, Reporter, ResponseFlags, SecurityPolicy,
    TrafficLabels,
};
use super::route;
use super::sockets::{ConnectError, canonical};
use super::splice::refuse;
use super::{Pod, accept_loop, admission, held, revocation};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no original destination: {0}")]
    OriginalDestination(#[source] std::io::Error),
    #[error("{0} is one of the proxy's own ports")]
    ProxyPort(SocketAddr),
    #[error("pod {0} is not in the workload store yet; is the control plane reachable?")]
    UnknownWorkload(String),
    #[error("{dst} is not an address of pod {pod}")]
    WrongTarget { dst: SocketAddr, pod: String },
    #[error("denied by policy: {0}")]
    Denied(Decision),
    #[error("the application in the pod: {0}")]
    App(#[from] ConnectError),
    #[error(transparent)]
    Ceiling(#[from] held::Error),
}

pub(super) async fn serve(pod: Arc<Pod>, listener: TcpListener, stop: CancellationToken) {
    let limits = pod.node.config.pod_connections.inbound();
    accept_loop("inbound_plaintext", limits, &pod, listener, stop, handle).await;
}

async fn handle(pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &pod.node.metrics;
    let config = &pod.node.config;
    let src = canonical(peer);
    let early =
        |dst: Option<SocketAddr>, reason: FailureReason, error: Error, client: TcpStream| {
            metrics.early_failure(Direction::InboundPlaintext, src, dst, reason, &error);
            refuse(client);
        };
    let dst = match pod.sockets.original_dst(&client) {
        Ok(dst) => canonical(dst),
        Err(e) => {
            let error = Error::OriginalDestination(e);
            return early(None, FailureReason::NoOriginalDestination, error, client);
        }
    };
    if config.ports.contains(dst.port()) {
        return early(
            Some(dst),
            FailureReason::ProxyPort,
            Error::ProxyPort(dst),
            client,
        );
    }
    let Some(workload) = pod.wait_for_workload(dst.ip()).await else {
        let error = Error::UnknownWorkload(pod.workload_uid.clone());
        return early(Some(dst), FailureReason::UnknownWorkload, error, client);
    };
    if !workload.addresses.contains(&dst.ip()) {
        let error = Error::WrongTarget {
            dst,
            pod: workload.uid.clone(),
        };
        return early(Some(dst), FailureReason::WrongTarget, error, client);
    }
    let conn = ConnectionInfo {
        source_ip: src.ip(),
        source_identity: None,
        destination: dst,
    };
    // Registered before the decision is read, so no policy change is missed.
    let live = pod.node.live.register(&workload.uid, conn.clone());
    let snapshot = pod.node.store.snapshot();
    let workload = snapshot.workload_by_uid(&workload.uid).unwrap_or(workload);
    let source = snapshot.workload_by_address(&config.network, src.ip());
    let service = route::inbound_service(&snapshot, &workload, dst.port());
    let labels = TrafficLabels::new(Reporter::Destination, SecurityPolicy::Unknown)
        .with_source(source.as_deref())
        .with_destination(Some(&workload))
        .with_destination_service(service.as_deref());
    let mut record =
        ConnectionRecord::open(metrics, Direction::InboundPlaintext, src, dst, None, labels);
    let decision = admission::decide(&snapshot, &workload, &conn);
    record.set_decision(&decision);
    if !decision.is_allowed() {
        refuse(client);
        let reason = admission::denial_reason(&decision);
        return record.fail(ResponseFlags::Deny, reason, &Error::Denied(decision));
    }
    let held = pod.hold_socket(held::Peer {
        identity: None,
        ip: src.ip(),
    });
    let _held = match held {
        Ok(held) => held,
        Err(error) => {
            refuse(client);
            let reason = error.reason();
            return record.fail(ResponseFlags::Overflow, reason, &Error::Ceiling(error));
        }
    };
    let app = match pod.connect_app(dst, src.ip()).await {
        Ok(app) => app,
        Err(error) => {
            refuse(client);
            let error = Error::App(error);
            return record.fail(ResponseFlags::Connect, FailureReason::AppRefused, &error);
        }
    };
    let carried = Carried {
        direction: Listed::Inbound,
        protocol: Protocol::Tcp,
        src,
        original_dst: service.map(|s| s.hostname.clone()),
        actual_dst: dst,
        // Nothing proved who either side is.
        src_identity: None,
        dst_identity: None,
    };
    let _tracked = pod.track(carried, &record);
    revocation::carry(client, app, record, live).await;
}
