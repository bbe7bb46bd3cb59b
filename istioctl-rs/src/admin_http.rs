//! A GET to a debug endpoint over plain HTTP/1.1: ztunnel's admin port
//! (15000, `/config_dump`) and istiod's monitoring port (15014,
//! `/debug/syncz`), over TCP or a port-forward ([`crate::pods`]), or a
//! saved answer. One small client so that both commands parse URLs,
//! time out and decode chunked bodies the same way, without an HTTP
//! client dependency for two loopback GETs.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `http://host:port` with an optional path prefix, as given by the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminUrl {
    /// As the user wrote it (for messages).
    pub url: String,
    /// `host:port`.
    pub authority: String,
    /// Without a trailing `/`; empty for none.
    pub prefix: String,
}

impl AdminUrl {
    /// `port_hint` ends the message of a URL without a port, e.g.
    /// "ztunnel's admin port is 15000".
    pub fn parse(text: &str, port_hint: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix("http://") else {
            return Err(format!(
                "{text:?}: expected http://HOST:PORT (the endpoint is plain HTTP, e.g. http://127.0.0.1:15000)"
            ));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!(
                "{text:?}: expected http://HOST:PORT with a port ({port_hint})"
            ));
        }
        Ok(AdminUrl {
            url: text.trim_end_matches('/').to_string(),
            authority: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    /// The full URL of `path` (`/config_dump`) under this endpoint.
    pub fn endpoint(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }
}

/// A saved answer: the file, or standard input for `-` (read once, before
/// anything else runs).
pub async fn read_saved(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes).map(|_| bytes)
    } else {
        tokio::fs::read(path).await
    }
}

/// Why a GET got no HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Unreachable(pub String);

/// GET `path` under `url`: the status (`200 OK`) and the body, read to the
/// end (at most `max_body` bytes plus headers), within `timeout`.
pub async fn get(
    url: &AdminUrl,
    path: &str,
    max_body: usize,
    timeout: Duration,
) -> Result<(String, Vec<u8>), Unreachable> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&url.authority).await?;
        exchange(
            stream,
            &url.authority,
            &format!("{}{path}", url.prefix),
            max_body,
        )
        .await
    };
    within(timeout, exchange).await
}

/// The answer of `exchange` within `timeout`, split into status and body.
pub(crate) async fn within(
    timeout: Duration,
    exchange: impl Future<Output = std::io::Result<Vec<u8>>>,
) -> Result<(String, Vec<u8>), Unreachable> {
    let response = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            return Err(Unreachable(format!(
                "no answer within {}s",
                timeout.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(Unreachable(e.to_string())),
        Ok(Ok(response)) => response,
    };
    split_response(&response)
        .ok_or_else(|| Unreachable("the answer is not an HTTP/1.1 response".into()))
}

/// One `GET target` on `stream` (a TCP connection or a port-forwarded
/// stream), `Connection: close`: the raw response, read to the end (at most
/// `max_body` bytes plus 64 KiB of headers).
pub(crate) async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    host: &str,
    target: &str,
    max_body: usize,
) -> std::io::Result<Vec<u8>> {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    // Read until the response is complete by its own framing, or the end:
    // a port-forwarded stream need not end when the server closes.
    let limit = max_body + 64 * 1024;
    let mut response = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    while !is_complete(&response) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.len() > limit {
            return Err(std::io::Error::other(format!(
                "the answer is larger than {max_body} bytes"
            )));
        }
    }
    Ok(response)
}

/// Whether `response` holds a whole HTTP/1.1 response by its framing
/// (Content-Length, or chunked up to the last chunk).
fn is_complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&response[..end]) else {
        return false;
    };
    let body = &response[end + 4..];
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_ascii_lowercase())
        })
    };
    if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= length;
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return body.ends_with(b"0\r\n\r\n") && dechunk(body).is_some();
    }
    false
}

/// The status (`200 OK`) and the body (chunked or not) of an HTTP/1.1
/// response read to the end.
fn split_response(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..end]).ok()?;
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line
        .strip_prefix("HTTP/1.")?
        .get(2..)?
        .trim()
        .to_string();
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, body))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_http_and_a_port() {
        let url = AdminUrl::parse("http://127.0.0.1:15014/", "hint").unwrap();
        assert_eq!(url.authority, "127.0.0.1:15014");
        assert_eq!(
            url.endpoint("/debug/syncz"),
            "http://127.0.0.1:15014/debug/syncz"
        );
        let prefixed = AdminUrl::parse("http://[::1]:15000/zt", "hint").unwrap();
        assert_eq!(
            prefixed.endpoint("/config_dump"),
            "http://[::1]:15000/zt/config_dump"
        );
        assert!(AdminUrl::parse("https://127.0.0.1:15000", "hint").is_err());
        let no_port = AdminUrl::parse("http://127.0.0.1", "istiod's is 15014").unwrap_err();
        assert!(no_port.contains("istiod's is 15014"), "{no_port}");
        assert!(AdminUrl::parse("127.0.0.1:15000", "hint").is_err());
    }

    #[test]
    fn responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            split_response(plain).unwrap(),
            ("200 OK".to_string(), b"{}".to_vec())
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(split_response(chunked).unwrap().1, b"{\"a\":1}".to_vec());
        assert!(split_response(b"garbage").is_none());
    }

    #[test]
    fn a_response_is_complete_by_its_framing() {
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{"
        ));
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        ));
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n"
        ));
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        ));
        // No framing: read to the end.
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\n\r\n{}"));
        assert!(!is_complete(b"HTTP/1.1 200"));
    }
}
