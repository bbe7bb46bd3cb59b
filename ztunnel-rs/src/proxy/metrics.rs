//! Traffic metrics and the access log: one [`ConnectionRecord`] per proxied
//! connection counts it opened and closed and its bytes under upstream
//! ztunnel's names and labels (`istio_tcp_connections_opened_total`, ...,
//! `reporter`, source and destination workload / namespace / principal,
//! `connection_security_policy`, `response_flags`), and writes one access
//! log line (target `access`) when it ends.
//!
//! Connections that fail before there is enough to label them (no original
//! destination, no healthy endpoint, a failed handshake) are counted in
//! `istio_ztunnel_connection_failures_total{direction, reason}`, which is
//! ours: a bounded label set, so a misbehaving client cannot blow up the
//! series count. HBONE connections dropped for a peer's fault are counted
//! by proxy-core ([`HboneMetrics`], registered here), and so are the
//! connections a listener (the pods' data-path listeners, the admin
//! servers) resets at its caps (`istio_listener_connections_dropped_total`,
//! [`ListenerMetrics`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::connect_headers::{Baggage, TraceParent};
use api::SpiffeId;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proxy_core::hbone::HboneMetrics;
use proxy_core::listener::ListenerMetrics;
use proxy_core::store::{Service, Workload};

/// Label values upstream uses when a value is not known.
const UNKNOWN: &str = "unknown";

/// The proxy's traffic metrics, registered once per process.
#[derive(Default)]
pub struct Metrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    /// Client to server, as Istio counts "received" for both reporters.
    received_bytes: Family<TrafficLabels, Counter>,
    /// Server to client.
    sent_bytes: Family<TrafficLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    /// Connections whose endpoint was looked up by hostname (upstream's
    /// `istio_on_demand_dns_total`, istio/ztunnel `src/proxy/metrics.rs`).
    on_demand_dns: Family<OnDemandDnsLabels, Counter>,
    /// Shared by every pod's HBONE pool and server.
    pub(crate) hbone: Arc<HboneMetrics>,
    /// Every pod's DNS proxy.
    pub(crate) dns: crate::dns::Metrics,
    /// Every listener of the process: the pods' data-path listeners and
    /// the admin, stats and readiness servers.
    pub listeners: ListenerMetrics,
    /// Every traffic label set exported, for [`Metrics::expire`].
    series: Mutex<HashMap<TrafficLabels, SeriesUse>>,
}

/// How a traffic label set is used.
#[derive(Debug, Default)]
struct SeriesUse {
    /// Connections open under it.
    live: usize,
    /// Since when, at the sweeps, no connection used it and a workload it
    /// names was not in the store.
    gone_since: Option<Instant>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            hbone: HboneMetrics::register(registry),
            dns: crate::dns::Metrics::register(registry),
            listeners: ListenerMetrics::register(registry),
            ..Metrics::default()
        };
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received_bytes.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent_bytes.clone(),
        );
        registry.register(
            "on_demand_dns",
            "Connections whose destination workload was looked up by hostname (on-demand DNS; unstable)",
            m.on_demand_dns.clone(),
        );
        registry.register(
            "ztunnel_connection_failures",
            "Connections ztunnel-rs refused or could not carry, by direction and reason",
            m.failures.clone(),
        );
        Arc::new(m)
    }

    fn series(&self) -> MutexGuard<'_, HashMap<TrafficLabels, SeriesUse>> {
        self.series.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection opened under `labels`.
    fn series_opened(&self, labels: &TrafficLabels) {
        let mut series = self.series();
        let used = match series.get_mut(labels) {
            Some(used) => used,
            None => series.entry(labels.clone()).or_default(),
        };
        used.live += 1;
        used.gone_since = None;
    }

    /// A connection closed under `labels`, opened under the same labels
    /// with `opened_flags` as their response flags (a failure sets them).
    fn series_closed(&self, labels: &mut TrafficLabels, opened_flags: ResponseFlags) {
        let mut series = self.series();
        let closed_flags = std::mem::replace(&mut labels.response_flags, opened_flags);
        if let Some(used) = series.get_mut(labels) {
            used.live = used.live.saturating_sub(1);
        }
        labels.response_flags = closed_flags;
        if closed_flags != opened_flags && !series.contains_key(labels) {
            series.insert(labels.clone(), SeriesUse::default());
        }
    }

    /// Drops the traffic series (connections opened and closed, bytes each
    /// way) of label sets that name a workload `present` says has left the
    /// mesh, once they have been unused and that workload absent at every
    /// sweep for `retention`: long enough for the last values to be scraped.
    /// Without it every workload name a node ever talked to stays exported
    /// (about 2 kB of memory per label set). A label set used again starts
    /// its counters from zero, which Prometheus reads as a counter reset.
    /// Returns how many label sets were dropped.
    pub fn expire(
        &self,
        now: Instant,
        retention: Duration,
        present: &dyn Fn(&str, &str) -> bool,
    ) -> usize {
        let mut series = self.series();
        let mut expired = Vec::new();
        for (labels, used) in series.iter_mut() {
            let gone = used.live == 0 && labels.workloads().any(|(ns, name)| !present(ns, name));
            if !gone {
                used.gone_since = None;
                continue;
            }
            let since = *used.gone_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= retention {
                expired.push(labels.clone());
            }
        }
        for labels in &expired {
            series.remove(labels);
            self.opened.remove(labels);
            self.closed.remove(labels);
            self.received_bytes.remove(labels);
            self.sent_bytes.remove(labels);
        }
        expired.len()
    }

    /// Counts a connection that failed before it could be recorded, and logs
    /// it on the access log.
    pub(crate) fn early_failure(
        &self,
        direction: Direction,
        src: SocketAddr,
        dst: Option<SocketAddr>,
        reason: FailureReason,
        error: &dyn fmt::Display,
    ) {
        self.count_failure(direction, reason);
        tracing::event!(
            target: "access",
            tracing::Level::WARN,
            src.addr = %src,
            dst.addr = dst.map(tracing::field::display),
            direction = %direction,
            reason = %reason,
            error = %error,
            "connection failed"
        );
    }

    /// Counts a connection from `source` (with `principal`) that needs
    /// `hostname` looked up, hit or miss in the cache, as upstream counts.
    pub(crate) fn on_demand_dns(&self, source: &Workload, principal: &SpiffeId, hostname: &str) {
        let labels = OnDemandDnsLabels {
            source: SourceLabels::unknown().of(source).proven(principal),
            hostname: known(hostname),
        };
        self.on_demand_dns.get_or_create(&labels).inc();
    }

    fn count_failure(&self, direction: Direction, reason: FailureReason) {
        self.failures
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }
}

/// Which proxy reports a connection: the client's (outbound) or the
/// server's (inbound).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(
            w,
            match self {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
        )
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    /// Plaintext.
    Unknown,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(
            w,
            match self {
                SecurityPolicy::MutualTls => "mutual_tls",
                SecurityPolicy::Unknown => UNKNOWN,
            },
        )
    }
}

/// Why a recorded connection ended early, as upstream flags it.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// Denied by policy.
    Deny,
    /// The next hop could not be reached.
    Connect,
    /// A ceiling on held connections was reached (Envoy's upstream
    /// overflow flag).
    Overflow,
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(
            w,
            match self {
                ResponseFlags::None => "-",
                ResponseFlags::Deny => "DENY",
                ResponseFlags::Connect => "CONNECT",
                ResponseFlags::Overflow => "UO",
            },
        )
    }
}

/// Which listener a connection arrived on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// 15001: the pod's own connections.
    Outbound,
    /// 15008: HBONE to the pod.
    Inbound,
    /// 15006: plaintext to the pod.
    InboundPlaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(w, self.as_str())
    }
}

/// Why a connection was refused or could not be carried.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum FailureReason {
    /// A capture listener got a connection the pod's rules did not redirect.
    NoOriginalDestination,
    /// The connection targets one of the proxy's own ports.
    ProxyPort,
    /// A service without a healthy endpoint serving the port.
    NoHealthyEndpoint,
    /// A destination bound to a waypoint that cannot be found.
    UnknownWaypoint,
    /// The pod being proxied is not (yet) in the workload store.
    UnknownWorkload,
    /// No certificate for the pod's identity.
    Certificate,
    /// TLS or identity verification with an HBONE peer failed.
    Handshake,
    /// The HBONE peer answered the CONNECT with an error status.
    Refused,
    /// The next hop (HBONE peer, passthrough destination) did not accept.
    Connect,
    /// An HBONE CONNECT for an address that is not this pod.
    WrongTarget,
    /// An Authorization policy denied the connection.
    PolicyDenied,
    /// A policy the destination workload refers to is not held (not yet
    /// received, or rejected): denied, failing closed.
    MissingPolicy,
    /// An established connection that a policy change now denies was cut.
    PolicyRevoked,
    /// The application in the pod refused the connection.
    AppRefused,
    /// The peer already holds its ceiling of connections to applications
    /// on this node.
    PeerSocketLimit,
    /// The node already holds its ceiling of connections to applications.
    NodeSocketLimit,
    /// The chosen endpoint is known by a hostname that did not resolve.
    UnresolvedHostname,
}

impl FailureReason {
    fn as_str(self) -> &'static str {
        match self {
            FailureReason::NoOriginalDestination => "no_original_destination",
            FailureReason::ProxyPort => "proxy_port",
            FailureReason::NoHealthyEndpoint => "no_healthy_endpoint",
            FailureReason::UnknownWaypoint => "unknown_waypoint",
            FailureReason::UnknownWorkload => "unknown_workload",
            FailureReason::Certificate => "certificate",
            FailureReason::Handshake => "handshake",
            FailureReason::Refused => "refused",
            FailureReason::Connect => "connect",
            FailureReason::WrongTarget => "wrong_target",
            FailureReason::PolicyDenied => "policy_denied",
            FailureReason::MissingPolicy => "missing_policy",
            FailureReason::PolicyRevoked => "policy_revoked",
            FailureReason::AppRefused => "app_refused",
            FailureReason::PeerSocketLimit => "peer_socket_limit",
            FailureReason::NodeSocketLimit => "node_socket_limit",
            FailureReason::UnresolvedHostname => "unresolved_hostname",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for FailureReason {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(w, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: Direction,
    reason: FailureReason,
}

/// Upstream ztunnel's labels of `istio_on_demand_dns_total`: the client,
/// and the hostname looked up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OnDemandDnsLabels {
    #[prometheus(flatten)]
    source: SourceLabels,
    hostname: String,
}

/// Upstream's `source_*` labels, shared by the traffic and on-demand DNS
/// label sets.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
}

impl SourceLabels {
    fn unknown() -> Self {
        let unknown = || UNKNOWN.to_string();
        SourceLabels {
            source_workload: unknown(),
            source_canonical_service: unknown(),
            source_canonical_revision: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            source_cluster: unknown(),
        }
    }

    /// The source workload's names (not its principal).
    fn of(mut self, w: &Workload) -> Self {
        self.source_workload = known(&w.workload_name);
        self.source_canonical_service = known(&w.canonical_name);
        self.source_canonical_revision = known(&w.canonical_revision);
        self.source_workload_namespace = known(&w.namespace);
        self.source_app = known(&w.canonical_name);
        self.source_version = known(&w.canonical_revision);
        self.source_cluster = known(&w.cluster_id);
        self
    }

    /// The identity the source proved; its namespace when none is known.
    fn proven(mut self, id: &SpiffeId) -> Self {
        self.source_principal = id.to_string();
        if self.source_workload_namespace == UNKNOWN {
            self.source_workload_namespace = id.namespace().to_string();
        }
        self
    }
}

/// Upstream ztunnel's label set for TCP traffic (without locality, which
/// this mesh does not route on yet).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    reporter: Reporter,

    #[prometheus(flatten)]
    source: SourceLabels,

    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,

    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,

    request_protocol: String,
    response_flags: ResponseFlags,
    connection_security_policy: SecurityPolicy,
}

fn known(value: &str) -> String {
    if value.is_empty() {
        UNKNOWN.to_string()
    } else {
        value.to_string()
    }
}

impl TrafficLabels {
    /// The workloads the labels name, (namespace, workload name): the
    /// source's and the destination's when known.
    fn workloads(&self) -> impl Iterator<Item = (&str, &str)> {
        [
            (
                &self.source.source_workload_namespace,
                &self.source.source_workload,
            ),
            (
                &self.destination_workload_namespace,
                &self.destination_workload,
            ),
        ]
        .into_iter()
        .filter(|(_, name)| name.as_str() != UNKNOWN)
        .map(|(ns, name)| (ns.as_str(), name.as_str()))
    }

    pub fn new(reporter: Reporter, security: SecurityPolicy) -> Self {
        let unknown = || UNKNOWN.to_string();
        TrafficLabels {
            reporter,
            source: SourceLabels::unknown(),
            destination_service: unknown(),
            destination_service_namespace: unknown(),
            destination_service_name: unknown(),
            destination_workload: unknown(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_cluster: unknown(),
            request_protocol: "tcp".to_string(),
            response_flags: ResponseFlags::None,
            connection_security_policy: security,
        }
    }

    /// The source workload's names. Its principal is set only from an
    /// identity actually proven ([`Self::with_source_principal`]).
    pub fn with_source(mut self, w: Option<&Workload>) -> Self {
        if let Some(w) = w {
            self.source = self.source.of(w);
        }
        self
    }

    /// A source the store does not know (a peer from another cluster), as
    /// its `baggage` describes it (upstream's `DerivedWorkload`). Telemetry
    /// only; a value that is not a plausible Kubernetes name is ignored, so
    /// a peer cannot write arbitrary text into label values.
    pub fn with_derived_source(mut self, b: &Baggage) -> Self {
        let plausible = |v: &Option<String>| {
            v.as_ref()
                .filter(|v| {
                    v.len() <= 253
                        && v.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
                })
                .cloned()
        };
        if let Some(v) = plausible(&b.workload_name) {
            self.source.source_workload = v;
        }
        if let Some(v) = plausible(&b.namespace) {
            self.source.source_workload_namespace = v;
        }
        if let Some(v) = plausible(&b.service_name) {
            self.source.source_canonical_service = v.clone();
            self.source.source_app = v;
        }
        if let Some(v) = plausible(&b.revision) {
            self.source.source_canonical_revision = v.clone();
            self.source.source_version = v;
        }
        if let Some(v) = plausible(&b.cluster_id) {
            self.source.source_cluster = v;
        }
        self
    }

    pub fn with_source_principal(mut self, id: Option<&SpiffeId>) -> Self {
        if let Some(id) = id {
            self.source = self.source.proven(id);
        }
        self
    }

    pub fn with_destination(mut self, w: Option<&Workload>) -> Self {
        if let Some(w) = w {
            self.destination_workload = known(&w.workload_name);
            self.destination_canonical_service = known(&w.canonical_name);
            self.destination_canonical_revision = known(&w.canonical_revision);
            self.destination_workload_namespace = known(&w.namespace);
            self.destination_principal = w.identity.to_string();
            self.destination_app = known(&w.canonical_name);
            self.destination_version = known(&w.canonical_revision);
            self.destination_cluster = known(&w.cluster_id);
        }
        self
    }

    pub fn with_destination_service(mut self, s: Option<&Service>) -> Self {
        if let Some(s) = s {
            self.destination_service = known(&s.hostname);
            self.destination_service_namespace = known(&s.namespace);
            self.destination_service_name = known(&s.name);
        }
        self
    }
}

/// Bytes one way across a connection: kept for the access log and added to
/// the metric as they flow, so long-lived connections show up before they end.
pub struct ByteCounter {
    /// Shared with the live-connection registry, which reads it while the
    /// connection runs ([`super::connections`]).
    total: Arc<AtomicU64>,
    metric: Counter,
}

impl ByteCounter {
    fn new(metric: Counter) -> Self {
        ByteCounter {
            total: Arc::default(),
            metric,
        }
    }

    /// The running total, for readers outside the copy loop.
    pub(crate) fn shared(&self) -> Arc<AtomicU64> {
        self.total.clone()
    }

    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        self.metric.inc_by(n);
    }

    fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// One proxied connection, from the moment it can be labelled until it
/// ends. Dropping it unclosed (a connection cut by the drain deadline)
/// records it as closed by the drain.
pub struct ConnectionRecord {
    metrics: Arc<Metrics>,
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    /// The CONNECT target, when the connection is (or goes into) a tunnel.
    hbone_target: Option<SocketAddr>,
    labels: TrafficLabels,
    start: Instant,
    client_to_server: ByteCounter,
    server_to_client: ByteCounter,
    decision: Option<String>,
    /// The W3C trace id both ends of a tunnel log the connection under.
    trace: Option<TraceParent>,
    /// The response flags `labels` had when it was opened.
    opened_flags: ResponseFlags,
    closed: bool,
}

impl ConnectionRecord {
    pub(crate) fn open(
        metrics: &Arc<Metrics>,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        hbone_target: Option<SocketAddr>,
        labels: TrafficLabels,
    ) -> Self {
        metrics.opened.get_or_create(&labels).inc();
        metrics.series_opened(&labels);
        let opened_flags = labels.response_flags;
        tracing::event!(
            target: "access",
            tracing::Level::DEBUG,
            src.addr = %src,
            dst.addr = %dst,
            dst.hbone_addr = hbone_target.map(tracing::field::display),
            direction = %direction,
            "connection opened"
        );
        let client_to_server =
            ByteCounter::new(metrics.received_bytes.get_or_create(&labels).clone());
        let server_to_client = ByteCounter::new(metrics.sent_bytes.get_or_create(&labels).clone());
        ConnectionRecord {
            metrics: metrics.clone(),
            direction,
            src,
            dst,
            hbone_target,
            labels,
            start: Instant::now(),
            client_to_server,
            server_to_client,
            decision: None,
            trace: None,
            opened_flags,
            closed: false,
        }
    }

    /// The connection's trace context (sent in, or read from, its CONNECT).
    pub fn set_trace(&mut self, trace: TraceParent) {
        self.trace = Some(trace);
    }

    /// Bytes the client sent.
    pub fn client_to_server(&self) -> &ByteCounter {
        &self.client_to_server
    }

    /// Bytes the server sent back.
    pub fn server_to_client(&self) -> &ByteCounter {
        &self.server_to_client
    }

    /// Bytes the pod being proxied sent and received so far, as the access
    /// log counts them (the client's side outbound, the server's inbound).
    pub(crate) fn pod_bytes(&self) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        let (up, down) = (
            self.client_to_server.shared(),
            self.server_to_client.shared(),
        );
        match self.labels.reporter {
            Reporter::Source => (up, down),
            Reporter::Destination => (down, up),
        }
    }

    /// The policy decision, for the access log.
    pub fn set_decision(&mut self, decision: impl fmt::Display) {
        self.decision = Some(decision.to_string());
    }

    /// The connection ended; `error` says why if it did not end cleanly.
    pub fn close(mut self, error: Option<&dyn fmt::Display>) {
        self.finish(error);
    }

    /// The connection was refused or could not be carried.
    pub fn fail(mut self, flags: ResponseFlags, reason: FailureReason, error: &dyn fmt::Display) {
        self.labels.response_flags = flags;
        self.metrics.count_failure(self.direction, reason);
        self.finish(Some(error));
    }

    fn finish(&mut self, error: Option<&dyn fmt::Display>) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        self.metrics.closed.get_or_create(&self.labels).inc();
        self.metrics
            .series_closed(&mut self.labels, self.opened_flags);
        let l = &self.labels;
        let mtls = l.connection_security_policy == SecurityPolicy::MutualTls;
        let identity = |s: &String| (mtls && s != UNKNOWN).then(|| s.clone());
        // Each side's own view: what the pod being proxied sent and received.
        let (sent, received) = match l.reporter {
            Reporter::Source => (self.client_to_server.get(), self.server_to_client.get()),
            Reporter::Destination => (self.server_to_client.get(), self.client_to_server.get()),
        };
        let duration_ms = self.start.elapsed().as_millis() as u64;
        macro_rules! access {
            ($level:ident, $($error:tt)*) => {
                tracing::event!(
                    target: "access",
                    tracing::Level::$level,
                    src.addr = %self.src,
                    src.workload = %l.source.source_workload,
                    src.namespace = %l.source.source_workload_namespace,
                    src.identity = identity(&l.source.source_principal),
                    dst.addr = %self.dst,
                    dst.hbone_addr = self.hbone_target.map(tracing::field::display),
                    dst.service = %l.destination_service,
                    dst.workload = %l.destination_workload,
                    dst.namespace = %l.destination_workload_namespace,
                    dst.identity = identity(&l.destination_principal),
                    direction = %self.direction,
                    policy = self.decision.as_deref(),
                    id = self.trace.map(tracing::field::display),
                    bytes_sent = sent,
                    bytes_recv = received,
                    duration_ms,
                    $($error)*
                    "connection complete"
                )
            };
        }
        match error {
            None => access!(INFO,),
            Some(error) => access!(WARN, error = %error,),
        }
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.finish(Some(&"closed by the drain deadline"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        proxy_core::metrics::encode(registry).unwrap()
    }

    fn store_workload(name: &str, namespace: &str) -> Workload {
        let xds = crate::proxy::testing::xds::workload(name, namespace, "10.0.0.9").0;
        Workload::try_from(xds).unwrap()
    }

    /// Labels of a connection from workload `from` to `to` (each `ns/name`).
    fn between(from: &str, to: &str) -> TrafficLabels {
        let (fns, fname) = from.split_once('/').unwrap();
        let (tns, tname) = to.split_once('/').unwrap();
        TrafficLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
            .with_source(Some(&store_workload(fname, fns)))
            .with_destination(Some(&store_workload(tname, tns)))
    }

    fn open(metrics: &Arc<Metrics>, labels: TrafficLabels) -> ConnectionRecord {
        let (src, dst) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        ConnectionRecord::open(metrics, Direction::Outbound, src, dst, None, labels)
    }

    /// Lines of the traffic series naming `workload`.
    fn series_naming(registry: &Registry, workload: &str) -> usize {
        text(registry)
            .lines()
            .filter(|l| l.starts_with("istio_tcp_"))
            .filter(|l| l.contains(&format!("_workload=\"{workload}\"")))
            .count()
    }

    #[test]
    fn series_of_workloads_gone_from_the_mesh_are_dropped_after_the_retention() {
        let mut registry = proxy_core::metrics::new_registry();
        let metrics = Metrics::register(&mut registry);
        let retention = Duration::from_secs(300);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // `old` leaves the mesh; `web` and `db` stay.
        open(&metrics, between("a/web", "b/old")).close(None);
        let refused = open(&metrics, between("a/web", "b/old"));
        refused.fail(ResponseFlags::Deny, FailureReason::PolicyDenied, &"denied");
        let live = open(&metrics, between("a/old", "b/db"));
        open(&metrics, between("a/web", "b/db")).close(None);
        // web -> old: opened, closed, bytes each way, and closed once more
        // under the refusal's flag; old -> db, live: opened, bytes each way.
        assert_eq!(series_naming(&registry, "old"), 4 + 1 + 3);
        let present = |_: &str, name: &str| name != "old";

        assert_eq!(
            metrics.expire(at(0), retention, &present),
            0,
            "first seen gone"
        );
        assert_eq!(
            metrics.expire(at(299), retention, &present),
            0,
            "within retention"
        );
        assert_eq!(
            metrics.expire(at(300), retention, &present),
            2,
            "both web -> old sets"
        );
        assert_eq!(
            series_naming(&registry, "old"),
            3,
            "the live connection's series stay"
        );
        assert!(series_naming(&registry, "db") > 0 && series_naming(&registry, "web") > 0);

        // Closed now: its clock starts at the next sweep.
        live.close(None);
        assert_eq!(metrics.expire(at(301), retention, &present), 0);
        // Used again meanwhile: the clock starts over.
        open(&metrics, between("a/old", "b/db")).close(None);
        assert_eq!(metrics.expire(at(601), retention, &present), 0);
        assert_eq!(metrics.expire(at(650), retention, &present), 0);
        assert_eq!(metrics.expire(at(950), retention, &present), 1);
        assert_eq!(series_naming(&registry, "old"), 0);

        // Workloads still in the mesh are never dropped, however idle.
        assert_eq!(metrics.expire(at(100_000), retention, &|_, _| true), 0);
        assert_eq!(series_naming(&registry, "db"), 4);
    }

    #[test]
    fn records_count_connections_and_bytes_under_upstream_names() {
        let mut registry = proxy_core::metrics::new_registry();
        let metrics = Metrics::register(&mut registry);
        let client: SpiffeId = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        let labels = TrafficLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
            .with_source_principal(Some(&client));
        let src = "10.0.0.1:40000".parse().unwrap();
        let dst = "10.0.0.2:80".parse().unwrap();
        let record = ConnectionRecord::open(&metrics, Direction::Outbound, src, dst, None, labels);
        record.client_to_server().add(5);
        record.server_to_client().add(7);
        let during = text(&registry);
        assert!(
            during.contains("istio_tcp_received_bytes_total{"),
            "{during}"
        );
        assert!(
            !during.contains("istio_tcp_connections_closed_total{"),
            "{during}"
        );
        record.close(None);

        let after = text(&registry);
        for line in [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
        ] {
            let found = after.lines().find(|l| l.starts_with(line)).unwrap();
            assert!(found.ends_with(" 1"), "{found}");
            assert!(found.contains("reporter=\"source\""), "{found}");
            assert!(
                found.contains("source_principal=\"spiffe://cluster.local/ns/a/sa/client\""),
                "{found}"
            );
            assert!(found.contains("source_workload_namespace=\"a\""), "{found}");
            assert!(
                found.contains("destination_principal=\"unknown\""),
                "{found}"
            );
            assert!(
                found.contains("connection_security_policy=\"mutual_tls\""),
                "{found}"
            );
            assert!(found.contains("response_flags=\"-\""), "{found}");
        }
        let received = after
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .unwrap();
        assert!(received.ends_with(" 5"), "{received}");
        let sent = after
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .unwrap();
        assert!(sent.ends_with(" 7"), "{sent}");
    }

    #[test]
    fn failures_carry_a_flag_and_a_bounded_reason() {
        let mut registry = proxy_core::metrics::new_registry();
        let metrics = Metrics::register(&mut registry);
        let src = "10.0.0.1:40000".parse().unwrap();
        let dst = "10.0.0.2:80".parse().unwrap();
        let labels = TrafficLabels::new(Reporter::Destination, SecurityPolicy::Unknown);
        ConnectionRecord::open(
            &metrics,
            Direction::InboundPlaintext,
            src,
            dst,
            None,
            labels,
        )
        .fail(ResponseFlags::Deny, FailureReason::PolicyDenied, &"denied");
        metrics.early_failure(
            Direction::Outbound,
            src,
            None,
            FailureReason::NoOriginalDestination,
            &"not redirected",
        );
        // A record dropped unclosed still counts as closed.
        drop(ConnectionRecord::open(
            &metrics,
            Direction::Inbound,
            src,
            dst,
            None,
            TrafficLabels::new(Reporter::Destination, SecurityPolicy::MutualTls),
        ));

        let out = text(&registry);
        let closed: Vec<_> = out
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
            .collect();
        assert_eq!(closed.len(), 2, "{out}");
        assert!(
            closed.iter().any(|l| l.contains("response_flags=\"DENY\"")
                && l.contains("connection_security_policy=\"unknown\"")),
            "{out}"
        );
        assert!(out.contains(
            "istio_ztunnel_connection_failures_total{direction=\"inbound_plaintext\",reason=\"policy_denied\"} 1"
        ), "{out}");
        assert!(out.contains(
            "istio_ztunnel_connection_failures_total{direction=\"outbound\",reason=\"no_original_destination\"} 1"
        ), "{out}");
    }
}
