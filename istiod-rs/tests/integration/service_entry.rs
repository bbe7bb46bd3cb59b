//! ServiceEntries as upstream's ambient index serves them, end to end
//! through the translation: `resolution: NONE` is a passthrough service,
//! `exportTo` (and a Service's `networking.istio.io/exportTo`) is checked,
//! reported and not applied; a bad value names the object and field and
//! leaves everything else served.

use istiod_rs::index::{self, MeshConfig, PolicyProblem, json::snapshot_json};
use istiod_rs::state::ClusterState;
use serde_json::{Value, json};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy-db, namespace: shop}
spec:
  hosts: [db.legacy.internal]
  addresses: [192.168.10.5]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  exportTo: ["Not A Namespace", "*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: shop}
spec:
  hosts: [api.partner.example]
  addresses: [10.77.0.1]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.7}]
  exportTo: ["."]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {networking.istio.io/exportTo: "billing, billing"}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
"#;

fn translate(yaml: &str) -> (Value, Vec<PolicyProblem>) {
    let state = ClusterState::from_objects(api::manifest::parse(yaml).unwrap().objects);
    let t = index::translate(&state, &MeshConfig::default());
    (snapshot_json(&t.snapshot), t.problems)
}

#[test]
fn resolution_none_is_served_as_a_passthrough_service_with_its_addresses() {
    let (json, _) = translate(CLUSTER);
    let db = &json["services"]["shop/db.legacy.internal"];
    assert_eq!(db["addresses"], json!([{"address": "192.168.10.5"}]));
    assert_eq!(
        db["loadBalancing"],
        json!({"mode": "PASSTHROUGH", "healthPolicy": "ALLOW_ALL"})
    );
    // STATIC keeps endpoint load balancing.
    assert_eq!(
        json["services"]["shop/api.partner.example"]["loadBalancing"],
        Value::Null
    );
}

#[test]
fn export_to_is_reported_by_object_and_field_and_never_changes_what_is_served() {
    let (json, problems) = translate(CLUSTER);
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{}|{}|{}", p.reason(), p.field().unwrap_or_default(), p))
        .collect();
    let about =
        |object: &str| -> Vec<&String> { lines.iter().filter(|l| l.contains(object)).collect() };
    // Bad entries: an invalid namespace, and "*" with another entry.
    let db = about("ServiceEntry shop/legacy-db");
    assert_eq!(db.len(), 2, "{lines:#?}");
    assert!(db[0].starts_with("invalid_value|spec.exportTo|"), "{db:?}");
    assert!(db[0].contains("\"Not A Namespace\" is not"), "{db:?}");
    assert!(db[1].contains("alone"), "{db:?}");
    // A valid restriction: said not to apply.
    let partner = about("ServiceEntry shop/partner");
    assert_eq!(partner.len(), 1, "{lines:#?}");
    assert!(
        partner[0].starts_with("not_honoured|spec.exportTo|"),
        "{partner:?}"
    );
    assert!(partner[0].contains("every namespace"), "{partner:?}");
    // The Service annotation: the same namespace twice.
    let web = about("Service shop/web");
    assert_eq!(web.len(), 1, "{lines:#?}");
    assert!(
        web[0].starts_with("invalid_value|metadata.annotations[networking.istio.io/exportTo]|"),
        "{web:?}"
    );
    assert!(problems.iter().all(|p| !p.rejected()));
    // All three are still served, to everyone.
    for key in [
        "shop/db.legacy.internal",
        "shop/api.partner.example",
        "shop/web.shop.svc.cluster.local",
    ] {
        assert!(json["services"][key].is_object(), "{key} is not served");
    }
    assert!(
        json["workloads"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.ends_with("/networking.istio.io/ServiceEntry/shop/partner/203.0.113.7"))
    );
}
