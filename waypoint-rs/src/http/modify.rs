//! What a route changes on the way through: header modifiers, redirects,
//! URL rewrites, and the `x-forwarded-client-cert` header that carries the
//! client's identity to the destination when the waypoint's Gateway opts in
//! (never the client's own value).

use http::header::{HOST, HeaderMap, HeaderName, HeaderValue, LOCATION};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, StatusCode};
use regex::Regex;

use api::l7;

use crate::config::convert;
use crate::http::route::{PathMatch, RouteMatch};
use crate::request::{FieldError, FromProto, Refusal, ResponseFlag};

/// Why a rewrite or redirect could not produce a valid request line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the rewritten path {0:?} is not a valid request path")]
    Path(String),
    #[error("the rewritten host {0:?} is not a valid authority")]
    Host(String),
    #[error("the redirect location {0:?} is not a valid URI")]
    Location(String),
}

/// Header changes, validated (HTTPRoute RequestHeaderModifier /
/// ResponseHeaderModifier, VirtualService `headers`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl FromProto<l7::HeaderModifier> for HeaderModifier {
    fn from_proto(p: &l7::HeaderModifier) -> Result<Self, FieldError> {
        let pairs = |field: &str, headers: &[l7::Header]| {
            headers
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    Ok((
                        convert::header_name(&format!("{field}[{i}].name"), &h.name)?,
                        convert::header_value(&format!("{field}[{i}].value"), &h.value)?,
                    ))
                })
                .collect::<Result<Vec<_>, FieldError>>()
        };
        Ok(HeaderModifier {
            set: pairs("set", &p.set)?,
            add: pairs("add", &p.add)?,
            remove: p
                .remove
                .iter()
                .enumerate()
                .map(|(i, n)| convert::header_name(&format!("remove[{i}]"), n))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Removes first, then sets (replacing every value), then adds (appending),
    /// so a header that is both removed and set or added ends up present.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// How a path is replaced (redirect `path`, rewrite `path`).
#[derive(Clone, Debug)]
pub enum PathRewrite {
    /// ReplaceFullPath: the whole path (the query is kept).
    Full(String),
    /// ReplacePrefixMatch: the part of the path the route's path prefix
    /// matched is replaced.
    Prefix(String),
    /// VirtualService `uriRegexRewrite`: every match of `pattern` replaced by
    /// `substitution` (RE2 `\1` references, stored as `${1}`).
    Regex {
        pattern: Regex,
        substitution: String,
    },
}

impl PartialEq for PathRewrite {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PathRewrite::Full(a), PathRewrite::Full(b))
            | (PathRewrite::Prefix(a), PathRewrite::Prefix(b)) => a == b,
            (
                PathRewrite::Regex {
                    pattern: a,
                    substitution: x,
                },
                PathRewrite::Regex {
                    pattern: b,
                    substitution: y,
                },
            ) => a.as_str() == b.as_str() && x == y,
            _ => false,
        }
    }
}

impl FromProto<l7::PathRewrite> for PathRewrite {
    fn from_proto(p: &l7::PathRewrite) -> Result<Self, FieldError> {
        use l7::path_rewrite::Kind;
        match &p.kind {
            Some(Kind::FullPath(path)) => {
                valid_path("full_path", path)?;
                Ok(PathRewrite::Full(path.clone()))
            }
            Some(Kind::Prefix(prefix)) => {
                if !prefix.is_empty() {
                    valid_path("prefix", prefix)?;
                }
                Ok(PathRewrite::Prefix(prefix.clone()))
            }
            Some(Kind::Regex(r)) => Ok(PathRewrite::Regex {
                pattern: convert::search_regex("regex.pattern", &r.pattern)?,
                substitution: re2_substitution(&r.substitution),
            }),
            None => Err(FieldError::new(
                "kind",
                "one of full_path, prefix, regex is required",
            )),
        }
    }
}

fn valid_path(field: &str, path: &str) -> Result<(), FieldError> {
    if !path.starts_with('/') || path.contains('?') || PathAndQuery::try_from(path).is_err() {
        return Err(FieldError::new(
            field,
            format!("{path:?} is not an absolute path without query"),
        ));
    }
    Ok(())
}

/// RE2 / Envoy substitutions name groups `\1`; the `regex` crate writes
/// `${1}`. A literal `$` is escaped as `$$`.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{digits}}}"));
            }
            other => out.push(other),
        }
    }
    out
}

impl PathRewrite {
    /// The new path for `path` (without query). `matched` is the route match
    /// that held: a prefix rewrite replaces what its path match matched,
    /// with Gateway API's whole-segment rules for a segment prefix (and for
    /// no path match, which is the prefix `/`), and as a plain string for a
    /// VirtualService prefix or exact match (Envoy's `prefix_rewrite`).
    pub fn apply(&self, path: &str, matched: Option<&RouteMatch>) -> String {
        match self {
            PathRewrite::Full(p) => p.clone(),
            PathRewrite::Regex {
                pattern,
                substitution,
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
            PathRewrite::Prefix(replacement) => match matched.and_then(|m| m.path.as_ref()) {
                Some(PathMatch::Prefix { value, .. } | PathMatch::Exact { value, .. }) => {
                    format!("{replacement}{}", path.get(value.len()..).unwrap_or(""))
                }
                Some(PathMatch::SegmentPrefix { value, .. }) => {
                    join_prefix(replacement, path.get(value.len()..).unwrap_or(""))
                }
                Some(PathMatch::Regex(_)) | None => join_prefix(replacement, path),
            },
        }
    }
}

/// Gateway API ReplacePrefixMatch: `/foo` → `/` on `/foo/bar` is `/bar`,
/// `/foo` → `/xyz` on `/foo` is `/xyz`, never a doubled or missing `/`.
fn join_prefix(replacement: &str, rest: &str) -> String {
    let head = replacement.trim_end_matches('/');
    match (head.is_empty(), rest.is_empty()) {
        (true, true) => "/".to_string(),
        (_, true) => head.to_string(),
        _ if rest.starts_with('/') => format!("{head}{rest}"),
        _ => format!("{head}/{rest}"),
    }
}

/// HTTPRoute RequestRedirect / VirtualService `redirect`.
#[derive(Clone, Debug, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

impl FromProto<l7::Redirect> for Redirect {
    fn from_proto(p: &l7::Redirect) -> Result<Self, FieldError> {
        let status = match p.status_code {
            0 => StatusCode::FOUND,
            code @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(code as u16)
                .map_err(|e| FieldError::new("status_code", e.to_string()))?,
            other => {
                return Err(FieldError::new(
                    "status_code",
                    format!("{other} is not a redirect status (301, 302, 303, 307, 308)"),
                ));
            }
        };
        let scheme = match p.scheme.as_str() {
            "" => None,
            s @ ("http" | "https") => Some(s.to_string()),
            other => {
                return Err(FieldError::new(
                    "scheme",
                    format!("{other:?} is not http or https"),
                ));
            }
        };
        let hostname = (!p.hostname.is_empty())
            .then(|| {
                Authority::try_from(p.hostname.as_str())
                    .map(|_| p.hostname.clone())
                    .map_err(|_| {
                        FieldError::new("hostname", format!("{:?} is not a valid host", p.hostname))
                    })
            })
            .transpose()?;
        Ok(Redirect {
            scheme,
            hostname,
            path: convert::nested("path", p.path.as_ref())?,
            port: convert::optional_port("port", p.port)?,
            status,
        })
    }
}

impl Redirect {
    /// The redirect response for a request addressed to `request_port`,
    /// seen as `http` (mesh traffic inside HBONE is plain HTTP).
    ///
    /// Port, per Gateway API HTTPRequestRedirectFilter: the configured one;
    /// else the well-known port of a configured scheme (http 80, https 443);
    /// else the port the request was addressed to. The port is left out of
    /// `Location` when it is the scheme's well-known one.
    pub fn response<B>(
        &self,
        req: &Request<B>,
        request_port: u16,
        matched: Option<&RouteMatch>,
    ) -> Result<Refusal, Error> {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let port = match (self.port, self.scheme.as_deref()) {
            (Some(p), _) => p,
            (None, Some("https")) => 443,
            (None, Some(_)) => 80,
            (None, None) => request_port,
        };
        let host = match &self.hostname {
            Some(h) => h.clone(),
            None => request_host(req).unwrap_or_default(),
        };
        let path = match &self.path {
            Some(rewrite) => rewrite.apply(req.uri().path(), matched),
            None => req.uri().path().to_string(),
        };
        let well_known = matches!((scheme, port), ("http", 80) | ("https", 443));
        let mut location = if well_known {
            format!("{scheme}://{host}{path}")
        } else {
            format!("{scheme}://{host}:{port}{path}")
        };
        if let Some(q) = req.uri().query() {
            location.push('?');
            location.push_str(q);
        }
        let value =
            HeaderValue::from_str(&location).map_err(|_| Error::Location(location.clone()))?;
        Uri::try_from(location.as_str()).map_err(|_| Error::Location(location.clone()))?;
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, value);
        Ok(Refusal {
            status: self.status,
            body: "".into(),
            flag: ResponseFlag::None,
            headers,
        })
    }
}

/// The request's host without port: `:authority` (HTTP/2, absolute-form),
/// else `Host`.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            let host = req.headers().get(HOST)?.to_str().ok()?;
            Authority::try_from(host).ok().map(|a| a.host().to_string())
        })?;
    Some(raw)
}

/// HTTPRoute URLRewrite / VirtualService `rewrite`.
#[derive(Clone, Debug, PartialEq)]
pub struct UrlRewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathRewrite>,
}

impl FromProto<l7::UrlRewrite> for UrlRewrite {
    fn from_proto(p: &l7::UrlRewrite) -> Result<Self, FieldError> {
        let hostname = (!p.hostname.is_empty())
            .then(|| {
                Authority::try_from(p.hostname.as_str()).map_err(|_| {
                    FieldError::new("hostname", format!("{:?} is not a valid host", p.hostname))
                })?;
                convert::header_value("hostname", &p.hostname)
            })
            .transpose()?;
        Ok(UrlRewrite {
            hostname,
            path: convert::nested("path", p.path.as_ref())?,
        })
    }
}

impl UrlRewrite {
    /// Rewrites the request in place: `Host` (and the URI's authority when
    /// it has one) and the path; the query is kept.
    pub fn apply<B>(
        &self,
        req: &mut Request<B>,
        matched: Option<&RouteMatch>,
    ) -> Result<(), Error> {
        let mut parts = req.uri().clone().into_parts();
        if let Some(host) = &self.hostname {
            let text = host.to_str().unwrap_or_default();
            if parts.authority.is_some() {
                parts.authority =
                    Some(Authority::try_from(text).map_err(|_| Error::Host(text.to_string()))?);
            }
            req.headers_mut().insert(HOST, host.clone());
        }
        if let Some(rewrite) = &self.path {
            let path = rewrite.apply(req.uri().path(), matched);
            let with_query = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            parts.path_and_query =
                Some(PathAndQuery::try_from(with_query).map_err(|_| Error::Path(path))?);
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| Error::Path(e.to_string()))?;
        Ok(())
    }
}

/// `x-forwarded-client-cert`.
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The client certificate details a waypoint forwards, from the HBONE TLS
/// session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the client's leaf certificate (DER).
    pub sha256: [u8; 32],
    /// The leaf's subject, RFC 2253 form; empty for a SPIFFE certificate
    /// without one.
    pub subject: String,
    /// URI SANs (the SPIFFE id).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
}

/// Why a client's certificate could not be read for
/// `x-forwarded-client-cert`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientCertError {
    #[error("the client certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("the client certificate's subjectAltName is malformed: {0}")]
    SubjectAltName(String),
}

impl ClientCert {
    /// Reads the details Envoy's `SetCurrentClientCertDetails{Subject, URI,
    /// DNS}` forwards from a verified leaf certificate (DER): its SHA-256,
    /// its subject as OpenSSL's `XN_FLAG_RFC2253` prints it (Envoy's
    /// `Utility::getSubjectFromCertificate`), and its URI and DNS SANs.
    pub fn from_der(der: &[u8]) -> Result<ClientCert, ClientCertError> {
        use sha2::Digest;
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| ClientCertError::Parse(e.to_string()))?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| ClientCertError::SubjectAltName(e.to_string()))?;
        for name in san.iter().flat_map(|san| &san.value.general_names) {
            match name {
                GeneralName::URI(uri) => uris.push(uri.to_string()),
                GeneralName::DNSName(name) => dns.push(name.to_string()),
                _ => {}
            }
        }
        Ok(ClientCert {
            sha256: sha2::Sha256::digest(der).into(),
            subject: rfc2253(cert.subject()),
            uris,
            dns,
        })
    }
}

/// A distinguished name in RFC 2253 form: the last RDN first, RDNs joined
/// by `,`, multi-valued RDNs by `+`, known attribute types by short name
/// (`CN`, `O`, ...) else dotted OID, special characters escaped, a value
/// that is not a string as `#` and the hex of its DER.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    use x509_parser::asn1_rs::ToDer;
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let kind = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| attr.attr_type().to_id_string());
                    let value = match attr.as_str() {
                        Ok(text) => escape_rfc2253(text),
                        Err(_) => {
                            let der = attr.attr_value().to_der_vec().unwrap_or_default();
                            let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
                            format!("#{hex}")
                        }
                    };
                    format!("{kind}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 2253 section 2.4: `,` `+` `"` `\` `<` `>` `;` are escaped, and a
/// leading `#` or space and a trailing space.
fn escape_rfc2253(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `x-forwarded-client-cert` as the waypoint forwards it. Whatever the
/// client sent is never kept: in ambient the client's HTTP headers reach
/// the waypoint untouched (ztunnel is L4), so a client-sent value is the
/// application's own claim, not a proxy's, and forwarding or appending to
/// it would hand the destination forged elements.
///
/// - `client: None` (the default): the header is removed and none is sent.
///   Upstream's waypoint adds the client's identity only when opted in
///   (`xfccIncludeClientIdentityEnabled`, pilot/pkg/networking/core, whose
///   test accepts "true" in any case and nothing else).
/// - `client: Some` (the waypoint Gateway is annotated
///   `ambient.istio.io/xfcc-include-client-identity: "true"`, upstream's
///   `xfccIncludeClientIdentityEnabled`, Istio 1.30): replaced with this
///   hop's one element, `By=<waypoint URI>;Hash=<hex sha256>;Subject="..";
///   URI=..;DNS=..` (Envoy's keys and order,
///   `SetCurrentClientCertDetails{Subject, URI, DNS}`): Envoy's
///   `SANITIZE_SET`. Upstream likewise replaces any inbound value with the
///   source's identity.
pub fn set_forwarded_client_cert(
    headers: &mut HeaderMap,
    waypoint_uri: &str,
    client: Option<&ClientCert>,
) {
    // Every part is quoted or made of URI/DNS characters: always a valid
    // value; if not, no client-sent value survives either.
    match client.map(|c| HeaderValue::from_str(&client_cert_element(waypoint_uri, c))) {
        Some(Ok(value)) => {
            headers.insert(XFCC.clone(), value);
        }
        None | Some(Err(_)) => {
            headers.remove(&XFCC);
        }
    }
}

fn client_cert_element(waypoint_uri: &str, client: &ClientCert) -> String {
    use std::fmt::Write;
    let mut out = format!("By={}", xfcc_value(waypoint_uri));
    out.push_str(";Hash=");
    for b in client.sha256 {
        let _ = write!(out, "{b:02x}");
    }
    // Envoy always quotes the subject (it holds `,` and `=`).
    let _ = write!(
        out,
        ";Subject=\"{}\"",
        client.subject.replace('\\', "\\\\").replace('"', "\\\"")
    );
    for uri in &client.uris {
        let _ = write!(out, ";URI={}", xfcc_value(uri));
    }
    for dns in &client.dns {
        let _ = write!(out, ";DNS={}", xfcc_value(dns));
    }
    out
}

/// A value with `,` `;` `=` or `"` must be quoted (Envoy's XFCC grammar).
fn xfcc_value(v: &str) -> String {
    if v.contains([',', ';', '=', '"']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests;
