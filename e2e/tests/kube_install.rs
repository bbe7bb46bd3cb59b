//! `istioctl-rs` against the real control plane, before any node runs a
//! pod: `x precheck` passes on an empty cluster, `install` has the real API
//! server accept every object of `manifest generate` (server-side apply as
//! `istioctl-rs` with strict field validation, so a field the API does not
//! know fails here), creates the mesh root, and then, with no node to run
//! the pods, ends its wait naming the components that are not ready;
//! `uninstall --purge` leaves nothing it applied.
//!
//! That the installed mesh runs and carries traffic needs the node runtime
//! (pods run on netns nodes): not this test.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use e2e::binaries::Binaries;
use e2e::kube::{KubeRun, Kubectl};
use e2e::privilege;
use serde_json::Value;

/// How long one istioctl-rs command may take (its own waits are shorter).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs istioctl-rs with the admin kubeconfig where kubectl runs (the
/// control plane's namespace: the API server's address is reachable there).
fn istioctl(kubectl: &Kubectl, program: &Path, args: &[&str]) -> Output {
    kubectl
        .run_client(program, args, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("istioctl-rs {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `(kind, name, namespace)` of each document of a multi-document YAML.
fn objects(yaml: &str) -> Vec<(String, String, Option<String>)> {
    let mut objects = Vec::new();
    for doc in yaml.split("\n---") {
        let Ok(value) = serde_saphyr::from_str::<Value>(doc) else {
            panic!("manifest generate printed a document that is not YAML:\n{doc}");
        };
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().expect("kind").to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let namespace = value["metadata"]["namespace"].as_str().map(str::to_string);
        objects.push((kind, name, namespace));
    }
    objects
}

/// The object as the API server holds it, or `None` when it does not.
fn get(kubectl: &Kubectl, kind: &str, name: &str, namespace: Option<&str>) -> Option<Value> {
    let resource = kind.to_lowercase();
    let mut args = vec![
        "get",
        resource.as_str(),
        name,
        "-o",
        "json",
        "--show-managed-fields",
    ];
    if let Some(namespace) = namespace {
        args.extend(["-n", namespace]);
    }
    match kubectl.run(&args) {
        Ok(json) => Some(serde_json::from_str(&json).expect("kubectl prints JSON")),
        Err(e) if e.is_not_found() => None,
        Err(e) => panic!("kubectl get {kind} {name}: {e}"),
    }
}

#[test]
fn kube_install() {
    if !privilege::enter_for_test() {
        return;
    }
    let program = Binaries::default()
        .get("istioctl-rs", "istioctl-rs")
        .expect("istioctl-rs builds");
    let kube = KubeRun::start(1).expect("the control plane starts");
    let kubectl = kube.control_plane.kubectl();

    let precheck = istioctl(&kubectl, &program, &["x", "precheck"]);
    assert!(
        precheck.status.success(),
        "precheck fails on an empty cluster:\n{}{}",
        text(&precheck.stdout),
        text(&precheck.stderr)
    );

    let generated = istioctl(&kubectl, &program, &["manifest", "generate"]);
    assert!(generated.status.success(), "{}", text(&generated.stderr));
    let objects = objects(&text(&generated.stdout));
    assert!(
        objects.len() > 10,
        "manifest generate printed {} objects",
        objects.len()
    );

    // No node runs pods yet: the wait ends, naming what is not ready.
    let install = istioctl(&kubectl, &program, &["install", "-y", "--timeout", "15s"]);
    let stderr = text(&install.stderr);
    assert!(
        !install.status.success(),
        "install reported success with no node to run the mesh:\n{}",
        text(&install.stdout)
    );
    assert!(
        stderr.contains("not ready after") && stderr.contains("istiod"),
        "the wait names istiod:\n{stderr}"
    );

    // Every object was accepted by the API server and is owned by istioctl-rs.
    for (kind, name, namespace) in &objects {
        let object = get(&kubectl, kind, name, namespace.as_deref())
            .unwrap_or_else(|| panic!("{kind} {namespace:?}/{name} was not applied"));
        let managers: Vec<&str> = object["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert!(
            managers.contains(&"istioctl-rs"),
            "{kind} {name}: field managers {managers:?}"
        );
    }
    // The mesh root istiod-rs signs with, and the bundle proxies trust.
    let root = get(&kubectl, "Secret", "cacerts", Some("istio-system")).expect("Secret cacerts");
    assert!(root["data"]["ca-cert.pem"].is_string(), "{root}");
    get(
        &kubectl,
        "ConfigMap",
        "istio-ca-root-cert",
        Some("istio-system"),
    )
    .expect("ConfigMap istio-ca-root-cert");

    // A second install is an upgrade in place, not "another Istio".
    let again = istioctl(&kubectl, &program, &["x", "precheck"]);
    let again_text = format!("{}{}", text(&again.stdout), text(&again.stderr));
    assert!(
        !again_text.contains("another Istio"),
        "precheck takes our own install for another mesh:\n{again_text}"
    );

    let uninstall = istioctl(&kubectl, &program, &["uninstall", "--purge", "-y"]);
    assert!(
        uninstall.status.success(),
        "uninstall --purge:\n{}{}",
        text(&uninstall.stdout),
        text(&uninstall.stderr)
    );
    // Deletion is asynchronous where the API server finalizes: a CRD
    // first removes its custom objects, and on a loaded machine the API
    // server's finalizer can back off for minutes ("could not list
    // instances: storage is (re)initializing" while it compiles the new
    // kinds' schemas). Each object goes; a CRD may instead be left
    // terminating (deletionTimestamp set: uninstall's part is done).
    for (kind, name, namespace) in &objects {
        if kind == "Namespace" {
            continue; // Terminating until its contents are gone: checked below.
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while let Some(left) = get(&kubectl, kind, name, namespace.as_deref()) {
            let terminating = left["metadata"]["deletionTimestamp"].is_string();
            if kind == "CustomResourceDefinition" && terminating {
                eprintln!(
                    "e2e: {kind} {name} is terminating: {}",
                    left["status"]["conditions"]
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{kind} {namespace:?}/{name} is left after uninstall --purge: {}\nstatus: {}",
                left["metadata"],
                left["status"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let namespace = get(&kubectl, "Namespace", "istio-system", None);
    assert!(
        namespace.is_none()
            || namespace.as_ref().unwrap()["metadata"]["deletionTimestamp"].is_string(),
        "istio-system is neither gone nor being deleted"
    );
}
