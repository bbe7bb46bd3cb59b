//! Deployments as the local cluster runs them: [`deployment_pods`] is the
//! ReplicaSet's part (the pods a Deployment asks for, from its pod
//! template), shared by the waypoint Deployments istiod-rs provisions
//! ([`crate::mesh::deployment_pods`]) and the Deployments applied to the
//! cluster ([`crate::local`]'s Deployment controller); [`sample_image`] is
//! the image table of the latter: there is no registry, so an image is a
//! name standing for what the pod runs.
//!
//! The sample images and what stands in for them:
//! - `echo` (and `client`): the e2e app of that name, with the container's
//!   `args` (`command` must be empty or the image's name).
//! - upstream's Bookinfo images `examples-bookinfo-<app>-<version>`
//!   (`details`, `ratings`, `reviews`, `productpage`): the `echo` app
//!   answering HTTP on each container port and, per request, calling the
//!   services the real app calls, through the mesh, at the Service address
//!   kubelet gives the pod (`$(<SERVICE>_SERVICE_HOST)`, see
//!   [`crate::kube::node::env::service_env`]) and the real app's paths: as
//!   upstream's samples/bookinfo/src/productpage/productpage.py (`GET
//!   /productpage` asks `details:9080/details/0`, then
//!   `reviews:9080/reviews/0`) and
//!   samples/bookinfo/src/reviews/reviews-application/src/main/java/application/rest/LibertyRestEndpoint.java
//!   (`ratings:9080/ratings/<id>`, only when `ENABLE_RATINGS` is set, which
//!   the v2 and v3 images do). The replies are [`crate::apps::EchoReply`]s
//!   with the downstream ones nested, not the real app's pages.
//! - `curl` (upstream's `curlimages/curl`, which the curl sample runs as
//!   `sleep infinity`): a pod that only holds its network; the `client` app
//!   is exec'd in it, as one execs curl.
//!
//! Any other image is an error naming the Deployment, the field and this table.

use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cluster::{AppCommand, NamedPort, PodRequest, PodVolume, ReadinessProbe};
use crate::kube::node::images::image_name;
use crate::objects::Object;

/// Where the sample image table is, for messages.
pub const TABLE: &str = "e2e/src/deployments.rs (sample_image)";

/// A problem with one field of a container: the field (relative to the
/// container) and what is wrong.
pub type FieldProblem = (String, String);

/// What runs for a Deployment's container: the app, or `None` for a pod
/// that only holds its network. The container's `ports` are given for the
/// app to listen on.
pub type ImageRunner<'a> =
    dyn Fn(&Container, &[NamedPort]) -> Result<Option<AppCommand>, FieldProblem> + 'a;

/// The pods of one Deployment, as its ReplicaSet would create them: the
/// pod template's labels, service account, container ports, `env` (left
/// for the node to resolve), volumes with their mounts, and
/// `readinessProbe` (`httpGet` or `tcpSocket`, a named port resolved
/// against the container's ports); what runs is `image`'s answer.
/// `spec.replicas` pods (default 1) named `<deployment>-<n>`, placed on
/// `nodes` in turn starting at `nodes[first_node % len]`. Anything the local
/// cluster cannot run as written is an error naming the Deployment and the
/// field.
pub fn deployment_pods(
    deployment: &Object,
    nodes: &[String],
    first_node: usize,
    image: &ImageRunner<'_>,
) -> Result<Vec<PodRequest>, String> {
    let namespace = deployment.namespace().unwrap_or("default");
    let name = deployment.name();
    let bad =
        |field: &str, reason: String| format!("Deployment {namespace}/{name}: {field}: {reason}");
    let typed: Deployment = deployment
        .to_typed()
        .map_err(|e| bad("(object)", e.to_string()))?;
    let spec = typed.spec.unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let replicas = usize::try_from(replicas)
        .map_err(|_| bad("spec.replicas", format!("{replicas} is negative")))?;
    let template = spec.template;
    let meta = template.metadata.unwrap_or_default();
    let pod_spec = template
        .spec
        .ok_or_else(|| bad("spec.template.spec", "missing".into()))?;
    let [container] = pod_spec.containers.as_slice() else {
        return Err(bad(
            "spec.template.spec.containers",
            format!(
                "{} containers; the local cluster runs a pod's one container",
                pod_spec.containers.len()
            ),
        ));
    };
    let field = |f: &str| format!("spec.template.spec.containers[0].{f}");
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(bad(
            &field("envFrom"),
            "not supported by the local cluster".into(),
        ));
    }
    let ports: Vec<NamedPort> = container
        .ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| {
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    bad(
                        &field(&format!("ports[{i}].containerPort")),
                        format!("{} is not a port", p.container_port),
                    )
                })?;
            Ok(NamedPort {
                name: p.name.clone().unwrap_or_default(),
                port,
            })
        })
        .collect::<Result<_, String>>()?;
    let command = image(container, &ports).map_err(|(f, reason)| bad(&field(&f), reason))?;
    if command.is_none() && container.readiness_probe.is_some() {
        return Err(bad(
            &field("readinessProbe"),
            "the image runs nothing to probe in the local cluster".into(),
        ));
    }
    // A pod that runs nothing listens on nothing.
    let ports = if command.is_some() { ports } else { Vec::new() };
    let port_of = |f: &str, port: &IntOrString| -> Result<u16, String> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(f, format!("{n} is not a port"))),
            IntOrString::String(named) => ports
                .iter()
                .find(|p| p.name == *named)
                .map(|p| p.port)
                .ok_or_else(|| bad(f, format!("no container port is named {named:?}"))),
        }
    };
    let readiness = match &container.readiness_probe {
        None => None,
        Some(probe) => Some(if let Some(get) = &probe.http_get {
            if get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return Err(bad(
                    &field("readinessProbe.httpGet.scheme"),
                    "only HTTP is probed by the local cluster".into(),
                ));
            }
            ReadinessProbe::HttpGet {
                port: port_of(&field("readinessProbe.httpGet.port"), &get.port)?,
                path: get.path.clone().unwrap_or_else(|| "/".into()),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            ReadinessProbe::Tcp {
                port: port_of(&field("readinessProbe.tcpSocket.port"), &tcp.port)?,
            }
        } else {
            return Err(bad(
                &field("readinessProbe"),
                "only httpGet and tcpSocket probes are run by the local cluster".into(),
            ));
        }),
    };
    let pod_volumes = pod_spec.volumes.unwrap_or_default();
    let volumes = container
        .volume_mounts
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| {
            if m.sub_path.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(bad(
                    &field(&format!("volumeMounts[{i}].subPath")),
                    "not supported by the local cluster".into(),
                ));
            }
            let volume = pod_volumes
                .iter()
                .find(|v| v.name == m.name)
                .ok_or_else(|| {
                    bad(
                        &field(&format!("volumeMounts[{i}].name")),
                        format!(
                            "no volume is named {:?} in spec.template.spec.volumes",
                            m.name
                        ),
                    )
                })?;
            Ok(PodVolume {
                volume: volume.clone(),
                mount_path: m.mount_path.clone(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if nodes.is_empty() && replicas > 0 {
        return Err(bad(
            "spec.replicas",
            "the cluster has no node to run pods on".into(),
        ));
    }
    Ok((0..replicas)
        .map(|n| PodRequest {
            namespace: namespace.to_string(),
            name: format!("{name}-{n}"),
            node: Some(nodes[(first_node + n) % nodes.len()].clone()),
            labels: meta.labels.clone().unwrap_or_default(),
            service_account: pod_spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
            command: command.clone(),
            ports: ports.clone(),
            readiness: readiness.clone(),
            env: container.env.clone().unwrap_or_default(),
            volumes: volumes.clone(),
        })
        .collect())
}

/// The image table of the Deployments applied to the local cluster (see
/// the module's documentation): what runs for `container`, whose ports are
/// `ports`.
pub fn sample_image(
    container: &Container,
    ports: &[NamedPort],
) -> Result<Option<AppCommand>, FieldProblem> {
    let image = container.image.clone().unwrap_or_default();
    let name = image_name(&image);
    let args = container.args.clone().unwrap_or_default();
    let command = container.command.clone().unwrap_or_default();
    let own_command = |app: &str| match command.as_slice() {
        [] => Ok(()),
        [program] if Path::new(program).file_name().is_some_and(|f| f == app) => Ok(()),
        other => Err((
            "command".to_string(),
            format!("{other:?}: the local cluster runs the image's {app} only"),
        )),
    };
    if name == "echo" || name == "client" {
        own_command(name)?;
        return Ok(Some(AppCommand::new(name, args)));
    }
    if let Some(bookinfo) = name.strip_prefix(BOOKINFO_IMAGE_PREFIX) {
        return bookinfo_app(bookinfo, ports)
            .map(Some)
            .map_err(|reason| ("image".to_string(), format!("{image:?}: {reason}")));
    }
    if name == CURL_IMAGE {
        return Ok(None);
    }
    Err((
        "image".into(),
        format!("{image:?} is not in the local cluster's image table {TABLE}"),
    ))
}

/// Upstream's Bookinfo images: `examples-bookinfo-<app>-<version>`.
const BOOKINFO_IMAGE_PREFIX: &str = "examples-bookinfo-";
/// Upstream's curl sample's image (`curlimages/curl`).
const CURL_IMAGE: &str = "curl";
/// The port every Bookinfo service listens on, and is called on.
const BOOKINFO_PORT: u16 = 9080;

/// What a Bookinfo app calls per request: the Service and the path.
fn bookinfo_calls(app: &str, version: &str) -> Option<&'static [(&'static str, &'static str)]> {
    const PAGE: &[(&str, &str)] = &[("details", "/details/0"), ("reviews", "/reviews/0")];
    const RATED: &[(&str, &str)] = &[("ratings", "/ratings/0")];
    Some(match (app, version) {
        ("productpage", _) => PAGE,
        // reviews-v1 has ratings off (no ENABLE_RATINGS); v2 and v3 on.
        ("reviews", "v1") => &[],
        ("reviews", _) => RATED,
        ("details" | "ratings", _) => &[],
        _ => return None,
    })
}

/// `echo` standing in for the Bookinfo app `<app>-<version>` (see the module's
/// documentation).
fn bookinfo_app(app_version: &str, ports: &[NamedPort]) -> Result<AppCommand, String> {
    let (app, version) = app_version.rsplit_once('-').ok_or("not <app>-<version>")?;
    let calls = bookinfo_calls(app, version).ok_or_else(|| {
        format!("{app:?} is not a Bookinfo app (details, ratings, reviews, productpage)")
    })?;
    if ports.is_empty() {
        return Err(format!(
            "the Bookinfo {app} app needs a containerPort to listen on (upstream's is {BOOKINFO_PORT})"
        ));
    }
    let mut args = Vec::new();
    for p in ports {
        args.extend(["--http".to_string(), p.port.to_string()]);
    }
    for (service, path) in calls {
        let var = service.to_ascii_uppercase();
        args.extend([
            "--call".to_string(),
            format!("{service}=http://$({var}_SERVICE_HOST):{BOOKINFO_PORT}{path}"),
        ]);
    }
    Ok(AppCommand::echo(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKINFO: &str = include_str!("../../manifests/samples/bookinfo/bookinfo.yaml");
    const CURL: &str = include_str!("../../manifests/samples/curl/curl.yaml");

    fn nodes() -> Vec<String> {
        vec!["node0".into(), "node1".into()]
    }

    fn pods_of(yaml: &str) -> Vec<PodRequest> {
        Object::from_yaml(yaml)
            .unwrap()
            .iter()
            .filter(|o| o.kind() == "Deployment")
            .enumerate()
            .flat_map(|(i, d)| deployment_pods(d, &nodes(), i, &sample_image).unwrap())
            .collect()
    }

    #[test]
    fn bookinfo_runs_as_echo_calling_what_each_app_calls() {
        let pods = pods_of(BOOKINFO);
        let by_name = |n: &str| pods.iter().find(|p| p.name == n).unwrap();
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "details-v1-0",
                "ratings-v1-0",
                "reviews-v1-0",
                "reviews-v2-0",
                "reviews-v3-0",
                "productpage-v1-0"
            ]
        );
        let page = by_name("productpage-v1-0");
        assert_eq!(page.service_account, "bookinfo-productpage");
        assert_eq!(page.labels["app"], "productpage");
        assert_eq!(page.labels["version"], "v1");
        assert_eq!(
            page.ports,
            [NamedPort {
                name: String::new(),
                port: 9080
            }]
        );
        assert_eq!(
            page.command.as_ref().unwrap().argv(),
            [
                "echo",
                "--http",
                "9080",
                "--call",
                "details=http://$(DETAILS_SERVICE_HOST):9080/details/0",
                "--call",
                "reviews=http://$(REVIEWS_SERVICE_HOST):9080/reviews/0"
            ]
        );
        let calls = |n: &str| {
            by_name(n)
                .command
                .as_ref()
                .unwrap()
                .args
                .iter()
                .filter(|a| a.contains('='))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert!(calls("reviews-v1-0").is_empty());
        for v in ["reviews-v2-0", "reviews-v3-0"] {
            assert_eq!(
                calls(v),
                ["ratings=http://$(RATINGS_SERVICE_HOST):9080/ratings/0"]
            );
        }
        assert!(calls("details-v1-0").is_empty() && calls("ratings-v1-0").is_empty());
        // The emptyDir volumes and env of reviews are kept for the node.
        let reviews = by_name("reviews-v2-0");
        assert_eq!(reviews.volumes.len(), 2);
        assert_eq!(reviews.env[0].name, "LOG_DIR");
        // One Deployment after the other, starting on the next node.
        let placed: Vec<&str> = pods.iter().map(|p| p.node.as_deref().unwrap()).collect();
        assert_eq!(
            placed,
            ["node0", "node1", "node0", "node1", "node0", "node1"]
        );
    }

    #[test]
    fn curl_holds_only_its_network() {
        let pods = pods_of(CURL);
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].name, "curl-0");
        assert_eq!(pods[0].service_account, "curl");
        assert_eq!(pods[0].command, None);
        assert!(pods[0].ports.is_empty());
    }

    #[test]
    fn an_unknown_image_or_app_names_the_deployment_and_field() {
        let with_image = |image: &str| {
            BOOKINFO
                .split("---")
                .find(|d| d.contains("name: ratings-v1"))
                .unwrap()
                .replace("docker.io/istio/examples-bookinfo-ratings-v1:1.20.3", image)
        };
        let err = |image: &str| {
            let objects = Object::from_yaml(&with_image(image)).unwrap();
            deployment_pods(&objects[0], &nodes(), 0, &sample_image).unwrap_err()
        };
        let e = err("nginx:1.27");
        assert!(
            e.starts_with("Deployment default/ratings-v1: spec.template.spec.containers[0].image: \"nginx:1.27\" is not in the local cluster's image table"),
            "{e}"
        );
        let e = err("istio/examples-bookinfo-mongodb-v1:1.20.3");
        assert!(e.contains("\"mongodb\" is not a Bookinfo app"), "{e}");
        let e = err("istio/examples-bookinfo:1");
        assert!(e.contains("containers[0].image"), "{e}");
        let objects = Object::from_yaml(&with_image("echo").replace(
            "containers:\n      - name: ratings",
            "containers:\n      - name: ratings\n        command: [nginx]",
        ))
        .unwrap();
        let e = deployment_pods(&objects[0], &nodes(), 0, &sample_image).unwrap_err();
        assert!(e.contains("containers[0].command: [\"nginx\"]"), "{e}");
    }
}
