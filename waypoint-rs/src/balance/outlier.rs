//! Outlier detection: a per-endpoint state machine fed with each attempt's
//! outcome, ejecting endpoints that fail repeatedly and returning them after
//! `base_ejection_time × times ejected`. The clock is passed in (`now`), so
//! tests drive time by hand.
//!
//! Semantics follow Envoy's consecutive-error detectors as istiod programs
//! them (istio/istio `cluster_traffic_policy.go`, `applyOutlierDetection`):
//! - consecutive 5xx: on unless set to 0 (Envoy's default 5);
//! - consecutive gateway errors (502/503/504 and connection failures): off
//!   unless set (istiod enforces it only when given);
//! - local-origin failures (connect failure, reset, timeout) count as 5xx /
//!   gateway errors unless `split_external_local_origin_errors`, then they
//!   have their own counter (Envoy's default 5);
//! - `interval` (10 s): sweeps run every interval from the detector's start;
//!   an ejected endpoint returns at the first sweep after its time is up,
//!   and an endpoint that stayed healthy for a sweep has its ejection count
//!   lowered;
//! - `max_ejection_percent` (10): no new ejection while that share is
//!   ejected already (so at least one endpoint can always be ejected);
//! - `min_health_percent` (istiod's default 0, i.e. no panic): below it,
//!   every endpoint is used regardless of ejection ("panic mode").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::l7;

use crate::config::convert;
use crate::request::{FieldError, FromProto};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// 0: off.
    pub consecutive_5xx: u32,
    /// 0: off.
    pub consecutive_gateway_errors: u32,
    pub split_local_origin: bool,
    /// Used only when `split_local_origin`; 0: off.
    pub consecutive_local_origin_failures: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Longest one ejection may last (Envoy's `max_ejection_time`, 300 s).
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            split_local_origin: false,
            consecutive_local_origin_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

impl FromProto<l7::OutlierDetection> for OutlierConfig {
    fn from_proto(p: &l7::OutlierDetection) -> Result<Self, FieldError> {
        let d = OutlierConfig::default();
        let percent = |field: &str, v: Option<u32>, default: u32| match v {
            Some(v) if v > 100 => Err(FieldError::new(field, format!("{v} is more than 100"))),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let positive = |field: &str, v: Option<&prost_types::Duration>, default: Duration| {
            match convert::optional_duration(field, v)? {
                Some(d) if d.is_zero() => Err(FieldError::new(field, "must be above 0")),
                Some(d) => Ok(d),
                None => Ok(default),
            }
        };
        Ok(OutlierConfig {
            consecutive_5xx: p.consecutive_5xx_errors.unwrap_or(d.consecutive_5xx),
            consecutive_gateway_errors: p.consecutive_gateway_errors.unwrap_or(0),
            split_local_origin: p.split_external_local_origin_errors,
            consecutive_local_origin_failures: p
                .consecutive_local_origin_failures
                .unwrap_or(d.consecutive_local_origin_failures),
            interval: positive("interval", p.interval.as_ref(), d.interval)?,
            base_ejection_time: positive(
                "base_ejection_time",
                p.base_ejection_time.as_ref(),
                d.base_ejection_time,
            )?,
            max_ejection_time: d.max_ejection_time,
            max_ejection_percent: percent(
                "max_ejection_percent",
                p.max_ejection_percent,
                d.max_ejection_percent,
            )?,
            min_health_percent: percent(
                "min_health_percent",
                p.min_health_percent,
                d.min_health_percent,
            )?,
        })
    }
}

/// What one attempt to an endpoint ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// The waypoint could not reach it or lost it: connect failure, reset,
    /// timeout (Envoy's local-origin errors).
    LocalOriginFailure,
    /// The connection to it was made (local-origin success).
    LocalOriginSuccess,
}

#[derive(Clone, Debug, Default)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejections: u32,
    ejected_at: Option<Instant>,
}

/// The detector of one destination (its DestinationRule's settings).
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    state: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: HashMap<String, EndpointState>,
    last_sweep: Instant,
}

impl OutlierDetector {
    pub fn new(config: OutlierConfig, now: Instant) -> Self {
        OutlierDetector {
            config,
            state: Mutex::new(Inner {
                endpoints: HashMap::new(),
                last_sweep: now,
            }),
        }
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one attempt's outcome for `uid`, among `total` endpoints of
    /// the destination. Returns true when this outcome ejected it.
    pub fn record(&self, uid: &str, outcome: Outcome, total: usize, now: Instant) -> bool {
        let c = self.config;
        let mut inner = self.lock();
        self.sweep(&mut inner, now);
        let ejected_now = inner
            .endpoints
            .values()
            .filter(|e| e.ejected_at.is_some())
            .count();
        let e = inner.endpoints.entry(uid.to_string()).or_default();
        // The outcome as an HTTP-level result: local-origin failures count as
        // 503 unless split.
        let status = match outcome {
            Outcome::Status(s) => Some(s),
            Outcome::LocalOriginFailure if !c.split_local_origin => Some(503),
            Outcome::LocalOriginFailure => {
                e.consecutive_local += 1;
                None
            }
            Outcome::LocalOriginSuccess => {
                e.consecutive_local = 0;
                None
            }
        };
        if let Some(s) = status {
            if (500..600).contains(&s) {
                e.consecutive_5xx += 1;
                if matches!(s, 502..=504) {
                    e.consecutive_gateway += 1;
                } else {
                    e.consecutive_gateway = 0;
                }
            } else {
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
            }
        }
        let tripped = (c.consecutive_5xx > 0 && e.consecutive_5xx >= c.consecutive_5xx)
            || (c.consecutive_gateway_errors > 0
                && e.consecutive_gateway >= c.consecutive_gateway_errors)
            || (c.split_local_origin
                && c.consecutive_local_origin_failures > 0
                && e.consecutive_local >= c.consecutive_local_origin_failures);
        if !tripped || e.ejected_at.is_some() {
            return false;
        }
        // Counters restart either way: a refused ejection needs a new run.
        e.consecutive_5xx = 0;
        e.consecutive_gateway = 0;
        e.consecutive_local = 0;
        let total = total.max(1);
        if ejected_now * 100 / total >= c.max_ejection_percent as usize {
            return false;
        }
        e.ejections += 1;
        e.ejected_at = Some(now);
        true
    }

    /// Runs the interval sweeps due by `now`, on a fixed schedule from the
    /// detector's start (as a timer would): ejected endpoints whose time is up
    /// at a sweep return; healthy ones have their ejection count lowered by
    /// one per sweep.
    fn sweep(&self, inner: &mut Inner, now: Instant) {
        let c = self.config;
        let elapsed = now.saturating_duration_since(inner.last_sweep);
        let ticks = (elapsed.as_nanos() / c.interval.as_nanos().max(1)) as u32;
        if ticks == 0 {
            return;
        }
        let tick = inner.last_sweep + c.interval.saturating_mul(ticks);
        inner.last_sweep = tick;
        for e in inner.endpoints.values_mut() {
            match e.ejected_at {
                Some(at) => {
                    let time = c
                        .base_ejection_time
                        .saturating_mul(e.ejections)
                        .min(c.max_ejection_time.max(c.base_ejection_time));
                    if tick.saturating_duration_since(at) >= time {
                        e.ejected_at = None;
                    }
                }
                None => e.ejections = e.ejections.saturating_sub(ticks),
            }
        }
        inner.endpoints.retain(|_, e| {
            e.ejected_at.is_some()
                || e.ejections > 0
                || e.consecutive_5xx > 0
                || e.consecutive_gateway > 0
                || e.consecutive_local > 0
        });
    }

    pub fn is_ejected(&self, uid: &str, now: Instant) -> bool {
        let mut inner = self.lock();
        self.sweep(&mut inner, now);
        inner
            .endpoints
            .get(uid)
            .is_some_and(|e| e.ejected_at.is_some())
    }

    /// Which of `uids` may take traffic now. In panic mode (fewer than
    /// `min_health_percent` healthy) all may.
    pub fn usable(&self, uids: &[&str], now: Instant) -> Vec<bool> {
        let mut inner = self.lock();
        self.sweep(&mut inner, now);
        let healthy: Vec<bool> = uids
            .iter()
            .map(|u| {
                inner
                    .endpoints
                    .get(*u)
                    .is_none_or(|e| e.ejected_at.is_none())
            })
            .collect();
        let n = healthy.iter().filter(|h| **h).count();
        if !uids.is_empty() && n * 100 < self.config.min_health_percent as usize * uids.len() {
            return vec![true; uids.len()];
        }
        healthy
    }

    /// `(uid, times ejected, ejected now)` for `/config_dump`.
    pub fn dump(&self) -> Vec<(String, u32, bool)> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .endpoints
            .iter()
            .map(|(uid, e)| (uid.clone(), e.ejections, e.ejected_at.is_some()))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests;
