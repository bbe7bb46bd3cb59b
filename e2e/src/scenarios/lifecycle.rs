//! The mesh's own lifecycle must be invisible to applications: istiod-rs
//! killed (SIGKILL, as a crash or an OOM kill) and away for two minutes
//! while 1,000 requests a second flow over long-lived connections and new
//! connections are opened without pause. Every request and every new
//! connection is counted; "nothing lost" means zero of either failed.
//!
//! The outage is placed over a certificate renewal: the proxies' renewals
//! fail while istiod-rs is away and must succeed once it is back (before
//! the old certificates expire), from the same CA root (a root made anew at
//! the restart would leave the renewed certificates untrusted by the peers
//! that still hold the old one, and new connections would fail).
//!
//! A cluster of its own (`e2e/tests/lifecycle.rs`): the certificate
//! lifetime must be short enough for a renewal to fall inside the test and
//! long enough to outlast the outage.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;

use super::Scenario;
use super::fixture::{AMBIENT_NS, ECHO_HELLO, ECHO_TCP, L4Fixture};
use super::l4::{CHANGE_TIMEOUT, carried, failed, load_flowed, until_connections};
use crate::apps::{ConnectProbeReport, LoadReport};
use crate::cluster::{Cluster, ProxyRef};
use crate::probe::{self, CertificateSummary, ProbeError, eventually, mtls_from_to, ztunnel};
use crate::prometheus;

/// How long istiod-rs stays away in the outage scenario (the two
/// minutes).
pub const OUTAGE: Duration = Duration::from_secs(120);
/// Requests per second over the long-lived connections.
const RATE: u32 = 1000;
const CONNECTIONS: u32 = 4;
/// One new connection (with a round trip) every this long, one at a time.
const PROBE_INTERVAL: Duration = Duration::from_millis(25);
/// How long istiod-rs stays dead after the kill before it is started again.
const KILLED_FOR: Duration = Duration::from_secs(5);
/// Traffic measured before the disruption starts and after it ends.
pub(super) const MARGIN: Duration = Duration::from_secs(5);
/// A renewal must be able to complete between istiod-rs's return and the
/// old certificate's expiry.
const RENEWAL_SLACK: Duration = Duration::from_secs(40);

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "istiod_killed_loses_no_request",
            run: istiod_killed,
        },
        Scenario {
            name: "istiod_two_minute_outage_loses_no_request",
            run: istiod_outage,
        },
    ]
}

/// What the traffic running across a disruption reported.
pub(crate) struct Traffic {
    pub(crate) load: LoadReport,
    pub(crate) fresh: ConnectProbeReport,
}

impl Traffic {
    /// Fails unless every request and every new connection succeeded.
    pub(crate) fn lost_nothing(&self, what: &str) -> Result<(), ProbeError> {
        load_flowed(
            &format!("{RATE} req/s over long-lived connections {what}"),
            &self.load,
        )?;
        if !self.fresh.ok || self.fresh.failures > 0 || self.fresh.attempts == 0 {
            return Err(failed(
                &format!("new connections every {PROBE_INTERVAL:?} {what}"),
                format!(
                    "{} of {} failed; outages {:?}; error {:?}",
                    self.fresh.failures, self.fresh.attempts, self.fresh.outages, self.fresh.error
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} requests at {:.0}/s over {CONNECTIONS} long-lived connections, {} errors; \
             {} new connections, {} failed (longest gap {:.0} ms)",
            self.load.requests,
            self.load.achieved_rate,
            self.load.errors,
            self.fresh.attempts,
            self.fresh.failures,
            self.fresh.longest_gap_ms
        )
    }
}

/// Runs `during` while the first client sends [`RATE`] requests a second
/// over long-lived connections to the server on the other node, and the
/// second client opens a new connection to the other server every
/// [`PROBE_INTERVAL`], both for `duration`. `during` starts once the
/// long-lived connections are up and [`MARGIN`] has passed.
pub(crate) fn across<T>(
    cluster: &dyn Cluster,
    f: &L4Fixture,
    duration: Duration,
    during: impl FnOnce() -> Result<T, ProbeError>,
) -> Result<(T, Traffic), ProbeError> {
    let (loader, load_to) = (&f.clients[0], &f.servers[1]);
    let (prober, probe_to) = (&f.clients[1], &f.servers[0]);
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let load_args: Vec<String> = [
        "load",
        &L4Fixture::at(load_to, ECHO_TCP),
        "--rate",
        &RATE.to_string(),
        "--connections",
        &CONNECTIONS.to_string(),
        "--payload",
        "512",
        "--duration",
        &ms(duration),
    ]
    .map(String::from)
    .to_vec();
    let probe_args: Vec<String> = [
        "connect-probe",
        &L4Fixture::at(probe_to, ECHO_TCP),
        "--duration",
        &ms(duration),
        "--interval",
        &ms(PROBE_INTERVAL),
    ]
    .map(String::from)
    .to_vec();
    let limit = duration + Duration::from_secs(60);
    let src = f.principal(AMBIENT_NS, "client");
    let dst = f.principal(AMBIENT_NS, "server");
    let filter = mtls_from_to(&src, &dst);
    let before = probe::connections_opened(cluster, &ztunnel(&load_to.node), &filter)?;
    std::thread::scope(|s| {
        let load = s.spawn(|| probe::client::<LoadReport>(cluster, loader, &load_args, limit));
        let fresh =
            s.spawn(|| probe::client::<ConnectProbeReport>(cluster, prober, &probe_args, limit));
        let result = until_connections(
            cluster,
            &load_to.node,
            &filter,
            before + f64::from(CONNECTIONS),
        )
        .and_then(|()| {
            std::thread::sleep(MARGIN);
            during()
        });
        let load = load.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        let fresh = fresh
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        Ok((
            result?,
            Traffic {
                load: load?,
                fresh: fresh?,
            },
        ))
    })
}

/// Waits until every node's ztunnel-rs has its delta xDS stream to the
/// (new) istiod-rs open again, and returns how many resources istiod-rs has
/// sent since it started: a resuming proxy announces what it holds
/// (`initial_resource_versions`) and is sent only what differs.
fn until_proxies_resumed(cluster: &dyn Cluster) -> Result<(f64, f64), ProbeError> {
    let nodes = cluster.nodes().len() as f64;
    eventually(
        "every ztunnel-rs to reconnect to istiod-rs",
        CHANGE_TIMEOUT,
        || {
            let text = cluster.metrics(&ProxyRef::Istiod)?;
            let samples = prometheus::parse(&text).map_err(|e| ProbeError::Unexpected {
                what: "istiod-rs's metrics".to_string(),
                detail: e.to_string(),
            })?;
            let connected = prometheus::sum(&samples, "pilot_xds", &[]);
            let sent = prometheus::sum(&samples, "xds_resources_sent_total", &[("type", "wds")]);
            Ok(if connected >= nodes {
                Ok((connected, sent))
            } else {
                Err(format!("{connected} of {nodes} connected"))
            })
        },
    )
}

/// Workload resources a node's ztunnel-rs holds (what a full push resends).
fn held_resources(cluster: &dyn Cluster, node: &str) -> Result<usize, ProbeError> {
    let dump = cluster.config_dump(&ztunnel(node))?;
    let count = |key: &str| dump.get(key).and_then(|v| v.as_array()).map_or(0, Vec::len);
    Ok(count("workloads") + count("services"))
}

/// istiod-rs is killed with SIGKILL, stays dead a few seconds and is
/// started again: no request and no new connection fails, every proxy
/// resumes its stream without being sent again what it holds.
fn istiod_killed(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let held: usize = cluster
        .nodes()
        .iter()
        .map(|n| held_resources(cluster, n))
        .sum::<Result<_, _>>()?;
    let duration = KILLED_FOR + CHANGE_TIMEOUT + MARGIN * 2;
    let ((connected, resent), traffic) = across(cluster, f, duration, || {
        cluster.crash_component(&ProxyRef::Istiod)?;
        std::thread::sleep(KILLED_FOR);
        cluster.start_component(&ProxyRef::Istiod)?;
        until_proxies_resumed(cluster)
    })?;
    traffic.lost_nothing("across istiod-rs's kill and restart")?;
    // Nothing changed while it was dead: a full re-push would resend every
    // resource each proxy holds; resumption sends (almost) none.
    if resent * 10.0 >= held as f64 && held > 0 {
        return Err(failed(
            "the proxies' resumption after the restart",
            format!(
                "istiod-rs sent {resent} workload resources to {connected} reconnected proxies holding {held} between them: a full re-push"
            ),
        ));
    }
    Ok(format!(
        "SIGKILL, {KILLED_FOR:?} dead, restarted: {}; {connected} proxies resumed, sent {resent} workload resources (they hold {held})",
        traffic.describe()
    ))
}

fn certificate(
    cluster: &dyn Cluster,
    node: &str,
    identity: &str,
) -> Result<CertificateSummary, ProbeError> {
    probe::until_certificate(cluster, node, identity, CHANGE_TIMEOUT)
}

fn time_of(what: &str, text: &str) -> Result<SystemTime, ProbeError> {
    let t: Timestamp = text
        .parse()
        .map_err(|e| failed(what, format!("not a time: {text:?}: {e}")))?;
    let secs = u64::try_from(t.as_second()).map_err(|_| failed(what, "before 1970"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// When a certificate's proxy starts renewing it (half its lifetime, as
/// proxy-core's identity manager) and when it expires.
fn renewal_and_expiry(cert: &CertificateSummary) -> Result<(SystemTime, SystemTime), ProbeError> {
    let what = format!("the certificate of {}", cert.identity);
    let from = time_of(&what, &cert.valid_from)?;
    let to = time_of(&what, &cert.expires)?;
    let life = to.duration_since(from).unwrap_or_default();
    Ok((from + life / 2, to))
}

/// istiod-rs stopped for [`OUTAGE`], placed so that both proxies' renewal
/// of the client's and the server's certificate falls inside it: traffic
/// flows on what the proxies hold; once istiod-rs is back both certificates
/// are renewed before they expire, under the same root.
fn istiod_outage(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let (client, server) = (&f.clients[0], &f.servers[1]);
    let src = f.principal(AMBIENT_NS, "client");
    let dst = f.principal(AMBIENT_NS, "server");
    let held = || -> Result<[(&str, &str, CertificateSummary); 2], ProbeError> {
        Ok([
            (
                client.node.as_str(),
                src.as_str(),
                certificate(cluster, &client.node, &src)?,
            ),
            (
                server.node.as_str(),
                dst.as_str(),
                certificate(cluster, &server.node, &dst)?,
            ),
        ])
    };
    let mut old = held()?;
    let (lead, start) = match plan(&old)? {
        Plan::Outage { lead, start } => (lead, start),
        // A renewal is under way or about to be: plan on the next ones.
        Plan::TooLate => {
            for (node, identity, before) in &old {
                renewed(cluster, node, identity, before)?;
            }
            old = held()?;
            match plan(&old)? {
                Plan::Outage { lead, start } => (lead, start),
                Plan::TooLate => {
                    return Err(failed("the outage's plan", "renewals keep coming too soon"));
                }
            }
        }
    };
    let duration = lead + OUTAGE + CHANGE_TIMEOUT + MARGIN * 2;
    let (renewed, traffic) = across(cluster, f, duration, || {
        if let Ok(wait) = start.duration_since(SystemTime::now()) {
            std::thread::sleep(wait);
        }
        cluster.stop_component(&ProxyRef::Istiod)?;
        std::thread::sleep(OUTAGE);
        // Proxies work from what they hold: a pod's new connection, now.
        carried(cluster, &f.clients[1], &f.servers[0], ECHO_HELLO)?;
        cluster.start_component(&ProxyRef::Istiod)?;
        until_proxies_resumed(cluster)?;
        old.iter()
            .map(|(node, identity, before)| renewed(cluster, node, identity, before))
            .collect::<Result<Vec<_>, _>>()
    })?;
    traffic.lost_nothing("across a two-minute istiod-rs outage")?;
    let renewals: Vec<String> = old
        .iter()
        .zip(&renewed)
        .map(|((node, identity, before), after)| {
            format!(
                "{identity} on {node}: serial {} -> {} (was due {}s into the outage)",
                before.serial,
                after.serial,
                renewal_and_expiry(before)
                    .ok()
                    .and_then(|(r, _)| r.duration_since(start).ok())
                    .map_or(0, |d| d.as_secs())
            )
        })
        .collect();
    Ok(format!(
        "istiod-rs away {OUTAGE:?}: {}; renewed after its return, same root: {}",
        traffic.describe(),
        renewals.join("; ")
    ))
}

enum Plan {
    /// Start the outage `lead` from now (at `start`).
    Outage { lead: Duration, start: SystemTime },
    /// The first renewal comes before an outage could start ahead of it.
    TooLate,
}

/// Places the outage so that it starts a little before the first of the
/// certificates' renewals and covers the last one, and ends
/// [`RENEWAL_SLACK`] before the first expiry.
fn plan(certs: &[(&str, &str, CertificateSummary)]) -> Result<Plan, ProbeError> {
    let times = certs
        .iter()
        .map(|(_, _, c)| renewal_and_expiry(c))
        .collect::<Result<Vec<_>, _>>()?;
    let renewals = times.iter().map(|(r, _)| *r);
    let first_renewal = renewals.clone().min().unwrap_or(UNIX_EPOCH);
    let last_renewal = renewals.max().unwrap_or(UNIX_EPOCH);
    let first_expiry = times.iter().map(|(_, e)| *e).min().unwrap_or(UNIX_EPOCH);
    let earliest = SystemTime::now() + MARGIN;
    let Some(lead) = first_renewal
        .checked_sub(Duration::from_secs(15))
        .and_then(|t| t.duration_since(earliest).ok())
    else {
        return Ok(Plan::TooLate);
    };
    let start = earliest + lead;
    let end = start + OUTAGE;
    if last_renewal >= end || end + RENEWAL_SLACK > first_expiry {
        return Err(failed(
            "the outage's plan",
            format!(
                "certificates renew at {}..{} and expire at {} (Unix s): an outage from {} to {} \
                 must cover every renewal and end {RENEWAL_SLACK:?} before the first expiry; \
                 run on a cluster whose certificates live about 6 minutes",
                secs(first_renewal),
                secs(last_renewal),
                secs(first_expiry),
                secs(start),
                secs(end)
            ),
        ));
    }
    Ok(Plan::Outage { lead, start })
}

/// Waits until `identity`'s certificate on `node` has been renewed since
/// `before`, under the same root, before `before` expires.
fn renewed(
    cluster: &dyn Cluster,
    node: &str,
    identity: &str,
    before: &CertificateSummary,
) -> Result<CertificateSummary, ProbeError> {
    let (_, expiry) = renewal_and_expiry(before)?;
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    let after = eventually(
        &format!("the certificate for {identity} on {node} to be renewed"),
        left,
        || {
            let now = certificate(cluster, node, identity)?;
            Ok(if now.serial != before.serial {
                Ok(now)
            } else {
                Err(format!("serial still {}", before.serial))
            })
        },
    )?;
    if after.roots != before.roots {
        return Err(failed(
            &format!("the renewed certificate for {identity} on {node}"),
            format!(
                "its roots changed across istiod-rs's restart: {:?} -> {:?}",
                before.roots, after.roots
            ),
        ));
    }
    Ok(after)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
