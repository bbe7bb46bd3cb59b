//! Harness shared by the fuzz targets: how raw fuzzer bytes are framed into
//! the inputs the products read (an HTTP/1 request head, a list of
//! messages), a runtime for the entry points that need one, and the fixed
//! configurations requests are run against, taken from istiod-rs's own
//! translation of its test fixtures. No product logic lives here: every
//! target hands its input to the product's own function.

use std::sync::OnceLock;

use istiod_rs::index::{self, MeshConfig, Translation};
use istiod_rs::state::ClusterState;

/// Cluster states from istiod-rs's fixture tests, for the waypoint's
/// configuration and the seed corpus.
pub const FIXTURES: &[(&str, &str)] = &[
    (
        "workload-api-fields",
        include_str!("../../istiod-rs/tests/fixtures/workload-api-fields/input.yaml"),
    ),
    (
        "authz-matches",
        include_str!("../../istiod-rs/tests/fixtures/authz-matches/input.yaml"),
    ),
    (
        "service-entry",
        include_str!("../../istiod-rs/tests/fixtures/service-entry/input.yaml"),
    ),
    (
        "l7-http-route-headers",
        include_str!("../../istiod-rs/tests/fixtures/l7-http-route-headers/input.yaml"),
    ),
    (
        "l7-virtual-service",
        include_str!("../../istiod-rs/tests/fixtures/l7-virtual-service/input.yaml"),
    ),
    (
        "l7-authz-fields",
        include_str!("../../istiod-rs/tests/fixtures/l7-authz-fields/input.yaml"),
    ),
    (
        "l7-jwt-inline",
        include_str!("../../istiod-rs/tests/fixtures/l7-jwt-inline/input.yaml"),
    ),
];

/// istiod-rs's translation of one fixture, as istiod serves it.
pub fn translate(yaml: &str) -> Translation {
    let manifest = api::manifest::parse(yaml).expect("the fixtures parse");
    index::translate(
        &ClusterState::from_objects(manifest.objects),
        &MeshConfig::default(),
    )
}

/// The resources of `type_url` in one fixture's translation, named and
/// versioned as istiod-rs serves them.
pub fn resources_of(yaml: &str, type_url: &str) -> Vec<api::discovery::Resource> {
    translate(yaml)
        .snapshot
        .of_type(type_url)
        .values()
        .map(|r| api::discovery::Resource {
            name: r.name.clone(),
            version: r.version.clone(),
            resource: Some(r.body.clone()),
            ..Default::default()
        })
        .collect()
}

/// [`resources_of`] every fixture.
pub fn fixture_resources(type_url: &str) -> Vec<api::discovery::Resource> {
    FIXTURES
        .iter()
        .flat_map(|(_, yaml)| resources_of(yaml, type_url))
        .collect()
}

/// A workload store holding every fixture's workloads, services and
/// policies, filled through the xDS client as istiod-rs would fill it.
pub fn fixture_workload_store() -> proxy_core::store::WorkloadStore {
    let store = proxy_core::store::WorkloadStore::new();
    let mut client = proxy_core::xds::handlers::subscribe_store(idle_xds_client(), &store);
    for type_url in [api::type_url::ADDRESS, api::type_url::AUTHORIZATION] {
        client.handle(api::discovery::DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            resources: fixture_resources(type_url),
            ..Default::default()
        });
    }
    store
}

/// One runtime for the whole process: entry points that spawn (a lazily
/// connecting gRPC channel) or are async run on it.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// An xDS client whose channel never connects: only its response handling
/// is driven.
pub fn idle_xds_client() -> proxy_core::xds::XdsClient {
    let _entered = runtime().enter();
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
    proxy_core::xds::XdsClient::new(channel, proxy_core::xds::XdsConfig::new("fuzz"))
}

/// Decodes `data` as a DeltaDiscoveryResponse, gives every resource
/// `type_url` (so a target spends its time on one type's decoding), and
/// applies it to a new workload store through the xDS client, as a proxy
/// applies istiod's responses. `None` when `data` is not a response.
pub fn apply_to_store(data: &[u8], type_url: &str) -> Option<proxy_core::store::WorkloadStore> {
    use prost::Message as _;
    let mut response = api::discovery::DeltaDiscoveryResponse::decode(data).ok()?;
    response.type_url = type_url.to_string();
    for resource in &mut response.resources {
        if let Some(body) = &mut resource.resource {
            body.type_url = type_url.to_string();
        }
    }
    let store = proxy_core::store::WorkloadStore::new();
    let mut client = proxy_core::xds::handlers::subscribe_store(idle_xds_client(), &store);
    client.handle(response);
    Some(store)
}

/// A request head as hyper's HTTP/1 server reads it (httparse, then
/// `http::Request`): `None` for what hyper would answer 400 itself.
pub fn http1_request(data: &[u8]) -> Option<http::Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut headers);
    head.parse(data).ok()?;
    let mut builder = http::Request::builder()
        .method(head.method?)
        .uri(head.path?);
    for header in head.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    builder.body(()).ok()
}

/// Splits `data` into messages, each prefixed with its length (two bytes,
/// big-endian): a conversation of several messages from one fuzzer input.
pub fn messages(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let [a, b, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
        out.push(&rest[..len]);
        data = &rest[len..];
    }
    out
}

/// The inverse of [`messages`], for the seed corpus.
pub fn frame(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let len = u16::try_from(m.len()).expect("a seed message is under 64 KiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// The waypoint's L7 configuration from every fixture's translation, read
/// with waypoint-rs's own `FromProto` as its xDS handlers read it.
pub struct WaypointConfig {
    pub routes: Vec<waypoint_rs::http::route::RouteTable>,
    pub policies: Vec<waypoint_rs::http::authorization::Policy>,
    pub authentications: Vec<waypoint_rs::http::jwt::Authentication>,
    /// The JwtAuthentication resources as sent, for targets that replace a
    /// part of them.
    pub jwt_protos: Vec<api::l7::JwtAuthentication>,
}

pub fn waypoint_config() -> &'static WaypointConfig {
    use waypoint_rs::request::FromProto as _;

    fn read<P: prost::Message + Default>(type_url: &str) -> Vec<P> {
        fixture_resources(type_url)
            .into_iter()
            .filter_map(|r| P::decode(r.resource?.value.as_slice()).ok())
            .collect()
    }
    static CONFIG: OnceLock<WaypointConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let jwt_protos: Vec<api::l7::JwtAuthentication> = read(api::type_url::JWT_AUTHENTICATION);
        let config = WaypointConfig {
            routes: read::<api::l7::RouteTable>(api::type_url::ROUTE_TABLE)
                .iter()
                .map(waypoint_rs::http::route::RouteTable::from_proto)
                .collect::<Result<_, _>>()
                .expect("the fixtures' route tables read"),
            policies: read::<api::l7::HttpAuthorization>(api::type_url::HTTP_AUTHORIZATION)
                .iter()
                .map(waypoint_rs::http::authorization::Policy::from_proto)
                .collect::<Result<_, _>>()
                .expect("the fixtures' authorizations read"),
            authentications: jwt_protos
                .iter()
                .map(waypoint_rs::http::jwt::Authentication::from_proto)
                .collect::<Result<_, _>>()
                .expect("the fixtures' authentications read"),
            jwt_protos,
        };
        assert!(
            !config.routes.is_empty()
                && !config.policies.is_empty()
                && !config.authentications.is_empty(),
            "the fixtures hold routes, authorizations and authentications"
        );
        config
    })
}
