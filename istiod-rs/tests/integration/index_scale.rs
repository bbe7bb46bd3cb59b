//! The index at the scale issue 3 sets (10,000 pods, 1,000 services, 100
//! nodes): everything is translated and keyed. Timings are printed for a
//! human to read, never asserted (machines are noisy); the control-plane
//! benchmark measures them properly.

use std::time::Instant;

use api::manifest::{Object, ObjectKey};
use istiod_rs::index::{self, MeshConfig, Translator, testing::synthetic_cluster};

#[test]
fn translates_a_large_cluster() {
    let started = Instant::now();
    let state = synthetic_cluster(10_000, 1_000, 100);
    let generated = started.elapsed();
    let mesh = MeshConfig::default();
    let started = Instant::now();
    let translation = index::translate(&state, &mesh);
    let translated = started.elapsed();
    let snapshot = &translation.snapshot;
    let addresses = snapshot.of_type(api::type_url::ADDRESS);
    let authorizations = snapshot.of_type(api::type_url::AUTHORIZATION);
    assert_eq!(addresses.len(), 10_000 + 1_000);
    // 2 per namespace, plus the static STRICT policy.
    assert_eq!(authorizations.len(), 21);
    assert!(
        translation.problems.is_empty(),
        "{:?}",
        translation.problems
    );
    let bytes: usize = addresses
        .values()
        .chain(authorizations.values())
        .map(|r| r.body.value.len())
        .sum();
    eprintln!(
        "synthetic cluster: generated in {generated:?}, translated in {translated:?}, {} resources, {bytes} bytes, peak RSS {}",
        snapshot.len(),
        peak_rss()
    );
    // Deterministic: a second translation is identical.
    assert_eq!(index::translate(&state, &mesh).snapshot, *snapshot);

    // One pod changes: the incremental translator redoes only that pod.
    let mut translator = Translator::default();
    translator.translate(&state, &mesh);
    let mut state = state;
    let key = ObjectKey::new("ns-7", "svc-7-7");
    let mut pod = (*state.pods[&key]).clone();
    pod.status.as_mut().unwrap().pod_ip = Some("10.250.0.1".into());
    state.apply(Object::Pod(pod));
    let started = Instant::now();
    let incremental = translator.translate(&state, &mesh);
    let elapsed = started.elapsed();
    assert_eq!(translator.reused(), 9_999);
    assert_eq!(incremental.snapshot.len(), snapshot.len());
    eprintln!("one pod changed: translated in {elapsed:?}");
}

/// The process's peak resident set size, from /proc (Linux).
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}
