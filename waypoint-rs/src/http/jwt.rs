//! RequestAuthentication as the waypoint enforces it: `l7::JwtAuthentication`
//! read into [`Authentication`] once (every JWKS parsed into decoding keys per
//! issuer), then [`authenticate`] per request.
//!
//! Semantics are Envoy's `jwt_authn` filter as Istio configures it
//! (`envoyproxy/envoy` `source/extensions/filters/http/jwt_authn/`):
//! - token locations (`extractor.cc`, `ExtractorImpl::addProvider`): the
//!   rule's headers (value after the prefix), query parameters and cookies;
//!   none configured: `Authorization: Bearer <token>` and `?access_token=`.
//!   Each location accepts only the issuers whose rule names it.
//! - no token anywhere: [`Authn::Anonymous`] (Istio's `allow_missing`); an
//!   AuthorizationPolicy requiring a request principal then denies (403).
//! - a token that does not verify: 401 with the status string of Envoy's
//!   JWT library as body (`source/common/jwt/status.cc`, `getStatusString`)
//!   and `www-authenticate: Bearer realm="<scheme>://<host><path>",
//!   error="invalid_token"` (`filter.cc`, `Filter::onComplete`); an audience
//!   not allowed is 403 there, and here.
//! - checks in Envoy's order (`authenticator.cc`): token form, issuer, time
//!   (`exp`/`nbf` with 60 s skew, Envoy's default `clock_skew_seconds`),
//!   audiences, then the keys: a key is tried when its `kid` (if both have
//!   one) and its `alg` (if it has one) agree with the token's and its type
//!   fits the token's algorithm; none fits: "Jwks doesn't have key to match
//!   kid or alg from Jwt".
//! - after verification: headers named by `output_claim_to_headers` and
//!   `output_payload_to_header` are always removed from the request first
//!   (`ExtractorImpl::sanitizeHeaders`), then set from the verified token;
//!   the token is removed from its header or query parameter unless
//!   `forward_original_token` (Istio's default is false; Envoy does not
//!   remove cookies).
//!
//! Stricter than Envoy: the algorithm is taken from the key, never from the
//! token alone, and only public keys are accepted: symmetric (`oct`) keys
//! are left out of the JWKS, so an HS* token never verifies; `alg: none` is
//! refused as Envoy refuses it. A JWKS that is missing, does not parse, or
//! holds no usable public key makes every token of its issuer fail (401).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use api::l7;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{CONTENT_TYPE, COOKIE, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderMap, StatusCode, Uri};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::request::{Authenticated, Authn, FieldError, FromProto, Refusal, ResponseFlag};

/// Envoy's default `clock_skew_seconds`.
const CLOCK_SKEW_SECS: u64 = 60;
/// Envoy's `MaximumUriLength` for the realm of `www-authenticate`.
const REALM_PATH_LIMIT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "jsonwebtoken has no crypto provider: the build enabled none or both of its \
         aws_lc_rs and rust_crypto features; JWTs cannot be verified"
    )]
    NoCryptoProvider,
}

/// Resolves jsonwebtoken's crypto provider once; the binary calls this at
/// start-up so a build without exactly one backend fails there, not at the
/// first request. [`Authentication::from_proto`] calls it too.
pub fn crypto_provider() -> Result<(), Error> {
    static RESOLVED: OnceLock<bool> = OnceLock::new();
    let present =
        *RESOLVED.get_or_init(|| jsonwebtoken::crypto::CryptoProvider::try_get_default().is_some());
    if present {
        Ok(())
    } else {
        Err(Error::NoCryptoProvider)
    }
}

/// One RequestAuthentication, ready to verify tokens.
#[derive(Clone, Debug)]
pub struct Authentication {
    pub namespace: String,
    pub name: String,
    pub providers: Vec<Provider>,
}

/// One `jwtRules` entry: an issuer, its keys and where its tokens are.
#[derive(Clone, Debug)]
pub struct Provider {
    pub issuer: String,
    /// Empty: any audience.
    pub audiences: Vec<String>,
    /// The usable public keys; `Err` holds the body every token of this
    /// issuer is refused with (fail closed).
    pub keys: Result<Vec<Key>, &'static str>,
    /// JWKS entries left out (symmetric, encryption-only, unsupported), for
    /// /config_dump.
    pub skipped_keys: Vec<String>,
    pub locations: Vec<Location>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<HeaderName>,
    /// Header, and the claim path (`a.b` split on `.`).
    pub output_claim_to_headers: Vec<(HeaderName, Vec<String>)>,
}

/// A public key of a JWKS, with what the key itself says it verifies.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The algorithms this key verifies: the JWK's `alg` when it names one,
    /// else every algorithm of its type (and curve).
    pub algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Where a token is looked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A header; the token follows `prefix` (e.g. `Bearer `) in its value.
    Header {
        name: HeaderName,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

/// Envoy's status strings (`source/common/jwt/status.cc`).
mod status {
    pub const BAD_FORMAT: &str =
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections";
    pub const HEADER_BAD_BASE64: &str = "Jwt header is an invalid Base64url encoded";
    pub const HEADER_BAD_JSON: &str = "Jwt header is an invalid JSON";
    pub const HEADER_BAD_ALG: &str = "Jwt header [alg] field is required and must be a string";
    pub const HEADER_ALG_NOT_SUPPORTED: &str = "Jwt header [alg] is not supported";
    pub const HEADER_BAD_KID: &str = "Jwt header [kid] field is not a string";
    pub const PAYLOAD_BAD_BASE64: &str = "Jwt payload is an invalid Base64url encoded";
    pub const PAYLOAD_BAD_JSON: &str = "Jwt payload is an invalid JSON";
    pub const ISS_NOT_STRING: &str = "Jwt payload [iss] field is not a string";
    pub const SUB_NOT_STRING: &str = "Jwt payload [sub] field is not a string";
    pub const NBF_NOT_INTEGER: &str = "Jwt payload [nbf] field is not an integer";
    pub const EXP_NOT_INTEGER: &str = "Jwt payload [exp] field is not an integer";
    pub const AUD_NOT_STRING: &str = "Jwt payload [aud] field is not a string or string list";
    pub const SIGNATURE_BAD_BASE64: &str = "Jwt signature is an invalid Base64url encoded";
    pub const UNKNOWN_ISSUER: &str = "Jwt issuer is not configured";
    pub const AUDIENCE_NOT_ALLOWED: &str = "Audiences in Jwt are not allowed";
    pub const VERIFICATION_FAILS: &str = "Jwt verification fails";
    pub const NOT_YET_VALID: &str = "Jwt not yet valid";
    pub const EXPIRED: &str = "Jwt is expired";
    pub const JWKS_PARSE: &str = "Jwks is an invalid JSON";
    pub const JWKS_NO_VALID_KEYS: &str = "Jwks doesn't have any valid public key";
    pub const JWKS_KID_ALG_MISMATCH: &str = "Jwks doesn't have key to match kid or alg from Jwt";
    pub const JWKS_FETCH_FAIL: &str = "Jwks remote fetch is failed";
}

/// Authenticates one request against every RequestAuthentication that
/// applies to it, and prepares the request for the upstream (claims to
/// headers, token removal). Call before authorization; on
/// [`Authn::Rejected`] answer with the refusal and stop.
pub fn authenticate<'a>(
    auths: impl IntoIterator<Item = &'a Authentication>,
    request: &mut Parts,
    now: SystemTime,
) -> Authn {
    let providers: Vec<&Provider> = auths.into_iter().flat_map(|a| &a.providers).collect();
    if providers.is_empty() {
        return Authn::Anonymous;
    }
    for p in &providers {
        if let Some(h) = &p.output_payload_to_header {
            request.headers.remove(h);
        }
        for (h, _) in &p.output_claim_to_headers {
            request.headers.remove(h);
        }
    }
    let found = find_tokens(&providers, request);
    if found.is_empty() {
        return Authn::Anonymous;
    }
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut verified = Vec::with_capacity(found.len());
    for (token, location) in &found {
        let accepting = providers
            .iter()
            .copied()
            .filter(|p| p.locations.contains(location));
        match verify(token, accepting, now) {
            Ok(v) => verified.push((v, location)),
            Err(body) => return Authn::Rejected(rejection(body, request)),
        }
    }
    for (v, location) in &verified {
        v.provider.write_outputs(v, &mut request.headers);
        if !v.provider.forward_original_token {
            remove_token(location, request);
        }
    }
    let (first, _) = verified.swap_remove(0);
    Authn::Authenticated(Box::new(first.authenticated))
}

/// The response for a rejected token: Envoy's status code, body and
/// `www-authenticate`.
fn rejection(body: &'static str, request: &Parts) -> Refusal {
    let status = if body == status::AUDIENCE_NOT_ALLOWED {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    let scheme = request.uri.scheme_str().unwrap_or("http");
    let host = request
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let path = request.uri.path_and_query().map_or("", |p| p.as_str());
    let path = truncate(path, REALM_PATH_LIMIT);
    let value = format!("Bearer realm=\"{scheme}://{host}{path}\", error=\"invalid_token\"");
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(WWW_AUTHENTICATE, v);
    }
    Refusal {
        status,
        body: body.into(),
        flag: ResponseFlag::None,
        headers,
    }
}

fn truncate(s: &str, limit: usize) -> &str {
    if s.len() <= limit {
        return s;
    }
    let mut end = limit;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Every token present at a configured location, once per (token, location),
/// in the order the rules list their locations.
fn find_tokens(providers: &[&Provider], request: &Parts) -> Vec<(String, Location)> {
    let mut found: Vec<(String, Location)> = Vec::new();
    let mut cookies: Option<HashMap<String, String>> = None;
    for p in providers {
        for location in &p.locations {
            let tokens: Vec<String> = match location {
                Location::Header { name, prefix } => request
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter_map(|v| after_prefix(v, prefix))
                    .collect(),
                Location::Param(name) => query_param(&request.uri, name).into_iter().collect(),
                Location::Cookie(name) => cookies
                    .get_or_insert_with(|| parse_cookies(&request.headers))
                    .get(name)
                    .cloned()
                    .into_iter()
                    .collect(),
            };
            for token in tokens {
                if !found.iter().any(|(t, l)| *t == token && l == location) {
                    found.push((token, location.clone()));
                }
            }
        }
    }
    found
}

/// The token in a header value: after `prefix`, from the first character a
/// JWT can hold (Envoy's `ExtractorImpl::extractJWT`).
fn after_prefix(value: &str, prefix: &str) -> Option<String> {
    let rest = if prefix.is_empty() {
        value
    } else {
        let at = value.find(prefix)?;
        &value[at + prefix.len()..]
    };
    let start = rest.find(|c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let token = match start {
        Some(i) => &rest[i..],
        None => rest,
    };
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

fn parse_cookies(headers: &HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for value in headers.get_all(COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                out.entry(k.to_string())
                    .or_insert_with(|| v.trim_matches('"').to_string());
            }
        }
    }
    out
}

/// Removes a verified token from where it was found: the whole header, or
/// the query parameter. Cookies stay, as in Envoy.
fn remove_token(location: &Location, request: &mut Parts) {
    match location {
        Location::Header { name, .. } => {
            request.headers.remove(name);
        }
        Location::Param(name) => {
            let Some(query) = request.uri.query() else {
                return;
            };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != name)
                .collect();
            let path = request.uri.path();
            let path_and_query = if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            let mut parts = request.uri.clone().into_parts();
            if let Ok(pq) = path_and_query.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(parts) {
                    request.uri = uri;
                }
            }
        }
        Location::Cookie(_) => {}
    }
}

/// A verified token and what it means.
struct Verified<'p> {
    provider: &'p Provider,
    authenticated: Authenticated,
    /// The payload segment as sent (base64url), for `output_payload_to_header`.
    payload: String,
}

/// The parts of a token read before any key is involved.
struct Parsed {
    alg: Algorithm,
    kid: Option<String>,
    claims: Value,
    payload: String,
}

fn b64_json(
    segment: &str,
    bad_base64: &'static str,
    bad_json: &'static str,
) -> Result<Value, &'static str> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| bad_base64)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad_json)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(bad_json)
    }
}

fn parse(token: &str) -> Result<Parsed, &'static str> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(status::BAD_FORMAT);
    };
    let header = b64_json(header, status::HEADER_BAD_BASE64, status::HEADER_BAD_JSON)?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg_by_name(alg).ok_or(status::HEADER_ALG_NOT_SUPPORTED)?,
        _ => return Err(status::HEADER_BAD_ALG),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(status::HEADER_BAD_KID),
    };
    let claims = b64_json(
        payload,
        status::PAYLOAD_BAD_BASE64,
        status::PAYLOAD_BAD_JSON,
    )?;
    URL_SAFE_NO_PAD
        .decode(signature.trim_end_matches('='))
        .map_err(|_| status::SIGNATURE_BAD_BASE64)?;
    Ok(Parsed {
        alg,
        kid,
        claims,
        payload: payload.to_string(),
    })
}

/// The JWS algorithms Envoy implements; anything else (`none` included) is
/// "not supported".
fn alg_by_name(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn optional_string<'c>(
    claims: &'c Value,
    name: &str,
    bad: &'static str,
) -> Result<Option<&'c str>, &'static str> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad),
    }
}

fn optional_time(
    claims: &Value,
    name: &str,
    bad: &'static str,
) -> Result<Option<u64>, &'static str> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(bad),
    }
}

fn audiences(claims: &Value) -> Result<Vec<String>, &'static str> {
    match claims.get("aud") {
        None => Ok(Vec::new()),
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(list)) => list
            .iter()
            .map(|a| a.as_str().map(str::to_string).ok_or(status::AUD_NOT_STRING))
            .collect(),
        Some(_) => Err(status::AUD_NOT_STRING),
    }
}

/// Audiences compare without an `http://` / `https://` scheme and a
/// trailing `/`, as Envoy's `CheckAudience` does.
fn same_audience(a: &str, b: &str) -> bool {
    fn bare(s: &str) -> &str {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s)
    }
    bare(a) == bare(b)
}

fn verify<'p>(
    token: &str,
    mut accepting: impl Iterator<Item = &'p Provider>,
    now: u64,
) -> Result<Verified<'p>, &'static str> {
    let parsed = parse(token)?;
    let claims = &parsed.claims;
    let issuer = optional_string(claims, "iss", status::ISS_NOT_STRING)?.unwrap_or("");
    let subject = optional_string(claims, "sub", status::SUB_NOT_STRING)?.unwrap_or("");
    let provider = accepting
        .find(|p| p.issuer == issuer)
        .ok_or(status::UNKNOWN_ISSUER)?;
    let nbf = optional_time(claims, "nbf", status::NBF_NOT_INTEGER)?;
    let exp = optional_time(claims, "exp", status::EXP_NOT_INTEGER)?;
    // 0 reads as absent, as in Envoy's Jwt::verifyTimeConstraint.
    if nbf.is_some_and(|nbf| nbf > 0 && now.saturating_add(CLOCK_SKEW_SECS) < nbf) {
        return Err(status::NOT_YET_VALID);
    }
    if exp.is_some_and(|exp| exp > 0 && exp.saturating_add(CLOCK_SKEW_SECS) < now) {
        return Err(status::EXPIRED);
    }
    let token_audiences = audiences(claims)?;
    if !provider.audiences.is_empty()
        && !token_audiences.iter().any(|a| {
            provider
                .audiences
                .iter()
                .any(|allowed| same_audience(allowed, a))
        })
    {
        return Err(status::AUDIENCE_NOT_ALLOWED);
    }
    let keys = provider.keys.as_ref().map_err(|body| *body)?;
    let fitting: Vec<&Key> = keys
        .iter()
        .filter(|k| match (&parsed.kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        })
        .filter(|k| k.algorithms.contains(&parsed.alg))
        .collect();
    if fitting.is_empty() {
        return Err(status::JWKS_KID_ALG_MISMATCH);
    }
    // Signature only: time, issuer and audience were checked above in
    // Envoy's order, against the caller's clock.
    let mut validation = Validation::new(parsed.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let signed = fitting
        .iter()
        .any(|k| jsonwebtoken::decode::<Value>(token, &k.key, &validation).is_ok());
    if !signed {
        return Err(status::VERIFICATION_FAILS);
    }
    let presenter = claims
        .get("azp")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Verified {
        provider,
        authenticated: Authenticated {
            principal: format!("{issuer}/{subject}"),
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            audiences: token_audiences,
            presenter,
            claims: parsed.claims.clone(),
        },
        payload: parsed.payload,
    })
}

impl Provider {
    /// Claims to headers and the payload header, from a token this provider
    /// verified. A claim that is absent, not a string/number/boolean, empty,
    /// or not a valid header value sets nothing.
    fn write_outputs(&self, v: &Verified<'_>, headers: &mut HeaderMap) {
        if let Some(name) = &self.output_payload_to_header
            && let Ok(value) = HeaderValue::from_str(&v.payload)
        {
            headers.insert(name.clone(), value);
        }
        for (name, path) in &self.output_claim_to_headers {
            let mut at = &v.authenticated.claims;
            let mut present = true;
            for step in path {
                match at.get(step) {
                    Some(next) => at = next,
                    None => {
                        present = false;
                        break;
                    }
                }
            }
            if !present {
                continue;
            }
            // Envoy's AuthenticatorImpl::addJWTClaimToHeader: strings,
            // numbers and booleans only; lists, objects and empty values set
            // nothing.
            let text = match at {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            if text.is_empty() {
                continue;
            }
            if let Ok(value) = HeaderValue::from_str(&text) {
                headers.insert(name.clone(), value);
            }
        }
    }
}

// --- conversion from the wire ---

impl FromProto<l7::JwtAuthentication> for Authentication {
    fn from_proto(p: &l7::JwtAuthentication) -> Result<Self, FieldError> {
        crypto_provider().map_err(|e| FieldError::new("rules", e.to_string()))?;
        if p.namespace.is_empty() {
            return Err(FieldError::new("namespace", "is required"));
        }
        if p.name.is_empty() {
            return Err(FieldError::new("name", "is required"));
        }
        let providers = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| provider(&format!("rules[{i}]"), r))
            .collect::<Result<_, _>>()?;
        Ok(Authentication {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            providers,
        })
    }
}

fn header_name(field: String, name: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| FieldError::new(field, format!("{name:?} is not a valid header name")))
}

fn provider(path: &str, r: &l7::JwtRule) -> Result<Provider, FieldError> {
    if r.issuer.is_empty() {
        return Err(FieldError::new(format!("{path}.issuer"), "is required"));
    }
    let mut locations = Vec::new();
    for (i, h) in r.from_headers.iter().enumerate() {
        locations.push(Location::Header {
            name: header_name(format!("{path}.from_headers[{i}].name"), &h.name)?,
            prefix: h.prefix.clone(),
        });
    }
    for (i, name) in r.from_params.iter().enumerate() {
        if name.is_empty() {
            return Err(FieldError::new(
                format!("{path}.from_params[{i}]"),
                "is empty",
            ));
        }
        locations.push(Location::Param(name.clone()));
    }
    for (i, name) in r.from_cookies.iter().enumerate() {
        if name.is_empty() {
            return Err(FieldError::new(
                format!("{path}.from_cookies[{i}]"),
                "is empty",
            ));
        }
        locations.push(Location::Cookie(name.clone()));
    }
    if locations.is_empty() {
        locations.push(Location::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        });
        locations.push(Location::Param("access_token".into()));
    }
    let output_payload_to_header = match r.output_payload_to_header.as_str() {
        "" => None,
        name => Some(header_name(
            format!("{path}.output_payload_to_header"),
            name,
        )?),
    };
    let output_claim_to_headers = r
        .output_claim_to_headers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("{path}.output_claim_to_headers[{i}]");
            let name = header_name(format!("{at}.header"), &c.header)?;
            let claim: Vec<String> = c.claim.split('.').map(str::to_string).collect();
            if claim.iter().any(String::is_empty) {
                return Err(FieldError::new(
                    format!("{at}.claim"),
                    format!("{:?} is not a claim name (`a` or `a.b`)", c.claim),
                ));
            }
            Ok((name, claim))
        })
        .collect::<Result<_, _>>()?;
    let mut skipped_keys = Vec::new();
    let keys = if !r.jwks_error.is_empty() {
        Err(status::JWKS_FETCH_FAIL)
    } else {
        read_jwks(&r.jwks, &mut skipped_keys)
    };
    Ok(Provider {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        keys,
        skipped_keys,
        locations,
        forward_original_token: r.forward_original_token,
        output_payload_to_header,
        output_claim_to_headers,
    })
}

/// The usable public keys of a JWKS document; `Err` is the body tokens of
/// this issuer get (fail closed). Keys that cannot verify a signature here
/// are listed in `skipped` with why.
fn read_jwks(jwks: &str, skipped: &mut Vec<String>) -> Result<Vec<Key>, &'static str> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|_| status::JWKS_PARSE)?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let name = jwk.common.key_id.as_ref().map_or_else(
            || format!("keys[{i}]"),
            |kid| format!("keys[{i}] (kid {kid:?})"),
        );
        match read_key(jwk) {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    if keys.is_empty() {
        return Err(status::JWKS_NO_VALID_KEYS);
    }
    Ok(keys)
}

fn read_key(jwk: &Jwk) -> Result<Key, String> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("an encryption key (use: enc)".into());
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            ref other => return Err(format!("EC curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            ref other => return Err(format!("OKP curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (oct) key; only public keys are accepted".into());
        }
        _ => return Err("key type not supported".into()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => family,
        Some(alg) => {
            let alg = Algorithm::try_from(alg)
                .map_err(|_| format!("alg {alg} cannot verify a signature"))?;
            if !family.contains(&alg) {
                return Err(format!("alg {alg:?} does not fit the key type"));
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("not a valid key: {e}"))?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}

#[cfg(test)]
mod tests;
