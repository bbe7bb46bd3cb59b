//! The install manifest: every document of manifests/ decodes strictly as
//! its Kubernetes type (a typo fails here, not on a cluster), the objects
//! come in apply order with our label, the values land where they should,
//! and the RBAC covers what istiod-rs and the node agent do. The structure
//! of `manifest generate` (kind, name, source file, in order) is golden:
//! `UPDATE_GOLDENS=1 cargo test -p istioctl-rs --test integration manifest` rewrites it.

use crate::support::golden;

use std::collections::BTreeSet;

use istioctl_rs::manifest::{
    self, CRD_FILES, GATEWAY_API_FILES, INSTALL_FILES, InstallKind, Manifest, ManifestError,
    ManifestObject,
};
use istioctl_rs::values::{KEYS, Values};
use serde_json::Value;

const GOLDEN: &str = "tests/golden/install-objects.txt";

fn default_manifest() -> Manifest {
    manifest::generate(&Values::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn find<'a>(manifest: &'a Manifest, kind: InstallKind, name: &str) -> &'a ManifestObject {
    manifest
        .objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_install_objects_in_order_are_golden() {
    let install_only = manifest::from_files(INSTALL_FILES, &Values::default()).unwrap();
    let text: String = install_only
        .objects
        .iter()
        // The file, not the line: a comment edited is no change of structure.
        .map(|o| {
            format!(
                "{:<60} {}\n",
                o.describe(),
                o.source.split(':').next().unwrap()
            )
        })
        .collect();
    golden::check(
        GOLDEN,
        &text,
        "the install objects",
        "cargo test -p istioctl-rs --test integration manifest",
    );
}

#[test]
fn every_object_is_labelled_ordered_and_unique() {
    let manifest = default_manifest();
    // Every CRD file's object, right after the namespace.
    let crds: Vec<&str> = manifest
        .of_kind(InstallKind::CustomResourceDefinition)
        .map(|o| o.source.split(':').next().unwrap())
        .collect();
    let files: BTreeSet<&str> = crds.iter().copied().collect();
    assert_eq!(
        files,
        CRD_FILES
            .iter()
            .chain(GATEWAY_API_FILES)
            .map(|(f, _)| *f)
            .collect()
    );
    // Only the Gateway API's are created where absent, and all of them.
    for o in &manifest.objects {
        assert_eq!(
            o.if_absent,
            o.name.ends_with(".gateway.networking.k8s.io"),
            "{}",
            o.describe()
        );
    }
    let kinds: Vec<InstallKind> = manifest.objects.iter().map(|o| o.kind).collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(kinds, sorted, "apply order");
    assert_eq!(kinds[0], InstallKind::Namespace);
    for o in &manifest.objects {
        assert_eq!(
            o.body["metadata"]["labels"][manifest::MANAGED_BY],
            "istioctl-rs",
            "{}",
            o.describe()
        );
        assert_eq!(o.body["kind"], o.kind.as_str());
        assert_eq!(o.body["apiVersion"], o.kind.api_version());
        if o.kind.namespaced() {
            assert_eq!(
                o.namespace.as_deref(),
                Some("istio-system"),
                "{}",
                o.describe()
            );
        }
    }
    // Workloads last, the webhook before istiod.
    let position = |kind, name| {
        manifest
            .objects
            .iter()
            .position(|o| o.kind == kind && o.name == name)
            .unwrap()
    };
    assert!(
        position(
            InstallKind::ValidatingWebhookConfiguration,
            "istio-validator-istio-system"
        ) < position(InstallKind::Deployment, "istiod")
    );
    let yaml = manifest.to_yaml();
    assert_eq!(yaml.matches("\n---\n").count(), manifest.objects.len());
}

#[test]
fn values_land_in_their_places() {
    let mut values = Values::default();
    values
        .set_arg("hub=registry.example.com:5000/mesh")
        .unwrap();
    values.set_arg("tag=1.2.3").unwrap();
    values.set_arg("istiod.replicas=3").unwrap();
    values.set_arg("cni.binDir=/home/kubernetes/bin").unwrap();
    values.set_arg("cni.confDir=/etc/cni/custom.d").unwrap();
    values.set_arg("trustDomain=example.org").unwrap();
    values.set_arg("logLevel=debug").unwrap();
    values.set_arg("imagePullPolicy=Never").unwrap();
    values
        .set_arg("cni.excludeNamespaces=kube-system,monitoring")
        .unwrap();
    values
        .set_arg("waypoint.xdsAddress=10.96.0.20:15012")
        .unwrap();
    values
        .set_arg("ztunnel.terminationGracePeriodSeconds=120")
        .unwrap();
    let manifest = manifest::generate(&values).unwrap();

    // ztunnel-rs drains for the pod's grace period (less its margin).
    let ztunnel = &find(&manifest, InstallKind::DaemonSet, "ztunnel").body;
    let spec = &ztunnel["spec"]["template"]["spec"];
    assert_eq!(spec["terminationGracePeriodSeconds"], 120, "a number");
    assert_eq!(
        env(&spec["containers"][0], "TERMINATION_GRACE_PERIOD_SECONDS"),
        "120"
    );

    let istiod = &find(&manifest, InstallKind::Deployment, "istiod").body;
    assert_eq!(istiod["spec"]["replicas"], 3, "a number, not a string");
    let container = &istiod["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com:5000/mesh/istiod-rs:1.2.3"
    );
    assert_eq!(container["imagePullPolicy"], "Never");
    assert_eq!(env(container, "TRUST_DOMAIN"), "example.org");
    assert_eq!(env(container, "RUST_LOG"), "debug");
    // The waypoints istiod-rs provisions run this install's images.
    assert_eq!(
        env(container, "WAYPOINT_HUB"),
        "registry.example.com:5000/mesh"
    );
    assert_eq!(env(container, "WAYPOINT_TAG"), "1.2.3");
    assert_eq!(env(container, "WAYPOINT_IMAGE_PULL_POLICY"), "Never");
    assert_eq!(env(container, "WAYPOINT_LOG_LEVEL"), "debug");
    assert_eq!(env(container, "WAYPOINT_XDS_ADDRESS"), "10.96.0.20:15012");

    let agent = &find(&manifest, InstallKind::DaemonSet, "istio-cni-node").body;
    let spec = &agent["spec"]["template"]["spec"];
    assert_eq!(
        spec["containers"][0]["image"],
        "registry.example.com:5000/mesh/ztunnel-rs:1.2.3"
    );
    assert_eq!(
        env(&spec["containers"][0], "EXCLUDED_NAMESPACES"),
        "kube-system,monitoring"
    );
    let host_path = |volume: &str| {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .unwrap()["hostPath"]["path"]
            .clone()
    };
    assert_eq!(host_path("cni-bin-dir"), "/home/kubernetes/bin");
    assert_eq!(host_path("cni-net-dir"), "/etc/cni/custom.d");

    let ztunnel = &find(&manifest, InstallKind::DaemonSet, "ztunnel").body;
    assert_eq!(
        ztunnel["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example.com:5000/mesh/ztunnel-rs:1.2.3"
    );
    // Defaults: this binary's version.
    let default = default_manifest();
    assert_eq!(
        find(&default, InstallKind::Deployment, "istiod").body["spec"]["template"]["spec"]["containers"]
            [0]["image"],
        format!("istio-rs/istiod-rs:{}", env!("CARGO_PKG_VERSION"))
    );
}

fn env(container: &Value, name: &str) -> String {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))["value"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn every_placeholder_is_a_value_and_every_value_is_used() {
    let all: String = INSTALL_FILES.iter().map(|(_, t)| *t).collect();
    for key in KEYS {
        assert!(
            all.contains(&format!("${{{}}}", key.name)),
            "{} is never used",
            key.name
        );
    }
}

#[test]
fn a_typo_in_a_manifest_fails_naming_file_line_and_field() {
    let typo = "\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: x
  namespace: istio-system
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: c
          image: \"${hub}/x:${tag}\"
          securityContext:
            capabilites:
              add: [NET_ADMIN]
";
    let err = manifest::from_files(&[("typo.yaml", typo)], &Values::default()).unwrap_err();
    assert!(matches!(err, ManifestError::UnknownFields { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "typo.yaml: DaemonSet istio-system/x has fields its kind does not have: spec.template.spec.containers[0].securityContext.capabilites (line 15)"
    );

    for (text, says) in [
        (
            "apiVersion: apps/v1\nkind: Deploymnet\nmetadata: {name: x, namespace: a}\n",
            "apps/v1 Deploymnet is not a kind istioctl-rs installs",
        ),
        (
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n",
            "t.yaml:1: ServiceAccount x has no metadata.namespace",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {}\n",
            "t.yaml:1: Namespace has no metadata.name",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: a}\nspec: {replicas: lots}\n",
            "t.yaml:",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
            "Namespace a is defined twice: at t.yaml:1 and at t.yaml:5",
        ),
        ("a: ${nope}\n", "t.yaml:1: `${nope}` names no value"),
    ] {
        let err = manifest::from_files(&[("t.yaml", text)], &Values::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{text:?}: {err}");
    }
}

/// The plural of a kind the mesh reads, as RBAC names it.
fn plural(kind: api::manifest::Kind) -> String {
    let lower = kind.as_str().to_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) => format!("{stem}ies"),
        _ => format!("{lower}s"),
    }
}

/// The verbs `role` grants on `group`/`resource`.
fn verbs(role: &Value, group: &str, resource: &str) -> BTreeSet<String> {
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["apiGroups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == group)
        })
        .filter(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resource)
        })
        .flat_map(|r| {
            r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
        })
        .collect()
}

/// How many resources `role` names, all rules together.
fn granted(role: &Value) -> usize {
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["resources"].as_array().unwrap().len())
        .sum()
}

fn set(verbs: &[&str]) -> BTreeSet<String> {
    verbs.iter().map(|v| v.to_string()).collect()
}

#[test]
fn istiod_may_watch_every_kind_it_reads_and_nothing_more_than_it_writes() {
    let manifest = default_manifest();
    let role = &find(&manifest, InstallKind::ClusterRole, "istiod-rs").body;
    for kind in api::manifest::Kind::ALL {
        assert_eq!(
            verbs(role, kind.group(), &plural(kind)),
            set(&["list", "watch"]),
            "{kind}: istiod-rs's Kubernetes source watches it (state/kube.rs)"
        );
    }
    // Statuses: patches to the status subresource of the kinds istiod-rs
    // writes conditions on (Services' istio.io/WaypointBound among them,
    // and ServiceEntries' allocated addresses), and
    // nothing else.
    for (group, resource) in [
        ("security.istio.io", "authorizationpolicies/status"),
        ("security.istio.io", "peerauthentications/status"),
        ("security.istio.io", "requestauthentications/status"),
        ("networking.istio.io", "destinationrules/status"),
        ("networking.istio.io", "virtualservices/status"),
        ("networking.istio.io", "serviceentries/status"),
        ("", "services/status"),
        ("gateway.networking.k8s.io", "httproutes/status"),
        ("gateway.networking.k8s.io", "grpcroutes/status"),
    ] {
        assert_eq!(verbs(role, group, resource), set(&["patch"]), "{resource}");
    }
    assert_eq!(
        verbs(role, "authentication.k8s.io", "tokenreviews"),
        set(&["create"])
    );
    assert_eq!(
        granted(role),
        api::manifest::Kind::ALL.len() + 9 + 1,
        "no resource beyond those"
    );

    // The webhook keeper: its configuration, and the dry-run probe only in
    // the root namespace.
    let webhook = &find(
        &manifest,
        InstallKind::ClusterRole,
        "istiod-rs-validating-webhook",
    )
    .body;
    assert_eq!(
        verbs(
            webhook,
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations"
        ),
        set(&["get", "list", "patch", "watch"])
    );
    let probe = find(&manifest, InstallKind::Role, "istiod-rs-validating-webhook");
    assert_eq!(probe.namespace.as_deref(), Some("istio-system"));
    assert_eq!(
        verbs(&probe.body, "security.istio.io", "authorizationpolicies"),
        set(&["create"])
    );
    // Each role is bound to istiod's ServiceAccount.
    for (kind, name) in [
        (InstallKind::ClusterRoleBinding, "istiod-rs"),
        (
            InstallKind::ClusterRoleBinding,
            "istiod-rs-validating-webhook",
        ),
        (InstallKind::RoleBinding, "istiod-rs-validating-webhook"),
    ] {
        let binding = &find(&manifest, kind, name).body;
        assert_eq!(binding["roleRef"]["name"], name);
        assert_eq!(binding["subjects"][0]["name"], "istiod");
    }
}

#[test]
fn the_node_agent_may_do_what_it_does_and_ztunnel_nothing() {
    let manifest = default_manifest();
    let role = &find(&manifest, InstallKind::ClusterRole, "istio-cni-rs").body;
    assert_eq!(verbs(role, "", "pods"), set(&["list", "watch"]));
    assert_eq!(verbs(role, "", "namespaces"), set(&["list", "watch"]));
    assert_eq!(verbs(role, "", "pods/status"), set(&["patch"]));
    let own = &find(&manifest, InstallKind::Role, "istio-cni-rs").body;
    assert_eq!(verbs(own, "apps", "daemonsets"), set(&["get"]));
    assert_eq!(
        own["rules"][0]["resourceNames"],
        serde_json::json!(["istio-cni-node"])
    );
    // ztunnel-rs calls no Kubernetes API: no role names its account.
    for o in &manifest.objects {
        if matches!(
            o.kind,
            InstallKind::ClusterRoleBinding | InstallKind::RoleBinding
        ) {
            assert_ne!(o.body["subjects"][0]["name"], "ztunnel", "{}", o.describe());
        }
    }
}

/// The environment variables the manifests set are ones the binaries read
/// (their clap `env` names), so a renamed flag cannot silently leave a
/// setting unapplied.
#[test]
fn every_environment_variable_set_is_read() {
    let sources = [
        ("istiod", include_str!("../../../istiod-rs/src/app/args.rs")),
        (
            "ztunnel",
            concat!(
                include_str!("../../../ztunnel-rs/src/app.rs"),
                include_str!("../../../ztunnel-rs/src/lib.rs"),
                include_str!("../../../ztunnel-rs/src/upstream.rs")
            ),
        ),
        (
            "istio-cni-node",
            concat!(
                include_str!("../../../ztunnel-rs/src/node_agent.rs"),
                include_str!("../../../ztunnel-rs/src/lib.rs")
            ),
        ),
    ];
    let manifest = default_manifest();
    for (workload, source) in sources {
        let object = manifest
            .objects
            .iter()
            .find(|o| {
                o.name == workload
                    && matches!(o.kind, InstallKind::Deployment | InstallKind::DaemonSet)
            })
            .unwrap();
        let container = &object.body["spec"]["template"]["spec"]["containers"][0];
        for var in container["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap();
            // Upstream's variables without a flag of their own are read
            // where they are translated (`ztunnel-rs/src/upstream.rs`).
            let read = source.contains(&format!("env = \"{name}\""))
                || source.contains(&format!("set(\"{name}\")"))
                || (name == "RUST_LOG" && source.contains("RUST_LOG"));
            assert!(
                read,
                "{workload} sets {name}, which its binary does not read"
            );
        }
    }
}

#[test]
fn the_waypoint_template_renders_to_valid_objects() {
    let template = include_str!("../../../manifests/templates/waypoint.yaml");
    let values = Values::default();
    let text = istioctl_rs::render::render("waypoint.yaml", template, &|key| match key {
        "gateway.name" => Some("reviews-waypoint".into()),
        "gateway.namespace" => Some("bookinfo".into()),
        "gateway.uid" => Some("7f3c1a52-0d8e-4a8b-9a57-2f1d7e0c9b11".into()),
        "serviceAccount" => Some("reviews".into()),
        "xdsAddress" => Some("istiod.istio-system.svc:15012".into()),
        other => values.get(other).map(String::from),
    })
    .unwrap();
    // Strictly decoded as their kinds.
    let rendered = manifest::from_files(&[("waypoint.yaml", text.as_str())], &values).unwrap();
    let kinds: Vec<(InstallKind, &str)> = rendered
        .objects
        .iter()
        .map(|o| (o.kind, o.name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (InstallKind::ServiceAccount, "reviews"),
            (InstallKind::Service, "reviews-waypoint"),
            (InstallKind::Deployment, "reviews-waypoint"),
        ]
    );
    // Upstream's labels (istio/istio's waypoint template), each object
    // owned by the Gateway so Kubernetes deletes it with it.
    for o in &rendered.objects {
        assert_eq!(o.namespace.as_deref(), Some("bookinfo"));
        let labels = &o.body["metadata"]["labels"];
        assert_eq!(labels[api::labels::GATEWAY_NAME], "reviews-waypoint");
        assert_eq!(
            labels["gateway.networking.k8s.io/gateway-class-name"],
            api::labels::WAYPOINT_GATEWAY_CLASS
        );
        assert_eq!(
            labels[api::labels::GATEWAY_MANAGED],
            api::labels::GATEWAY_MANAGED_VALUE
        );
        assert_eq!(
            o.body["metadata"]["ownerReferences"],
            serde_json::json!([{
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "name": "reviews-waypoint",
                "uid": "7f3c1a52-0d8e-4a8b-9a57-2f1d7e0c9b11",
            }])
        );
    }
    // The Service: upstream's waypoint ports (status-port, then the HBONE
    // listener with its protocol as appProtocol), selecting the pods.
    let service = &rendered.objects[1].body;
    assert_eq!(
        service["spec"]["ports"],
        serde_json::json!([
            {"name": "status-port", "port": u64::from(api::ports::READINESS), "protocol": "TCP", "appProtocol": "tcp"},
            {"name": "mesh", "port": u64::from(api::ports::HBONE), "protocol": "TCP", "appProtocol": "hbone"},
        ])
    );
    assert_eq!(
        service["spec"]["selector"][api::labels::GATEWAY_NAME],
        "reviews-waypoint"
    );
    // The pods: never captured, running as the account given, the image
    // of the install's values, reaching istiod where told, mounting the
    // root istiod-rs publishes in the namespace.
    let deployment = &rendered.objects[2].body;
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"][api::labels::DATAPLANE_MODE],
        api::labels::DATAPLANE_MODE_NONE
    );
    assert_eq!(
        pod["metadata"]["labels"][api::labels::GATEWAY_NAME],
        "reviews-waypoint"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "reviews");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        format!("istio-rs/waypoint-rs:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        env(container, "XDS_ADDRESS"),
        "istiod.istio-system.svc:15012"
    );
    let root_volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "istiod-ca-cert")
        .unwrap();
    assert_eq!(root_volume["configMap"]["name"], "istio-ca-root-cert");
    // The waypoint reads its settings by the names ztunnel-rs reads the
    // same settings by (waypoint-rs's args take ztunnel-rs's names), and
    // SERVICE_ACCOUNT as upstream's waypoint template sets it.
    let ztunnel = concat!(
        include_str!("../../../ztunnel-rs/src/app.rs"),
        include_str!("../../../ztunnel-rs/src/lib.rs")
    );
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        assert!(
            ztunnel.contains(&format!("env = \"{name}\""))
                || ["RUST_LOG", "SERVICE_ACCOUNT"].contains(&name),
            "the waypoint template sets {name}, a name ztunnel-rs does not read"
        );
    }
}

#[test]
fn istiod_may_provision_waypoints_and_delete_only_gateways() {
    let manifest = default_manifest();
    let role = &find(&manifest, InstallKind::ClusterRole, "istiod-rs-provisioner").body;
    for (group, resource) in [
        ("", "serviceaccounts"),
        ("", "services"),
        ("", "configmaps"),
        ("apps", "deployments"),
    ] {
        assert_eq!(
            verbs(role, group, resource),
            set(&["create", "patch"]),
            "{resource}: server-side apply (src/provision/kube.rs)"
        );
    }
    assert_eq!(
        verbs(role, "gateway.networking.k8s.io", "gateways/status"),
        set(&["patch"])
    );
    // Waypoints on demand: the Gateways istiod-rs creates, and deletes once
    // no rule needs them (src/provision/on_demand.rs).
    assert_eq!(
        verbs(role, "gateway.networking.k8s.io", "gateways"),
        set(&["create", "patch", "delete"])
    );
    assert_eq!(granted(role), 6, "no resource beyond those");
    let binding = &find(
        &manifest,
        InstallKind::ClusterRoleBinding,
        "istiod-rs-provisioner",
    )
    .body;
    assert_eq!(binding["roleRef"]["name"], "istiod-rs-provisioner");
    assert_eq!(binding["subjects"][0]["name"], "istiod");
}
