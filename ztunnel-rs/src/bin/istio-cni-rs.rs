//! istio-cni-rs: the CNI plugin that hands new pod sandboxes to the node
//! agent. All logic lives in `ztunnel_rs::node_agent::cni_plugin`.

fn main() {
    let env = std::env::vars().collect();
    let code = ztunnel_rs::node_agent::cni_plugin::main_with(
        &env,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    );
    std::process::exit(code);
}
