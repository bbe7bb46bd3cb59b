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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api::manifest;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::{ClusterState, Store};

/// How often the directory is looked at by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Coarsest modification-time granularity of the filesystems we expect.
const MTIME_GRANULARITY: Duration = Duration::from_secs(2);

/// Sub-directory holding the objects istiod-rs provisions itself.
pub const GENERATED_DIR: &str = "generated";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("{}: cannot be read ({reason}); check that the file exists and is readable", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}:{line}: {reason}; the file is skipped until it is fixed", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl DirectoryError {
    pub fn path(&self) -> &Path {
        match self {
            DirectoryError::Read { path, .. } | DirectoryError::Malformed { path, .. } => path,
        }
    }
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Whether the set of objects differs from the previous scan's.
    pub changed: bool,
    /// Files that became unreadable or malformed in this scan.
    pub new_problems: Vec<DirectoryError>,
}

#[derive(Debug)]
struct LoadedFile {
    modified: Option<SystemTime>,
    len: u64,
    hash: [u8; 32],
    /// The last objects this file parsed to. Kept as a state of their own
    /// so that the merged state shares them: objects of unchanged files keep
    /// their identity, which lets the index reuse their translation.
    objects: ClusterState,
    problem: Option<DirectoryError>,
}

/// Watches one directory.
#[derive(Debug)]
pub struct DirectorySource {
    root: PathBuf,
    files: BTreeMap<PathBuf, LoadedFile>,
    walk_problems: Vec<DirectoryError>,
    /// Content hashes read once but not yet applied (see the module doc).
    unsettled: BTreeMap<PathBuf, [u8; 32]>,
    /// Whether the initial load (applied at once) is done.
    loaded: bool,
}

impl DirectorySource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirectorySource {
            root: root.into(),
            files: BTreeMap::new(),
            walk_problems: Vec::new(),
            unsettled: BTreeMap::new(),
            loaded: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks at every file once, re-reading those that changed. After the
    /// first scan, new content applies on the second scan that reads it.
    pub fn scan(&mut self) -> ScanReport {
        let mut report = ScanReport::default();
        let (seen, unreadable) = manifest::yaml_files(&self.root);
        let walk_problems: Vec<DirectoryError> = unreadable
            .into_iter()
            .map(|(path, e)| DirectoryError::Read {
                path,
                reason: e.to_string(),
            })
            .collect();
        for path in &seen {
            if let Some(problem) = self.refresh(path, &mut report) {
                report.new_problems.push(problem);
            }
        }
        let seen: BTreeSet<PathBuf> = seen.into_iter().collect();
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        self.unsettled.retain(|path, _| seen.contains(path));
        report.changed |= self.files.len() != before;
        self.loaded = true;
        // Unreadable directories are reported when they become so, not on
        // every scan.
        for p in &walk_problems {
            if !self.walk_problems.contains(p) {
                report.new_problems.push(p.clone());
            }
        }
        self.walk_problems = walk_problems;
        report
    }

    /// Re-reads `path` if it changed; returns a problem when it newly has one.
    fn refresh(&mut self, path: &Path, report: &mut ScanReport) -> Option<DirectoryError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            // Gone between listing and reading: the next scan drops it.
            Err(_) => return None,
        };
        let modified = meta.modified().ok();
        // Size and time unchanged is trusted only once the time is old enough
        // that a same-size rewrite within the filesystem's timestamp
        // granularity would have moved it; recent files are hashed again.
        let settled = modified
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > MTIME_GRANULARITY);
        if let Some(f) = self.files.get(path)
            && f.modified == modified
            && f.len == meta.len()
            && settled
        {
            return None;
        }
        let read = std::fs::read(path);
        let bytes = match read {
            Ok(b) => b,
            Err(e) => {
                let problem = DirectoryError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                };
                return self.record_problem(path, modified, meta.len(), None, problem);
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(f) = self.files.get_mut(path)
            && f.hash == hash
        {
            f.modified = modified;
            f.len = meta.len();
            self.unsettled.remove(path);
            return None;
        }
        if self.loaded && self.unsettled.get(path) != Some(&hash) {
            // Seen for the first time: apply it if the next poll reads it again.
            self.unsettled.insert(path.to_path_buf(), hash);
            return None;
        }
        self.unsettled.remove(path);
        let parsed = manifest::parse_bytes(&bytes);
        match parsed {
            Ok(m) => {
                for ignored in &m.ignored {
                    debug!(
                        file = %path.display(),
                        line = ignored.line,
                        api_version = %ignored.api_version,
                        kind = %ignored.kind,
                        "ignoring a kind the mesh does not read"
                    );
                }
                if self.files.get(path).is_some_and(|f| f.problem.is_some()) {
                    info!(file = %path.display(), "file is valid again");
                }
                self.files.insert(
                    path.to_path_buf(),
                    LoadedFile {
                        modified,
                        len: meta.len(),
                        hash,
                        objects: ClusterState::from_objects(m.objects),
                        problem: None,
                    },
                );
                report.changed = true;
                None
            }
            Err(e) => {
                let problem = DirectoryError::Malformed {
                    path: path.to_path_buf(),
                    line: e.line,
                    reason: e.reason,
                };
                self.record_problem(path, modified, meta.len(), Some(hash), problem)
            }
        }
    }

    fn record_problem(
        &mut self,
        path: &Path,
        modified: Option<SystemTime>,
        len: u64,
        hash: Option<[u8; 32]>,
        problem: DirectoryError,
    ) -> Option<DirectoryError> {
        let entry = self
            .files
            .entry(path.to_path_buf())
            .or_insert_with(|| LoadedFile {
                modified,
                len,
                hash: [0; 32],
                objects: ClusterState::default(),
                problem: None,
            });
        entry.modified = modified;
        entry.len = len;
        entry.hash = hash.unwrap_or([0; 32]);
        let new = entry.problem.as_ref() != Some(&problem);
        entry.problem = Some(problem.clone());
        new.then_some(problem)
    }

    /// Problems of the files and directories as they are now.
    pub fn problems(&self) -> Vec<DirectoryError> {
        self.files
            .values()
            .filter_map(|f| f.problem.clone())
            .chain(self.walk_problems.iter().cloned())
            .collect()
    }

    /// The cluster state the directory describes. When two files define the
    /// same object, the one whose path sorts last wins (and a warning says so).
    pub fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for (path, file) in &self.files {
            state.merge(&file.objects, |kind, key| {
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
        info!(dir = %self.root.display(), "reading cluster state from a directory");
        let mut first = true;
        loop {
            let report = self.scan();
            for problem in &report.new_problems {
                warn!("{problem}");
            }
            if report.changed || first {
                let state = self.state();
                debug!(
                    files = self.files.len(),
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
