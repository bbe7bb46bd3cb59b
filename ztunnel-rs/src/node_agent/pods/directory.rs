//! Local mode's pod source: the Namespaces, and the Pods scheduled on this
//! node, among the YAML files of the config directory istiod-rs reads
//! (`--config-dir`), parsed with `api::manifest` like istiod-rs parses them.
//!
//! The directory is polled (every 250 ms by default) through
//! `api::manifest::ManifestDir`, as istiod-rs polls it, with the same
//! protections: only regular files are read (a FIFO, socket or device is
//! reported and never opened), none larger than `--max-config-file-size`,
//! symbolic links followed without looping, and an object with a field its
//! kind does not have refused while its last good version stays. The polls
//! run on a thread of their own: a slow or stuck read never stalls the
//! agent's runtime, nor keeps the process from exiting. A file is read
//! again when its size, modification time or identity moved, or while that
//! time is too recent to trust. After the first scan, new content counts
//! only once two polls in a row read the same bytes: a file caught
//! half-written (truncated, then written) must not unenrol its pods for a
//! moment. A malformed file is logged once and keeps its last good objects;
//! a deleted file takes its objects with it. Problems are counted by
//! `istio_node_agent_config_file_problems{reason}`.
//!
//! The first scan reports every namespace and pod followed by
//! [`PodEvent::NamespacesListed`] / [`PodEvent::PodsListed`]; later scans
//! report only what changed.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use api::manifest::{FileContent, FileReading, Kind, ManifestDir, Object, ObjectKey, Poller};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::kube::{namespace_meta, pod_meta};
use super::{PodEvent, PodSource, PodSourceError};
use crate::node_agent::enrolment::{NamespaceMeta, PodKey, PodMeta};

/// How often the directory is looked at by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabels {
    reason: &'static str,
}

/// `istio_node_agent_config_file_problems{reason}`: what in the config
/// directory is not used as written now (`api::manifest::FileProblem::reason`).
#[derive(Clone, Debug, Default)]
pub struct ConfigFileMetrics {
    problems: Family<ProblemLabels, Gauge>,
}

impl ConfigFileMetrics {
    /// Registers under the agent's registry (prefix `istio_`).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ConfigFileMetrics::default();
        registry.register(
            "node_agent_config_file_problems",
            "Problems of the --config-dir files now (files not read, documents or objects skipped), by reason",
            metrics.problems.clone(),
        );
        metrics
    }

    fn set(&self, counts: &BTreeMap<&'static str, usize>) {
        for (reason, n) in counts {
            self.problems
                .get_or_create(&ProblemLabels { reason })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}

/// Watches a config directory for this node's pods.
#[derive(Clone, Debug)]
pub struct DirectoryPodSource {
    root: PathBuf,
    node_name: String,
    interval: Duration,
    reading: FileReading,
    metrics: ConfigFileMetrics,
}

impl DirectoryPodSource {
    pub fn new(root: impl Into<PathBuf>, node_name: impl Into<String>) -> Self {
        DirectoryPodSource {
            root: root.into(),
            node_name: node_name.into(),
            interval: DEFAULT_POLL_INTERVAL,
            reading: FileReading::default(),
            metrics: ConfigFileMetrics::default(),
        }
    }

    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How files are read: the size limit (`--max-config-file-size`), and
    /// the reader (tests stand in one that holds reads).
    pub fn with_reading(mut self, reading: FileReading) -> Self {
        self.reading = reading;
        self
    }

    pub fn with_metrics(mut self, metrics: ConfigFileMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

impl PodSource for DirectoryPodSource {
    async fn run(self, events: mpsc::Sender<PodEvent>) -> Result<(), PodSourceError> {
        info!(dir = %self.root.display(), node = %self.node_name, "reading pods from a config directory");
        let mut reader = Reader::new(self.root, self.node_name).with_reading(self.reading);
        let metrics = self.metrics;
        let mut known: Option<View> = None;
        let (gone_tx, gone) = oneshot::channel();
        let mut gone_tx = Some(gone_tx);
        // Dropped with this future, which stops the thread.
        let _poller = Poller::spawn("config-dir", self.interval, move || {
            let view = reader.scan();
            metrics.set(&reader.dir.problem_counts());
            let changes = match &known {
                None => view.listing(),
                Some(before) => before.changes_to(&view),
            };
            for event in changes {
                if events.blocking_send(event).is_err() {
                    if let Some(tx) = gone_tx.take() {
                        let _ = tx.send(());
                    }
                    return ControlFlow::Break(());
                }
            }
            known = Some(view);
            ControlFlow::Continue(())
        })
        .map_err(|e| PodSourceError::DirectoryReader(e.to_string()))?;
        match gone.await {
            Ok(()) => Err(PodSourceError::AgentGone),
            Err(_) => Err(PodSourceError::DirectoryReader(
                "it ended unexpectedly (see the log)".into(),
            )),
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

/// A file's namespaces, and the pods on this node, as last read: what the
/// agent needs of them, and the objects themselves (the last good version
/// of one refused in a new version of the file).
#[derive(Debug, Default)]
struct FileObjects {
    namespaces: Vec<NamespaceMeta>,
    pods: Vec<PodMeta>,
    objects: Vec<Object>,
}

impl FileContent for FileObjects {
    fn last_good(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
        self.objects
            .iter()
            .find(|o| o.kind() == kind && o.key() == *key)
            .cloned()
    }
}

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

    fn with_reading(mut self, reading: FileReading) -> Self {
        self.dir = self.dir.with_reading(reading);
        self
    }

    /// Looks at every file once; returns the merged view.
    fn scan(&mut self) -> View {
        let node_name = &self.node_name;
        let scan = self.dir.scan(|path, manifest| {
            let objects = objects(node_name, manifest.objects);
            debug!(file = %path.display(), namespaces = objects.namespaces.len(), pods = objects.pods.len(), "read");
            objects
        });
        for problem in &scan.new_problems {
            warn!(
                %problem,
                "a config file, directory or object cannot be used until it is fixed; the last good pods and namespaces stay"
            );
        }
        self.view()
    }

    /// Every file's objects; a later file (in path order) wins a duplicate.
    fn view(&self) -> View {
        let mut view = View::default();
        for (_, file) in self.dir.files() {
            for ns in &file.namespaces {
                view.namespaces.insert(ns.name.clone(), ns.clone());
            }
            for pod in &file.pods {
                view.pods.insert(pod.key(), pod.clone());
            }
        }
        view
    }
}

/// The namespaces, and the pods on `node_name`, among `objects`.
fn objects(node_name: &str, objects: Vec<Object>) -> FileObjects {
    let mut kept = FileObjects::default();
    for object in objects {
        match &object {
            Object::Namespace(ns) => kept.namespaces.push(namespace_meta(ns.clone())),
            Object::Pod(pod) => {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                if node != Some(node_name) {
                    continue;
                }
                kept.pods.push(pod_meta(pod.clone()));
            }
            _ => continue,
        }
        kept.objects.push(object);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_agent::enrolment::{Enrolment, decide};
    use api::manifest::testing::{HeldReads, mkfifo, on_own_runtime};

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

    #[test]
    fn a_pod_with_an_unknown_field_keeps_its_last_good_version() {
        let mut dir = Dir::new(&[
            ("ns.yaml", &namespace(AMBIENT)),
            ("cart-0.yaml", &pod("cart-0", NODE, "v: '1'")),
        ]);
        // `nodeNme` for `nodeName`: refused, as the API server would.
        let typo = pod("cart-0", NODE, "v: '2'").replace("nodeName", "nodeNme");
        dir.write("cart-0.yaml", &typo);
        assert_eq!(dir.next_changes(), []);
        assert_eq!(
            dir.view.pods[&PodKey::new("shop", "cart-0")].labels["v"],
            "1"
        );
        let problems = dir.reader.dir.problems();
        assert!(
            matches!(&problems[..], [api::manifest::FileProblem::UnknownField { fields, .. }]
                if fields == &["spec.nodeNme"]),
            "{problems:?}"
        );
    }

    /// Only turns a hang into a failure.
    const PATIENCE: Duration = Duration::from_secs(30);

    #[test]
    fn fifos_and_oversized_files_are_reported_and_the_pods_still_listed() {
        on_own_runtime(PATIENCE, |runtime| {
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("ns.yaml"), namespace(AMBIENT)).unwrap();
                std::fs::write(dir.path().join("cart-0.yaml"), pod("cart-0", NODE, "")).unwrap();
                // A FIFO no one writes to: reading it would wait forever.
                mkfifo(&dir.path().join("pipe.yaml"));
                // Over the limit, with a pod that must not be listed.
                let big = format!("{}# {}\n", pod("cart-1", NODE, ""), "x".repeat(4096));
                std::fs::write(dir.path().join("big.yaml"), big).unwrap();
                let mut registry = proxy_core::metrics::new_registry();
                let metrics = ConfigFileMetrics::register(&mut registry);
                let source = DirectoryPodSource::new(dir.path(), NODE)
                    .with_poll_interval(Duration::from_millis(10))
                    .with_reading(FileReading {
                        max_file_size: 1024,
                        ..FileReading::default()
                    })
                    .with_metrics(metrics);
                let (tx, mut rx) = mpsc::channel(16);
                let task = tokio::spawn(source.run(tx));
                let mut listing = Vec::new();
                while listing.len() < 4 {
                    let event = tokio::time::timeout(PATIENCE, rx.recv())
                        .await
                        .expect("the listing arrives")
                        .unwrap();
                    listing.push(event);
                }
                assert_eq!(
                    listing[3],
                    PodEvent::PodsListed(vec![PodKey::new("shop", "cart-0")])
                );
                let text = proxy_core::metrics::encode(&registry).unwrap();
                for reason in ["not_regular_file", "too_large"] {
                    let sample =
                        format!("istio_node_agent_config_file_problems{{reason=\"{reason}\"}} 1");
                    assert!(text.contains(&sample), "{sample} not in\n{text}");
                }
                task.abort();
            });
        });
    }

    #[test]
    fn a_stuck_read_keeps_neither_the_agent_nor_its_shutdown_waiting() {
        let held = HeldReads::new("cart-0.yaml");
        let reads = held.clone();
        on_own_runtime(PATIENCE, move |runtime| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("cart-0.yaml"), pod("cart-0", NODE, "")).unwrap();
            runtime.block_on(async move {
                let source = DirectoryPodSource::new(dir.path(), NODE)
                    .with_poll_interval(Duration::from_millis(10))
                    .with_reading(FileReading {
                        reader: std::sync::Arc::new(reads.clone()),
                        ..FileReading::default()
                    });
                let (tx, _rx) = mpsc::channel(16);
                let task = tokio::spawn(source.run(tx));
                let deadline = tokio::time::Instant::now() + PATIENCE;
                while reads.waiting() == 0 {
                    assert!(tokio::time::Instant::now() < deadline, "never read");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // The runtime still runs other work while the read is stuck.
                let answered = tokio::spawn(async { 42 });
                assert_eq!(answered.await.unwrap(), 42);
                // The agent stops: the source's task ends at once.
                task.abort();
                assert!(task.await.unwrap_err().is_cancelled());
            });
            // Returning drops the runtime, which waits for its threads: the
            // stuck read is on none of them.
        });
        // Still stuck: the test proved something.
        assert_eq!(held.waiting(), 1);
        held.release();
    }
}
