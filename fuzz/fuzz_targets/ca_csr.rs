//! istiod-rs's CA: the CSR a proxy sends in `CreateCertificate`, checked by
//! `ca::csr::parse` (PEM, PKCS#10, key type and size, self-signature). The
//! first byte picks the input's form: the PEM text as sent, or DER bytes the
//! harness wraps in a PEM block so the fuzzer spends its time inside the
//! DER.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((form, rest)) = data.split_first() else {
        return;
    };
    let pem = if form & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let body = base64::engine::general_purpose::STANDARD.encode(rest);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
    };
    if let Err(error) = istiod_rs::ca::csr::parse(&pem) {
        let _ = error.to_string();
    }
});
