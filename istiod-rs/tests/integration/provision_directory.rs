//! Waypoint provisioning in local mode: a waypoint Gateway in the config
//! directory becomes `generated/waypoints/<ns>/<gateway>.yaml` (its
//! ServiceAccount, Deployment and Service), which changes with the Gateway
//! and goes with it; the directory source reads the ServiceAccount and
//! Service back without a problem; the Gateway's status is a file under
//! `generated/status/Gateway/` that the status writer leaves alone.
//! Waypoints created on demand for an L7 rule are files under
//! `generated/on-demand/`, read back as Gateways, provisioned like the
//! others, and removed with the last rule that needs them.

use crate::support::istiod;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::manifest::ObjectKey;
use istiod_rs::index::{self, MeshConfig};
use istiod_rs::provision::directory::DirectoryProvisioner;
use istiod_rs::provision::on_demand::{DirectoryOnDemand, Draining};
use istiod_rs::provision::{self, ProvisionConfig, ProvisionMetrics};
use istiod_rs::state::ClusterState;
use istiod_rs::state::directory::DirectorySource;
use istiod_rs::status::directory::DirectoryStatus;
use istiod_rs::status::{self, Sink, StatusConfig, StatusMetrics};
use serde_json::{Value, json};
use tokio::sync::watch;

const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
";

fn gateway(extra_metadata: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: reviews-waypoint, namespace: shop{extra_metadata}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
    )
}

const READY_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-waypoint-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: reviews-waypoint}
spec: {nodeName: node0, serviceAccountName: reviews-waypoint, containers: [{name: waypoint, image: w}]}
status: {phase: Running, podIP: 10.9.0.7, conditions: [{type: Ready, status: "True"}]}
"#;

/// The directory's state as istiod-rs reads it (its generated files too),
/// after the edit of the test settled.
fn read(root: &Path) -> (ClusterState, DirectorySource) {
    let mut source = DirectorySource::new(root);
    source.scan();
    (source.state(), source)
}

/// One pass of the provisioner over the directory as it is now.
fn provision(root: &Path) -> ClusterState {
    let (state, _) = read(root);
    let plan = provision::plan(&state, &ProvisionConfig::default());
    let errors = DirectoryProvisioner::new(root).sync(&state, &plan, &ProvisionMetrics::default());
    assert!(errors.is_empty(), "{errors:?}");
    state
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    api::manifest::documents(&text)
        .iter()
        .map(|d| serde_saphyr::from_str(d.body).unwrap())
        .collect()
}

fn conditions(status_file: &Path) -> Vec<(String, String, String)> {
    let status: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(status_file).unwrap()).unwrap();
    status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c.get("lastTransitionTime").is_none(), "{c}");
            (
                c["type"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn condition(t: &str, s: &str, r: &str) -> (String, String, String) {
    (t.into(), s.into(), r.into())
}

#[tokio::test]
async fn generated_files_appear_change_and_disappear_with_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(root.join("gateway.yaml"), gateway("")).unwrap();
    let provisioner = DirectoryProvisioner::new(root);
    let key = ObjectKey::new("shop", "reviews-waypoint");
    let file = provisioner.path(&key);
    let status_file = provisioner.status_path(&key);
    assert_eq!(
        file,
        root.join("generated/waypoints/shop/reviews-waypoint.yaml")
    );
    assert_eq!(
        status_file,
        root.join("generated/status/Gateway/shop/reviews-waypoint.yaml")
    );

    // The Gateway appears: its objects, owned by it and labelled.
    provision(root);
    let objects = documents(&file);
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"]);
    for o in &objects {
        assert_eq!(o["metadata"]["name"], "reviews-waypoint");
        assert_eq!(o["metadata"]["namespace"], "shop");
        assert_eq!(
            o["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "reviews-waypoint"
        );
        assert_eq!(
            o["metadata"]["labels"]["gateway.istio.io/managed"],
            "istio.io-mesh-controller"
        );
        assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], "Gateway");
    }
    let pod = &objects[1]["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "reviews-waypoint");
    assert_eq!(
        pod["containers"][0]["image"],
        format!("istio-rs/waypoint-rs:{}", env!("CARGO_PKG_VERSION"))
    );
    // No pod yet: accepted, not programmed.
    assert_eq!(
        conditions(&status_file),
        [
            condition("Accepted", "True", "Accepted"),
            condition("Programmed", "False", "AddressNotAssigned"),
        ]
    );

    // The directory source reads the ServiceAccount and Service back as
    // cluster state (the Deployment is a kind it skips), without a problem,
    // and never the status file; the index reaches the waypoint through
    // the Service.
    let (state, source) = read(root);
    assert!(source.problems().is_empty(), "{:?}", source.problems());
    assert!(state.services.contains_key(&key));
    assert!(state.service_accounts.contains_key(&key));
    assert!(state.gateways[&key].status.is_none());
    let translation = index::translate(&state, &MeshConfig::default());
    let services = index::json::snapshot_json(&translation.snapshot);
    assert!(
        services
            .to_string()
            .contains("reviews-waypoint.shop.svc.cluster.local"),
        "{services}"
    );

    // A ready pod of the Deployment (the local cluster runs it): programmed,
    // with the Service's hostname as its address.
    std::fs::write(root.join("pod.yaml"), READY_POD).unwrap();
    provision(root);
    assert_eq!(
        conditions(&status_file),
        [
            condition("Accepted", "True", "Accepted"),
            condition("Programmed", "True", "Programmed"),
        ]
    );
    let status: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(
        status["status"]["addresses"],
        json!([{"type": "Hostname", "value": "reviews-waypoint.shop.svc.cluster.local"}])
    );

    // The Gateway changes: so does the file.
    std::fs::write(
        root.join("gateway.yaml"),
        gateway(", annotations: {gateway.istio.io/service-account: reviews-runner}"),
    )
    .unwrap();
    provision(root);
    let objects = documents(&file);
    assert_eq!(objects[0]["metadata"]["name"], "reviews-runner");
    assert_eq!(
        objects[1]["spec"]["template"]["spec"]["serviceAccountName"],
        "reviews-runner"
    );

    // A Gateway that cannot be provisioned keeps its last good objects; its
    // status names the field.
    std::fs::write(
        root.join("gateway.yaml"),
        gateway(", labels: {istio.io/waypoint-for: everything}"),
    )
    .unwrap();
    provision(root);
    assert_eq!(documents(&file), objects);
    let status: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(
        status["status"]["conditions"][0]["reason"],
        "InvalidParameters"
    );
    assert_eq!(
        status["status"]["conditions"][0]["message"],
        "the waypoint cannot be provisioned: metadata.labels[istio.io/waypoint-for]: \"everything\" is not service, workload, all or none"
    );

    // The Gateway goes: so do its files; nothing is left beside them.
    std::fs::remove_file(root.join("gateway.yaml")).unwrap();
    provision(root);
    assert!(!file.exists() && !status_file.exists());
    let left: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn the_status_writer_leaves_gateway_statuses_to_the_provisioner() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(root.join("gateway.yaml"), gateway("")).unwrap();
    std::fs::write(
        root.join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {}\n",
    )
    .unwrap();
    let state = provision(root);
    let status_file =
        DirectoryProvisioner::new(root).status_path(&ObjectKey::new("shop", "reviews-waypoint"));
    assert!(status_file.exists());

    let translation = index::translate(&state, &MeshConfig::default());
    let (tx, rx) = watch::channel(Arc::new(status::Statuses::new()));
    let task = status::spawn(
        rx,
        Sink::Directory(DirectoryStatus::new(root)),
        StatusConfig::default(),
        Arc::new(StatusMetrics::default()),
    );
    tx.send_replace(Arc::new(status::desired(&state, &translation)));
    let policy = root.join("generated/status/AuthorizationPolicy/shop/deny-all.yaml");
    wait_for(|| policy.exists()).await;
    drop(tx);
    task.await.unwrap();
    assert!(
        status_file.exists(),
        "the status writer removed the Gateway's status"
    );
}

#[tokio::test]
async fn the_provisioner_waits_for_the_source_then_follows_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Left by a run before this one, for a Gateway deleted since.
    let stale = root.join("generated/waypoints/shop/gone.yaml");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "# old\n").unwrap();
    let store = istiod_rs::state::Store::new();
    let metrics = Arc::new(ProvisionMetrics::default());
    let task = provision::spawn(
        store.clone(),
        provision::Sink::Directory(DirectoryProvisioner::new(root)),
        ProvisionConfig::default(),
        metrics.clone(),
    );
    let file = DirectoryProvisioner::new(root).path(&ObjectKey::new("shop", "reviews-waypoint"));
    let objects = |yaml: &str| api::manifest::parse(yaml).unwrap().objects;

    // Before the source has synced, nothing is written or removed: the
    // Gateways not listed yet would lose their files.
    store.update(|s| {
        for o in objects(NAMESPACE).into_iter().chain(objects(&gateway(""))) {
            s.apply(o);
        }
    });
    tokio::task::yield_now().await;
    assert!(stale.exists() && !file.exists());

    store.mark_synced();
    wait_for(|| file.exists() && !stale.exists()).await;

    // A change of the Gateway is followed; then its deletion.
    store.update(|s| {
        for o in objects(&gateway(
            ", annotations: {gateway.istio.io/service-account: reviews-runner}",
        )) {
            s.apply(o);
        }
    });
    wait_for(|| {
        std::fs::read_to_string(&file)
            .is_ok_and(|t| t.contains("serviceAccountName: reviews-runner"))
    })
    .await;
    store.update(|s| {
        s.delete(
            api::manifest::Kind::Gateway,
            &ObjectKey::new("shop", "reviews-waypoint"),
        )
    });
    wait_for(|| !file.exists()).await;
    task.abort();
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn istiod_in_local_mode_provisions_the_waypoints_of_its_config_directory() {
    let waypoint = gateway("").replace("namespace: shop", "namespace: demo");
    let istiod = istiod::LocalIstiod::start_with(
        &[
            ("namespace.yaml", istiod::NAMESPACE),
            ("gateway.yaml", &waypoint),
        ],
        |config| config.provision = Some(ProvisionConfig::default()),
    )
    .await;
    let root = istiod.config_dir();
    let key = ObjectKey::new("demo", "reviews-waypoint");
    let file = DirectoryProvisioner::new(&root).path(&key);
    let status_file = DirectoryProvisioner::new(&root).status_path(&key);
    wait_for(|| file.exists() && status_file.exists()).await;
    assert!(
        istiod
            .metric(r#"istiod_provision_writes_total{kind="File",result="ok"}"#)
            .await
            >= 2.0
    );
    // Its pod runs and is ready (what the local cluster does): programmed.
    istiod.write(
        "waypoint-pod.yaml",
        &istiod::pod(
            "reviews-waypoint-0",
            "node0",
            "reviews-waypoint",
            "10.9.0.7",
            "gateway.networking.k8s.io/gateway-name: reviews-waypoint",
        ),
    );
    wait_for(|| {
        std::fs::read_to_string(&status_file).is_ok_and(|t| t.contains("reason: Programmed"))
    })
    .await;
    istiod.remove("gateway.yaml");
    wait_for(|| !file.exists() && !status_file.exists()).await;
}

/// HTTPRoute `demo/web`, parent Service `demo/web`.
const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"#;

#[tokio::test]
async fn istiod_in_local_mode_creates_a_waypoint_on_demand_and_removes_it_with_the_rule() {
    let istiod = istiod::LocalIstiod::start_with(
        &[
            ("namespace.yaml", istiod::NAMESPACE),
            ("service.yaml", &istiod::service(80)),
            (
                "pod.yaml",
                &istiod::pod("web-0", "node-a", "web", "10.9.0.1", "app: web"),
            ),
        ],
        |config| config.provision = Some(ProvisionConfig::default()),
    )
    .await;
    let root = istiod.config_dir();
    let key = ObjectKey::new("demo", "web-waypoint");
    let on_demand = DirectoryOnDemand::new(&root).path(&key);
    assert_eq!(
        on_demand,
        root.join("generated/on-demand/demo/web-waypoint.yaml")
    );
    let provisioned = DirectoryProvisioner::new(&root).path(&key);
    let route_status = root.join("generated/status/HTTPRoute/demo/web.yaml");

    istiod.write("route.yaml", ROUTE);
    wait_for(|| on_demand.exists() && provisioned.exists()).await;
    let gateway = &documents(&on_demand)[0];
    assert_eq!(gateway["kind"], "Gateway");
    assert_eq!(
        gateway["metadata"]["labels"]["istio-rs.io/on-demand-waypoint"],
        "true"
    );
    assert_eq!(
        gateway["metadata"]["annotations"]["istio.io/for-service-account"],
        "web"
    );
    assert_eq!(
        gateway["metadata"]["annotations"]["istio-rs.io/needed-by"],
        "HTTPRoute demo/web"
    );
    // The waypoint's pod is ready (what the local cluster does): the route
    // is served by it.
    istiod.write(
        "waypoint-pod.yaml",
        &istiod::pod(
            "web-waypoint-0",
            "node-a",
            "web-waypoint",
            "10.9.0.7",
            "gateway.networking.k8s.io/gateway-name: web-waypoint",
        ),
    );
    let route_accepted = || {
        let Ok(text) = std::fs::read_to_string(&route_status) else {
            return false;
        };
        let status: Value = serde_saphyr::from_str(&text).unwrap();
        let conditions: Vec<&Value> = status["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["conditions"].as_array().into_iter().flatten())
            .collect();
        !conditions.is_empty() && conditions.iter().all(|c| c["status"] == "True")
    };
    assert!(!route_accepted(), "served before its waypoint was ready");
    wait_for(route_accepted).await;

    istiod.remove("route.yaml");
    wait_for(|| !on_demand.exists() && !provisioned.exists()).await;
}

#[tokio::test]
async fn with_waypoints_on_demand_turned_off_those_created_before_are_removed() {
    // What an earlier istiod-rs, with them on, created for the route.
    let gateway = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: web-waypoint
  namespace: demo
  labels: {istio-rs.io/on-demand-waypoint: "true"}
  annotations: {istio.io/for-service-account: web, istio-rs.io/needed-by: HTTPRoute demo/web}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;
    let istiod = istiod::LocalIstiod::start_with(
        &[
            ("namespace.yaml", istiod::NAMESPACE),
            ("service.yaml", &istiod::service(80)),
            ("route.yaml", ROUTE),
            (
                "pod.yaml",
                &istiod::pod("web-0", "node-a", "web", "10.9.0.1", "app: web"),
            ),
            ("generated/on-demand/demo/web-waypoint.yaml", gateway),
        ],
        |config| {
            config.provision = Some(ProvisionConfig {
                on_demand_drain: Duration::from_millis(200),
                ..ProvisionConfig::default()
            });
            config.mesh.on_demand_waypoints = false;
        },
    )
    .await;
    let root = istiod.config_dir();
    let key = ObjectKey::new("demo", "web-waypoint");
    let on_demand = DirectoryOnDemand::new(&root).path(&key);
    wait_for(|| !on_demand.exists()).await;
    // And it does not come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!on_demand.exists());
}

/// The Service the provisioner makes for on-demand waypoint demo/web-waypoint.
const WEB_WAYPOINT_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web-waypoint
  namespace: demo
  labels: {gateway.networking.k8s.io/gateway-name: web-waypoint, gateway.istio.io/managed: istio.io-mesh-controller}
spec:
  clusterIP: 10.96.9.9
  ports: [{name: mesh, port: 15008}]
";

#[test]
fn on_demand_files_are_written_once_and_read_back_as_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("namespace.yaml"), istiod::NAMESPACE).unwrap();
    std::fs::write(root.join("service.yaml"), istiod::service(80)).unwrap();
    std::fs::write(
        root.join("pod.yaml"),
        istiod::pod("web-0", "node-a", "web", "10.9.0.1", "app: web"),
    )
    .unwrap();
    std::fs::write(root.join("route.yaml"), ROUTE).unwrap();
    let metrics = ProvisionMetrics::default();
    let mut sink = DirectoryOnDemand::new(root);
    let files_written = || {
        metrics
            .writes
            .get_or_create(&istiod_rs::status::WriteLabels {
                kind: "File".into(),
                result: "ok".into(),
            })
            .get()
    };
    let (state, _) = read(root);
    let plan = index::translate(&state, &MeshConfig::default()).on_demand;
    let mut draining = Draining::default();
    let start = Instant::now();
    let drain = Duration::from_secs(60);
    let wanted = draining.wanted(&state, &plan, start, drain);
    assert!(sink.sync(&wanted, &metrics).is_empty());
    assert_eq!(files_written(), 1);
    // Read back, the plan is the same and nothing is written again.
    let (state, source) = read(root);
    assert!(source.problems().is_empty(), "{:?}", source.problems());
    let key = ObjectKey::new("demo", "web-waypoint");
    assert!(index::is_on_demand_waypoint(&state.gateways[&key]));
    let translation = index::translate(&state, &MeshConfig::default());
    let again = translation.on_demand.clone();
    assert_eq!(again, plan);
    // Once provisioned (its Service stands for the provisioner's), the
    // service is bound to it.
    std::fs::write(root.join("waypoint-service.yaml"), WEB_WAYPOINT_SERVICE).unwrap();
    let (state, _) = read(root);
    let bound = |state: &ClusterState| {
        let translation = index::translate(state, &MeshConfig::default());
        let json = index::json::snapshot_json(&translation.snapshot);
        let services = json["services"].as_object().cloned().unwrap_or_default();
        let web = services
            .iter()
            .find(|(key, _)| key.ends_with("/web.demo.svc.cluster.local"))
            .map(|(_, service)| service["waypoint"].to_string())
            .expect("Service web is listed");
        web.contains("web-waypoint.demo.svc.cluster.local")
    };
    assert!(bound(&state));
    let wanted = draining.wanted(&state, &again, start, drain);
    assert!(sink.sync(&wanted, &metrics).is_empty());
    assert_eq!(files_written(), 1);
    // No rule: first drained (still there, needed by nothing, bound to
    // nothing), then removed once the drain time has passed.
    std::fs::remove_file(root.join("route.yaml")).unwrap();
    let (state, _) = read(root);
    let plan = index::translate(&state, &MeshConfig::default()).on_demand;
    assert!(plan.waypoints.is_empty());
    let wanted = draining.wanted(&state, &plan, start, drain);
    assert_eq!(wanted.next_removal, Some(start + drain));
    assert!(sink.sync(&wanted, &metrics).is_empty());
    assert_eq!(files_written(), 2);
    let (state, _) = read(root);
    let gateway = &state.gateways[&key];
    let annotations = gateway.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["istio-rs.io/needed-by"], "");
    assert!(!bound(&state), "a draining waypoint serves nothing");
    let plan = index::translate(&state, &MeshConfig::default()).on_demand;
    let wanted = draining.wanted(&state, &plan, start + drain, drain);
    assert!(wanted.gateways.is_empty());
    assert!(sink.sync(&wanted, &metrics).is_empty());
    assert!(!sink.path(&key).exists());
}
