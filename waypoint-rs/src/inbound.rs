//! HBONE termination on 15008. Each CONNECT is checked before it is
//! answered ([`served`]): its authority must be a VIP:port of a service
//! bound to this waypoint, or the IP of a workload bound to it (any port),
//! as the upstream waypoint serves exactly those (istio/istio
//! `listener_waypoint.go` `buildWaypointInternal`: a filter chain per bound
//! service VIP and declared port, and per bound workload IP). Anything
//! else is refused with 400 before any byte flows — what upstream ztunnel
//! answers a CONNECT for an address that is not its own
//! (`src/proxy/inbound.rs` `validate_destination` → `IPMismatch`); Envoy
//! has no status for it (no filter chain matches), agentgateway answers
//! 200 and then 404, which would let a client probe unbound addresses.
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
use crate::proxy::Proxy;
use crate::request::{Downstream, Protocol, Target};
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
    #[error("{0} is neither a service VIP nor a workload address this waypoint knows")]
    Unknown(SocketAddr),
    #[error("{what} at {authority} is not bound to this waypoint")]
    NotBound { what: String, authority: SocketAddr },
    #[error("service {service} does not declare port {port}")]
    UndeclaredPort { service: String, port: u16 },
    #[error(
        "{0} is not a service VIP:port or workload address this waypoint's configuration lists"
    )]
    NotListed(SocketAddr),
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

/// What a CONNECT to `authority` reaches through this waypoint. The
/// workload API carries no port protocol, so every port is detected until
/// the L7 configuration declares it.
pub fn served(snapshot: &Snapshot, me: &Me, authority: SocketAddr) -> Result<Target, Unserved> {
    let (ip, port) = (authority.ip(), authority.port());
    if let Some(service) = snapshot.service_by_vip(&me.network, ip) {
        let bound = service
            .waypoint
            .as_ref()
            .is_some_and(|gw| is_me(snapshot, me, gw));
        if !bound {
            return Err(Unserved::NotBound {
                what: format!("service {}", service.key()),
                authority,
            });
        }
        if !service.ports.iter().any(|p| p.service_port == port) {
            return Err(Unserved::UndeclaredPort {
                service: service.key().to_string(),
                port,
            });
        }
        return Ok(Target::Service {
            namespace: service.namespace.clone(),
            hostname: service.hostname.clone(),
            port,
            protocol: Protocol::Detect,
        });
    }
    if let Some(workload) = snapshot.workload_by_address(&me.network, ip) {
        let bound = workload
            .waypoint
            .as_ref()
            .is_some_and(|gw| is_me(snapshot, me, gw));
        if !bound {
            return Err(Unserved::NotBound {
                what: format!("workload {}", workload.uid),
                authority,
            });
        }
        return Ok(Target::Workload {
            uid: workload.uid.clone(),
            port,
            protocol: Protocol::Detect,
        });
    }
    Err(Unserved::Unknown(authority))
}

/// The HBONE handler: validate, accept, serve.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub proxy: Arc<Proxy>,
    pub me: Me,
    pub drain: Drain,
}

impl InboundHandler for Inbound {
    async fn handle(&self, connect: InboundConnect) {
        if self.drain.is_draining() {
            connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        let served = match self.proxy.served(&self.me, connect.authority()) {
            Ok(served) => Arc::new(served),
            Err(why) => {
                if let Some(suppressed) = REFUSED.allow() {
                    tracing::warn!(peer = %connect.peer_identity(), address = %connect.peer_address(), %why, suppressed, "CONNECT refused");
                }
                connect.refuse(StatusCode::BAD_REQUEST);
                return;
            }
        };
        let downstream = Downstream {
            identity: connect.peer_identity().clone(),
            address: connect.peer_address(),
            connect: connect.authority(),
        };
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
