//! Changes in the CNI directories, from inotify: another CNI rewriting its
//! configuration, a new file, the plugin binary removed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The inotify instance, as tokio polls it.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Hands the inotify instance to tokio's reactor.
#[allow(unsafe_code)]
fn register(inotify: Inotify) -> io::Result<AsyncFd<InotifyFd>> {
    // SAFETY: `InotifyFd` owns the descriptor (an `OwnedFd` inside
    // `Inotify`), which stays open and the same until the `AsyncFd` drops
    // it, and `as_raw_fd` always returns that descriptor.
    unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// A watch on a few directories.
pub(super) struct DirWatch {
    fd: AsyncFd<InotifyFd>,
}

impl DirWatch {
    /// Watches each of `dirs` for files created, written, moved or deleted.
    /// On failure, returns the directory that could not be watched.
    pub(super) fn new<'a>(dirs: &[&'a std::path::PathBuf]) -> Result<Self, (&'a Path, io::Error)> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| (dirs[0].as_path(), io::Error::from(e)))?;
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        for dir in dirs {
            inotify
                .add_watch(dir.as_path(), mask)
                .map_err(|e| (dir.as_path(), io::Error::from(e)))?;
        }
        let fd = register(inotify).map_err(|e| (dirs[0].as_path(), e))?;
        Ok(DirWatch { fd })
    }

    /// Waits for at least one change, then takes every change pending, so
    /// that a burst of writes is one wake-up. A watched directory removed or
    /// replaced is an error: its new self is not watched.
    pub(super) async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) => {
                    if events.iter().any(|e| {
                        e.mask.intersects(
                            AddWatchFlags::IN_DELETE_SELF
                                | AddWatchFlags::IN_MOVE_SELF
                                | AddWatchFlags::IN_IGNORED,
                        )
                    }) {
                        return Err(io::Error::other(
                            "a watched CNI directory was removed or moved",
                        ));
                    }
                    // Drain whatever else is queued.
                    while let Ok(more) = self.fd.get_ref().0.read_events() {
                        if more.is_empty() {
                            break;
                        }
                    }
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
