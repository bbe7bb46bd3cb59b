//! istioctl-rs's debugging views on a real API server (issue 14): each
//! finds its pod through the API and reads it through a port-forward
//! (`pods/portforward`, served by the node runtime's kubelet), with nothing
//! but the kubeconfig, as a user on a laptop would run them.
//!
//! - `zc workload --node N`: the fixture's echo and client pods, HBONE,
//!   each on its node, read from N's ztunnel; `-o json` the same pods;
//! - `zc certificate` with no ztunnel named while two run: refused, naming
//!   both; `--node N` and the ztunnel pod by name: the certificate of
//!   `echo`'s identity held by N's ztunnel;
//! - `ps -o json`: one ztunnel per node, in sync (istiod found by label);
//! - `x describe pod ECHO.demo -o json`: enrolled on its node with its
//!   identity and a valid certificate, read from the ztunnel of the pod's
//!   node;
//! - `analyze -n demo` live: an AuthorizationPolicy whose selector matches
//!   no pod is reported (IST0127) from what the API server lists.

use serde_json::Value;

use super::enrolment::{poll, unexpected};
use super::{KubeFixture, KubeScenario, NAMESPACE, PATIENCE};
use crate::kube::mesh::{KubeMesh, KubeMeshError, SYSTEM_NAMESPACE};
use crate::scenarios::istioctl::ztunnel_nodes_in_sync;

pub fn scenarios() -> Vec<KubeScenario> {
    vec![KubeScenario {
        name: "istioctl_views_through_port_forward",
        run: views_through_port_forward,
    }]
}

/// `istioctl-rs args`: its exit status, stdout and stderr.
fn istioctl(mesh: &KubeMesh, args: &[&str]) -> Result<(bool, String, String), KubeMeshError> {
    let out = mesh.istioctl(args)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `istioctl-rs args` that must succeed with JSON on stdout.
fn istioctl_json(mesh: &KubeMesh, args: &[&str]) -> Result<Value, KubeMeshError> {
    let what = format!("`istioctl-rs {}`", args.join(" "));
    let (ok, stdout, stderr) = istioctl(mesh, args)?;
    if !ok {
        return Err(unexpected(what, format!("failed: {stderr}")));
    }
    serde_json::from_str(&stdout).map_err(|e| unexpected(what, format!("{e}: {stdout}")))
}

fn views_through_port_forward(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
) -> Result<String, KubeMeshError> {
    let echo = &fixture.echo[0];
    let node = echo.node.as_str();
    let mut evidence = Vec::new();

    // The workloads N's ztunnel holds: every fixture pod, HBONE, on its node.
    let args = [
        "zc",
        "workload",
        "--node",
        node,
        "--workload-namespace",
        NAMESPACE,
    ];
    let what = format!("`istioctl-rs {}`", args.join(" "));
    let (ok, table, stderr) = istioctl(mesh, &args)?;
    if !ok {
        return Err(unexpected(what, format!("failed: {stderr}")));
    }
    // What a user sees (the README quotes it).
    eprintln!("$ istioctl-rs {}\n{table}", args.join(" "));
    let fixture_pods: Vec<_> = fixture.echo.iter().chain(&fixture.clients).collect();
    for pod in &fixture_pods {
        let row = table.lines().find(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            cells.first() == Some(&NAMESPACE)
                && cells.get(1) == Some(&pod.name.as_str())
                && cells.get(2) == Some(&pod.ip.as_str())
                && cells.get(3) == Some(&pod.node.as_str())
                && cells.last() == Some(&"HBONE")
        });
        if row.is_none() {
            return Err(unexpected(
                what,
                format!(
                    "no HBONE row for {} ({}, {}):\n{table}",
                    pod.name, pod.ip, pod.node
                ),
            ));
        }
    }
    let args = [&args[..], &["-o", "json"]].concat();
    let listed = istioctl_json(mesh, &args)?;
    let names: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str())
        .collect();
    if let Some(missing) = fixture_pods
        .iter()
        .find(|p| !names.contains(&p.name.as_str()))
    {
        return Err(unexpected(
            format!("`istioctl-rs {}`", args.join(" ")),
            format!("no workload {}:\n{listed:#}", missing.name),
        ));
    }
    evidence.push(format!(
        "zc workload --node {node}: {} pods HBONE on their nodes",
        fixture_pods.len()
    ));

    // Certificates differ per ztunnel: with two running, one must be named.
    let args = ["zc", "certificate"];
    let (ok, _, stderr) = istioctl(mesh, &args)?;
    eprintln!("$ istioctl-rs zc certificate\n{stderr}");
    if ok
        || !stderr.starts_with("error: this view differs per ztunnel and 2 run (")
        || !stderr.contains("--node NODE")
    {
        return Err(unexpected(
            "`istioctl-rs zc certificate` with two ztunnels and none named",
            format!("succeeded: {ok}; stderr: {stderr}"),
        ));
    }
    let ztunnel = mesh
        .component_pod("app=ztunnel", Some(node))?
        .and_then(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .ok_or_else(|| unexpected("the ztunnel pod", format!("none on node {node}")))?;
    let named = format!("{ztunnel}.{SYSTEM_NAMESPACE}");
    let identity = format!("/ns/{NAMESPACE}/sa/echo");
    for args in [
        vec!["zc", "certificate", "--node", node, "-o", "json"],
        vec!["zc", "certificate", named.as_str(), "-o", "json"],
    ] {
        let certificates = istioctl_json(mesh, &args)?;
        let held = certificates.as_array().into_iter().flatten().any(|c| {
            c["identity"]
                .as_str()
                .is_some_and(|id| id.ends_with(&identity))
        });
        if !held {
            return Err(unexpected(
                format!("`istioctl-rs {}`", args.join(" ")),
                format!("no certificate of {identity}:\n{certificates:#}"),
            ));
        }
    }
    evidence.push(format!(
        "zc certificate: refused with none named, {identity} held by {ztunnel} (by --node and by name)"
    ));

    // istiod by label: every ztunnel in sync.
    let args = ["ps", "-o", "json"];
    let (nodes, took) = poll("every ztunnel in sync in proxy-status", PATIENCE, |seen| {
        let report = istioctl_json(mesh, &args)?;
        let in_sync = ztunnel_nodes_in_sync(&report);
        *seen = format!("{report}");
        let mut want: Vec<String> = fixture.echo.iter().map(|p| p.node.clone()).collect();
        want.sort();
        want.dedup();
        Ok((in_sync == want).then_some(in_sync))
    })?;
    evidence.push(format!(
        "ps: ztunnels of {} in sync ({:.1}s)",
        nodes.join(", "),
        took.as_secs_f64()
    ));

    let (_, table, _) = istioctl(mesh, &["ps"])?;
    eprintln!("$ istioctl-rs ps\n{table}");

    // describe: the ztunnel of the pod's node.
    let target = format!("{}.{NAMESPACE}", echo.name);
    let (_, screen, _) = istioctl(mesh, &["x", "describe", "pod", &target])?;
    eprintln!("$ istioctl-rs x describe pod {target}\n{screen}");
    let args = ["x", "describe", "pod", &target, "-o", "json"];
    let pod = istioctl_json(mesh, &args)?;
    let facts = [
        pod["enrolled"] == true,
        pod["node"] == node,
        pod["identity"]
            .as_str()
            .is_some_and(|id| id.ends_with(&identity)),
        pod["certificate"]["valid"] == true,
    ];
    if facts.contains(&false) {
        return Err(unexpected(
            format!("`istioctl-rs {}`", args.join(" ")),
            format!(
                "want enrolled on {node}, identity {identity}, a valid certificate; facts {facts:?}:\n{pod:#}"
            ),
        ));
    }
    evidence.push(format!(
        "x describe pod {target}: enrolled on {node}, valid certificate"
    ));

    // Live analysis against the API server: a selector that matches nothing.
    mesh.kubectl.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {TYPO}\n  namespace: {NAMESPACE}\nspec:\n  selector:\n    matchLabels:\n      app: ehco\n  action: ALLOW\n  rules:\n  - {{}}\n"
    ))?;
    let analysed = istioctl(mesh, &["analyze", "-n", NAMESPACE]);
    mesh.kubectl.run(&[
        "delete",
        "authorizationpolicies.security.istio.io",
        TYPO,
        "-n",
        NAMESPACE,
        "--ignore-not-found",
    ])?;
    let (_, stdout, stderr) = analysed?;
    let finding = format!("IST0127] (AuthorizationPolicy {NAMESPACE}/{TYPO})");
    if !stdout.contains(&finding) || !stdout.contains("app=ehco") {
        return Err(unexpected(
            format!("`istioctl-rs analyze -n {NAMESPACE}`"),
            format!("want {finding:?} naming app=ehco; stdout:\n{stdout}\nstderr:\n{stderr}"),
        ));
    }
    evidence.push(format!("analyze -n {NAMESPACE} (live): IST0127 for {TYPO}"));
    Ok(evidence.join("; "))
}

/// A policy whose selector has a typo (`app: ehco`).
const TYPO: &str = "typo-selector";
