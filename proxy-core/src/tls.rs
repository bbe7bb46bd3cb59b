//! The one place TLS policy is decided.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider every TLS config in the mesh is built with: aws-lc-rs.
///
/// Using one provider everywhere (and never linking `ring`) means rustls never
/// has to guess a process default, which is what makes kube's client panic at
/// start-up when two providers are compiled in.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for libraries (kube) that
/// build their own rustls configs. Safe to call more than once.
pub fn install_default_provider() {
    // Err means a default is already installed; ours is the only one linked.
    let _ = CryptoProvider::install_default(provider().as_ref().clone());
}
