//! `client`: the sample client run inside pods (see `e2e::apps`). Prints one
//! JSON report; exits 0 when it says `ok`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = e2e::apps::client::ClientArgs::parse();
    // One thread: latencies are not blurred by tasks hopping between threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (report, ok) = runtime.block_on(e2e::apps::client::run(args));
    println!("{report}");
    std::process::exit(if ok { 0 } else { 1 });
}
