//! ztunnel's admin, stats and readiness servers run on the proxy's runtime
//! (one thread by default, as here) and share its file descriptors. Any pod
//! on the node reaches 15020: a hostile one that opens connections by the
//! thousand and sends half a request line on each must not take the data
//! path down. Here the process may hold 512 descriptors (the test lowers
//! its own limit, so exhaustion is reachable) and the hostile pod, in a
//! process of its own, opens 2000 connections to the stats server: with
//! the default limits the server holds 16 from that address (its per-peer
//! cap; 128 in all) and resets the rest, and meanwhile pods keep talking
//! through HBONE and the readiness server keeps answering.
//!
//! Without the caps the stats server accepted until the process ran out of
//! descriptors (489 here), and every new proxied connection failed.
//!
//! Its own test binary: the descriptor limit is the whole process's.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use proxy_core::admin::ServerConfig;
use proxy_core::listener::{DropReason, ListenerLimits};
use proxy_core::testing::loopback_admin_servers;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use ztunnel_rs::proxy::testing::{EchoApp, PATIENCE, TestMesh, eventually, exchange};

/// The descriptors this process may hold.
const FD_LIMIT: u64 = 512;
/// The hostile pod's connections: far more than the process could hold.
const HOSTILE: usize = 2000;
/// What one address may hold on each admin server by default.
const PER_PEER: usize = ServerConfig::DEFAULT_LIMITS.max_connections_per_peer;

fn lower_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, FD_LIMIT.min(hard), hard).unwrap();
}

/// A hostile pod in a process of its own (its descriptors are not ours):
/// tries `count` connections to `target`, writes half a request line on
/// each, prints how many it opened, and holds them until killed. A
/// connection the server resets so fast that `connect` itself reports it
/// is not opened, and the pod goes on with the next (stopping there made
/// this test flaky: it opened too few to exhaust anything).
async fn hostile_pod(target: SocketAddr, count: usize) -> (tokio::process::Child, usize) {
    let script = format!(
        "trap '' PIPE; ulimit -n {limit} || exit 1; opened=0; \
         for i in $(seq {count}); do \
           exec {{fd}}<>/dev/tcp/{ip}/{port} || continue; \
           printf 'GET /metrics HTT' >&$fd 2>/dev/null; opened=$((opened+1)); \
         done; echo $opened; exec sleep 3600",
        limit = count + 64,
        ip = target.ip(),
        port = target.port(),
    );
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs the hostile pod");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    tokio::time::timeout(PATIENCE, BufReader::new(stdout).read_line(&mut line))
        .await
        .expect("the hostile pod opened its connections")
        .unwrap();
    let opened = line.trim().parse().expect("a count");
    (child, opened)
}

/// `GET path` on a fresh connection: the status code.
async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    tokio::time::timeout(PATIENCE, async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer.split(' ').nth(1).unwrap().parse().unwrap()
    })
    .await
    .expect("the server answers")
}

#[tokio::test]
async fn a_saturated_stats_port_leaves_the_data_path_and_readiness_serving() {
    lower_fd_limit();
    let mesh = TestMesh::new().await;

    // The admin servers on this runtime, as `ztunnel-rs proxy` runs them;
    // timeouts that never fire during the test, so the saturation lasts.
    let never = Duration::from_secs(3600);
    let limits = ListenerLimits {
        handshake_timeout: never,
        header_timeout: never,
        idle_timeout: never,
        ..ServerConfig::DEFAULT_LIMITS
    };
    let (servers, listeners, shutdown) = loopback_admin_servers(limits, mesh.store.clone()).await;

    let client = mesh.pod("client", "a", 2).await;
    let server = mesh.pod("server", "b", 3).await;
    let app = EchoApp::start(SocketAddr::new(server.ip, 8080), "server").await;

    let (hostile, opened) = hostile_pod(servers.addrs.stats, HOSTILE).await;
    assert!(
        opened as u64 > FD_LIMIT,
        "the hostile pod opened {opened} connections, not enough to exhaust {FD_LIMIT}"
    );
    eventually("the stats server refused all but its per-peer cap", || {
        listeners.dropped("stats", DropReason::peer_limit) >= (opened - PER_PEER) as u64
    })
    .await;
    assert_eq!(listeners.open("stats"), PER_PEER as i64);

    // The data path is untouched: new proxied connections, one after the other.
    for i in 0..50 {
        let mut conn = client.connect(app.address).await.unwrap_or_else(|e| {
            panic!("proxied connection {i} failed while the stats port was saturated: {e}")
        });
        let message = format!("hello {i}");
        assert_eq!(
            exchange(&mut conn, message.as_bytes()).await.unwrap(),
            format!("server: {message}").as_bytes()
        );
    }
    // So is readiness (its own cap), and the kubelet's probe gets its answer.
    assert_eq!(
        get_status(servers.addrs.readiness, "/healthz/ready").await,
        200
    );
    assert_eq!(listeners.open("stats"), PER_PEER as i64);

    // The hostile pod goes: the stats server serves again.
    drop(hostile);
    eventually("the hostile connections closed", || {
        listeners.open("stats") == 0
    })
    .await;
    assert_eq!(get_status(servers.addrs.stats, "/metrics").await, 200);
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, servers.join())
        .await
        .unwrap();
}
