//! The `client` app: one-shot TCP, HTTP and gRPC exchanges, fixed-rate load over
//! long-lived connections, single-stream bulk throughput, and new-connection
//! rate. Each mode prints one JSON report (see [`crate::apps`]).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{
    BulkReport, ConnectProbeReport, ConnectRateReport, EchoReply, GrpcReport, HoldReport,
    HttpReport, LoadReport, Outage, SinkReceipt, SlowAttempt, TallyReport, TcpHello, TcpReport,
    distribution, grpc, summarize,
};

mod dns;

/// Command line of `client`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "client",
    about = "Sample client: one-shot TCP/HTTP/gRPC, load, bulk, connect rate; prints JSON"
)]
pub struct ClientArgs {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Mode {
    /// One TCP connection: send a payload, half-close, read the echo.
    Tcp {
        /// `host:port`.
        target: String,
        /// Send this many bytes (a repeating pattern).
        #[arg(long, conflicts_with = "message")]
        payload: Option<usize>,
        /// Send this text.
        #[arg(long)]
        message: Option<String>,
        /// Read the server's hello line first (`echo --tcp-hello`).
        #[arg(long)]
        hello: bool,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// One HTTP/1.1 request.
    Http {
        /// `http://host:port/path`.
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name:value` (repeatable).
        #[arg(long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// Send a body of this many bytes.
        #[arg(long, default_value_t = 0)]
        body_size: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Many HTTP/1.1 requests one after another on a kept-alive
    /// connection, counted by status and answering pod.
    Tally {
        /// `http://host:port/path`.
        url: String,
        #[arg(long, default_value_t = 100)]
        count: u64,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name:value` (repeatable).
        #[arg(long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// How long one request may take.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// One unary gRPC call over h2c.
    Grpc {
        /// `http://host:port[/service/method]` (default method `/e2e.Echo/Echo`).
        url: String,
        /// Request metadata `name:value` (repeatable).
        #[arg(long = "metadata", value_name = "NAME:VALUE")]
        metadata: Vec<String>,
        /// Size of the request message (a repeating pattern).
        #[arg(long, default_value_t = 16)]
        payload: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// One DNS query over UDP (as an application's resolver sends it, so a
    /// pod's DNS capture takes it), optionally followed by a TCP exchange
    /// with the first address of the answer: a name in, a connection out.
    Dns {
        /// The name to resolve (as the application would write it, e.g.
        /// a Service's short name).
        name: String,
        /// Where the query is sent, `ip[:port]` (port 53), the name as
        /// written. Without it, as a stub resolver: to the first nameserver
        /// of --resolv-conf, for each name of its search list (and `ndots`)
        /// until one has an address.
        #[arg(long)]
        server: Option<String>,
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: std::path::PathBuf,
        /// `A` or `AAAA`.
        #[arg(long, default_value = "A")]
        record_type: String,
        /// Run a stand-in upstream resolver on this `ip:port` while the
        /// query is out (the pod's own loopback): it answers `--upstream-record`
        /// names and NXDOMAIN otherwise, and reports what it was asked.
        #[arg(long)]
        upstream: Option<SocketAddr>,
        /// `name=ipv4` the stand-in resolver answers (repeatable).
        #[arg(long = "upstream-record", value_name = "NAME=IP")]
        upstream_records: Vec<String>,
        /// Then connect to the first address on this port and read the
        /// server's hello (`echo --tcp-hello`); the stand-in resolver
        /// still answers meanwhile (ztunnel-rs may look up the endpoint).
        #[arg(long)]
        connect_port: Option<u16>,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// A stand-in DNS server until killed: UDP on `--listen`, answering
    /// `--record` names (A) and NXDOMAIN to everything else.
    DnsServer {
        #[arg(long)]
        listen: SocketAddr,
        /// `name=ipv4` (repeatable).
        #[arg(long = "record", value_name = "NAME=IP")]
        records: Vec<String>,
    },
    /// Requests at a fixed total rate over long-lived connections.
    Load(LoadPlan),
    /// One stream to an `echo --sink` port, as fast as it goes.
    Bulk {
        target: String,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Write size.
        #[arg(long, default_value_t = 256 * 1024)]
        chunk: usize,
    },
    /// One long-lived connection to an echo port, a small round trip every
    /// interval, until it breaks or the duration is over.
    Hold {
        target: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "20ms", value_parser = parse_duration)]
        interval: Duration,
        #[arg(long, default_value_t = 16)]
        payload: usize,
    },
    /// New connections as fast as they complete, each with one small echo round trip.
    ConnectRate {
        target: String,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: u32,
        #[arg(long, default_value_t = 16)]
        payload: usize,
    },
    /// A new connection with one small echo round trip every interval, one
    /// at a time; reports every run of failures (when new connections
    /// could not be made, and when they came back).
    ConnectProbe {
        target: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "25ms", value_parser = parse_duration)]
        interval: Duration,
        /// How long one attempt (connect and round trip) may take.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        #[arg(long, default_value_t = 16)]
        payload: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Tcp,
    Http,
    Grpc,
}

/// Runs the mode and returns its report as JSON, and whether it succeeded
/// (every report has an `ok` field).
pub async fn run(args: ClientArgs) -> (serde_json::Value, bool) {
    fn json<T: serde::Serialize>(report: T) -> serde_json::Value {
        serde_json::to_value(report).expect("reports serialize")
    }
    let report = match args.mode {
        Mode::Tcp {
            target,
            payload,
            message,
            hello,
            timeout,
        } => {
            let data = match (payload, message) {
                (_, Some(m)) => m.into_bytes(),
                (Some(n), None) => pattern(n),
                (None, None) => b"hello from client\n".to_vec(),
            };
            json(tcp_once(&target, &data, hello, timeout).await)
        }
        Mode::Http {
            url,
            method,
            headers,
            body_size,
            timeout,
        } => json(http_once(&url, &method, &headers, body_size, timeout).await),
        Mode::Tally {
            url,
            count,
            method,
            headers,
            timeout,
        } => json(tally(&url, count, &method, &headers, timeout).await),
        Mode::Grpc {
            url,
            metadata,
            payload,
            timeout,
        } => json(grpc_once(&url, &metadata, payload, timeout).await),
        Mode::Dns {
            name,
            server,
            resolv_conf,
            record_type,
            upstream,
            upstream_records,
            connect_port,
            timeout,
        } => {
            let query = dns::Query {
                name,
                server,
                resolv_conf,
                record_type,
                upstream,
                upstream_records,
                connect_port,
                timeout,
            };
            json(dns::run(&query).await)
        }
        // Returns only when it cannot serve.
        Mode::DnsServer { listen, records } => serde_json::json!({
            "mode": "dns-server",
            "ok": false,
            "error": dns::serve(listen, &records).await,
        }),
        Mode::Load(plan) => json(load(plan).await),
        Mode::Bulk {
            target,
            duration,
            chunk,
        } => json(bulk(&target, duration, chunk).await),
        Mode::ConnectRate {
            target,
            duration,
            concurrency,
            payload,
        } => json(connect_rate(&target, duration, concurrency, payload).await),
        Mode::ConnectProbe {
            target,
            duration,
            interval,
            timeout,
            payload,
        } => json(connect_probe(&target, duration, interval, timeout, payload).await),
        Mode::Hold {
            target,
            duration,
            interval,
            payload,
        } => json(hold(&target, duration, interval, payload).await),
    };
    let ok = report["ok"] == serde_json::Value::Bool(true);
    (report, ok)
}

/// `10s`, `500ms`, `2m`, or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 10s, 500ms, 2m)"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{s:?} is not a duration (try 10s, 500ms, 2m)"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b"0123456789abcdefghijklmnopqrstuvwxyz"[i % 36])
        .collect()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn connect(target: &str) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn tcp_once(target: &str, data: &[u8], hello: bool, timeout: Duration) -> TcpReport {
    let mut report = TcpReport {
        mode: "tcp".into(),
        target: target.into(),
        ..Default::default()
    };
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        let stream = connect(target).await.map_err(|e| format!("connect: {e}"))?;
        report.connect_us = Some(micros(start.elapsed()));
        report.local = stream.local_addr().ok().map(|a| a.to_string());
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        if hello {
            let mut line = String::new();
            rd.read_line(&mut line)
                .await
                .map_err(|e| format!("read hello: {e}"))?;
            let parsed: TcpHello = serde_json::from_str(line.trim())
                .map_err(|e| format!("hello line {line:?} is not a TcpHello: {e}"))?;
            report.hello = Some(parsed);
        }
        wr.write_all(data)
            .await
            .map_err(|e| format!("write: {e}"))?;
        report.sent_bytes = data.len() as u64;
        wr.shutdown()
            .await
            .map_err(|e| format!("half-close: {e}"))?;
        let mut back = Vec::with_capacity(data.len());
        rd.read_to_end(&mut back)
            .await
            .map_err(|e| format!("read echo: {e}"))?;
        report.received_bytes = back.len() as u64;
        report.echo_matches = back == data;
        Ok::<(), String>(())
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
    report.total_us = Some(micros(start.elapsed()));
    match result {
        Ok(()) if report.echo_matches => report.ok = true,
        Ok(()) => {
            report.error = Some(format!(
                "echo mismatch: sent {} bytes, got {} back",
                report.sent_bytes, report.received_bytes
            ))
        }
        Err(e) => report.error = Some(e),
    }
    report
}

/// `http://host:port/path` split into the address to dial and the request path.
pub(crate) fn split_url(url: &str) -> Result<(String, http::Uri), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// URLs are supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    Ok((addr, uri))
}

/// Connects and performs the HTTP/1.1 handshake; returns the sender and the
/// connection's local address.
async fn http_connect(addr: &str) -> Result<(SendRequest<Full<Bytes>>, SocketAddr), String> {
    let stream = connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    Ok((sender, local))
}

fn request(
    uri: &http::Uri,
    method: &str,
    headers: &[String],
    body: Bytes,
) -> Result<Request, String> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(
            http::header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or_default(),
        );
    for h in headers {
        let (name, value) = name_value(h)?;
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(body))
        .map_err(|e| format!("bad request: {e}"))
}

/// `NAME:VALUE`, trimmed.
fn name_value(h: &str) -> Result<(&str, &str), String> {
    h.split_once(':')
        .map(|(n, v)| (n.trim(), v.trim()))
        .ok_or_else(|| format!("header {h:?} is not NAME:VALUE"))
}

/// Header name -> every value, for a report.
fn header_map(headers: &http::HeaderMap) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (name, value) in headers {
        out.entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

/// Connects and performs the HTTP/2 (h2c, prior knowledge) handshake.
async fn grpc_connect(addr: &str) -> Result<(http2::SendRequest<Full<Bytes>>, SocketAddr), String> {
    let stream = connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok((sender, local))
}

/// What one unary call got back.
struct GrpcAnswer {
    http_status: http::StatusCode,
    headers: http::HeaderMap,
    trailers: http::HeaderMap,
    /// From the trailers, or the headers of a trailers-only answer.
    status: Option<u32>,
    /// The reply message, when the status is 0.
    message: Option<Result<Bytes, String>>,
}

/// One unary call of `message` on `sender`.
async fn grpc_call(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    uri: &http::Uri,
    metadata: &[String],
    message: &[u8],
) -> Result<GrpcAnswer, String> {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let mut builder = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{authority}{}", grpc::method_path(uri)))
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .header(http::header::TE, "trailers");
    for m in metadata {
        let (name, value) = name_value(m)?;
        builder = builder.header(name, value);
    }
    let req = builder
        .body(Full::new(grpc::frame(message)))
        .map_err(|e| format!("bad request: {e}"))?;
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| format!("read body: {e}"))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = grpc::status_of(&trailers).or_else(|| grpc::status_of(&parts.headers));
    let message = (status == Some(grpc::OK)).then(|| grpc::unframe(&collected.to_bytes()));
    Ok(GrpcAnswer {
        http_status: parts.status,
        headers: parts.headers,
        trailers,
        status,
        message,
    })
}

async fn grpc_once(
    url: &str,
    metadata: &[String],
    payload: usize,
    timeout: Duration,
) -> GrpcReport {
    let mut report = GrpcReport {
        mode: "grpc".into(),
        url: url.into(),
        ..Default::default()
    };
    let (result, us) = within(timeout, async {
        let (addr, uri) = split_url(url)?;
        report.method = grpc::method_path(&uri).to_string();
        let (mut sender, local) = grpc_connect(&addr).await?;
        report.local = Some(local.to_string());
        let sent = pattern(payload);
        report.sent_bytes = sent.len() as u64;
        let answer = grpc_call(&mut sender, &uri, metadata, &sent).await?;
        report.http_status = Some(answer.http_status.as_u16());
        report.pod = answer
            .headers
            .get(grpc::POD_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let message_of = |h: &http::HeaderMap| {
            h.get("grpc-message")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        report.grpc_message = message_of(&answer.trailers).or_else(|| message_of(&answer.headers));
        report.headers = header_map(&answer.headers);
        report.trailers = header_map(&answer.trailers);
        report.grpc_status = answer.status;
        if let Some(message) = answer.message {
            let message = message?;
            report.received_bytes = message.len() as u64;
            report.echo_matches = message == sent;
        }
        match answer.status {
            Some(_) => Ok(()),
            None => Err(format!("HTTP {} without grpc-status", answer.http_status)),
        }
    })
    .await;
    report.total_us = Some(us);
    report.ok = result.is_ok();
    report.error = result.err();
    report
}

type Request = http::Request<Full<Bytes>>;

/// One HTTP/1.1 request on `sender`, once it is ready: the response head
/// and whole body.
async fn exchange_http1(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request,
) -> Result<(http::response::Parts, Bytes), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("read body: {e}"))?
        .to_bytes();
    Ok((parts, body))
}

/// Runs one exchange within `timeout`; returns how it went and how long it
/// took (microseconds).
async fn within(
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<(), String>>,
) -> (Result<(), String>, f64) {
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
    (result, micros(start.elapsed()))
}

pub(crate) async fn http_once(
    url: &str,
    method: &str,
    headers: &[String],
    body_size: usize,
    timeout: Duration,
) -> HttpReport {
    let mut report = HttpReport {
        mode: "http".into(),
        url: url.into(),
        ..Default::default()
    };
    let (result, us) = within(timeout, async {
        let (addr, uri) = split_url(url)?;
        let req = request(&uri, method, headers, Bytes::from(pattern(body_size)))?;
        let (mut sender, local) = http_connect(&addr).await?;
        report.local = Some(local.to_string());
        let (head, body) = exchange_http1(&mut sender, req).await?;
        report.status = Some(head.status.as_u16());
        report.headers = header_map(&head.headers);
        report.body = String::from_utf8_lossy(&body).into_owned();
        report.echo = serde_json::from_slice::<EchoReply>(&body).ok();
        Ok::<(), String>(())
    })
    .await;
    report.total_us = Some(us);
    report.ok = result.is_ok();
    report.error = result.err();
    report
}

async fn tally(
    url: &str,
    count: u64,
    method: &str,
    headers: &[String],
    timeout: Duration,
) -> TallyReport {
    let mut report = TallyReport {
        mode: "tally".into(),
        url: url.into(),
        ..Default::default()
    };
    let (addr, uri) = match split_url(url) {
        Ok(split) => split,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    for _ in 0..count {
        let answer = tokio::time::timeout(timeout, async {
            let req = request(&uri, method, headers, Bytes::new())?;
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                conn = Some(http_connect(&addr).await?.0);
            }
            let sender = conn.as_mut().expect("just connected");
            let (head, body) = exchange_http1(sender, req).await?;
            let status = head.status.as_u16();
            let pod = serde_json::from_slice::<EchoReply>(&body)
                .map(|e| e.pod)
                .unwrap_or_else(|_| "-".into());
            Ok::<String, String>(format!("{status} {pod}"))
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        match answer {
            Ok(key) => {
                report.requests += 1;
                *report.answers.entry(key).or_default() += 1;
            }
            Err(e) => {
                // The connection may be half-way through a request: start anew.
                conn = None;
                report.errors += 1;
                report.first_error.get_or_insert(e);
            }
        }
    }
    report.ok = report.errors == 0 && report.requests == count;
    if !report.ok {
        report.error = Some(format!(
            "{} of {count} request(s) got no answer (first: {:?})",
            report.errors, report.first_error
        ));
    }
    report
}

/// What `client load` does.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadPlan {
    /// `host:port` for tcp, `http://host:port/path` for http,
    /// `http://host:port[/service/method]` for grpc.
    pub target: String,
    #[arg(long, value_enum, default_value = "tcp")]
    pub protocol: Protocol,
    /// Requests per second, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Request size in bytes (tcp: echoed back in full; http: POST body;
    /// grpc: the request message, echoed back in full).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Requests in this first stretch are sent but not counted.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Include the latency distribution in the report.
    #[arg(long)]
    pub distribution: bool,
    /// Ignore `--rate`: each connection sends its next request as soon as
    /// the previous answer is in (a closed loop), to find the most the path
    /// carries with this many connections.
    #[arg(long)]
    pub saturate: bool,
}

/// When one load connection sends its requests.
#[derive(Clone, Copy, Debug)]
enum Pace {
    /// On a fixed schedule: at `next`, then every `interval`.
    Fixed { next: Instant, interval: Duration },
    /// As soon as the previous answer is in.
    Saturate,
}

impl Pace {
    /// When the next request goes, given the time `now`; `None` once the
    /// run (which ends at `end`) is over.
    fn next(&mut self, now: Instant, end: Instant) -> Option<Instant> {
        match self {
            Pace::Fixed { next, interval } => {
                let at = *next;
                *next += *interval;
                (at < end).then_some(at)
            }
            Pace::Saturate => (now < end).then_some(now),
        }
    }
}

/// What one connection's worker measured.
#[derive(Default)]
struct Tally {
    samples: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    /// All workers' tallies as one.
    fn merge(tallies: Vec<Tally>) -> Tally {
        tallies.into_iter().fold(Tally::default(), |mut all, t| {
            all.samples.extend(t.samples);
            all.errors += t.errors;
            all.first_error = all.first_error.or(t.first_error);
            all
        })
    }

    /// The run's error when nothing at all completed.
    fn failure(&self, nothing: &str) -> Option<String> {
        self.samples.is_empty().then(|| {
            self.first_error
                .clone()
                .unwrap_or_else(|| nothing.to_string())
        })
    }
}

/// One long-lived connection that can carry a request/response exchange.
enum LoadConn {
    Tcp(TcpStream),
    Http(SendRequest<Full<Bytes>>, http::Uri),
    Grpc(http2::SendRequest<Full<Bytes>>, http::Uri),
}

impl LoadConn {
    async fn open(plan: &LoadPlan) -> Result<LoadConn, String> {
        match plan.protocol {
            Protocol::Tcp => connect(&plan.target)
                .await
                .map(LoadConn::Tcp)
                .map_err(|e| format!("connect {}: {e}", plan.target)),
            Protocol::Http => {
                let (addr, uri) = split_url(&plan.target)?;
                let (sender, _) = http_connect(&addr).await?;
                Ok(LoadConn::Http(sender, uri))
            }
            Protocol::Grpc => {
                let (addr, uri) = split_url(&plan.target)?;
                let (sender, _) = grpc_connect(&addr).await?;
                Ok(LoadConn::Grpc(sender, uri))
            }
        }
    }

    async fn exchange(&mut self, payload: &Bytes, reply: &mut [u8]) -> Result<(), String> {
        match self {
            LoadConn::Tcp(s) => {
                s.write_all(payload)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                s.read_exact(reply)
                    .await
                    .map_err(|e| format!("read echo: {e}"))?;
                Ok(())
            }
            LoadConn::Http(sender, uri) => {
                let req = request(uri, "POST", &[], payload.clone())?;
                let status = exchange_http1(sender, req).await?.0.status;
                if !status.is_success() {
                    return Err(format!("HTTP status {status}"));
                }
                Ok(())
            }
            LoadConn::Grpc(sender, uri) => {
                let answer = grpc_call(sender, uri, &[], payload).await?;
                match (answer.status, answer.message) {
                    (Some(grpc::OK), Some(Ok(message))) if message == payload => Ok(()),
                    (Some(grpc::OK), Some(Ok(message))) => Err(format!(
                        "reply message of {} bytes is not the {} sent",
                        message.len(),
                        payload.len()
                    )),
                    (Some(grpc::OK), Some(Err(e))) => Err(format!("reply: {e}")),
                    (status, _) => Err(format!(
                        "HTTP {} grpc-status {status:?}",
                        answer.http_status
                    )),
                }
            }
        }
    }
}

async fn load_worker(plan: &LoadPlan, index: u32, start: Instant) -> Tally {
    let mut tally = Tally::default();
    let end = start + plan.warmup + plan.duration;
    let measure_from = start + plan.warmup;
    let payload = Bytes::from(pattern(plan.payload));
    let mut reply = vec![0u8; plan.payload];
    let mut pace = if plan.saturate {
        Pace::Saturate
    } else {
        let per_conn_rate = plan.rate / f64::from(plan.connections);
        let interval = Duration::from_secs_f64(1.0 / per_conn_rate);
        // Stagger the connections evenly within one interval.
        Pace::Fixed {
            next: start + interval.mul_f64(f64::from(index) / f64::from(plan.connections)),
            interval,
        }
    };
    let mut conn: Option<LoadConn> = None;
    tokio::time::sleep_until(start).await;
    while let Some(at) = pace.next(Instant::now(), end) {
        tokio::time::sleep_until(at).await;
        if conn.is_none() {
            match LoadConn::open(plan).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tally.error(e);
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("just opened");
        // Measured by when it was due: a request of the warm-up sent late
        // (the path was slow to start) is still the warm-up's, so the rate
        // achieved is never above the rate asked.
        let measured = at >= measure_from;
        let t0 = Instant::now();
        match c.exchange(&payload, &mut reply).await {
            Ok(()) if measured => tally.samples.push(micros(t0.elapsed())),
            Ok(()) => {}
            Err(e) => {
                conn = None;
                if measured {
                    tally.error(e);
                }
            }
        }
    }
    tally
}

async fn load(plan: LoadPlan) -> LoadReport {
    let mut report = LoadReport {
        mode: "load".into(),
        protocol: format!("{:?}", plan.protocol).to_lowercase(),
        target: plan.target.clone(),
        connections: plan.connections,
        rate: if plan.saturate { 0.0 } else { plan.rate },
        saturate: plan.saturate,
        payload_bytes: plan.payload as u64,
        duration_s: plan.duration.as_secs_f64(),
        ..Default::default()
    };
    if plan.connections == 0
        || !(plan.saturate || plan.rate.is_finite() && plan.rate > 0.0)
        || (plan.protocol == Protocol::Tcp && plan.payload == 0)
    {
        report.error = Some(
            "need --connections >= 1, --rate > 0 (or --saturate) and (for tcp) --payload >= 1"
                .into(),
        );
        return report;
    }
    let start = Instant::now() + Duration::from_millis(5);
    let workers = (0..plan.connections).map(|i| load_worker(&plan, i, start));
    let mut all = Tally::merge(futures::future::join_all(workers).await);
    report.error = all.failure("no request completed");
    report.ok = report.error.is_none();
    report.requests = all.samples.len() as u64;
    report.errors = all.errors;
    report.first_error = all.first_error.take();
    report.achieved_rate = report.requests as f64 / plan.duration.as_secs_f64().max(1e-9);
    report.latency_us = summarize(&mut all.samples);
    if plan.distribution {
        report.distribution = Some(distribution(&all.samples));
    }
    report
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

async fn hold(target: &str, duration: Duration, interval: Duration, payload: usize) -> HoldReport {
    let mut report = HoldReport {
        mode: "hold".into(),
        target: target.into(),
        ..Default::default()
    };
    let data = pattern(payload.max(1));
    let mut reply = vec![0u8; data.len()];
    let mut stream = match connect(target).await {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("connect {target}: {e}"));
            return report;
        }
    };
    let end = Instant::now() + duration;
    let mut next = Instant::now();
    while next < end {
        tokio::time::sleep_until(next).await;
        next += interval;
        let round = async {
            stream.write_all(&data).await?;
            stream.read_exact(&mut reply).await
        };
        match tokio::time::timeout(interval.max(Duration::from_secs(5)), round).await {
            Ok(Ok(_)) if reply != data => {
                report.ended_at_ms = Some(unix_ms());
                report.error = Some(format!(
                    "after {} round trips: the echo differs from the {} bytes sent",
                    report.exchanges,
                    data.len()
                ));
                return report;
            }
            Ok(Ok(_)) => {
                report.exchanges += 1;
                report.bytes += data.len() as u64;
                report.connected_at_ms.get_or_insert_with(unix_ms);
            }
            Ok(Err(e)) => {
                report.ended_at_ms = Some(unix_ms());
                report.error = Some(format!("after {} round trips: {e}", report.exchanges));
                return report;
            }
            Err(_) => {
                report.ended_at_ms = Some(unix_ms());
                report.error = Some(format!(
                    "after {} round trips: no echo within {:?}",
                    report.exchanges,
                    interval.max(Duration::from_secs(5))
                ));
                return report;
            }
        }
    }
    report.ok = report.exchanges > 0;
    report
}

async fn bulk(target: &str, duration: Duration, chunk: usize) -> BulkReport {
    let mut report = BulkReport {
        mode: "bulk".into(),
        target: target.into(),
        ..Default::default()
    };
    let start = Instant::now();
    let result = async {
        let stream = connect(target).await.map_err(|e| format!("connect: {e}"))?;
        let (rd, mut wr) = stream.into_split();
        let buf = pattern(chunk.max(1));
        let end = start + duration;
        while Instant::now() < end {
            wr.write_all(&buf)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        wr.shutdown()
            .await
            .map_err(|e| format!("half-close: {e}"))?;
        let mut line = String::new();
        BufReader::new(rd)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read receipt: {e}"))?;
        let receipt: SinkReceipt = serde_json::from_str(line.trim()).map_err(|e| {
            format!(
                "the server's receipt {line:?} is not a SinkReceipt (is it `echo --sink`?): {e}"
            )
        })?;
        Ok::<u64, String>(receipt.bytes)
    }
    .await;
    report.seconds = start.elapsed().as_secs_f64();
    match result {
        Ok(bytes) => {
            report.ok = true;
            report.bytes = bytes;
            report.bits_per_second = bytes as f64 * 8.0 / report.seconds.max(1e-9);
        }
        Err(e) => report.error = Some(e),
    }
    report
}

async fn connect_rate(
    target: &str,
    duration: Duration,
    concurrency: u32,
    payload: usize,
) -> ConnectRateReport {
    let mut report = ConnectRateReport {
        mode: "connect_rate".into(),
        target: target.into(),
        concurrency,
        duration_s: duration.as_secs_f64(),
        ..Default::default()
    };
    if concurrency == 0 {
        report.error = Some("need --concurrency >= 1".into());
        return report;
    }
    let start = Instant::now();
    let end = start + duration;
    let data = pattern(payload.max(1));
    let workers = (0..concurrency).map(|_| {
        let data = &data;
        async move {
            let mut tally = Tally::default();
            let mut back = vec![0u8; data.len()];
            while Instant::now() < end {
                let t0 = Instant::now();
                let round = async {
                    let mut s = connect(target).await.map_err(|e| format!("connect: {e}"))?;
                    s.write_all(data).await.map_err(|e| format!("write: {e}"))?;
                    s.read_exact(&mut back)
                        .await
                        .map_err(|e| format!("read echo: {e}"))?;
                    Ok::<(), String>(())
                };
                match tokio::time::timeout(Duration::from_secs(10), round).await {
                    Ok(Ok(())) => tally.samples.push(micros(t0.elapsed())),
                    Ok(Err(e)) => tally.error(e),
                    Err(_) => tally.error("no answer within 10s".into()),
                }
            }
            tally
        }
    });
    let mut all = Tally::merge(futures::future::join_all(workers).await);
    let elapsed = start.elapsed().as_secs_f64();
    report.error = all.failure("no connection completed");
    report.ok = report.error.is_none();
    report.connections = all.samples.len() as u64;
    report.errors = all.errors;
    report.first_error = all.first_error.take();
    report.per_second = report.connections as f64 / elapsed.max(1e-9);
    report.latency_us = summarize(&mut all.samples);
    report
}

/// The runs of failures of a sequence of attempts, as
/// [`ConnectProbeReport`] tells them.
#[derive(Debug, Default)]
struct Outages {
    attempts: u64,
    failures: u64,
    first_ok_at_ms: Option<u64>,
    last_ok_at_ms: Option<u64>,
    runs: Vec<Outage>,
}

impl Outages {
    /// An attempt that started at `at_ms` (Unix ms) and how it went.
    fn record(&mut self, at_ms: u64, result: Result<(), String>) {
        self.attempts += 1;
        let open = self.runs.last_mut().filter(|o| o.until_ms.is_none());
        match (result, open) {
            (Ok(()), open) => {
                if let Some(o) = open {
                    o.until_ms = Some(at_ms);
                }
                self.first_ok_at_ms.get_or_insert(at_ms);
                self.last_ok_at_ms = Some(at_ms);
            }
            (Err(_), Some(o)) => {
                self.failures += 1;
                o.failures += 1;
            }
            (Err(e), None) => {
                self.failures += 1;
                self.runs.push(Outage {
                    from_ms: at_ms,
                    until_ms: None,
                    failures: 1,
                    first_error: e,
                });
            }
        }
    }

    /// The report once the probe ended at `end_ms`.
    fn report(self, report: &mut ConnectProbeReport, end_ms: u64) {
        report.attempts = self.attempts;
        report.failures = self.failures;
        report.first_ok_at_ms = self.first_ok_at_ms;
        report.last_ok_at_ms = self.last_ok_at_ms;
        report.longest_gap_ms = self
            .runs
            .iter()
            .map(|o| o.until_ms.unwrap_or(end_ms).saturating_sub(o.from_ms) as f64)
            .fold(0.0, f64::max);
        let still_out = self.runs.last().is_some_and(|o| o.until_ms.is_none());
        report.error = match (self.first_ok_at_ms, self.runs.last()) {
            (None, Some(o)) => Some(format!(
                "no attempt succeeded; first error: {}",
                o.first_error
            )),
            (None, None) => Some("no attempt was made".into()),
            (Some(_), Some(o)) if still_out => Some(format!(
                "new connections did not come back: {} attempt(s) failed from {} ms to the end; first error: {}",
                o.failures, o.from_ms, o.first_error
            )),
            _ => None,
        };
        report.ok = report.error.is_none();
        report.outages = self.runs;
    }
}

async fn connect_probe(
    target: &str,
    duration: Duration,
    interval: Duration,
    timeout: Duration,
    payload: usize,
) -> ConnectProbeReport {
    let mut report = ConnectProbeReport {
        mode: "connect_probe".into(),
        target: target.into(),
        interval_ms: interval.as_secs_f64() * 1e3,
        duration_s: duration.as_secs_f64(),
        ..Default::default()
    };
    let data = pattern(payload.max(1));
    let mut back = vec![0u8; data.len()];
    let mut outages = Outages::default();
    let end = Instant::now() + duration;
    let mut next = Instant::now();
    while next < end {
        tokio::time::sleep_until(next).await;
        // One at a time: a slow attempt delays the next, never overlaps it.
        next = (next + interval).max(Instant::now());
        let at_ms = unix_ms();
        let started = Instant::now();
        let round = async {
            let mut s = connect(target).await.map_err(|e| format!("connect: {e}"))?;
            s.write_all(&data)
                .await
                .map_err(|e| format!("write: {e}"))?;
            s.read_exact(&mut back)
                .await
                .map_err(|e| format!("read echo: {e}"))?;
            if back != data {
                return Err("the echo differs from what was sent".to_string());
            }
            Ok::<(), String>(())
        };
        let result = tokio::time::timeout(timeout, round)
            .await
            .unwrap_or_else(|_| Err(format!("no echo within {timeout:?}")));
        if result.is_ok() {
            report.record_success(SlowAttempt {
                at_ms,
                ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
        outages.record(at_ms, result);
    }
    outages.report(&mut report, unix_ms());
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_runs_of_failures_until_the_next_success() {
        let mut o = Outages::default();
        o.record(1_000, Ok(()));
        o.record(1_025, Err("connect: refused".into()));
        o.record(1_050, Err("connect: reset".into()));
        o.record(1_400, Ok(()));
        o.record(1_425, Err("read echo: eof".into()));
        o.record(1_450, Ok(()));
        let mut report = ConnectProbeReport::default();
        o.report(&mut report, 1_500);
        assert!(report.ok, "{report:?}");
        assert_eq!((report.attempts, report.failures), (6, 3));
        assert_eq!(report.outages.len(), 2);
        assert_eq!(
            report.outages[0],
            Outage {
                from_ms: 1_025,
                until_ms: Some(1_400),
                failures: 2,
                first_error: "connect: refused".into()
            }
        );
        assert_eq!(report.longest_gap_ms, 375.0);
        assert_eq!(
            (report.first_ok_at_ms, report.last_ok_at_ms),
            (Some(1_000), Some(1_450))
        );
    }

    #[test]
    fn the_slowest_attempts_are_kept_slowest_first() {
        let mut report = ConnectProbeReport::default();
        for (at_ms, ms) in [
            (1, 3.0),
            (2, 9.0),
            (3, 1.0),
            (4, 7.0),
            (5, 2.0),
            (6, 8.0),
            (7, 0.5),
        ] {
            report.record_success(SlowAttempt { at_ms, ms });
        }
        let kept: Vec<u64> = report.slowest.iter().map(|a| a.at_ms).collect();
        assert_eq!(kept, [2, 6, 4, 1, 5]);
        assert_eq!(report.slowest_ms, 9.0);
    }

    #[test]
    fn an_outage_that_never_ends_fails_the_probe() {
        let mut o = Outages::default();
        o.record(1_000, Ok(()));
        o.record(1_025, Err("connect: refused".into()));
        let mut report = ConnectProbeReport::default();
        o.report(&mut report, 3_025);
        assert!(!report.ok);
        assert_eq!(report.longest_gap_ms, 2_000.0);
        assert!(
            report
                .error
                .as_deref()
                .unwrap()
                .contains("did not come back"),
            "{report:?}"
        );
        let mut report = ConnectProbeReport::default();
        Outages::default().report(&mut report, 0);
        assert!(!report.ok);
    }

    /// An echo on loopback serving HTTP (`grpc`: gRPC) in the
    /// background; its `http://127.0.0.1:<port>`.
    async fn loopback_echo(grpc: bool) -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let (http, grpc) = if grpc {
            (vec![], vec![port])
        } else {
            (vec![port], vec![])
        };
        let args = crate::apps::echo::EchoArgs {
            tcp: vec![],
            tcp_hello: vec![],
            http,
            grpc,
            sink: vec![],
            calls: vec![],
            bind: "127.0.0.1".parse().unwrap(),
            pod: "echo-0".into(),
            namespace: "test".into(),
        };
        tokio::spawn(crate::apps::echo::serve(args));
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        format!("http://127.0.0.1:{port}")
    }

    #[tokio::test]
    async fn grpc_calls_echo_and_carry_the_asked_status() {
        let url = loopback_echo(true).await;
        let t = Duration::from_secs(5);
        let ok = grpc_once(&url, &[], 1024, t).await;
        assert!(ok.ok, "{ok:?}");
        assert_eq!(ok.method, grpc::ECHO_METHOD);
        assert_eq!((ok.http_status, ok.grpc_status), (Some(200), Some(0)));
        assert_eq!(ok.pod.as_deref(), Some("echo-0"));
        assert!(ok.echo_matches && ok.received_bytes == 1024, "{ok:?}");
        assert_eq!(ok.trailers["grpc-status"], ["0"]);

        let asked = grpc_once(&url, &["x-echo-grpc-status: 5".into()], 16, t).await;
        assert!(asked.ok, "{asked:?}");
        assert_eq!(asked.grpc_status, Some(5));
        assert_eq!(asked.received_bytes, 0);
        let bad = grpc_once(&url, &["x-echo-grpc-status: 99".into()], 16, t).await;
        assert_eq!(bad.grpc_status, Some(grpc::INVALID_ARGUMENT), "{bad:?}");
        let other = grpc_once(&format!("{url}/e2e.Echo/Other"), &[], 16, t).await;
        assert_eq!(other.grpc_status, Some(grpc::UNIMPLEMENTED), "{other:?}");
        assert_eq!(other.pod.as_deref(), Some("echo-0"));

        // Not gRPC: an HTTP/1.1 client gets no status (the port is h2c only).
        let http = http_once(&url, "GET", &[], 0, t).await;
        assert!(!http.ok || http.status != Some(200), "{http:?}");
    }

    #[tokio::test]
    async fn tally_counts_answers_by_status_and_pod() {
        let url = format!("{}/", loopback_echo(false).await);
        let flaky = [
            "x-echo-status: 500".to_string(),
            "x-echo-fail-first: 3".into(),
            "x-echo-key: k".into(),
        ];
        let report = tally(&url, 5, "GET", &flaky, Duration::from_secs(5)).await;
        assert!(report.ok, "{report:?}");
        assert_eq!(report.from_pod(500, "echo-0"), 3);
        assert_eq!(report.with_status(200), 2);
        let once = http_once(&url, "GET", &flaky, 0, Duration::from_secs(5)).await;
        assert_eq!(once.echo.and_then(|e| e.key_seen), Some(6));
        let bad = tally(
            &url,
            2,
            "GET",
            &["x-echo-status: 1".into()],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(bad.answers.get("400 -"), Some(&2), "{bad:?}");
    }

    #[tokio::test]
    async fn grpc_load_counts_echoed_calls() {
        let url = loopback_echo(true).await;
        let plan = LoadPlan {
            target: url,
            protocol: Protocol::Grpc,
            rate: 200.0,
            connections: 2,
            duration: Duration::from_millis(300),
            payload: 1024,
            warmup: Duration::ZERO,
            distribution: false,
            saturate: false,
        };
        let report = load(plan).await;
        assert!(report.trouble().is_none(), "{report:?}");
        assert_eq!(report.protocol, "grpc");
        assert!(report.requests > 0);
    }

    #[test]
    fn a_fixed_pace_keeps_its_schedule_and_saturation_goes_at_once() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let end = ms(10);
        let mut fixed = Pace::Fixed {
            next: ms(1),
            interval: Duration::from_millis(4),
        };
        // On schedule whatever the time now (late sends catch up), and
        // nothing at or after the end.
        assert_eq!(fixed.next(ms(0), end), Some(ms(1)));
        assert_eq!(fixed.next(ms(8), end), Some(ms(5)));
        assert_eq!(fixed.next(ms(8), end), Some(ms(9)));
        assert_eq!(fixed.next(ms(9), end), None);
        let mut saturate = Pace::Saturate;
        assert_eq!(saturate.next(ms(3), end), Some(ms(3)));
        assert_eq!(saturate.next(ms(3), end), Some(ms(3)));
        assert_eq!(saturate.next(ms(10), end), None);
    }

    #[test]
    fn durations_parse_in_the_usual_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn urls_split_into_address_and_path() {
        let (addr, uri) = split_url("http://10.244.0.2:8080/a?b=c").unwrap();
        assert_eq!(addr, "10.244.0.2:8080");
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/a?b=c");
        assert_eq!(split_url("http://echo.demo").unwrap().0, "echo.demo:80");
        assert!(split_url("https://x").is_err());
    }
}
