//! The xDS server's Prometheus metrics, registered into istiod's one
//! registry. Where upstream istiod measures the same thing, the metric has
//! upstream's name, labels and type values (`pilot_xds_pushes`, `pilot_xds`,
//! `pilot_proxy_convergence_time`, `pilot_total_xds_rejects`,
//! `pilot_xds_expired_nonce`, `pilot_xds_push_time`: pilot/pkg/xds/monitoring.go;
//! type values from `GetMetricType` in pilot/pkg/model); the rest
//! are ours, under the `xds_` prefix.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use proxy_core::metrics::UnsuffixedCounter;

/// Label for per-type metrics, as upstream's `GetMetricType` names types:
/// `wds` for workload addresses, `wads` for workload authorization, the
/// type URL for the others istiod-rs serves (the waypoints' L7 types);
/// `other` for any type istiod-rs does not serve (a peer chooses type URLs:
/// they must never become series of their own).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

impl TypeLabel {
    pub fn new(type_url: &str) -> Self {
        let served = super::SERVED_TYPES.iter().find(|t| **t == type_url);
        let r#type = match served {
            Some(&api::type_url::ADDRESS) => "wds",
            Some(&api::type_url::AUTHORIZATION) => "wads",
            Some(t) => t,
            None => "other",
        };
        TypeLabel { r#type }
    }
}

/// `pilot_xds`'s label: the proxy's version (its node metadata's
/// `ISTIO_VERSION`), `unknown` when it sent none or one that is not a
/// plausible version string.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

impl VersionLabel {
    pub fn new(version: Option<&str>) -> Self {
        let plausible = |v: &&str| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'_'))
        };
        VersionLabel {
            version: version.filter(plausible).unwrap_or("unknown").to_string(),
        }
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
    pub pushes: Family<TypeLabel, UnsuffixedCounter>,
    pub resources_sent: Family<TypeLabel, Counter>,
    pub removals_sent: Family<TypeLabel, Counter>,
    pub rejects: Family<TypeLabel, UnsuffixedCounter>,
    pub stale_requests: Family<TypeLabel, UnsuffixedCounter>,
    pub connected_proxies: Family<VersionLabel, Gauge>,
    pub push_latency: HistogramFamily,
    pub convergence: Histogram,
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

/// Upstream's buckets for `pilot_proxy_convergence_time`, with finer ones
/// below 100 ms, where istiod-rs usually is.
fn convergence_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0,
    ])
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            pushes: Family::default(),
            resources_sent: Family::default(),
            removals_sent: Family::default(),
            rejects: Family::default(),
            stale_requests: Family::default(),
            connected_proxies: Family::default(),
            push_latency: Family::new_with_constructor(latency_histogram),
            convergence: convergence_histogram(),
            refusals: Family::default(),
            unknown_types: Counter::default(),
        };
        registry.register(
            "pilot_xds_pushes",
            "Delta xDS responses sent to proxies, by resource type",
            metrics.pushes.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "Responses proxies rejected (NACK), by resource type; they keep their last accepted configuration",
            metrics.rejects.clone(),
        );
        registry.register(
            "pilot_xds_expired_nonce",
            "Requests ignored because their nonce was not the one in flight, by resource type",
            metrics.stale_requests.clone(),
        );
        registry.register(
            "pilot_xds",
            "Proxies with an open delta xDS stream, by proxy version",
            metrics.connected_proxies.clone(),
        );
        registry.register(
            "pilot_xds_push_time",
            "Seconds from a snapshot's arrival at the xDS server to the response carrying it being handed to the transport, by resource type",
            metrics.push_latency.clone(),
        );
        registry.register(
            "pilot_proxy_convergence_time",
            "Seconds from the first change a snapshot carries (as the pipeline saw it, before debouncing) to a response carrying it being handed to a proxy's transport",
            metrics.convergence.clone(),
        );
        let r = registry.sub_registry_with_prefix("xds");
        let by_type = [
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
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_labels_are_the_served_types_or_other() {
        for (type_url, label) in [
            (api::type_url::ADDRESS, "wds"),
            (api::type_url::AUTHORIZATION, "wads"),
            (api::type_url::WAYPOINT, api::type_url::WAYPOINT),
            (api::type_url::ROUTE_TABLE, api::type_url::ROUTE_TABLE),
            (
                api::type_url::HTTP_AUTHORIZATION,
                api::type_url::HTTP_AUTHORIZATION,
            ),
            (
                api::type_url::JWT_AUTHENTICATION,
                api::type_url::JWT_AUTHENTICATION,
            ),
            (api::type_url::TRAFFIC_POLICY, api::type_url::TRAFFIC_POLICY),
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

    #[test]
    fn version_labels_are_bounded() {
        assert_eq!(VersionLabel::new(Some("1.28.0")).version, "1.28.0");
        assert_eq!(VersionLabel::new(None).version, "unknown");
        assert_eq!(VersionLabel::new(Some("")).version, "unknown");
        assert_eq!(VersionLabel::new(Some("1.0\n{evil}")).version, "unknown");
        assert_eq!(VersionLabel::new(Some(&"9".repeat(65))).version, "unknown");
    }
}
