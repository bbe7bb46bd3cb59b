//! `container-init --spec FILE`: started by the node runtime inside a pod's
//! network namespace, it builds the container's filesystem view (a private
//! mount namespace: the host's files, the pod's volumes and the image's
//! files bind-mounted where the container expects them) and execs the
//! container's program, which keeps this process's pid. See
//! `e2e::kube::node::launch`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = match args.as_slice() {
        [flag, path] if flag == "--spec" => PathBuf::from(path),
        _ => {
            eprintln!("usage: container-init --spec FILE");
            return ExitCode::from(2);
        }
    };
    let result = e2e::kube::node::launch::Launch::read(&spec)
        .and_then(|launch| e2e::kube::node::launch::launch(&launch));
    match result {
        Ok(never) => match never {},
        Err(e) => {
            // Exit 127/126-like codes as a shell does for a program it cannot run.
            eprintln!("container-init: {e}");
            ExitCode::from(127)
        }
    }
}
