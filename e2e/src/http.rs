//! Plain HTTP/1.1 GETs to the components' loopback ports (admin, metrics,
//! readiness, istiod's monitoring port), made from inside the namespace the
//! component runs in: those ports are not reachable from anywhere else; and
//! kubelet's HTTP readiness probes, made from a pod's node.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::cluster::HttpResponse;
use crate::netns::{NetNs, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("GET http://{address}{path} in network namespace {netns}: {reason}")]
    Get {
        netns: String,
        address: SocketAddr,
        path: String,
        reason: String,
    },
}

/// GET `path` on `127.0.0.1:port` inside `netns`, answered within `timeout`.
pub fn get(
    netns: &NetNs,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    get_at(
        netns,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        path,
        timeout,
    )
}

/// GET `path` on `address`, connecting from inside `netns`, answered within
/// `timeout`.
pub fn get_at(
    netns: &NetNs,
    address: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let owned = path.to_string();
    netns
        .block_on(move || async move {
            tokio::time::timeout(timeout, get_async(address, &owned))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
        })?
        .map_err(|reason| HttpError::Get {
            netns: netns.name().to_string(),
            address,
            path: path.to_string(),
            reason,
        })
}

/// A minimal HTTP/1.1 GET (hyper handles chunked bodies and the like).
async fn get_async(address: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, address.to_string())
        .body(Empty::new())
        .map_err(|e| format!("bad path {path:?}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
