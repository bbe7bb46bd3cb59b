//! A synthetic cluster for benchmarks and scale tests (not for production
//! use): `pods` pods spread over `nodes` nodes and ten namespaces, fronted by
//! `services` services, with the mix of features the translation handles
//! (enrolled and unenrolled namespaces, named target ports, a waypoint,
//! selector and namespace policies, a mesh-wide STRICT PeerAuthentication).

use api::manifest::Object;
use serde_json::json;

use crate::state::ClusterState;

const NAMESPACES: usize = 10;

fn object(value: serde_json::Value) -> Object {
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    let decoded = match kind.as_str() {
        "Namespace" => serde_json::from_value(value).map(Object::Namespace),
        "Node" => serde_json::from_value(value).map(Object::Node),
        "Pod" => serde_json::from_value(value).map(Object::Pod),
        "Service" => serde_json::from_value(value).map(Object::Service),
        "Gateway" => serde_json::from_value(value).map(Object::Gateway),
        "AuthorizationPolicy" => serde_json::from_value(value).map(Object::AuthorizationPolicy),
        "PeerAuthentication" => serde_json::from_value(value).map(Object::PeerAuthentication),
        other => panic!("the generator does not make {other} objects"),
    };
    decoded.unwrap_or_else(|e| panic!("generated {kind} does not decode: {e}"))
}

/// Generates the cluster. Deterministic: the same sizes give the same state.
pub fn synthetic_cluster(pods: usize, services: usize, nodes: usize) -> ClusterState {
    let services = services.max(1);
    let nodes = nodes.max(1);
    let mut objects = Vec::with_capacity(pods + services + nodes + 64);
    for n in 0..NAMESPACES {
        let mut labels = serde_json::Map::new();
        if n % 2 == 0 {
            labels.insert("istio.io/dataplane-mode".into(), json!("ambient"));
        }
        if n == 0 {
            labels.insert("istio.io/use-waypoint".into(), json!("waypoint"));
        }
        objects.push(object(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{n}"), "labels": labels},
        })));
        objects.push(object(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-frontends", "namespace": format!("ns-{n}")},
            "spec": {
                "selector": {"matchLabels": {"tier": "backend"}},
                "rules": [{
                    "from": [{"source": {"namespaces": [format!("ns-{n}"), "istio-system"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }],
            },
        })));
        objects.push(object(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-blocked", "namespace": format!("ns-{n}")},
            "spec": {
                "action": "DENY",
                "rules": [{"from": [{"source": {"ipBlocks": ["192.0.2.0/24"]}}]}],
            },
        })));
    }
    objects.push(object(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    })));
    objects.push(object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "ns-0"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
        "status": {"addresses": [{"type": "Hostname", "value": "waypoint.ns-0.svc.cluster.local"}]},
    })));
    for n in 0..nodes {
        objects.push(object(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": format!("node-{n}"),
                "labels": {"topology.kubernetes.io/region": "region-1", "topology.kubernetes.io/zone": format!("zone-{}", n % 3)},
            },
        })));
    }
    for s in 0..services {
        objects.push(object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": format!("ns-{}", s % NAMESPACES)},
            "spec": {
                "selector": {"app": format!("svc-{s}")},
                "clusterIP": format!("10.96.{}.{}", s / 256, s % 256),
                "clusterIPs": [format!("10.96.{}.{}", s / 256, s % 256)],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "metrics", "port": 9090, "targetPort": 9090},
                ],
            },
        })));
    }
    for p in 0..pods {
        let s = p % services;
        let ip = 0x0a80_0000u32 + p as u32;
        objects.push(object(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("svc-{s}-{p}"),
                "namespace": format!("ns-{}", s % NAMESPACES),
                "generateName": format!("svc-{s}-5d9c7b-"),
                "labels": {"app": format!("svc-{s}"), "tier": if p % 2 == 0 { "backend" } else { "frontend" }, "version": "v1", "pod-template-hash": "5d9c7b"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("svc-{s}-5d9c7b"), "uid": format!("rs-{s}"), "controller": true}],
            },
            "spec": {
                "nodeName": format!("node-{}", p % nodes),
                "serviceAccountName": format!("svc-{s}"),
                "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
            "status": {
                "phase": "Running",
                "podIP": std::net::Ipv4Addr::from(ip).to_string(),
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        })));
    }
    ClusterState::from_objects(objects)
}
