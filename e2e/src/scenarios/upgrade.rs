//! A rolling upgrade of ztunnel-rs loses nothing: every node's ztunnel-rs is
//! replaced in turn ([`Cluster::upgrade_ztunnels`]: the new one Ready beside
//! the old one, then the old one drains) while traffic runs the whole time:
//! a fixed request rate over long-lived cross-node connections, long-lived
//! streams (same node and cross-node) that must carry every byte to their
//! end, and new connections every few milliseconds. Any failed request,
//! broken stream or refused new connection fails the scenario; the longest
//! wait for a new connection is reported as a figure, never asserted.
//!
//! The old ztunnels keep their live connections until those end, so the
//! cluster must give them a drain deadline longer than the traffic
//! (`tests/upgrade.rs` runs it on a cluster of its own for that).

use std::thread::ScopedJoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Scenario;
use super::fixture::{ECHO_HELLO, ECHO_TCP, L4Fixture};
use super::l4::{carried, failed, pod_name};
use crate::apps::{ConnectProbeReport, HoldReport, LoadReport, SlowAttempt};
use crate::cluster::{Cluster, PodInfo};
use crate::probe::{self, ProbeError};

/// How long the traffic runs; the upgrade happens inside it.
pub const TRAFFIC: Duration = Duration::from_secs(60);
/// Traffic runs this long before the upgrade starts, so every stream and
/// load connection is up on the old ztunnels.
const BEFORE_UPGRADE: Duration = Duration::from_secs(5);
/// The steady load: requests per second over long-lived connections.
const RATE: u32 = 1000;
const LOAD_CONNECTIONS: u32 = 10;
/// New connections of each probe: one every this long (one at a time).
const PROBE_INTERVAL: Duration = Duration::from_millis(15);
/// How long one probe attempt may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes per round trip of a held stream (one every 20 ms).
const HOLD_PAYLOAD: u32 = 256;

pub fn ztunnel_upgrade() -> Scenario {
    Scenario {
        name: "ztunnel_upgrade_loses_nothing",
        run: ztunnel_upgrade_loses_nothing,
    }
}

/// What the traffic saw across the upgrade.
struct Traffic {
    load: LoadReport,
    holds: Vec<(String, HoldReport)>,
    probes: Vec<(String, ConnectProbeReport)>,
}

fn ztunnel_upgrade_loses_nothing(
    cluster: &dyn Cluster,
    f: &L4Fixture,
) -> Result<String, ProbeError> {
    let [server0, server1] = &f.servers;
    let [client0, client1] = &f.clients;
    // Same node and cross-node, each direction, from three service accounts.
    let holds: [(&PodInfo, &PodInfo); 4] = [
        (&f.other, server0),
        (client1, server1),
        (&f.peer, server0),
        (&f.other, server1),
    ];
    let probes: [(&PodInfo, &PodInfo); 2] = [(client1, server0), (client0, server0)];
    let load_target = L4Fixture::at(server1, ECHO_TCP);

    let mut upgrade: Option<(u64, u64, Result<(), String>)> = None;
    let traffic = std::thread::scope(|s| -> Result<Traffic, ProbeError> {
        let load = s.spawn(|| run_load(cluster, client0, &load_target));
        let hold_threads: Vec<_> = holds
            .iter()
            .map(|(from, to)| {
                let target = L4Fixture::at(to, ECHO_TCP);
                let name = format!("{} -> {}", pod_name(from), pod_name(to));
                s.spawn(move || run_hold(cluster, from, &target).map(|r| (name, r)))
            })
            .collect();
        let probe_threads: Vec<_> = probes
            .iter()
            .map(|(from, to)| {
                let target = L4Fixture::at(to, ECHO_TCP);
                let name = format!("{} -> {}", pod_name(from), pod_name(to));
                s.spawn(move || run_probe(cluster, from, &target).map(|r| (name, r)))
            })
            .collect();
        std::thread::sleep(BEFORE_UPGRADE);
        let from = unix_ms();
        let result = cluster.upgrade_ztunnels().map_err(|e| e.to_string());
        upgrade = Some((from, unix_ms(), result));
        Ok(Traffic {
            load: join(load)?,
            holds: hold_threads
                .into_iter()
                .map(join)
                .collect::<Result<_, _>>()?,
            probes: probe_threads
                .into_iter()
                .map(join)
                .collect::<Result<_, _>>()?,
        })
    })?;
    let (upgrade_from, upgrade_until, result) = upgrade.expect("set before the threads end");
    result.map_err(|e| failed("the ztunnels' rolling upgrade", e))?;
    let upgrade_ms = upgrade_until - upgrade_from;
    let traffic_end = traffic
        .probes
        .iter()
        .filter_map(|(_, p)| p.last_ok_at_ms)
        .max()
        .unwrap_or_default();
    if upgrade_until >= traffic_end {
        return Err(failed(
            "the scenario",
            format!(
                "the upgrade ({upgrade_ms} ms) did not end before the traffic did; \
                 nothing shows what came after it (make the traffic longer)"
            ),
        ));
    }

    let verdict = verdict(&traffic, upgrade_from);
    if let Some(problems) = verdict.problems {
        return Err(failed("traffic across the ztunnels' upgrade", problems));
    }
    // The new ztunnels carry new connections both ways on their own.
    carried(cluster, client0, server1, ECHO_HELLO)?;
    carried(cluster, client1, server0, ECHO_HELLO)?;
    Ok(format!(
        "every node's ztunnel-rs replaced in {upgrade_ms} ms (new one Ready, then the old one drained) \
         during {:.0} s of traffic: {}",
        TRAFFIC.as_secs_f64(),
        verdict.figures
    ))
}

/// The figures, and what went wrong if anything did.
struct Verdict {
    figures: String,
    problems: Option<String>,
}

/// Judges the traffic: no failed request, every stream up before the
/// upgrade (`upgrade_from`, Unix ms) and complete to its end with every
/// byte, no failed new connection. Pure, so it is tested on reports.
fn verdict(traffic: &Traffic, upgrade_from: u64) -> Verdict {
    let mut problems = Vec::new();
    let load = &traffic.load;
    if let Some(trouble) = load.trouble() {
        problems.push(format!("the load to {}: {trouble}", load.target));
    }
    for (name, hold) in &traffic.holds {
        let exact = hold.bytes == hold.exchanges * u64::from(HOLD_PAYLOAD);
        match (&hold.error, hold.connected_at_ms) {
            (Some(e), _) => problems.push(format!("stream {name} broke: {e}")),
            (None, _) if !hold.ok || !exact => problems.push(format!(
                "stream {name} did not complete: {} round trips, {} bytes echoed",
                hold.exchanges, hold.bytes
            )),
            (None, Some(at)) if at >= upgrade_from => problems.push(format!(
                "stream {name} was up only after the upgrade began; it proves nothing"
            )),
            (None, None) => problems.push(format!("stream {name} never connected")),
            _ => {}
        }
    }
    for (name, probe) in &traffic.probes {
        if probe.failures > 0 || !probe.ok {
            problems.push(format!(
                "new connections {name}: {} of {} failed ({:?}; error {:?})",
                probe.failures, probe.attempts, probe.outages, probe.error
            ));
        }
    }
    let gap = traffic
        .probes
        .iter()
        .map(|(_, p)| p.longest_gap_ms.max(p.slowest_ms))
        .fold(0.0, f64::max);
    let mut slowest: Vec<SlowAttempt> = traffic
        .probes
        .iter()
        .flat_map(|(_, p)| p.slowest.iter().copied())
        .collect();
    slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let placed: Vec<String> = slowest
        .iter()
        .take(3)
        .map(|a| {
            let from_upgrade = (a.at_ms as f64 - upgrade_from as f64) / 1e3;
            format!("{:.0} ms at {from_upgrade:+.1} s", a.ms)
        })
        .collect();
    let attempts: u64 = traffic.probes.iter().map(|(_, p)| p.attempts).sum();
    let failures: u64 = traffic.probes.iter().map(|(_, p)| p.failures).sum();
    let complete = traffic
        .holds
        .iter()
        .filter(|(_, h)| h.ok && h.error.is_none())
        .count();
    let bytes: u64 = traffic.holds.iter().map(|(_, h)| h.bytes).sum();
    let figures = format!(
        "load {} requests at {:.0}/s over {} connections, {} lost; \
         {complete}/{} long-lived streams complete ({bytes} bytes echoed); \
         {attempts} new connections, {failures} failed, longest wait for one {gap:.0} ms \
         (slowest, from the upgrade's start: {})",
        load.requests,
        load.achieved_rate,
        load.connections,
        load.errors,
        traffic.holds.len(),
        if placed.is_empty() {
            "none".to_string()
        } else {
            placed.join(", ")
        }
    );
    Verdict {
        figures,
        problems: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

fn run_load(cluster: &dyn Cluster, from: &PodInfo, target: &str) -> Result<LoadReport, ProbeError> {
    let args = [
        "load".to_string(),
        target.to_string(),
        "--rate".into(),
        RATE.to_string(),
        "--connections".into(),
        LOAD_CONNECTIONS.to_string(),
        "--payload".into(),
        "128".into(),
        "--duration".into(),
        format!("{}ms", TRAFFIC.as_millis()),
    ];
    probe::client(cluster, from, &args, TRAFFIC + Duration::from_secs(60))
}

fn run_hold(cluster: &dyn Cluster, from: &PodInfo, target: &str) -> Result<HoldReport, ProbeError> {
    let args = [
        "hold".to_string(),
        target.to_string(),
        "--duration".into(),
        format!("{}ms", TRAFFIC.as_millis()),
        "--payload".into(),
        HOLD_PAYLOAD.to_string(),
    ];
    probe::client(cluster, from, &args, TRAFFIC + Duration::from_secs(60))
}

fn run_probe(
    cluster: &dyn Cluster,
    from: &PodInfo,
    target: &str,
) -> Result<ConnectProbeReport, ProbeError> {
    let args = [
        "connect-probe".to_string(),
        target.to_string(),
        "--duration".into(),
        format!("{}ms", TRAFFIC.as_millis()),
        "--interval".into(),
        format!("{}ms", PROBE_INTERVAL.as_millis()),
        "--timeout".into(),
        format!("{}ms", PROBE_TIMEOUT.as_millis()),
    ];
    probe::client(cluster, from, &args, TRAFFIC + Duration::from_secs(60))
}

/// A traffic thread's result (its panic goes on here).
fn join<T>(handle: ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::Outage;

    fn traffic() -> Traffic {
        let hold = HoldReport {
            ok: true,
            exchanges: 10,
            bytes: 10 * u64::from(HOLD_PAYLOAD),
            connected_at_ms: Some(900),
            ..HoldReport::default()
        };
        Traffic {
            load: LoadReport {
                ok: true,
                requests: 60_000,
                connections: 10,
                achieved_rate: 1000.0,
                ..LoadReport::default()
            },
            holds: vec![("a -> b".into(), hold.clone()), ("c -> d".into(), hold)],
            probes: vec![(
                "e -> f".into(),
                ConnectProbeReport {
                    ok: true,
                    attempts: 4000,
                    longest_gap_ms: 0.0,
                    slowest_ms: 12.0,
                    slowest: vec![
                        SlowAttempt {
                            at_ms: 1_250,
                            ms: 12.0,
                        },
                        SlowAttempt {
                            at_ms: 400,
                            ms: 9.0,
                        },
                    ],
                    ..ConnectProbeReport::default()
                },
            )],
        }
    }

    #[test]
    fn clean_traffic_passes_with_its_figures() {
        let v = verdict(&traffic(), 1000);
        assert_eq!(v.problems, None);
        assert!(v.figures.contains("60000 requests"), "{}", v.figures);
        assert!(v.figures.contains("0 lost"), "{}", v.figures);
        assert!(
            v.figures.contains("2/2 long-lived streams"),
            "{}",
            v.figures
        );
        assert!(
            v.figures.contains("longest wait for one 12 ms"),
            "{}",
            v.figures
        );
        assert!(
            v.figures
                .contains("(slowest, from the upgrade's start: 12 ms at +0.2 s, 9 ms at -0.6 s)"),
            "{}",
            v.figures
        );
    }

    #[test]
    fn a_lost_request_a_broken_or_short_stream_or_a_refusal_fails() {
        let mut t = traffic();
        t.load.errors = 1;
        t.load.first_error = Some("reset".into());
        let v = verdict(&t, 1000);
        assert!(v.problems.unwrap().contains("1 errors"));

        let mut t = traffic();
        t.holds[1].1.error = Some("after 5 round trips: reset".into());
        t.holds[1].1.ok = false;
        assert!(verdict(&t, 1000).problems.unwrap().contains("c -> d broke"));

        let mut t = traffic();
        t.holds[0].1.bytes -= 1;
        assert!(
            verdict(&t, 1000)
                .problems
                .unwrap()
                .contains("a -> b did not complete")
        );

        let mut t = traffic();
        t.holds[0].1.connected_at_ms = Some(1000);
        assert!(
            verdict(&t, 1000)
                .problems
                .unwrap()
                .contains("proves nothing")
        );

        let mut t = traffic();
        t.probes[0].1.failures = 1;
        t.probes[0].1.longest_gap_ms = 40.0;
        t.probes[0].1.outages = vec![Outage {
            from_ms: 1200,
            until_ms: Some(1240),
            failures: 1,
            first_error: "connect: refused".into(),
        }];
        let v = verdict(&t, 1000);
        assert!(v.problems.unwrap().contains("1 of 4000 failed"));
        assert!(
            v.figures.contains("longest wait for one 40 ms"),
            "{}",
            v.figures
        );
    }
}
