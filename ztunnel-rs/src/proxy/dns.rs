//! A pod's DNS proxy: UDP and TCP on 15053 inside the pod, started and
//! stopped with its other listeners. Each query is answered from the store
//! or forwarded ([`crate::dns`]); the client is the pod's own workload.
//!
//! The UDP loop only receives: every datagram is handled in a task of its
//! own (counted among the pod's connections, so drain waits for it), with
//! at most [`MAX_IN_FLIGHT`] per pod; past that, datagrams are dropped as a
//! full socket buffer would drop them. Garbage is answered FORMERR or
//! dropped, with a bounded log line; nothing a client sends stops the loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use proxy_core::log_limit::LogLimit;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Pod;
use super::sockets::canonical_ip;
use crate::dns::forwarder::{Protocol, read_frame, write_frame};
use crate::dns::lookup::{Lookup, lookup};
use crate::dns::message::{self, Rejected, Request};
use crate::dns::metrics::DnsLabels;
use crate::dns::{Domains, Forwarder, TCP_REQUEST_TIMEOUT};

/// Queries of one pod handled at once over UDP.
pub const MAX_IN_FLIGHT: usize = 256;
/// Largest UDP query read (EDNS allows up to 64 KiB).
const MAX_QUERY: usize = 65_535;

/// What every pod's DNS proxy shares.
#[derive(Debug)]
pub struct DnsProxy {
    pub domains: Domains,
    pub forwarder: Forwarder,
}

static BAD_QUERY: LogLimit = LogLimit::new(Duration::from_secs(10));
static FORWARD_FAILED: LogLimit = LogLimit::new(Duration::from_secs(10));
static OVERLOADED: LogLimit = LogLimit::new(Duration::from_secs(10));

pub(super) async fn serve_udp(
    pod: Arc<Pod>,
    dns: Arc<DnsProxy>,
    socket: UdpSocket,
    stop: CancellationToken,
) {
    // Before the first complete xDS state, queries wait in the socket
    // rather than be answered from a partial view (as `accept_loop`).
    tokio::select! {
        () = pod.node.store.synced() => {}
        () = stop.cancelled() => return,
    }
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            () = stop.cancelled() => break,
        };
        let (n, peer) = match received {
            Ok(received) => received,
            // An ICMP error from an earlier answer's destination, say:
            // nothing to do with the next datagram.
            Err(error) => {
                debug!(pod = %pod.info.uid, %error, "DNS receive failed");
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            if let Some(suppressed) = OVERLOADED.allow() {
                warn!(pod = %pod.info.uid, %peer, limit = MAX_IN_FLIGHT, suppressed,
                      "too many DNS queries in flight; dropping the query");
            }
            continue;
        };
        let query = buf[..n].to_vec();
        let (task_pod, dns, socket) = (pod.clone(), dns.clone(), socket.clone());
        pod.spawn_connection(async move {
            if let Some(answer) = answer(&task_pod, &dns, &query, Protocol::Udp, peer).await
                && let Err(error) = socket.send_to(&answer, peer).await
            {
                debug!(pod = %task_pod.info.uid, %peer, %error, "cannot send the DNS answer");
            }
            drop(permit);
        });
    }
}

pub(super) async fn serve_tcp(
    pod: Arc<Pod>,
    dns: Arc<DnsProxy>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let limits = pod.node.config.pod_connections.local();
    super::accept_loop(
        "dns",
        limits,
        &pod,
        listener,
        stop,
        move |pod, stream, peer| {
            let dns = dns.clone();
            async move { serve_tcp_client(&pod, &dns, stream, peer).await }
        },
    )
    .await;
}

/// Queries on one TCP connection, one after the other, until the client
/// closes or sends nothing for [`TCP_REQUEST_TIMEOUT`].
async fn serve_tcp_client(pod: &Pod, dns: &DnsProxy, mut stream: TcpStream, peer: SocketAddr) {
    loop {
        let query = match tokio::time::timeout(TCP_REQUEST_TIMEOUT, read_frame(&mut stream)).await {
            Ok(Ok(Some(query))) => query,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(error)) => {
                debug!(pod = %pod.info.uid, %peer, %error, "DNS over TCP: read failed");
                return;
            }
        };
        let Some(answer) = answer(pod, dns, &query, Protocol::Tcp, peer).await else {
            // Not worth an answer (not a query): nor the connection.
            return;
        };
        if let Err(error) = write_frame(&mut stream, &answer).await {
            debug!(pod = %pod.info.uid, %peer, %error, "DNS over TCP: write failed");
            return;
        }
    }
}

/// The bytes answering `query`, or `None` when it is not answered.
async fn answer(
    pod: &Pod,
    dns: &DnsProxy,
    query: &[u8],
    protocol: Protocol,
    peer: SocketAddr,
) -> Option<Vec<u8>> {
    let request = match message::parse(query) {
        Ok(request) => request,
        Err(rejected) => {
            if let Some(suppressed) = BAD_QUERY.allow() {
                let outcome = match &rejected {
                    Rejected::Reply(_, code) => code.to_str(),
                    Rejected::Drop(reason) => reason,
                };
                warn!(pod = %pod.info.uid, %peer, protocol = protocol.label(), outcome, suppressed,
                      "malformed DNS query");
            }
            return match rejected {
                Rejected::Reply(bytes, _) => Some(bytes),
                Rejected::Drop(_) => None,
            };
        }
    };
    let limit = (protocol == Protocol::Udp).then(|| request.max_udp_payload());
    let query = request.query().clone();
    let client = pod.wait_for_workload(canonical_ip(peer.ip())).await;
    let labels = DnsLabels::new(&query.query_type().to_string(), protocol, client.as_deref());
    let metrics = &pod.node.metrics.dns;
    metrics.request(&labels);
    let reply = |code, authoritative, records| {
        message::encode(
            &message::response(&request, code, authoritative, records),
            limit,
        )
        .ok()
    };
    // Upstream answers SERVFAIL when it cannot tell who is asking.
    let Some(client) = client else {
        return reply(ResponseCode::ServFail, false, Vec::new());
    };
    let snapshot = pod.node.store.snapshot();
    match lookup(
        &snapshot,
        &dns.domains,
        &client,
        query.name(),
        query.query_type(),
    ) {
        Lookup::Answer(records) => {
            debug!(target: "dns", pod = %pod.info.uid, query = %query, answers = records.len(), "answered from the mesh");
            reply(ResponseCode::NoError, true, records)
        }
        Lookup::Forward => forward(pod, dns, &request, protocol, &labels, limit).await,
    }
}

async fn forward(
    pod: &Pod,
    dns: &DnsProxy,
    request: &Request,
    protocol: Protocol,
    labels: &DnsLabels,
    limit: Option<u16>,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let forwarded = dns
        .forwarder
        .forward(&*pod.sockets, &request.message, protocol)
        .await;
    pod.node
        .metrics
        .dns
        .forwarded(labels, started.elapsed(), forwarded.is_ok());
    match forwarded {
        Ok(answer) => message::encode(&answer, limit).ok(),
        Err(error) => {
            if let Some(suppressed) = FORWARD_FAILED.allow() {
                warn!(pod = %pod.info.uid, query = %request.query(), %error, suppressed,
                      "DNS forwarding failed; answering SERVFAIL");
            }
            let reply = message::response(request, ResponseCode::ServFail, false, Vec::new());
            message::encode(&reply, limit).ok()
        }
    }
}
