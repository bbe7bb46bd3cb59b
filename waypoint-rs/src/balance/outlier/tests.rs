use super::*;

fn config() -> OutlierConfig {
    OutlierConfig {
        consecutive_5xx: 3,
        max_ejection_percent: 100,
        ..OutlierConfig::default()
    }
}

fn fail(d: &OutlierDetector, uid: &str, n: u32, total: usize, now: Instant) -> bool {
    let results: Vec<bool> = (0..n)
        .map(|_| d.record(uid, Outcome::Status(500), total, now))
        .collect();
    results.contains(&true)
}

#[test]
fn ejects_after_n_consecutive_5xx_and_not_before() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(config(), t0);
    assert!(!fail(&d, "a", 2, 4, t0));
    assert!(!d.is_ejected("a", t0));
    // A success resets the run.
    d.record("a", Outcome::Status(200), 4, t0);
    assert!(!fail(&d, "a", 2, 4, t0));
    assert!(!d.is_ejected("a", t0));
    assert!(fail(&d, "a", 1, 4, t0));
    assert!(d.is_ejected("a", t0));
    assert_eq!(d.usable(&["a", "b"], t0), vec![false, true]);
}

#[test]
fn returns_after_base_time_times_ejection_count() {
    let t0 = Instant::now();
    let c = config(); // base 30 s, interval 10 s
    let d = OutlierDetector::new(c, t0);
    assert!(fail(&d, "a", 3, 4, t0));
    assert!(d.is_ejected("a", t0 + Duration::from_secs(29)));
    assert!(!d.is_ejected("a", t0 + Duration::from_secs(30)));
    // Second ejection right away: 2 × 30 s.
    let t1 = t0 + Duration::from_secs(30);
    assert!(fail(&d, "a", 3, 4, t1));
    assert!(d.is_ejected("a", t1 + Duration::from_secs(50)));
    assert!(!d.is_ejected("a", t1 + Duration::from_secs(60)));
}

#[test]
fn return_waits_for_the_interval_sweep() {
    let t0 = Instant::now();
    let c = OutlierConfig {
        interval: Duration::from_secs(25),
        ..config()
    };
    let d = OutlierDetector::new(c, t0);
    assert!(fail(&d, "a", 3, 4, t0));
    // Sweeps at 25 s, 50 s (each at most once per interval since the last one).
    assert!(d.is_ejected("a", t0 + Duration::from_secs(25)));
    assert!(d.is_ejected("a", t0 + Duration::from_secs(40)));
    assert!(!d.is_ejected("a", t0 + Duration::from_secs(50)));
}

#[test]
fn max_ejection_percent_is_honoured_but_one_may_always_go() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(
        OutlierConfig {
            max_ejection_percent: 10,
            ..config()
        },
        t0,
    );
    assert!(
        fail(&d, "a", 3, 4, t0),
        "the first ejection is always allowed"
    );
    assert!(!fail(&d, "b", 3, 4, t0), "25% ejected already is above 10%");
    assert!(!d.is_ejected("b", t0));

    let d = OutlierDetector::new(
        OutlierConfig {
            max_ejection_percent: 50,
            ..config()
        },
        t0,
    );
    assert!(fail(&d, "a", 3, 4, t0));
    assert!(fail(&d, "b", 3, 4, t0));
    assert!(!fail(&d, "c", 3, 4, t0));
}

#[test]
fn panic_mode_below_min_health_uses_every_endpoint() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(
        OutlierConfig {
            min_health_percent: 60,
            ..config()
        },
        t0,
    );
    assert!(fail(&d, "a", 3, 3, t0));
    // 2 of 3 healthy = 66% ≥ 60%: a stays out.
    assert_eq!(d.usable(&["a", "b", "c"], t0), vec![false, true, true]);
    assert!(fail(&d, "b", 3, 3, t0));
    // 1 of 3 = 33% < 60%: panic, all in.
    assert_eq!(d.usable(&["a", "b", "c"], t0), vec![true, true, true]);

    // istiod's default 0: never panics, all ejected means none usable.
    let d = OutlierDetector::new(config(), t0);
    assert!(fail(&d, "a", 3, 1, t0));
    assert_eq!(d.usable(&["a"], t0), vec![false]);
}

#[test]
fn gateway_errors_and_local_origin_failures() {
    let t0 = Instant::now();
    let c = OutlierConfig {
        consecutive_5xx: 0,
        consecutive_gateway_errors: 2,
        ..config()
    };
    let d = OutlierDetector::new(c, t0);
    d.record("a", Outcome::Status(502), 4, t0);
    d.record("a", Outcome::Status(500), 4, t0); // not a gateway error: resets
    assert!(!d.record("a", Outcome::Status(503), 4, t0));
    // A connection failure counts as a gateway error (503) when not split.
    assert!(d.record("a", Outcome::LocalOriginFailure, 4, t0));

    let split = OutlierConfig {
        split_local_origin: true,
        consecutive_local_origin_failures: 2,
        ..config()
    };
    let d = OutlierDetector::new(split, t0);
    d.record("a", Outcome::LocalOriginFailure, 4, t0);
    d.record("a", Outcome::LocalOriginSuccess, 4, t0);
    assert!(!d.record("a", Outcome::LocalOriginFailure, 4, t0));
    assert!(d.record("a", Outcome::LocalOriginFailure, 4, t0));
}

#[test]
fn defaults_are_istios() {
    let c = OutlierConfig::from_proto(&l7::OutlierDetection::default()).unwrap();
    assert_eq!(c.consecutive_5xx, 5);
    assert_eq!(c.consecutive_gateway_errors, 0);
    assert_eq!(c.interval, Duration::from_secs(10));
    assert_eq!(c.base_ejection_time, Duration::from_secs(30));
    assert_eq!(c.max_ejection_percent, 10);
    assert_eq!(c.min_health_percent, 0);
    let e = OutlierConfig::from_proto(&l7::OutlierDetection {
        max_ejection_percent: Some(101),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "max_ejection_percent");
    let e = OutlierConfig::from_proto(&l7::OutlierDetection {
        interval: Some(prost_types::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.field, "interval");
}
