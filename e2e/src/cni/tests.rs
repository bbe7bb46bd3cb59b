use std::net::Ipv4Addr;
use std::path::Path;

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
        netns: net.netns.path(),
        ifname: "eth0",
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
    let env: std::collections::BTreeMap<_, _> = environment("/opt/cni/bin", CniCommand::Add, &pod)
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
        &p.binary,
        CniCommand::Add,
        &pod,
        true,
        "{\"cniVersion\":\"1.0.0\",\"ips\":[]}",
        "",
    )
    .unwrap();
    assert_eq!(ok.unwrap()["cniVersion"], "1.0.0");
    assert_eq!(
        parse_output(&p.binary, CniCommand::Del, &pod, true, "", "").unwrap(),
        None
    );

    let err = parse_output(
        &p.binary,
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
    let err = parse_output(&p.binary, CniCommand::Add, &pod, false, "panic!", "boom").unwrap_err();
    assert!(matches!(err, CniError::BadOutput { .. }), "{err}");
    let err = parse_output(&p.binary, CniCommand::Add, &pod, true, "{}", "").unwrap_err();
    assert!(err.to_string().contains("no cniVersion"), "{err}");
}

#[test]
fn a_conflist_and_a_conf_are_read_as_lists() {
    let list = NetworkConfigList::parse(
        Path::new("/x/10-k8s.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp","ipam":{"type":"host-local"}},{"type":"istio-cni-rs"}]}"#,
    )
    .unwrap();
    assert_eq!(list.name, "k8s-pod-network");
    assert_eq!(list.kind(0), "ptp");
    assert_eq!(list.kind(1), "istio-cni-rs");
    let single = NetworkConfigList::parse(
        Path::new("/x/10-bridge.conf"),
        r#"{"cniVersion":"1.0.0","name":"net","type":"bridge"}"#,
    )
    .unwrap();
    assert_eq!(single.plugins.len(), 1);
    assert_eq!(single.kind(0), "bridge");

    let err = NetworkConfigList::parse(
        Path::new("/x/a.conflist"),
        r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"ipam":{}}]}"#,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "CNI configuration /x/a.conflist: plugins[0].type is missing or not a string"
    );
    let err = NetworkConfigList::parse(Path::new("/x/a.conf"), r#"{"name":"n","type":"x"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("field `cniVersion` is missing"), "{err}");
}

#[test]
fn the_lexicographically_first_config_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(NetworkConfigList::load_dir(dir.path()).unwrap(), None);
    assert_eq!(
        NetworkConfigList::load_dir(&dir.path().join("missing")).unwrap(),
        None
    );
    let conf = |name: &str| format!(r#"{{"cniVersion":"1.0.0","name":"{name}","type":"ptp"}}"#);
    std::fs::write(dir.path().join("20-b.conflist"), conf("b")).unwrap();
    std::fs::write(dir.path().join("10-a.conf"), conf("a")).unwrap();
    // Not a configuration file, though it sorts first.
    std::fs::write(dir.path().join("00-notes.txt"), "x").unwrap();
    let list = NetworkConfigList::load_dir(dir.path()).unwrap().unwrap();
    assert_eq!(list.name, "a");
    assert_eq!(list.file, dir.path().join("10-a.conf"));
}

/// Plugins that are shell scripts: each records its stdin and environment
/// and answers with a result naming itself.
struct ScriptLauncher {
    dir: std::path::PathBuf,
}

impl PluginLauncher for ScriptLauncher {
    fn cni_path(&self) -> String {
        self.dir.display().to_string()
    }
    fn command(&self, kind: &str) -> Option<(Command, PathBuf)> {
        let path = self.dir.join(kind);
        path.is_file().then(|| (Command::new(&path), path))
    }
}

fn script_plugin(dir: &Path, kind: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(kind);
    let script = format!(
        "#!/bin/sh\nlog={log}\ncat > \"$log.$CNI_COMMAND.stdin\"\nenv | grep ^CNI_ | sort > \"$log.$CNI_COMMAND.env\"\necho \"{kind}\" >> {order}\n\
         echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.244.0.9/24\"}}],\"dns\":{{}},\"by\":\"{kind}\"}}'\n",
        log = dir.join(format!("{kind}.log")).display(),
        order = dir.join("order").display(),
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_chain_passes_each_result_on_and_deletes_in_reverse() {
    let dir = tempfile::tempdir().unwrap();
    script_plugin(dir.path(), "first");
    script_plugin(dir.path(), "second");
    let list = NetworkConfigList::parse(
        &dir.path().join("10.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"first","k":1},{"type":"second"}]}"#,
    )
    .unwrap();
    let launcher = ScriptLauncher {
        dir: dir.path().to_path_buf(),
    };
    let netns = Path::new("/run/netns/p");
    let pod = CniPod {
        namespace: "demo",
        name: "echo",
        uid: "u-1",
        container_id: "c0ffee",
        netns,
        ifname: "eth0",
    };
    let timeout = Duration::from_secs(30);
    let result = run_chain(&list, &launcher, CniCommand::Add, &pod, None, timeout)
        .unwrap()
        .unwrap();
    assert_eq!(
        result["by"], "second",
        "the last plugin's result is the chain's"
    );
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let first: Value = serde_json::from_str(&read("first.log.ADD.stdin")).unwrap();
    assert_eq!(first["name"], "k8s-pod-network");
    assert_eq!(first["cniVersion"], "1.0.0");
    assert_eq!(first["k"], 1);
    assert!(first.get("prevResult").is_none(), "{first}");
    let second: Value = serde_json::from_str(&read("second.log.ADD.stdin")).unwrap();
    assert_eq!(second["prevResult"]["by"], "first");
    let env = read("second.log.ADD.env");
    assert!(env.contains("CNI_COMMAND=ADD\n"), "{env}");
    assert!(env.contains("CNI_NETNS=/run/netns/p\n"), "{env}");
    assert!(
        env.contains(&format!("CNI_PATH={}\n", dir.path().display())),
        "{env}"
    );
    assert!(env.contains("K8S_POD_UID=u-1"), "{env}");

    run_chain(
        &list,
        &launcher,
        CniCommand::Del,
        &pod,
        Some(&result),
        timeout,
    )
    .unwrap();
    assert_eq!(read("order"), "first\nsecond\nsecond\nfirst\n");
    let del: Value = serde_json::from_str(&read("first.log.DEL.stdin")).unwrap();
    assert_eq!(
        del["prevResult"]["by"], "second",
        "DEL gets the cached ADD result"
    );

    let missing = NetworkConfigList::parse(
        &dir.path().join("x.conflist"),
        r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"nope"}]}"#,
    )
    .unwrap();
    let err = run_chain(&missing, &launcher, CniCommand::Add, &pod, None, timeout).unwrap_err();
    assert!(matches!(err, CniError::NoPlugin { .. }), "{err}");
}
