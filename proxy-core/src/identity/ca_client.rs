//! The client of istiod's CA (`istio.v1.auth.IstioCertificateService`):
//! the [`CertificateSigner`] proxies use in production.

use std::time::Duration;

use api::ca::IstioCertificateRequest;
use api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::value::Kind;

use super::certificate::{CertificateRequest, CertificateSigner, SignFuture};
use super::control_plane::{AuthenticatedChannel, ControlPlane, ControlPlaneError};

/// Metadata key a node agent uses to ask for a pod's identity, as upstream.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<AuthenticatedChannel>,
    timeout: Duration,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    pub fn new(control_plane: &ControlPlane) -> Result<Self, ControlPlaneError> {
        Ok(Self::from_channel(control_plane.authenticated_channel()?))
    }

    pub fn from_channel(channel: AuthenticatedChannel) -> Self {
        CaClient {
            client: IstioCertificateServiceClient::new(channel),
            timeout: Duration::from_secs(10),
        }
    }

    /// How long one `CreateCertificate` may take before it counts as failed
    /// (and is retried by the certificate manager's backoff).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl CertificateSigner for CaClient {
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
        let mut client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let metadata = request.impersonate.then(|| prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_string(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue(request.identity.to_string())),
                    },
                )]
                .into_iter()
                .collect(),
            });
            let message = IstioCertificateRequest {
                csr: request.csr_pem,
                // Sub-second lifetimes make no sense for X.509 (1 s resolution).
                validity_duration: i64::try_from(request.validity.as_secs().max(1))
                    .unwrap_or(i64::MAX),
                metadata,
            };
            let response = tokio::time::timeout(timeout, client.create_certificate(message))
                .await
                .map_err(|_| {
                    tonic::Status::deadline_exceeded(format!(
                        "CreateCertificate took longer than {timeout:?}"
                    ))
                })??;
            Ok(response.into_inner().cert_chain)
        })
    }
}
