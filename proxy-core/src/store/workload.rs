//! Workloads as the proxies use them, converted and validated from
//! `istio.workload.Workload`: IP addresses instead of bytes, a SPIFFE
//! identity, enums instead of integers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use api::SpiffeId;
use api::workload as xds;

use super::Error;

/// Defaults upstream applies to fields istiod leaves empty.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// A workload: for Kubernetes, a pod. Keyed by [`Workload::uid`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `<cluster>//Pod/<namespace>/<name>` for pods: the xDS resource name.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    /// Set for workloads reached by DNS name instead of address.
    pub hostname: String,
    pub network: String,
    /// How the workload accepts inbound traffic.
    pub protocol: InboundProtocol,
    pub identity: SpiffeId,
    /// When set, inbound traffic must arrive through this waypoint.
    pub waypoint: Option<GatewayAddress>,
    pub network_gateway: Option<GatewayAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub workload_type: WorkloadType,
    pub native_tunnel: bool,
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Keys (`namespace/name`) of the selector-scoped policies that apply.
    pub authorization_policies: Vec<String>,
    pub status: HealthStatus,
    pub cluster_id: String,
    pub locality: Locality,
    pub network_mode: NetworkMode,
    /// The services this workload backs, with its own port mappings.
    pub services: BTreeMap<NamespacedHostname, Vec<PortMapping>>,
    /// Relative weight for load balancing.
    pub capacity: u32,
}

impl Workload {
    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workload {} ({})", self.uid, self.identity)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum InboundProtocol {
    /// Plain TCP: the workload is not in the mesh.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// HTTP/2 CONNECT over mutual TLS on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
    /// A sidecar: accepts Istio's mutual TLS without a tunnel. ztunnel does
    /// not originate that (as upstream's), so it reaches such a workload as it
    /// reaches one outside the mesh: plain TCP, which the sidecar takes in
    /// PERMISSIVE mode.
    #[serde(rename = "LegacyIstioMtls")]
    LegacyIstioMtls,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    /// The address is shared with the node: never look the workload up by it.
    HostNetwork,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadType {
    #[default]
    Deployment,
    Cronjob,
    Pod,
    Job,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationTunnel {
    pub protocol: ApplicationTunnelProtocol,
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ApplicationTunnelProtocol {
    #[serde(rename = "NONE")]
    None,
    /// A PROXY protocol v2 header (with identity TLVs) precedes the bytes.
    #[serde(rename = "PROXY")]
    Proxy,
}

/// One service port and the port the workload listens on for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortMapping {
    pub service_port: u16,
    /// 0: not resolved for this workload (look at the service's mapping).
    pub target_port: u16,
}

/// An address inside one network: workloads and VIPs are unique per network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl serde::Serialize for NetworkAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A service's key: `namespace/hostname`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl NamespacedHostname {
    pub fn new(namespace: impl Into<String>, hostname: impl Into<String>) -> Self {
        NamespacedHostname {
            namespace: namespace.into(),
            hostname: hostname.into(),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl FromStr for NamespacedHostname {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => {
                Ok(NamespacedHostname::new(ns, host))
            }
            _ => Err(Error::NamespacedHostname {
                field: "key".into(),
                value: s.to_string(),
            }),
        }
    }
}

impl serde::Serialize for NamespacedHostname {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a waypoint or network gateway is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    /// A workload or service VIP, looked up by address.
    Address(NetworkAddress),
    /// A service, looked up by `namespace/hostname`.
    Hostname(NamespacedHostname),
}

/// An IP address from its wire form (4 or 16 bytes).
pub(crate) fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

pub(super) fn ip(field: impl Into<String>, bytes: &[u8]) -> Result<IpAddr, Error> {
    ip_from_bytes(bytes).ok_or_else(|| Error::AddressLength {
        field: field.into(),
        len: bytes.len(),
    })
}

pub(super) fn port(field: impl Into<String>, value: u32) -> Result<u16, Error> {
    u16::try_from(value).map_err(|_| Error::Port {
        field: field.into(),
        value,
    })
}

/// Decodes a proto enum, naming the field when the value is unknown (a
/// control plane newer than this proxy).
pub(super) fn known<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, Error> {
    E::try_from(value).map_err(|_| Error::UnknownEnum {
        field: field.to_string(),
        value,
    })
}

fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

impl GatewayAddress {
    pub(super) fn from_xds(field: &str, g: xds::GatewayAddress) -> Result<Self, Error> {
        use xds::gateway_address::Destination;
        let destination = match g.destination {
            Some(Destination::Address(a)) => GatewayDestination::Address(NetworkAddress {
                address: ip(format!("{field}.address.address"), &a.address)?,
                network: a.network,
            }),
            Some(Destination::Hostname(h)) => {
                if h.namespace.is_empty() || h.hostname.is_empty() {
                    return Err(Error::Missing {
                        field: format!("{field}.hostname (namespace and hostname)"),
                    });
                }
                GatewayDestination::Hostname(NamespacedHostname::new(h.namespace, h.hostname))
            }
            None => {
                return Err(Error::Missing {
                    field: format!("{field}.destination"),
                });
            }
        };
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port: port(format!("{field}.hbone_mtls_port"), g.hbone_mtls_port)?,
        })
    }
}

impl TryFrom<xds::Workload> for Workload {
    type Error = Error;

    fn try_from(w: xds::Workload) -> Result<Self, Error> {
        if w.uid.is_empty() {
            return Err(Error::Missing {
                field: "uid".into(),
            });
        }
        if w.namespace.is_empty() {
            return Err(Error::Missing {
                field: "namespace".into(),
            });
        }
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| ip(format!("addresses[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let identity = SpiffeId::new(
            or_default(w.trust_domain, DEFAULT_TRUST_DOMAIN),
            w.namespace.clone(),
            or_default(w.service_account, DEFAULT_SERVICE_ACCOUNT),
        )
        .map_err(|source| Error::Identity { source })?;
        let protocol = match known::<xds::TunnelProtocol>("tunnel_protocol", w.tunnel_protocol)? {
            xds::TunnelProtocol::None => InboundProtocol::Tcp,
            xds::TunnelProtocol::Hbone => InboundProtocol::Hbone,
            xds::TunnelProtocol::LegacyIstioMtls => InboundProtocol::LegacyIstioMtls,
        };
        let status = match known::<xds::WorkloadStatus>("status", w.status)? {
            xds::WorkloadStatus::Healthy => HealthStatus::Healthy,
            xds::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
        };
        let network_mode = match known::<xds::NetworkMode>("network_mode", w.network_mode)? {
            xds::NetworkMode::Standard => NetworkMode::Standard,
            xds::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
        };
        let workload_type = match known::<xds::WorkloadType>("workload_type", w.workload_type)? {
            xds::WorkloadType::Deployment => WorkloadType::Deployment,
            xds::WorkloadType::Cronjob => WorkloadType::Cronjob,
            xds::WorkloadType::Pod => WorkloadType::Pod,
            xds::WorkloadType::Job => WorkloadType::Job,
        };
        let application_tunnel = w
            .application_tunnel
            .map(|t| -> Result<_, Error> {
                use xds::application_tunnel::Protocol;
                let protocol = match known::<Protocol>("application_tunnel.protocol", t.protocol)? {
                    Protocol::None => ApplicationTunnelProtocol::None,
                    Protocol::Proxy => ApplicationTunnelProtocol::Proxy,
                };
                let p = port("application_tunnel.port", t.port)?;
                Ok(ApplicationTunnel {
                    protocol,
                    port: (p != 0).then_some(p),
                })
            })
            .transpose()?;
        let mut services = BTreeMap::new();
        for (key, ports) in w.services {
            let service =
                key.parse::<NamespacedHostname>()
                    .map_err(|_| Error::NamespacedHostname {
                        field: "services".into(),
                        value: key.clone(),
                    })?;
            let ports = ports
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let field = format!("services[{key}].ports[{i}]");
                    super::service::app_protocol(&format!("{field}.app_protocol"), p.app_protocol)?;
                    Ok(PortMapping {
                        service_port: port(format!("{field}.service_port"), p.service_port)?,
                        target_port: port(format!("{field}.target_port"), p.target_port)?,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            services.insert(service, ports);
        }
        Ok(Workload {
            waypoint: w
                .waypoint
                .map(|g| GatewayAddress::from_xds("waypoint", g))
                .transpose()?,
            network_gateway: w
                .network_gateway
                .map(|g| GatewayAddress::from_xds("network_gateway", g))
                .transpose()?,
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            addresses,
            hostname: w.hostname,
            network: w.network,
            protocol,
            identity,
            node: w.node,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            workload_type,
            native_tunnel: w.native_tunnel,
            application_tunnel,
            authorization_policies: w.authorization_policies,
            status,
            cluster_id: or_default(w.cluster_id, DEFAULT_CLUSTER_ID),
            locality: w
                .locality
                .map(|l| Locality {
                    region: l.region,
                    zone: l.zone,
                    subzone: l.subzone,
                })
                .unwrap_or_default(),
            network_mode,
            services,
            capacity: w.capacity.unwrap_or(1),
        })
    }
}

/// The JSON shape upstream ztunnel's `/config_dump` gives a workload (what
/// `istioctl ztunnel-config workloads` reads).
impl serde::Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Json<'a> {
            workload_ips: &'a [IpAddr],
            #[serde(skip_serializing_if = "Option::is_none")]
            waypoint: &'a Option<GatewayAddress>,
            #[serde(skip_serializing_if = "Option::is_none")]
            network_gateway: &'a Option<GatewayAddress>,
            protocol: InboundProtocol,
            network_mode: NetworkMode,
            uid: &'a str,
            name: &'a str,
            namespace: &'a str,
            trust_domain: &'a str,
            service_account: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            network: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            workload_name: &'a str,
            workload_type: WorkloadType,
            #[serde(skip_serializing_if = "str::is_empty")]
            canonical_name: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            canonical_revision: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            hostname: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            node: &'a str,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            native_tunnel: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            application_tunnel: &'a Option<ApplicationTunnel>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            authorization_policies: &'a [String],
            status: HealthStatus,
            cluster_id: &'a str,
            #[serde(skip_serializing_if = "Locality::is_empty")]
            locality: &'a Locality,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            services: Vec<&'a NamespacedHostname>,
            capacity: u32,
        }
        Json {
            workload_ips: &self.addresses,
            waypoint: &self.waypoint,
            network_gateway: &self.network_gateway,
            protocol: self.protocol,
            network_mode: self.network_mode,
            uid: &self.uid,
            name: &self.name,
            namespace: &self.namespace,
            trust_domain: self.identity.trust_domain(),
            service_account: self.identity.service_account(),
            network: &self.network,
            workload_name: &self.workload_name,
            workload_type: self.workload_type,
            canonical_name: &self.canonical_name,
            canonical_revision: &self.canonical_revision,
            hostname: &self.hostname,
            node: &self.node,
            native_tunnel: self.native_tunnel,
            application_tunnel: &self.application_tunnel,
            authorization_policies: &self.authorization_policies,
            status: self.status,
            cluster_id: &self.cluster_id,
            locality: &self.locality,
            services: self.services.keys().collect(),
            capacity: self.capacity,
        }
        .serialize(s)
    }
}
