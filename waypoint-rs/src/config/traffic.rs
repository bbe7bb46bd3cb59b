//! `l7::TrafficPolicy`: one destination's DestinationRule, validated, with
//! the most specific settings picked per request (subset, then port, then
//! the host default; each of load balancer, connection pool and outlier
//! detection separately).

use std::collections::BTreeSet;
use std::time::Duration;

use api::l7;
use proxy_core::store::NamespacedHostname;

use crate::balance::{LoadBalancer, OutlierConfig};
use crate::config::convert;
use crate::http::route::Origin;
use crate::request::{FieldError, FromProto};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub service: NamespacedHostname,
    pub origin: Origin,
    pub default_policy: Policy,
    pub ports: Vec<(u16, Policy)>,
    pub subsets: Vec<Subset>,
}

/// Each part `None`: not set at this level.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subset {
    pub name: String,
    /// Endpoints of the service in this subset.
    pub workload_uids: BTreeSet<String>,
    pub policy: Policy,
    /// Port-level entries of the subset, already merged by istiod.
    pub ports: Vec<(u16, Policy)>,
}

/// Limits are `None` when unset: no limit (istiod's defaults are
/// `u32::MAX` for every circuit breaker).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub tcp_idle_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub http_idle_timeout: Option<Duration>,
    pub h2_upgrade: H2Upgrade,
    pub use_client_protocol: bool,
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum H2Upgrade {
    #[default]
    Default,
    DoNotUpgrade,
    Upgrade,
}

impl TrafficPolicy {
    /// The settings for a request to `port` of `subset`. istiod has already
    /// merged the levels as Istio does (`l7.proto`, TrafficPolicy), so this
    /// only picks: the subset's entry for the port, else the subset's policy
    /// (when a subset is routed to); else the port's entry, else the host
    /// default.
    pub fn effective(&self, port: u16, subset: Option<&str>) -> Policy {
        let for_port = |ports: &[(u16, Policy)]| {
            ports
                .iter()
                .find(|(p, _)| *p == port)
                .map(|(_, policy)| policy.clone())
        };
        match subset.and_then(|s| self.subset(s)) {
            Some(s) => for_port(&s.ports).unwrap_or_else(|| s.policy.clone()),
            None => for_port(&self.ports).unwrap_or_else(|| self.default_policy.clone()),
        }
    }

    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

impl Policy {
    /// The load balancer to use: the configured one, else LEAST_REQUEST.
    pub fn load_balancer(&self) -> LoadBalancer {
        self.load_balancer.clone().unwrap_or_default()
    }
}

impl FromProto<l7::TrafficPolicy> for TrafficPolicy {
    fn from_proto(p: &l7::TrafficPolicy) -> Result<Self, FieldError> {
        let ports = port_policies("ports", &p.ports)?;
        let subsets: Vec<Subset> = convert::each("subsets", &p.subsets)?;
        let mut names = BTreeSet::new();
        for (i, s) in subsets.iter().enumerate() {
            if !names.insert(&s.name) {
                return Err(FieldError::new(
                    format!("subsets[{i}].name"),
                    format!("subset {:?} is defined twice", s.name),
                ));
            }
        }
        Ok(TrafficPolicy {
            service: NamespacedHostname::new(&p.namespace, &p.hostname),
            origin: p.origin.as_ref().map(Origin::from).unwrap_or_default(),
            default_policy: convert::nested("default_policy", p.default_policy.as_ref())?
                .unwrap_or_default(),
            ports,
            subsets,
        })
    }
}

impl FromProto<l7::Subset> for Subset {
    fn from_proto(p: &l7::Subset) -> Result<Self, FieldError> {
        if p.name.is_empty() {
            return Err(FieldError::new("name", "a subset name is required"));
        }
        Ok(Subset {
            name: p.name.clone(),
            workload_uids: p.workload_uids.iter().cloned().collect(),
            policy: convert::nested("policy", p.policy.as_ref())?.unwrap_or_default(),
            ports: port_policies("ports", &p.ports)?,
        })
    }
}

/// Port-level entries, each naming its path on error (`ports[1].policy...`).
fn port_policies(field: &str, ports: &[l7::PortPolicy]) -> Result<Vec<(u16, Policy)>, FieldError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, pp)| {
            let field = format!("{field}[{i}]");
            Ok((
                convert::port(&format!("{field}.port"), pp.port)?,
                convert::nested(&format!("{field}.policy"), pp.policy.as_ref())?
                    .unwrap_or_default(),
            ))
        })
        .collect()
}

impl FromProto<l7::Policy> for Policy {
    fn from_proto(p: &l7::Policy) -> Result<Self, FieldError> {
        Ok(Policy {
            load_balancer: convert::nested("load_balancer", p.load_balancer.as_ref())?,
            connection_pool: convert::nested("connection_pool", p.connection_pool.as_ref())?,
            outlier_detection: convert::nested("outlier_detection", p.outlier_detection.as_ref())?,
        })
    }
}

impl FromProto<l7::ConnectionPool> for ConnectionPool {
    fn from_proto(p: &l7::ConnectionPool) -> Result<Self, FieldError> {
        let d =
            |field: &str, v: Option<&prost_types::Duration>| convert::optional_duration(field, v);
        let h2_upgrade = match l7::H2Upgrade::try_from(p.h2_upgrade) {
            Ok(l7::H2Upgrade::Default) => H2Upgrade::Default,
            Ok(l7::H2Upgrade::DoNotUpgrade) => H2Upgrade::DoNotUpgrade,
            Ok(l7::H2Upgrade::Upgrade) => H2Upgrade::Upgrade,
            Err(_) => {
                return Err(FieldError::new(
                    "h2_upgrade",
                    format!(
                        "unknown value {}; is this waypoint older than the control plane?",
                        p.h2_upgrade
                    ),
                ));
            }
        };
        Ok(ConnectionPool {
            max_connections: p.max_connections,
            connect_timeout: d("connect_timeout", p.connect_timeout.as_ref())?,
            tcp_idle_timeout: d("tcp_idle_timeout", p.tcp_idle_timeout.as_ref())?,
            http1_max_pending_requests: p.http1_max_pending_requests,
            http2_max_requests: p.http2_max_requests,
            max_requests_per_connection: p.max_requests_per_connection,
            max_retries: p.max_retries,
            http_idle_timeout: d("http_idle_timeout", p.http_idle_timeout.as_ref())?,
            h2_upgrade,
            use_client_protocol: p.use_client_protocol,
            max_concurrent_streams: p.max_concurrent_streams,
        })
    }
}
