//! The binary: values from --set and -f reach the manifest, a bad value or
//! key fails naming it (exit 1), --dry-run needs no cluster, an install
//! without a terminal to confirm on asks for -y instead of waiting, and
//! `version` says when it cannot reach a cluster.

use std::process::{Command, Output, Stdio};

fn istioctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_istioctl-rs"));
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn manifest_generate_takes_values_from_files_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, "tag: \"2.0.1\"\nistiod:\n  replicas: 4\n").unwrap();
    let out = istioctl(
        &[
            "manifest",
            "generate",
            "-f",
            file.to_str().unwrap(),
            "--set",
            "istiod.replicas=2",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.contains("image: istio-rs/istiod-rs:2.0.1\n"), "{yaml}");
    assert!(
        yaml.contains("  replicas: 2\n"),
        "--set wins over -f: {yaml}"
    );
}

#[test]
fn bad_values_fail_naming_the_key_and_where_it_came_from() {
    let out = istioctl(&["manifest", "generate", "--set", "istiod.replica=2"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: --set: unknown value `istiod.replica`; the values are: hub, tag"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.yaml");
    std::fs::write(&file, "cni:\n  binDir: relative/bin\n").unwrap();
    let out = istioctl(&["install", "--dry-run", "-f", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("mine.yaml: `cni.binDir` = \"relative/bin\": an absolute path"),
        "{err}"
    );
}

#[test]
fn dry_run_needs_no_cluster() {
    let out = istioctl(
        &["install", "--dry-run"],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("Dry run: nothing is applied."));
}

#[test]
fn install_without_a_terminal_asks_for_y() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // A cluster that is never contacted: confirmation comes first.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\nusers: [{name: u, user: {token: t}}]\n",
    )
    .unwrap();
    let out = istioctl(
        &["install", "--kubeconfig", kubeconfig.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "Install istio-rs {} into the cluster at https://127.0.0.1:1/? There is no terminal to confirm on: pass -y to proceed",
            env!("CARGO_PKG_VERSION")
        )),
        "{err}"
    );
}

#[test]
fn version_without_a_cluster_still_gives_the_clients() {
    let out = istioctl(
        &["version"],
        &[
            ("KUBECONFIG", "/nonexistent/kubeconfig"),
            ("HOME", "/nonexistent"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "client: istioctl-rs {}\ncomponents: unknown (",
            env!("CARGO_PKG_VERSION")
        )),
        "{stdout}"
    );
}

#[test]
fn install_help_lists_the_values() {
    let out = istioctl(&["install", "--help"], &[]);
    let help = text(&out.stdout);
    for key in istioctl_rs::values::KEYS {
        assert!(help.contains(key.name), "{} missing from --help", key.name);
    }
}

#[test]
fn waypoint_generate_needs_no_cluster() {
    let out = istioctl(
        &[
            "waypoint",
            "generate",
            "-n",
            "demo",
            "--name",
            "reviews-wp",
            "--for",
            "workload",
            "--service-account",
            "reviews",
        ],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), GENERATED);
    // Without -n, no namespace (as upstream): it goes where it is applied.
    let out = istioctl(&["waypoint", "generate"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(!yaml.contains("namespace"), "{yaml}");
    assert!(yaml.contains("  name: waypoint\n"), "{yaml}");
}

const GENERATED: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  annotations:
    istio.io/for-service-account: reviews
  labels:
    istio.io/waypoint-for: workload
  name: reviews-wp
  namespace: demo
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
";

#[test]
fn waypoint_flags_are_checked_before_any_call() {
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["waypoint", "generate", "--for", "everything"],
            2,
            "invalid value 'everything' for '--for <TRAFFIC_TYPE>'",
        ),
        (
            &["waypoint", "delete"],
            2,
            "required arguments were not provided",
        ),
        (
            &["waypoint", "delete", "--all", "waypoint"],
            2,
            "cannot be used with",
        ),
        (&["waypoint", "list", "-o", "xml"], 2, "invalid value 'xml'"),
        (
            &["waypoint", "generate", "--name", "none"],
            1,
            "error: `none` cannot name a waypoint",
        ),
    ];
    for (args, code, message) in cases {
        let out = istioctl(args, &[("KUBECONFIG", "/nonexistent/kubeconfig")]);
        assert_eq!(out.status.code(), Some(*code), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn waypoint_delete_help_says_what_force_does() {
    let out = istioctl(&["waypoint", "delete", "--help"], &[]);
    let help = text(&out.stdout);
    assert!(
        help.contains("recreates it as long as an L7 rule needs it"),
        "{help}"
    );
    assert!(help.contains("--force"), "{help}");
}
