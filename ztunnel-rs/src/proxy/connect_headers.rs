//! The headers an HBONE CONNECT carries besides its target, as upstream
//! ztunnel sends and reads them (`OutboundConnection::create_hbone_request`,
//! `build_forwarded` and `baggage` in its `proxy/outbound.rs`;
//! `parse_forwarded_host`, `TraceParent` in `proxy.rs`;
//! `parse_baggage_header` in `baggage.rs`):
//!
//! - `baggage`: who the client is (cluster, namespace, workload, canonical
//!   service and revision, region and zone), for the server's telemetry;
//! - `forwarded`: `for="<client address>"`, and `;host=<service>` when the
//!   client addressed a Service, so the server can name the Service it was
//!   reached through when several share its port;
//! - `traceparent`: a W3C trace context, one per connection, so both sides'
//!   logs of a connection carry the same trace id.
//!
//! What a peer sends is telemetry only: the identity that policy decides on
//! is the one its certificate proves, never a header.

use std::fmt;
use std::net::SocketAddr;

use http::header::{FORWARDED, HeaderMap, HeaderName, HeaderValue};
use proxy_core::store::{Service, Workload, WorkloadType};

pub static BAGGAGE: HeaderName = HeaderName::from_static("baggage");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A W3C trace context (`traceparent`, https://www.w3.org/TR/trace-context/):
/// version 00, a random trace id and parent id, no flags set.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    pub fn random() -> Self {
        TraceParent {
            trace_id: rand::random::<u128>().max(1),
            parent_id: rand::random::<u64>().max(1),
            flags: 0,
        }
    }

    /// The header's value, `00-<32 hex>-<16 hex>-<2 hex>`.
    pub fn header(&self) -> HeaderValue {
        let value = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        );
        HeaderValue::from_str(&value).expect("hex digits and dashes are a valid header value")
    }

    /// The peer's `traceparent`, if it sent a well-formed one (version 00
    /// form; ids of all zeros are invalid per the specification).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(&TRACEPARENT)?.to_str().ok()?;
        let mut parts = value.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.next().is_some()
            || !hex(version, 2)
            || !hex(trace, 32)
            || !hex(parent, 16)
            || !hex(flags, 2)
            || version == "ff"
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        (trace_id != 0 && parent_id != 0).then_some(TraceParent {
            trace_id,
            parent_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }
}

/// The trace id alone, as logs show it.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.trace_id)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

/// The headers of an outbound CONNECT from `source` (connected from
/// `client`), to `service` when the client addressed one.
pub fn outbound(
    source: &Workload,
    cluster_id: &str,
    client: SocketAddr,
    service: Option<&Service>,
    trace: &TraceParent,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    if let Ok(value) = HeaderValue::from_str(&baggage(source, cluster_id)) {
        headers.insert(BAGGAGE.clone(), value);
    }
    let forwarded = match service {
        Some(service) => format!("for=\"{client}\";host={}", service.hostname),
        None => format!("for=\"{client}\""),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(FORWARDED, value);
    }
    headers.insert(TRACEPARENT.clone(), trace.header());
    headers
}

fn workload_type_key(kind: WorkloadType) -> &'static str {
    match kind {
        WorkloadType::Deployment => "k8s.deployment.name",
        WorkloadType::Cronjob => "k8s.cronjob.name",
        WorkloadType::Pod => "k8s.pod.name",
        WorkloadType::Job => "k8s.job.name",
    }
}

fn baggage(source: &Workload, cluster_id: &str) -> String {
    format!(
        "k8s.cluster.name={cluster_id},k8s.namespace.name={},{}={},service.name={},service.version={},cloud.region={},cloud.availability_zone={}",
        source.namespace,
        workload_type_key(source.workload_type),
        source.workload_name,
        source.canonical_name,
        source.canonical_revision,
        source.locality.region,
        source.locality.zone,
    )
}

/// What a peer's `baggage` says about it; empty values count as absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster_id: Option<String>,
    pub namespace: Option<String>,
    pub workload_name: Option<String>,
    pub service_name: Option<String>,
    pub revision: Option<String>,
}

impl Baggage {
    /// Every `baggage` header of the request (members are comma-separated,
    /// `key=value`, properties after `;` ignored); a value that is not
    /// visible ASCII is skipped, not an error.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut baggage = Baggage::default();
        for value in headers.get_all(&BAGGAGE) {
            let Ok(value) = value.to_str() else { continue };
            for member in value.split(',') {
                let member = member.split(';').next().unwrap_or_default();
                let Some((key, value)) = member.split_once('=') else {
                    continue;
                };
                let value = value.trim();
                let value = (!value.is_empty()).then(|| value.to_string());
                match key.trim() {
                    "k8s.cluster.name" => baggage.cluster_id = value,
                    "k8s.namespace.name" => baggage.namespace = value,
                    "k8s.deployment.name"
                    | "k8s.cronjob.name"
                    | "k8s.pod.name"
                    | "k8s.job.name" => baggage.workload_name = value,
                    "service.name" => baggage.service_name = value,
                    "service.version" => baggage.revision = value,
                    _ => {}
                }
            }
        }
        baggage
    }
}

/// The `host=` of the peer's `forwarded` header: the Service the client
/// addressed, as its ztunnel tells it.
pub fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(&FORWARDED)?.to_str().ok()?;
    value
        .split([';', ','])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| key.eq_ignore_ascii_case("host"))
        .map(|(_, host)| host.trim_matches('"').to_string())
        .filter(|host| !host.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_values() {
        let trace = TraceParent::random();
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT.clone(), trace.header());
        assert_eq!(TraceParent::from_headers(&headers), Some(trace));
        assert_eq!(trace.header().len(), 55);

        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-00",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "garbage",
        ] {
            headers.insert(TRACEPARENT.clone(), HeaderValue::from_static(bad));
            assert_eq!(TraceParent::from_headers(&headers), None, "{bad}");
        }
        headers.insert(
            TRACEPARENT.clone(),
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let parsed = TraceParent::from_headers(&headers).unwrap();
        assert_eq!(parsed.to_string(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn baggage_reads_upstream_keys_across_headers() {
        let mut headers = HeaderMap::new();
        headers.append(
            BAGGAGE.clone(),
            HeaderValue::from_static(
                "k8s.cluster.name=K1,k8s.namespace.name=ns1,k8s.job.name=batch;prop=1",
            ),
        );
        headers.append(
            BAGGAGE.clone(),
            HeaderValue::from_static("service.name=reviews, service.version=v2,other=x"),
        );
        assert_eq!(
            Baggage::from_headers(&headers),
            Baggage {
                cluster_id: Some("K1".into()),
                namespace: Some("ns1".into()),
                workload_name: Some("batch".into()),
                service_name: Some("reviews".into()),
                revision: Some("v2".into()),
            }
        );
        let mut empty = HeaderMap::new();
        empty.insert(
            BAGGAGE.clone(),
            HeaderValue::from_static("k8s.cluster.name=,k8s.namespace.name=,service.name"),
        );
        assert_eq!(Baggage::from_headers(&empty), Baggage::default());
    }

    #[test]
    fn outbound_headers_name_the_source_the_client_and_the_service() {
        use crate::proxy::testing::xds;
        let store = proxy_core::store::WorkloadStore::new();
        xds::apply(
            &store,
            vec![
                xds::workload("cart", "shop", "10.0.0.1")
                    .locality("eu", "eu-a", "")
                    .into(),
                xds::service("pay", "shop", "10.96.0.1", &[(80, 8080)]).into(),
            ],
        );
        let snapshot = store.snapshot();
        let source = snapshot
            .workload_by_address("", "10.0.0.1".parse().unwrap())
            .unwrap();
        let service = snapshot.services_by_hostname("pay.shop.svc.cluster.local")[0].clone();
        let trace = TraceParent::random();
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let headers = outbound(&source, "Kubernetes", client, Some(&service), &trace);
        assert_eq!(
            headers[&BAGGAGE],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=cart,service.name=cart,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-a"
        );
        assert_eq!(
            headers[FORWARDED],
            "for=\"10.0.0.1:40000\";host=pay.shop.svc.cluster.local"
        );
        assert_eq!(TraceParent::from_headers(&headers), Some(trace));
        assert_eq!(
            forwarded_host(&headers).as_deref(),
            Some("pay.shop.svc.cluster.local")
        );
        let read = Baggage::from_headers(&headers);
        assert_eq!(read.workload_name.as_deref(), Some("cart"));
        assert_eq!(read.revision.as_deref(), Some("v1"));

        let direct = outbound(&source, "Kubernetes", client, None, &trace);
        assert_eq!(direct[FORWARDED], "for=\"10.0.0.1:40000\"");
        assert_eq!(forwarded_host(&direct), None);
    }
}
