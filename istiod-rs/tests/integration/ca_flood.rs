//! A flood of certificate requests at the whole istiod-rs app (directory
//! source, xDS, CA, monitoring) on loopback: one caller asking hundreds of
//! times at once, and many callers each asking past their budget, while a
//! ztunnel's delta-ADS stream waits for a change. Every request is counted:
//! each caller gets exactly its burst signed and RESOURCE_EXHAUSTED for the
//! rest, a caller that did not flood is signed, the metrics (ours and
//! upstream's `citadel_server_*`) agree with the client's counts, and the
//! xDS stream gets the change made during the flood.

use crate::support::ads;
use crate::support::ca_client as client;
use crate::support::istiod;

use api::type_url::ADDRESS;
use istiod_rs::app::TokenSource;
use istiod_rs::ca::rate_limit::CallerRateLimit;
use rustls::pki_types::CertificateDer;

use ads::{AdsStream, names, node_id};
use istiod::{LocalIstiod, NAMESPACE, PATIENCE, pod, uid};

/// What each caller may ask at once; it refills at one per 1000 s, so no
/// token comes back during the test.
const BURST: usize = 10;
/// The callers that flood together, each with `PER_CALLER` requests.
const CALLERS: usize = 20;
const PER_CALLER: usize = 30;
/// The lone flooder's requests.
const LONE: usize = 300;
const ZTUNNEL: &str = "ztunnel-node-a";

fn tokens() -> String {
    let mut yaml = format!(
        "tokens:\n  - {{token: {ZTUNNEL}, serviceAccount: istio-system/ztunnel, node: node-a}}\n  \
         - {{token: quiet, serviceAccount: demo/quiet}}\n  \
         - {{token: lone, serviceAccount: demo/lone}}\n"
    );
    for i in 0..CALLERS {
        yaml += &format!("  - {{token: flood-{i}, serviceAccount: demo/caller-{i}}}\n");
    }
    yaml
}

/// Requests sent and how they ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    signed: usize,
    exhausted: usize,
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, other: Tally) -> Tally {
        Tally {
            signed: self.signed + other.signed,
            exhausted: self.exhausted + other.exhausted,
        }
    }
}

/// `count` CreateCertificate requests from the holder of `token`, all at
/// once on one connection.
async fn ask(
    istiod: &LocalIstiod,
    roots: &[CertificateDer<'static>],
    csr: &str,
    token: &str,
    count: usize,
) -> Tally {
    let channel = client::tls_channel(istiod.addresses().grpc_tls, roots)
        .await
        .unwrap();
    let requests = (0..count).map(|_| {
        let mut channel = channel.clone();
        let request = client::request(csr.to_string(), Some(token), 0, None);
        async move { tokio::time::timeout(PATIENCE, channel.create_certificate(request)).await }
    });
    let mut tally = Tally::default();
    for result in futures::future::join_all(requests).await {
        match result.expect("answered") {
            Ok(response) => {
                assert!(!response.into_inner().cert_chain.is_empty());
                tally.signed += 1;
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => tally.exhausted += 1,
            Err(status) => panic!("{token}: {status:?}"),
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_flood_is_limited_per_caller_others_are_signed_and_xds_keeps_serving() {
    let tokens_dir = tempfile::tempdir().unwrap();
    let tokens_file = tokens_dir.path().join("tokens.yaml");
    std::fs::write(&tokens_file, tokens()).unwrap();
    let mut istiod = LocalIstiod::start_with(
        &[
            ("namespace.yaml", NAMESPACE),
            (
                "web-1.yaml",
                &pod("web-1", "node-a", "web", "10.244.0.11", "app: web"),
            ),
        ],
        move |c| {
            c.tokens = TokenSource::File(tokens_file.clone());
            c.ca.rate_limit = CallerRateLimit {
                per_second: 0.001,
                burst: BURST as u32,
            };
        },
    )
    .await;
    let roots = istiod.roots();
    let csr = client::csr_pem(&rcgen::KeyPair::generate().unwrap());

    // A ztunnel holds the workloads.
    let channel = istiod.control_plane(ZTUNNEL).channel().unwrap();
    let mut proxy = AdsStream::open(channel, node_id(1), Some(ZTUNNEL), PATIENCE)
        .await
        .unwrap();
    proxy.subscribe(ADDRESS, Default::default()).await;
    let initial = proxy.recv().await;
    proxy.ack(&initial).await;
    assert!(
        names(&initial).contains(&uid("web-1")),
        "{:?}",
        names(&initial)
    );

    // The floods, and a pod added meanwhile that the ztunnel must get.
    let lone = ask(&istiod, &roots, &csr, "lone", LONE);
    let flooders: Vec<String> = (0..CALLERS).map(|i| format!("flood-{i}")).collect();
    let many = futures::future::join_all(
        flooders
            .iter()
            .map(|token| ask(&istiod, &roots, &csr, token, PER_CALLER)),
    );
    let xds = async {
        istiod.write(
            "web-2.yaml",
            &pod("web-2", "node-a", "web", "10.244.0.12", "app: web"),
        );
        loop {
            let change = proxy.recv().await;
            proxy.ack(&change).await;
            if names(&change).contains(&uid("web-2")) {
                return;
            }
        }
    };
    let (lone, many, ()) = tokio::join!(lone, many, xds);

    // Each flooder got its burst, not one more.
    assert_eq!(
        lone,
        Tally {
            signed: BURST,
            exhausted: LONE - BURST
        }
    );
    for tally in &many {
        assert_eq!(
            *tally,
            Tally {
                signed: BURST,
                exhausted: PER_CALLER - BURST
            }
        );
    }
    // A caller that did not flood is signed.
    let quiet = ask(&istiod, &roots, &csr, "quiet", 1).await;
    assert_eq!(
        quiet,
        Tally {
            signed: 1,
            exhausted: 0
        }
    );

    let total = many.iter().fold(lone + quiet, |sum, t| sum + *t);
    let requests = total.signed + total.exhausted;
    assert_eq!(requests, LONE + CALLERS * PER_CALLER + 1);
    let metric = |sample: &'static str| {
        let istiod = &istiod;
        async move { istiod.metric(sample).await as usize }
    };
    assert_eq!(
        metric(r#"istiod_ca_requests_total{result="resource_exhausted"}"#).await,
        total.exhausted
    );
    assert_eq!(
        metric(r#"istiod_ca_requests_total{result="success"}"#).await,
        total.signed
    );
    assert_eq!(metric("citadel_server_csr_count").await, requests);
    assert_eq!(
        metric("citadel_server_success_cert_issuance_count").await,
        total.signed
    );
    println!(
        "CSR flood: {LONE} from one caller and {PER_CALLER} from each of {CALLERS} callers at once: {} signed, {} RESOURCE_EXHAUSTED; a quiet caller signed; the ztunnel got the pod added meanwhile",
        total.signed, total.exhausted
    );
    istiod.stop().await;
}
