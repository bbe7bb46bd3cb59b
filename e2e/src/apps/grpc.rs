//! gRPC as the sample apps speak it: unary calls over h2c (HTTP/2 without
//! TLS, prior knowledge), framed by hand as the gRPC over HTTP/2 protocol
//! says (PROTOCOL-HTTP2.md of grpc/grpc): a request is a `POST
//! /<service>/<method>` with `content-type: application/grpc` and `te:
//! trailers`; each message is a 5-byte prefix (compressed flag 0, u32
//! big-endian length) and the message; the status is the `grpc-status`
//! (and `grpc-message`) trailer, or a header of a trailers-only response.
//!
//! The messages are opaque bytes (no protobuf schema): the echo's reply
//! message is the request message, so a load of N-byte requests moves N
//! bytes each way. The one method is [`ECHO_METHOD`].

use bytes::{BufMut, Bytes, BytesMut};

/// The path of the echo's one unary method.
pub const ECHO_METHOD: &str = "/e2e.Echo/Echo";
/// Request metadata asking the echo to answer this gRPC status (a number,
/// 0..=16) instead of OK, with no message.
pub const STATUS_METADATA: &str = "x-echo-grpc-status";
/// Response header naming the pod that answered (every response, errors too).
pub const POD_HEADER: &str = "x-echo-pod";
/// The gRPC content type.
pub const CONTENT_TYPE: &str = "application/grpc";
/// Largest message either side accepts (gRPC's usual default, 4 MiB).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// gRPC status codes the apps name.
pub const OK: u32 = 0;
pub const INVALID_ARGUMENT: u32 = 3;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;

/// One length-prefixed, uncompressed message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The messages of a whole unary body: exactly one, uncompressed.
pub fn unframe(body: &[u8]) -> Result<Bytes, String> {
    let Some((prefix, rest)) = body.split_first_chunk::<5>() else {
        return Err(format!(
            "body of {} bytes has no 5-byte message prefix",
            body.len()
        ));
    };
    if prefix[0] != 0 {
        return Err("compressed messages are not supported".into());
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!(
            "message of {len} bytes is over the {MAX_MESSAGE}-byte limit"
        ));
    }
    if rest.len() != len {
        return Err(format!(
            "prefix says {len} bytes, the body holds {} (one unary message expected)",
            rest.len()
        ));
    }
    Ok(Bytes::copy_from_slice(rest))
}

/// `grpc-status` as a number, when present and valid.
pub fn status_of(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The request path of a gRPC URL (`http://host:port[/service/method]`):
/// [`ECHO_METHOD`] when the URL has none.
pub fn method_path(uri: &http::Uri) -> &str {
    match uri.path() {
        "" | "/" => ECHO_METHOD,
        path => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_its_frame() {
        let framed = frame(b"hello");
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(unframe(&framed).unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(unframe(&frame(b"")).unwrap(), Bytes::new());
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert!(unframe(b"").unwrap_err().contains("no 5-byte"));
        assert!(
            unframe(&[1, 0, 0, 0, 0])
                .unwrap_err()
                .contains("compressed")
        );
        assert!(
            unframe(&[0, 0, 0, 0, 3, b'a'])
                .unwrap_err()
                .contains("says 3")
        );
        let two = [frame(b"a"), frame(b"b")].concat();
        assert!(unframe(&two).is_err());
        assert!(unframe(&[0, 0xff, 0, 0, 0]).unwrap_err().contains("limit"));
    }

    #[test]
    fn the_method_defaults_to_echo() {
        let uri: http::Uri = "http://10.0.0.1:7070".parse().unwrap();
        assert_eq!(method_path(&uri), ECHO_METHOD);
        let uri: http::Uri = "http://10.0.0.1:7070/e2e.Echo/Other".parse().unwrap();
        assert_eq!(method_path(&uri), "/e2e.Echo/Other");
    }
}
