use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

fn endpoints(uids: &[&'static str]) -> Vec<Weighted<'static>> {
    uids.iter().map(|uid| Weighted { uid, weight: 1 }).collect()
}

#[test]
fn ejected_endpoints_are_skipped_until_they_return() {
    let t0 = Instant::now();
    let policy = Policy {
        load_balancer: Some(LoadBalancer::Simple(Simple::RoundRobin)),
        outlier_detection: Some(OutlierConfig {
            consecutive_5xx: 2,
            max_ejection_percent: 100,
            ..OutlierConfig::default()
        }),
        ..Policy::default()
    };
    let d = DestinationBalancer::new(&policy, t0);
    let eps = endpoints(&["a", "b"]);
    let mut rng = StdRng::seed_from_u64(1);
    d.record("a", Outcome::Status(503), 2, t0);
    d.record("a", Outcome::Status(503), 2, t0);
    for _ in 0..10 {
        assert_eq!(d.pick(&eps, None, t0, &mut rng).unwrap().index, 1);
    }
    let back = t0 + Duration::from_secs(30);
    let picks: Vec<usize> = (0..4)
        .map(|_| d.pick(&eps, None, back, &mut rng).unwrap().index)
        .collect();
    assert!(
        picks.contains(&0),
        "a is back after base ejection time: {picks:?}"
    );
}

#[test]
fn in_flight_requests_steer_least_request() {
    let d = DestinationBalancer::new(&Policy::default(), Instant::now());
    let eps = endpoints(&["busy", "idle"]);
    let mut rng = StdRng::seed_from_u64(3);
    let now = Instant::now();
    // Hold five requests on "busy".
    let mut held = Vec::new();
    while held.len() < 5 {
        let p = d.pick(&eps, None, now, &mut rng).unwrap();
        if p.index == 0 {
            held.push(p);
        }
    }
    let idle = (0..1000)
        .filter(|_| d.pick(&eps, None, now, &mut rng).unwrap().index == 1)
        .count();
    assert!(idle > 700, "{idle} of 1000 went to the idle endpoint");
    drop(held);
    let idle = (0..1000)
        .filter(|_| d.pick(&eps, None, now, &mut rng).unwrap().index == 1)
        .count();
    assert!((400..=600).contains(&idle), "released: {idle} of 1000");
}

#[test]
fn no_usable_endpoint_is_none() {
    let d = DestinationBalancer::new(&Policy::default(), Instant::now());
    let mut rng = StdRng::seed_from_u64(1);
    assert!(d.pick(&[], None, Instant::now(), &mut rng).is_none());
    assert!(
        d.pick(
            &[Weighted {
                uid: "a",
                weight: 0
            }],
            None,
            Instant::now(),
            &mut rng
        )
        .is_none()
    );
}
