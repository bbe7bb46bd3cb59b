//! The delta ADS server and its monitoring endpoints, end to end on loopback:
//! real tonic delta-ADS clients against the server fed by a `watch` channel
//! of hand-built snapshots, and HTTP requests to `/debug/syncz`, `/metrics`,
//! `/ready` and `/debug/config_dump`.

use crate::support::ads;
use crate::support::http_client;
use crate::support::xds_server;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::SpiffeId;
use api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, Node};
use api::security::Authorization;
use api::type_url::{ADDRESS, AUTHORIZATION};
use api::workload::{Address, Workload, address};
use http_body_util::BodyExt;
use istiod_rs::auth::Caller;
use istiod_rs::snapshot::{Resource, Snapshot};
use istiod_rs::xds::{Authentication, DEFAULT_MAX_REQUEST_BYTES, XdsServer};
use prometheus_client::registry::Registry;
use prost::Message;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use ads::{nack_request, node_id, open_stream};
use http_client::http_get;
use xds_server::{Ports, Tokens, serve};

/// Only to avoid hanging forever when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

fn workload(name: &str, node: &str) -> Resource {
    let uid = format!("Kubernetes//Pod/default/{name}");
    let msg = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.clone(),
            name: name.into(),
            namespace: "default".into(),
            node: node.into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS, uid, &msg)
}

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

fn policy(name: &str) -> Resource {
    let msg = Authorization {
        name: name.into(),
        namespace: "default".into(),
        ..Default::default()
    };
    Resource::new(AUTHORIZATION, format!("default/{name}"), &msg)
}

fn snapshot(resources: impl IntoIterator<Item = Resource>) -> Arc<Snapshot> {
    let mut s = Snapshot::default();
    for r in resources {
        s.insert(r);
    }
    Arc::new(s)
}

/// One token per node's ztunnel.
fn tokens() -> Arc<Tokens> {
    let caller = Caller {
        identity: SpiffeId::new("cluster.local", "istio-system", "ztunnel").unwrap(),
        pod: None,
        node: Some("node1".into()),
    };
    Arc::new(Tokens(HashMap::from([("tok-node1".to_string(), caller)])))
}

struct Istiod {
    xds: SocketAddr,
    monitoring: SocketAddr,
    snapshots: watch::Sender<Arc<Snapshot>>,
    ready: watch::Sender<bool>,
}

async fn start(authentication: Authentication, initial: Arc<Snapshot>) -> Istiod {
    start_with_limit(authentication, initial, DEFAULT_MAX_REQUEST_BYTES).await
}

async fn start_with_limit(
    authentication: Authentication,
    initial: Arc<Snapshot>,
    max_request_bytes: usize,
) -> Istiod {
    let (snapshots, rx) = watch::channel(initial);
    let mut registry = Registry::default();
    let server = XdsServer::new(rx, &mut registry).with_max_request_bytes(max_request_bytes);
    let (ready, ready_rx) = watch::channel(false);
    let Ports { xds, monitoring } = serve(&server, registry, authentication, ready_rx).await;
    Istiod {
        xds,
        monitoring,
        snapshots,
        ready,
    }
}

/// A delta-ADS client as a ztunnel would run it.
struct Proxy {
    node: String,
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

async fn connect(addr: SocketAddr, n: usize, token: Option<&str>) -> Result<Proxy, tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (requests, responses) = open_stream(&mut client, token).await?;
    Ok(Proxy {
        node: node_id(n),
        requests,
        responses,
    })
}

impl Proxy {
    async fn send(&self, mut request: DeltaDiscoveryRequest) {
        request.node = Some(Node {
            id: self.node.clone(),
            ..Default::default()
        });
        self.requests.send(request).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.resume(type_url, names, BTreeMap::new()).await;
    }

    async fn resume(&self, type_url: &str, names: &[&str], held: BTreeMap<String, String>) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            initial_resource_versions: held,
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(PATIENCE, self.responses.message())
            .await
            .expect("no response from the xDS server")
            .expect("the xDS stream failed")
            .expect("the xDS stream ended")
    }

    /// The stream's terminal status.
    async fn recv_error(&mut self) -> tonic::Status {
        match tokio::time::timeout(PATIENCE, self.responses.message())
            .await
            .expect("no response from the xDS server")
        {
            Err(status) => status,
            Ok(other) => panic!("expected the stream to fail, got {other:?}"),
        }
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, type_url: &str, nonce: &str, message: &str) {
        self.send(nack_request(type_url, nonce, message)).await;
    }

    /// Subscribes to everything of `type_url`, receives the initial state and ACKs it.
    async fn sync(&mut self, type_url: &str) -> DeltaDiscoveryResponse {
        self.subscribe(type_url, &[]).await;
        let response = self.recv().await;
        assert_eq!(response.type_url, type_url);
        self.ack(&response).await;
        response
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    names
}

fn held(response: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    response
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

async fn get_json(addr: SocketAddr, path: &str) -> (http::StatusCode, Value) {
    let (status, body) = http_get(addr, path).await;
    let json =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    (status, json)
}

/// The syncz entry of one type of one proxy, once `until` holds for it.
async fn syncz_until(
    istiod: &Istiod,
    proxy: &str,
    type_url: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, syncz) = get_json(istiod.monitoring, "/debug/syncz").await;
        assert_eq!(status, 200);
        let entry = syncz["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["proxy"] == proxy)
            .and_then(|p| {
                p["types"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["type_url"] == type_url)
                    .map(|t| (p.clone(), t.clone()))
            });
        if let Some((proxy_entry, type_entry)) = entry
            && until(&type_entry)
        {
            return proxy_entry;
        }
        assert!(
            Instant::now() < deadline,
            "syncz never got there: {syncz:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn initial_state_then_only_changes_and_removals() {
    let (a, b, p) = (
        workload("a", "node1"),
        workload("b", "node1"),
        policy("deny-all"),
    );
    let istiod = start(
        Authentication::Disabled,
        snapshot([a.clone(), b.clone(), p.clone()]),
    )
    .await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();

    // Legacy wildcard (empty subscribe) for addresses, explicit `*` for policies.
    proxy.subscribe(ADDRESS, &[]).await;
    let addresses = proxy.recv().await;
    proxy.subscribe(AUTHORIZATION, &["*"]).await;
    let policies = proxy.recv().await;
    assert_eq!(addresses.type_url, ADDRESS);
    assert_eq!(names(&addresses), [uid("a"), uid("b")]);
    assert!(addresses.removed_resources.is_empty());
    for r in &addresses.resources {
        let expected = if r.name == a.name { &a } else { &b };
        assert_eq!(r.version, expected.version);
        let any = r.resource.as_ref().unwrap();
        assert_eq!(any.type_url, ADDRESS);
        let decoded = Address::decode(any.value.as_slice()).unwrap();
        let Some(address::Type::Workload(w)) = decoded.r#type else {
            panic!("not a workload: {decoded:?}")
        };
        assert_eq!(w.uid, r.name);
    }
    assert_eq!(policies.type_url, AUTHORIZATION);
    assert_eq!(names(&policies), ["default/deny-all"]);
    assert_ne!(addresses.nonce, policies.nonce);
    proxy.ack(&addresses).await;
    proxy.ack(&policies).await;

    // `a` changes, `b` goes, the policy stays: exactly one key and one removal.
    let a2 = workload("a", "node2");
    istiod
        .snapshots
        .send(snapshot([a2.clone(), p.clone()]))
        .unwrap();
    let change = proxy.recv().await;
    assert_eq!(change.type_url, ADDRESS);
    assert_eq!(names(&change), [uid("a")]);
    assert_eq!(change.resources[0].version, a2.version);
    assert_eq!(change.removed_resources, [uid("b")]);
    assert!(![&addresses.nonce, &policies.nonce].contains(&&change.nonce));
    proxy.ack(&change).await;

    // A policy-only change: the next response is for policies, so no empty
    // address response was sent in between.
    istiod
        .snapshots
        .send(snapshot([a2.clone(), policy("allow-nothing")]))
        .unwrap();
    let change = proxy.recv().await;
    assert_eq!(change.type_url, AUTHORIZATION);
    assert_eq!(names(&change), ["default/allow-nothing"]);
    assert_eq!(change.removed_resources, ["default/deny-all"]);
    proxy.ack(&change).await;

    let entry = syncz_until(&istiod, &proxy.node, ADDRESS, |t| t["status"] == "SYNCED").await;
    assert_eq!(entry["identity"], Value::Null);
    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    assert!(
        metrics.contains("pilot_xds_pushes{type=\"wds\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pilot_xds{version=\"unknown\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pilot_xds_push_time_count{type=\"wds\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pilot_proxy_convergence_time_count"),
        "{metrics}"
    );
}

/// ztunnel-rs denies while a policy a workload names has not arrived, so
/// within one change a new policy goes before the workloads naming it, and a
/// removed one after the workloads that stopped naming it.
#[tokio::test]
async fn policies_arrive_before_and_leave_after_the_workloads_naming_them() {
    let named = |policy: &str| {
        let uid = uid("a");
        let msg = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.clone(),
                name: "a".into(),
                namespace: "default".into(),
                addresses: vec![vec![10, 0, 0, 1]],
                authorization_policies: vec![format!("default/{policy}")],
                ..Default::default()
            })),
        };
        Resource::new(ADDRESS, uid, &msg)
    };
    let istiod = start(Authentication::Disabled, snapshot([workload("a", "node1")])).await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    proxy.sync(ADDRESS).await;
    proxy.sync(AUTHORIZATION).await;
    let acked = |t: &Value| t["status"] == "SYNCED";
    syncz_until(&istiod, &proxy.node, ADDRESS, acked).await;
    syncz_until(&istiod, &proxy.node, AUTHORIZATION, acked).await;

    // Added: the policy first, then the workload naming it.
    istiod
        .snapshots
        .send(snapshot([named("p1"), policy("p1")]))
        .unwrap();
    let first = proxy.recv().await;
    let second = proxy.recv().await;
    assert_eq!(
        [first.type_url.as_str(), second.type_url.as_str()],
        [AUTHORIZATION, ADDRESS]
    );
    proxy.ack(&first).await;
    proxy.ack(&second).await;
    syncz_until(&istiod, &proxy.node, ADDRESS, acked).await;
    syncz_until(&istiod, &proxy.node, AUTHORIZATION, acked).await;

    // Removed: the workload's new list first, then the removal.
    istiod
        .snapshots
        .send(snapshot([workload("a", "node1")]))
        .unwrap();
    let first = proxy.recv().await;
    let second = proxy.recv().await;
    assert_eq!(
        [first.type_url.as_str(), second.type_url.as_str()],
        [ADDRESS, AUTHORIZATION]
    );
    assert_eq!(second.removed_resources, ["default/p1"]);
}

#[tokio::test]
async fn explicit_names_and_a_missing_one() {
    let istiod = start(
        Authentication::Disabled,
        snapshot([workload("a", "n"), workload("b", "n")]),
    )
    .await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    let wanted = uid("a");
    let missing = uid("missing");
    proxy.subscribe(ADDRESS, &[&wanted, &missing]).await;
    let response = proxy.recv().await;
    assert_eq!(names(&response), [wanted.as_str()]);
    assert_eq!(response.removed_resources, [missing.as_str()]);
    proxy.ack(&response).await;

    // The missing workload appears: it is sent; `b` changing is not.
    istiod
        .snapshots
        .send(snapshot([
            workload("a", "n"),
            workload("b", "m"),
            workload("missing", "n"),
        ]))
        .unwrap();
    let response = proxy.recv().await;
    assert_eq!(names(&response), [missing.as_str()]);
    assert!(response.removed_resources.is_empty());
}

#[tokio::test]
async fn nack_shows_in_syncz_and_last_good_versions_remain() {
    let istiod = start(
        Authentication::Disabled,
        snapshot([workload("a", "n1"), workload("b", "n1")]),
    )
    .await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    let initial = proxy.sync(ADDRESS).await;

    istiod
        .snapshots
        .send(snapshot([workload("a", "n2"), workload("b", "n1")]))
        .unwrap();
    let bad = proxy.recv().await;
    assert_eq!(names(&bad), [uid("a")]);
    proxy
        .nack(ADDRESS, &bad.nonce, "workload a: address is not valid")
        .await;

    let entry = syncz_until(&istiod, &proxy.node, ADDRESS, |t| !t["last_nack"].is_null()).await;
    let types = entry["types"].as_array().unwrap();
    let address = types.iter().find(|t| t["type_url"] == ADDRESS).unwrap();
    assert_eq!(address["status"], "STALE");
    assert_eq!(
        address["last_nack"]["message"],
        "workload a: address is not valid"
    );
    assert_eq!(address["last_nack"]["nonce"], bad.nonce.as_str());
    assert!(address["last_nack"]["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(address["acked"]["nonce"], initial.nonce.as_str());
    assert_eq!(address["resources_behind"], 1);
    assert_eq!(
        entry["last_nack"]["message"],
        "workload a: address is not valid"
    );
    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    assert!(
        metrics.contains("pilot_total_xds_rejects{type=\"wds\"} 1"),
        "{metrics}"
    );

    // The proxy still holds the first `a`: the next change re-sends `a`
    // along with what changed now.
    istiod
        .snapshots
        .send(snapshot([workload("a", "n2"), workload("b", "n3")]))
        .unwrap();
    let next = proxy.recv().await;
    assert_eq!(names(&next), [uid("a"), uid("b")]);
    proxy.ack(&next).await;
    syncz_until(&istiod, &proxy.node, ADDRESS, |t| t["status"] == "SYNCED").await;
}

#[tokio::test]
async fn stale_nonce_is_ignored() {
    let istiod = start(Authentication::Disabled, snapshot([workload("a", "n1")])).await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    proxy.subscribe(ADDRESS, &[]).await;
    let initial = proxy.recv().await;

    // A NACK of a response this stream never sent, even with a subscription
    // change, does nothing; the real ACK after it still counts.
    let stale = DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        response_nonce: "not-a-nonce-we-sent".into(),
        resource_names_unsubscribe: vec!["*".into()],
        error_detail: Some(api::rpc::Status {
            code: 3,
            message: "stale".into(),
            details: vec![],
        }),
        ..Default::default()
    };
    proxy.send(stale).await;
    proxy.ack(&initial).await;
    let entry = syncz_until(&istiod, &proxy.node, ADDRESS, |t| t["status"] == "SYNCED").await;
    let address = &entry["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type_url"] == ADDRESS)
        .unwrap()
        .clone();
    assert!(address["last_nack"].is_null());
    assert_eq!(address["wildcard"], true);
    assert_eq!(address["acked"]["nonce"], initial.nonce.as_str());
    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    assert!(
        metrics.contains("pilot_xds_expired_nonce{type=\"wds\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("pilot_total_xds_rejects{"), "{metrics}");

    // Still subscribed to everything.
    istiod
        .snapshots
        .send(snapshot([workload("a", "n2")]))
        .unwrap();
    assert_eq!(names(&proxy.recv().await), [uid("a")]);
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_the_difference() {
    let istiod = start(
        Authentication::Disabled,
        snapshot([
            workload("same", "n1"),
            workload("changes", "n1"),
            workload("goes", "n1"),
        ]),
    )
    .await;
    let mut first = connect(istiod.xds, 1, None).await.unwrap();
    let initial = first.sync(ADDRESS).await;
    assert_eq!(initial.resources.len(), 3);
    drop(first);

    istiod
        .snapshots
        .send(snapshot([
            workload("same", "n1"),
            workload("changes", "n2"),
            workload("new", "n1"),
        ]))
        .unwrap();
    let mut again = connect(istiod.xds, 1, None).await.unwrap();
    again.resume(ADDRESS, &["*"], held(&initial)).await;
    let response = again.recv().await;
    assert_eq!(names(&response), [uid("changes"), uid("new")]);
    assert_eq!(response.removed_resources, [uid("goes")]);
}

#[tokio::test]
async fn authenticated_server_requires_a_valid_token() {
    let istiod = start(
        Authentication::Required(tokens()),
        snapshot([workload("a", "node1")]),
    )
    .await;
    let status = connect(istiod.xds, 1, None)
        .await
        .err()
        .expect("served without a token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = connect(istiod.xds, 1, Some("forged"))
        .await
        .err()
        .expect("served a bad token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let mut proxy = connect(istiod.xds, 1, Some("tok-node1")).await.unwrap();
    let response = proxy.sync(ADDRESS).await;
    assert_eq!(names(&response), [uid("a")]);
    let entry = syncz_until(&istiod, &proxy.node, ADDRESS, |t| t["status"] == "SYNCED").await;
    assert_eq!(
        entry["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
    );
    assert_eq!(entry["node"], "node1");
    assert!(entry["connected_since"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn optional_authentication_serves_anonymous_streams_but_refuses_bad_tokens() {
    let istiod = start(
        Authentication::Optional(tokens()),
        snapshot([workload("a", "node1")]),
    )
    .await;
    let mut anonymous = connect(istiod.xds, 1, None).await.unwrap();
    anonymous.sync(ADDRESS).await;
    let status = connect(istiod.xds, 2, Some("forged"))
        .await
        .err()
        .expect("served a bad token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut known = connect(istiod.xds, 3, Some("tok-node1")).await.unwrap();
    known.sync(ADDRESS).await;
    let entry = syncz_until(&istiod, &known.node, ADDRESS, |t| t["status"] == "SYNCED").await;
    assert_eq!(
        entry["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let istiod = start(Authentication::Disabled, snapshot([workload("a", "n")])).await;

    // No node id on the first request.
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    proxy
        .requests
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = proxy.recv_error().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node.id"), "{status:?}");

    // No type URL.
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    proxy.subscribe("", &[]).await;
    let status = proxy.recv_error().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("type_url"), "{status:?}");

    // State of the world is not served.
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", istiod.xds))
        .await
        .unwrap();
    let status = client
        .stream_aggregated_resources(tokio_stream::iter([DiscoveryRequest::default()]))
        .await
        .expect_err("state of the world was served");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(
        status.message().contains("DeltaAggregatedResources"),
        "{status:?}"
    );

    // A served type with nothing published yet: an empty initial response.
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    let response = proxy.sync(AUTHORIZATION).await;
    assert!(response.resources.is_empty() && response.removed_resources.is_empty());
}

/// Every value of a `type` label in a `/metrics` text.
fn type_labels(metrics: &str) -> BTreeSet<String> {
    metrics
        .split("type=\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(value, _)| value.to_string()))
        .collect()
}

#[tokio::test]
async fn unknown_type_urls_are_answered_empty_without_state_or_metric_series() {
    let istiod = start(
        Authentication::Disabled,
        snapshot([workload("a", "n"), policy("p")]),
    )
    .await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    proxy.sync(ADDRESS).await;
    let (_, before) = http_get(istiod.monitoring, "/metrics").await;

    // A thousand made-up types: each subscription gets an empty response
    // (as upstream answers a type it does not know), each ACK nothing.
    for i in 0..1000 {
        let type_url = format!("type.googleapis.com/made.up.T{i}");
        proxy.subscribe(&type_url, &["*"]).await;
        let response = proxy.recv().await;
        assert_eq!(response.type_url, type_url);
        assert!(response.resources.is_empty() && response.removed_resources.is_empty());
        proxy.ack(&response).await;
    }
    // The ACKs were not answered: the next response is for the type asked
    // after them.
    let response = proxy.sync(AUTHORIZATION).await;
    assert_eq!(names(&response), ["default/p"]);

    // No state kept for them...
    let entry = syncz_until(&istiod, &proxy.node, AUTHORIZATION, |t| {
        t["status"] == "SYNCED"
    })
    .await;
    let types: Vec<&str> = entry["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type_url"].as_str().unwrap())
        .collect();
    assert_eq!(types, [AUTHORIZATION, ADDRESS]);
    // ...and no metric series of their own: they count as `other`.
    let (_, after) = http_get(istiod.monitoring, "/metrics").await;
    assert!(!after.contains("made.up"), "{after}");
    assert_eq!(
        type_labels(&after),
        BTreeSet::from(["other".to_string(), "wads".to_string(), "wds".to_string()])
    );
    assert!(
        after.lines().count() < before.lines().count() + 60,
        "the Authorization push and the `other` label added a few series, nothing per made-up type:\n{after}"
    );
    assert!(
        after.contains("xds_unknown_type_requests_total 2000"),
        "{after}"
    );
    assert!(
        after.contains(r#"pilot_xds_pushes{type="other"} 1000"#),
        "{after}"
    );
}

/// A DeltaAggregatedResources call written by hand: one gRPC frame whose
/// length prefix says `declared` and whose payload is `payload`; the
/// status the server ends the stream with.
async fn raw_delta_call(addr: SocketAddr, declared: u32, payload: &[u8]) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&declared.to_be_bytes());
    frame.extend_from_slice(payload);
    let request = http::Request::post(format!(
        "http://{addr}/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
    .unwrap();
    let answer = tokio::time::timeout(PATIENCE, async {
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap()
    })
    .await
    .expect("the server answers");
    let trailers = answer.trailers().cloned().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status trailer")
}

#[tokio::test]
async fn oversized_and_undecodable_requests_end_the_stream_with_a_reason() {
    let istiod = start(Authentication::Disabled, snapshot([workload("a", "n")])).await;

    // Upstream's limit: 4 MiB. Only the length prefix is sent: the server
    // refuses on reading it, before buffering anything.
    for declared in [(4 << 20) + 1, 60 << 20] {
        let status = raw_delta_call(istiod.xds, declared, b"").await;
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(
            status.message().contains("refused")
                && status.message().contains(&declared.to_string())
                && status.message().contains("ISTIO_GPRC_MAXRECVMSGSIZE"),
            "{status:?}"
        );
    }
    // Not a DeltaDiscoveryRequest: a field 1 (type_url) claiming 100 bytes
    // of which 3 follow.
    let garbage = [0x0a, 100, b'a', b'b', b'c'];
    let status = raw_delta_call(istiod.xds, garbage.len() as u32, &garbage).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("could not decode the DeltaDiscoveryRequest"),
        "{status:?}"
    );

    // Just under the limit is served.
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    let many: Vec<String> = (0..30_000)
        .map(|i| format!("Kubernetes//Pod/default/p{i:0>100}"))
        .collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    proxy.subscribe(ADDRESS, &names).await;
    assert_eq!(proxy.recv().await.type_url, ADDRESS);

    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    assert!(
        metrics.contains(r#"xds_refusals_total{reason="too_large"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"xds_refusals_total{reason="undecodable"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_request_limit_is_configurable() {
    let istiod = start_with_limit(
        Authentication::Disabled,
        snapshot([workload("a", "n")]),
        1024,
    )
    .await;
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    let many: Vec<String> = (0..100).map(|i| format!("name-{i:0>20}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    proxy.subscribe(ADDRESS, &names).await;
    let status = proxy.recv_error().await;
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("1024"), "{status:?}");
}

#[tokio::test]
async fn a_hundred_proxies_all_receive_a_change() {
    const PROXIES: usize = 100;
    let istiod = start(
        Authentication::Disabled,
        snapshot((0..50).map(|i| workload(&format!("w{i}"), "n1"))),
    )
    .await;
    let (synced_tx, mut synced_rx) = mpsc::channel(PROXIES);
    let (received_tx, mut received_rx) = mpsc::channel(PROXIES);
    for n in 0..PROXIES {
        let mut proxy = connect(istiod.xds, n, None).await.unwrap();
        let synced_tx = synced_tx.clone();
        let received_tx = received_tx.clone();
        tokio::spawn(async move {
            let initial = proxy.sync(ADDRESS).await;
            assert_eq!(initial.resources.len(), 50);
            synced_tx.send(()).await.unwrap();
            let change = proxy.recv().await;
            received_tx
                .send((names(&change).join(","), Instant::now()))
                .await
                .unwrap();
            proxy.ack(&change).await;
        });
    }
    for _ in 0..PROXIES {
        tokio::time::timeout(PATIENCE, synced_rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let sent = Instant::now();
    istiod
        .snapshots
        .send(snapshot((0..50).map(|i| {
            workload(&format!("w{i}"), if i == 7 { "n2" } else { "n1" })
        })))
        .unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..PROXIES {
        let (names, at) = tokio::time::timeout(PATIENCE, received_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(names, uid("w7"));
        slowest = slowest.max(at - sent);
    }
    // A figure for the log, not an assertion: machines are noisy.
    eprintln!("one change reached {PROXIES} proxies in {slowest:?}");
    let (_, syncz) = get_json(istiod.monitoring, "/debug/syncz").await;
    assert_eq!(syncz["connected"], PROXIES);
}

#[tokio::test]
async fn monitoring_endpoints() {
    let istiod = start(
        Authentication::Disabled,
        snapshot([workload("a", "n"), policy("p")]),
    )
    .await;
    let (status, body) = get_json(istiod.monitoring, "/ready").await;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("has not synced yet"),
        "{body}"
    );
    istiod.ready.send(true).unwrap();
    let (status, _) = get_json(istiod.monitoring, "/ready").await;
    assert_eq!(status, 200);

    let (status, dump) = get_json(istiod.monitoring, "/debug/config_dump").await;
    assert_eq!(status, 200);
    assert_eq!(dump[ADDRESS][0]["name"], uid("a"));
    assert_eq!(dump[ADDRESS][0]["version"], workload("a", "n").version);
    assert_eq!(dump[AUTHORIZATION][0]["name"], "default/p");

    let (status, missing) = get_json(istiod.monitoring, "/debug/nothing").await;
    assert_eq!(status, 404);
    assert!(missing["error"].as_str().unwrap().contains("/debug/syncz"));

    let (status, syncz) = get_json(istiod.monitoring, "/debug/syncz").await;
    assert_eq!(status, 200);
    assert_eq!(syncz["connected"], 0);

    // A proxy that subscribed only to addresses has NOT SENT policies.
    let mut proxy = connect(istiod.xds, 1, None).await.unwrap();
    proxy.sync(ADDRESS).await;
    let entry = syncz_until(&istiod, &proxy.node, ADDRESS, |t| t["status"] == "SYNCED").await;
    let policies = entry["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type_url"] == AUTHORIZATION)
        .unwrap()
        .clone();
    assert_eq!(policies["status"], "NOT SENT");

    // Disconnecting removes the proxy.
    drop(proxy);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, syncz) = get_json(istiod.monitoring, "/debug/syncz").await;
        if syncz["connected"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "proxy still listed: {syncz:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    assert!(
        metrics.contains("pilot_xds{version=\"unknown\"} 0"),
        "{metrics}"
    );
}
