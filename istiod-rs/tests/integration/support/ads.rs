//! A raw delta-ADS client over tonic, as a ztunnel speaks it on the wire:
//! the component test and the control-plane benchmark drive istiod with it
//! request by request (proxy-core's `XdsClient` is tested in `clients.rs`).
//!
//! Included with `#[path]`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// One delta-ADS stream.
pub struct AdsStream {
    node: String,
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
    patience: Duration,
}

/// ztunnel's node id for the `n`th proxy.
pub fn node_id(n: usize) -> String {
    format!("ztunnel~10.0.0.{n}~ztunnel-{n}.istio-system~istio-system.svc.cluster.local")
}

/// Opens a DeltaAggregatedResources stream on `client`, with
/// `authorization: Bearer <token>` when a token is given: where requests go,
/// and the responses.
pub async fn open_stream(
    client: &mut AggregatedDiscoveryServiceClient<Channel>,
    token: Option<&str>,
) -> Result<
    (
        mpsc::Sender<DeltaDiscoveryRequest>,
        tonic::Streaming<DeltaDiscoveryResponse>,
    ),
    tonic::Status,
> {
    let (requests, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    Ok((requests, responses))
}

impl AdsStream {
    /// Opens a stream on `channel`, with `authorization: Bearer <token>`
    /// when a token is given. Waits at most `patience` for any response.
    pub async fn open(
        channel: Channel,
        node: String,
        token: Option<&str>,
        patience: Duration,
    ) -> Result<AdsStream, tonic::Status> {
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let (requests, responses) = open_stream(&mut client, token).await?;
        Ok(AdsStream {
            node,
            requests,
            responses,
            patience,
        })
    }

    pub async fn send(&self, mut request: DeltaDiscoveryRequest) {
        request.node = Some(Node {
            id: self.node.clone(),
            ..Default::default()
        });
        self.requests.send(request).await.expect("stream open");
    }

    /// Wildcard subscription to `type_url`, resuming from `held` (name -> version).
    pub async fn subscribe(&self, type_url: &str, held: BTreeMap<String, String>) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: held.into_iter().collect(),
            ..Default::default()
        })
        .await;
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(self.patience, self.responses.message())
            .await
            .expect("no response from istiod in time")
            .expect("the xDS stream failed")
            .expect("the xDS stream ended")
    }

    /// The next response, or the stream's end status.
    pub async fn next(&mut self) -> Result<Option<DeltaDiscoveryResponse>, tonic::Status> {
        tokio::time::timeout(self.patience, self.responses.message())
            .await
            .expect("no response from istiod in time")
    }

    pub async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    pub async fn nack(&self, response: &DeltaDiscoveryResponse, message: &str) {
        self.send(nack_request(&response.type_url, &response.nonce, message))
            .await;
    }
}

/// The NACK of `nonce` for `type_url`: INVALID_ARGUMENT with `message`.
pub fn nack_request(type_url: &str, nonce: &str, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: Some(api::rpc::Status {
            code: 3,
            message: message.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

/// What a proxy holds of one type: name -> version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held(pub BTreeMap<String, String>);

impl Held {
    /// Applies an accepted response.
    pub fn apply(&mut self, response: &DeltaDiscoveryResponse) {
        for name in &response.removed_resources {
            self.0.remove(name);
        }
        for r in &response.resources {
            self.0.insert(r.name.clone(), r.version.clone());
        }
    }
}

/// The names a response sets, sorted.
pub fn names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
    names.sort_unstable();
    names
}

/// The names a response removes, sorted.
pub fn removed(response: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names = response.removed_resources.clone();
    names.sort_unstable();
    names
}
