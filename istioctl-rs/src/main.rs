//! istioctl-rs: install, uninstall, manifest generate, x precheck, version.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use istioctl_rs::install::{self, InstallOptions};
use istioctl_rs::manifest;
use istioctl_rs::precheck;
use istioctl_rs::uninstall::{self, UninstallOptions};
use istioctl_rs::values::{self, Values};
use istioctl_rs::version;

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
