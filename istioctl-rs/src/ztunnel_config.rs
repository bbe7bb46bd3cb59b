//! `ztunnel-config`: what one ztunnel holds (workloads, services, policies,
//! certificates) and its live connections, read from its admin endpoint's
//! `/config_dump`, shown with upstream istioctl's columns, filters and
//! output formats.
//!
//! Three parts, so that a Kubernetes resolver (port-forward to the ztunnel
//! pod of a node or by pod name) can be added without touching the rest:
//!
//! - [`Target`] and [`fetch`]: where the dump comes from (an admin URL or a
//!   file today; a pod is one more variant);
//! - [`ConfigDump::parse`]: the dump decoded, each item checked for the
//!   fields the views need (an error names the field, e.g.
//!   `workloads[2].uid`), each item's JSON kept as served for `-o json|yaml`;
//! - [`render`]: one [`View`] of the dump as a table, JSON or YAML.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use crate::admin_http::{self, Unreachable};

/// How long fetching the dump may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest dump accepted (a ztunnel of a large cluster serves a few MB).
pub const MAX_DUMP_BYTES: usize = 256 * 1024 * 1024;

/// Where the config dump comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A ztunnel's admin endpoint, `http://HOST:PORT` (it serves
    /// `/config_dump` there).
    Admin(AdminUrl),
    /// A saved `/config_dump` (`-` is standard input), as upstream's `--file`.
    File(PathBuf),
    /// A ztunnel pod's admin port, through a port-forward.
    Pod(crate::pods::Forwarded),
}

impl Target {
    /// Where the dump came from, for errors about its content.
    pub fn describe(&self) -> String {
        match self {
            Target::Admin(admin) => admin.endpoint("/config_dump"),
            Target::File(path) => path.display().to_string(),
            Target::Pod(forwarded) => format!("/config_dump of ztunnel {}", forwarded.pod),
        }
    }
}

pub use crate::admin_http::AdminUrl;

impl std::str::FromStr for AdminUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        AdminUrl::parse(text, "ztunnel's admin port is 15000")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "cannot reach the ztunnel admin endpoint at {url}: {reason}. Check the address and port \
         (a ztunnel's admin port is 15000; `cargo xtask demo --keep` prints each node's), that the \
         ztunnel is running, and that you run this where that address is reachable (ztunnel's admin \
         port listens on loopback only)"
    )]
    Unreachable { url: String, reason: String },
    #[error(transparent)]
    Pod(#[from] crate::pods::ForwardError),
    #[error(
        "{url} answered {status}: is {admin} a ztunnel admin endpoint (ztunnel-rs serves /config_dump on port 15000)?"
    )]
    Status {
        url: String,
        admin: String,
        status: String,
    },
    #[error("reading the config dump {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The dump's bytes.
pub async fn fetch(target: &Target) -> Result<Vec<u8>, FetchError> {
    match target {
        Target::Admin(admin) => fetch_admin(admin).await,
        Target::Pod(forwarded) => {
            let pod = &forwarded.pod;
            let (status, body) = forwarded
                .get("ztunnel", "/config_dump", MAX_DUMP_BYTES, FETCH_TIMEOUT)
                .await?;
            if !status.starts_with("200") {
                return Err(FetchError::Status {
                    url: format!("/config_dump of {pod}"),
                    admin: pod.to_string(),
                    status,
                });
            }
            Ok(body)
        }
        Target::File(path) => {
            let result = admin_http::read_saved(path).await;
            result.map_err(|source| FetchError::File {
                path: path.display().to_string(),
                source,
            })
        }
    }
}

async fn fetch_admin(admin: &AdminUrl) -> Result<Vec<u8>, FetchError> {
    let (status, body) = admin_http::get(admin, "/config_dump", MAX_DUMP_BYTES, FETCH_TIMEOUT)
        .await
        .map_err(|Unreachable(reason)| FetchError::Unreachable {
            url: admin.url.clone(),
            reason,
        })?;
    if !status.starts_with("200") {
        return Err(FetchError::Status {
            url: admin.endpoint("/config_dump"),
            admin: admin.url.clone(),
            status,
        });
    }
    Ok(body)
}

/// A dump that is not what a ztunnel serves.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("the config dump is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the config dump is not a JSON object (a ztunnel's /config_dump is one)")]
    NotObject,
    #[error("the config dump's `{field}` is neither a list nor a map")]
    NotList { field: &'static str },
    #[error("the config dump's `{path}` is not what a ztunnel serves: {message}")]
    Field { path: String, message: String },
}

/// One item of a section: what the views read, and the JSON as served.
#[derive(Clone, Debug)]
pub struct Item<T> {
    pub view: T,
    pub json: Value,
}

/// The parts of a workload the views read (upstream ztunnel's field names).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub workload_ips: Vec<String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub waypoint: Option<Waypoint>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Waypoint {
    /// `network/ip` or `namespace/hostname`.
    pub destination: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `network/ip` each.
    #[serde(default)]
    pub vips: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<Waypoint>,
    /// By workload uid.
    #[serde(default)]
    pub endpoints: std::collections::BTreeMap<String, Endpoint>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub scope: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificates {
    pub identity: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub cert_chain: Vec<Cert>,
    #[serde(default)]
    pub root_certs: Vec<Cert>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cert {
    #[serde(default)]
    pub serial_number: String,
    #[serde(default)]
    pub valid_from: String,
    #[serde(default)]
    pub expiration_time: String,
}

pub use api::workload_state::{Connection, WorkloadState};

/// A ztunnel's `/config_dump`, decoded.
#[derive(Clone, Debug)]
pub struct ConfigDump {
    pub workloads: Vec<Item<Workload>>,
    pub services: Vec<Item<Service>>,
    pub policies: Vec<Item<Policy>>,
    pub certificates: Vec<Item<Certificates>>,
    /// `workloadState`: each proxied pod and its live connections.
    pub workload_states: Vec<Item<WorkloadState>>,
    /// The whole dump as served.
    pub json: Value,
}

impl ConfigDump {
    /// Each section may be a list or a map (upstream accepts both); a
    /// missing section is empty.
    pub fn parse(bytes: &[u8]) -> Result<ConfigDump, DumpError> {
        let json: Value = serde_json::from_slice(bytes).map_err(DumpError::NotJson)?;
        let object = json.as_object().ok_or(DumpError::NotObject)?;
        Ok(ConfigDump {
            workloads: section(object, "workloads")?,
            services: section(object, "services")?,
            policies: section(object, "policies")?,
            certificates: section(object, "certificates")?,
            // Upstream istioctl reads the key without regard to case.
            workload_states: match object.contains_key(api::workload_state::KEY) {
                true => section(object, api::workload_state::KEY)?,
                false => section(object, "workloadstate")?,
            },
            json,
        })
    }
}

fn section<T: serde::de::DeserializeOwned>(
    object: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Vec<Item<T>>, DumpError> {
    let items: Vec<(String, &Value)> = match object.get(field) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{field}[{i}]"), v))
            .collect(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (format!("{field}[{k:?}]"), v))
            .collect(),
        Some(_) => return Err(DumpError::NotList { field }),
    };
    items
        .into_iter()
        .map(|(at, json)| {
            let view = serde_path_to_error::deserialize(json).map_err(|e| {
                let inner = e.path().to_string();
                let path = if inner == "." {
                    at.clone()
                } else {
                    format!("{at}.{inner}")
                };
                DumpError::Field {
                    path,
                    message: e.into_inner().to_string(),
                }
            })?;
            Ok(Item {
                view,
                json: json.clone(),
            })
        })
        .collect()
}

/// `-o`: upstream's `short` (a table), `json` or `yaml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Short,
    Json,
    Yaml,
}

/// Upstream's workload filters (`--address`, `--workload-namespace`,
/// `--workload-node`); empty means any. Namespace and node compare without
/// case, as upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadFilter {
    pub address: Option<String>,
    pub namespace: Option<String>,
    pub node: Option<String>,
}

impl WorkloadFilter {
    pub fn accepts(&self, w: &Workload) -> bool {
        let same = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|want| want.eq_ignore_ascii_case(have))
        };
        same(&self.namespace, &w.namespace)
            && same(&self.node, &w.node)
            && self.address.as_deref().is_none_or(|want| {
                w.workload_ips
                    .iter()
                    .any(|ip| ip.eq_ignore_ascii_case(want))
            })
    }
}

/// What to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    Workload(WorkloadFilter),
    /// `--service-namespace`.
    Service {
        namespace: Option<String>,
    },
    /// `--policy-namespace`.
    Policy {
        namespace: Option<String>,
    },
    Certificate,
    Connections(ConnectionsFilter),
    All,
}

/// Upstream's connection filters: `--workload-namespace`, `--direction`,
/// and `--raw` (addresses instead of the names the dump gives them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionsFilter {
    pub namespace: Option<String>,
    pub direction: Option<Direction>,
    pub raw: bool,
}

/// `--direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    Inbound,
    Outbound,
}

fn same_namespace(filter: &Option<String>, namespace: &str) -> bool {
    filter
        .as_deref()
        .is_none_or(|want| want.eq_ignore_ascii_case(namespace))
}

/// The view as text; `now` decides the certificates' VALID CERT column.
pub fn render(
    dump: &ConfigDump,
    view: &View,
    output: Output,
    now: SystemTime,
) -> anyhow::Result<String> {
    let items: Vec<&Value> = match view {
        View::Workload(filter) => sorted_workloads(dump, filter)
            .into_iter()
            .map(|w| &w.json)
            .collect(),
        View::Service { namespace } => sorted_services(dump, namespace)
            .into_iter()
            .map(|s| &s.json)
            .collect(),
        View::Policy { namespace } => sorted_policies(dump, namespace)
            .into_iter()
            .map(|p| &p.json)
            .collect(),
        View::Certificate => dump.certificates.iter().map(|c| &c.json).collect(),
        // As upstream, -o json|yaml filters by namespace only.
        View::Connections(filter) => sorted_workload_states(dump, &filter.namespace)
            .into_iter()
            .map(|w| &w.json)
            .collect(),
        View::All => {
            return match output {
                Output::Short => Ok(all_table(dump, now)),
                Output::Json => Ok(serde_json::to_string_pretty(&dump.json)? + "\n"),
                Output::Yaml => Ok(serde_saphyr::to_string(&dump.json)?),
            };
        }
    };
    match output {
        Output::Json => Ok(serde_json::to_string_pretty(&items)? + "\n"),
        Output::Yaml => Ok(serde_saphyr::to_string(&items)?),
        Output::Short => Ok(match view {
            View::Workload(filter) => workload_table(dump, filter),
            View::Service { namespace } => service_table(dump, namespace),
            View::Policy { namespace } => policy_table(dump, namespace),
            View::Certificate => certificate_table(dump, now),
            View::Connections(filter) => connections_table(dump, filter),
            View::All => unreachable!("returned above"),
        }),
    }
}

/// The items `keep` accepts, sorted by `key` (upstream's order per view).
fn sorted<'a, T, K: Ord>(
    items: &'a [Item<T>],
    keep: impl Fn(&T) -> bool,
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a Item<T>> {
    let mut list: Vec<_> = items.iter().filter(|i| keep(&i.view)).collect();
    list.sort_by_key(|i| key(&i.view));
    list
}

/// By `namespace.name`, then node.
fn sorted_workloads<'a>(dump: &'a ConfigDump, filter: &WorkloadFilter) -> Vec<&'a Item<Workload>> {
    sorted(
        &dump.workloads,
        |w| filter.accepts(w),
        |w| (format!("{}.{}", w.namespace, w.name), &w.node),
    )
}

fn sorted_services<'a>(dump: &'a ConfigDump, namespace: &Option<String>) -> Vec<&'a Item<Service>> {
    sorted(
        &dump.services,
        |s| same_namespace(namespace, &s.namespace),
        |s| (&s.namespace, &s.name, &s.hostname),
    )
}

/// By namespace, then name (upstream's order).
fn sorted_workload_states<'a>(
    dump: &'a ConfigDump,
    namespace: &Option<String>,
) -> Vec<&'a Item<WorkloadState>> {
    sorted(
        &dump.workload_states,
        |w| same_namespace(namespace, &w.info.namespace),
        |w| (&w.info.namespace, &w.info.name),
    )
}

fn sorted_policies<'a>(dump: &'a ConfigDump, namespace: &Option<String>) -> Vec<&'a Item<Policy>> {
    sorted(
        &dump.policies,
        |p| same_namespace(namespace, &p.namespace),
        |p| (&p.namespace, &p.name),
    )
}

/// The name of the service a waypoint address points at: `None` without a
/// waypoint, `NA` when no service of the dump matches.
pub(crate) fn waypoint_name(waypoint: &Option<Waypoint>, dump: &ConfigDump) -> String {
    let Some(waypoint) = waypoint else {
        return "None".into();
    };
    dump.services
        .iter()
        .map(|s| &s.view)
        .find(|s| {
            format!("{}/{}", s.namespace, s.hostname) == waypoint.destination
                || s.vips.contains(&waypoint.destination)
        })
        .map_or_else(|| "NA".into(), |s| s.name.clone())
}

fn workload_table(dump: &ConfigDump, filter: &WorkloadFilter) -> String {
    let mut rows = vec![row(&[
        "NAMESPACE",
        "POD NAME",
        "ADDRESS",
        "NODE",
        "WAYPOINT",
        "PROTOCOL",
    ])];
    for w in sorted_workloads(dump, filter) {
        let w = &w.view;
        let address = if w.workload_ips.is_empty() {
            w.hostname.clone()
        } else {
            w.workload_ips.join(",")
        };
        rows.push(vec![
            w.namespace.clone(),
            w.name.clone(),
            address,
            w.node.clone(),
            waypoint_name(&w.waypoint, dump),
            w.protocol.clone(),
        ]);
    }
    table(&rows, 1)
}

fn service_table(dump: &ConfigDump, namespace: &Option<String>) -> String {
    let healthy: std::collections::BTreeSet<&str> = dump
        .workloads
        .iter()
        .filter(|w| w.view.status == "Healthy")
        .map(|w| w.view.uid.as_str())
        .collect();
    let mut rows = vec![row(&[
        "NAMESPACE",
        "SERVICE NAME",
        "SERVICE VIP",
        "WAYPOINT",
        "ENDPOINTS",
    ])];
    for s in sorted_services(dump, namespace) {
        let s = &s.view;
        let vips: Vec<&str> = s
            .vips
            .iter()
            .map(|v| v.split_once('/').map_or(v.as_str(), |(_, ip)| ip))
            .collect();
        let up = s
            .endpoints
            .values()
            .filter(|e| healthy.contains(e.workload_uid.as_str()))
            .count();
        rows.push(vec![
            s.namespace.clone(),
            s.name.clone(),
            vips.join(","),
            waypoint_name(&s.waypoint, dump),
            format!("{up}/{}", s.endpoints.len()),
        ]);
    }
    table(&rows, 1)
}

fn policy_table(dump: &ConfigDump, namespace: &Option<String>) -> String {
    let mut rows = vec![row(&["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"])];
    for p in sorted_policies(dump, namespace) {
        let p = &p.view;
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            p.action.clone(),
            p.scope.clone(),
        ]);
    }
    table(&rows, 1)
}

fn certificate_table(dump: &ConfigDump, now: SystemTime) -> String {
    let mut rows = vec![row(&[
        "CERTIFICATE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ])];
    let na = |s: &str| {
        if s.is_empty() {
            "NA".into()
        } else {
            s.to_string()
        }
    };
    for c in &dump.certificates {
        let c = &c.view;
        let state = if c.state.contains("Unavailable") {
            "Unavailable".to_string()
        } else {
            c.state.clone()
        };
        if c.cert_chain.is_empty() {
            rows.push(vec![
                c.identity.clone(),
                "NA".into(),
                state,
                "false".into(),
                "NA".into(),
                "NA".into(),
                "NA".into(),
            ]);
            continue;
        }
        // Older dumps put the root at the end of the chain.
        let legacy = c.root_certs.is_empty();
        let last = c.cert_chain.len() - 1;
        let chain = c.cert_chain.iter().enumerate().map(|(i, cert)| {
            let kind = match i {
                0 => "Leaf",
                i if i == last && legacy => "Root",
                _ => "Intermediate",
            };
            (kind, cert)
        });
        let roots = c.root_certs.iter().map(|cert| ("Root", cert));
        for (kind, cert) in chain.chain(roots) {
            rows.push(vec![
                c.identity.clone(),
                kind.into(),
                state.clone(),
                valid_at(cert, now).to_string(),
                serial_hex(&cert.serial_number),
                na(&cert.expiration_time),
                na(&cert.valid_from),
            ]);
        }
    }
    table(&rows, 5)
}

/// Upstream's connection table (WORKLOAD, DIRECTION, LOCAL, REMOTE, REMOTE
/// TARGET, PROTOCOL: `PrintConnectionsSummary`), then ours: the identities
/// mutual TLS proved, the bytes the pod sent and received, and how long the
/// connection has been open. Per pod, inbound then outbound, as served.
fn connections_table(dump: &ConfigDump, filter: &ConnectionsFilter) -> String {
    let names = AddressNames::of(dump);
    let name = |addr: &str| {
        if filter.raw {
            addr.to_string()
        } else {
            names.name(addr)
        }
    };
    let mut rows = vec![row(&[
        "WORKLOAD",
        "DIRECTION",
        "LOCAL",
        "REMOTE",
        "REMOTE TARGET",
        "PROTOCOL",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "SENT",
        "RECEIVED",
        "DURATION",
    ])];
    let ours = |c: &Connection| {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        [
            or_dash(c.src_identity.clone()),
            or_dash(c.dst_identity.clone()),
            or_dash(c.bytes_sent.map(|b| b.to_string())),
            or_dash(c.bytes_received.map(|b| b.to_string())),
            or_dash(c.duration_ms.map(duration)),
        ]
    };
    let shows = |d: Direction| filter.direction.is_none_or(|want| want == d);
    for w in sorted_workload_states(dump, &filter.namespace) {
        let w = &w.view;
        let workload = format!("{}.{}", w.info.name, w.info.namespace);
        let mut push = |direction: &str, local, remote, target, c: &Connection| {
            let mut cells = vec![
                workload.clone(),
                direction.to_string(),
                local,
                remote,
                target,
                c.protocol.clone(),
            ];
            cells.extend(ours(c));
            rows.push(cells);
        };
        if shows(Direction::Inbound) {
            for c in &w.connections.inbound {
                // Inbound, the target is a service hostname: shown as served.
                let target = c.original_dst.clone().unwrap_or_default();
                push("Inbound", name(&c.actual_dst), name(&c.src), target, c);
            }
        }
        if shows(Direction::Outbound) {
            for c in &w.connections.outbound {
                let target = c.original_dst.as_deref().map(name).unwrap_or_default();
                push("Outbound", name(&c.src), name(&c.actual_dst), target, c);
            }
        }
    }
    table(&rows, 1)
}

/// Addresses as the dump names them: a service VIP as the service's
/// hostname, a workload's address as `name.namespace` (upstream's lookup,
/// services first), each keeping the port.
struct AddressNames {
    by_ip: std::collections::HashMap<String, String>,
}

impl AddressNames {
    fn of(dump: &ConfigDump) -> Self {
        let mut by_ip = std::collections::HashMap::new();
        for w in &dump.workloads {
            for ip in &w.view.workload_ips {
                by_ip.insert(ip.clone(), format!("{}.{}", w.view.name, w.view.namespace));
            }
        }
        for s in &dump.services {
            for vip in &s.view.vips {
                let ip = vip.split_once('/').map_or(vip.as_str(), |(_, ip)| ip);
                by_ip.insert(ip.to_string(), s.view.hostname.clone());
            }
        }
        AddressNames { by_ip }
    }

    fn name(&self, addr: &str) -> String {
        let Ok(socket) = addr.parse::<std::net::SocketAddr>() else {
            return addr.to_string();
        };
        match self.by_ip.get(&socket.ip().to_string()) {
            Some(name) => format!("{name}:{}", socket.port()),
            None => addr.to_string(),
        }
    }
}

/// Whole seconds as Go prints a duration (`0s`, `42s`, `3m4s`, `1h2m3s`).
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Upstream's `all`: each table after an empty line, connections last.
fn all_table(dump: &ConfigDump, now: SystemTime) -> String {
    let mut text = String::new();
    for part in [
        workload_table(dump, &WorkloadFilter::default()),
        service_table(dump, &None),
        policy_table(dump, &None),
        certificate_table(dump, now),
        connections_table(dump, &ConnectionsFilter::default()),
    ] {
        text.push('\n');
        text.push_str(&part);
    }
    text
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Columns as wide as their widest cell plus `padding` spaces; the last
/// column unpadded (Go's tabwriter with padding, as upstream prints).
pub fn table(rows: &[Vec<String>], padding: usize) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}", width = widths[i] + padding);
            }
        }
        out.push('\n');
    }
    out
}

/// Whether `now` is inside the certificate's validity; false when a time
/// is missing or not RFC 3339 UTC.
pub(crate) fn valid_at(cert: &Cert, now: SystemTime) -> bool {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match (
        unix_seconds(&cert.valid_from),
        unix_seconds(&cert.expiration_time),
    ) {
        // `now` is truncated to seconds: a certificate issued this second is
        // valid (upstream compares with sub-second precision).
        (Some(from), Some(to)) => from <= now && now < to,
        _ => false,
    }
}

/// `2024-05-01T12:00:00Z` as seconds since the epoch.
pub(crate) fn unix_seconds(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let n = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// A serial number as upstream prints it: lowercase hex without leading
/// zeros. Upstream ztunnel dumps it in decimal; ztunnel-rs dumps hex bytes
/// separated by `:`; both are accepted.
pub(crate) fn serial_hex(serial: &str) -> String {
    let hex = if serial.contains(':') {
        serial.replace(':', "").to_ascii_lowercase()
    } else if !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()) {
        decimal_to_hex(serial)
    } else {
        return if serial.is_empty() {
            "NA".into()
        } else {
            serial.to_ascii_lowercase()
        };
    };
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.to_string()
    }
}

/// Any length of decimal digits to hex, by repeated division.
fn decimal_to_hex(decimal: &str) -> String {
    let mut digits: Vec<u32> = decimal.bytes().map(|b| u32::from(b - b'0')).collect();
    let mut hex = Vec::new();
    while digits.iter().any(|d| *d != 0) {
        let mut rest = 0;
        let mut next = Vec::with_capacity(digits.len());
        for d in digits {
            let value = rest * 10 + d;
            next.push(value / 16);
            rest = value % 16;
        }
        hex.push(char::from_digit(rest, 16).unwrap_or('0'));
        digits = next;
    }
    if hex.is_empty() {
        return "0".into();
    }
    hex.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_print_as_hex() {
        assert_eq!(serial_hex("255"), "ff");
        assert_eq!(
            serial_hex("305215196546225040126410893325536089619"),
            "e59e4f03c12f2a5bc6469a34f2605613"
        );
        assert_eq!(serial_hex("00:0a:FF"), "aff");
        assert_eq!(serial_hex(""), "NA");
    }

    #[test]
    fn rfc3339_times_and_validity() {
        assert_eq!(unix_seconds("2024-05-01T12:00:00Z"), Some(1_714_564_800));
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_seconds("2024-05-01 12:00:00"), None);
        let cert = Cert {
            serial_number: String::new(),
            valid_from: "2024-05-01T12:00:00Z".into(),
            expiration_time: "2024-05-02T12:00:00Z".into(),
        };
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(valid_at(&cert, at(1_714_564_800 + 60)));
        assert!(valid_at(&cert, at(1_714_564_800)), "issued this second");
        assert!(!valid_at(&cert, at(1_714_564_800 - 60)));
        assert!(!valid_at(&cert, at(1_714_564_800 + 86_400 + 60)));
    }

    #[test]
    fn durations_print_as_go_does_in_whole_seconds() {
        assert_eq!(duration(999), "0s");
        assert_eq!(duration(42_500), "42s");
        assert_eq!(duration(184_000), "3m4s");
        assert_eq!(duration(3_723_000), "1h2m3s");
    }

    #[test]
    fn tables_pad_all_but_the_last_column() {
        let rows = vec![row(&["A", "BB", "C"]), row(&["aaa", "b", "c"])];
        assert_eq!(table(&rows, 1), "A   BB C\naaa b  c\n");
    }
}
