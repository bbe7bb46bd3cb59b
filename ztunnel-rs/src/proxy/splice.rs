//! Carries bytes both ways between the two halves of a proxied connection
//! (TCP or an HBONE tunnel on either side), counting them as they pass.
//! Half-close crosses intact: when one side finishes sending, the other
//! side's write half is shut (FIN, or END_STREAM in a tunnel) while the
//! reverse direction keeps flowing. An error on either side aborts both
//! (RST, or RST_STREAM), so a reset is seen end to end.
//!
//! Bytes move as reference-counted chunks, never copied in user space: what
//! is read from TCP goes to HTTP/2 as it is, a DATA payload received goes to
//! TCP as it is. Reads from TCP size themselves to the traffic (see
//! [`ReadBuffer`]), and an idle connection holds no buffer at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_core::hbone::HboneStream;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::metrics::{ByteCounter, ConnectionRecord};

/// One side of a proxied connection as the splice drives it.
pub trait Side: Unpin {
    /// The next bytes received; an empty chunk is the end of the stream
    /// (FIN, END_STREAM).
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>>;

    /// Sends the front of `chunk` and advances it past what was taken.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes)
    -> Poll<io::Result<()>>;

    /// Ends the write direction (FIN, END_STREAM).
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Tears the connection down abruptly (RST, RST_STREAM).
    fn abort(self);
}

impl Side for TcpStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        if self.poll_read_ready(cx).is_pending() {
            // Idle: hold no memory until there is something to read.
            buffer.release();
            return Poll::Pending;
        }
        buffer.reserve();
        // Through AsyncRead, whose short reads mark the socket drained
        // (no extra read just to learn it would block).
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self),
            cx,
            &mut buffer.buf
        ))?;
        Poll::Ready(Ok(buffer.take(n)))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        bytes::Buf::advance(chunk, n);
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }

    /// Closes with RST instead of FIN.
    fn abort(self) {
        reset(self);
    }
}

impl Side for HboneStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buffer: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        HboneStream::poll_read_chunk(self, cx)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        HboneStream::poll_write_chunk(self, cx, chunk)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        HboneStream::poll_finish(self, cx)
    }

    fn abort(mut self) {
        self.reset();
    }
}

/// Closes `stream` with RST: how a carried connection that must stop (a
/// policy change revoked it, its other side failed) is cut.
pub fn reset(stream: TcpStream) {
    // Linger zero makes close(2) send RST and drop unsent data.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Closes a connection the proxy refused (denied, no route, no answer
/// from the next hop) with an ordinary close: the application reads EOF,
/// or sees a reset if it had sent bytes that were never read (the
/// kernel's rule for closing with unread data). Upstream ztunnel refuses
/// the same way: it drops the stream (`OutboundConnection::proxy_to`,
/// `InboundPassthrough::proxy_inbound_plaintext` in its `proxy/`).
pub fn refuse(stream: TcpStream) {
    drop(stream);
}

/// Where one direction reads from TCP. Reads start at `MIN` bytes and double
/// while they fill the buffer, up to `MAX`, so a bulk transfer moves large
/// chunks (fewer system calls, HTTP/2 frames and wake-ups) while a
/// request/response connection keeps small ones; the size shrinks again
/// when reads come back small. Between bursts the memory is given back.
#[derive(Debug)]
pub struct ReadBuffer {
    buf: BytesMut,
    size: usize,
}

impl ReadBuffer {
    const MIN: usize = 16 * 1024;
    const MAX: usize = 256 * 1024;

    fn new() -> Self {
        ReadBuffer {
            buf: BytesMut::new(),
            size: Self::MIN,
        }
    }

    /// Room for the next read. Reuses the allocation once the chunks cut
    /// from it have been sent and dropped.
    fn reserve(&mut self) {
        if self.buf.capacity() < self.size / 2 {
            self.buf.reserve(self.size);
        }
    }

    /// The `n` bytes just read, as a chunk of their own.
    fn take(&mut self, n: usize) -> Bytes {
        let room = n + self.buf.capacity() - self.buf.len();
        if n == room && self.size < Self::MAX {
            self.size *= 2;
        } else if n < self.size / 8 && self.size > Self::MIN {
            self.size /= 2;
        }
        self.buf.split().freeze()
    }

    fn release(&mut self) {
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

/// One direction: read a chunk, count it, write it all, repeat; at the end
/// of the stream, finish the other side's write half.
struct Pump<'a> {
    buffer: ReadBuffer,
    /// Read and not yet written.
    pending: Bytes,
    eof: bool,
    done: bool,
    bytes: &'a ByteCounter,
}

impl<'a> Pump<'a> {
    fn new(bytes: &'a ByteCounter) -> Self {
        Pump {
            buffer: ReadBuffer::new(),
            pending: Bytes::new(),
            eof: false,
            done: false,
            bytes,
        }
    }

    fn poll<R: Side, W: Side>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            if !self.pending.is_empty() {
                ready!(to.poll_write_chunk(cx, &mut self.pending))?;
            } else if self.eof {
                ready!(to.poll_finish(cx))?;
                self.done = true;
            } else {
                let chunk = ready!(from.poll_read_chunk(cx, &mut self.buffer))?;
                if chunk.is_empty() {
                    self.eof = true;
                    self.buffer.release();
                } else {
                    self.bytes.add(chunk.len() as u64);
                    self.pending = chunk;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Both directions of one connection.
struct Splice<'a, C, S> {
    client: &'a mut C,
    server: &'a mut S,
    up: Pump<'a>,
    down: Pump<'a>,
}

impl<C: Side, S: Side> Future for Splice<'_, C, S> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let up = this.up.poll(cx, this.client, this.server)?;
        let down = this.down.poll(cx, this.server, this.client)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// Copies until both directions are done; `client` is the side the
/// connection came from. Bytes are counted in `record` as they flow.
pub async fn splice<C: Side, S: Side>(
    client: C,
    server: S,
    record: &ConnectionRecord,
) -> io::Result<()> {
    let never = std::future::pending::<std::convert::Infallible>();
    match splice_until(client, server, record, never).await {
        Ok(copied) => copied,
        Err(never) => match never {},
    }
}

/// [`splice`], unless `cut` completes first: then both sides are torn down
/// (RST / RST_STREAM) at once and `cut`'s output is returned as the error.
pub async fn splice_until<C: Side, S: Side, F: Future>(
    mut client: C,
    mut server: S,
    record: &ConnectionRecord,
    cut: F,
) -> Result<io::Result<()>, F::Output> {
    let outcome = {
        let copying = Splice {
            client: &mut client,
            server: &mut server,
            up: Pump::new(record.client_to_server()),
            down: Pump::new(record.server_to_client()),
        };
        tokio::select! {
            biased;
            copied = copying => Ok(copied),
            why = cut => Err(why),
        }
    };
    if !matches!(outcome, Ok(Ok(()))) {
        client.abort();
        server.abort();
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::ReadBuffer;

    /// Simulates a read of `n` bytes into the buffer.
    fn read(buffer: &mut ReadBuffer, n: usize) -> usize {
        buffer.reserve();
        let room = buffer.buf.capacity() - buffer.buf.len();
        let n = n.min(room);
        buffer.buf.extend_from_slice(&vec![7u8; n]);
        buffer.take(n).len()
    }

    #[test]
    fn read_size_grows_with_full_reads_and_shrinks_with_small_ones() {
        let mut buffer = ReadBuffer::new();
        assert_eq!(buffer.size, ReadBuffer::MIN);
        for _ in 0..10 {
            read(&mut buffer, usize::MAX);
        }
        assert_eq!(buffer.size, ReadBuffer::MAX, "bulk reads reach the maximum");
        for _ in 0..10 {
            assert_eq!(read(&mut buffer, 100), 100);
        }
        assert_eq!(
            buffer.size,
            ReadBuffer::MIN,
            "small reads return to the minimum"
        );
    }

    #[test]
    fn an_idle_buffer_holds_no_memory() {
        let mut buffer = ReadBuffer::new();
        read(&mut buffer, 10);
        buffer.reserve();
        assert!(buffer.buf.capacity() > 0);
        buffer.release();
        assert_eq!(buffer.buf.capacity(), 0);
    }
}
