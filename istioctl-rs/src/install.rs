//! `istioctl-rs install`: the manifest applied with server-side apply, in
//! dependency order, then a wait for every workload to roll out.
//!
//! 1. The checks that must pass ([`precheck`]): a Kubernetes recent enough,
//!    no other Istio installation.
//! 2. The namespace; then the mesh root ([`mesh_root`]): Secret `cacerts`
//!    (created only if absent) and ConfigMap `istio-ca-root-cert`.
//! 3. The CRDs, then a wait until each is Established, so nothing after
//!    them meets a kind the API server does not serve yet. The Gateway API
//!    CRDs are created only where absent: a cluster that has them (at any
//!    version) keeps its own.
//! 4. Everything else in [`InstallKind`] order: identities and RBAC,
//!    configuration, Services, the webhook, the workloads.
//! 5. A wait for the Deployments and DaemonSets, with a live display.
//!
//! `--dry-run` makes no request at all: it prints what would be applied.

use std::io::Write;
use std::time::Duration;

use kube::Client;

use crate::cluster::{self, ClusterError};
use crate::manifest::{self, InstallKind, Manifest, ManifestError, ManifestObject};
use crate::mesh_root::{self, MeshRoot, MeshRootError};
use crate::precheck::{self, Check};
use crate::rollout::{self, Progress, RolloutError, Workload};
use crate::values::Values;

/// The namespace the mesh is installed in; fixed, as istiod-rs's and
/// ztunnel-rs's defaults and the trusted node agent name it.
pub const NAMESPACE: &str = api::labels::DEFAULT_ROOT_NAMESPACE;

/// Everything an install is told.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    pub values: Values,
    /// Print what would be applied; make no request.
    pub dry_run: bool,
    /// How long to wait for the CRDs to be established and for the
    /// workloads to roll out (upstream istioctl's readiness timeout: 300s).
    pub timeout: Duration,
    /// How often they are read meanwhile.
    pub poll_interval: Duration,
}

impl InstallOptions {
    pub fn new(values: Values) -> Self {
        InstallOptions {
            values,
            dry_run: false,
            timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    MeshRoot(#[from] MeshRootError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error("cannot install here:\n{}", failed.iter().map(|c| format!("  {c}")).collect::<Vec<_>>().join("\n"))]
    Precheck { failed: Vec<Check> },
    #[error(
        "CustomResourceDefinitions not established after {timeout:?}: {}; see `kubectl get crd NAME -o yaml` (status.conditions)",
        names.join(", ")
    )]
    CrdsNotEstablished {
        timeout: Duration,
        names: Vec<String>,
    },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// What an install did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    /// Every object applied, `Kind namespace/name`, in order.
    pub applied: Vec<String>,
    pub mesh_root: Option<MeshRoot>,
}

/// Installs the mesh with `client`, reporting on `out` (`live`: redraw the
/// rollout display in place, for a terminal). The entry point of
/// `istioctl-rs install`, and of tests against a real API server.
pub async fn run<W: Write>(
    client: &Client,
    options: &InstallOptions,
    out: &mut W,
    live: bool,
) -> Result<Installed, InstallError> {
    if options.dry_run {
        dry_run(options, out)?;
        return Ok(Installed {
            applied: Vec::new(),
            mesh_root: None,
        });
    }
    let manifest = manifest::generate(&options.values)?;

    let blocking = [
        precheck::kubernetes_version(client).await?,
        precheck::existing_installation(client).await?,
    ];
    let failed: Vec<Check> = blocking.into_iter().filter(Check::failed).collect();
    if !failed.is_empty() {
        return Err(InstallError::Precheck { failed });
    }

    let trust_domain = options.values.get("trustDomain").unwrap_or_default();
    let mut applied = Vec::new();
    let mut mesh_root = None;
    let mut crds = Vec::new();
    for (i, object) in manifest.objects.iter().enumerate() {
        apply(client, object, out, &mut applied).await?;
        if object.kind == InstallKind::CustomResourceDefinition {
            crds.push(object.name.clone());
        }
        let next = manifest.objects.get(i + 1).map(|o| o.kind);
        if object.kind == InstallKind::Namespace && next != Some(InstallKind::Namespace) {
            let outcome = mesh_root::ensure(client, NAMESPACE, trust_domain).await?;
            match outcome {
                MeshRoot::Created => writeln!(
                    out,
                    "created Secret {NAMESPACE}/{}: a new mesh root (kept by later installs; uninstall --purge removes it)",
                    mesh_root::SECRET
                )?,
                MeshRoot::Kept => writeln!(
                    out,
                    "kept Secret {NAMESPACE}/{}: the existing mesh root",
                    mesh_root::SECRET
                )?,
            }
            applied.push(format!("ConfigMap {NAMESPACE}/{}", mesh_root::CONFIG_MAP));
            writeln!(
                out,
                "applied ConfigMap {NAMESPACE}/{}",
                mesh_root::CONFIG_MAP
            )?;
            mesh_root = Some(outcome);
        }
        if object.kind == InstallKind::CustomResourceDefinition
            && next != Some(InstallKind::CustomResourceDefinition)
        {
            wait_established(client, &crds, options).await?;
            writeln!(out, "{} CustomResourceDefinitions established", crds.len())?;
        }
    }

    let workloads = Workload::of(&manifest.objects);
    writeln!(
        out,
        "waiting for the components to be ready (up to {:?}):",
        options.timeout
    )?;
    let mut progress = Progress::new(&mut *out, live);
    rollout::wait(
        client,
        &workloads,
        options.timeout,
        options.poll_interval,
        &mut progress,
    )
    .await?;
    write!(out, "{}", next_steps())?;
    Ok(Installed { applied, mesh_root })
}

async fn apply<W: Write>(
    client: &Client,
    object: &ManifestObject,
    out: &mut W,
    applied: &mut Vec<String>,
) -> Result<(), InstallError> {
    if object.if_absent {
        let created = cluster::create_unless_present(
            client,
            object.kind,
            object.namespace.as_deref(),
            &object.body,
        )
        .await?;
        if created {
            writeln!(out, "created {}", object.describe())?;
            applied.push(object.describe());
        } else {
            writeln!(
                out,
                "kept {}: the cluster has it already, left as it is",
                object.describe()
            )?;
        }
        return Ok(());
    }
    cluster::apply(client, object).await?;
    writeln!(out, "applied {}", object.describe())?;
    applied.push(object.describe());
    Ok(())
}

/// Reads each CRD until its `Established` condition is True.
async fn wait_established(
    client: &Client,
    names: &[String],
    options: &InstallOptions,
) -> Result<(), InstallError> {
    let pending = cluster::wait_until(
        names.to_vec(),
        options.timeout,
        options.poll_interval,
        async |name: &String| {
            let crd =
                cluster::get(client, InstallKind::CustomResourceDefinition, None, name).await?;
            Ok(crd.is_some_and(|crd| {
                crd["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                })
            }))
        },
    )
    .await?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(InstallError::CrdsNotEstablished {
            timeout: options.timeout,
            names: pending,
        })
    }
}

/// `--dry-run`: what an install would apply, in order; no cluster needed.
pub fn dry_run<W: Write>(options: &InstallOptions, out: &mut W) -> Result<(), InstallError> {
    let manifest = manifest::generate(&options.values)?;
    write_plan(&manifest, out)?;
    Ok(())
}

fn write_plan<W: Write>(manifest: &Manifest, out: &mut W) -> std::io::Result<()> {
    writeln!(
        out,
        "Dry run: nothing is applied. An install would apply, in order:"
    )?;
    for (i, object) in manifest.objects.iter().enumerate() {
        let only = if object.if_absent {
            ", created only if absent"
        } else {
            ""
        };
        writeln!(out, "  {} ({}{only})", object.describe(), object.source)?;
        let next = manifest.objects.get(i + 1).map(|o| o.kind);
        if object.kind == InstallKind::Namespace && next != Some(InstallKind::Namespace) {
            writeln!(
                out,
                "  Secret {NAMESPACE}/{}: created with a new mesh root unless it exists",
                mesh_root::SECRET
            )?;
            writeln!(
                out,
                "  ConfigMap {NAMESPACE}/{}: the mesh root's certificate",
                mesh_root::CONFIG_MAP
            )?;
        }
    }
    writeln!(
        out,
        "then wait for: {}",
        Workload::of(&manifest.objects)
            .iter()
            .map(Workload::describe)
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        out,
        "`istioctl-rs manifest generate` prints the objects themselves."
    )
}

/// What to do once the mesh runs.
pub fn next_steps() -> String {
    format!(
        "\
The mesh is installed.

Next steps:
  Enrol a namespace's pods:
    kubectl label namespace NAMESPACE {mode}={ambient}
  See which pods are captured:
    kubectl get pods -n NAMESPACE -o custom-columns=NAME:.metadata.name,REDIRECTION:.metadata.annotations.ambient\\.istio\\.io/redirection
  Require mutual TLS in the namespace:
    kubectl apply -n NAMESPACE -f - <<< '{{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {{name: default}}, spec: {{mtls: {{mode: STRICT}}}}}}'
  Take a pod out: label it {mode}={none}; take the namespace out: kubectl label namespace NAMESPACE {mode}-
  Remove the mesh: istioctl-rs uninstall
",
        mode = api::labels::DATAPLANE_MODE,
        ambient = api::labels::DATAPLANE_MODE_AMBIENT,
        none = api::labels::DATAPLANE_MODE_NONE,
    )
}
