//! istiod-rs's command line: every flag also reads an environment variable,
//! and [`Args::into_config`] checks what flags alone can check, naming the
//! flag in each error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::{AppConfig, AppError, Source, TokenSource};
use crate::auth::ServiceAccount;
use crate::auth::token_review::TokenReviewConfig;
use crate::ca::rate_limit::CallerRateLimit;
use crate::ca::{CaConfig, root};
use crate::grpc::GrpcConfig;
use crate::index::MeshConfig;
use crate::monitoring::MonitoringConfig;
use crate::pipeline::Debounce;
use crate::provision::{ProvisionConfig, ProvisionError};
use crate::state::directory::DirectoryConfig;
use crate::status::StatusConfig;
use crate::webhook::{DEFAULT_CONFIGURATION_NAME, DEFAULT_MAX_BODY_BYTES, WebhookConfig};
use api::manifest::FileReading;
use proxy_core::listener::ListenerLimits;

/// Where upstream mounts a plug-in CA; used when it holds a signing key.
pub const DEFAULT_CACERTS_DIR: &str = "/etc/cacerts";

/// The istiod-rs control plane: cluster state in, workload API out over
/// delta xDS, and the mesh's certificate authority.
///
/// Local mode (`--config-dir DIR --token-file FILE`): the YAML files under
/// DIR are the cluster state and FILE maps bearer tokens to identities.
/// Kubernetes mode (no `--config-dir`): the API server (in-cluster config or
/// KUBECONFIG) is watched and tokens are checked with TokenReview.
///
/// The mesh root proxies must trust is `<data-dir>/root-cert.pem` (or the
/// plug-in CA's `root-cert.pem`).
#[derive(Parser, Clone, Debug)]
// A later flag overrides an earlier one (`upstream::discovery_argv` puts
// upstream's translated flags where they were).
#[command(
    name = "istiod-rs",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
pub struct Args {
    /// Local mode: read the cluster state from every *.yaml / *.yml file
    /// under this directory (watched; edits apply within a second).
    #[arg(long, env = "CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Bearer tokens -> identities (`tokens: [{token, serviceAccount, node}]`).
    /// Required with --config-dir; in Kubernetes mode it replaces TokenReview.
    #[arg(long, env = "TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// istiod-rs's state: the self-signed root (root-cert.pem, root-key.pem)
    /// is created here once and kept.
    #[arg(
        long,
        visible_alias = "ca-dir",
        env = "DATA_DIR",
        value_name = "DIR",
        default_value = "/var/lib/istiod-rs"
    )]
    pub data_dir: PathBuf,
    /// A plug-in CA (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)
    /// to sign with instead of the self-signed root. Default: /etc/cacerts
    /// when it holds ca-key.pem.
    #[arg(long, env = "CACERTS_DIR", value_name = "DIR")]
    pub cacerts_dir: Option<PathBuf>,
    /// How often the plug-in CA directory is checked for new material
    /// (a rotated `cacerts` Secret), which is then used without a restart.
    #[arg(long, env = "CACERTS_POLL_INTERVAL", default_value = "5s", value_parser = parse_timeout)]
    pub cacerts_poll_interval: Duration,
    /// Lifetime of a self-signed root, when one is created or renewed.
    #[arg(long, env = "CITADEL_SELF_SIGNED_CA_CERT_TTL", default_value = "3650d",
          value_parser = parse_timeout)]
    pub self_signed_root_ttl: Duration,
    /// How often the self-signed root is checked for renewal; 0s: never.
    #[arg(long, env = "CITADEL_SELF_SIGNED_ROOT_CERT_CHECK_INTERVAL", default_value = "1h",
          value_parser = parse_duration)]
    pub self_signed_root_check_interval: Duration,
    /// The self-signed root is renewed (same key, new validity) once less
    /// than this per cent of its lifetime is left.
    #[arg(long, env = "CITADEL_SELF_SIGNED_ROOT_CERT_GRACE_PERIOD_PERCENTILE", default_value_t = 20,
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub self_signed_root_grace_percent: u8,
    /// Trust domain of every identity (`spiffe://<trust-domain>/ns/../sa/..`).
    #[arg(long, env = "TRUST_DOMAIN", default_value = api::labels::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Workload certificate lifetime when the proxy asks for none (e.g. 24h, 30m).
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub default_cert_ttl: Duration,
    /// Longest workload certificate lifetime granted (e.g. 90d).
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = "90d", value_parser = parse_duration)]
    pub max_cert_ttl: Duration,
    /// Kubernetes mode: a TokenReview not answered within this fails the
    /// request (the proxy retries).
    #[arg(long, env = "TOKEN_REVIEW_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub token_review_timeout: Duration,
    /// Kubernetes mode: how long an accepted token's TokenReview is reused
    /// (never beyond the token's expiry; rejections are never reused; 0:
    /// review every request).
    #[arg(long, env = "TOKEN_REVIEW_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub token_review_cache_ttl: Duration,
    /// Kubernetes mode: at most this many TokenReview answers are kept.
    #[arg(long, env = "TOKEN_REVIEW_CACHE_SIZE", default_value_t = 10_000)]
    pub token_review_cache_size: usize,
    /// Service accounts (`<namespace>/<name>`) whose callers may ask for the
    /// certificates of pods on their own node. Repeat for more.
    #[arg(long, value_name = "NS/SA", default_value = "istio-system/ztunnel")]
    pub trusted_node_agent: Vec<ServiceAccount>,
    /// Certificate requests each caller (an identity, per pod or node when
    /// its token names one) may make per second, sustained; beyond it and
    /// its burst: RESOURCE_EXHAUSTED.
    #[arg(long, env = "CA_REQUESTS_PER_SECOND", default_value_t = 10.0,
          value_parser = parse_rate)]
    pub ca_requests_per_second: f64,
    /// Certificate requests each caller may make at once.
    #[arg(long, env = "CA_REQUEST_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ca_request_burst: u32,
    /// Certificate requests istiod-rs handles at once, from all callers
    /// together; one more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CA_MAX_REQUESTS_IN_PROGRESS",
          default_value_t = crate::ca::DEFAULT_MAX_REQUESTS_IN_PROGRESS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ca_max_requests_in_progress: u32,
    /// gRPC over TLS (xDS + CA): what proxies use.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,
    /// Also serve gRPC in plaintext on 0.0.0.0:15010 (local development only).
    #[arg(long, env = "PLAINTEXT")]
    pub plaintext: bool,
    /// Serve gRPC in plaintext on this address (implies --plaintext).
    #[arg(long, env = "PLAINTEXT_ADDR")]
    pub plaintext_addr: Option<SocketAddr>,
    /// Connections each gRPC listener (15012, 15010) holds at once; one
    /// more is reset (istiod_listener_connections_dropped_total).
    #[arg(long, env = "GRPC_MAX_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_connections: u32,
    /// Connections each gRPC listener holds from one address (default: no
    /// limit below --grpc-max-connections, as proxies behind an east-west
    /// gateway share its address).
    #[arg(long, env = "GRPC_MAX_CONNECTIONS_PER_PEER",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_connections_per_peer: Option<u32>,
    /// A gRPC client must finish its TLS handshake within this.
    #[arg(long, env = "GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub grpc_handshake_timeout: Duration,
    /// A gRPC client must send the HTTP/2 preface within this of connecting
    /// (of its TLS handshake on 15012).
    #[arg(long, env = "GRPC_PREFACE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub grpc_preface_timeout: Duration,
    /// A gRPC connection on which nothing was read or written for this long
    /// is closed (keepalive pings keep live ones busy).
    #[arg(long, env = "GRPC_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_timeout)]
    pub grpc_idle_timeout: Duration,
    /// Largest gRPC request accepted, in bytes (CA and xDS; upstream's
    /// variable). A resuming proxy's xDS request grows by about 1 MiB per
    /// 10 000 resources of the mesh.
    #[arg(long, env = "ISTIO_GPRC_MAXRECVMSGSIZE", default_value_t = GrpcConfig::DEFAULT_MAX_RECEIVE_MESSAGE_BYTES)]
    pub grpc_max_receive_message_size: usize,
    /// istiod PINGs a gRPC peer after this long without a frame from it
    /// (upstream's --keepaliveInterval).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub keepalive_interval: Duration,
    /// A PING not answered within this closes the connection (upstream's
    /// --keepaliveTimeout).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub keepalive_timeout: Duration,
    /// The validating admission webhook (HTTPS, POST /validate). Kubernetes
    /// mode serves it on 0.0.0.0:15017 unless told otherwise; local mode
    /// only when this is given.
    #[arg(long, env = "WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Kubernetes mode: the ValidatingWebhookConfiguration whose caBundle
    /// (and, once the webhook is seen working, failurePolicy: Fail)
    /// istiod-rs keeps up to date.
    #[arg(long, env = "WEBHOOK_CONFIG_NAME", default_value = DEFAULT_CONFIGURATION_NAME)]
    pub webhook_config_name: String,
    /// Largest AdmissionReview body the webhook reads, in bytes (413 beyond).
    #[arg(long, env = "WEBHOOK_MAX_BODY", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub webhook_max_body: usize,
    /// The webhook's TLS handshake, request headers and request body must
    /// each arrive within this.
    #[arg(long, env = "WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub webhook_timeout: Duration,
    /// Connections the webhook holds at once; one more is reset.
    #[arg(long, env = "WEBHOOK_MAX_CONNECTIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_max_connections: u32,
    /// HTTP: /metrics, /ready, /debug/syncz, /debug/config_dump.
    #[arg(long, env = "MONITORING_ADDR", default_value = "0.0.0.0:15014")]
    pub monitoring_addr: SocketAddr,
    /// The monitoring endpoints (`/ready` above all) on upstream istiod's
    /// HTTP port too, for its Deployment's readiness probe. Kubernetes mode
    /// serves them on 0.0.0.0:8080 unless told otherwise; local mode only
    /// when this is given.
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Connections the monitoring server holds at once; one more is reset.
    #[arg(long, env = "MONITORING_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub monitoring_max_connections: u32,
    /// Connections the monitoring server holds from one address.
    #[arg(long, env = "MONITORING_MAX_CONNECTIONS_PER_PEER", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub monitoring_max_connections_per_peer: u32,
    /// The monitoring server drops a connection whose request head has not
    /// arrived within this (also between two requests on one connection).
    #[arg(long, env = "MONITORING_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub monitoring_header_timeout: Duration,
    /// The monitoring server drops a connection on which nothing was read
    /// or written for this long.
    #[arg(long, env = "MONITORING_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub monitoring_idle_timeout: Duration,
    /// /debug/* answers only loopback clients and callers whose bearer
    /// token is of a service account of istiod's namespace (or of
    /// --debug-endpoint-auth-allowed-namespaces); `false` opens it to
    /// anyone who reaches the port (upstream's variable).
    #[arg(long, env = "ENABLE_DEBUG_ENDPOINT_AUTH", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub debug_endpoint_auth: bool,
    /// More namespaces whose service accounts may read /debug/*,
    /// comma-separated (upstream's variable).
    #[arg(
        long,
        env = "DEBUG_ENDPOINT_AUTH_ALLOWED_NAMESPACES",
        value_delimiter = ',',
        value_name = "NS,..."
    )]
    pub debug_endpoint_auth_allowed_namespaces: Vec<String>,
    /// Cluster id: the first part of every workload uid.
    #[arg(long, env = "CLUSTER_ID", default_value = api::labels::DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// Kubernetes DNS domain of service hostnames (`<svc>.<ns>.svc.<domain>`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = api::labels::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Namespace whose policies apply mesh-wide.
    #[arg(long, env = "ROOT_NAMESPACE", default_value = api::labels::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Give every workload behind a waypoint an implicit policy allowing the
    /// waypoint's identities: unless another ALLOW policy applies to it,
    /// traffic that does not go through the waypoint is refused. Off by
    /// default, as upstream istiod's variable of the same name.
    #[arg(
        long,
        env = "PILOT_AUTO_ALLOW_WAYPOINT_POLICY",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub auto_allow_waypoint_policy: bool,
    /// Give each ServiceEntry without `spec.addresses` (resolution other than
    /// NONE, not labelled networking.istio.io/enable-autoallocate-ip=false)
    /// one IPv4 VIP of 240.240.0.0/16 and one IPv6 VIP of 2001:2::/48 per
    /// host, recorded in its status.addresses. On by default; the variable
    /// is upstream istiod's name for the switch.
    #[arg(
        long,
        env = "PILOT_ENABLE_IP_AUTOALLOCATE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub enable_ip_autoallocate: bool,
    /// istiod-rs's own namespace: its serving identity and DNS names
    /// (`istiod.<ns>.svc`) derive from it.
    #[arg(long, env = "POD_NAMESPACE", default_value = api::labels::DEFAULT_ROOT_NAMESPACE)]
    pub namespace: String,
    /// One more DNS name for the TLS serving certificate. Repeat for more.
    #[arg(long, value_name = "NAME")]
    pub extra_dns_name: Vec<String>,
    /// How often --config-dir is looked at (e.g. 250ms).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Largest --config-dir file read, in bytes; a larger one is reported
    /// (`istiod_config_file_problems{reason="too_large"}`) and keeps its
    /// last good objects.
    #[arg(long, env = "MAX_CONFIG_FILE_SIZE", default_value_t = api::manifest::DEFAULT_MAX_FILE_SIZE)]
    pub max_config_file_size: u64,
    /// First delay before a failed status write (policy and route
    /// conditions) is retried; it doubles up to --status-retry-max.
    #[arg(long, env = "STATUS_RETRY_MIN", default_value = "500ms", value_parser = parse_duration)]
    pub status_retry_min: Duration,
    /// Longest delay between retries of a failed status write.
    #[arg(long, env = "STATUS_RETRY_MAX", default_value = "30s", value_parser = parse_duration)]
    pub status_retry_max: Duration,
    /// Provision each Gateway of class istio-waypoint (ServiceAccount,
    /// Deployment, Service; in local mode files under
    /// `<config-dir>/generated/waypoints/`) and write its status.
    #[arg(long, env = "PROVISION_WAYPOINTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub provision_waypoints: bool,
    /// Create a waypoint (a Gateway of class istio-waypoint annotated
    /// istio.io/for-service-account, or istio-rs.io/for-service for a Service
    /// of several ServiceAccounts) for a Service an L7 rule targets when no
    /// waypoint a user bound serves it, and delete it when no rule needs it;
    /// a namespace labelled istio.io/auto-waypoint=disabled gets none. Turned
    /// off, the waypoints created before are deleted. Needs
    /// --provision-waypoints.
    #[arg(long, env = "ON_DEMAND_WAYPOINTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub on_demand_waypoints: bool,
    /// How long a waypoint created on demand that no rule needs any more
    /// stays, bound to nothing, before it is deleted (e.g. 5s): time for
    /// every proxy to stop sending to it.
    #[arg(long, env = "ON_DEMAND_DRAIN", default_value = "5s", value_parser = parse_duration)]
    pub on_demand_drain: Duration,
    /// Image repository of provisioned waypoints (`<hub>/waypoint-rs:<tag>`).
    #[arg(long, env = "WAYPOINT_HUB", default_value = "istio-rs")]
    pub waypoint_hub: String,
    /// Image tag of provisioned waypoints (default: this istiod-rs's version).
    #[arg(long, env = "WAYPOINT_TAG", default_value = env!("CARGO_PKG_VERSION"))]
    pub waypoint_tag: String,
    /// Image pull policy of provisioned waypoints: Always, IfNotPresent or Never.
    #[arg(
        long,
        env = "WAYPOINT_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub waypoint_image_pull_policy: String,
    /// Log filter of provisioned waypoints (their RUST_LOG).
    #[arg(long, env = "WAYPOINT_LOG_LEVEL", default_value = "info")]
    pub waypoint_log_level: String,
    /// Where provisioned waypoints reach istiod (host:port); default
    /// `istiod.<--namespace>.svc:15012`.
    #[arg(long, env = "WAYPOINT_XDS_ADDRESS")]
    pub waypoint_xds_address: Option<String>,
    /// Log filter (`info`, `debug`, `istiod_rs::xds=debug,info`...).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Log one JSON object per line (upstream istiod's `--log_as_json`).
    #[arg(long, env = "LOG_AS_JSON")]
    pub log_as_json: bool,
}

impl Args {
    /// Installs the log subscriber (stderr; colours only on a terminal).
    pub fn init_logging(&self) -> Result<(), AppError> {
        use proxy_core::logging;
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            AppError::Flag {
                flag: "--log-level",
                reason: format!("{:?} is not a log filter: {e}", self.log_level),
            }
        })?;
        let format = if self.log_as_json {
            logging::Format::Json
        } else {
            logging::Format::Text
        };
        logging::init(filter, logging::Output::Stderr, format);
        Ok(())
    }

    /// The configuration these flags describe.
    pub fn into_config(self) -> Result<AppConfig, AppError> {
        let flag = |flag: &'static str, reason: String| AppError::Flag { flag, reason };
        let source = match &self.config_dir {
            Some(dir) if !dir.is_dir() => {
                return Err(flag(
                    "--config-dir",
                    format!(
                        "{} is not a directory; create it or point at the directory holding the cluster's YAML",
                        dir.display()
                    ),
                ));
            }
            Some(dir) => Source::Directory(DirectoryConfig {
                poll_interval: self.poll_interval,
                reading: FileReading {
                    max_file_size: self.max_config_file_size,
                    ..FileReading::default()
                },
                ..DirectoryConfig::new(dir)
            }),
            None => Source::Kubernetes,
        };
        let tokens = match (&self.token_file, &self.config_dir) {
            (Some(file), _) => TokenSource::File(file.clone()),
            (None, Some(_)) => {
                return Err(flag(
                    "--token-file",
                    "required with --config-dir (local mode has no TokenReview): give a YAML file `tokens: [{token, serviceAccount, node}]`".into(),
                ));
            }
            (None, None) => TokenSource::TokenReview(TokenReviewConfig {
                timeout: self.token_review_timeout,
                cache_ttl: self.token_review_cache_ttl,
                cache_capacity: self.token_review_cache_size,
            }),
        };
        let plugin_dir = match self.cacerts_dir {
            Some(dir) if !dir.is_dir() => {
                return Err(flag(
                    "--cacerts-dir",
                    format!(
                        "{} is not a directory; it must hold {}, {}, {} and {}",
                        dir.display(),
                        root::CA_CERT,
                        root::CA_KEY,
                        root::CERT_CHAIN,
                        root::ROOT_CERT
                    ),
                ));
            }
            Some(dir) => Some(dir),
            None => default_cacerts(Path::new(DEFAULT_CACERTS_DIR)),
        };
        if self.default_cert_ttl > self.max_cert_ttl {
            return Err(flag(
                "--default-cert-ttl",
                format!(
                    "{:?} is longer than --max-cert-ttl {:?}",
                    self.default_cert_ttl, self.max_cert_ttl
                ),
            ));
        }
        let mut ca = CaConfig::new(&self.trust_domain, &self.data_dir);
        ca.plugin_dir = plugin_dir;
        ca.plugin_poll_interval = self.cacerts_poll_interval;
        ca.default_cert_ttl = self.default_cert_ttl;
        ca.max_cert_ttl = self.max_cert_ttl;
        ca.trusted_node_agents = self.trusted_node_agent;
        ca.rate_limit = CallerRateLimit {
            per_second: self.ca_requests_per_second,
            burst: self.ca_request_burst,
        };
        ca.max_requests_in_progress = self.ca_max_requests_in_progress as usize;
        ca.root_cert_ttl = self.self_signed_root_ttl;
        ca.root_check_interval = self.self_signed_root_check_interval;
        ca.root_grace_percent = self.self_signed_root_grace_percent;

        let provision = self.provision_waypoints.then(|| ProvisionConfig {
            hub: self.waypoint_hub.clone(),
            tag: self.waypoint_tag.clone(),
            image_pull_policy: self.waypoint_image_pull_policy.clone(),
            log_level: self.waypoint_log_level.clone(),
            trust_domain: self.trust_domain.clone(),
            xds_address: self.waypoint_xds_address.clone().unwrap_or_else(|| {
                format!("istiod.{}.svc:{}", self.namespace, api::ports::ISTIOD_TLS)
            }),
            cluster_domain: self.cluster_domain.clone(),
            retry_min: self.status_retry_min,
            retry_max: self.status_retry_max.max(self.status_retry_min),
            on_demand_drain: self.on_demand_drain,
        });
        if let Some(config) = &provision {
            config.validate().map_err(|e| match e {
                ProvisionError::Flag { flag: name, reason } => flag(name, reason),
                other => flag("--provision-waypoints", other.to_string()),
            })?;
        }

        let plaintext_addr = self.plaintext_addr.or(self
            .plaintext
            .then(|| SocketAddr::from(([0, 0, 0, 0], api::ports::ISTIOD_PLAINTEXT))));
        let grpc = GrpcConfig {
            tls_addr: self.grpc_addr,
            plaintext_addr,
            namespace: self.namespace,
            cluster_domain: self.cluster_domain.clone(),
            extra_dns_names: self.extra_dns_name,
            limits: ListenerLimits {
                max_connections: self.grpc_max_connections as usize,
                max_connections_per_peer: self
                    .grpc_max_connections_per_peer
                    .unwrap_or(self.grpc_max_connections)
                    as usize,
                handshake_timeout: self.grpc_handshake_timeout,
                header_timeout: self.grpc_preface_timeout,
                idle_timeout: self.grpc_idle_timeout,
            },
            max_receive_message_bytes: self.grpc_max_receive_message_size,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            ..GrpcConfig::default()
        };
        let http_addr = match (self.http_addr, &source) {
            (Some(addr), _) => Some(addr),
            (None, Source::Kubernetes) => {
                Some(SocketAddr::from(([0, 0, 0, 0], api::ports::ISTIOD_HTTP)))
            }
            (None, _) => None,
        };
        let webhook_addr = match (self.webhook_addr, &source) {
            (Some(addr), _) => Some(addr),
            (None, Source::Kubernetes) => Some(WebhookConfig::default().addr),
            (None, _) => None,
        };
        let webhook = webhook_addr.map(|addr| WebhookConfig {
            addr,
            handshake_timeout: self.webhook_timeout,
            request_timeout: self.webhook_timeout,
            max_body_bytes: self.webhook_max_body,
            max_connections: self.webhook_max_connections as usize,
            configuration_name: self.webhook_config_name,
            ..WebhookConfig::default()
        });
        let mesh = MeshConfig {
            trust_domain: self.trust_domain,
            cluster_id: self.cluster_id,
            cluster_domain: self.cluster_domain,
            root_namespace: self.root_namespace,
            network: String::new(),
            auto_allow_waypoint_policy: self.auto_allow_waypoint_policy,
            // Nobody would run the waypoints it creates.
            on_demand_waypoints: self.on_demand_waypoints && self.provision_waypoints,
            auto_allocate_ips: self.enable_ip_autoallocate,
        };
        Ok(AppConfig {
            source,
            tokens,
            ca,
            grpc,
            monitoring: MonitoringConfig {
                addr: self.monitoring_addr,
                http_addr,
                limits: ListenerLimits {
                    max_connections: self.monitoring_max_connections as usize,
                    max_connections_per_peer: self.monitoring_max_connections_per_peer as usize,
                    // Plain HTTP: no handshake.
                    handshake_timeout: self.monitoring_header_timeout,
                    header_timeout: self.monitoring_header_timeout,
                    idle_timeout: self.monitoring_idle_timeout,
                },
                debug_auth: self.debug_endpoint_auth,
                debug_namespaces: self
                    .debug_endpoint_auth_allowed_namespaces
                    .into_iter()
                    .map(|ns| ns.trim().to_string())
                    .filter(|ns| !ns.is_empty())
                    .collect(),
            },
            mesh,
            debounce: Debounce::default(),
            status: StatusConfig {
                retry_min: self.status_retry_min,
                retry_max: self.status_retry_max.max(self.status_retry_min),
            },
            webhook,
            provision,
            kube_client: None,
        })
    }
}

/// `dir` when it holds a plug-in CA's key, as upstream decides.
fn default_cacerts(dir: &Path) -> Option<PathBuf> {
    dir.join(root::CA_KEY).exists().then(|| dir.to_path_buf())
}

/// A [`parse_duration`] longer than 0: a timeout of 0 would drop every
/// connection at once.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("{text:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

/// A rate in requests per second: a positive number.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{text:?} is not a rate: give requests per second, a number above 0 (e.g. 10 or 0.5)"
        )),
    }
}

/// A duration as a sum of `<number><unit>` parts, units `ms`, `s`, `m`,
/// `h`, `d` (`90d`, `1h30m`, `500ms`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!("{text:?} is not a duration ({why}); write e.g. 500ms, 30s, 1h30m or 90d")
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad("a number must come first"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "" => return Err(bad("a unit must follow each number")),
            _ => return Err(bad("units are ms, s, m, h and d")),
        };
        rest = &rest[unit_len..];
        let part = unit
            .checked_mul(u32::try_from(number).map_err(|_| bad("the number is too large"))?)
            .ok_or_else(|| bad("too long"))?;
        total = total.checked_add(part).ok_or_else(|| bad("too long"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("istiod-rs").chain(extra.iter().copied()))
    }

    #[test]
    fn durations() {
        let secs = Duration::from_secs;
        assert_eq!(parse_duration("30"), Ok(secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(secs(5400)));
        assert_eq!(parse_duration("90d"), Ok(secs(90 * 86_400)));
        for bad in ["", "h", "5 days", "5x", "10m5", "99999999999999h"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("not a duration"), "{bad}: {err}");
        }
    }

    /// Local mode's flags, on a temporary directory kept while it lives.
    fn local_mode() -> (tempfile::TempDir, [String; 4]) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let t = dir.path().join("tokens.yaml").to_str().unwrap().to_string();
        let flags = ["--config-dir".into(), d, "--token-file".into(), t];
        (dir, flags)
    }

    #[test]
    fn waypoints_on_demand_are_on_unless_turned_off_or_nothing_provisions() {
        let (_dir, flags) = local_mode();
        let local: Vec<&str> = flags.iter().map(String::as_str).collect();
        let on = |extra: &[&str]| {
            let given = [&local[..], extra].concat();
            args(&given)
                .unwrap()
                .into_config()
                .unwrap()
                .mesh
                .on_demand_waypoints
        };
        assert!(on(&[]));
        assert!(!on(&["--on-demand-waypoints", "false"]));
        assert!(!on(&["--provision-waypoints", "false"]));
    }

    #[test]
    fn waypoints_are_provisioned_with_the_images_and_address_given() {
        let (_dir, flags) = local_mode();
        let local: Vec<&str> = flags.iter().map(String::as_str).collect();
        let config = args(&local).unwrap().into_config().unwrap();
        let provision = config.provision.unwrap();
        assert_eq!(provision.xds_address, "istiod.istio-system.svc:15012");
        assert_eq!(provision.tag, env!("CARGO_PKG_VERSION"));
        let mut given = local.to_vec();
        given.extend([
            "--namespace",
            "mesh",
            "--waypoint-hub",
            "registry.example.com/mesh",
            "--waypoint-tag",
            "1.2.3",
        ]);
        let provision = args(&given)
            .unwrap()
            .into_config()
            .unwrap()
            .provision
            .unwrap();
        assert_eq!(provision.xds_address, "istiod.mesh.svc:15012");
        assert_eq!(provision.hub, "registry.example.com/mesh");
        assert_eq!(provision.tag, "1.2.3");
        let off = [&local[..], &["--provision-waypoints", "false"]].concat();
        assert!(
            args(&off)
                .unwrap()
                .into_config()
                .unwrap()
                .provision
                .is_none()
        );
        // A value that would change the template's YAML is refused, naming
        // its flag.
        for (flag, value, says) in [
            (
                "--waypoint-image-pull-policy",
                "Sometimes",
                "is not Always, IfNotPresent or Never",
            ),
            ("--waypoint-hub", "hub\"\n", "has characters other than"),
            (
                "--waypoint-log-level",
                "info # x",
                "has characters other than",
            ),
        ] {
            let bad = [&local[..], &[flag, value]].concat();
            let err = args(&bad).unwrap().into_config().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{flag}: ")) && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn local_mode_needs_a_token_file_and_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let err = args(&["--config-dir", d])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("--token-file: required"),
            "{err}"
        );

        let missing = dir.path().join("nope");
        let err = args(&[
            "--config-dir",
            missing.to_str().unwrap(),
            "--token-file",
            "t",
        ])
        .unwrap()
        .into_config()
        .unwrap_err();
        assert!(err.to_string().starts_with("--config-dir:"), "{err}");

        let config = args(&["--config-dir", d, "--token-file", "t"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(matches!(config.source, Source::Directory(_)));
        assert!(matches!(config.tokens, TokenSource::File(_)));
        assert_eq!(config.grpc.plaintext_addr, None);
        assert_eq!(config.webhook, None, "no API server calls it in local mode");
        let config = args(&[
            "--config-dir",
            d,
            "--token-file",
            "t",
            "--webhook-addr",
            "127.0.0.1:7017",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(
            config.webhook.unwrap().addr,
            "127.0.0.1:7017".parse().unwrap()
        );
    }

    #[test]
    fn kubernetes_mode_by_default_and_listener_flags() {
        let config = args(&["--plaintext", "--extra-dns-name", "istiod.example.com"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(matches!(config.source, Source::Kubernetes));
        assert!(matches!(
            config.tokens,
            TokenSource::TokenReview(ref r) if *r == TokenReviewConfig::default()
        ));
        assert_eq!(
            config.grpc.plaintext_addr,
            Some("0.0.0.0:15010".parse().unwrap())
        );
        assert_eq!(config.webhook, Some(WebhookConfig::default()));
        assert!(
            config
                .grpc
                .dns_names()
                .contains(&"istiod.example.com".to_string())
        );
        let config = args(&["--plaintext-addr", "127.0.0.1:7010"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(
            config.grpc.plaintext_addr,
            Some("127.0.0.1:7010".parse().unwrap())
        );
    }

    #[test]
    fn auto_allow_waypoint_policy_is_off_unless_asked_for() {
        let config = args(&[]).unwrap().into_config().unwrap();
        assert!(!config.mesh.auto_allow_waypoint_policy);
        let config = args(&["--auto-allow-waypoint-policy"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(config.mesh.auto_allow_waypoint_policy);
    }

    #[test]
    fn ip_autoallocation_is_on_unless_turned_off() {
        let config = args(&[]).unwrap().into_config().unwrap();
        assert!(config.mesh.auto_allocate_ips);
        let config = args(&["--enable-ip-autoallocate", "false"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(!config.mesh.auto_allocate_ips);
    }

    #[test]
    fn webhook_flags() {
        let config = args(&[
            "--webhook-addr",
            "127.0.0.1:9443",
            "--webhook-config-name",
            "my-validator",
            "--webhook-max-body",
            "1024",
            "--webhook-timeout",
            "3s",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let webhook = config.webhook.unwrap();
        assert_eq!(webhook.addr, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(webhook.configuration_name, "my-validator");
        assert_eq!(webhook.max_body_bytes, 1024);
        assert_eq!(webhook.request_timeout, Duration::from_secs(3));
        assert_eq!(webhook.handshake_timeout, Duration::from_secs(3));
    }

    #[test]
    fn listener_and_rate_limits_default_to_the_documented_values() {
        let config = args(&[]).unwrap().into_config().unwrap();
        assert_eq!(config.grpc.limits, GrpcConfig::DEFAULT_LIMITS);
        assert_eq!(config.grpc.max_receive_message_bytes, 4 << 20);
        assert_eq!(config.grpc.keepalive_interval, Duration::from_secs(30));
        assert_eq!(config.grpc.keepalive_timeout, Duration::from_secs(10));
        assert_eq!(config.monitoring.limits, MonitoringConfig::DEFAULT_LIMITS);
        assert!(config.monitoring.debug_auth);
        assert!(config.monitoring.debug_namespaces.is_empty());
        assert_eq!(config.ca.rate_limit, CallerRateLimit::DEFAULT);
        assert_eq!(
            config.ca.max_requests_in_progress,
            crate::ca::DEFAULT_MAX_REQUESTS_IN_PROGRESS
        );
        assert_eq!(config.ca.root_cert_ttl, crate::ca::ROOT_CERT_TTL);
        assert_eq!(config.ca.root_check_interval, Duration::from_secs(3600));
        assert_eq!(config.ca.root_grace_percent, 20);
        assert_eq!(
            config.webhook.unwrap().max_connections,
            WebhookConfig::default().max_connections
        );

        let config = args(&[
            "--grpc-max-connections",
            "5",
            "--grpc-preface-timeout",
            "1s",
            "--grpc-max-receive-message-size",
            "1024",
            "--monitoring-max-connections",
            "3",
            "--monitoring-max-connections-per-peer",
            "2",
            "--grpc-max-connections-per-peer",
            "4",
            "--monitoring-idle-timeout",
            "2s",
            "--debug-endpoint-auth",
            "false",
            "--debug-endpoint-auth-allowed-namespaces",
            "kiali, monitoring",
            "--ca-requests-per-second",
            "0.5",
            "--ca-request-burst",
            "4",
            "--ca-max-requests-in-progress",
            "7",
            "--self-signed-root-check-interval",
            "0s",
            "--self-signed-root-grace-percent",
            "50",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.grpc.limits.max_connections, 5);
        assert_eq!(config.grpc.limits.header_timeout, Duration::from_secs(1));
        assert_eq!(config.grpc.max_receive_message_bytes, 1024);
        assert_eq!(config.grpc.limits.max_connections_per_peer, 4);
        assert_eq!(config.monitoring.limits.max_connections, 3);
        assert_eq!(config.monitoring.limits.max_connections_per_peer, 2);
        assert_eq!(
            config.monitoring.limits.idle_timeout,
            Duration::from_secs(2)
        );
        assert!(!config.monitoring.debug_auth);
        assert_eq!(config.monitoring.debug_namespaces, ["kiali", "monitoring"]);
        assert_eq!(
            config.ca.rate_limit,
            CallerRateLimit {
                per_second: 0.5,
                burst: 4
            }
        );
        assert_eq!(config.ca.max_requests_in_progress, 7);
        assert_eq!(config.ca.root_check_interval, Duration::ZERO);
        assert_eq!(config.ca.root_grace_percent, 50);

        for (flag, value) in [
            ("--grpc-max-connections", "0"),
            ("--monitoring-header-timeout", "0s"),
            ("--ca-requests-per-second", "0"),
            ("--ca-request-burst", "0"),
            ("--webhook-timeout", "0"),
        ] {
            let err = args(&[flag, value]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn token_review_flags() {
        let config = args(&[
            "--token-review-cache-ttl",
            "0",
            "--token-review-cache-size",
            "5",
            "--token-review-timeout",
            "2s",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let TokenSource::TokenReview(review) = config.tokens else {
            panic!("Kubernetes mode reviews tokens");
        };
        assert_eq!(
            review,
            TokenReviewConfig {
                timeout: Duration::from_secs(2),
                cache_ttl: Duration::ZERO,
                cache_capacity: 5,
            }
        );
    }

    #[test]
    fn ca_flags() {
        let dir = tempfile::tempdir().unwrap();
        let config = args(&[
            "--ca-dir",
            dir.path().to_str().unwrap(),
            "--trusted-node-agent",
            "kube-system/agent",
            "--default-cert-ttl",
            "1h",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(config.ca.state_dir, dir.path());
        assert_eq!(config.ca.default_cert_ttl, Duration::from_secs(3600));
        assert_eq!(
            config.ca.trusted_node_agents,
            vec!["kube-system/agent".parse::<ServiceAccount>().unwrap()]
        );
        let err = args(&["--default-cert-ttl", "100d"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("--max-cert-ttl"), "{err}");
        let err = args(&["--cacerts-dir", "/nonexistent/cacerts"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.to_string().starts_with("--cacerts-dir:"), "{err}");
        let err = args(&["--trusted-node-agent", "ztunnel"]).unwrap_err();
        assert!(err.to_string().contains("<namespace>/<name>"), "{err}");
    }

    #[test]
    fn plugin_ca_is_used_by_default_only_with_a_key() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(default_cacerts(dir.path()), None);
        std::fs::write(dir.path().join(root::CA_KEY), "key").unwrap();
        assert_eq!(default_cacerts(dir.path()), Some(dir.path().to_path_buf()));
    }
}
