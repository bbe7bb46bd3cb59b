//! `/config_dump` and `/certs`: the store, the certificates (from whatever
//! holds them: the cert manager, through [`CertificateSource`]), the proxy's
//! configuration and any extra sections, under upstream ztunnel's keys.

use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};

use crate::store::WorkloadStore;

/// One certificate, as upstream's dump shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    /// Base64 of the PEM text, as upstream.
    pub pem: String,
    pub serial_number: String,
    /// RFC 3339, seconds precision.
    pub valid_from: String,
    pub expiration_time: String,
}

/// The certificates of one identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertsDump {
    /// `spiffe://...`
    pub identity: String,
    /// `Available`, `Initializing` or `Unavailable: <why>`.
    pub state: String,
    /// Leaf first.
    pub cert_chain: Vec<CertDump>,
    pub root_certs: Vec<CertDump>,
}

/// Whatever holds the proxy's certificates.
pub trait CertificateSource: Send + Sync + 'static {
    /// Every identity's certificates, sorted by identity.
    fn certificates(&self) -> BoxFuture<'_, Vec<CertsDump>>;
}

impl<F, Fut> CertificateSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<CertsDump>> + Send + 'static,
{
    fn certificates(&self) -> BoxFuture<'_, Vec<CertsDump>> {
        Box::pin(self())
    }
}

/// For a proxy without certificates (or before the cert manager is wired).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCertificates;

impl CertificateSource for NoCertificates {
    fn certificates(&self) -> BoxFuture<'_, Vec<CertsDump>> {
        Box::pin(std::future::ready(Vec::new()))
    }
}

/// An extra top-level key in `/config_dump` (the xDS connection, say).
pub trait DumpSection: Send + Sync + 'static {
    fn key(&self) -> &'static str;
    fn dump(&self) -> Value;
}

impl DumpSection for crate::xds::StatusWatch {
    fn key(&self) -> &'static str {
        "xds"
    }

    fn dump(&self) -> Value {
        serde_json::to_value(self.current()).unwrap_or(Value::Null)
    }
}

/// What the admin server shows.
pub struct AdminState {
    pub store: WorkloadStore,
    pub certificates: Arc<dyn CertificateSource>,
    /// The proxy's effective configuration, under `config`.
    pub config: Value,
    pub sections: Vec<Arc<dyn DumpSection>>,
}

impl AdminState {
    pub fn new(store: WorkloadStore) -> Self {
        AdminState {
            store,
            certificates: Arc::new(NoCertificates),
            config: Value::Object(Map::new()),
            sections: Vec::new(),
        }
    }

    pub fn with_certificates(mut self, source: impl CertificateSource) -> Self {
        self.certificates = Arc::new(source);
        self
    }

    pub fn with_config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    pub fn with_section(mut self, section: impl DumpSection) -> Self {
        self.sections.push(Arc::new(section));
        self
    }

    /// The whole dump as one JSON object.
    pub async fn config_dump(&self) -> Value {
        let snapshot = self.store.snapshot();
        let mut dump = match serde_json::to_value(snapshot.dump()) {
            Ok(Value::Object(map)) => map,
            // The dump is a struct of sequences and maps: it cannot fail.
            _ => Map::new(),
        };
        dump.insert(
            "certificates".into(),
            json!(self.certificates.certificates().await),
        );
        dump.insert("config".into(), self.config.clone());
        for section in &self.sections {
            dump.insert(section.key().into(), section.dump());
        }
        Value::Object(dump)
    }
}

pub(super) async fn config_dump(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(state.config_dump().await)
}

pub(super) async fn certs(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(json!({ "certificates": state.certificates.certificates().await }))
}
