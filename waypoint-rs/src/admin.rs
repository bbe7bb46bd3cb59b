//! The waypoint's part of `/config_dump` on 15000 (proxy-core's admin
//! server holds the workload store, certificates and configuration; the
//! `l7` section, from `config`, what the L7 configuration lists): under
//! `waypoint`, its own identity and address, the services and workloads
//! whose workload-API `waypoint` is this one (`bound`: what it serves while
//! istiod sends no `Waypoint` resource), the HTTP connections it holds to
//! endpoints, and the tunnels open now.

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
    /// Services and workloads bound to this waypoint in the workload API.
    pub fn bound(&self) -> Value {
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
            "bound": self.bound(),
            "upstreamConnections": self.proxy.upstream.connections(),
            "liveTunnels": self.drain.live(),
            "draining": self.drain.is_draining(),
        })
    }
}
