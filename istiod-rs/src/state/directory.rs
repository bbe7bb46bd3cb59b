//! Local mode's source: every `*.yaml` / `*.yml` file under a directory
//! (recursively, `generated/` included) is the cluster state, the same
//! objects a user would `kubectl apply`.
//!
//! The directory is polled: a file whose size or modification time moved is
//! read again and, if its content hash differs, parsed again. Polling keeps
//! the dependency tree lean and works on every filesystem (bind mounts and
//! ConfigMap volumes included). After the first load, new content is applied
//! only once two consecutive polls read the same bytes, so a file caught
//! half-written (truncated, then written) never briefly empties the mesh;
//! at the default interval an edit is reflected within half a second.
//!
//! A malformed file is reported (`file:line: reason`) and its **last good
//! objects are kept**: an editor saving a half-written file must not make
//! the mesh forget the pods in it for a moment. A file that was never good
//! contributes nothing. Deleting a file removes its objects.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api::manifest::ManifestDir;
use tracing::{debug, info, warn};

use super::{ClusterState, Store};

/// How often the directory is looked at by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Sub-directory holding the objects istiod-rs provisions itself.
pub const GENERATED_DIR: &str = "generated";

/// A file or directory that cannot be used as it is now.
pub use api::manifest::FileProblem as DirectoryError;

/// What one scan found.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Whether the set of objects differs from the previous scan's.
    pub changed: bool,
    /// Files that became unreadable or malformed in this scan.
    pub new_problems: Vec<DirectoryError>,
}

/// Watches one directory. Each file's objects are kept as a state of their
/// own so that the merged state shares them: objects of unchanged files keep
/// their identity, which lets the index reuse their translation.
#[derive(Debug)]
pub struct DirectorySource {
    dir: ManifestDir<ClusterState>,
}

impl DirectorySource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        DirectorySource {
            dir: ManifestDir::new(root),
        }
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
    /// same object, the one whose path sorts last wins (and a warning says so).
    pub fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for (path, objects) in self.dir.files() {
            state.merge(objects, |kind, key| {
                warn!(
                    %kind,
                    object = %key,
                    file = %path.display(),
                    "object defined in more than one file; this file's definition wins"
                );
            });
        }
        state
    }

    /// Loads the directory into `store`, marks it synced, then keeps it in
    /// step with the files every `interval`, forever.
    pub async fn run(mut self, store: Arc<Store>, interval: Duration) {
        info!(dir = %self.root().display(), "reading cluster state from a directory");
        let mut first = true;
        loop {
            let report = self.scan();
            for problem in &report.new_problems {
                warn!("{problem}");
            }
            if report.changed || first {
                let state = self.state();
                debug!(
                    files = self.dir.len(),
                    pods = state.pods.len(),
                    "directory changed"
                );
                store.update(|s| *s = state);
            }
            if first {
                store.mark_synced();
                first = false;
            }
            tokio::time::sleep(interval).await;
        }
    }
}
