//! The local cluster acting as a container runtime towards a chained CNI
//! plugin (the mesh's `istio-cni-rs`), per the CNI 1.0 specification: the
//! plugin runs in the node's network namespace with the `CNI_*` environment,
//! gets the network configuration on stdin with the previous plugin's result
//! in `prevResult` (here: the pod address the local cluster assigned), and
//! answers with a result (ADD) or an error object on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::netns::NetNs;
use crate::topology::PodNetwork;

/// The CNI specification version the local cluster speaks.
pub const CNI_VERSION: &str = "1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("could not run CNI plugin {plugin}: {source}")]
    Spawn {
        plugin: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} did not answer {command} within {timeout:?}")]
    Timeout {
        plugin: PathBuf,
        command: &'static str,
        timeout: Duration,
    },
    #[error("CNI plugin {plugin} failed {command} for pod {pod} (code {code}): {msg}{details}")]
    Plugin {
        plugin: PathBuf,
        command: &'static str,
        pod: String,
        code: u32,
        msg: String,
        details: String,
    },
    #[error(
        "CNI plugin {plugin} answered {command} with something that is not a CNI result: {reason}\nstdout: {stdout}\nstderr: {stderr}"
    )]
    BadOutput {
        plugin: PathBuf,
        command: &'static str,
        reason: String,
        stdout: String,
        stderr: String,
    },
}

/// The CNI operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
        }
    }
}

/// A chained plugin and its configuration.
#[derive(Clone, Debug)]
pub struct CniPlugin {
    /// The plugin binary; its directory is `CNI_PATH`.
    pub binary: PathBuf,
    /// The network name in the configuration.
    pub network: String,
    /// The plugin's own configuration keys (merged into the network configuration).
    pub config: Map<String, Value>,
}

/// Which pod an invocation is about.
#[derive(Clone, Debug)]
pub struct CniPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// The sandbox id (the runtime's container id).
    pub container_id: &'a str,
    pub network: &'a PodNetwork,
}

/// The CNI error object a plugin prints on failure.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CniErrorObject {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// The result the local cluster's own network setup produced: what a
/// plugin chained after it receives as `prevResult`.
pub fn prev_result(net: &PodNetwork) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "interfaces": [{ "name": "eth0", "sandbox": net.netns.path() }],
        "ips": [{ "address": net.cidr(), "gateway": net.gateway.to_string(), "interface": 0 }],
        "routes": [{ "dst": "0.0.0.0/0", "gw": net.gateway.to_string() }],
        "dns": {}
    })
}

/// The network configuration on the plugin's stdin.
pub fn network_config(plugin: &CniPlugin, prev: Option<&Value>) -> Value {
    let mut conf = Map::new();
    conf.insert("cniVersion".into(), CNI_VERSION.into());
    conf.insert("name".into(), plugin.network.clone().into());
    let kind = plugin
        .binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    conf.insert("type".into(), kind.into());
    for (k, v) in &plugin.config {
        conf.insert(k.clone(), v.clone());
    }
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    Value::Object(conf)
}

/// The `CNI_*` environment of an invocation.
pub fn environment(
    plugin: &CniPlugin,
    command: CniCommand,
    pod: &CniPod<'_>,
) -> Vec<(String, String)> {
    let dir = plugin
        .binary
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string();
    vec![
        ("CNI_COMMAND".into(), command.as_str().into()),
        ("CNI_CONTAINERID".into(), pod.container_id.into()),
        (
            "CNI_NETNS".into(),
            pod.network.netns.path().display().to_string(),
        ),
        ("CNI_IFNAME".into(), "eth0".into()),
        (
            "CNI_ARGS".into(),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.container_id, pod.uid
            ),
        ),
        ("CNI_PATH".into(), dir),
    ]
}

/// Invokes the plugin inside `node` (the runtime's namespace). ADD and CHECK
/// pass the pod's address as `prevResult`; ADD returns the plugin's result.
pub fn invoke(
    plugin: &CniPlugin,
    node: &NetNs,
    command: CniCommand,
    pod: &CniPod<'_>,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    let prev = prev_result(pod.network);
    let stdin = network_config(plugin, (command != CniCommand::Del).then_some(&prev)).to_string();
    let mut cmd: Command = node.command(&plugin.binary);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(environment(plugin, command, pod))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| CniError::Spawn {
        plugin: plugin.binary.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin that exits without reading stdin is its own error, seen below.
        let _ = pipe.write_all(stdin.as_bytes());
    }
    let out =
        crate::process::wait_with_timeout(child, timeout).ok_or_else(|| CniError::Timeout {
            plugin: plugin.binary.clone(),
            command: command.as_str(),
            timeout,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    parse_output(plugin, command, pod, out.status.success(), &stdout, &stderr)
}

fn parse_output(
    plugin: &CniPlugin,
    command: CniCommand,
    pod: &CniPod<'_>,
    success: bool,
    stdout: &str,
    stderr: &str,
) -> Result<Option<Value>, CniError> {
    let bad = |reason: String| CniError::BadOutput {
        plugin: plugin.binary.clone(),
        command: command.as_str(),
        reason,
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
    };
    if !success {
        let err: CniErrorObject = serde_json::from_str(stdout.trim())
            .map_err(|e| bad(format!("it failed without a CNI error object ({e})")))?;
        return Err(CniError::Plugin {
            plugin: plugin.binary.clone(),
            command: command.as_str(),
            pod: format!("{}/{}", pod.namespace, pod.name),
            code: err.code,
            msg: err.msg,
            details: if err.details.is_empty() {
                String::new()
            } else {
                format!(" ({})", err.details)
            },
        });
    }
    match command {
        CniCommand::Add => {
            let result: Value =
                serde_json::from_str(stdout.trim()).map_err(|e| bad(e.to_string()))?;
            if result.get("cniVersion").is_none() {
                return Err(bad("the result has no cniVersion".into()));
            }
            Ok(Some(result))
        }
        CniCommand::Del | CniCommand::Check => Ok(None),
    }
}

#[cfg(test)]
mod tests;
