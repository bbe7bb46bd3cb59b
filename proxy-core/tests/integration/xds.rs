//! The delta xDS client against a small ADS server written here: ACK after
//! apply, NACK naming the bad resource while the rest applies, removals,
//! state kept while the server is away, and a resumed stream carrying
//! `initial_resource_versions`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use api::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use api::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use api::security::Authorization as XdsAuthorization;
use api::type_url::{ADDRESS, AUTHORIZATION};
use api::workload::{Address, Service, Workload, address};
use prost::Message;
use proxy_core::store::WorkloadStore;
use proxy_core::xds::{self, ConnectionState, StatusWatch, XdsClient, XdsConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(20);

/// One stream a proxy opened: what it sends, and a way to answer.
struct Stream {
    requests: Streaming<DeltaDiscoveryRequest>,
    respond: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    metadata: MetadataMap,
}

impl Stream {
    async fn next(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("the proxy sent nothing")
            .expect("stream error")
            .expect("stream ended")
    }

    /// The two initial subscriptions, by type URL.
    async fn subscriptions(&mut self) -> BTreeMap<String, DeltaDiscoveryRequest> {
        let mut subs = BTreeMap::new();
        for _ in 0..2 {
            let r = self.next().await;
            subs.insert(r.type_url.clone(), r);
        }
        subs
    }

    async fn send(&self, response: DeltaDiscoveryResponse) {
        self.respond.send(Ok(response)).await.unwrap();
    }

    /// Sends `response` and returns the proxy's answer to it.
    async fn exchange(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let nonce = response.nonce.clone();
        self.send(response).await;
        let reply = self.next().await;
        assert_eq!(reply.response_nonce, nonce);
        reply
    }
}

struct FakeIstiod {
    streams: mpsc::UnboundedSender<Stream>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeIstiod {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (respond, rx) = mpsc::channel(16);
        let metadata = request.metadata().clone();
        let _ = self.streams.send(Stream {
            requests: request.into_inner(),
            respond,
            metadata,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A fake istiod on its own runtime, so that stopping it closes every
/// connection it holds, as a dying process would.
struct Server {
    streams: mpsc::UnboundedReceiver<Stream>,
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    async fn start(addr: SocketAddr) -> (Server, SocketAddr) {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        // Restarting on the same port while old connections linger.
        socket.set_reuse_address(true).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(128).unwrap();
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let (tx, streams) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let serve = tonic::transport::Server::builder()
                    .add_service(AggregatedDiscoveryServiceServer::new(FakeIstiod {
                        streams: tx,
                    }))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    r = serve => r.unwrap(),
                    _ = stopped => {}
                }
            });
            // Dropping the runtime ends every connection task.
        });
        (
            Server {
                streams,
                stop,
                thread,
            },
            addr,
        )
    }

    async fn accept(&mut self) -> Stream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("the proxy did not connect")
            .unwrap()
    }

    /// Stops the server and closes its connections.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::task::spawn_blocking(move || self.thread.join().unwrap())
            .await
            .unwrap();
    }
}

fn pod(name: &str, ip: [u8; 4]) -> Address {
    Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid(name),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![ip.to_vec()],
            service_account: "sa".into(),
            ..Default::default()
        })),
    }
}

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/ns/{name}")
}

fn service(host: &str) -> Address {
    Address {
        r#type: Some(address::Type::Service(Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: host.into(),
            ..Default::default()
        })),
    }
}

fn policy(name: &str) -> XdsAuthorization {
    XdsAuthorization {
        name: name.into(),
        namespace: "ns".into(),
        ..Default::default()
    }
}

fn resource(type_url: &str, name: &str, version: &str, msg: &impl Message) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

const SVC: &str = "ns/web.ns.svc.cluster.local";

fn client(addr: SocketAddr, store: &WorkloadStore) -> XdsClient {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut config = XdsConfig::new(xds::ztunnel_node_id(
        "10.0.0.1".parse().unwrap(),
        "ztunnel-abc",
        "istio-system",
    ));
    config.backoff_min = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(200);
    xds::handlers::subscribe_store(XdsClient::new(channel, config), store).with_metadata(
        std::sync::Arc::new(|m: &mut MetadataMap| {
            m.insert("authorization", "Bearer node-token".parse().unwrap());
            Ok(())
        }),
    )
}

async fn wait_for(status: &mut StatusWatch, what: impl Fn(&xds::XdsStatus) -> bool) {
    tokio::time::timeout(WAIT, async {
        while !what(&status.current()) {
            status.changed().await.expect("client gone");
        }
    })
    .await
    .expect("status never reached");
}

#[tokio::test]
async fn acks_applies_and_nacks_only_the_invalid_resource() {
    let (mut server, addr) = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let store = WorkloadStore::new();
    let client = client(addr, &store);
    let status = client.status();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(client.run(shutdown.clone()));

    let mut stream = server.accept().await;
    assert_eq!(
        stream.metadata.get("authorization").unwrap(),
        "Bearer node-token"
    );
    let subs = stream.subscriptions().await;
    assert_eq!(
        subs.keys().collect::<Vec<_>>(),
        [AUTHORIZATION, ADDRESS],
        "wildcard subscriptions to both types"
    );
    for sub in subs.values() {
        assert_eq!(sub.resource_names_subscribe, ["*"]);
        assert!(sub.initial_resource_versions.is_empty());
        assert_eq!(
            sub.node.as_ref().unwrap().id,
            "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
    }
    assert!(!status.current().synced);

    // One bad workload among good resources: NACKed by name and field, the
    // others applied.
    let mut bad = pod("bad", [10, 0, 0, 9]);
    if let Some(address::Type::Workload(w)) = &mut bad.r#type {
        w.addresses = vec![vec![1, 2, 3]];
    }
    let reply = stream
        .exchange(response(
            ADDRESS,
            "a1",
            vec![
                resource(ADDRESS, &uid("good"), "v1", &pod("good", [10, 0, 0, 1])),
                resource(ADDRESS, &uid("bad"), "v1", &bad),
                resource(ADDRESS, SVC, "v1", &service("web.ns.svc.cluster.local")),
            ],
            &[],
        ))
        .await;
    let nack = reply.error_detail.expect("a NACK");
    assert_eq!(nack.code, 3, "INVALID_ARGUMENT");
    assert!(
        nack.message.contains("Kubernetes//Pod/ns/bad") && nack.message.contains("addresses[0]"),
        "{}",
        nack.message
    );
    assert!(!nack.message.contains("ns/good"), "{}", nack.message);
    let snap = store.snapshot();
    assert!(snap.workload_by_uid(&uid("good")).is_some());
    assert!(snap.workload_by_uid(&uid("bad")).is_none());
    assert!(snap.service(&SVC.parse().unwrap()).is_some());
    assert!(
        !status.current().synced,
        "Authorization has not arrived yet"
    );

    // A fully valid response is ACKed; both types in: synced.
    let reply = stream
        .exchange(response(
            AUTHORIZATION,
            "p1",
            vec![resource(AUTHORIZATION, "ns/deny", "v1", &policy("deny"))],
            &[],
        ))
        .await;
    assert_eq!(reply.error_detail, None);
    assert_eq!(reply.type_url, AUTHORIZATION);
    tokio::time::timeout(WAIT, status.synced()).await.unwrap();
    assert!(store.snapshot().policy("ns/deny").is_some());

    // Removals apply.
    let reply = stream
        .exchange(response(ADDRESS, "a2", vec![], &[&uid("good"), SVC]))
        .await;
    assert_eq!(reply.error_detail, None);
    let snap = store.snapshot();
    assert!(snap.workload_by_uid(&uid("good")).is_none());
    assert!(snap.service(&SVC.parse().unwrap()).is_none());

    // A resource of the wrong type, and a name that is not the workload's uid.
    let reply = stream
        .exchange(response(
            ADDRESS,
            "a3",
            vec![
                resource(AUTHORIZATION, "ns/x", "v1", &policy("x")),
                resource(ADDRESS, "wrong-name", "v1", &pod("w", [10, 0, 0, 2])),
                resource(ADDRESS, &uid("ok"), "v1", &pod("ok", [10, 0, 0, 3])),
            ],
            &[],
        ))
        .await;
    let message = reply.error_detail.unwrap().message;
    assert!(message.starts_with("rejected 2 resources"), "{message}");
    assert!(message.contains("ns/x: has type"), "{message}");
    assert!(message.contains("wrong-name: uid"), "{message}");
    assert!(store.snapshot().workload_by_uid(&uid("ok")).is_some());

    // A type nobody subscribed to is refused whole.
    let reply = stream
        .exchange(response("type.googleapis.com/foo", "f1", vec![], &[]))
        .await;
    assert!(
        reply
            .error_detail
            .unwrap()
            .message
            .contains("did not subscribe")
    );

    let s = status.current();
    assert_eq!(s.connection, ConnectionState::Connected);
    assert_eq!(s.types[ADDRESS].nacks, 2);
    assert_eq!(s.types[ADDRESS].acks, 1);
    assert_eq!(s.types[ADDRESS].resources, 1);
    assert_eq!(s.types[AUTHORIZATION].acks, 1);

    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(status.current().connection, ConnectionState::Stopped);
    server.stop().await;
}

#[tokio::test]
async fn keeps_serving_while_away_and_resumes_with_its_versions() {
    let (mut server, addr) = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let store = WorkloadStore::new();
    let client = client(addr, &store);
    let mut status = client.status();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(client.run(shutdown.clone()));

    let mut stream = server.accept().await;
    stream.subscriptions().await;
    let mut bad = pod("bad", [10, 0, 0, 9]);
    if let Some(address::Type::Workload(w)) = &mut bad.r#type {
        w.status = 42;
    }
    stream
        .exchange(response(
            ADDRESS,
            "a1",
            vec![
                resource(ADDRESS, &uid("a"), "va1", &pod("a", [10, 0, 0, 1])),
                resource(ADDRESS, &uid("b"), "vb1", &pod("b", [10, 0, 0, 2])),
                resource(ADDRESS, &uid("bad"), "vbad", &bad),
                resource(ADDRESS, SVC, "vs1", &service("web.ns.svc.cluster.local")),
            ],
            &[],
        ))
        .await;
    stream
        .exchange(response(
            AUTHORIZATION,
            "p1",
            vec![resource(AUTHORIZATION, "ns/p", "vp1", &policy("p"))],
            &[],
        ))
        .await;
    tokio::time::timeout(WAIT, status.synced()).await.unwrap();

    // istiod goes away: the stream ends and nothing listens any more.
    server.stop().await;
    drop(stream);
    wait_for(&mut status, |s| {
        s.connection == ConnectionState::Disconnected && s.connection_attempts >= 2
    })
    .await;
    let snap = store.snapshot();
    assert!(snap.workload_by_uid(&uid("a")).is_some(), "state kept");
    assert!(snap.service(&SVC.parse().unwrap()).is_some());
    assert!(snap.policy("ns/p").is_some());
    assert!(status.current().synced, "still ready from the last state");
    assert!(status.current().last_error.is_some());

    // It comes back on the same address; the proxy resumes with what it
    // holds (the rejected resource is not among it).
    let (mut server, _) = Server::start(addr).await;
    let mut stream = server.accept().await;
    let subs = stream.subscriptions().await;
    let held = |t: &str| {
        let mut v: Vec<(String, String)> = subs[t]
            .initial_resource_versions
            .clone()
            .into_iter()
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        held(ADDRESS),
        [
            (uid("a"), "va1".to_string()),
            (uid("b"), "vb1".to_string()),
            (SVC.to_string(), "vs1".to_string()),
        ]
    );
    assert_eq!(
        held(AUTHORIZATION),
        [("ns/p".to_string(), "vp1".to_string())]
    );
    wait_for(&mut status, |s| s.connection == ConnectionState::Connected).await;

    // Only the difference follows: b removed, a changed.
    let reply = stream
        .exchange(response(
            ADDRESS,
            "r1",
            vec![resource(
                ADDRESS,
                &uid("a"),
                "va2",
                &pod("a", [10, 0, 0, 7]),
            )],
            &[&uid("b")],
        ))
        .await;
    assert_eq!(reply.error_detail, None);
    let snap = store.snapshot();
    assert!(snap.workload_by_uid(&uid("b")).is_none());
    assert_eq!(
        snap.workload_by_uid(&uid("a")).unwrap().addresses,
        ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(snap.service(&SVC.parse().unwrap()).is_some());

    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn on_demand_names_are_subscribed_once_and_again_after_a_reconnect() {
    let (mut server, addr) = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let store = WorkloadStore::new();
    let client = client(addr, &store);
    let on_demand = client.on_demand();
    let mut status = client.status();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(client.run(shutdown.clone()));

    let mut stream = server.accept().await;
    stream.subscriptions().await;
    wait_for(&mut status, |s| s.connection == ConnectionState::Connected).await;
    // Asked twice, and once for a type the proxy does not handle: one
    // explicit subscription goes out.
    on_demand.request(ADDRESS, "/10.0.0.5".to_string());
    on_demand.request(ADDRESS, "/10.0.0.5".to_string());
    on_demand.request("type.googleapis.com/unknown.Type", "x".to_string());
    let asked = stream.next().await;
    assert_eq!(asked.type_url, ADDRESS);
    assert_eq!(asked.resource_names_subscribe, ["/10.0.0.5"]);
    assert!(asked.response_nonce.is_empty(), "not an ACK: {asked:?}");
    // istiod answers with the workload under its own name; the store has it
    // by address.
    let reply = stream
        .exchange(response(
            ADDRESS,
            "d1",
            vec![resource(
                ADDRESS,
                &uid("c"),
                "vc1",
                &pod("c", [10, 0, 0, 5]),
            )],
            &[],
        ))
        .await;
    assert_eq!(reply.error_detail, None);
    let ip = "10.0.0.5".parse().unwrap();
    assert!(store.snapshot().workload_by_address("", ip).is_some());
    // A name istiod knows nothing of comes back as removed: not a NACK.
    on_demand.request(ADDRESS, "/10.0.0.6".to_string());
    assert_eq!(stream.next().await.resource_names_subscribe, ["/10.0.0.6"]);
    let reply = stream
        .exchange(response(ADDRESS, "d2", vec![], &["/10.0.0.6"]))
        .await;
    assert_eq!(reply.error_detail, None);

    // A new stream subscribes to both again, beside the wildcard.
    server.stop().await;
    drop(stream);
    let (mut server, _) = Server::start(addr).await;
    let mut stream = server.accept().await;
    let subs = stream.subscriptions().await;
    assert_eq!(
        subs[ADDRESS].resource_names_subscribe,
        ["*", "/10.0.0.5", "/10.0.0.6"]
    );
    assert_eq!(subs[AUTHORIZATION].resource_names_subscribe, ["*"]);

    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    server.stop().await;
}
