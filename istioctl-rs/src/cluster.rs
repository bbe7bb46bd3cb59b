//! istioctl-rs's calls to the Kubernetes API, and what their failures tell
//! the user: the object, what was being done to it, and, when the API
//! server forbade it, the verb and resource the credentials lack.

use std::time::Duration;

use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::Value;

use crate::manifest::{FIELD_MANAGER, InstallKind, ManifestObject};

/// A kind of object istioctl-rs reads or writes: one of the install's
/// ([`InstallKind`]), or one it manages for users (the waypoint Gateway).
pub trait Kind: Copy + std::fmt::Display {
    /// For kube's dynamic API.
    fn api_resource(self) -> ApiResource;
    fn namespaced(self) -> bool;
    /// The resource's name in API paths and RBAC rules (`deployments`).
    fn plural(self) -> &'static str;
    /// `deployments.apps`, as RBAC errors and `kubectl auth can-i` name it.
    fn resource(self) -> String;
}

impl Kind for InstallKind {
    fn api_resource(self) -> ApiResource {
        InstallKind::api_resource(self)
    }
    fn namespaced(self) -> bool {
        InstallKind::namespaced(self)
    }
    fn plural(self) -> &'static str {
        InstallKind::plural(self)
    }
    fn resource(self) -> String {
        InstallKind::resource(self)
    }
}

/// `Deployment istio-system/istiod`, `Namespace demo`.
pub fn describe(kind: impl Kind, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if kind.namespaced() => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

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
    #[error(
        "{action} {object}: this cluster's API server has no {resource}; are its CRDs installed? ({message})"
    )]
    NoResource {
        action: String,
        object: String,
        resource: String,
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
    pub fn of(kind: impl Kind, namespace: Option<&'a str>) -> Scope<'a> {
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
            // A 404 naming no object: the resource itself is unknown (a
            // missing object, or namespace, is named in the details).
            kube::Error::Api(status)
                if status.code == 404
                    && status.details.as_ref().is_none_or(|d| d.name.is_empty()) =>
            {
                ClusterError::NoResource {
                    action: action.to_string(),
                    object: object.to_string(),
                    resource: resource.to_string(),
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

    /// [`ClusterError::of`] for a request on a [`Kind`].
    pub fn on(
        error: kube::Error,
        action: &str,
        object: &str,
        verb: &str,
        kind: impl Kind,
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
pub fn api(client: &Client, kind: impl Kind, namespace: Option<&str>) -> Api<DynamicObject> {
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
    server_side_apply(
        client,
        object.kind,
        object.namespace.as_deref(),
        &object.name,
        &object.body,
        true,
    )
    .await
    .map(drop)
}

/// Server-side apply of `body` as field manager `istioctl-rs`, with strict
/// field validation; `force` takes over fields another manager set to
/// other values (otherwise the API server refuses with a conflict).
/// Returns the object as stored.
pub async fn server_side_apply(
    client: &Client,
    kind: impl Kind,
    namespace: Option<&str>,
    name: &str,
    body: &Value,
    force: bool,
) -> Result<Value, ClusterError> {
    let mut params = PatchParams::apply(FIELD_MANAGER).validation_strict();
    if force {
        params = params.force();
    }
    api(client, kind, namespace)
        .patch(name, &params, &Patch::Apply(body))
        .await
        .map(|o| serde_json::to_value(o).expect("an object serialises"))
        .map_err(|e| {
            ClusterError::on(
                e,
                "applying",
                &describe(kind, namespace, name),
                "patch",
                kind,
                namespace,
            )
        })
}

/// Sets labels on an object (a JSON merge patch of `metadata.labels`: the
/// other labels stay).
pub async fn label(
    client: &Client,
    kind: impl Kind,
    namespace: Option<&str>,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<(), ClusterError> {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    let patch = serde_json::json!({"metadata": {"labels": labels}});
    api(client, kind, namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| {
            ClusterError::on(
                e,
                "labelling",
                &describe(kind, namespace, name),
                "patch",
                kind,
                namespace,
            )
        })
}

/// One object, as JSON; `None` when it does not exist.
pub async fn get(
    client: &Client,
    kind: impl Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ClusterError> {
    match api(client, kind, namespace).get(name).await {
        Ok(o) => Ok(Some(serde_json::to_value(o).expect("an object serialises"))),
        Err(e) if ClusterError::is_not_found(&e) => Ok(None),
        Err(e) => Err(ClusterError::on(
            e,
            "reading",
            &describe(kind, namespace, name),
            "get",
            kind,
            namespace,
        )),
    }
}

/// The objects of a kind matching a label selector (`""`: all), in one
/// namespace or (`None`) in every namespace.
pub async fn list(
    client: &Client,
    kind: impl Kind,
    namespace: Option<&str>,
    selector: &str,
) -> Result<Vec<DynamicObject>, ClusterError> {
    let mut params = ListParams::default();
    if !selector.is_empty() {
        params = params.labels(selector);
    }
    match api(client, kind, namespace).list(&params).await {
        Ok(list) => Ok(list.items),
        Err(e) => {
            let what = if selector.is_empty() {
                kind.plural().to_string()
            } else {
                format!("{} labelled {selector}", kind.plural())
            };
            Err(ClusterError::on(
                e, "listing", &what, "list", kind, namespace,
            ))
        }
    }
}

/// Deletes one object; gone already is fine. `foreground` deletes its
/// dependents (pods) before it.
pub async fn delete(
    client: &Client,
    kind: impl Kind,
    namespace: Option<&str>,
    name: &str,
    foreground: bool,
) -> Result<(), ClusterError> {
    let params = if foreground {
        DeleteParams::foreground()
    } else {
        DeleteParams::background()
    };
    let object = describe(kind, namespace, name);
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
            &describe(kind, namespace, &name),
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

    #[test]
    fn a_404_naming_no_object_is_a_missing_resource() {
        let e = ClusterError::on(
            status(404, "the server could not find the requested resource"),
            "listing",
            "deployments",
            "list",
            InstallKind::Deployment,
            None,
        );
        assert!(
            matches!(e, ClusterError::NoResource { .. }),
            "{e}: the resource itself is unknown"
        );
        assert!(
            e.to_string()
                .starts_with("listing deployments: this cluster's API server has no deployments.apps; are its CRDs installed?"),
            "{e}"
        );
        // A missing namespace is named in the details: not a missing resource.
        let mut missing_namespace = status(404, "namespaces \"demo\" not found");
        if let kube::Error::Api(s) = &mut missing_namespace {
            s.details =
                serde_json::from_value(serde_json::json!({"name": "demo", "kind": "namespaces"}))
                    .unwrap();
        }
        let e = ClusterError::on(
            missing_namespace,
            "applying",
            "Deployment demo/x",
            "patch",
            InstallKind::Deployment,
            Some("demo"),
        );
        assert!(matches!(e, ClusterError::Refused { .. }), "{e}");
    }
}
