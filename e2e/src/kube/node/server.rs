//! The node's kubelet server: HTTPS on the node's fabric address, port
//! [`KUBELET_PORT`], listening in the node's network namespace, where the
//! API server sends what it proxies to a node (it finds the address and
//! port in the Node's status: InternalIP, `daemonEndpoints`).
//!
//! - TLS: a serving certificate for the node's name and address from the
//!   cluster CA; a client certificate signed by the cluster CA is required
//!   (the API server's `--kubelet-client-certificate`), anything else is
//!   refused in the handshake. There is no further authorization (a
//!   kubelet would ask SubjectAccessReview).
//! - `GET /healthz`: `ok`.
//! - `GET /portForward/{namespace}/{pod}[/{uid}]` with a WebSocket upgrade
//!   and subprotocol `v4.channel.k8s.io` (the only one answered): the ports
//!   come from the query, every `port` and `ports` parameter, each a port
//!   or a comma-separated list (the API server v1.36 forwards kube-rs's
//!   `ports=9000,9999` as `port=9000%2C9999`). Port `i` has data channel
//!   `2i` and error channel `2i+1`; every binary message starts with its
//!   channel byte. Right after the upgrade the server sends on each channel
//!   the channel byte and the port (u16, little-endian). The first data
//!   the client sends on channel `2i` makes the server connect (once) to
//!   the port as containerd does ([`connect_pod`]): loopback inside the
//!   pod's network namespace, else the pod's IP from the node's; bytes are
//!   then copied both ways. A failed connect (or a broken connection) is a
//!   text on the port's error channel. The WebSocket is closed once every
//!   port is done (its connection ended or failed; a port never written to
//!   keeps it open), or when the client closes it.
//! - No WebSocket upgrade or no `v4` subprotocol: 400 (checked first);
//!   bad ports: 400 naming the parameter; unknown pod, or one without an
//!   address: 404 naming it; other paths: 404. SPDY is not served:
//!   `kubectl port-forward` v1.36 tunnels SPDY over a WebSocket to the API
//!   server, which then asks the kubelet for an `Upgrade: SPDY/3.1` (ports
//!   in stream headers, none in the query), and gets that 400.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::netns::NetNs;

/// The kubelet's port (kubelet's `--port` default).
pub const KUBELET_PORT: u16 = 10250;
/// The WebSocket subprotocol served: binary channels, one byte of channel
/// number first.
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
/// The most ports one request may forward: channel numbers are one byte.
pub const MAX_PORTS: usize = 128;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connect to a pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read from a pod's connection into one message.
const READ_CHUNK: usize = 32 * 1024;

/// The server's certificate, key and the CA its clients' certificates
/// must chain to (PEM).
#[derive(Clone, Debug)]
pub struct KubeletTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

/// Where a pod's ports are reached.
#[derive(Clone, Debug)]
pub struct PodTarget {
    /// The pod's address (the node's for `hostNetwork`).
    pub ip: Ipv4Addr,
    /// The pod's own network namespace; `None`: the caller's (the node's,
    /// for a `hostNetwork` pod).
    pub netns: Option<NetNs>,
}

/// Where a pod's ports are reached, asked per request: `(namespace, name,
/// uid if the path named one)` to the pod's target, or the 404's message.
pub type PodLookup =
    Arc<dyn Fn(&str, &str, Option<&str>) -> Result<PodTarget, String> + Send + Sync>;

/// The TLS configuration: `tls`'s certificate, client certificates
/// required and verified against `tls.client_ca_pem`.
pub fn tls_config(tls: &KubeletTls) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the serving certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| format!("the serving key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(tls.client_ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| format!("the client CA: {e}"))?;
        roots.add(ca).map_err(|e| format!("the client CA: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("the client certificate verifier: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("the serving certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves `listener` until the task is dropped: each connection on a task
/// of its own; a client that fails the handshake or sends garbage loses
/// only its connection.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    pods: PodLookup,
    node: String,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait, do not spin.
                tracing::warn!(%node, "kubelet server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let pods = pods.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%node, %peer, "kubelet server: TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%node, %peer, "kubelet server: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let pods = pods.clone();
                let node = node.clone();
                async move { Ok::<_, Infallible>(handle(req, &pods, &node)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, "kubelet server: connection: {e}");
            }
        });
    }
}

/// What a request path asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    PortForward {
        namespace: &'a str,
        pod: &'a str,
        uid: Option<&'a str>,
    },
    NotFound,
}

/// Routes a path.
pub fn route(path: &str) -> Route<'_> {
    if path == "/healthz" {
        return Route::Healthz;
    }
    let Some(rest) = path.strip_prefix("/portForward/") else {
        return Route::NotFound;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [namespace, pod] | [namespace, pod, ""] if !namespace.is_empty() && !pod.is_empty() => {
            Route::PortForward {
                namespace,
                pod,
                uid: None,
            }
        }
        [namespace, pod, uid] if !namespace.is_empty() && !pod.is_empty() => Route::PortForward {
            namespace,
            pod,
            uid: Some(uid),
        },
        _ => Route::NotFound,
    }
}

/// The ports of a query: every `port` and `ports` value, each a port or a
/// comma-separated list (`port=9000%2C9999` is what the API server sends
/// for kube-rs's `ports=9000,9999`), in order,
/// each once; an error (naming the parameter) for anything not a port
/// from 1 to 65535, for none at all, or for more than [`MAX_PORTS`].
pub fn parse_ports(query: Option<&str>) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key);
        if key != "port" && key != "ports" {
            continue;
        }
        let value = percent_decode(value);
        for item in value.split(',') {
            let port = item
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    format!(
                        "invalid port {item:?} in query parameter {key:?}: a port is 1 to 65535"
                    )
                })?;
            if seen.insert(port) {
                ports.push(port);
            }
        }
    }
    if ports.is_empty() {
        return Err(
            "no port to forward: query parameter \"port\" (or \"ports\") is required".into(),
        );
    }
    if ports.len() > MAX_PORTS {
        return Err(format!(
            "{} ports in query parameter \"port\": at most {MAX_PORTS}",
            ports.len()
        ));
    }
    Ok(ports)
}

/// `%XX` decoded (and `+` as a space), invalid escapes kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first message on each of a port's two channels: the channel and
/// the port, little-endian.
pub fn port_frame(channel: u8, port: u16) -> [u8; 3] {
    let [lo, hi] = port.to_le_bytes();
    [channel, lo, hi]
}

/// A message on `channel`: its number, then `data`.
pub fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// A message's channel and payload (`None`: an empty message).
pub fn split_frame(message: &[u8]) -> Option<(u8, &[u8])> {
    message.split_first().map(|(c, rest)| (*c, rest))
}

/// Whether the client offers the v4 binary channel protocol (in any of its
/// comma-separated `Sec-WebSocket-Protocol` values).
pub fn offers_channel_protocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == CHANNEL_PROTOCOL)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body + "\n")))
        .expect("a valid response")
}

fn handle(req: Request<Incoming>, pods: &PodLookup, node: &str) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match route(&path) {
        Route::Healthz => text(StatusCode::OK, "ok".into()),
        Route::NotFound => text(
            StatusCode::NOT_FOUND,
            format!("{path}: not served by the e2e node runtime's kubelet server"),
        ),
        Route::PortForward {
            namespace,
            pod,
            uid,
        } => {
            tracing::info!(%node, uri = %req.uri(), "kubelet server: port-forward request");
            port_forward(req, pods, node, namespace, pod, uid)
        }
    }
}

fn port_forward(
    mut req: Request<Incoming>,
    pods: &PodLookup,
    node: &str,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let (true, Some(key)) = (upgrade, key) else {
        return text(
            StatusCode::BAD_REQUEST,
            "port-forward needs a WebSocket upgrade (subprotocol v4.channel.k8s.io); SPDY is not served".into(),
        );
    };
    if !offers_channel_protocol(headers) {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "port-forward speaks WebSocket subprotocol {CHANNEL_PROTOCOL} only; the client offered none of it"
            ),
        );
    }
    let ports = match parse_ports(req.uri().query()) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let pod_target = match pods(namespace, pod, uid) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::NOT_FOUND, e),
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let target = format!("pod {namespace}/{pod} ({}) on node {node}", pod_target.ip);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                forward(ws, &ports, &pod_target, &target).await;
            }
            Err(e) => tracing::info!("port-forward to {target}: the upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, CHANNEL_PROTOCOL)
        .body(Full::new(Bytes::new()))
        .expect("a valid response")
}

/// A port's connection to the pod.
enum PortState {
    /// Nothing sent on its data channel yet.
    Idle,
    Open(tokio::net::tcp::OwnedWriteHalf),
    /// Its connection ended or failed.
    Done,
}

/// What a port's reader tells the forwarder.
enum FromPod {
    Data(usize, Bytes),
    Ended(usize),
    Failed(usize, String),
}

/// Connects to a pod's `port` as containerd's CRI plugin does
/// (`internal/cri/server/sandbox_portforward_linux.go`): loopback inside
/// the pod's network namespace (127.0.0.1, then ::1), so a port bound to
/// the pod's loopback only (ztunnel's admin) is reached; failing that, the
/// pod's address from the caller's namespace (the node's). The error names
/// every attempt.
pub async fn connect_pod(target: &PodTarget, port: u16) -> Result<TcpStream, String> {
    let loopback: [SocketAddr; 2] = [
        (Ipv4Addr::LOCALHOST, port).into(),
        (std::net::Ipv6Addr::LOCALHOST, port).into(),
    ];
    let mut errors = Vec::new();
    for addr in loopback {
        let attempt = match &target.netns {
            Some(netns) => {
                // A socket stays in the namespace it was made in: make it on
                // a thread of its own inside the pod's namespace (never a
                // runtime thread, which must stay in the node's).
                let netns = netns.clone();
                let made = tokio::task::spawn_blocking(move || {
                    netns.run(|| std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
                })
                .await;
                match made {
                    Ok(Ok(Ok(conn))) => conn
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(conn))
                        .map_err(|e| e.to_string()),
                    Ok(Ok(Err(e))) => Err(e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            None => match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            },
        };
        match attempt {
            Ok(conn) => return Ok(conn),
            Err(e) => errors.push(format!("{addr} in the pod's network namespace: {e}")),
        }
    }
    let addr = SocketAddr::from((target.ip, port));
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(conn)) => return Ok(conn),
        Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
        Err(_) => errors.push(format!("{addr}: no answer within {CONNECT_TIMEOUT:?}")),
    }
    Err(format!("connect {}", errors.join("; ")))
}

/// Runs one port-forward WebSocket to its end (see the module's text).
pub async fn forward<S>(ws: WebSocketStream<S>, ports: &[u16], pod: &PodTarget, target: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        for channel in [2 * i as u8, 2 * i as u8 + 1] {
            let first = Message::binary(port_frame(channel, *port).to_vec());
            if sink.send(first).await.is_err() {
                return;
            }
        }
    }
    let (tx, mut rx) = mpsc::channel::<FromPod>(16);
    let mut states: Vec<PortState> = ports.iter().map(|_| PortState::Idle).collect();
    let mut readers = Vec::new();
    let error = |i: usize, message: String| {
        let channel = 2 * i as u8 + 1;
        Message::binary(frame(channel, message.as_bytes()))
    };
    loop {
        tokio::select! {
            message = stream.next() => {
                let data = match message {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::debug!("port-forward to {target}: {e}");
                        break;
                    }
                    // Text, ping (answered by the stream), pong.
                    Some(Ok(_)) => continue,
                };
                let Some((channel, payload)) = split_frame(&data) else {
                    continue;
                };
                let i = usize::from(channel / 2);
                let Some(&port) = ports.get(i) else {
                    let _ = sink
                        .send(Message::text(format!("no channel {channel}: {} port(s) forwarded", ports.len())))
                        .await;
                    break;
                };
                if channel % 2 == 1 || payload.is_empty() {
                    // The client's error channel carries nothing for us.
                    continue;
                }
                if matches!(states[i], PortState::Idle) {
                    match connect_pod(pod, port).await {
                        Ok(conn) => {
                            let (read, write) = conn.into_split();
                            readers.push(tokio::spawn(read_pod(i, read, tx.clone())));
                            states[i] = PortState::Open(write);
                        }
                        Err(e) => {
                            let _ = sink.send(error(i, format!("error forwarding port {port} to {target}: {e}"))).await;
                            states[i] = PortState::Done;
                        }
                    }
                }
                if let PortState::Open(write) = &mut states[i]
                    && let Err(e) = write.write_all(payload).await
                {
                    let _ = sink.send(error(i, format!("error forwarding port {port} to {target}: write: {e}"))).await;
                    states[i] = PortState::Done;
                }
            }
            Some(from_pod) = rx.recv() => {
                let sent = match from_pod {
                    FromPod::Data(i, data) => sink.send(Message::binary(frame(2 * i as u8, &data))).await,
                    FromPod::Ended(i) => {
                        states[i] = PortState::Done;
                        Ok(())
                    }
                    FromPod::Failed(i, e) => {
                        states[i] = PortState::Done;
                        sink.send(error(i, format!("error forwarding port {} to {target}: read: {e}", ports[i]))).await
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
        }
        // Every port used and none still open: nothing more can happen.
        if states.iter().all(|s| matches!(s, PortState::Done)) {
            break;
        }
    }
    for reader in readers {
        reader.abort();
    }
    let _ = sink.close().await;
}

/// Copies a pod connection's bytes to the forwarder until it ends.
async fn read_pod(i: usize, mut read: tokio::net::tcp::OwnedReadHalf, tx: mpsc::Sender<FromPod>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let event = match read.read(&mut buf).await {
            Ok(0) => FromPod::Ended(i),
            Ok(n) => FromPod::Data(i, Bytes::copy_from_slice(&buf[..n])),
            Err(e) => FromPod::Failed(i, e.to_string()),
        };
        let last = !matches!(event, FromPod::Data(..));
        if tx.send(event).await.is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(
            route("/portForward/demo/echo-1"),
            Route::PortForward {
                namespace: "demo",
                pod: "echo-1",
                uid: None
            }
        );
        assert_eq!(
            route("/portForward/demo/echo-1/1234-abcd"),
            Route::PortForward {
                namespace: "demo",
                pod: "echo-1",
                uid: Some("1234-abcd")
            }
        );
        for bad in [
            "/portForward/demo",
            "/portForward//x",
            "/portForward/a/b/c/d",
            "/exec/demo/x/c",
            "/",
        ] {
            assert_eq!(route(bad), Route::NotFound, "{bad}");
        }
    }

    #[test]
    fn ports_come_from_port_and_ports() {
        assert_eq!(parse_ports(Some("port=80&port=1234")).unwrap(), [80, 1234]);
        assert_eq!(parse_ports(Some("ports=80%2C1234")).unwrap(), [80, 1234]);
        // What kube-apiserver v1.36 forwards for kube-rs's `ports=9000,9999`.
        assert_eq!(parse_ports(Some("port=9000%2C9999")).unwrap(), [9000, 9999]);
        assert_eq!(
            parse_ports(Some("ports=80,1234&port=80")).unwrap(),
            [80, 1234]
        );
        assert_eq!(parse_ports(Some("x=1&port=9000")).unwrap(), [9000]);
        let none = parse_ports(None).unwrap_err();
        assert!(none.contains("\"port\""), "{none}");
        for (query, name) in [
            ("port=0", "\"port\""),
            ("port=65536", "\"port\""),
            ("ports=80%2Cx", "\"ports\""),
            ("port=", "\"port\""),
        ] {
            let e = parse_ports(Some(query)).unwrap_err();
            assert!(e.contains(name), "{query}: {e}");
        }
        let many: Vec<String> = (1..=129).map(|p| format!("port={p}")).collect();
        assert!(parse_ports(Some(&many.join("&"))).is_err());
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2Cb"), "a,b");
        assert_eq!(percent_decode("a%2cb+c"), "a,b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn frames_carry_their_channel_first() {
        assert_eq!(port_frame(0, 9000), [0, 0x28, 0x23]);
        assert_eq!(port_frame(3, 80), [3, 80, 0]);
        assert_eq!(frame(2, b"hi"), [2, b'h', b'i']);
        assert_eq!(split_frame(&[4, 1, 2]), Some((4, &[1u8, 2][..])));
        assert_eq!(split_frame(&[5]), Some((5, &[][..])));
        assert_eq!(split_frame(&[]), None);
    }

    #[test]
    fn only_the_v4_channel_protocol_is_answered() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "v5.channel.k8s.io, v4.channel.k8s.io".parse().unwrap(),
        );
        assert!(offers_channel_protocol(&h));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "SPDY/3.1+portforward.k8s.io".parse().unwrap(),
        );
        assert!(!offers_channel_protocol(&h));
    }

    /// The server end to end on loopback, without root: TLS with client
    /// certificates, the WebSocket handshake, the port frames, data both
    /// ways, a refused connect on the error channel, 404 and 400.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_over_a_websocket_with_client_certificates() {
        use crate::kube::pki::{APISERVER_KUBELET_CLIENT, ClientIdentity, Pki};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;

        /// What kube-rs 4.2 offers.
        const KUBE_RS: &str = "v5.channel.k8s.io, v4.channel.k8s.io";
        let dir = tempfile::tempdir().unwrap();
        let localhost = std::net::IpAddr::V4(Ipv4Addr::LOCALHOST);
        let pki = Pki::create(&dir.path().join("pki"), &[], &[localhost]).unwrap();
        let (cert_pem, key_pem) = pki
            .serving_cert(
                "system:node:test",
                &["system:nodes"],
                &["test".into()],
                &[localhost],
            )
            .unwrap();
        let tls = tls_config(&KubeletTls {
            cert_pem,
            key_pem,
            client_ca_pem: pki.ca_pem().into(),
        })
        .unwrap();

        // A TCP echo "pod" and a port nobody listens on.
        let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let closed_port = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pods: PodLookup = Arc::new(|ns, pod, _uid| {
            if (ns, pod) == ("demo", "echo") {
                Ok(PodTarget {
                    ip: Ipv4Addr::LOCALHOST,
                    netns: None,
                })
            } else {
                Err(format!("pod {ns}/{pod} is not running on node test"))
            }
        });
        tokio::spawn(serve(listener, tls, pods, "test".into()));

        let pki_ca = pki.ca_pem().to_string();
        let connect = |pki: &Pki, path: String, protocol: &'static str| {
            let (cert, key) = pki
                .client_cert(&ClientIdentity::new(APISERVER_KUBELET_CLIENT, &[]))
                .unwrap();
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(pki_ca.as_bytes()).unwrap())
                .unwrap();
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap();
            let mut request = format!("wss://{addr}{path}").into_client_request().unwrap();
            request
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.parse().unwrap());
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(localhost.into(), tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio_tungstenite::client_async(request, tls)
                    .await
                    .map_err(|e| match e {
                        tokio_tungstenite::tungstenite::Error::Http(r) => format!(
                            "{} {}",
                            r.status(),
                            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
                        ),
                        e => e.to_string(),
                    })
            }
        };
        let (mut ws, response) = connect(
            &pki,
            format!("/portForward/demo/echo?port={echo_port}&port={closed_port}"),
            KUBE_RS,
        )
        .await
        .unwrap();
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_PROTOCOL],
            CHANNEL_PROTOCOL
        );
        let mut first = Vec::new();
        for _ in 0..4 {
            first.push(ws.next().await.unwrap().unwrap().into_data().to_vec());
        }
        assert_eq!(
            first,
            [
                port_frame(0, echo_port).to_vec(),
                port_frame(1, echo_port).to_vec(),
                port_frame(2, closed_port).to_vec(),
                port_frame(3, closed_port).to_vec(),
            ]
        );
        ws.send(Message::binary(frame(0, b"hello"))).await.unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < 5 {
            let m = ws.next().await.unwrap().unwrap().into_data();
            let (channel, data) = split_frame(&m).unwrap();
            assert_eq!(channel, 0);
            echoed.extend_from_slice(data);
        }
        assert_eq!(echoed, b"hello");
        ws.send(Message::binary(frame(2, b"x"))).await.unwrap();
        let m = ws.next().await.unwrap().unwrap().into_data();
        let (channel, text) = split_frame(&m).unwrap();
        assert_eq!(channel, 3);
        let text = String::from_utf8_lossy(text);
        assert!(
            text.contains(&closed_port.to_string()) && text.contains("demo/echo"),
            "{text}"
        );
        ws.close(None).await.unwrap();

        let e = connect(&pki, "/portForward/demo/nope?port=80".into(), KUBE_RS)
            .await
            .unwrap_err();
        assert!(e.starts_with("404") && e.contains("demo/nope"), "{e}");
        let e = connect(&pki, "/portForward/demo/echo?port=http".into(), KUBE_RS)
            .await
            .unwrap_err();
        assert!(e.starts_with("400") && e.contains("\"port\""), "{e}");
        let e = connect(
            &pki,
            "/portForward/demo/echo?port=80".into(),
            "SPDY/3.1+portforward.k8s.io",
        )
        .await
        .unwrap_err();
        assert!(e.starts_with("400") && e.contains(CHANNEL_PROTOCOL), "{e}");

        // A client certificate from another CA: refused, and the server
        // still serves.
        let other = Pki::create(&dir.path().join("other"), &[], &[localhost]).unwrap();
        let (cert, key) = other
            .client_cert(&ClientIdentity::new(APISERVER_KUBELET_CLIENT, &[]))
            .unwrap();
        let stranger = {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(pki_ca.as_bytes()).unwrap())
                .unwrap();
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap()
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let refused = match tokio_rustls::TlsConnector::from(Arc::new(stranger))
            .connect(localhost.into(), tcp)
            .await
        {
            Err(_) => true,
            Ok(tls) => {
                let request = format!("wss://{addr}/healthz")
                    .into_client_request()
                    .unwrap();
                tokio_tungstenite::client_async(request, tls).await.is_err()
            }
        };
        assert!(refused, "a client certificate from another CA is refused");
        // Plain-text garbage where TLS is expected, then a good request
        // still works.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        let (mut ws, _) = connect(
            &pki,
            format!("/portForward/demo/echo/some-uid?ports={echo_port}"),
            KUBE_RS,
        )
        .await
        .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap().into_data().to_vec(),
            port_frame(0, echo_port)
        );
        ws.close(None).await.unwrap();
    }
}
