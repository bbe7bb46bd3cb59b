//! Carries bytes both ways between the two halves of a proxied connection
//! (TCP or an HBONE tunnel on either side), counting them as they pass.
//! Half-close crosses intact: when one side finishes sending, the other
//! side's write half is shut (FIN, or END_STREAM in a tunnel) while the
//! reverse direction keeps flowing. An error on either side aborts both
//! (RST, or RST_STREAM), so a reset is seen end to end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use proxy_core::hbone::HboneStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::metrics::{ByteCounter, ConnectionRecord};

/// Per direction: large enough that one copy call moves a full TLS record,
/// small enough that thousands of idle connections stay cheap.
const BUFFER: usize = 16 * 1024;

/// A stream that can be torn down abruptly.
pub trait Abort {
    fn abort(self);
}

impl Abort for TcpStream {
    /// Closes with RST instead of FIN.
    fn abort(self) {
        reset(self);
    }
}

impl Abort for HboneStream {
    fn abort(mut self) {
        self.reset();
    }
}

/// Closes `stream` with RST: how a denied or failed connection is refused.
pub fn reset(stream: TcpStream) {
    // Linger zero makes close(2) send RST and drop unsent data.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Copies until both directions are done; `client` is the side the
/// connection came from. Bytes are counted in `record` as they flow.
pub async fn splice<C, S>(mut client: C, mut server: S, record: &ConnectionRecord) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Abort,
    S: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let copied = {
        let mut client = Metered {
            inner: &mut client,
            bytes: record.client_to_server(),
        };
        let mut server = Metered {
            inner: &mut server,
            bytes: record.server_to_client(),
        };
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUFFER, BUFFER).await
    };
    match copied {
        Ok(_) => Ok(()),
        Err(e) => {
            client.abort();
            server.abort();
            Err(e)
        }
    }
}

/// Counts what is read from `inner`.
struct Metered<'a, S> {
    inner: &'a mut S,
    bytes: &'a ByteCounter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut *self.inner).poll_read(cx, buf))?;
        self.bytes.add((buf.filled().len() - before) as u64);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
