//! `cargo xtask soak [--minutes N] [--pods P]`: the churn soak of
//! `e2e/tests/soak.rs` for as long as asked (default 60 minutes) on the
//! local cluster, printing its table (the `soak` binary of the `e2e`
//! crate; see `e2e::scenarios::soak`).

use anyhow::{Result, bail};

pub fn run(args: &[String]) -> Result<()> {
    // The binary checks the values; here only which flags exist, so a
    // typo fails before the build.
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match flag.as_str() {
            "--minutes" | "--pods" => {
                if rest.next().is_none() {
                    bail!("`cargo xtask soak {flag}` needs a value");
                }
            }
            "-h" | "--help" => {}
            other => bail!("`cargo xtask soak` takes --minutes N and --pods P (got {other:?})"),
        }
    }
    eprintln!("soak: building the mesh's binaries (the first time takes a few minutes)");
    crate::demo::run_on_local_cluster("soak", args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_flags_and_missing_values_fail_before_building() {
        let err = run(&["--hours".to_string(), "2".to_string()]).unwrap_err();
        assert!(err.to_string().contains("--hours"), "{err}");
        let err = run(&["--minutes".to_string()]).unwrap_err();
        assert!(err.to_string().contains("needs a value"), "{err}");
    }
}
