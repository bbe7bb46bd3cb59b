//! Finds the workspace's binaries (sample apps, mesh components) in the cargo
//! target directory, building them first when missing or older than the
//! sources. Nested builds work from inside `cargo test`: cargo releases its
//! build lock while tests run.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("could not run cargo to build {package}: {source}")]
    Cargo {
        package: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Build {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "binary {name} of package {package} is not at {path} even after building it: is `{name}` a [[bin]] of {package}?"
    )]
    Missing {
        package: String,
        name: String,
        path: PathBuf,
    },
}

/// The cargo profile to take binaries from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    #[default]
    Debug,
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Where binaries are and how to build them.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub workspace: PathBuf,
    pub target_dir: PathBuf,
    pub profile: Profile,
}

impl Default for Binaries {
    fn default() -> Self {
        Binaries::new(Profile::Debug)
    }
}

impl Binaries {
    /// This workspace, `CARGO_TARGET_DIR` (relative to the workspace) or `target/`.
    pub fn new(profile: Profile) -> Binaries {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("e2e lives inside the workspace")
            .to_path_buf();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => workspace.join(dir),
            None => workspace.join("target"),
        };
        Binaries {
            workspace,
            target_dir,
            profile,
        }
    }

    /// Where binary `name` of the configured profile lives (built or not).
    pub fn path(&self, name: &str) -> PathBuf {
        self.target_dir.join(self.profile.dir()).join(name)
    }

    /// Binary `name` of `package`, built first if missing or stale. A
    /// package is built at most once per process.
    pub fn get(&self, package: &str, name: &str) -> Result<PathBuf, BinaryError> {
        static BUILT: Mutex<BTreeSet<(String, PathBuf)>> = Mutex::new(BTreeSet::new());
        let path = self.path(name);
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let key = (
            package.to_string(),
            self.target_dir.join(self.profile.dir()),
        );
        if !built.contains(&key) && self.is_stale(&path) {
            self.build(package)?;
            built.insert(key);
            // A build that found nothing to do leaves the binary's old mtime;
            // mark it checked so the next process does not run cargo again.
            if let Ok(f) = fs::File::open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        if !path.exists() {
            return Err(BinaryError::Missing {
                package: package.into(),
                name: name.into(),
                path,
            });
        }
        Ok(path)
    }

    /// Missing, or older than any source in the workspace.
    fn is_stale(&self, binary: &Path) -> bool {
        let Some(built) = fs::metadata(binary).and_then(|m| m.modified()).ok() else {
            return true;
        };
        newest_source(&self.workspace, &self.target_dir).is_some_and(|src| src > built)
    }

    fn build(&self, package: &str) -> Result<(), BinaryError> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&self.workspace)
            .args(["build", "--bins", "-p", package])
            .env("CARGO_TARGET_DIR", &self.target_dir);
        if self.profile == Profile::Release {
            cmd.arg("--release");
        }
        eprintln!(
            "e2e: building {package} ({})",
            crate::process::display(&cmd)
        );
        let out = cmd.output().map_err(|source| BinaryError::Cargo {
            package: package.into(),
            source,
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
            return Err(BinaryError::Build {
                command: crate::process::display(&cmd),
                status: out.status,
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        Ok(())
    }
}

/// The newest modification time of what binaries are built from: `*.rs`,
/// `*.proto`, every `Cargo.toml`, and `Cargo.lock`. Tests, benches and
/// examples do not go into binaries and are skipped, as are the target
/// directory and hidden directories.
fn newest_source(workspace: &Path, target_dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack = vec![workspace.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                let skipped = name.starts_with('.')
                    || path == target_dir
                    || ["target", "tests", "benches", "examples"].contains(&name.as_ref());
                if !skipped {
                    stack.push(path);
                }
                continue;
            }
            let relevant = name.ends_with(".rs")
                || name.ends_with(".proto")
                || name == "Cargo.toml"
                || name == "Cargo.lock";
            if relevant && let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_target_dir_and_profile() {
        let b = Binaries {
            workspace: "/w".into(),
            target_dir: "/w/target".into(),
            profile: Profile::Release,
        };
        assert_eq!(b.path("echo"), Path::new("/w/target/release/echo"));
    }

    #[test]
    fn sources_are_found_and_target_is_skipped() {
        let b = Binaries::default();
        let newest = newest_source(&b.workspace, &b.target_dir).expect("the workspace has sources");
        let this_file = fs::metadata(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/binaries.rs"))
            .and_then(|m| m.modified())
            .unwrap();
        assert!(newest >= this_file);
    }
}
