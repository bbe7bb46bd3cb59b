//! `ztunnel-rs cni` runs the node agent binary installed next to the proxy's.

use std::process::Command;

#[test]
fn cni_subcommand_runs_the_node_agent_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .args(["cni", "--help"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("Usage: ztunnel-rs cni") && stdout.contains("--node-name"),
        "the node agent's own help: {stdout}"
    );
}

#[test]
fn the_node_agent_rejects_unknown_flags_through_ztunnel_rs_cni() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-rs"))
        .args(["cni", "--node-name", "n", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}
