//! Helpers for tests that need real network namespaces (root): named
//! namespaces that are deleted even when the test panics, veth links between
//! them, and the skip-or-fail rule for unprivileged runs.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use api::zds::WorkloadInfo;
use tokio::sync::mpsc;

use super::netns::Netns;
use super::socket::{InPodListeners, InPodSocketFactory};
use super::zds::{ManagerError, WorkloadProxyManager, WorkloadUid, ZdsClient, ZdsClientConfig};

/// True when the test may touch namespaces. Without root it says so loudly
/// and returns false, except under CI (env `CI` set), where it panics: CI
/// must run these tests.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root (network namespaces, iptables) and CI is set: run CI as root");
    }
    // Written to the stderr handle rather than with eprintln!, which the
    // test harness captures and hides for passing tests.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n!!! SKIPPING {test}: it needs root (network namespaces, iptables) !!!\n"
    );
    false
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    pub name: String,
    pub netns: Netns,
}

impl TestNetns {
    pub fn new() -> Self {
        let name = format!(
            "ztrs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh("ip", &["netns", "add", &name]);
        let netns = Netns::open(Self::path_of(&name)).expect("open the new netns");
        let ns = TestNetns { name, netns };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn path_of(name: &str) -> String {
        format!("/var/run/netns/{name}")
    }

    /// The bind mount a container runtime would pass as `CNI_NETNS`.
    pub fn path(&self) -> String {
        Self::path_of(&self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        sh("ip", &args)
    }

    /// Joins two namespaces with a veth pair: `self` gets `self_cidr`,
    /// `peer` gets `peer_cidr` (both `address/len` in one subnet).
    pub fn link(&self, self_cidr: &str, peer: &TestNetns, peer_cidr: &str) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (
            format!("zt{}a{n}", std::process::id() % 100_000),
            format!("zt{}b{n}", std::process::id() % 100_000),
        );
        sh(
            "ip",
            &[
                "link", "add", &a, "netns", &self.name, "type", "veth", "peer", "name", &b,
                "netns", &peer.name,
            ],
        );
        self.exec(&["ip", "addr", "add", self_cidr, "dev", &a]);
        self.exec(&["ip", "link", "set", &a, "up"]);
        peer.exec(&["ip", "addr", "add", peer_cidr, "dev", &b]);
        peer.exec(&["ip", "link", "set", &b, "up"]);
    }

    /// Name of this namespace's end of its first veth link.
    pub fn veth(&self) -> String {
        let links = self.exec(&["ip", "-o", "link", "show", "type", "veth"]);
        links
            .split(':')
            .nth(1)
            .and_then(|name| name.trim().split('@').next())
            .expect("a veth link")
            .to_string()
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth ends too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// What [`ListenerProxy`] was asked to do.
#[derive(Debug)]
pub enum ProxyEvent {
    Added(String, InPodSocketFactory, InPodListeners),
    Deleted(String),
}

/// The part of ztunnel that node-agent tests need: for each pod it is handed,
/// the three listeners bound in the pod's netns, passed on to the test.
#[derive(Debug)]
pub struct ListenerProxy(pub mpsc::UnboundedSender<ProxyEvent>);

impl ListenerProxy {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<ProxyEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ListenerProxy(tx), rx)
    }

    /// Starts a ZDS client backed by a `ListenerProxy` against the agent at
    /// `socket`, and waits until it has received its first snapshot.
    pub async fn connect(socket: PathBuf) -> mpsc::UnboundedReceiver<ProxyEvent> {
        let (proxy, events) = Self::new();
        let config = ZdsClientConfig {
            socket,
            max_backoff: Duration::from_millis(200),
        };
        let client = Arc::new(ZdsClient::new(config, proxy));
        let mut ready = client.snapshot_received();
        tokio::spawn({
            let client = client.clone();
            async move { client.run(std::future::pending()).await }
        });
        tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
            .await
            .expect("ztunnel received its first ZDS snapshot")
            .expect("ZDS client alive");
        events
    }
}

impl WorkloadProxyManager for ListenerProxy {
    async fn add(
        &self,
        uid: &WorkloadUid,
        _info: Option<&WorkloadInfo>,
        netns: Netns,
    ) -> Result<(), ManagerError> {
        let factory = InPodSocketFactory::new(netns);
        let listeners = InPodListeners::bind(&factory).await?;
        let _ = self
            .0
            .send(ProxyEvent::Added(uid.0.clone(), factory, listeners));
        Ok(())
    }
    async fn del(&self, uid: &WorkloadUid) {
        let _ = self.0.send(ProxyEvent::Deleted(uid.0.clone()));
    }
    fn keep(&self, _uid: &WorkloadUid) -> Result<(), ManagerError> {
        Ok(())
    }
    async fn snapshot_done(&self, _known: &HashSet<WorkloadUid>) {}
}

/// The node agent's ZDS server listening at `socket`, serving on a task of
/// its own.
pub fn serve_zds(server: &crate::node_agent::ZdsServer, socket: &std::path::Path) {
    let listener = super::seqpacket::SeqpacketListener::bind(socket)
        .unwrap_or_else(|e| panic!("bind the ZDS socket {}: {e}", socket.display()));
    let server = server.clone();
    tokio::spawn(async move { server.serve(listener).await });
}
