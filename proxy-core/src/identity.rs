//! Workload identity for the proxies: short-lived SPIFFE certificates whose
//! keys are generated here and never leave the process.
//!
//! - [`control_plane`]: the gRPC channel to istiod (TLS or plaintext, bearer
//!   token), shared with the xDS client.
//! - [`ca_client`]: `CreateCertificate` against istiod's CA.
//! - [`certificate`]: a [`WorkloadCertificate`] and how one is issued:
//!   generate a P-256 key, send a CSR to a [`CertificateSigner`], validate
//!   what comes back.
//! - [`manager`]: the [`CertificateManager`] that fetches, caches and renews a
//!   certificate per identity.
//! - [`root`]: a self-signed mesh root (istiod-rs's own, or the one
//!   `istioctl-rs install` gives it).

pub mod ca_client;
pub mod certificate;
pub mod control_plane;
pub mod manager;
pub mod root;

pub use ca_client::CaClient;
pub use certificate::{
    CertificateError, CertificateRequest, CertificateSigner, SignFuture, WorkloadCertificate, issue,
};
pub use control_plane::{
    AuthenticatedChannel, BearerToken, ControlPlane, ControlPlaneError, LearnedRoots,
};
pub use manager::{CertificateManager, CertificateStatus, FetchError, ManagerConfig};
