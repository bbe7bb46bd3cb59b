//! VirtualService fault injection: a delay and/or an abort, each applied to
//! a share of requests given in millionths. The decision is pure: the data
//! path passes its rng and sleeps / answers as told.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use rand::Rng;

use api::l7;

use crate::config::convert;
use crate::request::{FieldError, FromProto, Refusal, ResponseFlag};

/// Body of an injected abort (Envoy's fault filter local reply).
pub const ABORT_BODY: &str = "fault filter abort";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delay {
    pub delay: Duration,
    pub per_million: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    pub status: AbortStatus,
    pub per_million: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortStatus {
    Http(StatusCode),
    /// A gRPC status: HTTP 200 with `grpc-status` (trailers-only response).
    Grpc(u32),
}

impl FromProto<l7::Fault> for Fault {
    fn from_proto(p: &l7::Fault) -> Result<Self, FieldError> {
        let delay = p
            .delay
            .as_ref()
            .map(|d| {
                Ok::<_, FieldError>(Delay {
                    delay: convert::duration(
                        "delay.delay",
                        d.delay.as_ref().ok_or_else(|| {
                            FieldError::new("delay.delay", "a delay needs a duration")
                        })?,
                    )?,
                    per_million: convert::per_million("delay.per_million", d.per_million)?,
                })
            })
            .transpose()?;
        let abort = p
            .abort
            .as_ref()
            .map(|a| {
                use l7::fault::abort::Status;
                let status = match a.status {
                    Some(Status::HttpStatus(code)) => AbortStatus::Http(
                        u16::try_from(code)
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .filter(|c| c.as_u16() >= 200)
                            .ok_or_else(|| {
                                FieldError::new(
                                    "abort.http_status",
                                    format!("{code} is not an HTTP status in 200-599"),
                                )
                            })?,
                    ),
                    Some(Status::GrpcStatus(code)) if code <= 16 => AbortStatus::Grpc(code),
                    Some(Status::GrpcStatus(code)) => {
                        return Err(FieldError::new(
                            "abort.grpc_status",
                            format!("{code} is not a gRPC status code (0-16)"),
                        ));
                    }
                    None => {
                        return Err(FieldError::new(
                            "abort.status",
                            "one of http_status, grpc_status is required",
                        ));
                    }
                };
                Ok(Abort {
                    status,
                    per_million: convert::per_million("abort.per_million", a.per_million)?,
                })
            })
            .transpose()?;
        Ok(Fault { delay, abort })
    }
}

/// What to do to one request.
#[derive(Clone, Debug, Default)]
pub struct Injection {
    /// Wait this long before going on (flag DI).
    pub delay: Option<Duration>,
    /// Answer with this instead of forwarding (flag FI), after the delay.
    pub abort: Option<Refusal>,
}

impl Fault {
    /// Draws the delay and the abort independently, as Envoy's fault filter
    /// does, each with its own share.
    pub fn decide(&self, rng: &mut impl Rng) -> Injection {
        let delay = self
            .delay
            .as_ref()
            .filter(|d| super::drawn(d.per_million, rng))
            .map(|d| d.delay);
        let abort = self
            .abort
            .as_ref()
            .filter(|a| super::drawn(a.per_million, rng))
            .map(|a| a.refusal());
        Injection { delay, abort }
    }
}

impl Abort {
    pub fn refusal(&self) -> Refusal {
        match self.status {
            AbortStatus::Http(status) => Refusal {
                status,
                body: ABORT_BODY.into(),
                flag: ResponseFlag::FaultInjected,
                headers: HeaderMap::new(),
            },
            AbortStatus::Grpc(code) => {
                let mut headers = HeaderMap::new();
                headers.insert("content-type", HeaderValue::from_static("application/grpc"));
                headers.insert("grpc-status", HeaderValue::from(code));
                headers.insert("grpc-message", HeaderValue::from_static(ABORT_BODY));
                Refusal {
                    status: StatusCode::OK,
                    body: "".into(),
                    flag: ResponseFlag::FaultInjected,
                    headers,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
