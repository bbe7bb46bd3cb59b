//! The `echo` server: TCP echo, TCP echo with a hello line, HTTP/1.1 that
//! answers with what it saw, gRPC (h2c) unary echo, and a sink for bulk
//! transfers. See [`crate::apps`] for the wire formats.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Either, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{EchoReply, SinkReceipt, TcpHello, grpc};

#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("nothing to serve: give at least one of --tcp, --tcp-hello, --http, --grpc, --sink")]
    NoPorts,
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Command line of `echo`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "echo",
    about = "Sample server: TCP echo, HTTP echo (replies with what it saw), sink"
)]
pub struct EchoArgs {
    /// TCP port that echoes bytes back (repeatable).
    #[arg(long, value_name = "PORT")]
    pub tcp: Vec<u16>,
    /// TCP port that first sends one JSON line (peer, pod) and then echoes (repeatable).
    #[arg(long, value_name = "PORT")]
    pub tcp_hello: Vec<u16>,
    /// HTTP/1.1 port answering every request with a JSON description of it (repeatable).
    #[arg(long, value_name = "PORT")]
    pub http: Vec<u16>,
    /// gRPC port (h2c): the unary method `/e2e.Echo/Echo` answers the request's message (repeatable).
    #[arg(long, value_name = "PORT")]
    pub grpc: Vec<u16>,
    /// TCP port that swallows a stream and, at its end, reports the byte count (repeatable).
    #[arg(long, value_name = "PORT")]
    pub sink: Vec<u16>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// This pod's name, reported in replies.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod: String,
    /// This pod's namespace, reported in replies.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub namespace: String,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Tcp,
    TcpHello,
    Http,
    Grpc,
    Sink,
}

struct Identity {
    pod: String,
    namespace: String,
}

/// Binds every port, then serves until the process is stopped.
pub async fn serve(args: EchoArgs) -> Result<(), EchoError> {
    let ports = args
        .tcp
        .iter()
        .map(|p| (Mode::Tcp, *p))
        .chain(args.tcp_hello.iter().map(|p| (Mode::TcpHello, *p)))
        .chain(args.http.iter().map(|p| (Mode::Http, *p)))
        .chain(args.grpc.iter().map(|p| (Mode::Grpc, *p)))
        .chain(args.sink.iter().map(|p| (Mode::Sink, *p)));
    // Bind everything before serving anything: a bad port fails the start.
    let mut listeners = Vec::new();
    for (mode, port) in ports {
        let addr = SocketAddr::new(args.bind, port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| EchoError::Bind { addr, source })?;
        tracing::info!(%addr, ?mode, pod = %args.pod, "echo listening");
        listeners.push((mode, listener));
    }
    if listeners.is_empty() {
        return Err(EchoError::NoPorts);
    }
    let me = Arc::new(Identity {
        pod: args.pod,
        namespace: args.namespace,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (mode, listener) in listeners {
        tasks.spawn(accept_loop(mode, listener, me.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(mode: Mode, listener: TcpListener, me: Arc<Identity>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let me = me.clone();
        tokio::spawn(async move {
            let result = match mode {
                Mode::Tcp => echo(stream).await,
                Mode::TcpHello => hello_then_echo(stream, peer, &me).await,
                Mode::Sink => sink(stream).await,
                Mode::Http => http(stream, peer, me).await,
                Mode::Grpc => grpc(stream, me).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

async fn hello_then_echo(
    mut stream: TcpStream,
    peer: SocketAddr,
    me: &Identity,
) -> std::io::Result<()> {
    let hello = TcpHello {
        pod: me.pod.clone(),
        namespace: me.namespace.clone(),
        peer: peer.to_string(),
        local: stream.local_addr()?.to_string(),
    };
    let mut line = serde_json::to_vec(&hello).expect("TcpHello serializes");
    line.push(b'\n');
    stream.write_all(&line).await?;
    echo(stream).await
}

async fn sink(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    let mut line = serde_json::to_vec(&SinkReceipt { bytes }).expect("SinkReceipt serializes");
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.shutdown().await
}

async fn http(stream: TcpStream, peer: SocketAddr, me: Arc<Identity>) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let service = hyper::service::service_fn(move |req| describe(req, peer, local, me.clone()));
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(std::io::Error::other)
}

async fn describe(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    me: Arc<Identity>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body_bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes().len() as u64,
        Err(_) => 0,
    };
    let mut headers = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let reply = EchoReply {
        pod: me.pod.clone(),
        namespace: me.namespace.clone(),
        peer: peer.to_string(),
        local: local.to_string(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        version: format!("{:?}", parts.version),
        headers,
        body_bytes,
    };
    let body = serde_json::to_vec(&reply).expect("EchoReply serializes");
    let response = Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a static response is valid");
    Ok(response)
}

async fn grpc(stream: TcpStream, me: Arc<Identity>) -> std::io::Result<()> {
    let service = hyper::service::service_fn(move |req| grpc_call(req, me.clone()));
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(std::io::Error::other)
}

/// A gRPC response body: empty for a trailers-only answer, else one
/// message and the trailers.
type GrpcBody = Either<
    Full<Bytes>,
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
>;

/// Answers one call of [`grpc::ECHO_METHOD`] with the request's message, or
/// with the status the caller asked for in [`grpc::STATUS_METADATA`].
async fn grpc_call(
    req: Request<Incoming>,
    me: Arc<Identity>,
) -> Result<Response<GrpcBody>, Infallible> {
    let pod = me.pod.as_str();
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(grpc::CONTENT_TYPE));
    if req.method() != http::Method::POST || !is_grpc {
        // Not gRPC at all: an HTTP error, as the protocol says.
        let response = Response::builder()
            .status(http::StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .header(grpc::POD_HEADER, pod)
            .body(Either::Left(Full::new(Bytes::from_static(
                b"gRPC only: POST with content-type application/grpc\n",
            ))))
            .expect("a static response is valid");
        return Ok(response);
    }
    if req.uri().path() != grpc::ECHO_METHOD {
        let message = format!("unknown method {}", req.uri().path());
        return Ok(trailers_only(pod, grpc::UNIMPLEMENTED, &message));
    }
    let asked = req
        .headers()
        .get(grpc::STATUS_METADATA)
        .map(|v| v.to_str().ok().and_then(|v| v.parse::<u32>().ok()));
    let body = match Limited::new(req.into_body(), grpc::MAX_MESSAGE + 5)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(trailers_only(
                pod,
                grpc::INTERNAL,
                &format!("request body: {e}"),
            ));
        }
    };
    let message = match grpc::unframe(&body) {
        Ok(message) => message,
        Err(e) => return Ok(trailers_only(pod, grpc::INTERNAL, &e)),
    };
    match asked {
        None | Some(Some(grpc::OK)) => {}
        Some(Some(code @ 1..=16)) => {
            let text = format!("asked for by {}", grpc::STATUS_METADATA);
            return Ok(trailers_only(pod, code, &text));
        }
        Some(_) => {
            let text = format!(
                "{} must be a gRPC status code, 0 to 16",
                grpc::STATUS_METADATA
            );
            return Ok(trailers_only(pod, grpc::INVALID_ARGUMENT, &text));
        }
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(grpc::OK));
    let frames = vec![
        Ok(Frame::data(grpc::frame(&message))),
        Ok(Frame::trailers(trailers)),
    ];
    let response = grpc_response(pod)
        .body(Either::Right(StreamBody::new(futures::stream::iter(
            frames,
        ))))
        .expect("a static response is valid");
    Ok(response)
}

fn grpc_response(pod: &str) -> http::response::Builder {
    Response::builder()
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .header(grpc::POD_HEADER, pod)
}

/// A trailers-only response: the status in the headers, no body.
fn trailers_only(pod: &str, status: u32, message: &str) -> Response<GrpcBody> {
    // grpc-message is percent-encoded; ours are ASCII without `%`.
    let message: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .filter(|c| *c != '%')
        .collect();
    grpc_response(pod)
        .header("grpc-status", status)
        .header("grpc-message", message)
        .body(Either::Left(Full::new(Bytes::new())))
        .expect("a status and ASCII message are valid headers")
}
