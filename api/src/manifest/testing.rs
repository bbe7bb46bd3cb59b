//! Test helpers (feature `testing`): a file reader whose reads can be held
//! in progress for as long as a test needs, so that "while a read or parse
//! is in progress" is a state the test is in, not a race it hopes to win;
//! FIFOs; and a runtime whose shutdown is part of what is tested.

use std::ffi::OsString;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{FileProblem, ReadFiles, RegularFiles};

/// Holds every read of the files named `name` until [`HeldReads::release`],
/// then reads them as [`RegularFiles`] does. Other files are read at once.
#[derive(Clone, Debug)]
pub struct HeldReads {
    inner: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    name: OsString,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Reads waiting now.
    waiting: usize,
    /// Reads held since the start.
    held: usize,
    released: bool,
}

impl HeldReads {
    pub fn new(name: impl Into<OsString>) -> Self {
        HeldReads {
            inner: Arc::new(Held {
                name: name.into(),
                state: Mutex::default(),
                changed: Condvar::new(),
            }),
        }
    }

    /// How many reads are being held now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// How many reads were held, in all.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Lets every held read (and every later one) go on.
    pub fn release(&self) {
        self.lock().released = true;
        self.inner.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ReadFiles for HeldReads {
    fn read(&self, path: &Path, limit: u64) -> Result<Vec<u8>, FileProblem> {
        if path.file_name() == Some(self.inner.name.as_os_str()) {
            let mut state = self.lock();
            if !state.released {
                state.waiting += 1;
                state.held += 1;
                while !state.released {
                    state = self
                        .inner
                        .changed
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                state.waiting -= 1;
            }
        }
        RegularFiles.read(path, limit)
    }
}

/// Makes a FIFO at `path`: opening it for reading waits for a writer, and
/// reading it waits for data, which none will ever come.
pub fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("the mkfifo binary runs");
    assert!(status.success(), "mkfifo {}: {status}", path.display());
}

/// Runs `test` on a thread of its own and panics unless it returns within
/// `patience`: a hang (a blocked runtime, or one waiting for a stuck thread
/// at shutdown) fails the test instead of stalling it.
pub fn within<T: Send + 'static>(
    patience: Duration,
    test: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(test());
    });
    finished
        .recv_timeout(patience)
        .expect("the test ends within the patience given")
}

/// [`within`], on a multi-threaded runtime of its own whose shutdown is
/// part of the test.
pub fn on_own_runtime<T: Send + 'static>(
    patience: Duration,
    test: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
) -> T {
    within(patience, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let result = test(&runtime);
        drop(runtime);
        result
    })
}
