//! At file-descriptor exhaustion every accept fails, as fast as the kernel
//! answers. The guard pauses between tries, counts each failure in
//! `listener_accept_failures_total`, logs one line per interval with the
//! count it left out (not one per failure), and serves the waiting
//! connections once descriptors are free again.
//!
//! Its own test binary: the descriptor limit and the log subscriber are the
//! whole process's.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Only there so a bug cannot hang the test.
const PATIENCE: Duration = Duration::from_secs(30);
/// Long enough never to fire during the test.
const NEVER: Duration = Duration::from_secs(3600);
/// Connections waiting in the backlog while the process is out of descriptors.
const CLIENTS: usize = 5;
/// Accept failures to wait for: about two seconds of the guard's pauses.
const FAILURES: u64 = 20;

/// Everything the process logs, for counting lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> Logs {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    }

    fn lines_containing(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// Opens descriptors until the process has none left; dropping the result
/// frees them.
fn exhaust_descriptors() -> Vec<std::fs::File> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).unwrap();
    let mut hoard = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => hoard.push(file),
            Err(error) if error.raw_os_error() == Some(nix::errno::Errno::EMFILE as i32) => {
                return hoard;
            }
            Err(error) => panic!("opening /dev/null: {error}"),
        }
    }
}

#[tokio::test]
async fn accept_failures_at_descriptor_exhaustion_are_counted_logged_once_and_survived() {
    let logs = Logs::capture();
    let metrics = ListenerMetrics::default();
    let limits = ListenerLimits {
        max_connections: 64,
        max_connections_per_peer: 64,
        handshake_timeout: NEVER,
        header_timeout: NEVER,
        idle_timeout: NEVER,
    };
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), "test", limits, &metrics)
        .await
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let router = Router::new().route("/", get(|| async { "hello" }));
    tokio::spawn(listener.serve_http1(None, router, shutdown.clone()));

    // Clients in a process of their own, started while descriptors are
    // free: on "go" each connects (the kernel completes the handshake into
    // the backlog), sends a request, and prints the status line it gets.
    let script = format!(
        "read go; fds=(); for i in $(seq {CLIENTS}); do \
           exec {{fd}}<>/dev/tcp/{ip}/{port} || exit 1; \
           printf 'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&$fd; fds+=($fd); \
         done; echo connected; \
         for fd in \"${{fds[@]}}\"; do head -n1 <&$fd; done",
        ip = addr.ip(),
        port = addr.port(),
    );
    let mut clients = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs the clients");
    let mut stdin = clients.stdin.take().unwrap();
    let mut stdout = BufReader::new(clients.stdout.take().unwrap()).lines();

    let hoard = exhaust_descriptors();
    stdin.write_all(b"go\n").await.unwrap();
    let line = tokio::time::timeout(PATIENCE, stdout.next_line()).await;
    assert_eq!(line.unwrap().unwrap().as_deref(), Some("connected"));

    let deadline = tokio::time::Instant::now() + PATIENCE;
    while metrics.accept_failures("test") < FAILURES {
        assert!(
            tokio::time::Instant::now() < deadline,
            "accept never failed {FAILURES} times: {}",
            metrics.accept_failures("test")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Descriptors back: the waiting connections are served.
    drop(hoard);
    for i in 0..CLIENTS {
        let status = tokio::time::timeout(PATIENCE, stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("client {i} was never answered"))
            .unwrap()
            .unwrap_or_else(|| panic!("client {i} got no answer"));
        assert!(status.contains(" 200 "), "client {i}: {status}");
    }

    let failures = metrics.accept_failures("test");
    let lines = logs.lines_containing("accepting a connection failed");
    assert!(!lines.is_empty(), "accept failures are logged");
    assert!(
        lines[0].contains("Too many open files") && lines[0].contains("test"),
        "the line names the error and the listener: {}",
        lines[0]
    );
    // One line per ten seconds: even a slow run logs a handful, never one
    // per failure.
    assert!(
        lines.len() as u64 * 10 <= failures,
        "{} lines for {failures} failures",
        lines.len()
    );
    shutdown.cancel();
}
