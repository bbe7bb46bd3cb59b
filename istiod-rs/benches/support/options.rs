//! The benchmarks' command line. Included with `#[path]`.

use anyhow::{Context, Result, bail};

/// Reads `--name N` options (each a count of at least 1) from the command
/// line into `slots`. `cargo bench` passes `--bench`; `cargo test
/// --all-targets` runs the binary without it, and then the run is only a
/// smoke check that every path works. Returns whether it is such a run.
pub fn parse_counts(slots: &mut [(&str, &mut usize)]) -> Result<bool> {
    let mut smoke = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--bench" {
            smoke = false;
            continue;
        }
        let Some((_, slot)) = slots.iter_mut().find(|(name, _)| *name == arg) else {
            let known: Vec<String> = slots.iter().map(|(name, _)| format!("{name} N")).collect();
            bail!("unknown option {arg:?}; use {}", known.join(", "));
        };
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        **slot = value
            .parse()
            .with_context(|| format!("{arg} {value:?} is not a number"))?;
        if **slot == 0 {
            bail!("{arg} must be at least 1");
        }
    }
    Ok(smoke)
}
