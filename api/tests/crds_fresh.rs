//! The committed CRD YAML under `manifests/crds/` must be what the types generate.

use std::path::PathBuf;

#[test]
fn committed_crd_yaml_is_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let mut stale = Vec::new();
    for (file, want) in api::crd::crd_yaml().expect("CRDs serialise") {
        let path = dir.join(file);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale CRD YAML (run `cargo xtask codegen` and commit the result): {stale:?}"
    );
}

#[test]
fn crd_yaml_parses_back_into_a_crd() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    for (file, yaml) in api::crd::crd_yaml().unwrap() {
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&yaml).expect(file);
        assert_eq!(crd.spec.group, "security.istio.io");
        assert_eq!(crd.spec.versions[0].name, "v1");
    }
}
