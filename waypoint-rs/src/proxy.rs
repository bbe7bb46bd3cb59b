//! One HTTP request through the waypoint, the order of its steps in
//! [`Proxy::serve`]: the request carries who asked ([`Downstream`], from the
//! HBONE session) → the served target's refusal → JWT authentication →
//! authorization → route → fault → request changes → destination with its
//! DestinationRule (subset, balancer, outlier detection) → circuit breaker
//! → upgrade (WebSocket / CONNECT) or forward with retries and timeouts →
//! response changes; the answer is observed on its way back for metrics
//! and the access log. The decisions are the pure modules `http::*`,
//! `balance` and `config`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use proxy_core::store::{NamespacedHostname, Snapshot, WorkloadStore};
use proxy_core::xds::OnDemand;
use tokio::sync::OwnedSemaphorePermit;

use crate::access_log;
use crate::balance::{DestinationBalancer, LoadBalancer};
use crate::config::{L7Store, Policy, Served};
use crate::http::authorization::{self, RequestFacts};
use crate::http::jwt;
use crate::http::modify;
use crate::http::route::{self, Routing};
use crate::inbound::Unserved;
use crate::metrics::{HttpLabels, Metrics, Peers};
use crate::request::{Authn, Authz, Downstream, Protocol, Refusal, ResponseFlag, Target};
use crate::upstream::retry::{self, Head};
use crate::upstream::{
    Body, BoxError, Clients, Destination, Endpoint, Error, Limits, RequestBody, RetryPolicy,
    Upstream, UpstreamConfig,
};

/// The data path's settings (from [`crate::args::WaypointArgs`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProxyConfig {
    /// The network the waypoint's addresses are looked up in.
    pub network: String,
    pub cluster_id: String,
    pub protocol_detection_timeout: Duration,
    pub drain_deadline: Duration,
    pub upstream: UpstreamConfig,
}

/// The request path's shared state.
pub struct Proxy {
    pub store: WorkloadStore,
    pub l7: L7Store,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub config: ProxyConfig,
    /// The waypoint's SPIFFE URI, `By=` of `x-forwarded-client-cert`.
    own_uri: String,
    /// Looks up clients outside this waypoint's scope (their metric labels).
    on_demand: Option<OnDemand>,
    /// Per (service, port, subset): the effective DestinationRule policy and
    /// the balancer built for it (rebuilt when the policy changes).
    balancers: Mutex<HashMap<BalancerKey, (Policy, Arc<DestinationBalancer>)>>,
}

/// A destination as balanced: service key, port, subset.
type BalancerKey = (String, u16, Option<String>);

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(
        store: WorkloadStore,
        l7: L7Store,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        config: ProxyConfig,
        on_demand: Option<OnDemand>,
    ) -> Self {
        Proxy {
            own_uri: upstream.identity().to_string(),
            on_demand,
            store,
            l7,
            upstream,
            metrics,
            config,
            balancers: Mutex::new(HashMap::new()),
        }
    }

    /// What a CONNECT to `authority` reaches: what the `Waypoint`
    /// resources istiod serves list, with their L7 rules. Before istiod
    /// has served any, nothing is served ([`Unserved::NoConfiguration`]):
    /// the workload API alone would forward traffic without its rules.
    pub fn served(&self, authority: SocketAddr) -> Result<Served, Unserved> {
        let l7 = self.l7.snapshot();
        if l7.waypoints().next().is_none() {
            return Err(Unserved::NoConfiguration(authority));
        }
        l7.served(authority, &self.store.snapshot())
            .ok_or(Unserved::NotListed(authority))
    }

    /// Asks istiod for the workload at a client's address when the store
    /// lacks it: istiod sends a waypoint only what it serves, so its
    /// clients are unknown until looked up (`<network>/<ip>`, answered with
    /// the workload or as removed). Non-blocking: requests that arrive
    /// before the answer get `unknown` source workload labels (the
    /// principal, from the client's certificate, is always known).
    pub fn look_up_client(&self, ip: std::net::IpAddr) {
        let Some(on_demand) = &self.on_demand else {
            return;
        };
        let network = &self.config.network;
        if self
            .store
            .snapshot()
            .workload_by_address(network, ip)
            .is_none()
        {
            on_demand.request(api::type_url::ADDRESS, format!("{network}/{ip}"));
        }
    }

    /// Answers one request, in this order: the target's refusal (deny-all,
    /// missing configuration) -> RequestAuthentication (401) ->
    /// AuthorizationPolicy (403) -> route (404 `NR`, redirect, direct
    /// response) -> fault injection -> request header changes and rewrite
    /// -> destination, load balancing and outlier detection -> circuit
    /// breaker -> tries with timeouts and retries -> response header
    /// changes.
    pub async fn serve(
        self: Arc<Self>,
        downstream: Downstream,
        served: Arc<Served>,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let snapshot = self.store.snapshot();
        let mut record = Record::new(&self, &snapshot, &downstream, &request);
        request.extensions_mut().insert(downstream.clone());
        // Until a backend is chosen, requests count against the service
        // the client addressed.
        if let Target::Service {
            namespace,
            hostname,
            ..
        } = &served.target
        {
            record.peers.service = snapshot.service(&NamespacedHostname::new(namespace, hostname));
        }
        if let Some(unservable) = &served.refusal {
            record.error = Some(unservable.to_string());
            return record.refuse(unservable.refusal());
        }

        // As Envoy's connection manager does before any filter: policies
        // and the destination see this hop's value (or none), never the
        // client's.
        modify::set_forwarded_client_cert(
            request.headers_mut(),
            &self.own_uri,
            served
                .forward_client_identity
                .then_some(&*downstream.client_cert),
        );
        let (mut parts, body) = request.into_parts();
        let authn = jwt::authenticate(
            served.authentications.iter().map(|a| a.as_ref()),
            &mut parts,
            SystemTime::now(),
        );
        let authenticated = match authn {
            Authn::Rejected(refusal) => return record.refuse(refusal),
            Authn::Anonymous => None,
            Authn::Authenticated(authenticated) => Some(authenticated),
        };
        let facts = RequestFacts {
            downstream: &downstream,
            target: &served.target,
            destination: downstream.connect,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host: &record.authority,
            headers: &parts.headers,
            authenticated: authenticated.as_deref(),
            sni: None,
        };
        let policies = served.authorizations.iter().map(|p| p.as_ref());
        if let Authz::Denied { policy } = authorization::authorize(policies, &facts) {
            record.error = Some(format!("denied by {policy}"));
            return record.refuse(authorization::denied());
        }
        let mut request = Request::from_parts(parts, body);

        let routing = route::route(
            served.routes.as_deref(),
            &served.target,
            &request,
            &mut rand::rng(),
        );
        let (route, matched, backend, destination) = match routing {
            Err(refusal) => return record.refuse(refusal),
            Ok(Routing::Redirect {
                matched, redirect, ..
            }) => {
                return match redirect.response(&request, served.target.port(), matched) {
                    Ok(refusal) => record.refuse(refusal),
                    Err(error) => {
                        record.error = Some(error.to_string());
                        record.local_reply(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "",
                            ResponseFlag::None,
                        )
                    }
                };
            }
            Ok(Routing::Direct { status, body, .. }) => return record.direct(status, body),
            Ok(Routing::Forward {
                route,
                matched,
                backend,
                destination,
            }) => (route, matched, backend, destination),
        };

        if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
            let injection = fault.decide(&mut rand::rng());
            if let Some(delay) = injection.delay {
                record.flag = ResponseFlag::DelayInjected;
                tokio::time::sleep(delay).await;
            }
            if let Some(abort) = injection.abort {
                return record.refuse(abort);
            }
        }

        if let Some(route) = route {
            route.request_headers.apply(request.headers_mut());
            if let Some(rewrite) = &route.rewrite
                && let Err(error) = rewrite.apply(&mut request, matched)
            {
                record.error = Some(error.to_string());
                return record.local_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "",
                    ResponseFlag::None,
                );
            }
        }
        if let Some(backend) = backend {
            backend.request_headers.apply(request.headers_mut());
        }

        let destination = match self.destination(&snapshot, &destination, &request, &downstream) {
            Ok(destination) => destination,
            Err(error) => return record.local_reply(error.status(), error.body(), error.flag()),
        };
        record.peers.service = destination.service.clone();
        let permit = match self.upstream.admit(&destination) {
            Ok(permit) => permit,
            Err(error) => return record.local_reply(error.status(), error.body(), error.flag()),
        };
        if is_upgrade(&request) {
            return self.upgrade(record, &destination, request, permit).await;
        }
        let (parts, body) = request.into_parts();
        let body = Counted::new(body, record.received.clone()).boxed();
        let config = &self.config.upstream;
        let body = match RequestBody::prepare(body, config.retry_buffer_limit).await {
            Ok(body) => body,
            Err(error) => return record.local_reply(error.status(), error.body(), error.flag()),
        };
        // The client's protocol, unless the DestinationRule upgrades
        // HTTP/1.1 to HTTP/2 (`h2UpgradePolicy: UPGRADE`).
        let http2 =
            parts.version == Version::HTTP_2 || destination.limits.settings.upgrade_to_http2;
        let head = upstream_head(&parts, &served.target, http2);
        if let Some(route) = route {
            self.mirror(route, &snapshot, &served.target, &head, &body, &downstream);
        }
        let timeouts = route.map(|r| r.timeouts).unwrap_or_default();
        let retry = route
            .and_then(|r| r.retry.as_ref())
            .map(|r| RetryPolicy::from_route(r, config.retry.backoff))
            .unwrap_or_else(|| config.retry.clone());
        let tries = retry::forward(
            &self.upstream,
            &destination,
            head,
            body,
            &retry,
            timeouts.per_try.or(config.per_try_timeout),
        );
        let forwarded = match timeouts.request.or(config.request_timeout) {
            Some(timeout) => match tokio::time::timeout(timeout, tries).await {
                Ok(forwarded) => forwarded,
                Err(_) => {
                    let error = Error::RequestTimeout { timeout };
                    return record.local_reply(error.status(), error.body(), error.flag());
                }
            },
            None => tries.await,
        };
        match forwarded {
            Ok(forwarded) => {
                record.peers.destination = Some(forwarded.endpoint);
                if forwarded.flag != ResponseFlag::None {
                    record.flag = forwarded.flag;
                }
                let mut response = forwarded.response;
                if let Some(route) = route {
                    route.response_headers.apply(response.headers_mut());
                }
                if let Some(backend) = backend {
                    backend.response_headers.apply(response.headers_mut());
                }
                record.respond(response, Some(permit))
            }
            Err(failure) => {
                record.peers.destination = failure.endpoint;
                record.error = Some(failure.error.to_string());
                record.local_reply(failure.error.status(), failure.error.body(), failure.flag)
            }
        }
    }

    /// Sends a copy of the request to each of the route's mirrors drawn for
    /// it, without waiting and without retries; the answers are dropped.
    /// The copy's authority gets `-shadow` appended, as Envoy's request
    /// mirror policy does, so the mirror can tell. A streaming body (not
    /// replayable) is not mirrored.
    fn mirror(
        self: &Arc<Self>,
        route: &route::Route,
        snapshot: &Snapshot,
        target: &Target,
        head: &Head,
        body: &RequestBody,
        downstream: &Downstream,
    ) {
        for mirror in &route.mirrors {
            if !mirror.sampled(&mut rand::rng()) {
                continue;
            }
            let Some(copy) = body.copy() else {
                return;
            };
            let backend = route::Destination::Service {
                service: mirror.backend.service.clone(),
                port: mirror.backend.port.unwrap_or(target.port()),
                subset: mirror.backend.subset.clone(),
            };
            let request = Request::new(());
            let Ok(destination) = self.destination(snapshot, &backend, &request, downstream) else {
                continue;
            };
            let mut head = head.clone();
            shadow_authority(&mut head);
            let proxy = self.clone();
            tokio::spawn(async move {
                let once = RetryPolicy {
                    attempts: 0,
                    ..proxy.config.upstream.retry.clone()
                };
                let per_try = proxy.config.upstream.per_try_timeout;
                let sent =
                    retry::forward(&proxy.upstream, &destination, head, copy, &once, per_try);
                if let Err(failure) = sent.await {
                    tracing::debug!(error = %failure.error, "mirrored request failed");
                }
            });
        }
    }

    /// The endpoints a routing decision sends to, with the destination's
    /// DestinationRule applied: subset, load balancer, outlier detection,
    /// connection pool.
    pub(crate) fn destination<B>(
        &self,
        snapshot: &Snapshot,
        destination: &route::Destination,
        request: &Request<B>,
        downstream: &Downstream,
    ) -> Result<Destination, Error> {
        let (service, port, subset) = match destination {
            route::Destination::Workload { uid, port } => {
                let target = Target::Workload {
                    uid: uid.clone(),
                    port: *port,
                    protocol: Protocol::Detect,
                };
                let limits = self.upstream.limits(&format!("{uid}:{port}"), None);
                return resolve(snapshot, &target, limits);
            }
            route::Destination::Service {
                service,
                port,
                subset,
            } => (service, *port, subset),
        };
        let target = Target::Service {
            namespace: service.namespace.clone(),
            hostname: service.hostname.clone(),
            port,
            protocol: Protocol::Detect,
        };
        let l7 = self.l7.snapshot();
        let traffic = l7.traffic_policy(service);
        let policy = traffic
            .map(|t| t.effective(port, subset.as_deref()))
            .unwrap_or_default();
        // Envoy's cluster: the service port, and the subset when routed to.
        let key = match subset {
            Some(subset) => format!("{service}:{port}#{subset}"),
            None => format!("{service}:{port}"),
        };
        let limits = self.upstream.limits(&key, policy.connection_pool.as_ref());
        let mut resolved = resolve(snapshot, &target, limits)?;
        if let Some(subset) = subset {
            // A subset the DestinationRule does not define selects nothing.
            let members = traffic.and_then(|t| t.subset(subset));
            resolved
                .endpoints
                .retain(|e| members.is_some_and(|m| m.workload_uids.contains(&e.workload.uid)));
        }
        resolved.hash = match policy.load_balancer() {
            LoadBalancer::ConsistentHash(hash) => hash.key.hash(request, downstream.address.ip()),
            LoadBalancer::Simple(_) => None,
        };
        resolved.balancer = Some(self.balancer(service.to_string(), port, subset.clone(), policy));
        Ok(resolved)
    }

    fn balancer(
        &self,
        service: String,
        port: u16,
        subset: Option<String>,
        policy: Policy,
    ) -> Arc<DestinationBalancer> {
        let mut balancers = self.balancers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = balancers.entry((service, port, subset)).or_insert_with(|| {
            let balancer = DestinationBalancer::new(&policy, Instant::now());
            (policy.clone(), Arc::new(balancer))
        });
        if entry.0 != policy {
            *entry = (
                policy.clone(),
                Arc::new(DestinationBalancer::new(&policy, Instant::now())),
            );
        }
        entry.1.clone()
    }

    /// A WebSocket (or other) upgrade or an HTTP/1.1 CONNECT: forwarded on
    /// a connection of its own; once the endpoint agrees, the two upgraded
    /// streams are spliced.
    async fn upgrade(
        &self,
        mut record: Record,
        destination: &Destination,
        mut request: Request<Incoming>,
        permit: OwnedSemaphorePermit,
    ) -> Response<Body> {
        let (endpoint, _picked) = match self.upstream.pick(destination, &[]) {
            Ok(picked) => picked,
            Err(error) => return record.local_reply(error.status(), error.body(), error.flag()),
        };
        record.peers.destination = Some(endpoint.workload.clone());
        // The upgraded stream holds a connection of its own to the end.
        let connection = match destination.limits.open_connection_now() {
            Ok(connection) => connection,
            Err(error) => return record.local_reply(error.status(), error.body(), error.flag()),
        };
        let client_side = hyper::upgrade::on(&mut request);
        let (parts, _) = request.into_parts();
        let mut head = parts.clone_head();
        // CONNECT keeps its authority-form target.
        if parts.method != Method::CONNECT {
            head.uri = origin_form(&parts.uri);
        }
        head.version = Version::HTTP_11;
        let forwarded = match self.upgrade_request(destination, endpoint, head).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(?error, "upgrade failed");
                record.error = Some(error.to_string());
                return record.local_reply(error.status(), error.body(), error.flag());
            }
        };
        let mut response = forwarded;
        let agreed = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (parts.method == Method::CONNECT && response.status().is_success());
        if agreed {
            let endpoint_side = hyper::upgrade::on(&mut response);
            let received = record.received.clone();
            let sent = record.sent_upgraded.clone();
            tokio::spawn(async move {
                let _permit = (permit, connection);
                let (Ok(client), Ok(server)) = tokio::join!(client_side, endpoint_side) else {
                    return;
                };
                let mut client = TokioIo::new(client);
                let mut server = TokioIo::new(server);
                if let Ok((up, down)) =
                    tokio::io::copy_bidirectional(&mut client, &mut server).await
                {
                    received.fetch_add(up, Ordering::Relaxed);
                    sent.fetch_add(down, Ordering::Relaxed);
                }
            });
        }
        let (parts, body) = response.into_parts();
        record.respond(
            Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed()),
            None,
        )
    }

    async fn upgrade_request(
        &self,
        destination: &Destination,
        endpoint: &Endpoint,
        head: Head,
    ) -> Result<Response<Incoming>, Error> {
        let stream = self.upstream.tunnel(endpoint, &destination.limits).await?;
        let request = head.request(empty());
        Clients::send_upgrade(stream, endpoint.target, request).await
    }
}

/// The service's ready endpoints on the addressed port, or the workload.
pub fn resolve(
    snapshot: &Snapshot,
    target: &Target,
    limits: Arc<Limits>,
) -> Result<Destination, Error> {
    match target {
        Target::Service {
            namespace,
            hostname,
            port,
            ..
        } => {
            let key = NamespacedHostname::new(namespace, hostname);
            let name = key.to_string();
            let Some(service) = snapshot.service(&key) else {
                return Err(Error::NoHealthyEndpoint {
                    destination: name,
                    port: *port,
                });
            };
            let endpoints = snapshot
                .ready_endpoints(&service)
                .into_iter()
                .filter_map(|e| {
                    let target_port = e.target_port(&service, *port)?;
                    let ip = *e.workload.addresses.first()?;
                    Some(Endpoint {
                        workload: e.workload,
                        target: (ip, target_port).into(),
                    })
                })
                .collect();
            Ok(Destination {
                name,
                service: Some(service),
                port: *port,
                endpoints,
                balancer: None,
                hash: None,
                limits,
            })
        }
        Target::Workload { uid, port, .. } => {
            let endpoints = snapshot
                .workload_by_uid(uid)
                .filter(|w| w.is_healthy())
                .and_then(|w| {
                    let ip = *w.addresses.first()?;
                    Some(Endpoint {
                        workload: w,
                        target: (ip, *port).into(),
                    })
                })
                .into_iter()
                .collect();
            Ok(Destination {
                name: uid.clone(),
                service: None,
                port: *port,
                endpoints,
                balancer: None,
                hash: None,
                limits,
            })
        }
    }
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.version() <= Version::HTTP_11
        && (request.method() == Method::CONNECT || request.headers().contains_key(header::UPGRADE))
}

/// gRPC by its content type (`application/grpc`, `application/grpc+proto`...).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(named) = headers.get(header::CONNECTION).cloned()
        && let Ok(named) = named.to_str()
    {
        for name in named.split(',') {
            headers.remove(name.trim());
        }
    }
    let trailers = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // `te: trailers` is end to end for gRPC.
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `host` -> `host-shadow` (port kept), in the URI or `Host`.
fn shadow_authority(head: &mut Head) {
    let shadow = |authority: &str| match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    };
    if let Some(authority) = head.uri.authority().map(|a| a.to_string()) {
        let mut parts = head.uri.clone().into_parts();
        parts.authority = http::uri::Authority::try_from(shadow(&authority)).ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            head.uri = uri;
        }
    }
    if let Some(host) = head.headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(value) = HeaderValue::from_str(&shadow(host))
    {
        head.headers.insert(header::HOST, value);
    }
}

fn origin_form(uri: &http::Uri) -> http::Uri {
    uri.path_and_query()
        .map(|pq| http::Uri::from(pq.clone()))
        .unwrap_or_else(|| http::Uri::from_static("/"))
}

trait CloneHead {
    fn clone_head(&self) -> Head;
}

impl CloneHead for http::request::Parts {
    fn clone_head(&self) -> Head {
        Head {
            method: self.method.clone(),
            uri: self.uri.clone(),
            version: self.version,
            headers: self.headers.clone(),
        }
    }
}

/// The request head as the endpoint gets it: HTTP/2 or HTTP/1.1,
/// hop-by-hop headers dropped, the URI in the form that protocol wants
/// (HTTP/1.1 origin form with `Host`; HTTP/2 absolute with the client's
/// authority).
fn upstream_head(parts: &http::request::Parts, target: &Target, http2: bool) -> Head {
    let mut head = parts.clone_head();
    strip_hop_by_hop(&mut head.headers);
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    });
    if http2 {
        head.version = Version::HTTP_2;
        let authority = authority.unwrap_or_else(|| format!("localhost:{}", target.port()));
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        head.uri = http::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .unwrap_or_else(|_| origin_form(&parts.uri));
        head.headers.remove(header::HOST);
    } else {
        head.uri = origin_form(&parts.uri);
        if let Some(authority) = authority
            && let Ok(value) = HeaderValue::from_str(&authority)
        {
            head.headers.insert(header::HOST, value);
        }
    }
    head
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full(body: std::borrow::Cow<'static, str>) -> Body {
    let bytes = match body {
        std::borrow::Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
        std::borrow::Cow::Owned(s) => Bytes::from(s),
    };
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// gRPC status for an HTTP status of a local reply (grpc's
/// http-grpc-status-mapping, as Envoy's `Grpc::Utility::httpToGrpcStatus`).
fn grpc_status_for(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// What is known about one request, for its metrics and log line.
struct Record {
    proxy_metrics: Arc<Metrics>,
    start: Instant,
    peers: Peers,
    downstream: Downstream,
    method: Method,
    path: String,
    authority: String,
    grpc: bool,
    flag: ResponseFlag,
    error: Option<String>,
    /// Request body bytes read from the client.
    received: Arc<AtomicU64>,
    /// Bytes sent after an upgrade.
    sent_upgraded: Arc<AtomicU64>,
}

impl Record {
    fn new(
        proxy: &Proxy,
        snapshot: &Snapshot,
        downstream: &Downstream,
        request: &Request<Incoming>,
    ) -> Self {
        let source = snapshot.workload_by_address(&proxy.config.network, downstream.address.ip());
        Record {
            proxy_metrics: proxy.metrics.clone(),
            start: Instant::now(),
            peers: Peers {
                source_identity: Some(downstream.identity.clone()),
                source,
                ..Peers::default()
            },
            downstream: downstream.clone(),
            method: request.method().clone(),
            path: request
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string(),
            authority: request
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    request
                        .headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default(),
            grpc: is_grpc(request.headers()),
            flag: ResponseFlag::None,
            error: None,
            received: Arc::default(),
            sent_upgraded: Arc::default(),
        }
    }

    /// A response the waypoint writes itself; gRPC clients get it as a
    /// trailers-only response with the mapped status, as Envoy sends local
    /// replies to gRPC requests.
    fn local_reply(
        self,
        status: StatusCode,
        body: &'static str,
        flag: ResponseFlag,
    ) -> Response<Body> {
        self.refuse(Refusal {
            status,
            body: body.into(),
            flag,
            headers: HeaderMap::new(),
        })
    }

    /// A route's direct response.
    fn direct(self, status: StatusCode, body: Bytes) -> Response<Body> {
        let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *response.status_mut() = status;
        self.respond(response, None)
    }

    /// A response the waypoint writes itself (a decision's refusal, a
    /// failure); gRPC clients get it as a trailers-only response with the
    /// mapped status, as Envoy sends local replies to gRPC requests.
    fn refuse(mut self, refusal: Refusal) -> Response<Body> {
        let Refusal {
            status,
            body,
            flag,
            headers,
        } = refusal;
        if flag != ResponseFlag::None || self.flag == ResponseFlag::None {
            self.flag = flag;
        }
        let grpc = self.grpc && !headers.contains_key("grpc-status");
        let mut response = if grpc {
            let mut response = Response::new(empty());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(grpc_status_for(status)));
            if let Ok(message) = HeaderValue::from_str(&body) {
                headers.insert("grpc-message", message);
            }
            response
        } else {
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            if !response.body().is_end_stream() {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            response
        };
        response.headers_mut().extend(headers);
        self.respond(response, None)
    }

    /// Passes the response on, observing it to its end.
    fn respond(
        self,
        response: Response<Body>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Response<Body> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let grpc_status = self.grpc.then(|| {
            parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let observed = Observed {
            body,
            sent: 0,
            finish: Some(Finish {
                record: self,
                status: parts.status,
                grpc_status: grpc_status.flatten(),
                _permit: permit,
            }),
        };
        Response::from_parts(parts, observed.boxed())
    }
}

/// Written once the response body has ended or was dropped.
struct Finish {
    record: Record,
    status: StatusCode,
    grpc_status: Option<String>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Finish {
    fn write(self, sent: u64, completed: bool) {
        let Finish {
            record,
            status,
            grpc_status,
            ..
        } = self;
        let flag = if completed || record.flag != ResponseFlag::None {
            record.flag
        } else {
            ResponseFlag::DownstreamConnectionTermination
        };
        let protocol = if record.grpc { "grpc" } else { "http" };
        let grpc_status = match (&grpc_status, record.grpc) {
            (Some(s), _) => Some(s.as_str()),
            // A gRPC request answered without a grpc-status: unknown (2)
            // unless HTTP says it went well.
            (None, true) if completed && !status.is_success() => Some("2"),
            _ => None,
        };
        let labels = HttpLabels::new(
            &record.peers,
            protocol,
            Some(status.as_u16()),
            grpc_status,
            flag,
        );
        let received = record.received.load(Ordering::Relaxed);
        let sent = sent + record.sent_upgraded.load(Ordering::Relaxed);
        let duration = record.start.elapsed();
        record
            .proxy_metrics
            .request(&labels, duration.as_secs_f64() * 1000.0, received, sent);
        access_log::request(&access_log::RequestLog {
            downstream: &record.downstream,
            method: &record.method,
            authority: &record.authority,
            path: &record.path,
            labels: &labels,
            duration,
            received,
            sent,
            error: record.error.as_deref(),
        });
    }
}

/// The response body on its way to the client: counts bytes, takes the
/// gRPC status from the trailers, and writes the record at the end.
struct Observed {
    body: Body,
    sent: u64,
    finish: Option<Finish>,
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = trailers.get("grpc-status").and_then(|v| v.to_str().ok())
                    && let Some(finish) = self.finish.as_mut()
                {
                    finish.grpc_status = Some(status.to_string());
                }
            }
            Poll::Ready(None) => {
                if let Some(finish) = self.finish.take() {
                    finish.write(self.sent, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut finish) = self.finish.take() {
                    if finish.record.flag == ResponseFlag::None {
                        finish.record.flag = ResponseFlag::UpstreamConnectionTermination;
                    }
                    finish.write(self.sent, false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            let completed = self.body.is_end_stream();
            finish.write(self.sent, completed);
        }
    }
}

/// A request body counting the bytes read from the client.
struct Counted {
    body: Incoming,
    count: Arc<AtomicU64>,
}

impl Counted {
    fn new(body: Incoming, count: Arc<AtomicU64>) -> Self {
        Counted { body, count }
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-end-to-end"]);
    }

    #[test]
    fn local_replies_map_to_grpc_statuses_as_envoy_does() {
        assert_eq!(grpc_status_for(StatusCode::FORBIDDEN), 7);
        assert_eq!(grpc_status_for(StatusCode::UNAUTHORIZED), 16);
        assert_eq!(grpc_status_for(StatusCode::GATEWAY_TIMEOUT), 14);
        assert_eq!(grpc_status_for(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(grpc_status_for(StatusCode::NOT_FOUND), 12);
        assert_eq!(grpc_status_for(StatusCode::INTERNAL_SERVER_ERROR), 2);
    }
}
