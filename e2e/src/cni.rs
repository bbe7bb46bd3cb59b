//! The harness acting as a container runtime towards CNI plugins, per the
//! CNI 1.0 specification: a plugin runs in the node's network namespace
//! with the `CNI_*` environment, gets its network configuration on stdin
//! with the previous plugin's result in `prevResult`, and answers with a
//! result (ADD) or an error object on stdout.
//!
//! Two callers: the local cluster chains one plugin (the mesh's
//! `istio-cni-rs`) after its own address set-up ([`invoke`], `prevResult`
//! = [`prev_result`]); the Kubernetes node runtime runs a whole network
//! configuration list as containerd/CRI-O do through libcni
//! ([`NetworkConfigList::load_dir`], [`run_chain`]): the lexicographically
//! first `.conf`/`.conflist`/`.json` of the node's CNI configuration
//! directory, each plugin found by its `type` in `CNI_PATH`, ADD in order
//! passing each result on as the next one's `prevResult`, DEL in reverse
//! order with the cached ADD result as `prevResult`.

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
    #[error("CNI configuration {file}: {reason}")]
    BadConfig { file: PathBuf, reason: String },
    #[error("CNI configuration directory {dir}: {source}")]
    ConfigDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI plugin type {kind:?} (network {network}) is not in CNI_PATH {cni_path}")]
    NoPlugin {
        kind: String,
        network: String,
        cni_path: String,
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

impl CniPlugin {
    /// The plugin's `type`: its binary's file name.
    fn kind(&self) -> String {
        self.binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Which pod (sandbox) an invocation is about.
#[derive(Clone, Debug)]
pub struct CniPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// The sandbox id (the runtime's container id).
    pub container_id: &'a str,
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: &'a Path,
    /// The interface to set up (`CNI_IFNAME`): `eth0`, or `lo` for loopback.
    pub ifname: &'a str,
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

/// One plugin's configuration on its stdin: the network's `cniVersion` and
/// `name` injected into the plugin's own keys, and `prevResult` when there
/// is one (libcni's `buildOneConfig`).
pub fn plugin_config(
    cni_version: &str,
    network: &str,
    plugin: &Map<String, Value>,
    prev: Option<&Value>,
) -> Value {
    let mut conf = plugin.clone();
    conf.insert("cniVersion".into(), cni_version.into());
    conf.insert("name".into(), network.into());
    match prev {
        Some(prev) => conf.insert("prevResult".into(), prev.clone()),
        None => conf.remove("prevResult"),
    };
    Value::Object(conf)
}

/// The network configuration on the plugin's stdin.
pub fn network_config(plugin: &CniPlugin, prev: Option<&Value>) -> Value {
    let mut own = plugin.config.clone();
    own.insert("type".into(), plugin.kind().into());
    plugin_config(CNI_VERSION, &plugin.network, &own, prev)
}

/// The `CNI_*` environment of an invocation.
pub fn environment(cni_path: &str, command: CniCommand, pod: &CniPod<'_>) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), command.as_str().into()),
        ("CNI_CONTAINERID".into(), pod.container_id.into()),
        ("CNI_NETNS".into(), pod.netns.display().to_string()),
        ("CNI_IFNAME".into(), pod.ifname.into()),
        (
            "CNI_ARGS".into(),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.container_id, pod.uid
            ),
        ),
        ("CNI_PATH".into(), cni_path.into()),
    ]
}

/// Invokes one plugin inside `node` (the runtime's namespace) with `prev`
/// as `prevResult`; ADD returns the plugin's result.
pub fn invoke(
    plugin: &CniPlugin,
    node: &NetNs,
    command: CniCommand,
    pod: &CniPod<'_>,
    prev: Option<&Value>,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    let stdin = network_config(plugin, prev);
    let cni_path = plugin
        .binary
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string();
    let cmd = node.command(&plugin.binary);
    exec_plugin(
        cmd,
        &plugin.binary,
        &cni_path,
        command,
        pod,
        &stdin,
        timeout,
    )
}

/// Runs one plugin: `cmd` starts it (in the node's namespace, perhaps
/// through a wrapper that execs it); the environment is cleared but for
/// `PATH` and the `CNI_*` variables; `stdin` is its configuration.
pub fn exec_plugin(
    mut cmd: Command,
    binary: &Path,
    cni_path: &str,
    command: CniCommand,
    pod: &CniPod<'_>,
    stdin: &Value,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(environment(cni_path, command, pod))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| CniError::Spawn {
        plugin: binary.to_path_buf(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin that exits without reading stdin is its own error, seen below.
        let _ = pipe.write_all(stdin.to_string().as_bytes());
    }
    let out =
        crate::process::wait_with_timeout(child, timeout).ok_or_else(|| CniError::Timeout {
            plugin: binary.to_path_buf(),
            command: command.as_str(),
            timeout,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    parse_output(binary, command, pod, out.status.success(), &stdout, &stderr)
}

fn parse_output(
    binary: &Path,
    command: CniCommand,
    pod: &CniPod<'_>,
    success: bool,
    stdout: &str,
    stderr: &str,
) -> Result<Option<Value>, CniError> {
    let bad = |reason: String| CniError::BadOutput {
        plugin: binary.to_path_buf(),
        command: command.as_str(),
        reason,
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
    };
    if !success {
        let err: CniErrorObject = serde_json::from_str(stdout.trim())
            .map_err(|e| bad(format!("it failed without a CNI error object ({e})")))?;
        return Err(CniError::Plugin {
            plugin: binary.to_path_buf(),
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

/// The extensions libcni's `ConfFiles` reads from a configuration directory.
const CONFIG_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// A network configuration list: what a runtime runs for every pod.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfigList {
    /// The file it was read from.
    pub file: PathBuf,
    pub cni_version: String,
    pub name: String,
    /// Each plugin's configuration (with its `type`), in order.
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfigList {
    /// The lexicographically first configuration file of `dir` (`.conf`,
    /// `.conflist` or `.json`, as libcni's `ConfFiles`), parsed; `None`
    /// when there is none yet (the node's network is not ready).
    pub fn load_dir(dir: &Path) -> Result<Option<NetworkConfigList>, CniError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CniError::ConfigDir {
                    dir: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
            })
            .collect();
        files.sort();
        let Some(file) = files.into_iter().next() else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&file).map_err(|source| CniError::ConfigDir {
            dir: file.clone(),
            source,
        })?;
        NetworkConfigList::parse(&file, &text).map(Some)
    }

    /// Parses a `.conflist`, or a single-plugin `.conf` (made a list of one).
    pub fn parse(file: &Path, text: &str) -> Result<NetworkConfigList, CniError> {
        let bad = |reason: String| CniError::BadConfig {
            file: file.to_path_buf(),
            reason,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad("not a JSON object".into()));
        };
        let text_field = |key: &str| -> Result<String, CniError> {
            obj.get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad(format!("field `{key}` is missing or not a string")))
        };
        let name = text_field("name")?;
        let cni_version = text_field("cniVersion")?;
        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Value::Object(m) => Ok(m.clone()),
                    _ => Err(bad(format!("plugins[{i}] is not an object"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(bad("field `plugins` is not a list".into())),
            // A `.conf`: the object is the one plugin.
            None => vec![obj.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("field `plugins` is empty".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(bad(format!("plugins[{i}].type is missing or not a string")));
            }
        }
        Ok(NetworkConfigList {
            file: file.to_path_buf(),
            cni_version,
            name,
            plugins,
        })
    }

    /// Plugin `i`'s `type`.
    pub fn kind(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Where a chain's plugins are found and how they are started.
pub trait PluginLauncher {
    /// `CNI_PATH` as the plugins see it (`:`-separated).
    fn cni_path(&self) -> String;
    /// The command that runs plugin `kind` (found in `CNI_PATH`) in the
    /// node's network namespace; `None` when no such plugin exists.
    fn command(&self, kind: &str) -> Option<(Command, PathBuf)>;
}

/// Runs a configuration list for a pod. ADD: each plugin in order, each
/// result the next one's `prevResult`; returns the last result. DEL: in
/// reverse order, each with `cached` (the ADD result) as `prevResult`;
/// every plugin is tried and the first error returned.
pub fn run_chain(
    list: &NetworkConfigList,
    launcher: &dyn PluginLauncher,
    command: CniCommand,
    pod: &CniPod<'_>,
    cached: Option<&Value>,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    let cni_path = launcher.cni_path();
    let launch = |i: usize| {
        let kind = list.kind(i);
        launcher.command(kind).ok_or_else(|| CniError::NoPlugin {
            kind: kind.to_string(),
            network: list.name.clone(),
            cni_path: cni_path.clone(),
        })
    };
    match command {
        CniCommand::Add | CniCommand::Check => {
            let mut prev: Option<Value> = if command == CniCommand::Check {
                cached.cloned()
            } else {
                None
            };
            for i in 0..list.plugins.len() {
                let (cmd, binary) = launch(i)?;
                let stdin = plugin_config(
                    &list.cni_version,
                    &list.name,
                    &list.plugins[i],
                    prev.as_ref(),
                );
                let out = exec_plugin(cmd, &binary, &cni_path, command, pod, &stdin, timeout)?;
                if command == CniCommand::Add {
                    prev = out;
                }
            }
            Ok(if command == CniCommand::Add {
                prev
            } else {
                None
            })
        }
        CniCommand::Del => {
            let mut first = None;
            for i in (0..list.plugins.len()).rev() {
                let ran = launch(i).and_then(|(cmd, binary)| {
                    let stdin =
                        plugin_config(&list.cni_version, &list.name, &list.plugins[i], cached);
                    exec_plugin(cmd, &binary, &cni_path, command, pod, &stdin, timeout)
                });
                if let Err(e) = ran {
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(None), Err)
        }
    }
}

#[cfg(test)]
mod tests;
