//! `istioctl-rs x precheck`: what can be known from the API server before an
//! install. `install` runs the checks that must pass (version, no other
//! Istio) itself.
//!
//! Not checkable from the API server: each node's CNI configuration (the
//! files under /etc/cni/net.d). The node agent waits on its node for one to
//! chain istio-cni-rs into, and stays not ready until it has.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

use crate::cluster::{self, ClusterError};
use crate::manifest::{InstallKind, MANAGED_BY, MANAGED_BY_VALUE, Manifest};

/// The oldest Kubernetes the manifests are valid for: the node agent's
/// `securityContext.appArmorProfile` is 1.30's.
pub const MIN_KUBERNETES: (u32, u32) = (1, 30);

/// How a check came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Warn(String),
    Fail(String),
    /// Cannot be checked from here; what happens instead.
    NotChecked(String),
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
}

impl Check {
    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Fail(_))
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mark, text) = match &self.outcome {
            Outcome::Pass(t) => ("ok", t),
            Outcome::Warn(t) => ("warning", t),
            Outcome::Fail(t) => ("FAIL", t),
            Outcome::NotChecked(t) => ("not checked", t),
        };
        write!(f, "{:<28} {mark}: {text}", self.name)
    }
}

/// The Kubernetes version, from `/version` (minor may read `30+`).
pub async fn kubernetes_version(client: &Client) -> Result<Check, ClusterError> {
    let info = client
        .apiserver_version()
        .await
        .map_err(|source| ClusterError::Call {
            action: "reading".into(),
            object: "the API server's version".into(),
            source,
        })?;
    Ok(Check {
        name: "Kubernetes version",
        outcome: version_outcome(&info.major, &info.minor, &info.git_version),
    })
}

fn version_outcome(major: &str, minor: &str, git_version: &str) -> Outcome {
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    let (min_major, min_minor) = MIN_KUBERNETES;
    match (number(major), number(minor)) {
        (Some(ma), Some(mi)) if (ma, mi) >= MIN_KUBERNETES => Outcome::Pass(format!(
            "{git_version} (needs {min_major}.{min_minor} or newer)"
        )),
        (Some(_), Some(_)) => Outcome::Fail(format!(
            "{git_version} is too old: istio-rs needs Kubernetes {min_major}.{min_minor} or newer; upgrade the cluster"
        )),
        _ => Outcome::Warn(format!(
            "cannot read the version {major:?}.{minor:?} ({git_version}); istio-rs needs {min_major}.{min_minor} or newer"
        )),
    }
}

/// An Istio control plane or node proxy that is not ours blocks an install:
/// two meshes would fight over pods, ports and the webhook. Ours is an
/// upgrade in place.
pub async fn existing_installation(client: &Client) -> Result<Check, ClusterError> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for (kind, selector) in [
        (InstallKind::Deployment, "app=istiod"),
        (InstallKind::DaemonSet, "app=ztunnel"),
        (InstallKind::DaemonSet, "k8s-app=istio-cni-node"),
    ] {
        for object in cluster::list(client, kind, None, selector).await? {
            let image = object.data["spec"]["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default();
            let text = format!(
                "{kind} {}/{} ({image})",
                object.namespace().unwrap_or_default(),
                object.name_any()
            );
            if object.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE) {
                ours.push(text);
            } else {
                theirs.push(text);
            }
        }
    }
    let outcome = if !theirs.is_empty() {
        Outcome::Fail(format!(
            "another Istio installation runs here: {}; uninstall it first (for upstream Istio: istioctl uninstall --purge)",
            theirs.join(", ")
        ))
    } else if !ours.is_empty() {
        Outcome::Pass(format!(
            "istio-rs is installed ({}); install upgrades it in place",
            ours.join(", ")
        ))
    } else {
        Outcome::Pass("none".into())
    };
    Ok(Check {
        name: "existing Istio",
        outcome,
    })
}

/// Whether these credentials may apply every object of the manifest
/// (server-side apply: `patch`, and `create` for new objects), asked with
/// SelfSubjectAccessReviews.
pub async fn permissions(client: &Client, manifest: &Manifest) -> Result<Check, ClusterError> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut asked = std::collections::BTreeSet::new();
    let mut missing = Vec::new();
    for object in &manifest.objects {
        for verb in ["create", "patch"] {
            let namespace = object.namespace.clone();
            if !asked.insert((verb, object.kind, namespace.clone())) {
                continue;
            }
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(object.kind.group().to_string()),
                        resource: Some(object.kind.plural().to_string()),
                        verb: Some(verb.to_string()),
                        namespace: namespace.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|source| ClusterError::Call {
                    action: "asking".into(),
                    object:
                        "the API server what these credentials may do (SelfSubjectAccessReview)"
                            .into(),
                    source,
                })?;
            if !answer.status.is_some_and(|s| s.allowed) {
                missing.push(match &namespace {
                    Some(ns) => format!("{verb} {} in {ns}", object.kind.resource()),
                    None => format!("{verb} {}", object.kind.resource()),
                });
            }
        }
    }
    let outcome = if missing.is_empty() {
        Outcome::Pass("may create and patch every object of the install".into())
    } else {
        Outcome::Fail(format!(
            "these credentials may not: {}; ask a cluster admin, or use a kubeconfig with cluster-admin",
            missing.join(", ")
        ))
    };
    Ok(Check {
        name: "permissions",
        outcome,
    })
}

/// How many nodes there are, and ready: the DaemonSets run one pod on each.
pub async fn nodes(client: &Client) -> Result<Check, ClusterError> {
    let api: Api<Node> = Api::all(client.clone());
    let nodes = api
        .list(&ListParams::default())
        .await
        .map_err(|source| ClusterError::Call {
            action: "listing".into(),
            object: "nodes".into(),
            source,
        })?;
    let ready = nodes
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    let total = nodes.items.len();
    let outcome = match (total, ready) {
        (0, _) => {
            Outcome::Warn("no nodes: ztunnel-rs and the node agent will have nowhere to run".into())
        }
        (t, r) if r < t => Outcome::Warn(format!(
            "{r} of {t} nodes ready; the others get ztunnel-rs once ready"
        )),
        (t, _) => Outcome::Pass(format!("{t} nodes, all ready")),
    };
    Ok(Check {
        name: "nodes",
        outcome,
    })
}

/// What cannot be checked from the API server.
pub fn cni_configuration() -> Check {
    Check {
        name: "CNI configuration on nodes",
        outcome: Outcome::NotChecked(
            "the API server does not show nodes' /etc/cni/net.d; on each node the node agent waits for a CNI configuration, chains istio-cni-rs into it, and is ready only then (kubectl -n istio-system get pods -l k8s-app=istio-cni-node)".into(),
        ),
    }
}

/// Every check, in order.
pub async fn run(client: &Client, manifest: &Manifest) -> Result<Vec<Check>, ClusterError> {
    Ok(vec![
        kubernetes_version(client).await?,
        existing_installation(client).await?,
        permissions(client, manifest).await?,
        nodes(client).await?,
        cni_configuration(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_older_than_the_minimum_fail() {
        assert!(matches!(
            version_outcome("1", "30", "v1.30.2"),
            Outcome::Pass(_)
        ));
        assert!(matches!(
            version_outcome("1", "33+", "v1.33.1-gke"),
            Outcome::Pass(_)
        ));
        assert!(matches!(
            version_outcome("2", "0", "v2.0.0"),
            Outcome::Pass(_)
        ));
        let Outcome::Fail(text) = version_outcome("1", "29", "v1.29.9") else {
            panic!()
        };
        assert!(text.contains("v1.29.9 is too old"), "{text}");
        assert!(text.contains("1.30 or newer"), "{text}");
        assert!(matches!(version_outcome("", "x", "?"), Outcome::Warn(_)));
    }
}
