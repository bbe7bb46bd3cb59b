//! Fixture tests of the ambient index: each `tests/fixtures/<case>/input.yaml`
//! is a cluster state as a user would `kubectl apply` it; the translation's
//! resources (and policy problems) must equal `expected.json`.
//!
//! After a deliberate change, regenerate with
//! `UPDATE_GOLDENS=1 cargo test -p istiod-rs --test index_fixtures` and
//! review the diff.

use std::path::{Path, PathBuf};

use istiod_rs::index::{self, MeshConfig, json::snapshot_json};
use istiod_rs::state::ClusterState;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    cases
}

fn render(case: &Path) -> String {
    let input = std::fs::read_to_string(case.join("input.yaml")).unwrap();
    let manifest = api::manifest::parse(&input)
        .unwrap_or_else(|e| panic!("{}/input.yaml:{e}", case.display()));
    let state = ClusterState::from_objects(manifest.objects);
    let translation = index::translate(&state, &MeshConfig::default());
    let mut out = snapshot_json(&translation.snapshot);
    out["problems"] = translation
        .problems
        .iter()
        .map(|p| serde_json::Value::String(p.to_string()))
        .collect();
    serde_json::to_string_pretty(&out).unwrap() + "\n"
}

#[test]
fn translations_match_goldens() {
    let update = std::env::var_os("UPDATE_GOLDENS").is_some();
    let cases = fixtures();
    assert!(cases.len() >= 10, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let got = render(case);
        let golden = case.join("expected.json");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "{}: translation differs from expected.json (UPDATE_GOLDENS=1 regenerates it)\n--- got ---\n{got}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn translation_is_deterministic() {
    for case in fixtures() {
        assert_eq!(render(&case), render(&case), "{}", case.display());
    }
}
