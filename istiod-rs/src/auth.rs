//! Who is calling: bearer tokens on the gRPC services (CA and xDS) are
//! turned into a [`Caller`] by an [`Authenticator`]: Kubernetes TokenReview
//! in kube mode, a token file in local mode.

use std::future::Future;
use std::pin::Pin;

use api::SpiffeId;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own workload identity (from its service account).
    pub identity: SpiffeId,
    /// The node the caller runs on, when known (bound tokens carry it). A
    /// node agent may only ask for identities of pods on this node.
    pub node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
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
    let value = md
        .get("authorization")
        .ok_or(AuthError::MissingToken)?
        .to_str()
        .map_err(|_| AuthError::InvalidToken("authorization header is not ASCII".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            AuthError::InvalidToken("authorization header is not `Bearer <token>`".into())
        })?
        .trim();
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
    fn maps_to_grpc_statuses() {
        let s: tonic::Status = AuthError::MissingToken.into();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        let s: tonic::Status = AuthError::Backend("apiserver down".into()).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
