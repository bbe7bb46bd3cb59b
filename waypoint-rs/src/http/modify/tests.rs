use super::*;

fn modifier(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderModifier {
    let h = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(n, v)| l7::Header {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect()
    };
    HeaderModifier::from_proto(&l7::HeaderModifier {
        set: h(set),
        add: h(add),
        remove: remove.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap()
}

#[test]
fn header_modifier_removes_then_sets_then_adds() {
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    headers.insert("x-gone", HeaderValue::from_static("1"));
    headers.insert("x-list", HeaderValue::from_static("a"));
    modifier(
        &[("x-a", "set")],
        &[("x-list", "b"), ("x-gone", "back")],
        &["x-gone"],
    )
    .apply(&mut headers);
    assert_eq!(headers.get_all("x-a").iter().collect::<Vec<_>>(), ["set"]);
    assert_eq!(
        headers.get_all("x-list").iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(
        headers.get_all("x-gone").iter().collect::<Vec<_>>(),
        ["back"]
    );
}

fn rewrite(kind: l7::path_rewrite::Kind) -> PathRewrite {
    PathRewrite::from_proto(&l7::PathRewrite { kind: Some(kind) }).unwrap()
}

#[test]
fn path_rewrites() {
    use l7::path_rewrite::Kind::*;
    let regex = |p: &str, s: &str| {
        Regex(l7::RegexRewrite {
            pattern: p.into(),
            substitution: s.into(),
        })
    };
    // Gateway API's ReplacePrefixMatch table (HTTPPathModifier docs), then
    // VirtualService prefix/exact (plain string replacement), then regex.
    let seg = segment;
    let cases: Vec<(PathRewrite, &str, Option<RouteMatch>, &str)> = vec![
        (rewrite(FullPath("/new".into())), "/old/x", None, "/new"),
        (
            rewrite(Prefix("/xyz".into())),
            "/foo/bar",
            seg("/foo"),
            "/xyz/bar",
        ),
        (
            rewrite(Prefix("/xyz/".into())),
            "/foo/bar",
            seg("/foo"),
            "/xyz/bar",
        ),
        (
            rewrite(Prefix("/xyz".into())),
            "/foo/bar",
            seg("/foo/"),
            "/xyz/bar",
        ),
        (rewrite(Prefix("/xyz".into())), "/foo", seg("/foo"), "/xyz"),
        (
            rewrite(Prefix("/xyz".into())),
            "/foo/",
            seg("/foo"),
            "/xyz/",
        ),
        (rewrite(Prefix("".into())), "/foo/bar", seg("/foo"), "/bar"),
        (rewrite(Prefix("".into())), "/foo/", seg("/foo"), "/"),
        (rewrite(Prefix("".into())), "/foo", seg("/foo"), "/"),
        (rewrite(Prefix("/".into())), "/foo/", seg("/foo"), "/"),
        (rewrite(Prefix("/".into())), "/foo", seg("/foo"), "/"),
        // No path match: the implicit prefix `/`.
        (rewrite(Prefix("/xyz".into())), "/a", None, "/xyz/a"),
        (
            rewrite(Prefix("/x".into())),
            "/foobar",
            vs_prefix("/foo"),
            "/xbar",
        ),
        (
            rewrite(Prefix("/x/".into())),
            "/foo/bar",
            vs_prefix("/foo/"),
            "/x/bar",
        ),
        (
            rewrite(regex("^/service/([^/]+)(/.*)$", "\\2/instance/\\1")),
            "/service/foo/v1/api",
            None,
            "/v1/api/instance/foo",
        ),
        (rewrite(regex("o", "0")), "/foo", None, "/f00"),
        (rewrite(regex("x", "$1")), "/x", None, "/$1"),
    ];
    for (r, path, matched, want) in cases {
        assert_eq!(
            r.apply(path, matched.as_ref()),
            want,
            "{r:?} on {path} after {matched:?}"
        );
    }
}

fn path_match(kind: l7::path_match::Kind) -> Option<RouteMatch> {
    Some(
        RouteMatch::from_proto(&l7::RouteMatch {
            path: Some(l7::PathMatch {
                kind: Some(kind),
                ignore_case: false,
            }),
            ..Default::default()
        })
        .unwrap(),
    )
}

fn segment(prefix: &str) -> Option<RouteMatch> {
    path_match(l7::path_match::Kind::SegmentPrefix(prefix.into()))
}

fn vs_prefix(prefix: &str) -> Option<RouteMatch> {
    path_match(l7::path_match::Kind::Prefix(prefix.into()))
}

fn redirect(p: l7::Redirect) -> Redirect {
    Redirect::from_proto(&p).unwrap()
}

fn location(r: &Refusal) -> &str {
    r.headers[LOCATION].to_str().unwrap()
}

#[test]
fn redirect_follows_gateway_api_port_and_scheme_rules() {
    let req = Request::builder()
        .uri("/a/b?q=1")
        .header(HOST, "reviews:9080")
        .body(())
        .unwrap();
    let cases: Vec<(l7::Redirect, &str, u16)> = vec![
        // Nothing set: same host, the addressed port, 302.
        (l7::Redirect::default(), "http://reviews:9080/a/b?q=1", 302),
        // A scheme without port: its well-known port, left out.
        (
            l7::Redirect {
                scheme: "https".into(),
                ..Default::default()
            },
            "https://reviews/a/b?q=1",
            302,
        ),
        (
            l7::Redirect {
                scheme: "http".into(),
                ..Default::default()
            },
            "http://reviews/a/b?q=1",
            302,
        ),
        // An explicit port is kept unless well known for the scheme.
        (
            l7::Redirect {
                scheme: "https".into(),
                port: 8443,
                ..Default::default()
            },
            "https://reviews:8443/a/b?q=1",
            302,
        ),
        (
            l7::Redirect {
                port: 80,
                ..Default::default()
            },
            "http://reviews/a/b?q=1",
            302,
        ),
        (
            l7::Redirect {
                hostname: "example.com".into(),
                status_code: 301,
                path: Some(l7::PathRewrite {
                    kind: Some(l7::path_rewrite::Kind::FullPath("/x".into())),
                }),
                ..Default::default()
            },
            "http://example.com:9080/x?q=1",
            301,
        ),
        (
            l7::Redirect {
                path: Some(l7::PathRewrite {
                    kind: Some(l7::path_rewrite::Kind::Prefix("/z".into())),
                }),
                ..Default::default()
            },
            "http://reviews:9080/z/b?q=1",
            302,
        ),
    ];
    for (p, want, status) in cases {
        let r = redirect(p.clone())
            .response(&req, 9080, segment("/a").as_ref())
            .unwrap();
        assert_eq!(location(&r), want, "{p:?}");
        assert_eq!(r.status.as_u16(), status);
    }
}

#[test]
fn url_rewrite_sets_host_and_path_keeping_the_query() {
    let rw = UrlRewrite::from_proto(&l7::UrlRewrite {
        hostname: "ratings.internal".into(),
        path: Some(l7::PathRewrite {
            kind: Some(l7::path_rewrite::Kind::Prefix("/v2".into())),
        }),
    })
    .unwrap();
    let mut req = Request::builder()
        .uri("/v1/items?id=3")
        .header(HOST, "ratings")
        .body(())
        .unwrap();
    rw.apply(&mut req, segment("/v1").as_ref()).unwrap();
    assert_eq!(req.uri().to_string(), "/v2/items?id=3");
    assert_eq!(req.headers()[HOST], "ratings.internal");

    let mut h2 = Request::builder()
        .uri("http://ratings:9080/v1")
        .body(())
        .unwrap();
    rw.apply(&mut h2, segment("/v1").as_ref()).unwrap();
    assert_eq!(h2.uri().to_string(), "http://ratings.internal/v2");
}

#[test]
fn invalid_modifiers_name_the_field() {
    let cases: Vec<(Result<(), FieldError>, &str)> = vec![
        (
            HeaderModifier::from_proto(&l7::HeaderModifier {
                add: vec![l7::Header {
                    name: "x".into(),
                    value: "a\nb".into(),
                }],
                ..Default::default()
            })
            .map(drop),
            "add[0].value",
        ),
        (
            HeaderModifier::from_proto(&l7::HeaderModifier {
                remove: vec!["".into()],
                ..Default::default()
            })
            .map(drop),
            "remove[0]",
        ),
        (
            Redirect::from_proto(&l7::Redirect {
                scheme: "ftp".into(),
                ..Default::default()
            })
            .map(drop),
            "scheme",
        ),
        (
            Redirect::from_proto(&l7::Redirect {
                path: Some(l7::PathRewrite {
                    kind: Some(l7::path_rewrite::Kind::FullPath("x".into())),
                }),
                ..Default::default()
            })
            .map(drop),
            "path.full_path",
        ),
        (
            UrlRewrite::from_proto(&l7::UrlRewrite {
                path: Some(l7::PathRewrite {
                    kind: Some(l7::path_rewrite::Kind::Regex(l7::RegexRewrite {
                        pattern: "[".into(),
                        substitution: "".into(),
                    })),
                }),
                ..Default::default()
            })
            .map(drop),
            "path.regex.pattern",
        ),
        (
            UrlRewrite::from_proto(&l7::UrlRewrite {
                hostname: "a b".into(),
                ..Default::default()
            })
            .map(drop),
            "hostname",
        ),
    ];
    for (r, field) in cases {
        assert_eq!(r.unwrap_err().field, field);
    }
}

#[test]
fn xfcc_replaces_what_the_client_sent_with_this_hop() {
    let client = ClientCert {
        sha256: [0xab; 32],
        subject: "".into(),
        uris: vec!["spiffe://cluster.local/ns/default/sa/sleep".into()],
        dns: vec![],
    };
    let by = "spiffe://cluster.local/ns/default/sa/waypoint";
    let mut headers = HeaderMap::new();
    set_forwarded_client_cert(&mut headers, by, Some(&client));
    let want = format!(
        "By=spiffe://cluster.local/ns/default/sa/waypoint;Hash={};Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/sleep",
        "ab".repeat(32)
    );
    assert_eq!(headers[&XFCC], want.as_str());

    // A forged element (and a second header line) from the client is gone.
    let mut forwarded = HeaderMap::new();
    forwarded.append(
        XFCC.clone(),
        HeaderValue::from_static("By=spiffe://a;URI=spiffe://cluster.local/ns/admin/sa/admin"),
    );
    forwarded.append(XFCC.clone(), HeaderValue::from_static("URI=spiffe://b"));
    set_forwarded_client_cert(
        &mut forwarded,
        by,
        Some(&ClientCert {
            subject: "CN=x,O=y".into(),
            dns: vec!["a.example".into()],
            ..client
        }),
    );
    let values: Vec<_> = forwarded.get_all(&XFCC).iter().collect();
    assert_eq!(values.len(), 1);
    let v = values[0].to_str().unwrap();
    assert!(
        v.starts_with("By=spiffe://cluster.local/ns/default/sa/waypoint;Hash="),
        "{v}"
    );
    assert!(
        v.ends_with(
            ";Subject=\"CN=x,O=y\";URI=spiffe://cluster.local/ns/default/sa/sleep;DNS=a.example"
        ),
        "{v}"
    );
}

#[test]
fn xfcc_not_opted_in_removes_what_the_client_sent_and_adds_none() {
    let mut headers = HeaderMap::new();
    headers.append(
        XFCC.clone(),
        HeaderValue::from_static("By=spiffe://a;URI=spiffe://cluster.local/ns/admin/sa/admin"),
    );
    headers.append(XFCC.clone(), HeaderValue::from_static("URI=spiffe://b"));
    headers.insert("x-other", HeaderValue::from_static("kept"));
    set_forwarded_client_cert(
        &mut headers,
        "spiffe://cluster.local/ns/default/sa/waypoint",
        None,
    );
    assert!(!headers.contains_key(&XFCC), "{headers:?}");
    assert_eq!(headers["x-other"], "kept");

    // Nothing sent: nothing added.
    let mut empty = HeaderMap::new();
    set_forwarded_client_cert(&mut empty, "spiffe://w", None);
    assert!(empty.is_empty(), "{empty:?}");
}

#[test]
fn client_cert_reads_hash_subject_and_sans_from_the_leaf() {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    let mut params = CertificateParams::new(vec!["a.example".to_string()]).unwrap();
    // Written in this order: O, then CN.
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Acme, Inc");
    params
        .distinguished_name
        .push(DnType::CommonName, "#client");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/default/sa/sleep"
            .try_into()
            .unwrap(),
    ));
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der();

    let read = ClientCert::from_der(der).unwrap();
    use sha2::Digest;
    assert_eq!(read.sha256, <[u8; 32]>::from(sha2::Sha256::digest(der)));
    // RFC 2253: last RDN first, specials escaped.
    assert_eq!(read.subject, "CN=\\#client,O=Acme\\, Inc");
    assert_eq!(read.uris, ["spiffe://cluster.local/ns/default/sa/sleep"]);
    assert_eq!(read.dns, ["a.example"]);

    assert!(matches!(
        ClientCert::from_der(b"not a certificate"),
        Err(ClientCertError::Parse(_))
    ));
}

#[test]
fn rfc2253_escapes_specials_and_edges() {
    assert_eq!(escape_rfc2253("plain"), "plain");
    assert_eq!(
        escape_rfc2253("a,b+c;d<e>f\"g\\"),
        "a\\,b\\+c\\;d\\<e\\>f\\\"g\\\\"
    );
    assert_eq!(escape_rfc2253(" lead and trail "), "\\ lead and trail\\ ");
    assert_eq!(escape_rfc2253("#x#"), "\\#x#");
}

#[test]
fn xfcc_quotes_values_with_separators() {
    assert_eq!(xfcc_value("spiffe://a/b"), "spiffe://a/b");
    assert_eq!(xfcc_value("a,b"), "\"a,b\"");
    assert_eq!(xfcc_value("a\"b;"), "\"a\\\"b;\"");
}
