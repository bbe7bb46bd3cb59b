//! A pod's volumes, as kubelet materializes them: each in
//! `<pod dir>/volumes/<name>` on the host, bind-mounted into the
//! containers (see [`super::launch`]).
//!
//! - `emptyDir`: an empty directory.
//! - `configMap`, `secret`, `downwardAPI`, `projected` (with
//!   `serviceAccountToken`, `configMap`, `secret`, `downwardAPI` sources):
//!   files written from the objects (read through the node's credentials,
//!   which the Node authorizer lets read what its pods refer to), `items`
//!   and modes as given. A `serviceAccountToken` comes from the TokenRequest
//!   API for the pod's ServiceAccount, bound to the pod, with the source's
//!   audience and expiry; [`VolumeSet::tokens`] says when to renew each
//!   (kubelet: past 80% of its life).
//! - `hostPath`: the *node's* filesystem: every node shares this machine's
//!   filesystem, so a node's `/etc/cni/net.d`, `/opt/cni/bin`,
//!   `/var/run/<x>` ... live under the node's own directory
//!   ([`host_path_source`]); only what is really machine-wide (`/proc`,
//!   `/sys`, `/dev`, `/run/netns`, `/run/xtables.lock`, `/lib/modules`) is
//!   the host's own. `/var/run/...` is `/run/...`, as on every current
//!   distribution.
//!
//! Any other volume kind fails the pod's containers with
//! `CreateContainerConfigError` naming the volume and its kind.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};

use super::env::{PodFacts, field_value};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {field}: {problem}")]
    Field {
        volume: String,
        field: String,
        problem: String,
    },
    #[error("volume {volume}: could not write {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads what volumes are made of (the API server, for the runtime);
/// `Ok(None)` when the object does not exist.
pub trait VolumeSources {
    fn config_map(&mut self, name: &str) -> Result<Option<ConfigMap>, String>;
    fn secret(&mut self, name: &str) -> Result<Option<Secret>, String>;
    /// A token for the pod's ServiceAccount, bound to the pod; with its
    /// lifetime in seconds.
    fn token(
        &mut self,
        audiences: &[String],
        expiration_seconds: i64,
    ) -> Result<(String, i64), String>;
}

/// Host paths every node shares (the kernel's, and the runtime's pod
/// network namespaces, which CNI hands around by path).
pub const MACHINE_WIDE: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run/netns",
    "/run/xtables.lock",
    "/lib/modules",
];

/// A token file to keep fresh.
#[derive(Clone, Debug)]
pub struct TokenFile {
    pub volume: String,
    /// The file on the host.
    pub path: PathBuf,
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
    pub mode: u32,
    /// When to ask for a new one.
    pub renew_at: Instant,
}

/// A pod's materialized volumes.
#[derive(Clone, Debug, Default)]
pub struct VolumeSet {
    /// Volume name -> what to bind-mount (a directory, or a hostPath file).
    pub sources: BTreeMap<String, PathBuf>,
    pub tokens: Vec<TokenFile>,
    /// The node-private host paths (as the node sees them) the pod's
    /// `hostPath` volumes use.
    pub host_paths: Vec<PathBuf>,
}

/// The default file mode of configMap/secret/projected/downwardAPI volumes (0644).
const DEFAULT_MODE: i32 = 0o644;
/// kubelet's default projected token lifetime (`expirationSeconds`).
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// `/var/run/x` -> `/run/x`, `.`/`..` resolved lexically; `None` if not absolute.
pub fn normalize(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Some(match out.strip_prefix("/var/run") {
        Ok(rest) => Path::new("/run").join(rest),
        Err(_) => out,
    })
}

/// Where a node's `hostPath` really is: the host's own path when it is
/// machine-wide, else the same path under the node's filesystem `node_fs`.
/// `None` for a path that is not absolute.
pub fn host_path_source(node_fs: &Path, path: &str) -> Option<(PathBuf, bool)> {
    let p = normalize(path)?;
    if MACHINE_WIDE.iter().any(|w| p.starts_with(w)) {
        return Some((p, false));
    }
    let rel = p.strip_prefix("/").unwrap_or(&p);
    Some((node_fs.join(rel), true))
}

/// Materializes every volume of `pod` under `pod_dir/volumes`.
pub fn materialize(
    pod: &Pod,
    pod_dir: &Path,
    node_fs: &Path,
    facts: &PodFacts,
    sources: &mut dyn VolumeSources,
) -> Result<VolumeSet, VolumeError> {
    let mut set = VolumeSet::default();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in &volumes {
        let dir = pod_dir.join("volumes").join(&v.name);
        let source = materialize_one(pod, v, &dir, node_fs, facts, sources, &mut set)?;
        set.sources.insert(v.name.clone(), source);
    }
    Ok(set)
}

fn materialize_one(
    pod: &Pod,
    v: &Volume,
    dir: &Path,
    node_fs: &Path,
    facts: &PodFacts,
    sources: &mut dyn VolumeSources,
    set: &mut VolumeSet,
) -> Result<PathBuf, VolumeError> {
    let bad = |field: &str, problem: String| VolumeError::Field {
        volume: v.name.clone(),
        field: field.to_string(),
        problem,
    };
    let io = |path: &Path, source| VolumeError::Io {
        volume: v.name.clone(),
        path: path.to_path_buf(),
        source,
    };
    if let Some(hp) = &v.host_path {
        let (source, private) = host_path_source(node_fs, &hp.path)
            .ok_or_else(|| bad("hostPath.path", format!("{:?} is not absolute", hp.path)))?;
        let kind = hp.type_.as_deref().unwrap_or("");
        let exists = source.exists();
        match kind {
            "" | "DirectoryOrCreate" if !exists => {
                fs::create_dir_all(&source).map_err(|e| io(&source, e))?
            }
            "FileOrCreate" if !exists => {
                if let Some(parent) = source.parent() {
                    fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
                }
                fs::File::create(&source).map_err(|e| io(&source, e))?;
            }
            "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" if !exists => {
                return Err(bad(
                    "hostPath",
                    format!("{} ({kind}) does not exist on the node", hp.path),
                ));
            }
            _ => {}
        }
        if private && let Some(p) = normalize(&hp.path) {
            set.host_paths.push(p);
        }
        return Ok(source);
    }
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    if v.empty_dir.is_some() {
        return Ok(dir.to_path_buf());
    }
    let write = |rel: &str, bytes: &[u8], mode: i32| write_file(&v.name, dir, rel, bytes, mode);
    if let Some(cm) = &v.config_map {
        let mode = cm.default_mode.unwrap_or(DEFAULT_MODE);
        let obj = sources
            .config_map(&cm.name)
            .map_err(|e| bad("configMap", e))?;
        let Some(obj) = obj else {
            if cm.optional.unwrap_or(false) {
                return Ok(dir.to_path_buf());
            }
            return Err(bad(
                "configMap.name",
                format!("{:?} does not exist", cm.name),
            ));
        };
        for (rel, bytes, m) in
            key_files(&config_map_data(&obj), cm.items.as_deref(), mode, &cm.name)
                .map_err(|e| bad("configMap.items", e))?
        {
            write(&rel, &bytes, m)?;
        }
        return Ok(dir.to_path_buf());
    }
    if let Some(s) = &v.secret {
        let mode = s.default_mode.unwrap_or(DEFAULT_MODE);
        let name = s.secret_name.clone().unwrap_or_default();
        let obj = sources.secret(&name).map_err(|e| bad("secret", e))?;
        let Some(obj) = obj else {
            if s.optional.unwrap_or(false) {
                return Ok(dir.to_path_buf());
            }
            return Err(bad("secret.secretName", format!("{name:?} does not exist")));
        };
        for (rel, bytes, m) in key_files(&secret_data(&obj), s.items.as_deref(), mode, &name)
            .map_err(|e| bad("secret.items", e))?
        {
            write(&rel, &bytes, m)?;
        }
        return Ok(dir.to_path_buf());
    }
    if let Some(d) = &v.downward_api {
        let mode = d.default_mode.unwrap_or(DEFAULT_MODE);
        for (rel, bytes, m) in downward_files(pod, d.items.as_deref().unwrap_or(&[]), mode, facts)
            .map_err(|e| bad("downwardAPI.items", e))?
        {
            write(&rel, &bytes, m)?;
        }
        return Ok(dir.to_path_buf());
    }
    if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(DEFAULT_MODE);
        for (i, src) in p.sources.iter().flatten().enumerate() {
            let field = |f: &str| format!("projected.sources[{i}].{f}");
            if let Some(t) = &src.service_account_token {
                let audiences: Vec<String> = t.audience.iter().cloned().collect();
                let seconds = t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS);
                let (token, lifetime) = sources
                    .token(&audiences, seconds)
                    .map_err(|e| bad(&field("serviceAccountToken"), e))?;
                write(&t.path, token.as_bytes(), mode)?;
                set.tokens.push(TokenFile {
                    volume: v.name.clone(),
                    path: checked_join(dir, &t.path)
                        .map_err(|e| bad(&field("serviceAccountToken.path"), e))?,
                    audiences,
                    expiration_seconds: seconds,
                    mode: mode as u32,
                    renew_at: renew_at(lifetime),
                });
            } else if let Some(cm) = &src.config_map {
                match sources
                    .config_map(&cm.name)
                    .map_err(|e| bad(&field("configMap"), e))?
                {
                    Some(obj) => {
                        for (rel, bytes, m) in
                            key_files(&config_map_data(&obj), cm.items.as_deref(), mode, &cm.name)
                                .map_err(|e| bad(&field("configMap.items"), e))?
                        {
                            write(&rel, &bytes, m)?;
                        }
                    }
                    None if cm.optional.unwrap_or(false) => {}
                    None => {
                        return Err(bad(
                            &field("configMap.name"),
                            format!("{:?} does not exist", cm.name),
                        ));
                    }
                }
            } else if let Some(s) = &src.secret {
                match sources
                    .secret(&s.name)
                    .map_err(|e| bad(&field("secret"), e))?
                {
                    Some(obj) => {
                        for (rel, bytes, m) in
                            key_files(&secret_data(&obj), s.items.as_deref(), mode, &s.name)
                                .map_err(|e| bad(&field("secret.items"), e))?
                        {
                            write(&rel, &bytes, m)?;
                        }
                    }
                    None if s.optional.unwrap_or(false) => {}
                    None => {
                        return Err(bad(
                            &field("secret.name"),
                            format!("{:?} does not exist", s.name),
                        ));
                    }
                }
            } else if let Some(d) = &src.downward_api {
                for (rel, bytes, m) in
                    downward_files(pod, d.items.as_deref().unwrap_or(&[]), mode, facts)
                        .map_err(|e| bad(&field("downwardAPI.items"), e))?
                {
                    write(&rel, &bytes, m)?;
                }
            } else {
                return Err(bad(
                    &format!("projected.sources[{i}]"),
                    "only serviceAccountToken, configMap, secret and downwardAPI sources are supported by the node runtime".into(),
                ));
            }
        }
        return Ok(dir.to_path_buf());
    }
    Err(bad(
        "(kind)",
        "only emptyDir, configMap, secret, downwardAPI, projected and hostPath volumes are supported by the node runtime".into(),
    ))
}

/// Renews every token whose time has come; the number renewed. A token
/// that cannot be renewed now is tried again `retry` later.
pub fn renew_tokens(
    set: &mut VolumeSet,
    sources: &mut dyn VolumeSources,
    now: Instant,
    retry: Duration,
) -> Result<usize, VolumeError> {
    let mut renewed = 0;
    for t in set.tokens.iter_mut().filter(|t| t.renew_at <= now) {
        let (token, lifetime) = match sources.token(&t.audiences, t.expiration_seconds) {
            Ok(answer) => answer,
            Err(problem) => {
                t.renew_at = now + retry;
                return Err(VolumeError::Field {
                    volume: t.volume.clone(),
                    field: "serviceAccountToken".into(),
                    problem,
                });
            }
        };
        let dir = t.path.parent().unwrap_or(Path::new("/"));
        let name = t
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("token");
        write_file(&t.volume, dir, name, token.as_bytes(), t.mode as i32)?;
        t.renew_at = renew_at(lifetime);
        renewed += 1;
    }
    Ok(renewed)
}

/// kubelet renews a projected token once 80% of its life has passed.
fn renew_at(lifetime_seconds: i64) -> Instant {
    let life = Duration::from_secs(lifetime_seconds.max(1) as u64);
    Instant::now() + life.mul_f64(0.8)
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    data
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    data
}

/// The files of a configMap/secret projection: every key, or the `items`.
fn key_files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    object: &str,
) -> Result<Vec<(String, Vec<u8>, i32)>, String> {
    match items {
        None => Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), mode))
            .collect()),
        Some(items) => items
            .iter()
            .map(|item| {
                data.get(&item.key)
                    .map(|v| (item.path.clone(), v.clone(), item.mode.unwrap_or(mode)))
                    .ok_or_else(|| format!("{object:?} has no key {:?}", item.key))
            })
            .collect(),
    }
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    mode: i32,
    facts: &PodFacts,
) -> Result<Vec<(String, Vec<u8>, i32)>, String> {
    items
        .iter()
        .map(|item| {
            let field = item.field_ref.as_ref().ok_or_else(|| {
                format!(
                    "{}: only fieldRef items are supported by the node runtime",
                    item.path
                )
            })?;
            let value = match field.field_path.as_str() {
                // A volume file holds every label / annotation, one per line.
                "metadata.labels" => lines(pod.metadata.labels.as_ref()),
                "metadata.annotations" => lines(pod.metadata.annotations.as_ref()),
                path => field_value(pod, path, facts)?,
            };
            Ok((
                item.path.clone(),
                value.into_bytes(),
                item.mode.unwrap_or(mode),
            ))
        })
        .collect()
}

fn lines(map: Option<&BTreeMap<String, String>>) -> String {
    map.iter()
        .flat_map(|m| m.iter())
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect()
}

/// `dir/rel`, refusing a `rel` that is absolute or climbs out with `..`.
fn checked_join(dir: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!("path {rel:?} must be relative, without `..`"));
    }
    Ok(dir.join(p))
}

/// Writes `dir/rel` whole (a temporary file renamed over it), with `mode`.
fn write_file(
    volume: &str,
    dir: &Path,
    rel: &str,
    bytes: &[u8],
    mode: i32,
) -> Result<(), VolumeError> {
    let path = checked_join(dir, rel).map_err(|problem| VolumeError::Field {
        volume: volume.to_string(),
        field: "path".into(),
        problem,
    })?;
    let io = |source| VolumeError::Io {
        volume: volume.to_string(),
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!("..{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode as u32 & 0o777)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.set_permissions(fs::Permissions::from_mode(mode as u32 & 0o777))
        .map_err(io)?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    struct Objects {
        tokens: usize,
    }

    impl VolumeSources for Objects {
        fn config_map(&mut self, name: &str) -> Result<Option<ConfigMap>, String> {
            Ok((name == "kube-root-ca.crt").then(|| ConfigMap {
                data: Some(BTreeMap::from([("ca.crt".into(), "PEM".into())])),
                ..ConfigMap::default()
            }))
        }
        fn secret(&mut self, name: &str) -> Result<Option<Secret>, String> {
            Ok((name == "certs").then(|| Secret {
                data: Some(BTreeMap::from([(
                    "key.pem".into(),
                    ByteString(b"KEY".to_vec()),
                )])),
                ..Secret::default()
            }))
        }
        fn token(&mut self, audiences: &[String], seconds: i64) -> Result<(String, i64), String> {
            self.tokens += 1;
            Ok((
                format!("token-{}-{}-{seconds}", self.tokens, audiences.join(",")),
                seconds,
            ))
        }
    }

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node0", "containers": [], "volumes": volumes},
        }))
        .unwrap()
    }

    fn facts() -> PodFacts {
        PodFacts {
            pod_ip: None,
            host_ip: "172.30.0.10".parse().unwrap(),
            kubernetes_service: None,
        }
    }

    #[test]
    fn the_default_service_account_volume_is_projected() {
        let dir = tempfile::tempdir().unwrap();
        let p = pod(serde_json::json!([{
            "name": "kube-api-access",
            "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ]},
        }, {
            "name": "istio-token",
            "projected": {"sources": [{"serviceAccountToken": {"path": "istio-token", "audience": "istio-ca"}}]},
        }, {"name": "scratch", "emptyDir": {}},
           {"name": "certs", "secret": {"secretName": "certs", "defaultMode": 384}}]));
        let mut objects = Objects { tokens: 0 };
        let mut set = materialize(
            &p,
            dir.path(),
            Path::new("/nodes/n0/fs"),
            &facts(),
            &mut objects,
        )
        .unwrap();
        let access = set.sources["kube-api-access"].clone();
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(read(access.join("token")), "token-1--3607");
        assert_eq!(read(access.join("ca.crt")), "PEM");
        assert_eq!(read(access.join("namespace")), "shop");
        assert_eq!(
            read(set.sources["istio-token"].join("istio-token")),
            "token-2-istio-ca-3600"
        );
        assert_eq!(read(set.sources["certs"].join("key.pem")), "KEY");
        let mode = fs::metadata(set.sources["certs"].join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(set.sources["scratch"].is_dir());
        assert_eq!(set.tokens.len(), 2);
        // Not due yet: nothing renewed; due: a fresh token replaces the file.
        assert_eq!(
            renew_tokens(
                &mut set,
                &mut objects,
                Instant::now(),
                Duration::from_secs(2)
            )
            .unwrap(),
            0
        );
        let later = Instant::now() + Duration::from_secs(3590);
        assert_eq!(
            renew_tokens(&mut set, &mut objects, later, Duration::from_secs(2)).unwrap(),
            2
        );
        assert_eq!(read(access.join("token")), "token-3--3607");
    }

    #[test]
    fn missing_objects_and_unknown_kinds_name_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let mut objects = Objects { tokens: 0 };
        let p = pod(serde_json::json!([{"name": "cfg", "configMap": {"name": "nope"}}]));
        let err = materialize(&p, dir.path(), Path::new("/n"), &facts(), &mut objects)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "volume cfg: configMap.name: \"nope\" does not exist");
        let p =
            pod(serde_json::json!([{"name": "data", "persistentVolumeClaim": {"claimName": "x"}}]));
        let err = materialize(&p, dir.path(), Path::new("/n"), &facts(), &mut objects)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("volume data: (kind): only emptyDir"),
            "{err}"
        );
        let p = pod(
            serde_json::json!([{"name": "cfg", "configMap": {"name": "kube-root-ca.crt",
            "items": [{"key": "ca.crt", "path": "../escape"}]}}]),
        );
        let err = materialize(&p, dir.path(), Path::new("/n"), &facts(), &mut objects)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be relative, without `..`"), "{err}");
    }

    #[test]
    fn host_paths_are_the_nodes_own_but_for_machine_wide_ones() {
        let fs_root = Path::new("/tmp/run/nodes/node0/fs");
        assert_eq!(
            host_path_source(fs_root, "/var/run/ztunnel"),
            Some((fs_root.join("run/ztunnel"), true))
        );
        assert_eq!(
            host_path_source(fs_root, "/opt/cni/bin"),
            Some((fs_root.join("opt/cni/bin"), true))
        );
        assert_eq!(
            host_path_source(fs_root, "/var/run/netns"),
            Some((PathBuf::from("/run/netns"), false))
        );
        assert_eq!(
            host_path_source(fs_root, "/run/xtables.lock"),
            Some((PathBuf::from("/run/xtables.lock"), false))
        );
        assert_eq!(host_path_source(fs_root, "relative"), None);
        assert_eq!(normalize("/a/../b/./c"), Some(PathBuf::from("/b/c")));
    }
}
