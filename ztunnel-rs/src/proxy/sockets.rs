//! Where a pod's proxy gets its sockets. Each enrolled pod is proxied from
//! inside its own network namespace: the listeners live there, and every
//! connection the proxy opens for the pod leaves from there with the proxy
//! mark, so it carries the pod's address and is not captured again.
//!
//! [`PodSockets`] is that contract. The in-pod implementation (netns, mark,
//! `SO_ORIGINAL_DST`) belongs to the node-agent side; [`LocalSockets`] is the
//! plain one: sockets in the proxy's own namespace bound to one address,
//! enough for pods that are distinct loopback addresses in tests.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use proxy_core::hbone::{Connect, ConnectFuture};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

/// A connection the proxy opened as the pod did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {target}: {source}")]
    Failed {
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{target} did not accept the connection within {timeout:?}")]
    Timeout {
        target: SocketAddr,
        timeout: std::time::Duration,
    },
}

pub type SocketFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// The sockets of one pod's proxy.
pub trait PodSockets: Send + Sync + 'static {
    /// Where the sockets live (a network namespace, an address), for logs.
    /// Two factories describing themselves alike make the same sockets, so a
    /// pod added again with the same description keeps its running proxy.
    fn describe(&self) -> String;

    /// Listens on `port` on the pod's addresses.
    fn listen(&self, port: u16) -> SocketFuture<'_, TcpListener>;

    /// UDP sockets bound to `port` where the pod's redirected DNS queries
    /// arrive (the DNS proxy). In a pod these are its loopback addresses
    /// (`127.0.0.1`, and `::1` when it has IPv6): REDIRECT sends a local
    /// packet there, and an answer must leave from that same address for
    /// conntrack to map it back to the server the application asked. Upstream
    /// binds the DNS proxy to localhost for the same reason
    /// (`dns_proxy_addr`, `Address::Localhost`).
    fn listen_udp(&self, port: u16) -> SocketFuture<'_, Vec<UdpSocket>>;

    /// Opens a connection as the pod: from its address, past its redirection.
    fn connect(&self, addr: SocketAddr) -> SocketFuture<'_, TcpStream>;

    /// A UDP socket of the pod connected to `addr`, past its redirection
    /// (the DNS proxy's upstream queries).
    fn udp_connect(&self, addr: SocketAddr) -> SocketFuture<'_, UdpSocket>;

    /// Opens a connection to the application in the pod at `addr` that the
    /// application sees as coming from `source` (the original client), as
    /// upstream's original-source mode does.
    fn connect_as(&self, addr: SocketAddr, source: IpAddr) -> SocketFuture<'_, TcpStream>;

    /// Where a connection accepted on a capture listener (15001, 15006) was
    /// headed before the pod's redirection rules sent it to the proxy.
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;

    /// Whether something in the pod listens on TCP `port` already, before
    /// this proxy does: another proxy serving the pod. Sockets that cannot
    /// share a port with another proxy say no.
    fn listened(&self, port: u16) -> SocketFuture<'_, bool> {
        let _ = port;
        Box::pin(async { Ok(false) })
    }
}

/// Lets an HBONE pool open its connections as the pod.
pub struct PodConnect(pub Arc<dyn PodSockets>);

impl Connect for PodConnect {
    fn connect(&self, address: SocketAddr) -> ConnectFuture<'_> {
        self.0.connect(address)
    }
}

/// Sockets in the proxy's own network namespace, bound to one address (the
/// "pod"). With no redirection rules to ask, original destinations come from
/// a table the client side fills in before connecting ([`Self::redirect`]),
/// exactly what conntrack remembers for a REDIRECTed connection.
#[derive(Clone, Debug)]
pub struct LocalSockets {
    ip: IpAddr,
    redirects: Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>,
}

impl LocalSockets {
    pub fn new(ip: IpAddr) -> Self {
        LocalSockets {
            ip,
            redirects: Arc::default(),
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Records that the connection from `client` was headed for `original`.
    pub fn redirect(&self, client: SocketAddr, original: SocketAddr) {
        self.lock().insert(client, original);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SocketAddr>> {
        self.redirects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PodSockets for LocalSockets {
    fn describe(&self) -> String {
        format!("local sockets on {}", self.ip)
    }

    fn listen(&self, port: u16) -> SocketFuture<'_, TcpListener> {
        Box::pin(TcpListener::bind(SocketAddr::new(self.ip, port)))
    }

    fn listen_udp(&self, port: u16) -> SocketFuture<'_, Vec<UdpSocket>> {
        Box::pin(async move { Ok(vec![UdpSocket::bind(SocketAddr::new(self.ip, port)).await?]) })
    }

    fn connect(&self, addr: SocketAddr) -> SocketFuture<'_, TcpStream> {
        Box::pin(connect_from(self.ip, addr))
    }

    /// From the pod's address when the families match, else from the
    /// family's wildcard.
    fn udp_connect(&self, addr: SocketAddr) -> SocketFuture<'_, UdpSocket> {
        let from = match (self.ip, addr.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => self.ip,
            (_, IpAddr::V4(_)) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            (_, IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        Box::pin(async move {
            let socket = UdpSocket::bind(SocketAddr::new(from, 0)).await?;
            socket.connect(addr).await?;
            Ok(socket)
        })
    }

    /// Loopback "pods" can take any loopback address as their source, no
    /// `IP_TRANSPARENT` needed; other sources fall back to the pod's own.
    fn connect_as(&self, addr: SocketAddr, source: IpAddr) -> SocketFuture<'_, TcpStream> {
        let from = if source.is_loopback() && source.is_ipv4() == self.ip.is_ipv4() {
            source
        } else {
            self.ip
        };
        Box::pin(connect_from(from, addr))
    }

    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let peer = stream.peer_addr()?;
        self.lock().remove(&peer).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("the connection from {peer} was not redirected here, so it has no original destination"),
            )
        })
    }
}

async fn connect_from(ip: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// An address as the mesh knows it: IPv4 connections accepted on a
/// dual-stack socket show up as v4-mapped IPv6.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn local_sockets_bind_the_pod_address_and_remember_redirects() {
        let pod = LocalSockets::new("127.0.0.1".parse().unwrap());
        let listener = pod.listen(0).await.unwrap();
        let target = listener.local_addr().unwrap();
        let out = pod.connect(target).await.unwrap();
        assert_eq!(out.local_addr().unwrap().ip(), pod.ip());
        let (accepted, peer) = listener.accept().await.unwrap();
        let err = pod.original_dst(&accepted).unwrap_err();
        assert!(err.to_string().contains("not redirected"), "{err}");

        let original: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let out2 = pod.connect(target).await.unwrap();
        pod.redirect(out2.local_addr().unwrap(), original);
        let (accepted2, _) = listener.accept().await.unwrap();
        assert_eq!(pod.original_dst(&accepted2).unwrap(), original);
        assert_ne!(peer, out2.local_addr().unwrap());
    }
}
