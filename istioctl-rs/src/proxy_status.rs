//! `proxy-status`: every proxy connected to istiod-rs (ztunnels and
//! waypoints), the resource types each holds, its ACK/NACK state per type
//! and whether it holds istiod-rs's current snapshot, read from istiod-rs's
//! `/debug/syncz` (monitoring port 15014) or a saved copy of it.
//!
//! The table follows upstream istioctl's `proxy-status`
//! (`istioctl/pkg/writer/pilot/status.go`, `XdsStatusWriter.PrintAll`,
//! `setupStatusPrint`, `formatStatus`): NAME, then one column per resource
//! type seen (short names from upstream's `GetShortType`: `WDS`, `WADS`),
//! core types first, the rest sorted by type URL, `IGNORED` where a proxy
//! does not have the type; rows sorted by proxy. Status words are istiod-rs's
//! (SYNCED, NOT SENT, STALE, the words upstream prints), with upstream's
//! earlier `STALE (Never Acknowledged)` (`xdsStatus`), and ` (NACK)` when the
//! proxy rejected the newest response of that type (istio-rs's own marker:
//! the upstream table has none). Not reproduced: CLUSTER, ISTIOD, VERSION
//! (syncz does not carry them) and the age upstream appends to a status.
//!
//! Three parts, as `ztunnel-config`: [`Source`] and [`fetch`] (where the
//! JSON comes from), [`parse`] (decoded, an error names the field),
//! [`render`] (table, detail view, JSON or YAML).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

pub use api::syncz::{
    NackReport, ProxySync, ResponseReport, SyncState, Syncz, TypeSync, WaypointSync,
};
use serde::{Deserialize, Serialize};

use crate::admin_http::{self, AdminUrl, Unreachable};
use crate::ztunnel_config::{Output, table};

/// How long fetching `/debug/syncz` may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer accepted (a few KB per proxy).
pub const MAX_SYNCZ_BYTES: usize = 64 * 1024 * 1024;

/// `--istiod URL`: istiod-rs's monitoring endpoint.
pub fn parse_istiod_url(text: &str) -> Result<AdminUrl, String> {
    AdminUrl::parse(text, "istiod-rs's monitoring port is 15014")
}

/// Where `/debug/syncz` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// istiod-rs's monitoring endpoint, `http://HOST:15014`.
    Istiod(AdminUrl),
    /// A saved `/debug/syncz` answer (`-` is standard input).
    File(PathBuf),
    /// An istiod pod's monitoring port, through a port-forward.
    Pod(crate::pods::Forwarded),
}

impl Source {
    /// `--istiod` or `-f`; neither: istiod on Kubernetes (the caller finds
    /// it, [`crate::pods::istiod`]).
    pub fn from_args(istiod: Option<AdminUrl>, file: Option<PathBuf>) -> Option<Source> {
        match (istiod, file) {
            (_, Some(file)) => Some(Source::File(file)),
            (Some(url), None) => Some(Source::Istiod(url)),
            (None, None) => None,
        }
    }

    /// For messages: the URL or the file.
    pub fn origin(&self) -> String {
        match self {
            Source::Istiod(url) => url.endpoint("/debug/syncz"),
            Source::File(path) => path.display().to_string(),
            Source::Pod(forwarded) => format!("/debug/syncz of istiod {}", forwarded.pod),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "cannot reach istiod-rs at {url}: {reason}. Check the address and port (istiod-rs serves \
         /debug/syncz on its monitoring port, 15014) and that istiod-rs is running; on Kubernetes \
         leave out --istiod and istioctl-rs port-forwards to an istiod pod itself"
    )]
    Unreachable { url: String, reason: String },
    #[error(transparent)]
    Pod(#[from] crate::pods::ForwardError),
    #[error("{url} answered {status}{detail}: is it istiod-rs's monitoring port (15014)?")]
    Status {
        url: String,
        status: String,
        /// istiod-rs's own `{"error": ...}` text, when it sent one.
        detail: String,
    },
    #[error("reading the saved /debug/syncz {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The body of a 200 answer; any other status is an error naming `url`
/// (with istiod-rs's own `{"error": ...}` text when it sent one).
fn check_status(
    body: Vec<u8>,
    status: String,
    url: impl FnOnce() -> String,
) -> Result<Vec<u8>, FetchError> {
    if status.starts_with("200") {
        return Ok(body);
    }
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .map_or_else(String::new, |e| format!(" ({e})"));
    Err(FetchError::Status {
        url: url(),
        status,
        detail,
    })
}

/// The answer's bytes.
pub async fn fetch(source: &Source) -> Result<Vec<u8>, FetchError> {
    match source {
        Source::Pod(forwarded) => {
            let pod = &forwarded.pod;
            let (status, body) = forwarded
                .get("istiod", "/debug/syncz", MAX_SYNCZ_BYTES, FETCH_TIMEOUT)
                .await?;
            check_status(body, status, || format!("/debug/syncz of {pod}"))
        }
        Source::Istiod(url) => {
            let (status, body) =
                admin_http::get(url, "/debug/syncz", MAX_SYNCZ_BYTES, FETCH_TIMEOUT)
                    .await
                    .map_err(|Unreachable(reason)| FetchError::Unreachable {
                        url: url.url.clone(),
                        reason,
                    })?;
            check_status(body, status, || url.endpoint("/debug/syncz"))
        }
        Source::File(path) => {
            let result = admin_http::read_saved(path).await;
            result.map_err(|source| FetchError::File {
                path: path.display().to_string(),
                source,
            })
        }
    }
}

/// An answer that is not istiod-rs's `/debug/syncz`.
#[derive(Debug, thiserror::Error)]
pub enum SynczError {
    #[error("{origin} is not JSON: {message}")]
    NotJson { origin: String, message: String },
    #[error("{origin} is not istiod-rs's /debug/syncz: field `{path}`: {message}")]
    Field {
        origin: String,
        path: String,
        message: String,
    },
}

/// Decodes `/debug/syncz`; `origin` (the URL or file) names where a bad
/// answer came from.
pub fn parse(bytes: &[u8], origin: &str) -> Result<Syncz, SynczError> {
    let json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| SynczError::NotJson {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
    serde_path_to_error::deserialize(json).map_err(|e| SynczError::Field {
        origin: origin.to_string(),
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// The proxy rejected the newest response of this type and does not hold
/// what istiod-rs serves: a NACK newer than its last ACK.
pub fn nacked(t: &TypeSync) -> bool {
    t.status != SyncState::Synced
        && t.last_nack.as_ref().is_some_and(|nack| {
            t.acked
                .as_ref()
                .is_none_or(|acked| nack.at.as_str() >= acked.at.as_str())
        })
}

/// The table's cell of one type.
pub fn cell(t: &TypeSync) -> String {
    if nacked(t) {
        format!("{} (NACK)", t.status.word())
    } else if t.status == SyncState::Stale && t.acked.is_none() {
        "STALE (Never Acknowledged)".to_string()
    } else {
        t.status.word().to_string()
    }
}

/// Upstream's short names (`pilot/pkg/xds/v3/model.go`, `GetShortType`)
/// for the types it has; istio-rs's own L7 types by their message name
/// (upstream would print the whole type URL).
pub fn short_type(type_url: &str) -> String {
    let name = type_url.rsplit_once('/').map_or(type_url, |(_, n)| n);
    match name {
        "envoy.config.cluster.v3.Cluster" => "CDS",
        "envoy.config.listener.v3.Listener" => "LDS",
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => "EDS",
        "envoy.config.route.v3.RouteConfiguration" => "RDS",
        "envoy.config.core.v3.TypedExtensionConfig" => "ECDS",
        "envoy.extensions.transport_sockets.tls.v3.Secret" => "SDS",
        "istio.workload.Address" | "istio.workload.Workload" => "WDS",
        "istio.security.Authorization" => "WADS",
        other => return other.rsplit_once('.').map_or(other, |(_, m)| m).to_string(),
    }
    .to_string()
}

/// The order of type columns: upstream's core types first, the rest by URL.
fn column_order(type_url: &str) -> (usize, &str) {
    const CORE: [&str; 4] = [
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    ];
    let rank = CORE
        .iter()
        .position(|c| *c == type_url)
        .unwrap_or(CORE.len());
    (rank, type_url)
}

/// What a node id says: `<kind>~<ip>~<pod>.<namespace>~<domain>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyName {
    /// `<pod>.<namespace>` (upstream's NAME), else the whole node id.
    pub name: String,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// `ztunnel`, `waypoint`, ... (the node id's first part).
    pub kind: Option<String>,
}

impl ProxyName {
    pub fn of(node_id: &str) -> ProxyName {
        let parts: Vec<&str> = node_id.split('~').collect();
        match parts.as_slice() {
            [kind, _ip, name, domain] => {
                let namespace = domain.split('.').next().filter(|ns| !ns.is_empty());
                let pod = namespace
                    .and_then(|ns| name.strip_suffix(&format!(".{ns}")))
                    .map(str::to_string);
                ProxyName {
                    name: name.to_string(),
                    pod,
                    namespace: namespace.map(str::to_string),
                    kind: Some(kind.to_string()),
                }
            }
            _ => ProxyName {
                name: node_id.to_string(),
                pod: None,
                namespace: None,
                kind: None,
            },
        }
    }

    /// `NAME` given by the user: the pod (with -n, or in any namespace),
    /// `pod.namespace`, or the whole node id.
    fn is(&self, wanted: &str, node_id: &str) -> bool {
        wanted == self.name || wanted == node_id || self.pod.as_deref() == Some(wanted)
    }
}

/// Which proxies to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// One proxy, shown in detail.
    pub name: Option<String>,
    /// `-n`: only proxies of this namespace.
    pub namespace: Option<String>,
}

/// `-o json|yaml`: the proxies shown, each with what the table derives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Where the answer came from (URL or file).
    pub istiod: String,
    pub snapshot_version: String,
    pub proxies: Vec<ProxyReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// `<pod>.<namespace>`.
    pub name: String,
    pub namespace: Option<String>,
    pub kind: Option<String>,
    /// No type is STALE: it holds istiod-rs's current snapshot (a
    /// waypoint: its scope of it).
    pub in_sync: bool,
    #[serde(flatten)]
    pub sync: ProxySync,
    /// The types whose newest response the proxy rejected.
    pub nacked: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("no proxy {wanted} is connected to istiod-rs ({origin}); connected: {connected}")]
    NoSuchProxy {
        wanted: String,
        origin: String,
        connected: String,
    },
    #[error("no proxy{namespace} is connected to istiod-rs ({origin})")]
    NoProxy { namespace: String, origin: String },
    #[error("encoding the report: {0}")]
    Encode(String),
}

fn in_sync(proxy: &ProxySync) -> bool {
    proxy.types.iter().all(|t| t.status != SyncState::Stale)
}

/// The proxies `query` selects, sorted by name then node id.
pub fn select<'a>(syncz: &'a Syncz, query: &Query) -> Vec<(ProxyName, &'a ProxySync)> {
    let mut proxies: Vec<(ProxyName, &ProxySync)> = syncz
        .proxies
        .iter()
        .map(|p| (ProxyName::of(&p.proxy), p))
        .filter(|(name, _)| {
            query
                .namespace
                .as_deref()
                .is_none_or(|ns| name.namespace.as_deref() == Some(ns))
        })
        .filter(|(name, p)| query.name.as_deref().is_none_or(|w| name.is(w, &p.proxy)))
        .collect();
    proxies.sort_by(|(a, p), (b, q)| a.name.cmp(&b.name).then(p.proxy.cmp(&q.proxy)));
    proxies
}

/// The report for `-o json|yaml`.
pub fn report(syncz: &Syncz, query: &Query, origin: &str) -> Report {
    Report {
        istiod: origin.to_string(),
        snapshot_version: syncz.snapshot_version.clone(),
        proxies: select(syncz, query)
            .into_iter()
            .map(|(name, p)| ProxyReport {
                name: name.name,
                namespace: name.namespace,
                kind: name.kind,
                in_sync: in_sync(p),
                nacked: p
                    .types
                    .iter()
                    .filter(|t| nacked(t))
                    .map(|t| t.type_url.clone())
                    .collect(),
                sync: p.clone(),
            })
            .collect(),
    }
}

/// The answer as text: the table (all proxies), the detail view (NAME),
/// or the report as JSON or YAML.
pub fn render(
    syncz: &Syncz,
    query: &Query,
    output: Output,
    origin: &str,
) -> Result<String, RenderError> {
    let selected = select(syncz, query);
    if selected.is_empty() {
        return Err(match &query.name {
            Some(wanted) => RenderError::NoSuchProxy {
                wanted: wanted.clone(),
                origin: origin.to_string(),
                connected: connected_names(syncz),
            },
            None => RenderError::NoProxy {
                namespace: query
                    .namespace
                    .as_ref()
                    .map_or_else(String::new, |ns| format!(" of namespace {ns}")),
                origin: origin.to_string(),
            },
        });
    }
    match output {
        Output::Json => serde_json::to_string_pretty(&report(syncz, query, origin))
            .map(|s| s + "\n")
            .map_err(|e| RenderError::Encode(e.to_string())),
        Output::Yaml => serde_saphyr::to_string(&report(syncz, query, origin))
            .map_err(|e| RenderError::Encode(e.to_string())),
        Output::Short if query.name.is_some() => Ok(selected
            .iter()
            .map(|(name, p)| detail(name, p, &syncz.snapshot_version))
            .collect::<Vec<_>>()
            .join("\n")),
        Output::Short => Ok(status_table(&selected)),
    }
}

fn connected_names(syncz: &Syncz) -> String {
    let names: BTreeSet<String> = syncz
        .proxies
        .iter()
        .map(|p| ProxyName::of(&p.proxy).name)
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.into_iter().collect::<Vec<_>>().join(", ")
    }
}

/// NAME, one column per type, IN SYNC.
fn status_table(proxies: &[(ProxyName, &ProxySync)]) -> String {
    let mut type_urls: Vec<&str> = proxies
        .iter()
        .flat_map(|(_, p)| p.types.iter().map(|t| t.type_url.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    type_urls.sort_by(|a, b| column_order(a).cmp(&column_order(b)));
    let mut header = vec!["NAME".to_string()];
    header.extend(type_urls.iter().map(|url| short_type(url)));
    header.push("IN SYNC".to_string());
    let mut rows = vec![header];
    for (name, proxy) in proxies {
        let mut row = vec![name.name.clone()];
        for url in &type_urls {
            row.push(
                proxy
                    .types
                    .iter()
                    .find(|t| t.type_url == *url)
                    .map_or_else(|| "IGNORED".to_string(), cell),
            );
        }
        row.push(if in_sync(proxy) { "yes" } else { "no" }.to_string());
        rows.push(row);
    }
    // Upstream's tabwriter pads with 5 spaces.
    table(&rows, 5)
}

/// One proxy: who it is, then every type with versions and nonces, then
/// its NACKs with their messages.
fn detail(name: &ProxyName, proxy: &ProxySync, snapshot_version: &str) -> String {
    let dash = |s: Option<&str>| s.unwrap_or("-").to_string();
    let mut fields = vec![
        vec!["NAME:".to_string(), name.name.clone()],
        vec!["NODE ID:".to_string(), proxy.proxy.clone()],
        vec!["IDENTITY:".to_string(), dash(proxy.identity.as_deref())],
        vec!["NODE:".to_string(), dash(proxy.node.as_deref())],
        vec!["PEER:".to_string(), dash(proxy.peer.as_deref())],
        vec!["CONNECTED:".to_string(), proxy.connected_since.clone()],
    ];
    if let Some(waypoint) = &proxy.waypoint {
        let scope = waypoint
            .scope
            .iter()
            .map(|(ty, n)| format!("{} {n}", short_type(ty)))
            .collect::<Vec<_>>()
            .join(", ");
        fields.push(vec![
            "WAYPOINT:".to_string(),
            format!("{} (scope: {scope})", waypoint.gateway),
        ]);
    }
    fields.push(vec![
        "SNAPSHOT:".to_string(),
        format!(
            "{snapshot_version} ({})",
            if in_sync(proxy) { "in sync" } else { "behind" }
        ),
    ]);
    let mut text = table(&fields, 1);
    text.push('\n');
    let mut rows = vec![
        [
            "TYPE",
            "STATUS",
            "HELD",
            "BEHIND",
            "SENT VERSION",
            "SENT NONCE",
            "ACKED VERSION",
            "ACKED NONCE",
            "IN FLIGHT",
        ]
        .map(str::to_string)
        .to_vec(),
    ];
    let mut types: Vec<&TypeSync> = proxy.types.iter().collect();
    types.sort_by(|a, b| column_order(&a.type_url).cmp(&column_order(&b.type_url)));
    for t in &types {
        let (sent_version, sent_nonce) = t
            .sent
            .as_ref()
            .map_or(("-", "-"), |s| (s.version.as_str(), s.nonce.as_str()));
        let (acked_version, acked_nonce) = t
            .acked
            .as_ref()
            .map_or(("-", "-"), |s| (s.version.as_str(), s.nonce.as_str()));
        rows.push(vec![
            short_type(&t.type_url),
            cell(t),
            t.resources_held.to_string(),
            t.resources_behind.to_string(),
            sent_version.to_string(),
            sent_nonce.to_string(),
            acked_version.to_string(),
            acked_nonce.to_string(),
            dash(t.nonce_in_flight.as_deref()),
        ]);
    }
    text.push_str(&table(&rows, 3));
    let nacks: Vec<&NackReport> = types.iter().filter_map(|t| t.last_nack.as_ref()).collect();
    if !nacks.is_empty() {
        text.push('\n');
        for nack in nacks {
            text.push_str(&format!(
                "NACK {} nonce {} at {}: {}\n",
                short_type(&nack.type_url),
                nack.nonce,
                nack.at,
                nack.message
            ));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNCZ: &str = include_str!("../tests/testdata/syncz.json");
    const ORIGIN: &str = "http://127.0.0.1:15014/debug/syncz";

    fn syncz() -> Syncz {
        parse(SYNCZ.as_bytes(), ORIGIN).unwrap()
    }

    fn all() -> Query {
        Query::default()
    }

    fn lines(text: &str) -> Vec<Vec<String>> {
        text.lines()
            .map(|l| {
                l.split("     ")
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn table_has_upstreams_columns_and_one_row_per_proxy() {
        let text = render(&syncz(), &all(), Output::Short, ORIGIN).unwrap();
        let rows = lines(&text);
        assert_eq!(
            rows[0],
            [
                "NAME",
                "WADS",
                "WDS",
                "HttpAuthorization",
                "RouteTable",
                "IN SYNC"
            ]
        );
        assert_eq!(rows.len(), 4, "{text}");
        // Sorted by name; each row as wide as the header.
        let names: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
        assert_eq!(
            names,
            [
                "waypoint-7d9f.bookinfo",
                "ztunnel-a.istio-system",
                "ztunnel-b.istio-system"
            ]
        );
        for row in &rows {
            assert_eq!(row.len(), rows[0].len(), "{text}");
        }
    }

    #[test]
    fn cells_say_synced_stale_nack_not_sent_and_ignored() {
        let text = render(&syncz(), &all(), Output::Short, ORIGIN).unwrap();
        let rows = lines(&text);
        // A waypoint: WADS not sent, an L7 type sent and never acknowledged.
        assert_eq!(
            rows[1][1..],
            [
                "NOT SENT",
                "SYNCED",
                "STALE (Never Acknowledged)",
                "SYNCED",
                "no"
            ]
        );
        // In sync, although WADS was last acked at an older generation:
        // istiod-rs had nothing new of that type for it.
        assert_eq!(
            rows[2][1..],
            ["SYNCED", "SYNCED", "IGNORED", "IGNORED", "yes"]
        );
        // Acked older than current (STALE), and a NACKed type.
        assert_eq!(
            rows[3][1..],
            ["STALE (NACK)", "STALE", "IGNORED", "IGNORED", "no"]
        );
    }

    #[test]
    fn namespace_and_name_select_proxies() {
        let s = syncz();
        let names =
            |q: Query| -> Vec<String> { select(&s, &q).into_iter().map(|(n, _)| n.name).collect() };
        assert_eq!(
            names(Query {
                namespace: Some("bookinfo".into()),
                ..all()
            }),
            ["waypoint-7d9f.bookinfo"]
        );
        assert_eq!(
            names(Query {
                name: Some("ztunnel-a".into()),
                ..all()
            }),
            ["ztunnel-a.istio-system"]
        );
        assert_eq!(
            names(Query {
                name: Some("ztunnel-a.istio-system".into()),
                ..all()
            }),
            ["ztunnel-a.istio-system"]
        );
        let err = render(
            &s,
            &Query {
                name: Some("productpage".into()),
                ..all()
            },
            Output::Short,
            ORIGIN,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no proxy productpage") && err.contains(ORIGIN),
            "{err}"
        );
        assert!(err.contains("ztunnel-a.istio-system"), "{err}");
        let err = render(
            &s,
            &Query {
                namespace: Some("other".into()),
                ..all()
            },
            Output::Short,
            ORIGIN,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("namespace other"), "{err}");
    }

    #[test]
    fn detail_shows_every_type_with_versions_nonces_and_nacks() {
        let query = Query {
            name: Some("ztunnel-b".into()),
            ..all()
        };
        let text = render(&syncz(), &query, Output::Short, ORIGIN).unwrap();
        assert!(text.contains("SNAPSHOT:  7 (behind)"), "{text}");
        let header = text.lines().find(|l| l.starts_with("TYPE")).unwrap();
        assert!(
            header.contains("SENT VERSION") && header.contains("ACKED NONCE"),
            "{text}"
        );
        let wds = text.lines().find(|l| l.starts_with("WDS")).unwrap();
        let cells: Vec<&str> = wds.split_whitespace().collect();
        assert_eq!(
            cells,
            ["WDS", "STALE", "10", "2", "7", "n9", "5", "n6", "n9"]
        );
        assert!(
            text.contains(
                "NACK WADS nonce n8 at 2026-12-07T03:10:00.200Z: policy bookinfo/deny-all"
            ),
            "{text}"
        );
        let waypoint = render(
            &syncz(),
            &Query {
                name: Some("waypoint-7d9f".into()),
                ..all()
            },
            Output::Short,
            ORIGIN,
        )
        .unwrap();
        assert!(
            waypoint.contains("bookinfo/waypoint (scope: WDS 4, RouteTable 1)"),
            "{waypoint}"
        );
    }

    #[test]
    fn json_round_trips_and_carries_the_nack_message() {
        let text = render(&syncz(), &all(), Output::Json, ORIGIN).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report(&syncz(), &all(), ORIGIN));
        assert_eq!(back.snapshot_version, "7");
        let b = back
            .proxies
            .iter()
            .find(|p| p.name == "ztunnel-b.istio-system")
            .unwrap();
        assert!(!b.in_sync);
        assert_eq!(
            b.nacked,
            ["type.googleapis.com/istio.security.Authorization"]
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let wads = &value["proxies"][2]["types"][0];
        assert_eq!(wads["status"], "STALE");
        assert!(
            wads["last_nack"]["message"]
                .as_str()
                .unwrap()
                .contains("unknown action"),
            "{wads}"
        );
        assert!(back.proxies.iter().any(|p| p.in_sync));
    }

    #[test]
    fn yaml_has_the_nack_message() {
        let text = render(&syncz(), &all(), Output::Yaml, ORIGIN).unwrap();
        assert!(text.contains("unknown action"), "{text}");
        assert!(text.contains("snapshot_version"), "{text}");
    }

    #[test]
    fn an_answer_that_is_not_syncz_names_the_url_and_field() {
        let err = parse(b"<html>", ORIGIN).unwrap_err().to_string();
        assert!(err.contains(ORIGIN) && err.contains("not JSON"), "{err}");
        let err = parse(br#"{"ready": true}"#, ORIGIN)
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot_version"), "{err}");
        let mut bad: serde_json::Value = serde_json::from_str(SYNCZ).unwrap();
        bad["proxies"][1]["types"][0]["status"] = "MAYBE".into();
        let err = parse(bad.to_string().as_bytes(), ORIGIN)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxies[1].types[0].status"), "{err}");
    }

    #[test]
    fn node_ids_give_name_pod_and_namespace() {
        let name =
            ProxyName::of("waypoint~10.0.1.5~waypoint-7d9f.bookinfo~bookinfo.svc.cluster.local");
        assert_eq!(name.name, "waypoint-7d9f.bookinfo");
        assert_eq!(name.pod.as_deref(), Some("waypoint-7d9f"));
        assert_eq!(name.namespace.as_deref(), Some("bookinfo"));
        assert_eq!(name.kind.as_deref(), Some("waypoint"));
        let other = ProxyName::of("test-proxy");
        assert_eq!(other.name, "test-proxy");
        assert_eq!(other.namespace, None);
    }

    #[test]
    fn short_types_as_upstream_and_l7_by_message() {
        assert_eq!(
            short_type("type.googleapis.com/istio.workload.Address"),
            "WDS"
        );
        assert_eq!(
            short_type("type.googleapis.com/istio.security.Authorization"),
            "WADS"
        );
        assert_eq!(
            short_type("type.googleapis.com/envoy.config.cluster.v3.Cluster"),
            "CDS"
        );
        assert_eq!(
            short_type("type.googleapis.com/istio_rs.l7.v1.RouteTable"),
            "RouteTable"
        );
        assert_eq!(short_type("istio.workload.Address"), "WDS");
    }
}
