//! What HBONE does about peers that break its limits or stop answering:
//! `istio_hbone_connections_dropped_total{side, reason}`, ours, with a
//! bounded label set (a misbehaving peer cannot add series). One per
//! process, shared by every pool and server; a pool or server built without
//! one counts into a private instance nobody reads.
//!
//! Streams h2 refuses on its own (over `max_concurrent_streams`, header
//! lists over the limit) are answered without reaching this crate and are
//! not counted one by one; a peer that keeps at it is disconnected after
//! `max_refused_streams` of them, and that is counted (`http2_limit`).

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Which end of the HBONE connection dropped it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    /// A pool's connection (we opened it).
    Client,
    /// A connection a server accepted.
    Server,
}

impl EncodeLabelValue for Side {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(
            w,
            match self {
                Side::Client => "client",
                Side::Server => "server",
            },
        )
    }
}

/// Why an HBONE connection was dropped (or, for a pool, retired: no new
/// streams on it).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// A PING went unanswered for the keepalive's `ping_timeout`.
    KeepaliveTimeout,
    /// A CONNECT on the connection was not answered within the pool's
    /// `connect_timeout`: the connection takes no new streams.
    ConnectTimeout,
    /// h2 closed it with ENHANCE_YOUR_CALM: the peer kept breaking a limit
    /// (streams over the concurrency limit, oversized or endless header
    /// blocks, rapid resets).
    Http2Limit,
    /// h2 closed it for another protocol violation by the peer.
    Http2Protocol,
}

impl DropReason {
    /// How h2 describes a connection it closed itself, if it did.
    pub(crate) fn of_h2(error: &h2::Error) -> Option<DropReason> {
        if !(error.is_go_away() && error.is_library()) {
            return None;
        }
        match error.reason() {
            Some(h2::Reason::NO_ERROR) | None => None,
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Some(DropReason::Http2Limit),
            Some(_) => Some(DropReason::Http2Protocol),
        }
    }
}

impl EncodeLabelValue for DropReason {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(
            w,
            match self {
                DropReason::KeepaliveTimeout => "keepalive_timeout",
                DropReason::ConnectTimeout => "connect_timeout",
                DropReason::Http2Limit => "http2_limit",
                DropReason::Http2Protocol => "http2_protocol",
            },
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    side: Side,
    reason: DropReason,
}

#[derive(Default)]
pub struct HboneMetrics {
    dropped: Family<DropLabels, Counter>,
}

impl fmt::Debug for HboneMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneMetrics").finish_non_exhaustive()
    }
}

impl HboneMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = HboneMetrics::default();
        registry.register(
            "hbone_connections_dropped",
            "HBONE connections dropped (or, by a pool, retired) for a peer's fault, by side and reason",
            metrics.dropped.clone(),
        );
        Arc::new(metrics)
    }

    pub(crate) fn dropped(&self, side: Side, reason: DropReason) {
        self.dropped
            .get_or_create(&DropLabels { side, reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_h2_closed_for_the_peer_s_fault_have_a_reason() {
        let calm = h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM);
        // A reason alone is a reset the user asked for, not h2's GOAWAY.
        assert_eq!(DropReason::of_h2(&calm), None);
        let registry = &mut crate::metrics::new_registry();
        let metrics = HboneMetrics::register(registry);
        metrics.dropped(Side::Server, DropReason::Http2Limit);
        metrics.dropped(Side::Client, DropReason::KeepaliveTimeout);
        let text = crate::metrics::encode(registry).unwrap();
        assert!(
            text.contains(
                "istio_hbone_connections_dropped_total{side=\"server\",reason=\"http2_limit\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "istio_hbone_connections_dropped_total{side=\"client\",reason=\"keepalive_timeout\"} 1"
            ),
            "{text}"
        );
    }
}
