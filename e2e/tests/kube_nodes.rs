//! The node runtime is a kubelet and container runtime for real: a real
//! control plane (etcd, kube-apiserver, controller manager, scheduler)
//! and two network-namespace nodes run by `e2e::kube::node`. A Deployment
//! of the echo app is scheduled across both nodes and becomes Ready through
//! HTTP readiness probes made from the nodes; pod addresses come from each
//! node's podCIDR through the reference `ptp` CNI plugin; a client pod
//! reaches the echo pods by pod IP across nodes and through the Service's
//! ClusterIP (kube-proxy), and the API server through
//! `KUBERNETES_SERVICE_HOST` with its projected token, which TokenReview
//! accepts; deleting a pod runs SIGTERM, CNI DEL and removes its netns; a
//! container that exits is restarted once; a failing liveness probe
//! restarts its container; an unknown image is ErrImagePull. Port-forward
//! (kube-rs `Api::<Pod>::portforward`, through the API server to the
//! node's kubelet server) reaches an echo pod's TCP port, a hostNetwork
//! pod's HTTP port and a port bound to a pod's 127.0.0.1 only, reports a
//! port nothing listens on on its error channel, and fails for a pod that
//! does not exist.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::time::{Duration, Instant};

use e2e::apps::{EchoReply, HttpReport};
use e2e::binaries::Binaries;
use e2e::kube::node::{NodeRuntime, NodeTimings, start_nodes};
use e2e::kube::samples::{ECHO_APP, client_pod, condition};
use e2e::kube::{KubeRun, Kubectl};
use e2e::privilege;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(120);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Exits 3 the first time, then idles: restarted exactly once.
const ONCE_CRASHING: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: crash-once, namespace: demo}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: state, emptyDir: {}}]
  containers:
    - name: app
      image: istio-rs/client:dev
      command: ["sh", "-c", "if [ -e /state/ran ]; then exec sleep 3600; fi; touch /state/ran; exit 3"]
      volumeMounts: [{name: state, mountPath: /state}]
"#;

/// Serves HTTP on 8080 but its liveness probe asks 8081: killed, restarted.
const UNHEALTHY: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: unhealthy, namespace: demo}
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: echo
      image: istio-rs/echo:dev
      args: ["--http", "8080"]
      livenessProbe:
        tcpSocket: {port: 8081}
        periodSeconds: 1
        failureThreshold: 2
"#;

/// On node1's own network, with a hostPath, a Secret volume and a
/// ConfigMap value: it writes what it got where the node keeps hostPaths,
/// then serves HTTP on the node's address.
const HOST_NETWORK: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: greeting, namespace: demo}
data: {word: hello}
---
apiVersion: v1
kind: Secret
metadata: {name: key, namespace: demo}
stringData: {key.pem: not-really-a-key}
---
apiVersion: v1
kind: Pod
metadata: {name: on-host, namespace: demo}
spec:
  nodeName: node1
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - {name: state, hostPath: {path: /var/run/e2e-node-test, type: DirectoryOrCreate}}
    - {name: key, secret: {secretName: key, defaultMode: 0400}}
  containers:
    - name: echo
      image: istio-rs/echo:dev
      command: ["sh", "-c"]
      args: ["cat /etc/key/key.pem > /state/key && echo \"$(WORD) from $(NODE)\" > /state/hello && exec /usr/local/bin/echo --http 18080"]
      env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: WORD
          valueFrom: {configMapKeyRef: {name: greeting, key: word}}
        - name: NODE
          valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
      volumeMounts:
        - {name: state, mountPath: /state}
        - {name: key, mountPath: /etc/key, readOnly: true}
      readinessProbe:
        tcpSocket: {port: 18080}
        periodSeconds: 1
"#;

/// Ignores SIGTERM (and so do its children): killed when its grace ends.
const STUBBORN: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: stubborn, namespace: demo}
spec:
  nodeName: node1
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: istio-rs/client:dev
      command: ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
"#;

/// A node agent's view: on node0's network, `/var/run/netns` of the node
/// with `HostToContainer` propagation, listing which entries are network
/// namespaces (nsfs) into a hostPath file, over and over.
const NETNS_WATCHER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: netns-watcher, namespace: demo}
spec:
  nodeName: node0
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - {name: netns, hostPath: {path: /var/run/netns, type: DirectoryOrCreate}}
    - {name: out, hostPath: {path: /var/run/netns-watcher, type: DirectoryOrCreate}}
  containers:
    - name: watch
      image: istio-rs/client:dev
      command: ["sh", "-c", "while :; do for f in /var/run/netns/*; do echo \"${f##*/} $(stat -f -c %T $f)\"; done > /out/list.tmp; mv /out/list.tmp /out/list; sleep 0.2; done"]
      volumeMounts:
        - {name: netns, mountPath: /var/run/netns, mountPropagation: HostToContainer}
        - {name: out, mountPath: /out}
"#;

/// Serves HTTP on its own loopback only: port-forward reaches it (as
/// containerd's does, from inside the pod's namespace), nothing else can.
const LOOPBACK_ONLY: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: loopback-only, namespace: demo}
spec:
  nodeName: node0
  terminationGracePeriodSeconds: 1
  containers:
    - name: echo
      image: istio-rs/echo:dev
      args: ["--bind", "127.0.0.1", "--http", "15000"]
      env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
"#;

const UNKNOWN_IMAGE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: nginx, namespace: demo}
spec:
  containers: [{name: web, image: "nginx:1.27"}]
"#;

fn pod_json(kubectl: &Kubectl, name: &str) -> Option<Value> {
    kubectl.get("pod", Some("demo"), name).expect("get pod")
}

fn node_of<'a>(nodes: &'a [NodeRuntime], pod: &Value) -> &'a NodeRuntime {
    let name = pod["spec"]["nodeName"].as_str().expect("a bound pod");
    nodes
        .iter()
        .find(|n| n.name() == name)
        .expect("one of our nodes")
}

/// Waits until the first container status of pod `name` satisfies `done`.
fn container_status(kubectl: &Kubectl, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    kubectl
        .wait_for(&format!("pod {name}'s container status"), PATIENCE, |k| {
            let p = k.json(&["get", "pod", name, "-n", "demo"])?;
            let cs = p["status"]["containerStatuses"][0].clone();
            Ok(done(&cs).then_some(cs))
        })
        .unwrap_or_else(|e| panic!("{e}"))
}

fn echo_reply(report: &HttpReport) -> EchoReply {
    assert!(report.ok, "{report:?}");
    report.echo.clone().expect("echo answered")
}

#[test]
fn kube_nodes() {
    if !privilege::enter_for_test() {
        return;
    }
    let binaries = Binaries::default();
    for bin in ["container-init", "echo", "client"] {
        binaries.get("e2e", bin).expect("the e2e binaries build");
    }
    let kube = KubeRun::start(2).expect("the control plane starts");
    let kubectl = kube.control_plane.kubectl();

    let started = Instant::now();
    let nodes = start_nodes(&kube, &binaries, &NodeTimings::default(), &|s| {
        eprintln!("e2e: node: {s}")
    })
    .expect("the node runtimes start");
    let ready = kubectl
        .wait_for("both Nodes Ready", PATIENCE, |k| {
            let list = k.json(&["get", "nodes"])?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            Ok((items.len() == 2
                && items
                    .iter()
                    .all(|n| condition(n, "Ready").as_deref() == Some("True")))
            .then_some(items))
        })
        .expect("both nodes Ready");
    eprintln!(
        "e2e: timing: both nodes registered and Ready (kube-proxy synced) in {:?}",
        started.elapsed()
    );
    for (n, topo) in ready.iter().zip(&kube.topology.nodes) {
        let name = n["metadata"]["name"].as_str().unwrap();
        let topo = kube
            .topology
            .nodes
            .iter()
            .find(|t| t.name == name)
            .unwrap_or(topo);
        assert_eq!(n["spec"]["podCIDR"], topo.pod_range.to_string(), "{n}");
        assert_eq!(
            n["status"]["addresses"][0]["address"],
            topo.ip.to_string(),
            "{n}"
        );
        assert_eq!(
            n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"],
            e2e::kube::node::server::KUBELET_PORT,
            "{n}"
        );
    }

    for n in &kube.topology.nodes {
        let lease = kubectl
            .get("lease", Some("kube-node-lease"), &n.name)
            .expect("get the node's Lease")
            .expect("the node holds a Lease");
        assert_eq!(lease["spec"]["holderIdentity"], n.name.as_str(), "{lease}");
        assert_eq!(
            lease["metadata"]["ownerReferences"][0]["kind"], "Node",
            "{lease}"
        );
    }

    // The echo Deployment: one pod per node, Running and Ready, addressed
    // from its node's pod range.
    let applied = Instant::now();
    kubectl.apply(ECHO_APP).expect("the workload applies");
    let echo_pods = kubectl
        .wait_for("2 echo pods Running and Ready", PATIENCE, |k| {
            let list = k.json(&["get", "pods", "-n", "demo", "-l", "app=echo"])?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            Ok((items.len() == 2
                && items.iter().all(|p| {
                    p["status"]["phase"] == "Running"
                        && condition(p, "Ready").as_deref() == Some("True")
                }))
            .then_some(items))
        })
        .expect("the echo pods become Ready");
    eprintln!(
        "e2e: timing: Deployment applied to 2 pods Running and Ready in {:?}",
        applied.elapsed()
    );
    let mut pod_nodes: Vec<&str> = Vec::new();
    for p in &echo_pods {
        let node = p["spec"]["nodeName"].as_str().unwrap();
        pod_nodes.push(node);
        let range = kube
            .topology
            .nodes
            .iter()
            .find(|t| t.name == node)
            .unwrap()
            .pod_range;
        let ip: std::net::Ipv4Addr = p["status"]["podIP"].as_str().unwrap().parse().unwrap();
        assert!(
            range.contains(&ip),
            "pod IP {ip} is not in {node}'s podCIDR {range}"
        );
        assert_eq!(
            p["status"]["hostIP"],
            kube.topology
                .nodes
                .iter()
                .find(|t| t.name == node)
                .unwrap()
                .ip
                .to_string()
        );
        let cs = &p["status"]["containerStatuses"][0];
        assert_eq!(cs["ready"], true, "{cs}");
        assert_eq!(cs["restartCount"], 0, "{cs}");
        assert!(cs["state"]["running"]["startedAt"].is_string(), "{cs}");
        for kind in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert_eq!(condition(p, kind).as_deref(), Some("True"), "{kind}: {p}");
        }
    }
    pod_nodes.sort();
    assert_eq!(
        pod_nodes,
        ["node0", "node1"],
        "the anti-affinity spreads them"
    );

    // The client pod on node0: it reaches both echo pods by pod IP (one of
    // them across the fabric on node1) and the Service's ClusterIP.
    kubectl
        .create(&client_pod("client", "node0"))
        .expect("the client pod is created");
    kubectl
        .wait_for("the client pod Running", PATIENCE, |k| {
            let p = k.json(&["get", "pod", "client", "-n", "demo"])?;
            Ok((p["status"]["phase"] == "Running").then_some(()))
        })
        .expect("the client pod runs");
    let node0 = nodes.iter().find(|n| n.name() == "node0").unwrap();
    for p in &echo_pods {
        let ip = p["status"]["podIP"].as_str().unwrap();
        let reply = echo_reply(&client_http(node0, &format!("http://{ip}:8080/by-pod-ip")));
        assert_eq!(reply.pod, p["metadata"]["name"].as_str().unwrap());
        let client_ip = pod_json(&kubectl, "client").unwrap()["status"]["podIP"].clone();
        assert_eq!(
            reply.peer.split(':').next(),
            client_ip.as_str(),
            "pod-to-pod traffic is not translated"
        );
    }
    let service = kubectl
        .get("service", Some("demo"), "echo")
        .unwrap()
        .unwrap();
    let cluster_ip = service["spec"]["clusterIP"].as_str().unwrap().to_string();
    // kube-proxy programs a new Service within its sync period: wait for
    // it, as any client of a fresh Service does; then both pods answer.
    let url = format!("http://{cluster_ip}:80/by-cluster-ip");
    let mut seen = std::collections::BTreeSet::new();
    kubectl
        .wait_for(
            "the Service's ClusterIP to reach both echo pods",
            PATIENCE,
            |_| {
                let report = client_http(node0, &url);
                if let Some(reply) = report.echo.filter(|_| report.ok) {
                    seen.insert(reply.pod);
                }
                Ok((seen.len() == 2).then_some(()))
            },
        )
        .expect("the ClusterIP load-balances over both echo pods");
    eprintln!("e2e: the ClusterIP {cluster_ip} reached {seen:?}");

    port_forward(&kube, &echo_pods);

    // The projected token: the pod reads it where every pod does, presents
    // it to the API server through KUBERNETES_SERVICE_HOST (kube-proxy's
    // DNAT to the API server), and TokenReview accepts it, bound to the pod.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let read = |path: &str| {
        let out = node0
            .exec("demo", "client", "client", &["cat", path], EXEC_TIMEOUT)
            .expect("exec cat");
        assert!(
            out.status.success(),
            "cat {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let token = read(&format!("{sa}/token"));
    assert_eq!(read(&format!("{sa}/namespace")), "demo");
    assert!(read(&format!("{sa}/ca.crt")).contains("BEGIN CERTIFICATE"));
    let review_cmd = format!(
        "curl -sS --max-time 10 --cacert {sa}/ca.crt -H \"Authorization: Bearer $(cat {sa}/token)\" \
         -H 'Content-Type: application/json' -X POST \
         -d '{{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"SelfSubjectReview\"}}' \
         https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews"
    );
    let out = node0
        .exec(
            "demo",
            "client",
            "client",
            &["sh", "-c", &review_cmd],
            EXEC_TIMEOUT,
        )
        .expect("exec curl");
    let self_review: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        self_review["status"]["userInfo"]["username"], "system:serviceaccount:demo:client",
        "{self_review}"
    );
    let review = kubectl
        .create(
            &json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token},
            })
            .to_string(),
        )
        .expect("TokenReview");
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(
        review["status"]["user"]["username"], "system:serviceaccount:demo:client",
        "{review}"
    );
    assert_eq!(
        review["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"][0], "client",
        "the token is bound to the pod: {review}"
    );

    // Deletion: SIGTERM, then CNI DEL, the netns removed, the object gone.
    let victim = &echo_pods[0];
    let victim_name = victim["metadata"]["name"].as_str().unwrap().to_string();
    let victim_node = node_of(&nodes, victim);
    let view = victim_node
        .pod("demo", &victim_name)
        .expect("the runtime runs the pod");
    let netns = view.netns.clone().expect("the pod has its own netns");
    let process = view.containers["echo"]
        .process
        .clone()
        .expect("the echo process");
    kubectl
        .run(&["delete", "pod", "-n", "demo", &victim_name, "--wait=false"])
        .expect("delete");
    kubectl
        .wait_for("the deleted pod's object to go", PATIENCE, |k| {
            Ok(k.get("pod", Some("demo"), &victim_name)?
                .is_none()
                .then_some(()))
        })
        .expect("the pod object is removed by its node");
    let steps: Vec<String> = victim_node
        .journal()
        .into_iter()
        .filter(|e| e.pod == victim_name)
        .map(|e| e.step)
        .collect();
    let at = |what: &str| {
        steps
            .iter()
            .position(|s| s.contains(what))
            .unwrap_or_else(|| panic!("no step {what:?} in {steps:#?}"))
    };
    assert!(
        at("SIGTERM, grace period 5s") < at("container echo exited: signal 15"),
        "{steps:#?}"
    );
    assert!(
        at("container echo exited: signal 15") < at("CNI DEL k8s-pod-network done"),
        "{steps:#?}"
    );
    assert!(
        at("CNI DEL k8s-pod-network done")
            < at(&format!("network namespace {} removed", netns.name())),
        "{steps:#?}"
    );
    assert!(at("removed") < at("pod object deleted"), "{steps:#?}");
    assert!(!netns.exists(), "the pod's netns is gone");
    assert!(
        !e2e::process::is_same_process(process.pid as i32, process.start_time),
        "the echo process is gone"
    );

    // A container that ignores SIGTERM is killed once its grace period ends.
    kubectl.apply(STUBBORN).expect("stubborn");
    let node1 = nodes.iter().find(|n| n.name() == "node1").unwrap();
    kubectl
        .wait_for("stubborn running", PATIENCE, |k| {
            let p = k.json(&["get", "pod", "stubborn", "-n", "demo"])?;
            Ok((p["status"]["phase"] == "Running").then_some(()))
        })
        .expect("stubborn runs");
    kubectl
        .run(&["delete", "pod", "-n", "demo", "stubborn", "--wait=false"])
        .expect("delete stubborn");
    kubectl
        .wait_for("stubborn's object to go", PATIENCE, |k| {
            Ok(k.get("pod", Some("demo"), "stubborn")?
                .is_none()
                .then_some(()))
        })
        .expect("stubborn is removed");
    let steps: Vec<String> = node1
        .journal()
        .into_iter()
        .filter(|e| e.pod == "stubborn")
        .map(|e| e.step)
        .collect();
    let term = steps
        .iter()
        .position(|s| s.contains("SIGTERM, grace period 1s"));
    let killed = steps
        .iter()
        .position(|s| s.contains("container app exited: signal 9"));
    assert!(
        term.is_some() && killed.is_some() && term < killed,
        "SIGTERM, then SIGKILL after the grace period: {steps:#?}"
    );

    // A running container sees network namespaces mounted after it
    // started (a node agent's hostPath /var/run/netns).
    kubectl.apply(NETNS_WATCHER).expect("netns-watcher");
    let watch_list = node0.fs_root().join("run/netns-watcher/list");
    kubectl
        .wait_for("the netns watcher to write", PATIENCE, |_| {
            Ok(watch_list.exists().then_some(()))
        })
        .expect("the watcher runs");
    kubectl
        .create(&client_pod("late", "node0"))
        .expect("a later pod");
    let late_netns = kubectl
        .wait_for("the later pod's netns", PATIENCE, |_| {
            Ok(node0.pod("demo", "late").and_then(|v| v.netns))
        })
        .expect("the later pod has a netns");
    kubectl
        .wait_for(
            "the watcher to see it as a network namespace",
            PATIENCE,
            |_| {
                let list = std::fs::read_to_string(&watch_list).unwrap_or_default();
                Ok(list
                    .lines()
                    .any(|l| l == format!("{} nsfs", late_netns.name()))
                    .then_some(()))
            },
        )
        .expect("mounts made after the container started reach it");

    // A container that exits is restarted (once: it then stays up).
    kubectl.apply(ONCE_CRASHING).expect("crash-once");
    let crashed = container_status(&kubectl, "crash-once", |cs| {
        cs["restartCount"] == 1 && cs["state"]["running"].is_object()
    });
    assert_eq!(
        crashed["lastState"]["terminated"]["exitCode"], 3,
        "{crashed}"
    );

    // A failing liveness probe restarts the container.
    kubectl.apply(UNHEALTHY).expect("unhealthy");
    let restarted = container_status(&kubectl, "unhealthy", |cs| {
        cs["restartCount"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(
        restarted["lastState"]["terminated"]["signal"], 15,
        "{restarted}"
    );
    let events = kubectl
        .json(&[
            "get",
            "events",
            "-n",
            "demo",
            "--field-selector",
            "involvedObject.name=unhealthy",
        ])
        .expect("events");
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"Unhealthy") && reasons.contains(&"Killing"),
        "{reasons:?}"
    );

    // hostNetwork: the pod has the node's address and serves there; its
    // hostPath is the node's own (under the node's filesystem, not the
    // machine's /run); Secret volume and ConfigMap value arrive.
    kubectl.apply(HOST_NETWORK).expect("on-host");
    let on_host = kubectl
        .wait_for("the hostNetwork pod Ready", PATIENCE, |k| {
            let p = k.json(&["get", "pod", "on-host", "-n", "demo"])?;
            Ok((condition(&p, "Ready").as_deref() == Some("True")).then_some(p))
        })
        .expect("the hostNetwork pod becomes Ready");
    let node1_ip = kube.topology.nodes[1].ip.to_string();
    assert_eq!(on_host["status"]["podIP"], node1_ip.as_str(), "{on_host}");
    let reply = echo_reply(&client_http(
        node0,
        &format!("http://{node1_ip}:18080/on-host"),
    ));
    assert_eq!(reply.pod, "on-host");
    // Port-forward to a hostNetwork pod reaches it on the node's own
    // network (its loopback first); the server closing its connection
    // ends the forward.
    let answer = forward_http(&kube, "on-host", 18080, "/through-port-forward");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"on-host\""),
        "{answer}"
    );
    let state = node1.fs_root().join("run/e2e-node-test");
    assert_eq!(
        std::fs::read_to_string(state.join("hello")).unwrap(),
        "hello from node1\n"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("key")).unwrap(),
        "not-really-a-key"
    );
    assert!(
        !std::path::Path::new("/run/e2e-node-test").exists(),
        "a node's hostPath is not the machine's"
    );

    // A port bound to the pod's loopback only (as ztunnel's admin is):
    // port-forward reaches it from inside the pod's namespace.
    kubectl.apply(LOOPBACK_ONLY).expect("loopback-only");
    kubectl
        .wait_for("loopback-only running", PATIENCE, |k| {
            let p = k.json(&["get", "pod", "loopback-only", "-n", "demo"])?;
            Ok((p["status"]["phase"] == "Running").then_some(()))
        })
        .expect("loopback-only runs");
    let answer = kubectl
        .wait_for(
            "port-forward to loopback-only's 127.0.0.1:15000",
            PATIENCE,
            |_| {
                let answer = forward_http(&kube, "loopback-only", 15000, "/admin");
                Ok(answer.starts_with("HTTP/1.1 200").then_some(answer))
            },
        )
        .expect("port-forward reaches a loopback-only port");
    assert!(answer.contains("\"loopback-only\""), "{answer}");

    // An image outside the table fails clearly.
    kubectl.apply(UNKNOWN_IMAGE).expect("nginx");
    let waiting = container_status(&kubectl, "nginx", |cs| {
        cs["state"]["waiting"]["reason"] == "ErrImagePull"
    })["state"]["waiting"]
        .clone();
    let message = waiting["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("nginx:1.27") && message.contains("e2e/src/kube/node/images.rs"),
        "{message}"
    );

    drop(nodes);
}

/// Port-forward through the API server to each echo pod's TCP echo port
/// (9000) with a second port nothing listens on (9999); then a pod that
/// does not exist. kube-rs speaks WebSocket `v4.channel.k8s.io` to the API
/// server, which proxies the upgrade to the pod's node's kubelet server.
fn port_forward(kube: &KubeRun, echo_pods: &[Value]) {
    use k8s_openapi::api::core::v1::Pod;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let names: Vec<String> = echo_pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let kubeconfig = kube.control_plane.admin_kubeconfig().to_path_buf();
    let started = Instant::now();
    kube.control_plane
        .netns()
        .block_on(move || async move {
            let pods: kube::Api<Pod> =
                kube::Api::namespaced(admin_client(&kubeconfig).await, "demo");
            for name in &names {
                let mut forward = pods
                    .portforward(name, &[9000, 9999])
                    .await
                    .unwrap_or_else(|e| panic!("port-forward to {name}: {e}"));
                let mut echo = forward.take_stream(9000).unwrap();
                let line = format!("hello {name} through port-forward\n");
                echo.write_all(line.as_bytes()).await.unwrap();
                let mut back = vec![0u8; line.len()];
                within("echo", echo.read_exact(&mut back))
                    .await
                    .expect("the echo comes back");
                assert_eq!(String::from_utf8_lossy(&back), line);

                let mut dead = forward.take_stream(9999).unwrap();
                let error = forward.take_error(9999).unwrap();
                dead.write_all(b"anyone?").await.unwrap();
                let message = within("error for port 9999", error)
                    .await
                    .expect("an error message for port 9999");
                assert!(
                    message.contains("9999") && message.contains(name.as_str()),
                    "{message}"
                );
                eprintln!("e2e: port-forward to {name}:9999 failed as it must: {message}");

                // Port 9000 still works after 9999 failed.
                echo.write_all(b"again\n").await.unwrap();
                let mut again = [0u8; 6];
                within("second echo", echo.read_exact(&mut again))
                    .await
                    .expect("the second echo comes back");
                assert_eq!(&again, b"again\n");
                drop(echo);
                drop(dead);
                within("end of the forward", forward.join())
                    .await
                    .expect("the port-forward ends cleanly");
            }
            let missing = pods
                .portforward("no-such-pod", &[9000])
                .await
                .err()
                .expect("port-forward to a pod that does not exist fails");
            eprintln!("e2e: port-forward to no-such-pod failed as it must: {missing}");
        })
        .expect("the control plane's namespace");
    eprintln!(
        "e2e: timing: port-forward checks on {} pods in {:?}",
        echo_pods.len(),
        started.elapsed()
    );
}

/// An admin kube-rs client; it must be made and used in the control
/// plane's namespace (where the API server's address is reached).
async fn admin_client(kubeconfig: &std::path::Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).expect("the admin kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("a client configuration");
    kube::Client::try_from(config).expect("a client")
}

/// One HTTP GET through port-forward to `pod`'s `port` in `demo`: the
/// whole answer, read until the kubelet server closes the WebSocket after
/// the pod closed the connection.
fn forward_http(kube: &KubeRun, pod: &str, port: u16, path: &str) -> String {
    kube.control_plane
        .port_forward_get("demo", pod, port, path, PATIENCE)
        .unwrap_or_else(|e| format!("(failed: {e})"))
}

/// `fut`'s output, or a panic naming `what` after [`PATIENCE`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("port-forward: no {what} within {PATIENCE:?}"))
}

/// `client http URL` run in the client pod.
fn client_http(node: &NodeRuntime, url: &str) -> HttpReport {
    node.client_http("demo", "client", url, EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
}
