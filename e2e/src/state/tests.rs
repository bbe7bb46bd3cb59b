//! The YAML the local cluster writes, parsed back as istiod-rs will read it.

use super::*;

fn nodes() -> Vec<NodeRecord> {
    (0..2)
        .map(|i| NodeRecord {
            name: format!("node{i}"),
            ip: Ipv4Addr::new(172, 30, 0, 10 + i),
            pod_range: format!("10.244.{i}.0/24").parse().unwrap(),
            labels: BTreeMap::new(),
        })
        .collect()
}

fn cluster() -> ClusterState {
    let mut state = ClusterState::new(nodes(), "10.96.0.0/16".parse().unwrap());
    let labels = BTreeMap::from([("istio.io/dataplane-mode".to_string(), "ambient".to_string())]);
    state.apply(namespace("demo", &labels)).unwrap();
    state.apply(service_account("demo", "echo")).unwrap();
    state
}

fn pod(name: &str, node: usize, ip: [u8; 4], ports: &[(&str, u16)]) -> PodRecord {
    PodRecord {
        namespace: "demo".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        node: format!("node{node}"),
        node_ip: Ipv4Addr::new(172, 30, 0, 10 + node as u8),
        ip: Some(Ipv4Addr::from(ip)),
        labels: BTreeMap::from([("app".to_string(), "echo".to_string())]),
        service_account: "echo".into(),
        ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        command: vec!["echo".into(), "--http".into(), "8080".into()],
        readiness: None,
        ready: true,
        terminating: false,
        created: Timestamp::UNIX_EPOCH,
    }
}

fn echo_service() -> Object {
    one(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  selector:\n    app: echo\n  \
         ports:\n  - name: http\n    port: 80\n    targetPort: http\n  - name: tcp\n    port: 9000\n",
    )
}

/// The status of a pod's Ready condition.
fn ready(status: &core::PodStatus) -> String {
    let conditions = status.conditions.as_ref().expect("conditions");
    let ready = conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    ready.status.clone()
}

/// The one object of a YAML document.
fn one(yaml: &str) -> Object {
    Object::from_yaml(yaml).unwrap().remove(0)
}

fn parse<T: serde::de::DeserializeOwned>(files: &BTreeMap<String, String>, name: &str) -> T {
    let yaml = files
        .get(name)
        .unwrap_or_else(|| panic!("{name} not written; have {:?}", files.keys()));
    serde_saphyr::from_str(yaml)
        .unwrap_or_else(|e| panic!("{name} does not parse back: {e}\n{yaml}"))
}

#[test]
fn pods_carry_node_addresses_and_readiness() {
    let mut state = cluster();
    let mut echo = pod("echo-a", 1, [10, 244, 1, 2], &[("http", 8080)]);
    echo.readiness = Some(crate::cluster::ReadinessProbe::HttpGet {
        port: 8080,
        path: "/ready".into(),
    });
    state.add_pod(echo).unwrap();
    let files = state.render().unwrap();

    let p: core::Pod = parse(&files, "Pod_demo_echo-a.yaml");
    assert_eq!(p.metadata.uid.as_deref(), Some("uid-echo-a"));
    assert_eq!(p.metadata.labels.unwrap()["app"], "echo");
    let spec = p.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node1"));
    assert_eq!(spec.service_account_name.as_deref(), Some("echo"));
    assert_eq!(
        spec.containers[0].ports.as_ref().unwrap()[0]
            .name
            .as_deref(),
        Some("http")
    );
    let probe = spec.containers[0].readiness_probe.clone().unwrap();
    let get = probe.http_get.unwrap();
    assert_eq!(get.port, IntOrString::Int(8080));
    assert_eq!(get.path.as_deref(), Some("/ready"));
    let status = p.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.2"));
    assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "10.244.1.2");
    assert_eq!(status.host_ip.as_deref(), Some("172.30.0.11"));
    assert_eq!(ready(&status), "True");

    let n: core::Node = parse(&files, "Node__cluster_node1.yaml");
    assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.1.0/24"));
    let addrs = n.status.unwrap().addresses.unwrap();
    assert!(
        addrs
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "172.30.0.11")
    );

    let ns: core::Namespace = parse(&files, "Namespace__cluster_demo.yaml");
    assert_eq!(
        ns.metadata.labels.unwrap()["istio.io/dataplane-mode"],
        "ambient"
    );
    let _: core::ServiceAccount = parse(&files, "ServiceAccount_demo_default.yaml");
    let _: core::ServiceAccount = parse(&files, "ServiceAccount_demo_echo.yaml");
    let _: core::Namespace = parse(&files, "Namespace__cluster_istio-system.yaml");
}

#[test]
fn a_pod_without_network_yet_is_pending_and_not_ready() {
    let mut state = cluster();
    let mut p = pod("echo-a", 0, [10, 244, 0, 2], &[]);
    p.ip = None;
    p.ready = false;
    state.add_pod(p).unwrap();
    let files = state.render().unwrap();
    let p: core::Pod = parse(&files, "Pod_demo_echo-a.yaml");
    let status = p.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.pod_ip, None);
    assert_eq!(ready(&status), "False");
}

#[test]
fn services_get_cluster_ips_and_endpoint_slices() {
    let mut state = cluster();
    state
        .add_pod(pod("echo-a", 0, [10, 244, 0, 2], &[("http", 8080)]))
        .unwrap();
    // Same service, but this pod names its HTTP port differently: a second slice.
    state
        .add_pod(pod("echo-b", 1, [10, 244, 1, 2], &[("http", 8081)]))
        .unwrap();
    let mut other = pod("other", 1, [10, 244, 1, 3], &[]);
    other.labels = BTreeMap::from([("app".to_string(), "other".to_string())]);
    state.add_pod(other).unwrap();
    state.apply(echo_service()).unwrap();
    let files = state.render().unwrap();

    let svc: core::Service = parse(&files, "Service_demo_echo.yaml");
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.cluster_ips.unwrap(), vec!["10.96.0.10".to_string()]);

    let mut seen = BTreeMap::new();
    for i in 0..2 {
        let slice: discovery::EndpointSlice = parse(
            &files,
            &format!("EndpointSlice.discovery.k8s.io_demo_echo-{i}.yaml"),
        );
        assert_eq!(
            slice.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "echo"
        );
        assert_eq!(slice.address_type, "IPv4");
        let endpoints = slice.endpoints.clone().unwrap();
        assert_eq!(endpoints.len(), 1);
        let ep = &endpoints[0];
        let ports: Vec<(String, i32)> = slice
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port.unwrap()))
            .collect();
        assert_eq!(ep.conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(ep.target_ref.as_ref().unwrap().kind.as_deref(), Some("Pod"));
        seen.insert(
            ep.addresses[0].clone(),
            (ep.node_name.clone().unwrap(), ports),
        );
    }
    assert!(!files.contains_key("EndpointSlice.discovery.k8s.io_demo_echo-2.yaml"));
    assert_eq!(
        seen["10.244.0.2"],
        (
            "node0".to_string(),
            vec![("http".to_string(), 8080), ("tcp".to_string(), 9000)]
        )
    );
    assert_eq!(
        seen["10.244.1.2"],
        (
            "node1".to_string(),
            vec![("http".to_string(), 8081), ("tcp".to_string(), 9000)]
        )
    );
}

#[test]
fn cluster_ips_are_kept_checked_and_freed() {
    let mut state = cluster();
    let first = state.apply(echo_service()).unwrap();
    let ip = first.value().pointer("/spec/clusterIP").unwrap().clone();
    let again = state.apply(echo_service()).unwrap();
    assert_eq!(
        again.value().pointer("/spec/clusterIP").unwrap(),
        &ip,
        "re-apply keeps the IP"
    );

    let clash = Object::from_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: clash\n  namespace: demo\nspec:\n  clusterIP: {}\n",
        ip.as_str().unwrap()
    ))
    .unwrap()
    .remove(0);
    let err = state.apply(clash).unwrap_err().to_string();
    assert!(
        err.contains("is already allocated to Service demo/echo"),
        "{err}"
    );

    let outside = one(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: demo\nspec:\n  clusterIP: 192.168.1.1\n",
    );
    let err = state.apply(outside).unwrap_err().to_string();
    assert_eq!(
        err,
        "Service demo/x: spec.clusterIP 192.168.1.1: is outside the service range 10.96.0.0/16"
    );

    let bad_port = one(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: y\n  namespace: demo\nspec:\n  ports:\n  - port: 70000\n",
    );
    let err = state.apply(bad_port).unwrap_err().to_string();
    assert!(
        err.starts_with("Service demo/y: spec.ports[].port: port #1 is 70000"),
        "{err}"
    );

    assert!(
        state
            .delete(&ObjectKey::core("Service", Some("demo"), "echo"))
            .unwrap()
    );
    let next = state
        .apply(one(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: z\n  namespace: demo\n",
        ))
        .unwrap();
    assert_eq!(
        next.value().pointer("/spec/clusterIP").unwrap(),
        &ip,
        "a freed IP is reused"
    );
}

#[test]
fn terminating_pods_are_not_ready_endpoints() {
    let mut state = cluster();
    state
        .add_pod(pod("echo-a", 0, [10, 244, 0, 2], &[("http", 8080)]))
        .unwrap();
    state.apply(echo_service()).unwrap();
    state.pod_mut("demo", "echo-a").unwrap().terminating = true;
    let files = state.render().unwrap();
    let p: core::Pod = parse(&files, "Pod_demo_echo-a.yaml");
    assert!(p.metadata.deletion_timestamp.is_some());
    let slice: discovery::EndpointSlice =
        parse(&files, "EndpointSlice.discovery.k8s.io_demo_echo-0.yaml");
    let c = slice.endpoints.unwrap()[0].conditions.clone().unwrap();
    assert_eq!(
        (c.ready, c.serving, c.terminating),
        (Some(false), Some(true), Some(true))
    );
}

#[test]
fn bad_requests_name_what_is_wrong() {
    let mut state = cluster();
    let err = state
        .apply(one(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: demo\n",
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("Pod demo/p: pods are made with Cluster::create_pod"),
        "{err}"
    );

    let err = state
        .apply(service_account("nowhere", "sa"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "ServiceAccount nowhere/sa: namespace \"nowhere\" does not exist; apply the Namespace first"
    );

    let mut p = pod("echo-a", 0, [10, 244, 0, 2], &[]);
    p.service_account = "missing".into();
    let err = state.add_pod(p).unwrap_err().to_string();
    assert_eq!(
        err,
        "pod demo/echo-a: service account \"missing\" does not exist in demo; apply it first"
    );

    state
        .add_pod(pod("echo-a", 0, [10, 244, 0, 2], &[]))
        .unwrap();
    assert!(
        state
            .add_pod(pod("echo-a", 0, [10, 244, 0, 3], &[]))
            .is_err()
    );
    let err = state
        .delete(&ObjectKey::core("Namespace", None, "demo"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "namespace demo still has pods (echo-a); delete them first"
    );
    state.remove_pod("demo", "echo-a").unwrap();
    assert!(
        state
            .delete(&ObjectKey::core("Namespace", None, "demo"))
            .unwrap()
    );
    assert!(
        state
            .get(&ObjectKey::core("ServiceAccount", Some("demo"), "echo"))
            .is_none()
    );
}

#[test]
fn a_provisioned_service_account_admits_pods_without_being_rendered() {
    let mut state = cluster();
    let mut p = pod("waypoint-0", 0, [10, 244, 0, 9], &[]);
    p.service_account = "waypoint".into();
    assert!(state.add_pod(p.clone()).is_err());
    let sa = ObjectKey::core("ServiceAccount", Some("demo"), "waypoint");
    state.set_provisioned(BTreeSet::from([sa.clone()]));
    state.add_pod(p).unwrap();
    let files = state.render().unwrap();
    assert!(!files.contains_key(&sa.file_name()), "{:?}", files.keys());
}

#[test]
fn a_node_applied_sets_its_labels_and_nothing_else() {
    let mut state = cluster();
    let node = |labels: &str| {
        Object::from_yaml(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels: {{{labels}}}\n"
        ))
        .unwrap()
        .remove(0)
    };
    state
        .apply(node(
            "topology.kubernetes.io/zone: zone-b, kubernetes.io/hostname: other",
        ))
        .unwrap();
    let labels = |state: &ClusterState| {
        let files = state.render().unwrap();
        let n: core::Node = parse(&files, "Node__cluster_node1.yaml");
        assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.1.0/24"));
        n.metadata.labels.unwrap()
    };
    let with = labels(&state);
    assert_eq!(with["topology.kubernetes.io/zone"], "zone-b");
    assert_eq!(with["kubernetes.io/hostname"], "node1");
    // Applied again without it: the label goes, the hostname stays.
    state.apply(node("")).unwrap();
    let without = labels(&state);
    assert_eq!(
        without,
        BTreeMap::from([("kubernetes.io/hostname".to_string(), "node1".to_string())])
    );
    let unknown = Object::from_yaml("apiVersion: v1\nkind: Node\nmetadata:\n  name: node7\n")
        .unwrap()
        .remove(0);
    let e = state.apply(unknown).unwrap_err().to_string();
    assert!(
        e.contains("metadata.name: the local cluster's nodes are fixed (node0, node1)"),
        "{e}"
    );
}
