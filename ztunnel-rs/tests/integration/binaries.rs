//! `ztunnel-rs cni` runs the node agent binary installed next to the proxy's.

use std::process::Command;

#[test]
fn cni_subcommand_runs_the_node_agent_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .args(["cni", "--help"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("Usage: ztunnel-rs cni") && stdout.contains("--node-name"),
        "the node agent's own help: {stdout}"
    );
}

#[test]
fn the_node_agent_rejects_unknown_flags_through_ztunnel_rs_cni() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .args(["cni", "--node-name", "n", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn version_is_a_command_as_upstream() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("ztunnel-rs ") && stdout.contains(env!("CARGO_PKG_VERSION")),
        "{stdout}"
    );
}

/// A blocking `GET path` on the admin server; None until it answers.
fn admin_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).ok()?;
    raw.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// Kills the child when the test ends, whatever happened.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy started as upstream's ztunnel DaemonSet starts ztunnel
/// (`args: [proxy, ztunnel]` and its environment) takes its settings from
/// upstream's variable names.
#[test]
fn starts_with_the_upstream_daemonsets_command_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let ca = proxy_core::testing::TestCa::new("cluster.local");
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "token\n").unwrap();
    let zds = dir.path().join("ztunnel.sock");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .args(["proxy", "ztunnel"])
        .env_clear()
        // What upstream's DaemonSet sets (a closed loopback port for istiod).
        .env("CA_ADDRESS", "127.0.0.1:1")
        .env("XDS_ADDRESS", "127.0.0.1:1")
        .env("RUST_LOG", "info")
        .env("ISTIO_META_CLUSTER_ID", "east")
        .env("INPOD_ENABLED", "true")
        .env("TERMINATION_GRACE_PERIOD_SECONDS", "30")
        .env("POD_NAME", "ztunnel-x")
        .env("POD_NAMESPACE", "istio-system")
        .env("NODE_NAME", "node-a")
        .env("INSTANCE_IP", "127.0.0.1")
        .env("SERVICE_ACCOUNT", "ztunnel")
        .env("ZTUNNEL_CPU_LIMIT", "2")
        .env("ZTUNNEL_WORKER_THREADS", "50%")
        // Paths upstream mounts elsewhere, and our admin port.
        .env("XDS_ROOT_CA", &root)
        .env("AUTH_TOKEN", &token)
        .env("INPOD_UDS", &zds)
        .env("ADMIN_ADDRESS", format!("127.0.0.1:{admin}"))
        .env("STATS_ADDRESS", "127.0.0.1:0")
        .env("READINESS_ADDRESS", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let dump = loop {
        if let Some(body) = admin_get(admin, "/config_dump") {
            break body;
        }
        if let Some(status) = running.0.try_wait().unwrap() {
            panic!("ztunnel-rs exited: {status}");
        }
        assert!(std::time::Instant::now() < deadline, "no admin server");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let config = &dump["config"];
    assert_eq!(config["node"]["clusterId"], "east", "{config:#}");
    assert_eq!(config["node"]["name"], "node-a", "{config:#}");
    assert_eq!(config["zdsSocket"], zds.to_str().unwrap(), "{config:#}");
}

#[test]
fn a_proxy_mode_we_do_not_run_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .args(["proxy", "ztunnel"])
        .env("PROXY_MODE", "dedicated")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PROXY_MODE=\"dedicated\""), "{stderr}");
}
