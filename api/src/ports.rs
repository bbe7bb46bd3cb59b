//! Well-known ports, as upstream.

/// istiod: gRPC xDS + CA, plaintext (local development only).
pub const ISTIOD_PLAINTEXT: u16 = 15010;
/// istiod: gRPC xDS + CA over TLS.
pub const ISTIOD_TLS: u16 = 15012;
/// istiod: HTTP monitoring (`/metrics`, `/ready`, `/debug/*`).
/// istiod's plain HTTP server (`--httpAddr`): its readiness probe's `/ready`.
pub const ISTIOD_HTTP: u16 = 8080;
pub const ISTIOD_MONITORING: u16 = 15014;
/// istiod: the validating admission webhook over HTTPS (the `istiod`
/// Service's port 443 targets it).
pub const ISTIOD_WEBHOOK: u16 = 15017;

/// ztunnel: outbound capture, inside each pod netns.
pub const ZTUNNEL_OUTBOUND: u16 = 15001;
/// ztunnel: inbound plaintext capture, inside each pod netns.
pub const ZTUNNEL_INBOUND_PLAINTEXT: u16 = 15006;
/// HBONE: HTTP/2 CONNECT over mutual TLS.
pub const HBONE: u16 = 15008;
/// ztunnel: DNS proxy.
pub const DNS: u16 = 15053;

/// Proxies: admin (`/config_dump`, `/certs`), loopback only.
pub const ADMIN: u16 = 15000;
/// Proxies: Prometheus metrics.
pub const STATS: u16 = 15020;
/// Proxies: readiness.
pub const READINESS: u16 = 15021;

/// Mark on sockets the proxy opens itself, so the redirection rules let them pass.
pub const PROXY_MARK: u32 = 0x539;
/// Connmark on connections that arrived through the proxy (in-pod rules).
pub const PROXY_CONNMARK: u32 = 0x111;
/// In-pod routing table that delivers replies carrying the connmark locally,
/// to the proxy's transparent sockets (upstream's `RouteTableInbound`).
pub const PROXY_ROUTE_TABLE: u32 = 100;
/// Priority of the in-pod `fwmark PROXY_CONNMARK -> PROXY_ROUTE_TABLE` rule.
pub const PROXY_RULE_PRIORITY: u32 = 32764;
/// Source address kubelet health probes are SNATed to; never captured.
pub const KUBELET_PROBE_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
