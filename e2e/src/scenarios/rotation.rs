//! Rotating the mesh root of a plug-in CA while 1,000 requests a second
//! flow across nodes and new connections open without pause: istiod-rs
//! reloads its `cacerts` directory, the proxies take the new trust bundle
//! from their next certificate, and nothing may fail.
//!
//! The steps are the ones the README gives operators, each written the way
//! Kubernetes updates a mounted Secret (a new `..data` directory swapped in
//! by one rename):
//! 0. `root-cert.pem` = A + B, still signing with intermediate A: every
//!    proxy's next certificate carries both roots.
//! 1. intermediate B signs, `root-cert.pem` still A + B: every certificate
//!    is renewed under B; until the last one is, A-signed and B-signed
//!    proxies talk to each other, each trusting both roots.
//! 2. `root-cert.pem` = B: the next certificates trust B only.
//!
//! After each step the scenario waits until every certificate every node's
//! ztunnel-rs holds (its `/certs`) shows the step done. A cluster of its own
//! (`e2e/tests/rotation.rs`): the certificates live seconds, and istiod-rs
//! runs on the plug-in CA this module writes ([`PlugInCa`]).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Scenario;
use super::fixture::L4Fixture;
use super::l4::failed;
use super::lifecycle::across;
use crate::cluster::Cluster;
use crate::probe::{self, ProbeError, eventually};

/// How long each step may take: at most one renewal (half a certificate
/// lifetime) after istiod-rs's next look at its directory.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Traffic runs this long; the three steps fit well inside it.
const TRAFFIC: Duration = Duration::from_secs(150);

pub fn all() -> Vec<Scenario> {
    vec![Scenario {
        name: "plug_in_root_rotation_loses_no_request",
        run: root_rotation,
    }]
}

/// A root and an intermediate CA it signed: one plug-in CA.
pub struct PlugInCa {
    root: rcgen::Certificate,
    intermediate: rcgen::Certificate,
    intermediate_key: rcgen::KeyPair,
    /// Serial numbers as the proxies' `/certs` prints them.
    root_serial: String,
    intermediate_serial: String,
}

/// A random positive serial and how `/certs` prints it (hex bytes joined
/// by `:`).
fn serial() -> (rcgen::SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    let text = bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    (rcgen::SerialNumber::from_slice(&bytes), text)
}

fn ca_params(name: &str) -> (rcgen::CertificateParams, String) {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let (number, text) = serial();
    params.serial_number = Some(number);
    (params, text)
}

impl PlugInCa {
    /// A new root `name` and an intermediate under it.
    pub fn new(name: &str) -> Result<PlugInCa, rcgen::Error> {
        let root_key = rcgen::KeyPair::generate()?;
        let (root_params, root_serial) = ca_params(&format!("{name} root"));
        let root = root_params.self_signed(&root_key)?;
        let issuer = rcgen::Issuer::from_params(&root_params, &root_key);
        let intermediate_key = rcgen::KeyPair::generate()?;
        let (params, intermediate_serial) = ca_params(&format!("{name} intermediate"));
        let intermediate = params.signed_by(&intermediate_key, &issuer)?;
        Ok(PlugInCa {
            root,
            intermediate,
            intermediate_key,
            root_serial,
            intermediate_serial,
        })
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// Writes `dir` as a `cacerts` Secret mount: this CA's intermediate
    /// signs, `root-cert.pem` holds `roots`.
    pub fn write_cacerts(&self, dir: &Path, roots: &str) -> std::io::Result<()> {
        swap_in(
            dir,
            &[
                (CA_CERT, self.intermediate.pem()),
                (CA_KEY, self.intermediate_key.serialize_pem()),
                (
                    CERT_CHAIN,
                    format!("{}{}", self.intermediate.pem(), self.root.pem()),
                ),
                (ROOT_CERT, roots.to_string()),
            ],
        )
    }
}

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
const ROOT_CERT: &str = "root-cert.pem";

/// The signing files of `dir` as they are, `root-cert.pem` replaced.
fn replace_roots(dir: &Path, roots: &str) -> std::io::Result<()> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    swap_in(
        dir,
        &[
            (CA_CERT, read(CA_CERT)?),
            (CA_KEY, read(CA_KEY)?),
            (CERT_CHAIN, read(CERT_CHAIN)?),
            (ROOT_CERT, roots.to_string()),
        ],
    )
}

/// Replaces the files of `dir` at once, as kubelet updates a Secret
/// volume: into a new directory, then one rename of the `..data` link
/// every file points through.
fn swap_in(dir: &Path, files: &[(&str, String)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let version = format!("..{nanos}");
    std::fs::create_dir(dir.join(&version))?;
    for (name, contents) in files {
        std::fs::write(dir.join(&version).join(name), contents)?;
    }
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&version, &staged)?;
    std::fs::rename(&staged, dir.join("..data"))?;
    for (name, _) in files {
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link)?;
        }
    }
    Ok(())
}

/// Waits until every certificate on every node satisfies `done`; returns
/// how many there were, and whether a moment was seen where some were
/// signed by `b` and others not yet.
fn until_every_certificate(
    cluster: &dyn Cluster,
    what: &str,
    b: &PlugInCa,
    done: impl Fn(&probe::CertificateSummary) -> bool,
) -> Result<(usize, bool), ProbeError> {
    let mut mixed = false;
    let count = eventually(what, STEP_TIMEOUT, || {
        let mut all = Vec::new();
        for node in cluster.nodes() {
            all.extend(probe::certificates(cluster, &node)?);
        }
        let under_b = all
            .iter()
            .filter(|c| c.intermediates.contains(&b.intermediate_serial))
            .count();
        mixed |= under_b > 0 && under_b < all.len();
        let pending: Vec<String> = all
            .iter()
            .filter(|c| !done(c))
            .map(|c| c.identity.clone())
            .collect();
        Ok(if pending.is_empty() && !all.is_empty() {
            Ok(all.len())
        } else {
            Err(format!(
                "{} of {} not yet: {pending:?}",
                pending.len(),
                all.len()
            ))
        })
    })?;
    Ok((count, mixed))
}

fn io_failed(what: &str, e: std::io::Error) -> ProbeError {
    failed(what, e.to_string())
}

/// The three steps of a root rotation under steady traffic.
fn root_rotation(cluster: &dyn Cluster, f: &L4Fixture) -> Result<String, ProbeError> {
    let dir = cluster.cacerts_directory().ok_or_else(|| {
        failed(
            "the root rotation",
            "istiod-rs does not run on a plug-in CA here",
        )
    })?;
    let b = PlugInCa::new("rotation B").map_err(|e| failed("creating CA B", e.to_string()))?;
    let a_root = std::fs::read_to_string(dir.join(ROOT_CERT))
        .map_err(|e| io_failed("reading root-cert.pem", e))?;
    let both = format!("{a_root}{}", b.root_pem());
    let mut steps = Vec::new();
    let (mixed, traffic) = across(cluster, f, TRAFFIC, || {
        let start = Instant::now();
        // 0: the new root joins the trust bundle; A still signs.
        replace_roots(&dir, &both).map_err(|e| io_failed("writing cacerts (roots A+B)", e))?;
        let (count, _) = until_every_certificate(
            cluster,
            "every certificate to carry roots A and B",
            &b,
            |c| c.roots.len() == 2 && c.roots.contains(&b.root_serial),
        )?;
        steps.push(format!(
            "bundle A+B on {count} certificates after {:.1}s",
            start.elapsed().as_secs_f64()
        ));
        // 1: B signs.
        let start = Instant::now();
        b.write_cacerts(&dir, &both)
            .map_err(|e| io_failed("writing cacerts (intermediate B)", e))?;
        let (count, mixed) = until_every_certificate(
            cluster,
            "every certificate to be signed by intermediate B",
            &b,
            |c| c.intermediates.contains(&b.intermediate_serial) && c.roots.len() == 2,
        )?;
        steps.push(format!(
            "{count} certificates under B after {:.1}s",
            start.elapsed().as_secs_f64()
        ));
        // 2: A leaves the trust bundle.
        let start = Instant::now();
        b.write_cacerts(&dir, &b.root_pem())
            .map_err(|e| io_failed("writing cacerts (root B only)", e))?;
        let (count, _) =
            until_every_certificate(cluster, "every certificate to trust root B only", &b, |c| {
                c.roots == [b.root_serial.clone()]
            })?;
        steps.push(format!(
            "bundle B only on {count} certificates after {:.1}s",
            start.elapsed().as_secs_f64()
        ));
        Ok(mixed)
    })?;
    traffic.lost_nothing("across the root rotation")?;
    if !mixed {
        return Err(failed(
            "the switch to intermediate B",
            "no moment with A-signed and B-signed proxies side by side was seen; the overlap was not exercised",
        ));
    }
    Ok(format!(
        "{}; A- and B-signed proxies side by side: seen; {}",
        steps.join(", "),
        traffic.describe()
    ))
}
