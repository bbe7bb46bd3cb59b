//! The sample apps run inside pods (`echo`, `client`) and the JSON they
//! speak. The types here ARE the documented, stable output format: the demo,
//! the scenarios and `cargo xtask bench l4` parse them; add fields, never
//! rename or remove them.
//!
//! `echo` (server), each flag repeatable:
//! - `--tcp PORT`: echoes bytes back; half-close is passed on (when the client
//!   shuts down its write side, the echo finishes and shuts down its own).
//! - `--tcp-hello PORT`: first writes one line, a [`TcpHello`] JSON (what the
//!   server saw: peer address, its own pod), then echoes as `--tcp`.
//! - `--http PORT`: HTTP/1.1; every request gets `200` with an [`EchoReply`]
//!   JSON body (peer address, method, path, headers, body size, pod), unless
//!   its headers ask otherwise (a bad value is a 400 naming the header):
//!   - `x-echo-status: CODE`: answer CODE (still with the [`EchoReply`]);
//!     narrowed by `x-echo-status-on: POD[,POD]` (only on these pods) and
//!     `x-echo-fail-first: N` (only the first N requests with this
//!     request's `x-echo-key` this pod has seen: a backend that fails N
//!     times, then recovers);
//!   - `x-echo-key: K`: count the request under K ([`EchoReply::key_seen`]);
//!     a pod remembers 10,000 keys, then starts over;
//!   - `x-echo-delay-ms: N`: answer after N ms (at most 60,000).
//! - `--call NAME=URL` (repeatable, with `--http`): an app with downstream
//!   services, as Bookinfo's are: before answering, every HTTP request
//!   makes one `GET URL` per `--call`, in order, and the answers go
//!   into [`EchoReply::calls`] as [`Downstream`]s (a failed call is recorded
//!   with its error; the request is still answered). `URL` is
//!   `http://ip:port/path`, as the pod's environment gives it (the local
//!   cluster expands `$(VAR)` in arguments, as kubelet does).
//! - `--grpc PORT`: gRPC over h2c ([`grpc`]): the unary method
//!   `/e2e.Echo/Echo` answers the request's message with status 0, or the
//!   status the request's `x-echo-grpc-status` metadata asks for; every
//!   response names the pod in its `x-echo-pod` header; another method is
//!   `UNIMPLEMENTED` (12).
//! - `--sink PORT`: reads until the client half-closes, then writes one
//!   [`SinkReceipt`] JSON line with the byte count (for bulk throughput).
//!   Its pod name and namespace come from `--pod`/`POD_NAME` and
//!   `--namespace`/`POD_NAMESPACE`.
//!
//! `client` prints exactly one JSON document on stdout (always, also on
//! failure, with `ok: false` and `error`) and exits 0 when `ok`:
//! - `client tcp ADDR [--payload N | --message TEXT] [--hello]`: one
//!   connection, one exchange: [`TcpReport`].
//! - `client http URL [--method M] [--header K:V]... [--body-size N]`: one
//!   request: [`HttpReport`] (with the parsed [`EchoReply`] when the server is `echo`).
//! - `client tally URL --count N [--method M] [--header K:V]...`: N
//!   requests one after another on one kept-alive connection (a new one when
//!   the server closes it), counted by status and answering pod:
//!   [`TallyReport`].
//! - `client grpc URL [--metadata K:V]... [--payload N]`: one unary call
//!   over h2c to `http://host:port[/service/method]` (default
//!   `/e2e.Echo/Echo`): [`GrpcReport`].
//! - `client load ADDR --protocol tcp|http|grpc --rate R --connections C
//!   --duration D --payload N`: a fixed request rate spread over C
//!   long-lived connections: [`LoadReport`]. `grpc`: unary calls of N-byte
//!   messages to a `--grpc` port (URL as `client grpc`), each connection one
//!   HTTP/2 connection with one call in flight; a call counts when its
//!   status is 0 and the reply message is the one sent.
//! - `client bulk ADDR --duration D`: one stream to a `--sink` port as fast
//!   as it goes: [`BulkReport`].
//! - `client connect-rate ADDR --duration D --concurrency K`: new
//!   connections, each with one small echo round trip: [`ConnectRateReport`].
//! - `client hold ADDR --duration D --interval I`: one connection to a
//!   `--tcp` port with a small round trip every I (the echo checked byte
//!   for byte), until it breaks or D is over; when it was up and when it
//!   broke: [`HoldReport`].
//! - `client connect-probe ADDR --duration D --interval I --timeout T`: a
//!   new connection with one small echo round trip every I (one at a
//!   time), each given T; every run of failures with when it began and
//!   when connections came back, and the slowest successful attempt:
//!   [`ConnectProbeReport`].
//!
//! Latencies are microseconds measured from just before a request is
//! written to when its whole response has been read (so a late send does not
//! count against the path being measured).

pub mod client;
pub mod echo;
pub mod grpc;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What `echo --tcp-hello` writes first on every connection, as one JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpHello {
    pub pod: String,
    pub namespace: String,
    /// The client as the server sees it (`ip:port`).
    pub peer: String,
    /// The server's own address of the connection.
    pub local: String,
}

/// The body of every `echo --http` response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    pub pod: String,
    pub namespace: String,
    pub peer: String,
    pub local: String,
    pub method: String,
    /// Path and query, as requested.
    pub path: String,
    /// `HTTP/1.1` (or `HTTP/1.0`).
    pub version: String,
    /// Header names lower-cased; repeated headers keep every value in order.
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_bytes: u64,
    /// With `x-echo-key`: requests with that key this pod has seen, this
    /// one included.
    #[serde(default)]
    pub key_seen: Option<u64>,
    /// With `--call`: what each downstream answered, in `--call` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<Downstream>,
}

/// One downstream call `echo --call NAME=URL` made while answering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downstream {
    /// `NAME` of `--call`.
    pub name: String,
    pub url: String,
    /// The HTTP status, when the downstream answered.
    pub status: Option<u16>,
    /// The answer, when the downstream is `echo` (with its own calls).
    pub reply: Option<Box<EchoReply>>,
    /// Why there is no answer.
    pub error: Option<String>,
}

/// What `echo --sink` writes after the client half-closes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReceipt {
    pub bytes: u64,
}

/// `client tcp`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpReport {
    pub mode: String,
    pub target: String,
    pub ok: bool,
    /// The client's end of the connection (inside a pod: the pod's address).
    pub local: Option<String>,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Whether what came back is exactly what was sent.
    pub echo_matches: bool,
    /// With `--hello`: what the server saw.
    pub hello: Option<TcpHello>,
    pub connect_us: Option<f64>,
    pub total_us: Option<f64>,
    pub error: Option<String>,
}

/// `client dns`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsReport {
    pub mode: String,
    pub name: String,
    pub server: String,
    pub ok: bool,
    /// `NoError`, `NXDomain`, ...
    pub rcode: Option<String>,
    pub authoritative: bool,
    /// The A/AAAA records' addresses, in the answer's order.
    pub addresses: Vec<String>,
    /// With `--upstream`: the names the stand-in upstream resolver was asked.
    pub upstream_asked: Vec<String>,
    /// Each name asked, in order, and its answer's code (without
    /// `--server`, the search list's names until one has an address).
    #[serde(default)]
    pub tried: Vec<(String, String)>,
    /// With `--connect-port`: the exchange with the first address.
    pub connection: Option<TcpReport>,
    pub error: Option<String>,
}

/// `client http`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpReport {
    pub mode: String,
    pub url: String,
    pub ok: bool,
    pub local: Option<String>,
    pub status: Option<u16>,
    pub headers: BTreeMap<String, Vec<String>>,
    /// The body as text (lossy UTF-8).
    pub body: String,
    /// The body parsed, when the server is `echo`.
    pub echo: Option<EchoReply>,
    pub total_us: Option<f64>,
    pub error: Option<String>,
}

/// `client tally`: many requests, counted. `ok` when every request got an
/// HTTP answer (any status).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TallyReport {
    pub mode: String,
    pub url: String,
    pub ok: bool,
    /// Requests that got an answer.
    pub requests: u64,
    /// Requests that got none (connect, reset, timeout).
    pub errors: u64,
    /// `"<status> <pod>"` (`-` when the body is no [`EchoReply`]) -> answers.
    pub answers: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub error: Option<String>,
}

impl TallyReport {
    /// Answers with this status (from any pod).
    pub fn with_status(&self, status: u16) -> u64 {
        let prefix = format!("{status} ");
        self.answers
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Answers with this status from this pod.
    pub fn from_pod(&self, status: u16, pod: &str) -> u64 {
        self.answers
            .get(&format!("{status} {pod}"))
            .copied()
            .unwrap_or_default()
    }
}

/// `client grpc`: one unary call. `ok` when the call got a gRPC status
/// (any: the status is the answer), as `client http` is ok with any HTTP
/// status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcReport {
    pub mode: String,
    pub url: String,
    /// The request path, `/<service>/<method>`.
    pub method: String,
    pub ok: bool,
    pub local: Option<String>,
    pub http_status: Option<u16>,
    /// `grpc-status` (from the trailers, or the headers of a trailers-only answer).
    pub grpc_status: Option<u32>,
    pub grpc_message: Option<String>,
    /// The `x-echo-pod` response header: which echo pod answered.
    pub pod: Option<String>,
    pub headers: BTreeMap<String, Vec<String>>,
    pub trailers: BTreeMap<String, Vec<String>>,
    pub sent_bytes: u64,
    /// Size of the reply message (status 0 only).
    pub received_bytes: u64,
    /// Whether the reply message is exactly the one sent.
    pub echo_matches: bool,
    pub total_us: Option<f64>,
    pub error: Option<String>,
}

/// Latency summary, microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One point of a latency distribution: `percentile` (0..=100) -> microseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quantile {
    pub percentile: f64,
    pub us: f64,
}

/// `client load`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub mode: String,
    /// `tcp`, `http` or `grpc`.
    pub protocol: String,
    pub target: String,
    pub ok: bool,
    pub connections: u32,
    /// Requests per second asked for, over all connections (0 with `saturate`).
    pub rate: f64,
    /// Each connection sent as soon as its previous answer was in.
    pub saturate: bool,
    pub payload_bytes: u64,
    pub duration_s: f64,
    /// Completed requests (successful round trips).
    pub requests: u64,
    pub errors: u64,
    /// Requests completed per second, measured.
    pub achieved_rate: f64,
    pub latency_us: Latency,
    /// With `--distribution`: percentiles 0, 10, ..., 90, 95, 99, 99.9, 99.99, 100.
    pub distribution: Option<Vec<Quantile>>,
    pub first_error: Option<String>,
    pub error: Option<String>,
}

/// The `client` arguments of the scenarios' steady load on `target`: 40
/// requests/s of 512 bytes over 2 long-lived TCP connections, for `duration`.
pub fn steady_load(target: &str, duration: std::time::Duration) -> Vec<String> {
    [
        "load",
        target,
        "--rate",
        "40",
        "--connections",
        "2",
        "--payload",
        "512",
        "--duration",
        &format!("{}ms", duration.as_millis()),
    ]
    .map(String::from)
    .to_vec()
}

impl LoadReport {
    /// What went wrong, unless every request completed and none failed.
    pub fn trouble(&self) -> Option<String> {
        (!self.ok || self.errors > 0 || self.requests == 0).then(|| {
            format!(
                "{} requests, {} errors (first: {:?}; error: {:?})",
                self.requests, self.errors, self.first_error, self.error
            )
        })
    }
}

/// `client bulk`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkReport {
    pub mode: String,
    pub target: String,
    pub ok: bool,
    /// Bytes the sink confirmed receiving.
    pub bytes: u64,
    pub seconds: f64,
    pub bits_per_second: f64,
    pub error: Option<String>,
}

/// `client hold`: one connection kept open with a small round trip every
/// interval, until it breaks or the duration is over.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldReport {
    pub mode: String,
    pub target: String,
    /// The connection lasted the whole duration.
    pub ok: bool,
    /// Round trips that completed.
    pub exchanges: u64,
    /// Bytes echoed back exactly as sent (every round trip's, checked).
    #[serde(default)]
    pub bytes: u64,
    /// When the connection was up and when it broke, in Unix milliseconds,
    /// so the caller can relate them to its own clock.
    pub connected_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    pub error: Option<String>,
}

/// `client connect-rate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectRateReport {
    pub mode: String,
    pub target: String,
    pub ok: bool,
    pub concurrency: u32,
    pub duration_s: f64,
    /// Connections that completed their round trip.
    pub connections: u64,
    pub errors: u64,
    pub per_second: f64,
    /// Connect plus one small round trip.
    pub latency_us: Latency,
    pub first_error: Option<String>,
    pub error: Option<String>,
}

/// A run of consecutive failed attempts of `client connect-probe`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    /// When the first failed attempt started, Unix milliseconds.
    pub from_ms: u64,
    /// When the next successful attempt started; `None`: none did before
    /// the probe ended.
    pub until_ms: Option<u64>,
    pub failures: u64,
    pub first_error: String,
}

/// `client connect-probe`: how long new connections could not be made.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectProbeReport {
    pub mode: String,
    pub target: String,
    /// At least one attempt succeeded and the last one did (connections
    /// came back after every outage).
    pub ok: bool,
    pub interval_ms: f64,
    pub duration_s: f64,
    pub attempts: u64,
    pub failures: u64,
    /// When the first and the last successful attempt started, Unix ms.
    pub first_ok_at_ms: Option<u64>,
    pub last_ok_at_ms: Option<u64>,
    /// Every run of failures, in order.
    pub outages: Vec<Outage>,
    /// The longest outage, from its first failed attempt to the next
    /// success (to the probe's end for one that did not end).
    pub longest_gap_ms: f64,
    /// The longest successful attempt, connect to echo (a connection that
    /// waited, e.g. in a listen backlog, without failing).
    #[serde(default)]
    pub slowest_ms: f64,
    /// The slowest successful attempts (at most [`SLOWEST_KEPT`]), slowest
    /// first: when each started and how long it took, so a slow one can be
    /// placed against what happened meanwhile.
    #[serde(default)]
    pub slowest: Vec<SlowAttempt>,
    pub error: Option<String>,
}

/// How many of the slowest attempts a connect probe reports.
pub const SLOWEST_KEPT: usize = 5;

/// One successful attempt of `client connect-probe`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlowAttempt {
    /// When it started, Unix milliseconds.
    pub at_ms: u64,
    /// Connect to echo.
    pub ms: f64,
}

impl ConnectProbeReport {
    /// Keeps `attempt` if it is among the slowest seen.
    pub fn record_success(&mut self, attempt: SlowAttempt) {
        self.slowest_ms = self.slowest_ms.max(attempt.ms);
        let at = self.slowest.partition_point(|kept| kept.ms >= attempt.ms);
        if at < SLOWEST_KEPT {
            self.slowest.insert(at, attempt);
            self.slowest.truncate(SLOWEST_KEPT);
        }
    }
}

/// Summarises latencies (microseconds); sorts `samples`.
pub fn summarize(samples: &mut [f64]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_by(f64::total_cmp);
    Latency {
        min: samples[0],
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        p50: percentile(samples, 50.0),
        p90: percentile(samples, 90.0),
        p99: percentile(samples, 99.0),
        p999: percentile(samples, 99.9),
        max: samples[samples.len() - 1],
    }
}

/// The distribution points of [`LoadReport::distribution`]; `sorted` must be sorted.
pub fn distribution(sorted: &[f64]) -> Vec<Quantile> {
    const POINTS: &[f64] = &[
        0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0,
    ];
    POINTS
        .iter()
        .map(|&p| Quantile {
            percentile: p,
            us: if sorted.is_empty() {
                0.0
            } else {
                percentile(sorted, p)
            },
        })
        .collect()
}

/// Nearest-rank percentile of sorted, non-empty samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    // The epsilon keeps 99.9% of 1000 at rank 999 although 0.999 * 1000 > 999 in binary.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let l = summarize(&mut samples);
        assert_eq!(
            (l.min, l.p50, l.p90, l.p99, l.p999, l.max),
            (1.0, 500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(l.mean, 500.5);
        let d = distribution(&samples);
        assert_eq!(d.first().unwrap().us, 1.0);
        assert_eq!(d.last().unwrap().us, 1000.0);
        assert_eq!(summarize(&mut []), Latency::default());
    }

    #[test]
    fn reports_keep_their_field_names() {
        // The JSON field names are a contract with the demo, scenarios and benchmarks.
        let v = serde_json::to_value(LoadReport::default()).unwrap();
        for field in [
            "mode",
            "protocol",
            "target",
            "ok",
            "connections",
            "rate",
            "payload_bytes",
            "duration_s",
            "requests",
            "errors",
            "achieved_rate",
            "latency_us",
            "distribution",
            "first_error",
            "error",
        ] {
            assert!(v.get(field).is_some(), "LoadReport lost {field}");
        }
        let l = serde_json::to_value(Latency::default()).unwrap();
        for field in ["min", "mean", "p50", "p90", "p99", "p999", "max"] {
            assert!(l.get(field).is_some(), "Latency lost {field}");
        }
    }
}
