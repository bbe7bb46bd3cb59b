//! Tries of one request: per-try timeout, retries on the policy's status
//! codes and on connection failures, resets and per-try timeouts (Istio's
//! default route retry policy, `pilot/pkg/networking/core/route/retry/retry.go`
//! `DefaultPolicy`: 2 retries on `connect-failure,refused-stream,
//! unavailable,cancelled,retriable-status-codes` with 503, preferring hosts
//! not tried yet), exponential backoff with jitter from the policy's base
//! up to 10x (Envoy's `base_interval` / `max_interval` default), and a
//! bounded body that can be sent again.
//!
//! A retry takes a place in the destination's retry budget
//! (`connectionPool.http.maxRetries`: retries in progress at once) from
//! its backoff to the end of its try; with the budget spent, the try's
//! answer or failure is final, as when the attempts have run out.
//!
//! Only a body known to be complete and small when the request arrives is
//! kept for replay (no body, or a `content-length` within the limit); a
//! streaming body is sent once and its request is not retried, as Envoy
//! does once its `per_request_buffer_limit_bytes` is exceeded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use proxy_core::store::Workload;

use super::{Body, BoxError, Destination, Error, Upstream};
use crate::request::ResponseFlag;

/// When to try again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Answers retried (HTTP statuses).
    pub codes: Vec<u16>,
    /// Answers retried (gRPC statuses, from `grpc-status` in the headers).
    pub grpc_codes: Vec<u32>,
    /// The endpoint could not be reached (connect-failure).
    pub on_connect_failure: bool,
    /// The endpoint's connection ended before the answer (reset,
    /// refused-stream), or a try ran past the per-try timeout.
    pub on_reset: bool,
    /// First backoff.
    pub backoff: Duration,
}

impl RetryPolicy {
    /// Istio's default route policy (`DefaultPolicy`): 2 retries on
    /// connect-failure, refused-stream, unavailable (14), cancelled (1) and
    /// 503. Ours also retries resets and per-try timeouts (of replayable
    /// requests only).
    pub fn istio_default(attempts: u32, backoff: Duration) -> Self {
        RetryPolicy {
            attempts,
            codes: vec![503],
            grpc_codes: vec![1, 14],
            on_connect_failure: true,
            on_reset: true,
            backoff,
        }
    }

    /// A route's policy (`HTTPRoute.retry`, VirtualService `retries`);
    /// `backoff` when the route gives none.
    pub fn from_route(route: &crate::http::route::RetryPolicy, backoff: Duration) -> Self {
        RetryPolicy {
            attempts: route.attempts,
            codes: route.codes.clone(),
            grpc_codes: route.grpc_codes.clone(),
            on_connect_failure: route.on_connect_failure,
            on_reset: route.on_reset || route.on_refused_stream,
            backoff: route.backoff.unwrap_or(backoff),
        }
    }

    fn retries(&self, error: &Error) -> bool {
        match error {
            Error::Certificate(_)
            | Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::Handshake { .. } => self.on_connect_failure,
            Error::Request { .. } | Error::PerTryTimeout { .. } => self.on_reset,
            _ => false,
        }
    }
}

/// A request body as the tries see it.
pub enum RequestBody {
    /// Complete and small: every try sends a copy.
    Replayable {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Sent by the first try only.
    Once(Option<Body>),
}

impl RequestBody {
    /// Reads `body` whole when it is complete-and-small by its own account;
    /// else leaves it streaming.
    pub async fn prepare(body: Body, limit: usize) -> Result<RequestBody, Error> {
        let small = body.size_hint().exact().is_some_and(|n| n <= limit as u64);
        if !(body.is_end_stream() || small) {
            return Ok(RequestBody::Once(Some(body)));
        }
        let collected = body.collect().await.map_err(Error::Downstream)?;
        let trailers = collected.trailers().cloned();
        Ok(RequestBody::Replayable {
            data: collected.to_bytes(),
            trailers,
        })
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable { .. })
    }

    /// A copy for a mirror: only a replayable body can be sent twice.
    pub fn copy(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Replayable { data, trailers } => Some(RequestBody::Replayable {
                data: data.clone(),
                trailers: trailers.clone(),
            }),
            RequestBody::Once(_) => None,
        }
    }

    /// The body for the next try.
    fn for_try(&mut self) -> Body {
        match self {
            RequestBody::Replayable { data, trailers } => {
                let data = Full::new(data.clone()).map_err(|never| match never {});
                match trailers.clone() {
                    Some(t) => data
                        .with_trailers(std::future::ready(Some(Ok::<_, BoxError>(t))))
                        .boxed(),
                    None => data.map_err(|e: BoxError| e).boxed(),
                }
            }
            RequestBody::Once(body) => body.take().unwrap_or_else(empty),
        }
    }
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// What an endpoint answered.
pub struct Forwarded {
    pub response: http::Response<Body>,
    pub endpoint: Arc<Workload>,
    /// `URX` when the answer is a retriable one after the last retry.
    pub flag: ResponseFlag,
    /// Tries made (1 = no retry).
    pub tries: u32,
}

/// Why no endpoint answered.
pub struct Failure {
    pub error: Error,
    /// The endpoint of the last try, if one was picked.
    pub endpoint: Option<Arc<Workload>>,
    pub flag: ResponseFlag,
}

/// Head of a request, copied for every try.
#[derive(Clone)]
pub struct Head {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
}

impl Head {
    pub fn request(&self, body: Body) -> http::Request<Body> {
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

fn retried_answer(policy: &RetryPolicy, response: &http::Response<Body>) -> bool {
    let status = response.status().as_u16();
    policy.codes.contains(&status)
        || response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
            .is_some_and(|s| policy.grpc_codes.contains(&s))
}

/// Sends the request to the destination's endpoints until one answers
/// with something the policy does not retry, or the tries run out.
pub async fn forward(
    upstream: &Upstream,
    destination: &Destination,
    head: Head,
    mut body: RequestBody,
    policy: &RetryPolicy,
    per_try_timeout: Option<Duration>,
) -> Result<Forwarded, Failure> {
    let retries = if body.replayable() {
        policy.attempts
    } else {
        0
    };
    let mut backoff = backon::ExponentialBuilder::default()
        .with_min_delay(policy.backoff)
        .with_max_delay(policy.backoff * 10)
        .with_jitter()
        .with_max_times(retries as usize)
        .build();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut tries = 0u32;
    // The retry in progress' place in the destination's retry budget.
    let mut retrying = None;
    loop {
        tries += 1;
        let (endpoint, picked) = match upstream.pick(destination, &tried) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                return Err(Failure {
                    flag: error.flag(),
                    error,
                    endpoint: None,
                });
            }
        };
        tried.push(endpoint.target);
        let request = head.request(body.for_try());
        let sent = upstream.send(destination, endpoint, request);
        let result = match per_try_timeout {
            Some(timeout) => {
                tokio::time::timeout(timeout, sent)
                    .await
                    .unwrap_or(Err(Error::PerTryTimeout {
                        endpoint: endpoint.target,
                        timeout,
                    }))
            }
            None => sent.await,
        };
        destination.record(endpoint, &result);
        drop(picked);
        drop(retrying.take());
        let mut retry_left = tries <= retries;
        let retried = match &result {
            Ok(response) => retried_answer(policy, response),
            Err(error) => policy.retries(error),
        };
        if retried && retry_left {
            match destination.limits.retry() {
                Some(place) => retrying = Some(place),
                None => {
                    tracing::debug!(destination = %destination.limits.name, "retry budget (maxRetries) spent: not retrying");
                    retry_left = false;
                }
            }
        }
        match result {
            Ok(response) if retried_answer(policy, &response) => {
                if retry_left && let Some(delay) = backoff.next() {
                    tracing::debug!(endpoint = %endpoint.target, status = %response.status(), "retrying");
                    drop(response);
                    tokio::time::sleep(delay).await;
                    continue;
                }
                let flag = if tries > 1 {
                    ResponseFlag::UpstreamRetryLimitExceeded
                } else {
                    ResponseFlag::None
                };
                return Ok(Forwarded {
                    response,
                    endpoint: endpoint.workload.clone(),
                    flag,
                    tries,
                });
            }
            Ok(response) => {
                return Ok(Forwarded {
                    response,
                    endpoint: endpoint.workload.clone(),
                    flag: ResponseFlag::None,
                    tries,
                });
            }
            Err(error) if policy.retries(&error) && retry_left => {
                if let Some(delay) = backoff.next() {
                    tracing::debug!(endpoint = %endpoint.target, %error, "retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                return Err(failure(error, endpoint.workload.clone(), tries, true));
            }
            Err(error) => {
                let retried = policy.retries(&error);
                return Err(failure(error, endpoint.workload.clone(), tries, retried));
            }
        }
    }
}

fn failure(error: Error, endpoint: Arc<Workload>, tries: u32, retriable: bool) -> Failure {
    let flag = if tries > 1 && retriable {
        ResponseFlag::UpstreamRetryLimitExceeded
    } else {
        error.flag()
    };
    Failure {
        error,
        endpoint: Some(endpoint),
        flag,
    }
}
