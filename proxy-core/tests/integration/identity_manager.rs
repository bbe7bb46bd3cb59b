//! The certificate manager and certificate issuance against an in-process
//! CA: sharing, rotation, expiry, forgetting, and validation of what a CA
//! returns.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use proxy_core::identity::{
    self, CertificateError, CertificateManager, CertificateRequest, CertificateSigner, FetchError,
    ManagerConfig, SignFuture,
};
use proxy_core::testing::{TestCa, TestSigner};

/// Only to keep a broken build from hanging; nothing is timed.
const LIMIT: Duration = Duration::from_secs(60);

fn fast_retries() -> ManagerConfig {
    ManagerConfig {
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ..ManagerConfig::default()
    }
}

/// A manager whose CA issues certificates living `validity` (when given)
/// and an identity to ask it for.
fn manager_with(
    validity: Option<Duration>,
    config: ManagerConfig,
) -> (Arc<TestCa>, Arc<TestSigner>, CertificateManager, SpiffeId) {
    let ca = Arc::new(TestCa::new("cluster.local"));
    let signer = TestSigner::new(ca.clone());
    signer.set_validity(validity);
    let manager = signer.manager(config);
    let id = ca.identity("default", "web");
    (ca, signer, manager, id)
}

/// Polls `check` until it returns Some, failing after LIMIT.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_share_one_request() {
    let (_, signer, manager, id) = manager_with(None, ManagerConfig::default());

    signer.pause();
    let fetches: Vec<_> = (0..32)
        .map(|_| {
            let (manager, id) = (manager.clone(), id.clone());
            tokio::spawn(async move { manager.fetch(&id).await })
        })
        .collect();
    eventually("the first request", || async {
        (signer.request_count() > 0).then_some(())
    })
    .await;
    // Give every fetch the chance to pile up behind the held request.
    tokio::time::sleep(Duration::from_millis(100)).await;
    signer.resume();

    let mut certs = Vec::new();
    for fetch in fetches {
        certs.push(
            tokio::time::timeout(LIMIT, fetch)
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(signer.request_count(), 1, "one CSR for 32 callers");
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(certs[0].identity(), &id);

    // Later callers get the cached certificate.
    let again = manager.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&again, &certs[0]));
    assert_eq!(signer.request_count(), 1);
}

#[tokio::test]
async fn renews_a_short_lived_certificate_before_it_expires() {
    // Renewal is due half-way, 3 s before expiry: ample for a busy machine.
    let (_, signer, manager, id) = manager_with(Some(Duration::from_secs(6)), fast_retries());

    let first = manager.fetch(&id).await.unwrap();
    let second = eventually("a renewed certificate", || async {
        let cert = manager.fetch(&id).await.unwrap();
        (!Arc::ptr_eq(&cert, &first)).then_some(cert)
    })
    .await;

    assert!(second.not_after() > first.not_after());
    assert_ne!(second.serial_number(), first.serial_number());
    // The CA signed the renewal while the first certificate was valid: the
    // certificate was rotated, not replaced after a gap.
    assert!(
        second.not_before() < first.not_after(),
        "renewed before expiry"
    );
    assert!(signer.request_count() >= 2);
}

#[tokio::test]
async fn never_hands_out_an_expired_certificate() {
    let (_, signer, manager, id) = manager_with(Some(Duration::from_secs(2)), fast_retries());

    let cert = manager.fetch(&id).await.unwrap();
    signer.set_failing(true);

    let err = eventually("fetch to fail", || async {
        match manager.fetch(&id).await {
            Ok(c) => {
                assert!(
                    !c.is_expired_at(SystemTime::now()),
                    "handed out an expired cert"
                );
                None
            }
            Err(e) => Some(e),
        }
    })
    .await;
    assert!(matches!(err, FetchError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(SystemTime::now() >= cert.not_after());
    assert!(signer.request_count() > 2, "renewal was retried");

    // The CA recovers: the background retries pick it up.
    signer.set_failing(false);
    let fresh = eventually("a new certificate", || async {
        manager.fetch(&id).await.ok()
    })
    .await;
    assert!(fresh.not_after() > cert.not_after());
}

#[tokio::test]
async fn a_failed_first_issue_is_an_error_then_retried() {
    let (_, signer, manager, id) = manager_with(None, fast_retries());
    signer.set_failing(true);

    let err = manager.fetch(&id).await.unwrap_err();
    assert!(matches!(err, FetchError::Issue { .. }), "{err}");
    assert!(err.to_string().contains("failing on purpose"), "{err}");
    let status = &manager.snapshot()[0];
    assert_eq!(status.identity, id);
    assert!(status.certificate.is_none());

    signer.set_failing(false);
    let cert = eventually("a certificate", || async { manager.fetch(&id).await.ok() }).await;
    assert_eq!(cert.identity(), &id);
}

/// After an outage, a caller does not wait out the worker's backoff: its
/// demand makes the worker try again at once (at most once per
/// `demand_retry`), and the fetch gets the certificate.
#[tokio::test]
async fn a_caller_retries_at_once_instead_of_waiting_out_the_backoff() {
    let config = ManagerConfig {
        // A backoff far longer than the test may take.
        retry_min: Duration::from_secs(3600),
        retry_max: Duration::from_secs(3600),
        demand_retry: Duration::from_millis(10),
        ..ManagerConfig::default()
    };
    let (_, signer, manager, id) = manager_with(None, config);
    signer.set_failing(true);
    assert!(manager.fetch(&id).await.is_err());
    let attempts = signer.request_count();
    // Within demand_retry of the last failure, the error is returned as is.
    assert!(manager.fetch(&id).await.is_err());

    // The CA is back.
    signer.set_failing(false);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cert = tokio::time::timeout(LIMIT, manager.fetch(&id))
        .await
        .expect("the fetch does not wait for the hour-long backoff")
        .expect("a certificate once the CA answers");
    assert_eq!(cert.identity(), &id);
    assert!(signer.request_count() > attempts);
}

/// When the control plane comes back, every identity in backoff is retried
/// at once, without anyone asking for its certificate.
#[tokio::test]
async fn failed_identities_retry_when_told_the_control_plane_is_back() {
    let config = ManagerConfig {
        retry_min: Duration::from_secs(3600),
        retry_max: Duration::from_secs(3600),
        ..ManagerConfig::default()
    };
    let (_, signer, manager, id) = manager_with(None, config);
    signer.set_failing(true);
    assert!(manager.fetch(&id).await.is_err());
    signer.set_failing(false);
    assert_eq!(manager.retry_failed(), 1);
    let cert = eventually("the certificate, issued in the background", || async {
        manager.snapshot()[0].certificate.clone()
    })
    .await;
    assert_eq!(cert.identity(), &id);
    assert_eq!(manager.retry_failed(), 0, "nothing left to retry");
}

#[tokio::test]
async fn forget_stops_renewing() {
    let (ca, signer, manager, _) = manager_with(Some(Duration::from_secs(2)), fast_retries());
    let (kept, gone) = (
        ca.identity("default", "kept"),
        ca.identity("default", "gone"),
    );

    manager.fetch(&kept).await.unwrap();
    manager.fetch(&gone).await.unwrap();
    assert!(manager.forget(&gone));
    assert!(!manager.forget(&gone), "already forgotten");
    assert_eq!(manager.snapshot().len(), 1);

    // Wait until `kept` has been renewed twice: `gone` would have been too.
    eventually("two renewals of the kept identity", || async {
        let renewals = signer
            .requests()
            .iter()
            .filter(|r| r.identity == kept)
            .count();
        (renewals >= 3).then_some(())
    })
    .await;
    let gone_requests = signer
        .requests()
        .iter()
        .filter(|r| r.identity == gone)
        .count();
    assert_eq!(gone_requests, 1);
}

#[tokio::test]
async fn node_agent_mode_asks_to_impersonate() {
    let ca = Arc::new(TestCa::new("cluster.local"));
    let signer = TestSigner::new(ca.clone());
    let manager = signer.manager(ManagerConfig {
        impersonate: true,
        validity: Duration::from_secs(3600),
        ..ManagerConfig::default()
    });
    let id = ca.identity("bookinfo", "reviews");
    manager.fetch(&id).await.unwrap();

    let request = &signer.requests()[0];
    assert!(request.impersonate);
    assert_eq!(request.identity, id);
    assert_eq!(request.validity, Duration::from_secs(3600));
    assert!(
        request
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    );
}

/// A CA that misbehaves in one specific way.
struct Misbehaving<F>(F);

impl<F> CertificateSigner for Misbehaving<F>
where
    F: Fn(&CertificateRequest) -> Result<Vec<String>, tonic::Status> + Send + Sync + 'static,
{
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
        let answer = (self.0)(&request);
        Box::pin(async move { answer })
    }
}

async fn issue_with<F>(id: &SpiffeId, answer: F) -> CertificateError
where
    F: Fn(&CertificateRequest) -> Result<Vec<String>, tonic::Status> + Send + Sync + 'static,
{
    identity::issue(&Misbehaving(answer), id, Duration::from_secs(3600), false)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn rejects_what_a_ca_should_not_have_returned() {
    let ca = Arc::new(TestCa::new("cluster.local"));
    let id = ca.identity("default", "web");
    let hour = Duration::from_secs(3600);

    let err = issue_with(&id, |_| Ok(Vec::new())).await;
    assert!(matches!(err, CertificateError::EmptyChain { .. }), "{err}");

    let err = issue_with(&id, |_| Ok(vec!["garbage".into()])).await;
    assert!(
        matches!(err, CertificateError::MalformedChain { .. }),
        "{err}"
    );

    let signer = ca.clone();
    let err = issue_with(&id, move |r| {
        signer.sign_csr(&r.csr_pem, &signer.identity("default", "admin"), hour)
    })
    .await;
    assert!(
        matches!(err, CertificateError::WrongIdentity { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("sa/admin"), "{err}");

    // A valid certificate for the right identity, but for someone else's key.
    let signer = ca.clone();
    let err = issue_with(&id, move |r| {
        Ok(vec![
            signer.certificate(&r.identity).chain_pem(),
            signer.root_pem(),
        ])
    })
    .await;
    assert!(matches!(err, CertificateError::KeyMismatch { .. }), "{err}");

    // A leaf with no trust bundle after it.
    let signer = ca.clone();
    let err = issue_with(&id, move |r| {
        let mut chain = signer.sign_csr(&r.csr_pem, &r.identity, hour)?;
        chain.pop();
        Ok(chain)
    })
    .await;
    assert!(matches!(err, CertificateError::NoRoots { .. }), "{err}");
    assert!(err.to_string().contains("sa/web"), "{err}");

    // Signed by another CA, sent with this CA's roots.
    let other = Arc::new(TestCa::new("cluster.local"));
    let roots = ca.root_pem();
    let err = issue_with(&id, move |r| {
        let mut chain = other.sign_csr(&r.csr_pem, &r.identity, hour)?;
        *chain.last_mut().expect("leaf and root") = roots.clone();
        Ok(chain)
    })
    .await;
    assert!(matches!(err, CertificateError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("sa/web"), "{err}");

    let err = issue_with(&id, |_| {
        Err(tonic::Status::permission_denied("not your pod"))
    })
    .await;
    assert!(matches!(err, CertificateError::Ca { .. }), "{err}");
    assert!(err.to_string().contains("not your pod"), "{err}");

    let cert = identity::issue(
        &Misbehaving({
            let ca = ca.clone();
            move |r: &CertificateRequest| ca.sign_csr(&r.csr_pem, &r.identity, hour)
        }),
        &id,
        hour,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        cert.chain().len(),
        1,
        "the root is not part of the presented chain"
    );
    assert_eq!(cert.roots(), ca.roots().as_slice());
    assert!(
        !format!("{cert:?}").contains("PRIVATE"),
        "Debug never shows the key"
    );
}
