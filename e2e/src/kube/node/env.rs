//! A container's environment and command line, with kubelet's semantics:
//! the `kubernetes` Service's variables first (as kubelet's service
//! environment), then `envFrom`, then `env` in order, each value able to
//! refer to variables defined before it as `$(NAME)` (`$$` escapes a `$`);
//! `valueFrom` reads the downward API (`fieldRef`), ConfigMaps and Secrets.
//! `command` replaces the image's entrypoint and `args` its (empty) default
//! arguments, both expanded against the final environment.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("container {container}: {field}: {problem}")]
    Field {
        container: String,
        field: String,
        problem: String,
    },
}

/// Where `configMapKeyRef` / `secretKeyRef` / `envFrom` values come from
/// (the API server, for the runtime); `Ok(None)` when the object does not exist.
pub trait EnvSources {
    fn config_map(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String>;
    fn secret(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String>;
}

/// What the downward API knows about the pod beyond its spec.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    /// The `kubernetes` Service in `default`: its ClusterIP and port.
    pub kubernetes_service: Option<(Ipv4Addr, u16)>,
}

/// The default `PATH` of a container whose image sets none (containerd's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The container's environment, in order.
pub fn environment(
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
    sources: &mut dyn EnvSources,
) -> Result<Vec<(String, String)>, EnvError> {
    let bad = |field: String, problem: String| EnvError::Field {
        container: container.name.clone(),
        field,
        problem,
    };
    let mut env = OrderedEnv::default();
    env.set("PATH", DEFAULT_PATH);
    env.set("HOSTNAME", pod.metadata.name.as_deref().unwrap_or_default());
    if let Some((ip, port)) = facts.kubernetes_service {
        for (k, v) in kubernetes_service_env(ip, port) {
            env.set(&k, &v);
        }
    }
    for (i, from) in container.env_from.iter().flatten().enumerate() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(cm) = &from.config_map_ref {
            (
                "configMapRef",
                cm.name.clone(),
                cm.optional.unwrap_or(false),
                sources.config_map(&cm.name),
            )
        } else if let Some(s) = &from.secret_ref {
            (
                "secretRef",
                s.name.clone(),
                s.optional.unwrap_or(false),
                sources.secret(&s.name),
            )
        } else {
            return Err(bad(
                format!("envFrom[{i}]"),
                "names neither configMapRef nor secretRef".into(),
            ));
        };
        match data.map_err(|e| bad(format!("envFrom[{i}].{kind}"), e))? {
            Some(data) => {
                for (k, v) in data {
                    env.set(&format!("{prefix}{k}"), &v);
                }
            }
            None if optional => {}
            None => {
                return Err(bad(
                    format!("envFrom[{i}].{kind}"),
                    format!("{name:?} does not exist"),
                ));
            }
        }
    }
    for (i, var) in container.env.iter().flatten().enumerate() {
        let value = value_of(pod, var, facts, sources)
            .map_err(|problem| bad(format!("env[{i}] ({})", var.name), problem))?;
        if let Some(value) = value {
            let expanded = expand(&value, &env.as_map());
            env.set(&var.name, &expanded);
        }
    }
    Ok(env.into_vec())
}

/// The argv: `command` (or the image's entrypoint) and `args`, expanded.
pub fn argv(container: &Container, entrypoint: &str, env: &[(String, String)]) -> Vec<String> {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let mut argv: Vec<String> = match &container.command {
        Some(cmd) if !cmd.is_empty() => cmd.iter().map(|c| expand(c, &vars)).collect(),
        _ => vec![entrypoint.to_string()],
    };
    argv.extend(container.args.iter().flatten().map(|a| expand(a, &vars)));
    argv
}

/// kubelet's variables for the `kubernetes` Service (Docker-link style).
pub fn kubernetes_service_env(ip: Ipv4Addr, port: u16) -> Vec<(String, String)> {
    service_env(
        "kubernetes",
        ip,
        &[ServicePortVar {
            name: Some("https".into()),
            port,
            protocol: "TCP".into(),
        }],
    )
}

/// One port of a Service, as its environment variables name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortVar {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
}

/// kubelet's Docker-link style variables for a Service with a cluster IP
/// (what a pod created after the Service finds): `<NAME>_SERVICE_HOST`,
/// `<NAME>_SERVICE_PORT` (the first port), `<NAME>_SERVICE_PORT_<PORT NAME>`
/// per named port, `<NAME>_PORT` (the first port's URL) and
/// `<NAME>_PORT_<port>_<PROTO>` with `_PROTO`, `_PORT`, `_ADDR` per port;
/// the names upper-cased with `-` as `_`. Nothing for a Service without ports.
pub fn service_env(service: &str, ip: Ipv4Addr, ports: &[ServicePortVar]) -> Vec<(String, String)> {
    let upper = |s: &str| s.to_ascii_uppercase().replace('-', "_");
    let svc = upper(service);
    let Some(first) = ports.first() else {
        return Vec::new();
    };
    let url = |p: &ServicePortVar| format!("{}://{ip}:{}", p.protocol.to_ascii_lowercase(), p.port);
    let mut out = vec![
        (format!("{svc}_SERVICE_HOST"), ip.to_string()),
        (format!("{svc}_SERVICE_PORT"), first.port.to_string()),
    ];
    for p in ports {
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            out.push((
                format!("{svc}_SERVICE_PORT_{}", upper(name)),
                p.port.to_string(),
            ));
        }
    }
    out.push((format!("{svc}_PORT"), url(first)));
    for p in ports {
        let var = format!("{svc}_PORT_{}_{}", p.port, p.protocol.to_ascii_uppercase());
        out.push((var.clone(), url(p)));
        out.push((format!("{var}_PROTO"), p.protocol.to_ascii_lowercase()));
        out.push((format!("{var}_PORT"), p.port.to_string()));
        out.push((format!("{var}_ADDR"), ip.to_string()));
    }
    out
}

/// One `env` entry's value; `None` for an optional reference to nothing.
pub fn value_of(
    pod: &Pod,
    var: &EnvVar,
    facts: &PodFacts,
    sources: &mut dyn EnvSources,
) -> Result<Option<String>, String> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    if let Some(field) = &from.field_ref {
        return field_value(pod, &field.field_path, facts).map(Some);
    }
    if let Some(key) = &from.config_map_key_ref {
        return key_value(
            "configMapKeyRef",
            &key.name,
            &key.key,
            key.optional.unwrap_or(false),
            sources.config_map(&key.name),
        );
    }
    if let Some(key) = &from.secret_key_ref {
        return key_value(
            "secretKeyRef",
            &key.name,
            &key.key,
            key.optional.unwrap_or(false),
            sources.secret(&key.name),
        );
    }
    Err("valueFrom: only fieldRef, configMapKeyRef and secretKeyRef are supported by the node runtime".into())
}

fn key_value(
    kind: &str,
    name: &str,
    key: &str,
    optional: bool,
    data: Result<Option<BTreeMap<String, String>>, String>,
) -> Result<Option<String>, String> {
    let data = data.map_err(|e| format!("valueFrom.{kind}: {e}"))?;
    match data.as_ref().and_then(|d| d.get(key)) {
        Some(v) => Ok(Some(v.clone())),
        None if optional => Ok(None),
        None if data.is_none() => Err(format!("valueFrom.{kind}: {name:?} does not exist")),
        None => Err(format!("valueFrom.{kind}: {name:?} has no key {key:?}")),
    }
}

/// A downward-API field (`fieldRef.fieldPath`).
pub fn field_value(pod: &Pod, path: &str, facts: &PodFacts) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels", meta.labels.as_ref()) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations", meta.annotations.as_ref()) {
        return Ok(v);
    }
    let pod_ip = || facts.pod_ip.map(|ip| ip.to_string()).unwrap_or_default();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => pod_ip(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_string(),
        other => {
            return Err(format!(
                "fieldRef.fieldPath {other:?} is not supported (metadata.name, metadata.namespace, \
                 metadata.uid, metadata.labels['k'], metadata.annotations['k'], spec.nodeName, \
                 spec.serviceAccountName, status.podIP(s), status.hostIP(s))"
            ));
        }
    })
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an
/// undefined reference is left as written, `$$` is a literal `$`.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                    continue;
                }
                b'(' => {
                    if let Some(end) = input[i + 2..].find(')') {
                        let name = &input[i + 2..i + 2 + end];
                        match vars.get(name) {
                            Some(v) => out.push_str(v),
                            None => out.push_str(&input[i..i + 3 + end]),
                        }
                        i += 3 + end;
                        continue;
                    }
                }
                _ => {}
            }
        }
        let ch = input[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Variables in definition order; redefining keeps the first position.
#[derive(Default)]
struct OrderedEnv {
    order: Vec<String>,
    values: BTreeMap<String, String>,
}

impl OrderedEnv {
    fn set(&mut self, k: &str, v: &str) {
        if self.values.insert(k.to_string(), v.to_string()).is_none() {
            self.order.push(k.to_string());
        }
    }
    fn as_map(&self) -> BTreeMap<String, String> {
        self.values.clone()
    }
    fn into_vec(mut self) -> Vec<(String, String)> {
        self.order
            .iter()
            .map(|k| (k.clone(), self.values.remove(k).unwrap_or_default()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl EnvSources for Fixed {
        fn config_map(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
            Ok((name == "settings")
                .then(|| BTreeMap::from([("LEVEL".to_string(), "debug".to_string())])))
        }
        fn secret(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
            Ok((name == "creds")
                .then(|| BTreeMap::from([("password".to_string(), "s3cret".to_string())])))
        }
    }

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node0", "serviceAccountName": "web", "containers": []},
        }))
        .unwrap()
    }

    fn facts() -> PodFacts {
        PodFacts {
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 5)),
            host_ip: Ipv4Addr::new(172, 30, 0, 10),
            kubernetes_service: Some((Ipv4Addr::new(10, 96, 0, 1), 443)),
        }
    }

    fn container(env: serde_json::Value) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "app", "image": "echo",
            "command": ["/bin/app", "--ip=$(POD_IP)"],
            "args": ["$(GREETING)-$(MISSING)", "$$(POD_IP)"],
            "env": env,
            "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        }))
        .unwrap()
    }

    #[test]
    fn a_service_gives_link_variables_per_port_with_the_name_upper_cased() {
        let port = |name: Option<&str>, port, protocol: &str| ServicePortVar {
            name: name.map(str::to_string),
            port,
            protocol: protocol.into(),
        };
        let env = service_env(
            "reviews-v2",
            Ipv4Addr::new(10, 96, 0, 9),
            &[port(Some("http"), 9080, "TCP"), port(None, 53, "UDP")],
        );
        let map: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(map["REVIEWS_V2_SERVICE_HOST"], "10.96.0.9");
        assert_eq!(map["REVIEWS_V2_SERVICE_PORT"], "9080");
        assert_eq!(map["REVIEWS_V2_SERVICE_PORT_HTTP"], "9080");
        assert_eq!(map["REVIEWS_V2_PORT"], "tcp://10.96.0.9:9080");
        assert_eq!(map["REVIEWS_V2_PORT_53_UDP"], "udp://10.96.0.9:53");
        assert_eq!(map["REVIEWS_V2_PORT_53_UDP_PROTO"], "udp");
        assert_eq!(map["REVIEWS_V2_PORT_9080_TCP_ADDR"], "10.96.0.9");
        assert_eq!(map.len(), 12, "{map:?}");
        assert!(service_env("x", Ipv4Addr::new(10, 96, 0, 9), &[]).is_empty());
    }

    #[test]
    fn values_expand_and_come_from_the_downward_api_and_objects() {
        let c = container(serde_json::json!([
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "GREETING", "value": "hello $(NODE) at $(KUBERNETES_SERVICE_HOST)"},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}},
        ]));
        let env = environment(&pod(), &c, &facts(), &mut Fixed).unwrap();
        let map: BTreeMap<_, _> = env.iter().cloned().collect();
        assert_eq!(map["POD_IP"], "10.244.0.5");
        assert_eq!(map["NODE"], "node0");
        assert_eq!(map["SA"], "web");
        assert_eq!(map["APP"], "web");
        assert_eq!(map["PW"], "s3cret");
        assert_eq!(map["CFG_LEVEL"], "debug");
        assert_eq!(map["HOSTNAME"], "web-1");
        assert_eq!(map["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(map["KUBERNETES_SERVICE_PORT"], "443");
        assert_eq!(map["KUBERNETES_PORT_443_TCP_ADDR"], "10.96.0.1");
        assert_eq!(map["GREETING"], "hello node0 at 10.96.0.1");
        assert!(!map.contains_key("OPT"));
        assert_eq!(
            argv(&c, "/usr/local/bin/echo", &env),
            [
                "/bin/app",
                "--ip=10.244.0.5",
                "hello node0 at 10.96.0.1-$(MISSING)",
                "$(POD_IP)"
            ]
        );
    }

    #[test]
    fn args_alone_follow_the_entrypoint() {
        let c: Container = serde_json::from_value(
            serde_json::json!({"name": "app", "image": "echo", "args": ["--http", "8080"]}),
        )
        .unwrap();
        assert_eq!(
            argv(&c, "/usr/local/bin/echo", &[]),
            ["/usr/local/bin/echo", "--http", "8080"]
        );
    }

    #[test]
    fn missing_references_name_the_field() {
        let c = container(serde_json::json!([
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
        ]));
        let err = environment(&pod(), &c, &facts(), &mut Fixed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "container app: env[0] (PW): valueFrom.secretKeyRef: \"creds\" has no key \"user\""
        );
        let c = container(serde_json::json!([
            {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}},
        ]));
        let err = environment(&pod(), &c, &facts(), &mut Fixed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fieldRef.fieldPath \"spec.hostname\" is not supported"),
            "{err}"
        );
    }

    #[test]
    fn expansion_is_kubernetes_style() {
        let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("$(A)$(B)$$(A)$$$(A)", &vars), "1$(B)$(A)$1");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("x$", &vars), "x$");
        assert_eq!(expand("é$(A)é", &vars), "é1é");
    }
}
