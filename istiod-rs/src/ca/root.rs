//! Where the CA's signing key and certificate chain come from.
//!
//! - A plug-in CA directory in upstream's `cacerts` layout: the CA signs
//!   with `ca-cert.pem` / `ca-key.pem`; `cert-chain.pem` carries the
//!   intermediates; `root-cert.pem` is the mesh root proxies trust.
//! - Otherwise a self-signed ECDSA P-256 root, created once in a state
//!   directory and kept there, so a restart keeps the same root and every
//!   certificate already issued stays valid.
//!
//! Everything is validated on load, and every error names the file to fix.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;

use super::signature;

/// Plug-in CA: the signing certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// Plug-in CA: the signing key.
pub const CA_KEY: &str = "ca-key.pem";
/// Plug-in CA: the chain from the signing certificate towards the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Plug-in CA: the mesh root(s); also the self-signed root's certificate.
pub const ROOT_CERT: &str = "root-cert.pem";
/// Self-signed root: its key.
pub const ROOT_KEY: &str = "root-key.pem";
/// Serialises root creation between processes sharing a state directory.
const LOCK_FILE: &str = ".root.lock";

/// The self-signed root is backdated this much, so proxies whose clock is
/// slightly behind still accept it.
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("could not read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("could not write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("could not create the self-signed root: {0}")]
    Generate(#[from] rcgen::Error),
}

fn invalid(path: &Path, reason: impl Into<String>) -> RootError {
    RootError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Where the signing material came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSource {
    PlugIn { dir: PathBuf },
    SelfSigned { dir: PathBuf, created: bool },
}

/// What the CA signs with.
#[derive(Debug)]
pub struct SigningMaterial {
    pub key: KeyPair,
    /// The signing certificate first, then each issuer up to and including
    /// the root; no duplicates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Every root proxies should trust (the chain's root first).
    pub roots: Vec<CertificateDer<'static>>,
    pub source: RootSource,
}

/// Loads and validates a plug-in CA directory.
pub fn load_plugin(dir: &Path) -> Result<SigningMaterial, RootError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let chain_path = dir.join(CERT_CHAIN);
    let root_path = dir.join(ROOT_CERT);

    let mut ca_certs = read_certs(&cert_path)?;
    if ca_certs.len() != 1 {
        return Err(invalid(
            &cert_path,
            format!(
                "holds {} certificates; put only the signing CA's certificate here and its issuers in {CERT_CHAIN}",
                ca_certs.len()
            ),
        ));
    }
    let ca_cert = ca_certs.remove(0);
    let key = read_key(&key_path)?;
    check_key_matches(&key_path, &key, &cert_path, &ca_cert)?;
    let roots = read_certs(&root_path)?;
    let listed = match read_certs(&chain_path) {
        Ok(certs) => Some(certs),
        Err(RootError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    // The file whose job it is to lead to the root.
    let towards_root = if listed.is_some() {
        chain_path.as_path()
    } else {
        cert_path.as_path()
    };

    // The chain in the response: signing cert, the rest of cert-chain.pem
    // (which usually repeats the signing cert first), then the root.
    let mut chain = vec![ca_cert];
    let mut origin = vec![cert_path.as_path()];
    for cert in listed.into_iter().flatten() {
        if chain.contains(&cert) {
            continue;
        }
        if roots.contains(chain.last().expect("chain starts non-empty")) {
            return Err(invalid(
                &chain_path,
                format!("continues after the root from {ROOT_CERT}; remove what follows the root"),
            ));
        }
        chain.push(cert);
        origin.push(chain_path.as_path());
    }
    let last = chain.last().expect("chain starts non-empty").clone();
    if !roots.contains(&last) {
        let root = roots
            .iter()
            .find(|root| issued_by(&last, root))
            .ok_or_else(|| {
                invalid(
                    towards_root,
                    format!(
                        "the chain does not end at {ROOT_CERT}: its last certificate ({}) was not issued by any certificate in {}",
                        describe(&last),
                        root_path.display()
                    ),
                )
            })?;
        chain.push(root.clone());
        origin.push(root_path.as_path());
    }
    for (i, pair) in chain.windows(2).enumerate() {
        if !issued_by(&pair[0], &pair[1]) {
            return Err(invalid(
                origin[i + 1],
                format!(
                    "{} was not issued by {}: list the chain in order, each certificate followed by its issuer",
                    describe(&pair[0]),
                    describe(&pair[1])
                ),
            ));
        }
    }
    for (cert, path) in chain.iter().zip(&origin) {
        check_ca_cert(path, cert)?;
    }
    // The chain's own root first: it is what proxies are most likely to need.
    let chain_root = chain.last().expect("chain is non-empty").clone();
    let mut all_roots = vec![chain_root.clone()];
    all_roots.extend(roots.into_iter().filter(|r| *r != chain_root));
    Ok(SigningMaterial {
        key,
        chain,
        roots: all_roots,
        source: RootSource::PlugIn {
            dir: dir.to_path_buf(),
        },
    })
}

/// Loads the self-signed root from `dir`, creating (and persisting) it the
/// first time.
pub fn load_or_create_self_signed(
    dir: &Path,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<SigningMaterial, RootError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RootError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    // Two istiod-rs starting at once on one directory must end up with one root.
    let _lock = lock_dir(dir)?;

    let cert_path = dir.join(ROOT_CERT);
    let key_path = dir.join(ROOT_KEY);
    let created = match (cert_path.exists(), key_path.exists()) {
        (true, true) => false,
        (true, false) => {
            return Err(invalid(
                &key_path,
                format!(
                    "is missing but {ROOT_CERT} exists: restore the key, or remove {} to create a new root (every proxy will then need new certificates)",
                    cert_path.display()
                ),
            ));
        }
        // A key without a certificate is what a crash between the two
        // writes leaves; that root was never used, so start over.
        (false, _) => {
            create_self_signed(&cert_path, &key_path, trust_domain, lifetime)?;
            true
        }
    };
    let key = read_key(&key_path)?;
    warn_if_readable_by_others(&key_path);
    let certs = read_certs(&cert_path)?;
    let [cert] = <[_; 1]>::try_from(certs).map_err(|certs| {
        invalid(
            &cert_path,
            format!(
                "holds {} certificates; the self-signed root is exactly one",
                certs.len()
            ),
        )
    })?;
    check_key_matches(&key_path, &key, &cert_path, &cert)?;
    check_ca_cert(&cert_path, &cert)?;
    Ok(SigningMaterial {
        key,
        chain: vec![cert.clone()],
        roots: vec![cert],
        source: RootSource::SelfSigned {
            dir: dir.to_path_buf(),
            created,
        },
    })
}

/// Holds the state directory's lock file until dropped.
fn lock_dir(dir: &Path) -> Result<fs::File, RootError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| RootError::Write {
            path: lock_path.clone(),
            source,
        })?;
    lock.lock().map_err(|source| RootError::Write {
        path: lock_path,
        source,
    })?;
    Ok(lock)
}

/// When the self-signed root in `dir` has less than `grace_percent` per
/// cent of its lifetime left at `now`, gives it a new certificate for the
/// same key, valid for `lifetime` from now, and returns the material to
/// sign with; `None` when it is not due. As upstream's self-signed root
/// rotator (istio/istio `security/pkg/pki/ca/selfsignedcarootcertrotator.go`,
/// `checkAndRotateRootCertForSigningCertCitadel`: `GetWaitTime` with the
/// grace percentile, then `GenRootCertFromExistingKey`): the name and key
/// stay, so every certificate issued before verifies under the new root
/// and proxies still holding the old one verify what is issued after.
pub fn renew_self_signed_if_due(
    dir: &Path,
    trust_domain: &str,
    lifetime: Duration,
    grace_percent: u8,
    now: std::time::SystemTime,
) -> Result<Option<SigningMaterial>, RootError> {
    let lock = lock_dir(dir)?;
    let cert_path = dir.join(ROOT_CERT);
    let key_path = dir.join(ROOT_KEY);
    let certs = read_certs(&cert_path)?;
    let Some(cert) = certs.first() else {
        return Err(invalid(&cert_path, "holds no certificate"));
    };
    let validity = parse(&cert_path, cert)?.validity().clone();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let (lifetime_secs, left) = (until - from, until - now);
    if lifetime_secs <= 0 || left.saturating_mul(100) > lifetime_secs * i64::from(grace_percent) {
        return Ok(None);
    }
    let key_pem = fs::read_to_string(&key_path).map_err(|source| RootError::Read {
        path: key_path.clone(),
        source,
    })?;
    let renewed =
        proxy_core::identity::root::renewed_root(&key_pem, trust_domain, ROOT_BACKDATE, lifetime)?;
    write_atomically(&cert_path, renewed.as_bytes(), 0o644)?;
    tracing::info!(
        path = %cert_path.display(),
        left_secs = left,
        grace_percent,
        "renewed the self-signed mesh root (same key, new validity)"
    );
    drop(lock);
    load_or_create_self_signed(dir, trust_domain, lifetime).map(Some)
}

fn create_self_signed(
    cert_path: &Path,
    key_path: &Path,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(), RootError> {
    let root = proxy_core::identity::root::self_signed_root(trust_domain, ROOT_BACKDATE, lifetime)?;
    // Key first: a crash in between leaves a key alone, which is recreated.
    write_atomically(key_path, root.key_pem.as_bytes(), 0o600)?;
    write_atomically(cert_path, root.cert_pem.as_bytes(), 0o644)?;
    tracing::info!(
        path = %cert_path.display(),
        trust_domain,
        "created a self-signed mesh root"
    );
    Ok(())
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), RootError> {
    proxy_core::file::write_atomically(path, contents, mode).map_err(|source| RootError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA key is readable by other users; run `chmod 600` on it"
        );
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RootError> {
    let pem = fs::read(path).map_err(|source| RootError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no `BEGIN CERTIFICATE` block"));
    }
    for cert in &certs {
        parse(path, cert)?;
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<KeyPair, RootError> {
    let pem = fs::read_to_string(path).map_err(|source| RootError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // The error never includes key material.
    KeyPair::from_pem(&pem).map_err(|e| {
        invalid(
            path,
            format!(
                "is not a usable private key ({e}); expected an unencrypted PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM key"
            ),
        )
    })
}

fn parse<'a>(path: &Path, cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, RootError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        invalid(
            path,
            format!("holds a certificate that does not parse: {e}"),
        )
    })?;
    if !rest.is_empty() {
        return Err(invalid(path, "a certificate has trailing bytes"));
    }
    Ok(parsed)
}

fn parse_known<'a>(cert: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .expect("certificates are parsed when read")
        .1
}

fn describe(cert: &CertificateDer<'_>) -> String {
    format!(
        "the certificate for {:?}",
        parse_known(cert).subject().to_string()
    )
}

fn issued_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    let (c, i) = (parse_known(cert), parse_known(issuer));
    c.issuer().as_raw() == i.subject().as_raw()
        && signature::verify_signed(cert.as_ref(), i.public_key().raw).is_ok()
}

fn check_key_matches(
    key_path: &Path,
    key: &KeyPair,
    cert_path: &Path,
    cert: &CertificateDer<'_>,
) -> Result<(), RootError> {
    let parsed = parse_known(cert);
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            key_path,
            format!(
                "does not belong to the certificate in {}: put the matching key here",
                cert_path.display()
            ),
        ));
    }
    Ok(())
}

/// The certificate may sign others, now.
fn check_ca_cert(path: &Path, cert: &CertificateDer<'_>) -> Result<(), RootError> {
    let parsed = parse_known(cert);
    let what = describe(cert);
    let is_ca = matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(invalid(
            path,
            format!("{what} is not a CA certificate (basicConstraints CA:TRUE is required)"),
        ));
    }
    if let Ok(Some(ku)) = parsed.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(invalid(
            path,
            format!("{what} may not sign certificates (its keyUsage lacks keyCertSign)"),
        ));
    }
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(invalid(
            path,
            format!(
                "{what} is not valid now: valid from {} to {}",
                validity.not_before, validity.not_after
            ),
        ));
    }
    Ok(())
}
