//! What the xDS client reports about itself: for readiness ("first full
//! state received") and for the admin server (connection state, last NACK).

use std::collections::BTreeMap;

use tokio::sync::watch;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    pub connection: ConnectionState,
    /// Every subscribed type has received its first response (ever: a later
    /// disconnection does not undo it, the proxy serves its last state).
    pub synced: bool,
    /// Streams opened since start, the first included.
    pub connection_attempts: u64,
    /// Why the last stream ended, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Received a first response.
    pub synced: bool,
    /// Resources held (accepted and not removed).
    pub resources: usize,
    pub acks: u64,
    pub nacks: u64,
    /// The `error_detail` of the last NACK sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum ConnectionState {
    #[default]
    Connecting,
    Connected,
    /// Waiting to reconnect; the proxy keeps serving its last state.
    Disconnected,
    Stopped,
}

/// A live view of the client's [`XdsStatus`]; clone it freely.
#[derive(Clone, Debug)]
pub struct StatusWatch {
    rx: watch::Receiver<XdsStatus>,
}

impl StatusWatch {
    pub(super) fn new(rx: watch::Receiver<XdsStatus>) -> Self {
        StatusWatch { rx }
    }

    pub fn current(&self) -> XdsStatus {
        self.rx.borrow().clone()
    }

    /// Resolves once every subscribed type has received its first response
    /// (immediately if that already happened); never if the client stops
    /// before that.
    pub async fn synced(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|s| s.synced).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when the status next changes, returning it; `None` once the
    /// client is gone.
    pub async fn changed(&mut self) -> Option<XdsStatus> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}
