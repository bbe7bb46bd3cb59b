//! The access log: one line per request and per TCP connection, tracing
//! target `access` (as ztunnel-rs's), so `RUST_LOG=access=off` silences it
//! and a JSON subscriber makes it machine-readable. Fields are the metric
//! labels that matter to an operator plus what the labels leave out
//! (method, path, addresses, durations).

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;

use crate::metrics::{HttpLabels, TcpLabels};
use crate::request::Downstream;

/// One finished HTTP request.
pub struct RequestLog<'a> {
    pub downstream: &'a Downstream,
    pub method: &'a Method,
    pub authority: &'a str,
    pub path: &'a str,
    pub labels: &'a HttpLabels,
    pub duration: Duration,
    pub received: u64,
    pub sent: u64,
    pub error: Option<&'a str>,
}

pub fn request(log: &RequestLog<'_>) {
    let l = log.labels;
    tracing::event!(
        target: "access",
        tracing::Level::INFO,
        src.addr = %log.downstream.address,
        src.identity = %log.downstream.identity,
        src.workload = %l.source_workload,
        dst.addr = %log.downstream.connect,
        dst.service = %l.destination_service,
        dst.workload = %l.destination_workload,
        dst.identity = %l.destination_principal,
        method = %log.method,
        authority = log.authority,
        path = log.path,
        protocol = l.request_protocol,
        status = %l.response_code,
        grpc_status = %l.grpc_response_status,
        flags = l.response_flags,
        duration_ms = log.duration.as_millis() as u64,
        bytes_received = log.received,
        bytes_sent = log.sent,
        error = log.error,
        "request"
    );
}

/// One finished TCP connection.
pub fn connection(
    downstream: &Downstream,
    endpoint: Option<SocketAddr>,
    labels: &TcpLabels,
    duration: Duration,
    received: u64,
    sent: u64,
    error: Option<&str>,
) {
    tracing::event!(
        target: "access",
        tracing::Level::INFO,
        src.addr = %downstream.address,
        src.identity = %downstream.identity,
        dst.addr = %downstream.connect,
        dst.endpoint = endpoint.map(tracing::field::display),
        dst.service = %labels.destination_service,
        dst.workload = %labels.destination_workload,
        protocol = "tcp",
        flags = labels.response_flags,
        duration_ms = duration.as_millis() as u64,
        bytes_received = received,
        bytes_sent = sent,
        error,
        "connection"
    );
}
