//! A directory of manifests, polled: what istiod-rs's local mode reads as
//! the cluster state and the node agent's local mode reads for its pods.
//!
//! Every `*.yaml` / `*.yml` file under the root ([`yaml_files`]) is looked at
//! on each [`ManifestDir::scan`]. A file is read again only when its size or
//! modification time moved, or while that time is too recent to trust (a
//! same-size rewrite within the filesystem's timestamp granularity). After
//! the first scan, new content is applied only once two scans in a row read
//! the same bytes, so a file caught half-written (truncated, then written)
//! never briefly loses its objects. A malformed or unreadable file is
//! reported once and keeps its last good content; a deleted file takes its
//! content with it.
//!
//! What a file's objects become is the caller's: [`ManifestDir::scan`] takes
//! the conversion, and [`ManifestDir::files`] hands the results back in path
//! order.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{debug, info};

use super::{Manifest, parse_bytes, yaml_files};

/// Coarsest modification-time granularity of the filesystems we expect.
const MTIME_GRANULARITY: Duration = Duration::from_secs(2);

/// Why a file (or a directory) of the tree is not used as it is now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("{}: cannot be read ({reason}); check that the file exists and is readable", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}:{line}: {reason}; the file is skipped until it is fixed", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl FileProblem {
    pub fn path(&self) -> &Path {
        match self {
            FileProblem::Read { path, .. } | FileProblem::Malformed { path, .. } => path,
        }
    }
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct DirScan {
    /// Whether some file's applied content changed, or a file went away.
    pub changed: bool,
    /// Files and directories that became unreadable or malformed (or
    /// differently so) in this scan.
    pub new_problems: Vec<FileProblem>,
}

#[derive(Debug)]
struct Entry<T> {
    modified: Option<SystemTime>,
    len: u64,
    /// Of the applied content; 0 after a read error, so the file is parsed
    /// again once it can be read.
    hash: u64,
    /// New content read once, applied if the next scan reads it again.
    unsettled: Option<u64>,
    /// The last good content, converted.
    content: T,
    problem: Option<FileProblem>,
}

/// One directory of manifests and what its files last converted to.
#[derive(Debug)]
pub struct ManifestDir<T> {
    root: PathBuf,
    files: BTreeMap<PathBuf, Entry<T>>,
    walk_problems: Vec<FileProblem>,
    /// Whether the first scan (applied at once) is done.
    loaded: bool,
}

impl<T: Default> ManifestDir<T> {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ManifestDir {
            root: root.into(),
            files: BTreeMap::new(),
            walk_problems: Vec::new(),
            loaded: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks at every file once, re-reading those that changed; `convert`
    /// turns a file's good manifest into what is kept for it.
    pub fn scan(&mut self, mut convert: impl FnMut(&Path, Manifest) -> T) -> DirScan {
        let mut scan = DirScan::default();
        let (paths, unreadable) = yaml_files(&self.root);
        let walk_problems: Vec<FileProblem> = unreadable
            .into_iter()
            .map(|(path, e)| FileProblem::Read {
                path,
                reason: e.to_string(),
            })
            .collect();
        // Unreadable directories are reported when they become so, not on
        // every scan.
        for problem in &walk_problems {
            if !self.walk_problems.contains(problem) {
                scan.new_problems.push(problem.clone());
            }
        }
        self.walk_problems = walk_problems;
        for path in &paths {
            self.refresh(path, &mut convert, &mut scan);
        }
        let before = self.files.len();
        self.files.retain(|path, _| paths.contains(path));
        scan.changed |= self.files.len() != before;
        self.loaded = true;
        scan
    }

    /// Re-reads `path` if it changed.
    fn refresh(
        &mut self,
        path: &Path,
        convert: &mut impl FnMut(&Path, Manifest) -> T,
        scan: &mut DirScan,
    ) {
        let Ok(meta) = std::fs::metadata(path) else {
            // Gone between listing and reading: the next scan drops it.
            return;
        };
        let (modified, len) = (meta.modified().ok(), meta.len());
        let settled_time = modified
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > MTIME_GRANULARITY);
        if let Some(entry) = self.files.get(path)
            && entry.modified == modified
            && entry.len == len
            && settled_time
            && entry.unsettled.is_none()
        {
            return;
        }
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                let problem = FileProblem::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                };
                let entry = self.entry(path, modified, len);
                entry.hash = 0;
                entry.unsettled = None;
                record(entry, problem, scan);
                return;
            }
        };
        let hash = content_hash(&bytes);
        let loaded = self.loaded;
        let entry = self.entry(path, modified, len);
        if entry.hash == hash {
            entry.unsettled = None;
            return;
        }
        if loaded && entry.unsettled != Some(hash) {
            // New content (or a new file, as likely caught half-written as an
            // edit): applied if the next scan reads it again.
            entry.unsettled = Some(hash);
            return;
        }
        entry.unsettled = None;
        entry.hash = hash;
        match parse_bytes(&bytes) {
            Ok(manifest) => {
                for ignored in &manifest.ignored {
                    debug!(
                        file = %path.display(),
                        line = ignored.line,
                        api_version = %ignored.api_version,
                        kind = %ignored.kind,
                        "ignoring a kind the mesh does not read"
                    );
                }
                if entry.problem.take().is_some() {
                    info!(file = %path.display(), "file is valid again");
                }
                entry.content = convert(path, manifest);
                scan.changed = true;
            }
            Err(e) => {
                let problem = FileProblem::Malformed {
                    path: path.to_path_buf(),
                    line: e.line,
                    reason: e.reason,
                };
                record(entry, problem, scan);
            }
        }
    }

    /// The entry of `path` with its new stamp; a new one holds no content.
    fn entry(&mut self, path: &Path, modified: Option<SystemTime>, len: u64) -> &mut Entry<T> {
        let entry = self
            .files
            .entry(path.to_path_buf())
            .or_insert_with(|| Entry {
                modified,
                len,
                hash: 0,
                unsettled: None,
                content: T::default(),
                problem: None,
            });
        entry.modified = modified;
        entry.len = len;
        entry
    }

    /// Problems of the files and directories as they are now.
    pub fn problems(&self) -> Vec<FileProblem> {
        self.files
            .values()
            .filter_map(|f| f.problem.clone())
            .chain(self.walk_problems.iter().cloned())
            .collect()
    }

    /// Each file's last good content, in path order.
    pub fn files(&self) -> impl Iterator<Item = (&Path, &T)> {
        self.files
            .iter()
            .map(|(path, entry)| (path.as_path(), &entry.content))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Keeps `problem` on the entry; new in this scan unless it was already so.
fn record<T>(entry: &mut Entry<T>, problem: FileProblem, scan: &mut DirScan) {
    if entry.problem.as_ref() != Some(&problem) {
        scan.new_problems.push(problem.clone());
    }
    entry.problem = Some(problem);
}

/// Tells contents apart; only ever compared with this process's own hashes.
fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}
