//! `SOCK_SEQPACKET` unix sockets for ZDS: one message per packet, with the
//! pod's netns fd riding along as `SCM_RIGHTS`. Both ends (ztunnel and the
//! node agent) use this.
//!
//! The sockets are created by socket2 and then driven by tokio's unix socket
//! types, which only need a pollable fd and never look at the socket type;
//! every read and write goes through `recvmsg` / `sendmsg` here, so packet
//! boundaries are kept.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// Largest ZDS packet we accept; real ones are a few hundred bytes. Anything
/// longer arrives truncated and is rejected as such.
const MAX_PACKET: usize = 16 * 1024;
/// Room for a few fds, so that a sender passing too many is detected (and the
/// extras closed) rather than having them silently cut.
const MAX_FDS: usize = 4;

/// A listening ZDS socket (the node agent's end).
pub struct SeqpacketListener {
    socket: UnixListener,
    path: PathBuf,
}

impl std::fmt::Debug for SeqpacketListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeqpacketListener({})", self.path.display())
    }
}

impl SeqpacketListener {
    /// Binds `path`, replacing a stale socket left by an earlier run and
    /// creating the parent directory if needed.
    pub fn bind(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        socket.bind(&SockAddr::unix(path)?)?;
        socket.listen(16)?;
        socket.set_nonblocking(true)?;
        let std_listener = std::os::unix::net::UnixListener::from(OwnedFd::from(socket));
        Ok(SeqpacketListener {
            socket: UnixListener::from_std(std_listener)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn accept(&self) -> std::io::Result<SeqpacketConn> {
        // accept(2) hands back a socket of the listener's type: SEQPACKET.
        let (stream, _) = self.socket.accept().await?;
        Ok(SeqpacketConn { socket: stream })
    }
}

/// One ZDS connection.
pub struct SeqpacketConn {
    socket: UnixStream,
}

impl std::fmt::Debug for SeqpacketConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeqpacketConn(fd {})", self.socket.as_raw_fd())
    }
}

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    pub data: Vec<u8>,
    /// Every fd that came with it, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
    /// The data or the control message did not fit and was cut by the kernel.
    pub truncated: bool,
}

impl SeqpacketConn {
    /// Connects to a listening ZDS socket (ztunnel's end).
    pub async fn connect(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let addr = SockAddr::unix(path.as_ref())?;
        // Connecting a unix socket does not wait on a peer's handshake: it
        // either succeeds or fails at once, so blocking mode is fine here.
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        socket.connect(&addr)?;
        Self::from_socket(socket)
    }

    /// A connected pair, for tests and in-process wiring.
    pub fn pair() -> std::io::Result<(Self, Self)> {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        Ok((Self::from_socket(a)?, Self::from_socket(b)?))
    }

    fn from_socket(socket: Socket) -> std::io::Result<Self> {
        socket.set_nonblocking(true)?;
        let std_stream = std::os::unix::net::UnixStream::from(OwnedFd::from(socket));
        Ok(SeqpacketConn {
            socket: UnixStream::from_std(std_stream)?,
        })
    }

    /// Sends one packet, with `fd` attached as `SCM_RIGHTS` when given.
    pub async fn send(&self, data: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let raw = fd.map(|fd| [fd.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> = raw
            .as_ref()
            .map(|fds| vec![ControlMessage::ScmRights(fds)])
            .unwrap_or_default();
        let iov = [IoSlice::new(data)];
        let fd = self.socket.as_raw_fd();
        self.socket
            .async_io(Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(fd, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            })
            .await
            .map(|_| ())
    }

    /// Receives one packet; `None` when the peer closed the connection.
    pub async fn recv(&self) -> std::io::Result<Option<Packet>> {
        let fd = self.socket.as_raw_fd();
        self.socket
            .async_io(Interest::READABLE, || recv_packet(fd))
            .await
    }

    /// Waits until the connection may have something to read (a packet or
    /// EOF); readiness can be stale, so follow with [`Self::try_recv`].
    pub async fn readable(&self) -> std::io::Result<()> {
        self.socket.readable().await
    }

    /// Receives one packet if one is waiting: `WouldBlock` when none is.
    pub fn try_recv(&self) -> std::io::Result<Option<Packet>> {
        let fd = self.socket.as_raw_fd();
        self.socket.try_io(Interest::READABLE, || recv_packet(fd))
    }
}

impl AsFd for SeqpacketConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

fn recv_packet(fd: RawFd) -> std::io::Result<Option<Packet>> {
    let mut data = vec![0u8; MAX_PACKET];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut data)];
        let msg = nix::sys::socket::recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        // Own every fd before anything else can fail, so none leaks.
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                fds.extend(raw.into_iter().map(own_received_fd));
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    data.truncate(len);
    Ok(Some(Packet {
        data,
        fds,
        truncated: flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
    }))
}

/// Takes ownership of an fd the kernel installed for us with `SCM_RIGHTS`.
#[allow(unsafe_code)]
fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `recvmsg` just created this descriptor in our fd table for the
    // SCM_RIGHTS message; nothing else in the process knows or owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
