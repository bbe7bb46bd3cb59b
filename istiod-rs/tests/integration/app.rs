//! The `istiod-rs` binary as an operator runs it: start-up in local mode,
//! `/ready`, the mesh root on disk, SIGTERM; and start-up errors that exit
//! non-zero naming the flag or file to fix.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(30);

const STATE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo}
spec: {nodeName: node-a, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.244.0.5, conditions: [{type: Ready, status: \"True\"}]}
";
const TOKENS: &str =
    "tokens:\n  - {token: t-node-a, serviceAccount: istio-system/ztunnel, node: node-a}\n";

fn istiod() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_istiod-rs"));
    // Nothing from the test's environment decides what the binary does.
    for var in [
        "CONFIG_DIR",
        "TOKEN_FILE",
        "DATA_DIR",
        "CACERTS_DIR",
        "PLAINTEXT",
        "PLAINTEXT_ADDR",
        "GRPC_ADDR",
        "MONITORING_ADDR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// A local-mode command line on `dir` (config/, tokens.yaml, data/), on
/// loopback ports chosen by the kernel; `overrides` replace a flag's value
/// (`None`: leave the flag out).
fn local(dir: &Path, overrides: &[(&str, Option<&OsStr>)]) -> Command {
    let config = dir.join("config");
    if !config.exists() {
        std::fs::create_dir(&config).unwrap();
        std::fs::write(config.join("state.yaml"), STATE).unwrap();
        std::fs::write(dir.join("tokens.yaml"), TOKENS).unwrap();
    }
    let loopback = OsString::from("127.0.0.1:0");
    let defaults = [
        ("--config-dir", config.into_os_string()),
        ("--token-file", dir.join("tokens.yaml").into_os_string()),
        ("--data-dir", dir.join("data").into_os_string()),
        ("--grpc-addr", loopback.clone()),
        ("--plaintext-addr", loopback.clone()),
        ("--monitoring-addr", loopback),
    ];
    let mut cmd = istiod();
    for (flag, value) in &defaults {
        match overrides.iter().find(|(f, _)| f == flag) {
            Some((_, Some(v))) => cmd.arg(flag).arg(v),
            Some((_, None)) => continue,
            None => cmd.arg(flag).arg(value),
        };
    }
    for (flag, value) in overrides {
        if let Some(v) = value
            && !defaults.iter().any(|(f, _)| f == flag)
        {
            cmd.arg(flag).arg(v);
        }
    }
    cmd
}

/// Runs a command expected to fail at start-up and checks that its error
/// names each of `named`; returns its exit code.
fn fails_naming(mut cmd: Command, named: &[&str]) -> i32 {
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it started: {stderr}");
    for name in named {
        assert!(stderr.contains(name), "{name:?} not named: {stderr}");
    }
    output.status.code().unwrap_or(-1)
}

/// A running istiod-rs process whose log is collected.
struct Running {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Running { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The `key=address` of the "istiod-rs listening" line.
    fn address(&self, key: &str) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            let found = log
                .lines()
                .filter(|l| l.contains("istiod-rs listening"))
                .flat_map(str::split_whitespace)
                .find_map(|field| field.strip_prefix(&format!("{key}=")))
                .map(|a| a.parse().unwrap());
            if let Some(addr) = found {
                return addr;
            }
            assert!(Instant::now() < deadline, "never listened:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on a plain HTTP/1.0 connection: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[test]
fn runs_in_local_mode_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let istiod = Running::spawn(local(dir.path(), &[]));
    let monitoring = istiod.address("monitoring");
    istiod.address("grpc_tls");
    istiod.address("grpc_plaintext");

    let deadline = Instant::now() + PATIENCE;
    loop {
        match http_get(monitoring, "/ready") {
            Ok((200, body)) => {
                assert!(body.contains("\"ready\":true"), "{body}");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "never ready: {other:?}\n{}",
                istiod.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, dump) = http_get(monitoring, "/debug/config_dump").unwrap();
    assert!(dump.contains("Kubernetes//Pod/demo/web-1"), "{dump}");

    // The mesh root, for local-mode proxies' --root-cert.
    let root = std::fs::read_to_string(dir.path().join("data/root-cert.pem")).unwrap();
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    assert!(istiod.log().contains("root-cert.pem"));

    let (status, log) = istiod.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("istiod-rs stopped"), "{log}");
}

#[test]
fn start_up_errors_name_the_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();

    // Local mode without a token file.
    let code = fails_naming(
        local(dir.path(), &[("--token-file", None)]),
        &["--token-file: required with --config-dir"],
    );
    assert_eq!(code, 1);

    // A token file that cannot be read.
    let missing = dir.path().join("missing-tokens.yaml");
    let flags = [("--token-file", Some(missing.as_os_str()))];
    fails_naming(
        local(dir.path(), &flags),
        &["--token-file", "missing-tokens.yaml"],
    );

    // A plug-in CA directory whose files are not a CA.
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    for file in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::write(cacerts.join(file), "not PEM\n").unwrap();
    }
    let flags = [("--cacerts-dir", Some(cacerts.as_os_str()))];
    fails_naming(local(dir.path(), &flags), &["--cacerts-dir", "ca-cert.pem"]);

    // A config directory that is not there.
    let mut cmd = istiod();
    cmd.args(["--config-dir", "/nonexistent/config", "--token-file", "t"]);
    fails_naming(
        cmd,
        &["--config-dir: /nonexistent/config is not a directory"],
    );

    // A malformed flag value: clap's usage error.
    let mut cmd = istiod();
    cmd.args(["--grpc-addr", "not-an-address"]);
    assert_eq!(fails_naming(cmd, &["--grpc-addr"]), 2);

    // A port another process holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = OsString::from(taken.local_addr().unwrap().to_string());
    let flags = [("--monitoring-addr", Some(taken.as_os_str()))];
    fails_naming(local(dir.path(), &flags), &["--monitoring-addr"]);

    // Kubernetes mode with no cluster to talk to.
    let mut cmd = istiod();
    cmd.env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    fails_naming(cmd, &["Kubernetes API", "--config-dir"]);
}

/// Waits until `done`, failing (with the log) after PATIENCE.
fn wait_until(istiod: &Running, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "never {what}:\n{}", istiod.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hostile_config_files_are_reported_once_and_sigterm_still_stops_istiod() {
    let dir = tempfile::tempdir().unwrap();
    let poll = OsString::from("20ms");
    let cmd = local(dir.path(), &[("--poll-interval", Some(poll.as_os_str()))]);
    let config = dir.path().join("config");
    // A FIFO no one writes to: a blocking read of it never returns.
    api::manifest::testing::mkfifo(&config.join("pipe.yaml"));
    // `rule:` for `rules:`.
    std::fs::write(
        config.join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  rule: []\n",
    )
    .unwrap();
    let istiod = Running::spawn(cmd);
    let monitoring = istiod.address("monitoring");
    wait_until(&istiod, "ready", || {
        matches!(http_get(monitoring, "/ready"), Ok((200, _)))
    });
    for reason in ["not_regular_file", "unknown_field"] {
        let sample = format!("istiod_config_file_problems{{reason=\"{reason}\"}} 1");
        wait_until(&istiod, &sample, || {
            http_get(monitoring, "/metrics")
                .is_ok_and(|(_, text)| text.lines().any(|l| l == sample))
        });
    }

    // Many polls later (a new file is applied only once two of them read
    // it), each problem has still been reported once.
    let web_2 = STATE
        .split("---\n")
        .nth(1)
        .unwrap()
        .replace("web-1", "web-2")
        .replace("10.244.0.5", "10.244.0.6");
    std::fs::write(config.join("extra.yaml"), web_2).unwrap();
    wait_until(&istiod, "extra.yaml applied", || {
        http_get(monitoring, "/debug/config_dump")
            .is_ok_and(|(_, dump)| dump.contains("Kubernetes//Pod/demo/web-2"))
    });
    let log = istiod.log();
    let fifo = "pipe.yaml: is a FIFO (named pipe), not a regular file";
    let field = "policy.yaml:5: AuthorizationPolicy demo/p: unknown field spec.rule";
    for line in [fifo, field] {
        assert_eq!(log.matches(line).count(), 1, "{line:?}:\n{log}");
    }

    let (status, log) = istiod.terminate();
    assert!(status.success(), "{status:?}\n{log}");
}

/// Upstream istiod's Deployment runs `pilot-discovery discovery
/// --monitoringAddr=:15014 --log_output_level=default:info --domain
/// cluster.local --keepaliveMaxServerConnectionAge 30m`: istiod-rs starts
/// from that command line and says which flag it does not apply.
#[test]
fn starts_from_the_upstream_deployments_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = local(dir.path(), &[("--monitoring-addr", None)]);
    cmd.args([
        "--monitoringAddr=127.0.0.1:0",
        "--httpAddr=127.0.0.1:0",
        "--log_output_level=default:info",
        "--domain",
        "cluster.local",
        "--keepaliveMaxServerConnectionAge",
        "30m",
    ]);
    // The command word comes first, as in upstream's args.
    let program = cmd.get_program().to_owned();
    let args: Vec<OsString> = cmd.get_args().map(OsStr::to_owned).collect();
    let mut upstream = istiod();
    upstream.arg("discovery").args(args);
    assert_eq!(upstream.get_program(), program);
    let istiod = Running::spawn(upstream);
    let monitoring = istiod.address("monitoring");
    let (status, _) = http_get(monitoring, "/ready").unwrap();
    assert!(status == 200 || status == 503, "/ready answered {status}");
    // Upstream's readiness probe: /ready on the HTTP port, the same answer.
    let http = istiod.address("http");
    assert_ne!(http, monitoring);
    let (on_http, _) = http_get(http, "/ready").unwrap();
    assert!(
        on_http == 200 || on_http == 503,
        "/ready answered {on_http}"
    );
    let log = istiod.log();
    assert!(
        log.contains("--keepaliveMaxServerConnectionAge 30m: accepted, not applied"),
        "{log}"
    );
    let (status, log) = istiod.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_bad_upstream_flag_value_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = local(dir.path(), &[]);
    cmd.arg("--monitoringAddr=nowhere");
    let code = fails_naming(cmd, &["--monitoringAddr", "nowhere"]);
    assert_eq!(code, 1);
}
