use super::*;

fn endpoints(n: usize) -> Vec<(String, u32)> {
    (0..n)
        .map(|i| (format!("Kubernetes//Pod/default/app-{i}"), 1))
        .collect()
}

#[test]
fn table_is_balanced_within_five_percent() {
    for n in [3, 10, 50] {
        let m = Maglev::new(endpoints(n), DEFAULT_TABLE_SIZE);
        let ideal = DEFAULT_TABLE_SIZE as f64 / n as f64;
        for (i, share) in m.shares().into_iter().enumerate() {
            let off = (share as f64 - ideal).abs() / ideal;
            assert!(
                off <= 0.05,
                "{n} endpoints: endpoint {i} owns {share}, ideal {ideal:.0}"
            );
        }
    }
}

#[test]
fn weights_scale_shares_and_weight_zero_owns_nothing() {
    let m = Maglev::new(
        vec![("a".into(), 3), ("b".into(), 1), ("c".into(), 0)],
        DEFAULT_TABLE_SIZE,
    );
    let s = m.shares();
    let ratio = s[0] as f64 / s[1] as f64;
    assert!((ratio - 3.0).abs() < 0.15, "a/b = {ratio}");
    assert_eq!(s[2], 0);
}

#[test]
fn removing_one_endpoint_moves_about_its_share_of_keys() {
    let n = 10;
    let before = Maglev::new(endpoints(n), DEFAULT_TABLE_SIZE);
    let mut fewer = endpoints(n);
    let removed = fewer.remove(4).0;
    let after = Maglev::new(fewer, DEFAULT_TABLE_SIZE);
    let keys = 100_000u64;
    let (mut moved, mut others_moved) = (0, 0);
    for k in 0..keys {
        let h = XxHash64::oneshot(7, &k.to_le_bytes());
        let (b, a) = (before.lookup(h).unwrap(), after.lookup(h).unwrap());
        if b != a {
            moved += 1;
            if b != removed {
                others_moved += 1;
            }
        }
    }
    // Maglev is near-minimal: a few keys of remaining endpoints move too.
    let others = others_moved as f64 / keys as f64;
    assert!(
        others <= 0.02,
        "{others} of keys moved between remaining endpoints"
    );
    let share = moved as f64 / keys as f64;
    // The removed endpoint's keys (1/n) move; Maglev moves a little more.
    assert!(share <= 1.0 / n as f64 * 1.2, "{share} of keys moved");
    assert!(share >= 1.0 / n as f64 * 0.8, "{share} of keys moved");
}

#[test]
fn independently_built_tables_agree() {
    let a = Maglev::new(endpoints(7), DEFAULT_TABLE_SIZE);
    let b = Maglev::new(endpoints(7), DEFAULT_TABLE_SIZE);
    for k in 0..10_000u64 {
        assert_eq!(a.lookup(k * 7919), b.lookup(k * 7919));
    }
}

#[test]
fn empty_or_all_zero_has_no_owner() {
    assert_eq!(Maglev::new(vec![], DEFAULT_TABLE_SIZE).lookup(1), None);
    assert_eq!(
        Maglev::new(vec![("a".into(), 0)], DEFAULT_TABLE_SIZE).lookup(1),
        None
    );
}
