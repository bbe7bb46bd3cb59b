//! Local mode: each waypoint's objects as one file,
//! `<config-dir>/generated/waypoints/<namespace>/<gateway>.yaml`
//! (ServiceAccount, Deployment, Service, as rendered), written atomically
//! when its content changes and removed when the Gateway goes. A Gateway
//! that cannot be provisioned any more keeps its last good file, as a
//! cluster keeps the objects last applied. The local cluster runs a pod for
//! each Deployment; the directory source reads the ServiceAccount and the
//! Service back as cluster state (the index finds the waypoint's Service
//! there), and skips the Deployment (a kind the mesh does not read).
//!
//! The Gateway's status goes where the status writer puts the others',
//! `<config-dir>/generated/status/Gateway/<namespace>/<name>.yaml`
//! (apiVersion, kind, name, namespace and istiod-rs's part of `status`,
//! without lastTransitionTime), never read back as cluster state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use api::manifest::{ObjectKey, STATUS_DIR};
use serde_json::{Value, json};

use super::gateway_status::{self, GatewayStatus};
use super::{Plan, ProvisionError, ProvisionMetrics};
use crate::state::ClusterState;
use crate::state::directory::GENERATED_DIR;

/// Under the config directory: the provisioned waypoints.
pub const WAYPOINTS_DIR: &str = "waypoints";

/// Writes waypoints as files.
#[derive(Debug)]
pub struct DirectoryProvisioner {
    config_dir: PathBuf,
}

impl DirectoryProvisioner {
    pub fn new(config_dir: &Path) -> Self {
        DirectoryProvisioner {
            config_dir: config_dir.to_path_buf(),
        }
    }

    /// The file holding the objects of the waypoint Gateway `key`.
    pub fn path(&self, key: &ObjectKey) -> PathBuf {
        self.config_dir
            .join(GENERATED_DIR)
            .join(WAYPOINTS_DIR)
            .join(&key.namespace)
            .join(format!("{}.yaml", key.name))
    }

    /// The file holding the status of Gateway `key`.
    pub fn status_path(&self, key: &ObjectKey) -> PathBuf {
        self.status_dir()
            .join(&key.namespace)
            .join(format!("{}.yaml", key.name))
    }

    fn status_dir(&self) -> PathBuf {
        self.config_dir.join(STATUS_DIR).join("Gateway")
    }

    /// Writes what differs from `plan`, removes what is no longer in it;
    /// the errors of failed writes.
    pub fn sync(
        &mut self,
        state: &ClusterState,
        plan: &Plan,
        metrics: &ProvisionMetrics,
    ) -> Vec<ProvisionError> {
        let mut errors = Vec::new();
        for waypoint in plan.values() {
            let mut failed = None;
            if let Ok(rendered) = &waypoint.rendered {
                let text = objects_text(&waypoint.key, &rendered.objects);
                failed = text
                    .and_then(|text| write_if_changed(&self.path(&waypoint.key), &text, metrics))
                    .err();
            }
            let status = gateway_status::desired(state, waypoint, failed.as_ref());
            errors.extend(failed);
            let written = status_text(&waypoint.key, &status).and_then(|text| {
                write_if_changed(&self.status_path(&waypoint.key), &text, metrics)
            });
            errors.extend(written.err());
        }
        let keys: BTreeSet<&ObjectKey> = plan.keys().collect();
        for dir in [
            self.config_dir.join(GENERATED_DIR).join(WAYPOINTS_DIR),
            self.status_dir(),
        ] {
            errors.extend(remove_others(&dir, &keys));
        }
        errors
    }
}

/// Writes `path` (atomically) unless it already holds `text`.
pub(super) fn write_if_changed(
    path: &Path,
    text: &str,
    metrics: &ProvisionMetrics,
) -> Result<(), ProvisionError> {
    if std::fs::read(path).is_ok_and(|current| current == text.as_bytes()) {
        return Ok(());
    }
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| proxy_core::file::write_atomically(path, text.as_bytes(), 0o644));
    metrics.count("File", result.is_ok());
    result.map_err(|source| ProvisionError::File {
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn yaml(object: &str, value: &Value) -> Result<String, ProvisionError> {
    serde_saphyr::to_string(value).map_err(|e| ProvisionError::Encode {
        object: object.to_string(),
        reason: e.to_string(),
    })
}

fn objects_text(key: &ObjectKey, objects: &[Value]) -> Result<String, ProvisionError> {
    let mut text = format!(
        "# The waypoint of Gateway {key}, provisioned by istiod-rs (local mode) from\n# manifests/templates/waypoint.yaml; removed with the Gateway.\n"
    );
    for object in objects {
        text.push_str("---\n");
        text.push_str(&yaml(&super::describe(object), object)?);
    }
    Ok(text)
}

fn status_text(key: &ObjectKey, status: &GatewayStatus) -> Result<String, ProvisionError> {
    let document = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": gateway_status::status_json(status, &|_| None),
    });
    let object = format!("the status of Gateway {key}");
    Ok(format!(
        "# The status of Gateway {key}, written by istiod-rs (local mode); not cluster state.\n{}",
        yaml(&object, &document)?
    ))
}

/// Removes `<dir>/<namespace>/<name>.yaml` files of Gateways not in `keys`
/// (hidden files, such as a write in progress, are left alone).
pub(super) fn remove_others(dir: &Path, keys: &BTreeSet<&ObjectKey>) -> Vec<ProvisionError> {
    let mut errors = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(dir) else {
        return errors;
    };
    for namespace in namespaces.flatten() {
        let Some(ns) = namespace.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(files) = std::fs::read_dir(namespace.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".yaml"))
            else {
                continue;
            };
            if name.starts_with('.') || keys.contains(&ObjectKey::new(ns.as_str(), name)) {
                continue;
            }
            if let Err(source) = std::fs::remove_file(&path) {
                errors.push(ProvisionError::File { path, source });
            }
        }
    }
    errors
}
