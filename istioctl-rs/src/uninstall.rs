//! `istioctl-rs uninstall`: deletes what `install` applied, found by the
//! label it put on everything ([`MANAGED_BY`]).
//!
//! 1. The workloads first (DaemonSets, Deployments), with foreground
//!    deletion, and a wait until they are gone: the node agent takes
//!    istio-cni-rs out of each node's CNI configuration when it stops and
//!    finds its DaemonSet being deleted, and it needs its RBAC to read it.
//! 2. Everything else, in the reverse of the install order.
//! 3. With `--purge` only: the CRDs (and every custom resource in them), the
//!    mesh root Secret and the namespace. Without it they stay, so a later
//!    install keeps the mesh's policies and identities.

use std::io::Write;
use std::time::Duration;

use kube::Client;

use crate::cluster::{self, ClusterError};
use crate::install::NAMESPACE;
use crate::manifest::{InstallKind, MANAGED_BY, managed_selector};
use crate::mesh_root;

#[derive(Clone, Debug)]
pub struct UninstallOptions {
    /// Also the CRDs, the mesh root and the namespace.
    pub purge: bool,
    /// How long to wait for the workloads to go.
    pub timeout: Duration,
    pub poll_interval: Duration,
}

impl Default for UninstallOptions {
    fn default() -> Self {
        UninstallOptions {
            purge: false,
            timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "still there after {timeout:?}: {}; their pods may be stuck terminating (kubectl -n {NAMESPACE} get pods)",
        pending.join(", ")
    )]
    Timeout {
        timeout: Duration,
        pending: Vec<String>,
    },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// An object found by its label.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    kind: InstallKind,
    namespace: Option<String>,
    name: String,
}

impl Found {
    fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// Deletes the mesh; returns what was deleted, in order.
pub async fn run<W: Write>(
    client: &Client,
    options: &UninstallOptions,
    out: &mut W,
) -> Result<Vec<String>, UninstallError> {
    let mut deleted = Vec::new();
    let workloads = [InstallKind::DaemonSet, InstallKind::Deployment];
    let mut gone_wait = Vec::new();
    for kind in workloads {
        for found in labelled(client, kind).await? {
            delete(client, &found, true, out, &mut deleted).await?;
            gone_wait.push(found);
        }
    }
    wait_gone(client, &gone_wait, options).await?;

    let purge_only = [
        InstallKind::Namespace,
        InstallKind::CustomResourceDefinition,
    ];
    for kind in InstallKind::ALL.iter().rev().copied() {
        if workloads.contains(&kind) || purge_only.contains(&kind) {
            continue;
        }
        for found in labelled(client, kind).await? {
            let is_root = kind == InstallKind::Secret && found.name == mesh_root::SECRET;
            if is_root && !options.purge {
                continue;
            }
            delete(client, &found, false, out, &mut deleted).await?;
        }
    }
    if options.purge {
        for kind in [
            InstallKind::CustomResourceDefinition,
            InstallKind::Namespace,
        ] {
            for found in labelled(client, kind).await? {
                delete(client, &found, false, out, &mut deleted).await?;
            }
        }
    } else {
        writeln!(
            out,
            "kept: the CustomResourceDefinitions (and the policies and routes in them), Secret {NAMESPACE}/{} (the mesh root) and Namespace {NAMESPACE}; `istioctl-rs uninstall --purge` deletes them too",
            mesh_root::SECRET
        )?;
    }
    writeln!(
        out,
        "istio-rs uninstalled ({} objects deleted)",
        deleted.len()
    )?;
    Ok(deleted)
}

async fn labelled(client: &Client, kind: InstallKind) -> Result<Vec<Found>, ClusterError> {
    let items = cluster::list(client, kind, None, &managed_selector()).await?;
    Ok(items
        .into_iter()
        // The API server filtered by label; check again rather than
        // delete anything a selector typo would match.
        .filter(|o| {
            o.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY))
                .is_some_and(|v| v == crate::manifest::MANAGED_BY_VALUE)
        })
        .map(|o| Found {
            kind,
            namespace: o.metadata.namespace.clone(),
            name: o.metadata.name.clone().unwrap_or_default(),
        })
        .collect())
}

async fn delete<W: Write>(
    client: &Client,
    found: &Found,
    foreground: bool,
    out: &mut W,
    deleted: &mut Vec<String>,
) -> Result<(), UninstallError> {
    cluster::delete(
        client,
        found.kind,
        found.namespace.as_deref(),
        &found.name,
        foreground,
    )
    .await?;
    writeln!(out, "deleted {}", found.describe())?;
    deleted.push(found.describe());
    Ok(())
}

async fn wait_gone(
    client: &Client,
    objects: &[Found],
    options: &UninstallOptions,
) -> Result<(), UninstallError> {
    let pending = cluster::wait_until(
        objects.to_vec(),
        options.timeout,
        options.poll_interval,
        async |found: &Found| {
            let object =
                cluster::get(client, found.kind, found.namespace.as_deref(), &found.name).await?;
            Ok(object.is_none())
        },
    )
    .await?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(UninstallError::Timeout {
            timeout: options.timeout,
            pending: pending.iter().map(Found::describe).collect(),
        })
    }
}
