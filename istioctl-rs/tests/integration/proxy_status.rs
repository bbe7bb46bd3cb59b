//! `proxy-status` as a user runs it: the binary against a saved syncz, an
//! HTTP server on loopback answering `/debug/syncz` as istiod-rs's
//! monitoring port does, one that answers something else, and none.

use crate::support::binary;

use std::io::{Read, Write};
use std::net::TcpListener;

use binary::{failed, istioctl, text};

const SYNCZ: &str = "tests/testdata/syncz.json";

/// Answers one request with `status` and `body`; the request path it got.
fn serve_once(status: &str, body: String) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let status = status.to_string();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            request.extend_from_slice(&buf[..n]);
        }
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
        let request = String::from_utf8_lossy(&request).into_owned();
        request
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    });
    (url, handle)
}

#[test]
fn a_saved_syncz_gives_one_row_per_proxy() {
    let out = istioctl(&["proxy-status", "-f", SYNCZ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].ends_with("IN SYNC"),
        "{stdout}"
    );
    assert_eq!(lines.len(), 4, "{stdout}");
    let out = istioctl(&["ps", "-f", SYNCZ, "-n", "bookinfo", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["proxies"].as_array().unwrap().len(), 1);
    assert_eq!(json["proxies"][0]["name"], "waypoint-7d9f.bookinfo");
}

#[test]
fn istiods_monitoring_port_is_read_at_debug_syncz() {
    let body = std::fs::read_to_string(SYNCZ).unwrap();
    let (url, server) = serve_once("200 OK", body);
    let out = istioctl(&["proxy-status", "ztunnel-b", "--istiod", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.join().unwrap(), "/debug/syncz");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("NACK WADS nonce n8"), "{stdout}");
}

#[test]
fn failures_name_the_url_the_field_and_what_to_do() {
    // No istiod given and no cluster: what to give instead.
    failed(
        &istioctl(&["proxy-status"]),
        1,
        &[
            "without a Kubernetes cluster",
            "--istiod http://127.0.0.1:15014",
        ],
    );
    // Nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    failed(
        &istioctl(&["proxy-status", "--istiod", &url]),
        1,
        &[&format!("cannot reach istiod-rs at {url}"), "15014"],
    );
    // istiod-rs refusing (its debug endpoints' authorization).
    let (url, server) = serve_once(
        "403 Forbidden",
        r#"{"error":"namespace default may not read /debug"}"#.into(),
    );
    failed(
        &istioctl(&["proxy-status", "--istiod", &url]),
        1,
        &[
            "403 Forbidden",
            "may not read /debug",
            &format!("{url}/debug/syncz"),
        ],
    );
    server.join().unwrap();
    // Something else on that port.
    let (url, server) = serve_once("200 OK", r#"{"ready": true}"#.into());
    failed(
        &istioctl(&["proxy-status", "--istiod", &url]),
        1,
        &[&format!("{url}/debug/syncz"), "snapshot_version"],
    );
    server.join().unwrap();
    failed(
        &istioctl(&["ps", "--istiod", "127.0.0.1:15014"]),
        2,
        &["expected http://HOST:PORT"],
    );
}
