//! istiod-rs's delta xDS server: the requests one proxy stream sends
//! (framed messages, each a DeltaDiscoveryRequest). The first names the
//! proxy (a waypoint's node id is parsed) and subscribes; each later one is
//! an ACK, NACK or subscription change for its type, applied to that
//! type's `TypeState` as the connection task does, with a push computed
//! after each against the fixtures' translation.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::discovery::DeltaDiscoveryRequest;
use istiod_rs::snapshot::Snapshot;
use istiod_rs::xds::ChangeLog;
use istiod_rs::xds::delta::{Current, TypeState};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// Every fixture's resources in one snapshot.
fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let mut all = Snapshot::default();
        for (_, yaml) in mesh_fuzz::FIXTURES {
            let translation = mesh_fuzz::translate(yaml);
            for type_url in translation.snapshot.type_urls() {
                for resource in translation.snapshot.of_type(type_url).values() {
                    all.insert_shared(resource.clone());
                }
            }
        }
        all
    })
}

fuzz_target!(|data: &[u8]| {
    let requests: Vec<DeltaDiscoveryRequest> = mesh_fuzz::messages(data)
        .into_iter()
        .filter_map(|m| DeltaDiscoveryRequest::decode(m).ok())
        .collect();
    let Some(first) = requests.first() else {
        return;
    };
    let Some(proxy) = first.node.as_ref().map(|n| n.id.as_str()) else {
        return;
    };
    if let Some(Err(error)) = istiod_rs::xds::waypoint::parse_node(proxy) {
        let _ = error.to_string();
    }
    let snapshot = snapshot();
    let changes = ChangeLog::default();
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut types: BTreeMap<String, TypeState> = BTreeMap::new();
    let mut nonce = 0u64;
    for (generation, request) in requests.iter().enumerate() {
        if request.type_url.is_empty() {
            return;
        }
        match types.get_mut(&request.type_url) {
            Some(state) => {
                let _ = state.on_request(request, now);
            }
            None if !request.response_nonce.is_empty() => {}
            None => {
                types.insert(request.type_url.clone(), TypeState::new(request));
            }
        }
        for (type_url, state) in &mut types {
            let current = Current {
                type_url,
                generation: generation as u64,
                resources: snapshot.of_type(type_url),
                changes: &changes,
                scope: None,
                aliases: None,
            };
            let _ = state.next_push(
                &current,
                || {
                    nonce += 1;
                    nonce.to_string()
                },
                SystemTime::UNIX_EPOCH + Duration::from_secs(generation as u64),
            );
        }
    }
});
