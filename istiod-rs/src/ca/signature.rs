//! Checking the signature on a signed DER structure (a CSR or a certificate)
//! with the mesh's one crypto provider.
//!
//! Both structures are `SEQUENCE { signed-data, AlgorithmIdentifier,
//! BIT STRING }`. The algorithm identifiers are compared byte for byte with
//! the ones the provider's verification algorithms declare, so exactly the
//! algorithms rustls accepts in a handshake are accepted here, and nothing
//! (SHA-1, small RSA keys) that it would refuse.

use rustls::pki_types::SignatureVerificationAlgorithm;

const SEQUENCE: u8 = 0x30;
const BIT_STRING: u8 = 0x03;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the DER structure is malformed ({0})")]
    Malformed(&'static str),
    #[error(
        "the signature algorithm is not supported for this key (use ECDSA P-256/P-384/P-521 with SHA-2, Ed25519, or RSA 2048-8192 bits with SHA-2)"
    )]
    UnsupportedAlgorithm,
    #[error("the signature does not verify")]
    BadSignature,
}

/// One DER element: its tag, its contents, and the whole encoding (header
/// included).
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    encoded: &'a [u8],
}

/// Splits the first DER element off `input`. Only definite lengths of up to
/// four bytes, as DER requires and as anything signed here needs.
fn next_element(input: &[u8]) -> Result<(Element<'_>, &[u8]), SignatureError> {
    let truncated = SignatureError::Malformed("truncated element");
    let (&tag, rest) = input.split_first().ok_or(truncated.clone())?;
    let (&first, rest) = rest.split_first().ok_or(truncated.clone())?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(SignatureError::Malformed("unsupported length encoding"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(truncated);
    }
    let header = input.len() - rest.len();
    let element = Element {
        tag,
        contents: &rest[..len],
        encoded: &input[..header + len],
    };
    Ok((element, &rest[len..]))
}

fn expect<'a>(
    input: &'a [u8],
    tag: u8,
    what: &'static str,
) -> Result<(Element<'a>, &'a [u8]), SignatureError> {
    let (element, rest) = next_element(input)?;
    if element.tag != tag {
        return Err(SignatureError::Malformed(what));
    }
    Ok((element, rest))
}

/// The parts of a `SubjectPublicKeyInfo`: the algorithm identifier's
/// contents and the key bits.
pub fn split_spki(spki: &[u8]) -> Result<(&[u8], &[u8]), SignatureError> {
    let (outer, _) = expect(spki, SEQUENCE, "SubjectPublicKeyInfo is not a SEQUENCE")?;
    let (alg, rest) = expect(
        outer.contents,
        SEQUENCE,
        "SubjectPublicKeyInfo has no AlgorithmIdentifier",
    )?;
    let (key, _) = expect(
        rest,
        BIT_STRING,
        "SubjectPublicKeyInfo has no key BIT STRING",
    )?;
    Ok((alg.contents, bit_string_bytes(key.contents)?))
}

fn bit_string_bytes(contents: &[u8]) -> Result<&[u8], SignatureError> {
    match contents.split_first() {
        Some((0, bytes)) => Ok(bytes),
        _ => Err(SignatureError::Malformed("BIT STRING with unused bits")),
    }
}

/// Verifies `signed` (the complete DER of a CSR or certificate) against the
/// signer's `SubjectPublicKeyInfo` (complete DER).
pub fn verify_signed(signed: &[u8], signer_spki: &[u8]) -> Result<(), SignatureError> {
    let (outer, _) = expect(signed, SEQUENCE, "signed structure is not a SEQUENCE")?;
    let (data, rest) = expect(outer.contents, SEQUENCE, "signed data is not a SEQUENCE")?;
    let (sig_alg, rest) = expect(rest, SEQUENCE, "no signature AlgorithmIdentifier")?;
    let (sig, _) = expect(rest, BIT_STRING, "no signature BIT STRING")?;
    let signature = bit_string_bytes(sig.contents)?;
    let (key_alg, key) = split_spki(signer_spki)?;
    let algorithm = find_algorithm(key_alg, sig_alg.contents)?;
    algorithm
        .verify_signature(key, data.encoded, signature)
        .map_err(|_| SignatureError::BadSignature)
}

fn find_algorithm(
    key_alg: &[u8],
    sig_alg: &[u8],
) -> Result<&'static dyn SignatureVerificationAlgorithm, SignatureError> {
    proxy_core::tls::provider()
        .signature_verification_algorithms
        .all
        .iter()
        .copied()
        .find(|a| *a.public_key_alg_id() == *key_alg && *a.signature_alg_id() == *sig_alg)
        .ok_or(SignatureError::UnsupportedAlgorithm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn csr_der(key: &rcgen::KeyPair) -> Vec<u8> {
        rcgen::CertificateParams::new(vec!["ignored.example".to_string()])
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn verifies_self_signed_requests_of_each_supported_key_type() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let der = csr_der(&key);
            verify_signed(&der, &key.subject_public_key_info()).unwrap();
        }
    }

    #[test]
    fn rejects_tampered_data_and_wrong_keys() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let der = csr_der(&key);
        assert_eq!(
            verify_signed(&der, &other.subject_public_key_info()),
            Err(SignatureError::BadSignature)
        );
        let mut tampered = der.clone();
        // A byte inside the subject name, well inside the signed part.
        let i = tampered
            .windows(7)
            .position(|w| w == b"ignored")
            .expect("SAN in CSR");
        tampered[i] ^= 0x20;
        assert_eq!(
            verify_signed(&tampered, &key.subject_public_key_info()),
            Err(SignatureError::BadSignature)
        );
        assert!(matches!(
            verify_signed(&der[..der.len() - 3], &key.subject_public_key_info()),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify_signed(b"\x02\x01\x00", &key.subject_public_key_info()),
            Err(SignatureError::Malformed(_))
        ));
    }
}
