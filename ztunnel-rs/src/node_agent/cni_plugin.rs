//! `istio-cni-rs`, the CNI plugin chained after the cluster's own CNI. It
//! speaks the CNI spec (env `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`; netconf JSON on stdin; result or
//! error JSON on stdout) and tells the node agent about each new sandbox.
//!
//! ADD returns `prevResult` unchanged once the agent has answered, so an
//! enrolled pod's containers only start once its traffic is captured. When the
//! agent cannot be reached the pod's enrolment cannot be known, and ADD fails
//! (the runtime retries) rather than letting the pod run uncaptured; only
//! namespaces listed in `exclude_namespaces` pass without asking. DEL always
//! succeeds, agent or not.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::cni_event::{self, CniPod, CniRequest, DEFAULT_CNI_EVENT_SOCKET};

/// CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes used here (spec: well-known codes; 100+ are the plugin's).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const ENROLMENT_FAILED: u32 = 100;
}

/// The plugin's own netconf keys, next to the spec's.
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    /// The node agent's socket.
    agent_socket: Option<PathBuf>,
    /// Pods of these namespaces are never captured and need no agent.
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    /// Seconds an ADD waits for the agent (which waits for ztunnel's Ack).
    agent_timeout_secs: Option<u64>,
}

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

/// Runs one plugin invocation; returns the process exit code.
pub fn main_with(
    env: &BTreeMap<String, String>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> i32 {
    let mut input = String::new();
    let read = stdin.read_to_string(&mut input);
    // Errors name the version the runtime asked for, if it said.
    let version = serde_json::from_str::<Value>(&input)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "1.0.0".to_string());
    let result = match read {
        Ok(_) => invoke(env, &input),
        Err(e) => Err(CniError::new(
            code::DECODE,
            "cannot read the netconf on stdin",
            e.to_string(),
        )),
    };
    match result {
        Ok(Some(output)) => {
            let _ = writeln!(stdout, "{output}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            1
        }
    }
}

fn invoke(env: &BTreeMap<String, String>, input: &str) -> Result<Option<Value>, CniError> {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Ok(Some(
            json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }),
        ));
    }
    let conf: NetConf = serde_json::from_str(input).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot parse the netconf on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CNI_EVENT_SOCKET));
    let timeout = Duration::from_secs(conf.agent_timeout_secs.unwrap_or(30));
    match command {
        "ADD" => add(env, &conf, &socket, timeout),
        "DEL" => {
            // Best effort: the agent may be gone (node teardown), and DEL must
            // succeed regardless; a sandbox it never hears of is swept later.
            if let Ok(Some(pod)) = pod_from_env(env, None) {
                let _ = cni_event::call(&socket, &CniRequest::Del(pod), Duration::from_secs(2));
            }
            Ok(None)
        }
        "CHECK" => check(env, &conf, &socket, timeout),
        "STATUS" => match cni_event::call(&socket, &CniRequest::Status, timeout) {
            Ok(reply) if reply.ok => Ok(None),
            Ok(reply) => Err(CniError::new(
                code::NOT_AVAILABLE,
                "the node agent is not ready",
                reply.error.unwrap_or_default(),
            )),
            Err(e) => Err(unreachable(code::NOT_AVAILABLE, &socket, e)),
        },
        // Nothing of ours outlives a sandbox except in the agent, which
        // sweeps sandboxes whose netns has gone.
        "GC" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

fn add(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    socket: &std::path::Path,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    let prev = require_prev_result(conf)?;
    ask_agent(
        env,
        conf,
        socket,
        timeout,
        CniRequest::Add,
        "could not set up",
    )?;
    Ok(Some(prev.clone()))
}

fn check(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    socket: &std::path::Path,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    require_prev_result(conf)?;
    ask_agent(
        env,
        conf,
        socket,
        timeout,
        CniRequest::Check,
        "found a problem with",
    )?;
    Ok(None)
}

/// Tells the agent about the sandbox in the environment, unless it is not a
/// Kubernetes pod or its namespace is excluded; fails unless the agent
/// answers ok.
fn ask_agent(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    socket: &std::path::Path,
    timeout: Duration,
    request: fn(CniPod) -> CniRequest,
    failure: &str,
) -> Result<(), CniError> {
    let Some(pod) = pod_from_env(env, conf.prev_result.as_ref())? else {
        // Not a Kubernetes pod: nothing of the mesh's to do.
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    let key = pod.key();
    let reply = cni_event::call(socket, &request(pod), timeout)
        .map_err(|e| unreachable(code::TRY_AGAIN_LATER, socket, e))?;
    if reply.ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::ENROLMENT_FAILED,
            format!("the node agent {failure} pod {key}"),
            reply.error.unwrap_or_default(),
        ))
    }
}

fn unreachable(code: u32, socket: &std::path::Path, e: std::io::Error) -> CniError {
    CniError::new(
        code,
        format!(
            "the node agent is unreachable at {}; refusing to let the pod run uncaptured",
            socket.display()
        ),
        format!("{e} (is `ztunnel-rs cni` running on this node?)"),
    )
}

fn require_prev_result(conf: &NetConf) -> Result<&Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "netconf has no prevResult",
            "istio-cni-rs must be chained after the cluster's CNI plugin in a .conflist",
        )
    })
}

/// The sandbox described by the environment; `None` when CNI_ARGS names no
/// Kubernetes pod.
fn pod_from_env(
    env: &BTreeMap<String, String>,
    prev: Option<&Value>,
) -> Result<Option<CniPod>, CniError> {
    let args: BTreeMap<&str, &str> = env
        .get("CNI_ARGS")
        .map(|a| a.split(';').filter_map(|kv| kv.split_once('=')).collect())
        .unwrap_or_default();
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        return Ok(None);
    };
    let required = |var: &str| {
        env.get(var)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("{var} is not set"),
                    "the container runtime must set it",
                )
            })
    };
    Ok(Some(CniPod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: args.get("K8S_POD_UID").map(|u| u.to_string()),
        container_id: required("CNI_CONTAINERID")?,
        netns: PathBuf::from(required("CNI_NETNS")?),
        ips: prev.map(prev_result_ips).transpose()?.unwrap_or_default(),
    }))
}

/// The addresses in a (0.3.0 or later) result's `ips[].address`, `a.b.c.d/len`.
fn prev_result_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = prev.get("ips").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    ips.iter()
        .map(|ip| {
            let address = ip.get("address").and_then(Value::as_str).unwrap_or("");
            let host = address.split('/').next().unwrap_or("");
            host.parse().map_err(|_| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult.ips[].address {address:?} is not an address/prefix"),
                    "the previous plugin's result is malformed",
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prev_result_ips_are_read_from_cidrs() {
        let prev = json!({ "ips": [ { "address": "10.1.2.3/24" }, { "address": "fd00::5/64" } ] });
        let ips = prev_result_ips(&prev).unwrap();
        assert_eq!(
            ips,
            vec![
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let bad = json!({ "ips": [ { "address": "nonsense/24" } ] });
        let err = prev_result_ips(&bad).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("prevResult.ips[].address"), "{err:?}");
    }

    #[test]
    fn cni_args_without_a_pod_are_not_ours() {
        let env = BTreeMap::from([("CNI_ARGS".to_string(), "IgnoreUnknown=1".to_string())]);
        assert_eq!(pod_from_env(&env, None).unwrap(), None);
        let env = BTreeMap::from([(
            "CNI_ARGS".to_string(),
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0".to_string(),
        )]);
        let err = pod_from_env(&env, None).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.msg.contains("CNI_CONTAINERID"), "{err:?}");
    }
}
