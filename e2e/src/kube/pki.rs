//! The control plane's PKI, made fresh for each run (as kubeadm lays it
//! out, smaller): a cluster CA; the API server's serving certificate; the
//! service-account token signing key pair; client certificates, each in a
//! kubeconfig, for the admin (`system:masters`), the controller manager and
//! the scheduler (their built-in RBAC users), and whoever else asks (nodes:
//! `system:node:<name>` in `system:nodes`).
//!
//! Every key is ECDSA P-256; files are PEM, keys mode 0600.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not make {what}: {source}")]
    Cert { what: String, source: rcgen::Error },
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The user the API server's client certificate towards kubelets names
/// (kubeadm's CommonName for it).
pub const APISERVER_KUBELET_CLIENT: &str = "kube-apiserver-kubelet-client";

/// How long every certificate is valid: longer than any test run.
const VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdated so a clock a little behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Where the PKI's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiFiles {
    pub dir: PathBuf,
}

impl PkiFiles {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn apiserver_cert(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn apiserver_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    /// The service-account token signing key (private).
    pub fn service_account_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    /// Its public half, which verifies tokens.
    pub fn service_account_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
    /// The API server's client certificate towards kubelets
    /// (`--kubelet-client-certificate`; kubeadm's file name).
    pub fn apiserver_kubelet_client_cert(&self) -> PathBuf {
        self.dir.join("apiserver-kubelet-client.crt")
    }
    pub fn apiserver_kubelet_client_key(&self) -> PathBuf {
        self.dir.join("apiserver-kubelet-client.key")
    }
}

/// The cluster CA, able to sign more client certificates.
pub struct Pki {
    pub files: PkiFiles,
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("files", &self.files).finish()
    }
}

/// Who a client certificate names: Kubernetes takes the user from the
/// CommonName and the groups from the Organizations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub user: String,
    pub groups: Vec<String>,
}

impl ClientIdentity {
    pub fn new(user: &str, groups: &[&str]) -> Self {
        ClientIdentity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }
}

impl Pki {
    /// Creates the CA, the API server's serving certificate (for
    /// `dns_names` and `ips`) and the service-account key pair in `dir`.
    pub fn create(dir: &Path, dns_names: &[String], ips: &[IpAddr]) -> Result<Pki, PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let files = PkiFiles {
            dir: dir.to_path_buf(),
        };
        let ca_key = new_key("the cluster CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name("kubernetes", &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        valid_now(&mut params);
        let ca_cert = params
            .self_signed(&ca_key)
            .map_err(|source| PkiError::Cert {
                what: "the cluster CA".into(),
                source,
            })?;
        let ca_pem = ca_cert.pem();
        write_file(&files.ca_key(), &ca_key.serialize_pem(), 0o600)?;
        write_file(&files.ca_cert(), &ca_pem, 0o644)?;
        let pki = Pki {
            files,
            ca_pem,
            ca: Issuer::new(params, ca_key),
        };

        // The API server's serving certificate.
        let (cert, key) = pki.serving_cert("kube-apiserver", &[], dns_names, ips)?;
        write_file(&pki.files.apiserver_key(), &key, 0o600)?;
        write_file(&pki.files.apiserver_cert(), &cert, 0o644)?;

        // Its client certificate towards the kubelets' servers.
        let (cert, key) = pki.client_cert(&ClientIdentity::new(APISERVER_KUBELET_CLIENT, &[]))?;
        write_file(&pki.files.apiserver_kubelet_client_key(), &key, 0o600)?;
        write_file(&pki.files.apiserver_kubelet_client_cert(), &cert, 0o644)?;

        // Service-account tokens: signed with the private key, verified with the public one.
        let sa = new_key("the service-account signing key")?;
        write_file(&pki.files.service_account_key(), &sa.serialize_pem(), 0o600)?;
        write_file(
            &pki.files.service_account_pub(),
            &sa.public_key_pem(),
            0o644,
        )?;
        Ok(pki)
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A client certificate and key (PEM) for `who`.
    pub fn client_cert(&self, who: &ClientIdentity) -> Result<(String, String), PkiError> {
        let groups: Vec<&str> = who.groups.iter().map(String::as_str).collect();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&who.user, &groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.sign(params, &format!("a client certificate for {}", who.user))
    }

    /// A serving certificate and key (PEM) for `dns_names` and `ips`, named
    /// `common_name` in `organizations` (a kubelet's: `system:node:<name>`
    /// in `system:nodes`).
    pub fn serving_cert(
        &self,
        common_name: &str,
        organizations: &[&str],
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, organizations);
        params.subject_alt_names = dns_names
            .iter()
            .filter_map(|n| n.clone().try_into().ok().map(SanType::DnsName))
            .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.sign(params, &format!("a serving certificate for {common_name}"))
    }

    /// Writes a kubeconfig at `path` for `who`, talking to `server`.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        server: &str,
        who: &ClientIdentity,
    ) -> Result<(), PkiError> {
        let (cert, key) = self.client_cert(who)?;
        write_file(
            path,
            &kubeconfig(server, &self.ca_pem, &who.user, &cert, &key),
            0o600,
        )
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        what: &str,
    ) -> Result<(String, String), PkiError> {
        valid_now(&mut params);
        let key = new_key(what)?;
        let cert = params
            .signed_by(&key, &self.ca)
            .map_err(|source| PkiError::Cert {
                what: what.into(),
                source,
            })?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A kubeconfig (JSON, which every kubeconfig reader takes as YAML) with one
/// cluster, user and context, each named `user`.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, cert_pem: &str, key_pem: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(cert_pem),
            "client-key-data": b64(key_pem),
        }}],
        "contexts": [{"name": user, "context": {"cluster": "e2e", "user": user}}],
        "current-context": user,
        "preferences": {},
    });
    serde_json::to_string_pretty(&config).expect("a kubeconfig serializes")
}

fn new_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Cert {
        what: what.into(),
        source,
    })
}

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    for o in organizations {
        name.push(DnType::OrganizationName, *o);
    }
    name.push(DnType::CommonName, common_name);
    name
}

fn valid_now(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + VALIDITY).into();
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| PkiError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_name_user_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(
            dir.path(),
            &["kubernetes".into()],
            &["10.96.0.1".parse().unwrap()],
        )
        .unwrap();
        let (cert, _) = pki
            .client_cert(&ClientIdentity::new("system:node:node0", &["system:nodes"]))
            .unwrap();
        let der = pem_to_der(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let subject = parsed.subject().to_string();
        assert!(subject.contains("CN=system:node:node0"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
        let server_der = pem_to_der(&fs::read_to_string(pki.files.apiserver_cert()).unwrap());
        let (_, server) = x509_parser::parse_x509_certificate(&server_der).unwrap();
        let sans = format!(
            "{:?}",
            server.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            sans.contains("\"kubernetes\"") && sans.contains("[10, 96, 0, 1]"),
            "{sans}"
        );
        let mode = fs::metadata(pki.files.service_account_key()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    /// The DER of a one-certificate PEM.
    fn pem_to_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
