//! What every step of a request shares: who is asking (taken from the HBONE
//! session, never from headers), what the CONNECT addressed, and the outcome
//! of each decision. The decision modules (`http::*`, `balance`, `config`) and
//! the data path (`inbound`, `proxy`, `upstream`) meet here and nowhere else.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use api::SpiffeId;
use http::{HeaderMap, StatusCode};

use crate::http::modify::ClientCert;

/// The client as the waypoint saw it. In ambient mode the source ztunnel
/// dials from inside the client pod with the client's certificate, so the
/// HBONE peer *is* the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downstream {
    /// SPIFFE id of the HBONE peer's certificate.
    pub identity: SpiffeId,
    /// The HBONE peer's address (the client pod).
    pub address: SocketAddr,
    /// The CONNECT authority: the service VIP:port or workload IP:port the
    /// client addressed.
    pub connect: SocketAddr,
    /// The HBONE peer's leaf certificate as `x-forwarded-client-cert`
    /// reports it; read once per tunnel.
    pub client_cert: Arc<ClientCert>,
}

/// How a served port's bytes are read (`l7::Protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Not declared: HTTP/1.x or h2c when the first bytes say so, else TCP.
    Detect,
    /// HTTP/1.1 (h2c by prior knowledge is accepted too).
    Http1,
    /// h2c by prior knowledge.
    Http2,
    /// HTTP/2 carrying gRPC: gRPC status in metrics.
    Grpc,
    /// Opaque bytes: L4 policy and TCP metrics only.
    Tcp,
}

/// What the CONNECT addressed, as this waypoint serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A service bound to the waypoint, addressed by one of its VIPs.
    Service {
        namespace: String,
        hostname: String,
        port: u16,
        protocol: Protocol,
    },
    /// A workload bound to the waypoint, addressed by its own IP.
    Workload {
        uid: String,
        port: u16,
        protocol: Protocol,
    },
}

impl Target {
    /// The port the client addressed.
    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } | Target::Workload { port, .. } => *port,
        }
    }

    /// How the port's bytes are read.
    pub fn protocol(&self) -> Protocol {
        match self {
            Target::Service { protocol, .. } | Target::Workload { protocol, .. } => *protocol,
        }
    }
}

/// A request whose JWT verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Authenticated {
    /// `<iss>/<sub>`: what `requestPrincipals` match.
    pub principal: String,
    pub issuer: String,
    pub subject: String,
    /// The token's `aud` (a string or a list in the token).
    pub audiences: Vec<String>,
    /// The token's `azp`, if any.
    pub presenter: Option<String>,
    /// Every claim, for `request.auth.claims[..]` and claim-to-header.
    pub claims: serde_json::Value,
}

/// The outcome of RequestAuthentication for one request.
#[derive(Clone, Debug)]
pub enum Authn {
    /// No token anywhere the rules look: no request principal.
    Anonymous,
    Authenticated(Box<Authenticated>),
    /// A token was present and did not verify: the request ends here (401).
    Rejected(Refusal),
}

/// The outcome of AuthorizationPolicy for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authz {
    Allowed,
    /// `policy` names the object that decided (`<ns>/<name>`), or why no
    /// policy could (e.g. `missing_config`), for the log line.
    Denied {
        policy: String,
    },
}

/// A response the waypoint writes itself instead of forwarding.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub body: Cow<'static, str>,
    pub flag: ResponseFlag,
    pub headers: HeaderMap,
}

/// Envoy's short response flags, as `response_flags` in metrics and the
/// access log ("-" when none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    None,
    /// No route matched.
    NoRoute,
    /// No healthy endpoint.
    NoHealthyUpstream,
    /// Connecting to the endpoint failed.
    UpstreamConnectionFailure,
    /// A circuit breaker (connection pool limit) refused the request.
    UpstreamOverflow,
    /// Retries exhausted.
    UpstreamRetryLimitExceeded,
    /// The route's timeout fired.
    UpstreamRequestTimeout,
    /// The client went away.
    DownstreamConnectionTermination,
    /// The endpoint's connection ended mid-request.
    UpstreamConnectionTermination,
    /// A fault delay was injected.
    DelayInjected,
    /// A fault abort was injected.
    FaultInjected,
}

impl ResponseFlag {
    /// The short form, as Envoy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configuration field that cannot be served as written: the path inside
/// the resource (`routes[3].matches[0].path.regex`) and why. A resource with
/// one is NACKed by name; the rest of the response applies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error one level down: `rules[2]` + `from[0].principals` =
    /// `rules[2].from[0].principals`.
    pub fn within(self, parent: impl fmt::Display) -> Self {
        FieldError {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}

/// A validated, ready-to-evaluate form of one L7 resource, built once when
/// the resource arrives (regexes compiled, keys decoded, CIDRs parsed).
pub trait FromProto<P>: Sized {
    fn from_proto(proto: &P) -> Result<Self, FieldError>;
}
