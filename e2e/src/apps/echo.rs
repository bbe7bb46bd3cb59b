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

use super::{Downstream, EchoReply, SinkReceipt, TcpHello, grpc};

#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("nothing to serve: give at least one of --tcp, --tcp-hello, --http, --grpc, --sink")]
    NoPorts,
    #[error("--call {call:?}: {reason}")]
    BadCall { call: String, reason: String },
    #[error("--call needs an --http port to answer on")]
    CallWithoutHttp,
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
    /// A downstream service every HTTP request calls first, as
    /// `NAME=http://ip:port/path`; its answer is nested in the reply
    /// (repeatable, called in order).
    #[arg(long = "call", value_name = "NAME=URL")]
    pub calls: Vec<String>,
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
    /// `--call`s: name and URL.
    calls: Vec<(String, String)>,
    /// Requests seen per `x-echo-key` (see [`asked`]).
    seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Most `x-echo-key`s remembered; past it the counts start over (a sample
/// app must not grow without bound under a load with fresh keys).
const MAX_KEYS: usize = 10_000;
/// Longest `x-echo-delay-ms` honoured.
const MAX_DELAY_MS: u64 = 60_000;
/// How long one downstream call (`--call`) may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `--call NAME=URL` checked: a name and an `http://` URL with a host.
fn parse_call(call: &str) -> Result<(String, String), EchoError> {
    let bad = |reason: String| EchoError::BadCall {
        call: call.to_string(),
        reason,
    };
    let (name, url) = call
        .split_once('=')
        .ok_or_else(|| bad("is not NAME=URL".into()))?;
    if name.is_empty() {
        return Err(bad("the NAME is empty".into()));
    }
    let (addr, _) = super::client::split_url(url).map_err(bad)?;
    if addr.parse::<SocketAddr>().is_err() {
        return Err(bad(format!(
            "the host of {url:?} is not an IP address (pods have no resolver for names here; \
             the local cluster gives each pod $(<SERVICE>_SERVICE_HOST))"
        )));
    }
    Ok((name.to_string(), url.to_string()))
}

/// Binds every port, then serves until the process is stopped.
pub async fn serve(args: EchoArgs) -> Result<(), EchoError> {
    let calls = args
        .calls
        .iter()
        .map(|c| parse_call(c))
        .collect::<Result<Vec<_>, _>>()?;
    if !calls.is_empty() && args.http.is_empty() {
        return Err(EchoError::CallWithoutHttp);
    }
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
        calls,
        seen: Default::default(),
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
    let asked = match asked(&parts.headers, &me) {
        Ok(asked) => asked,
        Err(e) => {
            let response = Response::builder()
                .status(http::StatusCode::BAD_REQUEST)
                .body(Full::new(Bytes::from(format!("{e}\n"))))
                .expect("a static response is valid");
            return Ok(response);
        }
    };
    if let Some(delay) = asked.delay {
        tokio::time::sleep(delay).await;
    }
    let mut calls = Vec::with_capacity(me.calls.len());
    for (name, url) in &me.calls {
        calls.push(call(name, url).await);
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
        key_seen: asked.key_seen,
        calls,
    };
    let body = serde_json::to_vec(&reply).expect("EchoReply serializes");
    let response = Response::builder()
        .status(asked.status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a static response is valid");
    Ok(response)
}

/// One `GET` of a downstream (`--call`), as the reply records it.
async fn call(name: &str, url: &str) -> Downstream {
    let report = super::client::http_once(url, "GET", &[], 0, CALL_TIMEOUT).await;
    Downstream {
        name: name.to_string(),
        url: url.to_string(),
        status: report.status,
        reply: report.echo.map(Box::new),
        error: report.error,
    }
}

/// How the request's `x-echo-*` headers ask the echo to answer.
#[derive(Debug, PartialEq)]
struct Asked {
    status: http::StatusCode,
    delay: Option<std::time::Duration>,
    /// Requests with this request's `x-echo-key` seen so far, this one included.
    key_seen: Option<u64>,
}

/// Reads the `x-echo-*` headers (see [`crate::apps`]); counts the request
/// under its `x-echo-key`.
fn asked(headers: &http::HeaderMap, me: &Identity) -> Result<Asked, String> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| format!("{name} is not text")))
            .transpose()
    };
    let number = |name: &str| {
        text(name)?
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{name}: {v:?} is not a number"))
            })
            .transpose()
    };
    let key_seen = text("x-echo-key")?.map(|key| {
        let mut seen = me.seen.lock().expect("the key counts are never poisoned");
        if seen.len() >= MAX_KEYS && !seen.contains_key(key) {
            seen.clear();
        }
        let n = seen.entry(key.to_string()).or_default();
        *n += 1;
        *n
    });
    let delay = match number("x-echo-delay-ms")? {
        Some(ms) if ms > MAX_DELAY_MS => {
            return Err(format!("x-echo-delay-ms: at most {MAX_DELAY_MS}"));
        }
        ms => ms.map(std::time::Duration::from_millis),
    };
    let status = match number("x-echo-status")? {
        None => None,
        Some(code) => Some(
            u16::try_from(code)
                .ok()
                .and_then(|c| http::StatusCode::from_u16(c).ok())
                .filter(|c| c.as_u16() >= 200)
                .ok_or_else(|| format!("x-echo-status: {code} is not a final HTTP status"))?,
        ),
    };
    let on_this_pod =
        text("x-echo-status-on")?.is_none_or(|pods| pods.split(',').any(|p| p.trim() == me.pod));
    let first = match number("x-echo-fail-first")? {
        Some(_) if key_seen.is_none() => {
            return Err("x-echo-fail-first needs x-echo-key".into());
        }
        Some(n) => key_seen.is_some_and(|seen| seen <= n),
        None => true,
    };
    let status = status
        .filter(|_| on_this_pod && first)
        .unwrap_or(http::StatusCode::OK);
    Ok(Asked {
        status,
        delay,
        key_seen,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn me(pod: &str) -> Identity {
        Identity {
            pod: pod.into(),
            namespace: "test".into(),
            calls: Vec::new(),
            seen: Default::default(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (http::HeaderName::from_static(n), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn bad_calls_are_refused_with_the_call_named() {
        for (call, says) in [
            ("details", "is not NAME=URL"),
            ("=http://10.0.0.1:9080/", "the NAME is empty"),
            ("details=https://10.0.0.1/", "only http://"),
            (
                "details=http://$(DETAILS_SERVICE_HOST):9080/",
                "is not an IP address",
            ),
            ("details=http://details:9080/", "is not an IP address"),
        ] {
            let e = parse_call(call).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--call {call:?}: ")), "{e}");
            assert!(e.contains(says), "{e}");
        }
        assert_eq!(
            parse_call("details=http://10.0.0.1:9080/details/0").unwrap(),
            ("details".into(), "http://10.0.0.1:9080/details/0".into())
        );
    }

    /// A free loopback port (bound, then released for the server).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn args(pod: &str, http: u16, calls: &[String]) -> EchoArgs {
        let mut argv = vec![
            "echo".to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--pod".into(),
            pod.into(),
            "--http".into(),
            http.to_string(),
        ];
        for c in calls {
            argv.extend(["--call".to_string(), c.clone()]);
        }
        EchoArgs::parse_from(argv)
    }

    #[tokio::test]
    async fn calls_are_made_per_request_and_their_replies_nested() {
        let [leaf, middle, top, dead] = [free_port(), free_port(), free_port(), free_port()];
        tokio::spawn(serve(args("leaf", leaf, &[])));
        tokio::spawn(serve(args(
            "middle",
            middle,
            &[format!("leaf=http://127.0.0.1:{leaf}/leaf/0")],
        )));
        tokio::spawn(serve(args(
            "top",
            top,
            &[
                format!("middle=http://127.0.0.1:{middle}/middle/0"),
                format!("gone=http://127.0.0.1:{dead}/"),
            ],
        )));
        let url = format!("http://127.0.0.1:{top}/page");
        let mut report =
            super::super::client::http_once(&url, "GET", &[], 0, std::time::Duration::from_secs(5))
                .await;
        for _ in 0..100 {
            if report.ok {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            report = super::super::client::http_once(
                &url,
                "GET",
                &[],
                0,
                std::time::Duration::from_secs(5),
            )
            .await;
        }
        let reply = report.echo.expect("top answers with an EchoReply");
        assert_eq!(reply.pod, "top");
        assert_eq!(reply.path, "/page");
        let names: Vec<&str> = reply.calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["middle", "gone"]);
        let middle = reply.calls[0].reply.as_ref().expect("middle answered");
        assert_eq!(reply.calls[0].status, Some(200));
        assert_eq!(
            (middle.pod.as_str(), middle.path.as_str()),
            ("middle", "/middle/0")
        );
        let leaf = middle.calls[0].reply.as_ref().expect("leaf answered");
        assert_eq!((leaf.pod.as_str(), leaf.path.as_str()), ("leaf", "/leaf/0"));
        assert!(leaf.calls.is_empty());
        let gone = &reply.calls[1];
        assert_eq!((gone.status, gone.reply.is_none()), (None, true));
        assert!(
            gone.error.as_deref().is_some_and(|e| e.contains("connect")),
            "{gone:?}"
        );
    }

    #[tokio::test]
    async fn a_call_needs_an_http_port() {
        let mut a = args("x", free_port(), &["d=http://127.0.0.1:1/".into()]);
        a.http.clear();
        a.tcp.push(free_port());
        let e = serve(a).await.unwrap_err();
        assert!(matches!(e, EchoError::CallWithoutHttp), "{e}");
    }

    #[test]
    fn a_request_without_asks_is_answered_200() {
        let asked = asked(&http::HeaderMap::new(), &me("echo-0")).unwrap();
        assert_eq!(
            asked,
            Asked {
                status: http::StatusCode::OK,
                delay: None,
                key_seen: None
            }
        );
    }

    #[test]
    fn the_status_applies_on_the_named_pods_only() {
        let h = headers(&[
            ("x-echo-status", "500"),
            ("x-echo-status-on", "echo-v2, echo-v3"),
        ]);
        assert_eq!(asked(&h, &me("echo-v2")).unwrap().status, 500);
        assert_eq!(asked(&h, &me("echo-v1")).unwrap().status, 200);
        let h = headers(&[("x-echo-status", "418")]);
        assert_eq!(asked(&h, &me("echo-v1")).unwrap().status, 418);
    }

    #[test]
    fn fail_first_counts_per_key_on_this_pod() {
        let pod = me("echo-v1");
        let h = |key| {
            headers(&[
                ("x-echo-status", "503"),
                ("x-echo-fail-first", "2"),
                ("x-echo-key", key),
            ])
        };
        let answers: Vec<(u16, Option<u64>)> = ["a", "a", "b", "a", "b", "b"]
            .into_iter()
            .map(|k| asked(&h(k), &pod).unwrap())
            .map(|a| (a.status.as_u16(), a.key_seen))
            .collect();
        assert_eq!(
            answers,
            [
                (503, Some(1)),
                (503, Some(2)),
                (503, Some(1)),
                (200, Some(3)),
                (503, Some(2)),
                (200, Some(3))
            ]
        );
    }

    #[test]
    fn bad_asks_are_refused_with_the_header_named() {
        let pod = me("echo-0");
        for (h, says) in [
            (headers(&[("x-echo-status", "99")]), "x-echo-status"),
            (headers(&[("x-echo-status", "five")]), "x-echo-status"),
            (headers(&[("x-echo-delay-ms", "60001")]), "x-echo-delay-ms"),
            (headers(&[("x-echo-fail-first", "1")]), "x-echo-key"),
        ] {
            let e = asked(&h, &pod).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let h = headers(&[("x-echo-delay-ms", "250")]);
        assert_eq!(
            asked(&h, &pod).unwrap().delay,
            Some(std::time::Duration::from_millis(250))
        );
    }
}
