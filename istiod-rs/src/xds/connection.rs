//! One proxy's delta xDS stream: a task that reads the proxy's requests and
//! the snapshot feed, keeps the per-type [`TypeState`]s, and writes responses.
//! Each stream has its own task, so a slow proxy delays only itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use api::discovery::DeltaDiscoveryRequest;
use tokio::sync::{mpsc, watch};

use proxy_core::log_limit::LogLimit;

use super::delta::{Answer, Current, Delta, Push, TypeState};
use super::metrics::{Refusal, TypeLabel, VersionLabel};
use super::scope::L7_TYPES;
use super::waypoint::{self, WaypointPods};
use super::wire::Outbound;
use super::{LOG_INTERVAL, Published, SERVED_TYPES, Shared, XdsError, lock};
use crate::auth::Caller;

/// Responses waiting for the transport. One response per type is in flight
/// at a time, so this only ever holds a few.
const OUTBOUND_CAPACITY: usize = 16;

/// What the server knows about one connected proxy.
#[derive(Debug)]
pub(super) struct Connection {
    /// The proxy's node id (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub proxy: String,
    /// The authenticated caller; `None` on an unauthenticated listener.
    pub caller: Option<Caller>,
    /// For a waypoint: the key (`<ns>/<name>`) of the Gateway it serves,
    /// whose scope is all it is sent.
    pub waypoint: Option<String>,
    pub peer: Option<SocketAddr>,
    pub since: SystemTime,
    /// By type URL.
    pub types: BTreeMap<String, TypeState>,
}

/// Starts the task serving one stream; returns the responses to write.
pub(super) fn spawn(
    shared: Arc<Shared>,
    inbound: tonic::Streaming<DeltaDiscoveryRequest>,
    caller: Option<Caller>,
    peer: Option<SocketAddr>,
    pods: Option<Arc<dyn WaypointPods>>,
) -> mpsc::Receiver<Result<Outbound, tonic::Status>> {
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    tokio::spawn(async move {
        if let Err(e) = serve(shared.clone(), inbound, caller, peer, pods, &tx).await {
            if let Some(reason) = refusal(&e) {
                shared.metrics.refused(reason);
                static REFUSED: LogLimit = LogLimit::new(LOG_INTERVAL);
                if let Some(suppressed) = REFUSED.allow() {
                    tracing::warn!(?peer, ?reason, suppressed, "xDS stream refused: {e}");
                }
            }
            let _ = tx.send(Err(e.into())).await;
        }
    });
    rx
}

/// What a stream-ending error counts as, when it is the proxy's doing.
fn refusal(e: &XdsError) -> Option<Refusal> {
    match e {
        XdsError::MissingNode => Some(Refusal::missing_node),
        XdsError::MissingTypeUrl { .. } => Some(Refusal::missing_type_url),
        XdsError::BadRequest { status, .. } if status.code() == tonic::Code::InvalidArgument => {
            Some(Refusal::undecodable)
        }
        XdsError::BadRequest { .. } => Some(Refusal::too_large),
        XdsError::Waypoint(_) => Some(Refusal::waypoint_identity),
        XdsError::StateOfTheWorld | XdsError::SourceClosed | XdsError::Auth(_) => None,
    }
}

/// Keeps the connection listed in `/debug/syncz` and counted as connected
/// for exactly as long as the stream is served.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    connection: Arc<Mutex<Connection>>,
    version: VersionLabel,
}

impl Registration {
    fn new(shared: &Arc<Shared>, connection: Connection, version: VersionLabel) -> Self {
        let id = shared
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let connection = Arc::new(Mutex::new(connection));
        lock(&shared.connections).insert(id, connection.clone());
        shared
            .metrics
            .connected_proxies
            .get_or_create(&version)
            .inc();
        Registration {
            shared: shared.clone(),
            id,
            connection,
            version,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.shared.connections).remove(&self.id);
        self.shared
            .metrics
            .connected_proxies
            .get_or_create(&self.version)
            .dec();
        tracing::info!(proxy = %lock(&self.connection).proxy, "proxy disconnected");
    }
}

type Outgoing = mpsc::Sender<Result<Outbound, tonic::Status>>;

async fn serve(
    shared: Arc<Shared>,
    mut inbound: tonic::Streaming<DeltaDiscoveryRequest>,
    caller: Option<Caller>,
    peer: Option<SocketAddr>,
    pods: Option<Arc<dyn WaypointPods>>,
    tx: &Outgoing,
) -> Result<(), XdsError> {
    let mut feed = shared.feed.clone();
    // Pushes read the newest snapshot anyway; only later arrivals are news.
    feed.borrow_and_update();

    let Some(first) = next_request(&mut inbound, "(before its first request)").await? else {
        return Ok(());
    };
    let proxy = first
        .node
        .as_ref()
        .map(|n| n.id.clone())
        .filter(|id| !id.is_empty())
        .ok_or(XdsError::MissingNode)?;
    let version = VersionLabel::new(first.node.as_ref().and_then(|n| {
        let value = n.metadata.as_ref()?.fields.get("ISTIO_VERSION")?;
        match value.kind.as_ref()? {
            prost_types::value::Kind::StringValue(v) => Some(v.as_str()),
            _ => None,
        }
    }));
    let waypoint = match waypoint::parse_node(&proxy) {
        Some(claim) => Some(waypoint::bind(
            &proxy,
            &claim?,
            caller.as_ref(),
            pods.as_deref(),
        )?),
        None => None,
    };
    tracing::info!(
        %proxy,
        identity = caller.as_ref().map(|c| c.identity.to_string()),
        ?peer,
        waypoint,
        "proxy connected"
    );
    let registration = Registration::new(
        &shared,
        Connection {
            proxy: proxy.clone(),
            caller,
            waypoint,
            peer,
            since: SystemTime::now(),
            types: BTreeMap::new(),
        },
        version,
    );
    let connection = &registration.connection;
    let answer = on_request(&shared, connection, &proxy, &first)?;
    if !send(tx, answer).await {
        return Ok(());
    }

    loop {
        if !push_due(&shared, connection, &feed, tx).await {
            return Ok(());
        }
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            request = next_request(&mut inbound, &proxy) => match request? {
                Some(request) => {
                    let answer = on_request(&shared, connection, &proxy, &request)?;
                    if !send(tx, answer).await {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
            changed = feed.changed() => {
                if changed.is_err() {
                    return Err(XdsError::SourceClosed);
                }
                let pending = {
                    let published = feed.borrow_and_update();
                    super::delta::Pending {
                        arrived: published.arrived,
                        changed: published.changed,
                    }
                };
                for state in lock(connection).types.values_mut() {
                    state.mark_snapshot(pending);
                }
            }
        }
    }
}

/// The proxy's next request; `None` once the stream has ended. A request
/// that is too large or does not decode is refused (the stream ends with a
/// status saying why); any other error is the proxy going away.
async fn next_request(
    inbound: &mut tonic::Streaming<DeltaDiscoveryRequest>,
    proxy: &str,
) -> Result<Option<DeltaDiscoveryRequest>, XdsError> {
    match inbound.message().await {
        Ok(request) => Ok(request),
        Err(status) => match status.code() {
            // tonic's limit on the length prefix (before anything is
            // buffered), and our decoder.
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Err(XdsError::BadRequest {
                proxy: proxy.to_string(),
                status,
                hint: " (istiod's --grpc-max-receive-message-size, ISTIO_GPRC_MAXRECVMSGSIZE)",
            }),
            tonic::Code::InvalidArgument => Err(XdsError::BadRequest {
                proxy: proxy.to_string(),
                status,
                hint: "",
            }),
            _ => {
                tracing::debug!(%proxy, %status, "xDS stream ended with an error");
                Ok(None)
            }
        },
    }
}

/// Sends `answer`, if any; `false` once the transport is gone.
async fn send(tx: &Outgoing, answer: Option<Outbound>) -> bool {
    match answer {
        Some(answer) => tx.send(Ok(answer)).await.is_ok(),
        None => true,
    }
}

/// Applies a request to the connection's state. Returns the answer to send
/// at once, if any: only a subscription to a type istiod-rs does not serve
/// gets one (the others are answered by [`push_due`]).
fn on_request(
    shared: &Shared,
    connection: &Mutex<Connection>,
    proxy: &str,
    request: &DeltaDiscoveryRequest,
) -> Result<Option<Outbound>, XdsError> {
    let type_url = &request.type_url;
    if type_url.is_empty() {
        return Err(XdsError::MissingTypeUrl {
            proxy: proxy.to_string(),
        });
    }
    if !SERVED_TYPES.contains(&type_url.as_str()) {
        return Ok(answer_unknown_type(shared, proxy, request));
    }
    let mut conn = lock(connection);
    let answer = match conn.types.get_mut(type_url) {
        Some(state) => state.on_request(request, SystemTime::now()),
        // Answers a response this stream never sent (e.g. one from before a reconnect).
        None if !request.response_nonce.is_empty() => Answer::Stale,
        None => {
            tracing::debug!(
                %proxy,
                %type_url,
                subscribe = ?request.resource_names_subscribe,
                resuming = request.initial_resource_versions.len(),
                "proxy subscribed"
            );
            conn.types.insert(type_url.clone(), TypeState::new(request));
            return Ok(None);
        }
    };
    match answer {
        Answer::Ack => {
            tracing::trace!(%proxy, %type_url, nonce = %request.response_nonce, "ACK");
        }
        Answer::Nack(message) => {
            shared
                .metrics
                .rejects
                .get_or_create(&TypeLabel::new(type_url))
                .inc();
            tracing::warn!(
                %proxy,
                %type_url,
                nonce = %request.response_nonce,
                %message,
                "proxy rejected configuration (NACK); it keeps its last accepted versions"
            );
        }
        Answer::Stale => {
            shared
                .metrics
                .stale_requests
                .get_or_create(&TypeLabel::new(type_url))
                .inc();
            tracing::debug!(%proxy, %type_url, nonce = %request.response_nonce, "ignoring request with a stale nonce");
        }
        Answer::Subscription => {
            tracing::debug!(
                %proxy,
                %type_url,
                subscribe = ?request.resource_names_subscribe,
                unsubscribe = ?request.resource_names_unsubscribe,
                "subscription changed"
            );
        }
    }
    Ok(None)
}

/// A type istiod-rs does not serve: as upstream, whose fallback generator
/// ("api", `pilot/pkg/xds/apigen.go`) answers a type it does not know with
/// an empty response "to not break waiting code", a subscription gets an
/// empty response, so a proxy that also asks for a newer type still counts
/// itself synced; its ACK is ignored. Nothing is kept per type, and the
/// response is counted under the type label `other`: a proxy inventing
/// type URLs grows neither istiod's memory nor its metric series.
fn answer_unknown_type(
    shared: &Shared,
    proxy: &str,
    request: &DeltaDiscoveryRequest,
) -> Option<Outbound> {
    shared.metrics.unknown_types.inc();
    static UNKNOWN: LogLimit = LogLimit::new(LOG_INTERVAL);
    if let Some(suppressed) = UNKNOWN.allow() {
        tracing::info!(
            %proxy,
            type_url = %truncated(&request.type_url),
            suppressed,
            "a request for a type istiod-rs does not serve (it serves {SERVED_TYPES:?}): answered empty"
        );
    }
    if !request.response_nonce.is_empty() {
        return None;
    }
    Some(Outbound {
        type_url: request.type_url.clone(),
        push: Push {
            nonce: shared.nonce(),
            version: shared.feed.borrow().generation.to_string(),
            delta: Delta::default(),
            pending_since: None,
        },
    })
}

/// At most 200 bytes of a string a peer chose, for a log line.
fn truncated(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where a type sits in the order of pushes: Authorization, Address, then
/// the L7 types from the most named to the Waypoint that names them.
fn dependency_rank(type_url: &str) -> usize {
    match type_url {
        api::type_url::AUTHORIZATION => 0,
        api::type_url::ADDRESS => 1,
        other => L7_TYPES
            .iter()
            .position(|t| *t == other)
            .map_or(L7_TYPES.len() + 2, |i| i + 2),
    }
}

/// Sends every response that is due. `false` once the transport is gone.
async fn push_due(
    shared: &Shared,
    connection: &Mutex<Connection>,
    feed: &watch::Receiver<Published>,
    tx: &Outgoing,
) -> bool {
    let published = feed.borrow().clone();
    let now = SystemTime::now();
    let mut pushes: Vec<(String, Push)> = {
        let mut guard = lock(connection);
        let conn = &mut *guard;
        let waypoint = conn.waypoint.as_deref();
        conn.types
            .iter_mut()
            .filter_map(|(type_url, state)| {
                let current = Current {
                    type_url,
                    generation: published.generation,
                    resources: published.resources(waypoint, type_url),
                    changes: &published.changes,
                    scope: waypoint,
                    aliases: published.alias_lookup(waypoint, type_url),
                };
                state
                    .next_push(&current, || shared.nonce(), now)
                    .map(|push| (type_url.clone(), push))
            })
            .collect()
    };
    // Responses that remove resources go after those that only add or
    // change, and among those what is named goes before what names it:
    // a workload's new list of policies then reaches the proxy before the
    // policy it no longer names is removed, a new policy before the
    // workloads naming it, and a waypoint's routes, policies and traffic
    // policies before the Waypoint naming them. ztunnel-rs denies while a
    // named policy is missing (upstream ztunnel skips it with a warning);
    // waypoint-rs refuses a request whose configuration is missing.
    pushes.sort_by_key(|(type_url, push)| {
        let rank = dependency_rank(type_url);
        if push.delta.removed.is_empty() {
            (false, rank)
        } else {
            (true, usize::MAX - rank)
        }
    });
    for (type_url, push) in pushes {
        if tx.send(Ok(Outbound { type_url, push })).await.is_err() {
            return false;
        }
    }
    true
}
