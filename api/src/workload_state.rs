//! The `workloadState` key of a ztunnel's `/config_dump`: per proxied pod
//! (by uid), its state, who it is, and its live connections. ztunnel-rs
//! serializes it; `istioctl-rs ztunnel-config connections` reads it: one
//! definition, so the two cannot drift apart.
//!
//! The shape is upstream ztunnel's (`src/inpod/admin.rs`,
//! `WorkloadManagerAdminHandler`, key `workloadState`; each pod's
//! `connections` from `src/proxy/connection_manager.rs`, `inbound` and
//! `outbound` lists of `src`, `originalDst`, `actualDst`, `protocol`), so
//! upstream istioctl reads ours and we read upstream's. The identities,
//! byte counts and times of each connection are ours: upstream's dumps lack
//! them and they read as absent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `/config_dump` key, as upstream ztunnel names it.
pub const KEY: &str = "workloadState";

/// `workloadState`: by pod uid.
pub type WorkloadStates = BTreeMap<String, WorkloadState>;

/// One proxied pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadState {
    /// `Up` once the pod's listeners run (upstream also has `Pending`).
    pub state: String,
    #[serde(default)]
    pub connections: Connections,
    pub info: WorkloadInfo,
}

/// Who the pod is, as the node agent said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trust_domain: String,
}

/// The pod's live connections, each list in the order served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    /// Connections to the pod (from the pod's HBONE and plaintext listeners).
    #[serde(default)]
    pub inbound: Vec<Connection>,
    /// Connections the pod opened.
    #[serde(default)]
    pub outbound: Vec<Connection>,
}

/// One live connection. Addresses are `ip:port`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The client: the pod itself (outbound), or the peer the connection
    /// came from (inbound: the client's ztunnel or waypoint for HBONE).
    pub src: String,
    /// Outbound: the address the application dialled (a service VIP, say).
    /// Inbound: the service the peer addressed, when it is one (upstream
    /// puts the service's hostname here); absent otherwise.
    #[serde(default)]
    pub original_dst: Option<String>,
    /// Where the bytes go: the next hop (outbound: a peer's HBONE port, or
    /// the destination itself for plain TCP) or the application in the pod
    /// (inbound).
    pub actual_dst: String,
    /// `HBONE` or `TCP`.
    pub protocol: String,
    /// The client's SPIFFE identity, when mutual TLS proved it (HBONE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_identity: Option<String>,
    /// The server's SPIFFE identity, when mutual TLS proved it (HBONE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<String>,
    /// Bytes the pod sent on this connection so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    /// Bytes the pod received on this connection so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// When the connection started, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// How long it has been open when the dump was served, in milliseconds
    /// (from the proxy's own clock, so no clock skew enters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_s_shape_reads_with_our_fields_absent() {
        let upstream = r#"{"uid1":{"state":"Up","connections":{"inbound":[
            {"src":"10.0.0.1:5000","originalDst":null,"actualDst":"10.0.0.2:9080","protocol":"HBONE"}],
            "outbound":[]},"info":{"name":"p","namespace":"ns","serviceAccount":"sa","trustDomain":""}}}"#;
        let states: WorkloadStates = serde_json::from_str(upstream).unwrap();
        let c = &states["uid1"].connections.inbound[0];
        assert_eq!(c.actual_dst, "10.0.0.2:9080");
        assert_eq!(c.bytes_sent, None);
        assert_eq!(c.src_identity, None);
    }
}
