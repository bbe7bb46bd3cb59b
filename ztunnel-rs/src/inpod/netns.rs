//! A handle on a pod's network namespace, and the one place where this process
//! enters one.
//!
//! Entering a netns (`setns(CLONE_NEWNET)`) changes the namespace of the calling
//! *thread*; what is created there (sockets, child processes) keeps living in
//! the pod's netns afterwards. Two ways in:
//! - [`Netns::run_inline`], for short synchronous work such as creating a
//!   socket: the calling thread (a tokio worker, too) enters the namespace,
//!   runs the closure and returns to its own namespace before anything else
//!   runs on it. Two `setns(2)` calls per socket, instead of a thread: this is
//!   on the path of every proxied connection.
//! - [`Netns::run`] / [`Netns::run_async`], for anything longer or that may
//!   block: a short-lived thread of its own.

use std::cell::OnceCell;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::sched::CloneFlags;

/// Errors handling network namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (has the pod's sandbox gone?)")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "fd is not a namespace (its filesystem is {0:?}, not nsfs): the sender passed the wrong fd"
    )]
    NotANamespace(nix::sys::statfs::FsType),
    #[error("cannot inspect namespace fd: {0}")]
    Inspect(#[from] nix::Error),
    #[error("cannot enter network namespace {inode}: {source}")]
    Enter { inode: u64, source: nix::Error },
    #[error("cannot start a thread to work inside network namespace {inode}: {source}")]
    Thread { inode: u64, source: std::io::Error },
    #[error("the thread working inside network namespace {0} went away")]
    ThreadLost(u64),
    #[error("cannot open the calling thread's own network namespace: {0}")]
    Home(std::io::Error),
}

/// An open network namespace. Cloning shares the fd; the namespace stays alive
/// at least as long as a handle does, even after the pod's sandbox is torn down.
#[derive(Clone)]
pub struct Netns {
    fd: Arc<OwnedFd>,
    inode: u64,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns(net:[{}])", self.inode)
    }
}

impl PartialEq for Netns {
    /// Two handles are on the same namespace when their inodes match (nsfs
    /// inodes identify namespaces), whatever fds they hold.
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode
    }
}
impl Eq for Netns {}

impl Netns {
    /// Opens the namespace at `path`: a runtime's bind mount such as
    /// `/var/run/netns/cni-…`, or `/proc/<pid>/ns/net`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| NetnsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_fd(file.into())
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Takes ownership of an fd received from elsewhere (ZDS), checking that it
    /// really is a namespace so that a confused sender is caught here.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, NetnsError> {
        let fs = nix::sys::statfs::fstatfs(&fd)?;
        let fs_type = fs.filesystem_type();
        // Older kernels expose namespaces through procfs rather than nsfs.
        if fs_type != nix::sys::statfs::NSFS_MAGIC && fs_type != nix::sys::statfs::PROC_SUPER_MAGIC
        {
            return Err(NetnsError::NotANamespace(fs_type));
        }
        let inode = nix::sys::stat::fstat(&fd)?.st_ino;
        Ok(Netns {
            fd: Arc::new(fd),
            inode,
        })
    }

    /// The namespace's inode: its identity (what `ip netns identify` and
    /// `/proc/<pid>/ns/net` show as `net:[inode]`).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A new fd on the same namespace, e.g. to pass over ZDS.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and waits
    /// for it. Blocks the caller: from async code use [`Netns::run_async`].
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name(format!("netns-{}", self.inode))
                .spawn_scoped(scope, || self.enter_then(f))
                .map_err(|source| NetnsError::Thread {
                    inode: self.inode,
                    source,
                })?;
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run`], without blocking the async caller's thread.
    pub async fn run_async<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let netns = self.clone();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.inode))
            .spawn(move || {
                let _ = tx.send(netns.enter_then(f));
            })
            .map_err(|source| NetnsError::Thread {
                inode: self.inode,
                source,
            })?;
        rx.await.map_err(|_| NetnsError::ThreadLost(self.inode))?
    }

    /// Runs `f` on the calling thread inside this namespace, then returns
    /// the thread to the namespace it was in. Only for short synchronous work
    /// that never blocks (creating a socket): nothing else runs on the thread
    /// meanwhile. A future returned by `f` would run outside: use
    /// [`Netns::run_async`] for that.
    pub fn run_inline<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        HOME.with(|home| {
            let home = match home.get() {
                Some(home) => home,
                None => {
                    let opened = std::fs::File::open("/proc/thread-self/ns/net")
                        .map_err(NetnsError::Home)?;
                    home.get_or_init(|| opened.into())
                }
            };
            nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetnsError::Enter {
                    inode: self.inode,
                    source,
                }
            })?;
            let _return = ReturnHome(home.as_fd());
            Ok(f())
        })
    }

    /// Only ever called on a thread of our own that ends right after.
    fn enter_then<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
            NetnsError::Enter {
                inode: self.inode,
                source,
            }
        })?;
        Ok(f())
    }
}

thread_local! {
    /// The namespace each thread started in, where [`Netns::run_inline`]
    /// returns it to.
    static HOME: OnceCell<OwnedFd> = const { OnceCell::new() };
}

/// Puts the thread back into its own namespace, also when the closure
/// panics.
struct ReturnHome<'a>(BorrowedFd<'a>);

impl Drop for ReturnHome<'_> {
    fn drop(&mut self) {
        if let Err(error) = nix::sched::setns(self.0, CloneFlags::CLONE_NEWNET) {
            // Carrying on would create the next sockets of every pod in this
            // one: far worse than stopping.
            tracing::error!(%error, "cannot return a thread to its own network namespace; aborting");
            std::process::abort();
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
