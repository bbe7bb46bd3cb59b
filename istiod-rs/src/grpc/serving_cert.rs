//! istiod's own TLS certificate on 15012: issued by the embedded CA to
//! istiod's SPIFFE identity and DNS names, handed to rustls through a
//! resolver, and renewed at half its lifetime so handshakes never see an
//! expired certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaError, CertificateAuthority};

/// A failed renewal is retried this often while the current one is valid.
const RETRY: Duration = Duration::from_secs(30);

struct Current {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// The serving certificate, always the freshest one issued.
pub struct ServingCert {
    ca: Arc<CertificateAuthority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    lifetime: Duration,
    current: ArcSwap<Current>,
    /// The CA's generation the first certificate was issued under: a swap
    /// before [`Self::keep_fresh`] starts watching is not missed.
    issued_under: u64,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("ServingCert")
            .field("identity", &self.identity)
            .field("dns_names", &self.dns_names)
            .field("not_after", &self.current.load().not_after)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error("could not issue istiod's serving certificate: {0}")]
    Issue(#[from] CaError),
    #[error("rustls refused istiod's serving certificate: {0}")]
    Tls(#[from] rustls::Error),
}

impl ServingCert {
    /// Issues the first certificate.
    pub fn issue(
        ca: Arc<CertificateAuthority>,
        identity: SpiffeId,
        dns_names: Vec<String>,
        lifetime: Duration,
    ) -> Result<Arc<Self>, ServingCertError> {
        let issued_under = *ca.subscribe().borrow();
        let current = issue(&ca, &identity, &dns_names, lifetime)?;
        Ok(Arc::new(ServingCert {
            issued_under,
            ca,
            identity,
            dns_names,
            lifetime,
            current: ArcSwap::from_pointee(current),
        }))
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().not_after
    }

    /// Half way through the current certificate's life.
    pub fn renew_at(&self) -> SystemTime {
        let current = self.current.load();
        let life = current
            .not_after
            .duration_since(current.not_before)
            .unwrap_or_default();
        current.not_before + life / 2
    }

    /// Replaces the certificate with a freshly issued one.
    pub fn renew(&self) -> Result<(), ServingCertError> {
        let next = issue(&self.ca, &self.identity, &self.dns_names, self.lifetime)?;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Renews at half of each certificate's life, and at once when the CA
    /// swaps its material (as upstream istiod after a plug-in reload:
    /// istio/istio `pilot/pkg/bootstrap/istio_ca.go`, `handleEvent` calls
    /// `updateRootCertAndGenKeyCert`), until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ca_changes = self.ca.subscribe();
        let mut next = if *ca_changes.borrow_and_update() == self.issued_under {
            self.renew_at()
        } else {
            SystemTime::now()
        };
        loop {
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let ca_changed = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => false,
                changed = ca_changes.changed() => changed.is_ok(),
            };
            next = match self.renew() {
                Ok(()) => {
                    tracing::info!(identity = %self.identity, not_after = ?self.not_after(), ca_changed, "renewed istiod's serving certificate");
                    self.renew_at()
                }
                Err(error) => {
                    tracing::error!(%error, "could not renew istiod's serving certificate; retrying");
                    SystemTime::now() + RETRY
                }
            };
        }
    }
}

fn issue(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    dns_names: &[String],
    lifetime: Duration,
) -> Result<Current, ServingCertError> {
    let issued = ca.issue_key_pair(identity, dns_names, lifetime)?;
    // Peers hold the root already; send the leaf and any intermediates.
    let mut chain = issued.chain;
    if chain.len() > 1 {
        chain.pop();
    }
    let key = CertifiedKey::from_der(chain, issued.key, &proxy_core::tls::provider())?;
    Ok(Current {
        key: Arc::new(key),
        not_before: issued.not_before,
        not_after: issued.not_after,
    })
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaConfig;

    /// A serving certificate from a fresh self-signed CA (kept in the dir).
    fn serving_cert(lifetime: Duration) -> (tempfile::TempDir, Arc<ServingCert>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(
            CertificateAuthority::new(CaConfig::new("cluster.local", dir.path())).unwrap(),
        );
        let id: SpiffeId = "spiffe://cluster.local/ns/istio-system/sa/istiod"
            .parse()
            .unwrap();
        let names = vec!["istiod.istio-system.svc".into()];
        (dir, ServingCert::issue(ca, id, names, lifetime).unwrap())
    }

    #[test]
    fn renews_half_way_and_replaces_the_certificate() {
        let (_dir, cert) = serving_cert(Duration::from_secs(3600));
        let first = cert.current.load().key.clone();
        let renew_at = cert.renew_at();
        let not_after = cert.not_after();
        let half = not_after.duration_since(renew_at).unwrap();
        assert!(half <= Duration::from_secs(1800) && half > Duration::from_secs(1700));
        // The chain holds only the leaf: the signer is the root itself.
        assert_eq!(first.cert.len(), 1);
        cert.renew().unwrap();
        assert_ne!(cert.current.load().key.cert[0], first.cert[0]);
    }

    #[tokio::test]
    async fn keep_fresh_replaces_a_short_lived_certificate() {
        let (_dir, cert) = serving_cert(Duration::from_secs(2));
        let first_not_after = cert.not_after();
        let first = cert.current.load().key.cert[0].clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(cert.clone().keep_fresh(shutdown.clone()));
        // Generous: only turns a hang into a failure.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while cert.current.load().key.cert[0] == first {
            assert!(tokio::time::Instant::now() < deadline, "never renewed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(cert.not_after() > first_not_after);
        shutdown.cancel();
        task.await.unwrap();
    }
}
