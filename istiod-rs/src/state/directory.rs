//! Local mode's source: every `*.yaml` / `*.yml` file under a directory
//! (recursively, `generated/` included) is the cluster state, the same
//! objects a user would `kubectl apply`.
//!
//! The directory is polled (`api::manifest::ManifestDir`): a file whose
//! size, modification time or identity moved is read again and, if its
//! content hash differs, parsed again. Polling keeps the dependency tree lean
//! and works on every filesystem (bind mounts and ConfigMap volumes
//! included). After the first load, new content is applied only once two
//! consecutive polls read the same bytes, so a file caught half-written
//! (truncated, then written) never briefly empties the mesh; at the default
//! interval an edit is reflected within half a second.
//!
//! A malformed, oversized or unreadable file is reported (`file:line:
//! reason`) and its **last good objects are kept**: an editor saving a
//! half-written file must not make the mesh forget the pods in it for a
//! moment. A file that was never good contributes nothing. Deleting a file
//! removes its objects. Within a file, an object with a field its kind does
//! not have is refused (its last good version kept) and a document of an
//! unknown kind or apiVersion skipped, each reported once. FIFOs, sockets
//! and devices are reported and never opened.
//!
//! Reading, parsing and merging run on a thread of their own, never on the
//! async runtime that serves the CA, xDS and readiness: while a big file is
//! parsed (or a read is stuck), istiod keeps serving the last state, and
//! SIGTERM still ends the process.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use api::manifest::{FileReading, Kind, ManifestDir, ObjectKey, Poller};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{debug, error, info, warn};

use super::{ClusterState, Store};

/// How often the directory is looked at by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Sub-directory holding the objects istiod-rs provisions itself.
pub const GENERATED_DIR: &str = "generated";

/// The `reason` of the same object defined in more than one file.
const DUPLICATE_OBJECT: &str = "duplicate_object";

/// How many duplicated objects the summary line names.
const DUPLICATE_EXAMPLES: usize = 3;

/// A file or directory that cannot be used as it is now.
pub use api::manifest::FileProblem as DirectoryError;

/// How the directory is read.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    pub dir: PathBuf,
    /// `--poll-interval`.
    pub poll_interval: Duration,
    /// The size limit (`--max-config-file-size`; larger files are
    /// reported, not read) and the reader (tests stand in one that holds a
    /// read until released).
    pub reading: FileReading,
}

impl DirectoryConfig {
    /// `dir` with the default interval, size limit and reader.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirectoryConfig {
            dir: dir.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            reading: FileReading::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabels {
    reason: &'static str,
}

/// `istiod_config_file_problems{reason}`: what in the directory is not used
/// as written now. Reasons: those of `api::manifest::FileProblem::reason`, and
/// `duplicate_object` (an object defined in more than one file).
#[derive(Clone, Debug, Default)]
pub struct DirectoryMetrics {
    problems: Family<ProblemLabels, Gauge>,
}

impl DirectoryMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istiod_config_file_problems",
            "Problems of the --config-dir files now (files not read, documents or objects skipped, objects defined twice), by reason",
            self.problems.clone(),
        );
    }

    fn set(&self, counts: &BTreeMap<&'static str, usize>, duplicates: usize) {
        let reasons = counts
            .iter()
            .map(|(reason, n)| (*reason, *n))
            .chain([(DUPLICATE_OBJECT, duplicates)]);
        for (reason, n) in reasons {
            self.problems
                .get_or_create(&ProblemLabels { reason })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Whether the set of objects differs from the previous scan's.
    pub changed: bool,
    /// Problems that appeared in this scan.
    pub new_problems: Vec<DirectoryError>,
}

/// The directory's state, and the objects defined in more than one file.
#[derive(Debug, Default)]
pub struct Merged {
    pub state: ClusterState,
    /// Each object defined in more than one file (once, in kind and key
    /// order); the definition of the file whose path sorts last wins.
    pub duplicates: Vec<(Kind, ObjectKey)>,
}

/// Watches one directory. Each file's objects are kept as a state of their
/// own so that the merged state shares them: objects of unchanged files keep
/// their identity, which lets the index reuse their translation.
#[derive(Debug)]
pub struct DirectorySource {
    dir: ManifestDir<ClusterState>,
    metrics: DirectoryMetrics,
    /// The duplicated objects last reported.
    duplicates: Vec<(Kind, ObjectKey)>,
}

impl DirectorySource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_config(&DirectoryConfig::new(root))
    }

    pub fn with_config(config: &DirectoryConfig) -> Self {
        DirectorySource {
            dir: ManifestDir::new(&config.dir).with_reading(config.reading.clone()),
            metrics: DirectoryMetrics::default(),
            duplicates: Vec::new(),
        }
    }

    /// Counts problems in `metrics` (registered by the caller).
    pub fn with_metrics(mut self, metrics: DirectoryMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn root(&self) -> &Path {
        self.dir.root()
    }

    /// Looks at every file once, re-reading those that changed. After the
    /// first scan, new content applies on the second scan that reads it.
    pub fn scan(&mut self) -> ScanReport {
        let scan = self
            .dir
            .scan(|_, manifest| ClusterState::from_objects(manifest.objects));
        ScanReport {
            changed: scan.changed,
            new_problems: scan.new_problems,
        }
    }

    /// Problems of the files and directories as they are now.
    pub fn problems(&self) -> Vec<DirectoryError> {
        self.dir.problems()
    }

    /// The cluster state the directory describes. When two files define the
    /// same object, the one whose path sorts last wins.
    pub fn state(&self) -> ClusterState {
        self.merged().state
    }

    /// [`DirectorySource::state`], with the objects defined more than once.
    pub fn merged(&self) -> Merged {
        let mut merged = Merged::default();
        for (_, objects) in self.dir.files() {
            merged.state.merge(objects, |kind, key| {
                merged.duplicates.push((kind, key.clone()));
            });
        }
        merged.duplicates.sort();
        merged.duplicates.dedup();
        merged
    }

    /// One line for every object defined more than once, when that set
    /// changed: how many, and the files of a few.
    fn report_duplicates(&mut self, duplicates: Vec<(Kind, ObjectKey)>) {
        if duplicates == self.duplicates {
            return;
        }
        if duplicates.is_empty() {
            info!("no object is defined in more than one file any more");
        } else {
            let examples: Vec<String> = duplicates
                .iter()
                .take(DUPLICATE_EXAMPLES)
                .map(|(kind, key)| {
                    let files: Vec<String> = self
                        .dir
                        .files()
                        .filter(|(_, objects)| objects.object(*kind, key).is_some())
                        .map(|(path, _)| path.display().to_string())
                        .collect();
                    format!("{kind} {key} ({})", files.join(", "))
                })
                .collect();
            warn!(
                count = duplicates.len(),
                examples = %examples.join("; "),
                "objects defined in more than one file; for each, the file whose path sorts last wins"
            );
        }
        self.duplicates = duplicates;
    }

    /// One poll: scan, report, and on a change put the new state in `store`.
    fn poll(&mut self, store: &Store, first: bool) {
        let report = self.scan();
        for problem in &report.new_problems {
            warn!("{problem}");
        }
        if report.changed || first {
            let Merged { state, duplicates } = self.merged();
            debug!(
                files = self.dir.len(),
                pods = state.pods.len(),
                "directory changed"
            );
            self.report_duplicates(duplicates);
            store.replace(state);
        }
        self.metrics
            .set(&self.dir.problem_counts(), self.duplicates.len());
        if first {
            store.mark_synced();
        }
    }

    /// Loads the directory into `store`, marks it synced, then keeps it in
    /// step with the files every `interval`, until dropped (aborted). The
    /// work happens on a thread of its own.
    pub async fn run(mut self, store: Arc<Store>, interval: Duration) {
        info!(dir = %self.root().display(), "reading cluster state from a directory");
        let mut first = true;
        let poller = Poller::spawn("config-dir", interval, move || {
            self.poll(&store, first);
            first = false;
            ControlFlow::Continue(())
        });
        match poller {
            // Held until this task is dropped, which stops the thread.
            Ok(_poller) => std::future::pending::<()>().await,
            Err(e) => error!(
                error = %e,
                "could not start the thread that reads the config directory; the cluster state stays empty"
            ),
        }
    }
}
