//! Long-running processes inside a network namespace (sample apps, mesh
//! components): each in its own process group so it and its children can be
//! signalled together, with stdout and stderr captured to its own log file.
//! Also: waiting for one-shot commands with a deadline, and telling a live
//! process from a dead one whose pid was reused.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::netns::NetNs;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not create log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start {name} (`{command}`): {source}")]
    Spawn {
        name: String,
        command: String,
        source: std::io::Error,
    },
}

/// What to start: a name (for logs and messages), the program and its
/// arguments, extra environment.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl ProcessSpec {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> ProcessSpec {
        ProcessSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The command that runs this spec inside `netns`.
    pub fn command_in(&self, netns: &NetNs) -> Command {
        let mut cmd = netns.command(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// A started process: the handle callers keep; the run owns the child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub name: String,
    pub pid: u32,
    /// Start time (clock ticks since boot) so a reused pid is not mistaken for it.
    pub start_time: u64,
    pub netns: String,
    pub log: PathBuf,
}

/// Starts `spec` inside `netns` in a new process group, output to `log`.
pub fn spawn(
    spec: &ProcessSpec,
    netns: &NetNs,
    log: &Path,
) -> Result<(Child, ProcessInfo), ProcessError> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        })?;
    let err = out.try_clone().map_err(|source| ProcessError::Log {
        path: log.to_path_buf(),
        source,
    })?;
    let mut cmd = spec.command_in(netns);
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        name: spec.name.clone(),
        command: display(&cmd),
        source,
    })?;
    let pid = child.id();
    let info = ProcessInfo {
        name: spec.name.clone(),
        pid,
        start_time: start_time(pid as i32).unwrap_or(0),
        netns: netns.name().to_string(),
        log: log.to_path_buf(),
    };
    Ok((child, info))
}

/// Stops a process group: SIGTERM, then SIGKILL for whatever is left after
/// `grace`. Reaps `child`.
pub fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    stop_all(std::slice::from_mut(child), grace).pop().flatten()
}

/// Asks a child's process group to end (SIGTERM) without waiting for it,
/// as a pod's termination does before its grace period runs out.
pub fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        signal_group(child.id(), Signal::SIGTERM);
    }
}

/// Kills a child's process group at once (SIGKILL: no chance to clean up,
/// as a crash or an OOM kill) and reaps the child.
pub fn kill(child: &mut Child) -> Option<ExitStatus> {
    signal_group(child.id(), Signal::SIGKILL);
    child.wait().ok()
}

/// Stops many process groups at once, so their grace periods overlap.
pub fn stop_all(children: &mut [Child], grace: Duration) -> Vec<Option<ExitStatus>> {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            signal_group(c.id(), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    loop {
        for (c, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = c.try_wait().ok().flatten();
            }
        }
        if statuses.iter().all(Option::is_some) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for (c, status) in children.iter_mut().zip(statuses.iter_mut()) {
        // The leader may be gone while its children linger in the group.
        signal_group(c.id(), Signal::SIGKILL);
        if status.is_none() {
            *status = c.wait().ok();
        }
    }
    statuses
}

fn signal_group(pgid: u32, signal: Signal) {
    // ESRCH (group already empty) is the expected outcome of a clean stop.
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

/// Kills a process found by pid (not our child), if it is still the one we
/// recorded; also its process group, which it leads.
pub fn kill_recorded(info: &ProcessInfo) {
    if is_same_process(info.pid as i32, info.start_time) {
        signal_group(info.pid, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(Pid::from_raw(info.pid as i32), Signal::SIGKILL);
    }
}

/// Kills one process by pid (SIGKILL); an already gone process is fine.
pub fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`
/// field 22), which together with the pid identifies it uniquely.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is alive and is the process that started at `start_time`.
pub fn is_same_process(pid: i32, start_time: u64) -> bool {
    match self::start_time(pid) {
        Some(t) => start_time == 0 || t == start_time,
        None => false,
    }
}

/// Waits for a child whose stdout/stderr are piped, collecting both; kills it
/// and returns `None` if it outlives `timeout`.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Option<Output> {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A command as a shell line, for messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_start_time() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own /proc/self/stat");
        assert!(t > 0);
        assert!(is_same_process(me, t));
        assert!(!is_same_process(me, t + 1));
    }

    #[test]
    fn a_dead_pid_is_not_alive() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let t = start_time(pid).unwrap_or(1);
        child.wait().unwrap();
        assert!(!is_same_process(pid, t));
    }

    #[test]
    fn one_shot_commands_time_out() {
        let child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(wait_with_timeout(child, Duration::from_millis(50)).is_none());
        let child = Command::new("echo")
            .arg("hi")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_timeout(child, Duration::from_secs(30)).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
