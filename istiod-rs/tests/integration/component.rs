//! istiod-rs as a whole (the app: directory source, pipeline, xDS server,
//! CA, monitoring) on a temporary config directory, driven by a real tonic
//! delta-ADS client over TLS with a bearer token, as a ztunnel would:
//! initial state, an edited file, a deleted pod, a NACK seen in
//! `/debug/syncz`, and a reconnect that resumes from the proxy's versions.

use crate::support::ads;
use crate::support::istiod;
use crate::support::xds_server;

use std::time::{Duration, Instant};

use api::discovery::DeltaDiscoveryResponse;
use api::type_url::{ADDRESS, AUTHORIZATION};
use serde_json::Value;

use ads::{AdsStream, Held, names, node_id, removed};
use istiod::{LocalIstiod, NAMESPACE, PATIENCE, WEB_SERVICE, pod, service, uid};
use xds_server::{all_synced, type_entry};

const TOKEN: &str = "ztunnel-node-a";

fn web(n: u8, version: &str) -> String {
    let node = if n == 1 { "node-a" } else { "node-b" };
    pod(
        &format!("web-{n}"),
        node,
        "web",
        &format!("10.244.0.{}", 10 + n),
        &format!("app: web, version: {version}"),
    )
}

fn db(n: u8) -> String {
    pod(
        &format!("db-{n}"),
        "node-a",
        "db",
        &format!("10.244.0.{}", 20 + n),
        "app: db",
    )
}

async fn cluster() -> LocalIstiod {
    LocalIstiod::start(&[
        ("namespace.yaml", NAMESPACE),
        ("web-1.yaml", &web(1, "v1")),
        ("web-2.yaml", &web(2, "v1")),
        ("db-1.yaml", &db(1)),
        ("service.yaml", &service(80)),
    ])
    .await
}

async fn connect(istiod: &LocalIstiod, token: Option<&str>) -> Result<AdsStream, tonic::Status> {
    let channel = istiod
        .control_plane(TOKEN)
        .channel()
        .expect("control-plane channel");
    AdsStream::open(channel, node_id(1), token, PATIENCE).await
}

/// Subscribes to both types, resuming from `held` addresses, and returns
/// the first response of each, (addresses, authorizations).
async fn subscribe_both(
    proxy: &mut AdsStream,
    held: &Held,
) -> (DeltaDiscoveryResponse, DeltaDiscoveryResponse) {
    proxy.subscribe(ADDRESS, held.0.clone()).await;
    proxy.subscribe(AUTHORIZATION, Default::default()).await;
    let (first, second) = (proxy.recv().await, proxy.recv().await);
    if first.type_url == ADDRESS {
        (first, second)
    } else {
        (second, first)
    }
}

/// The proxy's `/debug/syncz` entry once `until` holds for it.
async fn syncz_until(istiod: &LocalIstiod, until: impl Fn(&Value) -> bool) -> Value {
    xds_server::syncz_until(istiod.monitoring(), &node_id(1), until).await
}

/// Waits until `/debug/config_dump` lists exactly `workloads`.
async fn served_workloads(istiod: &LocalIstiod, workloads: &[&str]) {
    let want: Vec<String> = workloads.iter().map(|w| uid(w)).collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let dump = istiod.get_json("/debug/config_dump").await;
        let got: Vec<String> = dump["workloads"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "config_dump: {dump:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Upstream istiod's names for what istiod-rs measures too, present from
/// the start. The labelled ones (`pilot_xds{version}`,
/// `pilot_xds_pushes{type}`, `pilot_xds_push_time{type}`,
/// `pilot_total_xds_rejects{type}`, `pilot_xds_expired_nonce{type}`) appear
/// with their first series, as upstream's; `tests/integration/xds.rs`
/// checks them by name and value.
const UPSTREAM_ISTIOD_METRICS: &[&str] = &[
    "pilot_proxy_convergence_time",
    "citadel_server_csr_count",
    "citadel_server_success_cert_issuance_count",
    "citadel_server_authentication_failure_count",
    "citadel_server_csr_parsing_err_count",
    "citadel_server_root_cert_expiry_timestamp",
    "citadel_server_cert_chain_expiry_timestamp",
];

#[tokio::test]
async fn a_proxy_follows_the_config_directory() {
    let istiod = cluster().await;
    let mut proxy = connect(&istiod, Some(TOKEN)).await.unwrap();
    let mut held = Held::default();

    // The initial state; the type with no resources is answered too (a
    // proxy reports itself synced only once every type has had a response).
    let (addresses, policies) = subscribe_both(&mut proxy, &held).await;
    assert_eq!(
        names(&addresses),
        [uid("db-1"), uid("web-1"), uid("web-2"), WEB_SERVICE.into()]
    );
    assert!(addresses.removed_resources.is_empty());
    assert!(policies.resources.is_empty() && policies.removed_resources.is_empty());
    proxy.ack(&addresses).await;
    proxy.ack(&policies).await;
    held.apply(&addresses);
    let entry = syncz_until(&istiod, all_synced).await;
    assert_eq!(
        entry["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
    );
    assert_eq!(entry["node"], "node-a");

    // An edited file: exactly the key whose content changed.
    istiod.write("web-1.yaml", &web(1, "v2"));
    let change = proxy.recv().await;
    assert_eq!(change.type_url, ADDRESS);
    assert_eq!(names(&change), [uid("web-1")]);
    assert!(change.removed_resources.is_empty());
    assert_ne!(change.resources[0].version, held.0[&uid("web-1")]);
    proxy.ack(&change).await;
    held.apply(&change);

    // A deleted pod: its removal, nothing else.
    istiod.remove("web-2.yaml");
    let change = proxy.recv().await;
    assert!(change.resources.is_empty(), "{:?}", names(&change));
    assert_eq!(removed(&change), [uid("web-2")]);
    proxy.ack(&change).await;
    held.apply(&change);

    // A NACK: recorded for this proxy, counted; its last good state stands.
    istiod.write("db-2.yaml", &db(2));
    let change = proxy.recv().await;
    assert_eq!(names(&change), [uid("db-2")]);
    proxy.nack(&change, "db-2: rejected by the test").await;
    let entry = syncz_until(&istiod, |p| !p["last_nack"].is_null()).await;
    assert_eq!(entry["last_nack"]["message"], "db-2: rejected by the test");
    assert_eq!(entry["last_nack"]["nonce"], change.nonce.as_str());
    let addresses_entry = type_entry(&entry, ADDRESS);
    assert_eq!(addresses_entry["status"], "STALE");
    assert_eq!(addresses_entry["resources_held"], held.0.len());
    assert_eq!(
        istiod.metric("pilot_total_xds_rejects{type=\"wds\"}").await,
        1.0
    );

    // Away, then back with the versions it holds: only the difference (the
    // pod it rejected, and the removal of one deleted meanwhile).
    drop(proxy);
    istiod.remove("web-1.yaml");
    served_workloads(&istiod, &["db-1", "db-2"]).await;
    let mut proxy = connect(&istiod, Some(TOKEN)).await.unwrap();
    let (addresses, policies) = subscribe_both(&mut proxy, &held).await;
    assert_eq!(names(&addresses), [uid("db-2")]);
    assert_eq!(removed(&addresses), [uid("web-1")]);
    assert!(policies.resources.is_empty() && policies.removed_resources.is_empty());
}

#[tokio::test]
async fn the_tls_port_requires_a_token_the_plaintext_port_does_not() {
    let istiod = cluster().await;

    for token in [None, Some("not-a-token")] {
        let status = match connect(&istiod, token).await {
            // The refusal comes with the response headers...
            Err(status) => status,
            // ... or, if the transport answered first, ends the stream.
            Ok(mut proxy) => {
                proxy.subscribe(ADDRESS, Default::default()).await;
                proxy.next().await.unwrap_err()
            }
        };
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{token:?}: {status:?}"
        );
    }

    let plaintext = istiod.addresses().grpc_plaintext.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{plaintext}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut local = AdsStream::open(channel, node_id(2), None, PATIENCE)
        .await
        .unwrap();
    local.subscribe(ADDRESS, Default::default()).await;
    let initial = local.recv().await;
    assert_eq!(initial.resources.len(), 4);
}

#[tokio::test]
async fn monitoring_serves_readiness_the_snapshot_and_metrics() {
    let istiod = cluster().await;
    assert_eq!(istiod.get_json("/ready").await["ready"], true);

    let dump = istiod.get_json("/debug/config_dump").await;
    let web1 = &dump["workloads"][uid("web-1")];
    assert_eq!(web1["serviceAccount"], "web", "{dump:#}");
    assert_eq!(web1["node"], "node-a");
    assert!(dump["services"][WEB_SERVICE].is_object(), "{dump:#}");

    let (status, metrics) = istiod.get("/metrics").await;
    assert_eq!(status, 200);
    for family in [
        "citadel_server_cert_chain_expiry_timestamp",
        "istiod_index_translations",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    // Upstream istiod's metric names, as its dashboards and alerts query
    // them (pilot/pkg/xds/monitoring.go, security/pkg/server/ca/monitoring.go):
    // each is a metric family here, under exactly that name.
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for upstream in UPSTREAM_ISTIOD_METRICS {
        assert!(
            families.contains(upstream),
            "{upstream} missing:\n{metrics}"
        );
    }

    // The root the CA signs with is where the app says, and what it serves.
    let on_disk = std::fs::read_to_string(istiod.app().root_cert_path()).unwrap();
    assert_eq!(on_disk, istiod.app().ca().roots_pem());
    assert_eq!(
        istiod.app().root_cert_path(),
        istiod.path().join("data").join("root-cert.pem")
    );
}

#[tokio::test]
async fn a_bad_policy_is_reported_in_its_status_file_and_a_metric() {
    let istiod = cluster().await;
    istiod.write(
        "policy.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-http, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {ports: [http]}}]}]
",
    );
    let status = istiod
        .config_dir()
        .join("generated/status/AuthorizationPolicy/demo/web-http.yaml");
    let deadline = Instant::now() + PATIENCE;
    while !status.exists() {
        assert!(Instant::now() < deadline, "no status file");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = std::fs::read_to_string(&status).unwrap();
    let yaml: Value = serde_saphyr::from_str(&text).unwrap();
    let condition = &yaml["status"]["conditions"][0];
    assert_eq!(condition["type"], "ZtunnelAccepted", "{text}");
    assert_eq!(condition["reason"], "UnsupportedValue", "{text}");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .starts_with("rules[0].to[0].operation.ports[0]: \"http\" is not a port number"),
        "{text}"
    );
    assert_eq!(
        istiod
            .metric("istiod_index_policy_problems{kind=\"AuthorizationPolicy\",reason=\"invalid_value\"}")
            .await,
        1.0
    );
    // Fixed: the status says so, the problem is gone.
    istiod.write(
        "policy.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-http, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]
",
    );
    while !std::fs::read_to_string(&status)
        .unwrap_or_default()
        .contains("attached to ztunnel")
    {
        assert!(Instant::now() < deadline, "status not updated");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        istiod
            .metric("istiod_index_policy_problems{kind=\"AuthorizationPolicy\",reason=\"invalid_value\"}")
            .await,
        0.0
    );
    // The policy goes, and its status with it.
    istiod.remove("policy.yaml");
    while status.exists() {
        assert!(Instant::now() < deadline, "status file not removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
