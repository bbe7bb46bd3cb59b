//! `analyze`: what is wrong with the mesh's configuration, from YAML files
//! (offline) or a live cluster, printed as upstream istioctl's `analyze`
//! prints it (`istioctl/pkg/analyze/analyze.go`,
//! `istioctl/pkg/util/formatting/formatter.go`,
//! `pkg/config/analysis/diag/message.go`): one line per message,
//! `Level [CODE] (Kind namespace/name file:line) text`, or `-o json|yaml`
//! with upstream's fields (`code`, `documentationUrl`, `level`, `message`,
//! `origin`, `reference`).
//!
//! The findings themselves come from istiod-rs's index
//! ([`istiod_rs::index::analysis`]): one implementation of the mesh's
//! semantics (bindings, selectors, enrolment, what each policy problem
//! does) for the control plane and the CLI. This module turns them into
//! messages: upstream's code and level where upstream has the message
//! (`pkg/config/analysis/msg/messages.yaml`), our own `IRS` codes where it
//! has none.
//!
//! Parts: [`gather`] (files and directories, `-` for stdin), [`load`] (each
//! document parsed on its own, so one bad document loses nothing else),
//! [`messages`] (findings to messages), [`render`], [`exit_code`].

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use api::manifest::{self, Kind, Object, Refused};
use istiod_rs::index::analysis::{Finding, Source};
use istiod_rs::index::{Effect, PolicyProblem, PolicyRef, Unserved};
use serde::Serialize;

/// Exit code when a message at or above the failure threshold was found:
/// upstream's `ExitAnalyzerFoundIssues`.
pub const EXIT_FOUND_ISSUES: i32 = 79;
/// Exit code when some input could not be parsed and no message reached
/// the failure threshold: upstream's `ExitDataError`.
pub const EXIT_PARSE_ERROR: i32 = 65;

/// Extensions read from directories and accepted for files.
const FILE_EXTENSIONS: [&str; 3] = ["json", "yaml", "yml"];

/// Where upstream documents each IST code.
const DOCS_URL: &str = "https://istio.io/latest/docs/reference/config/analysis";

/// A message's severity, upstream's three levels, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Info => "Info",
            Level::Warning => "Warning",
            Level::Error => "Error",
        })
    }
}

impl FromStr for Level {
    type Err = String;

    /// Any case, as upstream's `MessageThreshold.Set` (upper-cases before
    /// the lookup; istioctl/pkg/util/formatting).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Ok(Level::Info),
            "warning" => Ok(Level::Warning),
            "error" => Ok(Level::Error),
            _ => Err(format!(
                "{s:?} is not a level; valid values: [Info Warning Error]"
            )),
        }
    }
}

/// A message code: upstream's (`IST0101`) or ours (`IRS0001`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Code {
    pub code: &'static str,
    pub name: &'static str,
    pub level: Level,
}

/// Upstream's messages we emit, with upstream's level
/// (istio/istio `pkg/config/analysis/msg/messages.yaml`).
pub mod upstream {
    use super::{Code, Level};

    pub const REFERENCED_RESOURCE_NOT_FOUND: Code = Code {
        code: "IST0101",
        name: "ReferencedResourceNotFound",
        level: Level::Error,
    };
    pub const SCHEMA_VALIDATION_ERROR: Code = Code {
        code: "IST0106",
        name: "SchemaValidationError",
        level: Level::Error,
    };
    pub const PORT_NAME_IS_NOT_UNDER_NAMING_CONVENTION: Code = Code {
        code: "IST0118",
        name: "PortNameIsNotUnderNamingConvention",
        level: Level::Info,
    };
    pub const NO_MATCHING_WORKLOADS_FOUND: Code = Code {
        code: "IST0127",
        name: "NoMatchingWorkloadsFound",
        level: Level::Warning,
    };
}

/// Our messages, for what upstream has no message for. `IRS` (istio-rs),
/// never `IST`: those numbers are upstream's to give.
pub mod ours {
    use super::{Code, Level};

    pub const L7_RULE_WITHOUT_WAYPOINT: Code = Code {
        code: "IRS0001",
        name: "L7RuleWithoutWaypoint",
        level: Level::Error,
    };
    pub const WAYPOINT_NOT_READY: Code = Code {
        code: "IRS0002",
        name: "WaypointNotReady",
        level: Level::Warning,
    };
    pub const WAYPOINT_ON_DEMAND: Code = Code {
        code: "IRS0003",
        name: "WaypointOnDemand",
        level: Level::Info,
    };
    pub const POLICY_ENFORCED_STRICTER: Code = Code {
        code: "IRS0004",
        name: "PolicyEnforcedStricter",
        level: Level::Warning,
    };
    pub const WAYPOINT_UNUSED: Code = Code {
        code: "IRS0005",
        name: "WaypointUnused",
        level: Level::Warning,
    };
    pub const STRICT_MTLS_WITH_PLAINTEXT_CLIENTS: Code = Code {
        code: "IRS0006",
        name: "StrictMtlsWithPlaintextClients",
        level: Level::Warning,
    };
    pub const POLICY_HELD_TO_L4_FORM: Code = Code {
        code: "IRS0007",
        name: "PolicyHeldToL4Form",
        level: Level::Info,
    };
}

/// Every code `analyze` can print, for the README and tests.
pub const ALL_CODES: [Code; 11] = [
    upstream::REFERENCED_RESOURCE_NOT_FOUND,
    upstream::SCHEMA_VALIDATION_ERROR,
    upstream::PORT_NAME_IS_NOT_UNDER_NAMING_CONVENTION,
    upstream::NO_MATCHING_WORKLOADS_FOUND,
    ours::L7_RULE_WITHOUT_WAYPOINT,
    ours::WAYPOINT_NOT_READY,
    ours::WAYPOINT_ON_DEMAND,
    ours::POLICY_ENFORCED_STRICTER,
    ours::WAYPOINT_UNUSED,
    ours::STRICT_MTLS_WITH_PLAINTEXT_CLIENTS,
    ours::POLICY_HELD_TO_L4_FORM,
];

/// One message about one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Message {
    pub code: Code,
    /// `Kind namespace/name` (`Kind name` when cluster-scoped); `None`
    /// for a document that has no object.
    pub origin: Option<String>,
    /// `file:line` of the object, when it came from a file.
    pub reference: Option<String>,
    /// The object's namespace, for `-n` (empty: cluster-scoped).
    pub namespace: String,
    pub text: String,
}

impl Message {
    pub fn level(&self) -> Level {
        self.code.level
    }

    /// Upstream's log line: `Error [IST0101] (Kind ns/name file:3) text`.
    pub fn line(&self, colorize: bool) -> String {
        let (prefix, suffix) = match (colorize, self.level()) {
            (false, _) | (true, Level::Info) => ("", ""),
            (true, Level::Warning) => ("\x1b[33m", "\x1b[0m"),
            (true, Level::Error) => ("\x1b[1;31m", "\x1b[0m"),
        };
        let origin = match (&self.origin, &self.reference) {
            (Some(o), Some(r)) => format!(" ({o} {r})"),
            (Some(o), None) => format!(" ({o})"),
            (None, Some(r)) => format!(" ({r})"),
            (None, None) => String::new(),
        };
        format!(
            "{prefix}{}{suffix} [{}]{origin} {}",
            self.level(),
            self.code.code,
            self.text
        )
    }

    /// The fields of upstream's `Message.Unstructured(true)`
    /// (pkg/config/analysis/diag/message.go). Upstream gives every message a
    /// `documentationUrl`; here only IST codes have one (ours have no page
    /// on istio.io).
    fn record(&self) -> Record {
        let documentation_url = self.code.code.starts_with("IST").then(|| {
            format!(
                "{DOCS_URL}/{}/?ref=istioctl-analyze",
                self.code.code.to_ascii_lowercase()
            )
        });
        Record {
            code: self.code.code.to_string(),
            documentation_url,
            level: self.level().to_string(),
            message: self.text.clone(),
            origin: self.origin.clone(),
            reference: self.reference.clone(),
        }
    }
}

/// A message in JSON and YAML: upstream's keys, in the order Go prints a
/// map's (sorted).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    documentation_url: Option<String>,
    level: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

/// `-o`: upstream's formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Log,
    Json,
    Yaml,
}

/// One input: a file's path (or `-`) and its text.
#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub text: String,
}

/// Why the inputs could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    // The io::Error is in the message, not a source: `{:#}` would print it twice.
    #[error("reading {path}: {error}; check that it exists and is readable")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not UTF-8 text; save it as UTF-8")]
    NotText { path: String },
}

/// Reads every file named (a directory: its files with a recognised
/// extension, its subdirectories too with `recursive`; `-`: `stdin`), in
/// the order given, a directory's files sorted. Files skipped for their
/// extension are reported in `skipped`.
pub fn gather(
    paths: &[PathBuf],
    recursive: bool,
    stdin: &mut dyn Read,
    skipped: &mut Vec<String>,
) -> Result<Vec<Input>, GatherError> {
    let mut inputs = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .map_err(|error| GatherError::Read {
                    path: "-".into(),
                    error,
                })?;
            inputs.push(Input {
                name: "-".into(),
                text,
            });
            continue;
        }
        let meta = std::fs::metadata(path).map_err(|error| GatherError::Read {
            path: path.display().to_string(),
            error,
        })?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(path, recursive, &mut files)?;
            files.sort();
            for f in files {
                if has_extension(&f) {
                    inputs.push(read(&f)?);
                } else {
                    skipped.push(skip_note(&f));
                }
            }
        } else if has_extension(path) {
            inputs.push(read(path)?);
        } else {
            skipped.push(skip_note(path));
        }
    }
    Ok(inputs)
}

fn skip_note(path: &Path) -> String {
    format!(
        "Skipping file {}, recognized file extensions are: [.json .yaml .yml]",
        path.display()
    )
}

fn has_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| FILE_EXTENSIONS.contains(&e))
}

fn walk(dir: &Path, recursive: bool, files: &mut Vec<PathBuf>) -> Result<(), GatherError> {
    let error = |error| GatherError::Read {
        path: dir.display().to_string(),
        error,
    };
    for entry in std::fs::read_dir(dir).map_err(error)? {
        let path = entry.map_err(error)?.path();
        if path.is_dir() {
            if recursive {
                walk(&path, recursive, files)?;
            }
        } else {
            files.push(path);
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Input, GatherError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| GatherError::Read {
        path: name.clone(),
        error,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| GatherError::NotText { path: name.clone() })?;
    Ok(Input { name, text })
}

/// The objects of the inputs, where each came from, the messages about
/// documents the mesh would read but cannot as written, and the documents
/// that could not be parsed at all.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<(Object, String)>,
    pub messages: Vec<Message>,
    /// `file: document N (line L): line M: reason`, one per document.
    pub parse_errors: Vec<String>,
}

/// Parses every document of every input on its own: a document that is
/// not YAML, or does not decode as its kind, is one parse error; the
/// file's other documents and the other files are still read.
pub fn load(inputs: &[Input]) -> Loaded {
    let mut loaded = Loaded::default();
    for input in inputs {
        for (n, doc) in manifest::documents(&input.text).into_iter().enumerate() {
            // Parsed at its place in the file (blank lines before it), so
            // that every line the parser reports is the file's.
            let placed = format!("{}{}", "\n".repeat(doc.first_line - 1), doc.body);
            match manifest::parse(&placed) {
                Ok(m) => {
                    for object in m.objects {
                        loaded
                            .objects
                            .push((object, format!("{}:{}", input.name, doc.first_line)));
                    }
                    for r in m.refused {
                        loaded
                            .messages
                            .push(refused_message(&input.name, &r, refused_line(&r)));
                    }
                }
                Err(e) => loaded.parse_errors.push(format!(
                    "{}: document {} (line {}): line {}: {}",
                    input.name,
                    n + 1,
                    doc.first_line,
                    e.line,
                    e.reason
                )),
            }
        }
    }
    loaded
}

fn refused_line(r: &Refused) -> usize {
    match r {
        Refused::UnknownKind { line, .. }
        | Refused::UnknownApiVersion { line, .. }
        | Refused::UnknownFields { line, .. } => *line,
    }
}

fn refused_message(file: &str, r: &Refused, line: usize) -> Message {
    let (origin, namespace, text) = match r {
        Refused::UnknownKind {
            api_version, kind, ..
        } => (
            None,
            String::new(),
            format!("{kind} is not a kind of {api_version}; check the kind's spelling"),
        ),
        Refused::UnknownApiVersion {
            api_version, kind, ..
        } => (
            None,
            String::new(),
            format!(
                "{kind} is read as {}, not {api_version}; change its apiVersion",
                kind.api_versions().join(" or ")
            ),
        ),
        Refused::UnknownFields {
            kind, key, fields, ..
        } => (
            Some(origin(*kind, &key.namespace, &key.name)),
            key.namespace.clone(),
            format!(
                "unknown field(s) {}; the API server refuses the object (strict field validation)",
                fields.join(", ")
            ),
        ),
    };
    Message {
        code: upstream::SCHEMA_VALIDATION_ERROR,
        origin,
        reference: Some(format!("{file}:{line}")),
        namespace,
        text: format!("Schema validation error: {text}"),
    }
}

/// `Kind namespace/name`, `Kind name` when cluster-scoped: upstream's
/// `Origin.FriendlyName`.
fn origin(kind: Kind, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

fn origin_of(object: &PolicyRef) -> String {
    origin(object.kind, &object.key.namespace, &object.key.name)
}

/// Every finding as a message (none for what istioctl-rs cannot know, see
/// [`message`]), with its object's file and line when it came from one.
pub fn messages(
    findings: Vec<Finding>,
    source: Source,
    reference: &dyn Fn(&PolicyRef) -> Option<String>,
) -> Vec<Message> {
    findings
        .into_iter()
        .filter_map(|f| {
            let object = f.object();
            let (code, text) = message(f, source)?;
            Some(Message {
                code,
                reference: reference(&object),
                namespace: match object.kind {
                    Kind::Namespace => object.key.name.clone(),
                    _ => object.key.namespace.clone(),
                },
                origin: Some(origin_of(&object)),
                text,
            })
        })
        .collect()
}

/// The code and text of one finding. `None`: a finding istioctl-rs cannot
/// judge (a JWKS only istiod-rs fetches; from files, whether a waypoint
/// has a ready instance).
fn message(finding: Finding, source: Source) -> Option<(Code, String)> {
    Some(match finding {
        Finding::Problem(p) => return problem_message(p, source),
        Finding::MissingWaypoint {
            object,
            gateway,
            class,
        } => {
            let why = match class {
                Some(c) => format!(
                    " (Gateway {gateway} has class {c}, not {})",
                    api::labels::WAYPOINT_GATEWAY_CLASS
                ),
                None => String::new(),
            };
            (
                upstream::REFERENCED_RESOURCE_NOT_FOUND,
                format!(
                    "Referenced waypoint Gateway not found: {:?}{why}. {} has no waypoint until it exists: create it (istioctl-rs waypoint apply -n {} --name {}) or correct the label istio.io/use-waypoint.",
                    gateway.to_string(),
                    origin_of(&object),
                    gateway.namespace,
                    gateway.name
                ),
            )
        }
        Finding::UnusedWaypoint { gateway } => (
            ours::WAYPOINT_UNUSED,
            format!(
                "Waypoint {gateway} is bound to nothing: no Namespace, Service or Pod names it (label istio.io/use-waypoint) and no workload runs as its istio.io/for-service-account. Label what it should serve, or delete it (istioctl-rs waypoint delete -n {} {}).",
                gateway.namespace, gateway.name
            ),
        ),
        Finding::NoMatchingWorkloads { labels, .. } => (
            upstream::NO_MATCHING_WORKLOADS_FOUND,
            format!("No matching workloads for this resource with the following labels: {labels}"),
        ),
        Finding::StrictWithPlaintextClients { clients, more, .. } => {
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            (
                ours::STRICT_MTLS_WITH_PLAINTEXT_CLIENTS,
                format!(
                    "STRICT mTLS refuses plaintext from clients outside the mesh: {}{more}. Enrol the clients (istio.io/dataplane-mode=ambient) or make the ports they call PERMISSIVE (portLevelMtls).",
                    clients.join(", ")
                ),
            )
        }
        Finding::PortWithoutProtocol {
            port_name,
            port,
            target_port,
            rules,
            ..
        } => (
            upstream::PORT_NAME_IS_NOT_UNDER_NAMING_CONVENTION,
            format!(
                "Port name {port_name} (port: {port}, targetPort: {target_port}) doesn't follow the naming convention of Istio port. L7 rules apply to it ({}): name it http-*, http2-* or grpc-*, or set appProtocol, so the waypoint need not detect the protocol.",
                rules.iter().map(origin_of).collect::<Vec<_>>().join(", ")
            ),
        ),
    })
}

fn problem_message(p: PolicyProblem, source: Source) -> Option<(Code, String)> {
    let detail = p.detail();
    Some(match &p {
        PolicyProblem::InvalidValue { .. }
        | PolicyProblem::UnsupportedField { .. }
        | PolicyProblem::UnsupportedAction { .. } => (
            upstream::SCHEMA_VALIDATION_ERROR,
            format!(
                "Schema validation error: {detail}. Correct the field; istiod-rs's admission webhook refuses the object."
            ),
        ),
        PolicyProblem::UnservedL7 { reason, .. } => match reason {
            Unserved::TargetNotFound { target } => {
                let (kind, name) = target.split_once(' ').unwrap_or(("resource", target));
                (
                    upstream::REFERENCED_RESOURCE_NOT_FOUND,
                    format!(
                        "Referenced {kind} not found: {name:?}. The rule applies to nothing until it exists; correct the reference."
                    ),
                )
            }
            Unserved::WaypointNotReady { .. } if source == Source::Files => return None,
            Unserved::WaypointNotReady { .. } => (
                ours::WAYPOINT_NOT_READY,
                format!("{detail}. Check the waypoint's pods (istioctl-rs waypoint status)."),
            ),
            Unserved::OnDemandPending { .. } => (ours::WAYPOINT_ON_DEMAND, format!("{detail}.")),
            Unserved::AutoWaypointDisabled { namespace, .. } => (
                ours::L7_RULE_WITHOUT_WAYPOINT,
                format!(
                    "{detail}. Bind a waypoint (istioctl-rs waypoint apply -n {namespace} --enroll-namespace) or remove the label istio.io/auto-waypoint=disabled from namespace {namespace}."
                ),
            ),
            Unserved::NotBound { .. }
            | Unserved::OnDemandNameTaken { .. }
            | Unserved::UnsupportedTarget { .. } => (
                ours::L7_RULE_WITHOUT_WAYPOINT,
                format!(
                    "{detail}. Bind a waypoint to the target (label istio.io/use-waypoint) or attach the rule to a supported target."
                ),
            ),
        },
        PolicyProblem::HttpAttributes {
            effect: Effect::WaypointsEnforce { .. },
            ..
        } => (ours::POLICY_HELD_TO_L4_FORM, format!("{detail}.")),
        // Only istiod-rs fetches JWKS: istioctl-rs cannot tell.
        PolicyProblem::JwksUnavailable { .. } => return None,
        PolicyProblem::HttpAttributes { .. }
        | PolicyProblem::NotHonoured { .. }
        | PolicyProblem::UntranslatableL7 { .. }
        | PolicyProblem::AppliedToWholeService { .. } => {
            (ours::POLICY_ENFORCED_STRICTER, format!("{detail}."))
        }
    })
}

/// The messages about `namespace` (all when `None`; cluster-scoped
/// objects and documents without an object always), sorted by origin,
/// then file, code and text, each once. [`render`] applies the output
/// threshold; [`exit_code`] sees them all.
pub fn select(messages: &[Message], namespace: Option<&str>) -> Vec<Message> {
    let set: BTreeSet<&Message> = messages
        .iter()
        .filter(|m| namespace.is_none_or(|ns| m.namespace.is_empty() || m.namespace == ns))
        .collect();
    let mut v: Vec<Message> = set.into_iter().cloned().collect();
    v.sort_by(|a, b| {
        (&a.origin, &a.reference, a.code.code, &a.text).cmp(&(
            &b.origin,
            &b.reference,
            b.code.code,
            &b.text,
        ))
    });
    v
}

/// The messages at or above `threshold`, in `format`; log lines end with
/// a newline each, JSON and YAML are one document (`[]` when empty).
pub fn render(messages: &[Message], threshold: Level, format: Format, colorize: bool) -> String {
    let shown: Vec<&Message> = messages.iter().filter(|m| m.level() >= threshold).collect();
    match format {
        Format::Log => shown
            .iter()
            .map(|m| format!("{}\n", m.line(colorize)))
            .collect(),
        Format::Json => {
            let records: Vec<Record> = shown.iter().map(|m| m.record()).collect();
            let mut out = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            records
                .serialize(&mut ser)
                .expect("messages serialise as JSON");
            let mut text = String::from_utf8(out).expect("JSON is UTF-8");
            text.push('\n');
            text
        }
        Format::Yaml => {
            let records: Vec<Record> = shown.iter().map(|m| m.record()).collect();
            if records.is_empty() {
                return "[]\n".to_string();
            }
            serde_saphyr::to_string(&records).expect("messages serialise as YAML")
        }
    }
}

/// Upstream's exit code: [`EXIT_FOUND_ISSUES`] when a message (shown or
/// not) is at or above `failure`, else [`EXIT_PARSE_ERROR`] when some input
/// could not be parsed (unless `ignore_unknown`), else 0. Unlike upstream,
/// the same in every output format (upstream sets it for `-o log` only).
pub fn exit_code(
    messages: &[Message],
    failure: Level,
    parse_errors: usize,
    ignore_unknown: bool,
) -> i32 {
    if messages.iter().any(|m| m.level() >= failure) {
        EXIT_FOUND_ISSUES
    } else if parse_errors > 0 && !ignore_unknown {
        EXIT_PARSE_ERROR
    } else {
        0
    }
}

/// What was analysed, in upstream's words: `namespace: demo`, `all
/// namespaces`, or the files.
pub fn target(namespace: Option<&str>, files: &[Input]) -> String {
    if !files.is_empty() && namespace.is_none() {
        return files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join("\n");
    }
    match namespace {
        Some(ns) => format!("namespace: {ns}"),
        None => "all namespaces".to_string(),
    }
}

/// What `analyze` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Files and directories (`-` for standard input).
    pub files: Vec<PathBuf>,
    pub recursive: bool,
    /// Only messages about this namespace's objects; `None`: all.
    pub namespace: Option<String>,
    pub output_threshold: Level,
    pub failure_threshold: Level,
    pub format: Format,
    pub colorize: bool,
    /// Documents that cannot be parsed do not make the exit code non-zero.
    pub ignore_unknown: bool,
}

/// What `analyze` prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

/// Why `analyze` could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error(transparent)]
    Gather(#[from] GatherError),
    #[error(
        "{0}; is the cluster reachable with this kubeconfig (kubectl cluster-info)? To analyze files alone, pass --use-kube=false"
    )]
    Cluster(#[from] istiod_rs::state::kube::ListError),
}

/// Analyzes the files (over the live cluster's state when `cluster` is
/// given, `--use-kube`; alone otherwise).
pub async fn run(
    options: &Options,
    cluster: Option<&kube::Client>,
    stdin: &mut dyn Read,
) -> Result<Outcome, AnalyzeError> {
    let mut stderr = String::new();
    let mut skipped = Vec::new();
    let inputs = gather(&options.files, options.recursive, stdin, &mut skipped)?;
    for s in skipped {
        stderr.push_str(&s);
        stderr.push('\n');
    }
    let loaded = load(&inputs);
    if !loaded.parse_errors.is_empty() {
        stderr.push_str("Error(s) adding files:\n");
        for e in &loaded.parse_errors {
            stderr.push_str(&format!("  {e}\n"));
        }
    }
    let (mut state, source) = match cluster {
        Some(client) => (
            istiod_rs::state::kube::list(client.clone()).await?,
            Source::Cluster,
        ),
        None => (istiod_rs::state::ClusterState::default(), Source::Files),
    };
    let mut references = std::collections::BTreeMap::new();
    for (object, reference) in loaded.objects {
        references.insert((object.kind(), object.key()), reference);
        state.apply(object);
    }
    let findings = istiod_rs::index::analysis::analyze(
        &state,
        &istiod_rs::index::MeshConfig::default(),
        source,
    );
    let reference = |o: &PolicyRef| references.get(&(o.kind, o.key.clone())).cloned();
    let mut all = messages(findings, source, &reference);
    all.extend(loaded.messages);
    let selected = select(&all, options.namespace.as_deref());
    let stdout = render(
        &selected,
        options.output_threshold,
        options.format,
        options.colorize,
    );
    if !selected
        .iter()
        .any(|m| m.level() >= options.output_threshold)
    {
        let target = target(options.namespace.as_deref(), &inputs);
        match loaded.parse_errors.len() {
            0 => stderr.push_str(&format!(
                "\u{2714} No validation issues found when analyzing {target}.\n"
            )),
            n => stderr.push_str(&format!(
                "No validation issues found when analyzing {target} (but {n} document{} could not be parsed).\n",
                if n == 1 { "" } else { "s" }
            )),
        }
    }
    let code = exit_code(
        &selected,
        options.failure_threshold,
        loaded.parse_errors.len(),
        options.ignore_unknown,
    );
    Ok(Outcome {
        stdout,
        stderr,
        code,
    })
}
