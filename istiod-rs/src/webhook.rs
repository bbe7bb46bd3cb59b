//! istiod-rs's validating admission webhook: the API server sends every
//! AuthorizationPolicy and PeerAuthentication being created or updated to
//! `POST /validate` on port 15017 (upstream's; the `istiod` Service maps
//! 443 to it), and istiod-rs refuses the ones the mesh could only enforce
//! more strictly than written, naming the object and the field, so that
//! `kubectl apply` fails instead of the policy silently meaning less.
//!
//! - [`admission`]: AdmissionReview v1 in and out, and the decision (pure).
//! - [`configuration`]: Kubernetes mode keeps the
//!   ValidatingWebhookConfiguration's `caBundle` on the mesh root and turns
//!   its `failurePolicy` to `Fail` once the webhook is seen working.
//! - this module: the HTTPS server. It presents istiod's serving
//!   certificate (the one on 15012, issued by the mesh CA for
//!   `istiod.<ns>.svc`), speaks HTTP/1.1, and bounds what a client can hold:
//!   a proxy-core [`Listener`] caps its connections and gives the TLS
//!   handshake and the request headers each a deadline; the body has a
//!   deadline (408) and a size limit (413) here. A body that is not an
//!   AdmissionReview gets a 400 naming what is wrong.

pub mod admission;
pub mod configuration;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proxy_core::listener::{Listener, ListenerLimits, ListenerMetrics};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::grpc::serving_cert::ServingCert;
use admission::{AdmissionReview, FailureReason, Resource};

/// The path the API server posts to, as upstream.
pub const VALIDATE_PATH: &str = "/validate";
/// The name of the ValidatingWebhookConfiguration istiod-rs keeps up to
/// date: upstream's for the default revision in `istio-system`.
pub const DEFAULT_CONFIGURATION_NAME: &str = "istio-validator-istio-system";
/// Default body limit: an UPDATE's review carries the object twice, and
/// an object may be up to ~1.5 MiB (etcd's default request limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 6 * 1024 * 1024;
/// The listener's name in metrics and logs.
pub const LISTENER: &str = "webhook";

/// How the webhook is served; part of istiod-rs's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    /// HTTPS listener (upstream: 15017).
    pub addr: SocketAddr,
    /// A client that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// A request whose headers, then whose body, have not arrived by then
    /// is dropped (408 for the body).
    pub request_timeout: Duration,
    /// Largest request body accepted (413 beyond). An AdmissionReview of an
    /// UPDATE carries the object twice.
    pub max_body_bytes: usize,
    /// Connections held at once (the API servers keep a few each); one
    /// more is reset.
    pub max_connections: usize,
    /// Kubernetes mode: the ValidatingWebhookConfiguration to keep pointed
    /// at istiod.
    pub configuration_name: String,
    /// Kubernetes mode: first delay before that configuration is looked at
    /// again when it could not be settled; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], api::ports::ISTIOD_WEBHOOK)),
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: 128,
            configuration_name: DEFAULT_CONFIGURATION_NAME.into(),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }
}

impl WebhookConfig {
    /// The listener's limits. A connection on which nothing moves for
    /// twice the request timeout is dead: a live request would have been
    /// answered 408 by then. Its clients are the API servers, a few
    /// addresses with many connections each: no limit per address.
    pub fn limits(&self) -> ListenerLimits {
        ListenerLimits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            header_timeout: self.request_timeout,
            idle_timeout: self.request_timeout * 2,
        }
    }

    /// On an ephemeral loopback port (tests).
    pub fn on_loopback() -> Self {
        WebhookConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..WebhookConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("--webhook-addr {addr}: could not listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the webhook's TLS configuration was rejected: {0}")]
    Tls(#[from] rustls::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassedLabels {
    resource: Resource,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedLabels {
    resource: Resource,
    reason: FailureReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpErrorLabels {
    status: u16,
}

/// Upstream's validation metrics (`galley_validation_*`), with bounded labels.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    passed: Family<PassedLabels, Counter>,
    failed: Family<FailedLabels, Counter>,
    http_errors: Family<HttpErrorLabels, Counter>,
}

impl WebhookMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "galley_validation_passed",
            "Objects the validating webhook admitted, by resource",
            self.passed.clone(),
        );
        registry.register(
            "galley_validation_failed",
            "Objects the validating webhook refused, by resource and reason",
            self.failed.clone(),
        );
        registry.register(
            "galley_validation_http_error",
            "Requests to the validating webhook answered with an HTTP error, by status",
            self.http_errors.clone(),
        );
    }

    pub fn passed(&self, resource: Resource) -> u64 {
        self.passed.get_or_create(&PassedLabels { resource }).get()
    }

    pub fn failed(&self, resource: Resource, reason: FailureReason) -> u64 {
        self.failed
            .get_or_create(&FailedLabels { resource, reason })
            .get()
    }

    pub fn http_errors(&self, status: StatusCode) -> u64 {
        self.http_errors
            .get_or_create(&HttpErrorLabels {
                status: status.as_u16(),
            })
            .get()
    }
}

/// What answers requests.
struct Handler {
    root_namespace: String,
    request_timeout: Duration,
    max_body_bytes: usize,
    metrics: WebhookMetrics,
}

/// The bound webhook listener, ready to serve.
pub struct WebhookServer {
    listener: Listener,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<Handler>,
}

impl std::fmt::Debug for WebhookServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl WebhookServer {
    /// Binds the listener. Policies in `root_namespace` apply mesh-wide.
    pub async fn bind(
        config: &WebhookConfig,
        serving_cert: Arc<ServingCert>,
        root_namespace: impl Into<String>,
        metrics: WebhookMetrics,
        listeners: &ListenerMetrics,
    ) -> Result<Self, WebhookError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(proxy_core::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(serving_cert);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let bind_err = |source| WebhookError::Bind {
            addr: config.addr,
            source,
        };
        let listener = Listener::bind(config.addr, LISTENER, config.limits(), listeners)
            .await
            .map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(WebhookServer {
            listener,
            addr,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            handler: Arc::new(Handler {
                root_namespace: root_namespace.into(),
                request_timeout: config.request_timeout,
                max_body_bytes: config.max_body_bytes,
                metrics,
            }),
        })
    }

    /// The listener's address (its real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`; open connections then finish the request
    /// in flight.
    pub async fn serve(self, shutdown: CancellationToken) {
        tracing::info!(addr = %self.addr, "serving the validating webhook over HTTPS");
        let handler = self.handler;
        let service = tower::service_fn(move |request: Request<Incoming>| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request).await) }
        });
        self.listener
            .serve_http1(Some(self.acceptor), service, shutdown)
            .await;
    }
}

impl Handler {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.review(request).await {
            Ok(body) => Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .expect("a valid response"),
            Err((status, message)) => {
                self.metrics
                    .http_errors
                    .get_or_create(&HttpErrorLabels {
                        status: status.as_u16(),
                    })
                    .inc();
                tracing::info!(%status, "webhook request refused: {message}");
                Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(Full::new(Bytes::from(format!("{message}\n"))))
                    .expect("a valid response")
            }
        }
    }

    /// The AdmissionReview answering `request`, or an HTTP error.
    async fn review(&self, request: Request<Incoming>) -> Result<Bytes, (StatusCode, String)> {
        if request.uri().path() != VALIDATE_PATH {
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "no such path {:?}: the webhook is at {VALIDATE_PATH}",
                    request.uri().path()
                ),
            ));
        }
        if request.method() != Method::POST {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{VALIDATE_PATH} takes POST with an AdmissionReview"),
            ));
        }
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !content_type.starts_with("application/json") {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Type {content_type:?}: want application/json"),
            ));
        }
        let limit = self.max_body_bytes;
        let body = Limited::new(request.into_body(), limit).collect();
        let body = match tokio::time::timeout(self.request_timeout, body).await {
            Err(_) => {
                return Err((
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {:?}",
                        self.request_timeout
                    ),
                ));
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {limit} bytes (--webhook-max-body)"),
                ));
            }
            Ok(Err(e)) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                ));
            }
            Ok(Ok(body)) => body.to_bytes(),
        };
        let mut json = serde_json::Deserializer::from_slice(&body);
        let review: AdmissionReview = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let at = e.path().to_string();
            let at = if at == "." {
                String::new()
            } else {
                format!("{at}: ")
            };
            (
                StatusCode::BAD_REQUEST,
                format!("the body is not an AdmissionReview: {at}{}", e.inner()),
            )
        })?;
        if review.api_version != admission::API_VERSION || review.kind != admission::KIND {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "apiVersion {:?} kind {:?}: want {} {} (admissionReviewVersions: [v1])",
                    review.api_version,
                    review.kind,
                    admission::API_VERSION,
                    admission::KIND
                ),
            ));
        }
        let Some(request) = review.request else {
            return Err((
                StatusCode::BAD_REQUEST,
                "the AdmissionReview has no request".into(),
            ));
        };
        let decision = admission::decide(&request, &self.root_namespace);
        match &decision.refusal {
            None => {
                self.metrics
                    .passed
                    .get_or_create(&PassedLabels {
                        resource: decision.resource,
                    })
                    .inc();
            }
            Some((reason, message)) => {
                self.metrics
                    .failed
                    .get_or_create(&FailedLabels {
                        resource: decision.resource,
                        reason: *reason,
                    })
                    .inc();
                tracing::info!(kind = %request.kind.kind, namespace = %request.namespace, name = %request.name, operation = %request.operation, "admission refused: {message}");
            }
        }
        let review = decision.response(&request.uid).into_review();
        Ok(Bytes::from(
            serde_json::to_vec(&review).expect("an AdmissionReview serialises"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The install manifest and this module agree: name, path, ports, the
    /// kinds sent here, the review version, and what istiod-rs patches.
    #[test]
    fn the_install_manifest_matches_the_webhook() {
        // The configuration and its RBAC; the Service is istiod's own.
        let text = concat!(
            include_str!("../../manifests/install/istiod-validating-webhook.yaml"),
            "\n---\n",
            include_str!("../../manifests/install/istiod.yaml"),
        );
        let objects: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
        let of_kind = |kind: &str| objects.iter().find(|o| o["kind"] == kind).unwrap();

        let service = of_kind("Service");
        assert_eq!(service["metadata"]["name"], "istiod");
        let port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "https-webhook")
            .unwrap();
        assert_eq!(
            (port["port"].as_u64(), port["targetPort"].as_u64()),
            (Some(443), Some(u64::from(api::ports::ISTIOD_WEBHOOK)))
        );

        let configuration = of_kind("ValidatingWebhookConfiguration");
        assert_eq!(
            configuration["metadata"]["name"],
            DEFAULT_CONFIGURATION_NAME
        );
        let webhooks = configuration["webhooks"].as_array().unwrap();
        assert_eq!(webhooks.len(), 1);
        let webhook = &webhooks[0];
        let client = &webhook["clientConfig"];
        assert_eq!(client["service"]["name"], "istiod");
        assert_eq!(client["service"]["port"], 443);
        assert_eq!(client["service"]["path"], VALIDATE_PATH);
        assert!(client.get("caBundle").is_none(), "istiod-rs fills it in");
        assert_eq!(
            webhook["failurePolicy"], "Ignore",
            "Fail once istiod-rs has seen it work"
        );
        assert_eq!(webhook["sideEffects"], "None", "dry runs must reach it");
        assert_eq!(
            webhook["admissionReviewVersions"],
            serde_json::json!(["v1"])
        );
        let rules = &webhook["rules"][0];
        assert_eq!(rules["apiGroups"], serde_json::json!([admission::GROUP]));
        assert_eq!(rules["operations"], serde_json::json!(["CREATE", "UPDATE"]));
        assert_eq!(
            rules["resources"],
            serde_json::json!(["authorizationpolicies", "peerauthentications"])
        );
        let rules = &webhook["rules"][1];
        assert_eq!(
            rules["apiGroups"],
            serde_json::json!(["networking.istio.io"])
        );
        assert_eq!(rules["operations"], serde_json::json!(["CREATE", "UPDATE"]));
        assert_eq!(
            rules["resources"],
            serde_json::json!(["destinationrules", "virtualservices"])
        );

        // The RBAC covers what the configuration keeper does.
        let role = of_kind("ClusterRole");
        let verbs = |resource: &str| -> Vec<String> {
            objects
                .iter()
                .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
                .flat_map(|o| o["rules"].as_array().unwrap())
                .filter(|r| {
                    r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
                })
                .flat_map(|r| {
                    r["verbs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string())
                })
                .collect()
        };
        for verb in ["get", "list", "watch", "patch"] {
            assert!(
                verbs("validatingwebhookconfigurations")
                    .iter()
                    .any(|v| v == verb),
                "{verb}"
            );
        }
        assert!(verbs("authorizationpolicies").iter().any(|v| v == "create"));
        let binding = of_kind("ClusterRoleBinding");
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    }
}
