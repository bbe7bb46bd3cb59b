//! The hand-off between the ambient index and the xDS server: every resource
//! istiod-rs serves, keyed by type URL and name, each with a content hash as
//! its version. The index builds a new [`Snapshot`] after each (debounced)
//! change; the xDS server diffs what each proxy holds against it by version,
//! so a change pushes only the keys whose content changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};

/// One named resource, encoded once and shared by every connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// The xDS name (workload uid, `namespace/hostname`, `namespace/name`).
    pub name: String,
    /// Content hash of `body.value`: equal content, equal version.
    pub version: String,
    /// The encoded resource with its type URL.
    pub body: prost_types::Any,
}

impl Resource {
    /// Encodes `msg` under `type_url`. Encoding is canonical (fields in
    /// number order, ordered maps), so the version is a pure content hash.
    pub fn new(type_url: &str, name: impl Into<String>, msg: &impl Message) -> Self {
        let value = msg.encode_to_vec();
        let digest = Sha256::digest(&value);
        Resource {
            name: name.into(),
            version: hex::encode(&digest[..8]),
            body: prost_types::Any {
                type_url: type_url.to_string(),
                value,
            },
        }
    }
}

/// All resources of one type, by name.
pub type Resources = BTreeMap<String, Arc<Resource>>;

/// Everything served, by type URL. Cheap to clone (shared resources).
/// Two snapshots are equal when they serve the same resources, whenever
/// their changes were seen.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    types: BTreeMap<String, Resources>,
    /// When the pipeline saw the first change this snapshot carries (the
    /// start of `pilot_proxy_convergence_time`).
    changed_at: Option<std::time::Instant>,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.types == other.types
    }
}

impl Snapshot {
    pub fn set_changed_at(&mut self, at: std::time::Instant) {
        self.changed_at = Some(at);
    }

    pub fn changed_at(&self) -> Option<std::time::Instant> {
        self.changed_at
    }

    pub fn insert(&mut self, resource: Resource) {
        self.insert_shared(Arc::new(resource));
    }

    /// Inserts a resource that another snapshot may share (an unchanged
    /// resource carried over from the previous build, without copying).
    pub fn insert_shared(&mut self, resource: Arc<Resource>) {
        let resources = match self.types.get_mut(&resource.body.type_url) {
            Some(r) => r,
            None => self
                .types
                .entry(resource.body.type_url.clone())
                .or_default(),
        };
        resources.insert(resource.name.clone(), resource);
    }

    /// The resources of one type (empty when there are none).
    pub fn of_type(&self, type_url: &str) -> &Resources {
        static EMPTY: Resources = BTreeMap::new();
        self.types.get(type_url).unwrap_or(&EMPTY)
    }

    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.types.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::workload::{Address, Workload, address};

    fn workload(uid: &str, node: &str) -> Address {
        Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                node: node.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn version_is_a_content_hash() {
        let a = Resource::new(api::type_url::ADDRESS, "u1", &workload("u1", "n1"));
        let b = Resource::new(api::type_url::ADDRESS, "u1", &workload("u1", "n1"));
        let c = Resource::new(api::type_url::ADDRESS, "u1", &workload("u1", "n2"));
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_eq!(a.version.len(), 16);
    }

    #[test]
    fn groups_by_type() {
        let mut s = Snapshot::default();
        s.insert(Resource::new(
            api::type_url::ADDRESS,
            "u1",
            &workload("u1", "n1"),
        ));
        assert_eq!(s.of_type(api::type_url::ADDRESS).len(), 1);
        assert!(s.of_type(api::type_url::AUTHORIZATION).is_empty());
        assert_eq!(s.len(), 1);
    }
}
