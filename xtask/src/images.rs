//! `cargo xtask images [--hub HUB] [--tag TAG]`: builds the container
//! images the install manifests run (`<hub>/istiod-rs:<tag>`,
//! `<hub>/ztunnel-rs:<tag>`) from manifests/images/*.Dockerfile, with the
//! workspace as the build context and the Rust toolchain of
//! rust-toolchain.toml. It needs Docker (the CLI and a daemon it reaches)
//! and fails at once, saying what is missing, where there is none.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run};

/// The images, by Dockerfile: what the install manifests name.
const IMAGES: &[(&str, &str)] = &[
    ("istiod-rs", "manifests/images/istiod-rs.Dockerfile"),
    ("ztunnel-rs", "manifests/images/ztunnel-rs.Dockerfile"),
];

pub fn run_images(args: &[String]) -> Result<()> {
    let mut hub = "istio-rs".to_string();
    let mut tag = env!("CARGO_PKG_VERSION").to_string();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--hub" => hub = value("--hub")?,
            "--tag" => tag = value("--tag")?,
            other => bail!("`cargo xtask images` takes --hub HUB and --tag TAG (got {other:?})"),
        }
    }
    let docker = docker_ready(std::env::var_os("PATH").as_deref())?;
    let rust_version = toolchain_channel(&root().join("rust-toolchain.toml"))?;
    for (name, dockerfile) in IMAGES {
        let image = format!("{hub}/{name}:{tag}");
        run(Command::new(&docker)
            .current_dir(root())
            .env("DOCKER_BUILDKIT", "1")
            .args(["build", "-f", dockerfile])
            .args(["--build-arg", &format!("RUST_VERSION={rust_version}")])
            .args(["-t", &image, "."]))?;
        eprintln!("built {image}");
    }
    eprintln!(
        "images built; `istioctl-rs install --set hub={hub} --set tag={tag}` runs them (load them into the cluster's nodes first, e.g. `kind load docker-image`)"
    );
    Ok(())
}

/// The `docker` CLI on `path`, once it reaches a daemon.
pub fn docker_ready(path: Option<&OsStr>) -> Result<PathBuf> {
    let Some(docker) = find_program("docker", path) else {
        bail!(
            "cargo xtask images needs Docker, and there is no `docker` on PATH; on a machine with Docker (CLI and daemon), run it there"
        );
    };
    let info = Command::new(&docker)
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .with_context(|| format!("running {} info", docker.display()))?;
    if !info.status.success() {
        bail!(
            "cargo xtask images needs a Docker daemon, and {} cannot reach one: {}; start it (or set DOCKER_HOST)",
            docker.display(),
            String::from_utf8_lossy(&info.stderr).trim()
        );
    }
    Ok(docker)
}

/// An executable named `name` in one of `path`'s directories.
pub(crate) fn find_program(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `channel = "1.95.0"` of rust-toolchain.toml: the build stage's Rust.
fn toolchain_channel(file: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .with_context(|| format!("{} names no channel", file.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An executable shell script `name` in `dir`.
    pub(crate) fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A fresh directory for one test.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn without_docker_it_says_so_at_once() {
        let empty = temp_dir("empty");
        let err = docker_ready(Some(empty.as_os_str()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("there is no `docker` on PATH"), "{err}");
        let err = docker_ready(None).unwrap_err().to_string();
        assert!(err.contains("no `docker` on PATH"), "{err}");
        std::fs::remove_dir_all(empty).unwrap();
    }

    #[test]
    fn a_docker_without_a_daemon_is_named() {
        let dir = temp_dir("nodaemon");
        script(
            &dir,
            "docker",
            "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock' >&2; exit 1",
        );
        let err = docker_ready(Some(dir.as_os_str())).unwrap_err().to_string();
        assert!(err.contains("needs a Docker daemon"), "{err}");
        assert!(err.contains("Cannot connect to the Docker daemon"), "{err}");
        // A daemon that answers: ready.
        script(&dir, "docker", "echo 27.0.1");
        assert_eq!(
            docker_ready(Some(dir.as_os_str())).unwrap(),
            dir.join("docker")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_build_uses_the_pinned_toolchain() {
        let channel = toolchain_channel(&root().join("rust-toolchain.toml")).unwrap();
        assert!(channel.starts_with("1."), "{channel}");
        for (_, dockerfile) in IMAGES {
            let text = std::fs::read_to_string(root().join(dockerfile)).unwrap();
            assert!(
                text.contains(&format!("ARG RUST_VERSION={channel}")),
                "{dockerfile}"
            );
        }
    }
}
