//! Services as the proxies use them, converted and validated from
//! `istio.workload.Service`, and their endpoints (the workloads that back
//! them, kept by the store from each workload's `services` map).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use api::workload as xds;

use super::Error;
use super::workload::{
    GatewayAddress, HealthStatus, NamespacedHostname, NetworkAddress, PortMapping, Workload, ip,
    known, port,
};

/// A set of workloads reached together (a Kubernetes Service), keyed by
/// `namespace/hostname`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// Virtual IPs, per network. Empty for a headless service.
    pub vips: Vec<NetworkAddress>,
    /// Service port -> target port (0: resolved per workload).
    #[serde(serialize_with = "ports_as_map")]
    pub ports: Vec<PortMapping>,
    /// Identities to accept when no per-workload identity applies.
    pub subject_alt_names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    #[serde(rename = "loadBalancer", skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_families: Option<IpFamily>,
    /// Preferred for hostname lookups from other namespaces.
    #[serde(skip)]
    pub canonical: bool,
    /// Service port -> what it speaks, for the ports istiod knows it of.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub app_protocols: BTreeMap<u16, AppProtocol>,
    /// Ingress gateways are to send this service's traffic through its
    /// waypoint. Carried for them; ztunnel-rs itself routes every client the
    /// same way (see ARCHITECTURE.md).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ingress_use_waypoint: bool,
}

/// What a service port speaks (`istio.workload.AppProtocol`; UNKNOWN is
/// left out of [`Service::app_protocols`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AppProtocol {
    #[serde(rename = "HTTP11")]
    Http11,
    #[serde(rename = "HTTP2")]
    Http2,
    #[serde(rename = "GRPC")]
    Grpc,
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "TLS")]
    Tls,
}

/// `value` of the `app_protocol` field named `field`: `None` for UNKNOWN,
/// an error (the resource is refused) for a value this proxy does not know.
pub(super) fn app_protocol(field: &str, value: i32) -> Result<Option<AppProtocol>, Error> {
    Ok(match known::<xds::AppProtocol>(field, value)? {
        xds::AppProtocol::Unknown => None,
        xds::AppProtocol::Http11 => Some(AppProtocol::Http11),
        xds::AppProtocol::Http2 => Some(AppProtocol::Http2),
        xds::AppProtocol::Grpc => Some(AppProtocol::Grpc),
        xds::AppProtocol::Tcp => Some(AppProtocol::Tcp),
        xds::AppProtocol::Tls => Some(AppProtocol::Tls),
    })
}

impl Service {
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(&self.namespace, &self.hostname)
    }

    /// The target port the service itself maps `service_port` to, when set.
    pub fn target_port(&self, service_port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.service_port == service_port)
            .map(|p| p.target_port)
    }

    /// Whether an endpoint in this health state takes traffic.
    pub fn accepts(&self, status: HealthStatus) -> bool {
        status == HealthStatus::Healthy
            || self
                .load_balancing
                .as_ref()
                .is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll)
    }
}

fn ports_as_map<S: serde::Serializer>(ports: &[PortMapping], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(ports.iter().map(|p| (p.service_port, p.target_port)))
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    #[serde(rename = "routingPreferences")]
    pub routing_preference: Vec<LoadBalancingScope>,
    pub mode: LoadBalancingMode,
    pub health_policy: HealthPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LoadBalancingScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LoadBalancingMode {
    /// No locality preference.
    Standard,
    /// Only endpoints matching every preference.
    Strict,
    /// Prefer the best match, falling back one preference at a time.
    Failover,
    /// No endpoint selection: connect to the original destination.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
    Dual,
}

impl IpFamily {
    pub fn accepts(self, ip: IpAddr) -> bool {
        match self {
            IpFamily::Ipv4 => ip.is_ipv4(),
            IpFamily::Ipv6 => ip.is_ipv6(),
            IpFamily::Dual => true,
        }
    }
}

impl TryFrom<xds::Service> for Service {
    type Error = Error;

    fn try_from(s: xds::Service) -> Result<Self, Error> {
        if s.namespace.is_empty() {
            return Err(Error::Missing {
                field: "namespace".into(),
            });
        }
        if s.hostname.is_empty() {
            return Err(Error::Missing {
                field: "hostname".into(),
            });
        }
        let vips = s
            .addresses
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                Ok(NetworkAddress {
                    address: ip(format!("addresses[{i}].address"), &a.address)?,
                    network: a.network,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let ports = s
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(PortMapping {
                    service_port: port(format!("ports[{i}].service_port"), p.service_port)?,
                    target_port: port(format!("ports[{i}].target_port"), p.target_port)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut app_protocols = BTreeMap::new();
        for (i, p) in s.ports.iter().enumerate() {
            if let Some(a) = app_protocol(&format!("ports[{i}].app_protocol"), p.app_protocol)? {
                app_protocols.insert(ports[i].service_port, a);
            }
        }
        let load_balancing = s.load_balancing.map(convert_load_balancing).transpose()?;
        let ip_families = match known::<xds::IpFamilies>("ip_families", s.ip_families)? {
            xds::IpFamilies::Automatic => None,
            xds::IpFamilies::Ipv4Only => Some(IpFamily::Ipv4),
            xds::IpFamilies::Ipv6Only => Some(IpFamily::Ipv6),
            xds::IpFamilies::Dual => Some(IpFamily::Dual),
        };
        Ok(Service {
            waypoint: s
                .waypoint
                .map(|g| GatewayAddress::from_xds("waypoint", g))
                .transpose()?,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports,
            subject_alt_names: s.subject_alt_names,
            load_balancing,
            ip_families,
            canonical: s.canonical,
            app_protocols,
            ingress_use_waypoint: s.ingress_use_waypoint,
        })
    }
}

fn convert_load_balancing(lb: xds::LoadBalancing) -> Result<LoadBalancing, Error> {
    use xds::load_balancing::{HealthPolicy as XdsHealth, Mode, Scope};
    let routing_preference = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let field = format!("load_balancing.routing_preference[{i}]");
            Ok(match known::<Scope>(&field, *s)? {
                Scope::Region => LoadBalancingScope::Region,
                Scope::Zone => LoadBalancingScope::Zone,
                Scope::Subzone => LoadBalancingScope::Subzone,
                Scope::Node => LoadBalancingScope::Node,
                Scope::Cluster => LoadBalancingScope::Cluster,
                Scope::Network => LoadBalancingScope::Network,
                Scope::UnspecifiedScope => return Err(Error::UnknownEnum { field, value: *s }),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mode = match known::<Mode>("load_balancing.mode", lb.mode)? {
        Mode::UnspecifiedMode => LoadBalancingMode::Standard,
        Mode::Strict => LoadBalancingMode::Strict,
        Mode::Failover => LoadBalancingMode::Failover,
        Mode::Passthrough => LoadBalancingMode::Passthrough,
    };
    let health_policy = match known::<XdsHealth>("load_balancing.health_policy", lb.health_policy)?
    {
        XdsHealth::OnlyHealthy => HealthPolicy::OnlyHealthy,
        XdsHealth::AllowAll => HealthPolicy::AllowAll,
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    })
}

/// A workload backing a service, with the workload's own port mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub ports: Vec<PortMapping>,
}

impl Endpoint {
    /// The port to connect to on this endpoint for `service_port`: the
    /// workload's own mapping first (named target ports resolve per pod),
    /// then the service's; `None` when neither resolves it.
    pub fn target_port(&self, service: &Service, service_port: u16) -> Option<u16> {
        let own = self
            .ports
            .iter()
            .find(|p| p.service_port == service_port)
            .map(|p| p.target_port)
            .filter(|p| *p != 0);
        own.or_else(|| service.target_port(service_port).filter(|p| *p != 0))
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Json<'a> {
            workload_uid: &'a str,
            #[serde(serialize_with = "ports_as_map")]
            port: &'a [PortMapping],
            status: HealthStatus,
        }
        Json {
            workload_uid: &self.workload.uid,
            port: &self.ports,
            status: self.workload.status,
        }
        .serialize(s)
    }
}

/// A service's endpoints by workload uid.
pub type Endpoints = BTreeMap<String, Endpoint>;
