//! Draining on SIGTERM: the waypoint stops being ready, refuses new
//! CONNECTs (the HBONE server sends GOAWAY and answers stragglers 503),
//! asks every inner HTTP connection to finish (HTTP/2 GOAWAY, HTTP/1.1
//! `Connection: close` after the request in flight), and waits for live
//! tunnels to end, up to the drain deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Shared by the inbound handler and the app. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    signal: CancellationToken,
    live: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves once draining starts.
    pub async fn signaled(&self) {
        self.signal.cancelled().await
    }

    /// Held by each accepted tunnel until it ends.
    pub fn track(&self) -> TaskTrackerToken {
        self.live.token()
    }

    /// Tunnels still open.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Starts draining and waits for every tunnel to end, at most
    /// `deadline`. True if they all ended in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.signal.cancel();
        self.live.close();
        tokio::time::timeout(deadline, self.live.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_live_tunnels_up_to_the_deadline() {
        let drain = Drain::new();
        let token = drain.track();
        assert!(!drain.is_draining());
        let finished = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain(Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        assert!(drain.is_draining());
        drop(token);
        assert!(finished.await.unwrap());

        let stuck = Drain::new();
        let _token = stuck.track();
        // A tunnel that never ends: the deadline ends the wait.
        assert!(!stuck.drain(Duration::from_millis(10)).await);
    }
}
