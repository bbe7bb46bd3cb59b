//! The process's metrics: one prometheus-client [`Registry`] per process,
//! created here with upstream's `istio_` prefix, filled by each component at
//! start-up (`XdsMetrics::register`, the proxies' traffic metrics), then
//! shared read-only with the stats server, which encodes it as OpenMetrics.

use std::sync::Arc;

use prometheus_client::registry::Registry;

/// What `/metrics` answers with.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The process registry: every metric is named `istio_<name>` as upstream.
pub fn new_registry() -> Registry {
    Registry::with_prefix("istio")
}

/// The registry once every component has registered, for the stats server.
pub type SharedRegistry = Arc<Registry>;

/// A counter kept under upstream Istio's exact name. prometheus-client
/// writes a counter as `<name>_total`; upstream istiod's counters
/// (`pilot_xds_pushes`, `citadel_server_csr_count`, ...) carry no suffix and
/// dashboards query them by that name, so this one is typed `unknown` and
/// written under its name as it is.
#[derive(Clone, Debug, Default)]
pub struct UnsuffixedCounter(prometheus_client::metrics::counter::Counter<u64>);

impl UnsuffixedCounter {
    pub fn inc(&self) -> u64 {
        self.0.inc()
    }

    pub fn inc_by(&self, n: u64) -> u64 {
        self.0.inc_by(n)
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl prometheus_client::metrics::TypedMetric for UnsuffixedCounter {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Unknown;
}

impl prometheus_client::encoding::EncodeMetric for UnsuffixedCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

/// The OpenMetrics text of everything registered.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn names_carry_the_istio_prefix() {
        let mut r = new_registry();
        let c = Counter::<u64>::default();
        r.register("tcp_connections_opened", "connections opened", c.clone());
        c.inc();
        let text = encode(&r).unwrap();
        assert!(
            text.contains("istio_tcp_connections_opened_total 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn an_unsuffixed_counter_keeps_its_name() {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::family::Family;
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Type {
            r#type: &'static str,
        }
        let mut r = Registry::default();
        let pushes = Family::<Type, UnsuffixedCounter>::default();
        r.register("pilot_xds_pushes", "pushes", pushes.clone());
        pushes.get_or_create(&Type { r#type: "wds" }).inc_by(3);
        let text = encode(&r).unwrap();
        assert!(text.contains("# TYPE pilot_xds_pushes unknown\n"), "{text}");
        assert!(
            text.contains("pilot_xds_pushes{type=\"wds\"} 3\n"),
            "{text}"
        );
    }
}
