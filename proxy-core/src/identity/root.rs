//! A self-signed mesh root: what istiod-rs signs with when it is given no
//! plug-in CA (kept in its state directory), and what `istioctl-rs install`
//! puts in the `cacerts` Secret so that istiod keeps one root across
//! restarts and reschedules. One function, so both are the same kind of
//! root: ECDSA P-256, `O=<trust domain>`, CA without a path length limit,
//! allowed to sign certificates and CRLs.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};

/// A new root: its certificate and private key, PEM.
pub struct SelfSignedRoot {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSignedRoot {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSignedRoot").finish_non_exhaustive()
    }
}

/// Creates a root valid from `backdate` ago (so proxies whose clock is
/// slightly behind accept it) for `lifetime`.
pub fn self_signed_root(
    trust_domain: &str,
    backdate: Duration,
    lifetime: Duration,
) -> Result<SelfSignedRoot, rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert_pem = root_certificate(&key, trust_domain, backdate, lifetime)?;
    Ok(SelfSignedRoot {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

/// A new certificate for an existing root key (PEM), with the same name
/// and a new validity: what renewing a self-signed root before it expires
/// issues. Certificates signed by the key verify under either certificate.
pub fn renewed_root(
    key_pem: &str,
    trust_domain: &str,
    backdate: Duration,
    lifetime: Duration,
) -> Result<String, rcgen::Error> {
    let key = KeyPair::from_pem(key_pem)?;
    root_certificate(&key, trust_domain, backdate, lifetime)
}

fn root_certificate(
    key: &KeyPair,
    trust_domain: &str,
    backdate: Duration,
    lifetime: Duration,
) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    name.push(DnType::CommonName, "istiod-rs mesh root");
    params.distinguished_name = name;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - backdate;
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params.self_signed(key)?.pem())
}

/// A random positive serial of 127 bits, as RFC 5280 asks (at most 20
/// octets, positive), for every certificate the mesh's CAs issue.
pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn a_root_is_a_ca_of_its_trust_domain() {
        let root = self_signed_root(
            "example.org",
            Duration::from_secs(3600),
            Duration::from_secs(86400),
        )
        .unwrap();
        let der = CertificateDer::from_pem_slice(root.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(
            cert.subject()
                .iter_organization()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "example.org"
        );
        assert!(cert.validity().is_valid());
        assert!(root.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{root:?}").contains("PRIVATE"));
    }
}
