//! Kube mode: bearer tokens are Kubernetes service-account tokens, checked
//! by the API server through a TokenReview with audience `istio-ca`.
//!
//! Only an authenticated review whose audiences include `istio-ca` and
//! whose user is `system:serviceaccount:<ns>:<sa>` is accepted. Bound
//! tokens of pods carry their node, which is what lets a node agent ask for
//! the identities of pods on its own node.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::{AuthError, AuthFuture, Authenticator, Caller};

/// The key under which bound service-account tokens carry the pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";
/// A review that takes longer than this fails the request (UNAVAILABLE);
/// the proxy retries.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Authenticates bearer tokens with the Kubernetes TokenReview API.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    trust_domain: String,
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, trust_domain: impl Into<String>) -> Self {
        TokenReviewAuthenticator {
            api: Api::all(client),
            trust_domain: trust_domain.into(),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![api::labels::CA_TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &request),
        )
        .await
        .map_err(|_| {
            AuthError::Backend(format!(
                "the Kubernetes API did not answer the TokenReview within {REVIEW_TIMEOUT:?}"
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
        Box::pin(self.review(token))
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
    let node = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .and_then(|nodes| nodes.first())
        .filter(|n| !n.is_empty())
        .cloned();
    Ok(Caller { identity, node })
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
            TokenReviewAuthenticator::new(client, "cluster.local"),
            handle,
        )
    }

    /// Asserts the exact request and answers it with `status`.
    async fn answer_review(mut handle: Handle, token: &str, status: serde_json::Value) {
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
        let (auth, handle) = authenticator();
        let server = tokio::spawn(answer_review(
            handle,
            "bound-token",
            serde_json::json!({
                "authenticated": true,
                "audiences": ["istio-ca"],
                "user": {
                    "username": "system:serviceaccount:istio-system:ztunnel",
                    "extra": {NODE_NAME_EXTRA: ["node-7"]},
                },
            }),
        ));
        let caller = auth.authenticate("bound-token").await.unwrap();
        server.await.unwrap();
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(caller.node.as_deref(), Some("node-7"));
    }

    #[tokio::test]
    async fn an_unauthenticated_review_is_an_invalid_token() {
        let (auth, handle) = authenticator();
        let server = tokio::spawn(answer_review(
            handle,
            "stale",
            serde_json::json!({"authenticated": false, "error": "token has expired"}),
        ));
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
