use super::*;

use rand::SeedableRng;
use rand::rngs::StdRng;

fn fault(delay: Option<u32>, abort: Option<u32>) -> Fault {
    Fault::from_proto(&l7::Fault {
        delay: delay.map(|per_million| l7::fault::Delay {
            delay: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            per_million,
        }),
        abort: abort.map(|per_million| l7::fault::Abort {
            per_million,
            status: Some(l7::fault::abort::Status::HttpStatus(503)),
        }),
    })
    .unwrap()
}

#[test]
fn abort_at_50_percent_within_two_points_over_10k_seeded_decisions() {
    let f = fault(None, Some(500_000));
    let mut rng = StdRng::seed_from_u64(7);
    let aborted = (0..10_000)
        .filter(|_| f.decide(&mut rng).abort.is_some())
        .count();
    let percent = aborted as f64 / 100.0;
    assert!((percent - 50.0).abs() <= 2.0, "{percent}% aborted");
}

#[test]
fn abort_is_the_configured_status_with_fi() {
    let f = fault(None, Some(1_000_000));
    let r = f.decide(&mut StdRng::seed_from_u64(1)).abort.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.flag, ResponseFlag::FaultInjected);
    assert_eq!(r.body, ABORT_BODY);
}

#[test]
fn zero_and_full_shares_are_exact() {
    let mut rng = StdRng::seed_from_u64(9);
    let never = fault(Some(0), Some(0));
    let always = fault(Some(1_000_000), Some(1_000_000));
    for _ in 0..1000 {
        let n = never.decide(&mut rng);
        assert!(n.delay.is_none() && n.abort.is_none());
        let a = always.decide(&mut rng);
        assert_eq!(a.delay, Some(Duration::from_secs(2)));
        assert!(a.abort.is_some());
    }
}

#[test]
fn delay_and_abort_are_drawn_independently() {
    let f = fault(Some(500_000), Some(500_000));
    let mut rng = StdRng::seed_from_u64(11);
    let mut both = 0;
    for _ in 0..10_000 {
        let d = f.decide(&mut rng);
        if d.delay.is_some() && d.abort.is_some() {
            both += 1;
        }
    }
    assert!((2_300..=2_700).contains(&both), "{both} of 10000 had both");
}

#[test]
fn grpc_abort_is_200_with_grpc_status() {
    let f = Fault::from_proto(&l7::Fault {
        delay: None,
        abort: Some(l7::fault::Abort {
            per_million: 1_000_000,
            status: Some(l7::fault::abort::Status::GrpcStatus(14)),
        }),
    })
    .unwrap();
    let r = f.decide(&mut StdRng::seed_from_u64(1)).abort.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["grpc-status"], "14");
}

#[test]
fn invalid_faults_name_the_field() {
    let cases = [
        (
            l7::Fault {
                delay: Some(l7::fault::Delay {
                    delay: None,
                    per_million: 1,
                }),
                abort: None,
            },
            "delay.delay",
        ),
        (
            l7::Fault {
                delay: None,
                abort: Some(l7::fault::Abort {
                    per_million: 1,
                    status: Some(l7::fault::abort::Status::HttpStatus(99)),
                }),
            },
            "abort.http_status",
        ),
        (
            l7::Fault {
                delay: None,
                abort: Some(l7::fault::Abort {
                    per_million: 1,
                    status: Some(l7::fault::abort::Status::GrpcStatus(17)),
                }),
            },
            "abort.grpc_status",
        ),
        (
            l7::Fault {
                delay: None,
                abort: Some(l7::fault::Abort {
                    per_million: 1,
                    status: None,
                }),
            },
            "abort.status",
        ),
    ];
    for (f, field) in cases {
        assert_eq!(Fault::from_proto(&f).unwrap_err().field, field);
    }
}
