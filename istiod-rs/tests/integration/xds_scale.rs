//! Scale figures for the delta ADS server (ignored by default; run with
//! `cargo test -p istiod-rs --test integration xds_scale -- --ignored --nocapture`):
//! 100 delta-ADS clients on loopback holding 10,000 workloads and 1,000
//! services, then one workload change. The server runs in a child process
//! (this test binary again) so that its peak RSS is its own. Prints figures;
//! asserts only that every client receives exactly the changed key (machines
//! are noisy).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use api::discovery::{DeltaDiscoveryRequest, Node};
use api::type_url::ADDRESS;
use api::workload::{Address, NetworkAddress, Port, PortList, Service, Workload, address};
use istiod_rs::snapshot::{Resource, Snapshot};
use istiod_rs::xds::{Authentication, XdsServer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const PROXIES: usize = 100;
const WORKLOADS: usize = 10_000;
const SERVICES: usize = 1_000;
const PATIENCE: Duration = Duration::from_secs(120);

fn workload(i: usize, node: usize) -> Resource {
    let (ns, name) = (format!("ns-{}", i % 50), format!("app-{i}"));
    let uid = format!("Kubernetes//Pod/{ns}/{name}");
    let service = format!("svc-{}.{ns}.svc.cluster.local", i % SERVICES);
    let msg = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.clone(),
            name: name.clone(),
            namespace: ns.clone(),
            addresses: vec![vec![10, (i >> 16) as u8, (i >> 8) as u8, i as u8]],
            trust_domain: "cluster.local".into(),
            service_account: format!("sa-{}", i % SERVICES),
            node: format!("node-{node}"),
            canonical_name: format!("app-{}", i % SERVICES),
            canonical_revision: "v1".into(),
            workload_name: name,
            cluster_id: "Kubernetes".into(),
            services: BTreeMap::from([(
                format!("{ns}/{service}"),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        ..Default::default()
                    }],
                },
            )]),
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS, uid, &msg)
}

fn service(i: usize) -> Resource {
    let ns = format!("ns-{}", i % 50);
    let hostname = format!("svc-{i}.{ns}.svc.cluster.local");
    let msg = Address {
        r#type: Some(address::Type::Service(Service {
            name: format!("svc-{i}"),
            namespace: ns.clone(),
            hostname: hostname.clone(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, (i >> 8) as u8, i as u8],
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS, format!("{ns}/{hostname}"), &msg)
}

fn cluster(changed_node: usize) -> Arc<Snapshot> {
    let mut s = Snapshot::default();
    for i in 0..WORKLOADS {
        s.insert(workload(i, if i == 4242 { changed_node } else { i % 100 }));
    }
    for i in 0..SERVICES {
        s.insert(service(i));
    }
    Arc::new(s)
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Lines the server process prints for the test to read start with this.
const TAG: &str = "xds-scale";

/// The server half: serves the generated cluster, publishes the change when
/// told `change` on stdin, prints its peak RSS when told `rss`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the server process of the scale test"]
async fn scale_server_process() {
    if std::env::var_os("XDS_SCALE_SERVER").is_none() {
        return;
    }
    let initial = cluster(42);
    let full_bytes: usize = initial
        .of_type(ADDRESS)
        .values()
        .map(|r| r.body.value.len())
        .sum();
    let (snapshots, rx) = watch::channel(initial);
    let mut registry = Registry::default();
    let server = XdsServer::new(rx, &mut registry);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.service(Authentication::Disabled))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut change = Some(cluster(7));
    println!("{TAG} listening {addr} {full_bytes}");
    // tokio's stdin needs a feature the workspace does not enable.
    let (commands_tx, mut commands) = mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if commands_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(command) = commands.recv().await {
        match command.as_str() {
            "change" => {
                snapshots.send(change.take().unwrap()).unwrap();
            }
            "rss" => println!("{TAG} rss {}", peak_rss_kib().unwrap_or(0)),
            other => panic!("unknown command {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale figures; run with --ignored --nocapture"]
async fn one_change_reaches_a_hundred_proxies_holding_ten_thousand_workloads() {
    let mut server = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "xds_scale::scale_server_process",
            "--nocapture",
        ])
        .env("XDS_SCALE_SERVER", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = server.stdin.take().unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let mut tagged = async move || loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("the server process exited");
        if let Some(rest) = line.strip_prefix(TAG) {
            return rest
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>();
        }
    };
    let listening = tagged().await;
    let addr: std::net::SocketAddr = listening[1].parse().unwrap();
    let full_bytes: usize = listening[2].parse().unwrap();

    stdin.write_all(b"rss\n").await.unwrap();
    let idle_rss_kib: u64 = tagged().await[1].parse().unwrap();
    let (synced_tx, mut synced_rx) = mpsc::channel(PROXIES);
    let (received_tx, mut received_rx) = mpsc::channel(PROXIES);
    let start = Instant::now();
    for n in 0..PROXIES {
        let synced_tx = synced_tx.clone();
        let received_tx = received_tx.clone();
        tokio::spawn(async move {
            let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap()
                .max_decoding_message_size(usize::MAX);
            let (requests, rx) = mpsc::channel(4);
            let node = Some(Node {
                id: format!("ztunnel~10.1.0.{n}~z-{n}.istio-system~istio-system.svc.cluster.local"),
                ..Default::default()
            });
            requests
                .send(DeltaDiscoveryRequest {
                    node: node.clone(),
                    type_url: ADDRESS.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut responses = client
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let ack = |nonce: String| DeltaDiscoveryRequest {
                node: node.clone(),
                type_url: ADDRESS.into(),
                response_nonce: nonce,
                ..Default::default()
            };
            let initial = responses.message().await.unwrap().unwrap();
            assert_eq!(initial.resources.len(), WORKLOADS + SERVICES);
            requests.send(ack(initial.nonce)).await.unwrap();
            synced_tx.send(()).await.unwrap();
            let change = responses.message().await.unwrap().unwrap();
            let at = Instant::now();
            let names: Vec<String> = change.resources.iter().map(|r| r.name.clone()).collect();
            received_tx.send((names, at)).await.unwrap();
            requests.send(ack(change.nonce)).await.unwrap();
            // Hold the stream open until the test ends.
            let _ = responses.message().await;
        });
    }
    for _ in 0..PROXIES {
        tokio::time::timeout(PATIENCE, synced_rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let initial_sync = start.elapsed();

    let sent = Instant::now();
    stdin.write_all(b"change\n").await.unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..PROXIES {
        let (names, at) = tokio::time::timeout(PATIENCE, received_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(names, ["Kubernetes//Pod/ns-42/app-4242"]);
        slowest = slowest.max(at - sent);
    }
    stdin.write_all(b"rss\n").await.unwrap();
    let rss_kib: u64 = tagged().await[1].parse().unwrap();
    eprintln!(
        "{} resources, {} KiB encoded; {PROXIES} proxies synced the full state in {initial_sync:?}; \
         one change reached all of them in {slowest:?}; \
         server peak RSS {} MiB ({} MiB before the proxies connected)",
        WORKLOADS + SERVICES,
        full_bytes / 1024,
        rss_kib / 1024,
        idle_rss_kib / 1024
    );
}
