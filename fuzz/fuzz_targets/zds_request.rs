//! ztunnel-rs's end of ZDS: a conversation from the node agent (framed
//! messages; each message's first byte says whether a network namespace
//! fd rides along, the rest is the packet) played over a real seqpacket
//! socket pair into `ZdsClient::serve`, which decodes, validates and
//! sequences every request and answers each with an Ack.
#![no_main]

use std::collections::HashSet;
use std::future::Future;
use std::os::fd::AsFd;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use ztunnel_rs::inpod::netns::Netns;
use ztunnel_rs::inpod::seqpacket::SeqpacketConn;
use ztunnel_rs::inpod::zds::{
    ManagerError, WorkloadProxyManager, WorkloadUid, ZdsClient, ZdsClientConfig,
};

/// Keeps the set of pods it was asked to proxy; proxies nothing.
#[derive(Default)]
struct Pods(Mutex<HashSet<WorkloadUid>>);

impl WorkloadProxyManager for Pods {
    fn add(
        &self,
        uid: &WorkloadUid,
        _info: Option<&api::zds::WorkloadInfo>,
        _netns: Netns,
    ) -> impl Future<Output = Result<(), ManagerError>> + Send {
        self.0.lock().expect("not poisoned").insert(uid.clone());
        std::future::ready(Ok(()))
    }

    fn del(&self, uid: &WorkloadUid) -> impl Future<Output = ()> + Send {
        self.0.lock().expect("not poisoned").remove(uid);
        std::future::ready(())
    }

    fn keep(&self, uid: &WorkloadUid) -> Result<(), ManagerError> {
        if self.0.lock().expect("not poisoned").contains(uid) {
            Ok(())
        } else {
            Err(format!("no pod {uid}").into())
        }
    }

    fn snapshot_done(&self, known: &HashSet<WorkloadUid>) -> impl Future<Output = ()> + Send {
        self.0
            .lock()
            .expect("not poisoned")
            .retain(|uid| known.contains(uid));
        std::future::ready(())
    }
}

fuzz_target!(|data: &[u8]| {
    let packets = mesh_fuzz::messages(data);
    let netns = std::fs::File::open("/proc/self/ns/net").expect("this process has a netns");
    mesh_fuzz::runtime().block_on(async {
        let (ours, agent) = SeqpacketConn::pair().expect("a socket pair");
        let client = ZdsClient::new(ZdsClientConfig::default(), Pods::default());
        let ztunnel = async {
            let served = client.serve(&ours).await;
            // The agent sees the connection end whenever ztunnel ends it.
            drop(ours);
            served
        };
        let node_agent = async move {
            if !matches!(agent.recv().await, Ok(Some(_))) {
                return;
            }
            for packet in packets {
                let Some((flags, payload)) = packet.split_first() else {
                    continue;
                };
                let fd = (flags & 1 == 1).then(|| netns.as_fd());
                if agent.send(payload, fd).await.is_err() {
                    return;
                }
                if !matches!(agent.recv().await, Ok(Some(_))) {
                    return;
                }
            }
        };
        let _ = tokio::join!(ztunnel, node_agent);
    });
});
