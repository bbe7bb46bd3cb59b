//! Certificate signing requests from proxies: parsed, their self-signature
//! checked, and reduced to the one thing the CA takes from them, the public
//! key. Subject, SANs and requested extensions are never looked at: the
//! identity comes from the authenticated caller.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateSigningRequestDer, alg_id};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::signature::{self, SignatureError};

/// RSA keys outside this range are refused (the same bounds rustls applies).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;
/// A CSR with an 8192-bit RSA key is under 4 KiB of PEM; anything far
/// larger is not a CSR worth parsing.
const MAX_PEM_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not PEM: send one `-----BEGIN CERTIFICATE REQUEST-----` block")]
    NotPem,
    #[error("the CSR does not parse as PKCS#10: {0}")]
    Malformed(String),
    #[error("the CSR's key is not usable: {0}")]
    UnusableKey(String),
    #[error("the CSR's signature is not valid: {0}")]
    Signature(#[from] SignatureError),
}

/// The public key of a verified CSR, in the form rcgen embeds in a
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPublicKey {
    algorithm: &'static rcgen::SignatureAlgorithm,
    key: Vec<u8>,
}

impl rcgen::PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// Parses a PEM CSR, checks that its key is one the mesh uses and that the
/// CSR is signed by that key (proof the caller holds the private key).
pub fn parse(pem: &str) -> Result<CsrPublicKey, CsrError> {
    if pem.len() > MAX_PEM_LEN {
        return Err(CsrError::Malformed(format!(
            "{} bytes is larger than the {MAX_PEM_LEN} bytes a CSR may take",
            pem.len()
        )));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes follow the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let (key_alg, key) = signature::split_spki(spki.raw)?;
    let algorithm = leaf_algorithm(key_alg, spki)?;
    signature::verify_signed(der.as_ref(), spki.raw)?;
    Ok(CsrPublicKey {
        algorithm,
        key: key.to_vec(),
    })
}

/// The rcgen algorithm whose SubjectPublicKeyInfo encoding matches the key.
/// Only the key type matters here: the leaf is signed with the CA's key.
fn leaf_algorithm(
    key_alg: &[u8],
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<&'static rcgen::SignatureAlgorithm, CsrError> {
    let alg = if *key_alg == *alg_id::ECDSA_P256 {
        &rcgen::PKCS_ECDSA_P256_SHA256
    } else if *key_alg == *alg_id::ECDSA_P384 {
        &rcgen::PKCS_ECDSA_P384_SHA384
    } else if *key_alg == *alg_id::ECDSA_P521 {
        &rcgen::PKCS_ECDSA_P521_SHA512
    } else if *key_alg == *alg_id::ED25519 {
        &rcgen::PKCS_ED25519
    } else if *key_alg == *alg_id::RSA_ENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => {
                return Err(CsrError::UnusableKey(
                    "the RSA public key does not parse".into(),
                ));
            }
        };
        if !RSA_BITS.contains(&bits) {
            return Err(CsrError::UnusableKey(format!(
                "an RSA key of {bits} bits; use {} to {} bits",
                RSA_BITS.start(),
                RSA_BITS.end()
            )));
        }
        &rcgen::PKCS_RSA_SHA256
    } else if spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map_or_else(|| "(none)".to_string(), |oid| oid.to_id_string());
        return Err(CsrError::UnusableKey(format!(
            "an EC key on curve {curve}; use P-256, P-384 or P-521"
        )));
    } else {
        return Err(CsrError::UnusableKey(format!(
            "key algorithm {} is not ECDSA (P-256, P-384, P-521), Ed25519 or RSA",
            spki.algorithm.algorithm.to_id_string()
        )));
    };
    Ok(alg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn csr_pem(key: &rcgen::KeyPair) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["spoofed.example".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://evil/ns/a/sa/b".try_into().unwrap(),
        ));
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn takes_only_the_public_key() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let parsed = parse(&csr_pem(&key)).unwrap();
            assert_eq!(parsed.der_bytes(), key.public_key_raw());
            assert_eq!(
                parsed.subject_public_key_info(),
                key.subject_public_key_info()
            );
        }
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert_eq!(parse("hello"), Err(CsrError::NotPem));
        let not_a_csr =
            "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(parse(not_a_csr), Err(CsrError::Malformed(_))));
        let huge = "A".repeat(MAX_PEM_LEN + 1);
        assert!(matches!(parse(&huge), Err(CsrError::Malformed(m)) if m.contains("larger")));
    }

    #[test]
    fn rejects_a_csr_signed_by_another_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        // Graft `other`'s public key into a CSR signed by `key`.
        let pem = csr_pem(&key);
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut der = der.as_ref().to_vec();
        let at = der
            .windows(key.public_key_raw().len())
            .position(|w| w == key.public_key_raw())
            .unwrap();
        der[at..at + other.public_key_raw().len()].copy_from_slice(other.public_key_raw());
        let grafted = crate::ca::pem_encode("CERTIFICATE REQUEST", &der);
        assert_eq!(
            parse(&grafted),
            Err(CsrError::Signature(SignatureError::BadSignature))
        );
    }

    #[test]
    fn accepts_rsa_keys() {
        let key =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let parsed = parse(&csr_pem(&key)).unwrap();
        assert_eq!(parsed.der_bytes(), key.public_key_raw());
    }

    #[test]
    fn names_key_types_it_cannot_use() {
        // A secp256k1 key: SEQUENCE { SEQUENCE { ecPublicKey, secp256k1 }, BIT STRING }.
        let mut spki = vec![
            0x30, 0x56, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a, 0x03, 0x42, 0x00, 0x04,
        ];
        spki.extend([0x11; 64]);
        let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let (alg, _) = signature::split_spki(&spki).unwrap();
        let err = leaf_algorithm(alg, &parsed).unwrap_err().to_string();
        assert!(
            err.contains("an EC key on curve 1.3.132.0.10; use P-256"),
            "{err}"
        );
    }
}
