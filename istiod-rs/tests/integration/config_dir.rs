//! istiod-rs on a config directory holding hostile files, over its real
//! listeners: a read (or parse) in progress never stops the CA or
//! readiness, and files that cannot be used as written are refused or
//! reported and counted while everything else keeps being served.

use crate::support::istiod;

use std::sync::Arc;
use std::time::Duration;

use api::SpiffeId;
use api::manifest::ObjectKey;
use api::manifest::testing::{HeldReads, mkfifo, on_own_runtime, within};
use istiod_rs::app::{AppConfig, Source};
use proxy_core::identity::{CaClient, CertificateManager, ManagerConfig};

use istiod::{LocalIstiod, NAMESPACE, PATIENCE, pod};

fn web(name: &str, ip: &str) -> String {
    pod(name, "node-a", "web", ip, "app: web")
}

/// Waits until `done`, failing after PATIENCE.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has_pod(istiod: &LocalIstiod, name: &str) -> bool {
    istiod
        .app()
        .store()
        .read()
        .pods
        .contains_key(&ObjectKey::new("demo", name))
}

fn directory(config: &mut AppConfig) -> &mut istiod_rs::state::directory::DirectoryConfig {
    match &mut config.source {
        Source::Directory(dir) => dir,
        other => panic!("not local mode: {other:?}"),
    }
}

/// On a single-threaded runtime (on a thread of the test's own, so that a
/// blocked runtime fails the test instead of stalling it): anything the
/// directory source did on it would stop everything else.
#[test]
fn the_ca_and_readiness_answer_while_a_file_is_being_read() {
    within(PATIENCE, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(ca_and_readiness_answer_while_a_file_is_being_read());
    });
}

async fn ca_and_readiness_answer_while_a_file_is_being_read() {
    let held = HeldReads::new("big.yaml");
    let reader = held.clone();
    let istiod = LocalIstiod::start_with(
        &[
            ("namespace.yaml", NAMESPACE),
            ("web-1.yaml", &web("web-1", "10.244.0.11")),
        ],
        move |config| directory(config).reading.reader = Arc::new(reader.clone()),
    )
    .await;

    // A new file whose read is held in progress, for as long as the test
    // needs: the state a 36 MB file left istiod in for 70 s.
    istiod.write("big.yaml", &web("web-2", "10.244.0.12"));
    eventually("the read of big.yaml is in progress", async || {
        held.waiting() == 1
    })
    .await;

    // Readiness and the CA answer, from the last state: node-a's ztunnel
    // gets the certificate of a pod the store knows is on node-a.
    let (status, body) = istiod.get("/ready").await;
    assert_eq!(status, 200, "{body}");
    let ca = CaClient::new(&istiod.control_plane("ztunnel-node-a")).unwrap();
    let node_a = CertificateManager::new(
        Arc::new(ca),
        ManagerConfig {
            impersonate: true,
            ..ManagerConfig::default()
        },
    );
    let web_id = SpiffeId::new(istiod::TRUST_DOMAIN, "demo", "web").unwrap();
    tokio::time::timeout(PATIENCE, node_a.fetch(&web_id))
        .await
        .expect("the CA answers")
        .unwrap();
    assert_eq!(held.waiting(), 1, "the read is still in progress");
    assert!(!has_pod(&istiod, "web-2"));

    // Released: the file applies.
    held.release();
    eventually("web-2 is in the state", async || has_pod(&istiod, "web-2")).await;
}

/// SIGTERM's path (`App::shutdown`), then the runtime's own shutdown, while
/// a read is stuck: neither waits for it. Run on a runtime and a thread of
/// the test's own, so that a hang fails the test instead of stalling it.
#[test]
fn istiod_stops_while_a_read_is_stuck() {
    let held = HeldReads::new("stuck.yaml");
    let reader = held.clone();
    let still_held = on_own_runtime(PATIENCE, move |runtime| {
        runtime.block_on(async {
            let mut istiod =
                LocalIstiod::start_with(&[("namespace.yaml", NAMESPACE)], move |config| {
                    directory(config).reading.reader = Arc::new(reader.clone())
                })
                .await;
            istiod.write("stuck.yaml", &web("web-1", "10.244.0.11"));
            eventually("the read of stuck.yaml is in progress", async || {
                held.waiting() == 1
            })
            .await;
            istiod.stop().await;
            held
        })
    });
    assert_eq!(still_held.waiting(), 1, "the read was still stuck");
    still_held.release();
}

const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/demo/sa/client]}
";

#[tokio::test]
async fn hostile_files_are_counted_while_the_rest_is_served() {
    let istiod = LocalIstiod::start_with(
        &[
            ("namespace.yaml", NAMESPACE),
            ("web-1.yaml", &web("web-1", "10.244.0.11")),
            ("policy.yaml", POLICY),
        ],
        |config| directory(config).reading.max_file_size = 4096,
    )
    .await;
    let config = istiod.config_dir();
    mkfifo(&config.join("pipe.yaml"));
    std::os::unix::fs::symlink(&config, config.join("loop")).unwrap();
    istiod.write(
        "big.yaml",
        &format!("{}# {}\n", web("web-big", "10.244.0.99"), "x".repeat(5000)),
    );
    istiod.write(
        "typo-kind.yaml",
        &POLICY.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolcy"),
    );
    // `rule:` for `rules:` in a new version of the served policy.
    istiod.write("policy.yaml", &POLICY.replace("  rules:", "  rule:"));
    // The namespace again, and a second pod with web-1's address.
    istiod.write("z-namespace.yaml", NAMESPACE);
    istiod.write("web-copy.yaml", &web("web-copy", "10.244.0.11"));

    for (reason, count) in [
        ("not_regular_file", 1.0),
        ("symlink_loop", 1.0),
        ("too_large", 1.0),
        ("unknown_kind", 1.0),
        ("unknown_field", 1.0),
        ("duplicate_object", 1.0),
        ("read_error", 0.0),
    ] {
        let sample = format!("istiod_config_file_problems{{reason=\"{reason}\"}}");
        eventually(&format!("{sample} is {count}"), async || {
            istiod.metric(&sample).await == count
        })
        .await;
    }
    eventually("the shared address is counted", async || {
        istiod.metric("istiod_index_shared_pod_addresses").await == 1.0
    })
    .await;

    // Everything else is served: the pods, and the policy's last good version.
    let (status, body) = istiod.get("/ready").await;
    assert_eq!(status, 200, "{body}");
    assert!(has_pod(&istiod, "web-1") && has_pod(&istiod, "web-copy"));
    assert!(!has_pod(&istiod, "web-big"));
    let state = istiod.app().store().read();
    let policy = &state.authorization_policies[&ObjectKey::new("demo", "allow-web")];
    assert_eq!(policy.spec.rules.len(), 1, "the last good version is kept");
    drop(state);

    // Fixed, they stop counting.
    istiod.remove("web-copy.yaml");
    istiod.write("policy.yaml", POLICY);
    eventually("fixes are seen", async || {
        istiod.metric("istiod_index_shared_pod_addresses").await == 0.0
            && istiod
                .metric("istiod_config_file_problems{reason=\"unknown_field\"}")
                .await
                == 0.0
    })
    .await;
}
