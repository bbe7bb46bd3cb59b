//! `bench-l7`: the L7 benchmark on the local cluster (see `e2e::bench::l7`).
//! `cargo xtask bench l7` builds everything in release mode and runs it.

use clap::Parser;
use e2e::bench::{self, l7};

fn main() -> anyhow::Result<()> {
    let args = l7::BenchArgs::parse();
    bench::main(
        "l7",
        args.run.out.clone(),
        |say| l7::run(&args, say),
        l7::table,
        l7::write,
    )
}
