//! The samples under `manifests/samples/` (our own copies of the upstream
//! samples people start from: Bookinfo with its ambient policies and route,
//! httpbin, curl, the authorization and JWT tasks' objects) are accepted as
//! they are: every mesh object decodes strictly, the webhook admits the
//! policies, and translating them all into one ambient namespace reports no
//! problem.

use std::path::{Path, PathBuf};

use api::manifest::Object;
use istiod_rs::index::{self, MeshConfig};
use istiod_rs::state::ClusterState;

fn samples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The namespace the samples go to, enrolled and using the sample waypoint
/// (`kubectl label namespace default istio.io/dataplane-mode=ambient
/// istio.io/use-waypoint=waypoint`).
const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
    istio.io/use-waypoint: waypoint
";

/// Problems that are about what runs, not about the objects, which a state
/// without running pods or network access must report: the waypoint has
/// no ready instance (no pods here), and the `jwksUri` is not fetched
/// (istiod-rs's JWKS fetcher's job, `tests/integration/jwks.rs`; a test
/// reaches no outside address).
fn nothing_runs_yet(problem: &str) -> bool {
    problem.contains("bound to waypoint default/waypoint, which has no ready instance yet")
        || (problem
            .starts_with("RequestAuthentication default/jwt-example: spec.jwtRules[0].jwksUri:")
            && problem.contains("not fetched yet"))
}

#[test]
fn every_sample_is_accepted_as_it_is() {
    let files = samples();
    assert!(files.len() >= 8, "samples missing: {files:?}");
    let mut objects = api::manifest::parse(NAMESPACE).unwrap().objects;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let manifest =
            api::manifest::parse(&text).unwrap_or_else(|e| panic!("{}:{e}", file.display()));
        assert!(
            manifest.refused.is_empty(),
            "{}: refused {:?}",
            file.display(),
            manifest.refused
        );
        assert!(
            !manifest.objects.is_empty(),
            "{}: no mesh object",
            file.display()
        );
        // What the validating webhook checks of each kind it validates.
        for object in &manifest.objects {
            let problems = match object {
                Object::AuthorizationPolicy(p) => {
                    index::validate_authorization_policy("istio-system", p)
                }
                Object::PeerAuthentication(p) => index::validate_peer_authentication(p),
                _ => Vec::new(),
            };
            assert!(
                problems.is_empty(),
                "{}: {:?} refused by the webhook: {problems:?}",
                file.display(),
                object.key()
            );
        }
        objects.extend(manifest.objects);
    }
    // As the cluster is once istiod-rs has deployed the sample waypoint.
    let mesh = MeshConfig::default();
    let state = index::analysis::as_provisioned(&ClusterState::from_objects(objects), &mesh);
    let translation = index::translate(&state, &mesh);
    let problems: Vec<String> = translation
        .problems
        .iter()
        .map(|p| p.to_string())
        .filter(|p| !nothing_runs_yet(p))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    // What the samples mean reached the translation: the L4 policies as
    // workload authorization, the L7 ones, the JWT rule and the route in
    // the waypoint's configuration.
    let text = index::json::snapshot_json(&translation.snapshot).to_string();
    for name in [
        "productpage-viewer",
        "httpbin-l4",
        "allow-nothing",
        "productpage-viewer-l7",
        "httpbin-get",
        "require-jwt",
        "testing@secure.istio.io",
        "reviews-v2",
    ] {
        assert!(text.contains(name), "{name} not translated: {text}");
    }
    assert!(
        translation.on_demand.waypoints.is_empty(),
        "the sample waypoint serves every L7 sample: none made on demand"
    );
}
