//! Kubernetes mode: the `ValidatingWebhookConfiguration` that sends policy
//! objects to istiod-rs (installed from
//! `manifests/install/istiod-validating-webhook.yaml`) is kept pointed at
//! istiod, as upstream's validation webhook controller does
//! (`pkg/webhooks/validation/controller/controller.go`):
//!
//! 1. every webhook's `clientConfig.caBundle` is the mesh root, which
//!    signs istiod's serving certificate (the manifest ships none);
//! 2. `failurePolicy` stays as installed (`Ignore`) until a dry-run create
//!    of an invalid AuthorizationPolicy comes back "denied the request",
//!    proof that the API server reaches istiod's webhook and trusts it;
//!    then it becomes `Fail`, so no object skips validation while istiod is
//!    away. istiod-rs never turns it back to `Ignore`.
//!
//! The configuration is watched (by name): when an install re-applies the
//! manifest (empty `caBundle`, `Ignore`), it is patched again. Patches are
//! strategic merges keyed by webhook name and carry the `resourceVersion`
//! they were computed from, so a concurrent change makes them fail (and
//! the watch delivers the new version) rather than overwrite it.

use std::time::Duration;

use api::crd::AuthorizationPolicy;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The field manager istiod-rs patches as.
const FIELD_MANAGER: &str = "istiod-rs";
/// The failure policy once the webhook is proven to work.
const FAIL: &str = "Fail";
/// The dry-run object: rejected by the webhook for its port.
pub const PROBE_NAME: &str = "istiod-rs-webhook-probe";
const PROBE_PORT: &str = "istiod-rs-probe-not-a-port";
/// What the API server says when a webhook refuses an object (upstream
/// matches the same words).
const DENIED: &str = "denied the request";

/// What the configuration needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// A strategic merge patch to send.
    Patch(Value),
    /// Find out whether the API server reaches the webhook (dry run).
    Probe,
    /// Nothing to do.
    Settled,
}

/// The next step for `current`, given the mesh root `ca_bundle` (PEM) and
/// whether the webhook has been seen refusing an invalid object.
pub fn plan(current: &ValidatingWebhookConfiguration, ca_bundle: &[u8], proven: bool) -> Plan {
    let webhooks = current.webhooks.as_deref().unwrap_or_default();
    if webhooks.is_empty() {
        return Plan::Settled;
    }
    let bundle_missing = webhooks
        .iter()
        .any(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_bundle));
    let fail_closed = webhooks
        .iter()
        .all(|w| w.failure_policy.as_deref() == Some(FAIL));
    if bundle_missing || (proven && !fail_closed) {
        let entries: Vec<Value> = webhooks
            .iter()
            .map(|w| {
                let mut entry = json!({
                    "name": w.name,
                    "clientConfig": {"caBundle": ByteString(ca_bundle.to_vec())},
                });
                if proven || w.failure_policy.as_deref() == Some(FAIL) {
                    entry["failurePolicy"] = json!(FAIL);
                }
                entry
            })
            .collect();
        let mut patch = json!({"webhooks": entries});
        if let Some(version) = &current.metadata.resource_version {
            patch["metadata"] = json!({"resourceVersion": version});
        }
        return Plan::Patch(patch);
    }
    if fail_closed || proven {
        Plan::Settled
    } else {
        Plan::Probe
    }
}

/// The AuthorizationPolicy the dry run tries to create: its port is not a
/// number, which the webhook refuses.
pub fn probe_policy(namespace: &str) -> AuthorizationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": PROBE_NAME, "namespace": namespace},
        "spec": {"rules": [{"to": [{"operation": {"ports": [PROBE_PORT]}}]}]},
    }))
    .expect("the probe policy is a valid AuthorizationPolicy object")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigurationError {
    #[error(
        "could not patch ValidatingWebhookConfiguration {name}: {source}; check that istiod-rs may patch validatingwebhookconfigurations"
    )]
    Patch { name: String, source: kube::Error },
    #[error("the webhook is not in use yet: {0}")]
    NotYet(String),
}

/// Keeps one ValidatingWebhookConfiguration pointed at istiod.
pub struct ConfigurationKeeper {
    configurations: Api<ValidatingWebhookConfiguration>,
    probes: Api<AuthorizationPolicy>,
    name: String,
    ca_bundle: watch::Receiver<String>,
    retry_min: Duration,
    retry_max: Duration,
}

impl std::fmt::Debug for ConfigurationKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigurationKeeper")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ConfigurationKeeper {
    /// Keeps configuration `name` holding `ca_bundle` (PEM, the mesh roots
    /// as they change); the dry run
    /// goes to `probe_namespace` (the root namespace, which exists).
    pub fn new(
        client: kube::Client,
        name: impl Into<String>,
        ca_bundle: watch::Receiver<String>,
        probe_namespace: &str,
        retry: (Duration, Duration),
    ) -> Self {
        ConfigurationKeeper {
            configurations: Api::all(client.clone()),
            probes: Api::namespaced(client, probe_namespace),
            name: name.into(),
            ca_bundle,
            retry_min: retry.0,
            retry_max: retry.1.max(retry.0),
        }
    }

    /// Watches the configuration and brings it in line until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut roots = self.ca_bundle.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher::watcher(self.configurations.clone(), config)
            .default_backoff()
            .boxed();
        let mut current: Option<ValidatingWebhookConfiguration> = None;
        let mut proven = false;
        let mut delay = self.retry_min;
        let mut retry_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => match event {
                    None => return,
                    Some(Ok(Event::Init)) => {
                        current = None;
                        continue;
                    }
                    Some(Ok(Event::InitApply(o) | Event::Apply(o))) => current = Some(o),
                    Some(Ok(Event::InitDone)) => {
                        if current.is_none() {
                            warn!(name = %self.name, "no ValidatingWebhookConfiguration {}: policies are not validated at admission; apply manifests/install/istiod-validating-webhook.yaml", self.name);
                        }
                    }
                    Some(Ok(Event::Delete(_))) => {
                        warn!(name = %self.name, "the ValidatingWebhookConfiguration was deleted: policies are not validated at admission");
                        current = None;
                        continue;
                    }
                    Some(Err(error)) => {
                        warn!(name = %self.name, %error, "watching the ValidatingWebhookConfiguration failed; retrying");
                        continue;
                    }
                },
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
                // The CA's roots changed (a plug-in CA rotation): patch.
                Ok(()) = roots.changed() => {}
            }
            retry_at = None;
            let Some(configuration) = current.take() else {
                continue;
            };
            match self.reconcile(configuration.clone(), &mut proven).await {
                Ok(updated) => {
                    current = Some(updated);
                    delay = self.retry_min;
                }
                Err(error) => {
                    info!(name = %self.name, %error, retry_in = ?delay, "ValidatingWebhookConfiguration not settled yet");
                    current = Some(configuration);
                    retry_at = Some(Instant::now() + delay);
                    delay = (delay * 2).min(self.retry_max);
                }
            }
        }
    }

    /// Applies [`plan`] until it settles; returns the configuration as
    /// last patched.
    async fn reconcile(
        &self,
        mut current: ValidatingWebhookConfiguration,
        proven: &mut bool,
    ) -> Result<ValidatingWebhookConfiguration, ConfigurationError> {
        loop {
            let ca_bundle = self.ca_bundle.borrow().clone();
            match plan(&current, ca_bundle.as_bytes(), *proven) {
                Plan::Settled => return Ok(current),
                Plan::Patch(patch) => {
                    let params = PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    };
                    current = self
                        .configurations
                        .patch(&self.name, &params, &Patch::Strategic(patch))
                        .await
                        .map_err(|source| ConfigurationError::Patch {
                            name: self.name.clone(),
                            source,
                        })?;
                    info!(name = %self.name, fail_closed = *proven, "ValidatingWebhookConfiguration patched: caBundle is the mesh root");
                }
                Plan::Probe => {
                    self.probe().await?;
                    info!(name = %self.name, "the webhook refused an invalid policy in a dry run; switching failurePolicy to Fail");
                    *proven = true;
                }
            }
        }
    }

    /// Ok when the API server has the webhook refuse an invalid policy.
    async fn probe(&self) -> Result<(), ConfigurationError> {
        let namespace = self.probes.namespace().unwrap_or_default().to_string();
        let params = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        match self.probes.create(&params, &probe_policy(&namespace)).await {
            Err(kube::Error::Api(status)) if status.message.contains(DENIED) => Ok(()),
            // No AuthorizationPolicy CRD: nothing to validate, and no way to
            // check; as upstream, assume the webhook works.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                warn!("the AuthorizationPolicy CRD is not installed; cannot check the webhook, assuming it works");
                Ok(())
            }
            Err(error) => Err(ConfigurationError::NotYet(format!(
                "the dry run of an invalid AuthorizationPolicy failed otherwise: {error}"
            ))),
            Ok(_) => Err(ConfigurationError::NotYet(
                "the API server admitted an invalid AuthorizationPolicy in a dry run, so it does not call istiod's webhook yet (are istiod's Service endpoints ready?)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &[u8] = b"-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n";

    fn configuration(webhooks: Value) -> ValidatingWebhookConfiguration {
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "istio-validator-istio-system", "resourceVersion": "7"},
            "webhooks": webhooks,
        }))
        .unwrap()
    }

    fn webhook(bundle: Option<&[u8]>, policy: &str) -> Value {
        let mut w = json!({
            "name": "validation.istio.io",
            "clientConfig": {"service": {"name": "istiod", "namespace": "istio-system", "path": "/validate"}},
            "failurePolicy": policy,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        });
        if let Some(b) = bundle {
            w["clientConfig"]["caBundle"] = json!(ByteString(b.to_vec()));
        }
        w
    }

    fn patch(fail: bool) -> Plan {
        let mut entry = json!({"name": "validation.istio.io", "clientConfig": {"caBundle": ByteString(ROOT.to_vec())}});
        if fail {
            entry["failurePolicy"] = json!("Fail");
        }
        Plan::Patch(json!({"metadata": {"resourceVersion": "7"}, "webhooks": [entry]}))
    }

    #[test]
    fn plans_the_bundle_then_the_probe_then_fail_closed() {
        let cases = [
            ("as installed", webhook(None, "Ignore"), false, patch(false)),
            (
                "another bundle",
                webhook(Some(b"old root"), "Ignore"),
                false,
                patch(false),
            ),
            (
                "bundle in place, not proven",
                webhook(Some(ROOT), "Ignore"),
                false,
                Plan::Probe,
            ),
            (
                "bundle in place, proven",
                webhook(Some(ROOT), "Ignore"),
                true,
                patch(true),
            ),
            (
                "fail closed already",
                webhook(Some(ROOT), "Fail"),
                false,
                Plan::Settled,
            ),
            (
                "proven and fail closed",
                webhook(Some(ROOT), "Fail"),
                true,
                Plan::Settled,
            ),
            // A new root never loosens the failure policy.
            (
                "new bundle, fail closed",
                webhook(Some(b"old root"), "Fail"),
                false,
                patch(true),
            ),
        ];
        for (name, w, proven, want) in cases {
            assert_eq!(
                plan(&configuration(json!([w])), ROOT, proven),
                want,
                "{name}"
            );
        }
        assert_eq!(plan(&configuration(json!([])), ROOT, false), Plan::Settled);
    }

    #[test]
    fn the_probe_is_a_policy_the_webhook_refuses() {
        let probe = probe_policy("istio-system");
        assert_eq!(probe.metadata.namespace.as_deref(), Some("istio-system"));
        let problems = crate::index::validate_authorization_policy("istio-system", &probe);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].field(),
            Some("rules[0].to[0].operation.ports[0]")
        );
    }
}
