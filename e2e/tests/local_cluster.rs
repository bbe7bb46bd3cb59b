//! The local cluster with the mesh off, proven with plain traffic: pods on
//! two nodes reach each other directly by pod IP (same node and across
//! nodes, TCP and HTTP) and the server sees the client's pod IP; the cluster
//! state is written for istiod-rs; the sample apps measure; and nothing is
//! left behind after a teardown, a SIGTERM or a crash.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::apps::{BulkReport, ConnectRateReport, HttpReport, LoadReport, TcpReport};
use e2e::netns::{self, NetNs};
use e2e::privilege;
use e2e::run::{PREFIX, Run, STATE_DIR};
use e2e::{AppCommand, Cluster, LocalCluster, LocalClusterConfig, PodInfo, PodRequest};

const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const ECHO_TCP: u16 = 9000;
const ECHO_HELLO: u16 = 9001;
const ECHO_SINK: u16 = 9002;
const ECHO_HTTP: u16 = 8080;

/// Set for the child process that plays a crashed / interrupted run.
const HELPER_ENV: &str = "E2E_TEST_RUN_HELPER";

fn cluster() -> LocalCluster {
    let cluster =
        LocalCluster::start(LocalClusterConfig::default()).expect("the local cluster starts");
    cluster
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n")
        .expect("namespace applies");
    cluster
}

fn echo_pod(cluster: &LocalCluster, name: &str, node: &str) -> PodInfo {
    let args = [
        "--tcp",
        &ECHO_TCP.to_string(),
        "--tcp-hello",
        &ECHO_HELLO.to_string(),
        "--http",
        &ECHO_HTTP.to_string(),
        "--sink",
        &ECHO_SINK.to_string(),
    ]
    .map(String::from);
    cluster
        .create_pod(
            &PodRequest::new("demo", name)
                .on_node(node)
                .label("app", "echo")
                .command(AppCommand::echo(args))
                .port("tcp", ECHO_TCP)
                .port("hello", ECHO_HELLO)
                .port("http", ECHO_HTTP)
                .port("sink", ECHO_SINK),
        )
        .unwrap_or_else(|e| panic!("echo pod {name} starts: {e}"))
}

fn client_pod(cluster: &LocalCluster, name: &str, node: &str) -> PodInfo {
    cluster
        .create_pod(
            &PodRequest::new("demo", name)
                .on_node(node)
                .label("app", "client"),
        )
        .unwrap_or_else(|e| panic!("client pod {name} starts: {e}"))
}

fn client<T: serde::de::DeserializeOwned>(
    cluster: &LocalCluster,
    from: &str,
    args: &[String],
) -> T {
    let out = cluster
        .exec(
            "demo",
            from,
            &AppCommand::client(args.to_vec()),
            EXEC_TIMEOUT,
        )
        .expect("client runs");
    assert!(
        out.success(),
        "client {args:?} failed: {}\n{}",
        out.stdout,
        out.stderr
    );
    out.json().expect("client prints its report")
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn peer_ip(peer: &str) -> Ipv4Addr {
    match peer.parse::<SocketAddr>().expect("peer is ip:port") {
        SocketAddr::V4(v4) => *v4.ip(),
        other => panic!("expected an IPv4 peer, got {other}"),
    }
}

#[test]
fn pods_reach_each_other_by_pod_ip_within_and_across_nodes() {
    if !privilege::enter_for_test() {
        return;
    }
    let cluster = cluster();
    let near = echo_pod(&cluster, "echo-near", "node0");
    let far = echo_pod(&cluster, "echo-far", "node1");
    let me = client_pod(&cluster, "client", "node0");
    assert_ne!(near.ip, far.ip);
    assert_eq!((near.node.as_str(), far.node.as_str()), ("node0", "node1"));

    for (server, label) in [(&near, "same node"), (&far, "cross node")] {
        // Plain TCP echo: what goes out comes back.
        let target = format!("{}:{ECHO_TCP}", server.ip);
        let r: TcpReport = client(
            &cluster,
            "client",
            &args(&["tcp", &target, "--payload", "100000"]),
        );
        assert!(r.ok && r.echo_matches, "{label}: {r:?}");
        assert_eq!(r.received_bytes, 100_000, "{label}");
        assert_eq!(
            peer_ip(r.local.as_deref().unwrap()),
            me.ip,
            "{label}: client's own address"
        );

        // The server saw the client's pod IP.
        let target = format!("{}:{ECHO_HELLO}", server.ip);
        let r: TcpReport = client(
            &cluster,
            "client",
            &args(&["tcp", &target, "--hello", "--message", "hi"]),
        );
        let hello = r.hello.expect("hello line");
        assert_eq!(
            peer_ip(&hello.peer),
            me.ip,
            "{label}: server's view of the client"
        );
        assert_eq!(
            (hello.pod.as_str(), hello.namespace.as_str()),
            (server.name.as_str(), "demo")
        );
        assert!(r.echo_matches, "{label}");

        // HTTP: the reply describes the request and the client's pod IP.
        let url = format!("http://{}:{ECHO_HTTP}/where?from=client", server.ip);
        let r: HttpReport = client(
            &cluster,
            "client",
            &args(&["http", &url, "--header", "x-test: yes"]),
        );
        assert_eq!(r.status, Some(200), "{label}: {r:?}");
        let echo = r.echo.expect("an EchoReply body");
        assert_eq!(peer_ip(&echo.peer), me.ip, "{label}");
        assert_eq!(echo.pod, server.name);
        assert_eq!(
            (echo.method.as_str(), echo.path.as_str()),
            ("GET", "/where?from=client")
        );
        assert_eq!(echo.headers["x-test"], vec!["yes".to_string()]);
    }

    // A server with nothing on the port refuses, and the client says so.
    let out = cluster
        .exec(
            "demo",
            "client",
            &AppCommand::client(args(&["tcp", &format!("{}:1", far.ip), "--timeout", "5s"])),
            EXEC_TIMEOUT,
        )
        .unwrap();
    assert!(!out.success());
    let r: TcpReport = out.json().unwrap();
    assert!(r.error.unwrap().contains("connect"), "refusal is reported");
}

#[test]
fn cluster_state_is_written_for_the_control_plane() {
    if !privilege::enter_for_test() {
        return;
    }
    use k8s_openapi::api::core::v1::{Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let cluster = cluster();
    let a = echo_pod(&cluster, "echo-a", "node0");
    let b = echo_pod(&cluster, "echo-b", "node1");
    cluster
        .apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  selector:\n    app: echo\n  \
             ports:\n  - name: http\n    port: 80\n    targetPort: http\n",
        )
        .unwrap();
    let dir = cluster.config_dir();
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };

    let pod: Pod = serde_saphyr::from_str(&read("Pod_demo_echo-b.yaml")).unwrap();
    let status = pod.status.unwrap();
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("node1"));
    assert_eq!(status.pod_ip, Some(b.ip.to_string()));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );

    let svc: Service = serde_saphyr::from_str(&read("Service_demo_echo.yaml")).unwrap();
    let vip: Ipv4Addr = svc.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
    assert!(cluster.topology().plan.service_range.contains(&vip));

    let endpoints = |dir: &Path| -> Vec<String> {
        let slice: EndpointSlice = serde_saphyr::from_str(
            &std::fs::read_to_string(dir.join("EndpointSlice.discovery.k8s.io_demo_echo-0.yaml"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            slice.ports.unwrap()[0].port,
            Some(i32::from(ECHO_HTTP)),
            "named targetPort resolved"
        );
        let mut ips: Vec<String> = slice
            .endpoints
            .unwrap()
            .into_iter()
            .flat_map(|e| e.addresses)
            .collect();
        ips.sort();
        ips
    };
    let mut both = vec![a.ip.to_string(), b.ip.to_string()];
    both.sort();
    assert_eq!(endpoints(&dir), both);

    // A deleted pod leaves the service, its file and its network.
    let b_netns = cluster.pod_netns("demo", "echo-b").unwrap();
    cluster.delete_pod("demo", "echo-b").unwrap();
    assert_eq!(endpoints(&dir), vec![a.ip.to_string()]);
    assert!(!dir.join("Pod_demo_echo-b.yaml").exists());
    assert!(!b_netns.exists());
    assert!(cluster.pod("demo", "echo-b").is_none());

    // Bad input is refused with a reason, and the rest keeps working.
    let err = cluster
        .create_pod(&PodRequest::new("nowhere", "x"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("namespace \"nowhere\" does not exist"),
        "{err}"
    );
    let err = cluster
        .create_pod(&PodRequest::new("demo", "x").on_node("node9"))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "no node named \"node9\" (nodes: node0, node1)");
    let err = cluster
        .create_pod(
            &PodRequest::new("demo", "crashes")
                .command(AppCommand::echo(["--http", "not-a-port"]))
                .port("http", 8080),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("did not become ready") && err.contains("its app exited"),
        "{err}"
    );
    assert!(
        !dir.join("Pod_demo_crashes.yaml").exists(),
        "a failed pod is rolled back"
    );
    // Its address was released: the next pod on node0 gets it.
    let again = client_pod(&cluster, "again", "node0");
    assert!(cluster.topology().nodes[0].pod_range.contains(&again.ip));
}

#[test]
fn sample_apps_measure_load_bulk_and_connect_rate() {
    if !privilege::enter_for_test() {
        return;
    }
    let cluster = cluster();
    let server = echo_pod(&cluster, "echo", "node1");
    client_pod(&cluster, "client", "node0");
    let tcp = format!("{}:{ECHO_TCP}", server.ip);

    let r: LoadReport = client(
        &cluster,
        "client",
        &args(&[
            "load",
            &tcp,
            "--rate",
            "200",
            "--connections",
            "2",
            "--duration",
            "1s",
            "--payload",
            "1024",
            "--distribution",
        ]),
    );
    assert!(r.ok && r.errors == 0, "{r:?}");
    assert!(r.requests > 0);
    assert!(
        r.latency_us.p50 > 0.0
            && r.latency_us.p50 <= r.latency_us.p99
            && r.latency_us.p99 <= r.latency_us.max
    );
    assert_eq!(r.distribution.as_ref().map(Vec::len), Some(15));

    let url = format!("http://{}:{ECHO_HTTP}/load", server.ip);
    let r: LoadReport = client(
        &cluster,
        "client",
        &args(&[
            "load",
            &url,
            "--protocol",
            "http",
            "--rate",
            "100",
            "--connections",
            "2",
            "--duration",
            "1s",
        ]),
    );
    assert!(r.ok && r.errors == 0 && r.protocol == "http", "{r:?}");

    let sink = format!("{}:{ECHO_SINK}", server.ip);
    let r: BulkReport = client(
        &cluster,
        "client",
        &args(&["bulk", &sink, "--duration", "1s"]),
    );
    assert!(r.ok && r.bytes > 0 && r.bits_per_second > 0.0, "{r:?}");

    let r: ConnectRateReport = client(
        &cluster,
        "client",
        &args(&[
            "connect-rate",
            &tcp,
            "--duration",
            "1s",
            "--concurrency",
            "2",
        ]),
    );
    assert!(r.ok && r.connections > 0 && r.errors == 0, "{r:?}");
}

#[test]
fn proxy_endpoints_are_read_inside_their_namespaces() {
    if !privilege::enter_for_test() {
        return;
    }
    use e2e::apps::EchoReply;
    use e2e::process::ProcessSpec;
    use e2e::{ClusterError, ProxyRef};

    let cluster = cluster();
    echo_pod(&cluster, "echo", "node1");
    let reply = cluster
        .proxy_get(
            &ProxyRef::Pod {
                namespace: "demo".into(),
                name: "echo".into(),
            },
            ECHO_HTTP,
            "/stats",
        )
        .unwrap();
    assert_eq!(reply.status, 200);
    let echo: EchoReply = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(echo.path, "/stats");
    assert_eq!(
        peer_ip(&echo.peer),
        Ipv4Addr::LOCALHOST,
        "asked from inside the pod"
    );

    // Stand-ins for a node agent's metrics (in the node's netns) and istiod's
    // debug port, bound to loopback only, as the real ones are: reachable
    // only from inside. (A node's ztunnel-rs runs in a netns of its own,
    // which exists only with the mesh on.)
    let echo_bin = e2e::binaries::Binaries::default()
        .get("e2e", "echo")
        .unwrap();
    let serve = |ns: &NetNs, port: u16| {
        let spec = ProcessSpec::new(format!("stand-in-{port}"), &echo_bin).args([
            "--bind",
            "127.0.0.1",
            "--http",
            &port.to_string(),
        ]);
        let p = cluster.run().spawn(&spec, ns).unwrap();
        ns.wait_for_listener(port, Duration::from_secs(30), &|| {
            cluster.run().exited(&p).map(|s| s.to_string())
        })
        .unwrap();
    };
    serve(
        cluster.node_netns("node1").unwrap(),
        e2e::cluster::NODE_AGENT_MONITORING,
    );
    serve(
        &cluster.topology().control_plane,
        api::ports::ISTIOD_MONITORING,
    );

    let metrics = cluster
        .metrics(&ProxyRef::NodeAgent {
            node: "node1".into(),
        })
        .unwrap();
    let echo: EchoReply = serde_json::from_str(&metrics).unwrap();
    assert_eq!(echo.path, "/metrics");
    let dump = cluster.config_dump(&ProxyRef::Istiod).unwrap();
    assert_eq!(dump["path"], "/debug/config_dump");

    // node0 runs nothing on that port: the error says where it looked.
    let err = cluster
        .metrics(&ProxyRef::NodeAgent {
            node: "node0".into(),
        })
        .unwrap_err();
    assert!(matches!(err, ClusterError::Http { .. }), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("127.0.0.1:15014") && err.contains("node0") && err.contains("connect"),
        "{err}"
    );
    // Without the mesh no ztunnel-rs runs, so it has no netns to read in.
    let err = cluster
        .metrics(&ProxyRef::Ztunnel {
            node: "node1".into(),
        })
        .unwrap_err();
    assert!(matches!(err, ClusterError::MeshOff), "{err}");
}

/// What a run left on the machine: namespaces with its id, processes inside
/// them, its state file, host links naming it.
fn leftovers(run_id: &str, inodes: &[u64]) -> Vec<String> {
    let mut found: Vec<String> = netns::names_with_prefix(&format!("{PREFIX}{run_id}-"))
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    for inode in inodes {
        for pid in netns::pids_in_namespace(*inode) {
            found.push(format!("process {pid} in netns inode {inode}"));
        }
    }
    if Path::new(STATE_DIR).join(format!("{run_id}.json")).exists() {
        found.push("state file".into());
    }
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        if line.contains(run_id) || line.contains(PREFIX) {
            found.push(format!("host link {line}"));
        }
    }
    found
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn teardown_leaves_nothing_behind() {
    if !privilege::enter_for_test() {
        return;
    }
    let cluster = cluster();
    echo_pod(&cluster, "echo", "node1");
    let id = cluster.run().id().to_string();
    let record = cluster.run().record();
    let inodes: Vec<u64> = record
        .netns
        .iter()
        .filter_map(|n| NetNs::named(n).inode())
        .collect();
    assert_eq!(
        inodes.len(),
        5,
        "fabric, control plane, two nodes, one pod: {:?}",
        record.netns
    );
    assert!(
        !leftovers(&id, &inodes).is_empty(),
        "the check sees a live run"
    );
    let pids: Vec<u32> = record.processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids.len(), 1, "the echo app");
    let run_dir = cluster.run().dir().to_path_buf();

    drop(cluster);
    assert_eq!(leftovers(&id, &inodes), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is gone"
        );
    }
    assert!(
        !run_dir.exists(),
        "the run directory is removed after a clean run"
    );
}

/// Starts this test binary's `run_helper` in a child process, which builds a
/// cluster with one pod and reports its run id; returns the child and the id.
fn start_helper() -> (std::process::Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "run_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id = loop {
        match lines.next() {
            Some(Ok(line)) => {
                // libtest prints "test run_helper ... " without a newline first.
                if let Some((_, id)) = line.split_once("RUN-READY ") {
                    break id.trim().to_string();
                }
            }
            other => panic!("the helper ended before its cluster was ready: {other:?}"),
        }
    };
    // Keep draining so the helper never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, id)
}

/// Not a test on its own: the child process of the crash and signal tests.
#[test]
#[ignore = "run by crashed_runs_are_cleaned_by_the_next_run and sigterm_tears_the_cluster_down"]
fn run_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let cluster = cluster();
    echo_pod(&cluster, "echo", "node0");
    println!("RUN-READY {}", cluster.run().id());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[test]
fn crashed_runs_are_cleaned_by_the_next_run() {
    if !privilege::enter_for_test() {
        return;
    }
    let (mut child, id) = start_helper();
    let names = netns::names_with_prefix(&format!("{PREFIX}{id}-"));
    assert_eq!(names.len(), 5, "{names:?}");
    let inodes: Vec<u64> = names
        .iter()
        .filter_map(|n| NetNs::named(n).inode())
        .collect();
    let app_pids: Vec<i32> = inodes
        .iter()
        .flat_map(|i| netns::pids_in_namespace(*i))
        .collect();
    assert_eq!(app_pids.len(), 1, "the helper's echo app runs");

    // The crash: SIGKILL, no chance to clean up. The echo app (its own
    // process group) survives, as do the namespaces.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        Path::new(&format!("/proc/{}", app_pids[0])).exists(),
        "the orphaned app is still there"
    );
    assert_eq!(netns::names_with_prefix(&format!("{PREFIX}{id}-")).len(), 5);

    // The next run removes them before building anything.
    let next = Run::start().unwrap();
    assert_eq!(leftovers(&id, &inodes), Vec::<String>::new());
    wait_until("the orphaned app to be reaped", || {
        e2e::process::start_time(app_pids[0]).is_none() || is_zombie(app_pids[0])
    });
    drop(next);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn sigterm_tears_the_cluster_down() {
    if !privilege::enter_for_test() {
        return;
    }
    let (mut child, id) = start_helper();
    let inodes: Vec<u64> = netns::names_with_prefix(&format!("{PREFIX}{id}-"))
        .iter()
        .filter_map(|n| NetNs::named(n).inode())
        .collect();
    assert_eq!(inodes.len(), 5);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "the handler tears down, then exits as SIGTERM would"
    );
    assert_eq!(leftovers(&id, &inodes), Vec::<String>::new());
}
