//! One waypoint Gateway rendered through `manifests/templates/waypoint.yaml`:
//! the Gateway's names are checked first (they land in names and labels of
//! Kubernetes objects, and a value must never change the YAML's structure),
//! then every `${key}` is replaced (the templating rule of
//! `manifests/install/`) and the documents are
//! read back as JSON objects, in the template's order.

use api::labels;
use api::manifest::{Document, ObjectKey, decode_document};
use gateway_api::gateways::Gateway;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use serde_json::Value;

use super::{ProvisionConfig, ProvisionError};

/// The template, as installed with the binary.
pub const TEMPLATE: &str = include_str!("../../../manifests/templates/waypoint.yaml");
/// Its name in messages.
const TEMPLATE_FILE: &str = "manifests/templates/waypoint.yaml";

/// A waypoint's objects.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// ServiceAccount, Deployment, Service: the template's order.
    pub objects: Vec<Value>,
    /// The ServiceAccount its pods run as.
    pub service_account: String,
    /// The name of its Service (and Deployment).
    pub service: String,
    /// The Service's hostname, `<service>.<namespace>.svc.<cluster domain>`.
    pub hostname: String,
}

/// `gateway` (named `key`) through the template with `config`'s values.
pub fn render(
    key: &ObjectKey,
    gateway: &Gateway,
    config: &ProvisionConfig,
) -> Result<Rendered, ProvisionError> {
    render_template(TEMPLATE, key, gateway, config)
}

/// [`render`] with another template (tests).
pub fn render_template(
    template: &str,
    key: &ObjectKey,
    gateway: &Gateway,
    config: &ProvisionConfig,
) -> Result<Rendered, ProvisionError> {
    // The Service (and Deployment) takes the Gateway's name: a Service name
    // is a DNS-1035 label.
    check(
        "metadata.name",
        &key.name,
        dns1035_label(&key.name),
        "a Service name (lower-case letters, digits and '-', starting with a letter, at most 63 characters)",
    )?;
    check(
        "metadata.namespace",
        &key.namespace,
        dns1123_label(&key.namespace),
        "a namespace name (lower-case letters, digits and '-', at most 63 characters)",
    )?;
    let uid = gateway.metadata.uid.clone().unwrap_or_default();
    check(
        "metadata.uid",
        &uid,
        uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "a uid (letters, digits and '-')",
    )?;
    let annotations = gateway.metadata.annotations.clone().unwrap_or_default();
    let service_account = match annotations.get(super::SERVICE_ACCOUNT_ANNOTATION) {
        Some(sa) => {
            check(
                &format!(
                    "metadata.annotations[{}]",
                    super::SERVICE_ACCOUNT_ANNOTATION
                ),
                sa,
                dns1123_subdomain(sa),
                "a ServiceAccount name (lower-case letters, digits, '-' and '.', at most 253 characters)",
            )?;
            sa.clone()
        }
        None => key.name.clone(),
    };
    if let Some(sa) = annotations.get(labels::FOR_SERVICE_ACCOUNT) {
        check(
            &format!("metadata.annotations[{}]", labels::FOR_SERVICE_ACCOUNT),
            sa,
            dns1123_subdomain(sa),
            "the name of the ServiceAccount whose workloads the waypoint serves",
        )?;
    }
    if let Some(traffic) = gateway
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::WAYPOINT_FOR))
    {
        check(
            &format!("metadata.labels[{}]", labels::WAYPOINT_FOR),
            traffic,
            ["service", "workload", "all", "none"].contains(&traffic.as_str()),
            "service, workload, all or none",
        )?;
    }

    let values: [(&str, &str); 10] = [
        ("hub", &config.hub),
        ("tag", &config.tag),
        ("imagePullPolicy", &config.image_pull_policy),
        ("logLevel", &config.log_level),
        ("trustDomain", &config.trust_domain),
        ("xdsAddress", &config.xds_address),
        ("gateway.name", &key.name),
        ("gateway.namespace", &key.namespace),
        ("gateway.uid", &uid),
        ("serviceAccount", &service_account),
    ];
    let text = substitute(template, &values)?;
    let objects = api::manifest::documents(&text)
        .iter()
        .map(decode)
        .collect::<Result<Vec<Value>, _>>()?;
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default())
        .collect();
    if kinds != ["ServiceAccount", "Deployment", "Service"] {
        return Err(ProvisionError::Rendered(format!(
            "{TEMPLATE_FILE} must hold a ServiceAccount, a Deployment and a Service, in that order; it holds {kinds:?}"
        )));
    }
    let service = objects[2]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let hostname = format!("{service}.{}.svc.{}", key.namespace, config.cluster_domain);
    Ok(Rendered {
        objects,
        service_account,
        service,
        hostname,
    })
}

/// A rendered document as it is written (the exact apply body), once it
/// decodes strictly as its kind: a field the kind does not have would be
/// dropped or refused by the API server.
fn decode(doc: &Document<'_>) -> Result<Value, ProvisionError> {
    let at = |reason: String| {
        ProvisionError::Rendered(format!("{TEMPLATE_FILE}:{}: {reason}", doc.first_line))
    };
    let value: Value = serde_saphyr::from_str(doc.body).map_err(|e| at(e.to_string()))?;
    let unknown = match value["kind"].as_str() {
        Some("ServiceAccount") => decode_document::<ServiceAccount>(doc).map(|(_, u)| u),
        Some("Deployment") => decode_document::<Deployment>(doc).map(|(_, u)| u),
        Some("Service") => decode_document::<Service>(doc).map(|(_, u)| u),
        other => return Err(at(format!("{other:?} is not a kind a waypoint is made of"))),
    }
    .map_err(|e| at(e.to_string()))?;
    if let Some(field) = unknown.first() {
        return Err(ProvisionError::Rendered(format!(
            "{TEMPLATE_FILE}:{}: {} has no field {}",
            field.line,
            value["kind"].as_str().unwrap_or_default(),
            field.path
        )));
    }
    Ok(value)
}

/// `template` with each `${key}` of `values` replaced: the manifests' one
/// templating rule (istioctl-rs renders the install manifests by it). The
/// values are checked scalars without `$`, so whatever `${` is left names a
/// value the template wants and istiod-rs does not have.
fn substitute(template: &str, values: &[(&str, &str)]) -> Result<String, ProvisionError> {
    let text = values
        .iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(&format!("${{{key}}}"), value)
        });
    match text.find("${") {
        None => Ok(text),
        Some(at) => {
            let line = 1 + text[..at].matches('\n').count();
            let rest = &text[at..];
            let placeholder = rest.split_whitespace().next().unwrap_or(rest);
            Err(ProvisionError::Rendered(format!(
                "{TEMPLATE_FILE}:{line}: {placeholder} names no value istiod-rs has"
            )))
        }
    }
}

fn check(field: &str, value: &str, ok: bool, wanted: &str) -> Result<(), ProvisionError> {
    if ok {
        return Ok(());
    }
    Err(ProvisionError::InvalidField {
        field: field.to_string(),
        reason: format!("{value:?} is not {wanted}"),
    })
}

/// RFC 1123 label: lower-case alphanumerics and '-', alphanumeric at both
/// ends, at most 63 characters.
pub(crate) fn dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1035 label: an RFC 1123 label starting with a letter.
fn dns1035_label(s: &str) -> bool {
    dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// RFC 1123 subdomain: labels joined by '.', at most 253 characters.
fn dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(name: &str) -> (ObjectKey, Gateway) {
        let gw = serde_saphyr::from_str(&format!(
            "metadata: {{name: {name}, namespace: shop, uid: u-1}}\nspec: {{gatewayClassName: istio-waypoint, listeners: []}}\n"
        ))
        .unwrap();
        (ObjectKey::new("shop", name), gw)
    }

    fn error(template: &str, name: &str) -> String {
        let (key, gw) = gateway(name);
        render_template(template, &key, &gw, &ProvisionConfig::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_installed_template_renders() {
        let (key, gw) = gateway("reviews-waypoint");
        let rendered = render(&key, &gw, &ProvisionConfig::default()).unwrap();
        assert_eq!(rendered.service, "reviews-waypoint");
        assert_eq!(rendered.service_account, "reviews-waypoint");
        assert_eq!(rendered.hostname, "reviews-waypoint.shop.svc.cluster.local");
    }

    #[test]
    fn a_template_that_does_not_render_says_where() {
        let sa = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespace: shop}\n";
        assert_eq!(
            error(&format!("{sa}---\nkind: ${{nope}}\n"), "w"),
            "the rendered waypoint template is not valid: manifests/templates/waypoint.yaml:5: ${nope} names no value istiod-rs has"
        );
        assert_eq!(
            error(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: shop}\nspec:\n  replicaz: 1\n",
                "w"
            ),
            "the rendered waypoint template is not valid: manifests/templates/waypoint.yaml:5: Deployment has no field spec.replicaz"
        );
        assert!(
            error(sa, "w").ends_with(
                "must hold a ServiceAccount, a Deployment and a Service, in that order; it holds [\"ServiceAccount\"]"
            ),
            "{}",
            error(sa, "w")
        );
        assert_eq!(
            error(TEMPLATE, "reviews.waypoint"),
            "metadata.name: \"reviews.waypoint\" is not a Service name (lower-case letters, digits and '-', starting with a letter, at most 63 characters)"
        );
    }

    #[test]
    fn names_are_checked_as_kubernetes_does() {
        assert!(dns1035_label("reviews-waypoint"));
        assert!(!dns1035_label("9lives"));
        assert!(dns1123_label("9lives"));
        assert!(!dns1123_label("a_b"));
        assert!(!dns1123_label("-a"));
        assert!(!dns1123_label(&"a".repeat(64)));
        assert!(dns1123_subdomain("a.b-c.d"));
        assert!(!dns1123_subdomain("a..b"));
        assert!(!dns1123_subdomain("A"));
    }
}
