//! `bench-l4`: the L4 benchmark on the local cluster (see `e2e::bench`).
//! `cargo xtask bench l4` builds everything in release mode and runs it.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = e2e::bench::BenchArgs::parse();
    if let Some(status) = e2e::privilege::enter_for_binary()? {
        std::process::exit(status.code().unwrap_or(1));
    }
    let start = std::time::Instant::now();
    let say = |step: &str| eprintln!("[{:>6.1}s] {step}", start.elapsed().as_secs_f64());
    let report = e2e::bench::run(&args, &say)?;
    println!("{}", e2e::bench::table(&report));
    let dir = args.out.clone().unwrap_or_else(|| {
        e2e::binaries::Binaries::default()
            .target_dir
            .join("bench-l4")
    });
    let (json, svg) = e2e::bench::write(&report, &dir)?;
    println!("JSON: {}\nlatency chart: {}", json.display(), svg.display());
    Ok(())
}
