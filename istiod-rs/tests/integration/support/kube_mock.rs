//! A mock Kubernetes API server (tower-test) as the kube-rs client sees it:
//! take each request the code under test makes, look at it, answer it.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock;

pub type Handle = mock::Handle<Request<Body>, Response<Body>>;
pub type Respond = mock::SendResponse<Response<Body>>;

/// A client speaking to the mock, and the mock's end.
pub fn pair() -> (kube::Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// One request: method, path, query, content type, JSON body (`Null` when
/// there is none or it is not JSON).
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
}

/// Takes the next request (it must come within 10 s).
pub async fn next(handle: &mut Handle) -> (Seen, Respond) {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request")
        .expect("mock open");
    let (parts, body) = request.into_parts();
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = body.collect_bytes().await.unwrap();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        content_type,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    (seen, respond)
}

/// A JSON answer with status `code`.
pub fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}
