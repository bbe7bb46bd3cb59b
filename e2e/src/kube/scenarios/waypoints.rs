//! Waypoints on a real API server: `istioctl-rs waypoint` and the
//! waypoints istiod-rs creates on demand (issue 13).
//!
//! 1. `istioctl-rs waypoint apply` creates a Gateway the API server
//!    accepts, `list -o json` shows it as the user's, `delete` removes it.
//! 2. An HTTPRoute on the fixture's Service `echo` (pods of ServiceAccount
//!    `echo`) makes istiod-rs create `echo-waypoint` by server-side apply;
//!    a client's requests to `echo` are refused from the moment the route
//!    is enforced until the waypoint serves it, then answered again (timed
//!    from `kubectl apply`); `list -o json` shows it created on demand and
//!    needed by the route, and Programmed; `delete` refuses it, naming the
//!    route; deleting the route removes it.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::enrolment::{poll, unexpected};
use super::{EXEC_TIMEOUT, KubeFixture, KubeScenario, NAMESPACE, PATIENCE};
use crate::kube::mesh::{KubeMesh, KubeMeshError};

pub fn scenarios() -> Vec<KubeScenario> {
    vec![KubeScenario {
        name: "waypoint_cli_and_waypoints_on_demand",
        run: waypoint_cli_and_on_demand,
    }]
}

/// The on-demand waypoint's name: the fixture's echo pods run as `echo`.
const ON_DEMAND: &str = "echo-waypoint";
/// The route that needs it.
const ROUTE: &str = "echo-route";

/// `istioctl-rs args`: its stdout when it succeeds.
fn istioctl(mesh: &KubeMesh, args: &[&str]) -> Result<String, KubeMeshError> {
    let out = mesh.istioctl(args)?;
    if !out.status.success() {
        return Err(unexpected(
            format!("`istioctl-rs {}`", args.join(" ")),
            format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `istioctl-rs waypoint list -n demo -o json`, each waypoint by name.
fn waypoints(mesh: &KubeMesh) -> Result<Vec<Value>, KubeMeshError> {
    let text = istioctl(mesh, &["waypoint", "list", "-n", NAMESPACE, "-o", "json"])?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        unexpected(
            "`istioctl-rs waypoint list -o json`",
            format!("{e}: {text}"),
        )
    })?;
    Ok(match value {
        Value::Array(items) => items,
        other => other["items"].as_array().cloned().unwrap_or_default(),
    })
}

fn named<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|w| w["name"] == name)
}

fn gateway_exists(mesh: &KubeMesh, name: &str) -> Result<bool, KubeMeshError> {
    Ok(mesh
        .kubectl
        .get("gateways.gateway.networking.k8s.io", Some(NAMESPACE), name)?
        .is_some())
}

fn waypoint_cli_and_on_demand(
    mesh: &KubeMesh,
    fixture: &KubeFixture,
) -> Result<String, KubeMeshError> {
    // 1. The user's waypoint, by the CLI.
    istioctl(
        mesh,
        &[
            "waypoint",
            "apply",
            "-n",
            NAMESPACE,
            "--name",
            "cli-waypoint",
        ],
    )?;
    let list = waypoints(mesh)?;
    let mine = named(&list, "cli-waypoint").ok_or_else(|| {
        unexpected(
            "`waypoint list` after `waypoint apply`",
            format!("{list:?}"),
        )
    })?;
    if mine["onDemand"] != false {
        return Err(unexpected(
            "waypoint cli-waypoint in `waypoint list`",
            format!("shown as created on demand: {mine}"),
        ));
    }
    istioctl(
        mesh,
        &["waypoint", "delete", "-n", NAMESPACE, "cli-waypoint"],
    )?;
    poll("Gateway demo/cli-waypoint to be gone", PATIENCE, |seen| {
        let exists = gateway_exists(mesh, "cli-waypoint")?;
        *seen = format!("exists: {exists}");
        Ok((!exists).then_some(()))
    })?;

    // 2. On demand.
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {ROUTE}, namespace: {NAMESPACE}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]
  rules: [{{backendRefs: [{{name: echo, port: 80}}]}}]
"
    );
    let from = fixture
        .clients
        .first()
        .ok_or_else(|| unexpected("the fixture", "has no client"))?;
    let node = mesh.node(&from.node)?;
    let url = format!("http://{}:80/", fixture.echo_vip);
    let answered = || -> Result<bool, KubeMeshError> {
        Ok(node
            .client_http(NAMESPACE, &from.name, &url, EXEC_TIMEOUT)?
            .ok)
    };
    if !answered()? {
        return Err(unexpected(
            format!("{} -> {url}", from.name),
            "refused before the route was applied",
        ));
    }
    let applied = Instant::now();
    mesh.kubectl.apply(&route)?;
    let needed_by = format!("HTTPRoute {NAMESPACE}/{ROUTE}");
    let traffic = poll(
        &format!(
            "{} -> {url} to be refused once the route is enforced",
            from.name
        ),
        PATIENCE,
        |seen| {
            let ok = answered()?;
            *seen = format!("answered: {ok}");
            Ok((!ok).then(|| applied.elapsed()))
        },
    )
    .and_then(|(enforced, _)| {
        let (flowing, _) = poll(
            &format!("{} -> {url} to be answered through the waypoint", from.name),
            PATIENCE,
            |seen| {
                let ok = answered()?;
                *seen = format!("answered: {ok}");
                Ok(ok.then(|| applied.elapsed()))
            },
        )?;
        Ok((enforced, flowing))
    });
    let result = traffic.and_then(|t| Ok((t, on_demand(mesh, &needed_by, applied)?)));
    // Whatever happened, the route goes and takes its waypoint along.
    let removed = mesh.kubectl.run(&[
        "delete",
        "httproutes.gateway.networking.k8s.io",
        ROUTE,
        "-n",
        NAMESPACE,
        "--ignore-not-found",
    ]);
    removed?;
    // Waited for also when the checks failed: the scenarios after this one
    // (uninstall) expect no waypoint pod in the namespace.
    let gone = poll(
        &format!("Gateway {NAMESPACE}/{ON_DEMAND} and its pods to be removed with the route"),
        PATIENCE,
        |seen| {
            let exists = gateway_exists(mesh, ON_DEMAND)?;
            let pods = mesh.kubectl.json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                &format!("{}={ON_DEMAND}", api::labels::GATEWAY_NAME),
            ])?;
            let pods = pods["items"].as_array().map_or(0, Vec::len);
            *seen = format!("Gateway exists: {exists}, pods: {pods}");
            Ok((!exists && pods == 0).then_some(()))
        },
    );
    let ((enforced, flowing), (programmed, refusal)) = result?;
    let (_, gone) = gone?;
    Ok(format!(
        "`waypoint apply` made Gateway cli-waypoint, `list -o json` showed it as the user's, `delete` removed it; \
         `kubectl apply` of HTTPRoute {NAMESPACE}/{ROUTE}: {} -> Service echo refused (enforced) after {enforced:.1?}, answered through the waypoint after {flowing:.1?}; \
         istiod-rs created {NAMESPACE}/{ON_DEMAND} (listed on demand, needed by {needed_by:?}, Programmed, seen {programmed:.1?} after the apply); \
         `waypoint delete` refused it: {refusal}; removed {gone:.1?} after the route",
        from.name
    ))
}

/// Waits until the on-demand waypoint is listed as such and Programmed;
/// checks `delete` refuses it. Returns how long after `applied` it was
/// seen Programmed, and the refusal's words.
fn on_demand(
    mesh: &KubeMesh,
    needed_by: &str,
    applied: Instant,
) -> Result<(Duration, String), KubeMeshError> {
    poll(
        &format!(
            "waypoint {NAMESPACE}/{ON_DEMAND} to be listed on demand, needed by {needed_by}, and Programmed"
        ),
        PATIENCE,
        |seen| {
            let list = waypoints(mesh)?;
            let Some(w) = named(&list, ON_DEMAND) else {
                *seen = format!("{list:?}");
                return Ok(None);
            };
            *seen = w.to_string();
            let listed = w["onDemand"] == true && w["neededBy"] == serde_json::json!([needed_by]);
            Ok((listed && w["programmed"]["status"] == "True").then_some(()))
        },
    )?;
    let programmed = applied.elapsed();
    let out = mesh.istioctl(&["waypoint", "delete", "-n", NAMESPACE, ON_DEMAND])?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() || !said.contains(needed_by) || !gateway_exists(mesh, ON_DEMAND)? {
        return Err(unexpected(
            format!("`istioctl-rs waypoint delete {ON_DEMAND}`"),
            format!(
                "should refuse, naming {needed_by}, and keep the Gateway: {}: {said}",
                out.status
            ),
        ));
    }
    Ok((programmed, said.trim().to_string()))
}
