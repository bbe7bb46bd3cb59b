//! RequestAuthentication -> `JwtAuthentication`, key
//! `<ns>/<name>`, `jwtRules` field for field.
//!
//! The keys are always inline: `jwks` as written, else the document
//! istiod-rs fetched from `jwksUri` (or, without one, from the issuer's
//! OpenID discovery document), read from the cluster state's
//! [`JwksState`](crate::jwks::JwksState) which `jwks.rs` fills. Keys that
//! are not there (not fetched yet, or the fetch failed and none was ever
//! fetched) set `jwks_error`: the waypoint then rejects every token of that
//! issuer (401), as upstream's fake JWKS does; the problem names the rule's
//! field. A token-less request is not affected (it has no principal, which
//! an ALLOW requiring one refuses).
//!
//! RequestAuthentications attached by selector or namespace are converted
//! alike: `binding.rs` lists them on the waypoint entries of the workloads
//! they cover (see `l7.rs`).

use api::crd::RequestAuthentication;
use api::l7::{ClaimToHeader, JwtAuthentication, JwtHeader, JwtRule};
use api::manifest::{Kind, ObjectKey};

use super::super::problem::{Effect, PolicyProblem, PolicyRef};
use crate::jwks::{JwksEntry, JwksSource, JwksState, parse_timeout, validate_jwks};

/// Converts one RequestAuthentication, however it attaches.
pub(in crate::index) fn convert(
    key: &ObjectKey,
    ra: &RequestAuthentication,
    jwks: &JwksState,
    problems: &mut Vec<PolicyProblem>,
) -> JwtAuthentication {
    let spec = &ra.spec;
    let object = PolicyRef {
        kind: Kind::RequestAuthentication,
        key: key.clone(),
    };
    let rules = spec
        .jwt_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut rule = JwtRule {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                from_headers: r
                    .from_headers
                    .iter()
                    .map(|h| JwtHeader {
                        name: h.name.to_ascii_lowercase(),
                        prefix: h.prefix.clone(),
                    })
                    .collect(),
                from_params: r.from_params.clone(),
                from_cookies: r.from_cookies.clone(),
                forward_original_token: r.forward_original_token,
                output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
                output_claim_to_headers: r
                    .output_claim_to_headers
                    .iter()
                    .map(|c| ClaimToHeader {
                        header: c.header.to_ascii_lowercase(),
                        claim: c.claim.clone(),
                    })
                    .collect(),
                ..JwtRule::default()
            };
            if let Some(t) = &r.timeout
                && parse_timeout(t).is_none()
            {
                problems.push(PolicyProblem::UntranslatableL7 {
                    object: object.clone(),
                    field: format!("spec.jwtRules[{i}].timeout"),
                    reason: format!("{t:?} is not a duration"),
                    effect: Effect::DefaultApplies {
                        what: "the keys are fetched with the default timeout".to_string(),
                    },
                });
            }
            let (field, uri, keys) = match (&r.jwks, &r.jwks_uri) {
                (Some(inline), _) => (
                    "jwks",
                    "the inline jwks".to_string(),
                    validate_jwks(inline).map(|()| inline.clone()),
                ),
                (None, uri) => {
                    let source = JwksSource {
                        issuer: r.issuer.clone(),
                        uri: uri.clone(),
                    };
                    let keys = match jwks.get(&source) {
                        Some(JwksEntry::Keys(k)) => Ok(k.clone()),
                        Some(JwksEntry::Failed(e)) => Err(e.clone()),
                        None => Err("not fetched yet".to_string()),
                    };
                    // Without jwksUri the issuer names the discovery document.
                    let field = if uri.is_some() { "jwksUri" } else { "issuer" };
                    (field, source.describe(), keys)
                }
            };
            match keys {
                Ok(k) => rule.jwks = k,
                Err(error) => {
                    problems.push(PolicyProblem::JwksUnavailable {
                        object: object.clone(),
                        field: format!("spec.jwtRules[{i}].{field}"),
                        uri,
                        error: error.clone(),
                        effect: Effect::IssuerRejected {
                            issuer: r.issuer.clone(),
                        },
                    });
                    rule.jwks_error = error;
                }
            }
            rule
        })
        .collect();
    JwtAuthentication {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        rules,
    }
}
