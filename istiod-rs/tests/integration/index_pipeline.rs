//! The pipeline: nothing is published before the source has synced; a burst
//! of changes is coalesced into few snapshots; a change that does not alter
//! the output publishes nothing; a change alters only its own keys.

use std::sync::Arc;
use std::time::Duration;

use api::manifest::{Object, ObjectKey};
use istiod_rs::index::MeshConfig;
use istiod_rs::pipeline::{self, Debounce, PipelineMetrics};
use istiod_rs::snapshot::Snapshot;
use istiod_rs::state::Store;
use tokio::sync::watch;

fn object(yaml: &str) -> Object {
    api::manifest::parse(yaml).unwrap().objects.remove(0)
}

fn pod(name: &str, ip: &str) -> Object {
    object(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-a, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
    ))
}

fn uid(name: &str) -> String {
    MeshConfig::default().pod_uid("shop", name)
}

async fn next_snapshot(rx: &mut watch::Receiver<Arc<Snapshot>>) -> Arc<Snapshot> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a snapshot was published")
        .unwrap();
    rx.borrow_and_update().clone()
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn publishes_after_sync_and_only_on_change() {
    let store = Store::new();
    let metrics = Arc::new(PipelineMetrics::default());
    let (outputs, task) = pipeline::spawn(
        store.clone(),
        MeshConfig::default(),
        Debounce::default(),
        metrics.clone(),
    );
    let mut rx = outputs.snapshots;
    store.update(|s| {
        s.apply(pod("a", "10.0.0.1"));
        s.apply(pod("b", "10.0.0.2"));
    });
    // Not synced: nothing is translated yet.
    tokio::task::yield_now().await;
    assert_eq!(metrics.translations.get(), 0);
    assert!(rx.borrow().is_empty());

    store.mark_synced();
    let first = next_snapshot(&mut rx).await;
    let addresses = first.of_type(api::type_url::ADDRESS);
    assert_eq!(addresses.len(), 2);

    // Only the edited pod's version changes.
    store.update(|s| s.apply(pod("b", "10.0.0.22")));
    let second = next_snapshot(&mut rx).await;
    let (a1, a2) = (
        &first.of_type(api::type_url::ADDRESS)[&uid("a")],
        &second.of_type(api::type_url::ADDRESS)[&uid("a")],
    );
    assert_eq!(a1.version, a2.version);
    let (b1, b2) = (
        &first.of_type(api::type_url::ADDRESS)[&uid("b")],
        &second.of_type(api::type_url::ADDRESS)[&uid("b")],
    );
    assert_ne!(b1.version, b2.version);

    // A change the translation ignores: translated, not published.
    let translations = metrics.translations.get();
    let publishes = metrics.publishes.get();
    store.update(|s| {
        s.apply(object(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
        ))
    });
    eventually("the change was translated", || {
        metrics.translations.get() > translations
    })
    .await;
    assert_eq!(metrics.publishes.get(), publishes);
    assert!(!rx.has_changed().unwrap());

    // Deleting a pod removes its key.
    store.update(|s| s.delete(api::manifest::Kind::Pod, &ObjectKey::new("shop", "a")));
    let third = next_snapshot(&mut rx).await;
    assert!(
        !third
            .of_type(api::type_url::ADDRESS)
            .contains_key(&uid("a"))
    );
    task.abort();
}

#[tokio::test]
async fn a_burst_of_changes_is_coalesced() {
    let store = Store::new();
    store.mark_synced();
    let metrics = Arc::new(PipelineMetrics::default());
    // A quiet period far longer than the burst takes, so the burst is one.
    let debounce = Debounce {
        quiet: Duration::from_millis(300),
        max_delay: Duration::from_secs(5),
    };
    let (outputs, task) = pipeline::spawn(
        store.clone(),
        MeshConfig::default(),
        debounce,
        metrics.clone(),
    );
    let mut rx = outputs.snapshots;
    next_snapshot(&mut rx).await;
    let before = metrics.translations.get();
    let pods: Vec<Object> = (0..500u32)
        .map(|i| pod(&format!("p{i}"), &format!("10.1.{}.{}", i / 256, i % 256)))
        .collect();
    for p in pods {
        store.update(|s| s.apply(p));
    }
    eventually("every pod published", || {
        rx.borrow().of_type(api::type_url::ADDRESS).len() == 500
    })
    .await;
    let translations = metrics.translations.get() - before;
    assert!(
        translations <= 5,
        "500 changes took {translations} translations"
    );
    task.abort();
}

/// The local-mode chain: a YAML directory, the store, the pipeline. Editing
/// one pod's file changes exactly that pod's resource.
#[tokio::test]
async fn directory_edits_reach_the_snapshot() {
    use istiod_rs::state::directory::DirectorySource;

    let dir = tempfile::tempdir().unwrap();
    let pod_yaml = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-a, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
        )
    };
    std::fs::write(
        dir.path().join("cluster.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("a.yaml"), pod_yaml("a", "10.0.0.1")).unwrap();
    std::fs::write(dir.path().join("b.yaml"), pod_yaml("b", "10.0.0.2")).unwrap();

    let store = Store::new();
    let source = tokio::spawn(
        DirectorySource::new(dir.path()).run(store.clone(), Duration::from_millis(20)),
    );
    let (outputs, task) = pipeline::spawn(
        store.clone(),
        MeshConfig::default(),
        Debounce::default(),
        Arc::new(PipelineMetrics::default()),
    );
    let mut rx = outputs.snapshots;
    let first = next_snapshot(&mut rx).await;
    assert_eq!(first.of_type(api::type_url::ADDRESS).len(), 3);

    std::fs::write(dir.path().join("b.yaml"), pod_yaml("b", "10.0.0.22")).unwrap();
    let second = next_snapshot(&mut rx).await;
    let changed: Vec<&String> = second
        .of_type(api::type_url::ADDRESS)
        .iter()
        .filter(|(name, r)| first.of_type(api::type_url::ADDRESS)[*name].version != r.version)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(changed, [&uid("b")]);

    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    let third = next_snapshot(&mut rx).await;
    assert!(
        !third
            .of_type(api::type_url::ADDRESS)
            .contains_key(&uid("a"))
    );
    source.abort();
    task.abort();
}
