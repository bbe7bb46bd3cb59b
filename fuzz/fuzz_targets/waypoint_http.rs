//! waypoint-rs's request path: an HTTP/1 request head (as hyper parses it)
//! through what `proxy::Proxy::serve` does before it dials, in its order:
//! `x-forwarded-client-cert` sanitising, RequestAuthentication,
//! AuthorizationPolicy, routing (with redirects and direct responses),
//! then the route's header changes and URL rewrite. The configuration is
//! the fixtures' translation, read by waypoint-rs; the first input byte
//! picks the port the client addressed.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng as _;
use waypoint_rs::http::authorization::{self, RequestFacts};
use waypoint_rs::http::jwt;
use waypoint_rs::http::modify::{self, ClientCert};
use waypoint_rs::http::route::{self, Routing};
use waypoint_rs::request::{Authn, Downstream, Protocol, Target};

const PORTS: &[u16] = &[80, 8080, 9080, 443];

fuzz_target!(|data: &[u8]| {
    let Some((port, head)) = data.split_first() else {
        return;
    };
    let port = PORTS[usize::from(*port) % PORTS.len()];
    let Some(request) = mesh_fuzz::http1_request(head) else {
        return;
    };
    let config = mesh_fuzz::waypoint_config();
    let client_cert = Arc::new(ClientCert {
        uris: vec!["spiffe://cluster.local/ns/default/sa/sleep".into()],
        ..ClientCert::default()
    });
    let downstream = Downstream {
        identity: api::SpiffeId::new("cluster.local", "default", "sleep").expect("a SPIFFE id"),
        address: SocketAddr::from(([10, 0, 0, 1], 40000)),
        connect: SocketAddr::from(([10, 96, 0, 10], port)),
        client_cert: client_cert.clone(),
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for table in &config.routes {
        let target = Target::Service {
            namespace: table.service.namespace.clone(),
            hostname: table.service.hostname.clone(),
            port,
            protocol: Protocol::Http1,
        };
        let mut request = request.clone();
        // The host policies compare (`Proxy::serve` keeps the port too).
        let host = modify::request_host(&request).unwrap_or_default();
        modify::set_forwarded_client_cert(
            request.headers_mut(),
            "spiffe://cluster.local/ns/default/sa/waypoint",
            Some(&client_cert),
        );
        let (mut parts, body) = request.into_parts();
        let authenticated = match jwt::authenticate(&config.authentications, &mut parts, now) {
            Authn::Rejected(_) => continue,
            Authn::Anonymous => None,
            Authn::Authenticated(authenticated) => Some(authenticated),
        };
        let facts = RequestFacts {
            downstream: &downstream,
            target: &target,
            destination: downstream.connect,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host: &host,
            headers: &parts.headers,
            authenticated: authenticated.as_deref(),
            sni: None,
        };
        let _ = authorization::authorize(&config.policies, &facts);
        let mut request = http::Request::from_parts(parts, body);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (route, matched) = match route::route(Some(table), &target, &request, &mut rng) {
            Err(_) | Ok(Routing::Direct { .. }) => continue,
            Ok(Routing::Redirect {
                matched, redirect, ..
            }) => {
                let _ = redirect.response(&request, port, matched);
                continue;
            }
            Ok(Routing::Forward { route, matched, .. }) => (route, matched),
        };
        if let Some(route) = route {
            route.request_headers.apply(request.headers_mut());
            if let Some(rewrite) = &route.rewrite {
                let _ = rewrite.apply(&mut request, matched);
            }
        }
    }
});
