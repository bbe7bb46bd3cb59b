//! Kube mode: bearer tokens are Kubernetes service-account tokens, checked
//! by the API server through a TokenReview with audience `istio-ca`.
//!
//! Only an authenticated review whose audiences include `istio-ca` and
//! whose user is `system:serviceaccount:<ns>:<sa>` is accepted. Bound
//! tokens name the pod they were issued to (`pod-name`, `pod-uid` extras,
//! every supported Kubernetes version) and, from Kubernetes 1.30, its node
//! (`node-name`): what lets the CA bind a node agent to its node.
//!
//! Answers are kept a short while ([`ReviewCache`]), so a fleet
//! reconnecting at once costs one review per token.

use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use prometheus_client::registry::Registry;

use super::review_cache::ReviewCache;
use super::{AuthError, AuthFuture, Authenticator, Caller, CallerPod};

/// The key under which bound service-account tokens carry the pod's node
/// (Kubernetes 1.30+).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The keys under which bound service-account tokens carry their pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";

/// How tokens are reviewed; part of istiod-rs's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenReviewConfig {
    /// A review that takes longer fails the request (UNAVAILABLE); the
    /// proxy retries.
    pub timeout: Duration,
    /// How long an accepted token's review is reused (zero: never).
    pub cache_ttl: Duration,
    /// At most this many reviews are kept.
    pub cache_capacity: usize,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        TokenReviewConfig {
            timeout: Duration::from_secs(10),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 10_000,
        }
    }
}

/// Authenticates bearer tokens with the Kubernetes TokenReview API.
#[derive(Debug)]
pub struct TokenReviewAuthenticator {
    reviewer: Reviewer,
    cache: ReviewCache,
}

/// What one review needs; cloned into each review's future.
#[derive(Clone)]
struct Reviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    timeout: Duration,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("trust_domain", &self.trust_domain)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    pub fn new(
        client: kube::Client,
        trust_domain: impl Into<String>,
        config: &TokenReviewConfig,
    ) -> Self {
        TokenReviewAuthenticator {
            reviewer: Reviewer {
                api: Api::all(client),
                trust_domain: trust_domain.into(),
                timeout: config.timeout,
            },
            cache: ReviewCache::new(config.cache_ttl, config.cache_capacity),
        }
    }

    /// Registers the cache's metrics.
    pub fn register(&self, registry: &mut Registry) {
        self.cache.register(registry);
    }

    pub fn cache(&self) -> &ReviewCache {
        &self.cache
    }
}

impl Reviewer {
    async fn review(self, token: String) -> Result<Caller, AuthError> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token,
                audiences: Some(vec![api::labels::CA_TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let timeout = self.timeout;
        let reviewed = tokio::time::timeout(
            timeout,
            self.api.create(&PostParams::default(), &request),
        )
        .await
        .map_err(|_| {
            AuthError::Backend(format!(
                "the Kubernetes API did not answer the TokenReview within {timeout:?} (--token-review-timeout)"
            ))
        })?
        .map_err(|e| {
            AuthError::Backend(format!(
                "TokenReview failed ({e}); check that istiod-rs may create tokenreviews"
            ))
        })?;
        let status = reviewed.status.unwrap_or_default();
        caller_from_review(&status, &self.trust_domain)
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        let reviewer = self.reviewer.clone();
        let owned = token.to_string();
        Box::pin(
            self.cache
                .get_or_review(token, move || reviewer.review(owned).boxed()),
        )
    }
}

/// The caller a TokenReview's status vouches for, if it vouches for one.
pub fn caller_from_review(
    status: &TokenReviewStatus,
    trust_domain: &str,
) -> Result<Caller, AuthError> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("not authenticated");
        return Err(AuthError::InvalidToken(format!(
            "the Kubernetes API rejected the token: {why}"
        )));
    }
    let audience_ok = status
        .audiences
        .iter()
        .flatten()
        .any(|a| a == api::labels::CA_TOKEN_AUDIENCE);
    if !audience_ok {
        return Err(AuthError::InvalidToken(format!(
            "the token is not for audience {:?}; mount a projected token with that audience",
            api::labels::CA_TOKEN_AUDIENCE
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| {
            AuthError::InvalidToken(format!(
                "the token belongs to {username:?}, not to a service account"
            ))
        })?;
    let identity = api::SpiffeId::new(trust_domain, namespace, service_account)
        .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
    let extra = |key: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|extra| extra.get(key))
            .and_then(|values| values.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    // A pod is named only with its uid: a name alone could be a newer pod's.
    let pod = match (extra(POD_NAME_EXTRA), extra(POD_UID_EXTRA)) {
        (Some(name), Some(uid)) => Some(CallerPod { name, uid }),
        _ => None,
    };
    Ok(Caller {
        identity,
        pod,
        node: extra(NODE_NAME_EXTRA),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::api::authentication::v1::UserInfo;
    use kube::client::Body;

    fn status(user: &str, audiences: &[&str], node: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: node.map(|n| [(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])].into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn accepts_service_accounts_with_the_ca_audience() {
        let caller = caller_from_review(
            &status(
                "system:serviceaccount:istio-system:ztunnel",
                &["istio-ca"],
                Some("node-1"),
            ),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(caller.node.as_deref(), Some("node-1"));
    }

    #[test]
    fn refuses_what_it_cannot_vouch_for() {
        let cases = [
            (
                TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some("token expired".into()),
                    ..Default::default()
                },
                "token expired",
            ),
            (
                status("system:serviceaccount:demo:client", &["api"], None),
                "not for audience",
            ),
            (
                status("system:serviceaccount:demo:client", &[], None),
                "not for audience",
            ),
            (
                status("alice", &["istio-ca"], None),
                "not to a service account",
            ),
            (
                status("system:serviceaccount:demo", &["istio-ca"], None),
                "not to a service account",
            ),
        ];
        for (status, want) in cases {
            let err = caller_from_review(&status, "cluster.local").unwrap_err();
            assert!(matches!(err, AuthError::InvalidToken(_)), "{err}");
            assert!(err.to_string().contains(want), "{err} should say {want}");
        }
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn authenticator() -> (TokenReviewAuthenticator, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        (
            TokenReviewAuthenticator::new(client, "cluster.local", &TokenReviewConfig::default()),
            handle,
        )
    }

    /// Asserts the exact request and answers it with `status`.
    async fn answer_review(handle: &mut Handle, token: &str, status: serde_json::Value) {
        let (request, send) = handle.next_request().await.expect("a TokenReview request");
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(
            request.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        assert_eq!(request.uri().query().unwrap_or(""), "");
        let body = request.into_body().collect_bytes().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "metadata": {},
                "spec": {"token": token, "audiences": ["istio-ca"]},
            })
        );
        let response = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {},
            "spec": {"token": token, "audiences": ["istio-ca"]},
            "status": status,
        });
        send.send_response(
            Response::builder()
                .status(201)
                .body(Body::from(serde_json::to_vec(&response).unwrap()))
                .unwrap(),
        );
    }

    #[tokio::test]
    async fn reviews_the_token_with_the_api_server() {
        let (auth, mut handle) = authenticator();
        let server = tokio::spawn(async move {
            answer_review(
                &mut handle,
                "bound-token",
                serde_json::json!({
                    "authenticated": true,
                    "audiences": ["istio-ca"],
                    "user": {
                        "username": "system:serviceaccount:istio-system:ztunnel",
                        "extra": {
                            NODE_NAME_EXTRA: ["node-7"],
                            POD_NAME_EXTRA: ["ztunnel-x2b9"],
                            POD_UID_EXTRA: ["uid-ztunnel-x2b9"],
                        },
                    },
                }),
            )
            .await
        });
        let caller = auth.authenticate("bound-token").await.unwrap();
        server.await.unwrap();
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(caller.node.as_deref(), Some("node-7"));
        assert_eq!(
            caller.pod,
            Some(CallerPod {
                name: "ztunnel-x2b9".into(),
                uid: "uid-ztunnel-x2b9".into()
            })
        );
    }

    #[test]
    fn a_pod_is_named_only_with_its_uid() {
        let with_extra = |extra: serde_json::Value| {
            let status: TokenReviewStatus = serde_json::from_value(serde_json::json!({
                "authenticated": true,
                "audiences": ["istio-ca"],
                "user": {"username": "system:serviceaccount:demo:web", "extra": extra},
            }))
            .unwrap();
            caller_from_review(&status, "cluster.local").unwrap()
        };
        let both =
            with_extra(serde_json::json!({POD_NAME_EXTRA: ["web-1"], POD_UID_EXTRA: ["u1"]}));
        assert_eq!(both.pod.unwrap().name, "web-1");
        assert_eq!(both.node, None, "no node-name extra before Kubernetes 1.30");
        for partial in [
            serde_json::json!({POD_NAME_EXTRA: ["web-1"]}),
            serde_json::json!({POD_UID_EXTRA: ["u1"]}),
            serde_json::json!({POD_NAME_EXTRA: [""], POD_UID_EXTRA: ["u1"]}),
            serde_json::json!({}),
        ] {
            assert_eq!(with_extra(partial.clone()).pod, None, "{partial}");
        }
    }

    fn accepted(sa: &str) -> serde_json::Value {
        serde_json::json!({
            "authenticated": true,
            "audiences": ["istio-ca"],
            "user": {"username": format!("system:serviceaccount:demo:{sa}")},
        })
    }

    /// Drops the authenticator (its client) and asserts that the API server
    /// got no request beyond those already answered.
    async fn assert_no_more_reviews(auth: TokenReviewAuthenticator, mut handle: Handle) {
        drop(auth);
        assert!(
            handle.next_request().await.is_none(),
            "an extra TokenReview was sent"
        );
    }

    #[tokio::test]
    async fn one_token_is_reviewed_once_while_its_answer_is_fresh() {
        let (auth, mut handle) = authenticator();
        let auth = std::sync::Arc::new(auth);
        // Concurrent requests with one token: one review, shared.
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.authenticate("fleet-token").await })
            })
            .collect();
        answer_review(&mut handle, "fleet-token", accepted("web")).await;
        for r in requests {
            assert_eq!(r.await.unwrap().unwrap().identity.service_account(), "web");
        }
        // And later ones are answered from the cache.
        for _ in 0..8 {
            auth.authenticate("fleet-token").await.unwrap();
        }
        assert_eq!(
            auth.cache()
                .lookups(super::super::review_cache::Lookup::miss),
            1
        );
        let auth = std::sync::Arc::into_inner(auth).unwrap();
        assert_no_more_reviews(auth, handle).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_answer_and_another_token_are_reviewed_again() {
        let (auth, mut handle) = authenticator();
        let server = async {
            answer_review(&mut handle, "token-a", accepted("a")).await;
            answer_review(&mut handle, "token-b", accepted("b")).await;
            answer_review(&mut handle, "token-a", accepted("a")).await;
        };
        let service_account = async |token: &str| {
            let caller = auth.authenticate(token).await.unwrap();
            caller.identity.service_account().to_string()
        };
        let client = async {
            assert_eq!(service_account("token-a").await, "a");
            assert_eq!(service_account("token-a").await, "a");
            // Another token is its own review.
            assert_eq!(service_account("token-b").await, "b");
            // Past the TTL, token-a is reviewed again.
            let ttl = TokenReviewConfig::default().cache_ttl;
            tokio::time::advance(ttl + Duration::from_secs(1)).await;
            assert_eq!(service_account("token-a").await, "a");
        };
        tokio::join!(server, client);
        assert_no_more_reviews(auth, handle).await;
    }

    #[tokio::test]
    async fn a_rejected_token_is_reviewed_each_time() {
        let (auth, mut handle) = authenticator();
        let rejected = serde_json::json!({"authenticated": false, "error": "pod not found"});
        for _ in 0..2 {
            let (r, ()) = tokio::join!(
                auth.authenticate("fresh-pod-token"),
                answer_review(&mut handle, "fresh-pod-token", rejected.clone())
            );
            assert!(matches!(r, Err(AuthError::InvalidToken(_))), "{r:?}");
        }
        assert_no_more_reviews(auth, handle).await;
    }

    #[tokio::test]
    async fn an_unauthenticated_review_is_an_invalid_token() {
        let (auth, mut handle) = authenticator();
        let server = tokio::spawn(async move {
            answer_review(
                &mut handle,
                "stale",
                serde_json::json!({"authenticated": false, "error": "token has expired"}),
            )
            .await
        });
        let err = auth.authenticate("stale").await.unwrap_err();
        server.await.unwrap();
        assert!(matches!(err, AuthError::InvalidToken(_)), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn an_api_error_is_a_backend_failure() {
        let (auth, mut handle) = authenticator();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            let status = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "tokenreviews.authentication.k8s.io is forbidden",
                "reason": "Forbidden", "code": 403,
            });
            send.send_response(
                Response::builder()
                    .status(403)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
        });
        let err = auth.authenticate("t").await.unwrap_err();
        server.await.unwrap();
        assert!(matches!(err, AuthError::Backend(_)), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
}
