//! istiod-rs's app in-process on loopback, reading a temporary config
//! directory: how the component and client tests run the real thing.
//!
//! Included with `#[path]` by `tests/component.rs` and `tests/clients.rs`,
//! next to `http_client.rs`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use istiod_rs::app::{Addresses, App, AppConfig, Source, TokenSource};
use istiod_rs::ca::CaConfig;
use istiod_rs::state::directory::DirectoryConfig;
use proxy_core::identity::ControlPlane;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

use super::http_client::{http_get, metric_sample};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// Only turns a hang into a failure; nothing should take this long.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Bearer tokens: one ztunnel per node, and a workload of `demo`.
pub const TOKENS: &str = "\
tokens:
  - {token: ztunnel-node-a, serviceAccount: istio-system/ztunnel, node: node-a}
  - {token: ztunnel-node-b, serviceAccount: istio-system/ztunnel, node: node-b}
  - {token: demo-client, serviceAccount: demo/client}
";

/// A running istiod on a temporary directory: `config/` (the cluster
/// state), `data/` (the CA's root), `tokens.yaml`, and one file per token
/// for the proxies' `--token-file`.
pub struct LocalIstiod {
    dir: tempfile::TempDir,
    app: Option<App>,
    addresses: Addresses,
    /// Applied to the configuration of every start.
    customize: Arc<dyn Fn(&mut AppConfig) + Send + Sync>,
}

impl LocalIstiod {
    /// Writes `files` (name, YAML) into the config directory and starts
    /// istiod on loopback ports; returns once it is ready.
    pub async fn start(files: &[(&str, &str)]) -> Self {
        Self::start_with(files, |_| {}).await
    }

    /// [`LocalIstiod::start`], with `customize` applied to the configuration.
    pub async fn start_with(
        files: &[(&str, &str)],
        customize: impl Fn(&mut AppConfig) + Send + Sync + 'static,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("tokens.yaml"), TOKENS).unwrap();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut istiod = LocalIstiod {
            dir,
            app: None,
            addresses: Addresses {
                grpc_tls: loopback,
                grpc_plaintext: Some(loopback),
                monitoring: loopback,
                http: None,
                webhook: None,
            },
            customize: Arc::new(customize),
        };
        for (name, yaml) in files {
            istiod.write(name, yaml);
        }
        istiod.run().await;
        istiod
    }

    fn config(&self) -> AppConfig {
        let mut config = AppConfig::on_loopback(
            Source::Directory(DirectoryConfig {
                poll_interval: Duration::from_millis(50),
                ..DirectoryConfig::new(self.config_dir())
            }),
            TokenSource::File(self.dir.path().join("tokens.yaml")),
            CaConfig::new(TRUST_DOMAIN, self.dir.path().join("data")),
        );
        // A restart keeps the ports the proxies know.
        config.grpc.tls_addr = self.addresses.grpc_tls;
        config.grpc.plaintext_addr = self.addresses.grpc_plaintext;
        config.grpc.drain_timeout = Duration::from_secs(1);
        config.monitoring.addr = self.addresses.monitoring;
        (self.customize)(&mut config);
        config
    }

    async fn run(&mut self) {
        let app = App::start(self.config()).await.expect("istiod-rs starts");
        tokio::time::timeout(PATIENCE, app.ready())
            .await
            .expect("istiod-rs becomes ready");
        self.addresses = app.addresses();
        self.app = Some(app);
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("istiod is running")
    }

    /// Stops istiod (SIGTERM's path); the proxies keep what they hold.
    pub async fn stop(&mut self) {
        let app = self.app.take().expect("istiod is running");
        tokio::time::timeout(PATIENCE, app.shutdown())
            .await
            .expect("istiod-rs stops");
    }

    /// Starts it again on the same ports and directories.
    pub async fn restart(&mut self) {
        if self.app.is_some() {
            self.stop().await;
        }
        self.run().await;
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Writes a file of the cluster state the way tools should: whole, by rename.
    /// Writes `name` (a path under the config directory) atomically.
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self
            .dir
            .path()
            .join(format!("{}.tmp", name.replace('/', "_")));
        std::fs::write(&tmp, yaml).unwrap();
        let path = self.config_dir().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.config_dir().join(name)).unwrap();
    }

    /// The mesh roots, read from where istiod says they are.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        proxy_core::tls::load_pem_certificates(self.app().root_cert_path()).unwrap()
    }

    /// A file holding `token`, as a proxy's `--token-file`.
    pub fn token_file(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{token}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// The TLS control-plane channel settings a proxy holding `token` uses.
    pub fn control_plane(&self, token: &str) -> ControlPlane {
        ControlPlane::tls(self.addresses.grpc_tls.to_string(), self.roots())
            .with_token_path(self.token_file(token))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// GET on the monitoring port.
    pub async fn get(&self, path: &str) -> (http::StatusCode, String) {
        http_get(self.addresses.monitoring, path).await
    }

    /// The monitoring port's address.
    pub fn monitoring(&self) -> std::net::SocketAddr {
        self.addresses.monitoring
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
    }

    /// The value of one sample of `/metrics` (`name{labels}` as printed), 0
    /// when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        metric_sample(&text, sample)
    }
}

/// A pod of namespace `demo` on `node`, ready, with `labels` (YAML flow map
/// entries, e.g. `"app: web, version: v1"`).
pub fn pod(name: &str, node: &str, service_account: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  uid: uid-{name}
  labels: {{{labels}}}
spec:
  nodeName: {node}
  serviceAccountName: {service_account}
  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: \"True\"}}]
"
    )
}

/// Namespace `demo`, enrolled in ambient mode.
pub const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
";

/// Service `demo/web` on port `port` (a Kubernetes port number; the API
/// server would refuse one above 65535, the config directory does not).
pub fn service(port: u32) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {{app: web}}
  ports: [{{name: http, port: {port}, targetPort: http}}]
"
    )
}

/// The workload uid istiod gives pod `demo/<name>`.
pub fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/demo/{name}")
}

/// The resource name of service `demo/web`.
pub const WEB_SERVICE: &str = "demo/web.demo.svc.cluster.local";
