//! Waypoint provisioning in Kubernetes mode, over a mock API server
//! (tower-test): the exact server-side apply requests for the root-cert
//! ConfigMap, the ServiceAccount, Deployment and Service of a waypoint
//! Gateway (field manager, force, owner reference, labels), the Gateway's
//! status (addresses and Programmed once a pod is ready), a Gateway that
//! cannot be provisioned next to one that can, a Gateway made again after
//! its deletion, and a changed Gateway (only what changed is applied); the
//! Gateways created on demand (their own field manager, deleted when no
//! rule needs them, a user's Gateway never).

use crate::support::kube_mock::{self, Handle, next, respond};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::manifest::{Object, ObjectKey};
use istiod_rs::provision::kube::KubeProvisioner;
use istiod_rs::provision::{self, ProvisionConfig, ProvisionMetrics};
use istiod_rs::state::Store;
use istiod_rs::status::Clock;
use serde_json::{Value, json};

const UID: &str = "7f3c1a52-0d8e-4a8b-9a57-2f1d7e0c9b11";
const ROOTS: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn config() -> ProvisionConfig {
    ProvisionConfig {
        hub: "registry.example.com/mesh".into(),
        tag: "1.2.3".into(),
        ..ProvisionConfig::default()
    }
}

fn fixed_clock() -> Clock {
    Arc::new(|| "2025-01-02T03:04:05Z".to_string())
}

fn object(yaml: &str) -> Object {
    api::manifest::parse(yaml).unwrap().objects.remove(0)
}

fn gateway(name: &str, extra_metadata: &str) -> Object {
    object(&format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: shop, uid: {UID}, generation: 2, resourceVersion: "5"{extra_metadata}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"#
    ))
}

fn store(objects: Vec<Object>) -> Arc<Store> {
    let store = Store::new();
    store.update(|s| {
        s.apply(object(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
        ));
        for o in objects {
            s.apply(o);
        }
    });
    store
}

/// Takes the next request, checks it is a forced server-side apply of the
/// provisioner to `path`, answers it with `code`, returns its body.
async fn expect_apply(handle: &mut Handle, path: &str, code: u16) -> Value {
    let (seen, reply) = next(handle).await;
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("PATCH", path));
    assert_eq!(
        seen.query,
        BTreeMap::from([
            (
                "fieldManager".to_string(),
                "istiod-rs-provisioner".to_string()
            ),
            ("force".to_string(), "true".to_string()),
        ]),
        "{path}"
    );
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    if code == 200 {
        reply.send_response(respond(200, &seen.body));
    } else {
        reply.send_response(respond(
            code,
            &json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Invalid", "message": "the API server refuses it", "code": code,
            }),
        ));
    }
    seen.body
}

/// Runs one sync of the provisioner on the store's state, in the
/// background: (provisioner, number of errors) once it is done.
fn sync(
    mut provisioner: KubeProvisioner,
    store: &Arc<Store>,
) -> tokio::task::JoinHandle<(KubeProvisioner, usize)> {
    let state = store.read();
    tokio::spawn(async move {
        let plan = provision::plan(&state, &config());
        let metrics = ProvisionMetrics::default();
        let errors = provisioner.sync(&state, &plan, &metrics).await;
        (provisioner, errors.len())
    })
}

/// A sync that must make no request: the mock answers none, so one made
/// would never complete.
async fn unanswered(
    run: tokio::task::JoinHandle<(KubeProvisioner, usize)>,
) -> (KubeProvisioner, usize) {
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the sync made a request it should not have")
        .unwrap()
}

fn owner() -> Value {
    json!([{
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": "reviews-waypoint",
        "uid": UID,
    }])
}

fn labels() -> Value {
    json!({
        "gateway.networking.k8s.io/gateway-name": "reviews-waypoint",
        "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint",
        "gateway.istio.io/managed": "istio.io-mesh-controller",
    })
}

fn service_account_body() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": "reviews-waypoint",
            "namespace": "shop",
            "labels": labels(),
            "ownerReferences": owner(),
        },
    })
}

fn deployment_body() -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "reviews-waypoint",
            "namespace": "shop",
            "labels": labels(),
            "ownerReferences": owner(),
        },
        "spec": {
            "selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "reviews-waypoint"}},
            "template": {
                "metadata": {
                    "labels": {
                        "gateway.networking.k8s.io/gateway-name": "reviews-waypoint",
                        "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint",
                        "gateway.istio.io/managed": "istio.io-mesh-controller",
                        "service.istio.io/canonical-name": "reviews-waypoint",
                        "service.istio.io/canonical-revision": "latest",
                        "istio.io/dataplane-mode": "none",
                        "sidecar.istio.io/inject": "false",
                    },
                    "annotations": {"prometheus.io/port": "15020", "prometheus.io/scrape": "true"},
                },
                "spec": {
                    "serviceAccountName": "reviews-waypoint",
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "istio-proxy",
                        "image": "registry.example.com/mesh/waypoint-rs:1.2.3",
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["waypoint-rs"],
                        "env": [
                            {"name": "XDS_ADDRESS", "value": "istiod.istio-system.svc:15012"},
                            {"name": "CA_ROOT_CA", "value": "/var/run/secrets/istio/root-cert.pem"},
                            {"name": "TOKEN_FILE", "value": "/var/run/secrets/tokens/istio-token"},
                            {"name": "TRUST_DOMAIN", "value": "cluster.local"},
                            {"name": "RUST_LOG", "value": "info"},
                            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
                            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
                            {"name": "INSTANCE_IP", "valueFrom": field("status.podIP")},
                            {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
                        ],
                        "ports": [
                            {"name": "hbone", "containerPort": 15008, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
                        ],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "runAsUser": 1337,
                            "runAsGroup": 1337,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
                            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "path": "istio-token", "expirationSeconds": 43200, "audience": "istio-ca",
                        }}]}},
                        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                    ],
                },
            },
        },
    })
}

fn service_body() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "reviews-waypoint",
            "namespace": "shop",
            "labels": labels(),
            "ownerReferences": owner(),
        },
        "spec": {
            "selector": {"gateway.networking.k8s.io/gateway-name": "reviews-waypoint"},
            "ports": [
                {"name": "status-port", "port": 15021, "protocol": "TCP", "appProtocol": "tcp"},
                {"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "hbone"},
            ],
        },
    })
}

const CORE: &str = "/api/v1/namespaces/shop";

/// What provisioning `reviews-waypoint` writes, in order.
fn every_write() -> [String; 5] {
    [
        format!("{CORE}/configmaps/istio-ca-root-cert"),
        format!("{CORE}/serviceaccounts/reviews-waypoint"),
        "/apis/apps/v1/namespaces/shop/deployments/reviews-waypoint".to_string(),
        format!("{CORE}/services/reviews-waypoint"),
        GATEWAY_STATUS.to_string(),
    ]
}
const GATEWAY_STATUS: &str =
    "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/reviews-waypoint/status";

fn gateway_status(status: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "reviews-waypoint", "namespace": "shop"},
        "status": status,
    })
}

fn accepted() -> Value {
    json!({
        "type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted",
        "observedGeneration": 2, "lastTransitionTime": "2025-01-02T03:04:05Z",
    })
}

#[tokio::test]
async fn a_waypoint_gateway_is_applied_as_its_objects_and_programmed_once_a_pod_is_ready() {
    let (client, mut handle) = kube_mock::pair();
    let store = store(vec![gateway("reviews-waypoint", "")]);
    let provisioner = KubeProvisioner::new(
        client,
        tokio::sync::watch::channel(ROOTS.to_string()).1,
        fixed_clock(),
    );

    let run = sync(provisioner, &store);
    // The mesh root first: the pods mount it.
    let config_map = expect_apply(
        &mut handle,
        &format!("{CORE}/configmaps/istio-ca-root-cert"),
        200,
    )
    .await;
    assert_eq!(
        config_map,
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "shop"},
            "data": {"root-cert.pem": ROOTS},
        })
    );
    let sa = expect_apply(
        &mut handle,
        &format!("{CORE}/serviceaccounts/reviews-waypoint"),
        200,
    )
    .await;
    assert_eq!(sa, service_account_body());
    let deployment = expect_apply(
        &mut handle,
        "/apis/apps/v1/namespaces/shop/deployments/reviews-waypoint",
        200,
    )
    .await;
    assert_eq!(deployment, deployment_body());
    let service = expect_apply(
        &mut handle,
        &format!("{CORE}/services/reviews-waypoint"),
        200,
    )
    .await;
    assert_eq!(service, service_body());
    // No pod yet: accepted, not programmed, no address.
    let status = expect_apply(&mut handle, GATEWAY_STATUS, 200).await;
    assert_eq!(
        status,
        gateway_status(json!({"conditions": [
            accepted(),
            {
                "type": "Programmed", "status": "False", "reason": "AddressNotAssigned",
                "message": "Failed to assign to any requested addresses: Deployment shop/reviews-waypoint has no ready replica yet",
                "observedGeneration": 2, "lastTransitionTime": "2025-01-02T03:04:05Z",
            },
        ]}))
    );
    let (provisioner, errors) = run.await.unwrap();
    assert_eq!(errors, 0);

    // The watch brings the objects back, with the Service's ClusterIP, the
    // status written, and a ready pod of the Deployment.
    let mut service = service_body();
    service["spec"]["clusterIP"] = json!("10.96.0.20");
    let mut gw = serde_json::to_value(match gateway("reviews-waypoint", "") {
        Object::Gateway(g) => g,
        _ => unreachable!(),
    })
    .unwrap();
    gw["status"] = status["status"].clone();
    gw["metadata"]["resourceVersion"] = json!("6");
    store.update(|s| {
        s.apply(Object::ServiceAccount(serde_json::from_value(sa).unwrap()));
        s.apply(Object::Service(serde_json::from_value(service).unwrap()));
        s.apply(Object::Gateway(serde_json::from_value(gw.clone()).unwrap()));
        s.apply(object(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-waypoint-7d9c6-x2k8m
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: reviews-waypoint}
spec: {nodeName: node-a, serviceAccountName: reviews-waypoint, containers: [{name: istio-proxy, image: w}]}
status: {phase: Running, podIP: 10.9.0.7, conditions: [{type: Ready, status: "True"}]}
"#,
        ));
    });
    // Nothing to apply again; the status gets the addresses (hostname
    // first, as upstream reports a waypoint's) and Programmed, Accepted
    // keeping its transition time.
    let run = sync(provisioner, &store);
    let status = expect_apply(&mut handle, GATEWAY_STATUS, 200).await;
    assert_eq!(
        status,
        gateway_status(json!({
            "addresses": [
                {"type": "Hostname", "value": "reviews-waypoint.shop.svc.cluster.local"},
                {"type": "IPAddress", "value": "10.96.0.20"},
            ],
            "conditions": [
                accepted(),
                {
                    "type": "Programmed", "status": "True", "reason": "Programmed",
                    "message": "Resource programmed, assigned to service(s) reviews-waypoint.shop.svc.cluster.local:15008",
                    "observedGeneration": 2, "lastTransitionTime": "2025-01-02T03:04:05Z",
                },
            ],
        }))
    );
    let (provisioner, errors) = run.await.unwrap();
    assert_eq!(errors, 0);

    // Once the Gateway carries it, nothing at all is written; the pod
    // going away does not take the address back (upstream: never removed
    // once reported).
    gw["status"] = status["status"].clone();
    gw["metadata"]["resourceVersion"] = json!("7");
    store.update(|s| s.apply(Object::Gateway(serde_json::from_value(gw).unwrap())));
    let (provisioner, errors) = unanswered(sync(provisioner, &store)).await;
    assert_eq!(errors, 0);
    store.update(|s| {
        s.delete(
            api::manifest::Kind::Pod,
            &ObjectKey::new("shop", "reviews-waypoint-7d9c6-x2k8m"),
        );
    });
    let run = sync(provisioner, &store);
    let status = expect_apply(&mut handle, GATEWAY_STATUS, 200).await;
    assert_eq!(status["status"]["addresses"][0]["type"], "Hostname");
    assert_eq!(
        status["status"]["conditions"][1]["reason"],
        "AddressNotAssigned"
    );
    assert_eq!(run.await.unwrap().1, 0);
}

#[tokio::test]
async fn a_gateway_that_cannot_be_provisioned_says_which_field_and_the_others_flow() {
    let (client, mut handle) = kube_mock::pair();
    let store = store(vec![
        gateway(
            "bad",
            ", annotations: {gateway.istio.io/service-account: Not_A_Name}",
        ),
        gateway("reviews-waypoint", ""),
    ]);
    let provisioner = KubeProvisioner::new(
        client,
        tokio::sync::watch::channel(ROOTS.to_string()).1,
        fixed_clock(),
    );
    let run = sync(provisioner, &store);
    expect_apply(
        &mut handle,
        &format!("{CORE}/configmaps/istio-ca-root-cert"),
        200,
    )
    .await;
    // The invalid one: nothing applied, its status names the field.
    let status = expect_apply(
        &mut handle,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/bad/status",
        200,
    )
    .await;
    let conditions = &status["status"]["conditions"];
    assert_eq!(
        (
            &conditions[0]["type"],
            &conditions[0]["status"],
            &conditions[0]["reason"]
        ),
        (
            &json!("Accepted"),
            &json!("False"),
            &json!("InvalidParameters")
        )
    );
    assert_eq!(
        conditions[0]["message"],
        "the waypoint cannot be provisioned: metadata.annotations[gateway.istio.io/service-account]: \"Not_A_Name\" is not a ServiceAccount name (lower-case letters, digits, '-' and '.', at most 253 characters)"
    );
    assert_eq!(
        (&conditions[1]["type"], &conditions[1]["reason"]),
        (&json!("Programmed"), &json!("Invalid"))
    );
    // The valid one is provisioned; the API server refusing its
    // Deployment shows in its status and is retried.
    expect_apply(
        &mut handle,
        &format!("{CORE}/serviceaccounts/reviews-waypoint"),
        200,
    )
    .await;
    expect_apply(
        &mut handle,
        "/apis/apps/v1/namespaces/shop/deployments/reviews-waypoint",
        422,
    )
    .await;
    let status = expect_apply(&mut handle, GATEWAY_STATUS, 200).await;
    let programmed = &status["status"]["conditions"][1];
    assert_eq!(programmed["reason"], "Pending");
    assert!(
        programmed["message"]
            .as_str()
            .unwrap()
            .contains("could not apply Deployment shop/reviews-waypoint"),
        "{programmed}"
    );
    let (provisioner, errors) = run.await.unwrap();
    assert_eq!(errors, 1);

    // The retry applies only what did not go through.
    let run = sync(provisioner, &store);
    expect_apply(
        &mut handle,
        "/apis/apps/v1/namespaces/shop/deployments/reviews-waypoint",
        200,
    )
    .await;
    expect_apply(
        &mut handle,
        &format!("{CORE}/services/reviews-waypoint"),
        200,
    )
    .await;
    let status = expect_apply(&mut handle, GATEWAY_STATUS, 200).await;
    assert_eq!(
        status["status"]["conditions"][1]["reason"],
        "AddressNotAssigned"
    );
    assert_eq!(run.await.unwrap().1, 0);
}

#[tokio::test]
async fn a_gateway_made_again_or_changed_is_applied_again_and_only_what_changed() {
    let (client, mut handle) = kube_mock::pair();
    let store = store(vec![gateway("reviews-waypoint", "")]);
    let provisioner = KubeProvisioner::new(
        client,
        tokio::sync::watch::channel(ROOTS.to_string()).1,
        fixed_clock(),
    );
    let run = sync(provisioner, &store);
    for path in every_write() {
        expect_apply(&mut handle, &path, 200).await;
    }
    let (provisioner, _) = run.await.unwrap();

    // Deleted: Kubernetes deletes the objects it owns; nothing is written.
    let key = ObjectKey::new("shop", "reviews-waypoint");
    store.update(|s| s.delete(api::manifest::Kind::Gateway, &key));
    let (provisioner, errors) = unanswered(sync(provisioner, &store)).await;
    assert_eq!(errors, 0);

    // Made again: every object is applied again, owned by the new Gateway.
    store.update(|s| s.apply(gateway("reviews-waypoint", "")));
    let run = sync(provisioner, &store);
    for path in every_write() {
        expect_apply(&mut handle, &path, 200).await;
    }
    let (provisioner, errors) = run.await.unwrap();
    assert_eq!(errors, 0);

    // Changed (another account to run as): what changed is applied again,
    // and only that.
    store.update(|s| {
        s.apply(gateway(
            "reviews-waypoint",
            ", annotations: {gateway.istio.io/service-account: reviews-runner}",
        ))
    });
    let run = sync(provisioner, &store);
    let sa = expect_apply(
        &mut handle,
        &format!("{CORE}/serviceaccounts/reviews-runner"),
        200,
    )
    .await;
    assert_eq!(sa["metadata"]["ownerReferences"], owner());
    let deployment = expect_apply(
        &mut handle,
        "/apis/apps/v1/namespaces/shop/deployments/reviews-waypoint",
        200,
    )
    .await;
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "reviews-runner"
    );
    assert_eq!(unanswered(run).await.1, 0);
}

/// A CA rotation changes the roots: the next sync publishes them in the
/// `istio-ca-root-cert` ConfigMap of every waypoint namespace, and writes
/// nothing else.
#[tokio::test]
async fn the_root_cert_config_map_follows_the_roots() {
    let (client, mut handle) = kube_mock::pair();
    let store = store(vec![gateway("reviews-waypoint", "")]);
    let (roots, published) = tokio::sync::watch::channel(ROOTS.to_string());
    let provisioner = KubeProvisioner::new(client, published, fixed_clock());
    let run = sync(provisioner, &store);
    for path in every_write() {
        expect_apply(&mut handle, &path, 200).await;
    }
    let (provisioner, _) = run.await.unwrap();
    let (provisioner, errors) = unanswered(sync(provisioner, &store)).await;
    assert_eq!(errors, 0, "nothing changed, nothing written");

    // Both roots trusted during a rotation.
    let rotated = format!("{ROOTS}-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n");
    roots.send(rotated.clone()).unwrap();
    let run = sync(provisioner, &store);
    let config_map = expect_apply(
        &mut handle,
        &format!("{CORE}/configmaps/istio-ca-root-cert"),
        200,
    )
    .await;
    assert_eq!(config_map["data"], json!({"root-cert.pem": rotated}));
    assert_eq!(unanswered(run).await.1, 0, "only the ConfigMap changed");
}

/// A plan of one on-demand waypoint, `shop/web-waypoint` for account `web`,
/// needed by `HTTPRoute shop/web`.
fn on_demand_plan() -> istiod_rs::index::OnDemandPlan {
    let state = store(vec![
        object(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n",
        ),
        object(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec: {serviceAccountName: web, containers: [{name: app, image: app}]}\nstatus: {phase: Running, podIP: 10.40.0.1}\n",
        ),
        object(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec: {parentRefs: [{group: \"\", kind: Service, name: web}]}\n",
        ),
    ])
    .read();
    istiod_rs::index::translate(&state, &istiod_rs::index::MeshConfig::default()).on_demand
}

#[tokio::test]
async fn on_demand_gateways_are_applied_under_their_own_manager_and_deleted_when_no_rule_needs_them()
 {
    use istiod_rs::provision::on_demand::{Draining, KubeOnDemand};
    let (client, mut handle) = kube_mock::pair();
    let plan = on_demand_plan();
    assert_eq!(plan.waypoints.len(), 1);
    let gateways = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways";
    // Drains of one minute, on a clock the test moves.
    let drain = Duration::from_secs(60);
    let start = std::time::Instant::now();
    let sync = |mut sink: KubeOnDemand,
                mut draining: Draining,
                store: Arc<Store>,
                plan: istiod_rs::index::OnDemandPlan,
                now: std::time::Instant| {
        tokio::spawn(async move {
            let state = store.read();
            let wanted = draining.wanted(&state, &plan, now, drain);
            let errors = sink
                .sync(&state, &wanted, &ProvisionMetrics::default())
                .await;
            (sink, draining, errors.len())
        })
    };

    // Planned: applied, forced, under istiod-rs-on-demand.
    let store = store(Vec::new());
    let run = sync(
        KubeOnDemand::new(client),
        Draining::default(),
        store.clone(),
        plan.clone(),
        start,
    );
    let (seen, reply) = next(&mut handle).await;
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("PATCH", format!("{gateways}/web-waypoint").as_str())
    );
    assert_eq!(
        seen.query,
        BTreeMap::from([
            (
                "fieldManager".to_string(),
                "istiod-rs-on-demand".to_string()
            ),
            ("force".to_string(), "true".to_string()),
        ])
    );
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    assert_eq!(
        seen.body,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": "web-waypoint",
                "namespace": "shop",
                "labels": {"istio-rs.io/on-demand-waypoint": "true"},
                "annotations": {
                    "istio.io/for-service-account": "web",
                    "istio-rs.io/needed-by": "HTTPRoute shop/web",
                },
            },
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        })
    );
    reply.send_response(respond(200, &seen.body));
    let (sink, draining, errors) = run.await.unwrap();
    assert_eq!(errors, 0);

    // The watch brings it back: unchanged, nothing is written. A user's
    // Gateway (not labelled on demand) is never deleted.
    store.update(|s| {
        s.apply(object(&serde_json::to_string(&seen.body).unwrap()));
        s.apply(gateway("mine", ""));
    });
    let run = sync(sink, draining, store.clone(), plan.clone(), start);
    let (sink, draining, errors) = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the sync made a request it should not have")
        .unwrap();
    assert_eq!(errors, 0);

    // No rule needs it any more: first drained, needed by nothing...
    let none = istiod_rs::index::OnDemandPlan::default;
    let run = sync(sink, draining, store.clone(), none(), start);
    let (seen, reply) = next(&mut handle).await;
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("PATCH", format!("{gateways}/web-waypoint").as_str())
    );
    assert_eq!(
        seen.body["metadata"]["annotations"],
        json!({"istio.io/for-service-account": "web", "istio-rs.io/needed-by": ""})
    );
    reply.send_response(respond(200, &seen.body));
    let (sink, draining, errors) = run.await.unwrap();
    assert_eq!(errors, 0);
    store.update(|s| s.apply(object(&serde_json::to_string(&seen.body).unwrap())));

    // ... then, once the drain time has passed, deleted.
    let run = sync(sink, draining, store.clone(), none(), start + drain);
    let (seen, reply) = next(&mut handle).await;
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("DELETE", format!("{gateways}/web-waypoint").as_str())
    );
    reply.send_response(respond(
        200,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    ));
    let (_, _, errors) = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the user's Gateway is never deleted")
        .unwrap();
    assert_eq!(errors, 0);
}
