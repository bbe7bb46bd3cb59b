//! The mesh root, kept in the cluster so that it outlives istiod-rs's pods:
//!
//! - Secret `cacerts` in istio-system, upstream's plug-in CA layout
//!   (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, optional
//!   `cert-chain.pem`), which istiod-rs signs with (`--cacerts-dir`). An
//!   install creates it with a new self-signed root only when there is none:
//!   a root brought by the user, or one from an earlier install, is kept
//!   (replacing it would invalidate every certificate in the mesh).
//! - ConfigMap `istio-ca-root-cert` holding its `root-cert.pem`, which
//!   ztunnel-rs mounts to verify istiod and its peers (upstream's name; its
//!   istiod publishes it, istiod-rs does not yet).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use serde_json::{Value, json};

use crate::cluster::{self, ClusterError};
use crate::manifest::{InstallKind, ManifestObject, label};

/// The plug-in CA Secret.
pub const SECRET: &str = "cacerts";
/// The root certificate's ConfigMap.
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
/// Keys of the plug-in CA layout.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
/// A new root's lifetime, and how far back it starts (clocks behind).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum MeshRootError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("could not create a mesh root: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "Secret {namespace}/{SECRET} has no {missing}: a plug-in CA holds {CA_CERT}, {CA_KEY} and {ROOT_CERT} (and optionally cert-chain.pem); complete it, or delete it to have istioctl-rs create a new root (every workload then gets new certificates)"
    )]
    Incomplete {
        namespace: String,
        missing: &'static str,
    },
    #[error("Secret {namespace}/{SECRET}: {ROOT_CERT} is not a PEM certificate")]
    NotPem { namespace: String },
}

/// The Secret of a new self-signed root: it signs (ca-cert = root-cert).
pub fn new_secret(namespace: &str, trust_domain: &str) -> Result<Value, MeshRootError> {
    let root =
        proxy_core::identity::root::self_signed_root(trust_domain, ROOT_BACKDATE, ROOT_LIFETIME)?;
    let data: BTreeMap<String, ByteString> = [
        (CA_CERT, root.cert_pem.as_bytes()),
        (CA_KEY, root.key_pem.as_bytes()),
        (ROOT_CERT, root.cert_pem.as_bytes()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
    .collect();
    let mut secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "type": "Opaque",
        "data": data,
    });
    label(&mut secret);
    Ok(secret)
}

/// The ConfigMap publishing `root_pem`.
pub fn config_map(namespace: &str, root_pem: &str) -> ManifestObject {
    let mut body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": namespace},
        "data": {ROOT_CERT: root_pem},
    });
    label(&mut body);
    ManifestObject {
        kind: InstallKind::ConfigMap,
        namespace: Some(namespace.to_string()),
        name: CONFIG_MAP.to_string(),
        source: format!("the mesh root of Secret {namespace}/{SECRET}"),
        body,
        if_absent: false,
    }
}

/// What [`ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshRoot {
    /// A new root was created.
    Created,
    /// The Secret was there: its root is kept.
    Kept,
}

/// Makes sure the Secret exists (creating a root only if it does not) and
/// publishes its root in the ConfigMap.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<MeshRoot, MeshRootError> {
    let mut outcome = MeshRoot::Kept;
    let secret = match cluster::get(client, InstallKind::Secret, Some(namespace), SECRET).await? {
        Some(secret) => secret,
        None => {
            let secret = new_secret(namespace, trust_domain)?;
            if cluster::create_unless_present(client, InstallKind::Secret, Some(namespace), &secret)
                .await?
            {
                outcome = MeshRoot::Created;
                secret
            } else {
                // Created meanwhile by someone else: theirs counts.
                cluster::get(client, InstallKind::Secret, Some(namespace), SECRET)
                    .await?
                    .unwrap_or(secret)
            }
        }
    };
    let root = root_pem(namespace, &secret)?;
    cluster::apply(client, &config_map(namespace, &root)).await?;
    Ok(outcome)
}

/// The root certificate of a plug-in CA Secret, after checking the Secret
/// has what istiod-rs loads.
fn root_pem(namespace: &str, secret: &Value) -> Result<String, MeshRootError> {
    let secret: Secret =
        serde_json::from_value(secret.clone()).map_err(|_| MeshRootError::NotPem {
            namespace: namespace.to_string(),
        })?;
    let data = secret.data.unwrap_or_default();
    for key in [CA_CERT, CA_KEY, ROOT_CERT] {
        if !data.contains_key(key) {
            return Err(MeshRootError::Incomplete {
                namespace: namespace.to_string(),
                missing: key,
            });
        }
    }
    let pem = String::from_utf8(data[ROOT_CERT].0.clone()).unwrap_or_default();
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(MeshRootError::NotPem {
            namespace: namespace.to_string(),
        });
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_secret_is_a_complete_plug_in_ca() {
        let secret = new_secret("istio-system", "cluster.local").unwrap();
        assert_eq!(
            secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "istioctl-rs"
        );
        let root = root_pem("istio-system", &secret).unwrap();
        let decoded: Secret = serde_json::from_value(secret).unwrap();
        let data = decoded.data.unwrap();
        assert_eq!(data[CA_CERT].0, root.as_bytes(), "the root signs");
        assert!(String::from_utf8_lossy(&data[CA_KEY].0).contains("PRIVATE KEY"));
    }

    #[test]
    fn an_incomplete_secret_is_named_with_what_it_lacks() {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": "istio-system"},
            "data": {"root-cert.pem": "AA==", "ca-cert.pem": "AA=="}});
        let err = root_pem("istio-system", &secret).unwrap_err().to_string();
        assert!(
            err.starts_with("Secret istio-system/cacerts has no ca-key.pem"),
            "{err}"
        );
    }
}
