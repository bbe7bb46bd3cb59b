//! The node agent's CNI installer on temporary directories standing in for
//! a node's /etc/cni/net.d and /opt/cni/bin: chaining istio-cni-rs into a
//! conflist and into a .conf, running again, chaining again after another
//! CNI rewrote its file, waiting for a configuration, taking the plugin out
//! (the original comes back), and files that do not load (named, left as
//! they are). The shutdown decision is checked against a mock API server.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_test::mock;
use ztunnel_rs::node_agent::cni_install::{
    CniInstallConfig, CniInstallError, CniInstaller, Installed, OnShutdown, decide_on_shutdown,
    on_shutdown,
};

const PLUGIN_BYTES: &[u8] = b"\x7fELF istio-cni-rs stand-in";

struct Node {
    _dir: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    installer: CniInstaller,
}

fn node() -> Node {
    node_with(None)
}

fn node_with(conf_name: Option<&str>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("etc-cni-net.d");
    let bin = dir.path().join("opt-cni-bin");
    std::fs::create_dir(&conf).unwrap();
    std::fs::create_dir(&bin).unwrap();
    let plugin = dir.path().join("istio-cni-rs");
    std::fs::write(&plugin, PLUGIN_BYTES).unwrap();
    let installer = CniInstaller::new(CniInstallConfig {
        conf_dir: conf.clone(),
        bin_dir: bin.clone(),
        plugin_binary: plugin,
        conf_name: conf_name.map(String::from),
        agent_socket: PathBuf::from("/var/run/istio-cni/pluginevent.sock"),
        exclude_namespaces: vec!["kube-system".into()],
    });
    Node {
        _dir: dir,
        conf,
        bin,
        installer,
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn read_json(dir: &Path, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "datastore_type": "kubernetes", "ipam": {"type": "calico-ipam"}, "mtu": 1440},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
"#;

const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "bridge-net",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}
}
"#;

fn our_entry() -> Value {
    json!({
        "type": "istio-cni-rs",
        "agent_socket": "/var/run/istio-cni/pluginevent.sock",
        "exclude_namespaces": ["kube-system"],
    })
}

#[test]
fn chains_into_the_primary_conflist_and_installs_the_binary() {
    let node = node();
    write(&node.conf, "10-calico.conflist", CALICO);
    write(&node.conf, "20-other.conf", BRIDGE);
    write(&node.conf, "calico-kubeconfig", "not a network file");

    let outcome = node.installer.install().unwrap();
    assert_eq!(outcome, Installed::Chained("10-calico.conflist".into()));

    // Our entry last, everything else as it was.
    let mut expected: Value = serde_json::from_str(CALICO).unwrap();
    expected["plugins"]
        .as_array_mut()
        .unwrap()
        .push(our_entry());
    assert_eq!(read_json(&node.conf, "10-calico.conflist"), expected);
    // The other files are not touched; no temporary file is left behind.
    assert_eq!(
        std::fs::read_to_string(node.conf.join("20-other.conf")).unwrap(),
        BRIDGE
    );
    assert_eq!(
        names(&node.conf),
        ["10-calico.conflist", "20-other.conf", "calico-kubeconfig"]
    );

    let binary = node.bin.join("istio-cni-rs");
    assert_eq!(std::fs::read(&binary).unwrap(), PLUGIN_BYTES);
    assert_eq!(
        std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(names(&node.bin), ["istio-cni-rs"]);
}

#[test]
fn running_again_changes_nothing() {
    let node = node();
    write(&node.conf, "10-calico.conflist", CALICO);
    node.installer.install().unwrap();
    let stamp = |p: PathBuf| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime_nsec(), m.mtime())
    };
    let conf_before = stamp(node.conf.join("10-calico.conflist"));
    let bin_before = stamp(node.bin.join("istio-cni-rs"));
    let bytes_before = std::fs::read(node.conf.join("10-calico.conflist")).unwrap();

    for _ in 0..3 {
        assert_eq!(
            node.installer.install().unwrap(),
            Installed::Chained("10-calico.conflist".into())
        );
    }
    // Not rewritten at all: same inode (an atomic write renames a new one in).
    assert_eq!(stamp(node.conf.join("10-calico.conflist")), conf_before);
    assert_eq!(stamp(node.bin.join("istio-cni-rs")), bin_before);
    assert_eq!(
        std::fs::read(node.conf.join("10-calico.conflist")).unwrap(),
        bytes_before
    );
    let plugins = read_json(&node.conf, "10-calico.conflist")["plugins"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(plugins, 3, "chained once");
}

#[test]
fn a_conf_becomes_a_conflist_and_uninstall_gives_it_back() {
    let node = node();
    write(&node.conf, "10-bridge.conf", BRIDGE);
    assert_eq!(
        node.installer.install().unwrap(),
        Installed::Chained("10-bridge.conflist".into())
    );
    assert_eq!(names(&node.conf), ["10-bridge.conflist"]);
    let list = read_json(&node.conf, "10-bridge.conflist");
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(list["name"], "bridge-net");
    let mut network: Value = serde_json::from_str(BRIDGE).unwrap();
    network.as_object_mut().unwrap().remove("cniVersion");
    assert_eq!(list["plugins"][0], network);
    assert_eq!(list["plugins"][1]["type"], "istio-cni-rs");
    assert_eq!(list["plugins"].as_array().unwrap().len(), 2);
    // Idempotent on the converted list too.
    assert_eq!(
        node.installer.install().unwrap(),
        Installed::Chained("10-bridge.conflist".into())
    );

    let rewritten = node.installer.uninstall().unwrap();
    assert_eq!(rewritten, ["10-bridge.conflist"]);
    assert_eq!(names(&node.conf), ["10-bridge.conf"]);
    let original: Value = serde_json::from_str(BRIDGE).unwrap();
    assert_eq!(read_json(&node.conf, "10-bridge.conf"), original);
    assert_eq!(names(&node.bin), Vec::<String>::new());
}

#[test]
fn uninstall_takes_out_exactly_our_entry_and_the_binary() {
    let node = node();
    write(&node.conf, "10-calico.conflist", CALICO);
    std::fs::write(node.bin.join("calico"), b"theirs").unwrap();
    node.installer.install().unwrap();
    // Another tool adds a plugin after ours meanwhile: it stays.
    let mut chained = read_json(&node.conf, "10-calico.conflist");
    chained["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "bandwidth"}));
    write(&node.conf, "10-calico.conflist", &chained.to_string());

    assert_eq!(node.installer.uninstall().unwrap(), ["10-calico.conflist"]);
    let mut expected: Value = serde_json::from_str(CALICO).unwrap();
    expected["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "bandwidth"}));
    assert_eq!(read_json(&node.conf, "10-calico.conflist"), expected);
    assert_eq!(names(&node.bin), ["calico"]);
    // Again: nothing of ours is left to take out.
    assert_eq!(node.installer.uninstall().unwrap(), Vec::<String>::new());
    assert_eq!(read_json(&node.conf, "10-calico.conflist"), expected);
}

#[test]
fn a_file_that_does_not_load_is_named_skipped_and_left_as_it_is() {
    let node = node();
    let broken = "{\"cniVersion\": \"0.3.1\", \"plugins\": [ {\"type\": \"calico\" ";
    write(&node.conf, "05-broken.conflist", broken);
    // Nothing else yet: waiting, with the broken file named.
    match node.installer.install().unwrap() {
        Installed::Waiting { unloadable } => {
            assert_eq!(unloadable.len(), 1);
            assert_eq!(unloadable[0].0, "05-broken.conflist");
            assert!(unloadable[0].1.contains("not JSON"), "{unloadable:?}");
        }
        other => panic!("{other:?}"),
    }
    // The runtime skips it and uses the next file; so do we.
    write(&node.conf, "10-calico.conflist", CALICO);
    assert_eq!(
        node.installer.install().unwrap(),
        Installed::Chained("10-calico.conflist".into())
    );
    assert_eq!(
        std::fs::read_to_string(node.conf.join("05-broken.conflist")).unwrap(),
        broken
    );

    // Pinned to the broken file: an error that names it; still untouched.
    let pinned = node_with(Some("05-broken.conflist"));
    write(&pinned.conf, "05-broken.conflist", broken);
    write(&pinned.conf, "10-calico.conflist", CALICO);
    let err = pinned.installer.install().unwrap_err();
    assert!(matches!(err, CniInstallError::Unloadable { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("05-broken.conflist"), "{message}");
    assert!(message.contains("not JSON"), "{message}");
    assert_eq!(
        std::fs::read_to_string(pinned.conf.join("05-broken.conflist")).unwrap(),
        broken
    );
    assert_eq!(
        std::fs::read_to_string(pinned.conf.join("10-calico.conflist")).unwrap(),
        CALICO
    );
}

#[test]
fn an_unsupported_version_is_refused_naming_the_file() {
    let node = node();
    let future = r#"{"cniVersion": "9.9.9", "name": "n", "plugins": [{"type": "calico"}]}"#;
    write(&node.conf, "10-calico.conflist", future);
    let err = node.installer.install().unwrap_err().to_string();
    assert!(err.contains("10-calico.conflist"), "{err}");
    assert!(err.contains("cniVersion 9.9.9"), "{err}");
    assert_eq!(
        std::fs::read_to_string(node.conf.join("10-calico.conflist")).unwrap(),
        future
    );
}

#[test]
fn a_file_that_takes_the_first_place_takes_the_plugin() {
    let node = node();
    write(&node.conf, "10-calico.conflist", CALICO);
    node.installer.install().unwrap();
    write(&node.conf, "05-cilium.conflist", CALICO);
    assert_eq!(
        node.installer.install().unwrap(),
        Installed::Chained("05-cilium.conflist".into())
    );
    let original: Value = serde_json::from_str(CALICO).unwrap();
    assert_eq!(read_json(&node.conf, "10-calico.conflist"), original);
    let plugins = read_json(&node.conf, "05-cilium.conflist")["plugins"].clone();
    assert_eq!(plugins.as_array().unwrap().last().unwrap(), &our_entry());
}

/// Waits (bounded, generously: this is no timing assertion) for `check`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chained_into(dir: &Path, name: &str) -> bool {
    std::fs::read(dir.join(name))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| p.last() == Some(&our_entry()))
}

#[tokio::test]
async fn waits_for_a_configuration_then_chains_again_after_an_overwrite() {
    let node = node();
    let (chained_tx, mut chained) = tokio::sync::watch::channel(false);
    let shutdown = CancellationToken::new();
    let installer = node.installer.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { installer.run(chained_tx, stop).await });

    // No configuration: the binary is in, nothing is chained.
    let bin = node.bin.clone();
    eventually("binary installed", || bin.join("istio-cni-rs").exists()).await;
    assert!(!*chained.borrow());

    // The cluster's CNI writes its configuration: chained.
    write(&node.conf, "10-calico.conflist", CALICO);
    chained.wait_for(|c| *c).await.unwrap();
    assert!(chained_into(&node.conf, "10-calico.conflist"));

    // The CNI rewrites its file (an upgrade, a restart): chained again.
    for round in 0..3 {
        write(&node.conf, "10-calico.conflist", CALICO);
        let conf = node.conf.clone();
        eventually(&format!("chained again, round {round}"), || {
            chained_into(&conf, "10-calico.conflist")
        })
        .await;
    }
    // Someone removes the binary: it comes back.
    std::fs::remove_file(node.bin.join("istio-cni-rs")).unwrap();
    eventually("binary back", || bin.join("istio-cni-rs").exists()).await;

    shutdown.cancel();
    task.await.unwrap().unwrap();
    // Stopping alone leaves the plugin chained (uninstall is a decision).
    assert!(chained_into(&node.conf, "10-calico.conflist"));
}

#[tokio::test]
async fn a_missing_directory_is_named() {
    let node = node();
    std::fs::remove_dir(&node.conf).unwrap();
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let err = node
        .installer
        .run(tx, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("etc-cni-net.d"), "{err}");
}

fn daemonset(deleting: bool) -> Value {
    let mut ds = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "istio-cni-node", "namespace": "istio-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "istio-cni-node"}},
                 "template": {"spec": {"containers": []}}},
    });
    if deleting {
        ds["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    }
    ds
}

#[test]
fn the_plugin_stays_only_while_the_daemonset_does() {
    let ds = |deleting| serde_json::from_value(daemonset(deleting)).unwrap();
    assert_eq!(decide_on_shutdown(&Ok(Some(ds(false)))), OnShutdown::Keep);
    // The DaemonSet being deleted or gone: the mesh is leaving the node.
    assert_eq!(
        decide_on_shutdown(&Ok(Some(ds(true)))),
        OnShutdown::Uninstall
    );
    assert_eq!(decide_on_shutdown(&Ok(None)), OnShutdown::Uninstall);
}

/// `on_shutdown` asks for the agent's own DaemonSet, by name, once.
#[tokio::test]
async fn shutdown_reads_the_agents_daemonset() {
    for (status, body, expected) in [
        (200, daemonset(false), OnShutdown::Keep),
        (200, daemonset(true), OnShutdown::Uninstall),
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
            OnShutdown::Uninstall,
        ),
        // Cannot tell: the plugin comes out, the pods stay captured.
        (
            403,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"}),
            OnShutdown::Remove,
        ),
    ] {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (request, respond) = handle.next_request().await.unwrap();
            let seen = (
                request.method().to_string(),
                request.uri().path().to_string(),
            );
            respond.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
            seen
        });
        let decision = on_shutdown(Some(&client), "istio-system", "istio-cni-node").await;
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            (
                "GET".to_string(),
                "/apis/apps/v1/namespaces/istio-system/daemonsets/istio-cni-node".to_string()
            )
        );
        assert_eq!(decision, expected, "status {status}");
    }
    // Local mode: nothing says the agent comes back.
    assert_eq!(
        on_shutdown(None, "istio-system", "istio-cni-node").await,
        OnShutdown::Remove
    );
}
