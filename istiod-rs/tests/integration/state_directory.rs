//! The directory source: files in, cluster state out; edits, additions and
//! deletions reflected; malformed files reported with file and line and
//! skipped while everything else loads.

use std::path::Path;
use std::time::Duration;

use api::manifest::{Kind, ObjectKey};
use istiod_rs::state::Store;
use istiod_rs::state::directory::{DirectoryError, DirectorySource};

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  nodeName: node-a\n  containers: [{{name: app, image: app}}]\nstatus:\n  podIP: {ip}\n"
    )
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// Scans until new content has been read twice, as the running source does
/// over two polls.
fn settle(source: &mut DirectorySource) -> istiod_rs::state::directory::ScanReport {
    let mut first = source.scan();
    let second = source.scan();
    first.changed |= second.changed;
    first.new_problems.extend(second.new_problems);
    first
}

fn pod_ip(source: &DirectorySource, name: &str) -> Option<String> {
    source
        .state()
        .pods
        .get(&ObjectKey::new("shop", name))
        .and_then(|p| p.status.as_ref()?.pod_ip.clone())
}

#[test]
fn loads_every_yaml_file_recursively() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        &root.join("cluster.yaml"),
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n{}---\n{}",
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2")
        ),
    );
    write(&root.join("apps/c.yml"), &pod("c", "10.0.0.3"));
    write(
        &root.join("generated/waypoint.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: shop\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
    );
    write(
        &root.join("routes.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: api\n  namespace: shop\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api}]\n",
    );
    write(&root.join("notes.txt"), "not yaml, not read");
    write(&root.join(".hidden.yaml"), "not: [valid");
    let mut source = DirectorySource::new(root);
    let report = source.scan();
    assert!(report.changed);
    assert!(report.new_problems.is_empty(), "{:?}", report.new_problems);
    let state = source.state();
    assert_eq!(state.count(Kind::Namespace), 1);
    assert_eq!(state.count(Kind::Pod), 3);
    assert_eq!(state.count(Kind::Gateway), 1);
    assert_eq!(state.count(Kind::GrpcRoute), 1);
    // Nothing changed: nothing to do.
    assert!(!source.scan().changed);
}

#[test]
fn reflects_edits_additions_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("a.yaml"), &pod("a", "10.0.0.1"));
    let mut source = DirectorySource::new(root);
    source.scan();
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.1"));

    write(&root.join("a.yaml"), &pod("a", "10.0.0.9"));
    assert!(settle(&mut source).changed);
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.9"));

    write(&root.join("more/b.yaml"), &pod("b", "10.0.0.2"));
    assert!(settle(&mut source).changed);
    assert_eq!(pod_ip(&source, "b").as_deref(), Some("10.0.0.2"));

    std::fs::remove_file(root.join("a.yaml")).unwrap();
    assert!(source.scan().changed);
    assert_eq!(pod_ip(&source, "a"), None);
    assert_eq!(source.state().count(Kind::Pod), 1);
}

#[test]
fn malformed_files_are_reported_with_file_and_line_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("good.yaml"), &pod("good", "10.0.0.1"));
    // `containers` of the second document (line 17 of the file) is not a list.
    let bad = format!(
        "{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers: 12\n",
        pod("first-in-bad-file", "10.0.0.2")
    );
    write(&root.join("bad.yaml"), &bad);
    let mut source = DirectorySource::new(root);
    let report = source.scan();
    assert_eq!(report.new_problems.len(), 1, "{:?}", report.new_problems);
    let problem = &report.new_problems[0];
    let DirectoryError::Malformed { path, line, .. } = problem else {
        panic!("expected a malformed file, got {problem}");
    };
    assert_eq!(path, &root.join("bad.yaml"));
    assert_eq!(*line, 17, "{problem}");
    let text = problem.to_string();
    assert!(text.contains("bad.yaml:17:"), "{text}");
    // Everything else loads; nothing of the bad file does.
    assert_eq!(pod_ip(&source, "good").as_deref(), Some("10.0.0.1"));
    assert_eq!(pod_ip(&source, "first-in-bad-file"), None);
    // Reported once, not on every scan.
    assert!(source.scan().new_problems.is_empty());
    assert_eq!(source.problems().len(), 1);
}

#[test]
fn a_file_broken_by_an_edit_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = root.join("apps.yaml");
    write(&file, &pod("a", "10.0.0.1"));
    let mut source = DirectorySource::new(root);
    source.scan();
    write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [half-saved\n",
    );
    let report = settle(&mut source);
    assert_eq!(report.new_problems.len(), 1);
    assert!(report.new_problems[0].to_string().contains("apps.yaml:"));
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.1"));
    // Fixed: the new content applies and the problem is gone.
    write(&file, &pod("a", "10.0.0.5"));
    assert!(settle(&mut source).changed);
    assert!(source.problems().is_empty());
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.5"));
}

/// The running source keeps the store in step with the files.
#[tokio::test]
async fn running_source_updates_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write(&root.join("a.yaml"), &pod("a", "10.0.0.1"));
    let store = Store::new();
    let task =
        tokio::spawn(DirectorySource::new(&root).run(store.clone(), Duration::from_millis(20)));
    let mut synced = store.synced();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
        .await
        .expect("synced in time")
        .unwrap();
    assert_eq!(store.read().count(Kind::Pod), 1);

    let has = |name: &'static str| {
        let store = store.clone();
        move || {
            store
                .read()
                .pods
                .contains_key(&ObjectKey::new("shop", name))
        }
    };
    write(&root.join("b.yaml"), &pod("b", "10.0.0.2"));
    wait_until(has("b")).await;
    std::fs::remove_file(root.join("a.yaml")).unwrap();
    let gone = has("a");
    wait_until(move || !gone()).await;
    task.abort();
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store did not follow the directory"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn unchanged_files_keep_their_objects_and_later_files_win() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("a.yaml"), &pod("a", "10.0.0.1"));
    write(&root.join("b.yaml"), &pod("b", "10.0.0.2"));
    let mut source = DirectorySource::new(root);
    source.scan();
    let before = source.state();
    write(&root.join("b.yaml"), &pod("b", "10.0.0.3"));
    settle(&mut source);
    let after = source.state();
    let key = ObjectKey::new("shop", "a");
    // The same object, not a copy: the index can reuse its translation.
    assert!(std::sync::Arc::ptr_eq(
        &before.pods[&key],
        &after.pods[&key]
    ));

    // The same pod in a file sorting later wins.
    write(&root.join("z.yaml"), &pod("a", "10.0.0.99"));
    settle(&mut source);
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.99"));
}

#[test]
fn a_missing_directory_is_reported_once_and_loads_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not-yet");
    let mut source = DirectorySource::new(&root);
    let report = source.scan();
    assert_eq!(report.new_problems.len(), 1);
    assert!(matches!(
        report.new_problems[0],
        DirectoryError::Read { .. }
    ));
    assert!(source.scan().new_problems.is_empty());
    write(&root.join("a.yaml"), &pod("a", "10.0.0.1"));
    assert!(settle(&mut source).changed);
    assert!(source.problems().is_empty());
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.1"));
}

#[test]
fn content_read_once_mid_write_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.yaml");
    write(&file, &pod("a", "10.0.0.1"));
    let mut source = DirectorySource::new(dir.path());
    source.scan();
    // Caught between truncation and write: an empty file, once.
    write(&file, "");
    assert!(!source.scan().changed);
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.1"));
    // The write completes; the new content applies once read twice.
    write(&file, &pod("a", "10.0.0.2"));
    assert!(!source.scan().changed);
    assert!(source.scan().changed);
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.2"));
}

#[test]
fn objects_defined_in_more_than_one_file_are_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("a.yaml"), &pod("a", "10.0.0.1"));
    write(
        &root.join("b.yaml"),
        &format!("{}---\n{}", pod("a", "10.0.0.2"), pod("b", "10.0.0.3")),
    );
    write(&root.join("c.yaml"), &pod("a", "10.0.0.4"));
    let mut source = DirectorySource::new(root);
    source.scan();
    let merged = source.merged();
    assert_eq!(
        merged.duplicates,
        [(Kind::Pod, ObjectKey::new("shop", "a"))]
    );
    // The file sorting last wins.
    assert_eq!(pod_ip(&source, "a").as_deref(), Some("10.0.0.4"));
}
