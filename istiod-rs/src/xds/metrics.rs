//! The xDS server's Prometheus metrics, registered into istiod's one registry
//! under the `xds_` prefix.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Label for per-type metrics: the message name of a type URL istiod-rs
/// serves (`istio.workload.Address`), short enough to read in a dashboard;
/// `other` for any other (a peer chooses type URLs: they must never become
/// series of their own).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

impl TypeLabel {
    pub fn new(type_url: &str) -> Self {
        let served = super::SERVED_TYPES.iter().find(|t| **t == type_url);
        let short = served.map_or("other", |t| t.rsplit_once('/').map_or(t, |(_, name)| name));
        TypeLabel { r#type: short }
    }
}

/// Why a stream was refused or ended with an error (a fixed set).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    /// No valid bearer token.
    unauthenticated,
    /// The token could not be checked (TokenReview unreachable).
    auth_unavailable,
    /// The first request had no node id.
    missing_node,
    /// A request had no type URL.
    missing_type_url,
    /// A request was larger than the receive limit.
    too_large,
    /// A request that is not a DeltaDiscoveryRequest.
    undecodable,
    /// A waypoint node id the stream's identity does not back (or that
    /// names no waypoint pod).
    waypoint_identity,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: Refusal,
}

type HistogramFamily = Family<TypeLabel, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct Metrics {
    pub pushes: Family<TypeLabel, Counter>,
    pub resources_sent: Family<TypeLabel, Counter>,
    pub removals_sent: Family<TypeLabel, Counter>,
    pub rejects: Family<TypeLabel, Counter>,
    pub stale_requests: Family<TypeLabel, Counter>,
    pub connected_proxies: Gauge,
    pub push_latency: HistogramFamily,
    pub refusals: Family<RefusalLabels, Counter>,
    pub unknown_types: Counter,
}

impl Metrics {
    /// Counts a refused or failed stream.
    pub fn refused(&self, reason: Refusal) {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
    }
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~4 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 15))
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            pushes: Family::default(),
            resources_sent: Family::default(),
            removals_sent: Family::default(),
            rejects: Family::default(),
            stale_requests: Family::default(),
            connected_proxies: Gauge::default(),
            push_latency: Family::new_with_constructor(latency_histogram),
            refusals: Family::default(),
            unknown_types: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("xds");
        let by_type = [
            (
                "pushes",
                "Delta xDS responses sent to proxies, by resource type",
                &metrics.pushes,
            ),
            (
                "resources_sent",
                "Resources (new or changed) sent to proxies, by resource type",
                &metrics.resources_sent,
            ),
            (
                "removals_sent",
                "Resource removals sent to proxies, by resource type",
                &metrics.removals_sent,
            ),
            (
                "rejects",
                "Responses proxies rejected (NACK), by resource type; they keep their last accepted configuration",
                &metrics.rejects,
            ),
            (
                "stale_requests",
                "Requests ignored because their nonce was not the one in flight, by resource type",
                &metrics.stale_requests,
            ),
        ];
        for (name, help, family) in by_type {
            r.register(name, help, family.clone());
        }
        r.register(
            "refusals",
            "Streams refused or ended by an error of the proxy's making (bad token, missing node id or type URL, oversized or undecodable request), by reason",
            metrics.refusals.clone(),
        );
        r.register(
            "unknown_type_requests",
            "Requests for a type URL istiod-rs does not serve: a subscription is answered empty (as upstream), nothing is kept",
            metrics.unknown_types.clone(),
        );
        r.register(
            "connected_proxies",
            "Proxies with an open delta xDS stream",
            metrics.connected_proxies.clone(),
        );
        r.register_with_unit(
            "push_latency",
            "Time from a snapshot's arrival at the xDS server to the response carrying it being handed to the transport",
            Unit::Seconds,
            metrics.push_latency.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_labels_are_the_served_types_or_other() {
        for (type_url, label) in [
            (api::type_url::ADDRESS, "istio.workload.Address"),
            (api::type_url::AUTHORIZATION, "istio.security.Authorization"),
            (api::type_url::WAYPOINT, "istio_rs.l7.v1.Waypoint"),
            (api::type_url::ROUTE_TABLE, "istio_rs.l7.v1.RouteTable"),
            (
                api::type_url::HTTP_AUTHORIZATION,
                "istio_rs.l7.v1.HttpAuthorization",
            ),
            (
                api::type_url::JWT_AUTHENTICATION,
                "istio_rs.l7.v1.JwtAuthentication",
            ),
            (
                api::type_url::TRAFFIC_POLICY,
                "istio_rs.l7.v1.TrafficPolicy",
            ),
        ] {
            assert_eq!(TypeLabel::new(type_url).r#type, label);
        }
        for made_up in [
            "type.googleapis.com/made.up.T1",
            "",
            "example.com/istio.workload.Address",
            "istio.workload.Address",
        ] {
            assert_eq!(TypeLabel::new(made_up).r#type, "other", "{made_up:?}");
        }
    }
}
