//! `ztunnel-config` and `completion`: the tables of a recorded config dump
//! (golden), the filters, -o json|yaml, a dump of the wrong shape named by
//! its field, and the binary against proxy-core's real admin server (the one
//! ztunnel-rs runs) on loopback, an unreachable URL and a non-admin port;
//! `connections` from a served `workloadState` (golden), its filters, and
//! bad input named by URL or file and field.

use crate::support::binary;
use crate::support::golden;

use std::process::Output;
use std::time::{Duration, SystemTime};

use binary::{failed, istioctl, text};
use istioctl_rs::ztunnel_config::{self, ConfigDump, Output as Format, View, WorkloadFilter};
use proxy_core::listener::ListenerLimits;
use proxy_core::store::{PortMapping, Service, Workload, WorkloadStore};
use serde_json::Value;

const DUMP: &str = "tests/testdata/ztunnel-config-dump.json";
const GOLDEN: &str = "tests/golden/ztunnel-config-all.txt";

fn dump() -> ConfigDump {
    ConfigDump::parse(&std::fs::read(DUMP).unwrap()).unwrap()
}

/// 2026-12-07T00:00:00Z: inside the recorded leaf's validity.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_601_600)
}

fn render(view: View, format: Format) -> String {
    ztunnel_config::render(&dump(), &view, format, now()).unwrap()
}

/// The first column of each row after the header, with the second.
fn rows(table: &str) -> Vec<(String, String)> {
    table
        .lines()
        .skip(1)
        .map(|l| {
            let mut cells = l.split_whitespace();
            (
                cells.next().unwrap_or_default().to_string(),
                cells.next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[test]
fn the_tables_of_a_recorded_dump_are_golden() {
    let text = render(View::All, Format::Short);
    golden::check(
        GOLDEN,
        &text,
        "the ztunnel-config tables",
        "cargo test -p istioctl-rs --test integration ztunnel_config",
    );
}

#[test]
fn the_columns_say_what_upstream_says() {
    let workloads = render(View::Workload(WorkloadFilter::default()), Format::Short);
    let header: Vec<&str> = workloads.lines().next().unwrap().split("  ").collect();
    assert!(
        workloads.starts_with("NAMESPACE POD NAME      ADDRESS        NODE   WAYPOINT PROTOCOL\n"),
        "{header:?}\n{workloads}"
    );
    // Sorted by namespace.name; the waypoint by service hostname or VIP;
    // no address: the hostname; an unknown waypoint: NA.
    assert!(workloads.contains("demo      web-0         10.10.1.11     node-a waypoint HBONE\n"));
    assert!(workloads.contains("demo      web-1         10.10.2.12     node-b waypoint HBONE\n"));
    assert!(workloads.contains("legacy    db            db.example.com        NA       TCP\n"));
    let services = render(View::Service { namespace: None }, Format::Short);
    assert!(
        services.contains("kubernetes   10.96.0.1,fd00::1 None     0/0\n"),
        "{services}"
    );
    // One of two endpoints healthy.
    assert!(
        services.contains("web          10.96.0.10        waypoint 1/2\n"),
        "{services}"
    );
    let certs = render(View::Certificate, Format::Short);
    let lines: Vec<&str> = certs.lines().collect();
    assert!(
        lines[1].contains("Leaf     Available       true           1b23c "),
        "{certs}"
    );
    assert!(
        lines[2]
            .contains("Root     Available       true           e59e4f03c12f2a5bc6469a34f2605613"),
        "{certs}"
    );
    assert!(
        lines[3].contains("NA       Unavailable     false          NA "),
        "{certs}"
    );
    // After the leaf expired, it is not valid any more.
    let later = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_601_600 + 2 * 86_400);
    let expired =
        ztunnel_config::render(&dump(), &View::Certificate, Format::Short, later).unwrap();
    assert!(
        expired
            .lines()
            .nth(1)
            .unwrap()
            .contains("Available       false"),
        "{expired}"
    );
}

#[test]
fn filters_narrow_each_view() {
    let workloads = |filter: WorkloadFilter| rows(&render(View::Workload(filter), Format::Short));
    assert_eq!(
        workloads(WorkloadFilter {
            namespace: Some("DEMO".into()),
            ..WorkloadFilter::default()
        }),
        vec![
            pair("demo", "waypoint-7d9f"),
            pair("demo", "web-0"),
            pair("demo", "web-1")
        ]
    );
    assert_eq!(
        workloads(WorkloadFilter {
            node: Some("node-b".into()),
            ..WorkloadFilter::default()
        }),
        vec![pair("client", "curl-5c"), pair("demo", "web-1")]
    );
    assert_eq!(
        workloads(WorkloadFilter {
            address: Some("10.10.1.11".into()),
            namespace: Some("demo".into()),
            node: Some("node-a".into()),
        }),
        vec![pair("demo", "web-0")]
    );
    assert_eq!(
        workloads(WorkloadFilter {
            address: Some("10.10.1.11".into()),
            node: Some("node-b".into()),
            ..WorkloadFilter::default()
        }),
        vec![]
    );
    let services = rows(&render(
        View::Service {
            namespace: Some("default".into()),
        },
        Format::Short,
    ));
    assert_eq!(services, vec![pair("default", "kubernetes")]);
    let policies = rows(&render(
        View::Policy {
            namespace: Some("demo".into()),
        },
        Format::Short,
    ));
    assert_eq!(policies, vec![pair("demo", "allow-curl")]);
}

#[test]
fn json_and_yaml_give_the_filtered_items_as_served() {
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(DUMP).unwrap()).unwrap();
    let node_a = View::Workload(WorkloadFilter {
        node: Some("node-a".into()),
        ..WorkloadFilter::default()
    });
    let json: Value = serde_json::from_str(&render(node_a.clone(), Format::Json)).unwrap();
    // Sorted as the table; every field kept, not only the columns'.
    assert_eq!(
        json,
        Value::Array(vec![
            recorded["workloads"][2].clone(),
            recorded["workloads"][0].clone()
        ])
    );
    let yaml = render(node_a, Format::Yaml);
    assert!(yaml.starts_with("- "), "{yaml}");
    assert!(yaml.contains("canonicalRevision: v1"), "{yaml}");
    assert!(!yaml.contains("curl-5c"), "{yaml}");

    let policies: Value =
        serde_json::from_str(&render(View::Policy { namespace: None }, Format::Json)).unwrap();
    assert_eq!(policies[0]["name"], "deny-all");
    assert_eq!(policies[1]["dryRun"], false);
    let certs: Value = serde_json::from_str(&render(View::Certificate, Format::Json)).unwrap();
    assert_eq!(certs, recorded["certificates"]);
    // `all`: the whole dump, sections upstream's tables do not show included.
    let all: Value = serde_json::from_str(&render(View::All, Format::Json)).unwrap();
    assert_eq!(all, recorded);
    assert!(render(View::All, Format::Yaml).contains("stagedServices:"));
}

#[test]
fn a_dump_of_the_wrong_shape_names_the_field() {
    let error = |text: &str| ConfigDump::parse(text.as_bytes()).unwrap_err().to_string();
    let missing_uid = r#"{"workloads": [{"uid": "a", "name": "a", "namespace": "n"}, {"name": "b", "namespace": "n"}]}"#;
    let e = error(missing_uid);
    assert!(e.contains("`workloads[1]`") && e.contains("uid"), "{e}");
    let e = error(r#"{"services": [{"name": "s", "namespace": "n", "hostname": 7}]}"#);
    assert!(e.contains("`services[0].hostname`"), "{e}");
    let e =
        error(r#"{"certificates": {"x": {"identity": "i", "certChain": [{"serialNumber": 5}]}}}"#);
    assert!(
        e.contains(r#"`certificates["x"].certChain[0].serialNumber`"#),
        "{e}"
    );
    let e = error(r#"{"policies": 3}"#);
    assert!(e.contains("`policies` is neither a list nor a map"), "{e}");
    assert!(error("[]").contains("not a JSON object"));
    assert!(error("<html>").contains("not JSON"));
    // Sections upstream's dump may lack are empty, not errors; maps are
    // read like lists (as upstream does).
    let dump =
        ConfigDump::parse(br#"{"workloads": {"k": {"uid": "u", "name": "w", "namespace": "n"}}}"#)
            .unwrap();
    assert_eq!(dump.workloads.len(), 1);
    assert!(dump.services.is_empty() && dump.certificates.is_empty());
}

#[test]
fn the_binary_reads_a_file_and_needs_a_ztunnel() {
    let out = istioctl(&["ztunnel-config", "policy", "--file", DUMP]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("NAMESPACE POLICY NAME ACTION SCOPE\n"));
    let fails = |args: &[&str], code: i32, needle: &str| failed(&istioctl(args), code, &[needle]);
    // Neither: a ztunnel pod on Kubernetes, and without a cluster what to give.
    fails(
        &["zc", "workloads"],
        1,
        "without a Kubernetes cluster, give the ztunnel's admin URL (--admin http://127.0.0.1:15000) or a saved /config_dump (-f FILE)",
    );
    fails(
        &["zc", "w", "ztunnel-a", "--node", "n"],
        2,
        "cannot be used with",
    );
    fails(
        &["zc", "w", "--node", "n", "-f", DUMP],
        2,
        "cannot be used with",
    );
    fails(
        &["zc", "w", "--admin", "127.0.0.1:15000"],
        2,
        "expected http://HOST:PORT",
    );
    let missing = "tests/testdata/missing.json";
    fails(&["zc", "w", "-f", missing], 1, missing);
}

#[test]
fn an_unreachable_admin_url_is_named_with_what_to_check() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = istioctl(&["zc", "all", "--admin", &url]);
    let named = format!("cannot reach the ztunnel admin endpoint at {url}");
    failed(
        &out,
        1,
        &[&named, "admin port is 15000", "ztunnel is running"],
    );
}

fn workload(ns: &str, name: &str, ip: [u8; 4], node: &str, service: &str) -> Workload {
    let mut w = Workload::try_from(api::workload::Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        addresses: vec![ip.to_vec()],
        service_account: "sa".into(),
        node: node.into(),
        tunnel_protocol: api::workload::TunnelProtocol::Hbone as i32,
        ..Default::default()
    })
    .unwrap();
    w.services.insert(
        service.parse().unwrap(),
        vec![PortMapping {
            service_port: 80,
            target_port: 8080,
        }],
    );
    w
}

/// The binary, off the test's runtime (which serves the admin endpoint).
async fn istioctl_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        istioctl(&args)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn against_the_admin_server_ztunnel_rs_runs() {
    let key = "demo/web.demo.svc.cluster.local";
    let (servers, _listeners, shutdown) =
        proxy_core::testing::loopback_admin_servers(test_limits(), admin_store()).await;
    let admin = format!("http://{}", servers.addrs.admin);
    let args = |rest: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["ztunnel-config".into()];
        v.extend(rest.iter().map(|s| s.to_string()));
        v.extend(["--admin".to_string(), admin.clone()]);
        v
    };

    let out = istioctl_async(args(&["workload", "--workload-node", "node-a"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "NAMESPACE POD NAME ADDRESS   NODE   WAYPOINT PROTOCOL\n\
         demo      web-0    10.1.0.11 node-a None     HBONE\n"
    );
    let out = istioctl_async(args(&["service"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS\n\
         demo      web          10.96.0.10  None     2/2\n"
    );
    let out = istioctl_async(args(&["workload", "-o", "json", "--address", "10.1.0.12"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["name"], "db-0");
    assert_eq!(json[0]["services"][0], key);
    // No certificate source in this server: an empty table.
    let out = istioctl_async(args(&["certificate"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);

    // The readiness port is no admin endpoint: its answer is named.
    let not_admin = format!("http://{}", servers.addrs.readiness);
    let out = istioctl_async(vec![
        "zc".into(),
        "all".into(),
        "--admin".into(),
        not_admin.clone(),
    ])
    .await;
    let answer = format!("{not_admin}/config_dump answered 404");
    failed(&out, 1, &[&answer, "a ztunnel admin endpoint"]);

    shutdown.cancel();
    servers.join().await;
}

#[test]
fn completion_scripts_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef istioctl-rs"),
        ("fish", "complete -c istioctl-rs"),
    ] {
        let out = istioctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("ztunnel-config"), "{shell}");
        assert!(script.contains("workload-namespace"), "{shell}");
    }
    let out = istioctl(&["completion", "powershell"]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn certificates_as_the_cert_manager_dumps_them() {
    use proxy_core::admin::CertificateSource;
    use proxy_core::testing::{TestCa, TestSigner};
    let ca = std::sync::Arc::new(TestCa::new("cluster.local"));
    let manager = TestSigner::new(ca.clone()).manager(Default::default());
    let id = ca.identity("demo", "web");
    let cert = manager.fetch(&id).await.unwrap();
    let served = serde_json::json!({ "certificates": manager.certificates().await });
    let dump = ConfigDump::parse(served.to_string().as_bytes()).unwrap();
    let table = ztunnel_config::render(&dump, &View::Certificate, Format::Short, SystemTime::now())
        .unwrap();
    let serial = cert.serial_number().replace(':', "").to_ascii_lowercase();
    let serial = serial.trim_start_matches('0');
    let leaf = table.lines().nth(1).unwrap();
    let cells: Vec<&str> = leaf.split_whitespace().collect();
    assert_eq!(
        cells[..5],
        [id.to_string().as_str(), "Leaf", "Available", "true", serial],
        "{table}"
    );
    assert!(table.lines().nth(2).unwrap().contains(" Root "), "{table}");
}

/// A fixed `workloadState`, served as ztunnel-rs serves its own
/// (`ztunnel_rs::proxy::WorkloadStateDump`, the same `api` type).
struct FixedSection(&'static str, Value);

impl proxy_core::admin::DumpSection for FixedSection {
    fn key(&self) -> &'static str {
        self.0
    }

    fn dump(&self) -> Value {
        self.1.clone()
    }
}

fn connection(
    (src, original_dst, actual_dst, protocol): (&str, Option<&str>, &str, &str),
    identities: Option<(&str, &str)>,
    (sent, received, duration_ms): (u64, u64, u64),
) -> api::workload_state::Connection {
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{sa}");
    api::workload_state::Connection {
        src: src.into(),
        original_dst: original_dst.map(Into::into),
        actual_dst: actual_dst.into(),
        protocol: protocol.into(),
        src_identity: identities.map(|(s, _)| id(s)),
        dst_identity: identities.map(|(_, d)| id(d)),
        bytes_sent: Some(sent),
        bytes_received: Some(received),
        start_time: Some("2026-12-07T00:00:00Z".into()),
        duration_ms: Some(duration_ms),
    }
}

fn workload_states() -> api::workload_state::WorkloadStates {
    use api::workload_state::{Connections, WorkloadInfo, WorkloadState};
    let state = |name: &str, namespace: &str, connections| WorkloadState {
        state: "Up".into(),
        connections,
        info: WorkloadInfo {
            name: name.into(),
            namespace: namespace.into(),
            service_account: "sa".into(),
            trust_domain: "cluster.local".into(),
        },
    };
    let mesh = Some(("demo/sa/sa", "other/sa/sa"));
    let web = Connections {
        inbound: vec![
            connection(
                (
                    "10.1.0.12:50000",
                    Some("web.demo.svc.cluster.local"),
                    "10.1.0.11:8080",
                    "HBONE",
                ),
                Some(("other/sa/sa", "demo/sa/sa")),
                (13, 5, 3_723_000),
            ),
            connection(
                ("192.168.1.5:33000", None, "10.1.0.11:8080", "TCP"),
                None,
                (0, 4, 999),
            ),
        ],
        outbound: vec![connection(
            (
                "10.1.0.11:40000",
                Some("10.96.0.10:80"),
                "10.1.0.12:15008",
                "HBONE",
            ),
            mesh,
            (5, 13, 65_000),
        )],
    };
    api::workload_state::WorkloadStates::from([
        ("uid-web".to_string(), state("web-0", "demo", web)),
        (
            "uid-db".to_string(),
            state("db-0", "other", Connections::default()),
        ),
    ])
}

fn admin_store() -> WorkloadStore {
    let store = WorkloadStore::new();
    let key = "demo/web.demo.svc.cluster.local";
    store.update(|b| {
        b.insert_workload(workload("demo", "web-0", [10, 1, 0, 11], "node-a", key));
        b.insert_workload(workload("other", "db-0", [10, 1, 0, 12], "node-b", key));
        b.insert_service(
            Service::try_from(api::workload::Service {
                name: "web".into(),
                namespace: "demo".into(),
                hostname: "web.demo.svc.cluster.local".into(),
                addresses: vec![api::workload::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 10],
                }],
                ports: vec![api::workload::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
                ..Default::default()
            })
            .unwrap(),
        );
    });
    store
}

fn test_limits() -> ListenerLimits {
    ListenerLimits {
        max_connections: 16,
        max_connections_per_peer: 16,
        handshake_timeout: Duration::from_secs(5),
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn connections_against_the_admin_server() {
    let states = serde_json::to_value(workload_states()).unwrap();
    let admin = proxy_core::admin::AdminState::new(admin_store())
        .with_section(FixedSection(api::workload_state::KEY, states));
    let (servers, _listeners, shutdown) =
        proxy_core::testing::loopback_admin_servers_with(test_limits(), admin).await;
    let admin = format!("http://{}", servers.addrs.admin);
    let run = |rest: &[&str]| {
        let mut v: Vec<String> = vec!["zc".into()];
        v.extend(rest.iter().map(|s| s.to_string()));
        v.extend(["--admin".to_string(), admin.clone()]);
        istioctl_async(v)
    };

    let out = run(&["connections"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    golden::check(
        "tests/golden/ztunnel-config-connections.txt",
        &table,
        "the connections table",
        "cargo test -p istioctl-rs --test integration ztunnel_config",
    );
    // Upstream's columns first, in upstream's order.
    assert!(table.starts_with("WORKLOAD   DIRECTION LOCAL  "), "{table}");

    let out = run(&["cons", "--direction", "outbound"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = rows(&text(&out.stdout));
    assert_eq!(rows, vec![pair("web-0.demo", "Outbound")]);

    let out = run(&["connections", "--raw"]).await;
    let raw = text(&out.stdout);
    let outbound: Vec<&str> = raw
        .lines()
        .find(|l| l.contains("Outbound"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        outbound[2..5],
        ["10.1.0.11:40000", "10.1.0.12:15008", "10.96.0.10:80"],
        "{raw}"
    );

    let out = run(&["connections", "-o", "json", "--workload-namespace", "other"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["info"]["name"], "db-0");
    let out = run(&["connections", "-o", "yaml"]).await;
    assert!(
        text(&out.stdout).contains("bytesSent: 5"),
        "{}",
        text(&out.stdout)
    );

    // `all` ends with the connections, as upstream's.
    let out = run(&["all"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with(&format!("\n{table}")));

    shutdown.cancel();
    servers.join().await;
}

#[tokio::test]
async fn a_connections_dump_of_the_wrong_shape_names_where_and_the_field() {
    // Served: the URL is named.
    let bad = serde_json::json!({"u": {"state": "Up", "info": {"name": "x", "namespace": "n"},
        "connections": {"inbound": [{"src": "10.0.0.1:1", "protocol": "TCP"}]}}});
    let admin = proxy_core::admin::AdminState::new(WorkloadStore::new())
        .with_section(FixedSection(api::workload_state::KEY, bad.clone()));
    let (servers, _listeners, shutdown) =
        proxy_core::testing::loopback_admin_servers_with(test_limits(), admin).await;
    let url = format!("http://{}", servers.addrs.admin);
    let out = istioctl_async(vec![
        "zc".into(),
        "connections".into(),
        "--admin".into(),
        url.clone(),
    ])
    .await;
    let endpoint = format!("{url}/config_dump");
    failed(
        &out,
        1,
        &[
            &endpoint,
            r#"`workloadState["u"].connections.inbound[0]`"#,
            "actualDst",
        ],
    );
    shutdown.cancel();
    servers.join().await;

    // Saved: the file is named.
    let dir = std::env::temp_dir().join(format!("zc-connections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing-field.json");
    std::fs::write(
        &missing,
        serde_json::json!({ "workloadState": bad }).to_string(),
    )
    .unwrap();
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{\"workloadState\": ").unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let out = istioctl(&["zc", "connections", "-f", &path(&missing)]);
    failed(&out, 1, &[&path(&missing), "actualDst"]);
    let out = istioctl(&["zc", "connections", "-f", &path(&garbage)]);
    failed(&out, 1, &[&path(&garbage), "not JSON"]);
    let wrong = dir.join("wrong-type.json");
    std::fs::write(
        &wrong,
        r#"{"workloadState": {"u": {"state": "Up", "info": {"name": 7, "namespace": "n"}}}}"#,
    )
    .unwrap();
    let out = istioctl(&["zc", "connections", "-f", &path(&wrong)]);
    failed(&out, 1, &[r#"`workloadState["u"].info.name`"#]);
    let _ = std::fs::remove_dir_all(&dir);
}
