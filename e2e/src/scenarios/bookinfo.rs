//! Bookinfo end to end on the local cluster: our copies of upstream's
//! samples (`manifests/samples/bookinfo/`, `manifests/samples/curl/`,
//! `manifests/samples/waypoint.yaml`) applied as they are, into namespace
//! `default` (the samples' policies name `cluster.local/ns/default/sa/...`),
//! which the scenario labels `istio.io/dataplane-mode=ambient` with a
//! Namespace object of its own, as `kubectl label` would.
//!
//! The one substitution is the images: the local cluster's Deployment
//! controller runs upstream's Bookinfo images as the e2e `echo` app calling
//! what the real app calls (productpage -> details and reviews, reviews
//! v2/v3 -> ratings, at the Service addresses kubelet gives the pod), and
//! the curl image as a pod holding only its network, where the `client` app
//! is exec'd as one execs curl (see [`crate::deployments`]). The replies are
//! [`crate::apps::EchoReply`]s with the downstream ones nested, not HTML.
//!
//! ```text
//! namespace default (ambient)    Deployments details-v1, ratings-v1, reviews-v1..v3,
//!                                productpage-v1, curl -> pods <deployment>-0
//!                                Services details, ratings, reviews, productpage (9080)
//!                                pod bookinfo-other-0 (service account default), for a while
//!                                then: Gateway waypoint -> pod waypoint-0, Services reviews-v1..v3
//! ```
//!
//! The scenario, in order: every hop of a page (curl -> productpage ->
//! details, reviews; reviews v2/v3 -> ratings) answers and is counted by
//! its destination's ztunnel as mutual TLS between the two SPIFFE ids; with
//! `productpage-viewer.yaml` curl still gets its page and a client of
//! another service account is refused (connection closed, a policy denial
//! counted); with the namespace's waypoint and `route-reviews-90-10.yaml`,
//! reviews answers from v1 and v2 only, about 90/10. Everything is removed
//! at the end, the namespace's labels too, also when a step fails.
//!
//! Local cluster only: the Kubernetes run (`cargo xtask e2e`) has no
//! registry with upstream's images.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::fixture::{L4Fixture, client_pod, namespace_yaml, service_vip};
use super::l4::{failed, policy_denials};
use super::l7::{SPLIT_REQUESTS, WEIGHT_TOLERANCE, share_within};
use super::policies::Applied;
use super::{Scenario, l7};
use crate::apps::{EchoReply, HttpReport, TallyReport};
use crate::cluster::{Cluster, PodInfo};
use crate::probe::{self, ProbeError, eventually, mtls_from_to, ztunnel};

const BOOKINFO: &str = include_str!("../../../manifests/samples/bookinfo/bookinfo.yaml");
const CURL: &str = include_str!("../../../manifests/samples/curl/curl.yaml");
const VIEWER: &str = include_str!("../../../manifests/samples/bookinfo/productpage-viewer.yaml");
const VERSIONS: &str = include_str!("../../../manifests/samples/bookinfo/bookinfo-versions.yaml");
const ROUTE: &str = include_str!("../../../manifests/samples/bookinfo/route-reviews-90-10.yaml");
const WAYPOINT: &str = include_str!("../../../manifests/samples/waypoint.yaml");

/// The samples' namespace.
const NS: &str = "default";
/// The port every Bookinfo Service serves.
const PORT: u16 = 9080;
/// The pods the Deployment controller runs for the samples, with their
/// service accounts (`<deployment>-0`: one replica each).
const PODS: [(&str, &str); 7] = [
    ("productpage-v1-0", "bookinfo-productpage"),
    ("details-v1-0", "bookinfo-details"),
    ("reviews-v1-0", "bookinfo-reviews"),
    ("reviews-v2-0", "bookinfo-reviews"),
    ("reviews-v3-0", "bookinfo-reviews"),
    ("ratings-v1-0", "bookinfo-ratings"),
    ("curl-0", "curl"),
];
/// The pod of the sample waypoint Gateway `waypoint`.
const WAYPOINT_POD: &str = "waypoint-0";
/// A client of another service account than the viewer policy lets in.
const OTHER: &str = "bookinfo-other-0";

/// How long the samples' pods may take to run and join the mesh, and the
/// waypoint to be Ready. Generous: CI machines are slow.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a policy or route may take to show in traffic.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one page may take (three hops, each a new connection).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Most pages asked for until each reviews version has answered one: with
/// the three picked at random, missing one in 60 happens once in 10^10.
const MAX_PAGES: usize = 60;

pub fn all() -> Vec<Scenario> {
    vec![Scenario {
        name: "bookinfo_every_hop_in_mtls_then_viewer_policy_then_reviews_90_10",
        run: bookinfo,
    }]
}

fn bookinfo(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let world = Bookinfo::deploy(cluster, &f.trust_domain)?;
    let hops = world.every_hop_in_mtls()?;
    let viewer = world.productpage_viewer()?;
    let split = world.reviews_90_10()?;
    Ok(format!("{hops}; {viewer}; {split}"))
}

/// The samples running; on drop everything the scenario applied or
/// started is removed and namespace `default` loses its labels again.
struct Bookinfo<'a> {
    cluster: &'a dyn Cluster,
    trust_domain: String,
    pods: BTreeMap<&'static str, PodInfo>,
    /// `http://<productpage VIP>:9080/productpage`.
    page_url: String,
    samples: Option<Applied<'a>>,
}

impl Drop for Bookinfo<'_> {
    fn drop(&mut self) {
        if self.cluster.pod(NS, OTHER).is_some()
            && let Err(e) = self.cluster.delete_pod(NS, OTHER)
        {
            eprintln!("e2e: could not delete {NS}/{OTHER}: {e}");
        }
        drop(self.samples.take());
        // The Deployment controller deletes the pods of the deleted
        // Deployments (and of the waypoint istiod-rs no longer provisions).
        let gone = eventually(
            "the samples' pods to be deleted with their Deployments",
            START_TIMEOUT,
            || {
                let left: Vec<&str> = PODS
                    .iter()
                    .map(|(p, _)| *p)
                    .chain([WAYPOINT_POD])
                    .filter(|p| self.cluster.pod(NS, p).is_some())
                    .collect();
                Ok(if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still running: {left:?}"))
                })
            },
        );
        if let Err(e) = gone {
            eprintln!("e2e: {e}");
        }
        if let Err(e) = self.cluster.apply_yaml(&namespace_yaml(NS, false)) {
            eprintln!("e2e: could not take the labels off namespace {NS}: {e}");
        }
    }
}

/// Namespace `default` enrolled, and with `use-waypoint` when asked.
fn namespace(waypoint: bool) -> String {
    let mut yaml = namespace_yaml(NS, true);
    if waypoint {
        yaml.push_str(&format!("    {}: waypoint\n", api::labels::USE_WAYPOINT));
    }
    yaml
}

/// What one page showed: which reviews pod answered, and which ratings pod
/// it asked (if any).
struct Page {
    reviews: String,
    ratings: Option<String>,
}

impl<'a> Bookinfo<'a> {
    /// Labels the namespace, applies the samples and waits until the
    /// controller's pods are in the mesh and productpage has its VIP.
    fn deploy(cluster: &'a dyn Cluster, trust_domain: &str) -> Result<Bookinfo<'a>, ProbeError> {
        cluster.apply_yaml(&namespace(false))?;
        let mut world = Bookinfo {
            cluster,
            trust_domain: trust_domain.to_string(),
            pods: BTreeMap::new(),
            page_url: String::new(),
            samples: None,
        };
        world.samples = Some(Applied::new(cluster, &format!("{BOOKINFO}\n---\n{CURL}"))?);
        for (name, _) in PODS {
            let pod = eventually(
                &format!("the Deployment controller to run {NS}/{name}"),
                START_TIMEOUT,
                || Ok(cluster.pod(NS, name).ok_or_else(|| "not yet".to_string())),
            )?;
            world.pods.insert(name, pod);
        }
        let enrolled: Vec<(&PodInfo, &str)> = PODS
            .iter()
            .map(|(name, sa)| (&world.pods[name], *sa))
            .collect();
        probe::until_in_mesh(cluster, trust_domain, &enrolled, START_TIMEOUT)?;
        let vip = eventually(
            "the productpage Service's cluster IP",
            CHANGE_TIMEOUT,
            || Ok(service_vip(cluster, NS, "productpage")?.ok_or("no VIP yet".to_string())),
        )?;
        world.page_url = format!("http://{vip}:{PORT}/productpage");
        Ok(world)
    }

    fn pod(&self, name: &str) -> &PodInfo {
        &self.pods[name]
    }

    fn principal(&self, service_account: &str) -> String {
        probe::principal(&self.trust_domain, NS, service_account)
    }

    /// `GET /productpage` from `from`.
    fn get_page(&self, from: &PodInfo) -> Result<HttpReport, ProbeError> {
        let args = [
            "http",
            &self.page_url,
            "--timeout",
            &format!("{}ms", REQUEST_TIMEOUT.as_millis()),
        ]
        .map(String::from);
        probe::client(self.cluster, from, &args, REQUEST_TIMEOUT * 3)
    }

    /// A page from curl, every hop answered by the pod it should be.
    fn page(&self) -> Result<Page, ProbeError> {
        let report = self.get_page(self.pod("curl-0"))?;
        whole_page(&report).map_err(|why| {
            failed(
                &format!("{NS}/curl-0 GET {}", self.page_url),
                format!("{why}; got {}", l7::describe(&report)),
            )
        })
    }

    /// Pages until each reviews version has answered one; each hop counted
    /// as mutual TLS between the caller's and the callee's SPIFFE ids by
    /// the callee's ztunnel.
    fn every_hop_in_mtls(&self) -> Result<String, ProbeError> {
        let hops = [
            ("curl-0", "productpage-v1-0"),
            ("productpage-v1-0", "details-v1-0"),
            ("productpage-v1-0", "reviews-v1-0"),
            ("productpage-v1-0", "reviews-v2-0"),
            ("productpage-v1-0", "reviews-v3-0"),
            ("reviews-v2-0", "ratings-v1-0"),
            ("reviews-v3-0", "ratings-v1-0"),
        ];
        let sa = |pod: &str| {
            PODS.iter()
                .find(|(p, _)| *p == pod)
                .map(|(_, sa)| *sa)
                .expect("every hop's pods are in PODS")
        };
        // Pods of one service account on one node share a count.
        let counters: BTreeSet<(String, String, String)> = hops
            .iter()
            .map(|(from, to)| {
                (
                    self.pod(to).node.clone(),
                    self.principal(sa(from)),
                    self.principal(sa(to)),
                )
            })
            .collect();
        let count = |(node, src, dst): &(String, String, String)| {
            probe::connections_opened(self.cluster, &ztunnel(node), &mtls_from_to(src, dst))
        };
        let before: BTreeMap<_, f64> = counters
            .iter()
            .map(|c| Ok((c.clone(), count(c)?)))
            .collect::<Result<_, ProbeError>>()?;
        let mut answered: BTreeMap<String, (usize, Option<String>)> = BTreeMap::new();
        let mut pages = 0;
        while answered.len() < 3 && pages < MAX_PAGES {
            let page = self.page()?;
            pages += 1;
            let seen = answered.entry(page.reviews).or_default();
            seen.0 += 1;
            seen.1 = page.ratings;
        }
        if answered.len() < 3 {
            return Err(failed(
                "reviews v1, v2, v3 behind Service reviews",
                format!("only these answered {pages} pages: {answered:?}"),
            ));
        }
        for counter in &counters {
            let (node, src, dst) = counter;
            eventually(
                &format!("the ztunnel on {node} to count mTLS connections {src} -> {dst}"),
                CHANGE_TIMEOUT,
                || {
                    let now = count(counter)?;
                    Ok(if now > before[counter] {
                        Ok(())
                    } else {
                        Err(format!("still {now}"))
                    })
                },
            )?;
        }
        let reviews: Vec<String> = answered
            .iter()
            .map(|(pod, (n, ratings))| match ratings {
                Some(r) => format!("{pod} x{n} (asked {r})"),
                None => format!("{pod} x{n}"),
            })
            .collect();
        Ok(format!(
            "{pages} pages from {NS}/curl-0 via productpage's VIP, each with details-v1-0 and one of {}; \
             mTLS counted at each callee's ztunnel for curl -> productpage -> details, reviews; reviews -> ratings",
            reviews.join(", ")
        ))
    }

    /// `productpage-viewer.yaml` applied as it is: curl still gets its
    /// page, a client of service account `default` is refused (and counted
    /// as a policy denial by productpage's ztunnel); removed again after.
    fn productpage_viewer(&self) -> Result<String, ProbeError> {
        let cluster = self.cluster;
        let node = cluster.nodes().last().cloned().unwrap_or_default();
        let other = cluster.create_pod(&client_pod(NS, OTHER, &node, "default"))?;
        probe::until_in_mesh(
            cluster,
            &self.trust_domain,
            &[(&other, "default")],
            START_TIMEOUT,
        )?;
        let answered = |r: &HttpReport| r.status == Some(200);
        let what = format!("{NS}/{OTHER} GET {}", self.page_url);
        eventually(&format!("{what} to answer"), CHANGE_TIMEOUT, || {
            let r = self.get_page(&other)?;
            Ok(if answered(&r) {
                Ok(())
            } else {
                Err(l7::describe(&r))
            })
        })?;
        let policy = Applied::new(cluster, VIEWER)?;
        eventually(&format!("{what} to be refused"), CHANGE_TIMEOUT, || {
            let r = self.get_page(&other)?;
            Ok(if r.status.is_none() {
                Ok(())
            } else {
                Err(l7::describe(&r))
            })
        })?;
        // A fresh refusal, counted (the first may have been a connection in
        // flight when the policy arrived).
        let page_node = self.pod("productpage-v1-0").node.clone();
        let before = policy_denials(cluster, &page_node)?;
        let refused = self.get_page(&other)?;
        if refused.status.is_some() {
            return Err(failed(
                &what,
                format!(
                    "answered again under the policy: {}",
                    l7::describe(&refused)
                ),
            ));
        }
        eventually(
            &format!("the ztunnel on {page_node} to count the refusal as a policy denial"),
            CHANGE_TIMEOUT,
            || {
                let now = policy_denials(cluster, &page_node)?;
                Ok(if now > before {
                    Ok(())
                } else {
                    Err(format!("still {now}"))
                })
            },
        )?;
        let page = self.page()?;
        policy.remove()?;
        cluster.delete_pod(NS, OTHER)?;
        Ok(format!(
            "productpage-viewer: {NS}/{OTHER} (sa default) refused ({}), a policy denial counted on {page_node}; \
             curl still answered by productpage with details and {}",
            refused.error.as_deref().unwrap_or("no answer"),
            page.reviews
        ))
    }

    /// The namespace's waypoint and `route-reviews-90-10.yaml`: reviews
    /// answers from v1 and v2 only, v2 about 10%; pages still whole.
    fn reviews_90_10(&self) -> Result<String, ProbeError> {
        let cluster = self.cluster;
        let _route = Applied::new(
            cluster,
            &format!("{WAYPOINT}\n---\n{VERSIONS}\n---\n{ROUTE}"),
        )?;
        cluster.apply_yaml(&namespace(true))?;
        let waypoint = probe::until_pod_ready(cluster, NS, WAYPOINT_POD, START_TIMEOUT)?;
        let vip = eventually("the reviews Service's cluster IP", CHANGE_TIMEOUT, || {
            Ok(service_vip(cluster, NS, "reviews")?.ok_or("no VIP yet".to_string()))
        })?;
        let url = format!("http://{vip}:{PORT}/reviews/0");
        let curl = self.pod("curl-0");
        let send = |count: u64| -> Result<TallyReport, ProbeError> {
            let args = [
                "tally",
                &url,
                "--count",
                &count.to_string(),
                "--timeout",
                &format!("{}ms", REQUEST_TIMEOUT.as_millis()),
            ]
            .map(String::from);
            probe::client(cluster, curl, &args, Duration::from_secs(180))
        };
        let tally = |count: u64| -> Result<TallyReport, ProbeError> {
            let report = send(count)?;
            if !report.ok {
                return Err(failed(
                    &format!("{NS}/curl-0 GET {url} x{count}"),
                    format!("{:?}; answers {:?}", report.error, report.answers),
                ));
            }
            Ok(report)
        };
        // Without the route v3 answers a third: 30 without it is the route
        // (or chance, once in 10^5). The first requests of the new waypoint
        // may find it not yet serving reviews: not yet, not a failure.
        eventually(
            "the reviews route to take reviews-v3 out",
            CHANGE_TIMEOUT,
            || {
                let t = send(30)?;
                Ok(
                    if t.from_pod(200, "reviews-v3-0") == 0 && t.with_status(200) == 30 {
                        Ok(())
                    } else {
                        Err(format!(
                            "answers {:?}, error {:?}",
                            t.answers, t.first_error
                        ))
                    },
                )
            },
        )?;
        let t = tally(SPLIT_REQUESTS)?;
        let (v1, v2) = (
            t.from_pod(200, "reviews-v1-0"),
            t.from_pod(200, "reviews-v2-0"),
        );
        let share = share_within(
            &format!("{SPLIT_REQUESTS} GETs of {url}: reviews-v2-0"),
            v2,
            (v1, "reviews-v1-0"),
            SPLIT_REQUESTS,
            10.0,
            WEIGHT_TOLERANCE,
            &t,
        )?;
        let page = self.page()?;
        if page.reviews == "reviews-v3-0" {
            return Err(failed(
                "productpage -> reviews under the route",
                "answered by reviews-v3-0, which the route leaves out",
            ));
        }
        Ok(format!(
            "waypoint {} ({}) with route-reviews-90-10: {SPLIT_REQUESTS} GETs of reviews from curl: \
             reviews-v1-0 {v1}, reviews-v2-0 {v2} ({share:.1}%, within 10% ± {WEIGHT_TOLERANCE} points), \
             none from reviews-v3-0; a page through it answered by {}",
            waypoint.name, waypoint.node, page.reviews
        ))
    }
}

/// Checks a page: 200 from productpage, which got 200s from details-v1-0
/// and from a reviews pod, which asked ratings-v1-0 if it is v2 or v3 and
/// nothing if v1.
fn whole_page(report: &HttpReport) -> Result<Page, String> {
    let echo = report
        .echo
        .as_ref()
        .filter(|_| report.status == Some(200))
        .ok_or("not a 200 from echo")?;
    if echo.pod != "productpage-v1-0" {
        return Err(format!("answered by {}, not productpage-v1-0", echo.pod));
    }
    let called = |reply: &EchoReply, name: &str| -> Result<EchoReply, String> {
        let call = reply
            .calls
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("{} did not call {name}: {:?}", reply.pod, reply.calls))?;
        match (&call.status, &call.reply) {
            (Some(200), Some(r)) => Ok((**r).clone()),
            _ => Err(format!(
                "{} -> {name} ({}): status {:?}, error {:?}",
                reply.pod, call.url, call.status, call.error
            )),
        }
    };
    let details = called(echo, "details")?;
    if details.pod != "details-v1-0" {
        return Err(format!("details answered by {}", details.pod));
    }
    let reviews = called(echo, "reviews")?;
    let ratings = match reviews.pod.as_str() {
        "reviews-v1-0" if reviews.calls.is_empty() => None,
        "reviews-v1-0" => return Err(format!("reviews-v1-0 called {:?}", reviews.calls)),
        "reviews-v2-0" | "reviews-v3-0" => {
            let ratings = called(&reviews, "ratings")?;
            if ratings.pod != "ratings-v1-0" {
                return Err(format!("ratings answered by {}", ratings.pod));
            }
            Some(ratings.pod)
        }
        other => return Err(format!("reviews answered by {other}")),
    };
    Ok(Page {
        reviews: reviews.pod,
        ratings,
    })
}
