//! `istioctl-rs`, the operator's views, against the running mesh: each
//! command is run where its proxy's loopback ports answer (as a
//! port-forward gives an operator, [`Cluster::istioctl`]), and its output is
//! checked for structure (the header upstream's istioctl prints, one row per
//! object the fixture made, JSON that parses into the shape the command
//! documents), never for timings or generated values.
//!
//! The local cluster runs them; a cluster that cannot run `istioctl-rs`
//! beside a proxy says so ([`crate::cluster::ClusterError::Unsupported`]).

use std::time::Duration;

use serde_json::Value;

use super::fixture::{AMBIENT_NS, ECHO_HELLO, SERVICE};
use super::{L4Fixture, Scenario};
use crate::cluster::{Cluster, ExecOutput, PodInfo, ProxyRef};
use crate::probe::{ProbeError, eventually};

/// ztunnel-rs's admin port, where `ztunnel-config` reads `/config_dump`.
const ADMIN_URL: &str = "http://127.0.0.1:15000";
/// istiod-rs's monitoring port, where `proxy-status` reads `/debug/syncz`.
const ISTIOD_URL: &str = "http://127.0.0.1:15014";
/// One command's run, generous: a debug build on a busy machine.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long proxy-status may take to show every proxy in sync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "istioctl_ztunnel_config_shows_what_each_ztunnel_holds",
            run: ztunnel_config,
        },
        Scenario {
            name: "istioctl_proxy_status_lists_every_ztunnel_in_sync",
            run: proxy_status,
        },
        Scenario {
            name: "istioctl_describe_says_how_traffic_to_a_pod_and_a_service_flows",
            run: describe,
        },
        Scenario {
            name: "istioctl_connections_shows_live_connections_both_ends",
            run: connections,
        },
        Scenario {
            name: "istioctl_analyze_reads_the_local_clusters_directory",
            run: analyze,
        },
    ]
}

/// Runs `istioctl-rs args` beside `proxy`; a non-zero exit is an error.
fn run(cluster: &dyn Cluster, proxy: &ProxyRef, args: &[&str]) -> Result<String, ProbeError> {
    let out = cluster.istioctl(proxy, args, COMMAND_TIMEOUT)?;
    if !out.success() {
        return Err(failed(args, &out));
    }
    Ok(out.stdout)
}

fn failed(args: &[&str], out: &ExecOutput) -> ProbeError {
    ProbeError::Unexpected {
        what: format!("istioctl-rs {}", args.join(" ")),
        detail: format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            out.code, out.stdout, out.stderr
        ),
    }
}

/// A saved dump, removed when dropped.
struct Saved(std::path::PathBuf);

impl Saved {
    /// `text` in the temporary directory, as `istioctl-rs-<pid>-<name>`.
    fn new(text: &str, name: &str) -> Result<Saved, ProbeError> {
        let name = format!("istioctl-rs-{}-{name}", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).map_err(|e| ProbeError::Unexpected {
            what: format!("saving a config dump to {}", path.display()),
            detail: e.to_string(),
        })?;
        Ok(Saved(path))
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn json(args: &[&str], text: &str) -> Result<Value, ProbeError> {
    serde_json::from_str(text).map_err(|e| ProbeError::Unexpected {
        what: format!("istioctl-rs {} (not JSON)", args.join(" ")),
        detail: format!("{e}\n{text}"),
    })
}

/// A table's header cells (split on blanks: `POD NAME` is two words) and
/// its rows, each split on blanks.
fn table(text: &str) -> (Vec<&str>, Vec<Vec<&str>>) {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    (
        header,
        lines.map(|l| l.split_whitespace().collect()).collect(),
    )
}

fn expect_header(args: &[&str], text: &str, want: &[&str]) -> Result<(), ProbeError> {
    let (header, _) = table(text);
    if header != want {
        return Err(ProbeError::Unexpected {
            what: format!("istioctl-rs {} header", args.join(" ")),
            detail: format!("want {want:?}, got {header:?}\n{text}"),
        });
    }
    Ok(())
}

/// `ztunnel-config` against every node's ztunnel: the workload table lists
/// each enrolled pod of the fixture once, with its address, node and HBONE;
/// of one saved dump (`--file`), `-o json` holds as many workloads as the
/// table has rows and the dump has; `--address`
/// narrows to one; the service, policy and certificate tables have
/// upstream's headers (the certificate table a row for each identity of
/// the node's pods); `all -o json` is the whole dump. Pointed at a port that
/// is not an admin port, it fails naming the URL.
fn ztunnel_config(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let enrolled: Vec<&PodInfo> = f
        .servers
        .iter()
        .chain(&f.clients)
        .chain([&f.other, &f.peer])
        .collect();
    let mut evidence = Vec::new();
    for node in cluster.nodes() {
        let ztunnel = ProxyRef::Ztunnel { node: node.clone() };
        let args = ["zc", "workload", "--admin", ADMIN_URL];
        let text = run(cluster, &ztunnel, &args)?;
        let header = [
            "NAMESPACE",
            "POD",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ];
        expect_header(&args, &text, &header)?;
        let (_, rows) = table(&text);
        for pod in &enrolled {
            let ip = pod.ip.to_string();
            let want = [
                pod.namespace.as_str(),
                pod.name.as_str(),
                ip.as_str(),
                pod.node.as_str(),
            ];
            let found = rows
                .iter()
                .filter(|r| r.len() == 6 && r[..4] == want && r[5] == "HBONE")
                .count();
            if found != 1 {
                return Err(ProbeError::Unexpected {
                    what: format!("istioctl-rs zc workload on {node}"),
                    detail: format!("{found} rows for {want:?} with protocol HBONE:\n{text}"),
                });
            }
        }

        // The table and -o json of one saved dump (`--file`): the live one
        // changes while earlier scenarios' waypoints go away.
        let args = ["zc", "all", "--admin", ADMIN_URL, "-o", "json"];
        let saved = run(cluster, &ztunnel, &args)?;
        let dump = json(&args, &saved)?;
        for key in ["workloads", "services", "policies", "certificates"] {
            if dump.get(key).is_none() {
                return Err(ProbeError::Unexpected {
                    what: format!("istioctl-rs {} on {node}", args.join(" ")),
                    detail: format!("no {key:?} in the dump"),
                });
            }
        }
        let file = Saved::new(&saved, &format!("dump-{node}.json"))?;
        let path = file.0.to_string_lossy().into_owned();
        let args = ["zc", "workload", "--file", &path];
        let text = run(cluster, &ztunnel, &args)?;
        let (_, saved_rows) = table(&text);
        let args = ["zc", "workload", "--file", &path, "-o", "json"];
        let listed = json(&args, &run(cluster, &ztunnel, &args)?)?;
        let count = listed.as_array().map_or(0, Vec::len);
        let in_dump = dump["workloads"].as_array().map_or(0, Vec::len);
        if count != saved_rows.len() || count != in_dump {
            return Err(ProbeError::Unexpected {
                what: format!("istioctl-rs {} on {node}", args.join(" ")),
                detail: format!(
                    "{count} workloads, the table of the same dump has {} rows, the dump {in_dump}",
                    saved_rows.len()
                ),
            });
        }

        let server = f.servers[0].ip.to_string();
        let args = ["zc", "workload", "--admin", ADMIN_URL, "--address", &server];
        let text = run(cluster, &ztunnel, &args)?;
        let (_, one) = table(&text);
        if one.len() != 1 || one[0].get(2) != Some(&server.as_str()) {
            return Err(ProbeError::Unexpected {
                what: format!("istioctl-rs {} on {node}", args.join(" ")),
                detail: format!("want one row for {server}, got {one:?}"),
            });
        }

        let args = ["zc", "service", "--admin", ADMIN_URL];
        let text = run(cluster, &ztunnel, &args)?;
        let header = [
            "NAMESPACE",
            "SERVICE",
            "NAME",
            "SERVICE",
            "VIP",
            "WAYPOINT",
            "ENDPOINTS",
        ];
        expect_header(&args, &text, &header)?;
        let (_, services) = table(&text);
        if !services
            .iter()
            .any(|r| r.get(2) == Some(&f.service_vip.as_str()))
        {
            return Err(ProbeError::Unexpected {
                what: format!("istioctl-rs zc service on {node}"),
                detail: format!(
                    "no row for the fixture's service {}:\n{text}",
                    f.service_vip
                ),
            });
        }

        let args = ["zc", "policy", "--admin", ADMIN_URL];
        let text = run(cluster, &ztunnel, &args)?;
        expect_header(
            &args,
            &text,
            &["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE"],
        )?;

        let args = ["zc", "certificate", "--admin", ADMIN_URL];
        let text = run(cluster, &ztunnel, &args)?;
        let header = [
            "CERTIFICATE",
            "NAME",
            "TYPE",
            "STATUS",
            "VALID",
            "CERT",
            "SERIAL",
            "NUMBER",
            "NOT",
            "AFTER",
            "NOT",
            "BEFORE",
        ];
        expect_header(&args, &text, &header)?;
        let (_, certificates) = table(&text);
        if certificates.is_empty() {
            return Err(ProbeError::Unexpected {
                what: format!("istioctl-rs zc certificate on {node}"),
                detail: format!("no certificate, though pods of the mesh run there:\n{text}"),
            });
        }

        evidence.push(format!(
            "{node}: {} workloads, {} services, {} certificates",
            rows.len(),
            services.len(),
            certificates.len()
        ));
    }

    // Bad input: the metrics port answers, but not with a config dump.
    let node = cluster.nodes().into_iter().next().unwrap_or_default();
    let metrics = "http://127.0.0.1:15020";
    let args = ["zc", "workload", "--admin", metrics];
    let out = cluster.istioctl(&ProxyRef::Ztunnel { node }, &args, COMMAND_TIMEOUT)?;
    if out.code != Some(1) || !out.stderr.contains("127.0.0.1:15020") {
        return Err(ProbeError::Unexpected {
            what: "istioctl-rs zc workload pointed at the metrics port".into(),
            detail: format!(
                "want exit 1 naming the URL; got {:?}, stderr:\n{}",
                out.code, out.stderr
            ),
        });
    }
    Ok(format!(
        "ztunnel-config on every node ({}); each enrolled pod listed once with HBONE; \
         --admin at the metrics port: exit 1, {}",
        evidence.join("; "),
        out.stderr.lines().next().unwrap_or_default().trim()
    ))
}

/// `proxy-status` against istiod-rs: upstream's leading columns, one
/// `ztunnel<...>.istio-system` row per node (its pod name), every one in sync (the mesh is idle
/// between scenarios, so each ztunnel catches up); `-o json` lists them
/// in sync, with their nodes.
/// The nodes whose ztunnel is in sync in `istioctl-rs ps -o json`
/// (each proxy: what `/debug/syncz` says of it, flattened, and
/// `in_sync`), sorted, each once.
pub fn ztunnel_nodes_in_sync(report: &Value) -> Vec<String> {
    let mut nodes: Vec<String> = report["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["proxy"]
                .as_str()
                .is_some_and(|id| id.starts_with("ztunnel~"))
        })
        .filter(|p| p["in_sync"] == true)
        .filter_map(|p| p["node"].as_str().map(str::to_string))
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

fn proxy_status(cluster: &dyn Cluster, _f: &L4Fixture) -> Result<String, ProbeError> {
    let nodes = cluster.nodes();
    let args = ["ps", "--istiod", ISTIOD_URL];
    let text = eventually(
        "every ztunnel in sync in proxy-status",
        SYNC_TIMEOUT,
        || {
            let text = run(cluster, &ProxyRef::Istiod, &args)?;
            let (_, rows) = table(&text);
            let ztunnels: Vec<_> = rows
                .iter()
                .filter(|r| {
                    r.first().is_some_and(|name| {
                        name.starts_with("ztunnel") && name.ends_with(".istio-system")
                    })
                })
                .collect();
            let in_sync = ztunnels.iter().filter(|r| r.last() == Some(&"yes")).count();
            Ok(if ztunnels.len() == nodes.len() && in_sync == nodes.len() {
                Ok(text)
            } else {
                Err(format!(
                    "{} ztunnel rows, {in_sync} in sync, {} nodes:\n{text}",
                    ztunnels.len(),
                    nodes.len()
                ))
            })
        },
    )?;
    let (header, rows) = table(&text);
    let leading = header.iter().take(3).copied().collect::<Vec<_>>();
    let trailing = header
        .iter()
        .rev()
        .take(2)
        .rev()
        .copied()
        .collect::<Vec<_>>();
    if leading != ["NAME", "WADS", "WDS"] || trailing != ["IN", "SYNC"] {
        return Err(ProbeError::Unexpected {
            what: "istioctl-rs ps header".into(),
            detail: format!("want NAME WADS WDS ... IN SYNC, got {header:?}"),
        });
    }

    let args = ["ps", "--istiod", ISTIOD_URL, "-o", "json"];
    let report = json(&args, &run(cluster, &ProxyRef::Istiod, &args)?)?;
    let listed = ztunnel_nodes_in_sync(&report);
    let mut want = nodes.clone();
    want.sort();
    if listed != want {
        return Err(ProbeError::Unexpected {
            what: format!("istioctl-rs {}", args.join(" ")),
            detail: format!("ztunnels in sync on nodes {listed:?}, want {want:?}\n{report}"),
        });
    }
    Ok(format!(
        "proxy-status: {} rows, one ztunnel per node ({}) in sync, in the table and in -o json",
        rows.len(),
        want.join(", ")
    ))
}

/// `x describe` against the ztunnel of a server's node: the server is
/// enrolled on its node, with its identity and a valid certificate held
/// there, and is an endpoint of the fixture's service; the opted-out pod is
/// not enrolled; the service lists both servers as healthy endpoints.
/// `-o json` carries the same facts.
fn describe(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let server = &f.servers[0];
    let ztunnel = ProxyRef::Ztunnel {
        node: server.node.clone(),
    };
    let target = format!("{}.{}", server.name, server.namespace);
    let args = [
        "x", "describe", "pod", &target, "--admin", ADMIN_URL, "-o", "json",
    ];
    let pod = json(&args, &run(cluster, &ztunnel, &args)?)?;
    let identity = format!(
        "spiffe://{}/ns/{}/sa/server",
        f.trust_domain, server.namespace
    );
    let service = format!("{AMBIENT_NS}/{SERVICE}");
    let facts = [
        pod["enrolled"] == true,
        pod["node"] == server.node.as_str(),
        pod["identity"] == identity.as_str(),
        pod["certificate"]["valid"] == true,
        pod["services"].as_array().into_iter().flatten().any(|s| {
            format!(
                "{}/{}",
                s["namespace"].as_str().unwrap_or_default(),
                s["name"].as_str().unwrap_or_default()
            ) == service
        }),
    ];
    if facts.contains(&false) {
        return Err(ProbeError::Unexpected {
            what: format!("istioctl-rs {}", args.join(" ")),
            detail: format!(
                "want enrolled on {}, identity {identity}, a valid certificate, service {service}; facts {facts:?}:\n{pod:#}",
                server.node
            ),
        });
    }
    let args = ["x", "describe", "pod", &target, "--admin", ADMIN_URL];
    let screen = run(cluster, &ztunnel, &args)?;

    let opted_out = format!("{}.{}", f.opted_out.name, f.opted_out.namespace);
    let args = [
        "x", "describe", "pod", &opted_out, "--admin", ADMIN_URL, "-o", "json",
    ];
    let out = json(&args, &run(cluster, &ztunnel, &args)?)?;
    if out["enrolled"] != false {
        return Err(ProbeError::Unexpected {
            what: format!("istioctl-rs {}", args.join(" ")),
            detail: format!("the opted-out pod described as enrolled:\n{out:#}"),
        });
    }

    let args = [
        "x", "describe", "svc", SERVICE, "-n", AMBIENT_NS, "--admin", ADMIN_URL, "-o", "json",
    ];
    let svc = json(&args, &run(cluster, &ztunnel, &args)?)?;
    let mut endpoints: Vec<(String, String)> = svc["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (text("name"), text("status"))
        })
        .collect();
    endpoints.sort();
    let want: Vec<(String, String)> = f
        .servers
        .iter()
        .map(|s| (s.name.clone(), "Healthy".to_string()))
        .collect();
    if endpoints != want || svc["vips"][0] != f.service_vip.as_str() {
        return Err(ProbeError::Unexpected {
            what: format!("istioctl-rs {}", args.join(" ")),
            detail: format!(
                "want VIP {} and endpoints {want:?}:\n{svc:#}",
                f.service_vip
            ),
        });
    }
    let missing = format!("nope.{AMBIENT_NS}");
    let args = ["x", "describe", "pod", &missing, "--admin", ADMIN_URL];
    let out = cluster.istioctl(&ztunnel, &args, COMMAND_TIMEOUT)?;
    if out.code != Some(1) || !out.stderr.contains(&format!("{AMBIENT_NS}/nope")) {
        return Err(failed(&args, &out));
    }
    Ok(format!(
        "describe pod {target}: enrolled on {}, {identity}, certificate valid, endpoint of {service}; \
         {opted_out}: not enrolled; service {service}: {} endpoints healthy; unknown pod: exit 1 naming it. \
         Screen:\n{screen}",
        server.node,
        want.len()
    ))
}

/// How long the load of `connections` runs: long enough to be seen.
const LOAD: Duration = Duration::from_secs(20);

/// `zc connections` while client-0 (first node) keeps connections open to
/// server-1 (second node): the client's ztunnel lists them Outbound, HBONE,
/// with the client's and the server's identities and bytes sent; the
/// server's ztunnel lists them Inbound.
fn connections(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let (client, server) = (&f.clients[0], &f.servers[1]);
    let target = L4Fixture::at(server, ECHO_HELLO);
    let src = format!("spiffe://{}/ns/{AMBIENT_NS}/sa/client", f.trust_domain);
    let dst = format!("spiffe://{}/ns/{AMBIENT_NS}/sa/server", f.trust_domain);
    let seen = |node: &str, workload: String, direction: &'static str| {
        let ztunnel = ProxyRef::Ztunnel {
            node: node.to_string(),
        };
        let args = ["zc", "connections", "--admin", ADMIN_URL, "--raw"];
        let what = format!(
            "{direction} connections of {workload} in istioctl-rs zc connections on {node}"
        );
        eventually(&what, SYNC_TIMEOUT, || {
            let text = run(cluster, &ztunnel, &args)?;
            let (header, rows) = table(&text);
            let line = rows.iter().find(|r| {
                r.first() == Some(&workload.as_str())
                    && r.get(1) == Some(&direction)
                    && r.contains(&"HBONE")
                    && r.contains(&src.as_str())
                    && r.contains(&dst.as_str())
            });
            Ok(match line {
                Some(line) => Ok(format!("{}: {}", header.join(" "), line.join(" "))),
                None => Err(text),
            })
        })
    };
    let client_workload = format!("{}.{}", client.name, client.namespace);
    let server_workload = format!("{}.{}", server.name, server.namespace);
    let ((outbound, inbound), load) =
        super::l4::under_load(cluster, client, &target, LOAD, || {
            Ok((
                seen(&client.node, client_workload.clone(), "Outbound")?,
                seen(&server.node, server_workload.clone(), "Inbound")?,
            ))
        })?;
    super::l4::load_flowed("the load while connections were listed", &load)?;
    Ok(format!(
        "client-0 -> server-1 under load: on {}: {outbound}; on {}: {inbound}",
        client.node, server.node
    ))
}

/// `analyze` over the directory istiod-rs reads the local cluster from
/// (`-R`, `-o json`): every document parses (no exit 65), the answer is
/// upstream's JSON list; and a policy whose selector matches no pod,
/// written next to it, is reported IST0127 naming it.
fn analyze(cluster: &dyn Cluster, _f: &L4Fixture) -> Result<String, ProbeError> {
    let Some(dir) = cluster.config_directory() else {
        return Err(ProbeError::Unexpected {
            what: "istioctl-rs analyze".into(),
            detail: "this cluster has no directory of YAML to analyze".into(),
        });
    };
    let dir = dir.to_string_lossy().into_owned();
    let args = ["analyze", "-R", &dir, "-o", "json"];
    let out = cluster.istioctl(&ProxyRef::Istiod, &args, COMMAND_TIMEOUT)?;
    // 0: nothing at or above Error; 79: something is (upstream's codes).
    if !matches!(out.code, Some(0 | 79)) {
        return Err(failed(&args, &out));
    }
    let exit = out.code;
    let messages = json(&args, &out.stdout)?;
    let count = messages
        .as_array()
        .map(Vec::len)
        .ok_or_else(|| failed(&args, &out))?;

    let typo = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: typo, namespace: {AMBIENT_NS}}}
spec:
  selector: {{matchLabels: {{app: srever}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: [nobody]}}}}]}}]
"
    );
    let file = Saved::new(&typo, "typo.yaml")?;
    let path = file.0.to_string_lossy().into_owned();
    let args = ["analyze", &path];
    let out = cluster.istioctl(&ProxyRef::Istiod, &args, COMMAND_TIMEOUT)?;
    let finding = out.stdout.lines().find(|l| {
        l.contains("[IST0127]") && l.contains(&format!("AuthorizationPolicy {AMBIENT_NS}/typo"))
    });
    let Some(finding) = finding else {
        return Err(failed(&args, &out));
    };
    Ok(format!(
        "analyze -R of the cluster's directory: exit {exit:?}, {count} message(s); a selector typo: {finding}"
    ))
}
