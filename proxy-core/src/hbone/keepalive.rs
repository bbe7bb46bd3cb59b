//! Dead-peer detection on an HBONE connection, used by both sides: TCP
//! keepalive on the socket, and an HTTP/2 PING loop whose timeout drops the
//! connection. A peer that is gone without a FIN, or that stopped reading,
//! otherwise holds its connection, and every stream on it, forever.

use std::io;

use tokio::net::TcpStream;

use super::Keepalive;

impl Keepalive {
    /// Turns TCP keepalive on for `tcp` with these probe settings.
    pub(crate) fn apply_tcp(&self, tcp: &TcpStream) -> io::Result<()> {
        let probes = socket2::TcpKeepalive::new()
            .with_time(self.tcp_time)
            .with_interval(self.tcp_interval)
            .with_retries(self.tcp_retries);
        socket2::SockRef::from(tcp).set_tcp_keepalive(&probes)
    }
}

/// PINGs the peer every `ping_interval` and returns once one goes
/// unanswered for `ping_timeout`: the caller drops the connection. The PINGs
/// travel only while the connection is polled, which its owner does
/// alongside this. A PING that fails because the connection itself failed
/// never returns here: the connection's own error says what happened.
pub(crate) async fn unanswered_ping(mut ping_pong: h2::PingPong, keepalive: Keepalive) {
    loop {
        tokio::time::sleep(keepalive.ping_interval).await;
        match tokio::time::timeout(keepalive.ping_timeout, ping_pong.ping(h2::Ping::opaque())).await
        {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => std::future::pending().await,
            Err(_) => return,
        }
    }
}
