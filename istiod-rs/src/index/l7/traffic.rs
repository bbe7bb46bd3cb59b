//! DestinationRule -> `istio_rs.l7.v1.TrafficPolicy`, keyed
//! `<svc ns>/<svc hostname>` like the service's `istio.workload.Address`.
//!
//! - `host` is resolved as upstream's `ResolveShortnameToFQDN`
//!   (pilot/pkg/model/config.go): a name without a dot is
//!   `<host>.<rule ns>.svc.<domain>`, anything else is taken as written; a
//!   host that is no Service of the mesh is reported and not used.
//! - `trafficPolicy` -> `default_policy`; each `portLevelSettings` entry ->
//!   `ports`, replacing the default whole (upstream
//!   `GetPortLevelTrafficPolicy`: "port level policies do not inherit").
//! - Subsets are resolved to the workload uids of the service's pods whose
//!   labels hold the subset's (the waypoint sees no labels), and merged as
//!   upstream's `MergeSubsetTrafficPolicy` (pilot/pkg/networking/core):
//!   each of load balancer, connection pool and outlier detection the
//!   subset sets replaces the host's (or the host port entry's); a subset's
//!   own port entry replaces everything for its port.
//! - Several rules for one host: the oldest (then namespace/name) applies;
//!   the others are reported as not used (upstream merges some of them; the
//!   mesh does not).
//! - What the waypoint cannot honour (`tls` other than `ISTIO_MUTUAL`,
//!   `tunnel`, `proxyProtocol`, `retryBudget`, `localityLbSetting`, warmup,
//!   `PASSTHROUGH`, ring hash sizes, TCP keepalive, ...) is reported by
//!   field path, never dropped silently; the rest applies.

use std::collections::BTreeMap;

use api::crd::DestinationRule;
use api::crd::networking::{
    ConnectionPoolSettings, ConsistentHashLb, H2UpgradePolicy, LoadBalancerSettings,
    OutlierDetection, PortTrafficPolicy, SimpleLb, TrafficPolicy,
};
use api::l7;
use api::manifest::{Kind, ObjectKey};
use k8s_openapi::api::core::v1::Pod;

use crate::index::MeshConfig;
use crate::index::problem::{Effect, PolicyProblem, PolicyRef};
use crate::index::selectors::{Labels, labels_of, subset_of};
use crate::index::services::Services;
use crate::state::ClusterState;

/// Largest Maglev table Envoy accepts (`MaglevLoadBalancer` table_size
/// bound), so the waypoint's too.
const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// The pods backing each service (by index in [`Services::entries`]), with
/// their labels: what subsets select from.
#[derive(Debug, Default)]
pub(in crate::index) struct Endpoints<'a> {
    by_service: BTreeMap<usize, Vec<(&'a ObjectKey, &'a Labels)>>,
}

impl<'a> Endpoints<'a> {
    /// `pods`: each workload pod and the services it backs.
    pub fn of(pods: impl IntoIterator<Item = (&'a ObjectKey, &'a Pod, &'a [usize])>) -> Self {
        let mut by_service: BTreeMap<usize, Vec<_>> = BTreeMap::new();
        for (key, pod, backed) in pods {
            for &service in backed {
                by_service
                    .entry(service)
                    .or_default()
                    .push((key, labels_of(&pod.metadata.labels)));
            }
        }
        Endpoints { by_service }
    }

    /// The uids of the service's pods whose labels hold `selector`, sorted.
    fn select(&self, mesh: &MeshConfig, service: usize, selector: &Labels) -> Vec<String> {
        let mut uids: Vec<String> = self
            .by_service
            .get(&service)
            .into_iter()
            .flatten()
            .filter(|(_, labels)| subset_of(selector, labels))
            .map(|(key, _)| mesh.pod_uid(&key.namespace, &key.name))
            .collect();
        uids.sort();
        uids
    }
}

/// A host as upstream resolves it (`ResolveShortnameToFQDN`).
pub(in crate::index) fn resolve_host(mesh: &MeshConfig, namespace: &str, host: &str) -> String {
    if host == "*" || host.contains('.') || host.parse::<std::net::IpAddr>().is_ok() {
        host.to_string()
    } else {
        mesh.service_hostname(host, namespace)
    }
}

/// Services by hostname: index in [`Services::entries`].
pub(in crate::index) fn by_hostname<'a>(services: &'a Services<'_>) -> BTreeMap<&'a str, usize> {
    services
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.proto.hostname.as_str(), i))
        .collect()
}

/// Reports problems of one object.
pub(in crate::index) struct Report<'p> {
    pub object: PolicyRef,
    pub problems: &'p mut Vec<PolicyProblem>,
}

impl Report<'_> {
    pub fn not_honoured(
        &mut self,
        field: impl Into<String>,
        reason: impl Into<String>,
        effect: Effect,
    ) {
        self.problems.push(PolicyProblem::NotHonoured {
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
            effect,
        });
    }

    /// Each of `fields` (`(name, set, reason)`) that is set, under `path`.
    pub fn each_set(&mut self, path: &str, fields: &[(&str, bool, &str)], effect: Effect) -> bool {
        let mut any = false;
        for (field, set, reason) in fields {
            if *set {
                self.not_honoured(format!("{path}.{field}"), *reason, effect.clone());
                any = true;
            }
        }
        any
    }

    pub fn invalid(
        &mut self,
        field: impl Into<String>,
        value: impl Into<String>,
        expected: &'static str,
        effect: Effect,
    ) {
        self.problems.push(PolicyProblem::InvalidValue {
            object: self.object.clone(),
            field: field.into(),
            value: value.into(),
            expected,
            effect,
        });
    }

    /// A duration field, reported when it is not one.
    pub fn duration(
        &mut self,
        field: impl FnOnce() -> String,
        text: Option<&str>,
        effect: Effect,
    ) -> Option<prost_types::Duration> {
        let text = text?;
        let parsed = parse_duration(text);
        if parsed.is_none() {
            self.invalid(field(), text, "a duration such as 500ms, 10s or 1h", effect);
        }
        parsed
    }
}

/// A duration as Istio's CRDs write them (Go's `time.ParseDuration`
/// syntax, non-negative): `1h30m`, `1.5s`, `100ms`, `250us`, `0s`.
pub(in crate::index) fn parse_duration(text: &str) -> Option<prost_types::Duration> {
    const NANOS: [(&str, u128); 7] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Some(prost_types::Duration::default());
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = NANOS.iter().find(|(u, _)| *u == unit)?.1;
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut part = whole.checked_mul(scale)?;
        let mut denominator = 1u128;
        for digit in fraction.chars().take(18) {
            denominator *= 10;
            part += u128::from(digit.to_digit(10)?) * scale / denominator;
        }
        total = total.checked_add(part)?;
        rest = next;
    }
    Some(prost_types::Duration {
        seconds: i64::try_from(total / 1_000_000_000).ok()?,
        nanos: (total % 1_000_000_000) as i32,
    })
}

/// The three parts of a policy a DestinationRule sets at each level.
#[derive(Clone, Copy, Default)]
struct Parts<'a> {
    load_balancer: Option<&'a LoadBalancerSettings>,
    connection_pool: Option<&'a ConnectionPoolSettings>,
    outlier_detection: Option<&'a OutlierDetection>,
    tls: Option<&'a serde_json::Value>,
}

impl<'a> Parts<'a> {
    fn of(p: &'a TrafficPolicy) -> Self {
        Parts {
            load_balancer: p.load_balancer.as_ref(),
            connection_pool: p.connection_pool.as_ref(),
            outlier_detection: p.outlier_detection.as_ref(),
            tls: p.tls.as_ref(),
        }
    }

    fn of_port(p: &'a PortTrafficPolicy) -> Self {
        Parts {
            load_balancer: p.load_balancer.as_ref(),
            connection_pool: p.connection_pool.as_ref(),
            outlier_detection: p.outlier_detection.as_ref(),
            tls: p.tls.as_ref(),
        }
    }
}

/// Every TrafficPolicy of the cluster, one per destination host that is a
/// Service of the mesh.
pub(in crate::index) fn build(
    state: &ClusterState,
    mesh: &MeshConfig,
    services: &Services<'_>,
    endpoints: &Endpoints<'_>,
    problems: &mut Vec<PolicyProblem>,
) -> Vec<l7::TrafficPolicy> {
    let hosts = by_hostname(services);
    // Oldest first: the first rule for a host applies.
    let mut rules: Vec<(&ObjectKey, &DestinationRule)> = state
        .destination_rules
        .iter()
        .map(|(k, r)| (k, r.as_ref()))
        .collect();
    rules.sort_by(|(ka, a), (kb, b)| {
        let created = |r: &DestinationRule| r.metadata.creation_timestamp.clone().map(|t| t.0);
        created(a).cmp(&created(b)).then_with(|| ka.cmp(kb))
    });
    let mut taken: BTreeMap<usize, &ObjectKey> = BTreeMap::new();
    let mut out = Vec::new();
    for (key, rule) in rules {
        let mut report = Report {
            object: PolicyRef::new(Kind::DestinationRule, &key.namespace, &key.name),
            problems,
        };
        let spec = &rule.spec;
        if spec.workload_selector.is_some() {
            report.not_honoured(
                "spec.workloadSelector",
                "a rule with a workloadSelector applies only to the selected workloads' own proxies, and ambient workloads have none",
                Effect::NotUsed,
            );
            continue;
        }
        let host = resolve_host(mesh, &key.namespace, &spec.host);
        let Some(&service) = hosts.get(host.as_str()) else {
            report.not_honoured(
                "spec.host",
                format!("{host:?} is not the hostname of a Service of the mesh"),
                Effect::NotUsed,
            );
            continue;
        };
        if let Some(first) = taken.get(&service) {
            report.not_honoured(
                "spec.host",
                format!(
                    "DestinationRule {first} applies to {host} and is older; rules for one host are not merged"
                ),
                Effect::NotUsed,
            );
            continue;
        }
        taken.insert(service, key);
        if !spec.export_to.is_empty() && !spec.export_to.iter().all(|e| e == "*") {
            report.not_honoured(
                "spec.exportTo",
                "the rule applies at the destination's waypoint, whatever namespace the client is in",
                Effect::FieldNotApplied,
            );
        }
        let entry = &services.entries[service];
        out.push(translate(
            &mut report,
            mesh,
            endpoints,
            service,
            rule,
            &entry.proto,
        ));
    }
    out
}

/// What an admission webhook must refuse in a DestinationRule: the values
/// that cannot be read (durations, percentages, table sizes), found by the
/// translation itself. Fields the waypoint does not honour are valid
/// upstream and not refused.
pub fn validate_destination_rule(rule: &DestinationRule) -> Vec<PolicyProblem> {
    let mut problems = Vec::new();
    let key = rule_key(rule);
    let mut report = Report {
        object: PolicyRef::new(Kind::DestinationRule, &key.namespace, &key.name),
        problems: &mut problems,
    };
    let service = api::workload::Service::default();
    translate(
        &mut report,
        &MeshConfig::default(),
        &Endpoints::default(),
        0,
        rule,
        &service,
    );
    problems.retain(PolicyProblem::rejected_at_admission);
    problems
}

fn translate(
    report: &mut Report<'_>,
    mesh: &MeshConfig,
    endpoints: &Endpoints<'_>,
    service: usize,
    rule: &DestinationRule,
    proto: &api::workload::Service,
) -> l7::TrafficPolicy {
    let spec = &rule.spec;
    let top = spec.traffic_policy.as_ref();
    if let Some(p) = top {
        whole_policy_fields(report, "spec.trafficPolicy", p);
    }
    let top_parts = top.map(Parts::of).unwrap_or_default();
    let default_policy = policy(report, "spec.trafficPolicy", top_parts);
    let host_ports = port_entries(
        report,
        "spec.trafficPolicy",
        top.map(|p| p.port_level_settings.as_slice())
            .unwrap_or_default(),
    );
    let host_port_policies: BTreeMap<u32, l7::Policy> = host_ports
        .iter()
        .map(|(port, (path, parts))| (*port, policy(report, path, *parts)))
        .collect();

    let mut subsets = Vec::new();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if subset.name.is_empty() {
            report.not_honoured(
                format!("{path}.name"),
                "a subset needs a name",
                Effect::NotUsed,
            );
            continue;
        }
        if let Some(first) = names.get(subset.name.as_str()) {
            report.not_honoured(
                format!("{path}.name"),
                format!("spec.subsets[{first}] has the same name and comes first"),
                Effect::NotUsed,
            );
            continue;
        }
        names.insert(&subset.name, i);
        let own = subset.traffic_policy.as_ref();
        let policy_path = format!("{path}.trafficPolicy");
        if let Some(p) = own {
            whole_policy_fields(report, &policy_path, p);
        }
        let own_parts = own.map(Parts::of).unwrap_or_default();
        let own_policy = policy(report, &policy_path, own_parts);
        let own_ports = port_entries(
            report,
            &policy_path,
            own.map(|p| p.port_level_settings.as_slice())
                .unwrap_or_default(),
        );
        let mut ports: BTreeMap<u32, l7::Policy> = host_port_policies
            .iter()
            .map(|(port, base)| (*port, merge(base, &own_policy, own_parts)))
            .collect();
        for (port, (path, parts)) in own_ports {
            ports.insert(port, policy(report, &path, parts));
        }
        subsets.push(l7::Subset {
            name: subset.name.clone(),
            workload_uids: endpoints.select(mesh, service, &subset.labels),
            policy: Some(merge(&default_policy, &own_policy, own_parts)),
            ports: ports
                .into_iter()
                .map(|(port, policy)| l7::PortPolicy {
                    port,
                    policy: Some(policy),
                })
                .collect(),
        });
    }
    let key = rule_key(rule);
    l7::TrafficPolicy {
        namespace: proto.namespace.clone(),
        hostname: proto.hostname.clone(),
        origin: Some(l7::Origin {
            kind: Kind::DestinationRule.as_str().to_string(),
            namespace: key.namespace,
            name: key.name,
            rule: 0,
        }),
        default_policy: Some(default_policy),
        ports: host_port_policies
            .into_iter()
            .map(|(port, policy)| l7::PortPolicy {
                port,
                policy: Some(policy),
            })
            .collect(),
        subsets,
    }
}

fn rule_key(rule: &DestinationRule) -> ObjectKey {
    ObjectKey::new(
        rule.metadata.namespace.clone().unwrap_or_default(),
        rule.metadata.name.clone().unwrap_or_default(),
    )
}

/// `over`'s parts where the subset sets them, else `base`'s (upstream
/// `MergeSubsetTrafficPolicy`: whole parts, not their fields).
fn merge(base: &l7::Policy, over: &l7::Policy, set: Parts<'_>) -> l7::Policy {
    fn pick<T: Clone>(set: bool, over: &Option<T>, base: &Option<T>) -> Option<T> {
        if set { over.clone() } else { base.clone() }
    }
    l7::Policy {
        load_balancer: pick(
            set.load_balancer.is_some(),
            &over.load_balancer,
            &base.load_balancer,
        ),
        connection_pool: pick(
            set.connection_pool.is_some(),
            &over.connection_pool,
            &base.connection_pool,
        ),
        outlier_detection: pick(
            set.outlier_detection.is_some(),
            &over.outlier_detection,
            &base.outlier_detection,
        ),
    }
}

/// Port entries by port number, the first for a port applying (as
/// upstream's loop), with their field paths.
fn port_entries<'a>(
    report: &mut Report<'_>,
    path: &str,
    entries: &'a [PortTrafficPolicy],
) -> BTreeMap<u32, (String, Parts<'a>)> {
    let mut out = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("{path}.portLevelSettings[{i}]");
        let Some(port) = entry.port.as_ref().map(|p| p.number) else {
            report.not_honoured(
                format!("{at}.port"),
                "a port-level setting needs a port number",
                Effect::FieldNotApplied,
            );
            continue;
        };
        if !(1..=65535).contains(&port) {
            report.invalid(
                format!("{at}.port.number"),
                port.to_string(),
                "a port number (1-65535)",
                Effect::FieldNotApplied,
            );
            continue;
        }
        if out.contains_key(&port) {
            report.not_honoured(
                format!("{at}.port.number"),
                format!("an earlier entry is for port {port} and applies"),
                Effect::FieldNotApplied,
            );
            continue;
        }
        out.insert(port, (at, Parts::of_port(entry)));
    }
    out
}

/// Fields of a whole `trafficPolicy` (not of a port entry) the waypoint
/// does not honour.
fn whole_policy_fields(report: &mut Report<'_>, path: &str, p: &TrafficPolicy) {
    let fields = [
        (
            "tunnel",
            p.tunnel.is_some(),
            "the waypoint reaches endpoints over HBONE only",
        ),
        (
            "proxyProtocol",
            p.proxy_protocol.is_some(),
            "the waypoint does not send PROXY protocol headers",
        ),
        (
            "retryBudget",
            p.retry_budget.is_some(),
            "retry budgets are not supported; use connectionPool.http.maxRetries",
        ),
    ];
    report.each_set(path, &fields, Effect::FieldNotApplied);
}

fn policy(report: &mut Report<'_>, path: &str, parts: Parts<'_>) -> l7::Policy {
    if let Some(tls) = parts.tls
        && *tls != serde_json::json!({"mode": "ISTIO_MUTUAL"})
    {
        report.not_honoured(
            format!("{path}.tls"),
            "the waypoint always reaches endpoints over HBONE with mesh mutual TLS (ISTIO_MUTUAL)",
            Effect::FieldNotApplied,
        );
    }
    l7::Policy {
        load_balancer: parts
            .load_balancer
            .and_then(|lb| load_balancer(report, &format!("{path}.loadBalancer"), lb)),
        connection_pool: parts
            .connection_pool
            .map(|pool| connection_pool(report, &format!("{path}.connectionPool"), pool)),
        outlier_detection: parts
            .outlier_detection
            .map(|o| outlier_detection(report, &format!("{path}.outlierDetection"), o)),
    }
}

fn load_balancer(
    report: &mut Report<'_>,
    path: &str,
    lb: &LoadBalancerSettings,
) -> Option<l7::LoadBalancer> {
    use l7::load_balancer::{Policy, Simple};
    let unsupported = [
        (
            "localityLbSetting",
            lb.locality_lb_setting.is_some(),
            "the mesh has no localities to prefer",
        ),
        (
            "warmupDurationSecs",
            lb.warmup_duration_secs.is_some(),
            "slow start (warmup) is not supported",
        ),
        (
            "warmup",
            lb.warmup.is_some(),
            "slow start (warmup) is not supported",
        ),
    ];
    report.each_set(path, &unsupported, Effect::FieldNotApplied);
    if let Some(hash) = &lb.consistent_hash {
        if lb.simple.is_some() {
            report.not_honoured(
                format!("{path}.simple"),
                "simple and consistentHash are alternatives; consistentHash applies",
                Effect::FieldNotApplied,
            );
        }
        return consistent_hash(report, &format!("{path}.consistentHash"), hash).map(|h| {
            l7::LoadBalancer {
                policy: Some(Policy::ConsistentHash(h)),
            }
        });
    }
    let simple = match lb.simple? {
        SimpleLb::Unspecified => Simple::Default,
        SimpleLb::RoundRobin => Simple::RoundRobin,
        SimpleLb::LeastRequest | SimpleLb::LeastConn => Simple::LeastRequest,
        SimpleLb::Random => Simple::Random,
        SimpleLb::Passthrough => {
            report.not_honoured(
                format!("{path}.simple"),
                "PASSTHROUGH (to the original destination) is not supported at a waypoint; the default (LEAST_REQUEST) applies",
                Effect::FieldNotApplied,
            );
            Simple::Default
        }
    };
    Some(l7::LoadBalancer {
        policy: Some(Policy::Simple(simple as i32)),
    })
}

fn consistent_hash(
    report: &mut Report<'_>,
    path: &str,
    hash: &ConsistentHashLb,
) -> Option<l7::ConsistentHash> {
    use l7::consistent_hash::{Cookie, Key};
    let mut keys: Vec<(&str, Key)> = Vec::new();
    if let Some(header) = &hash.http_header_name {
        keys.push(("httpHeaderName", Key::Header(header.to_ascii_lowercase())));
    }
    if let Some(cookie) = &hash.http_cookie {
        if !cookie.attributes.is_empty() {
            report.not_honoured(
                format!("{path}.httpCookie.attributes"),
                "cookie attributes are not supported",
                Effect::FieldNotApplied,
            );
        }
        let ttl = report.duration(
            || format!("{path}.httpCookie.ttl"),
            cookie.ttl.as_deref(),
            Effect::FieldNotApplied,
        );
        keys.push((
            "httpCookie",
            Key::Cookie(Cookie {
                name: cookie.name.clone(),
                path: cookie.path.clone().unwrap_or_default(),
                ttl,
            }),
        ));
    }
    if hash.use_source_ip == Some(true) {
        keys.push(("useSourceIp", Key::SourceIp(true)));
    }
    if let Some(param) = &hash.http_query_parameter_name {
        keys.push(("httpQueryParameterName", Key::QueryParameter(param.clone())));
    }
    for (field, _) in keys.iter().skip(1) {
        report.not_honoured(
            format!("{path}.{field}"),
            format!("the hash keys are alternatives; {} applies", keys[0].0),
            Effect::FieldNotApplied,
        );
    }
    let Some((_, key)) = keys.into_iter().next() else {
        report.not_honoured(
            path.to_string(),
            "no hash key (httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName); the default load balancer applies",
            Effect::FieldNotApplied,
        );
        return None;
    };
    let ring_size = hash
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .map(|_| "ringHash.minimumRingSize")
        .or(hash.minimum_ring_size.map(|_| "minimumRingSize"));
    if let Some(field) = ring_size {
        report.not_honoured(
            format!("{path}.{field}"),
            "the waypoint hashes with a Maglev table; ring sizes do not apply",
            Effect::FieldNotApplied,
        );
    }
    let mut table_size = 0;
    if let Some(size) = hash.maglev.as_ref().and_then(|m| m.table_size) {
        if is_prime(size) && size <= MAX_MAGLEV_TABLE_SIZE {
            table_size = size;
        } else {
            report.invalid(
                format!("{path}.maglev.tableSize"),
                size.to_string(),
                "a prime number no larger than 5000011",
                Effect::FieldNotApplied,
            );
        }
    }
    Some(l7::ConsistentHash {
        key: Some(key),
        table_size,
    })
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// `connectionPool` as waypoint-rs enforces it (its `upstream/limits.rs`):
/// every field but `tcp.tcpKeepalive` and `tcp.maxConnectionDuration`.
fn connection_pool(
    report: &mut Report<'_>,
    path: &str,
    pool: &ConnectionPoolSettings,
) -> l7::ConnectionPool {
    let mut out = l7::ConnectionPool::default();
    if let Some(tcp) = &pool.tcp {
        let at = format!("{path}.tcp");
        out.max_connections = tcp.max_connections;
        out.connect_timeout = report.duration(
            || format!("{at}.connectTimeout"),
            tcp.connect_timeout.as_deref(),
            Effect::FieldNotApplied,
        );
        out.tcp_idle_timeout = report.duration(
            || format!("{at}.idleTimeout"),
            tcp.idle_timeout.as_deref(),
            Effect::FieldNotApplied,
        );
        if tcp.tcp_keepalive.is_some() {
            report.not_honoured(
                format!("{at}.tcpKeepalive"),
                "TCP keepalive is set by ztunnel, not per destination",
                Effect::FieldNotApplied,
            );
        }
        if tcp.max_connection_duration.is_some() {
            report.not_honoured(
                format!("{at}.maxConnectionDuration"),
                "a maximum connection duration is not supported",
                Effect::FieldNotApplied,
            );
        }
    }
    if let Some(http) = &pool.http {
        let at = format!("{path}.http");
        out.http1_max_pending_requests = http.http1_max_pending_requests;
        out.http2_max_requests = http.http2_max_requests;
        out.max_requests_per_connection = http.max_requests_per_connection;
        out.max_retries = http.max_retries;
        out.http_idle_timeout = report.duration(
            || format!("{at}.idleTimeout"),
            http.idle_timeout.as_deref(),
            Effect::FieldNotApplied,
        );
        out.h2_upgrade = match http.h2_upgrade_policy {
            None | Some(H2UpgradePolicy::Default) => l7::H2Upgrade::Default,
            Some(H2UpgradePolicy::DoNotUpgrade) => l7::H2Upgrade::DoNotUpgrade,
            Some(H2UpgradePolicy::Upgrade) => l7::H2Upgrade::Upgrade,
        } as i32;
        out.use_client_protocol = http.use_client_protocol.unwrap_or(false);
        out.max_concurrent_streams = http.max_concurrent_streams;
    }
    out
}

fn outlier_detection(
    report: &mut Report<'_>,
    path: &str,
    o: &OutlierDetection,
) -> l7::OutlierDetection {
    if o.consecutive_errors.is_some() {
        report.not_honoured(
            format!("{path}.consecutiveErrors"),
            "deprecated upstream and not supported; use consecutive5xxErrors or consecutiveGatewayErrors",
            Effect::FieldNotApplied,
        );
    }
    for (field, value) in [
        ("maxEjectionPercent", o.max_ejection_percent),
        ("minHealthPercent", o.min_health_percent),
    ] {
        if let Some(v) = value.filter(|v| *v > 100) {
            report.invalid(
                format!("{path}.{field}"),
                v.to_string(),
                "a percentage (0-100)",
                Effect::FieldNotApplied,
            );
        }
    }
    let percent = |v: Option<u32>| v.filter(|v| *v <= 100);
    l7::OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        consecutive_local_origin_failures: o.consecutive_local_origin_failures,
        split_external_local_origin_errors: o.split_external_local_origin_errors.unwrap_or(false),
        interval: report.duration(
            || format!("{path}.interval"),
            o.interval.as_deref(),
            Effect::FieldNotApplied,
        ),
        base_ejection_time: report.duration(
            || format!("{path}.baseEjectionTime"),
            o.base_ejection_time.as_deref(),
            Effect::FieldNotApplied,
        ),
        max_ejection_percent: percent(o.max_ejection_percent),
        min_health_percent: percent(o.min_health_percent),
    }
}

// ---------------------------------------------------------------------------
// Readable JSON (fixture goldens, `/debug/config_dump`): enums by name,
// durations as `1.5s`, empty and unset values left out.

/// A TrafficPolicy as JSON.
pub(in crate::index) fn json(p: &l7::TrafficPolicy) -> serde_json::Value {
    let port_policies = |ports: &[l7::PortPolicy]| -> Vec<serde_json::Value> {
        ports
            .iter()
            .map(|pp| serde_json::json!({"port": pp.port, "policy": pp.policy.as_ref().map(policy_json)}))
            .collect()
    };
    let subsets: Vec<serde_json::Value> = p
        .subsets
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "workloadUids": s.workload_uids,
                "policy": s.policy.as_ref().map(policy_json),
                "ports": port_policies(&s.ports),
            })
        })
        .collect();
    prune(serde_json::json!({
        "namespace": p.namespace,
        "hostname": p.hostname,
        "origin": p.origin.as_ref().map(origin_json),
        "defaultPolicy": p.default_policy.as_ref().map(policy_json),
        "ports": port_policies(&p.ports),
        "subsets": subsets,
    }))
}

fn origin_json(o: &l7::Origin) -> serde_json::Value {
    serde_json::json!(format!("{} {}/{} #{}", o.kind, o.namespace, o.name, o.rule))
}

/// `1.5s`, `100ms` as protobuf JSON writes durations (seconds).
fn duration_json(d: &prost_types::Duration) -> serde_json::Value {
    let nanos = i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos);
    let whole = nanos / 1_000_000_000;
    let fraction = nanos % 1_000_000_000;
    let text = if fraction == 0 {
        format!("{whole}s")
    } else {
        let digits = format!("{fraction:09}");
        format!("{whole}.{}s", digits.trim_end_matches('0'))
    };
    serde_json::Value::String(text)
}

/// Leaves out nulls, empty strings, lists and objects, and `false`.
fn prune(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    fn empty(v: &Value) -> bool {
        match v {
            Value::Null | Value::Bool(false) => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        }
    }
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !empty(v))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(prune).collect()),
        other => other,
    }
}

fn policy_json(p: &l7::Policy) -> serde_json::Value {
    use l7::consistent_hash::Key;
    use l7::load_balancer::{Policy, Simple};
    let d = |d: &Option<prost_types::Duration>| d.as_ref().map(duration_json);
    let lb = p
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.policy.as_ref())
        .map(|policy| match policy {
            Policy::Simple(s) => serde_json::json!({
                "simple": Simple::try_from(*s).map_or("UNKNOWN", |s| s.as_str_name()),
            }),
            Policy::ConsistentHash(h) => {
                let key = match &h.key {
                    Some(Key::Header(name)) => serde_json::json!({"header": name}),
                    Some(Key::Cookie(c)) => serde_json::json!({
                        "cookie": {"name": c.name, "path": c.path, "ttl": d(&c.ttl)},
                    }),
                    Some(Key::SourceIp(on)) => serde_json::json!({"sourceIp": on}),
                    Some(Key::QueryParameter(name)) => serde_json::json!({"queryParameter": name}),
                    None => serde_json::Value::Null,
                };
                serde_json::json!({"consistentHash": {"key": key, "tableSize": h.table_size}})
            }
        });
    let pool = p.connection_pool.as_ref().map(|c| {
        serde_json::json!({
            "maxConnections": c.max_connections,
            "connectTimeout": d(&c.connect_timeout),
            "tcpIdleTimeout": d(&c.tcp_idle_timeout),
            "http1MaxPendingRequests": c.http1_max_pending_requests,
            "http2MaxRequests": c.http2_max_requests,
            "maxRequestsPerConnection": c.max_requests_per_connection,
            "maxRetries": c.max_retries,
            "httpIdleTimeout": d(&c.http_idle_timeout),
            "h2Upgrade": l7::H2Upgrade::try_from(c.h2_upgrade)
                .ok()
                .filter(|u| *u != l7::H2Upgrade::Default)
                .map(|u| u.as_str_name()),
            "useClientProtocol": c.use_client_protocol,
            "maxConcurrentStreams": c.max_concurrent_streams,
        })
    });
    let outlier = p.outlier_detection.as_ref().map(|o| {
        serde_json::json!({
            "consecutive5xxErrors": o.consecutive_5xx_errors,
            "consecutiveGatewayErrors": o.consecutive_gateway_errors,
            "consecutiveLocalOriginFailures": o.consecutive_local_origin_failures,
            "splitExternalLocalOriginErrors": o.split_external_local_origin_errors,
            "interval": d(&o.interval),
            "baseEjectionTime": d(&o.base_ejection_time),
            "maxEjectionPercent": o.max_ejection_percent,
            "minHealthPercent": o.min_health_percent,
        })
    });
    serde_json::json!({
        "loadBalancer": lb,
        "connectionPool": pool,
        "outlierDetection": outlier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_istio_writes_them() {
        let d = |s: &str| parse_duration(s).map(|d| (d.seconds, d.nanos));
        assert_eq!(d("10s"), Some((10, 0)));
        assert_eq!(d("100ms"), Some((0, 100_000_000)));
        assert_eq!(d("1h30m"), Some((5400, 0)));
        assert_eq!(d("1.5s"), Some((1, 500_000_000)));
        assert_eq!(d("250us"), Some((0, 250_000)));
        assert_eq!(d("0"), Some((0, 0)));
        assert_eq!(d("0s"), Some((0, 0)));
        for bad in ["", "10", "s", "-1s", "1x", "1..5s", "."] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn short_hosts_resolve_in_the_rules_namespace() {
        let mesh = MeshConfig::default();
        assert_eq!(
            resolve_host(&mesh, "shop", "reviews"),
            "reviews.shop.svc.cluster.local"
        );
        assert_eq!(
            resolve_host(&mesh, "shop", "reviews.other"),
            "reviews.other"
        );
        assert_eq!(resolve_host(&mesh, "shop", "10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(5_000_011));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
    }
}
