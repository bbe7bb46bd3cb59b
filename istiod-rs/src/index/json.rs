//! A readable JSON view of served resources: IPs as text, enums by name,
//! fields named as in the proto's JSON mapping (lowerCamelCase), defaults
//! left out (as proto3 JSON does). Used by the fixture goldens and by
//! `/debug/config_dump`.

use std::net::IpAddr;

use api::l7::{self as l7p, HttpAuthorization, JwtAuthentication, RouteTable, Waypoint};
use api::security::{self, Authorization, string_match::MatchType};
use api::type_url;
use api::workload::{
    self, Address, GatewayAddress, NetworkAddress, PortList, address, gateway_address,
};
use prost::Message;
use serde_json::{Map, Value, json};

use crate::snapshot::{Resource, Snapshot};

/// Every resource of the snapshot, by kind then key:
/// `{"workloads": {uid: ..}, "services": {key: ..}, "authorizations": {key: ..}}`,
/// and, when there are any, the waypoints' configuration: `"waypoints"`,
/// `"routeTables"`, `"httpAuthorizations"`, `"jwtAuthentications"`.
pub fn snapshot_json(snapshot: &Snapshot) -> Value {
    let mut out = json!({"workloads": {}, "services": {}, "authorizations": {}});
    for url in snapshot.type_urls() {
        for (name, r) in snapshot.of_type(url) {
            let (group, value) = decode(r);
            if out.get(group).is_none() {
                out[group] = json!({});
            }
            out[group][name] = value;
        }
    }
    out
}

/// One resource as JSON; a body that does not decode says so.
pub fn resource_json(r: &Resource) -> Value {
    decode(r).1
}

/// The resource's group in [`snapshot_json`] and its JSON.
fn decode(r: &Resource) -> (&'static str, Value) {
    let bytes = r.body.value.as_slice();
    let decoded = match r.body.type_url.as_str() {
        type_url::ADDRESS => Address::decode(bytes).ok().and_then(|a| match a.r#type? {
            address::Type::Workload(w) => Some(("workloads", workload_json(&w))),
            address::Type::Service(s) => Some(("services", service_json(&s))),
        }),
        type_url::AUTHORIZATION => Authorization::decode(bytes)
            .ok()
            .map(|a| ("authorizations", authorization_json(&a))),
        type_url::WAYPOINT => Waypoint::decode(bytes)
            .ok()
            .map(|w| ("waypoints", waypoint_json(&w))),
        type_url::ROUTE_TABLE => RouteTable::decode(bytes)
            .ok()
            .map(|t| ("routeTables", route_table_json(&t))),
        type_url::HTTP_AUTHORIZATION => HttpAuthorization::decode(bytes)
            .ok()
            .map(|a| ("httpAuthorizations", http_authorization_json(&a))),
        type_url::JWT_AUTHENTICATION => JwtAuthentication::decode(bytes)
            .ok()
            .map(|j| ("jwtAuthentications", jwt_json(&j))),
        type_url::TRAFFIC_POLICY => api::l7::TrafficPolicy::decode(bytes)
            .ok()
            .map(|p| ("trafficPolicies", super::traffic::json(&p))),
        _ => None,
    };
    decoded.unwrap_or_else(|| {
        (
            "undecodable",
            json!({"error": format!("cannot decode a {} resource", r.body.type_url)}),
        )
    })
}

/// Builds an object, leaving out empty values.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn put(mut self, key: &str, value: impl Into<Value>) -> Self {
        let v = value.into();
        let empty = match &v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_u64() == Some(0),
        };
        if !empty {
            self.0.insert(key.to_string(), v);
        }
        self
    }

    /// A value shown even when zero, where zero means something (no
    /// retries) that its absence (the default policy) does not.
    fn always(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.to_string(), value.into());
        self
    }

    /// Enums are always shown: their zero value (e.g. HEALTHY) is meaningful to a reader.
    fn name(mut self, key: &str, name: &str) -> Self {
        self.0
            .insert(key.to_string(), Value::String(name.to_string()));
        self
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn ip_text(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::from(v6).to_string()
    } else {
        format!("invalid address of {} bytes", bytes.len())
    }
}

fn network_address(a: &NetworkAddress) -> Value {
    Obj::default()
        .put("network", a.network.clone())
        .put("address", ip_text(&a.address))
        .done()
}

fn gateway_json(g: &Option<GatewayAddress>) -> Value {
    let Some(g) = g else {
        return Value::Null;
    };
    let o = match &g.destination {
        Some(gateway_address::Destination::Hostname(h)) => Obj::default().put(
            "hostname",
            json!({"namespace": h.namespace, "hostname": h.hostname}),
        ),
        Some(gateway_address::Destination::Address(a)) => {
            Obj::default().put("address", network_address(a))
        }
        None => Obj::default(),
    };
    o.put("hboneMtlsPort", g.hbone_mtls_port).done()
}

fn ports_json(ports: &[workload::Port]) -> Value {
    ports
        .iter()
        .map(|p| {
            let mut o = json!({"servicePort": p.service_port, "targetPort": p.target_port});
            if p.app_protocol() != workload::AppProtocol::Unknown {
                o["appProtocol"] = p.app_protocol().as_str_name().into();
            }
            o
        })
        .collect()
}

fn workload_json(w: &workload::Workload) -> Value {
    let services: Map<String, Value> = w
        .services
        .iter()
        .map(|(k, PortList { ports })| (k.clone(), ports_json(ports)))
        .collect();
    Obj::default()
        .put("uid", w.uid.clone())
        .put("name", w.name.clone())
        .put("namespace", w.namespace.clone())
        .put(
            "addresses",
            w.addresses.iter().map(|a| ip_text(a)).collect::<Vec<_>>(),
        )
        .put("hostname", w.hostname.clone())
        .put("network", w.network.clone())
        .name("tunnelProtocol", w.tunnel_protocol().as_str_name())
        .put("nativeTunnel", w.native_tunnel)
        .put("trustDomain", w.trust_domain.clone())
        .put("serviceAccount", w.service_account.clone())
        .put("waypoint", gateway_json(&w.waypoint))
        .put("node", w.node.clone())
        .put("canonicalName", w.canonical_name.clone())
        .put("canonicalRevision", w.canonical_revision.clone())
        .name("workloadType", w.workload_type().as_str_name())
        .put("workloadName", w.workload_name.clone())
        .put("authorizationPolicies", w.authorization_policies.clone())
        .name("status", w.status().as_str_name())
        .put("clusterId", w.cluster_id.clone())
        .put("services", Value::Object(services))
        .put(
            "locality",
            w.locality.as_ref().map(|l| {
                Obj::default()
                    .put("region", l.region.clone())
                    .put("zone", l.zone.clone())
                    .put("subzone", l.subzone.clone())
                    .done()
            }),
        )
        .name("networkMode", w.network_mode().as_str_name())
        .put("capacity", w.capacity)
        .done()
}

fn service_json(s: &workload::Service) -> Value {
    Obj::default()
        .put("name", s.name.clone())
        .put("namespace", s.namespace.clone())
        .put("hostname", s.hostname.clone())
        .put(
            "addresses",
            s.addresses.iter().map(network_address).collect::<Vec<_>>(),
        )
        .put("ports", ports_json(&s.ports))
        .put("waypoint", gateway_json(&s.waypoint))
        .put(
            "loadBalancing",
            s.load_balancing.as_ref().map(|lb| {
                Obj::default()
                    .put(
                        "routingPreference",
                        lb.routing_preference()
                            .map(|p| p.as_str_name())
                            .collect::<Vec<_>>(),
                    )
                    .name("mode", lb.mode().as_str_name())
                    .name("healthPolicy", lb.health_policy().as_str_name())
                    .done()
            }),
        )
        .name("ipFamilies", s.ip_families().as_str_name())
        .put("canonical", s.canonical)
        .put("ingressUseWaypoint", s.ingress_use_waypoint)
        .put("subjectAltNames", s.subject_alt_names.clone())
        .done()
}

fn string_match(m: &security::StringMatch) -> Value {
    match &m.match_type {
        Some(MatchType::Exact(s)) => json!({"exact": s}),
        Some(MatchType::Prefix(s)) => json!({"prefix": s}),
        Some(MatchType::Suffix(s)) => json!({"suffix": s}),
        Some(MatchType::Presence(())) => json!({"presence": {}}),
        None => json!({}),
    }
}

fn cidrs(a: &[security::Address]) -> Vec<String> {
    a.iter()
        .map(|a| format!("{}/{}", ip_text(&a.address), a.length))
        .collect()
}

fn match_json(m: &security::Match) -> Value {
    let sm = |v: &[security::StringMatch]| v.iter().map(string_match).collect::<Vec<_>>();
    let sa = |v: &[security::ServiceAccountMatch]| {
        v.iter()
            .map(|s| json!({"namespace": s.namespace, "serviceAccount": s.service_account}))
            .collect::<Vec<_>>()
    };
    Obj::default()
        .put("namespaces", sm(&m.namespaces))
        .put("notNamespaces", sm(&m.not_namespaces))
        .put("principals", sm(&m.principals))
        .put("notPrincipals", sm(&m.not_principals))
        .put("sourceIps", cidrs(&m.source_ips))
        .put("notSourceIps", cidrs(&m.not_source_ips))
        .put("destinationIps", cidrs(&m.destination_ips))
        .put("notDestinationIps", cidrs(&m.not_destination_ips))
        .put("destinationPorts", m.destination_ports.clone())
        .put("notDestinationPorts", m.not_destination_ports.clone())
        .put("serviceAccounts", sa(&m.service_accounts))
        .put("notServiceAccounts", sa(&m.not_service_accounts))
        .done()
}

fn authorization_json(a: &Authorization) -> Value {
    // Rules and clauses are kept even when empty: an empty clause list means
    // "matches everything", which a reader must see.
    let rules: Vec<Value> = a
        .rules
        .iter()
        .map(|rule| {
            let clauses: Vec<Value> = rule
                .clauses
                .iter()
                .map(|c| json!({"matches": c.matches.iter().map(match_json).collect::<Vec<_>>()}))
                .collect();
            json!({ "clauses": clauses })
        })
        .collect();
    let mut o = Obj::default()
        .put("name", a.name.clone())
        .put("namespace", a.namespace.clone())
        .name("scope", a.scope().as_str_name())
        .name("action", a.action().as_str_name())
        .done();
    o["rules"] = Value::Array(rules);
    if a.dry_run {
        o["dryRun"] = Value::Bool(true);
    }
    o
}

fn served_ports(ports: &[l7p::ServedPort]) -> Vec<Value> {
    ports
        .iter()
        .map(|p| json!({"port": p.port, "protocol": p.protocol().as_str_name()}))
        .collect()
}

fn waypoint_json(w: &Waypoint) -> Value {
    let services: Vec<Value> = w
        .services
        .iter()
        .map(|s| {
            Obj::default()
                .put("namespace", s.namespace.clone())
                .put("hostname", s.hostname.clone())
                .put("ports", served_ports(&s.ports))
                .put("routeTable", s.route_table.clone())
                .put("authorizations", s.authorizations.clone())
                .put("authentications", s.authentications.clone())
                .put("denyAllReason", s.deny_all_reason.clone())
                .done()
        })
        .collect();
    let workloads: Vec<Value> = w
        .workloads
        .iter()
        .map(|wl| {
            Obj::default()
                .put("uid", wl.uid.clone())
                .put(
                    "addresses",
                    wl.addresses.iter().map(|a| ip_text(a)).collect::<Vec<_>>(),
                )
                .put("ports", served_ports(&wl.ports))
                .put("authorizations", wl.authorizations.clone())
                .put("authentications", wl.authentications.clone())
                .put("denyAllReason", wl.deny_all_reason.clone())
                .done()
        })
        .collect();
    Obj::default()
        .put("namespace", w.namespace.clone())
        .put("name", w.name.clone())
        .put("services", services)
        .put("workloads", workloads)
        .put("gatewayAuthorizations", w.gateway_authorizations.clone())
        .put("gatewayAuthentications", w.gateway_authentications.clone())
        .put("forwardClientIdentity", w.forward_client_identity)
        .done()
}

fn duration(d: &Option<prost_types::Duration>) -> Value {
    match d {
        Some(d) if d.nanos == 0 => json!(format!("{}s", d.seconds)),
        Some(d) => json!(format!("{}.{:09}s", d.seconds, d.nanos)),
        None => Value::Null,
    }
}

fn header_match_json(h: &l7p::HeaderMatch) -> Value {
    use l7p::header_match::Kind;
    let o = Obj::default().put("name", h.name.clone());
    match &h.kind {
        Some(Kind::Exact(v)) => o.name("exact", v),
        Some(Kind::Regex(v)) => o.name("regex", v),
        Some(Kind::Prefix(v)) => o.name("prefix", v),
        Some(Kind::Present(_)) => o.put("present", true),
        None => o,
    }
    .done()
}

fn header_modifier_json(m: &Option<l7p::HeaderModifier>) -> Value {
    let Some(m) = m else { return Value::Null };
    let headers = |h: &[l7p::Header]| {
        h.iter()
            .map(|h| json!({"name": h.name, "value": h.value}))
            .collect::<Vec<_>>()
    };
    Obj::default()
        .put("set", headers(&m.set))
        .put("add", headers(&m.add))
        .put("remove", m.remove.clone())
        .done()
}

fn path_rewrite_json(p: &Option<l7p::PathRewrite>) -> Value {
    use l7p::path_rewrite::Kind;
    match p.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(Kind::FullPath(v)) => json!({"fullPath": v}),
        Some(Kind::Prefix(v)) => json!({"prefix": v}),
        Some(Kind::Regex(r)) => {
            json!({"regex": {"pattern": r.pattern, "substitution": r.substitution}})
        }
        None => Value::Null,
    }
}

fn backend_json(b: &l7p::Backend) -> Value {
    Obj::default()
        .put("service", b.service.clone())
        .put("port", b.port)
        .put("weight", b.weight)
        .put("subset", b.subset.clone())
        .put("requestHeaders", header_modifier_json(&b.request_headers))
        .put("responseHeaders", header_modifier_json(&b.response_headers))
        .put("invalidReason", b.invalid_reason.clone())
        .done()
}

fn route_json(r: &l7p::Route) -> Value {
    use l7p::path_match::Kind as Path;
    use l7p::route::Action;
    let matches: Vec<Value> = r
        .matches
        .iter()
        .map(|m| {
            let path = m.path.as_ref().map(|p| {
                let o = match &p.kind {
                    Some(Path::Exact(v)) => Obj::default().name("exact", v),
                    Some(Path::SegmentPrefix(v)) => Obj::default().name("segmentPrefix", v),
                    Some(Path::Prefix(v)) => Obj::default().name("prefix", v),
                    Some(Path::Regex(v)) => Obj::default().name("regex", v),
                    None => Obj::default(),
                };
                o.put("ignoreCase", p.ignore_case).done()
            });
            Obj::default()
                .put("path", path)
                .put(
                    "headers",
                    m.headers.iter().map(header_match_json).collect::<Vec<_>>(),
                )
                .put(
                    "queryParams",
                    m.query_params
                        .iter()
                        .map(header_match_json)
                        .collect::<Vec<_>>(),
                )
                .put("method", m.method.clone())
                .put(
                    "grpc",
                    m.grpc.as_ref().map(|g| {
                        Obj::default()
                            .put("service", g.service.clone())
                            .put("method", g.method.clone())
                            .put("regex", g.regex)
                            .done()
                    }),
                )
                .put(
                    "withoutHeaders",
                    m.without_headers
                        .iter()
                        .map(header_match_json)
                        .collect::<Vec<_>>(),
                )
                .done()
        })
        .collect();
    let action = match &r.action {
        Some(Action::Forward(f)) => {
            json!({"forward": {"backends": f.backends.iter().map(backend_json).collect::<Vec<_>>()}})
        }
        Some(Action::Redirect(rd)) => json!({"redirect": Obj::default()
            .put("scheme", rd.scheme.clone())
            .put("hostname", rd.hostname.clone())
            .put("path", path_rewrite_json(&rd.path))
            .put("port", rd.port)
            .put("statusCode", rd.status_code)
            .done()}),
        Some(Action::DirectResponse(d)) => json!({"directResponse": Obj::default()
            .put("status", d.status)
            .put("body", String::from_utf8_lossy(&d.body).into_owned())
            .done()}),
        None => Value::Null,
    };
    let origin = r.origin.as_ref().map(|o| {
        json!(format!(
            "{} {}/{} rule {}",
            o.kind, o.namespace, o.name, o.rule
        ))
    });
    let mut o = Obj::default()
        .put("origin", origin)
        .put("ports", r.ports.clone())
        .done();
    // Matches are kept even when empty: no match means "every request".
    o["matches"] = Value::Array(matches);
    let rest = Obj::default()
        .put("action", action)
        .put("requestHeaders", header_modifier_json(&r.request_headers))
        .put("responseHeaders", header_modifier_json(&r.response_headers))
        .put(
            "rewrite",
            r.rewrite.as_ref().map(|rw| {
                Obj::default()
                    .put("hostname", rw.hostname.clone())
                    .put("path", path_rewrite_json(&rw.path))
                    .done()
            }),
        )
        .put(
            "mirrors",
            r.mirrors
                .iter()
                .map(|m| {
                    Obj::default()
                        .put("backend", m.backend.as_ref().map(backend_json))
                        .put("perMillion", m.per_million)
                        .done()
                })
                .collect::<Vec<_>>(),
        )
        .put(
            "timeouts",
            r.timeouts.as_ref().map(|t| {
                Obj::default()
                    .put("request", duration(&t.request))
                    .put("perTry", duration(&t.per_try))
                    .done()
            }),
        )
        .put(
            "retry",
            r.retry.as_ref().map(|rt| {
                Obj::default()
                    .always("attempts", rt.attempts)
                    .put("codes", rt.codes.clone())
                    .put("onConnectFailure", rt.on_connect_failure)
                    .put("onRefusedStream", rt.on_refused_stream)
                    .put("onReset", rt.on_reset)
                    .put("grpcCodes", rt.grpc_codes.clone())
                    .put("backoff", duration(&rt.backoff))
                    .done()
            }),
        )
        .done();
    if let (Value::Object(o), Value::Object(rest)) = (&mut o, rest) {
        o.extend(rest);
    }
    o
}

fn route_table_json(t: &RouteTable) -> Value {
    let mut o = Obj::default()
        .put("namespace", t.namespace.clone())
        .put("hostname", t.hostname.clone())
        .done();
    o["routes"] = Value::Array(t.routes.iter().map(route_json).collect());
    o
}

fn string_matches(v: &[security::StringMatch]) -> Vec<Value> {
    v.iter().map(string_match).collect()
}

fn http_authorization_json(a: &HttpAuthorization) -> Value {
    use l7p::condition::Key;
    use l7p::path_pattern::Kind;
    let paths = |p: &[l7p::PathPattern]| {
        p.iter()
            .map(|p| match &p.kind {
                Some(Kind::Match(m)) => string_match(m),
                Some(Kind::Template(t)) => json!({"template": t.segments}),
                None => json!({}),
            })
            .collect::<Vec<_>>()
    };
    let rules: Vec<Value> = a
        .rules
        .iter()
        .map(|r| {
            let from: Vec<Value> = r
                .from
                .iter()
                .map(|s| {
                    Obj::default()
                        .put("principals", string_matches(&s.principals))
                        .put("notPrincipals", string_matches(&s.not_principals))
                        .put("requestPrincipals", string_matches(&s.request_principals))
                        .put(
                            "notRequestPrincipals",
                            string_matches(&s.not_request_principals),
                        )
                        .put("namespaces", string_matches(&s.namespaces))
                        .put("notNamespaces", string_matches(&s.not_namespaces))
                        .put("ipBlocks", cidrs(&s.ip_blocks))
                        .put("notIpBlocks", cidrs(&s.not_ip_blocks))
                        .put("remoteIpBlocks", cidrs(&s.remote_ip_blocks))
                        .put("notRemoteIpBlocks", cidrs(&s.not_remote_ip_blocks))
                        .done()
                })
                .collect();
            let to: Vec<Value> =
                r.to.iter()
                    .map(|o| {
                        Obj::default()
                            .put("hosts", string_matches(&o.hosts))
                            .put("notHosts", string_matches(&o.not_hosts))
                            .put("ports", o.ports.clone())
                            .put("notPorts", o.not_ports.clone())
                            .put("methods", string_matches(&o.methods))
                            .put("notMethods", string_matches(&o.not_methods))
                            .put("paths", paths(&o.paths))
                            .put("notPaths", paths(&o.not_paths))
                            .done()
                    })
                    .collect();
            let when: Vec<Value> = r
                .when
                .iter()
                .map(|c| {
                    let key = match &c.key {
                        Some(Key::RequestHeader(h)) => format!("request.headers[{h}]"),
                        Some(Key::RequestClaim(p)) => format!(
                            "request.auth.claims{}",
                            p.path.iter().map(|s| format!("[{s}]")).collect::<String>()
                        ),
                        Some(Key::RequestPrincipal(_)) => "request.auth.principal".into(),
                        Some(Key::RequestAudiences(_)) => "request.auth.audiences".into(),
                        Some(Key::RequestPresenter(_)) => "request.auth.presenter".into(),
                        Some(Key::SourceIp(_)) => "source.ip".into(),
                        Some(Key::RemoteIp(_)) => "remote.ip".into(),
                        Some(Key::SourceNamespace(_)) => "source.namespace".into(),
                        Some(Key::SourcePrincipal(_)) => "source.principal".into(),
                        Some(Key::DestinationIp(_)) => "destination.ip".into(),
                        Some(Key::DestinationPort(_)) => "destination.port".into(),
                        Some(Key::ConnectionSni(_)) => "connection.sni".into(),
                        None => String::new(),
                    };
                    Obj::default()
                        .put("key", key)
                        .put("values", string_matches(&c.values))
                        .put("notValues", string_matches(&c.not_values))
                        .put("ipValues", cidrs(&c.ip_values))
                        .put("notIpValues", cidrs(&c.not_ip_values))
                        .done()
                })
                .collect();
            // Kept even when empty: an empty rule matches every request.
            json!({"from": from, "to": to, "when": when})
        })
        .collect();
    let mut o = Obj::default()
        .put("namespace", a.namespace.clone())
        .put("name", a.name.clone())
        .name("action", a.action().as_str_name())
        .put("problems", a.problems.clone())
        .done();
    o["rules"] = Value::Array(rules);
    o
}

fn jwt_json(j: &JwtAuthentication) -> Value {
    let rules: Vec<Value> = j
        .rules
        .iter()
        .map(|r| {
            Obj::default()
                .put("issuer", r.issuer.clone())
                .put("audiences", r.audiences.clone())
                .put("jwks", r.jwks.clone())
                .put("jwksError", r.jwks_error.clone())
                .put(
                    "fromHeaders",
                    r.from_headers
                        .iter()
                        .map(|h| json!({"name": h.name, "prefix": h.prefix}))
                        .collect::<Vec<_>>(),
                )
                .put("fromParams", r.from_params.clone())
                .put("fromCookies", r.from_cookies.clone())
                .put("forwardOriginalToken", r.forward_original_token)
                .put("outputPayloadToHeader", r.output_payload_to_header.clone())
                .put(
                    "outputClaimToHeaders",
                    r.output_claim_to_headers
                        .iter()
                        .map(|c| json!({"header": c.header, "claim": c.claim}))
                        .collect::<Vec<_>>(),
                )
                .done()
        })
        .collect();
    Obj::default()
        .put("namespace", j.namespace.clone())
        .put("name", j.name.clone())
        .put("rules", rules)
        .done()
}
