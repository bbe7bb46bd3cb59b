//! Workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! This is the only identity form the mesh issues or accepts. Parsing checks
//! the SPIFFE rules (lower-case trust domain, no empty, `.` or `..` path
//! segments, restricted characters) and the Istio path shape.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// SPIFFE caps an id at 2048 bytes.
const MAX_LEN: usize = 2048;
/// DNS caps a trust domain (a host name) at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE id {0:?} does not start with \"spiffe://\"")]
    MissingScheme(String),
    #[error("SPIFFE id {0:?} is longer than {MAX_LEN} bytes")]
    TooLong(String),
    #[error("SPIFFE id {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error(
        "trust domain {0:?} may only contain lower-case letters, digits, '.', '-' and '_' (at most {MAX_TRUST_DOMAIN_LEN} bytes)"
    )]
    InvalidTrustDomain(String),
    #[error(
        "SPIFFE id {0:?} must have the path /ns/<namespace>/sa/<service-account>; the path was {1:?}"
    )]
    WrongPath(String, String),
    #[error(
        "{field} {value:?} in SPIFFE id is not valid: segments may only contain letters, digits, '.', '-' and '_', and may not be empty, '.' or '..'"
    )]
    InvalidSegment { field: &'static str, value: String },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_segment("namespace", &id.namespace)?;
        validate_segment("service account", &id.service_account)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The same workload identity in another trust domain.
    pub fn with_trust_domain(&self, trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, &self.namespace, &self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(IdentityError::TooLong(s.chars().take(64).collect()));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme(s.to_string()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(IdentityError::EmptyTrustDomain(s.to_string()));
        }
        validate_trust_domain(trust_domain)?;
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                SpiffeId::new(trust_domain, *namespace, *service_account)
            }
            _ => Err(IdentityError::WrongPath(s.to_string(), path.to_string())),
        }
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdentityError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_LEN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidTrustDomain(td.to_string()))
    }
}

fn validate_segment(field: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidSegment {
            field,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), s);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn rejects_malformed_ids_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "cluster.local/ns/a/sa/b",
                "does not start with \"spiffe://\"",
            ),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "lower-case letters"),
            ("spiffe://td", "must have the path"),
            ("spiffe://td/ns/a", "must have the path"),
            ("spiffe://td/ns/a/sa/b/extra", "must have the path"),
            ("spiffe://td/namespace/a/sa/b", "must have the path"),
            ("spiffe://td/ns//sa/b", "namespace \"\""),
            ("spiffe://td/ns/../sa/b", "namespace \"..\""),
            ("spiffe://td/ns/a/sa/b c", "service account \"b c\""),
            ("spiffe://td/ns/a/sa/b%2f", "service account"),
        ];
        for (input, want) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{input}: {err:?} should mention {want:?}"
            );
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(MAX_LEN));
        assert!(matches!(
            long.parse::<SpiffeId>(),
            Err(IdentityError::TooLong(_))
        ));
    }

    #[test]
    fn new_validates_parts() {
        assert!(SpiffeId::new("cluster.local", "ns", "sa").is_ok());
        assert!(SpiffeId::new("", "ns", "sa").is_err());
        assert!(SpiffeId::new("td", "n/s", "sa").is_err());
        let id = SpiffeId::new("a.b", "ns", "sa").unwrap();
        assert_eq!(
            id.with_trust_domain("c.d").unwrap().to_string(),
            "spiffe://c.d/ns/ns/sa/sa"
        );
    }
}
