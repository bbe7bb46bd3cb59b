//! istiod-rs's config directory (`--config-dir`): one file's bytes, read by
//! `api::manifest::parse_bytes` (the function the directory scan calls on
//! every file) into objects, ignored and refused documents; the objects are
//! then translated as istiod translates the cluster state.
#![no_main]

use istiod_rs::index::{self, MeshConfig};
use istiod_rs::state::ClusterState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let manifest = match api::manifest::parse_bytes(data) {
        Ok(manifest) => manifest,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    let state = ClusterState::from_objects(manifest.objects);
    let translation = index::translate(&state, &MeshConfig::default());
    for problem in &translation.problems {
        let _ = problem.to_string();
    }
});
