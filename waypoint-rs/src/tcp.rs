//! Ports that are not HTTP (declared TCP, or detected as not HTTP): the
//! client's bytes are spliced to one endpoint of the destination over
//! HBONE (the waypoint's own identity, as for HTTP), with upstream's TCP
//! metrics and one access log line per connection. An endpoint that cannot
//! be reached is skipped for the next one, up to the retry attempts.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use proxy_core::hbone::HboneStream;
use proxy_core::log_limit::LogLimit;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

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
        let connection = destination.limits.open_connection_now()?;
        let idle_timeout = destination.limits.settings.tcp_idle_timeout;
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let (endpoint, picked) = proxy.upstream.pick(&destination, &tried)?;
            tried.push(endpoint.target);
            peers.destination = Some(endpoint.workload.clone());
            let tunnel = proxy.upstream.tunnel(endpoint, &destination.limits).await;
            destination.record_connect(endpoint, tunnel.as_ref().err());
            match tunnel {
                Ok(stream) => {
                    let held = (permit, connection, picked);
                    return Ok::<_, Error>((stream, endpoint.target, idle_timeout, held));
                }
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
    let (mut server, endpoint, idle_timeout, _held): (HboneStream, _, _, _) = match connected {
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
    let (received, sent, error) = splice(&mut client, &mut server, idle_timeout).await;
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

/// Copies both ways until both sides end, one fails, or (with `idle`)
/// nothing moved either way for that long (the DestinationRule's
/// `tcp.idleTimeout`): the bytes each way and why it ended early.
async fn splice<A, B>(
    client: &mut A,
    server: &mut B,
    idle: Option<Duration>,
) -> (u64, u64, Option<String>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else {
        return match tokio::io::copy_bidirectional(client, server).await {
            Ok((received, sent)) => (received, sent, None),
            Err(error) => (0, 0, Some(error.to_string())),
        };
    };
    let start = tokio::time::Instant::now();
    let activity = Arc::new(Activity::default());
    let ended = {
        let mut client = Counted::new(client, activity.clone(), true);
        let mut server = Counted::new(server, activity.clone(), false);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
        tokio::pin!(copy);
        loop {
            let moved = activity.last.load(Ordering::Relaxed);
            let deadline = start + Duration::from_millis(moved) + idle;
            tokio::select! {
                copied = &mut copy => break copied.err().map(|e| e.to_string()),
                () = tokio::time::sleep_until(deadline) => {
                    if activity.last.load(Ordering::Relaxed) == moved {
                        break Some(IDLE.to_string());
                    }
                }
            }
        }
    };
    if ended.as_deref() == Some(IDLE) {
        // Both peers read an end of stream rather than a reset.
        let _ = tokio::time::timeout(SHUTDOWN_PATIENCE, async {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        })
        .await;
    }
    (
        activity.received.load(Ordering::Relaxed),
        activity.sent.load(Ordering::Relaxed),
        ended,
    )
}

const IDLE: &str = "idle timeout (DestinationRule tcp.idleTimeout)";
/// Closing both sides after an idle timeout takes no longer than this.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(1);

/// What moved on a spliced connection: bytes from the client, bytes from
/// the endpoint, and when anything last moved (ms from the start).
#[derive(Default)]
struct Activity {
    received: AtomicU64,
    sent: AtomicU64,
    last: AtomicU64,
}

/// One side of a splice, counting what is read from it.
struct Counted<'a, S> {
    inner: &'a mut S,
    activity: Arc<Activity>,
    start: tokio::time::Instant,
    client: bool,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: &'a mut S, activity: Arc<Activity>, client: bool) -> Self {
        Counted {
            inner,
            activity,
            start: tokio::time::Instant::now(),
            client,
        }
    }

    fn moved(&self, read: u64) {
        let count = if self.client {
            &self.activity.received
        } else {
            &self.activity.sent
        };
        count.fetch_add(read, Ordering::Relaxed);
        let now = self.start.elapsed().as_millis() as u64;
        self.activity.last.fetch_max(now, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.moved(read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
