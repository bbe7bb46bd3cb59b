//! Local mode: each object's status as one YAML file,
//! `<config-dir>/generated/status/<Kind>/<namespace>/<name>.yaml`, holding
//! the object's apiVersion, kind, name and namespace and istiod-rs's part of
//! its `status` (no lastTransitionTime: a file changes only when the status
//! does). Files are replaced atomically (written beside, then renamed) and
//! removed when their object goes. The directory source never reads this
//! tree back as cluster state ([`api::manifest::STATUS_DIR`]); istiod-rs
//! reads back only the ServiceEntries' `status.addresses` at start, so that
//! their VIPs survive a restart ([`DirectoryStatus::recorded_addresses`]).

use std::path::{Path, PathBuf};

use api::crd::service_entry::ServiceEntryAddress;
use api::manifest::{Kind, ObjectKey, STATUS_DIR};
use serde_json::json;
use tracing::warn;

use crate::index::ip_allocate::Allocations;

use super::{ObjectStatus, StatusError, Statuses, status_json};
use crate::index::PolicyRef;

/// Writes statuses as files.
#[derive(Debug)]
pub struct DirectoryStatus {
    root: PathBuf,
}

impl DirectoryStatus {
    /// Statuses of the objects of `config_dir`, under its `generated/status/`.
    pub fn new(config_dir: &Path) -> Self {
        DirectoryStatus {
            root: config_dir.join(STATUS_DIR),
        }
    }

    /// The file holding `object`'s status.
    pub fn path(&self, object: &PolicyRef) -> PathBuf {
        self.root
            .join(object.kind.as_str())
            .join(&object.key.namespace)
            .join(format!("{}.yaml", object.key.name))
    }

    /// Brings the object's status file to `status`; true when it was written.
    pub fn apply(
        &mut self,
        object: &PolicyRef,
        status: &ObjectStatus,
    ) -> Result<bool, StatusError> {
        let text = render(object, status)?;
        let path = self.path(object);
        if std::fs::read(&path).is_ok_and(|current| current == text.as_bytes()) {
            return Ok(false);
        }
        write_atomically(&path, text.as_bytes()).map_err(|source| StatusError::File {
            path: path.clone(),
            source,
        })?;
        Ok(true)
    }

    /// The `status.addresses` of each ServiceEntry's file: the VIPs a
    /// previous run gave it (the directory source does not read this tree
    /// back, so these files are the record). A file that cannot be read is
    /// skipped: its entry then gets addresses anew.
    pub fn recorded_addresses(&self) -> Allocations {
        let mut out = Allocations::new();
        let dir = self.root.join(Kind::ServiceEntry.as_str());
        for namespace in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Some(ns) = namespace.file_name().to_str().map(str::to_string) else {
                continue;
            };
            for file in std::fs::read_dir(namespace.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = file.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".yaml"))
                    .filter(|n| !n.starts_with('.'))
                else {
                    continue;
                };
                let read = std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        serde_saphyr::from_str::<RecordedStatus>(&text).map_err(|e| e.to_string())
                    });
                match read {
                    Ok(r) if !r.status.addresses.is_empty() => {
                        out.insert(ObjectKey::new(ns.clone(), name), r.status.addresses);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        warn!(path = %path.display(), %error, "unreadable ServiceEntry status file: its addresses are allocated anew");
                    }
                }
            }
        }
        out
    }

    /// Removes the files of objects that are gone.
    pub(super) fn retain(&mut self, statuses: &Statuses) -> Vec<StatusError> {
        let mut errors = Vec::new();
        // Gateway statuses are the waypoint provisioner's
        // (crate::provision::directory).
        for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Gateway) {
            let Ok(namespaces) = std::fs::read_dir(self.root.join(kind.as_str())) else {
                continue;
            };
            for namespace in namespaces.flatten() {
                let Ok(files) = std::fs::read_dir(namespace.path()) else {
                    continue;
                };
                for file in files.flatten() {
                    let path = file.path();
                    let (Some(name), Some(ns)) = (
                        path.file_name()
                            .and_then(|n| n.to_str())
                            .and_then(|n| n.strip_suffix(".yaml")),
                        namespace.file_name().to_str().map(str::to_string),
                    ) else {
                        continue;
                    };
                    let object = PolicyRef {
                        kind,
                        key: ObjectKey::new(ns, name),
                    };
                    if name.starts_with('.') || statuses.contains_key(&object) {
                        continue;
                    }
                    if let Err(source) = std::fs::remove_file(&path) {
                        errors.push(StatusError::File { path, source });
                    }
                }
            }
        }
        errors
    }
}

/// What [`DirectoryStatus::recorded_addresses`] reads of a status file.
#[derive(serde::Deserialize)]
struct RecordedStatus {
    #[serde(default)]
    status: RecordedAddresses,
}

#[derive(Default, serde::Deserialize)]
struct RecordedAddresses {
    #[serde(default)]
    addresses: Vec<ServiceEntryAddress>,
}

fn render(object: &PolicyRef, status: &ObjectStatus) -> Result<String, StatusError> {
    let document = json!({
        "apiVersion": super::api_version(object.kind),
        "kind": object.kind.as_str(),
        "metadata": {"name": object.key.name, "namespace": object.key.namespace},
        "status": status_json(status, None, &|_, _| None),
    });
    let yaml = serde_saphyr::to_string(&document).map_err(|e| StatusError::Encode {
        object: object.clone(),
        reason: e.to_string(),
    })?;
    Ok(format!(
        "# The status of {object}, written by istiod-rs (local mode); not cluster state.\n{yaml}"
    ))
}

/// Writes `path` so that readers see the old content or the new, never a
/// part: a hidden file beside it, then a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("status");
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}
