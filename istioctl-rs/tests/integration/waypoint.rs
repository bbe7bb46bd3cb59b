//! `istioctl-rs waypoint` against a scripted API server: the exact
//! requests (the namespace read, the not-forced server-side apply and its
//! body, the reads of `--wait`, the namespace label patch, the list URLs,
//! the deletes), what is printed, and the refusals: a namespace that
//! already uses another waypoint, a name istiod-rs took on demand, the
//! deletion of an on-demand waypoint some rule needs, a missing
//! permission or CRD.

use crate::support::api_server;

use std::collections::BTreeMap;
use std::time::Duration;

use api_server::{Recorded, list, status};
use istioctl_rs::waypoint::{
    self, ApplyOptions, Selection, Spec, TrafficType, Waypoint, WaypointError,
};
use serde_json::{Value, json};

const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/demo/gateways";
const NAMESPACE: &str = "/api/v1/namespaces/demo";

fn gateway_path(name: &str) -> String {
    format!("{GATEWAYS}/{name}")
}

/// A Gateway as the API server holds it.
fn gateway(
    namespace: &str,
    name: &str,
    class: &str,
    labels: Value,
    annotations: Value,
    programmed: Option<(&str, &str, &str)>,
) -> Value {
    let accepted =
        json!({"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""});
    let conditions: Vec<Value> = std::iter::once(accepted)
        .chain(programmed.map(|(status, reason, message)| {
            json!({"type": "Programmed", "status": status, "reason": reason, "message": message})
        }))
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        "status": {"conditions": conditions},
    })
}

/// The on-demand waypoint istiod-rs made for ServiceAccount `reviews`.
fn on_demand() -> Value {
    gateway(
        "demo",
        "reviews-waypoint",
        "istio-waypoint",
        json!({"istio-rs.io/on-demand-waypoint": "true"}),
        json!({"istio.io/for-service-account": "reviews",
               "istio-rs.io/needed-by": "AuthorizationPolicy demo/only-get,HTTPRoute demo/reviews-v2"}),
        Some((
            "False",
            "Pending",
            "Deployment demo/reviews-waypoint has no ready replica",
        )),
    )
}

/// A user's waypoint for workloads.
fn users() -> Value {
    gateway(
        "demo",
        "waypoint",
        "istio-waypoint",
        json!({"istio.io/waypoint-for": "workload"}),
        json!({}),
        Some(("True", "Programmed", "")),
    )
}

/// An ingress Gateway: no waypoint.
fn ingress() -> Value {
    gateway(
        "demo",
        "ingress",
        "istio",
        json!({}),
        json!({}),
        Some(("True", "Programmed", "")),
    )
}

/// A cluster with one namespace `demo` and its Gateways.
struct Fake {
    /// `None`: the namespace does not exist.
    namespace_labels: Option<Value>,
    gateways: BTreeMap<String, Value>,
    /// Reads of an applied Gateway before istiod-rs programs it (`None`: never).
    programmed_after: Option<usize>,
    reads: usize,
    forbid_apply: bool,
    no_crd: bool,
}

impl Fake {
    fn new(namespace_labels: Value) -> Self {
        Fake {
            namespace_labels: Some(namespace_labels),
            gateways: BTreeMap::new(),
            programmed_after: Some(1),
            reads: 0,
            forbid_apply: false,
            no_crd: false,
        }
    }

    fn with(mut self, gateways: &[Value]) -> Self {
        for g in gateways {
            let ns = g["metadata"]["namespace"].as_str().unwrap();
            let name = g["metadata"]["name"].as_str().unwrap();
            self.gateways.insert(
                format!("/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/gateways/{name}"),
                g.clone(),
            );
        }
        self
    }

    fn respond(&mut self, r: &Recorded) -> (u16, Value) {
        let p = r.path.as_str();
        let no_resource = || {
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        };
        let missing = |name: &str| {
            let (code, mut body) = status(404, "NotFound", &format!("\"{name}\" not found"));
            body["details"] = json!({"name": name, "kind": "gateways"});
            (code, body)
        };
        match (r.method.as_str(), p) {
            ("GET", NAMESPACE) => match &self.namespace_labels {
                Some(labels) => (
                    200,
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": labels}}),
                ),
                None => {
                    let (code, mut body) = status(404, "NotFound", "namespaces \"demo\" not found");
                    body["details"] = json!({"name": "demo", "kind": "namespaces"});
                    (code, body)
                }
            },
            ("PATCH", NAMESPACE) => {
                let labels = self.namespace_labels.as_mut().unwrap();
                for (k, v) in r.body["metadata"]["labels"].as_object().unwrap() {
                    labels[k] = v.clone();
                }
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": labels}}),
                )
            }
            _ if self.no_crd => no_resource(),
            ("GET", "/apis/gateway.networking.k8s.io/v1/gateways") => {
                list(self.gateways.values().cloned().collect())
            }
            ("GET", GATEWAYS) => list(
                self.gateways
                    .iter()
                    .filter(|(path, _)| path.starts_with(GATEWAYS))
                    .map(|(_, g)| g.clone())
                    .collect(),
            ),
            ("PATCH", _) if self.forbid_apply => status(
                403,
                "Forbidden",
                "gateways.gateway.networking.k8s.io \"waypoint\" is forbidden: User \"dev\" cannot create resource \"gateways\" in API group \"gateway.networking.k8s.io\" in the namespace \"demo\"",
            ),
            ("PATCH", _) => {
                let mut stored = r.body.clone();
                stored["status"] = json!({"conditions": [{"type": "Programmed", "status": "Unknown", "reason": "Pending", "message": "Waiting for controller"}]});
                self.gateways.insert(p.to_string(), stored.clone());
                (200, stored)
            }
            ("GET", _) => {
                let name = p.rsplit('/').next().unwrap().to_string();
                let programmed = self.programmed_after;
                let Some(g) = self.gateways.get_mut(p) else {
                    return missing(&name);
                };
                self.reads += 1;
                if programmed.is_some_and(|n| self.reads > n) {
                    g["status"]["conditions"] = json!([{"type": "Programmed", "status": "True", "reason": "Programmed", "message": "Resource programmed, assigned to service(s) waypoint.demo.svc.cluster.local:15008"}]);
                }
                (200, g.clone())
            }
            ("DELETE", _) => match self.gateways.remove(p) {
                Some(_) => (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ),
                None => missing("x"),
            },
            _ => panic!("unexpected {}", r.line()),
        }
    }
}

/// Runs `f` against `fake`; the requests and what `f` returned.
async fn run<T>(mut fake: Fake, f: impl AsyncFnOnce(&kube::Client) -> T) -> (Vec<Recorded>, T) {
    let (client, server) = api_server::client(move |r| fake.respond(r));
    let out = f(&client).await;
    drop(client);
    (server.await.unwrap(), out)
}

/// [`run`] of a command that writes to `out`; also what it wrote.
async fn run_writing<T>(
    fake: Fake,
    f: impl AsyncFnOnce(&kube::Client, &mut Vec<u8>) -> T,
) -> (Vec<Recorded>, T, String) {
    let mut out = Vec::new();
    let (requests, result) = run(fake, async |client| f(client, &mut out).await).await;
    (requests, result, String::from_utf8(out).unwrap())
}

/// The requests of a delete in `demo`: the list, then one DELETE a name.
fn deletes(names: &[&str]) -> Vec<String> {
    std::iter::once(format!("GET {GATEWAYS}"))
        .chain(names.iter().map(|n| format!("DELETE {}", gateway_path(n))))
        .collect()
}

fn lines(requests: &[Recorded]) -> Vec<String> {
    requests.iter().map(Recorded::line).collect()
}

fn spec() -> Spec {
    Spec {
        namespace: Some("demo".into()),
        ..Spec::default()
    }
}

fn fast(mut options: ApplyOptions) -> ApplyOptions {
    options.poll = Duration::from_millis(1);
    options
}

#[test]
fn gateway_has_upstreams_shape_and_our_service_account_annotation() {
    let plain = waypoint::gateway(&Spec::default()).unwrap();
    assert_eq!(
        plain,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        })
    );
    let per_account = waypoint::gateway(&Spec {
        name: "reviews-wp".into(),
        namespace: Some("demo".into()),
        traffic_type: Some(TrafficType::Workload),
        service_account: Some("reviews".into()),
    })
    .unwrap();
    assert_eq!(
        per_account["metadata"],
        json!({"name": "reviews-wp", "namespace": "demo",
               "labels": {"istio.io/waypoint-for": "workload"},
               "annotations": {"istio.io/for-service-account": "reviews"}})
    );
    // An empty name is the default one; `none` is reserved (as upstream).
    let empty = waypoint::gateway(&Spec {
        name: String::new(),
        ..Spec::default()
    })
    .unwrap();
    assert_eq!(empty["metadata"]["name"], "waypoint");
    let none = waypoint::gateway(&Spec {
        name: "none".into(),
        ..Spec::default()
    });
    assert!(matches!(none, Err(WaypointError::ReservedName)), "{none:?}");
}

#[tokio::test]
async fn apply_waits_for_programmed_then_enrols_the_namespace() {
    let fake = Fake::new(json!({"istio.io/dataplane-mode": "ambient"}));
    let mut options = fast(ApplyOptions::new(Spec {
        traffic_type: Some(TrafficType::All),
        service_account: Some("reviews".into()),
        ..spec()
    }));
    options.enroll_namespace = true;
    options.wait = true;
    let (requests, result, out) = run_writing(fake, async |client, out| {
        waypoint::apply(client, &options, out).await
    })
    .await;
    result.unwrap();
    let gw = gateway_path("waypoint");
    assert_eq!(
        lines(&requests),
        [
            format!("GET {NAMESPACE}"),
            format!("GET {gw}"),
            format!("PATCH {gw}"),
            // Pending, then Programmed.
            format!("GET {gw}"),
            format!("GET {gw}"),
            format!("PATCH {NAMESPACE}"),
        ]
    );
    let apply = &requests[2];
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert_eq!(
        apply.query,
        BTreeMap::from([
            ("fieldManager".to_string(), "istioctl-rs".to_string()),
            ("fieldValidation".to_string(), "Strict".to_string()),
        ]),
        "not forced: a conflict with another manager is the user's to see"
    );
    assert_eq!(apply.body, waypoint::gateway(&options.spec).unwrap());
    assert_eq!(
        apply.body["metadata"]["annotations"]["istio.io/for-service-account"],
        "reviews"
    );
    assert_eq!(
        apply.body["metadata"]["labels"]["istio.io/waypoint-for"],
        "all"
    );
    let label = &requests[5];
    assert_eq!(label.content_type, "application/merge-patch+json");
    assert_eq!(
        label.body,
        json!({"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}})
    );
    assert_eq!(
        out,
        "waypoint demo/waypoint applied\nwaypoint demo/waypoint is ready\nnamespace demo labelled istio.io/use-waypoint=waypoint\n"
    );
}

#[tokio::test]
async fn enrolling_a_namespace_that_uses_another_waypoint_needs_overwrite() {
    let labels = json!({"istio.io/use-waypoint": "theirs"});
    let mut options = fast(ApplyOptions::new(spec()));
    options.enroll_namespace = true;
    let (requests, result, out) = run_writing(Fake::new(labels.clone()), async |client, out| {
        waypoint::apply(client, &options, out).await
    })
    .await;
    result.unwrap();
    assert_eq!(
        lines(&requests),
        [format!("GET {NAMESPACE}")],
        "nothing applied"
    );
    assert_eq!(
        out,
        "Warning: namespace demo already uses waypoint theirs (istio.io/use-waypoint=theirs); nothing applied. Pass --overwrite to apply waypoint and enrol the namespace with it.\n"
    );

    options.overwrite = true;
    let (requests, result, out) = run_writing(Fake::new(labels), async |client, out| {
        waypoint::apply(client, &options, out).await
    })
    .await;
    result.unwrap();
    assert_eq!(
        requests.last().unwrap().line(),
        format!("PATCH {NAMESPACE}")
    );
    assert_eq!(
        requests.last().unwrap().body["metadata"]["labels"]["istio.io/use-waypoint"],
        "waypoint"
    );
    // Not ambient: a warning with the command, and the apply goes on.
    assert!(
        out.starts_with("Warning: namespace demo is not enrolled in ambient; consider `kubectl label namespace demo istio.io/dataplane-mode=ambient`\nwaypoint demo/waypoint applied\n"),
        "{out}"
    );
}

async fn apply_error(fake: Fake) -> (Vec<String>, String) {
    let options = ApplyOptions::new(spec());
    let (requests, result) = run(fake, async |client| {
        waypoint::apply(client, &options, &mut Vec::new()).await
    })
    .await;
    (lines(&requests), result.unwrap_err().to_string())
}

#[tokio::test]
async fn apply_errors_say_what_is_missing() {
    let forbidden: fn(&mut Fake) = |f| f.forbid_apply = true;
    let no_crd: fn(&mut Fake) = |f| f.no_crd = true;
    for (break_it, expected) in [
        (
            forbidden,
            "applying Gateway demo/waypoint was forbidden: these credentials may not create gateways.gateway.networking.k8s.io in namespace demo;",
        ),
        (
            no_crd,
            "applying Gateway demo/waypoint: this cluster's API server has no gateways.gateway.networking.k8s.io; are its CRDs installed?",
        ),
    ] {
        let mut fake = Fake::new(json!({}));
        break_it(&mut fake);
        let (_, error) = apply_error(fake).await;
        assert!(error.starts_with(expected), "{error}");
    }

    let mut fake = Fake::new(json!({}));
    fake.namespace_labels = None;
    let (requests, error) = apply_error(fake).await;
    assert_eq!(error, "namespace demo not found");
    assert_eq!(requests, [format!("GET {NAMESPACE}")]);

    // The name of a waypoint istiod-rs created on demand is not taken over.
    let taken = gateway(
        "demo",
        "waypoint",
        "istio-waypoint",
        json!({"istio-rs.io/on-demand-waypoint": "true"}),
        json!({}),
        None,
    );
    let (requests, error) = apply_error(Fake::new(json!({})).with(&[taken])).await;
    assert!(
        error.contains("was created on demand by istiod-rs"),
        "{error}"
    );
    assert!(
        !requests.iter().any(|l| l.starts_with("PATCH")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn wait_gives_up_with_the_programmed_condition() {
    let mut fake = Fake::new(json!({}));
    fake.programmed_after = None;
    let mut options = fast(ApplyOptions::new(spec()));
    options.wait = true;
    options.timeout = Duration::from_millis(30);
    let (requests, result) = run(fake, async |client| {
        waypoint::apply(client, &options, &mut Vec::new()).await
    })
    .await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.starts_with("waypoint demo/waypoint is not Programmed after 30ms (Programmed Unknown, Pending: Waiting for controller)"),
        "{error}"
    );
    let reads = requests
        .iter()
        .filter(|r| r.line() == format!("GET {}", gateway_path("waypoint")))
        .count();
    assert!(reads > 2, "it polled: {reads} reads");
}

#[tokio::test]
async fn list_shows_upstreams_columns_and_the_on_demand_ones() {
    let fake = Fake::new(json!({})).with(&[users(), on_demand(), ingress()]);
    let (requests, waypoints) = run(fake, async |client| {
        waypoint::list(client, Some("demo")).await.unwrap()
    })
    .await;
    assert_eq!(lines(&requests), [format!("GET {GATEWAYS}")]);
    assert!(requests[0].query.is_empty(), "{:?}", requests[0].query);
    assert_eq!(
        waypoint::list_table(&waypoints, false),
        "\
NAME                 REVISION     TRAFFIC TYPE     PROGRAMMED     ON DEMAND     NEEDED BY
reviews-waypoint     default      all              False          true          AuthorizationPolicy demo/only-get,HTTPRoute demo/reviews-v2
waypoint             default      workload         True           false         -
"
    );
    assert_eq!(
        serde_json::to_value(&waypoints[0]).unwrap(),
        json!({
            "namespace": "demo", "name": "reviews-waypoint", "revision": "default",
            "trafficType": "all", "serviceAccount": "reviews",
            "programmed": {"status": "False", "reason": "Pending",
                           "message": "Deployment demo/reviews-waypoint has no ready replica"},
            "onDemand": true,
            "neededBy": ["AuthorizationPolicy demo/only-get", "HTTPRoute demo/reviews-v2"],
        })
    );

    let other = gateway(
        "apps",
        "w",
        "istio-waypoint",
        json!({"istio.io/rev": "canary"}),
        json!({}),
        None,
    );
    let fake = Fake::new(json!({})).with(&[users(), other]);
    let (requests, waypoints) = run(fake, async |client| {
        waypoint::list(client, None).await.unwrap()
    })
    .await;
    assert_eq!(
        lines(&requests),
        ["GET /apis/gateway.networking.k8s.io/v1/gateways"]
    );
    assert_eq!(
        waypoint::list_table(&waypoints, true),
        "\
NAMESPACE     NAME         REVISION     TRAFFIC TYPE     PROGRAMMED     ON DEMAND     NEEDED BY
apps          w            canary       service          False          false         -
demo          waypoint     default      workload         True           false         -
"
    );
    assert_eq!(waypoint::list_table(&[], false), "No waypoints found.\n");
}

#[tokio::test]
async fn list_without_the_gateway_crds_says_so() {
    let mut fake = Fake::new(json!({}));
    fake.no_crd = true;
    let (_, result) = run(fake, async |client| {
        waypoint::list(client, Some("demo")).await
    })
    .await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.starts_with(
            "listing gateways: this cluster's API server has no gateways.gateway.networking.k8s.io"
        ),
        "{error}"
    );
}

async fn delete(fake: Fake, selection: Selection, force: bool) -> (Vec<String>, String, String) {
    let (requests, result, out) = run_writing(fake, async |client, out| {
        waypoint::delete(client, "demo", &selection, force, out).await
    })
    .await;
    let error = result.err().map(|e| e.to_string()).unwrap_or_default();
    (lines(&requests), out, error)
}

#[tokio::test]
async fn delete_refuses_on_demand_waypoints_their_rules_need_unless_forced() {
    let names = Selection::Names(vec![
        "waypoint".into(),
        "reviews-waypoint".into(),
        "ingress".into(),
    ]);
    let fake = || Fake::new(json!({})).with(&[users(), on_demand(), ingress()]);
    let (requests, out, error) = delete(fake(), names.clone(), false).await;
    assert_eq!(requests, deletes(&[]), "nothing deleted");
    assert_eq!(out, "waypoint demo/ingress not found\n", "not a waypoint");
    assert_eq!(
        error,
        "waypoint demo/reviews-waypoint was created on demand by istiod-rs and is needed by AuthorizationPolicy demo/only-get, HTTPRoute demo/reviews-v2: istiod-rs recreates it as long as a rule needs it, so delete or change those rules instead (--force deletes it anyway); nothing was deleted"
    );

    let (requests, out, error) = delete(fake(), names, true).await;
    assert_eq!(error, "");
    assert_eq!(requests, deletes(&["waypoint", "reviews-waypoint"]));
    assert_eq!(
        out,
        "waypoint demo/ingress not found\nwaypoint demo/waypoint deleted\nwaypoint demo/reviews-waypoint deleted; istiod-rs recreates it while AuthorizationPolicy demo/only-get, HTTPRoute demo/reviews-v2 need it\n"
    );
}

#[tokio::test]
async fn delete_all_deletes_only_waypoints() {
    let second = gateway(
        "demo",
        "second",
        "istio-waypoint",
        json!({}),
        json!({}),
        None,
    );
    let fake = Fake::new(json!({})).with(&[users(), second, ingress()]);
    let (requests, out, error) = delete(fake, Selection::All, false).await;
    assert_eq!(error, "");
    assert_eq!(requests, deletes(&["second", "waypoint"]));
    assert_eq!(
        out,
        "waypoint demo/second deleted\nwaypoint demo/waypoint deleted\n"
    );
    // --all meets an on-demand one: refused too.
    let fake = Fake::new(json!({})).with(&[users(), on_demand()]);
    let (requests, _, error) = delete(fake, Selection::All, false).await;
    assert!(
        error.contains("demo/reviews-waypoint was created on demand"),
        "{error}"
    );
    assert_eq!(requests.len(), 1);
}

#[tokio::test]
async fn status_shows_each_programmed_condition() {
    let fake = Fake::new(json!({})).with(&[users(), on_demand(), ingress()]);
    let (_, result, out) = run_writing(fake, async |client, out| {
        waypoint::status(client, Some("demo"), None, out).await
    })
    .await;
    result.unwrap();
    assert_eq!(
        out,
        "\
NAME                 STATUS     TYPE           REASON         MESSAGE
reviews-waypoint     False      Programmed     Pending        Deployment demo/reviews-waypoint has no ready replica
waypoint             True       Programmed     Programmed     -
"
    );

    // --wait: read until all are Programmed or the timeout; then the table
    // and the one that is not.
    let fake = Fake::new(json!({})).with(&[users(), on_demand()]);
    let wait = Some((Duration::from_millis(30), Duration::from_millis(1)));
    let (requests, result, out) = run_writing(fake, async |client, out| {
        waypoint::status(client, None, wait, out).await
    })
    .await;
    assert!(requests.len() > 2, "it polled");
    assert!(out.starts_with("NAMESPACE     NAME "), "{out}");
    let error = result.unwrap_err().to_string();
    assert!(
        error.starts_with("waypoint demo/reviews-waypoint is not Programmed after 30ms (Programmed False, Pending: Deployment demo/reviews-waypoint has no ready replica)"),
        "{error}"
    );
}

#[test]
fn a_gateway_of_another_class_is_no_waypoint() {
    assert_eq!(Waypoint::of(&ingress()), None);
    let w = Waypoint::of(&users()).unwrap();
    assert_eq!((w.traffic_type.as_str(), w.on_demand), ("workload", false));
}
