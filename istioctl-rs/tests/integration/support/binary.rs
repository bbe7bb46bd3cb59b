//! Running the istioctl-rs binary from a test: no kubeconfig (not even the
//! user's ~/.kube/config), no stdin.

use std::process::{Command, Output, Stdio};

pub fn istioctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_istioctl-rs"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code and that stderr holds each of `needles`.
pub fn failed(out: &Output, code: i32, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
}
