//! The directory istiod-rs reads with `--config-dir`: one YAML file per
//! object. Syncing writes only files whose content changed (a watcher then
//! sees only real changes) and removes files of deleted objects; each write
//! is a rename of a complete temporary file, so a reader never sees half an
//! object. `generated/` below it belongs to istiod-rs and is left alone.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::run::{RunError, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum ConfigDirError {
    #[error(transparent)]
    Write(#[from] RunError),
    #[error("could not {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: Vec<String>,
    pub removed: Vec<String>,
}

/// A config directory and what this writer last put in it.
#[derive(Debug)]
pub struct ConfigDir {
    path: PathBuf,
    written: BTreeMap<String, String>,
}

impl ConfigDir {
    /// Creates the directory (and `generated/`).
    pub fn create(path: &Path) -> Result<ConfigDir, ConfigDirError> {
        let generated = path.join("generated");
        fs::create_dir_all(&generated).map_err(|source| ConfigDirError::Io {
            what: "create",
            path: generated,
            source,
        })?;
        Ok(ConfigDir {
            path: path.to_path_buf(),
            written: BTreeMap::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where istiod-rs writes the objects it provisions (waypoint Deployments...).
    pub fn generated(&self) -> PathBuf {
        self.path.join("generated")
    }

    /// Makes the directory hold exactly `files` (file name -> YAML).
    pub fn sync(&mut self, files: &BTreeMap<String, String>) -> Result<SyncReport, ConfigDirError> {
        let mut report = SyncReport::default();
        for (name, yaml) in files {
            if self.written.get(name) != Some(yaml) {
                write_atomic(&self.path.join(name), yaml.as_bytes())?;
                self.written.insert(name.clone(), yaml.clone());
                report.written.push(name.clone());
            }
        }
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|n| !files.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            let path = self.path.join(&name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ConfigDirError::Io {
                        what: "remove",
                        path,
                        source,
                    });
                }
            }
            self.written.remove(&name);
            report.removed.push(name);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_writes_only_changes_and_removes_deleted_objects() {
        let root = std::env::temp_dir().join(format!("meshe2e-configdir-{}", std::process::id()));
        let mut dir = ConfigDir::create(&root).unwrap();
        let mut files = BTreeMap::from([
            ("a.yaml".to_string(), "a: 1\n".to_string()),
            ("b.yaml".to_string(), "b: 1\n".to_string()),
        ]);
        assert_eq!(dir.sync(&files).unwrap().written, vec!["a.yaml", "b.yaml"]);
        files.insert("b.yaml".into(), "b: 2\n".into());
        files.remove("a.yaml");
        let report = dir.sync(&files).unwrap();
        assert_eq!(report.written, vec!["b.yaml"]);
        assert_eq!(report.removed, vec!["a.yaml"]);
        assert_eq!(dir.sync(&files).unwrap(), SyncReport::default());
        let mut on_disk: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, vec!["b.yaml", "generated"]);
        assert_eq!(fs::read_to_string(root.join("b.yaml")).unwrap(), "b: 2\n");
        fs::remove_dir_all(&root).unwrap();
    }
}
