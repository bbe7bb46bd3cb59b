//! Fixture tests of the ambient index: each `tests/fixtures/<case>/input.yaml`
//! is a cluster state as a user would `kubectl apply` it; the translation's
//! resources (and policy problems, and the waypoints planned on demand when
//! there are any) must equal `expected.json`.
//!
//! A case may also be translated under other mesh settings: each
//! `mesh-<variant>.yaml` beside it (fields of [`MeshSettings`]) gives
//! `expected-<variant>.json`, so the goldens of one input can be compared.
//!
//! After a deliberate change, regenerate with
//! `UPDATE_GOLDENS=1 cargo test -p istiod-rs --test integration index_fixtures` and
//! review the diff.

use std::path::{Path, PathBuf};

use istiod_rs::index::{self, MeshConfig, json::snapshot_json};
use istiod_rs::state::ClusterState;

/// The mesh settings a `mesh-<variant>.yaml` may change; the rest are the
/// defaults.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshSettings {
    #[serde(default)]
    auto_allow_waypoint_policy: bool,
}

impl MeshSettings {
    fn read(path: &Path) -> MeshConfig {
        let text = std::fs::read_to_string(path).unwrap();
        let settings: MeshSettings =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        MeshConfig {
            auto_allow_waypoint_policy: settings.auto_allow_waypoint_policy,
            ..MeshConfig::default()
        }
    }
}

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

/// Each golden of a case and the mesh settings it is rendered with.
fn goldens(case: &Path) -> Vec<(PathBuf, MeshConfig)> {
    let mut out = vec![(case.join("expected.json"), MeshConfig::default())];
    let mut variants: Vec<PathBuf> = std::fs::read_dir(case)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mesh-") && n.ends_with(".yaml"))
        })
        .collect();
    variants.sort();
    for path in variants {
        let name = path.file_name().unwrap().to_str().unwrap();
        let variant = &name["mesh-".len()..name.len() - ".yaml".len()];
        out.push((
            case.join(format!("expected-{variant}.json")),
            MeshSettings::read(&path),
        ));
    }
    out
}

fn render(case: &Path, mesh: &MeshConfig) -> String {
    let input = std::fs::read_to_string(case.join("input.yaml")).unwrap();
    let manifest = api::manifest::parse(&input)
        .unwrap_or_else(|e| panic!("{}/input.yaml:{e}", case.display()));
    // A fixture says what it means: no object refused for a typo.
    assert!(
        manifest.refused.is_empty(),
        "{}/input.yaml: {:?}",
        case.display(),
        manifest.refused
    );
    let state = ClusterState::from_objects(manifest.objects);
    let translation = index::translate(&state, mesh);
    let mut out = snapshot_json(&translation.snapshot);
    out["problems"] = translation
        .problems
        .iter()
        .map(|p| serde_json::Value::String(p.to_string()))
        .collect();
    // Waypoints on demand, in the cases that plan any.
    let plan = &translation.on_demand;
    if !plan.waypoints.is_empty() || !plan.name_taken.is_empty() {
        out["onDemandWaypoints"] = plan.waypoints.values().map(|w| w.gateway()).collect();
        out["onDemandNameTaken"] = plan
            .name_taken
            .iter()
            .map(|(key, rules)| {
                let rules: Vec<String> = rules.iter().map(ToString::to_string).collect();
                serde_json::json!({"gateway": key.to_string(), "neededBy": rules})
            })
            .collect();
    }
    serde_json::to_string_pretty(&out).unwrap() + "\n"
}

#[test]
fn translations_match_goldens() {
    let update = std::env::var_os("UPDATE_GOLDENS").is_some();
    let cases = fixtures();
    assert!(cases.len() >= 10, "fixtures missing: {cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        for (golden, mesh) in goldens(case) {
            let got = render(case, &mesh);
            if update {
                std::fs::write(&golden, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&golden).unwrap_or_default();
            if got != want {
                failures.push(format!(
                    "{}: translation differs (UPDATE_GOLDENS=1 regenerates it)\n--- got ---\n{got}",
                    golden.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn translation_is_deterministic() {
    for case in fixtures() {
        for (golden, mesh) in goldens(&case) {
            assert_eq!(
                render(&case, &mesh),
                render(&case, &mesh),
                "{}",
                golden.display()
            );
        }
    }
}
