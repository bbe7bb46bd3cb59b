//! `cargo xtask e2e [--filter S] [--kind]`: the end-to-end scenarios on
//! Kubernetes.
//!
//! Without `--kind`: builds the real control plane (the cache of `cargo
//! xtask k8s build`), then runs the `kube-e2e` binary of the `e2e` crate
//! (which builds the mesh's binaries where they are missing or stale): the
//! control plane and two netns nodes, the
//! mesh installed with `istioctl-rs install`, the shared L4 scenarios
//! through the `Cluster` trait, then the Kubernetes-only ones
//! (`e2e::scenarios::on_kube_cluster`). Needs root or unprivileged user
//! namespaces, as the other end-to-end runs (`kube-e2e` re-executes itself
//! in a user namespace when it is not root).
//!
//! `--kind`: the same scenarios on a kind cluster. It checks first that
//! Docker (CLI and a daemon `docker info` reaches) and `kind` are there
//! and fails at once naming what is missing and how to get it. The kind
//! `Cluster` driver is not written yet, and this path has never run: the
//! machines this project is built on have no Docker daemon. Where both
//! exist it says so rather than pretend.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::images::find_program;
use crate::{cargo, display};

const USAGE: &str = "usage: cargo xtask e2e [--filter S] [--kind]";

#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    filter: Option<String>,
    kind: bool,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut parsed = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--kind" => parsed.kind = true,
            "--filter" => {
                parsed.filter = Some(it.next().cloned().context("--filter needs a value")?);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

pub fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    if args.kind {
        let (docker, kind) = kind_tools(std::env::var_os("PATH").as_deref())?;
        bail!(
            "found {} and {}, but the kind driver of `cargo xtask e2e --kind` is not written yet \
             (it would build the images with `cargo xtask images`, `kind create cluster`, `kind load \
             docker-image` them, `istioctl-rs install`, and run the scenarios through a kind `Cluster`); \
             `cargo xtask e2e` runs the same scenarios on the real control plane built here",
            docker.display(),
            kind.display()
        );
    }
    let started = std::time::Instant::now();
    crate::k8s::run(&["build".to_string()])?;
    // The mesh's binaries: `kube-e2e` takes them from the target directory
    // and builds a package (`cargo build --bins -p <package>`, saying so)
    // only where its binary is missing or older than the sources
    // (`e2e::binaries`). After `cargo test --workspace` (as in `cargo xtask
    // ci`) they are there and fresh, so nothing is built again: building
    // each package here would compile its dependencies once more with that
    // package's own features, GBs of a CI machine's small disk.
    let mut e2e = cargo();
    e2e.args(["run", "--quiet", "-p", "e2e", "--bin", "kube-e2e", "--"]);
    if let Some(filter) = &args.filter {
        e2e.args(["--filter", filter]);
    }
    eprintln!("$ {}", display(&e2e));
    let status = e2e
        .status()
        .with_context(|| format!("could not start {}", display(&e2e)))?;
    if !status.success() {
        bail!(
            "cargo xtask e2e failed ({status}) after {:.0?}; the summary above says which scenarios and where the logs are",
            started.elapsed()
        );
    }
    eprintln!("e2e: passed in {:.0?} (builds included)", started.elapsed());
    Ok(())
}

/// `docker` (reaching a daemon) and `kind` on `path`, or an error naming
/// every one that is missing and how to get it.
fn kind_tools(path: Option<&OsStr>) -> Result<(PathBuf, PathBuf)> {
    let mut missing = Vec::new();
    let docker = find_program("docker", path);
    match &docker {
        None => missing.push(
            "docker: no `docker` on PATH; install Docker Engine (CLI and daemon), \
             https://docs.docker.com/engine/install/"
                .to_string(),
        ),
        Some(docker) => {
            let info = Command::new(docker)
                .args(["info", "--format", "{{.ServerVersion}}"])
                .output()
                .with_context(|| format!("running {} info", docker.display()))?;
            if !info.status.success() {
                missing.push(format!(
                    "a Docker daemon: `{} info` cannot reach one ({}); start it or set DOCKER_HOST",
                    docker.display(),
                    String::from_utf8_lossy(&info.stderr).trim()
                ));
            }
        }
    }
    let kind = find_program("kind", path);
    if kind.is_none() {
        missing.push(
            "kind: no `kind` on PATH; install it (`go install sigs.k8s.io/kind@latest`, \
             https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
                .to_string(),
        );
    }
    match (docker, kind) {
        (Some(docker), Some(kind)) if missing.is_empty() => Ok((docker, kind)),
        _ => bail!(
            "cargo xtask e2e --kind needs Docker and kind; missing:\n  - {}\n\
             (`cargo xtask e2e` without --kind runs the same scenarios on the real control plane it builds)",
            missing.join("\n  - ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::tests::{script, temp_dir};

    #[test]
    fn arguments() {
        let a = |v: &[&str]| parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&[]).unwrap(), Args::default());
        assert_eq!(
            a(&["--filter", "deny", "--kind"]).unwrap(),
            Args {
                filter: Some("deny".into()),
                kind: true
            }
        );
        assert!(
            a(&["--filter"])
                .unwrap_err()
                .to_string()
                .contains("needs a value")
        );
        assert!(
            a(&["--nope"])
                .unwrap_err()
                .to_string()
                .contains("unknown argument")
        );
    }

    #[test]
    fn kind_without_docker_or_kind_names_both() {
        let empty = temp_dir("e2e-empty");
        let err = kind_tools(Some(empty.as_os_str())).unwrap_err().to_string();
        assert!(err.contains("no `docker` on PATH"), "{err}");
        assert!(err.contains("no `kind` on PATH"), "{err}");
        std::fs::remove_dir_all(empty).unwrap();
    }

    #[test]
    fn kind_with_a_docker_without_daemon_names_the_daemon() {
        let dir = temp_dir("e2e-nodaemon");
        script(
            &dir,
            "docker",
            "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock' >&2; exit 1",
        );
        script(&dir, "kind", "echo kind v0.27.0");
        let err = kind_tools(Some(dir.as_os_str())).unwrap_err().to_string();
        assert!(err.contains("a Docker daemon"), "{err}");
        assert!(err.contains("Cannot connect to the Docker daemon"), "{err}");
        assert!(!err.contains("no `kind`"), "{err}");
        script(&dir, "docker", "echo 27.0.1");
        let (docker, kind) = kind_tools(Some(dir.as_os_str())).unwrap();
        assert_eq!((docker, kind), (dir.join("docker"), dir.join("kind")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
