//! A scripted stand-in for the Kubernetes API server behind a kube client
//! (tower-test's mock service): every request is recorded exactly (method,
//! path, query, content type, JSON body) and answered by the test's
//! function, so tests assert the precise calls istioctl-rs makes. Each test
//! binary uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock;

/// One request, as the API server saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    /// `PATCH /apis/...`: method and path, for sequence assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A client whose requests go to `respond`; the handle yields what was
/// recorded once every clone of the client is dropped.
pub fn client(
    respond: impl FnMut(&Recorded) -> (u16, Value) + Send + 'static,
) -> (kube::Client, JoinHandle<Vec<Recorded>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    (client, tokio::spawn(serve(handle, respond)))
}

async fn serve(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    mut respond: impl FnMut(&Recorded) -> (u16, Value),
) -> Vec<Recorded> {
    let mut recorded = Vec::new();
    while let Some((request, reply)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let query = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), decode(v))
            })
            .collect();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = body.collect_bytes().await.unwrap();
        let request = Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query,
            content_type,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        let (status, body) = respond(&request);
        recorded.push(request);
        reply.send_response(
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
    recorded
}

/// `%3D` and friends, as selectors are sent.
fn decode(text: &str) -> String {
    text.replace("%3D", "=")
        .replace("%2C", ",")
        .replace("%2F", "/")
}

/// The API server's error body.
pub fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

pub fn not_found() -> (u16, Value) {
    status(404, "NotFound", "not found")
}

/// An empty list of a kind.
pub fn list(items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

/// `/version` of Kubernetes `1.<minor>`.
pub fn version(minor: u32) -> (u16, Value) {
    (
        200,
        json!({"major": "1", "minor": minor.to_string(), "gitVersion": format!("v1.{minor}.3"),
               "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
               "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
    )
}

/// The path of an object of the kind `plural` (`deployments.apps`).
pub fn path(group_version: &str, plural: &str, namespace: Option<&str>, name: &str) -> String {
    let base = if group_version.contains('/') {
        format!("/apis/{group_version}")
    } else {
        format!("/api/{group_version}")
    };
    match namespace {
        Some(ns) => format!("{base}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{base}/{plural}/{name}"),
    }
}
