//! Upstream ztunnel's DNS metrics (`src/dns/metrics.rs`), same names and
//! labels: `istio_dns_requests_total`, `istio_dns_upstream_requests_total`,
//! `istio_dns_upstream_failures_total` and
//! `istio_dns_upstream_request_duration_seconds`, labelled by query type and
//! protocol (lower case) and the client's canonical service and revision
//! (`unknown` when the client's workload is not known).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use proxy_core::store::Workload;

use super::forwarder::Protocol;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    request_query_type: String,
    request_protocol: String,
    source_canonical_service: String,
    source_canonical_revision: String,
}

impl DnsLabels {
    pub fn new(query_type: &str, protocol: Protocol, source: Option<&Workload>) -> Self {
        let or_unknown = |s: Option<&String>| match s {
            Some(s) if !s.is_empty() => s.clone(),
            _ => "unknown".to_string(),
        };
        DnsLabels {
            request_query_type: query_type.to_lowercase(),
            request_protocol: protocol.label().to_string(),
            source_canonical_service: or_unknown(source.map(|w| &w.canonical_name)),
            source_canonical_revision: or_unknown(source.map(|w| &w.canonical_revision)),
        }
    }
}

type DurationFamily = Family<DnsLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: DurationFamily,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("dns::Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    // Upstream's buckets, in upstream's order.
    Histogram::new([0.005, 0.001, 0.01, 0.1, 1.0, 5.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "dns_requests",
            "Total number of DNS requests (unstable)",
            m.requests.clone(),
        );
        registry.register(
            "dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            m.upstream_failures.clone(),
        );
        registry.register_with_unit(
            "dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            m.upstream_duration.clone(),
        );
        m
    }

    pub fn request(&self, labels: &DnsLabels) {
        self.requests.get_or_create(labels).inc();
    }

    pub fn forwarded(&self, labels: &DnsLabels, took: Duration, ok: bool) {
        self.upstream_requests.get_or_create(labels).inc();
        self.upstream_duration
            .get_or_create(labels)
            .observe(took.as_secs_f64());
        if !ok {
            self.upstream_failures.get_or_create(labels).inc();
        }
    }
}
