//! Install values: the settings the install manifests take (`${key}` in
//! manifests/install/), their defaults, and how `--set key=value` and
//! `-f values.yaml` change them.
//!
//! The set of keys is fixed and every value is checked against what its
//! place in the manifests accepts, before anything is rendered: a value
//! can only ever be a scalar of a small alphabet, so it cannot change the
//! YAML structure it is put into, and a typo in a key is an error naming it
//! (with the keys that exist) rather than a setting silently ignored.

use std::collections::BTreeMap;

use serde_json::Value;

/// One setting.
#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    check: Check,
}

/// What a value must look like.
#[derive(Debug)]
enum Check {
    /// An image repository prefix: `registry.example.com:5000/team`.
    ImageRepository,
    /// A Docker image tag.
    ImageTag,
    OneOf(&'static [&'static str]),
    /// A tracing filter: `info`, `warn,istiod_rs=debug`.
    LogFilter,
    /// A DNS name.
    DnsName,
    /// `host:port`, the host a DNS name or an IPv4 address.
    HostPort,
    /// A whole number in a range.
    Count {
        min: u32,
        max: u32,
    },
    /// An absolute path on the node.
    HostPath,
    /// Namespace names, comma-separated.
    Namespaces,
}

/// Every setting, with its default.
pub const KEYS: &[Key] = &[
    Key {
        name: "hub",
        default: "istio-rs",
        help: "image repository: the images are <hub>/istiod-rs:<tag> and <hub>/ztunnel-rs:<tag>",
        check: Check::ImageRepository,
    },
    Key {
        name: "tag",
        default: env!("CARGO_PKG_VERSION"),
        help: "image tag (default: this istioctl-rs's version)",
        check: Check::ImageTag,
    },
    Key {
        name: "imagePullPolicy",
        default: "IfNotPresent",
        help: "Always, IfNotPresent or Never",
        check: Check::OneOf(&["Always", "IfNotPresent", "Never"]),
    },
    Key {
        name: "logLevel",
        default: "info",
        help: "log filter of every component (RUST_LOG), e.g. info or warn,istiod_rs=debug",
        check: Check::LogFilter,
    },
    Key {
        name: "trustDomain",
        default: api::labels::DEFAULT_TRUST_DOMAIN,
        help: "the mesh's SPIFFE trust domain",
        check: Check::DnsName,
    },
    Key {
        name: "ztunnel.xdsAddress",
        default: "istiod.istio-system.svc:15012",
        help: "host:port ztunnel-rs reaches istiod-rs's xDS and CA at (TLS, verified as istiod.istio-system.svc whatever the host); an IP address where the cluster has no DNS",
        check: Check::HostPort,
    },
    Key {
        name: "ztunnel.terminationGracePeriodSeconds",
        default: "30",
        help: "seconds a replaced ztunnel-rs pod may drain before it is killed; ztunnel-rs keeps live connections for this less 5 s (upstream's TERMINATION_GRACE_PERIOD_SECONDS), so raise it to carry longer connections across an upgrade",
        check: Check::Count {
            min: 1,
            max: 86_400,
        },
    },
    Key {
        name: "waypoint.xdsAddress",
        default: "istiod.istio-system.svc:15012",
        help: "host:port the waypoints istiod-rs provisions reach its xDS and CA at (TLS, verified as istiod.istio-system.svc whatever the host); an IP address where the cluster has no DNS",
        check: Check::HostPort,
    },
    Key {
        name: "istiod.replicas",
        default: "1",
        help: "istiod-rs replicas",
        check: Check::Count { min: 1, max: 100 },
    },
    Key {
        name: "cni.binDir",
        default: "/opt/cni/bin",
        help: "the nodes' CNI binary directory (where istio-cni-rs is copied)",
        check: Check::HostPath,
    },
    Key {
        name: "cni.confDir",
        default: "/etc/cni/net.d",
        help: "the nodes' CNI configuration directory (where istio-cni-rs is chained)",
        check: Check::HostPath,
    },
    Key {
        name: "cni.excludeNamespaces",
        default: "kube-system",
        help: "namespaces whose pods start without the node agent, comma-separated",
        check: Check::Namespaces,
    },
];

/// Why a value was refused. Each names the key, the value and where it
/// came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValuesError {
    #[error("{origin}: unknown value `{key}`; the values are: {}", known())]
    UnknownKey { key: String, origin: String },
    #[error("{origin}: `{key}` = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        origin: String,
        reason: String,
    },
    #[error("--set {arg:?}: expected key=value, e.g. --set tag=0.1.0")]
    NotKeyValue { arg: String },
    #[error("{origin}: {reason}")]
    File { origin: String, reason: String },
}

fn known() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// The values an install is rendered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Values {
    values: BTreeMap<&'static str, String>,
}

impl Default for Values {
    fn default() -> Self {
        Values {
            values: KEYS
                .iter()
                .map(|k| (k.name, k.default.to_string()))
                .collect(),
        }
    }
}

impl Values {
    /// The value of `key`, when it is one.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Sets `key` after checking `value`; `origin` says where it came from
    /// (`--set`, a file name).
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), ValuesError> {
        let Some(spec) = KEYS.iter().find(|k| k.name == key) else {
            return Err(ValuesError::UnknownKey {
                key: key.to_string(),
                origin: origin.to_string(),
            });
        };
        spec.check
            .check(value)
            .map_err(|reason| ValuesError::Invalid {
                key: key.to_string(),
                value: value.to_string(),
                origin: origin.to_string(),
                reason,
            })?;
        self.values.insert(spec.name, value.to_string());
        Ok(())
    }

    /// One `--set key=value`.
    pub fn set_arg(&mut self, arg: &str) -> Result<(), ValuesError> {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(ValuesError::NotKeyValue {
                arg: arg.to_string(),
            });
        };
        self.set(key.trim(), value.trim(), "--set")
    }

    /// The values of a YAML file (`-f`): nested mappings name the keys
    /// (`istiod: {replicas: 2}` is `istiod.replicas`); a list is a
    /// comma-separated value.
    pub fn merge_file(&mut self, origin: &str, text: &str) -> Result<(), ValuesError> {
        let file_error = |reason: String| ValuesError::File {
            origin: origin.to_string(),
            reason,
        };
        let value: Value = serde_saphyr::from_str(text).map_err(|e| file_error(e.to_string()))?;
        let mut flat = Vec::new();
        match value {
            Value::Object(map) => flatten("", &map, &mut flat).map_err(file_error)?,
            Value::Null => {}
            _ => {
                return Err(file_error(
                    "not a mapping of values; write e.g. `tag: 0.1.0`".into(),
                ));
            }
        }
        for (key, value) in flat {
            self.set(&key, &value, origin)?;
        }
        Ok(())
    }

    /// Every key with its value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.values.iter().map(|(k, v)| (*k, v.as_str()))
    }
}

/// `map`'s scalars as dotted keys.
fn flatten(
    prefix: &str,
    map: &serde_json::Map<String, Value>,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    for (key, value) in map {
        let key = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Object(inner) => flatten(&key, inner, out)?,
            Value::Array(items) => {
                let items: Result<Vec<String>, String> = items
                    .iter()
                    .map(|i| {
                        scalar(i).ok_or_else(|| {
                            format!("`{key}`: a list of lists or mappings; list plain values")
                        })
                    })
                    .collect();
                out.push((key, items?.join(",")));
            }
            other => match scalar(other) {
                Some(text) => out.push((key, text)),
                None => return Err(format!("`{key}` has no value")),
            },
        }
    }
    Ok(())
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Check {
    fn check(&self, value: &str) -> Result<(), String> {
        let only = |allowed: &dyn Fn(char) -> bool, what: &str| only(value, allowed, what);
        match self {
            Check::ImageRepository => {
                only(
                    &|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c),
                    "an image repository (lowercase letters, digits, . _ - / :)",
                )?;
                if value.ends_with('/') || value.starts_with('/') {
                    return Err("an image repository neither starts nor ends with /".into());
                }
                Ok(())
            }
            Check::ImageTag => {
                only(
                    &|c| c.is_ascii_alphanumeric() || "._-".contains(c),
                    "an image tag (letters, digits, . _ -)",
                )?;
                if value.len() > 128 || value.starts_with(['.', '-']) {
                    return Err(
                        "an image tag is at most 128 characters and starts with a letter, digit or _"
                            .into(),
                    );
                }
                Ok(())
            }
            Check::OneOf(allowed) => {
                if allowed.contains(&value) {
                    Ok(())
                } else {
                    Err(format!("must be one of {}", allowed.join(", ")))
                }
            }
            Check::LogFilter => only(
                &|c| c.is_ascii_alphanumeric() || "_=,:.-".contains(c),
                "a log filter (e.g. info or warn,istiod_rs=debug)",
            ),
            Check::DnsName => dns_name(value),
            Check::HostPort => {
                let Some((host, port)) = value.rsplit_once(':') else {
                    return Err(
                        "host:port, e.g. istiod.istio-system.svc:15012 or 10.96.0.20:15012".into(),
                    );
                };
                if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                    return Err(format!("port {port:?} is not a number from 1 to 65535"));
                }
                if host.parse::<std::net::Ipv4Addr>().is_ok() {
                    return Ok(());
                }
                dns_name(host).map_err(|e| format!("host {host:?}: {e}"))
            }
            Check::Count { min, max } => match value.parse::<u32>() {
                Ok(n) if (*min..=*max).contains(&n) => Ok(()),
                _ => Err(format!("a whole number from {min} to {max}")),
            },
            Check::HostPath => {
                only(
                    &|c| c.is_ascii_alphanumeric() || "/._-".contains(c),
                    "a path (letters, digits, / . _ -)",
                )?;
                if !value.starts_with('/') || value.split('/').any(|p| p == "..") {
                    return Err("an absolute path on the node, without ..".into());
                }
                Ok(())
            }
            Check::Namespaces => {
                if value.is_empty() {
                    return Ok(());
                }
                for name in value.split(',') {
                    let valid = !name.is_empty()
                        && name.len() <= 63
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !name.starts_with('-')
                        && !name.ends_with('-');
                    if !valid {
                        return Err(format!(
                            "{name:?} is not a namespace name (lowercase letters, digits, -)"
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// `value` is not empty and made only of `allowed` characters (`what` names them).
fn only(value: &str, allowed: &dyn Fn(char) -> bool, what: &str) -> Result<(), String> {
    if value.is_empty() {
        Err(format!("empty; give {what}"))
    } else if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        Err(format!("{c:?} is not allowed in {what}"))
    } else {
        Ok(())
    }
}

/// A DNS name: lowercase labels of 1 to 63 characters.
fn dns_name(value: &str) -> Result<(), String> {
    only(
        value,
        &|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c),
        "a DNS name (lowercase letters, digits, . -)",
    )?;
    if value
        .split('.')
        .any(|l| l.is_empty() || l.len() > 63 || l.starts_with('-') || l.ends_with('-'))
    {
        return Err(
            "not a DNS name: labels of 1 to 63 characters, not starting or ending with -".into(),
        );
    }
    Ok(())
}

/// The values, their defaults and what they do, for `--help`.
pub fn help() -> String {
    let mut text = String::from(
        "Values (--set key=value, or -f FILE with `key: value` / nested `a: {b: value}`):\n",
    );
    for key in KEYS {
        text.push_str(&format!(
            "  {:<24} {} [default: {}]\n",
            key.name, key.help, key.default
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_their_own_checks() {
        for key in KEYS {
            key.check
                .check(key.default)
                .unwrap_or_else(|e| panic!("{}: {e}", key.name));
        }
        assert_eq!(
            Values::default().get("tag"),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn set_then_file_merge_and_the_last_word_wins() {
        let mut values = Values::default();
        values
            .merge_file(
                "values.yaml",
                "hub: registry.example.com:5000/mesh\nistiod:\n  replicas: 3\ncni:\n  excludeNamespaces: [kube-system, monitoring]\n",
            )
            .unwrap();
        values.set_arg("tag=1.2.3-rc.1").unwrap();
        values.set_arg("istiod.replicas = 2").unwrap();
        assert_eq!(values.get("hub"), Some("registry.example.com:5000/mesh"));
        assert_eq!(values.get("istiod.replicas"), Some("2"));
        assert_eq!(values.get("tag"), Some("1.2.3-rc.1"));
        assert_eq!(
            values.get("cni.excludeNamespaces"),
            Some("kube-system,monitoring")
        );
        assert_eq!(values.get("logLevel"), Some("info"));
    }

    #[test]
    fn unknown_keys_are_named_with_the_known_ones() {
        let mut values = Values::default();
        let err = values.set_arg("istiod.replica=2").unwrap_err();
        assert_eq!(
            err,
            ValuesError::UnknownKey {
                key: "istiod.replica".into(),
                origin: "--set".into()
            }
        );
        let message = err.to_string();
        assert!(message.contains("`istiod.replica`"), "{message}");
        assert!(message.contains("istiod.replicas"), "{message}");
        let err = values
            .merge_file("mine.yaml", "cni:\n  confdir: /etc/cni\n")
            .unwrap_err();
        assert_eq!(
            err,
            ValuesError::UnknownKey {
                key: "cni.confdir".into(),
                origin: "mine.yaml".into()
            }
        );
        assert_eq!(
            values,
            Values::default(),
            "nothing applied from a refused value"
        );
    }

    #[test]
    fn values_that_could_change_the_yaml_are_refused() {
        let mut values = Values::default();
        for (arg, says) in [
            ("tag=1.0\"\nkind: Secret", "not allowed in an image tag"),
            ("tag=", "empty"),
            ("hub=Registry/x", "not allowed in an image repository"),
            (
                "imagePullPolicy=Sometimes",
                "one of Always, IfNotPresent, Never",
            ),
            ("istiod.replicas=0", "from 1 to 100"),
            ("istiod.replicas=two", "from 1 to 100"),
            ("cni.binDir=opt/cni/bin", "absolute path"),
            ("cni.binDir=/opt/../etc", "without .."),
            ("cni.confDir=/etc/cni net.d", "not allowed in a path"),
            ("trustDomain=Example.ORG", "not allowed in a DNS name"),
            ("trustDomain=a..b", "not a DNS name"),
            (
                "cni.excludeNamespaces=kube-system,Bad",
                "not a namespace name",
            ),
            ("logLevel=info #x", "not allowed in a log filter"),
            ("ztunnel.xdsAddress=istiod", "host:port"),
            ("ztunnel.xdsAddress=10.96.0.20:0", "from 1 to 65535"),
            ("ztunnel.xdsAddress=10.96.0.20:http", "from 1 to 65535"),
            (
                "ztunnel.xdsAddress=istiod svc:15012",
                "not allowed in a DNS name",
            ),
            (
                "ztunnel.xdsAddress=[::1]:15012",
                "not allowed in a DNS name",
            ),
        ] {
            let err = values.set_arg(arg).unwrap_err().to_string();
            assert!(err.contains(says), "{arg}: {err}");
            let key = arg.split_once('=').unwrap().0;
            assert!(err.contains(&format!("`{key}`")), "{arg}: {err}");
        }
        assert!(matches!(
            values.set_arg("tag"),
            Err(ValuesError::NotKeyValue { .. })
        ));
        assert!(values.set_arg("cni.excludeNamespaces=").is_ok());
        values
            .set_arg("ztunnel.xdsAddress=10.96.0.20:15012")
            .unwrap();
        values
            .set_arg("ztunnel.xdsAddress=istiod.istio-system.svc.cluster.local:15012")
            .unwrap();
    }

    #[test]
    fn value_files_must_be_mappings_of_plain_values() {
        let mut values = Values::default();
        for (text, says) in [
            ("- tag\n", "not a mapping"),
            ("tag: [[1]]\n", "list plain values"),
            ("tag:\n", "has no value"),
            ("tag: [unclosed\n", ""),
        ] {
            let err = values.merge_file("v.yaml", text).unwrap_err().to_string();
            assert!(err.starts_with("v.yaml: "), "{err}");
            assert!(err.contains(says), "{text:?}: {err}");
        }
        values.merge_file("empty.yaml", "# nothing\n").unwrap();
        assert_eq!(values, Values::default());
    }
}
