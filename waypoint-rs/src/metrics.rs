//! The waypoint's traffic metrics, under Istio's standard names and labels
//! with `reporter="waypoint"` (label list and order from Envoy's Istio
//! stats filter, `contrib/istio/filters/http/istio_stats/source/istio_stats.cc`,
//! and istio.io's metrics reference):
//!
//! - HTTP: `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes`;
//! - TCP (ports that are not HTTP): `istio_tcp_connections_opened_total`,
//!   `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total`,
//!   `istio_tcp_sent_bytes_total`, labelled as ztunnel-rs labels them.
//!
//! Source labels come from the HBONE peer (its certificate and the workload
//! at its address), destination labels from the endpoint the request went
//! to. Unknown values are `unknown`.

use std::sync::Arc;

use api::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proxy_core::hbone::HboneMetrics;
use proxy_core::store::{Service, Workload};

use crate::request::ResponseFlag;

const UNKNOWN: &str = "unknown";

/// Envoy's default histogram buckets (`source/common/stats/histogram_impl.cc`,
/// `HistogramStatisticsImpl::supportedBuckets`), which upstream's proxies
/// report `istio_request_duration_milliseconds` in.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Ours for the byte-size histograms: decades from 1 B to 100 MB.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

type Histograms = Family<HttpLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// Registered once per process.
pub struct Metrics {
    requests: Family<HttpLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    /// HBONE connections dropped for a peer's fault, both directions.
    pub hbone: Arc<HboneMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            hbone: HboneMetrics::register(registry),
        };
        registry.register("requests", "Total requests", m.requests.clone());
        registry.register(
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            m.duration.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body size in bytes",
            m.request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body size in bytes",
            m.response_bytes.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.tcp_received.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.tcp_sent.clone(),
        );
        Arc::new(m)
    }

    /// One finished HTTP request.
    pub fn request(&self, labels: &HttpLabels, duration_ms: f64, received: u64, sent: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(duration_ms);
        self.request_bytes
            .get_or_create(labels)
            .observe(received as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(sent as f64);
    }

    pub fn tcp_opened(&self, labels: &TcpLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    pub fn tcp_closed(&self, labels: &TcpLabels, received: u64, sent: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_received.get_or_create(labels).inc_by(received);
        self.tcp_sent.get_or_create(labels).inc_by(sent);
    }
}

/// The standard label set, in the order upstream's filter writes it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

fn known(value: &str) -> String {
    if value.is_empty() {
        UNKNOWN.to_string()
    } else {
        value.to_string()
    }
}

/// Who asked and who answered, for the labels.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    /// The HBONE peer's identity (the client).
    pub source_identity: Option<SpiffeId>,
    /// The workload at the HBONE peer's address, when the store has it.
    pub source: Option<Arc<Workload>>,
    /// The endpoint the request went to, once one was chosen.
    pub destination: Option<Arc<Workload>>,
    /// The service addressed (absent for a workload addressed directly).
    pub service: Option<Arc<Service>>,
}

impl HttpLabels {
    /// The labels of one request or connection. `request_protocol` is
    /// `http`, `grpc` or `tcp`.
    pub fn new(
        peers: &Peers,
        request_protocol: &'static str,
        response_code: Option<u16>,
        grpc_status: Option<&str>,
        flag: ResponseFlag,
    ) -> Self {
        let source = peers.source.as_deref();
        let destination = peers.destination.as_deref();
        let service = peers.service.as_deref();
        let source_namespace = source
            .map(|w| w.namespace.as_str())
            .or(peers.source_identity.as_ref().map(|id| id.namespace()))
            .unwrap_or_default();
        HttpLabels {
            reporter: "waypoint",
            source_workload: known(source.map_or("", |w| w.workload_name.as_str())),
            source_canonical_service: known(source.map_or("", |w| w.canonical_name.as_str())),
            source_canonical_revision: source
                .map(|w| w.canonical_revision.as_str())
                .filter(|r| !r.is_empty())
                .unwrap_or("latest")
                .to_string(),
            source_workload_namespace: known(source_namespace),
            source_principal: peers
                .source_identity
                .as_ref()
                .map_or_else(|| UNKNOWN.to_string(), |id| id.to_string()),
            source_app: known(source.map_or("", |w| w.canonical_name.as_str())),
            source_version: known(source.map_or("", |w| w.canonical_revision.as_str())),
            source_cluster: known(source.map_or("", |w| w.cluster_id.as_str())),
            destination_workload: known(destination.map_or("", |w| w.workload_name.as_str())),
            destination_workload_namespace: known(destination.map_or("", |w| w.namespace.as_str())),
            destination_principal: destination
                .map_or_else(|| UNKNOWN.to_string(), |w| w.identity.to_string()),
            destination_app: known(destination.map_or("", |w| w.canonical_name.as_str())),
            destination_version: known(destination.map_or("", |w| w.canonical_revision.as_str())),
            destination_service: known(service.map_or("", |s| s.hostname.as_str())),
            destination_canonical_service: known(
                destination.map_or("", |w| w.canonical_name.as_str()),
            ),
            destination_canonical_revision: destination
                .map(|w| w.canonical_revision.as_str())
                .filter(|r| !r.is_empty())
                .unwrap_or("latest")
                .to_string(),
            destination_service_name: known(service.map_or("", |s| s.name.as_str())),
            destination_service_namespace: known(service.map_or("", |s| s.namespace.as_str())),
            destination_cluster: known(destination.map_or("", |w| w.cluster_id.as_str())),
            request_protocol,
            response_code: response_code.unwrap_or(0).to_string(),
            grpc_response_status: grpc_status.unwrap_or_default().to_string(),
            response_flags: flag.as_str(),
            connection_security_policy: "mutual_tls",
        }
    }
}

/// The TCP metrics' labels: the HTTP set without the response's code and
/// gRPC status (upstream's TCP label set, as ztunnel-rs writes it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    pub fn new(peers: &Peers, flag: ResponseFlag) -> Self {
        let l = HttpLabels::new(peers, "tcp", None, None, flag);
        TcpLabels {
            reporter: l.reporter,
            source_workload: l.source_workload,
            source_canonical_service: l.source_canonical_service,
            source_canonical_revision: l.source_canonical_revision,
            source_workload_namespace: l.source_workload_namespace,
            source_principal: l.source_principal,
            source_app: l.source_app,
            source_version: l.source_version,
            source_cluster: l.source_cluster,
            destination_service: l.destination_service,
            destination_service_namespace: l.destination_service_namespace,
            destination_service_name: l.destination_service_name,
            destination_workload: l.destination_workload,
            destination_canonical_service: l.destination_canonical_service,
            destination_canonical_revision: l.destination_canonical_revision,
            destination_workload_namespace: l.destination_workload_namespace,
            destination_principal: l.destination_principal,
            destination_app: l.destination_app,
            destination_version: l.destination_version,
            destination_cluster: l.destination_cluster,
            request_protocol: l.request_protocol,
            response_flags: l.response_flags,
            connection_security_policy: l.connection_security_policy,
        }
    }
}
