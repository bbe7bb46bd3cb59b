//! Local mode's pod source: the Namespaces, and the Pods scheduled on this
//! node, among the YAML files of the config directory istiod-rs reads
//! (`--config-dir`), parsed with `api::manifest` like istiod-rs parses them.
//!
//! The directory is polled (every 250 ms by default) through
//! `api::manifest::ManifestDir`, as istiod-rs polls it, so a label edit
//! reaches the agent within a second. A file is read again when its size or
//! modification time moved, or while that time is too recent to trust.
//! After the first scan, new content counts only once two polls in a row
//! read the same bytes: a file caught half-written (truncated, then
//! written) must not unenrol its pods for a moment. A malformed file is
//! logged once and keeps its last good objects; a deleted file takes its
//! objects with it.
//!
//! The first scan reports every namespace and pod followed by
//! [`PodEvent::NamespacesListed`] / [`PodEvent::PodsListed`]; later scans
//! report only what changed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use api::manifest::{ManifestDir, Object};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::kube::{namespace_meta, pod_meta};
use super::{PodEvent, PodSource, PodSourceError};
use crate::node_agent::enrolment::{NamespaceMeta, PodKey, PodMeta};

/// How often the directory is looked at by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Watches a config directory for this node's pods.
#[derive(Clone, Debug)]
pub struct DirectoryPodSource {
    root: PathBuf,
    node_name: String,
    interval: Duration,
}

impl DirectoryPodSource {
    pub fn new(root: impl Into<PathBuf>, node_name: impl Into<String>) -> Self {
        DirectoryPodSource {
            root: root.into(),
            node_name: node_name.into(),
            interval: DEFAULT_POLL_INTERVAL,
        }
    }

    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }
}

impl PodSource for DirectoryPodSource {
    async fn run(self, events: mpsc::Sender<PodEvent>) -> Result<(), PodSourceError> {
        info!(dir = %self.root.display(), node = %self.node_name, "reading pods from a config directory");
        let mut reader = Some(Reader::new(self.root, self.node_name));
        let mut known: Option<View> = None;
        loop {
            let mut scanning = reader
                .take()
                .expect("the reader is put back after each scan");
            let scanned = tokio::task::spawn_blocking(move || {
                let view = scanning.scan();
                (scanning, view)
            })
            .await;
            let (back, view) = match scanned {
                Ok(scanned) => scanned,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down.
                Err(_) => return Ok(()),
            };
            reader = Some(back);
            let changes = match &known {
                None => view.listing(),
                Some(before) => before.changes_to(&view),
            };
            for event in changes {
                events
                    .send(event)
                    .await
                    .map_err(|_| PodSourceError::AgentGone)?;
            }
            known = Some(view);
            tokio::time::sleep(self.interval).await;
        }
    }
}

/// What the directory says, as far as the agent cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct View {
    namespaces: BTreeMap<String, NamespaceMeta>,
    pods: BTreeMap<PodKey, PodMeta>,
}

impl View {
    /// Everything, then the lists that let the agent drop what is not here.
    fn listing(&self) -> Vec<PodEvent> {
        let mut events: Vec<PodEvent> = self
            .namespaces
            .values()
            .cloned()
            .map(PodEvent::Namespace)
            .collect();
        events.push(PodEvent::NamespacesListed(
            self.namespaces.keys().cloned().collect(),
        ));
        events.extend(self.pods.values().cloned().map(PodEvent::Pod));
        events.push(PodEvent::PodsListed(self.pods.keys().cloned().collect()));
        events
    }

    /// What changed from `self` to `next`: namespaces first, so that pods
    /// are decided with their namespace's current labels.
    fn changes_to(&self, next: &View) -> Vec<PodEvent> {
        let mut events = Vec::new();
        changes(
            &self.namespaces,
            &next.namespaces,
            PodEvent::Namespace,
            PodEvent::NamespaceDeleted,
            &mut events,
        );
        changes(
            &self.pods,
            &next.pods,
            PodEvent::Pod,
            PodEvent::PodDeleted,
            &mut events,
        );
        events
    }
}

/// Appends an event per entry that is new or different in `after`, then one
/// per entry gone from it.
fn changes<K: Ord + Clone, V: PartialEq + Clone>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
    changed: impl Fn(V) -> PodEvent,
    deleted: impl Fn(K) -> PodEvent,
    events: &mut Vec<PodEvent>,
) {
    for (key, value) in after {
        if before.get(key) != Some(value) {
            events.push(changed(value.clone()));
        }
    }
    for key in before.keys() {
        if !after.contains_key(key) {
            events.push(deleted(key.clone()));
        }
    }
}

/// A file's namespaces, and the pods on this node, as last read.
type FileObjects = (Vec<NamespaceMeta>, Vec<PodMeta>);

/// The directory's files, re-read as they change (`api::manifest::ManifestDir`).
#[derive(Debug)]
struct Reader {
    node_name: String,
    dir: ManifestDir<FileObjects>,
}

impl Reader {
    fn new(root: PathBuf, node_name: String) -> Self {
        Reader {
            node_name,
            dir: ManifestDir::new(root),
        }
    }

    /// Looks at every file once; returns the merged view.
    fn scan(&mut self) -> View {
        let node_name = &self.node_name;
        let scan = self.dir.scan(|path, manifest| {
            let (namespaces, pods) = objects(node_name, manifest.objects);
            debug!(file = %path.display(), namespaces = namespaces.len(), pods = pods.len(), "read");
            (namespaces, pods)
        });
        for problem in &scan.new_problems {
            warn!(
                %problem,
                "a config file or directory cannot be used until it is fixed; the last good pods and namespaces stay"
            );
        }
        self.view()
    }

    /// Every file's objects; a later file (in path order) wins a duplicate.
    fn view(&self) -> View {
        let mut view = View::default();
        for (_, (namespaces, pods)) in self.dir.files() {
            for ns in namespaces {
                view.namespaces.insert(ns.name.clone(), ns.clone());
            }
            for pod in pods {
                view.pods.insert(pod.key(), pod.clone());
            }
        }
        view
    }
}

/// The namespaces, and the pods on `node_name`, among `objects`.
fn objects(node_name: &str, objects: Vec<Object>) -> FileObjects {
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    for object in objects {
        match object {
            Object::Namespace(ns) => namespaces.push(namespace_meta(ns)),
            Object::Pod(pod) => {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                if node == Some(node_name) {
                    pods.push(pod_meta(pod));
                }
            }
            _ => {}
        }
    }
    (namespaces, pods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_agent::enrolment::{Enrolment, decide};

    const NODE: &str = "node-a";

    fn namespace(labels: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{labels}}}}}\n")
    }

    fn pod(name: &str, node: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, serviceAccountName: cart, containers: []}}\n"
        )
    }

    struct Dir {
        dir: tempfile::TempDir,
        reader: Reader,
        view: View,
    }

    impl Dir {
        fn new(files: &[(&str, &str)]) -> Dir {
            let dir = tempfile::tempdir().unwrap();
            for (name, text) in files {
                std::fs::write(dir.path().join(name), text).unwrap();
            }
            let mut reader = Reader::new(dir.path().to_path_buf(), NODE.into());
            let view = reader.scan();
            Dir { dir, reader, view }
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join(name), text).unwrap();
        }

        /// Scans until the view changes (at most a few polls: content
        /// settles on the second read); the events that change brings.
        fn next_changes(&mut self) -> Vec<PodEvent> {
            for _ in 0..3 {
                let view = self.reader.scan();
                let changes = self.view.changes_to(&view);
                self.view = view;
                if !changes.is_empty() {
                    return changes;
                }
            }
            Vec::new()
        }

        fn enrolment(&self, name: &str) -> Enrolment {
            let pod = &self.view.pods[&PodKey::new("shop", name)];
            decide(pod, self.view.namespaces.get("shop"))
        }
    }

    const AMBIENT: &str = "istio.io/dataplane-mode: ambient";

    #[test]
    fn lists_namespaces_and_this_nodes_pods_first() {
        let dir = Dir::new(&[
            ("ns.yaml", &namespace(AMBIENT)),
            (
                "pods.yaml",
                &format!(
                    "{}---\n{}",
                    pod("cart-0", NODE, ""),
                    pod("cart-1", "node-b", "")
                ),
            ),
        ]);
        let events = dir.view.listing();
        let keys: Vec<PodKey> = dir.view.pods.keys().cloned().collect();
        assert_eq!(
            keys,
            [PodKey::new("shop", "cart-0")],
            "only this node's pods"
        );
        assert!(matches!(&events[0], PodEvent::Namespace(ns) if ns.name == "shop"));
        assert_eq!(events[1], PodEvent::NamespacesListed(vec!["shop".into()]));
        assert!(
            matches!(&events[2], PodEvent::Pod(p) if p.uid == "uid-cart-0" && p.service_account == "cart")
        );
        assert_eq!(events[3], PodEvent::PodsListed(keys));
        assert_eq!(dir.enrolment("cart-0"), Enrolment::Enrolled);
    }

    #[test]
    fn label_changes_enrol_and_unenrol() {
        let mut dir = Dir::new(&[
            ("ns.yaml", &namespace(AMBIENT)),
            ("cart-0.yaml", &pod("cart-0", NODE, "")),
        ]);
        assert!(dir.enrolment("cart-0").is_enrolled());

        // The namespace loses its label: unenrolled.
        dir.write("ns.yaml", &namespace("team: shop"));
        let events = dir.next_changes();
        assert!(
            matches!(&events[..], [PodEvent::Namespace(ns)] if ns.labels.contains_key("team")),
            "{events:?}"
        );
        assert!(!dir.enrolment("cart-0").is_enrolled());

        // The pod's own label enrols it again.
        dir.write("cart-0.yaml", &pod("cart-0", NODE, AMBIENT));
        let events = dir.next_changes();
        assert!(
            matches!(&events[..], [PodEvent::Pod(p)] if p.name == "cart-0"),
            "{events:?}"
        );
        assert!(dir.enrolment("cart-0").is_enrolled());

        // ... and `none` opts it out whatever the namespace says.
        dir.write("ns.yaml", &namespace(AMBIENT));
        dir.next_changes();
        dir.write(
            "cart-0.yaml",
            &pod("cart-0", NODE, "istio.io/dataplane-mode: none"),
        );
        dir.next_changes();
        assert!(!dir.enrolment("cart-0").is_enrolled());

        // Deleting the file deletes the pod.
        std::fs::remove_file(dir.dir.path().join("cart-0.yaml")).unwrap();
        let events = dir.next_changes();
        assert_eq!(
            events,
            [PodEvent::PodDeleted(PodKey::new("shop", "cart-0"))]
        );
    }

    #[test]
    fn new_content_applies_on_the_second_read() {
        let mut dir = Dir::new(&[("ns.yaml", &namespace(AMBIENT))]);
        dir.write("cart-0.yaml", &pod("cart-0", NODE, ""));
        let first = dir.reader.scan();
        assert!(first.pods.is_empty(), "applied after a single read");
        let second = dir.reader.scan();
        assert_eq!(second.pods.len(), 1);
        // A file emptied mid-write and filled again never loses its pod.
        dir.write("cart-0.yaml", "");
        assert_eq!(dir.reader.scan().pods.len(), 1);
        dir.write("cart-0.yaml", &pod("cart-0", NODE, "v: '2'"));
        assert_eq!(dir.reader.scan().pods.len(), 1);
        let settled = dir.reader.scan();
        assert_eq!(settled.pods.len(), 1);
        assert_eq!(
            settled.pods[&PodKey::new("shop", "cart-0")].labels["v"],
            "2"
        );
    }

    #[test]
    fn a_malformed_file_keeps_its_last_good_pods() {
        let mut dir = Dir::new(&[
            ("ns.yaml", &namespace(AMBIENT)),
            ("cart-0.yaml", &pod("cart-0", NODE, "")),
        ]);
        dir.write("cart-0.yaml", "kind: Pod\nmetadata: [unclosed\n");
        assert_eq!(dir.next_changes(), []);
        assert_eq!(dir.view.pods.len(), 1);
        let problems = dir.reader.dir.problems();
        assert!(
            matches!(&problems[..], [api::manifest::FileProblem::Malformed { path, .. }]
                if path.ends_with("cart-0.yaml")),
            "{problems:?}"
        );

        dir.write("cart-0.yaml", &pod("cart-0", NODE, "fixed: 'yes'"));
        let events = dir.next_changes();
        assert!(matches!(&events[..], [PodEvent::Pod(p)] if p.labels["fixed"] == "yes"));
        assert!(dir.reader.dir.problems().is_empty());
    }

    #[tokio::test]
    async fn the_source_feeds_events_until_the_agent_goes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), namespace(AMBIENT)).unwrap();
        std::fs::write(dir.path().join("cart-0.yaml"), pod("cart-0", NODE, "")).unwrap();
        let source =
            DirectoryPodSource::new(dir.path(), NODE).with_poll_interval(Duration::from_millis(10));
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(source.run(tx));
        let mut listing = Vec::new();
        while listing.len() < 4 {
            listing.push(rx.recv().await.unwrap());
        }
        assert!(matches!(listing[3], PodEvent::PodsListed(ref keys) if keys.len() == 1));

        std::fs::write(dir.path().join("ns.yaml"), namespace("")).unwrap();
        let event = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(event, PodEvent::Namespace(ref ns) if ns.labels.is_empty()));

        drop(rx);
        std::fs::write(dir.path().join("ns.yaml"), namespace(AMBIENT)).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(ended, Err(PodSourceError::AgentGone)));
    }
}
