//! HBONE termination on 15008. Each CONNECT is checked before it is
//! answered ([`Proxy::served`]): its authority must be a VIP:port of a
//! service, or the IP of a workload (any port), that the `Waypoint`
//! resource istiod serves this waypoint lists, as the upstream waypoint serves exactly those (istio/istio
//! `listener_waypoint.go` `buildWaypointInternal`: a filter chain per bound
//! service VIP and declared port, and per bound workload IP). Anything
//! else is refused with 400 before any byte flows — what upstream ztunnel
//! answers a CONNECT for an address that is not its own
//! (`src/proxy/inbound.rs` `validate_destination` → `IPMismatch`); Envoy
//! has no status for it (no filter chain matches), agentgateway answers
//! 200 and then 404, which would let a client probe unbound addresses.
//! Until istiod has served a `Waypoint` resource every CONNECT is refused
//! with 503: the workload API says what is bound here, but not which L7
//! rules apply to it, and serving without them would fail open.
//!
//! An accepted tunnel is read by the port's protocol: HTTP (HTTP/1.1 with
//! upgrades, or h2c) served by hyper into [`Proxy::serve`], or TCP spliced
//! by [`tcp::serve`]; undeclared ports are detected ([`sniff`]).

pub mod sniff;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use proxy_core::hbone::{HboneStream, InboundConnect, InboundHandler};
use proxy_core::log_limit::LogLimit;
use proxy_core::store::{Address, GatewayAddress, GatewayDestination, Snapshot};

use crate::config::Served;
use crate::drain::Drain;
use crate::http::modify::ClientCert;
use crate::proxy::Proxy;
use crate::request::{Downstream, Protocol};
use crate::tcp;
use sniff::{Detected, Rewind};

static REFUSED: LogLimit = LogLimit::new(Duration::from_secs(10));

/// The waypoint's own address: what a bound service's or workload's
/// `waypoint` points at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Me {
    pub ip: IpAddr,
    pub network: String,
}

/// Why a CONNECT authority is not served here.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unserved {
    /// istiod has not (yet) served this waypoint any `Waypoint` resource:
    /// nothing is known about what to enforce, so nothing is served. The
    /// workload API alone says what is bound here but not which L7 rules
    /// apply; serving on it would forward traffic unenforced.
    #[error("no L7 configuration from istiod yet: refusing {0} rather than serving it unenforced")]
    NoConfiguration(SocketAddr),
    #[error(
        "{0} is not a service VIP:port or workload address this waypoint's configuration lists"
    )]
    NotListed(SocketAddr),
}

impl Unserved {
    /// The CONNECT's answer: 503 while the configuration is missing (the
    /// client may try again), 400 for an address that is not served here.
    pub fn status(&self) -> StatusCode {
        match self {
            Unserved::NoConfiguration(_) => StatusCode::SERVICE_UNAVAILABLE,
            Unserved::NotListed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Whether a `waypoint` gateway address means this waypoint: its own IP,
/// a workload with its IP, or a service (the waypoint's Service) one of
/// whose endpoints has its IP.
pub fn is_me(snapshot: &Snapshot, me: &Me, gateway: &GatewayAddress) -> bool {
    if let GatewayDestination::Address(a) = &gateway.destination
        && a.address == me.ip
        && a.network == me.network
    {
        return true;
    }
    let holds_me =
        |w: &proxy_core::store::Workload| w.network == me.network && w.addresses.contains(&me.ip);
    match snapshot.resolve_gateway(gateway) {
        Some(Address::Workload(w)) => holds_me(&w),
        Some(Address::Service(s)) => snapshot
            .endpoints(&s.key())
            .is_some_and(|eps| eps.values().any(|e| holds_me(&e.workload))),
        None => false,
    }
}

/// The HBONE handler: validate, accept, serve.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub proxy: Arc<Proxy>,
    pub drain: Drain,
}

impl InboundHandler for Inbound {
    async fn handle(&self, connect: InboundConnect) {
        if self.drain.is_draining() {
            connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        let served = match self.proxy.served(connect.authority()) {
            Ok(served) => Arc::new(served),
            Err(why) => return refuse(connect, why.status(), &why),
        };
        // The handshake verified this certificate; one that cannot be read
        // for x-forwarded-client-cert is refused rather than forwarded
        // without the client's details.
        let client_cert = match ClientCert::from_der(connect.peer_certificate()) {
            Ok(cert) => Arc::new(cert),
            Err(why) => return refuse(connect, StatusCode::BAD_REQUEST, &why),
        };
        let downstream = Downstream {
            identity: connect.peer_identity().clone(),
            address: connect.peer_address(),
            connect: connect.authority(),
            client_cert,
        };
        self.proxy.look_up_client(downstream.address.ip());
        let _live = self.drain.track();
        let stream = match connect.accept() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "client went away before the CONNECT was answered");
                return;
            }
        };
        self.serve(downstream, served, stream).await;
    }
}

/// Refuses a CONNECT with `status`, saying why (rate-limited).
fn refuse(connect: InboundConnect, status: StatusCode, why: &dyn std::fmt::Display) {
    if let Some(suppressed) = REFUSED.allow() {
        tracing::warn!(peer = %connect.peer_identity(), address = %connect.peer_address(), %why, suppressed, "CONNECT refused");
    }
    connect.refuse(status);
}

impl Inbound {
    async fn serve(&self, downstream: Downstream, served: Arc<Served>, mut stream: HboneStream) {
        let (protocol, prefix) = match served.target.protocol() {
            Protocol::Tcp => (Detected::Tcp, Bytes::new()),
            Protocol::Http1 => (Detected::Http1, Bytes::new()),
            Protocol::Http2 | Protocol::Grpc => (Detected::Http2, Bytes::new()),
            Protocol::Detect => {
                let timeout = self.proxy.config.protocol_detection_timeout;
                match sniff::detect(&mut stream, timeout).await {
                    Ok(detected) => detected,
                    Err(error) => {
                        tracing::debug!(%error, "tunnel failed before its protocol was known");
                        return;
                    }
                }
            }
        };
        let io = Rewind::new(prefix, stream);
        match protocol {
            Detected::Tcp => tcp::serve(&self.proxy, downstream, &served, io).await,
            Detected::Http1 | Detected::Http2 => {
                self.serve_http(downstream, served, io, protocol == Detected::Http2)
                    .await
            }
        }
    }

    /// HTTP on one tunnel until the client closes it or drain ends it.
    async fn serve_http(
        &self,
        downstream: Downstream,
        served: Arc<Served>,
        io: Rewind<HboneStream>,
        http2: bool,
    ) {
        let proxy = self.proxy.clone();
        let service = hyper::service::service_fn(move |request| {
            let proxy = proxy.clone();
            let downstream = downstream.clone();
            let served = served.clone();
            async move { Ok::<_, Infallible>(proxy.serve(downstream, served, request).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        if http2 {
            builder = builder.http2_only();
        }
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.drain.signaled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "HTTP connection in tunnel ended with an error");
        }
    }
}
