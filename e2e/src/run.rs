//! One run of the harness and everything it owns: network namespaces and
//! processes, a run directory (logs, the cluster's config directory), and a
//! state file naming its owner. Everything is removed when the [`Run`] is
//! dropped (also while a panic unwinds), and on SIGINT/SIGTERM. A run that
//! died without cleaning up (SIGKILL, power loss of the test process) is
//! recognised by the next run: its state file names a pid that is no longer
//! alive, so its namespaces and processes are removed before anything new is
//! built. Only names with our [`PREFIX`] are ever touched.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::netns::{self, NetNs, NetnsError};
use crate::process::{self, ProcessError, ProcessInfo, ProcessSpec};

/// Every network namespace a run creates is named `<PREFIX><run id>-<role>`.
pub const PREFIX: &str = "meshe2e-";
/// Where runs record their owner (tmpfs, like `/run/netns`: both vanish at reboot).
pub const STATE_DIR: &str = "/run/meshe2e";
/// Set to keep a run's directory (logs, config) after a successful teardown.
pub const KEEP_ENV: &str = "E2E_KEEP_RUN_DIR";
/// Overrides the parent of run directories (default: `$TMPDIR/meshe2e`).
pub const RUN_ROOT_ENV: &str = "E2E_RUN_ROOT";

/// How long processes get between SIGTERM and SIGKILL at teardown.
const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Privilege(#[from] crate::privilege::PrivilegeError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run {0} has been torn down (interrupted?); nothing more can be started in it")]
    Closed(String),
}

/// What a state file records, so a later run can clean up after this one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub pid: u32,
    pub start_time: u64,
    pub dir: PathBuf,
    pub netns: Vec<String>,
    pub processes: Vec<ProcessInfo>,
}

struct RunInner {
    closed: bool,
    /// Keep the run directory after teardown (a failure to look into).
    keep_dir: bool,
    record: RunRecord,
    children: BTreeMap<u32, Child>,
    state_file: PathBuf,
}

/// A run: owns namespaces and processes, removes them when dropped. What
/// it can do lives on [`RunHandle`] (reached through `Deref`), which
/// threads and tasks can hold on to: once the run is torn down, a handle
/// starts nothing more ([`RunError::Closed`]).
pub struct Run {
    handle: RunHandle,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.handle.id)
            .field("dir", &self.handle.dir)
            .finish()
    }
}

/// A shareable handle on a [`Run`]: starts and stops its processes and
/// namespaces; does not keep the run alive.
#[derive(Clone)]
pub struct RunHandle {
    id: String,
    dir: PathBuf,
    inner: Arc<Mutex<RunInner>>,
}

impl std::fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHandle").field("id", &self.id).finish()
    }
}

impl std::ops::Deref for Run {
    type Target = RunHandle;
    fn deref(&self) -> &RunHandle {
        &self.handle
    }
}

impl Run {
    /// Starts a run: removes what dead runs left behind, picks a fresh id,
    /// records this process as the owner, and arranges cleanup on signals.
    pub fn start() -> Result<Run, RunError> {
        crate::privilege::prepare()?;
        install_signal_handler();
        for removed in cleanup_leftovers() {
            eprintln!("e2e: removed leftover of a dead run: {removed}");
        }
        create_dir(Path::new(STATE_DIR))?;
        let id = fresh_id();
        let dir = run_root().join(&id);
        create_dir(&dir.join("logs"))?;
        let pid = std::process::id();
        let record = RunRecord {
            id: id.clone(),
            pid,
            start_time: process::start_time(pid as i32).unwrap_or(0),
            dir: dir.clone(),
            ..RunRecord::default()
        };
        let inner = RunInner {
            closed: false,
            keep_dir: false,
            record,
            children: BTreeMap::new(),
            state_file: Path::new(STATE_DIR).join(format!("{id}.json")),
        };
        inner.save()?;
        let inner = Arc::new(Mutex::new(inner));
        live_runs().push(Arc::downgrade(&inner));
        Ok(Run {
            handle: RunHandle { id, dir, inner },
        })
    }

    /// A handle for threads and tasks that start and stop things in this run.
    pub fn handle(&self) -> RunHandle {
        self.handle.clone()
    }
}

impl RunHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run directory: `logs/`, the cluster's config directory, and so on.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace name this run uses for `role` (e.g. `node0`).
    pub fn netns_name(&self, role: &str) -> String {
        format!("{PREFIX}{}-{role}", self.id)
    }

    /// Creates this run's namespace for `role`. It is recorded before it is
    /// created, so a crash in between still leaves a trace for cleanup.
    pub fn create_netns(&self, role: &str) -> Result<NetNs, RunError> {
        let name = self.netns_name(role);
        {
            let mut inner = self.lock_open()?;
            inner.record.netns.push(name.clone());
            inner.save()?;
        }
        Ok(NetNs::create(&name)?)
    }

    /// Removes one of this run's namespaces and kills whatever runs in it.
    pub fn delete_netns(&self, ns: &NetNs) -> Result<(), RunError> {
        kill_inside(ns);
        ns.delete()?;
        let mut inner = self.lock();
        inner.record.netns.retain(|n| n != ns.name());
        inner.save()
    }

    /// Starts `spec` inside `ns`; its output goes to `logs/<name>.log`.
    pub fn spawn(&self, spec: &ProcessSpec, ns: &NetNs) -> Result<ProcessInfo, RunError> {
        let log = self
            .dir
            .join("logs")
            .join(format!("{}.log", file_safe(&spec.name)));
        let mut inner = self.lock_open()?;
        let (child, info) = process::spawn(spec, ns, &log)?;
        inner.children.insert(info.pid, child);
        inner.record.processes.push(info.clone());
        inner.save()?;
        Ok(info)
    }

    /// Stops a process this run started (SIGTERM to its group, then SIGKILL).
    pub fn stop(&self, info: &ProcessInfo) -> Option<ExitStatus> {
        self.stop_within(info, STOP_GRACE)
    }

    /// Stops a process this run started: SIGTERM to its group, SIGKILL
    /// for what is left after `grace` (a pod's termination grace period).
    pub fn stop_within(&self, info: &ProcessInfo, grace: Duration) -> Option<ExitStatus> {
        self.release(info)
            .and_then(|mut c| process::stop(&mut c, grace))
    }

    /// Sends SIGTERM to a process this run started and returns at once; the
    /// run still owns it ([`Run::stop`] reaps it, teardown kills it).
    pub fn terminate(&self, info: &ProcessInfo) {
        if let Some(child) = self.lock().children.get_mut(&info.pid) {
            process::terminate(child);
        }
    }

    /// Kills a process this run started (SIGKILL to its group, at once).
    pub fn kill(&self, info: &ProcessInfo) -> Option<ExitStatus> {
        self.release(info).and_then(|mut c| process::kill(&mut c))
    }

    /// Forgets a process (it is about to end) and hands back its child.
    fn release(&self, info: &ProcessInfo) -> Option<Child> {
        let mut inner = self.lock();
        inner.record.processes.retain(|p| p.pid != info.pid);
        let _ = inner.save();
        inner.children.remove(&info.pid)
    }

    /// `Some(status)` once a process this run started has exited.
    pub fn exited(&self, info: &ProcessInfo) -> Option<ExitStatus> {
        let mut inner = self.lock();
        inner
            .children
            .get_mut(&info.pid)
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// What this run currently owns.
    pub fn record(&self) -> RunRecord {
        self.lock().record.clone()
    }

    /// Keeps the run directory (logs, config) after teardown, as a panic
    /// would: for a caller that reports a failure after dropping the run.
    pub fn keep_dir(&self) {
        self.lock().keep_dir = true;
    }

    /// Removes everything this run owns. Idempotent.
    pub fn teardown(&self) {
        self.lock().teardown();
    }

    fn lock(&self) -> MutexGuard<'_, RunInner> {
        // A panic elsewhere must not stop cleanup: the data stays consistent
        // because every mutation is a single push/remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_open(&self) -> Result<MutexGuard<'_, RunInner>, RunError> {
        let inner = self.lock();
        if inner.closed {
            return Err(RunError::Closed(self.id.clone()));
        }
        Ok(inner)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.teardown();
        if std::thread::panicking() || self.lock().keep_dir {
            eprintln!(
                "e2e: run {} failed; its logs are kept in {}",
                self.handle.id,
                self.handle.dir.display()
            );
        } else {
            remove_run_dir(&self.handle.dir);
        }
    }
}

/// Removes a finished run's directory, unless asked to keep it.
fn remove_run_dir(dir: &Path) {
    if std::env::var_os(KEEP_ENV).is_none() {
        let _ = fs::remove_dir_all(dir);
    }
}

impl RunInner {
    fn save(&self) -> Result<(), RunError> {
        if self.closed {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(&self.record).expect("a run record serializes");
        write_atomic(&self.state_file, &json)
    }

    fn teardown(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut children: Vec<Child> = std::mem::take(&mut self.children).into_values().collect();
        process::stop_all(&mut children, STOP_GRACE);
        remove_recorded(&self.record);
        let _ = fs::remove_file(&self.state_file);
    }
}

/// Kills what a record lists and removes its namespaces.
fn remove_recorded(record: &RunRecord) {
    for p in &record.processes {
        process::kill_recorded(p);
    }
    let mut names = record.netns.clone();
    names.extend(netns::names_with_prefix(&format!("{PREFIX}{}-", record.id)));
    names.sort();
    names.dedup();
    for name in names {
        let ns = NetNs::named(&name);
        kill_inside(&ns);
        if let Err(e) = ns.delete() {
            eprintln!("e2e: could not remove network namespace {name}: {e}");
        }
    }
}

/// SIGKILLs every process inside `ns`, until none is left (a dying parent
/// may fork once more).
fn kill_inside(ns: &NetNs) {
    for _ in 0..50 {
        let pids = ns.pids();
        if pids.is_empty() {
            return;
        }
        pids.into_iter().for_each(process::kill_pid);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the namespaces and processes of runs whose owner has died, and
/// namespaces with our prefix that no run records at all. Returns what it
/// removed. Live runs (other tests, other users' runs) are left alone.
pub fn cleanup_leftovers() -> Vec<String> {
    // Namespaces first, records second: a run writes its record before it
    // creates a namespace, so every namespace seen here whose run is alive
    // has a record by the time the records are read.
    let named = netns::names_with_prefix(PREFIX);
    let mut removed = Vec::new();
    let mut known_ids = Vec::new();
    if let Ok(entries) = fs::read_dir(STATE_DIR) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let record: Option<RunRecord> = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(record) = record else {
                // Unreadable: a record is written atomically, so this is not a
                // run in progress; keep its id known so its namespaces are
                // not treated as orphans by mistake, and leave it for a human.
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    known_ids.push(stem.to_string());
                }
                continue;
            };
            if process::is_same_process(record.pid as i32, record.start_time) {
                known_ids.push(record.id);
                continue;
            }
            remove_recorded(&record);
            remove_run_dir(&record.dir);
            let _ = fs::remove_file(&path);
            removed.push(format!("run {} (pid {} is gone)", record.id, record.pid));
        }
    }
    for name in named {
        let id = name[PREFIX.len()..].split('-').next().unwrap_or_default();
        if known_ids.iter().any(|k| k == id) {
            continue;
        }
        let ns = NetNs::named(&name);
        if !ns.exists() {
            // Removed above with its dead run, or by its live run since.
            continue;
        }
        kill_inside(&ns);
        if ns.delete().is_ok() {
            removed.push(format!("network namespace {name} (no run records it)"));
        }
    }
    removed
}

fn live_runs() -> MutexGuard<'static, Vec<Weak<Mutex<RunInner>>>> {
    static LIVE: Mutex<Vec<Weak<Mutex<RunInner>>>> = Mutex::new(Vec::new());
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live
}

/// Tears down every live run of this process (the signal path).
fn teardown_all() {
    let runs: Vec<_> = live_runs().iter().filter_map(Weak::upgrade).collect();
    for run in runs {
        let mut inner = run.lock().unwrap_or_else(|e| e.into_inner());
        inner.teardown();
        remove_run_dir(&inner.record.dir);
    }
}

/// On SIGINT/SIGTERM: tear down every live run, then exit (130 / 143, as a
/// shell reports death by those signals). Installed once per process; returns
/// only after the handler is in place.
fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("e2e-signals".into())
            .spawn(move || {
                use tokio::signal::unix::{SignalKind, signal};
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let (mut int, mut term) =
                        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
                            (Ok(i), Ok(t)) => (i, t),
                            (Err(e), _) | (_, Err(e)) => {
                                let _ = ready_tx.send(Err(e.to_string()));
                                return;
                            }
                        };
                    let _ = ready_tx.send(Ok(()));
                    let code = tokio::select! {
                        _ = int.recv() => 130,
                        _ = term.recv() => 143,
                    };
                    eprintln!("e2e: interrupted; removing the local cluster");
                    teardown_all();
                    std::process::exit(code);
                });
            });
        let installed = match spawned {
            Ok(_) => ready_rx.recv().unwrap_or_else(|_| Err("signal thread ended".into())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = installed {
            eprintln!("e2e: WARNING: no SIGINT/SIGTERM cleanup ({e}); an interrupted run is cleaned by the next one");
        }
    });
}

fn fresh_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    loop {
        let id: String = (0..6)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        if !Path::new(STATE_DIR).join(format!("{id}.json")).exists() {
            return id;
        }
    }
}

/// Parent of run directories: one per user, so runs of different users
/// (root, or a user in its own user namespace) never share one.
fn run_root() -> PathBuf {
    std::env::var_os(RUN_ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| match crate::privilege::owner_uid() {
            0 => std::env::temp_dir().join("meshe2e"),
            uid => std::env::temp_dir().join(format!("meshe2e-{uid}")),
        })
}

fn create_dir(path: &Path) -> Result<(), RunError> {
    fs::create_dir_all(path).map_err(|source| RunError::Io {
        what: "could not create directory",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` via a temporary file and a rename, so readers
/// (a cleaning run, istiod-rs watching a directory) never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let io = |what, source| RunError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| io("could not write", e))?;
    f.write_all(bytes).map_err(|e| io("could not write", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io("could not replace", e))
}

/// A name usable as a file name (pod names may hold dots; nothing else odd).
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_name_safe() {
        let id = fresh_id();
        assert_eq!(id.len(), 6);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(file_safe("demo/client a"), "demo_client_a");
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = std::env::temp_dir().join(format!("meshe2e-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.yaml");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
