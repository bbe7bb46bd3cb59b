//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticate
//! the bearer token, take a token from the caller's rate-limit bucket
//! ([`super::rate_limit`]), decide whose identity the certificate carries
//! (the caller's, or with `ImpersonatedIdentity` a pod's on the caller's
//! node), sign, and count the outcome. A refused caller is told why (its
//! own credential's details only); refusals are logged at most once per
//! interval (impersonation refusals, the others), with how many were left
//! out.
//!
//! Beside each caller's budget, the service as a whole holds at most
//! [`CaConfig::max_requests_in_progress`](super::CaConfig) requests (from
//! the moment one arrives until it is answered): many callers each within
//! their budget still cannot pile up TokenReviews and memory without
//! bound. One over it is answered RESOURCE_EXHAUSTED at once (the proxies'
//! certificate managers retry with jittered backoff), counted as such, and
//! `istiod_ca_requests_in_progress` shows how close the CA runs to it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::SpiffeId;
use api::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use api::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use proxy_core::log_limit::LogLimit;
use proxy_core::metrics::UnsuffixedCounter;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use super::impersonation::{ImpersonationPolicy, NodeLookup, NodeSource, RefusalReason};
use super::rate_limit::RateLimiter;
use super::{CaError, CertificateAuthority};
use crate::auth::{self, AuthError, Authenticator, Caller};

/// The outcome of one request, as counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    success,
    unauthenticated,
    permission_denied,
    invalid_argument,
    /// The caller is over its rate limit, or the CA holds as many
    /// requests as it may.
    resource_exhausted,
    unavailable,
    internal,
}

/// A refused request is logged at most this often per kind.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeSourceLabels {
    source: NodeSource,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

/// Upstream istiod's CA counters (security/pkg/server/ca/monitoring.go),
/// under its names, kept next to our `istiod_ca_requests{result}`.
#[derive(Debug, Clone, Default)]
struct UpstreamCaCounters {
    csr: UnsuffixedCounter,
    success: UnsuffixedCounter,
    authentication_failure: UnsuffixedCounter,
    csr_parsing_error: UnsuffixedCounter,
}

/// The CA's metrics, registered into istiod's one registry.
#[derive(Debug, Clone)]
pub struct CaMetrics {
    requests: Family<OutcomeLabels, Counter>,
    upstream: UpstreamCaCounters,
    signing: Histogram,
    impersonations: Family<NodeSourceLabels, Counter>,
    impersonation_refusals: Family<RefusalLabels, Counter>,
    chain_expiry: Gauge<i64>,
    root_expiry: Gauge<i64>,
    in_progress: Gauge<i64>,
}

/// Seconds since the Unix epoch, for the expiry gauges.
fn unix_seconds(t: std::time::SystemTime) -> i64 {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl CaMetrics {
    pub fn new(registry: &mut Registry, ca: &CertificateAuthority) -> Self {
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "istiod_ca_requests",
            "CreateCertificate requests, by result",
            requests.clone(),
        );
        // 10 µs .. ~80 ms: a P-256 signature is tens of µs, RSA far more.
        let signing = Histogram::new(exponential_buckets(1e-5, 2.0, 14));
        registry.register(
            "istiod_ca_signing_duration_seconds",
            "Time to check a CSR and sign its certificate",
            signing.clone(),
        );
        let chain_expiry = Gauge::<i64>::default();
        let root_expiry = Gauge::<i64>::default();
        registry.register(
            "citadel_server_cert_chain_expiry_timestamp",
            "When the first certificate of the CA's chain (signing cert .. root) expires, in Unix seconds",
            chain_expiry.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "When the CA's root certificate expires, in Unix seconds",
            root_expiry.clone(),
        );
        let upstream = UpstreamCaCounters::default();
        registry.register(
            "citadel_server_csr_count",
            "CreateCertificate requests received",
            upstream.csr.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "Certificates issued",
            upstream.success.clone(),
        );
        registry.register(
            "citadel_server_authentication_failure_count",
            "Requests refused because the caller's token was invalid or could not be checked",
            upstream.authentication_failure.clone(),
        );
        registry.register(
            "citadel_server_csr_parsing_err_count",
            "Requests refused as invalid (a CSR that does not parse or sign, a bad argument)",
            upstream.csr_parsing_error.clone(),
        );
        let impersonations = Family::<NodeSourceLabels, Counter>::default();
        registry.register(
            "istiod_ca_impersonations",
            "Certificates a node agent obtained for a pod on its node, by how its node was found (pod: its pod in the cluster state; credential: its token's node)",
            impersonations.clone(),
        );
        let impersonation_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "istiod_ca_impersonation_refusals",
            "ImpersonatedIdentity requests refused, by reason (istiod's log names the caller and why)",
            impersonation_refusals.clone(),
        );
        let in_progress = Gauge::<i64>::default();
        registry.register(
            "istiod_ca_requests_in_progress",
            "CreateCertificate requests being authenticated, checked or signed now",
            in_progress.clone(),
        );
        let metrics = CaMetrics {
            in_progress,
            requests,
            upstream,
            signing,
            impersonations,
            impersonation_refusals,
            chain_expiry,
            root_expiry,
        };
        metrics.record_expiry(ca);
        metrics
    }

    /// Sets the expiry gauges from what `ca` signs with now (again after a
    /// reload, as upstream istiod's `handleEvent` in istio/istio
    /// `pilot/pkg/bootstrap/istio_ca.go` calls `RecordCertsExpiry`).
    pub fn record_expiry(&self, ca: &CertificateAuthority) {
        self.chain_expiry.set(unix_seconds(ca.chain_not_after()));
        self.root_expiry.set(unix_seconds(ca.root_not_after()));
    }

    fn count(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&OutcomeLabels { result: outcome })
            .inc();
        let u = &self.upstream;
        u.csr.inc();
        match outcome {
            Outcome::success => u.success.inc(),
            Outcome::unauthenticated | Outcome::unavailable => u.authentication_failure.inc(),
            Outcome::invalid_argument => u.csr_parsing_error.inc(),
            Outcome::permission_denied | Outcome::resource_exhausted | Outcome::internal => 0,
        };
    }

    /// How many requests ended with `outcome` (for tests and debug pages).
    /// Requests in progress now (`istiod_ca_requests_in_progress`).
    pub fn requests_in_progress(&self) -> i64 {
        self.in_progress.get()
    }

    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&OutcomeLabels { result: outcome })
            .get()
    }

    /// How many impersonations were granted with the node found from `source`.
    pub fn impersonations(&self, source: NodeSource) -> u64 {
        self.impersonations
            .get_or_create(&NodeSourceLabels { source })
            .get()
    }

    /// How many impersonations were refused for `reason`.
    pub fn impersonation_refusals(&self, reason: RefusalReason) -> u64 {
        self.impersonation_refusals
            .get_or_create(&RefusalLabels { reason })
            .get()
    }
}

/// The `IstioCertificateService` implementation.
pub struct CertificateService {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    nodes: Arc<dyn NodeLookup>,
    metrics: CaMetrics,
    limiter: Mutex<RateLimiter>,
    /// One permit per request in progress ([`CaConfig::max_requests_in_progress`](super::CaConfig)).
    in_progress: Arc<Semaphore>,
}

impl CertificateService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        nodes: Arc<dyn NodeLookup>,
        registry: &mut Registry,
    ) -> Self {
        let metrics = CaMetrics::new(registry, &ca);
        let limiter = Mutex::new(RateLimiter::new(ca.config().rate_limit));
        let in_progress = Arc::new(Semaphore::new(ca.config().max_requests_in_progress.max(1)));
        CertificateService {
            in_progress,
            ca,
            authenticator,
            nodes,
            metrics,
            limiter,
        }
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }

    /// The tonic service, ready for [`crate::grpc`].
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Vec<String>, Refusal> {
        let Ok(_permit) = self.in_progress.clone().try_acquire_owned() else {
            return Err(Refusal::Busy(format!(
                "istiod's CA is handling {} certificate requests, as many as it may at once; retry shortly",
                self.ca.config().max_requests_in_progress
            )));
        };
        let _counted = InProgress::enter(&self.metrics.in_progress);
        let caller = auth::authenticate(self.authenticator.as_ref(), request.metadata()).await?;
        let taken = self
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(&caller, Instant::now());
        if let Err(wait) = taken {
            let limit = self.ca.config().rate_limit;
            return Err(Refusal::RateLimited(format!(
                "{} made more than {} certificate requests at once or {}/s sustained; retry in {:.1}s",
                caller.identity,
                limit.burst,
                limit.per_second,
                wait.as_secs_f64()
            )));
        }
        let request = request.into_inner();
        let identity = self.identity_for(&caller, &request)?;
        let requested = u64::try_from(request.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let started = Instant::now();
        let chain = self.ca.sign_csr(&request.csr, &identity, requested)?;
        self.metrics
            .signing
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(caller = %caller.identity, %identity, "issued a certificate");
        Ok(chain)
    }

    /// The identity the certificate is for: the caller's own, unless a
    /// trusted node agent impersonates a pod on its node.
    fn identity_for(
        &self,
        caller: &Caller,
        request: &IstioCertificateRequest,
    ) -> Result<SpiffeId, Refusal> {
        let Some(wanted) = impersonated_identity(request)? else {
            return Ok(caller.identity.clone());
        };
        if wanted == caller.identity {
            return Ok(wanted);
        }
        let policy = ImpersonationPolicy {
            trusted_node_agents: &self.ca.config().trusted_node_agents,
            trust_domain: self.ca.trust_domain(),
        };
        match policy.authorize(caller, &wanted, self.nodes.as_ref()) {
            Ok(binding) => {
                self.metrics
                    .impersonations
                    .get_or_create(&NodeSourceLabels {
                        source: binding.source,
                    })
                    .inc();
                tracing::debug!(caller = %caller.identity, node = %binding.node, source = ?binding.source, requested = %wanted, "impersonation allowed");
                Ok(wanted)
            }
            Err(refusal) => {
                self.metrics
                    .impersonation_refusals
                    .get_or_create(&RefusalLabels {
                        reason: refusal.reason(),
                    })
                    .inc();
                static REFUSED: LogLimit = LogLimit::new(LOG_INTERVAL);
                if let Some(suppressed) = REFUSED.allow() {
                    tracing::warn!(caller = %caller.identity, pod = ?caller.pod, node = ?caller.node, requested = %wanted, reason = ?refusal.reason(), suppressed, "impersonation refused: {refusal}");
                }
                // The caller learns why, from what its own credential says;
                // where other pods run stays in the log.
                Err(Refusal::PermissionDenied(refusal.caller_message(&wanted)))
            }
        }
    }
}

/// The `ImpersonatedIdentity` metadata field, if present and non-empty.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<SpiffeId>, Refusal> {
    use prost_types::value::Kind;
    let Some(value) = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(api::labels::IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => s.parse().map(Some).map_err(|e| {
            Refusal::InvalidArgument(format!(
                "metadata.{}: {e}",
                api::labels::IMPERSONATED_IDENTITY
            ))
        }),
        _ => Err(Refusal::InvalidArgument(format!(
            "metadata.{} must be a string SPIFFE id",
            api::labels::IMPERSONATED_IDENTITY
        ))),
    }
}

/// Why a request got no certificate.
#[derive(Debug)]
enum Refusal {
    Auth(AuthError),
    PermissionDenied(String),
    InvalidArgument(String),
    RateLimited(String),
    /// The service holds as many requests as it may.
    Busy(String),
    Internal(String),
}

/// Counts a request in `istiod_ca_requests_in_progress` while it lives.
struct InProgress<'a>(&'a Gauge<i64>);

impl<'a> InProgress<'a> {
    fn enter(gauge: &'a Gauge<i64>) -> Self {
        gauge.inc();
        InProgress(gauge)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        Refusal::Auth(e)
    }
}

impl From<CaError> for Refusal {
    fn from(e: CaError) -> Self {
        match e {
            CaError::Csr(e) => Refusal::InvalidArgument(e.to_string()),
            other => Refusal::Internal(other.to_string()),
        }
    }
}

impl Refusal {
    fn outcome(&self) -> Outcome {
        match self {
            Refusal::Auth(AuthError::Backend(_)) => Outcome::unavailable,
            Refusal::Auth(_) => Outcome::unauthenticated,
            Refusal::PermissionDenied(_) => Outcome::permission_denied,
            Refusal::InvalidArgument(_) => Outcome::invalid_argument,
            Refusal::RateLimited(_) | Refusal::Busy(_) => Outcome::resource_exhausted,
            Refusal::Internal(_) => Outcome::internal,
        }
    }

    fn into_status(self) -> Status {
        match self {
            Refusal::Auth(e) => e.into(),
            Refusal::PermissionDenied(m) => Status::permission_denied(m),
            Refusal::InvalidArgument(m) => Status::invalid_argument(m),
            Refusal::RateLimited(m) | Refusal::Busy(m) => Status::resource_exhausted(m),
            Refusal::Internal(m) => {
                tracing::error!("could not issue a certificate: {m}");
                Status::internal("the CA could not issue the certificate; see istiod's log")
            }
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        match self.handle(request).await {
            Ok(cert_chain) => {
                self.metrics.count(Outcome::success);
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(refusal) => {
                let outcome = refusal.outcome();
                self.metrics.count(outcome);
                // Impersonation refusals and internal errors log their own
                // lines; the rest any caller can trigger at will.
                static REFUSED: LogLimit = LogLimit::new(LOG_INTERVAL);
                if !matches!(refusal, Refusal::PermissionDenied(_) | Refusal::Internal(_))
                    && let Some(suppressed) = REFUSED.allow()
                {
                    tracing::info!(?peer, ?outcome, reason = ?refusal, suppressed, "certificate request refused");
                }
                Err(refusal.into_status())
            }
        }
    }
}
