//! The stream loop: subscribe, apply, ACK/NACK, reconnect.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use backon::BackoffBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::status::{ConnectionState, StatusWatch, XdsStatus};
use super::{Error, Handler, Rejected, Update, rejections};

/// Adds credentials (a bearer token, say) to each new stream's metadata.
/// Called on every (re)connect so that rotated tokens are picked up.
pub type MetadataFn = Arc<dyn Fn(&mut MetadataMap) -> Result<(), String> + Send + Sync>;

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;
/// Responses carry the whole state at start-up; 4 MiB (tonic's default) is
/// too small for large meshes.
const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;
/// Most names a client subscribes to on demand, over all types: each is
/// kept (and re-subscribed on every reconnect) for the process's life, so
/// a flood of unknown names must not grow it without bound.
pub const MAX_ON_DEMAND_NAMES: usize = 65_536;

#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// Sent on the first request of each stream; istiod identifies the proxy
    /// by `node.id` (see [`super::ztunnel_node_id`]).
    pub node: Node,
    /// First reconnection delay; doubles (with jitter) up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl XdsConfig {
    pub fn new(node_id: impl Into<String>) -> Self {
        XdsConfig {
            node: Node {
                id: node_id.into(),
                // The key upstream istiod reads a proxy's version from
                // (`NodeMetadata.IstioVersion`, pilot/pkg/model/context.go);
                // istiod-rs labels `pilot_xds` with it.
                metadata: Some(prost_types::Struct {
                    fields: [(
                        "ISTIO_VERSION".to_string(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(
                                env!("CARGO_PKG_VERSION").to_string(),
                            )),
                        },
                    )]
                    .into(),
                }),
                ..Default::default()
            },
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// A type-erased [`Handler`]: decodes `Any`s of its type URL, then applies.
trait ResourceHandler: Send + Sync {
    fn apply(&self, updates: Vec<Update<prost_types::Any>>) -> Result<(), Vec<Rejected>>;
}

struct Decoding<T, H> {
    type_url: String,
    handler: H,
    _resource: std::marker::PhantomData<fn() -> T>,
}

impl<T, H> ResourceHandler for Decoding<T, H>
where
    T: Message + Default + 'static,
    H: Handler<T>,
{
    fn apply(&self, updates: Vec<Update<prost_types::Any>>) -> Result<(), Vec<Rejected>> {
        let mut rejected = Vec::new();
        let mut decoded = Vec::with_capacity(updates.len());
        for Update { name, resource } in updates {
            let resource = match resource {
                None => None,
                Some(any) if any.type_url != self.type_url => {
                    rejected.push(Rejected::new(
                        name,
                        format!("has type {:?}, expected {:?}", any.type_url, self.type_url),
                    ));
                    continue;
                }
                Some(any) => match T::decode(any.value.as_slice()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        rejected.push(Rejected::new(name, format!("does not decode: {e}")));
                        continue;
                    }
                },
            };
            decoded.push(Update { name, resource });
        }
        if let Err(more) = self.handler.apply(decoded) {
            rejected.extend(more);
        }
        rejections(rejected)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The client's metrics, upstream's names where upstream has them.
#[derive(Clone, Default)]
pub struct XdsMetrics {
    messages: Family<TypeLabel, Counter>,
    rejects: Family<TypeLabel, Counter>,
    terminations: Family<ReasonLabel, Counter>,
}

impl XdsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = XdsMetrics::default();
        registry.register(
            "xds_message",
            "xDS responses received, by type URL",
            m.messages.clone(),
        );
        registry.register(
            "xds_rejected_resources",
            "xDS resources NACKed, by type URL",
            m.rejects.clone(),
        );
        registry.register(
            "xds_connection_terminations",
            "xDS streams ended, by reason",
            m.terminations.clone(),
        );
        m
    }
}

/// Asks the stream for resources by name, in addition to the wildcard
/// subscription of their type (delta xDS explicit subscriptions): e.g. a
/// waypoint looking up a client workload by `<network>/<ip>`, which istiod
/// answers with the workload, or with the name as removed when there is
/// none. Cheap and non-blocking: names already asked for are not sent
/// again; the answer reaches the type's handler like any other response.
#[derive(Clone, Debug)]
pub struct OnDemand {
    tx: mpsc::UnboundedSender<(String, String)>,
}

impl OnDemand {
    /// Subscribes to `name` of `type_url` (a type this client handles).
    pub fn request(&self, type_url: &str, name: String) {
        // The client stopped: nothing to ask any more.
        let _ = self.tx.send((type_url.to_string(), name));
    }
}

pub struct XdsClient {
    channel: Channel,
    config: XdsConfig,
    metadata: Option<MetadataFn>,
    handlers: BTreeMap<String, Box<dyn ResourceHandler>>,
    on_demand: OnDemand,
    on_demand_rx: mpsc::UnboundedReceiver<(String, String)>,
    /// Per type URL: the names subscribed on demand, re-sent on reconnect.
    requested: BTreeMap<String, BTreeSet<String>>,
    /// Per type URL: name -> version of what the handlers accepted, sent as
    /// `initial_resource_versions` when the stream resumes.
    versions: HashMap<String, HashMap<String, String>>,
    status: watch::Sender<XdsStatus>,
    metrics: XdsMetrics,
}

impl XdsClient {
    /// A client over `channel` (plaintext or TLS; a lazily connecting
    /// channel reconnects by itself, this client re-opens the stream).
    pub fn new(channel: Channel, config: XdsConfig) -> Self {
        let (tx, on_demand_rx) = mpsc::unbounded_channel();
        XdsClient {
            channel,
            config,
            metadata: None,
            handlers: BTreeMap::new(),
            on_demand: OnDemand { tx },
            on_demand_rx,
            requested: BTreeMap::new(),
            versions: HashMap::new(),
            status: watch::Sender::new(XdsStatus::default()),
            metrics: XdsMetrics::default(),
        }
    }

    /// Credentials for each stream, e.g. `authorization: Bearer <token>`.
    pub fn with_metadata(mut self, metadata: MetadataFn) -> Self {
        self.metadata = Some(metadata);
        self
    }

    pub fn with_metrics(mut self, metrics: XdsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Subscribes (wildcard) to `type_url`, decoding its resources as `T`.
    pub fn with_handler<T, H>(mut self, type_url: &str, handler: H) -> Self
    where
        T: Message + Default + 'static,
        H: Handler<T>,
    {
        self.handlers.insert(
            type_url.to_string(),
            Box::new(Decoding {
                type_url: type_url.to_string(),
                handler,
                _resource: std::marker::PhantomData,
            }),
        );
        self.status.send_modify(|s| {
            s.types.entry(type_url.to_string()).or_default();
        });
        self
    }

    pub fn status(&self) -> StatusWatch {
        StatusWatch::new(self.status.subscribe())
    }

    /// A handle that subscribes to resources by name while the client runs.
    pub fn on_demand(&self) -> OnDemand {
        self.on_demand.clone()
    }

    /// Records an on-demand name; `false` when it was asked for already, its
    /// type is not handled, or the bound is reached (said once per name).
    fn remember(&mut self, type_url: &str, name: &str) -> bool {
        if !self.handlers.contains_key(type_url) {
            warn!(%type_url, %name, "on-demand request for a type this proxy does not handle");
            return false;
        }
        let total: usize = self.requested.values().map(BTreeSet::len).sum();
        let names = self.requested.entry(type_url.to_string()).or_default();
        if names.contains(name) {
            return false;
        }
        if total >= MAX_ON_DEMAND_NAMES {
            warn!(%type_url, %name, limit = MAX_ON_DEMAND_NAMES, "too many on-demand names; not asking");
            return false;
        }
        names.insert(name.to_string());
        true
    }

    /// Runs until `shutdown` is cancelled, reconnecting as needed.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_jitter()
            // Without a per-process seed every proxy would retry in step.
            .with_jitter_seed(rand::random())
            .without_max_times();
        let mut delays = backoff.build();
        loop {
            self.status.send_modify(|s| {
                s.connection = ConnectionState::Connecting;
                s.connection_attempts += 1;
            });
            let mut progressed = false;
            let error = tokio::select! {
                Err(e) = self.stream(&mut progressed) => e,
                () = shutdown.cancelled() => break,
            };
            let reason = match &error {
                Error::Rpc(status) => format!("{:?}", status.code()),
                Error::StreamClosed => "Closed".to_string(),
                Error::Metadata(_) => "Credentials".to_string(),
            };
            self.metrics
                .terminations
                .get_or_create(&ReasonLabel { reason })
                .inc();
            let error = error.to_string();
            if progressed {
                // The control plane was healthy; start over from short delays.
                delays = backoff.build();
            }
            let delay = delays.next().unwrap_or(self.config.backoff_max);
            warn!(
                %error,
                retry_in = ?delay,
                "xDS stream ended; serving the last known state until it is back"
            );
            self.status.send_modify(|s| {
                s.connection = ConnectionState::Disconnected;
                s.last_error = Some(error);
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.status
            .send_modify(|s| s.connection = ConnectionState::Stopped);
    }

    /// One stream, from subscription until it fails. `progressed` is set
    /// once a response has been handled.
    async fn stream(&mut self, progressed: &mut bool) -> Result<Infallible, Error> {
        let (tx, rx) = mpsc::channel(self.handlers.len() + 4);
        for type_url in self.handlers.keys() {
            let initial_resource_versions = self
                .versions
                .get(type_url)
                .map(|v| v.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let mut names = vec!["*".to_string()];
            names.extend(self.requested.get(type_url).into_iter().flatten().cloned());
            let subscribe = DeltaDiscoveryRequest {
                node: Some(self.config.node.clone()),
                type_url: type_url.clone(),
                resource_names_subscribe: names,
                initial_resource_versions,
                ..Default::default()
            };
            // Capacity covers every initial request.
            let _ = tx.try_send(subscribe);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(metadata) = &self.metadata {
            metadata(request.metadata_mut()).map_err(Error::Metadata)?;
        }
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        let mut responses = client
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        info!(node = %self.config.node.id, "xDS stream open");
        self.status
            .send_modify(|s| s.connection = ConnectionState::Connected);
        loop {
            let request = tokio::select! {
                response = responses.message() => {
                    let Some(response) = response? else { break };
                    *progressed = true;
                    self.handle(response)
                }
                Some((type_url, name)) = self.on_demand_rx.recv() => {
                    if !self.remember(&type_url, &name) {
                        continue;
                    }
                    debug!(%type_url, %name, "subscribing on demand");
                    DeltaDiscoveryRequest {
                        type_url,
                        resource_names_subscribe: vec![name],
                        ..Default::default()
                    }
                }
            };
            if tx.send(request).await.is_err() {
                return Err(Error::StreamClosed);
            }
        }
        Err(Error::StreamClosed)
    }

    /// Applies one response and builds its ACK or NACK. Public for the fuzz
    /// targets (`fuzz/`), which feed it responses decoded from raw bytes.
    #[doc(hidden)]
    pub fn handle(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            type_url,
            nonce,
            resources,
            removed_resources,
            ..
        } = response;
        self.metrics
            .messages
            .get_or_create(&TypeLabel {
                url: type_url.clone(),
            })
            .inc();
        let mut reply = DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce,
            ..Default::default()
        };
        let Some(handler) = self.handlers.get(&type_url) else {
            reply.error_detail = Some(nack(format!(
                "this proxy did not subscribe to {type_url:?}"
            )));
            return reply;
        };

        let mut offered = HashMap::with_capacity(resources.len());
        let mut updates = Vec::with_capacity(resources.len() + removed_resources.len());
        let mut rejected = Vec::new();
        for r in resources {
            match r.resource {
                Some(body) if !r.name.is_empty() => {
                    offered.insert(r.name.clone(), r.version);
                    updates.push(Update {
                        name: r.name,
                        resource: Some(body),
                    });
                }
                Some(_) => rejected.push(Rejected::new("<unnamed>", "the resource has no name")),
                None => rejected.push(Rejected::new(r.name, "the resource has no body")),
            }
        }
        for name in &removed_resources {
            updates.push(Update {
                name: name.clone(),
                resource: None,
            });
        }
        if let Err(more) = handler.apply(updates) {
            rejected.extend(more);
        }

        // Remember what was accepted, so a resumed stream asks only for news.
        // A rejected resource keeps the version of what is still applied.
        for r in &rejected {
            offered.remove(&r.name);
        }
        let held = self.versions.entry(type_url.clone()).or_default();
        for name in &removed_resources {
            held.remove(name);
        }
        held.extend(offered);
        let held_count = held.len();

        let error = (!rejected.is_empty()).then(|| describe(&rejected));
        if let Some(message) = &error {
            warn!(%type_url, %message, "NACKing xDS resources; the rest of the response applies");
            self.metrics
                .rejects
                .get_or_create(&TypeLabel {
                    url: type_url.clone(),
                })
                .inc_by(rejected.len() as u64);
            reply.error_detail = Some(nack(message.clone()));
        } else {
            debug!(%type_url, held = held_count, "ACK");
        }
        self.status.send_modify(|s| {
            let t = s.types.entry(type_url).or_default();
            t.synced = true;
            t.resources = held_count;
            match error {
                Some(message) => {
                    t.nacks += 1;
                    t.last_nack = Some(message);
                }
                None => t.acks += 1,
            }
            s.synced = s.types.values().all(|t| t.synced);
        });
        reply
    }
}

fn nack(message: String) -> api::rpc::Status {
    api::rpc::Status {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}

/// `rejected 2 resources: a: reason; b: reason`.
fn describe(rejected: &[Rejected]) -> String {
    let list: Vec<String> = rejected
        .iter()
        .map(|r| format!("{}: {}", r.name, r.reason))
        .collect();
    format!(
        "rejected {} resource{}: {}",
        rejected.len(),
        if rejected.len() == 1 { "" } else { "s" },
        list.join("; ")
    )
}
