//! A minimal HTTP/1 GET client for istiod's monitoring port, and reading
//! one sample out of `/metrics`.
//!
//! Included with `#[path]` as `mod http_client` by the tests and benches
//! that talk to port 15014.

#![allow(dead_code)]

use std::net::SocketAddr;

use http_body_util::BodyExt;

/// The value of `sample` (`name{labels}` as printed) in a `/metrics` text,
/// 0 when absent.
pub fn metric_sample(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// `GET path`: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (http::StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}
