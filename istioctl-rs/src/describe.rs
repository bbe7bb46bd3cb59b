//! `x describe pod|service`: how traffic to one pod or service flows, in
//! one screen, from what a ztunnel holds (its `/config_dump`, fetched as
//! `ztunnel-config` does): whether the pod is enrolled (HBONE) and on which
//! node's ztunnel, which waypoint its own traffic and its services' traffic
//! go through, which authorization policies that ztunnel applies to
//! connections to it (the same rule as ztunnel-rs's store:
//! `proxy_core::authorization::Scope::applies`), and the certificate of its
//! identity when the ztunnel holds it (a ztunnel holds its own node's
//! pods' certificates only).
//!
//! Upstream's `istioctl x describe` reads Envoy sidecar configuration and
//! has no ambient form; the layout here is ours.

use serde::Serialize;
use serde_json::Value;

use crate::ztunnel_config::{self, ConfigDump, Item, Output, Service, Workload};

/// What to describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A pod: `name` (with `-n`) or `name.namespace`.
    Pod { namespace: String, name: String },
    /// A service, the same way.
    Service { namespace: String, name: String },
}

impl Subject {
    /// `name.namespace` splits at the last `.`, as upstream's
    /// `InferPodInfo` (istioctl/pkg/util/handlers/handlers.go); otherwise
    /// the namespace is `namespace`.
    pub fn pod(target: &str, namespace: &str) -> Subject {
        let (name, namespace) = split(target, namespace);
        Subject::Pod { namespace, name }
    }

    pub fn service(target: &str, namespace: &str) -> Subject {
        let (name, namespace) = split(target, namespace);
        Subject::Service { namespace, name }
    }
}

fn split(target: &str, namespace: &str) -> (String, String) {
    match target.rsplit_once('.') {
        Some((name, ns)) => (name.to_string(), ns.to_string()),
        None => (target.to_string(), namespace.to_string()),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DescribeError {
    #[error(
        "the ztunnel at {origin} knows no pod {namespace}/{name} (it lists every workload of the mesh's namespaces: check the name and namespace with `istioctl-rs zc workload`)"
    )]
    NoPod {
        origin: String,
        namespace: String,
        name: String,
    },
    #[error(
        "the ztunnel at {origin} knows no service {namespace}/{name} (check with `istioctl-rs zc service`)"
    )]
    NoService {
        origin: String,
        namespace: String,
        name: String,
    },
}

/// A pod as described.
#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodDescription {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub addresses: Vec<String>,
    pub status: String,
    /// `HBONE`: enrolled; `TCP`: not captured.
    pub protocol: String,
    pub enrolled: bool,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<account>`.
    pub identity: String,
    /// The waypoint of traffic addressed to the pod itself (service name,
    /// `NA` when the ztunnel knows no such service).
    pub waypoint: Option<String>,
    pub services: Vec<ServiceLine>,
    pub policies: Vec<PolicyLine>,
    /// Listed by the pod but not held by the ztunnel: connections to it
    /// are denied until it arrives (fail closed).
    pub missing_policies: Vec<String>,
    pub certificate: Option<CertificateLine>,
}

/// A service as described.
#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDescription {
    #[serde(flatten)]
    pub service: ServiceLine,
    pub hostname: String,
    pub endpoints: Vec<EndpointLine>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceLine {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<String>,
    /// `port->target port` (`(per endpoint)` for a named target port),
    /// sorted by port.
    pub ports: Vec<String>,
    pub waypoint: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointLine {
    pub namespace: String,
    pub name: String,
    pub addresses: Vec<String>,
    pub node: String,
    pub status: String,
    pub protocol: String,
    pub waypoint: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyLine {
    pub namespace: String,
    pub name: String,
    pub action: String,
    pub scope: String,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateLine {
    pub identity: String,
    pub state: String,
    pub valid: bool,
    pub serial_number: String,
    pub not_after: String,
}

/// The pod's description from `dump` (read from `origin`).
pub fn pod(
    dump: &ConfigDump,
    origin: &str,
    namespace: &str,
    name: &str,
    now: std::time::SystemTime,
) -> Result<PodDescription, DescribeError> {
    let item = dump
        .workloads
        .iter()
        .find(|w| w.view.namespace == namespace && w.view.name == name)
        .ok_or_else(|| DescribeError::NoPod {
            origin: origin.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
    let w = &item.view;
    let text = |key: &str| item.json[key].as_str().unwrap_or_default().to_string();
    let identity = format!(
        "spiffe://{}/ns/{namespace}/sa/{}",
        text("trustDomain"),
        text("serviceAccount")
    );
    let listed: Vec<String> = strings(&item.json["authorizationPolicies"]);
    let mut policies = Vec::new();
    for p in &dump.policies {
        let p = &p.view;
        let Some(scope) = scope(&p.scope) else {
            continue;
        };
        let key = format!("{}/{}", p.namespace, p.name);
        if scope.applies(&p.namespace, &key, namespace, &listed) {
            policies.push(PolicyLine {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                action: p.action.to_ascii_uppercase(),
                scope: p.scope.clone(),
            });
        }
    }
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let held = |key: &String| {
        dump.policies
            .iter()
            .any(|p| format!("{}/{}", p.view.namespace, p.view.name) == *key)
    };
    let missing_policies = listed.iter().filter(|k| !held(k)).cloned().collect();
    let services = strings(&item.json["services"])
        .iter()
        .filter_map(|key| {
            dump.services
                .iter()
                .find(|s| format!("{}/{}", s.view.namespace, s.view.hostname) == *key)
        })
        .map(|s| service_line(dump, s))
        .collect();
    let certificate = dump
        .certificates
        .iter()
        .find(|c| c.view.identity == identity)
        .map(|c| {
            let leaf = c.view.cert_chain.first();
            CertificateLine {
                identity: identity.clone(),
                state: c.view.state.clone(),
                valid: leaf.is_some_and(|l| ztunnel_config::valid_at(l, now)),
                serial_number: leaf
                    .map(|l| ztunnel_config::serial_hex(&l.serial_number))
                    .unwrap_or_else(|| "NA".into()),
                not_after: leaf
                    .map(|l| l.expiration_time.clone())
                    .unwrap_or_else(|| "NA".into()),
            }
        });
    Ok(PodDescription {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: w.uid.clone(),
        node: w.node.clone(),
        addresses: w.workload_ips.clone(),
        status: w.status.clone(),
        enrolled: w.protocol == "HBONE",
        protocol: w.protocol.clone(),
        identity,
        waypoint: waypoint(dump, w),
        services,
        policies,
        missing_policies,
        certificate,
    })
}

/// The service's description from `dump` (read from `origin`).
pub fn service(
    dump: &ConfigDump,
    origin: &str,
    namespace: &str,
    name: &str,
) -> Result<ServiceDescription, DescribeError> {
    let item = dump
        .services
        .iter()
        .find(|s| s.view.namespace == namespace && s.view.name == name)
        .ok_or_else(|| DescribeError::NoService {
            origin: origin.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
    let mut endpoints: Vec<EndpointLine> = item
        .view
        .endpoints
        .values()
        .map(|e| {
            let w = dump
                .workloads
                .iter()
                .map(|w| &w.view)
                .find(|w| w.uid == e.workload_uid);
            EndpointLine {
                namespace: w.map(|w| w.namespace.clone()).unwrap_or_default(),
                name: w.map_or_else(|| e.workload_uid.clone(), |w| w.name.clone()),
                addresses: w.map(|w| w.workload_ips.clone()).unwrap_or_default(),
                node: w.map(|w| w.node.clone()).unwrap_or_default(),
                status: w.map_or_else(|| "Unknown".into(), |w| w.status.clone()),
                protocol: w.map(|w| w.protocol.clone()).unwrap_or_default(),
                waypoint: w.and_then(|w| waypoint(dump, w)),
            }
        })
        .collect();
    endpoints.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(ServiceDescription {
        service: service_line(dump, item),
        hostname: item.view.hostname.clone(),
        endpoints,
    })
}

fn service_line(dump: &ConfigDump, s: &Item<Service>) -> ServiceLine {
    let mut ports: Vec<(u64, u64)> = s.json["ports"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(port, target)| Some((port.parse().ok()?, target.as_u64()?)))
        .collect();
    ports.sort_unstable();
    ServiceLine {
        namespace: s.view.namespace.clone(),
        name: s.view.name.clone(),
        vips: s
            .view
            .vips
            .iter()
            .map(|v| {
                v.split_once('/')
                    .map_or(v.as_str(), |(_, ip)| ip)
                    .to_string()
            })
            .collect(),
        // Target port 0: named in the Service, each endpoint has its own.
        ports: ports
            .iter()
            .map(|(p, t)| match t {
                0 => format!("{p}->(per endpoint)"),
                t => format!("{p}->{t}"),
            })
            .collect(),
        waypoint: s
            .view
            .waypoint
            .is_some()
            .then(|| ztunnel_config::waypoint_name(&s.view.waypoint, dump)),
    }
}

fn waypoint(dump: &ConfigDump, w: &Workload) -> Option<String> {
    w.waypoint
        .is_some()
        .then(|| ztunnel_config::waypoint_name(&w.waypoint, dump))
}

fn scope(text: &str) -> Option<proxy_core::authorization::Scope> {
    use proxy_core::authorization::Scope;
    match text {
        "Global" => Some(Scope::Global),
        "Namespace" => Some(Scope::Namespace),
        "WorkloadSelector" => Some(Scope::WorkloadSelector),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// The pod's screen.
pub fn pod_text(d: &PodDescription, origin: &str) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| labelled(&mut out, label, &value);
    line("Pod:", format!("{}/{} ({})", d.namespace, d.name, d.uid));
    line(
        "Node:",
        if d.node.is_empty() {
            "none reported".into()
        } else {
            format!("{} (that node's ztunnel carries its traffic)", d.node)
        },
    );
    line("Addresses:", d.addresses.join(", "));
    line("Status:", d.status.clone());
    line(
        "Mesh:",
        if d.enrolled {
            "enrolled (ambient): connections to and from it go through ztunnel, HBONE with mTLS"
                .into()
        } else {
            format!(
                "not enrolled (protocol {}): its traffic is not captured; mesh clients reach it in plaintext and no policy is enforced on its side",
                d.protocol
            )
        },
    );
    line("Identity:", d.identity.clone());
    line(
        "Waypoint:",
        match &d.waypoint {
            Some(w) => format!("{w} (traffic addressed to the pod goes through it)"),
            None => "none for traffic addressed to the pod".into(),
        },
    );
    if d.services.is_empty() {
        line("Services:", "none".into());
    } else {
        line("Services:", String::new());
        for s in &d.services {
            out.push_str(&format!("  {}\n", service_summary(s)));
        }
    }
    let mut line = |label: &str, value: String| labelled(&mut out, label, &value);
    if !d.enrolled {
        line(
            "Policies:",
            "not enforced: its ztunnel does not capture its traffic".into(),
        );
    } else if d.policies.is_empty() && d.missing_policies.is_empty() {
        line(
            "Policies:",
            "none (every connection its ztunnel accepts is allowed)".into(),
        );
    } else {
        line(
            "Policies:",
            "applied by its ztunnel to connections to it".into(),
        );
        for p in &d.policies {
            out.push_str(&format!(
                "  {}/{}  {}  {}\n",
                p.namespace, p.name, p.action, p.scope
            ));
        }
        for key in &d.missing_policies {
            out.push_str(&format!(
                "  {key}  listed but not held: connections are denied until it arrives\n"
            ));
        }
    }
    let mut line = |label: &str, value: String| labelled(&mut out, label, &value);
    match &d.certificate {
        Some(c) => line(
            "Certificate:",
            format!(
                "{} (valid: {}, serial {}, not after {})",
                c.state, c.valid, c.serial_number, c.not_after
            ),
        ),
        None => line(
            "Certificate:",
            format!(
                "not held by the ztunnel at {origin} (a ztunnel holds the certificates of its own node's pods: ask the ztunnel of {})",
                if d.node.is_empty() {
                    "its node"
                } else {
                    &d.node
                }
            ),
        ),
    }
    out
}

/// `label` in a column of 13, then `value`.
fn labelled(out: &mut String, label: &str, value: &str) {
    out.push_str(format!("{label:<13}{value}").trim_end());
    out.push('\n');
}

/// The service's screen.
pub fn service_text(d: &ServiceDescription) -> String {
    let mut out = format!("Service:     {}\n", service_summary(&d.service));
    out.push_str(&format!("Hostname:    {}\n", d.hostname));
    out.push_str(&match &d.service.waypoint {
        Some(w) => format!(
            "Waypoint:    {w}: requests to the service go through it (its L7 rules apply there)\n"
        ),
        None => "Waypoint:    none: ztunnels carry its traffic at L4 only\n".into(),
    });
    let healthy = d.endpoints.iter().filter(|e| e.status == "Healthy").count();
    out.push_str(&format!(
        "Endpoints:   {} ({healthy} healthy)\n",
        d.endpoints.len()
    ));
    let mut rows = vec![
        [
            "NAMESPACE",
            "POD",
            "ADDRESS",
            "NODE",
            "STATUS",
            "PROTOCOL",
            "WAYPOINT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for e in &d.endpoints {
        rows.push(vec![
            e.namespace.clone(),
            e.name.clone(),
            e.addresses.join(","),
            e.node.clone(),
            e.status.clone(),
            e.protocol.clone(),
            e.waypoint.clone().unwrap_or_else(|| "None".into()),
        ]);
    }
    for line in ztunnel_config::table(&rows, 2).lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn service_summary(s: &ServiceLine) -> String {
    let mut text = format!("{}/{}", s.namespace, s.name);
    if !s.vips.is_empty() {
        text.push_str(&format!("  {}", s.vips.join(",")));
    }
    if !s.ports.is_empty() {
        text.push_str(&format!("  ports {}", s.ports.join(" ")));
    }
    if let Some(w) = &s.waypoint {
        text.push_str(&format!("  waypoint {w}"));
    }
    text
}

/// The description as `output` asks.
pub fn render(
    dump: &ConfigDump,
    subject: &Subject,
    origin: &str,
    output: Output,
    now: std::time::SystemTime,
) -> anyhow::Result<String> {
    let (text, value) = match subject {
        Subject::Pod { namespace, name } => {
            let d = pod(dump, origin, namespace, name, now)?;
            (pod_text(&d, origin), serde_json::to_value(&d)?)
        }
        Subject::Service { namespace, name } => {
            let d = service(dump, origin, namespace, name)?;
            (service_text(&d), serde_json::to_value(&d)?)
        }
    };
    Ok(match output {
        Output::Short => text,
        Output::Json => serde_json::to_string_pretty(&value)? + "\n",
        Output::Yaml => serde_saphyr::to_string(&value)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> ConfigDump {
        let text = include_str!("../tests/testdata/ztunnel-config-dump.json");
        let mut json: Value = serde_json::from_str(text).unwrap();
        // web-0 lists its selector policy and one the ztunnel does not hold.
        json["workloads"][0]["authorizationPolicies"] =
            serde_json::json!(["demo/allow-curl", "demo/gone"]);
        ConfigDump::parse(&serde_json::to_vec(&json).unwrap()).unwrap()
    }

    fn at(text: &str) -> std::time::SystemTime {
        let secs = ztunnel_config::unix_seconds(text).unwrap();
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    }

    #[test]
    fn a_pod_shows_its_waypoint_services_policies_and_certificate() {
        let d = pod(&dump(), "f", "demo", "web-0", at("2026-12-07T06:00:00Z")).unwrap();
        assert!(d.enrolled);
        assert_eq!(d.identity, "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(d.waypoint.as_deref(), Some("waypoint"));
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].ports, ["80->8080"]);
        let policies: Vec<_> = d.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(policies, ["allow-curl"]);
        assert_eq!(d.missing_policies, ["demo/gone"]);
        let cert = d.certificate.as_ref().unwrap();
        assert!(cert.valid);
        assert_eq!(cert.serial_number, "1b23c");
        let text = pod_text(&d, "f");
        assert!(text.contains("demo/gone  listed but not held"), "{text}");
    }

    #[test]
    fn a_namespace_policy_applies_only_in_its_namespace() {
        // client/deny-all is namespace-scoped: curl-5c (namespace client)
        // gets it, web-0 (demo) does not.
        let dump = dump();
        let now = at("2026-12-07T06:00:00Z");
        let curl = pod(&dump, "f", "client", "curl-5c", now).unwrap();
        let names: Vec<_> = curl.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["deny-all"]);
        // Its certificate could not be issued: shown as the ztunnel says.
        let cert = curl.certificate.as_ref().unwrap();
        assert!(!cert.valid && cert.state.starts_with("Unavailable"));
    }

    #[test]
    fn a_certificate_this_ztunnel_does_not_hold_is_said_so() {
        let now = at("2026-12-07T06:00:00Z");
        let db = pod(&dump(), "f", "legacy", "db", now).unwrap();
        assert_eq!(db.certificate, None);
        let text = pod_text(&db, "f");
        assert!(text.contains("not held by the ztunnel at f"), "{text}");
    }

    #[test]
    fn a_pod_out_of_the_mesh_says_so() {
        let d = pod(
            &dump(),
            "f",
            "demo",
            "waypoint-7d9f",
            at("2026-12-07T06:00:00Z"),
        )
        .unwrap();
        assert!(!d.enrolled);
        let text = pod_text(&d, "f");
        assert!(text.contains("not enrolled (protocol TCP)"), "{text}");
        assert!(text.contains("Policies:    not enforced"), "{text}");
    }

    #[test]
    fn a_service_lists_its_endpoints_with_their_state() {
        let d = service(&dump(), "f", "demo", "web").unwrap();
        assert_eq!(d.service.waypoint.as_deref(), Some("waypoint"));
        assert_eq!(d.service.vips, ["10.96.0.10"]);
        let states: Vec<_> = d
            .endpoints
            .iter()
            .map(|e| (e.name.as_str(), e.status.as_str()))
            .collect();
        assert_eq!(states, [("web-0", "Healthy"), ("web-1", "Unhealthy")]);
        assert!(service_text(&d).contains("Endpoints:   2 (1 healthy)"));
    }

    #[test]
    fn an_unknown_name_is_an_error_naming_it_and_the_source() {
        let err = pod(
            &dump(),
            "http://127.0.0.1:15000",
            "demo",
            "nope",
            at("2026-12-07T06:00:00Z"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("demo/nope") && text.contains("127.0.0.1:15000"),
            "{text}"
        );
        assert!(service(&dump(), "f", "demo", "nope").is_err());
    }

    #[test]
    fn name_dot_namespace_wins_over_the_flag() {
        assert_eq!(
            Subject::pod("web-0.demo", "default"),
            Subject::Pod {
                namespace: "demo".into(),
                name: "web-0".into()
            }
        );
        assert_eq!(
            Subject::service("web", "demo"),
            Subject::Service {
                namespace: "demo".into(),
                name: "web".into()
            }
        );
    }
}
