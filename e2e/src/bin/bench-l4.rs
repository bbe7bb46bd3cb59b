//! `bench-l4`: the L4 benchmark on the local cluster (see `e2e::bench`).
//! `cargo xtask bench l4` builds everything in release mode and runs it.

use clap::Parser;
use e2e::bench;

fn main() -> anyhow::Result<()> {
    let args = bench::BenchArgs::parse();
    bench::main(
        "l4",
        args.run.out.clone(),
        |say| bench::run(&args, say),
        bench::table,
        bench::write,
    )
}
