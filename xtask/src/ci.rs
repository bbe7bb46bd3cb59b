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
    run_cmd(cargo().args(["test", "--workspace", "--all-targets"]))?;
    // Doc tests are not covered by --all-targets.
    run_cmd(cargo().args(["test", "--workspace", "--doc"]))?;
    eprintln!("ci: all checks passed");
    Ok(())
}

/// Fails if any banned crate is in the resolved dependency graph (all
/// targets, all platforms), whether or not cargo-deny is installed.
fn check_banned_crates() -> Result<()> {
    eprintln!("$ cargo metadata (banned crates: {})", BANNED.join(", "));
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()
        .context("could not run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let found = banned_in_metadata(&out.stdout)?;
    if !found.is_empty() {
        bail!(
            "banned crates are linked: {} (see deny.toml; `cargo tree -i <crate>` shows who pulls them in)",
            found.join(", ")
        );
    }
    Ok(())
}

fn banned_in_metadata(json: &[u8]) -> Result<Vec<String>> {
    let meta: serde_json::Value = serde_json::from_slice(json).context("cargo metadata output")?;
    let names: std::collections::HashMap<&str, &str> = meta["packages"]
        .as_array()
        .context("metadata has no packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let mut found: Vec<String> = meta["resolve"]["nodes"]
        .as_array()
        .context("metadata has no resolve graph")?
        .iter()
        .filter_map(|n| names.get(n["id"].as_str()?).copied())
        .filter(|name| BANNED.contains(name))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_banned_crate_in_the_resolve_graph() {
        let json = br#"{
            "packages": [
                {"id": "a 1.0", "name": "rustls"},
                {"id": "b 1.0", "name": "ring"}
            ],
            "resolve": {"nodes": [{"id": "a 1.0"}, {"id": "b 1.0"}]}
        }"#;
        assert_eq!(banned_in_metadata(json).unwrap(), vec!["ring".to_string()]);
    }

    /// The real workspace: ring (a second crypto provider) must not be linked.
    #[test]
    fn workspace_links_no_banned_crate() {
        check_banned_crates().unwrap();
    }
}
