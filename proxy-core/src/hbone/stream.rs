//! One HBONE tunnel as a byte stream. Writes respect HTTP/2 flow control
//! (nothing is buffered beyond the window the peer granted); shutdown sends
//! END_STREAM and the peer's END_STREAM reads as EOF, so TCP half-close
//! crosses the tunnel intact. A reset by the peer surfaces as
//! `ConnectionReset`.
//!
//! Besides `AsyncRead + AsyncWrite` (which copy), a proxy can move whole
//! chunks without copying: [`HboneStream::poll_read_chunk`] hands out the
//! received DATA payloads as they are, [`HboneStream::poll_write_chunk`]
//! queues the caller's buffer as DATA.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamSlot;

pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// Handed out by `poll_read_chunk` and not yet given back to the peer's
    /// window: that happens when the next chunk is asked for, i.e. once the
    /// caller has passed the previous one on.
    unreleased: usize,
    read_closed: bool,
    write_closed: bool,
    /// Holds the stream's place on its pooled connection (client side).
    _slot: Option<StreamSlot>,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("read_closed", &self.read_closed)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        HboneStream {
            send,
            recv,
            pending: Bytes::new(),
            unreleased: 0,
            read_closed: false,
            write_closed: false,
            _slot: slot,
        }
    }

    /// Aborts the tunnel with RST_STREAM: the HBONE equivalent of a TCP RST
    /// (e.g. the application behind the tunnel reset its connection).
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
        self.write_closed = true;
        self.read_closed = true;
    }

    /// The next received bytes as they arrived (no copy); an empty chunk is
    /// the peer's END_STREAM. The window of the chunk handed out before
    /// reopens here, so a slow consumer slows the sender.
    pub fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let consumed = std::mem::take(&mut self.unreleased);
        self.release(consumed);
        let chunk = if self.pending.is_empty() {
            ready!(self.poll_next_data(cx))?
        } else {
            std::mem::take(&mut self.pending)
        };
        self.unreleased = chunk.len();
        Poll::Ready(Ok(chunk))
    }

    /// Queues the front of `chunk` as DATA, as much as the peer's window
    /// allows (no copy), and advances `chunk` past it. Pending while the
    /// window is closed.
    pub fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        self.send
            .send_data(chunk.split_to(n), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(()))
    }

    /// Sends END_STREAM (the write half of a TCP half-close).
    pub fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }

    fn release(&mut self, n: usize) {
        if n > 0 {
            // Fails only once the stream is gone, when the window is moot.
            let _ = self.recv.flow_control().release_capacity(n);
        }
    }

    /// The next non-empty DATA payload, or an empty one at END_STREAM.
    fn poll_next_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            if self.read_closed {
                return Poll::Ready(Ok(Bytes::new()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => return Poll::Ready(Ok(data)),
                Some(Err(e)) => {
                    self.read_closed = true;
                    return Poll::Ready(Err(to_io(e)));
                }
                None => self.read_closed = true,
            }
        }
    }

    /// How much of `wanted` bytes the peer's window takes now (at least 1).
    fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream already shut down for writing",
            )));
        }
        let send = &mut self.send;
        send.reserve_capacity(wanted);
        let capacity = match send.capacity() {
            0 => match ready!(send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    )));
                }
            },
            n => n,
        };
        Poll::Ready(Ok(capacity.min(wanted)))
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_empty() {
            this.pending = ready!(this.poll_next_data(cx))?;
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Only consumed bytes reopen the window: a slow reader slows the sender.
        this.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_finish(cx)
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_reset() || e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("I/O error on HBONE stream"));
    }
    io::Error::other(e)
}
