//! Protocol detection on a port whose protocol is not declared: the first
//! bytes of the tunnel say HTTP/1.x (a request line) or HTTP/2 (the h2c
//! connection preface); anything else, or nothing within the detection
//! timeout (a server-first protocol waits for the server to speak), is
//! TCP. This is what Envoy's HTTP inspector decides for upstream's
//! waypoint on "unsupported" (undeclared) ports (istio/istio
//! `pilot/pkg/networking/core/listener_waypoint.go`, `buildWaypointInternal`:
//! both chains plus the inspector). The bytes read are replayed to whoever
//! serves the connection ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use proxy_core::hbone::HboneStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not taken for HTTP/1 (Envoy's
/// inspector gives up after its 64 KiB buffer; a request line this long is
/// refused by every HTTP server anyway).
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Longest method token accepted while detecting.
const MAX_METHOD: usize = 32;

/// What the first bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Not HTTP (or nothing arrived in time): opaque TCP.
    Tcp,
}

/// The verdict on a prefix of the stream, if it can be given yet.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.is_empty() {
        return None;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        // `PRI * HTTP/2.0` is not an HTTP/1 request line either.
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    Some(match request_line(prefix) {
        Line::Incomplete => return None,
        Line::Http1 => Detected::Http1,
        Line::Other => Detected::Tcp,
    })
}

enum Line {
    Incomplete,
    Http1,
    Other,
}

/// `METHOD SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3).
fn request_line(prefix: &[u8]) -> Line {
    let method_len = prefix
        .iter()
        .position(|b| !is_token_char(*b))
        .unwrap_or(prefix.len());
    if method_len == prefix.len() {
        return if method_len <= MAX_METHOD {
            Line::Incomplete
        } else {
            Line::Other
        };
    }
    if method_len == 0 || method_len > MAX_METHOD || prefix[method_len] != b' ' {
        return Line::Other;
    }
    let Some(end) = prefix.iter().position(|b| *b == b'\n') else {
        if prefix.len() > MAX_REQUEST_LINE || prefix.contains(&b'\r') && !prefix.ends_with(b"\r") {
            return Line::Other;
        }
        return Line::Incomplete;
    };
    let line = prefix[..end].strip_suffix(b"\r").unwrap_or(&prefix[..end]);
    let rest = &line[method_len + 1..];
    match rest.rsplit_once_space() {
        Some((target, version))
            if !target.is_empty()
                && !target.contains(&b' ')
                && (version == b"HTTP/1.1" || version == b"HTTP/1.0") =>
        {
            Line::Http1
        }
        _ => Line::Other,
    }
}

fn is_token_char(b: u8) -> bool {
    // RFC 9110 tchar; methods are case-sensitive and usually upper case.
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

trait SplitSpace {
    fn rsplit_once_space(&self) -> Option<(&[u8], &[u8])>;
}

impl SplitSpace for [u8] {
    fn rsplit_once_space(&self) -> Option<(&[u8], &[u8])> {
        let i = self.iter().rposition(|b| *b == b' ')?;
        Some((&self[..i], &self[i + 1..]))
    }
}

/// Reads the first bytes of `stream` until [`classify`] decides, the
/// stream ends, or `timeout` passes (then: TCP). Returns the verdict and
/// the bytes read, which must be replayed ([`Rewind`]).
pub async fn detect(stream: &mut HboneStream, timeout: Duration) -> io::Result<(Detected, Bytes)> {
    let mut seen = BytesMut::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let chunk = std::future::poll_fn(|cx| stream.poll_read_chunk(cx));
        let chunk = match tokio::time::timeout_at(deadline, chunk).await {
            Err(_) => return Ok((Detected::Tcp, seen.freeze())),
            Ok(chunk) => chunk?,
        };
        if chunk.is_empty() {
            // The client finished writing before saying what it speaks.
            let verdict = classify(&seen).unwrap_or(Detected::Tcp);
            return Ok((verdict, seen.freeze()));
        }
        seen.extend_from_slice(&chunk);
        if let Some(verdict) = classify(&seen) {
            return Ok((verdict, seen.freeze()));
        }
    }
}

/// A stream whose first bytes were already read: they are read again
/// first, then the stream itself. Writes go straight through.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }

    /// The unread prefix and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide_the_protocol() {
        let cases: &[(&[u8], Option<Detected>)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Some(Detected::Http1)),
            (b"POST /x?y=1 HTTP/1.0\r\n", Some(Detected::Http1)),
            (b"OPTIONS * HTTP/1.1\n", Some(Detected::Http1)),
            (b"GET / HT", None),
            (b"GET", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Detected::Http2)),
            (b"PRI * HTTP/2.0\r\n", None),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Tcp)),
            (b"SSH-2.0-OpenSSH\r\n", Some(Detected::Tcp)),
            (b"GET / HTTP/2.0\r\n", Some(Detected::Tcp)),
            (b"GET  HTTP/1.1\r\n", Some(Detected::Tcp)),
            (b"get / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b" GET / HTTP/1.1\r\n", Some(Detected::Tcp)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Detected::Tcp)),
            (b"", None),
        ];
        for (prefix, want) in cases {
            assert_eq!(
                classify(prefix),
                *want,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
        let long = [b'A'; MAX_METHOD + 1];
        assert_eq!(classify(&long), Some(Detected::Tcp));
        let mut endless = b"GET /".to_vec();
        endless.extend(std::iter::repeat_n(b'a', MAX_REQUEST_LINE));
        assert_eq!(classify(&endless), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_first() {
        use tokio::io::AsyncReadExt;
        let inner: &[u8] = b" world";
        let mut r = Rewind::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
