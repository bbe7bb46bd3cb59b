//! The proxy on in-pod sockets: the node agent's ZDS requests become
//! [`ProxyManager`] calls, and each pod's sockets are an
//! [`InPodSocketFactory`] on the network namespace the agent handed over
//! (listeners inside the pod, connections out of it with the proxy mark,
//! original destinations from `SO_ORIGINAL_DST`).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use api::zds::WorkloadInfo;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::sockets::{PodSockets, SocketFuture};
use super::{Error, PodInfo, ProxyManager};
use crate::inpod::{
    InPodSocketFactory, ManagerError, Netns, SocketError, WorkloadProxyManager, WorkloadUid,
};

/// Keeps the kind (a refused connection stays `ConnectionRefused`) and the
/// whole message (which port, which netns).
fn io_error(e: SocketError) -> io::Error {
    let kind = match &e {
        SocketError::Io(source)
        | SocketError::Listen { source, .. }
        | SocketError::Connect { source, .. } => source.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl PodSockets for InPodSocketFactory {
    fn describe(&self) -> String {
        format!("pod netns net:[{}]", self.netns().inode())
    }

    fn listen(&self, port: u16) -> SocketFuture<'_, TcpListener> {
        Box::pin(async move {
            InPodSocketFactory::listen(self, port)
                .await
                .map_err(io_error)
        })
    }

    fn listen_udp(&self, port: u16) -> SocketFuture<'_, Vec<UdpSocket>> {
        Box::pin(async move {
            InPodSocketFactory::listen_udp(self, port)
                .await
                .map_err(io_error)
        })
    }

    fn udp_connect(&self, addr: SocketAddr) -> SocketFuture<'_, UdpSocket> {
        Box::pin(async move {
            InPodSocketFactory::udp_connect(self, addr)
                .await
                .map_err(io_error)
        })
    }

    fn connect(&self, addr: SocketAddr) -> SocketFuture<'_, TcpStream> {
        Box::pin(async move {
            InPodSocketFactory::connect(self, addr)
                .await
                .map_err(io_error)
        })
    }

    fn connect_as(&self, addr: SocketAddr, source: IpAddr) -> SocketFuture<'_, TcpStream> {
        Box::pin(async move {
            InPodSocketFactory::connect_as(self, addr, source)
                .await
                .map_err(io_error)
        })
    }

    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        InPodSocketFactory::original_dst(stream).map_err(io_error)
    }

    fn listened(&self, port: u16) -> SocketFuture<'_, bool> {
        Box::pin(async move { InPodSocketFactory::listened(self, port).map_err(io_error) })
    }
}

impl WorkloadProxyManager for ProxyManager {
    async fn add(
        &self,
        uid: &WorkloadUid,
        info: Option<&WorkloadInfo>,
        netns: Netns,
    ) -> Result<(), ManagerError> {
        let info = info.ok_or_else(|| Error::MissingInfo {
            uid: uid.0.clone(),
            field: "workload info",
        })?;
        let pod = PodInfo {
            uid: uid.0.clone(),
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            service_account: info.service_account.clone(),
        };
        ProxyManager::add(self, pod, Arc::new(InPodSocketFactory::new(netns))).await?;
        Ok(())
    }

    /// Returns once the pod's listeners are closed; its connections drain
    /// in the background so other pods' requests are not held up.
    async fn del(&self, uid: &WorkloadUid) {
        drop(ProxyManager::del(self, &uid.0).await);
    }

    fn keep(&self, uid: &WorkloadUid) -> Result<(), ManagerError> {
        Ok(ProxyManager::keep(self, &uid.0)?)
    }

    async fn snapshot_done(&self, known: &HashSet<WorkloadUid>) {
        let known: HashSet<String> = known.iter().map(|uid| uid.0.clone()).collect();
        drop(ProxyManager::snapshot_done(self, &known).await);
    }
}
