//! The waypoint's part of `/config_dump` on 15000 (proxy-core's admin
//! server holds the workload store, certificates and configuration): under
//! `waypoint`, its own identity and address, what it serves (the services
//! and workloads bound to it, with their ports and protocols), the HTTP
//! connections it holds to endpoints, and the tunnels open now.

use std::sync::Arc;

use api::SpiffeId;
use proxy_core::admin::DumpSection;
use serde_json::{Value, json};

use crate::drain::Drain;
use crate::inbound::{Me, is_me};
use crate::proxy::Proxy;

pub struct WaypointDump {
    pub proxy: Arc<Proxy>,
    pub me: Me,
    pub identity: SpiffeId,
    pub drain: Drain,
}

impl WaypointDump {
    /// Services and workloads bound to this waypoint.
    pub fn served(&self) -> Value {
        let snapshot = self.proxy.store.snapshot();
        let bound = |gw: &Option<proxy_core::store::GatewayAddress>| {
            gw.as_ref().is_some_and(|gw| is_me(&snapshot, &self.me, gw))
        };
        let mut services: Vec<Value> = snapshot
            .services()
            .filter(|s| bound(&s.waypoint))
            .map(|s| {
                json!({
                    "service": s.key().to_string(),
                    "vips": s.vips.iter().map(|v| v.address).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|p| json!({
                        "port": p.service_port,
                        "targetPort": p.target_port,
                        "protocol": "detect",
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        services.sort_by_key(|v| v["service"].to_string());
        let mut workloads: Vec<Value> = snapshot
            .workloads()
            .filter(|w| bound(&w.waypoint))
            .map(|w| json!({"uid": w.uid, "addresses": w.addresses, "protocol": "detect"}))
            .collect();
        workloads.sort_by_key(|v| v["uid"].to_string());
        json!({"services": services, "workloads": workloads})
    }
}

impl DumpSection for WaypointDump {
    fn key(&self) -> &'static str {
        "waypoint"
    }

    fn dump(&self) -> Value {
        json!({
            "identity": self.identity.to_string(),
            "address": self.me,
            "served": self.served(),
            "upstreamConnections": self.proxy.upstream.connections(),
            "liveTunnels": self.drain.live(),
            "draining": self.drain.is_draining(),
        })
    }
}
