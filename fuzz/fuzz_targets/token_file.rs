//! istiod-rs's token file (`--token-file`): the YAML text that maps bearer
//! tokens to callers, read by `auth::token_file::parse`; every token it
//! accepts is then looked up as a request's would be.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match istiod_rs::auth::token_file::parse(Path::new("tokens.yaml"), text, "cluster.local") {
        Ok(table) => {
            for caller in table.values() {
                let _ = caller.identity.to_string();
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
