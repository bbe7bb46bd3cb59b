//! `/config_dump` and `/certs`: the store, the certificates (from whatever
//! holds them: the cert manager, through [`CertificateSource`]), the proxy's
//! configuration and any extra sections, under upstream ztunnel's keys.

use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};

use crate::identity::{CertificateManager, CertificateStatus};
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

/// What the certificate manager holds, identity by identity.
impl CertificateSource for CertificateManager {
    fn certificates(&self) -> BoxFuture<'_, Vec<CertsDump>> {
        let dump = self.snapshot().into_iter().map(CertsDump::from).collect();
        Box::pin(std::future::ready(dump))
    }
}

impl From<CertificateStatus> for CertsDump {
    fn from(status: CertificateStatus) -> Self {
        let now = std::time::SystemTime::now();
        let valid = status
            .certificate
            .as_ref()
            .filter(|c| !c.is_expired_at(now));
        let state = match (valid, &status.last_error) {
            (Some(_), _) => "Available".to_string(),
            (None, Some(error)) => format!("Unavailable: {error}"),
            (None, None) => "Initializing".to_string(),
        };
        let (cert_chain, root_certs) = match &status.certificate {
            Some(cert) => (
                cert.chain().iter().map(|c| cert_dump(c)).collect(),
                cert.roots().iter().map(|c| cert_dump(c)).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        CertsDump {
            identity: status.identity.to_string(),
            state,
            cert_chain,
            root_certs,
        }
    }
}

/// One certificate as upstream shows it; fields it cannot parse stay empty.
fn cert_dump(der: &rustls::pki_types::CertificateDer<'_>) -> CertDump {
    use base64::Engine;
    let pem = crate::tls::to_pem(std::slice::from_ref(der));
    let mut dump = CertDump {
        pem: base64::engine::general_purpose::STANDARD.encode(pem),
        ..CertDump::default()
    };
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der.as_ref()) {
        dump.serial_number = parsed.tbs_certificate.raw_serial_as_string();
        dump.valid_from = rfc3339(parsed.validity().not_before.to_datetime());
        dump.expiration_time = rfc3339(parsed.validity().not_after.to_datetime());
    }
    dump
}

/// `2024-05-01T12:00:00Z`: a time as the admin endpoints show it.
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    rfc3339(time::OffsetDateTime::from(t))
}

/// `2024-05-01T12:00:00Z`, as upstream prints certificate times.
fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// An extra top-level key in `/config_dump` (the xDS connection, say).
pub trait DumpSection: Send + Sync + 'static {
    fn key(&self) -> &'static str;
    fn dump(&self) -> Value;
    /// What the key holds, for the admin index.
    fn describe(&self) -> &'static str {
        ""
    }
}

impl DumpSection for crate::xds::StatusWatch {
    fn key(&self) -> &'static str {
        "xds"
    }

    fn describe(&self) -> &'static str {
        "the xDS connection: connected, synced, ACK/NACK per type"
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

    /// The admin index: each endpoint, and the extra keys of `/config_dump`.
    pub fn index(&self) -> String {
        let mut text = String::from(
            "admin endpoints:\n  /config_dump  workloads, services, policies, certificates, config\n",
        );
        let width = self
            .sections
            .iter()
            .map(|s| s.key().len())
            .max()
            .unwrap_or(0);
        for section in &self.sections {
            let line = format!("{:<width$}  {}", section.key(), section.describe());
            text.push_str(&format!("                {}\n", line.trim_end()));
        }
        text.push_str("  /certs        certificates held by this proxy\n");
        text
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ManagerConfig;
    use crate::testing::{TestCa, TestSigner};

    #[tokio::test]
    async fn the_manager_shows_each_identity_with_its_chain_and_roots() {
        let ca = Arc::new(TestCa::new("cluster.local"));
        let signer = TestSigner::new(ca.clone());
        let manager = signer.manager(ManagerConfig::default());
        let id = ca.identity("default", "web");
        let cert = manager.fetch(&id).await.unwrap();

        signer.set_failing(true);
        let broken = ca.identity("default", "broken");
        assert!(manager.fetch(&broken).await.is_err());

        let dump = manager.certificates().await;
        assert_eq!(dump.len(), 2, "{dump:?}");
        let broken_dump = &dump[0];
        assert_eq!(broken_dump.identity, broken.to_string());
        assert!(
            broken_dump.state.starts_with("Unavailable: "),
            "{broken_dump:?}"
        );
        assert!(broken_dump.cert_chain.is_empty());

        let web = &dump[1];
        assert_eq!(web.identity, id.to_string());
        assert_eq!(web.state, "Available");
        assert_eq!(web.cert_chain.len(), 1);
        assert_eq!(web.root_certs.len(), 1);
        let leaf = &web.cert_chain[0];
        assert_eq!(leaf.serial_number, cert.serial_number());
        let expected = rfc3339(time::OffsetDateTime::from(cert.not_after()));
        assert_eq!(leaf.expiration_time, expected);
        assert!(leaf.valid_from < leaf.expiration_time, "{leaf:?}");
        use base64::Engine;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(&leaf.pem)
            .unwrap();
        assert_eq!(String::from_utf8(pem).unwrap(), cert.chain_pem());
    }

    #[test]
    fn the_index_lists_each_extra_key_with_what_it_holds() {
        struct Connections;
        impl DumpSection for Connections {
            fn key(&self) -> &'static str {
                "workloadState"
            }
            fn dump(&self) -> Value {
                Value::Null
            }
            fn describe(&self) -> &'static str {
                "each pod and its live connections"
            }
        }
        let index = AdminState::new(WorkloadStore::new())
            .with_section(Connections)
            .index();
        assert!(
            index.starts_with("admin endpoints:\n  /config_dump "),
            "{index}"
        );
        assert!(
            index.contains("\n                workloadState  each pod and its live connections\n"),
            "{index}"
        );
        assert!(index.ends_with("  /certs        certificates held by this proxy\n"));
    }

    #[test]
    fn times_print_as_rfc3339_in_utc() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_714_564_800).unwrap();
        assert_eq!(rfc3339(t), "2024-05-01T12:00:00Z");
    }
}
