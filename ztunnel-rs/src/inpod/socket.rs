//! Sockets that live in a pod's network namespace: the proxy's per-pod
//! listeners (15001 outbound, 15006 inbound plaintext, 15008 HBONE) and the
//! connections it opens on the pod's behalf.
//!
//! Every socket carries the proxy mark (`api::ports::PROXY_MARK`, 0x539), as
//! upstream's in-pod socket factory does: the pod's redirection rules let
//! marked packets through, so the proxy's own connections are not captured
//! again. Listeners bind the wildcard address like upstream (`[::]`, dual
//! stack; `0.0.0.0` when the pod has no IPv6). REDIRECT keeps the pod's own
//! addresses on both ends, so listeners need no `IP_TRANSPARENT`. They set
//! `SO_REUSEPORT`, so a new ztunnel takes a pod over while the old one
//! drains.
//!
//! Connections to the application inside the pod can keep the client's
//! address ([`InPodSocketFactory::connect_as`]): the socket is
//! `IP_TRANSPARENT` and bound to the client's IP, so the application sees
//! who called, as it would without the mesh. The pod's routing (installed
//! by the node agent with the redirection rules: connmark 0x111 -> table
//! 100 -> local) brings the application's replies back to that socket
//! instead of sending them out of the pod.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::netns::{Netns, NetnsError};

/// Errors creating or inspecting in-pod sockets.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot listen on port {port} in pod netns {netns}: {source}")]
    Listen {
        port: u16,
        netns: u64,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr} from pod netns {netns}: {source}")]
    Connect {
        addr: SocketAddr,
        netns: u64,
        source: std::io::Error,
    },
    #[error("connection has no original destination (was it redirected by the pod's rules?): {0}")]
    OriginalDst(std::io::Error),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Creates sockets inside one pod's network namespace.
#[derive(Clone, Debug)]
pub struct InPodSocketFactory {
    netns: Netns,
    mark: u32,
}

/// Backlog of the per-pod listeners.
const LISTEN_BACKLOG: i32 = 1024;

impl InPodSocketFactory {
    /// A factory whose sockets carry the proxy mark.
    pub fn new(netns: Netns) -> Self {
        Self::with_mark(netns, api::ports::PROXY_MARK)
    }

    pub fn with_mark(netns: Netns, mark: u32) -> Self {
        InPodSocketFactory { netns, mark }
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Listens on `port` on the pod's wildcard address.
    pub async fn listen(&self, port: u16) -> Result<TcpListener, SocketError> {
        let socket = self.bind_wildcard(port, Type::STREAM, Protocol::TCP)?;
        socket
            .listen(LISTEN_BACKLOG)
            .map_err(|source| SocketError::Listen {
                port,
                netns: self.netns.inode(),
                source,
            })?;
        Ok(TcpListener::from_std(socket.into())?)
    }

    /// Whether a TCP socket listens on `port` in the pod already (any
    /// address, IPv4 or IPv6): another ztunnel serving it. Read from the
    /// kernel's socket tables of the pod's namespace (`/proc/net/tcp{,6}`
    /// as seen from a thread inside it).
    pub fn listened(&self, port: u16) -> Result<bool, SocketError> {
        let tables = self.netns.run_inline(|| {
            ["tcp6", "tcp"].map(|t| std::fs::read_to_string(format!("/proc/thread-self/net/{t}")))
        })?;
        let mut found = false;
        for table in tables {
            match table {
                Ok(text) => found |= listens_on(&text, port),
                // A pod (or kernel) without IPv6 has no tcp6 table.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SocketError::Io(e)),
            }
        }
        Ok(found)
    }

    /// UDP sockets on `port` of the pod's loopback addresses, `127.0.0.1`
    /// and `::1` when the pod has IPv6 (the DNS proxy): the pod's redirected
    /// queries arrive there, and answers leave from there, as conntrack
    /// needs to map them back.
    pub async fn listen_udp(&self, port: u16) -> Result<Vec<UdpSocket>, SocketError> {
        let mark = self.mark;
        let inode = self.netns.inode();
        let bound = self.netns.run_inline(move || {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
            let mut sockets = vec![bind_marked(v4, mark, Type::DGRAM, Protocol::UDP)?];
            match bind_marked(v6, mark, Type::DGRAM, Protocol::UDP) {
                Ok(socket) => sockets.push(socket),
                // A pod without IPv6 (disabled by sysctl or no kernel support).
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                    ) => {}
                Err(e) => return Err(e),
            }
            Ok(sockets)
        })?;
        let sockets = bound.map_err(|source| SocketError::Listen {
            port,
            netns: inode,
            source,
        })?;
        sockets
            .into_iter()
            .map(|s| Ok(UdpSocket::from_std(s.into())?))
            .collect()
    }

    /// A marked socket bound to `port` on `[::]` (dual stack), or on
    /// `0.0.0.0` when the pod has no IPv6.
    fn bind_wildcard(
        &self,
        port: u16,
        ty: Type,
        protocol: Protocol,
    ) -> Result<Socket, SocketError> {
        let mark = self.mark;
        let inode = self.netns.inode();
        self.netns
            .run_inline(move || {
                let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
                match bind_marked(v6, mark, ty, protocol) {
                    Ok(socket) => Ok(socket),
                    // A pod without IPv6 (disabled by sysctl or no kernel support).
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                        ) =>
                    {
                        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
                        bind_marked(v4, mark, ty, protocol)
                    }
                    Err(e) => Err(e),
                }
            })?
            .map_err(|source| SocketError::Listen {
                port,
                netns: inode,
                source,
            })
    }

    /// A marked UDP socket of the pod connected to `addr`: its datagrams
    /// leave with the pod's address and pass the pod's DNS capture.
    pub async fn udp_connect(&self, addr: SocketAddr) -> Result<UdpSocket, SocketError> {
        let connect_err = self.connect_error(addr);
        let socket = self.marked_socket(addr, Type::DGRAM, Protocol::UDP)?;
        let socket = UdpSocket::from_std(socket.into()).map_err(connect_err)?;
        socket.connect(addr).await.map_err(connect_err)?;
        Ok(socket)
    }

    fn connect_error(&self, addr: SocketAddr) -> impl Fn(std::io::Error) -> SocketError + Copy {
        let netns = self.netns.inode();
        move |source| SocketError::Connect {
            addr,
            netns,
            source,
        }
    }

    /// A non-blocking socket of the pod's namespace for reaching `addr`,
    /// with the proxy mark. The socket belongs to the namespace it is
    /// created in; the rest needs no namespace.
    fn marked_socket(
        &self,
        addr: SocketAddr,
        ty: Type,
        protocol: Protocol,
    ) -> Result<Socket, SocketError> {
        let connect_err = self.connect_error(addr);
        let socket = self
            .netns
            .run_inline(|| Socket::new(Domain::for_address(addr), ty, Some(protocol)))?
            .map_err(connect_err)?;
        socket.set_mark(self.mark).map_err(connect_err)?;
        socket.set_nonblocking(true).map_err(connect_err)?;
        Ok(socket)
    }

    /// Opens a marked TCP connection to `addr` from inside the pod, so it
    /// leaves with the pod's address and passes the pod's redirection rules.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, SocketError> {
        self.open(addr, None).await
    }

    /// Opens a marked connection to `addr` (the application, inside the
    /// pod) that appears to come from `source`: `IP_TRANSPARENT`, bound to
    /// `source` with any port. Without the capability for that (no
    /// CAP_NET_ADMIN in the pod's network namespace) it falls back to the
    /// pod's own address and says so once.
    pub async fn connect_as(
        &self,
        addr: SocketAddr,
        source: IpAddr,
    ) -> Result<TcpStream, SocketError> {
        // Only a client of the same family can be the connection's source.
        let source = (source.is_ipv4() == addr.is_ipv4()).then_some(source);
        self.open(addr, source).await
    }

    async fn open(
        &self,
        addr: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<TcpStream, SocketError> {
        let connect_err = self.connect_error(addr);
        let socket = self.marked_socket(addr, Type::STREAM, Protocol::TCP)?;
        if let Some(source) = source {
            bind_transparent(&socket, source).map_err(connect_err)?;
        }
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(addr).await.map_err(connect_err)
    }

    /// Where a redirected connection was headed before the pod's rules sent it
    /// to the proxy (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6).
    pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, SocketError> {
        original_dst(stream)
    }
}

/// See [`InPodSocketFactory::original_dst`]; works on any accepted stream.
pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, SocketError> {
    let socket = SockRef::from(stream);
    let local = stream.local_addr()?;
    // An IPv4 connection on a dual-stack listener shows a v4-mapped local
    // address; its conntrack entry is IPv4, so the IPv4 option applies.
    let is_v4 = match local.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    };
    let addr = if is_v4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    }
    .map_err(SocketError::OriginalDst)?;
    addr.as_socket().map(unmap).ok_or_else(|| {
        SocketError::OriginalDst(std::io::Error::other(
            "original destination is not an IP address",
        ))
    })
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(IpAddr::V4(ip), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Binds `socket` to `source`, an address that need not be the pod's.
fn bind_transparent(socket: &Socket, source: IpAddr) -> std::io::Result<()> {
    let transparent = match source {
        IpAddr::V4(_) => socket.set_ip_transparent_v4(true),
        IpAddr::V6(_) => socket.set_ip_transparent_v6(true),
    };
    match transparent {
        Ok(()) => {
            // Port 0 is picked at connect(2) by the whole 4-tuple, as for any
            // outgoing connection. Without this, bind(2) reserves a port on
            // its own by scanning every bound port: under a high connection
            // rate (TIME_WAIT sockets piling up) that scan took nearly all of
            // the proxy's CPU.
            nix::sys::socket::setsockopt(
                socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
            socket.bind(&SocketAddr::new(source, 0).into())
        }
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    %error,
                    "cannot keep clients' addresses towards applications (IP_TRANSPARENT \
                     needs CAP_NET_ADMIN); applications see their own pod's address as the peer"
                )
            });
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Whether a `/proc/net/tcp` or `/proc/net/tcp6` table has a socket in
/// state LISTEN (`0A`) on local port `port` (hexadecimal after the address).
fn listens_on(table: &str, port: u16) -> bool {
    let port = format!("{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let local = fields.next().unwrap_or_default();
        let state = fields.nth(1).unwrap_or_default();
        state == "0A" && local.rsplit_once(':').is_some_and(|(_, p)| p == port)
    })
}

fn bind_marked(
    addr: SocketAddr,
    mark: u32,
    ty: Type,
    protocol: Protocol,
) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    // A new ztunnel (a rolling restart starts it beside the old one) binds
    // the same ports in the same pods while the old one still listens; the
    // kernel spreads new connections over both until the old one closes
    // its listeners on drain. Upstream's InPodSocketPortReuseFactory
    // (src/inpod/linux/config.rs) does the same.
    socket.set_reuse_port(true)?;
    socket.set_mark(mark)?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The three listeners every enrolled pod gets, bound inside its netns.
#[derive(Debug)]
pub struct InPodListeners {
    /// 15001: the pod's outbound connections, redirected by its rules.
    pub outbound: TcpListener,
    /// 15006: plaintext connections to the pod, redirected by its rules.
    pub inbound_plaintext: TcpListener,
    /// 15008: HBONE to the pod, reached directly (the rules leave it alone).
    pub hbone: TcpListener,
}

impl InPodListeners {
    pub async fn bind(factory: &InPodSocketFactory) -> Result<Self, SocketError> {
        Ok(InPodListeners {
            outbound: factory.listen(api::ports::ZTUNNEL_OUTBOUND).await?,
            inbound_plaintext: factory
                .listen(api::ports::ZTUNNEL_INBOUND_PLAINTEXT)
                .await?,
            hbone: factory.listen(api::ports::HBONE).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::listens_on;

    /// The layout of `/proc/net/tcp` and `/proc/net/tcp6` (trailing columns cut).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4101
   1: 0100007F:3AA0 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4102
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:3AA0 00000000000000000000000000000000:0000 0A 00000000:00000000
";

    #[test]
    fn only_listening_sockets_on_the_port_count() {
        // 15006 (0x3A9E) listens in the IPv4 table, 15008 (0x3AA0) in the IPv6 one.
        assert!(listens_on(TCP, 15006));
        assert!(listens_on(TCP6, 15008));
        // 15008 in the IPv4 table is an established connection, not a listener.
        assert!(!listens_on(TCP, 15008));
        // A remote port (50000, 0xC350) or a port nothing uses is no match.
        assert!(!listens_on(TCP, 50000));
        assert!(!listens_on(TCP, 15001));
        assert!(!listens_on("", 15008));
    }
}
