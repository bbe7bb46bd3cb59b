//! `cargo xtask k8s <command>` runs this: the real Kubernetes control-plane
//! binaries (see `e2e::kube::build`).
//!
//! - `build`: builds them into the cache unless it is complete; prints how
//!   long each binary took.
//! - `path`: prints the directory holding them (fails if not built).

use std::process::ExitCode;

use e2e::kube::build::{self, Cache};

const USAGE: &str = "usage: k8s build | path";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["build"] => build_all(),
        ["path"] => Cache::default_recipe()
            .and_then(|c| c.binaries())
            .map(|b| println!("{}", b.dir.display()))
            .map_err(|e| e.to_string()),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("k8s: {e}");
            ExitCode::FAILURE
        }
    }
}

fn build_all() -> Result<(), String> {
    let cache = Cache::default_recipe().map_err(|e| e.to_string())?;
    let (binaries, report) = cache
        .build(&|step| eprintln!("k8s: {step}"))
        .map_err(|e| e.to_string())?;
    if report.reused {
        eprintln!(
            "k8s: Kubernetes {} already built in {} (nothing to do)",
            cache.recipe.kubernetes,
            binaries.dir.display()
        );
        return Ok(());
    }
    eprintln!("k8s: build times:");
    eprintln!(
        "  {:<24}{}",
        "resolving modules",
        build::human(report.resolve.as_secs_f64())
    );
    for (name, took) in &report.built {
        eprintln!("  {name:<24}{}", build::human(took.as_secs_f64()));
    }
    eprintln!(
        "  {:<24}{}",
        "total",
        build::human(report.total.as_secs_f64())
    );
    eprintln!("k8s: binaries in {}", binaries.dir.display());
    Ok(())
}
