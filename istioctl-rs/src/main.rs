//! istioctl-rs: install, uninstall, manifest generate, x precheck, version,
//! waypoint, ztunnel-config, completion.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use istioctl_rs::analyze;
use istioctl_rs::describe;
use istioctl_rs::install::{self, InstallOptions};
use istioctl_rs::manifest;
use istioctl_rs::pods;
use istioctl_rs::precheck;
use istioctl_rs::proxy_status;
use istioctl_rs::uninstall::{self, UninstallOptions};
use istioctl_rs::values::{self, Values};
use istioctl_rs::version;
use istioctl_rs::waypoint::{self, ApplyOptions, Selection, Spec, TrafficType};
use istioctl_rs::ztunnel_config::{self, AdminUrl, Target, View, WorkloadFilter};

#[derive(Parser, Debug)]
#[command(
    name = "istioctl-rs",
    version,
    about = "The istio-rs mesh's command-line tool"
)]
struct Cli {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then
    /// the in-cluster configuration).
    #[arg(long, global = true, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The namespace the mesh runs in, where ztunnel-config, proxy-status
    /// and x describe look for ztunnel and istiod pods.
    #[arg(
        short = 'i',
        long,
        global = true,
        visible_alias = "istioNamespace",
        default_value = pods::DEFAULT_ISTIO_NAMESPACE
    )]
    istio_namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install (or upgrade) the mesh: server-side apply of the manifests,
    /// then a wait until every component is ready.
    Install {
        #[command(flatten)]
        values: ValueArgs,
        /// Print what would be applied; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "skip-confirmation")]
        yes: bool,
        /// How long to wait for the components to be ready (e.g. 300s, 5m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Delete what install applied (found by its label). The CRDs, the mesh
    /// root and the namespace stay unless --purge.
    Uninstall {
        /// Also delete the CRDs (and every policy and route in them), the
        /// mesh root Secret and the namespace.
        #[arg(long)]
        purge: bool,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "skip-confirmation")]
        yes: bool,
        /// How long to wait for the components to go.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Print the manifests an install applies.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
    /// Experimental commands.
    X {
        #[command(subcommand)]
        command: ExperimentalCommand,
    },
    /// This client's version and each installed component's.
    Version,
    /// Manage waypoints: Gateways of class istio-waypoint (one listener
    /// `mesh`, port 15008, HBONE), as upstream istioctl's `waypoint`.
    Waypoint {
        /// The waypoint's name.
        #[arg(long, global = true, default_value = waypoint::DEFAULT_NAME)]
        name: String,
        /// The namespace (default: the kubeconfig context's, else
        /// `default`; `generate` writes none unless given).
        #[arg(short = 'n', long, global = true)]
        namespace: Option<String>,
        #[command(subcommand)]
        command: WaypointCommand,
    },
    /// Show what a ztunnel holds (workloads, services, policies,
    /// certificates) and its live connections, read from its admin
    /// endpoint's /config_dump, with upstream istioctl's columns.
    ///
    /// On Kubernetes the ztunnel is a pod (ZTUNNEL: name[.namespace]), the
    /// one on --node, or any (certificate and connections need one named
    /// when several run), reached through a port-forward; elsewhere its admin
    /// URL (--admin) or a saved dump (--file).
    #[command(name = "ztunnel-config", visible_alias = "zc")]
    ZtunnelConfig {
        #[command(subcommand)]
        command: ZtunnelConfigCommand,
    },
    /// Every proxy connected to istiod-rs (ztunnels and waypoints): per
    /// resource type SYNCED, NOT SENT, STALE or a NACK, and whether it holds
    /// istiod-rs's current snapshot, from istiod-rs's /debug/syncz, with
    /// upstream istioctl's columns.
    ///
    /// On Kubernetes istiod-rs is a running istiod pod of the mesh's
    /// namespace, reached through a port-forward; elsewhere its monitoring
    /// URL (--istiod) or a saved answer (--file).
    #[command(name = "proxy-status", visible_alias = "ps")]
    ProxyStatus {
        /// One proxy, shown in detail (every type with versions, nonces and
        /// NACKs): its pod name, `pod.namespace`, or node id.
        name: Option<String>,
        /// istiod-rs's monitoring endpoint, e.g. http://127.0.0.1:15014
        /// (the local cluster's istiod).
        #[arg(long, value_name = "URL", value_parser = proxy_status::parse_istiod_url)]
        istiod: Option<AdminUrl>,
        /// A saved /debug/syncz JSON file (`-`: standard input).
        #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "istiod")]
        file: Option<PathBuf>,
        /// Only proxies of this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "short")]
        output: ztunnel_config::Output,
    },
    /// Analyze the mesh's configuration and print what is wrong, as
    /// upstream istioctl's `analyze`: `Level [CODE] (Kind namespace/name
    /// file:line) message`. Codes IST0xxx are upstream's; IRS0xxx are
    /// istio-rs's own, for what upstream has no message for.
    ///
    /// With files and no --use-kube, the files alone; otherwise the live
    /// cluster (the files, if any, applied over it). Exit code 79 when a
    /// message reaches --failure-threshold, 65 when a document could not be
    /// parsed, as upstream (`ExitAnalyzerFoundIssues`, `ExitDataError`).
    Analyze(AnalyzeArgs),
    /// Print a shell completion script (bash, zsh or fish).
    ///
    /// bash: `source <(istioctl-rs completion bash)`; zsh: `istioctl-rs
    /// completion zsh > "${fpath[1]}/_istioctl-rs"`; fish: `istioctl-rs
    /// completion fish > ~/.config/fish/completions/istioctl-rs.fish`.
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

#[derive(clap::Args, Debug)]
struct AnalyzeArgs {
    /// Files or directories to analyze (`-`: standard input).
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
    /// More files or directories (repeatable).
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR")]
    filenames: Vec<PathBuf>,
    /// Read directories' subdirectories too.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Analyze the live cluster (default: only when no file is given).
    #[arg(short = 'k', long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    use_kube: Option<bool>,
    /// Only this namespace's objects (live default: the context's
    /// namespace; files: all).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "log")]
    output: analyze::Format,
    /// The lowest level shown: Info, Warning or Error.
    #[arg(long, default_value = "Info")]
    output_threshold: analyze::Level,
    /// The lowest level that makes the exit code 79: Info, Warning or Error.
    #[arg(long, default_value = "Error")]
    failure_threshold: analyze::Level,
    /// Colour the levels (default: when standard output is a terminal and
    /// TERM is not dumb).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    color: Option<bool>,
    /// Documents that cannot be parsed do not make the exit code 65.
    #[arg(long)]
    ignore_unknown: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
enum ZtunnelConfigCommand {
    /// The workloads the ztunnel knows (NAMESPACE, POD NAME, ADDRESS, NODE,
    /// WAYPOINT, PROTOCOL).
    #[command(visible_aliases = ["workloads", "w"])]
    Workload {
        #[command(flatten)]
        source: ZtunnelArgs,
        /// Only workloads with this address.
        #[arg(long)]
        address: Option<String>,
        /// Only workloads of this namespace.
        #[arg(long)]
        workload_namespace: Option<String>,
        /// Only workloads on this node.
        #[arg(long)]
        workload_node: Option<String>,
    },
    /// The services the ztunnel knows (NAMESPACE, SERVICE NAME, SERVICE VIP,
    /// WAYPOINT, ENDPOINTS healthy/all).
    #[command(visible_aliases = ["services", "svc", "s"])]
    Service {
        #[command(flatten)]
        source: ZtunnelArgs,
        /// Only services of this namespace.
        #[arg(long)]
        service_namespace: Option<String>,
    },
    /// The authorization policies the ztunnel holds (NAMESPACE, POLICY NAME,
    /// ACTION, SCOPE).
    #[command(visible_aliases = ["policies", "pol", "p"])]
    Policy {
        #[command(flatten)]
        source: ZtunnelArgs,
        /// Only policies of this namespace.
        #[arg(long)]
        policy_namespace: Option<String>,
    },
    /// The certificates the ztunnel holds, one line per certificate of each
    /// identity's chain and roots.
    #[command(visible_aliases = ["certificates", "certs", "cert"])]
    Certificate {
        #[command(flatten)]
        source: ZtunnelArgs,
    },
    /// The ztunnel's live connections, per pod (upstream's WORKLOAD,
    /// DIRECTION, LOCAL, REMOTE, REMOTE TARGET, PROTOCOL; then ours: SOURCE
    /// and DESTINATION IDENTITY as mutual TLS proved them, SENT and RECEIVED
    /// bytes of the pod, DURATION). Addresses show as the dump names them
    /// (service hostname, workload.namespace) unless --raw.
    #[command(visible_alias = "cons")]
    Connections {
        #[command(flatten)]
        source: ZtunnelArgs,
        /// Only the connections of pods of this namespace.
        #[arg(long)]
        workload_namespace: Option<String>,
        /// Only inbound or only outbound connections (the table only; -o
        /// json|yaml filters by namespace alone, as upstream).
        #[arg(long, value_enum)]
        direction: Option<ztunnel_config::Direction>,
        /// Show IP addresses instead of names.
        #[arg(long)]
        raw: bool,
    },
    /// Every table above (-o json|yaml: the whole dump).
    All {
        #[command(flatten)]
        source: ZtunnelArgs,
    },
}

/// Which ztunnel a `ztunnel-config` view reads.
#[derive(clap::Args, Debug)]
struct ZtunnelArgs {
    /// The ztunnel pod, `name[.namespace]` (namespace default: the mesh's,
    /// --istio-namespace), reached through a port-forward.
    #[arg(value_name = "ZTUNNEL", conflicts_with_all = ["admin", "file", "node"])]
    ztunnel: Option<String>,
    /// The ztunnel pod on this node.
    #[arg(long, conflicts_with_all = ["admin", "file"])]
    node: Option<String>,
    #[command(flatten)]
    dump: DumpArgs,
}

#[derive(clap::Args, Debug)]
struct DumpArgs {
    /// The ztunnel's admin endpoint, e.g. http://127.0.0.1:15000 (loopback
    /// only on the ztunnel's host; `cargo xtask demo --keep` prints each
    /// node's). Without it or --file: a ztunnel pod on Kubernetes.
    #[arg(long, value_name = "URL")]
    admin: Option<AdminUrl>,
    /// A saved /config_dump JSON file (`-`: standard input).
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "admin")]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "short")]
    output: ztunnel_config::Output,
}

impl DumpArgs {
    /// `--file` or `--admin`; neither: a ztunnel pod (the caller finds it).
    fn target(&self) -> Option<Target> {
        match (&self.admin, &self.file) {
            (_, Some(file)) => Some(Target::File(file.clone())),
            (Some(admin), None) => Some(Target::Admin(admin.clone())),
            (None, None) => None,
        }
    }
}

/// A port-forward to the pod `find` picks, with the kubeconfig's client;
/// `elsewhere` says what to give instead without a cluster.
async fn forwarded(
    cli: &Cli,
    elsewhere: &str,
    find: impl AsyncFnOnce(&kube::Client) -> Result<pods::PodPort, pods::FindError>,
) -> anyhow::Result<pods::Forwarded> {
    let (client, _) = client(cli)
        .await
        .with_context(|| format!("without a Kubernetes cluster, {elsewhere}"))?;
    let pod = find(&client).await?;
    Ok(pods::Forwarded { client, pod })
}

/// What `ztunnel-config` and `x describe` read without a cluster.
const ZTUNNEL_ELSEWHERE: &str = "give the ztunnel's admin URL (--admin http://127.0.0.1:15000) or a saved /config_dump (-f FILE)";

#[derive(Subcommand, Debug)]
enum WaypointCommand {
    /// Print the waypoint Gateway as YAML (needs no cluster).
    Generate {
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Server-side apply the waypoint Gateway (field manager istioctl-rs).
    Apply {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Then label the namespace istio.io/use-waypoint=<name>.
        #[arg(long)]
        enroll_namespace: bool,
        /// With --enroll-namespace: replace the namespace's existing
        /// istio.io/use-waypoint. Without it, such a namespace gets a warning
        /// and nothing is applied.
        #[arg(long)]
        overwrite: bool,
        /// Wait until the Gateway is Programmed (istiod-rs has provisioned it).
        #[arg(short = 'w', long)]
        wait: bool,
        /// How long --wait waits (e.g. 90s, 5m).
        #[arg(long, default_value = "90s", value_parser = parse_duration)]
        waypoint_timeout: Duration,
    },
    /// List the waypoints, with whether istiod-rs created each on demand and
    /// the rules that need it.
    List {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Print JSON or YAML instead of a table.
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
    },
    /// Delete waypoints by name, or all of a namespace.
    ///
    /// A waypoint istiod-rs created on demand is refused (and then nothing is
    /// deleted): istiod-rs
    /// recreates it as long as an L7 rule needs it, so delete or change those
    /// rules instead. --force deletes it anyway.
    Delete {
        /// The waypoints to delete.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Every waypoint of the namespace.
        #[arg(long)]
        all: bool,
        /// Also delete waypoints istiod-rs created on demand (it recreates
        /// them while their rules exist: a way to have them provisioned afresh).
        #[arg(long)]
        force: bool,
    },
    /// Show each waypoint's Programmed condition (status, reason, message).
    Status {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Wait until every waypoint is Programmed.
        #[arg(short = 'w', long)]
        wait: bool,
        /// How long --wait waits (e.g. 90s, 5m).
        #[arg(long, default_value = "90s", value_parser = parse_duration)]
        waypoint_timeout: Duration,
    },
}

#[derive(clap::Args, Debug)]
struct GatewayArgs {
    /// The traffic the waypoint accepts (label istio.io/waypoint-for; without
    /// it istiod-rs takes `service`).
    #[arg(long = "for", value_enum)]
    traffic_type: Option<TrafficType>,
    /// Serve the workloads running as this ServiceAccount (annotation
    /// istio.io/for-service-account), as istiod-rs's on-demand waypoints do.
    #[arg(long, value_name = "SA")]
    service_account: Option<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OutputFormat {
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum ManifestCommand {
    /// The objects install would apply, as YAML, in the order it applies them.
    Generate {
        #[command(flatten)]
        values: ValueArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ExperimentalCommand {
    /// Check the cluster before an install.
    Precheck,
    /// How traffic to a pod or service flows, in one screen: enrolled or
    /// not, which node's ztunnel, which waypoint, which policies apply,
    /// which certificate; read from a ztunnel's /config_dump.
    Describe {
        #[command(subcommand)]
        what: DescribeCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DescribeCommand {
    /// A pod: NAME (with -n) or NAME.NAMESPACE.
    #[command(visible_alias = "po")]
    Pod {
        name: String,
        #[command(flatten)]
        args: DescribeArgs,
    },
    /// A service: NAME (with -n) or NAME.NAMESPACE.
    #[command(visible_alias = "svc")]
    Service {
        name: String,
        #[command(flatten)]
        args: DescribeArgs,
    },
}

#[derive(clap::Args, Debug)]
struct DescribeArgs {
    /// The namespace (default: `default`).
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    source: DumpArgs,
}

#[derive(clap::Args, Debug)]
struct ValueArgs {
    /// Set a value (repeatable; after the -f files).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A YAML file of values (repeatable; later files win).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    files: Vec<PathBuf>,
}

impl ValueArgs {
    fn values(&self) -> anyhow::Result<Values> {
        let mut values = Values::default();
        for path in &self.files {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the values file {}", path.display()))?;
            values.merge_file(&path.display().to_string(), &text)?;
        }
        for arg in &self.set {
            values.set_arg(arg)?;
        }
        Ok(values)
    }
}

/// `300s`, `5m`, `1h`, or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 300s or 5m"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

fn main() {
    let install_help = values::help();
    let matches = Cli::command()
        .mut_subcommand("install", |c| c.after_help(install_help.clone()))
        .mut_subcommand("manifest", |m| {
            m.mut_subcommand("generate", |c| c.after_help(install_help.clone()))
        })
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Command::Analyze(args) = &cli.command {
        let code = runtime
            .block_on(analyze_command(&cli, args))
            .unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                1
            });
        std::process::exit(code);
    }
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        Command::Manifest {
            command: ManifestCommand::Generate { values },
        } => {
            let manifest = manifest::generate(&values.values()?)?;
            stdout.write_all(manifest.to_yaml().as_bytes())?;
            Ok(())
        }
        Command::Install {
            values,
            dry_run,
            yes,
            timeout,
        } => {
            let mut options = InstallOptions::new(values.values()?);
            options.dry_run = *dry_run;
            options.timeout = *timeout;
            if *dry_run {
                install::dry_run(&options, &mut stdout)?;
                return Ok(());
            }
            let (client, cluster) = client(&cli).await?;
            if !yes {
                confirm(&format!(
                    "Install istio-rs {} into {cluster}?",
                    options.values.get("tag").unwrap_or_default()
                ))?;
            }
            let live = std::io::stdout().is_terminal();
            install::run(&client, &options, &mut stdout, live).await?;
            Ok(())
        }
        Command::Uninstall {
            purge,
            yes,
            timeout,
        } => {
            let (client, cluster) = client(&cli).await?;
            if !yes {
                let what = if *purge {
                    "istio-rs, its CRDs (with every policy and route), its mesh root and namespace"
                } else {
                    "istio-rs"
                };
                confirm(&format!("Remove {what} from {cluster}?"))?;
            }
            let options = UninstallOptions {
                purge: *purge,
                timeout: *timeout,
                ..UninstallOptions::default()
            };
            uninstall::run(&client, &options, &mut stdout).await?;
            Ok(())
        }
        Command::X {
            command: ExperimentalCommand::Describe { what },
        } => {
            let (subject, args) = match what {
                DescribeCommand::Pod { name, args } => {
                    (describe::Subject::pod(name, &args.namespace), args)
                }
                DescribeCommand::Service { name, args } => {
                    (describe::Subject::service(name, &args.namespace), args)
                }
            };
            let target = match args.source.target() {
                Some(target) => target,
                None => {
                    let istio_namespace = &cli.istio_namespace;
                    let forwarded = match &subject {
                        describe::Subject::Pod { namespace, name } => {
                            let find = async |client: &kube::Client| {
                                pods::ztunnel_of_pod(client, istio_namespace, namespace, name).await
                            };
                            forwarded(&cli, ZTUNNEL_ELSEWHERE, find).await?
                        }
                        describe::Subject::Service { .. } => {
                            let any = pods::ZtunnelChoice::Any { single: false };
                            let find = async |client: &kube::Client| {
                                pods::ztunnel(client, istio_namespace, &any).await
                            };
                            forwarded(&cli, ZTUNNEL_ELSEWHERE, find).await?
                        }
                    };
                    Target::Pod(forwarded)
                }
            };
            let bytes = ztunnel_config::fetch(&target).await?;
            let dump = ztunnel_config::ConfigDump::parse(&bytes)?;
            let origin = target.describe();
            let now = std::time::SystemTime::now();
            let text = describe::render(&dump, &subject, &origin, args.source.output, now)?;
            stdout.write_all(text.as_bytes())?;
            Ok(())
        }
        Command::X {
            command: ExperimentalCommand::Precheck,
        } => {
            let (client, cluster) = client(&cli).await?;
            let manifest = manifest::generate(&Values::default())?;
            writeln!(stdout, "Checking {cluster}:")?;
            let checks = precheck::run(&client, &manifest).await?;
            for check in &checks {
                writeln!(stdout, "  {check}")?;
            }
            if checks.iter().any(precheck::Check::failed) {
                bail!("the cluster is not ready for istio-rs (see FAIL above)");
            }
            writeln!(
                stdout,
                "No problem found: `istioctl-rs install` can proceed."
            )?;
            Ok(())
        }
        Command::Waypoint {
            name,
            namespace,
            command,
        } => waypoint_command(&cli, name, namespace.as_deref(), command, &mut stdout).await,
        Command::ZtunnelConfig { command } => {
            let (source, view) = ztunnel_view(command);
            let target = match source.dump.target() {
                Some(target) => target,
                None => {
                    let choice = match (&source.ztunnel, &source.node) {
                        (Some(name), _) => pods::ZtunnelChoice::Named(name.clone()),
                        (None, Some(node)) => pods::ZtunnelChoice::OnNode(node.clone()),
                        (None, None) => pods::ZtunnelChoice::Any {
                            single: matches!(view, View::Certificate | View::Connections(_)),
                        },
                    };
                    let namespace = &cli.istio_namespace;
                    let find = async |client: &kube::Client| {
                        pods::ztunnel(client, namespace, &choice).await
                    };
                    Target::Pod(forwarded(&cli, ZTUNNEL_ELSEWHERE, find).await?)
                }
            };
            let bytes = ztunnel_config::fetch(&target).await?;
            let dump = ztunnel_config::ConfigDump::parse(&bytes)
                .with_context(|| format!("reading {}", target.describe()))?;
            let output = source.dump.output;
            let text = ztunnel_config::render(&dump, &view, output, std::time::SystemTime::now())?;
            stdout.write_all(text.as_bytes())?;
            Ok(())
        }
        Command::ProxyStatus {
            name,
            istiod,
            file,
            namespace,
            output,
        } => {
            let source = match proxy_status::Source::from_args(istiod.clone(), file.clone()) {
                Some(source) => source,
                None => {
                    let namespace = &cli.istio_namespace;
                    let find = async |client: &kube::Client| pods::istiod(client, namespace).await;
                    proxy_status::Source::Pod(
                        forwarded(&cli, "give istiod's monitoring URL (--istiod http://127.0.0.1:15014) or a saved /debug/syncz (-f FILE)", find).await?,
                    )
                }
            };
            let bytes = proxy_status::fetch(&source).await?;
            let origin = source.origin();
            let syncz = proxy_status::parse(&bytes, &origin)?;
            let query = proxy_status::Query {
                name: name.clone(),
                namespace: namespace.clone(),
            };
            let text = proxy_status::render(&syncz, &query, *output, &origin)?;
            stdout.write_all(text.as_bytes())?;
            Ok(())
        }
        Command::Analyze(_) => unreachable!("main runs analyze itself, for its exit code"),
        Command::Completion { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "istioctl-rs", &mut stdout);
            Ok(())
        }
        Command::Version => {
            writeln!(stdout, "client: istioctl-rs {}", version::CLIENT)?;
            let manifest = manifest::generate(&Values::default())?;
            let components = match client(&cli).await {
                Ok((client, _)) => version::components(&client, &manifest)
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match components {
                Ok(components) => {
                    for c in components {
                        writeln!(stdout, "{c}")?;
                    }
                }
                Err(e) => writeln!(stdout, "components: unknown ({e:#})")?,
            }
            Ok(())
        }
    }
}

fn ztunnel_view(command: &ZtunnelConfigCommand) -> (&ZtunnelArgs, View) {
    match command {
        ZtunnelConfigCommand::Workload {
            source,
            address,
            workload_namespace,
            workload_node,
        } => (
            source,
            View::Workload(WorkloadFilter {
                address: address.clone(),
                namespace: workload_namespace.clone(),
                node: workload_node.clone(),
            }),
        ),
        ZtunnelConfigCommand::Service {
            source,
            service_namespace,
        } => (
            source,
            View::Service {
                namespace: service_namespace.clone(),
            },
        ),
        ZtunnelConfigCommand::Policy {
            source,
            policy_namespace,
        } => (
            source,
            View::Policy {
                namespace: policy_namespace.clone(),
            },
        ),
        ZtunnelConfigCommand::Certificate { source } => (source, View::Certificate),
        ZtunnelConfigCommand::Connections {
            source,
            workload_namespace,
            direction,
            raw,
        } => (
            source,
            View::Connections(ztunnel_config::ConnectionsFilter {
                namespace: workload_namespace.clone(),
                direction: *direction,
                raw: *raw,
            }),
        ),
        ZtunnelConfigCommand::All { source } => (source, View::All),
    }
}

async fn waypoint_command(
    cli: &Cli,
    name: &str,
    namespace: Option<&str>,
    command: &WaypointCommand,
    stdout: &mut impl Write,
) -> anyhow::Result<()> {
    let spec = |gateway: &GatewayArgs, namespace: Option<&str>| Spec {
        name: name.to_string(),
        namespace: namespace.map(String::from),
        traffic_type: gateway.traffic_type,
        service_account: gateway.service_account.clone(),
    };
    if let WaypointCommand::Generate { gateway } = command {
        let gateway = waypoint::gateway(&spec(gateway, namespace))?;
        stdout.write_all(waypoint::to_yaml(&gateway).as_bytes())?;
        return Ok(());
    }
    let (client, _) = client(cli).await?;
    let ns = namespace.unwrap_or(client.default_namespace()).to_string();
    let scope = |all: bool| (!all).then_some(ns.as_str());
    match command {
        WaypointCommand::Generate { .. } => unreachable!("handled above"),
        WaypointCommand::Apply {
            gateway,
            enroll_namespace,
            overwrite,
            wait,
            waypoint_timeout,
        } => {
            let mut options = ApplyOptions::new(spec(gateway, Some(&ns)));
            options.enroll_namespace = *enroll_namespace;
            options.overwrite = *overwrite;
            options.wait = *wait;
            options.timeout = *waypoint_timeout;
            waypoint::apply(&client, &options, stdout).await?;
        }
        WaypointCommand::List {
            all_namespaces,
            output,
        } => {
            let waypoints = waypoint::list(&client, scope(*all_namespaces)).await?;
            let text = match output {
                None => waypoint::list_table(&waypoints, *all_namespaces),
                Some(OutputFormat::Json) => serde_json::to_string_pretty(&waypoints)? + "\n",
                Some(OutputFormat::Yaml) => serde_saphyr::to_string(&waypoints)?,
            };
            stdout.write_all(text.as_bytes())?;
        }
        WaypointCommand::Delete { names, all, force } => {
            let selection = if *all {
                Selection::All
            } else {
                Selection::Names(names.clone())
            };
            waypoint::delete(&client, &ns, &selection, *force, stdout).await?;
        }
        WaypointCommand::Status {
            all_namespaces,
            wait,
            waypoint_timeout,
        } => {
            let wait = wait.then_some((*waypoint_timeout, Duration::from_secs(1)));
            waypoint::status(&client, scope(*all_namespaces), wait, stdout).await?;
        }
    }
    Ok(())
}

/// `analyze`: prints its messages and returns its exit code.
async fn analyze_command(cli: &Cli, args: &AnalyzeArgs) -> anyhow::Result<i32> {
    let files: Vec<PathBuf> = args.files.iter().chain(&args.filenames).cloned().collect();
    let use_kube = args.use_kube.unwrap_or(files.is_empty());
    let client = match use_kube {
        true => Some(
            client(cli)
                .await
                .context(
                    "analyze reads the live cluster unless given files (with --use-kube=false)",
                )?
                .0,
        ),
        false => None,
    };
    let namespace = match (&client, args.all_namespaces, &args.namespace) {
        (_, true, _) => None,
        (_, false, Some(ns)) => Some(ns.clone()),
        (Some(c), false, None) => Some(c.default_namespace().to_string()),
        (None, false, None) => None,
    };
    let colorize = args.color.unwrap_or_else(|| {
        std::io::stdout().is_terminal()
            && std::env::var("TERM").is_ok_and(|t| !t.eq_ignore_ascii_case("dumb"))
    });
    let options = analyze::Options {
        files,
        recursive: args.recursive,
        namespace,
        output_threshold: args.output_threshold,
        failure_threshold: args.failure_threshold,
        format: args.output,
        colorize,
        ignore_unknown: args.ignore_unknown,
    };
    let outcome = analyze::run(&options, client.as_ref(), &mut std::io::stdin().lock()).await?;
    std::io::stdout().write_all(outcome.stdout.as_bytes())?;
    std::io::stderr().write_all(outcome.stderr.as_bytes())?;
    Ok(outcome.code)
}

/// The client, and the cluster's address for messages.
async fn client(cli: &Cli) -> anyhow::Result<(kube::Client, String)> {
    let options = kube::config::KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match (&cli.kubeconfig, &cli.context) {
        (Some(path), _) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options).await?,
        (None, None) => kube::Config::infer().await.context(
            "no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a cluster; pass --kubeconfig",
        )?,
    };
    let cluster = format!("the cluster at {}", config.cluster_url);
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    Ok((client, cluster))
}

/// Asks on the terminal; without one, asks for -y instead of waiting.
fn confirm(question: &str) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("{question} There is no terminal to confirm on: pass -y to proceed");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("cancelled")
    }
}
