//! `cargo xtask fuzz`: the fuzz targets of `fuzz/` (one per decoder of
//! outside input) through cargo-fuzz, on the repository's pinned stable
//! toolchain.
//!
//! cargo-fuzz passes nightly-only flags (`-Zsanitizer`, the sanitizer
//! coverage passes) to rustc; `RUSTC_BOOTSTRAP=1` lets the pinned stable
//! compiler take them, so no nightly toolchain is needed. AddressSanitizer
//! (cargo-fuzz's default) works there too: the stable toolchain ships its
//! runtime (`librustc-stable_rt.asan.a`). It stays on: the product forbids
//! `unsafe`, but the decoders reach C (aws-lc) and dependencies' unsafe
//! code; `--sanitizer none` roughly doubles the executions per second.
//!
//! `--dev` builds without optimisation (cargo-fuzz's `--dev`): the targets
//! link the whole product, and on a 2-core machine the optimised
//! instrumented build takes over an hour while the dev one takes a fraction
//! of it; each input then runs slower. For a smoke run, not for long ones.
//!
//! The build lives in `fuzz/target` (kept between runs). Runs grow a
//! working corpus under `fuzz/target/corpus/<target>`; the checked-in seeds
//! in `fuzz/corpus/<target>` are only read. A crash leaves its input in
//! `fuzz/artifacts/<target>/` and fails the command, naming that file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{display, root, run as run_cmd};

/// The whole run part of `--smoke`, shared out among the targets.
const SMOKE_RUN: Duration = Duration::from_secs(168);
/// A single input taking longer than this is a hang, reported as a crash.
const INPUT_TIMEOUT_SECS: u64 = 10;

const USAGE: &str = "\
usage: cargo xtask fuzz --smoke [--sanitizer S] [--dev]
       cargo xtask fuzz <target> [--time DURATION] [--sanitizer S] [--dev] [-- <libFuzzer flags>]
       cargo xtask fuzz --list
       cargo xtask fuzz --seeds

  --smoke        build every target and run each on its seeds for a share of 168 s
  <target>       run one target (for DURATION: 90s, 30m, 4h; default until it finds a crash)
  --sanitizer S  address (default) or none
  --dev          unoptimised build: much faster to build, slower to run
  --list         the targets
  --seeds        rewrite the seed corpus (fuzz/corpus/) from the fixtures and encoders
";

struct Options {
    sanitizer: String,
    dev: bool,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut options = Options {
        sanitizer: "address".to_string(),
        dev: false,
    };
    let mut time = None;
    let mut positional = Vec::new();
    let mut libfuzzer = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sanitizer" => {
                options.sanitizer = it.next().context("--sanitizer needs a value")?.clone();
            }
            "--dev" => options.dev = true,
            "--time" => {
                let value = it.next().context("--time needs a value such as 4h")?;
                time = Some(parse_duration(value)?);
            }
            "--" => libfuzzer.extend(it.by_ref().cloned()),
            _ => positional.push(arg.as_str()),
        }
    }
    if !matches!(options.sanitizer.as_str(), "none" | "address") {
        bail!(
            "--sanitizer {:?}: expected none or address",
            options.sanitizer
        );
    }
    match positional.as_slice() {
        ["--list"] => {
            for target in targets()? {
                println!("{target}");
            }
            Ok(())
        }
        ["--seeds"] => seeds(),
        ["--smoke"] => smoke(&options),
        [target] if !target.starts_with('-') => {
            let known = targets()?;
            if !known.iter().any(|t| t == target) {
                bail!(
                    "no fuzz target {target:?}; the targets: {}",
                    known.join(", ")
                );
            }
            ensure_cargo_fuzz()?;
            build(&options, Some(target))?;
            fuzz_one(&options, target, time, &libfuzzer)
        }
        _ => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// The targets: one file each in `fuzz/fuzz_targets/`.
fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `90s`, `30m`, `4h`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .with_context(|| format!("--time {text:?}: expected a number and s, m or h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("--time {text:?}: expected a number and s, m or h"),
    };
    if secs == 0 {
        bail!("--time {text:?}: must be more than zero");
    }
    Ok(Duration::from_secs(secs))
}

/// cargo-fuzz on PATH, installed from crates.io when it is not.
fn ensure_cargo_fuzz() -> Result<()> {
    let found = crate::cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        eprintln!("fuzz: cargo-fuzz is not installed; installing it from crates.io");
        run_cmd(crate::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// `cargo fuzz` with the pinned toolchain allowed its `-Z` flags.
fn cargo_fuzz(subcommand: &str, options: &Options) -> Command {
    let mut cmd = crate::cargo();
    cmd.args(["fuzz", subcommand, "--fuzz-dir"])
        .arg(fuzz_dir())
        .args(["--sanitizer", &options.sanitizer])
        .args(options.dev.then_some("--dev"))
        .env("RUSTC_BOOTSTRAP", "1")
        // The workspace's target dir (if the caller set one) is for the
        // uninstrumented build; the fuzz build keeps its own.
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

fn build(options: &Options, target: Option<&str>) -> Result<()> {
    let mut cmd = cargo_fuzz("build", options);
    cmd.args(target);
    run_cmd(&mut cmd)
}

fn smoke(options: &Options) -> Result<()> {
    ensure_cargo_fuzz()?;
    let started = Instant::now();
    build(options, None)?;
    let built = started.elapsed();
    let targets = targets()?;
    let each = SMOKE_RUN / u32::try_from(targets.len()).unwrap_or(u32::MAX).max(1);
    let mut failed = Vec::new();
    for target in &targets {
        if let Err(error) = fuzz_one(options, target, Some(each), &[]) {
            eprintln!("fuzz: {error:#}");
            failed.push(target.as_str());
        }
    }
    eprintln!(
        "fuzz: build {:.0?}, runs {:.0?} ({} targets, {:.0?} each)",
        built,
        started.elapsed() - built,
        targets.len(),
        each
    );
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    eprintln!("fuzz: {} passed, 0 failed", targets.len());
    Ok(())
}

/// Runs one target on its seeds (read only) and its working corpus;
/// `time: None` runs until a crash or an interrupt.
fn fuzz_one(
    options: &Options,
    target: &str,
    time: Option<Duration>,
    extra: &[String],
) -> Result<()> {
    let dir = fuzz_dir();
    let working = dir.join("target/corpus").join(target);
    let seeds = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&working, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let before = files(&artifacts);
    let mut cmd = cargo_fuzz("run", options);
    cmd.arg(target).arg(&working);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    if let Some(time) = time {
        cmd.arg(format!("-max_total_time={}", time.as_secs().max(1)));
    }
    cmd.args(extra);
    eprintln!("$ {}", display(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", display(&cmd)))?;
    if status.success() {
        return Ok(());
    }
    let found: Vec<PathBuf> = files(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    match found.as_slice() {
        [] => bail!("fuzz target {target} failed ({status}) without leaving a reproducer"),
        found => {
            let paths: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "fuzz target {target} crashed ({status}); reproducer: {} \
                 (replay: cargo fuzz run --fuzz-dir fuzz {target} <file>, with RUSTC_BOOTSTRAP=1)",
                paths.join(", ")
            )
        }
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Rewrites the seed corpus with the fuzz crate's generator: an ordinary
/// debug build in the workspace's target dir, whose dependencies it shares
/// (same lock file versions, same dev profile).
fn seeds() -> Result<()> {
    let dir = fuzz_dir();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let mut cmd = crate::cargo();
    cmd.args(["run", "--example", "seeds", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--")
        .arg(dir.join("corpus"));
    run_cmd(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("4h").unwrap(), Duration::from_secs(14400));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        for bad in ["", "h", "4d", "0s", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_target_has_seeds() {
        let targets = targets().unwrap();
        assert!(targets.len() >= 10, "{targets:?}");
        for target in targets {
            let seeds = fuzz_dir().join("corpus").join(&target);
            assert!(
                !files(&seeds).is_empty(),
                "fuzz/corpus/{target} has no seed; run `cargo xtask fuzz --seeds`"
            );
        }
    }
}
