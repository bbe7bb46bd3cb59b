//! Named network namespaces, as `ip netns` makes them (bind-mounted under
//! `/run/netns`, so `ip netns exec <name> ...` works for a human debugging),
//! and the ways the harness works inside one: configure it with `ip -n`,
//! start commands in it with `nsenter`, run a closure or a future on a thread
//! that has entered it, watch its listening sockets, find its processes.

use std::ffi::OsStr;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {detail}")]
    Ip { command: String, detail: String },
    #[error(
        "could not run `{program}` (is it installed? `apt-get install iproute2 util-linux`): {source}"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("could not enter network namespace {name}: {detail}")]
    Enter { name: String, detail: String },
    #[error("network namespace {name}: {what}: {source}")]
    Io {
        name: String,
        what: String,
        source: std::io::Error,
    },
    #[error(
        "in network namespace {name}: nothing listened on TCP port {port} within {waited:?}{detail}"
    )]
    NotListening {
        name: String,
        port: u16,
        waited: Duration,
        detail: String,
    },
    #[error(
        "in network namespace {name}: `{command}` did not finish within {timeout:?} and was killed"
    )]
    Timeout {
        name: String,
        command: String,
        timeout: Duration,
    },
}

/// A named network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates the namespace `name` (`ip netns add`) and brings its loopback up.
    pub fn create(name: &str) -> Result<NetNs, NetnsError> {
        run_ip(&["netns", "add", name], None)?;
        let ns = NetNs::named(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on an existing namespace (nothing is checked).
    pub fn named(name: &str) -> NetNs {
        NetNs {
            name: name.to_string(),
            path: Path::new(NETNS_DIR).join(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that keeps the namespace alive (what CNI calls the netns path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Removes the namespace's name (`ip netns del`). The kernel frees the
    /// namespace once no process is left in it, so kill those first.
    pub fn delete(&self) -> Result<(), NetnsError> {
        if !self.exists() {
            return Ok(());
        }
        run_ip(&["netns", "del", &self.name], None)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full, None)
    }

    /// Several `ip` commands in one process (`ip -n <ns> -batch -`), one per line.
    pub fn ip_batch(&self, commands: &[String]) -> Result<(), NetnsError> {
        let script = commands.join("\n") + "\n";
        run_ip(&["-n", self.name.as_str(), "-batch", "-"], Some(&script))
    }

    /// A command that runs `program` inside this namespace (via `nsenter`,
    /// which enters it and then execs `program`, so the child's pid is
    /// `program`'s own).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a one-shot command inside the namespace and collects its output;
    /// it is killed if it outlives `timeout`.
    pub fn exec(&self, mut cmd: Command, timeout: Duration) -> Result<Output, NetnsError> {
        let shown = crate::process::display(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| NetnsError::Spawn {
            program: shown.clone(),
            source,
        })?;
        crate::process::wait_with_timeout(child, timeout).ok_or_else(|| NetnsError::Timeout {
            name: self.name.clone(),
            command: shown,
            timeout,
        })
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so any
    /// socket `f` opens lives here. The thread ends with `f`; the caller's own
    /// namespace is never changed.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = fs::File::open(&self.path).map_err(|source| NetnsError::Io {
            name: self.name.clone(),
            what: format!("open {}", self.path.display()),
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(move || {
                self.enter_with(&file)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into this namespace for good (a thread that
    /// lives and works there: a node runtime's). Other threads are unaffected.
    pub fn enter_current_thread(&self) -> Result<(), NetnsError> {
        let file = fs::File::open(&self.path).map_err(|source| NetnsError::Io {
            name: self.name.clone(),
            what: format!("open {}", self.path.display()),
            source,
        })?;
        self.enter_with(&file)
    }

    fn enter_with(&self, file: &fs::File) -> Result<(), NetnsError> {
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
            name: self.name.clone(),
            detail: e.to_string(),
        })
    }

    /// Runs a future to completion on a single-threaded runtime whose thread
    /// has entered this namespace.
    pub fn block_on<F, Fut>(&self, f: F) -> Result<Fut::Output, NetnsError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        let name = self.name.clone();
        self.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetnsError::Io {
                    name,
                    what: "start a tokio runtime".into(),
                    source,
                })?;
            Ok(rt.block_on(f()))
        })?
    }

    /// Sets a per-namespace sysctl (e.g. `net/ipv4/ip_forward`): `/proc/sys/net`
    /// shows the namespace of the thread that opens it.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = Path::new("/proc/sys").join(key);
        let name = self.name.clone();
        self.run(move || {
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(value.as_bytes()))
                .map_err(|source| NetnsError::Io {
                    name,
                    what: format!("write {}", path.display()),
                    source,
                })
        })?
    }

    /// Whether something listens on TCP `port` (any address) in this namespace.
    pub fn is_listening(&self, port: u16) -> Result<bool, NetnsError> {
        // `/proc/thread-self/net` is the entered thread's namespace; reading the
        // socket table avoids connecting to (and disturbing) the listener.
        self.run(move || {
            ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                .iter()
                .filter_map(|p| fs::read_to_string(p).ok())
                .any(|table| listens_on(&table, port))
        })
    }

    /// Waits until something listens on TCP `port` in this namespace. `alive`
    /// is polled too: when it returns `Some(reason)` (say, the server exited)
    /// the wait ends early with that reason.
    pub fn wait_for_listener(
        &self,
        port: u16,
        timeout: Duration,
        alive: &dyn Fn() -> Option<String>,
    ) -> Result<(), NetnsError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            if self.is_listening(port)? {
                return Ok(());
            }
            if let Some(reason) = alive() {
                return Err(NetnsError::NotListening {
                    name: self.name.clone(),
                    port,
                    waited: start.elapsed(),
                    detail: format!(": {reason}"),
                });
            }
            if start.elapsed() >= timeout {
                return Err(NetnsError::NotListening {
                    name: self.name.clone(),
                    port,
                    waited: start.elapsed(),
                    detail: String::new(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Whether a TCP connection from this namespace to `address` opens
    /// within `timeout` (kubelet's `tcpSocket` probe); why not, if not.
    pub fn tcp_connects(
        &self,
        address: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<Result<(), String>, NetnsError> {
        self.run(move || {
            std::net::TcpStream::connect_timeout(&address, timeout)
                .map(drop)
                .map_err(|e| format!("connect {address}: {e}"))
        })
    }

    /// The namespace's inode: what `/proc/<pid>/ns/net` of its processes points at.
    pub fn inode(&self) -> Option<u64> {
        fs::metadata(&self.path).ok().map(|m| m.ino())
    }

    /// Processes currently inside this namespace (as `ip netns pids` finds them).
    pub fn pids(&self) -> Vec<i32> {
        self.inode().map(pids_in_namespace).unwrap_or_default()
    }
}

/// Pids of processes whose network namespace has inode `inode`.
pub fn pids_in_namespace(inode: u64) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() == inode)
                .unwrap_or(false)
        })
        .collect()
}

/// Names under `/run/netns` that start with `prefix`.
pub fn names_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether a `/proc/net/tcp{,6}` table has a socket in LISTEN state on `port`.
fn listens_on(table: &str, port: u16) -> bool {
    const LISTEN: &str = "0A";
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        state == Some(LISTEN)
            && local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

fn run_ip(args: &[&str], stdin: Option<&str>) -> Result<(), NetnsError> {
    let shown = format!("ip {}", args.join(" "));
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| NetnsError::Spawn {
        program: "ip".into(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| NetnsError::Spawn {
                program: shown.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetnsError::Spawn {
            program: shown.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if let Some(script) = stdin {
        detail.push_str(&format!("\n(batch was:\n{script})"));
    }
    Err(NetnsError::Ip {
        command: shown,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listeners_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                     0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   \
                     1: 0100007F:3A98 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert!(listens_on(table, 8080));
        // 15000 appears only as an established connection's local port.
        assert!(!listens_on(table, 15000));
        assert!(!listens_on(table, 80));
    }
}
