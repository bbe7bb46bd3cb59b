//! The mesh's pods on Kubernetes, for the debugging views: which ztunnel
//! pod (named, on a node, or any), which istiod pod, and a GET to one of
//! their debug ports through a port-forward (the API server's
//! `pods/portforward`, kube-rs over WebSocket), so nothing but the
//! kubeconfig is needed: no reachable pod address, no `kubectl
//! port-forward` left running.
//!
//! Which pod, as upstream's `istioctl ztunnel-config` picks it
//! (istioctl/pkg/ztunnelconfig/ztunnelconfig.go, `runConfigDump` and
//! `PodOnNodeFromDaemonset`): a pod given as `name[.namespace]` (namespace
//! default: the mesh's), else the ztunnel on `--node`, else any ztunnel,
//! except for views that differ per ztunnel (certificates, connections),
//! which need one named when several run.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::admin_http::{self, Unreachable};

/// The label of ztunnel-rs's pods (manifests/install/ztunnel.yaml).
pub const ZTUNNEL_SELECTOR: &str = "app=ztunnel";
/// The label of istiod-rs's pods (manifests/install/istiod.yaml).
pub const ISTIOD_SELECTOR: &str = "app=istiod";
/// The namespace istioctl-rs installs the mesh into.
pub const DEFAULT_ISTIO_NAMESPACE: &str = "istio-system";

/// A port of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

impl std::fmt::Display for PodPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {}/{} port {} (port-forward)",
            self.namespace, self.name, self.port
        )
    }
}

/// A pod's port and the client that reaches it: where a view's answer
/// comes from on Kubernetes.
#[derive(Clone)]
pub struct Forwarded {
    pub client: Client,
    pub pod: PodPort,
}

impl Forwarded {
    /// GET `path` on the pod's port (see [`get`]); `component` (`ztunnel`,
    /// `istiod`) names the pod in the error.
    pub async fn get(
        &self,
        component: &'static str,
        path: &str,
        max_body: usize,
        timeout: Duration,
    ) -> Result<(String, Vec<u8>), ForwardError> {
        get(&self.client, &self.pod, path, max_body, timeout)
            .await
            .map_err(|Unreachable(reason)| ForwardError {
                component,
                path: path.to_string(),
                pod: self.pod.clone(),
                reason,
            })
    }
}

/// A GET through a port-forward that got no HTTP answer.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read {path} from {component} {pod}: {reason}. Check that the pod runs \
     (`kubectl -n {ns} get pod {name}`) and that you may port-forward to it \
     (`kubectl auth can-i create pods/portforward -n {ns}`)",
    ns = pod.namespace,
    name = pod.name
)]
pub struct ForwardError {
    pub component: &'static str,
    pub path: String,
    pub pod: PodPort,
    pub reason: String,
}

impl std::fmt::Debug for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Forwarded").field(&self.pod).finish()
    }
}

impl PartialEq for Forwarded {
    fn eq(&self, other: &Self) -> bool {
        self.pod == other.pod
    }
}

impl Eq for Forwarded {}

/// Which ztunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZtunnelChoice {
    /// `name[.namespace]`.
    Named(String),
    /// The one on this node.
    OnNode(String),
    /// Any running one; `single`: the view differs per ztunnel, so only
    /// when exactly one runs.
    Any { single: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("pod {namespace}/{name} not found{hint}")]
    NoPod {
        namespace: String,
        name: String,
        hint: &'static str,
    },
    #[error(
        "pod {namespace}/{name} is not a ztunnel (ztunnel-rs's pods carry the label {ZTUNNEL_SELECTOR}); \
         name a pod of `kubectl -n {namespace} get pods -l {ZTUNNEL_SELECTOR}` or pass --node NODE"
    )]
    NotZtunnel { namespace: String, name: String },
    #[error(
        "no running {component} pod (label {selector}) in namespace {namespace}{on_node}: is istio-rs \
         installed there (`istioctl-rs install`; another namespace: --istio-namespace)?"
    )]
    NoneRunning {
        component: &'static str,
        selector: &'static str,
        namespace: String,
        /// ` on node N`, or empty.
        on_node: String,
    },
    #[error(
        "this view differs per ztunnel and {count} run ({names}): name one (e.g. `{example}`) or \
         pass --node NODE"
    )]
    SeveralZtunnels {
        count: usize,
        names: String,
        example: String,
    },
    #[error("pod {namespace}/{name} is not scheduled on a node yet, so no ztunnel serves it")]
    NotScheduled { namespace: String, name: String },
}

/// `name.namespace` splits at the last `.`; otherwise `namespace`.
pub fn split_name(target: &str, namespace: &str) -> (String, String) {
    match target.rsplit_once('.') {
        Some((name, ns)) if !name.is_empty() && !ns.is_empty() => {
            (name.to_string(), ns.to_string())
        }
        _ => (target.to_string(), namespace.to_string()),
    }
}

/// The ztunnel's admin port (15000) of the chosen ztunnel pod.
pub async fn ztunnel(
    client: &Client,
    istio_namespace: &str,
    choice: &ZtunnelChoice,
) -> Result<PodPort, FindError> {
    let admin = api::ports::ADMIN;
    let name = match choice {
        ZtunnelChoice::Named(target) => {
            let (name, namespace) = split_name(target, istio_namespace);
            let pod = get_pod(client, &namespace, &name, "").await?;
            if !is_ztunnel(&pod) {
                return Err(FindError::NotZtunnel { namespace, name });
            }
            return Ok(PodPort {
                namespace,
                name,
                port: admin,
            });
        }
        ZtunnelChoice::OnNode(node) => {
            let running = running(client, istio_namespace, ZTUNNEL_SELECTOR, Some(node)).await?;
            first_running(
                running,
                "ztunnel",
                ZTUNNEL_SELECTOR,
                istio_namespace,
                Some(node),
            )?
        }
        ZtunnelChoice::Any { single } => {
            let running = running(client, istio_namespace, ZTUNNEL_SELECTOR, None).await?;
            if *single && running.len() > 1 {
                return Err(FindError::SeveralZtunnels {
                    count: running.len(),
                    names: running.join(", "),
                    example: format!("{}.{istio_namespace}", running[0]),
                });
            }
            first_running(running, "ztunnel", ZTUNNEL_SELECTOR, istio_namespace, None)?
        }
    };
    Ok(PodPort {
        namespace: istio_namespace.to_string(),
        name,
        port: admin,
    })
}

/// The ztunnel that serves pod `namespace/name`: the one on its node.
pub async fn ztunnel_of_pod(
    client: &Client,
    istio_namespace: &str,
    namespace: &str,
    name: &str,
) -> Result<PodPort, FindError> {
    let pod = get_pod(
        client,
        namespace,
        name,
        " (check the name and namespace: `kubectl get pods -A`)",
    )
    .await?;
    let Some(node) = pod.spec.and_then(|s| s.node_name) else {
        return Err(FindError::NotScheduled {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
    };
    ztunnel(client, istio_namespace, &ZtunnelChoice::OnNode(node)).await
}

/// istiod-rs's monitoring port (15014) on a running istiod pod.
pub async fn istiod(client: &Client, istio_namespace: &str) -> Result<PodPort, FindError> {
    let running = running(client, istio_namespace, ISTIOD_SELECTOR, None).await?;
    let name = first_running(running, "istiod", ISTIOD_SELECTOR, istio_namespace, None)?;
    Ok(PodPort {
        namespace: istio_namespace.to_string(),
        name,
        port: api::ports::ISTIOD_MONITORING,
    })
}

/// GET `path` on `pod`'s port through a port-forward: the status and the
/// body (at most `max_body` bytes), within `timeout`.
pub async fn get(
    client: &Client,
    pod: &PodPort,
    path: &str,
    max_body: usize,
    timeout: Duration,
) -> Result<(String, Vec<u8>), Unreachable> {
    let exchange = async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
        let mut forwarder = pods
            .portforward(&pod.name, &[pod.port])
            .await
            .map_err(|e| std::io::Error::other(format!("the port-forward failed: {e}")))?;
        let stream = forwarder
            .take_stream(pod.port)
            .ok_or_else(|| std::io::Error::other("the port-forward has no stream"))?;
        let error = forwarder.take_error(pod.port);
        let host = format!("localhost:{}", pod.port);
        let response = admin_http::exchange(stream, &host, path, max_body).await;
        // The kubelet reports a refused connection on the port's error
        // channel and ends the stream: say that rather than "no answer".
        let reported = match (&response, error) {
            (Ok(bytes), _) if !bytes.is_empty() => None,
            (_, Some(error)) => tokio::time::timeout(Duration::from_secs(2), error)
                .await
                .ok()
                .flatten(),
            _ => None,
        };
        forwarder.abort();
        match reported {
            Some(message) => Err(std::io::Error::other(message)),
            None => response,
        }
    };
    admin_http::within(timeout, exchange).await
}

/// The first of `running` (pods of `component`, found by `selector`), or
/// the error that none runs.
fn first_running(
    running: Vec<String>,
    component: &'static str,
    selector: &'static str,
    namespace: &str,
    node: Option<&str>,
) -> Result<String, FindError> {
    running
        .into_iter()
        .next()
        .ok_or_else(|| FindError::NoneRunning {
            component,
            selector,
            namespace: namespace.to_string(),
            on_node: node.map_or_else(String::new, |n| format!(" on node {n}")),
        })
}

async fn get_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    hint: &'static str,
) -> Result<Pod, FindError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.get_opt(name).await {
        Ok(Some(pod)) => Ok(pod),
        Ok(None) => Err(FindError::NoPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            hint,
        }),
        Err(source) => Err(FindError::Kube {
            what: format!("reading pod {namespace}/{name}"),
            source,
        }),
    }
}

fn is_ztunnel(pod: &Pod) -> bool {
    let (key, value) = ZTUNNEL_SELECTOR.split_once('=').expect("key=value");
    pod.metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(key))
        .is_some_and(|v| v == value)
}

/// Names of the running pods matching `selector` (on `node`), ready ones
/// first, then by name: the same answer for the same cluster.
async fn running(
    client: &Client,
    namespace: &str,
    selector: &str,
    node: Option<&str>,
) -> Result<Vec<String>, FindError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut params = ListParams::default().labels(selector);
    if let Some(node) = node {
        params = params.fields(&format!("spec.nodeName={node}"));
    }
    let list = pods.list(&params).await.map_err(|source| FindError::Kube {
        what: format!("listing the pods labelled {selector} in namespace {namespace}"),
        source,
    })?;
    let mut found: Vec<(bool, String)> = list
        .items
        .into_iter()
        .filter(|pod| {
            pod.metadata.deletion_timestamp.is_none()
                && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .filter_map(|pod| {
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            Some((!ready, pod.metadata.name?))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, name)| name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_last_dot() {
        assert_eq!(
            split_name("ztunnel-abc.istio-system", "x"),
            ("ztunnel-abc".into(), "istio-system".into())
        );
        assert_eq!(
            split_name("ztunnel-abc", "ns"),
            ("ztunnel-abc".into(), "ns".into())
        );
        assert_eq!(split_name("a.", "ns"), ("a.".into(), "ns".into()));
    }
}
