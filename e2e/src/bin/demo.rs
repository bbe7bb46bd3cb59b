//! `demo`: the mesh on a local two-node cluster, every L4 path driven and
//! checked (see `e2e::demo`). `cargo xtask demo` runs it. Exits 1 when a
//! check fails.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = e2e::demo::DemoArgs::parse();
    // Without root, run again inside a user namespace with mapped root.
    if let Some(status) = e2e::privilege::enter_for_binary()? {
        std::process::exit(status.code().unwrap_or(1));
    }
    let all_passed = e2e::demo::run(&args)?;
    std::process::exit(if all_passed { 0 } else { 1 });
}
