//! The waypoint's one configuration type: every address, timeout and limit
//! as a flag with an environment variable. Names follow ztunnel-rs's flags
//! (and upstream's env names) for the settings both proxies share, so the
//! two read alike.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use proxy_core::admin::{ServerAddrs, ServerConfig};
use proxy_core::hbone::{Http2Settings, Keepalive, PoolConfig};
use proxy_core::listener::ListenerLimits;

use crate::proxy::ProxyConfig;
use crate::upstream::{RetryPolicy, UpstreamConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{flag} must be longer than 0")]
    ZeroDuration { flag: &'static str },
    #[error("{flag} must be at least 1")]
    ZeroCount { flag: &'static str },
    #[error(
        "--service-account {service_account:?} / --pod-namespace {namespace:?} / --trust-domain {trust_domain:?} do not make a SPIFFE id: {source}"
    )]
    Identity {
        trust_domain: String,
        namespace: String,
        service_account: String,
        #[source]
        source: api::IdentityError,
    },
}

/// Flags of `waypoint-rs`; each also reads the environment variable
/// upstream's proxies use where they have one.
#[derive(clap::Args, Debug, Clone)]
pub struct WaypointArgs {
    /// istiod's xDS address, host:port (15012 with TLS, 15010 with --plaintext).
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "istiod.istio-system.svc:15012"
    )]
    pub xds_address: String,
    /// istiod's CA address, when it is not the xDS address.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// The mesh root certificate(s) (PEM) istiod is verified against; re-read
    /// for each new connection to istiod. HBONE peers are verified against
    /// the trust bundle the CA sends with each certificate.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub root_cert: PathBuf,
    /// Talk to istiod without TLS whatever the addresses say (local development only).
    #[arg(long, env = "XDS_PLAINTEXT")]
    pub plaintext: bool,
    /// The name istiod's serving certificate is verified against.
    #[arg(long, env = "XDS_SERVER_NAME", default_value = proxy_core::identity::control_plane::DEFAULT_SERVER_NAME)]
    pub istiod_server_name: String,
    /// The bearer token sent to istiod (re-read on every request).
    #[arg(
        long,
        env = "TOKEN_FILE",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub token_file: PathBuf,
    /// This waypoint pod's IP: its xDS node id, and how it recognises the
    /// services and workloads bound to it (their `waypoint` points here).
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: IpAddr,
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub pod_namespace: String,
    /// The pod's service account: the waypoint's own identity is
    /// `spiffe://<trust domain>/ns/<pod namespace>/sa/<service account>`.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    pub service_account: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The network this waypoint is on (empty: the default network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// HBONE from source ztunnels.
    #[arg(long, env = "HBONE_ADDRESS", default_value = "0.0.0.0:15008")]
    pub hbone_address: SocketAddr,
    #[arg(long, env = "ADMIN_ADDRESS", default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,
    #[arg(long, env = "STATS_ADDRESS", default_value = "0.0.0.0:15020")]
    pub stats_address: SocketAddr,
    #[arg(long, env = "READINESS_ADDRESS", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,
    /// Connections each of the admin, stats and readiness servers holds at once.
    #[arg(long, env = "SERVER_MAX_CONNECTIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub server_max_connections: u32,
    /// Connections each of those servers holds at once from one address.
    #[arg(long, env = "SERVER_MAX_CONNECTIONS_PER_PEER", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub server_max_connections_per_peer: u32,
    /// The admin, stats and readiness servers drop a connection whose
    /// request head has not arrived within this.
    #[arg(long, env = "SERVER_HEADER_TIMEOUT", default_value = "2s", value_parser = parse_timeout)]
    pub server_header_timeout: Duration,
    /// The admin, stats and readiness servers drop an idle connection after this.
    #[arg(long, env = "SERVER_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub server_idle_timeout: Duration,
    /// How long live requests and tunnels may take to finish on SIGTERM.
    #[arg(long, env = "DRAIN_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Lifetime asked of the CA for the waypoint's certificate.
    #[arg(long, env = "CERTIFICATE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub certificate_ttl: Duration,
    /// HBONE: CONNECT streams a source ztunnel may have open at once on one
    /// connection (upstream's Envoy waypoint: 100).
    #[arg(long, env = "HBONE_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub hbone_max_concurrent_streams: u32,
    /// HBONE: connections the listener (15008) holds at once; one more is
    /// reset (counted in
    /// istio_listener_connections_dropped_total{listener="hbone",reason="connection_limit"}).
    #[arg(long, env = "HBONE_MAX_CONNECTIONS", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_connections: u32,
    /// HBONE: connections the listener holds at once from one address (a
    /// client pod: ztunnel connects from the pod's address); one more is
    /// reset (reason="peer_limit").
    #[arg(long, env = "HBONE_MAX_CONNECTIONS_PER_PEER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_connections_per_peer: u32,
    /// HBONE: how often each connection's peer is sent an HTTP/2 PING.
    #[arg(long, env = "HBONE_PING_INTERVAL", default_value = "10s", value_parser = parse_timeout)]
    pub hbone_ping_interval: Duration,
    /// HBONE: a PING unanswered this long drops the connection as dead.
    #[arg(long, env = "HBONE_PING_TIMEOUT", default_value = "20s", value_parser = parse_timeout)]
    pub hbone_ping_timeout: Duration,
    /// HBONE to endpoints: streams per pooled connection (upstream ztunnel's
    /// POOL_MAX_STREAMS_PER_CONNECTION).
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_max_streams_per_connection: u32,
    /// HBONE to endpoints: a pooled connection without streams for this
    /// long closes; an HTTP connection to an endpoint unused this long is
    /// dropped (which ends its stream).
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_timeout)]
    pub pool_unused_release_timeout: Duration,
    /// Setting up an HBONE tunnel to an endpoint (connect, TLS, CONNECT)
    /// may take this long; then the try fails with `UF`.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub connect_timeout: Duration,
    /// How long the first bytes of a connection to an undeclared port are
    /// awaited to tell HTTP from other protocols; then it is TCP (a
    /// server-first protocol sends nothing first and must not hang).
    #[arg(long, env = "PROTOCOL_DETECTION_TIMEOUT", default_value = "100ms", value_parser = parse_timeout)]
    pub protocol_detection_timeout: Duration,
    /// Whole-request timeout (all tries) when no route sets one; 0: none.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Timeout of one try when no route sets one; 0: none.
    #[arg(long, env = "PER_TRY_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    pub per_try_timeout: Duration,
    /// Retries after the first try when no route sets them. Istio's default
    /// route retry policy: 2 retries on connect failure, refused stream,
    /// reset and 503 (pilot/pkg/networking/core/route/retry/retry.go).
    #[arg(long, env = "DEFAULT_RETRY_ATTEMPTS", default_value_t = 2)]
    pub default_retry_attempts: u32,
    /// First backoff between tries; grows exponentially with jitter to 10x
    /// (Envoy's base retry interval: 25ms).
    #[arg(long, env = "RETRY_BACKOFF", default_value = "25ms", value_parser = parse_timeout)]
    pub retry_backoff: Duration,
    /// Request bodies up to this size are kept to be replayed on a retry;
    /// a larger body is sent once, not retried.
    #[arg(long, env = "RETRY_BUFFER_LIMIT", default_value_t = 64 * 1024)]
    pub retry_buffer_limit: usize,
    /// Requests in flight to one destination service at once; one more is
    /// answered 503 `UO` at once (a circuit breaker, never a queue). The
    /// default is Istio's (no limit: u32::MAX).
    #[arg(long, env = "MAX_REQUESTS_PER_DESTINATION", default_value_t = u32::MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_per_destination: u32,
    /// Idle HTTP/1.1 connections kept per endpoint for reuse.
    #[arg(long, env = "MAX_IDLE_CONNECTIONS_PER_ENDPOINT", default_value_t = 16)]
    pub max_idle_connections_per_endpoint: usize,
}

/// `250ms`, `30s`, `5m`, `24h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 500ms, 30s, 5m or 24h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "{s:?} has an unknown unit {unit:?}: use ms, s, m or h"
        )),
    }
}

/// A [`parse_duration`] that must be longer than 0.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

fn optional(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl WaypointArgs {
    /// The waypoint's own identity (never a client's: it does not impersonate).
    pub fn identity(&self) -> Result<api::SpiffeId, Error> {
        api::SpiffeId::new(
            &self.trust_domain,
            &self.pod_namespace,
            &self.service_account,
        )
        .map_err(|source| Error::Identity {
            trust_domain: self.trust_domain.clone(),
            namespace: self.pod_namespace.clone(),
            service_account: self.service_account.clone(),
            source,
        })
    }

    /// HBONE's HTTP/2 settings, server and client side.
    pub fn http2(&self) -> Result<Http2Settings, Error> {
        if self.hbone_max_concurrent_streams == 0 {
            return Err(Error::ZeroCount {
                flag: "--hbone-max-concurrent-streams",
            });
        }
        Ok(Http2Settings {
            max_concurrent_streams: self.hbone_max_concurrent_streams,
            keepalive: Keepalive {
                ping_interval: self.hbone_ping_interval,
                ping_timeout: self.hbone_ping_timeout,
                ..Keepalive::default()
            },
            ..Http2Settings::default()
        })
    }

    pub fn pool(&self) -> Result<PoolConfig, Error> {
        Ok(PoolConfig {
            max_streams_per_connection: self.pool_max_streams_per_connection as usize,
            idle_timeout: self.pool_unused_release_timeout,
            connect_timeout: self.connect_timeout,
            http2: self.http2()?,
        })
    }

    /// What the data path needs from the flags.
    pub fn proxy(&self) -> Result<ProxyConfig, Error> {
        if self.retry_buffer_limit == 0 && self.default_retry_attempts > 0 {
            return Err(Error::ZeroCount {
                flag: "--retry-buffer-limit",
            });
        }
        Ok(ProxyConfig {
            network: self.network.clone(),
            cluster_id: self.cluster_id.clone(),
            protocol_detection_timeout: self.protocol_detection_timeout,
            drain_deadline: self.drain_deadline,
            upstream: UpstreamConfig {
                hbone_port: api::ports::HBONE,
                request_timeout: optional(self.request_timeout),
                per_try_timeout: optional(self.per_try_timeout),
                retry: RetryPolicy::istio_default(self.default_retry_attempts, self.retry_backoff),
                retry_buffer_limit: self.retry_buffer_limit,
                max_requests_per_destination: self.max_requests_per_destination,
                max_idle_connections_per_endpoint: self.max_idle_connections_per_endpoint,
                idle_timeout: self.pool_unused_release_timeout,
            },
        })
    }

    /// The HBONE listener's caps.
    pub fn hbone_limits(&self) -> ListenerLimits {
        ListenerLimits::caps(
            self.hbone_max_connections as usize,
            self.hbone_max_connections_per_peer
                .min(self.hbone_max_connections) as usize,
        )
    }

    /// What the admin, stats and readiness servers listen on and allow.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            addrs: ServerAddrs {
                admin: self.admin_address,
                stats: self.stats_address,
                readiness: self.readiness_address,
            },
            limits: ListenerLimits {
                max_connections: self.server_max_connections as usize,
                max_connections_per_peer: self.server_max_connections_per_peer as usize,
                handshake_timeout: self.server_header_timeout,
                header_timeout: self.server_header_timeout,
                idle_timeout: self.server_idle_timeout,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: WaypointArgs,
    }

    fn args(flags: &[&str]) -> Result<WaypointArgs, clap::Error> {
        let argv = ["waypoint-rs", "--instance-ip", "10.0.0.9"]
            .iter()
            .chain(flags);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn defaults_are_the_documented_ports_and_policies() {
        let a = args(&[]).unwrap();
        assert_eq!(a.hbone_address.port(), 15008);
        assert_eq!(a.admin_address.port(), 15000);
        assert_eq!(a.stats_address.port(), 15020);
        assert_eq!(a.readiness_address.port(), 15021);
        assert_eq!(
            a.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/waypoint"
        );
        let proxy = a.proxy().unwrap();
        assert_eq!(proxy.upstream.retry.attempts, 2);
        assert_eq!(proxy.upstream.retry.codes, [503]);
        assert_eq!(proxy.upstream.request_timeout, None);
        assert_eq!(proxy.upstream.hbone_port, 15008);
        assert_eq!(a.http2().unwrap().max_concurrent_streams, 100);
        assert_eq!(a.server_config().limits, ServerConfig::DEFAULT_LIMITS);
        assert_eq!(a.hbone_limits(), ListenerLimits::caps(8192, 1024));
    }

    #[test]
    fn hbone_caps_are_set_by_flag_and_the_peer_share_never_exceeds_the_whole() {
        let a = args(&[
            "--hbone-max-connections",
            "50",
            "--hbone-max-connections-per-peer",
            "7",
        ])
        .unwrap();
        assert_eq!(a.hbone_limits(), ListenerLimits::caps(50, 7));
        let a = args(&["--hbone-max-connections", "5"]).unwrap();
        assert_eq!(a.hbone_limits(), ListenerLimits::caps(5, 5));
        assert!(args(&["--hbone-max-connections", "0"]).is_err());
    }

    #[test]
    fn bad_values_name_their_flag() {
        for bad in [
            ["--protocol-detection-timeout", "0"],
            ["--max-requests-per-destination", "0"],
            ["--drain-deadline", "soon"],
        ] {
            let err = args(&bad).expect_err("refused").to_string();
            assert!(err.contains(bad[0]), "{err}");
        }
        let err = args(&["--hbone-max-concurrent-streams", "0"])
            .unwrap()
            .http2()
            .unwrap_err();
        assert!(err.to_string().contains("--hbone-max-concurrent-streams"));
        let err = args(&["--service-account", "a/b"])
            .unwrap()
            .identity()
            .unwrap_err();
        assert!(err.to_string().contains("--service-account"), "{err}");
        let timed = args(&["--request-timeout", "1500ms"])
            .unwrap()
            .proxy()
            .unwrap();
        assert_eq!(
            timed.upstream.request_timeout,
            Some(Duration::from_millis(1500))
        );
    }
}
