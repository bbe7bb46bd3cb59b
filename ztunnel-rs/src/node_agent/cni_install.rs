//! The CNI installer the node agent runs (upstream's install-cni,
//! istio/istio `cni/pkg/install`): it copies `istio-cni-rs` into the node's
//! CNI binary directory and chains it into the configuration the container
//! runtime uses, keeps it there while the agent runs, and takes both out
//! again when the mesh is uninstalled.
//!
//! - The binary is replaced atomically (a temporary name in the same
//!   directory, then a rename), and only when its bytes differ.
//! - The configuration is the first `*.conf` / `*.conflist` of the
//!   directory that loads ([`conflist::primary`]); until there is one the
//!   installer waits. A file that does not load is named in the log and
//!   left as it is.
//! - Each file is rewritten atomically the same way; the temporary name
//!   ends in neither `.conf` nor `.conflist`, so no runtime reads it. The binary goes in before the
//!   configuration that names it, and comes out after it.
//! - The directories are watched (inotify): when another CNI rewrites its
//!   file, or a new file takes the first place, the plugin is chained again
//!   (and taken out of a file that is no longer the primary).
//! - [`CniInstaller::uninstall`] removes our entry from every file of the
//!   directory (a `.conf` we turned into a list comes back as it was), then
//!   the binary. Whether to uninstall when the agent stops is the caller's
//!   decision ([`on_shutdown`]): upstream keeps the plugin through an
//!   upgrade or a reboot (pods then wait for the agent) and removes it when
//!   its DaemonSet is gone.

pub mod conflist;
mod watch;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use conflist::{ChainError, DirEntry, Format, NetworkFile, Rewrite, Unloadable};

/// The plugin's file name in the CNI binary directory: the netconf `type`.
pub const PLUGIN_BINARY: &str = conflist::PLUGIN_TYPE;

/// What the installer needs; from the node agent's flags.
#[derive(Clone, Debug)]
pub struct CniInstallConfig {
    /// The node's CNI configuration directory, as mounted here
    /// (upstream's `MOUNTED_CNI_NET_DIR`).
    pub conf_dir: PathBuf,
    /// The node's CNI binary directory, as mounted here.
    pub bin_dir: PathBuf,
    /// The `istio-cni-rs` binary to copy.
    pub plugin_binary: PathBuf,
    /// Chain into this file instead of the primary (upstream's
    /// `CNI_CONF_NAME`).
    pub conf_name: Option<String>,
    /// Where the plugin reaches the agent, as the runtime (on the host)
    /// sees it.
    pub agent_socket: PathBuf,
    /// Namespaces whose pods the plugin lets through without the agent.
    pub exclude_namespaces: Vec<String>,
}

/// Errors installing or removing the plugin. Each names the file and what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum CniInstallError {
    #[error("could not read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("could not write {}: {source}; is the host directory mounted writable?", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the CNI plugin binary {} is missing: {source} (it ships next to ztunnel-rs-cni; set --cni-plugin-binary)",
        path.display()
    )]
    PluginBinary { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Chain { path: PathBuf, source: ChainError },
    #[error("{}: {reason}; the file is left as it is: fix it, or unset --cni-conf-name", path.display())]
    Unloadable { path: PathBuf, reason: Unloadable },
    #[error("watching {}: {source}", path.display())]
    Watch { path: PathBuf, source: io::Error },
}

/// Where a pass of the installer left the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The plugin is chained into this file (a name in the directory).
    Chained(String),
    /// No configuration to chain into yet; these files do not load.
    Waiting { unloadable: Vec<(String, String)> },
}

/// Installs, keeps and removes the plugin on one node.
#[derive(Clone, Debug)]
pub struct CniInstaller {
    config: CniInstallConfig,
}

impl CniInstaller {
    pub fn new(config: CniInstallConfig) -> Self {
        CniInstaller { config }
    }

    pub fn config(&self) -> &CniInstallConfig {
        &self.config
    }

    /// One pass: the binary in place, the plugin chained into the primary
    /// file and into no other. Idempotent: writes only what differs.
    pub fn install(&self) -> Result<Installed, CniInstallError> {
        self.install_binary()?;
        let files = self.read_dir()?;
        let primary = match &self.config.conf_name {
            // A pinned `.conf` we turned into a list is found under its new
            // name (upstream's getCNIConfigFilepath does the same).
            Some(name) => match files
                .iter()
                .find(|(n, _)| n == name)
                .or_else(|| files.iter().find(|(n, _)| *n == format!("{name}list")))
            {
                Some((_, Ok(file))) => Some(file),
                Some((_, Err(reason))) => {
                    return Err(CniInstallError::Unloadable {
                        path: self.config.conf_dir.join(name),
                        reason: reason.clone(),
                    });
                }
                None => None,
            },
            None => conflist::primary(&files),
        };
        let Some(primary) = primary else {
            let unloadable = files
                .iter()
                .filter_map(|(n, f)| f.as_ref().err().map(|e| (n.clone(), e.to_string())))
                .collect();
            return Ok(Installed::Waiting { unloadable });
        };
        let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let entry =
            conflist::plugin_entry(&self.config.agent_socket, &self.config.exclude_namespaces);
        let chained = match conflist::chain(primary, &entry, &names) {
            Ok(Some(rewrite)) => {
                let name = rewrite.name.clone();
                self.write(&rewrite)?;
                info!(file = %self.config.conf_dir.join(&name).display(), "istio-cni-rs chained into the node's CNI configuration");
                name
            }
            Ok(None) => primary.name.clone(),
            Err(source) => {
                return Err(CniInstallError::Chain {
                    path: self.config.conf_dir.join(&primary.name),
                    source,
                });
            }
        };
        // A file that used to come first keeps no entry of ours.
        for (name, file) in &files {
            if *name == primary.name {
                continue;
            }
            if let Ok(file) = file
                && let Some(rewrite) = conflist::unchain(file)
            {
                info!(file = %self.config.conf_dir.join(name).display(), "istio-cni-rs taken out of a CNI configuration that is no longer the primary");
                self.write(&rewrite)?;
            }
        }
        Ok(Installed::Chained(chained))
    }

    /// Takes the plugin out of every configuration file of the directory,
    /// then removes the binary. Returns the files rewritten.
    pub fn uninstall(&self) -> Result<Vec<String>, CniInstallError> {
        let mut rewritten = Vec::new();
        for (name, file) in self.read_dir()? {
            if let Ok(file) = file
                && let Some(rewrite) = conflist::unchain(&file)
            {
                self.write(&rewrite)?;
                info!(file = %self.config.conf_dir.join(&name).display(), "istio-cni-rs taken out of the node's CNI configuration");
                rewritten.push(name);
            }
        }
        let binary = self.config.bin_dir.join(PLUGIN_BINARY);
        match fs::remove_file(&binary) {
            Ok(()) => info!(path = %binary.display(), "istio-cni-rs binary removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CniInstallError::Write {
                    path: binary,
                    source,
                });
            }
        }
        Ok(rewritten)
    }

    /// Installs, then keeps the plugin installed until `shutdown`: every
    /// change in either directory triggers another pass. `chained` is true
    /// while the plugin is chained. Returns when `shutdown` is cancelled;
    /// fails when a directory cannot be watched or written.
    pub async fn run(
        &self,
        chained: tokio::sync::watch::Sender<bool>,
        shutdown: CancellationToken,
    ) -> Result<(), CniInstallError> {
        let dirs = [&self.config.conf_dir, &self.config.bin_dir];
        let mut watch =
            watch::DirWatch::new(&dirs).map_err(|(path, source)| CniInstallError::Watch {
                path: path.to_path_buf(),
                source,
            })?;
        let mut last: Option<Installed> = None;
        loop {
            // Installing again needs the watch set up first, so that no
            // change made meanwhile is missed.
            let outcome = match self.install() {
                Ok(outcome) => outcome,
                // Someone else's file that does not load, or a version we do
                // not speak: wait for it to change.
                Err(e @ (CniInstallError::Chain { .. } | CniInstallError::Unloadable { .. })) => {
                    warn!("{e}");
                    chained.send_replace(false);
                    last = None;
                    tokio::select! {
                        r = watch.changed() => r.map_err(|source| CniInstallError::Watch { path: self.config.conf_dir.clone(), source })?,
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if last.as_ref() != Some(&outcome) {
                if let Installed::Waiting { unloadable } = &outcome {
                    warn!(
                        dir = %self.config.conf_dir.display(),
                        unloadable = ?unloadable,
                        "no CNI network configuration to chain istio-cni-rs into yet; waiting for the cluster's CNI to write one"
                    );
                }
                last = Some(outcome.clone());
            }
            chained.send_replace(matches!(outcome, Installed::Chained(_)));
            tokio::select! {
                r = watch.changed() => r.map_err(|source| CniInstallError::Watch { path: self.config.conf_dir.clone(), source })?,
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Every `*.conf` / `*.conflist` of the directory, loaded or not.
    fn read_dir(&self) -> Result<Vec<DirEntry>, CniInstallError> {
        let dir = &self.config.conf_dir;
        let read_error = |source| CniInstallError::Read {
            path: dir.clone(),
            source,
        };
        let mut names = BTreeSet::new();
        for entry in fs::read_dir(dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if Format::of(&name).is_some() && entry.file_type().is_ok_and(|t| !t.is_dir()) {
                names.insert(name);
            }
        }
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let format = Format::of(&name).expect("listed by format");
            let loaded = match fs::read(&path) {
                Ok(bytes) => NetworkFile::parse(&name, format, &bytes),
                // Gone since the listing: not a file of the directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CniInstallError::Read { path, source }),
            };
            if let Err(reason) = &loaded {
                warn!(file = %path.display(), %reason, "CNI configuration file does not load; the runtime skips it, and so does istio-cni-rs (it is left as it is)");
            }
            files.push((name, loaded));
        }
        Ok(files)
    }

    /// Writes a rewrite atomically, then removes the file it replaces.
    fn write(&self, rewrite: &Rewrite) -> Result<(), CniInstallError> {
        let mut bytes = serde_json::to_vec_pretty(&Value::Object(rewrite.config.clone()))
            .expect("a JSON map serialises");
        bytes.push(b'\n');
        let path = self.config.conf_dir.join(&rewrite.name);
        write_atomically(&path, &bytes, 0o644)?;
        if let Some(old) = &rewrite.replaces {
            let old = self.config.conf_dir.join(old);
            match fs::remove_file(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CniInstallError::Write { path: old, source }),
            }
        }
        Ok(())
    }

    /// The plugin binary in the node's directory, unless it is already
    /// there with the same bytes.
    fn install_binary(&self) -> Result<(), CniInstallError> {
        let source = &self.config.plugin_binary;
        let bytes = fs::read(source).map_err(|e| CniInstallError::PluginBinary {
            path: source.clone(),
            source: e,
        })?;
        let target = self.config.bin_dir.join(PLUGIN_BINARY);
        if fs::read(&target).is_ok_and(|current| current == bytes) {
            return Ok(());
        }
        write_atomically(&target, &bytes, 0o755)?;
        info!(path = %target.display(), "istio-cni-rs binary installed");
        Ok(())
    }
}

/// Writes a file so that the runtime reads the old one or the new one,
/// never a part (the temporary name ends in neither .conf nor .conflist).
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CniInstallError> {
    proxy_core::file::write_atomically(path, bytes, mode).map_err(|source| CniInstallError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// What to do with the plugin when the agent stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnShutdown {
    /// An upgrade or a reboot: the plugin stays, so pods created meanwhile
    /// wait for the next agent instead of starting uncaptured.
    Keep,
    /// The mesh may be being uninstalled (the DaemonSet could not be read,
    /// or there is no API to ask): take the plugin out, or every new pod on
    /// the node would fail to start; the running pods stay captured (fail
    /// closed: nothing says the mesh is leaving).
    Remove,
    /// The DaemonSet is gone or being deleted: the mesh is leaving the node.
    /// The plugin comes out and the running pods are released.
    Uninstall,
}

/// Upstream's `ShouldStopCleanup`: the agent's own DaemonSet still there and
/// not being deleted means the agent will be back. Without a Kubernetes
/// client (local mode) nothing says so.
pub async fn on_shutdown(
    client: Option<&kube::Client>,
    namespace: &str,
    daemonset: &str,
) -> OnShutdown {
    let Some(client) = client else {
        return OnShutdown::Remove;
    };
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), namespace);
    let found = api.get_opt(daemonset).await;
    let decision = decide_on_shutdown(&found);
    match &found {
        Ok(_) => {
            info!(%namespace, %daemonset, ?decision, "node agent stopping: CNI plugin decision from its DaemonSet");
        }
        Err(e) => {
            warn!(%namespace, %daemonset, error = %e, "node agent stopping and its DaemonSet cannot be read (may it get daemonsets?); taking the CNI plugin out");
        }
    }
    decision
}

/// [`on_shutdown`]'s decision from what the API server said.
pub fn decide_on_shutdown(found: &Result<Option<DaemonSet>, kube::Error>) -> OnShutdown {
    match found {
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_none() => OnShutdown::Keep,
        Ok(_) => OnShutdown::Uninstall,
        Err(_) => OnShutdown::Remove,
    }
}
