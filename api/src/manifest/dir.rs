//! A directory of manifests, polled: what istiod-rs's local mode reads as
//! the cluster state and the node agent's local mode reads for its pods.
//!
//! Every `*.yaml` / `*.yml` regular file under the root ([`yaml_files`]) is
//! looked at on each [`ManifestDir::scan`]. Symbolic links are followed
//! (ConfigMap volumes are made of them), directories included; a link that
//! leads back into a directory being read, or to one already read, is
//! reported and not followed. A FIFO, socket or device is reported and never
//! opened; a file larger than the size limit is reported and not read.
//! Nothing here can block on a file's content: files are opened
//! non-blocking, and checked to be regular files once open.
//!
//! A file is read again only when its size, modification time or identity
//! moved, or while that time is too recent to trust (a same-size rewrite
//! within the filesystem's timestamp granularity). After the first scan, new
//! content is applied only once two scans in a row read the same bytes, so
//! a file caught half-written (truncated, then written) never briefly loses
//! its objects. A malformed, unreadable or oversized file is reported once
//! and keeps its last good content; a deleted file takes its content with
//! it. Within a good file, a document that cannot be read as written (an
//! unknown kind, apiVersion or field) is reported once and skipped, and an
//! object refused for unknown fields keeps its last good version (see
//! [`FileContent`]).
//!
//! What a file's objects become is the caller's: [`ManifestDir::scan`] takes
//! the conversion, and [`ManifestDir::files`] hands the results back in path
//! order. Scans do blocking I/O and parse: run them off the async runtime,
//! on a [`Poller`] thread.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::ops::ControlFlow;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use tracing::{debug, info};

use super::{Kind, Manifest, Object, ObjectKey, Refused, STATUS_DIR, kinds_read_from, parse_bytes};

/// Coarsest modification-time granularity of the filesystems we expect.
const MTIME_GRANULARITY: Duration = Duration::from_secs(2);

/// Largest file read by default, in bytes: 8 MiB, well above the 3 MiB the
/// API server takes in one request, far above any hand-kept manifest; a
/// bigger file would hold the poller for long and its objects in memory
/// twice.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 8 << 20;

/// Why a file (or a directory, or one document of a file) of the tree is
/// not used as it is now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("{}: cannot be read ({reason}); check that the file exists and is readable", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: is a {file_type}, not a regular file; it is not read (remove it, or rename it so that it does not end in .yaml or .yml)", path.display())]
    NotRegularFile {
        path: PathBuf,
        file_type: &'static str,
    },
    #[error("{}: {size} bytes, more than the {limit} bytes a file may have (--max-config-file-size); it is not read: split it into smaller files", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: a symbolic link loop (it leads back into {}, which is being read); it is not followed", path.display(), target.display())]
    SymlinkLoop { path: PathBuf, target: PathBuf },
    #[error("{}: the same directory as {}, which is already read; it is not read twice", path.display(), first.display())]
    RepeatedDirectory { path: PathBuf, first: PathBuf },
    #[error("{}:{line}: {reason}; the file is skipped until it is fixed", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}:{line}: {api_version} has no kind {kind:?}; {}; the document is skipped", path.display(), known_kinds(api_version, kind))]
    UnknownKind {
        path: PathBuf,
        line: usize,
        api_version: String,
        kind: String,
    },
    #[error("{}:{line}: {kind} is read as {}, not {api_version}; the document is skipped until it says one of those", path.display(), kind.api_versions().join(" or "))]
    UnknownApiVersion {
        path: PathBuf,
        line: usize,
        api_version: String,
        kind: Kind,
    },
    #[error("{}:{line}: {kind} {object}: unknown field{} {} (strict field validation); the object is refused and its last good version, if any, kept", path.display(), if fields.len() > 1 { "s" } else { "" }, fields.join(", "))]
    UnknownField {
        path: PathBuf,
        line: usize,
        kind: Kind,
        object: ObjectKey,
        fields: Vec<String>,
    },
}

/// What the mesh reads from the group of `api_version`, and where `kind`
/// is read from if it is one of the mesh's kinds.
fn known_kinds(api_version: &str, kind: &str) -> String {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let read: Vec<&str> = kinds_read_from(group)
        .into_iter()
        .map(Kind::as_str)
        .collect();
    let mut known = format!("of its group the mesh reads {}", read.join(", "));
    if let Some(elsewhere) = Kind::ALL.into_iter().find(|k| k.as_str() == kind) {
        known += &format!(
            "; {kind} is read as {}",
            elsewhere.api_versions().join(" or ")
        );
    }
    known
}

impl FileProblem {
    /// Every [`FileProblem::reason`], for metrics to start at zero.
    pub const REASONS: [&'static str; 9] = [
        "read_error",
        "not_regular_file",
        "too_large",
        "symlink_loop",
        "repeated_directory",
        "malformed",
        "unknown_kind",
        "unknown_api_version",
        "unknown_field",
    ];

    pub fn path(&self) -> &Path {
        match self {
            FileProblem::Read { path, .. }
            | FileProblem::NotRegularFile { path, .. }
            | FileProblem::TooLarge { path, .. }
            | FileProblem::SymlinkLoop { path, .. }
            | FileProblem::RepeatedDirectory { path, .. }
            | FileProblem::Malformed { path, .. }
            | FileProblem::UnknownKind { path, .. }
            | FileProblem::UnknownApiVersion { path, .. }
            | FileProblem::UnknownField { path, .. } => path,
        }
    }

    /// A short label for metrics; one of [`FileProblem::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            FileProblem::Read { .. } => "read_error",
            FileProblem::NotRegularFile { .. } => "not_regular_file",
            FileProblem::TooLarge { .. } => "too_large",
            FileProblem::SymlinkLoop { .. } => "symlink_loop",
            FileProblem::RepeatedDirectory { .. } => "repeated_directory",
            FileProblem::Malformed { .. } => "malformed",
            FileProblem::UnknownKind { .. } => "unknown_kind",
            FileProblem::UnknownApiVersion { .. } => "unknown_api_version",
            FileProblem::UnknownField { .. } => "unknown_field",
        }
    }

    fn refused(path: &Path, refused: &Refused) -> FileProblem {
        let path = path.to_path_buf();
        match refused.clone() {
            Refused::UnknownKind {
                line,
                api_version,
                kind,
            } => FileProblem::UnknownKind {
                path,
                line,
                api_version,
                kind,
            },
            Refused::UnknownApiVersion {
                line,
                api_version,
                kind,
            } => FileProblem::UnknownApiVersion {
                path,
                line,
                api_version,
                kind,
            },
            Refused::UnknownFields {
                line,
                kind,
                key,
                fields,
                ..
            } => FileProblem::UnknownField {
                path,
                line,
                kind,
                object: key,
                fields,
            },
        }
    }

    fn io(path: &Path, error: &std::io::Error) -> FileProblem {
        FileProblem::Read {
            path: path.to_path_buf(),
            reason: error.to_string(),
        }
    }
}

/// How a file of the tree is read. [`RegularFiles`] is what the mesh uses;
/// tests stand in readers that hold a read until released.
pub trait ReadFiles: Send + Sync + fmt::Debug {
    /// The content of `path`, a regular file of at most `limit` bytes.
    fn read(&self, path: &Path, limit: u64) -> Result<Vec<u8>, FileProblem>;
}

/// How the files of a directory are read.
#[derive(Clone, Debug)]
pub struct FileReading {
    /// Files larger than this, in bytes, are reported and not read.
    pub max_file_size: u64,
    /// [`RegularFiles`]; tests stand in readers that hold reads.
    pub reader: Arc<dyn ReadFiles>,
}

impl Default for FileReading {
    fn default() -> Self {
        FileReading {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            reader: Arc::new(RegularFiles),
        }
    }
}

/// Reads regular files only, never waiting for a writer: opened with
/// `O_NONBLOCK` (a FIFO put in place after the directory was listed opens
/// at once) and checked with `fstat` before a byte is read.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegularFiles;

impl ReadFiles for RegularFiles {
    fn read(&self, path: &Path, limit: u64) -> Result<Vec<u8>, FileProblem> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| FileProblem::io(path, &e))?;
        let meta = file.metadata().map_err(|e| FileProblem::io(path, &e))?;
        if !meta.is_file() {
            return Err(FileProblem::NotRegularFile {
                path: path.to_path_buf(),
                file_type: type_name(&meta.file_type()),
            });
        }
        let too_large = |size| FileProblem::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        };
        if meta.len() > limit {
            return Err(too_large(meta.len()));
        }
        // The file may grow while it is read: never take more than the limit.
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or_default());
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| FileProblem::io(path, &e))?;
        if bytes.len() as u64 > limit {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    }
}

/// What a file type is called in a report.
fn type_name(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "FIFO (named pipe)"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// What the caller keeps of a file's objects. It must hand back the objects
/// it kept, so that an object refused in a new version of its file (an
/// unknown field) keeps its last good version instead of vanishing. Objects
/// the caller did not keep (of no interest to it) have none.
pub trait FileContent: Default {
    /// The object of `kind` named `key` this content holds.
    fn last_good(&self, kind: Kind, key: &ObjectKey) -> Option<Object>;
}

/// Every `*.yaml` / `*.yml` regular file under `root`, recursively, in path
/// order, and what could not be walked or is not a regular file. Hidden
/// entries are skipped: editor swap files, VCS data, and the `..data`
/// indirection of ConfigMap volumes (whose files are also linked from the
/// top level). So is [`STATUS_DIR`]. Symbolic links are followed; a
/// directory is read once, whichever way it is reached.
pub fn yaml_files(root: &Path) -> (Vec<PathBuf>, Vec<FileProblem>) {
    let mut walk = Walk {
        files: Vec::new(),
        problems: Vec::new(),
        skipped: root.join(STATUS_DIR),
        visited: HashMap::new(),
    };
    match std::fs::metadata(root) {
        Ok(meta) => {
            let id = (meta.dev(), meta.ino());
            walk.visited.insert(id, root.to_path_buf());
            walk.directory(root, &mut vec![id]);
        }
        Err(e) => walk.problems.push(FileProblem::io(root, &e)),
    }
    (walk.files, walk.problems)
}

struct Walk {
    files: Vec<PathBuf>,
    problems: Vec<FileProblem>,
    skipped: PathBuf,
    /// Each directory read, by device and inode, with the path it was
    /// first read as.
    visited: HashMap<(u64, u64), PathBuf>,
}

impl Walk {
    /// `ancestors`: the directories being read, `dir` last.
    fn directory(&mut self, dir: &Path, ancestors: &mut Vec<(u64, u64)>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.problems.push(FileProblem::io(dir, &e));
                return;
            }
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let (file_type, meta) = if file_type.is_symlink() {
                match std::fs::metadata(&path) {
                    Ok(meta) => (meta.file_type(), Some(meta)),
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                        self.problems.push(FileProblem::SymlinkLoop {
                            target: std::fs::read_link(&path).unwrap_or_default(),
                            path,
                        });
                        continue;
                    }
                    Err(e) if yaml => {
                        self.problems.push(FileProblem::Read {
                            path,
                            reason: format!("a symbolic link to nothing that can be read: {e}"),
                        });
                        continue;
                    }
                    Err(_) => continue,
                }
            } else {
                (file_type, None)
            };
            if file_type.is_dir() {
                if path == self.skipped {
                    continue;
                }
                let meta = match meta.map_or_else(|| std::fs::metadata(&path), Ok) {
                    Ok(meta) => meta,
                    Err(e) => {
                        self.problems.push(FileProblem::io(&path, &e));
                        continue;
                    }
                };
                let id = (meta.dev(), meta.ino());
                if ancestors.contains(&id) {
                    let target = self.visited.get(&id).cloned().unwrap_or_default();
                    self.problems
                        .push(FileProblem::SymlinkLoop { path, target });
                    continue;
                }
                if let Some(first) = self.visited.get(&id) {
                    self.problems.push(FileProblem::RepeatedDirectory {
                        path,
                        first: first.clone(),
                    });
                    continue;
                }
                self.visited.insert(id, path.clone());
                ancestors.push(id);
                self.directory(&path, ancestors);
                ancestors.pop();
            } else if !yaml {
                continue;
            } else if file_type.is_file() {
                self.files.push(path);
            } else {
                self.problems.push(FileProblem::NotRegularFile {
                    path,
                    file_type: type_name(&file_type),
                });
            }
        }
    }
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct DirScan {
    /// Whether some file's applied content changed, or a file went away.
    pub changed: bool,
    /// Problems that appeared (or changed) in this scan.
    pub new_problems: Vec<FileProblem>,
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    /// Device and inode: a file replaced by a rename is another file.
    id: (u64, u64),
}

#[derive(Debug)]
struct Entry<T> {
    stamp: Stamp,
    /// Of the applied content; 0 after a read error, so the file is parsed
    /// again once it can be read.
    hash: u64,
    /// New content read once, applied if the next scan reads it again.
    unsettled: Option<u64>,
    /// The last good content, converted.
    content: T,
    /// Of the file as it is now: why it is not read, or which of its
    /// documents are not.
    problems: Vec<FileProblem>,
}

/// One directory of manifests and what its files last converted to.
#[derive(Debug)]
pub struct ManifestDir<T> {
    root: PathBuf,
    reading: FileReading,
    files: BTreeMap<PathBuf, Entry<T>>,
    walk_problems: Vec<FileProblem>,
    /// Whether the first scan (applied at once) is done.
    loaded: bool,
}

impl<T: FileContent> ManifestDir<T> {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ManifestDir {
            root: root.into(),
            reading: FileReading::default(),
            files: BTreeMap::new(),
            walk_problems: Vec::new(),
            loaded: false,
        }
    }

    /// Reads the files as `reading` says (size limit, reader).
    pub fn with_reading(mut self, reading: FileReading) -> Self {
        self.reading = reading;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks at every file once, re-reading those that changed; `convert`
    /// turns a file's good manifest into what is kept for it.
    pub fn scan(&mut self, mut convert: impl FnMut(&Path, Manifest) -> T) -> DirScan {
        let mut scan = DirScan::default();
        let (paths, walk_problems) = yaml_files(&self.root);
        // What the walk finds is reported when it appears, not on every scan.
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
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            id: (meta.dev(), meta.ino()),
        };
        let settled_time = stamp
            .modified
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > MTIME_GRANULARITY);
        if let Some(entry) = self.files.get(path)
            && entry.stamp == stamp
            && settled_time
            && entry.unsettled.is_none()
        {
            return;
        }
        let limit = self.reading.max_file_size;
        let read = if stamp.len > limit {
            // Not even opened.
            Err(FileProblem::TooLarge {
                path: path.to_path_buf(),
                size: stamp.len,
                limit,
            })
        } else {
            self.reading.reader.read(path, limit)
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(problem) => {
                let entry = self.entry(path, stamp);
                entry.hash = 0;
                entry.unsettled = None;
                record(path, entry, vec![problem], scan);
                return;
            }
        };
        let hash = content_hash(&bytes);
        let loaded = self.loaded;
        let entry = self.entry(path, stamp);
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
            Ok(mut manifest) => {
                for ignored in &manifest.ignored {
                    debug!(
                        file = %path.display(),
                        line = ignored.line,
                        api_version = %ignored.api_version,
                        kind = %ignored.kind,
                        "ignoring a kind the mesh does not read"
                    );
                }
                let problems = manifest
                    .refused
                    .iter()
                    .map(|r| FileProblem::refused(path, r))
                    .collect();
                keep_last_good(&entry.content, &mut manifest);
                entry.content = convert(path, manifest);
                scan.changed = true;
                record(path, entry, problems, scan);
            }
            Err(e) => {
                let problem = FileProblem::Malformed {
                    path: path.to_path_buf(),
                    line: e.line,
                    reason: e.reason,
                };
                record(path, entry, vec![problem], scan);
            }
        }
    }

    /// The entry of `path` with its new stamp; a new one holds no content.
    fn entry(&mut self, path: &Path, stamp: Stamp) -> &mut Entry<T> {
        let entry = self
            .files
            .entry(path.to_path_buf())
            .or_insert_with(|| Entry {
                stamp,
                hash: 0,
                unsettled: None,
                content: T::default(),
                problems: Vec::new(),
            });
        entry.stamp = stamp;
        entry
    }

    /// Problems of the files and directories as they are now.
    pub fn problems(&self) -> Vec<FileProblem> {
        self.files
            .values()
            .flat_map(|f| f.problems.iter().cloned())
            .chain(self.walk_problems.iter().cloned())
            .collect()
    }

    /// How many problems there are now of each [`FileProblem::reason`]
    /// (every reason listed, most at zero).
    pub fn problem_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            FileProblem::REASONS.into_iter().map(|r| (r, 0)).collect();
        let problems = self
            .files
            .values()
            .flat_map(|f| &f.problems)
            .chain(&self.walk_problems);
        for problem in problems {
            *counts.entry(problem.reason()).or_default() += 1;
        }
        counts
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

/// Puts back, where each was, the last good version of every object the new
/// version of a file refuses for unknown fields.
fn keep_last_good<T: FileContent>(previous: &T, manifest: &mut Manifest) {
    let mut inserted = 0;
    for refused in &manifest.refused {
        if let Refused::UnknownFields {
            kind,
            key,
            position,
            ..
        } = refused
            && let Some(last_good) = previous.last_good(*kind, key)
        {
            manifest.objects.insert(position + inserted, last_good);
            inserted += 1;
        }
    }
}

/// Replaces the entry's problems; those it did not have are new in this
/// scan.
fn record<T>(path: &Path, entry: &mut Entry<T>, problems: Vec<FileProblem>, scan: &mut DirScan) {
    for problem in &problems {
        if !entry.problems.contains(problem) {
            scan.new_problems.push(problem.clone());
        }
    }
    if problems.is_empty() && !entry.problems.is_empty() {
        info!(file = %path.display(), "file is valid again");
    }
    entry.problems = problems;
}

/// Tells contents apart; only ever compared with this process's own hashes.
fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// A thread of its own that runs a poll (a [`ManifestDir::scan`] and what
/// follows) every interval, away from any async runtime: a slow parse or a
/// stuck read there never delays what the runtime serves, and never keeps
/// the process from exiting (the thread is not joined). Dropping the
/// `Poller` stops the thread once its poll in progress returns.
#[derive(Debug)]
pub struct Poller {
    _stop: mpsc::Sender<()>,
}

impl Poller {
    /// Runs `poll` at once, then every `interval` after each run ends,
    /// until it breaks or the `Poller` is dropped.
    pub fn spawn(
        name: &str,
        interval: Duration,
        mut poll: impl FnMut() -> ControlFlow<()> + Send + 'static,
    ) -> std::io::Result<Poller> {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while poll().is_continue() {
                    match stopped.recv_timeout(interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // The owner dropped its `Poller` (or sent, which it never does).
                        _ => return,
                    }
                }
            })?;
        Ok(Poller { _stop: stop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::testing::mkfifo;

    /// Keeps every object of the file.
    #[derive(Debug, Default)]
    struct Objects(Vec<Object>);

    impl FileContent for Objects {
        fn last_good(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
            self.0
                .iter()
                .find(|o| o.kind() == kind && o.key() == *key)
                .cloned()
        }
    }

    fn scan(dir: &mut ManifestDir<Objects>) -> DirScan {
        dir.scan(|_, m| Objects(m.objects))
    }

    /// Scans until new content has settled (the second read applies it).
    fn settle(dir: &mut ManifestDir<Objects>) -> Vec<FileProblem> {
        let mut problems = scan(dir).new_problems;
        problems.extend(scan(dir).new_problems);
        problems
    }

    fn objects(dir: &ManifestDir<Objects>) -> Vec<String> {
        dir.files()
            .flat_map(|(_, o)| &o.0)
            .map(|o| format!("{} {}", o.kind(), o.key()))
            .collect()
    }

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    #[test]
    fn finds_yaml_files_recursively_skipping_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "b.yaml",
            "a/z.yml",
            "a/notes.txt",
            ".swp.yaml",
            "..data/x.yaml",
            "generated/status/AuthorizationPolicy/shop/p.yaml",
            "generated/w.yaml",
            "c.json",
        ] {
            let path = root.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        let (files, problems) = yaml_files(root);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            files,
            [
                root.join("a/z.yml"),
                root.join("b.yaml"),
                root.join("generated/w.yaml")
            ]
        );
        let (files, problems) = yaml_files(&root.join("missing"));
        assert!(files.is_empty());
        assert!(matches!(&problems[..], [FileProblem::Read { .. }]));
    }

    #[test]
    fn follows_symlinked_directories_once_and_reports_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("ns.yaml"), NAMESPACE).unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        std::fs::write(root.join("a/pod.yaml"), "").unwrap();
        // A linked directory is read, as ConfigMap volumes and bind mounts need.
        std::os::unix::fs::symlink(outside.path(), root.join("linked")).unwrap();
        // Back into a directory being read: a loop.
        std::os::unix::fs::symlink(root, root.join("a/up")).unwrap();
        // A second way to a directory already read.
        std::os::unix::fs::symlink(root.join("a"), root.join("b")).unwrap();
        // A link that is its own target.
        std::os::unix::fs::symlink(root.join("self.yaml"), root.join("self.yaml")).unwrap();
        let (files, problems) = yaml_files(root);
        assert_eq!(
            files,
            [root.join("a/pod.yaml"), root.join("linked/ns.yaml")]
        );
        let reasons: Vec<(&str, PathBuf)> = problems
            .iter()
            .map(|p| (p.reason(), p.path().to_path_buf()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("symlink_loop", root.join("a/up")),
                ("repeated_directory", root.join("b")),
                ("symlink_loop", root.join("self.yaml")),
            ]
        );
        assert!(
            problems[0].to_string().contains("symbolic link loop"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn special_files_are_reported_once_and_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("ns.yaml"), NAMESPACE).unwrap();
        let fifo = root.join("fifo.yaml");
        mkfifo(&fifo);
        // Through a link, too.
        std::os::unix::fs::symlink(&fifo, root.join("link.yaml")).unwrap();
        let mut dir = ManifestDir::<Objects>::new(root);
        let first = scan(&mut dir);
        assert_eq!(objects(&dir), ["Namespace shop"]);
        let reported: Vec<String> = first.new_problems.iter().map(ToString::to_string).collect();
        assert_eq!(reported.len(), 2, "{reported:?}");
        assert!(
            reported[0].contains("fifo.yaml: is a FIFO (named pipe), not a regular file"),
            "{reported:?}"
        );
        assert!(reported[1].contains("link.yaml"), "{reported:?}");
        // Reported once, counted while it is there.
        assert!(scan(&mut dir).new_problems.is_empty());
        assert_eq!(dir.problem_counts()["not_regular_file"], 2);
    }

    #[test]
    fn the_reader_refuses_what_is_not_a_regular_file_even_when_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("swapped.yaml");
        mkfifo(&fifo);
        // Opened without a writer: a blocking open would wait forever.
        let refused = RegularFiles.read(&fifo, 1024).unwrap_err();
        assert_eq!(refused.reason(), "not_regular_file", "{refused}");
    }

    #[test]
    fn files_over_the_size_limit_are_reported_and_keep_their_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns.yaml");
        std::fs::write(&path, NAMESPACE).unwrap();
        let mut manifests = ManifestDir::<Objects>::new(dir.path()).with_reading(FileReading {
            max_file_size: 1024,
            ..FileReading::default()
        });
        scan(&mut manifests);
        assert_eq!(objects(&manifests), ["Namespace shop"]);
        let big = format!("{NAMESPACE}# {}\n", "x".repeat(2000));
        std::fs::write(&path, &big).unwrap();
        let problems = settle(&mut manifests);
        assert!(
            matches!(&problems[..], [FileProblem::TooLarge { size, limit: 1024, .. }] if *size == big.len() as u64),
            "{problems:?}"
        );
        assert_eq!(objects(&manifests), ["Namespace shop"]);
        assert_eq!(manifests.problem_counts()["too_large"], 1);
        // A file that grows while it is read is cut at the limit.
        let refused = RegularFiles.read(&path, 10).unwrap_err();
        assert_eq!(refused.reason(), "too_large");
    }

    const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop}
spec:
  action: DENY
  rules:
  - to:
    - operation: {ports: [\"80\"]}
";

    #[test]
    fn an_object_with_an_unknown_field_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.yaml");
        std::fs::write(&path, format!("{NAMESPACE}---\n{POLICY}")).unwrap();
        let mut manifests = ManifestDir::<Objects>::new(dir.path());
        scan(&mut manifests);
        assert_eq!(
            objects(&manifests),
            ["Namespace shop", "AuthorizationPolicy shop/deny"]
        );

        // `rule:` for `rules:`; the namespace gains a label meanwhile.
        let typo = POLICY.replace("  rules:", "  rule:");
        let labelled = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {a: b}}\n";
        std::fs::write(&path, format!("{labelled}---\n{typo}")).unwrap();
        let problems = settle(&mut manifests);
        let [problem] = &problems[..] else {
            panic!("{problems:?}")
        };
        assert_eq!(problem.reason(), "unknown_field");
        let text = problem.to_string();
        assert!(
            text.contains("shop.yaml:10: AuthorizationPolicy shop/deny: unknown field spec.rule"),
            "{text}"
        );
        // The file's other objects apply; the refused one keeps its last good version.
        let kept = &manifests.files().next().unwrap().1.0;
        assert_eq!(kept.len(), 2);
        assert!(matches!(&kept[0], Object::Namespace(ns) if ns.metadata.labels.is_some()));
        assert!(matches!(&kept[1], Object::AuthorizationPolicy(p) if p.spec.rules.len() == 1));
        // Reported once.
        assert!(scan(&mut manifests).new_problems.is_empty());

        // Fixed: the problem goes.
        std::fs::write(&path, format!("{labelled}---\n{POLICY}")).unwrap();
        assert!(settle(&mut manifests).is_empty());
        assert!(manifests.problems().is_empty());

        // A new object with an unknown field has no last good version.
        let other = typo.replace("name: deny", "name: other");
        std::fs::write(&path, format!("{labelled}---\n{POLICY}---\n{other}")).unwrap();
        assert_eq!(settle(&mut manifests).len(), 1);
        assert_eq!(
            objects(&manifests),
            ["Namespace shop", "AuthorizationPolicy shop/deny"]
        );
    }

    #[test]
    fn unknown_kinds_and_api_versions_are_reported_once_with_what_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{NAMESPACE}---\n{}---\n{}---\n{}",
            POLICY.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolcy"),
            POLICY.replace("security.istio.io/v1", "security.istio.io/v2"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        );
        std::fs::write(dir.path().join("a.yaml"), &text).unwrap();
        let mut manifests = ManifestDir::<Objects>::new(dir.path());
        let problems: Vec<String> = scan(&mut manifests)
            .new_problems
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(objects(&manifests), ["Namespace shop"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("a.yaml:5: security.istio.io/v1 has no kind \"AuthorizationPolcy\"; of its group the mesh reads AuthorizationPolicy, PeerAuthentication, RequestAuthentication"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("a.yaml:14: AuthorizationPolicy is read as security.istio.io/v1 or security.istio.io/v1beta1, not security.istio.io/v2"),
            "{problems:?}"
        );
        assert!(scan(&mut manifests).new_problems.is_empty());
        let counts = manifests.problem_counts();
        assert_eq!(
            (counts["unknown_kind"], counts["unknown_api_version"]),
            (1, 1)
        );
    }

    #[test]
    fn a_poller_runs_until_dropped_or_broken() {
        let (tx, rx) = std::sync::mpsc::channel();
        let poller = Poller::spawn("test-poller", Duration::from_millis(1), move || {
            if tx.send(()).is_ok() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .unwrap();
        rx.recv().unwrap();
        rx.recv().unwrap();
        drop(poller);
        // The thread ends: its sender goes with it.
        while rx.recv().is_ok() {}
    }
}
