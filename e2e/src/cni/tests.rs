use std::net::Ipv4Addr;

use super::*;

fn network() -> PodNetwork {
    PodNetwork {
        netns: NetNs::named("meshe2e-abc123-demo.echo"),
        ip: Ipv4Addr::new(10, 244, 1, 7),
        gateway: Ipv4Addr::new(10, 244, 1, 1),
        node: 1,
        host_veth: "veth7".into(),
    }
}

fn plugin() -> CniPlugin {
    let mut config = Map::new();
    config.insert("plugin_event_socket".into(), "/run/x/cni.sock".into());
    CniPlugin {
        binary: "/opt/cni/bin/istio-cni-rs".into(),
        network: "k8s-pod-network".into(),
        config,
    }
}

fn pod(net: &PodNetwork) -> CniPod<'_> {
    CniPod {
        namespace: "demo",
        name: "echo",
        uid: "u-1",
        container_id: "c0ffee",
        network: net,
    }
}

#[test]
fn prev_result_carries_the_pod_address() {
    let net = network();
    let conf = network_config(&plugin(), Some(&prev_result(&net)));
    assert_eq!(conf["cniVersion"], "1.0.0");
    assert_eq!(conf["type"], "istio-cni-rs");
    assert_eq!(conf["name"], "k8s-pod-network");
    assert_eq!(conf["plugin_event_socket"], "/run/x/cni.sock");
    let prev = &conf["prevResult"];
    assert_eq!(prev["ips"][0]["address"], "10.244.1.7/32");
    assert_eq!(prev["ips"][0]["gateway"], "10.244.1.1");
    assert_eq!(
        prev["interfaces"][0]["sandbox"],
        "/run/netns/meshe2e-abc123-demo.echo"
    );
    assert!(network_config(&plugin(), None).get("prevResult").is_none());
}

#[test]
fn the_environment_is_what_a_runtime_sets() {
    let net = network();
    let pod = pod(&net);
    let env: std::collections::BTreeMap<_, _> = environment(&plugin(), CniCommand::Add, &pod)
        .into_iter()
        .collect();
    assert_eq!(env["CNI_COMMAND"], "ADD");
    assert_eq!(env["CNI_CONTAINERID"], "c0ffee");
    assert_eq!(env["CNI_NETNS"], "/run/netns/meshe2e-abc123-demo.echo");
    assert_eq!(env["CNI_IFNAME"], "eth0");
    assert_eq!(env["CNI_PATH"], "/opt/cni/bin");
    assert_eq!(
        env["CNI_ARGS"],
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=echo;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1"
    );
}

#[test]
fn plugin_answers_are_parsed() {
    let net = network();
    let pod = pod(&net);
    let p = plugin();
    let ok = parse_output(
        &p,
        CniCommand::Add,
        &pod,
        true,
        "{\"cniVersion\":\"1.0.0\",\"ips\":[]}",
        "",
    )
    .unwrap();
    assert_eq!(ok.unwrap()["cniVersion"], "1.0.0");
    assert_eq!(
        parse_output(&p, CniCommand::Del, &pod, true, "", "").unwrap(),
        None
    );

    let err = parse_output(
        &p,
        CniCommand::Add,
        &pod,
        false,
        "{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"node agent unreachable\",\"details\":\"connect: refused\"}",
        "",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "CNI plugin /opt/cni/bin/istio-cni-rs failed ADD for pod demo/echo (code 999): node agent unreachable (connect: refused)"
    );
    let err = parse_output(&p, CniCommand::Add, &pod, false, "panic!", "boom").unwrap_err();
    assert!(matches!(err, CniError::BadOutput { .. }), "{err}");
    let err = parse_output(&p, CniCommand::Add, &pod, true, "{}", "").unwrap_err();
    assert!(err.to_string().contains("no cniVersion"), "{err}");
}
