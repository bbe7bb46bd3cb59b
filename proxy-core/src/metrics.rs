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
}
