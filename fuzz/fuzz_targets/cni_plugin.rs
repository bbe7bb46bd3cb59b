//! `istio-cni-rs`, the CNI plugin: the netconf JSON the container runtime
//! writes on stdin, with the CNI environment. The input's first byte picks
//! CNI_COMMAND, its first line is CNI_ARGS, the rest is stdin; the plugin's
//! whole invocation (`cni_plugin::main_with`) runs on it. The node agent's
//! socket is whatever the netconf names (by default one that does not
//! exist here), so ADD and CHECK end at "unreachable" or earlier.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use ztunnel_rs::node_agent::cni_plugin;

const COMMANDS: &[&str] = &["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "", "add"];

fuzz_target!(|data: &[u8]| {
    let Some((command, rest)) = data.split_first() else {
        return;
    };
    let (args, stdin) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut env = BTreeMap::new();
    env.insert(
        "CNI_COMMAND".to_string(),
        COMMANDS[usize::from(*command) % COMMANDS.len()].to_string(),
    );
    env.insert(
        "CNI_ARGS".to_string(),
        String::from_utf8_lossy(args).into_owned(),
    );
    env.insert(
        "CNI_CONTAINERID".to_string(),
        "0123456789abcdef".to_string(),
    );
    env.insert("CNI_NETNS".to_string(), "/var/run/netns/fuzz".to_string());
    env.insert("CNI_IFNAME".to_string(), "eth0".to_string());
    let mut stdin = stdin;
    let mut stdout = Vec::new();
    let code = cni_plugin::main_with(&env, &mut stdin, &mut stdout);
    // Whatever happened, the runtime gets one JSON answer (or nothing on
    // success without a result), as the CNI spec requires.
    if !stdout.is_empty() {
        let answer: serde_json::Value =
            serde_json::from_slice(&stdout).expect("the plugin prints JSON");
        if code != 0 {
            assert!(
                answer.get("code").is_some(),
                "an error without a code: {answer}"
            );
        }
    }
});
