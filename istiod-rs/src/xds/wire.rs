//! The delta ADS stream on the wire. Responses are encoded straight from the
//! snapshot's shared resources, one chunk at a time as the transport asks
//! for more, so a full state of a big mesh is never copied per proxy into a
//! message struct or one contiguous buffer (tonic's encoder would keep a
//! buffer as large as the largest message for the life of each stream).
//! Memory per stream stays near one chunk however large the push. The bytes
//! are exactly those prost emits for the same `DeltaDiscoveryResponse`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use api::discovery::DeltaDiscoveryRequest;
use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tokio::sync::mpsc;

use super::delta::Push;
use super::metrics::{Metrics, TypeLabel};
use crate::snapshot::Resource;

/// Resources are written in chunks of about this many bytes.
const CHUNK_BYTES: usize = 64 << 10;
/// The gRPC message prefix: compressed flag and big-endian length.
const GRPC_PREFIX: usize = 5;

/// A response on its way to the proxy.
#[derive(Debug)]
pub struct Outbound {
    pub type_url: String,
    pub push: Push,
}

/// Decodes the proxy's requests (tonic handles the gRPC framing).
#[derive(Debug, Default)]
pub struct RequestDecoder;

impl tonic::codec::Decoder for RequestDecoder {
    type Item = DeltaDiscoveryRequest;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        DeltaDiscoveryRequest::decode(src).map(Some).map_err(|e| {
            tonic::Status::invalid_argument(format!(
                "could not decode the DeltaDiscoveryRequest: {e}"
            ))
        })
    }
}

fn key_len(tag: u32) -> usize {
    encoded_len_varint(u64::from(tag << 3))
}

/// A length-delimited field (string, bytes, message) of `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// proto3 leaves empty scalar strings and bytes out.
fn scalar_len(tag: u32, value: &[u8]) -> usize {
    if value.is_empty() {
        0
    } else {
        delimited_len(tag, value.len())
    }
}

fn put_delimited(tag: u32, value: &[u8], buf: &mut BytesMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

fn put_scalar(tag: u32, value: &[u8], buf: &mut BytesMut) {
    if !value.is_empty() {
        put_delimited(tag, value, buf);
    }
}

/// `google.protobuf.Any` of a resource: type_url = 1, value = 2.
fn any_len(r: &Resource) -> usize {
    scalar_len(1, r.body.type_url.as_bytes()) + scalar_len(2, &r.body.value)
}

/// `envoy.service.discovery.v3.Resource`: version = 1, resource = 2,
/// name = 3, aliases = 4.
fn resource_len(r: &Resource, aliases: &[String]) -> usize {
    scalar_len(1, r.version.as_bytes())
        + delimited_len(2, any_len(r))
        + scalar_len(3, r.name.as_bytes())
        + aliases
            .iter()
            .map(|a| delimited_len(4, a.len()))
            .sum::<usize>()
}

fn put_resource(r: &Resource, aliases: &[String], buf: &mut BytesMut) {
    // DeltaDiscoveryResponse.resources = 2
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(resource_len(r, aliases) as u64, buf);
    put_scalar(1, r.version.as_bytes(), buf);
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(any_len(r) as u64, buf);
    put_scalar(1, r.body.type_url.as_bytes(), buf);
    put_scalar(2, &r.body.value, buf);
    put_scalar(3, r.name.as_bytes(), buf);
    for alias in aliases {
        put_delimited(4, alias.as_bytes(), buf);
    }
}

fn aliases_of<'a>(aliases: &'a BTreeMap<String, Vec<String>>, r: &Resource) -> &'a [String] {
    aliases.get(&r.name).map_or(&[], Vec::as_slice)
}

/// One `DeltaDiscoveryResponse` as gRPC-framed chunks: prefix and
/// `system_version_info` (1), the resources (2) in batches, then
/// `type_url` (4), `nonce` (5) and `removed_resources` (6).
#[derive(Debug)]
pub struct ResponseFrames {
    head: Option<BytesMut>,
    resources: std::vec::IntoIter<Arc<Resource>>,
    /// Resource name -> the address names it answers (rarely any).
    aliases: BTreeMap<String, Vec<String>>,
    tail: Option<BytesMut>,
}

/// The response was too big for one gRPC message.
#[derive(Debug)]
pub struct TooLarge(pub usize);

impl ResponseFrames {
    pub fn new(type_url: &str, push: Push) -> Result<Self, TooLarge> {
        let version = push.version.as_bytes();
        let removed_len: usize = push
            .delta
            .removed
            .iter()
            .map(|name| delimited_len(6, name.len()))
            .sum();
        let tail_len =
            scalar_len(4, type_url.as_bytes()) + scalar_len(5, push.nonce.as_bytes()) + removed_len;
        let resources_len: usize = push
            .delta
            .upserts
            .iter()
            .map(|r| delimited_len(2, resource_len(r, aliases_of(&push.delta.aliases, r))))
            .sum();
        let len = scalar_len(1, version) + resources_len + tail_len;
        let prefix_len = u32::try_from(len).map_err(|_| TooLarge(len))?;

        let mut head = BytesMut::with_capacity(GRPC_PREFIX + scalar_len(1, version));
        head.put_u8(0);
        head.put_u32(prefix_len);
        put_scalar(1, version, &mut head);
        let mut tail = BytesMut::with_capacity(tail_len);
        put_scalar(4, type_url.as_bytes(), &mut tail);
        put_scalar(5, push.nonce.as_bytes(), &mut tail);
        for name in &push.delta.removed {
            put_delimited(6, name.as_bytes(), &mut tail);
        }
        Ok(ResponseFrames {
            head: Some(head),
            resources: push.delta.upserts.into_iter(),
            aliases: push.delta.aliases,
            tail: Some(tail),
        })
    }

    /// The next chunk of bytes; `None` once the response is fully written.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        let mut buf = self.head.take().unwrap_or_default();
        buf.reserve(CHUNK_BYTES);
        while buf.len() < CHUNK_BYTES {
            let Some(resource) = self.resources.next() else {
                break;
            };
            put_resource(&resource, aliases_of(&self.aliases, &resource), &mut buf);
        }
        if self.resources.len() == 0
            && let Some(tail) = self.tail.take()
        {
            buf.unsplit(tail);
        }
        (!buf.is_empty()).then(|| buf.freeze())
    }
}

/// A response being written, with what its metrics need.
struct Writing {
    frames: ResponseFrames,
    label: TypeLabel,
    resources: u64,
    removals: u64,
    pending_since: Option<super::delta::Pending>,
}

/// The HTTP body of a delta ADS stream: the connection task's responses,
/// written chunk by chunk, then the gRPC status in trailers.
pub struct ResponseBody {
    responses: mpsc::Receiver<Result<Outbound, tonic::Status>>,
    writing: Option<Writing>,
    metrics: Metrics,
    finished: bool,
}

impl ResponseBody {
    pub fn new(
        responses: mpsc::Receiver<Result<Outbound, tonic::Status>>,
        metrics: Metrics,
    ) -> Self {
        ResponseBody {
            responses,
            writing: None,
            metrics,
            finished: false,
        }
    }

    /// Pushes and resources count once the last byte went to the transport;
    /// that is also the end of the push latency.
    fn written(&self, w: &Writing) {
        let m = &self.metrics;
        m.pushes.get_or_create(&w.label).inc();
        m.resources_sent.get_or_create(&w.label).inc_by(w.resources);
        m.removals_sent.get_or_create(&w.label).inc_by(w.removals);
        if let Some(since) = w.pending_since {
            m.push_latency
                .get_or_create(&w.label)
                .observe(since.arrived.elapsed().as_secs_f64());
            m.convergence.observe(since.changed.elapsed().as_secs_f64());
        }
    }
}

fn trailers(status: &tonic::Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only a message that cannot be a header value gets here.
        let plain = tonic::Status::new(status.code(), "");
        let _ = plain.add_header(&mut headers);
    }
    Frame::trailers(headers)
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        loop {
            if let Some(writing) = &mut this.writing {
                if let Some(chunk) = writing.frames.next_chunk() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(done) = this.writing.take() {
                    this.written(&done);
                }
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match ready!(this.responses.poll_recv(cx)) {
                Some(Ok(out)) => {
                    let label = TypeLabel::new(&out.type_url);
                    let resources = out.push.delta.upserts.len() as u64;
                    let removals = out.push.delta.removed.len() as u64;
                    let pending_since = out.push.pending_since;
                    match ResponseFrames::new(&out.type_url, out.push) {
                        Ok(frames) => {
                            this.writing = Some(Writing {
                                frames,
                                label,
                                resources,
                                removals,
                                pending_since,
                            });
                        }
                        Err(TooLarge(len)) => {
                            this.finished = true;
                            let status = tonic::Status::resource_exhausted(format!(
                                "a {} response of {len} bytes exceeds gRPC's 4 GiB message limit; subscribe to fewer resources",
                                out.type_url
                            ));
                            return Poll::Ready(Some(Ok(trailers(&status))));
                        }
                    }
                }
                Some(Err(status)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Ok(trailers(&status))));
                }
                None => {
                    this.finished = true;
                    return Poll::Ready(Some(Ok(trailers(&tonic::Status::ok("")))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.writing.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::delta::Delta;
    use api::discovery::{self, DeltaDiscoveryResponse};
    use api::workload::{Address, Workload, address};

    fn workload(uid: &str, filler: usize) -> Arc<Resource> {
        let msg = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                // Large enough to span chunks (and multi-byte length varints).
                canonical_name: "x".repeat(filler),
                ..Default::default()
            })),
        };
        Arc::new(Resource::new(api::type_url::ADDRESS, uid, &msg))
    }

    fn framed(push: &Push, type_url: &str) -> Vec<u8> {
        let mut frames = ResponseFrames::new(type_url, push.clone()).unwrap();
        let mut bytes = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = frames.next_chunk() {
            bytes.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert!(chunks >= 1);
        bytes
    }

    fn prost_framed(push: &Push, type_url: &str) -> Vec<u8> {
        let msg = DeltaDiscoveryResponse {
            system_version_info: push.version.clone(),
            resources: push
                .delta
                .upserts
                .iter()
                .map(|r| discovery::Resource {
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    name: r.name.clone(),
                    aliases: push.delta.aliases.get(&r.name).cloned().unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            type_url: type_url.into(),
            nonce: push.nonce.clone(),
            removed_resources: push.delta.removed.clone(),
        };
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn push(upserts: Vec<Arc<Resource>>, removed: &[&str], version: &str) -> Push {
        Push {
            nonce: "0badcafe-17".into(),
            version: version.into(),
            delta: Delta {
                upserts,
                removed: removed.iter().map(|s| s.to_string()).collect(),
                aliases: BTreeMap::new(),
            },
            pending_since: None,
        }
    }

    #[test]
    fn bytes_equal_what_prost_emits() {
        let t = api::type_url::ADDRESS;
        let many: Vec<_> = (0..300).map(|i| workload(&format!("w{i}"), 400)).collect();
        for p in [
            push(vec![], &[], ""),
            push(vec![], &["gone", ""], "3"),
            push(vec![workload("a", 0), workload("b", 200)], &[], "12"),
            push(many, &["x"], "99"),
            {
                let mut p = push(vec![workload("a", 0), workload("b", 10)], &[], "7");
                p.delta
                    .aliases
                    .insert("b".into(), vec!["net/10.0.0.1".into(), "/10.0.0.1".into()]);
                p
            },
        ] {
            assert_eq!(framed(&p, t), prost_framed(&p, t));
        }
    }

    #[test]
    fn large_responses_come_in_bounded_chunks() {
        let many: Vec<_> = (0..2_000)
            .map(|i| workload(&format!("w{i}"), 300))
            .collect();
        let mut frames = ResponseFrames::new(api::type_url::ADDRESS, push(many, &[], "1")).unwrap();
        let mut chunks = 0;
        while let Some(chunk) = frames.next_chunk() {
            assert!(chunk.len() < CHUNK_BYTES + 1024, "{}", chunk.len());
            chunks += 1;
        }
        assert!(chunks > 5, "{chunks}");
    }
}
