//! istioctl-rs's calls to the Kubernetes API, and what their failures tell
//! the user: the object, what was being done to it, and, when the API
//! server forbade it, the verb and resource the credentials lack.

use std::time::Duration;

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::Value;

use crate::manifest::{FIELD_MANAGER, InstallKind, ManifestObject};

/// A failed call, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "{action} {object} was forbidden: these credentials may not {verb} {resource}{scope}; ask a cluster admin for that permission or use a kubeconfig with cluster-admin (API server: {message})"
    )]
    Forbidden {
        action: String,
        object: String,
        verb: String,
        resource: String,
        scope: String,
        message: String,
    },
    #[error("{action} {object}: the API server refused it: {message}")]
    Refused {
        action: String,
        object: String,
        message: String,
    },
    #[error(
        "{action} {object}: {source}; is the cluster reachable with this kubeconfig (kubectl cluster-info)?"
    )]
    Call {
        action: String,
        object: String,
        #[source]
        source: kube::Error,
    },
}

/// Where a request applies, for an error's words.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    Cluster,
    Namespace(&'a str),
    AllNamespaces,
}

impl<'a> Scope<'a> {
    /// The scope of a request for `kind` in `namespace` (`None`: all).
    pub fn of(kind: InstallKind, namespace: Option<&'a str>) -> Scope<'a> {
        match (kind.namespaced(), namespace) {
            (false, _) => Scope::Cluster,
            (true, Some(ns)) => Scope::Namespace(ns),
            (true, None) => Scope::AllNamespaces,
        }
    }

    fn words(self) -> String {
        match self {
            Scope::Cluster => String::new(),
            Scope::Namespace(ns) => format!(" in namespace {ns}"),
            Scope::AllNamespaces => " in all namespaces".to_string(),
        }
    }
}

impl ClusterError {
    /// `error` of `verb` (the request's verb: get, list, patch, create,
    /// delete) on `object`, of `resource` (`deployments.apps`) in `scope`.
    pub fn of(
        error: kube::Error,
        action: &str,
        object: &str,
        verb: &str,
        resource: &str,
        scope: Scope<'_>,
    ) -> ClusterError {
        match error {
            kube::Error::Api(status) if status.code == 403 => {
                // The API server names the verb it refused (an apply that
                // creates is authorised as a create).
                let verb = word_after(&status.message, "cannot ").unwrap_or(verb.to_string());
                ClusterError::Forbidden {
                    action: action.to_string(),
                    object: object.to_string(),
                    verb,
                    resource: resource.to_string(),
                    scope: scope.words(),
                    message: status.message,
                }
            }
            kube::Error::Api(status) if (400..500).contains(&status.code) => {
                ClusterError::Refused {
                    action: action.to_string(),
                    object: object.to_string(),
                    message: status.message,
                }
            }
            source => ClusterError::Call {
                action: action.to_string(),
                object: object.to_string(),
                source,
            },
        }
    }

    /// [`ClusterError::of`] for a request on an install kind.
    pub fn on(
        error: kube::Error,
        action: &str,
        object: &str,
        verb: &str,
        kind: InstallKind,
        namespace: Option<&str>,
    ) -> ClusterError {
        Self::of(
            error,
            action,
            object,
            verb,
            &kind.resource(),
            Scope::of(kind, namespace),
        )
    }

    /// The API server said the object does not exist.
    pub fn is_not_found(error: &kube::Error) -> bool {
        matches!(error, kube::Error::Api(status) if status.is_not_found())
    }
}

fn word_after(text: &str, marker: &str) -> Option<String> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    (!word.is_empty()).then_some(word)
}

/// The dynamic API of one kind, in one namespace or cluster-wide.
pub fn api(client: &Client, kind: InstallKind, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = kind.api_resource();
    match namespace {
        Some(ns) if kind.namespaced() => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    }
}

/// Server-side apply of one object: field manager `istioctl-rs`, forced
/// (an install owns the fields it sets, also after someone edited them),
/// with the API server's strict field validation.
pub async fn apply(client: &Client, object: &ManifestObject) -> Result<(), ClusterError> {
    let params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    api(client, object.kind, object.namespace.as_deref())
        .patch(&object.name, &params, &Patch::Apply(&object.body))
        .await
        .map(drop)
        .map_err(|e| {
            ClusterError::on(
                e,
                "applying",
                &object.describe(),
                "patch",
                object.kind,
                object.namespace.as_deref(),
            )
        })
}

/// One object, as JSON; `None` when it does not exist.
pub async fn get(
    client: &Client,
    kind: InstallKind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ClusterError> {
    let describe = || match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    match api(client, kind, namespace).get(name).await {
        Ok(o) => Ok(Some(serde_json::to_value(o).expect("an object serialises"))),
        Err(e) if ClusterError::is_not_found(&e) => Ok(None),
        Err(e) => Err(ClusterError::on(
            e,
            "reading",
            &describe(),
            "get",
            kind,
            namespace,
        )),
    }
}

/// The objects of a kind matching a label selector, in every namespace.
pub async fn list(
    client: &Client,
    kind: InstallKind,
    selector: &str,
) -> Result<Vec<DynamicObject>, ClusterError> {
    let params = ListParams::default().labels(selector);
    match api(client, kind, None).list(&params).await {
        Ok(list) => Ok(list.items),
        // A CRD-less kind cannot be missing here: every InstallKind is
        // built in (CRDs included), so a 404 is a real error.
        Err(e) => Err(ClusterError::on(
            e,
            "listing",
            &format!("{} labelled {selector}", kind.plural()),
            "list",
            kind,
            None,
        )),
    }
}

/// Deletes one object; gone already is fine. `foreground` deletes its
/// dependents (pods) before it.
pub async fn delete(
    client: &Client,
    kind: InstallKind,
    namespace: Option<&str>,
    name: &str,
    foreground: bool,
) -> Result<(), ClusterError> {
    let params = if foreground {
        DeleteParams::foreground()
    } else {
        DeleteParams::background()
    };
    let object = match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    match api(client, kind, namespace).delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(e) if ClusterError::is_not_found(&e) => Ok(()),
        Err(e) => Err(ClusterError::on(
            e, "deleting", &object, "delete", kind, namespace,
        )),
    }
}

/// Creates an object unless one of its name exists; true when created.
pub async fn create_unless_present(
    client: &Client,
    kind: InstallKind,
    namespace: Option<&str>,
    body: &Value,
) -> Result<bool, ClusterError> {
    let object: DynamicObject =
        serde_json::from_value(body.clone()).expect("a manifest object is a Kubernetes object");
    let name = object.metadata.name.clone().unwrap_or_default();
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    match api(client, kind, namespace).create(&params, &object).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(ClusterError::on(
            e,
            "creating",
            &match namespace {
                Some(ns) => format!("{kind} {ns}/{name}"),
                None => format!("{kind} {name}"),
            },
            "create",
            kind,
            namespace,
        )),
    }
}

/// Checks each of `pending` every `poll` until `done` holds for all of them
/// or `timeout` passes; returns those it never held for (empty: all done).
pub async fn wait_until<T>(
    mut pending: Vec<T>,
    timeout: Duration,
    poll: Duration,
    mut done: impl AsyncFnMut(&T) -> Result<bool, ClusterError>,
) -> Result<Vec<T>, ClusterError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut still = Vec::new();
        for item in pending {
            if !done(&item).await? {
                still.push(item);
            }
        }
        if still.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(still);
        }
        pending = still;
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(
            serde_json::from_value(serde_json::json!({
                "status": "Failure", "message": message, "reason": "", "code": code
            }))
            .unwrap(),
        ))
    }

    #[test]
    fn forbidden_names_the_verb_and_resource_missing() {
        let e = ClusterError::on(
            status(
                403,
                "deployments.apps \"istiod\" is forbidden: User \"dev\" cannot create resource \"deployments\" in API group \"apps\" in the namespace \"istio-system\"",
            ),
            "applying",
            "Deployment istio-system/istiod",
            "patch",
            InstallKind::Deployment,
            Some("istio-system"),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("applying Deployment istio-system/istiod was forbidden: these credentials may not create deployments.apps in namespace istio-system; ask a cluster admin"),
            "{text}"
        );
        let e = ClusterError::on(
            status(403, "forbidden"),
            "applying",
            "ClusterRole istiod-rs",
            "patch",
            InstallKind::ClusterRole,
            None,
        );
        assert!(
            e.to_string()
                .contains("may not patch clusterroles.rbac.authorization.k8s.io;"),
            "{e}"
        );
        let e = ClusterError::on(
            status(
                422,
                "Deployment.apps \"istiod\" is invalid: spec.replicas: Invalid value: -1",
            ),
            "applying",
            "Deployment istio-system/istiod",
            "patch",
            InstallKind::Deployment,
            Some("istio-system"),
        );
        assert_eq!(
            e.to_string(),
            "applying Deployment istio-system/istiod: the API server refused it: Deployment.apps \"istiod\" is invalid: spec.replicas: Invalid value: -1"
        );
    }
}
