//! Sample workloads of the kube tests and reading their state: the echo
//! app as a Deployment behind a Service, a client pod to exec into, a pod
//! condition.

use serde_json::{Value, json};

/// Namespace `demo` (not in the mesh): ServiceAccounts `echo` and
/// `client`, the echo Deployment (2 replicas, one per node, HTTP readiness
/// probe; HTTP on 8080, TCP echo on 9000, a hello line on 9001) and its
/// Service `echo` (port 80 -> 8080, 9000, 9001).
pub const ECHO_APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      serviceAccountName: echo
      terminationGracePeriodSeconds: 5
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - labelSelector: {matchLabels: {app: echo}}
              topologyKey: kubernetes.io/hostname
      containers:
        - name: echo
          image: istio-rs/echo:dev
          args: ["--http", "8080", "--tcp", "9000", "--tcp-hello", "9001"]
          ports:
            - {name: http, containerPort: 8080}
            - {name: tcp, containerPort: 9000}
            - {name: hello, containerPort: 9001}
          env:
            - name: POD_NAME
              valueFrom: {fieldRef: {fieldPath: metadata.name}}
            - name: POD_NAMESPACE
              valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
          readinessProbe:
            httpGet: {path: /ready, port: http}
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: tcp, port: 9000, targetPort: tcp}
    - {name: hello, port: 9001, targetPort: hello}
"#;

/// A pod of namespace `demo` on `node` to exec into: the client image, idling.
pub fn client_pod(name: &str, node: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "client",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "client", "image": "istio-rs/client:dev", "command": ["sleep", "3600"]}],
        },
    })
    .to_string()
}

/// The status (`True`, `False`, `Unknown`) of condition `kind` of an object.
pub fn condition(obj: &Value, kind: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str())
        .map(str::to_string)
}
