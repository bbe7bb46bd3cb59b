//! May this process build network namespaces? As root it may, directly, and
//! the namespaces are bind-mounted under `/run/netns` so `ip netns exec` works
//! for whoever is debugging. Without root, where the kernel allows
//! unprivileged user namespaces, the process re-executes itself inside a fresh
//! user + mount + network namespace with root mapped to the caller, so the
//! same code runs unchanged (and the kernel removes everything when the last
//! process exits). Otherwise callers skip, loudly, except under CI.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;

/// Set in the environment of a process re-executed inside its own user
/// namespace; its value is the real uid outside it.
pub const USERNS_MARKER: &str = "MESH_E2E_IN_USERNS";

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "cannot build network namespaces here: {0}. Run as root, or enable unprivileged user \
         namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0)"
    )]
    Unavailable(String),
    #[error("could not re-execute {exe} inside a user namespace: {source}")]
    Reexec { exe: String, source: std::io::Error },
    #[error("could not prepare the user namespace: {0}")]
    PrivateRun(String),
}

/// How this process can get the rights to build the topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// It has them already: real root, or root inside our own user namespace.
    Here,
    /// It can get them by re-executing inside a fresh user namespace.
    ViaUserNamespace,
    /// It cannot; the string says why.
    Unavailable(String),
}

/// Works out (once per process) how this process can build the topology.
pub fn access() -> Access {
    static ACCESS: OnceLock<Access> = OnceLock::new();
    ACCESS.get_or_init(detect).clone()
}

fn detect() -> Access {
    if in_user_namespace() {
        return Access::Here;
    }
    if nix::unistd::geteuid().is_root() {
        return match probe(&["--net", "true"]) {
            Ok(()) => Access::Here,
            Err(why) => Access::Unavailable(format!(
                "root, but cannot create a network namespace: {why}"
            )),
        };
    }
    match probe(&["--user", "--map-root-user", "--mount", "--net", "true"]) {
        Ok(()) => Access::ViaUserNamespace,
        Err(why) => Access::Unavailable(format!(
            "not root, and no unprivileged user namespace: {why}"
        )),
    }
}

/// Runs `unshare <args>` and reports why it failed, if it did.
fn probe(args: &[&str]) -> Result<(), String> {
    let out = Command::new("unshare")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run unshare(1): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether this process is the re-executed copy inside our own user namespace.
pub fn in_user_namespace() -> bool {
    std::env::var_os(USERNS_MARKER).is_some()
}

/// The uid files this process creates belong to on disk: inside our user
/// namespace it calls itself root, but writes as the user outside.
pub fn owner_uid() -> u32 {
    std::env::var(USERNS_MARKER)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| nix::unistd::getuid().as_raw())
}

/// Marks the private `/run`, so child processes (which inherit the mount
/// namespace and the marker variable) do not mount another one over it.
const PRIVATE_RUN_MARK: &str = "/run/.meshe2e-private";

/// Inside our user namespace, `/run` belongs to the real root and cannot hold
/// `/run/netns`; a private tmpfs over it (visible only in our mount namespace)
/// can. Idempotent; does nothing outside a user namespace.
pub fn prepare() -> Result<(), PrivilegeError> {
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    if !in_user_namespace() {
        return Ok(());
    }
    let prepared = PREPARED.get_or_init(|| {
        if Path::new(PRIVATE_RUN_MARK).exists() {
            return Ok(());
        }
        nix::mount::mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .map_err(|e| format!("mounting a private /run failed: {e}"))?;
        std::fs::write(PRIVATE_RUN_MARK, b"")
            .map_err(|e| format!("writing {PRIVATE_RUN_MARK}: {e}"))
    });
    prepared.clone().map_err(PrivilegeError::PrivateRun)
}

/// Re-executes the current executable with `args` inside a fresh user +
/// mount + network namespace (root mapped to the caller) and waits for it.
/// Output is inherited, so the child's messages reach the same terminal.
pub fn reexec_in_user_namespace(args: &[OsString]) -> Result<ExitStatus, PrivilegeError> {
    let exe = std::env::current_exe().map_err(|source| PrivilegeError::Reexec {
        exe: "/proc/self/exe".into(),
        source,
    })?;
    reexec_path(&exe, args)
}

fn reexec_path(exe: &Path, args: &[OsString]) -> Result<ExitStatus, PrivilegeError> {
    Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--net", "--"])
        .arg(exe)
        .args(args)
        .env(USERNS_MARKER, nix::unistd::getuid().to_string())
        .status()
        .map_err(|source| PrivilegeError::Reexec {
            exe: exe.display().to_string(),
            source,
        })
}

/// For binaries (the demo): returns `Ok(None)` when this process may go on
/// and build the topology; `Ok(Some(status))` when it re-executed itself in a
/// user namespace, which ran to completion with `status` (the caller should
/// exit with it); an error when neither is possible.
pub fn enter_for_binary() -> Result<Option<ExitStatus>, PrivilegeError> {
    match access() {
        Access::Here => {
            prepare()?;
            Ok(None)
        }
        Access::ViaUserNamespace => {
            let args: Vec<OsString> = std::env::args_os().skip(1).collect();
            reexec_in_user_namespace(&args).map(Some)
        }
        Access::Unavailable(why) => Err(PrivilegeError::Unavailable(why)),
    }
}

/// For tests that need the topology. Returns `true` when the test body should
/// run in this process. Without root it re-runs just this test (found by the
/// test thread's name, which libtest sets) inside a user namespace, fails if
/// that run failed, and returns `false`. When neither works it skips with a
/// loud message, or panics when the `CI` environment variable is set, since
/// a skipped end-to-end test in CI is a failure.
pub fn enter_for_test() -> bool {
    match access() {
        Access::Here => {
            if let Err(e) = prepare() {
                panic!("{e}");
            }
            true
        }
        Access::ViaUserNamespace => {
            let thread = std::thread::current();
            let Some(name) = thread.name().filter(|n| *n != "main") else {
                skip_or_fail(
                    "cannot tell which test is running (run with --test-threads >= 1 under libtest)",
                );
                return false;
            };
            let args: Vec<OsString> = [
                name,
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "--include-ignored",
            ]
            .iter()
            .map(OsString::from)
            .collect();
            eprintln!("e2e: not root; re-running `{name}` inside a user namespace");
            match reexec_in_user_namespace(&args) {
                Ok(status) if status.success() => false,
                Ok(status) => panic!("`{name}` failed inside the user namespace: {status}"),
                Err(e) => panic!("{e}"),
            }
        }
        Access::Unavailable(why) => {
            skip_or_fail(&why);
            false
        }
    }
}

fn skip_or_fail(why: &str) {
    let msg = format!(
        "\n!!!!!!!!!!\n!!! e2e test SKIPPED: cannot build network namespaces: {why}\n!!! run as root \
         (or with unprivileged user namespaces enabled) to run it\n!!!!!!!!!!\n"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}(CI is set: a skipped end-to-end test is a failure)");
    }
    eprintln!("{msg}");
}
