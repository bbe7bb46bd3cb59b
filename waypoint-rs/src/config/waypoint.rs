//! `l7::Waypoint`: what this waypoint serves, validated.

use std::net::IpAddr;

use api::l7;
use proxy_core::store::NamespacedHostname;

use crate::request::{FieldError, FromProto, Protocol};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub services: Vec<ServedService>,
    pub workloads: Vec<ServedWorkload>,
    /// HttpAuthorization keys that apply to everything served, first.
    pub gateway_authorizations: Vec<String>,
    /// JwtAuthentication keys that apply to everything served, first.
    pub gateway_authentications: Vec<String>,
    /// The Gateway opted in to `x-forwarded-client-cert` carrying the
    /// client's identity; otherwise the waypoint sends none
    /// (`http::modify::set_forwarded_client_cert`).
    pub forward_client_identity: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedService {
    pub service: NamespacedHostname,
    /// Declared protocols; a service port not listed is `Detect`.
    pub ports: Vec<(u16, Protocol)>,
    /// `None`: no route attaches, forward to the service.
    pub route_table: Option<String>,
    pub authorizations: Vec<String>,
    pub authentications: Vec<String>,
    pub deny_all_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedWorkload {
    pub uid: String,
    pub addresses: Vec<IpAddr>,
    /// Empty: `Detect` on every port.
    pub ports: Vec<(u16, Protocol)>,
    pub authorizations: Vec<String>,
    pub authentications: Vec<String>,
    pub deny_all_reason: Option<String>,
}

impl Waypoint {
    /// `<namespace>/<name>`: the resource name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl FromProto<l7::Waypoint> for Waypoint {
    fn from_proto(p: &l7::Waypoint) -> Result<Self, FieldError> {
        Ok(Waypoint {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            services: crate::config::convert::each("services", &p.services)?,
            workloads: crate::config::convert::each("workloads", &p.workloads)?,
            gateway_authorizations: keys("gateway_authorizations", &p.gateway_authorizations)?,
            gateway_authentications: keys("gateway_authentications", &p.gateway_authentications)?,
            forward_client_identity: p.forward_client_identity,
        })
    }
}

impl FromProto<l7::ServedService> for ServedService {
    fn from_proto(p: &l7::ServedService) -> Result<Self, FieldError> {
        if p.namespace.is_empty() || p.hostname.is_empty() {
            return Err(FieldError::new(
                "hostname",
                "namespace and hostname are required",
            ));
        }
        let route_table = (!p.route_table.is_empty())
            .then(|| key("route_table", &p.route_table))
            .transpose()?;
        Ok(ServedService {
            service: NamespacedHostname::new(&p.namespace, &p.hostname),
            ports: ports(&p.ports)?,
            route_table,
            authorizations: keys("authorizations", &p.authorizations)?,
            authentications: keys("authentications", &p.authentications)?,
            deny_all_reason: (!p.deny_all_reason.is_empty()).then(|| p.deny_all_reason.clone()),
        })
    }
}

impl FromProto<l7::ServedWorkload> for ServedWorkload {
    fn from_proto(p: &l7::ServedWorkload) -> Result<Self, FieldError> {
        if p.uid.is_empty() {
            return Err(FieldError::new("uid", "a workload uid is required"));
        }
        let addresses = p
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                ip(a).ok_or_else(|| {
                    FieldError::new(
                        format!("addresses[{i}]"),
                        format!(
                            "{} bytes is not an IP address (IPv4 has 4 bytes, IPv6 16)",
                            a.len()
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ServedWorkload {
            uid: p.uid.clone(),
            addresses,
            ports: ports(&p.ports)?,
            authorizations: keys("authorizations", &p.authorizations)?,
            authentications: keys("authentications", &p.authentications)?,
            deny_all_reason: (!p.deny_all_reason.is_empty()).then(|| p.deny_all_reason.clone()),
        })
    }
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

fn ports(ports: &[l7::ServedPort]) -> Result<Vec<(u16, Protocol)>, FieldError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = format!("ports[{i}]");
            let port = crate::config::convert::port(&format!("{field}.port"), p.port)?;
            let protocol = match l7::Protocol::try_from(p.protocol) {
                Ok(l7::Protocol::Detect) => Protocol::Detect,
                Ok(l7::Protocol::Http) => Protocol::Http1,
                Ok(l7::Protocol::Http2) => Protocol::Http2,
                Ok(l7::Protocol::Grpc) => Protocol::Grpc,
                Ok(l7::Protocol::Tcp) => Protocol::Tcp,
                Err(_) => {
                    return Err(FieldError::new(
                        format!("{field}.protocol"),
                        format!(
                            "unknown value {}; is this waypoint older than the control plane?",
                            p.protocol
                        ),
                    ));
                }
            };
            Ok((port, protocol))
        })
        .collect()
}

/// A resource key: `<namespace>/<name>`.
fn key(field: &str, k: &str) -> Result<String, FieldError> {
    match k.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(k.to_string())
        }
        _ => Err(FieldError::new(
            field,
            format!("{k:?} is not a resource key <namespace>/<name>"),
        )),
    }
}

fn keys(field: &str, ks: &[String]) -> Result<Vec<String>, FieldError> {
    ks.iter()
        .enumerate()
        .map(|(i, k)| key(&format!("{field}[{i}]"), k))
        .collect()
}
