//! `cargo xtask ci`: what must hold before anything lands on main.

use anyhow::{Context, Result, bail};

use crate::{cargo, run as run_cmd};

/// Crates that must never be linked (see deny.toml for the reasons).
const BANNED: &[&str] = &["ring", "openssl-sys", "serde_yaml", "serde_yml", "backoff"];

pub fn run(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("`cargo xtask ci` takes no arguments (got {a:?})");
    }
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    check_banned_crates()?;
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The real Kubernetes control plane the kube end-to-end tests run
    // (built from Go modules once per machine, many minutes; reused after).
    crate::k8s::run(&["build".to_string()])?;
    // Every test binary runs even after one fails: one CI run shows every
    // failure, not only the first binary's in alphabetical order.
    run_cmd(cargo().args(["test", "--workspace", "--all-targets", "--no-fail-fast"]))?;
    // Doc tests are not covered by --all-targets.
    run_cmd(cargo().args(["test", "--workspace", "--doc"]))?;
    say_free_disk("before the Kubernetes end-to-end run");
    // The shared scenarios and the Kubernetes-only ones on the real control plane.
    let e2e = crate::e2e::run(&[]);
    say_free_disk("after it");
    e2e?;
    eprintln!("ci: all checks passed");
    Ok(())
}

/// Prints the free space of the work tree's file system (a full disk once
/// failed a CI run): what `df` says, or nothing when it cannot run.
fn say_free_disk(when: &str) {
    if let Ok(out) = std::process::Command::new("df")
        .args(["-h", "--output=avail,size,target", "."])
        .output()
        && out.status.success()
    {
        eprintln!(
            "ci: disk {when}:\n{}",
            String::from_utf8_lossy(&out.stdout).trim_end()
        );
    }
}

/// Fails if any banned crate is compiled into anything in the workspace:
/// all features, all targets, normal + build + dev dependencies. This is
/// `cargo tree`'s view (what is really activated); `cargo metadata`'s resolve
/// also lists optional dependencies no feature turns on (rustls-webpki's
/// `ring`), so it would cry wolf.
fn check_banned_crates() -> Result<()> {
    eprintln!("$ cargo tree (banned crates: {})", BANNED.join(", "));
    let out = cargo()
        .args([
            "tree",
            "--workspace",
            "--all-features",
            "--target",
            "all",
            "--edges",
            "normal,build,dev",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--locked",
        ])
        .output()
        .context("could not run cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let found = banned_in_tree(&String::from_utf8_lossy(&out.stdout));
    if !found.is_empty() {
        bail!(
            "banned crates are linked: {} (see deny.toml; `cargo tree -i <crate>` shows who pulls them in)",
            found.join(", ")
        );
    }
    Ok(())
}

/// Names of banned crates among `cargo tree --prefix none --format {p}` lines
/// (`name vX.Y.Z [(source)] [(*)]`).
fn banned_in_tree(tree: &str) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| BANNED.contains(name))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_banned_crate_in_the_tree() {
        let tree = "rustls v0.23.1\nring v0.17.8\nring v0.17.8 (*)\nringbuf v1.0.0\n";
        assert_eq!(banned_in_tree(tree), vec!["ring".to_string()]);
        assert!(banned_in_tree("rustls v0.23.1\naws-lc-rs v1.0.0\n").is_empty());
    }

    /// The real workspace: ring (a second crypto provider) must not be linked.
    #[test]
    fn workspace_links_no_banned_crate() {
        check_banned_crates().unwrap();
    }
}
