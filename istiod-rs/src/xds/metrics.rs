//! The xDS server's Prometheus metrics, registered into istiod's one registry
//! under the `xds_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Label for per-type metrics: the message name of the type URL
/// (`istio.workload.Address`), short enough to read in a dashboard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

impl TypeLabel {
    pub fn new(type_url: &str) -> Self {
        let short = type_url.rsplit_once('/').map_or(type_url, |(_, name)| name);
        TypeLabel {
            r#type: short.to_string(),
        }
    }
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
