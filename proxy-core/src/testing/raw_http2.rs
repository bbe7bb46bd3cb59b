//! An HBONE client that writes HTTP/2 frames by hand, to play the peer a
//! real client library will not: one that opens more streams than the
//! server allows, or stops answering PINGs. Frames are read back raw;
//! nothing is decoded beyond the 9-byte frame header.

use std::io;
use std::net::SocketAddr;

use api::SpiffeId;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::WorkloadCertificate;
use crate::tls;

pub const SETTINGS: u8 = 0x4;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// One frame as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Bytes,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let code = match self.kind {
            RST_STREAM => self.payload.get(0..4)?,
            GOAWAY => self.payload.get(4..8)?,
            _ => return None,
        };
        Some(u32::from_be_bytes(code.try_into().ok()?))
    }
}

/// An HTTP/2 connection over mutual TLS, driven frame by frame.
pub struct RawHttp2 {
    tls: TlsStream<TcpStream>,
    read: BytesMut,
}

impl std::fmt::Debug for RawHttp2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHttp2").finish_non_exhaustive()
    }
}

impl RawHttp2 {
    /// TLS over `tcp` as `cert`, expecting `server`, then the client
    /// preface and an empty SETTINGS frame.
    pub async fn start(
        tcp: TcpStream,
        cert: &WorkloadCertificate,
        server: &SpiffeId,
    ) -> io::Result<RawHttp2> {
        let config = tls::hbone_client_config(cert, server).map_err(io::Error::other)?;
        let address = tcp.peer_addr()?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(address.ip().into()), tcp)
            .await?;
        let mut raw = RawHttp2 {
            tls,
            read: BytesMut::new(),
        };
        raw.tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await?;
        raw.send(SETTINGS, 0, 0, &[]).await?;
        Ok(raw)
    }

    /// Writes one frame.
    pub async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut frame = Vec::with_capacity(9 + payload.len());
        let length = u32::try_from(payload.len()).map_err(io::Error::other)?;
        frame.extend_from_slice(&length.to_be_bytes()[1..]);
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tls.write_all(&frame).await?;
        self.tls.flush().await
    }

    /// Opens stream `stream` with `CONNECT authority` (headers only, the
    /// stream stays open).
    pub async fn connect(&mut self, stream: u32, authority: SocketAddr) -> io::Result<()> {
        let mut block = BytesMut::new();
        // Literal fields without indexing, names from the static table:
        // 2 is `:method`, 1 is `:authority` (RFC 7541, appendix A).
        literal(&mut block, 2, b"CONNECT");
        literal(&mut block, 1, authority.to_string().as_bytes());
        self.send(HEADERS, END_HEADERS, stream, &block).await
    }

    /// Acknowledges the peer's SETTINGS.
    pub async fn ack_settings(&mut self) -> io::Result<()> {
        self.send(SETTINGS, ACK, 0, &[]).await
    }

    /// The next frame; `None` once the server closed the connection.
    pub async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.read.len() >= 9 {
                let length = u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]);
                let length = length as usize;
                if self.read.len() >= 9 + length {
                    let mut header = self.read.split_to(9);
                    let payload = self.read.split_to(length).freeze();
                    header.advance(3);
                    let kind = header.get_u8();
                    let flags = header.get_u8();
                    let stream = header.get_u32() & 0x7fff_ffff;
                    return Ok(Some(Frame {
                        kind,
                        flags,
                        stream,
                        payload,
                    }));
                }
            }
            let n = match self.tls.read_buf(&mut self.read).await {
                Ok(n) => n,
                // The server dropping the connection is an end like EOF.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads frames until one matches `wanted` (returned) or the connection
    /// ends (`None`), answering SETTINGS on the way.
    pub async fn until(&mut self, wanted: impl Fn(&Frame) -> bool) -> io::Result<Option<Frame>> {
        while let Some(frame) = self.next_frame().await? {
            if wanted(&frame) {
                return Ok(Some(frame));
            }
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                self.ack_settings().await?;
            }
        }
        Ok(None)
    }
}

/// An HPACK literal header field without indexing whose name is static
/// table entry `index` (< 15).
fn literal(block: &mut BytesMut, index: u8, value: &[u8]) {
    block.put_u8(index);
    integer(block, value.len(), 7);
    block.put_slice(value);
}

/// An HPACK integer with an `prefix`-bit prefix, the rest of the first byte
/// zero (RFC 7541, 5.1).
fn integer(block: &mut BytesMut, value: usize, prefix: u32) {
    let max = (1usize << prefix) - 1;
    if value < max {
        block.put_u8(value as u8);
        return;
    }
    block.put_u8(max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        block.put_u8((rest % 128 + 128) as u8);
        rest /= 128;
    }
    block.put_u8(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541() {
        // C.1.1, C.1.2: 10 and 1337 with a 5-bit prefix.
        let mut block = BytesMut::new();
        integer(&mut block, 10, 5);
        assert_eq!(&block[..], [10]);
        let mut block = BytesMut::new();
        integer(&mut block, 1337, 5);
        assert_eq!(&block[..], [31, 154, 10]);
    }
}
