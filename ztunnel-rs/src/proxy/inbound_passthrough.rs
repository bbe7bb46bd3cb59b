//! Inbound plaintext (15006): connections to the pod that arrived without
//! HBONE, redirected here by its rules. There is no identity, so the pod's
//! Authorization policies decide on addresses and ports alone: PERMISSIVE
//! lets such traffic through subject to them, and STRICT (which istiod turns
//! into a policy requiring an identity) refuses it. Refusal is an RST.

use std::net::SocketAddr;
use std::sync::Arc;

use proxy_core::authorization::{ConnectionInfo, Decision};
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
}

pub(super) async fn serve(pod: Arc<Pod>, listener: TcpListener, stop: CancellationToken) {
    accept_loop("inbound plaintext", &pod, listener, stop, handle).await;
}

async fn handle(pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
    let metrics = &pod.node.metrics;
    let config = &pod.node.config;
    let src = canonical(peer);
    let early =
        |dst: Option<SocketAddr>, reason: FailureReason, error: Error, client: TcpStream| {
            metrics.early_failure(Direction::InboundPlaintext, src, dst, reason, &error);
            reset(client);
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
    let snapshot = pod.node.store.snapshot();
    let Some(workload) = pod.workload(&snapshot, dst.ip()) else {
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
    let source = snapshot.workload_by_address(&config.network, src.ip());
    let labels = TrafficLabels::new(Reporter::Destination, SecurityPolicy::Unknown)
        .with_source(source.as_deref())
        .with_destination(Some(&workload))
        .with_destination_service(
            route::inbound_service(&snapshot, &workload, dst.port()).as_deref(),
        );
    let mut record =
        ConnectionRecord::open(metrics, Direction::InboundPlaintext, src, dst, None, labels);
    let decision = snapshot.policies_for(&workload).check(&ConnectionInfo {
        source_ip: src.ip(),
        source_identity: None,
        destination: dst,
    });
    record.set_decision(&decision);
    if !decision.is_allowed() {
        reset(client);
        let error = Error::Denied(decision);
        return record.fail(ResponseFlags::Deny, FailureReason::PolicyDenied, &error);
    }
    let app = match pod.connect_app(dst, src.ip()).await {
        Ok(app) => app,
        Err(error) => {
            reset(client);
            let error = Error::App(error);
            return record.fail(ResponseFlags::Connect, FailureReason::AppRefused, &error);
        }
    };
    match splice(client, app, &record).await {
        Ok(()) => record.close(None),
        Err(error) => record.close(Some(&error)),
    }
}
