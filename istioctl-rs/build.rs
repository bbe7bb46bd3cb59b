//! Embeds the install manifests (manifests/crds/, manifests/crds/gateway-api/
//! and manifests/install/) so that the binary installs exactly the manifests
//! of its own version. Every `*.yaml` of those directories is embedded, in
//! name order: a CRD added there is installed without touching this crate.

use std::fmt::Write;
use std::path::Path;

fn main() {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut out = String::new();
    for (name, dir) in [
        ("CRD_FILES", "crds"),
        ("GATEWAY_API_FILES", "crds/gateway-api"),
        ("INSTALL_FILES", "install"),
    ] {
        let dir = manifests.join(dir);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        writeln!(out, "/// `{}`, by file name.", dir.display()).unwrap();
        writeln!(out, "pub const {name}: &[(&str, &str)] = &[").unwrap();
        for path in files {
            let file = path.file_name().unwrap().to_string_lossy();
            let path = path.canonicalize().expect("an existing file");
            writeln!(
                out,
                "    ({file:?}, include_str!({:?})),",
                path.display().to_string()
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let target = Path::new(&std::env::var("OUT_DIR").unwrap()).join("manifests.rs");
    std::fs::write(target, out).unwrap();
}
