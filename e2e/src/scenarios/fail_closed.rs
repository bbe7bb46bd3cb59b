//! Fail-closed scenarios (issue 9): a policy istiod-rs cannot enforce as
//! written makes the mesh refuse more, never less. Each drives real traffic
//! through [`denial`], whose evidence is ztunnel-rs's policy-denial counter
//! on the refusing node, and checks that the refusal ends with the policy.
//! On Kubernetes, a policy that cannot be read never reaches the mesh:
//! istiod-rs's validating webhook refuses it at the API server, and the
//! scenario checks that refusal and unchanged traffic instead.

use super::fixture::{AMBIENT_NS, ECHO_HELLO, L4Fixture};
use super::l4::{carried, denial, failed, pod_name, policy_denials};
use super::policies::{authorization, from_principals, policy_principal};
use crate::cluster::{Cluster, ClusterError};
use crate::probe::{ProbeError, describe_exchange};

/// An ALLOW policy whose first rule has a port that is not a number still
/// applies: its other rule admits the listed client and everyone else is
/// refused. (Before, the whole policy was dropped: allow-all.)
pub fn allow_with_a_bad_port(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let client = f.principal(AMBIENT_NS, "client");
    let rules = format!(
        "  - to:\n    - operation:\n        ports: [\"http\"]\n{}",
        from_principals(&[policy_principal(&client)])
    );
    let policy = authorization(AMBIENT_NS, "allow-with-bad-port", "server", "ALLOW", &rules);
    let target = L4Fixture::at(&f.servers[0], ECHO_HELLO);
    let evidence = match denial(
        cluster,
        &policy,
        (&f.other, &target),
        (&f.clients[0], &target),
    ) {
        Err(ProbeError::Cluster(ClusterError::Refused { object, reason })) => {
            refused_at_admission(cluster, f, &target, &object, &reason)?
        }
        other => other?,
    };
    Ok(format!(
        "ALLOW {client} with ports [\"http\"] in another rule: {evidence}"
    ))
}

/// On Kubernetes, istiod-rs's validating webhook refuses the policy at
/// the API server (nothing is stored, so nothing can be enforced less
/// strictly than written). Accepted only if the refusal names the field
/// and its value, and traffic is exactly as without the policy: both
/// clients carried, no policy denial counted.
fn refused_at_admission(
    cluster: &dyn Cluster,
    f: &L4Fixture,
    target: &str,
    object: &str,
    reason: &str,
) -> Result<String, ProbeError> {
    if !(reason.contains("rules[0].to[0].operation.ports[0]") && reason.contains("\"http\"")) {
        return Err(failed(
            &format!("the refusal of {object}"),
            format!("does not name the bad port (rules[0]...ports[0] = \"http\"): {reason}"),
        ));
    }
    let node = f.servers[0].node.clone();
    let before = policy_denials(cluster, &node)?;
    let other = carried(cluster, &f.other, &f.servers[0], ECHO_HELLO)?;
    carried(cluster, &f.clients[0], &f.servers[0], ECHO_HELLO)?;
    let after = policy_denials(cluster, &node)?;
    if after > before {
        return Err(failed(
            &format!("the ztunnel on {node}"),
            format!(
                "counted {} policy denial(s) for a policy the API server refused",
                after - before
            ),
        ));
    }
    Ok(format!(
        "the API server refused {object} at admission ({reason}); {} -> {target} and {} -> {target} carried as before ({}), no policy denial counted",
        pod_name(&f.other),
        pod_name(&f.clients[0]),
        describe_exchange(&other)
    ))
}

/// An AuthorizationPolicy with `targetRefs` to a Service (an L7 rule no
/// waypoint serves) refuses every connection to that Service's pods until
/// it is removed, and only to them. (Before, it was silently skipped.) The
/// Service has no selector and one EndpointSlice, so it fronts server-0
/// alone and server-1 shows that other pods are untouched. The Service opts
/// out of waypoints (`istio.io/use-waypoint: none`), so istiod-rs creates
/// none on demand for it: the rule stays unserved.
pub fn l7_policy_on_a_service(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let [zero, one] = &f.servers;
    let objects = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: server-zero, namespace: {AMBIENT_NS}, labels: {{istio.io/use-waypoint: none}}}}
spec:
  ports: [{{name: hello, port: {ECHO_HELLO}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: server-zero-1
  namespace: {AMBIENT_NS}
  labels: {{kubernetes.io/service-name: server-zero}}
addressType: IPv4
endpoints:
- addresses: [\"{ip}\"]
  targetRef: {{kind: Pod, name: {name}, namespace: {AMBIENT_NS}}}
ports: [{{name: hello, port: {ECHO_HELLO}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-zero-get-only, namespace: {AMBIENT_NS}}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: server-zero}}]
  rules:
  - to:
    - operation: {{methods: [GET]}}
",
        ip = zero.ip,
        name = zero.name,
    );
    let evidence = denial(
        cluster,
        &objects,
        (&f.clients[0], &L4Fixture::at(zero, ECHO_HELLO)),
        (&f.clients[0], &L4Fixture::at(one, ECHO_HELLO)),
    )?;
    Ok(format!(
        "targetRefs Service server-zero (server-0 only): {evidence}"
    ))
}
