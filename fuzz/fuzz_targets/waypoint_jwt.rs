//! waypoint-rs's RequestAuthentication: JWTs in requests and the JWKS they
//! are checked with. The first input byte picks which: even, the rest is an
//! HTTP/1 request head (tokens in `authorization`, `?access_token=`, the
//! rules' headers, parameters and cookies) run through `jwt::authenticate`
//! against the fixtures' rules; odd, the rest is a JWKS document (istiod
//! fetches it from the issuer and passes it on as sent), read into a rule
//! by `Authentication::from_proto` and then used to check a token.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use waypoint_rs::http::jwt::{self, Authentication};
use waypoint_rs::request::FromProto as _;

/// A token of the fixture's shape (`RS256`, kid `k1`, the fixture's issuer), signature not valid.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIiwidHlwIjoiSldUIn0.\
eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiZnV6eiIsImV4cCI6NDEwMjQ0NDgwMH0.\
c2lnbmF0dXJl";

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let config = mesh_fuzz::waypoint_config();
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    if mode & 1 == 0 {
        let Some(request) = mesh_fuzz::http1_request(rest) else {
            return;
        };
        let (mut parts, ()) = request.into_parts();
        let _ = jwt::authenticate(&config.authentications, &mut parts, now);
        return;
    }
    let Ok(jwks) = std::str::from_utf8(rest) else {
        return;
    };
    let mut proto = config.jwt_protos[0].clone();
    for rule in &mut proto.rules {
        rule.jwks = jwks.to_string();
    }
    let Ok(authentication) = Authentication::from_proto(&proto) else {
        return;
    };
    let mut parts = http::Request::builder()
        .uri("/")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(())
        .expect("a valid request")
        .into_parts()
        .0;
    let _ = jwt::authenticate([&authentication], &mut parts, now);
});
