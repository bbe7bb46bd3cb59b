//! How the node runtime gives a container (and a CNI plugin) its own view
//! of the filesystem: the `container-init` binary, started by the runtime
//! inside the pod's (or node's) network namespace, reads a [`Launch`],
//! enters a private mount namespace, builds a root and `exec`s the program
//! in it, keeping its pid (so the runtime signals and reaps the program
//! itself).
//!
//! The root: a tmpfs at [`Launch::root`] (an empty directory of the pod)
//! with every top-level entry of the host's `/` bind-mounted (recursively)
//! into it, then `chroot`: the container sees the host's files, as a
//! container built from the host's image would. Each [`Mount`] (volumes,
//! the image's own files) is then bind-mounted at its target. A target
//! whose parent directories do not exist gets them without touching the
//! host: the deepest existing ancestor is *shadowed* (a tmpfs over it, each
//! of its entries bind-mounted back), so new entries land in memory of
//! this mount namespace only. So `/var/run/secrets/kubernetes.io/
//! serviceaccount/token` is a real file for the process, and the host's
//! `/run` gains no `secrets` directory.
//!
//! Propagation: every mount of the view is a slave of the host's
//! (`HostToContainer` for all; `Bidirectional` is not offered): mounts the
//! host makes later (a new pod's `/run/netns/<name>`) appear in running
//! containers; nothing mounted inside leaks out.
//!
//! Every mount source is opened (`O_PATH`) before anything is mounted, and
//! mounted from `/proc/self/fd/N`: a volume mounted over `/tmp` cannot hide
//! a later source that lives under the host's `/tmp`.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use nix::fcntl::{OFlag, open};
use nix::mount::{MsFlags, mount};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("could not read the launch spec {path}: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("{step}: {detail}")]
    Setup { step: String, detail: String },
    #[error("could not exec {program:?}: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
}

/// One bind mount into the view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// A host path (file or directory).
    pub source: PathBuf,
    /// Where it appears in the view (absolute).
    pub target: PathBuf,
    pub read_only: bool,
}

/// What `container-init` does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// An empty directory to build the root in.
    pub root: PathBuf,
    /// Bind mounts, made in order (parents before children).
    pub mounts: Vec<Mount>,
    /// The program and its arguments; a program without `/` is looked up
    /// in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The whole environment; `None` keeps the inherited one.
    pub env: Option<Vec<(String, String)>>,
    /// The working directory in the view (default `/`).
    pub workdir: Option<PathBuf>,
    /// A hostname of its own (a new UTS namespace), as a pod has.
    pub hostname: Option<String>,
}

impl Launch {
    /// Reads a spec written by [`Launch::write`].
    pub fn read(path: &Path) -> Result<Launch, LaunchError> {
        let text = fs::read(path).map_err(|e| LaunchError::Spec {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        serde_json::from_slice(&text).map_err(|e| LaunchError::Spec {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Writes the spec for `container-init --spec <path>`.
    pub fn write(&self, path: &Path) -> Result<(), crate::run::RunError> {
        let json = serde_json::to_vec_pretty(self).expect("a launch spec serializes");
        crate::run::write_atomic(path, &json)
    }

    /// Mounts sorted so that a parent target comes before its children
    /// (stable: equal depths keep their order).
    pub fn ordered_mounts(&self) -> Vec<Mount> {
        let mut mounts = self.mounts.clone();
        mounts.sort_by_key(|m| m.target.components().count());
        mounts
    }
}

/// Builds the view and execs the program; returns only on failure.
pub fn launch(spec: &Launch) -> Result<Infallible, LaunchError> {
    let program = spec.argv.first().ok_or_else(|| setup("argv", "is empty"))?;
    let mut flags = CloneFlags::CLONE_NEWNS;
    if spec.hostname.is_some() {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    nix::sched::unshare(flags).map_err(|e| setup("unshare the mount namespace", e))?;
    if let Some(name) = &spec.hostname {
        nix::unistd::sethostname(name).map_err(|e| setup("set the hostname", e))?;
    }
    // Nothing mounted here reaches the host's mount namespace, but the
    // host's new mounts reach the container (every mount is a slave:
    // Kubernetes' `mountPropagation: HostToContainer`), so a node agent
    // sees the network namespaces the runtime mounts under /run/netns
    // after it started.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| setup("make / a slave of the host's mounts", e))?;

    let mounts = spec.ordered_mounts();
    let sources: Vec<OwnedFd> = mounts
        .iter()
        .map(|m| {
            open(&m.source, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| setup(&format!("open mount source {}", m.source.display()), e))
        })
        .collect::<Result<_, _>>()?;
    let source_is_dir: Vec<bool> = mounts.iter().map(|m| m.source.is_dir()).collect();

    build_root(&spec.root)?;
    let mut view = View::default();
    for ((m, fd), is_dir) in mounts.iter().zip(&sources).zip(source_is_dir) {
        let target = view.make_target(&m.target, is_dir)?;
        let from = format!("/proc/self/fd/{}", fd.as_raw_fd());
        bind(Path::new(&from), &target, m.read_only).map_err(|e| {
            setup(
                &format!("mount {} at {}", m.source.display(), m.target.display()),
                e,
            )
        })?;
    }
    drop(sources);

    let workdir = spec.workdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..]).current_dir(&workdir);
    if let Some(env) = &spec.env {
        cmd.env_clear().envs(env.iter().cloned());
    }
    let err = cmd.exec();
    Err(LaunchError::Exec {
        program: program.clone(),
        source: err,
    })
}

fn setup(step: &str, detail: impl std::fmt::Display) -> LaunchError {
    LaunchError::Setup {
        step: step.to_string(),
        detail: detail.to_string(),
    }
}

/// A tmpfs at `root` holding every top-level entry of `/`, then `chroot`.
fn build_root(root: &Path) -> Result<(), LaunchError> {
    // Read the host's `/` before the tmpfs goes over `root` (which may be
    // below one of its entries).
    let entries: Vec<(OsString, fs::FileType)> = fs::read_dir("/")
        .map_err(|e| setup("read /", e))?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name(), e.file_type().ok()?)))
        .collect();
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| setup(&format!("mount a tmpfs at {}", root.display()), e))?;
    for (name, kind) in entries {
        let from = Path::new("/").join(&name);
        let to = root.join(&name);
        replicate(&from, &to, &kind)?;
    }
    nix::unistd::chroot(root).map_err(|e| setup(&format!("chroot {}", root.display()), e))?;
    std::env::set_current_dir("/").map_err(|e| setup("chdir /", e))?;
    Ok(())
}

/// Makes `to` show what `from` shows: the same symlink, or a bind mount
/// (recursive, so mounts below come along) on a fresh mount point.
fn replicate(from: &Path, to: &Path, kind: &fs::FileType) -> Result<(), LaunchError> {
    let step = || format!("replicate {} at {}", from.display(), to.display());
    if kind.is_symlink() {
        let target = fs::read_link(from).map_err(|e| setup(&step(), e))?;
        return std::os::unix::fs::symlink(target, to).map_err(|e| setup(&step(), e));
    }
    if kind.is_dir() {
        fs::create_dir(to).map_err(|e| setup(&step(), e))?;
    } else {
        fs::File::create(to).map_err(|e| setup(&step(), e))?;
    }
    // Sockets and fifos are not directories: a file mount point takes them.
    bind(from, to, false).map_err(|e| setup(&step(), e))
}

fn bind(from: &Path, to: &Path, read_only: bool) -> nix::Result<()> {
    mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    if read_only {
        mount(
            None::<&str>,
            to,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )?;
    }
    Ok(())
}

/// Directories of the view where new entries may be created freely (they
/// are in a tmpfs of this mount namespace), and a counter for staging.
#[derive(Debug)]
struct View {
    free: BTreeSet<PathBuf>,
    staged: usize,
}

impl Default for View {
    fn default() -> Self {
        View {
            free: BTreeSet::from([PathBuf::from("/")]),
            staged: 0,
        }
    }
}

/// Where shadowed directories' original entries stay reachable.
const STAGE: &str = "/.container-init-stage";

impl View {
    /// Makes `target` exist (a directory, or an empty file when the source
    /// is a file), creating missing parents in shadowed directories; the
    /// resolved path (symlinks of the view followed).
    fn make_target(&mut self, target: &Path, is_dir: bool) -> Result<PathBuf, LaunchError> {
        if !target.is_absolute() {
            return Err(setup(
                &format!("mount target {}", target.display()),
                "is not an absolute path",
            ));
        }
        let parts: Vec<&std::ffi::OsStr> = target
            .components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(p),
                _ => None,
            })
            .collect();
        let mut current = PathBuf::from("/");
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let next = current.join(part);
            if fs::symlink_metadata(&next).is_ok() {
                current = fs::canonicalize(&next)
                    .map_err(|e| setup(&format!("resolve {} in the view", next.display()), e))?;
                continue;
            }
            if !self.free.contains(&current) {
                self.shadow(&current)?;
            }
            let made = if last && !is_dir {
                fs::File::create(&next).map(drop)
            } else {
                fs::create_dir(&next)
            };
            made.map_err(|e| setup(&format!("create {} in the view", next.display()), e))?;
            if !last || is_dir {
                self.free.insert(next.clone());
            }
            current = next;
        }
        Ok(current)
    }

    /// A tmpfs over `dir` with each of its entries bound back.
    fn shadow(&mut self, dir: &Path) -> Result<(), LaunchError> {
        let stage = Path::new(STAGE).join(self.staged.to_string());
        self.staged += 1;
        let step = |what: &str| format!("shadow {} ({what})", dir.display());
        fs::create_dir_all(&stage).map_err(|e| setup(&step("stage"), e))?;
        bind(dir, &stage, false).map_err(|e| setup(&step("stage"), e))?;
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .map_err(|e| setup(&step("tmpfs"), e))?;
        let entries = fs::read_dir(&stage).map_err(|e| setup(&step("read"), e))?;
        for entry in entries.filter_map(Result::ok) {
            let kind = entry.file_type().map_err(|e| setup(&step("read"), e))?;
            replicate(&entry.path(), &dir.join(entry.file_name()), &kind)?;
        }
        self.free.insert(dir.to_path_buf());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_mounted_before_children() {
        let m = |t: &str| Mount {
            source: "/s".into(),
            target: t.into(),
            read_only: false,
        };
        let spec = Launch {
            root: "/r".into(),
            mounts: vec![
                m("/var/run/secrets/kubernetes.io/serviceaccount"),
                m("/etc/istio"),
                m("/tmp"),
                m("/etc/istio/pod"),
            ],
            argv: vec!["echo".into()],
            env: None,
            workdir: None,
            hostname: None,
        };
        let order: Vec<String> = spec
            .ordered_mounts()
            .iter()
            .map(|m| m.target.display().to_string())
            .collect();
        assert_eq!(
            order,
            [
                "/tmp",
                "/etc/istio",
                "/etc/istio/pod",
                "/var/run/secrets/kubernetes.io/serviceaccount"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("launch.json");
        spec.write(&path).unwrap();
        assert_eq!(Launch::read(&path).unwrap(), spec);
    }
}
