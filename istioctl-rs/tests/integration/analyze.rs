//! `analyze`: one golden per check over small YAML fixtures
//! (`testdata/analyze/<check>/`, the binary run from `testdata/analyze` so
//! references are relative; golden: stdout, stderr and the exit code), a
//! malformed document that loses nothing else, `--recursive`, the JSON
//! shape, and the live mode over a mock API server (one list per kind).

use crate::support::api_server;
use crate::support::golden;

use std::process::{Command, Stdio};

use api_server::{Recorded, list};
use istioctl_rs::analyze::{self, Format, Level, Options};
use serde_json::{Value, json};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/analyze");

/// stdout, stderr and exit code of `istioctl-rs analyze ARGS` run in
/// `testdata/analyze`, without a cluster.
fn analyze(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_istioctl-rs"))
        .arg("analyze")
        .args(args)
        .current_dir(TESTDATA)
        .stdin(Stdio::null())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    format!(
        "$ istioctl-rs analyze {}\n{}--- stderr\n{}--- exit {}\n",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code().unwrap()
    )
}

fn check_golden(name: &str, text: &str) {
    golden::check(
        &format!(
            "{}/tests/golden/analyze/{name}.txt",
            env!("CARGO_MANIFEST_DIR")
        ),
        text,
        "analyze output",
        "cargo test -p istioctl-rs --test integration analyze",
    );
}

/// One golden per check: the finding's line (code, level, object, file
/// and line, what to do) and the exit code (79 with an Error, else 0).
#[test]
fn each_check_has_its_golden() {
    for check in [
        "auto-waypoint-disabled",
        "unused-waypoint",
        "missing-waypoint",
        "strict-plaintext",
        "invalid-value",
        "selector-nothing",
        "port-protocol",
        "clean",
    ] {
        check_golden(check, &analyze(&[check]));
    }
}

#[test]
fn a_malformed_document_names_file_and_document_and_loses_nothing_else() {
    let text = analyze(&["-f", "malformed/good.yaml", "-f", "malformed/bad.yaml"]);
    check_golden("malformed", &text);
    // The bad document is reported with its file, number and line...
    assert!(
        text.contains("malformed/bad.yaml: document 2 (line 8): line 11:"),
        "{text}"
    );
    // ...and the documents around it, and the other file, are analyzed.
    assert!(text.contains("AuthorizationPolicy shop/typo"), "{text}");
    assert!(
        text.contains("AuthorizationPolicy shop/stray-field"),
        "{text}"
    );
}

#[test]
fn a_parse_error_alone_exits_65_unless_ignore_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: [\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let text = analyze(&[path]);
    assert!(text.ends_with("--- exit 65\n"), "{text}");
    assert!(text.contains("broken.yaml: document 1 (line 1)"), "{text}");
    assert!(
        text.contains("(but 1 document could not be parsed)"),
        "{text}"
    );
    let text = analyze(&["--ignore-unknown", path]);
    assert!(text.ends_with("--- exit 0\n"), "{text}");
}

#[test]
fn directories_are_read_one_level_unless_recursive() {
    let flat = analyze(&["tree"]);
    let recursive = analyze(&["--recursive", "tree"]);
    check_golden("tree", &flat);
    check_golden("tree-recursive", &recursive);
    assert!(!flat.contains("nested.yaml"), "{flat}");
    assert!(
        recursive.contains("(PeerAuthentication shop/nobody tree/sub/nested.yaml:1)"),
        "{recursive}"
    );
}

#[test]
fn thresholds_filter_output_and_set_the_exit_code() {
    // A Warning: shown, exit 0 by default; 79 with --failure-threshold Warning.
    assert!(analyze(&["selector-nothing"]).ends_with("--- exit 0\n"));
    let strict = analyze(&["--failure-threshold", "warning", "selector-nothing"]);
    assert!(strict.ends_with("--- exit 79\n"), "{strict}");
    // Hidden below the output threshold, still counted for the exit code.
    let hidden = analyze(&[
        "--output-threshold",
        "Error",
        "--failure-threshold",
        "Warning",
        "selector-nothing",
    ]);
    assert!(!hidden.contains("IST0127"), "{hidden}");
    assert!(hidden.ends_with("--- exit 79\n"), "{hidden}");
}

#[test]
fn json_has_upstreams_fields() {
    let out = Command::new(env!("CARGO_BIN_EXE_istioctl-rs"))
        .args([
            "analyze",
            "-o",
            "json",
            "selector-nothing",
            "unused-waypoint",
        ])
        .current_dir(TESTDATA)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let messages: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        messages,
        json!([
            {
                "code": "IST0127",
                "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0127/?ref=istioctl-analyze",
                "level": "Warning",
                "message": "No matching workloads for this resource with the following labels: app=wbe,version=v1",
                "origin": "AuthorizationPolicy shop/typo",
                "reference": "selector-nothing/input.yaml:12"
            },
            {
                "code": "IRS0005",
                "level": "Warning",
                "message": "Waypoint shop/forgotten is bound to nothing: no Namespace, Service or Pod names it (label istio.io/use-waypoint) and no workload runs as its istio.io/for-service-account. Label what it should serve, or delete it (istioctl-rs waypoint delete -n shop forgotten).",
                "origin": "Gateway shop/forgotten",
                "reference": "unused-waypoint/input.yaml:13"
            }
        ])
    );
    // Tab-indented, as upstream's json.MarshalIndent(ms, "", "\t").
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("[\n\t{\n\t\t\"code\""));
}

#[test]
fn our_codes_never_take_upstreams_prefix() {
    for code in analyze::ALL_CODES {
        let upstream = code.code.starts_with("IST");
        assert!(upstream || code.code.starts_with("IRS"), "{code:?}");
    }
}

fn options(namespace: Option<&str>) -> Options {
    Options {
        files: Vec::new(),
        recursive: false,
        namespace: namespace.map(String::from),
        output_threshold: Level::Info,
        failure_threshold: Level::Error,
        format: Format::Log,
        colorize: false,
        ignore_unknown: false,
    }
}

/// A cluster: an L7 rule no waypoint serves in namespace quiet, an unused
/// waypoint in namespace shop; GRPCRoute's CRD is not installed (404).
fn cluster(r: &Recorded) -> (u16, Value) {
    let ns = |name: &str, labels: Value| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    match r.path.as_str() {
        "/api/v1/namespaces" => list(vec![
            ns(
                "quiet",
                json!({"istio.io/dataplane-mode": "ambient", "istio.io/auto-waypoint": "disabled"}),
            ),
            ns("shop", json!({"istio.io/dataplane-mode": "ambient"})),
        ]),
        "/api/v1/services" => list(vec![json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": "quiet"},
            "spec": {"selector": {"app": "api"}, "clusterIP": "10.96.0.13",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        })]),
        "/api/v1/pods" => list(vec![json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-0", "namespace": "quiet", "labels": {"app": "api"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "api", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": "10.40.0.5", "conditions": [{"type": "Ready", "status": "True"}]}
        })]),
        "/apis/gateway.networking.k8s.io/v1/gateways" => list(vec![json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "forgotten", "namespace": "shop"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            "status": {"addresses": [{"type": "Hostname", "value": "forgotten.shop.svc.cluster.local"}]}
        })]),
        "/apis/gateway.networking.k8s.io/v1/grpcroutes" => api_server::not_found(),
        "/apis/security.istio.io/v1/authorizationpolicies" => list(vec![json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "get-only", "namespace": "quiet"},
            "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "api"}],
                     "action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}
        })]),
        _ => list(vec![]),
    }
}

#[tokio::test]
async fn live_lists_every_kind_once_and_filters_by_namespace() {
    let (client, requests) = api_server::client(cluster);
    let all = analyze::run(&options(None), Some(&client), &mut std::io::empty())
        .await
        .unwrap();
    let quiet = analyze::run(
        &options(Some("quiet")),
        Some(&client),
        &mut std::io::empty(),
    )
    .await
    .unwrap();
    drop(client);
    let requests = requests.await.unwrap();
    let lines: Vec<String> = requests.iter().map(Recorded::line).collect();
    assert_eq!(
        lines[..16],
        [
            "GET /api/v1/namespaces",
            "GET /api/v1/nodes",
            "GET /api/v1/serviceaccounts",
            "GET /api/v1/pods",
            "GET /api/v1/services",
            "GET /apis/discovery.k8s.io/v1/endpointslices",
            "GET /apis/gateway.networking.k8s.io/v1/gateways",
            "GET /apis/gateway.networking.k8s.io/v1/httproutes",
            "GET /apis/gateway.networking.k8s.io/v1/grpcroutes",
            "GET /apis/security.istio.io/v1/authorizationpolicies",
            "GET /apis/security.istio.io/v1/peerauthentications",
            "GET /apis/security.istio.io/v1/requestauthentications",
            "GET /apis/networking.istio.io/v1/destinationrules",
            "GET /apis/networking.istio.io/v1/virtualservices",
            "GET /apis/networking.istio.io/v1/serviceentries",
            "GET /apis/networking.istio.io/v1/workloadentries",
        ]
    );
    assert_eq!(lines.len(), 32, "two runs, one list per kind each");
    assert_eq!(
        all.stdout,
        "Error [IRS0001] (AuthorizationPolicy quiet/get-only) Service quiet/api is not bound to a waypoint, and waypoints on demand are disabled in namespace quiet (label istio.io/auto-waypoint: disabled); connections to the endpoints of Service quiet/api are denied until a waypoint serves the rule. Bind a waypoint (istioctl-rs waypoint apply -n quiet --enroll-namespace) or remove the label istio.io/auto-waypoint=disabled from namespace quiet.\n\
         Warning [IRS0005] (Gateway shop/forgotten) Waypoint shop/forgotten is bound to nothing: no Namespace, Service or Pod names it (label istio.io/use-waypoint) and no workload runs as its istio.io/for-service-account. Label what it should serve, or delete it (istioctl-rs waypoint delete -n shop forgotten).\n"
    );
    assert_eq!(all.code, analyze::EXIT_FOUND_ISSUES);
    assert!(quiet.stdout.contains("IRS0001") && !quiet.stdout.contains("IRS0005"));
    assert_eq!(quiet.code, analyze::EXIT_FOUND_ISSUES);
}

#[tokio::test]
async fn live_list_failure_names_the_kind_and_what_to_do() {
    let (client, _requests) = api_server::client(|r| match r.path.as_str() {
        "/api/v1/pods" => api_server::status(403, "Forbidden", "pods is forbidden"),
        _ => list(vec![]),
    });
    let error = analyze::run(&options(None), Some(&client), &mut std::io::empty())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("listing Pod in all namespaces:"),
        "{error}"
    );
    assert!(error.contains("--use-kube=false"), "{error}");
}
