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
        assert!(file.starts_with(&crd.spec.group), "{file}");
        assert_eq!(crd.spec.versions[0].name, "v1");
        let stored: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(stored.len(), 1, "{file}: one stored version");
    }
}

/// DestinationRule, VirtualService, ServiceEntry and WorkloadEntry are
/// served in v1, v1beta1 and v1alpha3, one schema, stored as v1alpha3 (istio/api's
/// `+cue-gen:DestinationRule:storageVersion` on the v1alpha3 proto).
#[test]
fn networking_crds_serve_upstreams_versions() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds = api::crd::crd_yaml().unwrap();
    for file in [
        "networking.istio.io_destinationrules.yaml",
        "networking.istio.io_virtualservices.yaml",
        "networking.istio.io_serviceentries.yaml",
        "networking.istio.io_workloadentries.yaml",
    ] {
        let (_, yaml) = crds.iter().find(|(f, _)| *f == file).expect(file);
        let crd: CustomResourceDefinition = serde_saphyr::from_str(yaml).unwrap();
        let versions: Vec<(&str, bool, bool)> = crd
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.served, v.storage))
            .collect();
        assert_eq!(
            versions,
            [
                ("v1", true, false),
                ("v1beta1", true, false),
                ("v1alpha3", true, true)
            ],
            "{file}"
        );
        assert!(
            crd.spec
                .versions
                .iter()
                .all(|v| v.schema == crd.spec.versions[0].schema),
            "{file}: one schema"
        );
    }
}
