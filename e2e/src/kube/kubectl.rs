//! `kubectl`, the real client, run inside the network namespace that
//! reaches the API server, with a kubeconfig: how tests and the harness
//! create, read and wait for objects.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::NetNs;

#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`{command}` printed no JSON: {source}")]
    Json {
        command: String,
        source: serde_json::Error,
    },
    #[error("waited {waited:?} for {what}; last: {last}")]
    Wait {
        what: String,
        waited: Duration,
        last: String,
    },
}

impl KubectlError {
    /// Whether kubectl said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, KubectlError::Failed { stderr, .. } if stderr.contains("NotFound") || stderr.contains("not found"))
    }
}

/// `kubectl --kubeconfig <file>` in a network namespace.
#[derive(Clone, Debug)]
pub struct Kubectl {
    pub program: PathBuf,
    pub kubeconfig: PathBuf,
    pub netns: NetNs,
    /// kubectl's discovery cache, kept out of `$HOME`.
    pub cache_dir: PathBuf,
    /// How long one kubectl command may take.
    pub timeout: Duration,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.netns.command(&self.program);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(args);
        cmd
    }

    /// Runs another Kubernetes client (`istioctl-rs`) as this kubectl runs:
    /// in its network namespace, `--kubeconfig` first; killed past `timeout`.
    pub fn run_client(
        &self,
        program: &std::path::Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<std::process::Output, crate::netns::NetnsError> {
        let mut cmd = self.netns.command(program);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        self.netns.exec(cmd, timeout)
    }

    /// Runs kubectl with `args`; its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, KubectlError> {
        self.run_with_input(args, None)
    }

    /// Runs kubectl with `args`, `input` on its stdin; its stdout.
    pub fn run_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, KubectlError> {
        let mut cmd = self.command(args);
        let shown = format!("kubectl {}", args.join(" "));
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| KubectlError::Spawn {
            command: shown.clone(),
            source,
        })?;
        // Written from a thread: kubectl may answer before it read it all.
        let writer = match (input, child.stdin.take()) {
            (Some(text), Some(mut pipe)) => {
                let text = text.to_string();
                Some(std::thread::spawn(move || {
                    let _ = pipe.write_all(text.as_bytes());
                }))
            }
            _ => None,
        };
        let out = crate::process::wait_with_timeout(child, self.timeout).ok_or_else(|| {
            KubectlError::Timeout {
                command: shown.clone(),
                timeout: self.timeout,
            }
        })?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        if !out.status.success() {
            return Err(KubectlError::Failed {
                command: shown,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON, one or more objects).
    pub fn apply(&self, manifest: &str) -> Result<String, KubectlError> {
        self.run_with_input(&["apply", "-f", "-"], Some(manifest))
    }

    /// Applies the CRDs in `path` (a file or a directory; server-side, as
    /// large CRDs outgrow the client-side apply annotation) and waits until
    /// every CRD is Established.
    pub fn apply_crds(&self, path: &std::path::Path) -> Result<(), KubectlError> {
        let path = path.to_string_lossy();
        self.run(&["apply", "--server-side", "-f", &path])?;
        self.run(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ])?;
        Ok(())
    }

    /// `kubectl create -f - -o json` of one object; the object the API server returned.
    pub fn create(&self, manifest: &str) -> Result<Value, KubectlError> {
        let args = ["create", "-f", "-", "-o", "json"];
        let out = self.run_with_input(&args, Some(manifest))?;
        parse(&args, &out)
    }

    /// `kubectl <args> -o json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<Value, KubectlError> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.run(&all)?;
        parse(&all, &out)
    }

    /// `kubectl get <kind> <name> [-n namespace] -o json`; `None` when it does not exist.
    pub fn get(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, KubectlError> {
        let mut args = vec!["get", kind, name];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        match self.json(&args) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A merge patch of an object's status subresource (what a kubelet or
    /// controller writes).
    pub fn patch_status(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, KubectlError> {
        let patch = patch.to_string();
        let mut args = vec![
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            patch.as_str(),
        ];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.json(&args)
    }

    /// Polls `check` until it returns `Some`, for at most `timeout`. An
    /// error of `check` is remembered as the last answer and polling goes
    /// on (the API server may still be settling).
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Kubectl) -> Result<Option<T>, KubectlError>,
    ) -> Result<T, KubectlError> {
        wait_until(what, timeout, || check(self))
    }
}

/// Polls `check` until it returns `Some`, for at most `timeout`; errors are
/// kept as the last answer.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, KubectlError>,
) -> Result<T, KubectlError> {
    let start = Instant::now();
    let mut last;
    let mut pause = Duration::from_millis(50);
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() >= timeout {
            return Err(KubectlError::Wait {
                what: what.into(),
                waited: start.elapsed(),
                last,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

fn parse(args: &[&str], out: &str) -> Result<Value, KubectlError> {
    serde_json::from_str(out).map_err(|source| KubectlError::Json {
        command: format!("kubectl {}", args.join(" ")),
        source,
    })
}
