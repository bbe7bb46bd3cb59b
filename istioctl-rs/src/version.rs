//! `istioctl-rs version`: this client's version, and the version each
//! installed component runs, read from the image tags of its pods (the
//! components have no version endpoint). During a rollout a component runs
//! more than one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::cluster::{self, ClusterError, Scope};
use crate::manifest::Manifest;
use crate::rollout::Workload;

/// This binary's version.
pub const CLIENT: &str = env!("CARGO_PKG_VERSION");

/// What one component runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentVersion {
    pub workload: Workload,
    /// `None`: the workload does not exist. Else pods by image tag.
    pub running: Option<BTreeMap<String, usize>>,
}

impl std::fmt::Display for ComponentVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.workload.describe())?;
        match &self.running {
            None => f.write_str("not installed"),
            Some(tags) if tags.is_empty() => f.write_str("no pods"),
            Some(tags) => {
                let parts: Vec<String> = tags
                    .iter()
                    .map(|(tag, n)| format!("{tag} ({n} pod{})", if *n == 1 { "" } else { "s" }))
                    .collect();
                f.write_str(&parts.join(", "))
            }
        }
    }
}

/// The tag (or digest) of an image reference; `latest` when it has none.
pub fn image_tag(image: &str) -> String {
    if let Some((_, digest)) = image.split_once('@') {
        return digest.to_string();
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, tag)) => tag.to_string(),
        None => "latest".to_string(),
    }
}

/// The version of each workload of the manifest.
pub async fn components(
    client: &Client,
    manifest: &Manifest,
) -> Result<Vec<ComponentVersion>, ClusterError> {
    let mut out = Vec::new();
    for workload in Workload::of(&manifest.objects) {
        let Some(object) = cluster::get(
            client,
            workload.kind,
            Some(&workload.namespace),
            &workload.name,
        )
        .await?
        else {
            out.push(ComponentVersion {
                workload,
                running: None,
            });
            continue;
        };
        let selector = object["spec"]["selector"]["matchLabels"]
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &workload.namespace);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                ClusterError::of(
                    e,
                    "listing",
                    &format!("the pods of {}", workload.describe()),
                    "list",
                    "pods",
                    Scope::Namespace(&workload.namespace),
                )
            })?;
        let mut tags = BTreeMap::new();
        for pod in list.items {
            let image = pod
                .spec
                .and_then(|s| s.containers.into_iter().next())
                .and_then(|c| c.image)
                .unwrap_or_default();
            *tags.entry(image_tag(&image)).or_insert(0) += 1;
        }
        out.push(ComponentVersion {
            workload,
            running: Some(tags),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_come_from_the_image_reference() {
        assert_eq!(image_tag("istio-rs/istiod-rs:0.1.0"), "0.1.0");
        assert_eq!(
            image_tag("registry.example.com:5000/mesh/ztunnel-rs:1.2"),
            "1.2"
        );
        assert_eq!(
            image_tag("registry.example.com:5000/mesh/ztunnel-rs"),
            "latest"
        );
        assert_eq!(image_tag("istio-rs/istiod-rs@sha256:abc"), "sha256:abc");
    }
}
