//! ZDS over a real SOCK_SEQPACKET socket, both ends: hello, snapshot with a
//! real netns fd, live add / del, snapshot reconciliation, error acks, and
//! malformed packets that reset the connection but not the process.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::zds::{
    AddWorkload, DelWorkload, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request, workload_response,
};
use prost::Message;
use tokio::sync::mpsc;
use ztunnel_rs::inpod::seqpacket::{SeqpacketConn, SeqpacketListener};
use ztunnel_rs::inpod::{
    ManagerError, Netns, WorkloadProxyManager, WorkloadUid, ZdsClient, ZdsClientConfig,
};
use ztunnel_rs::node_agent::{ZdsPod, ZdsServer, ZdsServerError};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Add(String, u64),
    Del(String),
    Keep(String),
    Snapshot(BTreeSet<String>),
}

/// A proxy stand-in that records what ZDS asked of it and keeps the set of
/// pods it is proxying, refusing uids that start with "refuse".
#[derive(Clone)]
struct Recorder {
    seen: mpsc::UnboundedSender<Seen>,
    pods: Arc<Mutex<BTreeSet<String>>>,
}

impl Recorder {
    fn new() -> (Self, mpsc::UnboundedReceiver<Seen>) {
        let (seen, rx) = mpsc::unbounded_channel();
        (
            Recorder {
                seen,
                pods: Arc::default(),
            },
            rx,
        )
    }
}

impl WorkloadProxyManager for Recorder {
    async fn add(
        &self,
        uid: &WorkloadUid,
        _info: Option<&WorkloadInfo>,
        netns: Netns,
    ) -> Result<(), ManagerError> {
        if uid.0.starts_with("refuse") {
            return Err(format!("cannot bind listeners for {uid}").into());
        }
        self.pods.lock().unwrap().insert(uid.0.clone());
        let _ = self.seen.send(Seen::Add(uid.0.clone(), netns.inode()));
        Ok(())
    }
    async fn del(&self, uid: &WorkloadUid) {
        self.pods.lock().unwrap().remove(&uid.0);
        let _ = self.seen.send(Seen::Del(uid.0.clone()));
    }
    fn keep(&self, uid: &WorkloadUid) -> Result<(), ManagerError> {
        let _ = self.seen.send(Seen::Keep(uid.0.clone()));
        Ok(())
    }
    async fn snapshot_done(&self, known: &HashSet<WorkloadUid>) {
        self.pods
            .lock()
            .unwrap()
            .retain(|uid| known.contains(&WorkloadUid(uid.clone())));
        let names = known.iter().map(|u| u.0.clone()).collect();
        let _ = self.seen.send(Seen::Snapshot(names));
    }
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting")
        .expect("channel closed")
}

fn pod(uid: &str) -> ZdsPod {
    ZdsPod {
        uid: uid.into(),
        info: WorkloadInfo {
            name: format!("{uid}-name"),
            namespace: "shop".into(),
            service_account: "cart".into(),
        },
        netns: Netns::current().unwrap(),
    }
}

fn client_config(socket: &std::path::Path) -> ZdsClientConfig {
    ZdsClientConfig {
        socket: socket.to_path_buf(),
        max_backoff: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn snapshot_then_live_add_and_del_over_a_real_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let (server, mut acked) = ZdsServer::new(WAIT);
    let listener = SeqpacketListener::bind(&socket).unwrap();
    tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });

    // Enrolled before any ztunnel is there: remembered for the snapshot.
    let early = server.add(pod("early")).await;
    assert!(matches!(early, Err(ZdsServerError::NoZtunnel)), "{early:?}");

    let (recorder, mut seen) = Recorder::new();
    let client = Arc::new(ZdsClient::new(client_config(&socket), recorder.clone()));
    let mut ready = client.snapshot_received();
    assert!(!*ready.borrow());
    tokio::spawn({
        let client = client.clone();
        async move { client.run(std::future::pending()).await }
    });

    let netns_inode = Netns::current().unwrap().inode();
    assert_eq!(
        next(&mut seen).await,
        Seen::Add("early".into(), netns_inode)
    );
    assert_eq!(
        next(&mut seen).await,
        Seen::Snapshot(BTreeSet::from(["early".to_string()]))
    );
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next(&mut acked).await, "early");

    server.add(pod("late")).await.expect("live add acked");
    assert_eq!(next(&mut seen).await, Seen::Add("late".into(), netns_inode));
    assert_eq!(next(&mut acked).await, "late");

    server.del("early").await.expect("del acked");
    assert_eq!(next(&mut seen).await, Seen::Del("early".into()));
    assert!(!server.has_pod("early"));

    // ztunnel refusing a pod is reported to the caller with its reason.
    let refused = server.add(pod("refuse-me")).await;
    match refused {
        Err(ZdsServerError::Rejected { uid, reason }) => {
            assert_eq!(uid, "refuse-me");
            assert!(reason.contains("cannot bind listeners"), "{reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        *recorder.pods.lock().unwrap(),
        BTreeSet::from(["late".to_string()])
    );
}

/// A fake node agent: accepts one connection and checks the hello.
async fn accept_ztunnel(listener: &SeqpacketListener) -> SeqpacketConn {
    let conn = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("ztunnel (re)connects")
        .unwrap();
    let hello = conn.recv().await.unwrap().expect("hello");
    let hello = ZdsHello::decode(hello.data.as_slice()).unwrap();
    assert_eq!(hello.version, api::zds::Version::V1 as i32);
    conn
}

async fn expect_ack(conn: &SeqpacketConn) -> String {
    let packet = tokio::time::timeout(WAIT, conn.recv())
        .await
        .unwrap()
        .unwrap()
        .expect("an ack");
    let response = WorkloadResponse::decode(packet.data.as_slice()).unwrap();
    let Some(workload_response::Payload::Ack(ack)) = response.payload else {
        panic!("not an ack: {response:?}")
    };
    ack.error
}

async fn expect_reset(conn: &SeqpacketConn) {
    let next = tokio::time::timeout(WAIT, conn.recv()).await.unwrap();
    assert!(
        matches!(next, Ok(None) | Err(_)),
        "connection should be reset, got {next:?}"
    );
}

/// Sends one request (with `fd` attached) and returns the Ack's error text.
async fn exchange(
    conn: &SeqpacketConn,
    payload: workload_request::Payload,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> String {
    conn.send(&encode(payload), fd).await.unwrap();
    expect_ack(conn).await
}

fn encode(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn malformed_packets_reset_the_connection_and_ztunnel_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let listener = SeqpacketListener::bind(&socket).unwrap();
    let (recorder, mut seen) = Recorder::new();
    let client = Arc::new(ZdsClient::new(client_config(&socket), recorder));
    tokio::spawn({
        let client = client.clone();
        async move { client.run(std::future::pending()).await }
    });
    let netns = Netns::current().unwrap();
    let add = |uid: &str| {
        encode(workload_request::Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: None,
        }))
    };
    let garbage: Vec<(&str, Vec<u8>, bool)> = vec![
        ("not protobuf", vec![0xff, 0xff, 0xff, 0xff, 0x0f], false),
        (
            "request without payload (unknown kind)",
            WorkloadRequest::default().encode_to_vec(),
            false,
        ),
        ("unknown field only", vec![0x52, 0x01, 0x00], false),
        ("add without fd", add("no-fd"), false),
        (
            "del with an fd",
            encode(workload_request::Payload::Del(DelWorkload {
                uid: "x".into(),
            })),
            true,
        ),
        (
            "truncated (oversized) packet",
            {
                let mut big = add("big");
                big.extend(std::iter::repeat_n(0u8, 40 * 1024));
                big
            },
            true,
        ),
    ];
    for (what, packet, with_fd) in garbage {
        let conn = accept_ztunnel(&listener).await;
        let fd = with_fd.then(|| std::os::fd::AsFd::as_fd(&netns));
        conn.send(&packet, fd).await.unwrap();
        expect_reset(&conn).await;
        eprintln!("reset after: {what}");
    }

    // After all that, a well-formed session still works.
    let conn = accept_ztunnel(&listener).await;
    conn.send(&add("good"), Some(std::os::fd::AsFd::as_fd(&netns)))
        .await
        .unwrap();
    assert_eq!(expect_ack(&conn).await, "");
    assert_eq!(
        next(&mut seen).await,
        Seen::Add("good".into(), netns.inode())
    );
    // An fd that is not a namespace is refused at the door.
    let file = std::fs::File::open("/dev/null").unwrap();
    conn.send(&add("devnull"), Some(std::os::fd::AsFd::as_fd(&file)))
        .await
        .unwrap();
    expect_reset(&conn).await;
}

#[tokio::test]
async fn snapshot_drops_pods_the_agent_did_not_name_and_keep_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let listener = SeqpacketListener::bind(&socket).unwrap();
    let (recorder, mut seen) = Recorder::new();
    recorder
        .pods
        .lock()
        .unwrap()
        .extend(["stale".to_string(), "kept".to_string()]);
    let client = Arc::new(ZdsClient::new(client_config(&socket), recorder.clone()));
    tokio::spawn({
        let client = client.clone();
        async move { client.run(std::future::pending()).await }
    });
    let netns = Netns::current().unwrap();
    let conn = accept_ztunnel(&listener).await;
    let fresh = workload_request::Payload::Add(AddWorkload {
        uid: "fresh".into(),
        workload_info: None,
    });
    let kept = || workload_request::Payload::Keep(api::zds::KeepWorkload { uid: "kept".into() });
    let done = workload_request::Payload::SnapshotSent(api::zds::SnapshotSent {});
    let fd = Some(std::os::fd::AsFd::as_fd(&netns));
    assert_eq!(exchange(&conn, fresh, fd).await, "");
    assert_eq!(exchange(&conn, kept(), None).await, "");
    assert_eq!(exchange(&conn, done, None).await, "");
    assert_eq!(
        next(&mut seen).await,
        Seen::Add("fresh".into(), netns.inode())
    );
    assert_eq!(next(&mut seen).await, Seen::Keep("kept".into()));
    assert_eq!(
        next(&mut seen).await,
        Seen::Snapshot(BTreeSet::from(["fresh".to_string(), "kept".to_string()]))
    );
    assert_eq!(
        *recorder.pods.lock().unwrap(),
        BTreeSet::from(["fresh".to_string(), "kept".to_string()])
    );
    // Keep is only meaningful inside a snapshot.
    conn.send(&encode(kept()), None).await.unwrap();
    expect_reset(&conn).await;
}

#[tokio::test]
async fn server_survives_a_ztunnel_that_sends_garbage() {
    let (server, _acked) = ZdsServer::new(WAIT);
    // A hello that is not protobuf.
    let (agent_end, ztunnel_end) = SeqpacketConn::pair().unwrap();
    ztunnel_end.send(&[0xff, 0xff, 0xff], None).await.unwrap();
    let err = server.handle(agent_end).await.unwrap_err();
    assert!(matches!(err, ZdsServerError::Decode(_)), "{err}");
    // A hello with an unknown version.
    let (agent_end, ztunnel_end) = SeqpacketConn::pair().unwrap();
    ztunnel_end
        .send(&ZdsHello { version: 7 }.encode_to_vec(), None)
        .await
        .unwrap();
    let err = server.handle(agent_end).await.unwrap_err();
    assert!(err.to_string().contains("version 7"), "{err}");
    assert_eq!(server.connected(), 0);

    // A ztunnel that answers an Add with garbage loses its connection; the
    // caller is told, and the server serves the next ztunnel.
    let (agent_end, ztunnel_end) = SeqpacketConn::pair().unwrap();
    ztunnel_end
        .send(&ZdsHello { version: 1 }.encode_to_vec(), None)
        .await
        .unwrap();
    let serving = tokio::spawn({
        let server = server.clone();
        async move { server.handle(agent_end).await }
    });
    // Empty snapshot: just SnapshotSent, which we ack.
    let snapshot = ztunnel_end.recv().await.unwrap().unwrap();
    assert!(matches!(
        WorkloadRequest::decode(snapshot.data.as_slice())
            .unwrap()
            .payload,
        Some(workload_request::Payload::SnapshotSent(_))
    ));
    ztunnel_end
        .send(&ztunnel_rs::inpod::zds::ack(None), None)
        .await
        .unwrap();
    let adding = tokio::spawn({
        let server = server.clone();
        async move { server.add(pod("p1")).await }
    });
    let add = ztunnel_end.recv().await.unwrap().unwrap();
    assert_eq!(add.fds.len(), 1, "the Add carries the netns fd");
    ztunnel_end.send(&[0xde, 0xad], None).await.unwrap();
    let added = adding.await.unwrap();
    assert!(added.is_err(), "{added:?}");
    assert!(serving.await.unwrap().is_err());
    assert_eq!(server.connected(), 0);
    assert!(
        server.has_pod("p1"),
        "still enrolled, for the next snapshot"
    );
}
