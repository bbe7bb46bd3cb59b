//! The policies the scenarios and the demo apply, as the YAML a user would
//! `kubectl apply`, plus a guard that removes what a scenario applied even
//! when the scenario fails half-way.

use crate::cluster::{Cluster, ClusterError};
use crate::objects::ObjectKey;

/// A `PeerAuthentication` for a whole namespace.
pub fn peer_authentication(namespace: &str, name: &str, mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  mtls:\n    mode: {mode}\n"
    )
}

/// An `AuthorizationPolicy` on the pods labelled `app: <app>` of a
/// namespace; `rules` is the YAML list under `spec.rules`, indented by two.
pub fn authorization(namespace: &str, name: &str, app: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  selector:\n    matchLabels:\n      app: {app}\n  action: {action}\n  rules:\n{rules}"
    )
}

/// `rules` for requests from these principals (`<td>/ns/<ns>/sa/<sa>`, no scheme).
pub fn from_principals(principals: &[&str]) -> String {
    format!(
        "  - from:\n    - source:\n        principals: [{}]\n",
        quoted(principals)
    )
}

/// `rules` for requests from these namespaces.
pub fn from_namespaces(namespaces: &[&str]) -> String {
    format!(
        "  - from:\n    - source:\n        namespaces: [{}]\n",
        quoted(namespaces)
    )
}

/// `rules` for requests to these ports.
pub fn to_ports(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    format!(
        "  - to:\n    - operation:\n        ports: [{}]\n",
        quoted(&ports)
    )
}

/// A SPIFFE id as policies write it (without `spiffe://`).
pub fn policy_principal(spiffe_id: &str) -> &str {
    spiffe_id.strip_prefix("spiffe://").unwrap_or(spiffe_id)
}

fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Objects applied for as long as the guard lives.
pub struct Applied<'a> {
    cluster: &'a dyn Cluster,
    keys: Vec<ObjectKey>,
}

impl<'a> Applied<'a> {
    /// Applies `yaml`; the objects are deleted when the guard drops.
    pub fn new(cluster: &'a dyn Cluster, yaml: &str) -> Result<Applied<'a>, ClusterError> {
        let keys = cluster.apply_yaml(yaml)?;
        Ok(Applied { cluster, keys })
    }

    /// Deletes the objects now, reporting a failure.
    pub fn remove(mut self) -> Result<(), ClusterError> {
        let keys = std::mem::take(&mut self.keys);
        self.cluster.delete(&keys)
    }
}

impl Drop for Applied<'_> {
    fn drop(&mut self) {
        if !self.keys.is_empty()
            && let Err(e) = self.cluster.delete(&self.keys)
        {
            eprintln!("e2e: could not remove {:?}: {e}", self.keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Object;

    #[test]
    fn policies_parse_as_the_objects_they_claim_to_be() {
        let yaml = [
            peer_authentication("demo", "strict", "STRICT"),
            authorization(
                "demo",
                "deny-other",
                "server",
                "DENY",
                &from_principals(&[policy_principal("spiffe://cluster.local/ns/demo/sa/other")]),
            ),
            authorization(
                "demo",
                "by-ns",
                "server",
                "DENY",
                &from_namespaces(&["legacy"]),
            ),
            authorization("demo", "by-port", "server", "DENY", &to_ports(&[9003])),
        ]
        .join("---\n");
        let objects = Object::from_yaml(&yaml).unwrap();
        assert_eq!(objects.len(), 4);
        assert_eq!(objects[0].value()["spec"]["mtls"]["mode"], "STRICT");
        let rules = &objects[1].value()["spec"]["rules"];
        assert_eq!(
            rules[0]["from"][0]["source"]["principals"][0],
            "cluster.local/ns/demo/sa/other"
        );
        assert_eq!(
            objects[2].value()["spec"]["rules"][0]["from"][0]["source"]["namespaces"][0],
            "legacy"
        );
        assert_eq!(
            objects[3].value()["spec"]["rules"][0]["to"][0]["operation"]["ports"][0],
            "9003"
        );
        assert_eq!(
            objects[3].value()["spec"]["selector"]["matchLabels"]["app"],
            "server"
        );
        // They also read as the mesh's own CRD types.
        let _: api::crd::AuthorizationPolicySpec =
            serde_json::from_value(objects[1].value()["spec"].clone()).unwrap();
        let _: api::crd::PeerAuthenticationSpec =
            serde_json::from_value(objects[0].value()["spec"].clone()).unwrap();
    }
}
