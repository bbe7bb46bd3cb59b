//! The CNI network configuration files of a node, and istio-cni-rs's entry
//! in them: which file the container runtime uses, and that file with our
//! plugin chained in or taken out. Pure: bytes and names in, JSON out; the
//! installer does the reading and the atomic writes.
//!
//! Upstream's facts (istio/istio `cni/pkg/install/cniconfig.go`):
//! - the runtime uses the lexicographically first `*.conf` / `*.conflist`
//!   of the directory that loads (`getDefaultCNINetwork`, "the same
//!   semantics as kubelet"): a file that does not parse, a `.conf` without
//!   `type`, a `.conflist` without plugins are skipped;
//! - chaining appends the plugin to the list's `plugins`, replacing an entry
//!   of its type already there (`insertCNIConfig`);
//! - a `.conf` becomes a `.conflist` whose plugins are the original network
//!   (without its `cniVersion`) and the plugin, `cniVersion` 0.3.1.
//!
//! Where we differ: the converted list keeps the network's `name` (upstream
//! names it `k8s-pod-network`), since runtimes key their cached results by
//! it, and keeps the `.conf`'s `cniVersion` when istio-cni-rs speaks it; our
//! entry records the conversion, so taking the plugin out gives the `.conf`
//! back as it was (upstream leaves the `.conflist`).

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::node_agent::cni_plugin::SUPPORTED_VERSIONS;

/// Our entry's `type`: the binary the runtime runs.
pub const PLUGIN_TYPE: &str = "istio-cni-rs";
/// In our entry of a list made from a `.conf`: `{"file": <the .conf's
/// name>, "cniVersion": <its cniVersion, if it had one>}`.
const CONVERTED_FROM: &str = "istio_cni_rs_converted_from";
/// The list version a `.conf` older than 0.3.0 (no lists then) is put in.
const CONVERTED_LIST_VERSION: &str = "0.3.1";
/// A converted network without a name gets upstream's.
const DEFAULT_NETWORK_NAME: &str = "k8s-pod-network";

/// What a network configuration file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `*.conf`: one plugin.
    Conf,
    /// `*.conflist`: a list of plugins.
    Conflist,
}

impl Format {
    /// The format of a file the runtime reads, by name (libcni's
    /// `ConfFiles(dir, [".conf", ".conflist"])`).
    pub fn of(name: &str) -> Option<Format> {
        if name.ends_with(".conflist") {
            Some(Format::Conflist)
        } else if name.ends_with(".conf") {
            Some(Format::Conf)
        } else {
            None
        }
    }
}

/// A network configuration file that loads.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkFile {
    /// File name, within the configuration directory.
    pub name: String,
    pub format: Format,
    pub config: Map<String, Value>,
}

/// Why a file does not load: the runtime skips it, so do we.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unloadable {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no `type`; perhaps this is a .conflist?")]
    NoType,
    #[error("`plugins` is missing or empty")]
    NoPlugins,
    #[error("plugins[{0}] is not an object with a `type`")]
    BadPlugin(usize),
}

/// Why the plugin cannot be chained into the primary file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "cniVersion {version} is not one istio-cni-rs speaks ({}); every pod on the node would fail to start, so the plugin is not chained",
        SUPPORTED_VERSIONS.join(", ")
    )]
    UnsupportedVersion { version: String },
    #[error(
        "{conflist} exists next to it; the .conf would be turned into that file: remove one of the two"
    )]
    ConversionTarget { conflist: String },
}

impl NetworkFile {
    /// Parses a file as the runtime would.
    pub fn parse(name: &str, format: Format, bytes: &[u8]) -> Result<NetworkFile, Unloadable> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| Unloadable::NotJson(e.to_string()))?;
        let Value::Object(config) = value else {
            return Err(Unloadable::NotAnObject);
        };
        match format {
            Format::Conf => {
                if !config.get("type").is_some_and(Value::is_string) {
                    return Err(Unloadable::NoType);
                }
            }
            Format::Conflist => {
                let plugins = config
                    .get("plugins")
                    .and_then(Value::as_array)
                    .filter(|p| !p.is_empty())
                    .ok_or(Unloadable::NoPlugins)?;
                if let Some(i) = plugins
                    .iter()
                    .position(|p| !p.get("type").is_some_and(Value::is_string))
                {
                    return Err(Unloadable::BadPlugin(i));
                }
            }
        }
        Ok(NetworkFile {
            name: name.to_string(),
            format,
            config,
        })
    }

    /// Whether our plugin is in this file.
    pub fn has_plugin(&self) -> bool {
        self.plugins().iter().any(is_ours)
    }

    fn plugins(&self) -> &[Value] {
        self.config
            .get("plugins")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
}

/// A `*.conf` / `*.conflist` of the configuration directory: its name and
/// what it loads as.
pub type DirEntry = (String, Result<NetworkFile, Unloadable>);

/// The file the runtime uses: the first that loads, by name. `files` holds
/// every `*.conf` / `*.conflist` of the directory, loaded or not.
pub fn primary(files: &[DirEntry]) -> Option<&NetworkFile> {
    let mut loaded: Vec<&NetworkFile> = files.iter().filter_map(|(_, f)| f.as_ref().ok()).collect();
    loaded.sort_by(|a, b| a.name.cmp(&b.name));
    loaded.into_iter().next()
}

/// Our entry: what istio-cni-rs reads from its netconf
/// (`node_agent::cni_plugin`).
pub fn plugin_entry(agent_socket: &Path, exclude_namespaces: &[String]) -> Map<String, Value> {
    let Value::Object(entry) = json!({
        "type": PLUGIN_TYPE,
        "agent_socket": agent_socket,
        "exclude_namespaces": exclude_namespaces,
    }) else {
        unreachable!("json! of an object literal is an object")
    };
    entry
}

/// A file to write, and the file it replaces when the name changes.
#[derive(Clone, Debug, PartialEq)]
pub struct Rewrite {
    pub name: String,
    pub config: Map<String, Value>,
    /// Removed once `name` is written (a `.conf` turned into a `.conflist`,
    /// or back).
    pub replaces: Option<String>,
}

/// `file` with `entry` as its last plugin (a `.conf` becomes a list);
/// `None` when it already is exactly that. `existing` names the other files
/// of the directory, which a conversion must not overwrite.
pub fn chain(
    file: &NetworkFile,
    entry: &Map<String, Value>,
    existing: &[String],
) -> Result<Option<Rewrite>, ChainError> {
    match file.format {
        Format::Conflist => {
            check_version(file.config.get("cniVersion"))?;
            let mut ours = entry.clone();
            // A list we made from a .conf keeps saying so.
            if let Some(marker) = file
                .plugins()
                .iter()
                .filter(|p| is_ours(p))
                .find_map(|p| p.get(CONVERTED_FROM))
            {
                ours.insert(CONVERTED_FROM.into(), marker.clone());
            }
            let mut plugins: Vec<Value> = file
                .plugins()
                .iter()
                .filter(|p| !is_ours(p))
                .cloned()
                .collect();
            plugins.push(Value::Object(ours));
            if plugins == file.plugins() {
                return Ok(None);
            }
            let mut config = file.config.clone();
            config.insert("plugins".into(), Value::Array(plugins));
            Ok(Some(Rewrite {
                name: file.name.clone(),
                config,
                replaces: None,
            }))
        }
        Format::Conf => {
            let target = format!("{}list", file.name);
            if existing.contains(&target) {
                return Err(ChainError::ConversionTarget { conflist: target });
            }
            let version = file.config.get("cniVersion").cloned();
            let list_version = match version.as_ref().and_then(Value::as_str) {
                Some(v) if SUPPORTED_VERSIONS.contains(&v) => v.to_string(),
                None => CONVERTED_LIST_VERSION.to_string(),
                Some(v) if v.starts_with("0.1.") || v.starts_with("0.2.") => {
                    CONVERTED_LIST_VERSION.to_string()
                }
                Some(v) => {
                    return Err(ChainError::UnsupportedVersion {
                        version: v.to_string(),
                    });
                }
            };
            let mut network = file.config.clone();
            network.remove("cniVersion");
            let name = network
                .get("name")
                .cloned()
                .unwrap_or_else(|| DEFAULT_NETWORK_NAME.into());
            let mut ours = entry.clone();
            let mut marker = Map::new();
            marker.insert("file".into(), file.name.clone().into());
            if let Some(version) = version {
                marker.insert("cniVersion".into(), version);
            }
            ours.insert(CONVERTED_FROM.into(), Value::Object(marker));
            let Value::Object(config) = json!({
                "cniVersion": list_version,
                "name": name,
                "plugins": [Value::Object(network), Value::Object(ours)],
            }) else {
                unreachable!("json! of an object literal is an object")
            };
            Ok(Some(Rewrite {
                name: target,
                config,
                replaces: Some(file.name.clone()),
            }))
        }
    }
}

/// `file` without our plugin: the `.conf` it was made from when it is that
/// plus our plugin and nothing else, else the list without our entries.
/// `None` when our plugin is not in it.
pub fn unchain(file: &NetworkFile) -> Option<Rewrite> {
    if !file.has_plugin() {
        return None;
    }
    let marker = file
        .plugins()
        .iter()
        .filter(|p| is_ours(p))
        .find_map(|p| p.get(CONVERTED_FROM))
        .and_then(Value::as_object);
    let rest: Vec<Value> = file
        .plugins()
        .iter()
        .filter(|p| !is_ours(p))
        .cloned()
        .collect();
    if let (Some(marker), [Value::Object(network)]) = (marker, rest.as_slice())
        && let Some(original) = marker.get("file").and_then(Value::as_str)
        && Format::of(original) == Some(Format::Conf)
        && !original.contains('/')
    {
        let mut config = network.clone();
        if let Some(version) = marker.get("cniVersion") {
            config.insert("cniVersion".into(), version.clone());
        }
        return Some(Rewrite {
            name: original.to_string(),
            config,
            replaces: Some(file.name.clone()),
        });
    }
    let mut config = file.config.clone();
    config.insert("plugins".into(), Value::Array(rest));
    Some(Rewrite {
        name: file.name.clone(),
        config,
        replaces: None,
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn check_version(version: Option<&Value>) -> Result<(), ChainError> {
    match version.and_then(Value::as_str) {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => Ok(()),
        other => Err(ChainError::UnsupportedVersion {
            version: other.map_or_else(|| "(none)".to_string(), String::from),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, json: Value) -> NetworkFile {
        let format = Format::of(name).unwrap();
        NetworkFile::parse(name, format, json.to_string().as_bytes()).unwrap()
    }

    fn entry() -> Map<String, Value> {
        plugin_entry(
            Path::new("/var/run/istio-cni/pluginevent.sock"),
            &["kube-system".into()],
        )
    }

    #[test]
    fn files_load_as_the_runtime_loads_them() {
        let load = |name: &str, text: &str| {
            NetworkFile::parse(name, Format::of(name).unwrap(), text.as_bytes()).map(|_| ())
        };
        assert_eq!(load("a.conf", r#"{"type": "bridge"}"#), Ok(()));
        assert!(matches!(
            load("a.conf", "{not json"),
            Err(Unloadable::NotJson(_))
        ));
        assert_eq!(load("a.conf", "[]"), Err(Unloadable::NotAnObject));
        assert_eq!(
            load("a.conf", r#"{"plugins": [{"type": "bridge"}]}"#),
            Err(Unloadable::NoType)
        );
        assert_eq!(
            load("a.conflist", r#"{"plugins": []}"#),
            Err(Unloadable::NoPlugins)
        );
        assert_eq!(
            load("a.conflist", r#"{"plugins": [{"type": "x"}, {}]}"#),
            Err(Unloadable::BadPlugin(1))
        );
        assert_eq!(Format::of("10-x.conf"), Some(Format::Conf));
        assert_eq!(Format::of("10-x.conflist"), Some(Format::Conflist));
        assert_eq!(Format::of("10-x.json"), None);
        assert_eq!(Format::of(".10-x.conflist.tmp-4242"), None);
    }

    #[test]
    fn the_primary_is_the_first_file_that_loads() {
        let good = |n: &str| (n.to_string(), Ok(file(n, json!({"type": "bridge"}))));
        let files = vec![
            good("20-b.conf"),
            ("05-bad.conflist".to_string(), Err(Unloadable::NoPlugins)),
            good("10-a.conf"),
        ];
        assert_eq!(primary(&files).unwrap().name, "10-a.conf");
        assert_eq!(primary(&files[1..2]), None);
    }

    #[test]
    fn chaining_a_conflist_appends_once() {
        let list = file(
            "10-calico.conflist",
            json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
                   "plugins": [{"type": "calico"}, {"type": "portmap", "capabilities": {"portMappings": true}}]}),
        );
        let rewrite = chain(&list, &entry(), &[]).unwrap().unwrap();
        assert_eq!(rewrite.name, "10-calico.conflist");
        assert_eq!(rewrite.replaces, None);
        let plugins = rewrite.config["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], Value::Object(entry()));
        // Again: nothing to do.
        let chained = NetworkFile {
            config: rewrite.config,
            ..list.clone()
        };
        assert_eq!(chain(&chained, &entry(), &[]).unwrap(), None);
        // Another socket: our entry is replaced, still last.
        let other = plugin_entry(Path::new("/elsewhere.sock"), &[]);
        let again = chain(&chained, &other, &[]).unwrap().unwrap();
        let plugins = again.config["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], Value::Object(other));
        // Taken out: the original list.
        let out = unchain(&chained).unwrap();
        assert_eq!(out.config, list.config);
        assert_eq!(out.name, "10-calico.conflist");
        assert_eq!(unchain(&list), None);
    }

    #[test]
    fn a_conf_becomes_a_list_and_comes_back() {
        let original = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge",
                              "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}});
        let conf = file("10-bridge.conf", original.clone());
        let rewrite = chain(&conf, &entry(), &["10-bridge.conf".into()])
            .unwrap()
            .unwrap();
        assert_eq!(rewrite.name, "10-bridge.conflist");
        assert_eq!(rewrite.replaces.as_deref(), Some("10-bridge.conf"));
        assert_eq!(rewrite.config["cniVersion"], "0.4.0");
        assert_eq!(rewrite.config["name"], "bridge-net");
        let plugins = rewrite.config["plugins"].as_array().unwrap();
        let mut network = original.as_object().unwrap().clone();
        network.remove("cniVersion");
        assert_eq!(plugins[0], Value::Object(network));
        assert_eq!(plugins[1]["type"], PLUGIN_TYPE);

        let list = NetworkFile {
            name: rewrite.name.clone(),
            format: Format::Conflist,
            config: rewrite.config.clone(),
        };
        // Chaining the list again keeps it as it is (the marker too).
        assert_eq!(chain(&list, &entry(), &[]).unwrap(), None);
        let back = unchain(&list).unwrap();
        assert_eq!(back.name, "10-bridge.conf");
        assert_eq!(back.replaces.as_deref(), Some("10-bridge.conflist"));
        assert_eq!(Value::Object(back.config), original);
    }

    #[test]
    fn old_confs_are_listed_at_0_3_1_and_new_unknown_versions_are_refused() {
        let old = file(
            "10-x.conf",
            json!({"cniVersion": "0.2.0", "type": "bridge"}),
        );
        let rewrite = chain(&old, &entry(), &[]).unwrap().unwrap();
        assert_eq!(rewrite.config["cniVersion"], "0.3.1");
        assert_eq!(rewrite.config["name"], "k8s-pod-network");
        let list = NetworkFile {
            name: rewrite.name,
            format: Format::Conflist,
            config: rewrite.config,
        };
        assert_eq!(unchain(&list).unwrap().config, old.config);

        let future = file(
            "10-x.conf",
            json!({"cniVersion": "9.0.0", "type": "bridge"}),
        );
        assert_eq!(
            chain(&future, &entry(), &[]),
            Err(ChainError::UnsupportedVersion {
                version: "9.0.0".into()
            })
        );
        let list = file(
            "10-x.conflist",
            json!({"cniVersion": "9.0.0", "plugins": [{"type": "bridge"}]}),
        );
        assert!(chain(&list, &entry(), &[]).is_err());
        let clash = chain(&old, &entry(), &["10-x.conflist".into()]);
        assert_eq!(
            clash,
            Err(ChainError::ConversionTarget {
                conflist: "10-x.conflist".into()
            })
        );
    }

    #[test]
    fn a_converted_list_that_gained_plugins_stays_a_list() {
        let conf = file(
            "10-x.conf",
            json!({"cniVersion": "1.0.0", "type": "bridge"}),
        );
        let mut config = chain(&conf, &entry(), &[]).unwrap().unwrap().config;
        config["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({"type": "portmap"}));
        let list = NetworkFile {
            name: "10-x.conflist".into(),
            format: Format::Conflist,
            config,
        };
        let out = unchain(&list).unwrap();
        assert_eq!(out.name, "10-x.conflist");
        assert_eq!(out.replaces, None);
        assert_eq!(
            out.config["plugins"],
            json!([{"type": "bridge"}, {"type": "portmap"}])
        );
    }
}
