use super::*;

use std::net::Ipv4Addr;

use rand::SeedableRng;
use rand::rngs::StdRng;

fn candidates<'a>(uids: &'a [String], weights: &[u32], in_flight: &[u32]) -> Vec<Candidate<'a>> {
    uids.iter()
        .zip(weights)
        .zip(in_flight)
        .map(|((uid, weight), in_flight)| Candidate {
            uid,
            weight: *weight,
            in_flight: *in_flight,
        })
        .collect()
}

fn uids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("pod-{i}")).collect()
}

#[test]
fn round_robin_cycles_by_weight() {
    let u = uids(3);
    let c = candidates(&u, &[1, 2, 0], &[0, 0, 0]);
    let b = Balancer::new(LoadBalancer::Simple(Simple::RoundRobin));
    let mut rng = StdRng::seed_from_u64(1);
    let picks: Vec<usize> = (0..6)
        .map(|_| b.pick(&c, None, &mut rng).unwrap())
        .collect();
    assert_eq!(picks, [0, 1, 1, 0, 1, 1]);
}

#[test]
fn random_is_weighted_and_skips_weight_zero() {
    let u = uids(3);
    let c = candidates(&u, &[1, 3, 0], &[0, 0, 0]);
    let b = Balancer::new(LoadBalancer::Simple(Simple::Random));
    let mut rng = StdRng::seed_from_u64(5);
    let mut counts = [0; 3];
    for _ in 0..40_000 {
        counts[b.pick(&c, None, &mut rng).unwrap()] += 1;
    }
    assert_eq!(counts[2], 0);
    let share = f64::from(counts[1]) / 40_000.0;
    assert!((share - 0.75).abs() < 0.01, "{share}");
}

#[test]
fn least_request_prefers_the_less_loaded_of_two() {
    let u = uids(2);
    let c = candidates(&u, &[1, 1], &[10, 0]);
    let b = Balancer::new(LoadBalancer::default());
    assert_eq!(
        b.policy(),
        &LoadBalancer::Simple(Simple::LeastRequest),
        "Istio's default"
    );
    let mut rng = StdRng::seed_from_u64(9);
    let mut counts = [0; 2];
    for _ in 0..10_000 {
        counts[b.pick(&c, None, &mut rng).unwrap()] += 1;
    }
    // The loaded one wins only when both draws pick it: 1/4.
    let loaded = f64::from(counts[0]) / 10_000.0;
    assert!((loaded - 0.25).abs() < 0.02, "{loaded}");
}

#[test]
fn nothing_to_pick_without_weight() {
    let u = uids(2);
    let c = candidates(&u, &[0, 0], &[0, 0]);
    let mut rng = StdRng::seed_from_u64(1);
    for lb in [
        LoadBalancer::Simple(Simple::RoundRobin),
        LoadBalancer::Simple(Simple::Random),
        LoadBalancer::default(),
    ] {
        assert_eq!(Balancer::new(lb).pick(&c, None, &mut rng), None);
    }
    assert_eq!(
        Balancer::new(LoadBalancer::default()).pick(&[], None, &mut rng),
        None
    );
}

#[test]
fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let u = uids(5);
    let c = candidates(&u, &[1; 5], &[0; 5]);
    let key = HashKey::Header(http::HeaderName::from_static("x-user"));
    let b = Balancer::new(LoadBalancer::ConsistentHash(ConsistentHash {
        key: key.clone(),
        table_size: DEFAULT_TABLE_SIZE,
    }));
    let mut rng = StdRng::seed_from_u64(1);
    let src = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let req = |user: &str| Request::builder().header("x-user", user).body(()).unwrap();
    for user in ["alice", "bob", "carol"] {
        let h = key.hash(&req(user), src);
        let first = b.pick(&c, h, &mut rng).unwrap();
        for _ in 0..20 {
            assert_eq!(b.pick(&c, h, &mut rng), Some(first), "{user}");
        }
    }
    // No key: a random endpoint, still one of them.
    assert!(b.pick(&c, None, &mut rng).is_some());
}

#[test]
fn hash_keys() {
    let src: IpAddr = "10.0.0.7".parse().unwrap();
    let req = Request::builder()
        .uri("/p?session=s1&x=2")
        .header("cookie", "a=1; user=u7")
        .header("x-user", "u7")
        .body(())
        .unwrap();
    let h = |k: HashKey| k.hash(&req, src);
    assert_eq!(
        h(HashKey::Cookie("user".into())),
        Some(XxHash64::oneshot(0, b"u7"))
    );
    assert_eq!(
        h(HashKey::Header(http::HeaderName::from_static("x-user"))),
        Some(XxHash64::oneshot(0, b"u7"))
    );
    assert_eq!(
        h(HashKey::QueryParameter("session".into())),
        Some(XxHash64::oneshot(0, b"s1"))
    );
    assert_eq!(
        h(HashKey::SourceIp),
        Some(XxHash64::oneshot(0, b"10.0.0.7"))
    );
    assert_eq!(h(HashKey::Cookie("missing".into())), None);
    assert_eq!(h(HashKey::QueryParameter("missing".into())), None);
}

#[test]
fn load_balancer_conversion() {
    use l7::load_balancer::{Policy, Simple as S};
    let lb = |p| LoadBalancer::from_proto(&l7::LoadBalancer { policy: p });
    assert_eq!(
        lb(None).unwrap(),
        LoadBalancer::Simple(Simple::LeastRequest)
    );
    assert_eq!(
        lb(Some(Policy::Simple(S::Default as i32))).unwrap(),
        LoadBalancer::Simple(Simple::LeastRequest)
    );
    assert_eq!(
        lb(Some(Policy::Simple(S::RoundRobin as i32))).unwrap(),
        LoadBalancer::Simple(Simple::RoundRobin)
    );
    assert_eq!(lb(Some(Policy::Simple(99))).unwrap_err().field, "simple");
    let ch = |key, table_size| {
        lb(Some(Policy::ConsistentHash(l7::ConsistentHash {
            key,
            table_size,
        })))
    };
    assert_eq!(
        ch(Some(l7::consistent_hash::Key::SourceIp(true)), 0).unwrap(),
        LoadBalancer::ConsistentHash(ConsistentHash {
            key: HashKey::SourceIp,
            table_size: DEFAULT_TABLE_SIZE
        })
    );
    assert_eq!(
        ch(Some(l7::consistent_hash::Key::SourceIp(true)), 1000)
            .unwrap_err()
            .field,
        "consistent_hash.table_size"
    );
    assert_eq!(ch(None, 0).unwrap_err().field, "consistent_hash.key");
    assert_eq!(
        ch(
            Some(l7::consistent_hash::Key::Header("bad header".into())),
            0
        )
        .unwrap_err()
        .field,
        "consistent_hash.header"
    );
}
