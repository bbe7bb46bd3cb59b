//! Who is calling: bearer tokens on the gRPC services (CA and xDS) are
//! turned into a [`Caller`] by an [`Authenticator`]: Kubernetes TokenReview
//! in kube mode ([`token_review`], its answers kept a short while by
//! [`review_cache`]), a token file in local mode ([`token_file`]).

pub mod review_cache;
pub mod token_file;
pub mod token_review;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use api::SpiffeId;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own workload identity (from its service account).
    pub identity: SpiffeId,
    /// The pod the caller's token is bound to (the `pod-name` / `pod-uid`
    /// extras of a bound service-account token), in the identity's
    /// namespace. The CA finds the caller's node through it.
    pub pod: Option<CallerPod>,
    /// The node the caller's credential names: a token file entry's
    /// `node`, or the `node-name` extra (Kubernetes 1.30+ bound tokens).
    pub node: Option<String>,
}

impl Caller {
    /// A caller known only by its identity.
    pub fn new(identity: SpiffeId) -> Self {
        Caller {
            identity,
            pod: None,
            node: None,
        }
    }
}

/// The pod a caller's token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerPod {
    pub name: String,
    /// The uid of the pod the token was issued for: a pod recreated with
    /// the same name has another.
    pub uid: String,
}

/// A Kubernetes service account, written `<namespace>/<name>`: how the
/// token file and the CA's list of trusted node agents name callers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// ztunnel's service account: the node agent the CA trusts by default.
    pub fn ztunnel() -> Self {
        ServiceAccount {
            namespace: api::labels::DEFAULT_ROOT_NAMESPACE.into(),
            name: "ztunnel".into(),
        }
    }

    /// This service account's identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, api::IdentityError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.name)
    }

    /// Whether `id` is this service account's identity (in any trust domain).
    pub fn is(&self, id: &SpiffeId) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.name
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A string that is not `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a service account: write `<namespace>/<name>`")]
pub struct InvalidServiceAccount(pub String);

impl FromStr for ServiceAccount {
    type Err = InvalidServiceAccount;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccount {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(InvalidServiceAccount(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `authorization: Bearer <token>`")]
    MissingToken,
    #[error("the bearer token was not accepted: {0}")]
    InvalidToken(String),
    #[error("could not check the bearer token: {0}")]
    Backend(String),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingToken | AuthError::InvalidToken(_) => {
                tonic::Status::unauthenticated(e.to_string())
            }
            AuthError::Backend(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Turns a bearer token into a caller.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// The bearer token of a gRPC request (`authorization: Bearer <token>`).
pub fn bearer_token(md: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    http_bearer_token(md.as_ref())
}

/// The bearer token of an HTTP request (`authorization: Bearer <token>`).
pub fn http_bearer_token(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::MissingToken)?
        .to_str()
        .map_err(|_| AuthError::InvalidToken("authorization header is not ASCII".into()))?;
    parse_bearer(value)
}

/// The token of an `authorization` header value `Bearer <token>`: the
/// scheme is case-insensitive (RFC 7235 section 2.1, RFC 6750 section
/// 2.1) and separated from the token by one or more spaces.
pub fn parse_bearer(value: &str) -> Result<&str, AuthError> {
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::InvalidToken(
            "authorization header is not `Bearer <token>`".into(),
        ));
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    Ok(token)
}

/// Authenticates a gRPC request's metadata.
pub async fn authenticate(
    auth: &dyn Authenticator,
    md: &tonic::metadata::MetadataMap,
) -> Result<Caller, AuthError> {
    let token = bearer_token(md)?;
    auth.authenticate(token).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_bearer_tokens() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(matches!(bearer_token(&md), Err(AuthError::MissingToken)));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(bearer_token(&md), Err(AuthError::InvalidToken(_))));
        md.insert("authorization", "Bearer  ".parse().unwrap());
        assert!(matches!(bearer_token(&md), Err(AuthError::MissingToken)));
        md.insert("authorization", "Bearer tok-1".parse().unwrap());
        assert_eq!(bearer_token(&md).unwrap(), "tok-1");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer tok-1",
            "bearer tok-1",
            "BEARER tok-1",
            "bEaReR tok-1",
            "Bearer   tok-1",
            " Bearer tok-1 ",
        ] {
            assert_eq!(parse_bearer(value).unwrap(), "tok-1", "{value:?}");
        }
        for value in ["Bearertok-1", "Basic tok-1", "Bearer-tok-1", "tok-1"] {
            assert!(
                matches!(parse_bearer(value), Err(AuthError::InvalidToken(_))),
                "{value:?}"
            );
        }
        for value in ["Bearer", "bearer   ", ""] {
            let parsed = parse_bearer(value);
            assert!(
                matches!(
                    parsed,
                    Err(AuthError::MissingToken | AuthError::InvalidToken(_))
                ),
                "{value:?}: {parsed:?}"
            );
        }
    }

    #[test]
    fn parses_service_accounts() {
        let sa: ServiceAccount = "istio-system/ztunnel".parse().unwrap();
        assert_eq!(sa, ServiceAccount::ztunnel());
        assert_eq!(sa.to_string(), "istio-system/ztunnel");
        let id = sa.identity("td").unwrap();
        assert_eq!(id.to_string(), "spiffe://td/ns/istio-system/sa/ztunnel");
        assert!(sa.is(&id));
        for bad in ["ztunnel", "/ztunnel", "istio-system/", "a/b/c"] {
            let err = bad.parse::<ServiceAccount>().unwrap_err().to_string();
            assert!(err.contains("<namespace>/<name>"), "{bad}: {err}");
        }
    }

    #[test]
    fn maps_to_grpc_statuses() {
        let s: tonic::Status = AuthError::MissingToken.into();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        let s: tonic::Status = AuthError::Backend("apiserver down".into()).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
