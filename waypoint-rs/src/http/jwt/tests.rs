use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use api::l7;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Request;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PKCS_RSA_SHA256, SigningKey};
use serde_json::{Value, json};

use super::*;
use crate::http::authorization::{self, RequestFacts};
use crate::request::{Authz, Downstream, Protocol, Target};

const ISS: &str = "https://issuer.example";
const AUD: &str = "reviews";

// --- keys and signing, independent of jsonwebtoken (rcgen / aws-lc-rs) ---

/// Reads one DER TLV at the start of `der`: (tag, content, rest).
fn tlv(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = der[0];
    let (len, start) = if der[1] & 0x80 == 0 {
        (der[1] as usize, 2)
    } else {
        let n = (der[1] & 0x7f) as usize;
        let len = der[2..2 + n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, 2 + n)
    };
    (tag, &der[start..start + len], &der[start + len..])
}

fn unsigned(int: &[u8]) -> &[u8] {
    let mut i = int;
    while i.len() > 1 && i[0] == 0 {
        i = &i[1..];
    }
    i
}

struct Signer {
    kid: &'static str,
    alg: &'static str,
    key: KeyPair,
}

impl Signer {
    fn new(kid: &'static str, alg: &'static str) -> Self {
        let sign_alg = match alg {
            "RS256" => &PKCS_RSA_SHA256,
            "ES256" => &PKCS_ECDSA_P256_SHA256,
            "EdDSA" => &PKCS_ED25519,
            _ => unreachable!(),
        };
        Signer {
            kid,
            alg,
            key: KeyPair::generate_for(sign_alg).unwrap(),
        }
    }

    /// The public JWK, without `alg` (as many issuers publish them).
    fn jwk(&self) -> Value {
        let raw = self.key.public_key_raw();
        match self.alg {
            "RS256" => {
                // PKCS#1 RSAPublicKey: SEQUENCE { n INTEGER, e INTEGER }
                let (_, seq, _) = tlv(raw);
                let (_, n, rest) = tlv(seq);
                let (_, e, _) = tlv(rest);
                json!({"kty": "RSA", "kid": self.kid, "use": "sig",
                       "n": B64.encode(unsigned(n)), "e": B64.encode(unsigned(e))})
            }
            "ES256" => json!({"kty": "EC", "kid": self.kid, "crv": "P-256",
                              "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65])}),
            "EdDSA" => {
                json!({"kty": "OKP", "kid": self.kid, "crv": "Ed25519", "x": B64.encode(raw)})
            }
            _ => unreachable!(),
        }
    }

    fn signature(&self, input: &[u8]) -> Vec<u8> {
        let sig = self.key.sign(input).unwrap();
        if self.alg != "ES256" {
            return sig;
        }
        // DER ECDSA-Sig-Value -> JWS fixed r || s.
        let (_, seq, _) = tlv(&sig);
        let (_, r, rest) = tlv(seq);
        let (_, s, _) = tlv(rest);
        let mut out = vec![0u8; 64];
        let (r, s) = (unsigned(r), unsigned(s));
        out[32 - r.len()..32].copy_from_slice(r);
        out[64 - s.len()..].copy_from_slice(s);
        out
    }

    fn token(&self, claims: Value) -> String {
        self.token_with(
            json!({"alg": self.alg, "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    fn token_with(&self, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        format!("{input}.{}", B64.encode(self.signature(input.as_bytes())))
    }
}

struct Keys {
    rsa: Signer,
    ec: Signer,
    ed: Signer,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: Signer::new("rsa-1", "RS256"),
        ec: Signer::new("ec-1", "ES256"),
        ed: Signer::new("ed-1", "EdDSA"),
    })
}

fn jwks(jwks: &[Value]) -> String {
    json!({ "keys": jwks }).to_string()
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn secs() -> i64 {
    1_800_000_000
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": [AUD, "ratings"], "azp": "web-app",
           "exp": secs() + 600, "iat": secs(), "groups": ["admins"], "verified": true, "org": {"team": "core", "level": 3}})
}

fn rule() -> l7::JwtRule {
    let k = keys();
    l7::JwtRule {
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        jwks: jwks(&[k.rsa.jwk(), k.ec.jwk(), k.ed.jwk()]),
        ..Default::default()
    }
}

fn authentication(rules: Vec<l7::JwtRule>) -> Authentication {
    Authentication::from_proto(&l7::JwtAuthentication {
        namespace: "shop".into(),
        name: "jwt".into(),
        rules,
    })
    .expect("valid authentication")
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn bearer(token: &str) -> Parts {
    parts(
        "http://reviews.shop:8080/api?x=1",
        &[("authorization", &format!("Bearer {token}"))],
    )
}

fn run(auth: &Authentication, request: &mut Parts) -> Authn {
    authenticate([auth], request, now())
}

#[test]
fn the_crypto_provider_resolves() {
    crypto_provider().expect("exactly one jsonwebtoken backend");
}

#[test]
fn valid_rs256_es256_eddsa_tokens_authenticate() {
    let auth = authentication(vec![rule()]);
    let k = keys();
    for signer in [&k.rsa, &k.ec, &k.ed] {
        let mut req = bearer(&signer.token(claims()));
        let Authn::Authenticated(a) = run(&auth, &mut req) else {
            panic!("{} token should verify", signer.alg);
        };
        assert_eq!(a.principal, "https://issuer.example/alice");
        assert_eq!(a.issuer, ISS);
        assert_eq!(a.subject, "alice");
        assert_eq!(a.audiences, vec![AUD.to_string(), "ratings".into()]);
        assert_eq!(a.presenter.as_deref(), Some("web-app"));
        assert_eq!(a.claims["groups"], json!(["admins"]));
        assert!(
            req.headers.get("authorization").is_none(),
            "the token is removed by default"
        );
    }
}

fn tamper_payload(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut c = claims();
    c["sub"] = json!("mallory");
    parts[1] = B64.encode(c.to_string());
    parts.join(".")
}

fn tamper_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = B64.decode(sig).unwrap();
    sig[5] ^= 0x01;
    format!("{input}.{}", B64.encode(sig))
}

#[test]
fn bad_tokens_get_envoys_status_and_body() {
    let k = keys();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        c
    };
    // A JWKS holding a symmetric key too: it is never used.
    let mut r = rule();
    r.jwks = jwks(&[
        k.rsa.jwk(),
        k.ec.jwk(),
        k.ed.jwk(),
        json!({"kty": "oct", "kid": "hmac-1", "k": B64.encode(b"shared-secret-shared-secret-1234")}),
    ]);
    let auth = authentication(vec![r]);
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("hmac-1".into()),
            ..jsonwebtoken::Header::new(Algorithm::HS256)
        },
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(b"shared-secret-shared-secret-1234").unwrap(),
    )
    .unwrap();
    // Alg confusion: HS256 "signed" with the RSA key's public JWK as secret,
    // claiming the RSA key's kid.
    let confusion = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("rsa-1".into()),
            ..jsonwebtoken::Header::new(Algorithm::HS256)
        },
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(k.rsa.jwk().to_string().as_bytes()).unwrap(),
    )
    .unwrap();
    let unsigned_none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "kid": "rsa-1"}).to_string()),
        B64.encode(claims().to_string())
    );
    let rows: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "tampered RS256 payload",
            tamper_payload(&k.rsa.token(claims())),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            "tampered ES256 signature",
            tamper_signature(&k.ec.token(claims())),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            "tampered EdDSA signature",
            tamper_signature(&k.ed.token(claims())),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            "signed by another key with the same kid",
            Signer {
                kid: "rsa-1",
                ..Signer::new("x", "RS256")
            }
            .token(claims()),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            "expired beyond 60 s",
            k.rsa.token(with(&|c| c["exp"] = json!(secs() - 61))),
            StatusCode::UNAUTHORIZED,
            "Jwt is expired",
        ),
        (
            "not yet valid beyond 60 s",
            k.rsa.token(with(&|c| c["nbf"] = json!(secs() + 61))),
            StatusCode::UNAUTHORIZED,
            "Jwt not yet valid",
        ),
        (
            "wrong audience",
            k.rsa.token(with(&|c| c["aud"] = json!("details"))),
            StatusCode::FORBIDDEN,
            "Audiences in Jwt are not allowed",
        ),
        (
            "no audience",
            k.rsa.token(with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            })),
            StatusCode::FORBIDDEN,
            "Audiences in Jwt are not allowed",
        ),
        (
            "unknown issuer",
            k.rsa
                .token(with(&|c| c["iss"] = json!("https://evil.example"))),
            StatusCode::UNAUTHORIZED,
            "Jwt issuer is not configured",
        ),
        (
            "alg none",
            unsigned_none,
            StatusCode::UNAUTHORIZED,
            "Jwt header [alg] is not supported",
        ),
        (
            "HS256 with a symmetric key in the JWKS",
            hs256,
            StatusCode::UNAUTHORIZED,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "alg confusion HS256 on the RSA key",
            confusion,
            StatusCode::UNAUTHORIZED,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "ES256 header naming the RSA key",
            k.ec.token_with(json!({"alg": "ES256", "kid": "rsa-1"}), claims()),
            StatusCode::UNAUTHORIZED,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "unknown kid",
            k.rsa
                .token_with(json!({"alg": "RS256", "kid": "rsa-9"}), claims()),
            StatusCode::UNAUTHORIZED,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "not a JWT",
            "abc.def".into(),
            StatusCode::UNAUTHORIZED,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
        (
            "header not JSON",
            format!(
                "{}.{}.{}",
                B64.encode("nope"),
                B64.encode("{}"),
                B64.encode("x")
            ),
            StatusCode::UNAUTHORIZED,
            "Jwt header is an invalid JSON",
        ),
        (
            "payload not base64",
            format!(
                "{}.@@.{}",
                B64.encode(r#"{"alg":"RS256"}"#),
                B64.encode("x")
            ),
            StatusCode::UNAUTHORIZED,
            "Jwt payload is an invalid Base64url encoded",
        ),
        (
            "exp not an integer",
            k.rsa.token(with(&|c| c["exp"] = json!("soon"))),
            StatusCode::UNAUTHORIZED,
            "Jwt payload [exp] field is not an integer",
        ),
    ];
    for (name, token, status, body) in rows {
        let mut req = bearer(&token);
        let Authn::Rejected(refusal) = run(&auth, &mut req) else {
            panic!("{name}: should be rejected");
        };
        assert_eq!(refusal.status, status, "{name}");
        assert_eq!(refusal.body, body, "{name}");
        assert_eq!(refusal.flag, ResponseFlag::None, "{name}");
        assert_eq!(
            refusal.headers[WWW_AUTHENTICATE],
            "Bearer realm=\"http://reviews.shop:8080/api?x=1\", error=\"invalid_token\"",
            "{name}"
        );
    }
}

#[test]
fn time_checks_allow_60_seconds_of_clock_skew() {
    let auth = authentication(vec![rule()]);
    let k = keys();
    let mut c = claims();
    c["exp"] = json!(secs() - 59);
    c["nbf"] = json!(secs() + 59);
    assert!(matches!(
        run(&auth, &mut bearer(&k.ec.token(c))),
        Authn::Authenticated(_)
    ));
    let mut zero = claims();
    zero["exp"] = json!(0);
    zero["nbf"] = json!(0);
    assert!(
        matches!(
            run(&auth, &mut bearer(&k.ec.token(zero))),
            Authn::Authenticated(_)
        ),
        "exp/nbf 0 read as absent, as Envoy"
    );
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert!(
        matches!(
            run(&auth, &mut bearer(&k.ec.token(no_exp))),
            Authn::Authenticated(_)
        ),
        "exp is checked only when present, as Envoy"
    );
}

#[test]
fn audiences_compare_without_scheme_and_trailing_slash() {
    let mut r = rule();
    r.audiences = vec!["https://reviews.example/".into()];
    let auth = authentication(vec![r]);
    let k = keys();
    for aud in [
        "reviews.example",
        "http://reviews.example",
        "https://reviews.example/",
    ] {
        let mut c = claims();
        c["aud"] = json!(aud);
        assert!(
            matches!(
                run(&auth, &mut bearer(&k.rsa.token(c))),
                Authn::Authenticated(_)
            ),
            "{aud}"
        );
    }
    let mut c = claims();
    c["aud"] = json!("reviews.example.evil");
    assert!(matches!(
        run(&auth, &mut bearer(&k.rsa.token(c))),
        Authn::Rejected(_)
    ));
}

#[test]
fn without_kid_every_fitting_key_is_tried() {
    let k = keys();
    let second_rsa = Signer::new("rsa-2", "RS256");
    let mut r = rule();
    r.jwks = jwks(&[k.rsa.jwk(), second_rsa.jwk(), k.ec.jwk()]);
    let auth = authentication(vec![r]);
    let no_kid = json!({"alg": "RS256"});
    for signer in [&k.rsa, &second_rsa] {
        let token = signer.token_with(no_kid.clone(), claims());
        assert!(matches!(
            run(&auth, &mut bearer(&token)),
            Authn::Authenticated(_)
        ));
        let Authn::Rejected(r) = run(&auth, &mut bearer(&tamper_signature(&token))) else {
            panic!("tampered token without kid must fail");
        };
        assert_eq!(r.body, "Jwt verification fails");
    }
    // A JWK's own alg restricts it.
    let mut only_ps = k.rsa.jwk();
    only_ps["alg"] = json!("PS256");
    let mut r = rule();
    r.jwks = jwks(&[only_ps]);
    let auth = authentication(vec![r]);
    let Authn::Rejected(r) = run(&auth, &mut bearer(&k.rsa.token(claims()))) else {
        panic!("an RS256 token must not verify against a PS256-only key");
    };
    assert_eq!(r.body, "Jwks doesn't have key to match kid or alg from Jwt");
}

#[test]
fn no_token_is_anonymous() {
    let auth = authentication(vec![rule()]);
    let rows = [
        parts("http://reviews.shop/api", &[]),
        parts(
            "http://reviews.shop/api",
            &[("authorization", "Basic YWxpY2U6c2VjcmV0")],
        ),
        parts("http://reviews.shop/api?token=abc", &[("x-jwt", "abc")]),
    ];
    for mut req in rows {
        assert!(matches!(run(&auth, &mut req), Authn::Anonymous));
    }
    assert!(matches!(
        authenticate([], &mut bearer("garbage"), now()),
        Authn::Anonymous
    ));
}

#[test]
fn configured_locations_are_searched_and_the_token_removed_from_header_and_param() {
    let k = keys();
    let token = k.ed.token(claims());
    let mut r = rule();
    r.from_headers = vec![l7::JwtHeader {
        name: "x-jwt".into(),
        prefix: "Token ".into(),
    }];
    r.from_params = vec!["jwt".into()];
    r.from_cookies = vec!["session".into()];
    let auth = authentication(vec![r]);

    let mut req = parts(
        "http://reviews.shop/api",
        &[("x-jwt", &format!("Token {token}"))],
    );
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
    assert!(req.headers.get("x-jwt").is_none());

    let mut req = parts(&format!("http://reviews.shop/api?a=1&jwt={token}&b=2"), &[]);
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
    assert_eq!(req.uri.to_string(), "http://reviews.shop/api?a=1&b=2");

    let mut req = parts(
        "http://reviews.shop/api",
        &[("cookie", &format!("theme=dark; session={token}"))],
    );
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
    assert!(req.headers.get("cookie").is_some(), "Envoy keeps cookies");

    // The default locations are not searched once locations are configured.
    let mut req = bearer(&token);
    assert!(matches!(run(&auth, &mut req), Authn::Anonymous));
}

#[test]
fn default_locations_are_bearer_and_access_token() {
    let auth = authentication(vec![rule()]);
    let token = keys().rsa.token(claims());
    let mut req = parts(
        &format!("http://reviews.shop/api?access_token={token}"),
        &[],
    );
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
    assert_eq!(req.uri.to_string(), "http://reviews.shop/api");
}

#[test]
fn forward_original_token_keeps_it() {
    let mut r = rule();
    r.forward_original_token = true;
    let auth = authentication(vec![r]);
    let token = keys().rsa.token(claims());
    let mut req = bearer(&token);
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
    assert_eq!(
        req.headers["authorization"],
        format!("Bearer {token}").as_str()
    );
}

#[test]
fn a_token_at_a_location_of_another_issuer_is_not_accepted() {
    let mut other = rule();
    other.issuer = "https://other.example".into();
    other.from_headers = vec![l7::JwtHeader {
        name: "x-other".into(),
        prefix: String::new(),
    }];
    let mut mine = rule();
    mine.from_headers = vec![l7::JwtHeader {
        name: "x-mine".into(),
        prefix: String::new(),
    }];
    let auth = authentication(vec![other, mine]);
    let token = keys().rsa.token(claims());
    let mut req = parts("http://reviews.shop/", &[("x-other", &token)]);
    let Authn::Rejected(r) = run(&auth, &mut req) else {
        panic!("issuer of x-other is not ours");
    };
    assert_eq!(r.body, "Jwt issuer is not configured");
    let mut req = parts("http://reviews.shop/", &[("x-mine", &token)]);
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
}

#[test]
fn claims_and_payload_are_written_to_headers_and_spoofed_ones_removed() {
    let mut r = rule();
    r.output_payload_to_header = "x-jwt-payload".into();
    r.output_claim_to_headers = vec![
        l7::ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        },
        l7::ClaimToHeader {
            header: "x-team".into(),
            claim: "org.team".into(),
        },
        l7::ClaimToHeader {
            header: "x-level".into(),
            claim: "org.level".into(),
        },
        l7::ClaimToHeader {
            header: "x-verified".into(),
            claim: "verified".into(),
        },
        l7::ClaimToHeader {
            header: "x-groups".into(),
            claim: "groups".into(),
        },
        l7::ClaimToHeader {
            header: "x-missing".into(),
            claim: "nope".into(),
        },
    ];
    let auth = authentication(vec![r]);
    let token = keys().rsa.token(claims());
    let mut req = bearer(&token);
    req.headers
        .insert("x-missing", HeaderValue::from_static("spoofed"));
    assert!(matches!(run(&auth, &mut req), Authn::Authenticated(_)));
    assert_eq!(req.headers["x-sub"], "alice");
    assert_eq!(req.headers["x-team"], "core");
    assert_eq!(req.headers["x-level"], "3");
    assert_eq!(req.headers["x-verified"], "true");
    assert!(
        req.headers.get("x-groups").is_none(),
        "a list claim sets no header, as Envoy"
    );
    assert!(req.headers.get("x-missing").is_none());
    assert_eq!(
        req.headers["x-jwt-payload"],
        token.split('.').nth(1).unwrap()
    );

    let mut anonymous = parts(
        "http://reviews.shop/",
        &[("x-sub", "admin"), ("x-jwt-payload", "e30")],
    );
    assert!(matches!(run(&auth, &mut anonymous), Authn::Anonymous));
    assert!(
        anonymous.headers.get("x-sub").is_none(),
        "a client cannot set x-sub"
    );
    assert!(anonymous.headers.get("x-jwt-payload").is_none());
}

#[test]
fn unusable_jwks_fail_closed_for_their_issuer() {
    let k = keys();
    let token = k.rsa.token(claims());
    let rows: Vec<(l7::JwtRule, &str)> = vec![
        (
            l7::JwtRule {
                jwks: String::new(),
                jwks_error: "GET https://issuer.example/jwks: 503".into(),
                ..rule()
            },
            "Jwks remote fetch is failed",
        ),
        (
            l7::JwtRule {
                jwks: "{not json".into(),
                ..rule()
            },
            "Jwks is an invalid JSON",
        ),
        (
            l7::JwtRule {
                jwks: jwks(&[json!({"kty": "oct", "k": "c2VjcmV0"})]),
                ..rule()
            },
            "Jwks doesn't have any valid public key",
        ),
        (
            l7::JwtRule {
                jwks: jwks(&[json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "use": "enc"})]),
                ..rule()
            },
            "Jwks doesn't have any valid public key",
        ),
    ];
    for (r, body) in rows {
        let auth = authentication(vec![r]);
        let Authn::Rejected(refusal) = run(&auth, &mut bearer(&token)) else {
            panic!("{body}: must reject");
        };
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refusal.body, body);
        // Still anonymous without a token: the issuer's keys do not matter then.
        assert!(matches!(
            run(&auth, &mut parts("http://reviews.shop/", &[])),
            Authn::Anonymous
        ));
    }
    let mut r = rule();
    r.jwks = jwks(&[
        k.rsa.jwk(),
        json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}),
    ]);
    let auth = authentication(vec![r]);
    assert_eq!(auth.providers[0].keys.as_ref().unwrap().len(), 1);
    assert_eq!(
        auth.providers[0].skipped_keys,
        vec![
            "keys[1] (kid \"h\"): a symmetric (oct) key; only public keys are accepted".to_string()
        ]
    );
}

#[test]
fn bad_fields_are_named_with_their_path() {
    let rows: Vec<(l7::JwtRule, &str, &str)> = vec![
        (
            l7::JwtRule {
                issuer: String::new(),
                ..rule()
            },
            "rules[1].issuer",
            "is required",
        ),
        (
            l7::JwtRule {
                from_headers: vec![l7::JwtHeader {
                    name: "bad name".into(),
                    prefix: String::new(),
                }],
                ..rule()
            },
            "rules[1].from_headers[0].name",
            "\"bad name\" is not a valid header name",
        ),
        (
            l7::JwtRule {
                from_params: vec![String::new()],
                ..rule()
            },
            "rules[1].from_params[0]",
            "is empty",
        ),
        (
            l7::JwtRule {
                output_payload_to_header: "bad name".into(),
                ..rule()
            },
            "rules[1].output_payload_to_header",
            "\"bad name\" is not a valid header name",
        ),
        (
            l7::JwtRule {
                output_claim_to_headers: vec![l7::ClaimToHeader {
                    header: "x-a".into(),
                    claim: "a..b".into(),
                }],
                ..rule()
            },
            "rules[1].output_claim_to_headers[0].claim",
            "\"a..b\" is not a claim name (`a` or `a.b`)",
        ),
    ];
    for (bad, field, reason) in rows {
        let err = Authentication::from_proto(&l7::JwtAuthentication {
            namespace: "shop".into(),
            name: "jwt".into(),
            rules: vec![rule(), bad],
        })
        .unwrap_err();
        assert_eq!(err, FieldError::new(field, reason));
    }
}

/// The issue's scenario at the decision level: an ALLOW requiring a request
/// principal; no token -> 403, invalid token -> 401, valid token -> allowed.
#[test]
fn jwt_missing_invalid_valid_with_a_required_principal() {
    let auth = authentication(vec![rule()]);
    let require = authorization::Policy::from_proto(&l7::HttpAuthorization {
        namespace: "shop".into(),
        name: "require-jwt".into(),
        action: l7::Action::Allow as i32,
        rules: vec![l7::Rule {
            from: vec![l7::RequestSource {
                request_principals: vec![api::security::StringMatch {
                    match_type: Some(api::security::string_match::MatchType::Exact(
                        "https://issuer.example/alice".into(),
                    )),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        problems: vec![],
    })
    .unwrap();
    let downstream = Downstream {
        identity: api::SpiffeId::new("cluster.local", "client-ns", "client").unwrap(),
        address: "10.1.2.3:40000".parse().unwrap(),
        connect: "10.96.0.10:8080".parse().unwrap(),
        client_cert: Default::default(),
    };
    let target = Target::Service {
        namespace: "shop".into(),
        hostname: "reviews.shop.svc.cluster.local".into(),
        port: 8080,
        protocol: Protocol::Http1,
    };
    // authenticate, then authorize: the status the client sees.
    let status = |mut req: Parts| -> StatusCode {
        let authn = authenticate([&auth], &mut req, now());
        let authenticated = match &authn {
            Authn::Rejected(r) => return r.status,
            Authn::Authenticated(a) => Some(a.as_ref()),
            Authn::Anonymous => None,
        };
        let facts = RequestFacts {
            downstream: &downstream,
            target: &target,
            destination: downstream.connect,
            method: req.method.as_str(),
            path: req.uri.path(),
            host: req.uri.host().unwrap_or_default(),
            headers: &req.headers,
            authenticated,
            sni: None,
        };
        match authorization::authorize([&require], &facts) {
            Authz::Allowed => StatusCode::OK,
            Authz::Denied { .. } => authorization::denied().status,
        }
    };
    let token = keys().rsa.token(claims());
    assert_eq!(
        status(parts("http://reviews.shop/", &[])),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(bearer(&tamper_signature(&token))),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status(bearer(&token)), StatusCode::OK);
}
