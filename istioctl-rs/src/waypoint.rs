//! `istioctl-rs waypoint generate | apply | list | delete | status`: the
//! waypoint Gateways of a namespace (class `istio-waypoint`, one listener
//! `mesh` on 15008, HBONE), with upstream istioctl's flags, columns and
//! messages' meaning, plus what istiod-rs adds: per-ServiceAccount
//! waypoints (`--service-account`) and waypoints created on demand, which
//! `list` marks with the rules that need them and `delete` refuses to
//! delete (istiod-rs would recreate them) unless forced.

use std::io::Write;
use std::time::Duration;

use api::labels;
use kube::Client;
use kube::api::{ApiResource, GroupVersionKind};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::cluster::{self, ClusterError, Kind};
use crate::manifest::InstallKind;

/// The Gateway API's `Gateway`: the kind of waypoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayKind;

impl std::fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gateway")
    }
}

impl Kind for GatewayKind {
    fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
            self.plural(),
        )
    }
    fn namespaced(self) -> bool {
        true
    }
    fn plural(self) -> &'static str {
        "gateways"
    }
    fn resource(self) -> String {
        "gateways.gateway.networking.k8s.io".to_string()
    }
}

/// The waypoint's name when `--name` is not given (upstream's default).
pub const DEFAULT_NAME: &str = "waypoint";
/// How long `--wait` waits for `Programmed` (upstream's
/// `--waypoint-timeout` default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);
/// Upstream's revision label, shown in `list`'s REVISION column (istio-rs
/// has no revisions: a waypoint without it shows `default`, as upstream).
const REVISION: &str = "istio.io/rev";

/// `--for`: the traffic a waypoint accepts (label `istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrafficType {
    Service,
    Workload,
    All,
    None,
}

impl TrafficType {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficType::Service => "service",
            TrafficType::Workload => "workload",
            TrafficType::All => "all",
            TrafficType::None => "none",
        }
    }
}

/// What `generate` and `apply` make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    /// `None`: no `metadata.namespace` (generate without `-n`, as upstream).
    pub namespace: Option<String>,
    /// `None`: no label; istiod-rs then takes `service`.
    pub traffic_type: Option<TrafficType>,
    /// A per-ServiceAccount waypoint (annotation `istio.io/for-service-account`).
    pub service_account: Option<String>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            name: DEFAULT_NAME.to_string(),
            namespace: None,
            traffic_type: None,
            service_account: None,
        }
    }
}

/// Why a waypoint command failed.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error(
        "`none` cannot name a waypoint: `istio.io/use-waypoint: none` means \"no waypoint\"; choose another --name"
    )]
    ReservedName,
    #[error("namespace {0} not found")]
    NoNamespace(String),
    #[error(
        "Gateway {namespace}/{name} exists and was created on demand by istiod-rs, which deletes it when no rule needs it; give this waypoint another --name"
    )]
    NameTakenOnDemand { namespace: String, name: String },
    #[error(
        "waypoint {namespace}/{name} is not Programmed after {timeout:?} ({condition}); see `istioctl-rs waypoint status -n {namespace}` and istiod-rs's log"
    )]
    NotProgrammed {
        namespace: String,
        name: String,
        timeout: Duration,
        condition: String,
    },
    #[error(
        "{}; nothing was deleted",
        .0.iter().map(on_demand_refusal).collect::<Vec<_>>().join("; ")
    )]
    OnDemand(Vec<Waypoint>),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn on_demand_refusal(w: &Waypoint) -> String {
    let by = if w.needed_by.is_empty() {
        "no rule any more (istiod-rs deletes it itself)".to_string()
    } else {
        w.needed_by.join(", ")
    };
    format!(
        "waypoint {}/{} was created on demand by istiod-rs and is needed by {by}: istiod-rs recreates it as long as a rule needs it, so delete or change those rules instead (--force deletes it anyway)",
        w.namespace, w.name
    )
}

/// The waypoint Gateway of `spec`.
pub fn gateway(spec: &Spec) -> Result<Value, WaypointError> {
    let name = match spec.name.as_str() {
        "" => DEFAULT_NAME,
        "none" => return Err(WaypointError::ReservedName),
        name => name,
    };
    let mut metadata = Map::new();
    metadata.insert("name".into(), name.into());
    if let Some(ns) = &spec.namespace {
        metadata.insert("namespace".into(), ns.as_str().into());
    }
    if let Some(t) = spec.traffic_type {
        metadata.insert("labels".into(), json!({labels::WAYPOINT_FOR: t.as_str()}));
    }
    if let Some(sa) = &spec.service_account {
        metadata.insert(
            "annotations".into(),
            json!({labels::FOR_SERVICE_ACCOUNT: sa}),
        );
    }
    Ok(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": labels::WAYPOINT_GATEWAY_CLASS,
            "listeners": [{"name": "mesh", "port": api::ports::HBONE, "protocol": "HBONE"}],
        },
    }))
}

/// `generate`'s output.
pub fn to_yaml(object: &Value) -> String {
    serde_saphyr::to_string(object).expect("JSON values serialise as YAML")
}

/// A Gateway's `Programmed` condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// `True`, `False`, `Unknown`; `False` when the Gateway has none (as
    /// upstream's list shows it).
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Condition {
    fn of(object: &Value) -> Condition {
        let text = |c: &Value, key: &str| c[key].as_str().unwrap_or_default().to_string();
        object["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Programmed"))
            .map(|c| Condition {
                status: text(c, "status"),
                reason: text(c, "reason"),
                message: text(c, "message"),
            })
            .unwrap_or(Condition {
                status: "False".into(),
                reason: String::new(),
                message: String::new(),
            })
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Programmed {}", self.status)?;
        if !self.reason.is_empty() {
            write!(f, ", {}", self.reason)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// One waypoint, as `list` shows it (and prints it with `-o json|yaml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    /// Label `istio.io/rev`, else `default`.
    pub revision: String,
    /// Label `istio.io/waypoint-for`, else `service` (what istiod-rs takes).
    pub traffic_type: String,
    /// Annotation `istio.io/for-service-account`.
    pub service_account: Option<String>,
    pub programmed: Condition,
    /// Created by istiod-rs for L7 rules (label `istio-rs.io/on-demand-waypoint`).
    pub on_demand: bool,
    /// The rules that need it (annotation `istio-rs.io/needed-by`), `Kind namespace/name`.
    pub needed_by: Vec<String>,
}

impl Waypoint {
    /// The waypoint a Gateway is; `None` when it is not of class `istio-waypoint`.
    pub fn of(object: &Value) -> Option<Waypoint> {
        if object["spec"]["gatewayClassName"] != labels::WAYPOINT_GATEWAY_CLASS {
            return None;
        }
        let metadata = &object["metadata"];
        let text = |v: &Value| v.as_str().map(String::from);
        let label = |key: &str| text(&metadata["labels"][key]);
        let annotation = |key: &str| text(&metadata["annotations"][key]);
        Some(Waypoint {
            namespace: text(&metadata["namespace"]).unwrap_or_default(),
            name: text(&metadata["name"]).unwrap_or_default(),
            revision: label(REVISION).unwrap_or_else(|| "default".into()),
            // Unlabelled: what istiod-rs takes (index/waypoints.rs):
            // `all` for a per-ServiceAccount waypoint, else `service`.
            traffic_type: label(labels::WAYPOINT_FOR).unwrap_or_else(|| {
                let default = if annotation(labels::FOR_SERVICE_ACCOUNT).is_some() {
                    TrafficType::All
                } else {
                    TrafficType::Service
                };
                default.as_str().into()
            }),
            service_account: annotation(labels::FOR_SERVICE_ACCOUNT),
            programmed: Condition::of(object),
            on_demand: label(labels::ON_DEMAND_WAYPOINT).as_deref()
                == Some(labels::ON_DEMAND_WAYPOINT_VALUE),
            needed_by: annotation(labels::NEEDED_BY)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|r| !r.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// The waypoints of a namespace, or (`None`) of every namespace, by
/// namespace and name.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<Waypoint>, ClusterError> {
    let mut waypoints: Vec<Waypoint> = cluster::list(client, GatewayKind, namespace, "")
        .await?
        .into_iter()
        .filter_map(|o| Waypoint::of(&serde_json::to_value(o).expect("an object serialises")))
        .collect();
    waypoints.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(waypoints)
}

/// What upstream prints where there is none.
pub const NONE_FOUND: &str = "No waypoints found.\n";

/// `list`'s table: upstream's columns (NAMESPACE with `-A`, NAME,
/// REVISION, TRAFFIC TYPE, PROGRAMMED), then ON DEMAND and NEEDED BY.
pub fn list_table(waypoints: &[Waypoint], all_namespaces: bool) -> String {
    if waypoints.is_empty() {
        return NONE_FOUND.to_string();
    }
    let header = [
        "NAME",
        "REVISION",
        "TRAFFIC TYPE",
        "PROGRAMMED",
        "ON DEMAND",
        "NEEDED BY",
    ];
    let rows = waypoints.iter().map(|w| {
        vec![
            w.name.clone(),
            w.revision.clone(),
            w.traffic_type.clone(),
            w.programmed.status.clone(),
            w.on_demand.to_string(),
            w.needed_by.join(","),
        ]
    });
    table(&header, rows, waypoints, all_namespaces)
}

/// `status`'s table: each waypoint's `Programmed` condition, as upstream's
/// (NAMESPACE with `-A`, NAME, STATUS, TYPE, REASON, MESSAGE).
pub fn status_table(waypoints: &[Waypoint], all_namespaces: bool) -> String {
    if waypoints.is_empty() {
        return NONE_FOUND.to_string();
    }
    let header = ["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"];
    let rows = waypoints.iter().map(|w| {
        vec![
            w.name.clone(),
            w.programmed.status.clone(),
            "Programmed".to_string(),
            w.programmed.reason.clone(),
            w.programmed.message.clone(),
        ]
    });
    table(&header, rows, waypoints, all_namespaces)
}

/// Columns padded as upstream's tabwriter pads them (the widest cell plus
/// five spaces); an empty cell shows as `-`.
fn table(
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
    waypoints: &[Waypoint],
    all_namespaces: bool,
) -> String {
    let mut lines: Vec<Vec<String>> = Vec::new();
    let mut head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    if all_namespaces {
        head.insert(0, "NAMESPACE".into());
    }
    lines.push(head);
    for (mut row, w) in rows.zip(waypoints) {
        if all_namespaces {
            row.insert(0, w.namespace.clone());
        }
        for cell in &mut row {
            if cell.is_empty() {
                *cell = "-".into();
            }
        }
        lines.push(row);
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        for (i, cell) in line.iter().enumerate() {
            if i + 1 == columns {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}", width = widths[i] + 5));
            }
        }
        out.push('\n');
    }
    out
}

/// `apply`'s options.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Its namespace is where it is applied.
    pub spec: Spec,
    /// Label the namespace `istio.io/use-waypoint=<name>` once applied (and
    /// ready, with `wait`).
    pub enroll_namespace: bool,
    /// With `enroll_namespace`: replace the namespace's `istio.io/use-waypoint`.
    /// Without it, a namespace that has one gets a warning and nothing is
    /// applied (as upstream).
    pub overwrite: bool,
    /// Wait until the Gateway is `Programmed`, up to `timeout`.
    pub wait: bool,
    pub timeout: Duration,
    /// How often `wait` reads the Gateway.
    pub poll: Duration,
}

impl ApplyOptions {
    pub fn new(spec: Spec) -> Self {
        ApplyOptions {
            spec,
            enroll_namespace: false,
            overwrite: false,
            wait: false,
            timeout: DEFAULT_TIMEOUT,
            poll: Duration::from_secs(1),
        }
    }
}

/// Server-side applies the waypoint (field manager `istioctl-rs`, not
/// forced, as upstream), optionally waits for it and enrols the namespace.
pub async fn apply<W: Write>(
    client: &Client,
    options: &ApplyOptions,
    out: &mut W,
) -> Result<(), WaypointError> {
    let body = gateway(&options.spec)?;
    let ns = options
        .spec
        .namespace
        .as_deref()
        .expect("apply has a namespace");
    let name = body["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    let namespace = cluster::get(client, InstallKind::Namespace, None, ns)
        .await?
        .ok_or_else(|| WaypointError::NoNamespace(ns.to_string()))?;
    let ns_label = |key: &str| {
        namespace["metadata"]["labels"][key]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    if options.enroll_namespace {
        let current = ns_label(labels::USE_WAYPOINT);
        if !current.is_empty() && !options.overwrite {
            writeln!(
                out,
                "Warning: namespace {ns} already uses waypoint {current} ({}={current}); nothing applied. Pass --overwrite to apply {name} and enrol the namespace with it.",
                labels::USE_WAYPOINT
            )?;
            return Ok(());
        }
        if ns_label(labels::DATAPLANE_MODE) != labels::DATAPLANE_MODE_AMBIENT {
            writeln!(
                out,
                "Warning: namespace {ns} is not enrolled in ambient; consider `kubectl label namespace {ns} {}={}`",
                labels::DATAPLANE_MODE,
                labels::DATAPLANE_MODE_AMBIENT
            )?;
        }
    }
    if let Some(existing) = cluster::get(client, GatewayKind, Some(ns), &name).await?
        && Waypoint::of(&existing).is_some_and(|w| w.on_demand)
    {
        return Err(WaypointError::NameTakenOnDemand {
            namespace: ns.to_string(),
            name,
        });
    }
    cluster::server_side_apply(client, GatewayKind, Some(ns), &name, &body, false).await?;
    writeln!(out, "waypoint {ns}/{name} applied")?;
    if options.wait {
        let mut last = Condition::of(&Value::Null);
        let pending = cluster::wait_until(vec![()], options.timeout, options.poll, async |_| {
            if let Some(object) = cluster::get(client, GatewayKind, Some(ns), &name).await? {
                last = Condition::of(&object);
            }
            Ok(last.is_true())
        })
        .await?;
        if !pending.is_empty() {
            return Err(WaypointError::NotProgrammed {
                namespace: ns.to_string(),
                name,
                timeout: options.timeout,
                condition: last.to_string(),
            });
        }
        writeln!(out, "waypoint {ns}/{name} is ready")?;
    }
    if options.enroll_namespace {
        cluster::label(
            client,
            InstallKind::Namespace,
            None,
            ns,
            &[(labels::USE_WAYPOINT, &name)],
        )
        .await?;
        writeln!(
            out,
            "namespace {ns} labelled {}={name}",
            labels::USE_WAYPOINT
        )?;
    }
    Ok(())
}

/// `status`: writes [`status_table`] of the waypoints of a namespace (or,
/// `None`, of all), read once, or with `wait` (timeout, poll) read until all
/// are `Programmed` or the timeout passes; then the table is written and
/// [`WaypointError::NotProgrammed`] names the first that is not.
pub async fn status<W: Write>(
    client: &Client,
    namespace: Option<&str>,
    wait: Option<(Duration, Duration)>,
    out: &mut W,
) -> Result<(), WaypointError> {
    let all_namespaces = namespace.is_none();
    let Some((timeout, poll)) = wait else {
        let waypoints = list(client, namespace).await?;
        out.write_all(status_table(&waypoints, all_namespaces).as_bytes())?;
        return Ok(());
    };
    let mut last = Vec::new();
    cluster::wait_until(vec![()], timeout, poll, async |_| {
        last = list(client, namespace).await?;
        Ok(last.iter().all(|w| w.programmed.is_true()))
    })
    .await?;
    out.write_all(status_table(&last, all_namespaces).as_bytes())?;
    match last.iter().find(|w| !w.programmed.is_true()) {
        Some(w) => Err(WaypointError::NotProgrammed {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            timeout,
            condition: w.programmed.to_string(),
        }),
        None => Ok(()),
    }
}

/// Which waypoints `delete` deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    Names(Vec<String>),
    All,
}

/// Deletes the selected waypoints of `namespace`. A name that is no
/// waypoint there is reported and skipped (as upstream). Waypoints
/// istiod-rs created on demand are refused, and then nothing is deleted,
/// unless `force`.
pub async fn delete<W: Write>(
    client: &Client,
    namespace: &str,
    selection: &Selection,
    force: bool,
    out: &mut W,
) -> Result<(), WaypointError> {
    let waypoints = list(client, Some(namespace)).await?;
    let chosen: Vec<&Waypoint> = match selection {
        Selection::All => waypoints.iter().collect(),
        Selection::Names(names) => {
            let mut chosen = Vec::new();
            for name in names {
                match waypoints.iter().find(|w| &w.name == name) {
                    Some(w) => chosen.push(w),
                    None => writeln!(out, "waypoint {namespace}/{name} not found")?,
                }
            }
            chosen
        }
    };
    let on_demand: Vec<Waypoint> = chosen
        .iter()
        .filter(|w| w.on_demand)
        .map(|w| (*w).clone())
        .collect();
    if !force && !on_demand.is_empty() {
        return Err(WaypointError::OnDemand(on_demand));
    }
    for w in chosen {
        cluster::delete(client, GatewayKind, Some(namespace), &w.name, false).await?;
        if w.on_demand && !w.needed_by.is_empty() {
            writeln!(
                out,
                "waypoint {namespace}/{} deleted; istiod-rs recreates it while {} need it",
                w.name,
                w.needed_by.join(", ")
            )?;
        } else {
            writeln!(out, "waypoint {namespace}/{} deleted", w.name)?;
        }
    }
    Ok(())
}
