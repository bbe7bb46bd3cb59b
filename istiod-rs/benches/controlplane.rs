//! `cargo xtask bench controlplane`: istiod-rs at scale. A generated
//! cluster (`index::testing::synthetic_cluster`: 10,000 pods, 1,000
//! services, 100 nodes) is served by the real app (store -> pipeline -> xDS
//! server over gRPC TLS) to 100 delta-ADS clients with bearer tokens on
//! loopback. Reports:
//!
//! - full translation time of the whole cluster (goal < 1 s);
//! - bytes of the full state (resource bodies, and one client's initial
//!   response on the wire);
//! - time from one pod change in the store to all clients holding it
//!   (goal < 100 ms);
//! - istiod's CPU time for a burst of 1,000 pod changes until every client
//!   holds the last one, with the translations and pushes it took;
//! - istiod's peak RSS (goal < 300 MB).
//!
//! istiod runs in a child process (this binary again, with
//! `CONTROLPLANE_BENCH_ISTIOD` set) so that its CPU and memory are its own;
//! the parent drives it over stdin/stdout and runs the clients. Options
//! (after `--`): `--pods N --services N --nodes N --clients N --rounds N
//! --burst N`. Prints a table and one JSON line; asserts nothing about time.

#[path = "../tests/integration/support/ads.rs"]
mod ads;
#[path = "../tests/integration/support/http_client.rs"]
mod http_client;
#[path = "support/options.rs"]
mod options;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::discovery::DeltaDiscoveryResponse;
use api::manifest::{Object, ObjectKey};
use api::type_url::{ADDRESS, AUTHORIZATION};
use istiod_rs::app::{App, AppConfig, Source, TokenSource};
use istiod_rs::ca::CaConfig;
use istiod_rs::index::{self, MeshConfig};
use istiod_rs::state::Store;
use prost::Message;
use proxy_core::identity::ControlPlane;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use ads::{AdsStream, node_id};

/// Set in the child process that runs istiod; holds the sizes.
const CHILD_ENV: &str = "CONTROLPLANE_BENCH_ISTIOD";
/// Only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(300);
/// Responses up to this size are reported name by name; bigger ones are
/// initial states.
const REPORTED_NAMES: usize = 5000;

#[derive(Clone, Copy, Debug)]
struct Sizes {
    pods: usize,
    services: usize,
    nodes: usize,
    clients: usize,
    /// Single pod changes measured for fan-out.
    rounds: usize,
    /// Pod changes in the burst.
    burst: usize,
    /// Full translations timed.
    translations: usize,
}

impl Sizes {
    fn parse() -> Result<(Sizes, bool)> {
        let mut sizes = Sizes {
            pods: 10_000,
            services: 1_000,
            nodes: 100,
            clients: 100,
            rounds: 10,
            burst: 1_000,
            translations: 5,
        };
        let smoke = options::parse_counts(&mut [
            ("--pods", &mut sizes.pods),
            ("--services", &mut sizes.services),
            ("--nodes", &mut sizes.nodes),
            ("--clients", &mut sizes.clients),
            ("--rounds", &mut sizes.rounds),
            ("--burst", &mut sizes.burst),
        ])?;
        if smoke {
            sizes = Sizes {
                pods: 300,
                services: 30,
                nodes: 5,
                clients: 5,
                rounds: 2,
                burst: 50,
                translations: 1,
            };
        }
        sizes.burst = sizes.burst.min(sizes.pods);
        Ok((sizes, smoke))
    }

    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.pods, self.services, self.nodes, self.clients, self.translations
        )
    }

    fn decode(text: &str) -> Result<Sizes> {
        let n: Vec<usize> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("sizes")?;
        let [pods, services, nodes, clients, translations] = n[..] else {
            bail!("expected 5 sizes, got {text:?}");
        };
        Ok(Sizes {
            pods,
            services,
            nodes,
            clients,
            rounds: 0,
            burst: 0,
            translations,
        })
    }
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match std::env::var(CHILD_ENV) {
        Ok(sizes) => runtime.block_on(istiod_process(Sizes::decode(&sizes)?)),
        Err(_) => {
            let (sizes, smoke) = Sizes::parse()?;
            runtime.block_on(clients_process(sizes, smoke))
        }
    }
}

// ---- the istiod process --------------------------------------------------

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // `pid (comm) state ...`: comm may hold spaces; utime and stime are
    // fields 14 and 15 of the line, in USER_HZ ticks (100 per second).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let ticks: u64 = after_comm
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Peak resident set size of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Lines of stdin, read on a thread of their own (stdin is blocking).
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Serves the generated cluster and changes pods when told to.
async fn istiod_process(sizes: Sizes) -> Result<()> {
    let mesh = MeshConfig::default();
    let state = index::testing::synthetic_cluster(sizes.pods, sizes.services, sizes.nodes);

    // Full translations of the whole state, from scratch.
    let mut times = Vec::new();
    let mut translation = None;
    for _ in 0..sizes.translations {
        let started = Instant::now();
        let t = index::translate(&state, &mesh);
        times.push(started.elapsed());
        translation = Some(t);
    }
    times.sort();
    let snapshot = translation.context("at least one translation")?.snapshot;
    let bytes: usize = snapshot
        .type_urls()
        .flat_map(|t| snapshot.of_type(t).values())
        .map(|r| r.body.value.len())
        .sum();
    say(format!(
        "translation {} {} {} {}",
        times[0].as_secs_f64(),
        times[times.len() / 2].as_secs_f64(),
        snapshot.len(),
        bytes
    ));
    drop(snapshot);

    let dir = tempfile::tempdir()?;
    let tokens: String = (0..sizes.clients)
        .map(|i| {
            format!(
                "  - {{token: node-{i}, serviceAccount: istio-system/ztunnel, node: node-{i}}}\n"
            )
        })
        .collect();
    let tokens_file = dir.path().join("tokens.yaml");
    std::fs::write(&tokens_file, format!("tokens:\n{tokens}"))?;

    let pods: Vec<ObjectKey> = state.pods.keys().cloned().collect();
    let store = Store::new();
    store.update(|s| *s = state);
    store.mark_synced();
    let mut config = AppConfig::on_loopback(
        Source::Store(store.clone()),
        TokenSource::File(tokens_file),
        CaConfig::new("cluster.local", dir.path().join("data")),
    );
    config.mesh = mesh.clone();
    let app = App::start(config).await?;
    app.ready().await;
    let addresses = app.addresses();
    say(format!(
        "ready {} {} {}",
        addresses.grpc_tls,
        addresses.monitoring,
        app.root_cert_path().display()
    ));

    // Each change gives a pod a new `version` label: its workload (and
    // nothing else) changes.
    let mut generation = 0u64;
    let mut change = |k: usize| -> String {
        generation += 1;
        let key = &pods[k % pods.len()];
        store.update(|s| {
            let mut pod = (*s.pods[key]).clone();
            pod.metadata
                .labels
                .get_or_insert_default()
                .insert("version".into(), format!("bench-{generation}"));
            s.apply(Object::Pod(pod));
        });
        mesh.pod_uid(&key.namespace, &key.name)
    };
    let mut burst_cpu = Duration::ZERO;
    let mut commands = stdin_lines();
    while let Some(line) = commands.recv().await {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<usize>)) {
            (Some("change"), Some(Ok(k))) => {
                let uid = change(k);
                say(format!("changed {uid}"));
            }
            (Some("burst"), Some(Ok(n))) => {
                burst_cpu = cpu_time();
                let last = (0..n).map(&mut change).last().unwrap_or_default();
                say(format!("applied {last}"));
            }
            (Some("cpu"), _) => say(format!("cpu {}", (cpu_time() - burst_cpu).as_secs_f64())),
            (Some("rss"), _) => say(format!("rss {}", peak_rss_kib())),
            (Some("quit"), _) => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    app.shutdown().await;
    Ok(())
}

// ---- the clients process -------------------------------------------------

/// The istiod child, driven line by line.
struct Istiod {
    child: tokio::process::Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Istiod {
    fn spawn(sizes: &Sizes) -> Result<Istiod> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, sizes.encode())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the istiod process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("child stdout")?).lines();
        Ok(Istiod {
            child,
            stdin,
            stdout,
        })
    }

    async fn tell(&mut self, command: &str) -> Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next line, which must start with `word`; its other fields.
    async fn expect(&mut self, word: &str) -> Result<Vec<String>> {
        let line = tokio::time::timeout(PATIENCE, self.stdout.next_line())
            .await
            .with_context(|| format!("istiod did not say {word:?} in time"))??
            .with_context(|| format!("istiod exited before saying {word:?}"))?;
        let mut fields = line.split_whitespace().map(str::to_string);
        if fields.next().as_deref() != Some(word) {
            bail!("istiod said {line:?}, expected {word:?}");
        }
        Ok(fields.collect())
    }
}

/// What a client reports of each response after its initial state.
struct Received {
    names: Vec<String>,
    at: Instant,
}

/// Connects a client, receives and ACKs its initial state, then keeps
/// ACKing and reporting responses. Returns the initial response's size.
async fn client(
    n: usize,
    address: SocketAddr,
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    report: mpsc::UnboundedSender<Received>,
) -> Result<usize> {
    let channel = ControlPlane::tls(address.to_string(), roots).channel()?;
    let token = format!("node-{n}");
    let mut stream = AdsStream::open(channel, node_id(n), Some(&token), PATIENCE).await?;
    stream.subscribe(ADDRESS, Default::default()).await;
    stream.subscribe(AUTHORIZATION, Default::default()).await;
    let mut initial_bytes = 0;
    for _ in 0..2 {
        let response = stream.recv().await;
        initial_bytes += response.encoded_len();
        stream.ack(&response).await;
    }
    tokio::spawn(async move {
        while let Ok(Some(response)) = stream.next().await {
            stream.ack(&response).await;
            let names = reported_names(&response);
            if report
                .send(Received {
                    names,
                    at: Instant::now(),
                })
                .is_err()
            {
                return;
            }
        }
    });
    Ok(initial_bytes)
}

fn reported_names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    if response.resources.len() > REPORTED_NAMES {
        return Vec::new();
    }
    response.resources.iter().map(|r| r.name.clone()).collect()
}

/// Waits until `clients` reports have named `uid`; when the last one came.
async fn all_hold(
    reports: &mut mpsc::UnboundedReceiver<Received>,
    clients: usize,
    uid: &str,
) -> Result<Instant> {
    let mut holding = 0;
    let mut last = Instant::now();
    while holding < clients {
        let received = tokio::time::timeout(PATIENCE, reports.recv())
            .await
            .with_context(|| format!("only {holding} of {clients} clients received {uid}"))?
            .context("every client stopped")?;
        if received.names.iter().any(|n| n == uid) {
            holding += 1;
            last = received.at;
        }
    }
    Ok(last)
}

async fn metrics(monitoring: SocketAddr) -> String {
    http_client::http_get(monitoring, "/metrics").await.1
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn clients_process(sizes: Sizes, smoke: bool) -> Result<()> {
    proxy_core::tls::install_default_provider();
    if smoke {
        eprintln!("smoke run (no --bench): checks the paths, the figures mean nothing");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "generating {} pods, {} services, {} nodes and translating...",
        sizes.pods, sizes.services, sizes.nodes
    );
    let mut istiod = Istiod::spawn(&sizes)?;
    let t = istiod.expect("translation").await?;
    let parse_f = |s: &String| s.parse::<f64>().context("a number");
    let (translation_min, translation_median) = (parse_f(&t[0])?, parse_f(&t[1])?);
    let (resources, state_bytes): (usize, usize) = (t[2].parse()?, t[3].parse()?);
    let ready = istiod.expect("ready").await?;
    let grpc: SocketAddr = ready[0].parse()?;
    let monitoring: SocketAddr = ready[1].parse()?;
    let roots = proxy_core::tls::load_pem_certificates(&PathBuf::from(&ready[2]))?;

    eprintln!("connecting {} delta-ADS clients over TLS...", sizes.clients);
    let started = Instant::now();
    let (report, mut reports) = mpsc::unbounded_channel();
    let connecting: Vec<_> = (0..sizes.clients)
        .map(|n| tokio::spawn(client(n, grpc, roots.clone(), report.clone())))
        .collect();
    let mut initial_bytes = 0;
    for c in connecting {
        initial_bytes = c.await??;
    }
    let initial_sync = started.elapsed();
    drop(report);

    eprintln!("{} single pod changes...", sizes.rounds);
    let mut fanout = Vec::new();
    for round in 0..sizes.rounds {
        let sent = Instant::now();
        istiod.tell(&format!("change {}", round * 7919)).await?;
        let uid = istiod.expect("changed").await?.remove(0);
        let last = all_hold(&mut reports, sizes.clients, &uid).await?;
        fanout.push(last - sent);
        // Let stragglers' reports of this change drain before the next.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while reports.try_recv().is_ok() {}
    }
    fanout.sort();

    eprintln!("a burst of {} pod changes...", sizes.burst);
    let before = metrics(monitoring).await;
    let sent = Instant::now();
    istiod.tell(&format!("burst {}", sizes.burst)).await?;
    let uid = istiod.expect("applied").await?.remove(0);
    let last = all_hold(&mut reports, sizes.clients, &uid).await?;
    let burst_wall = last - sent;
    istiod.tell("cpu").await?;
    let burst_cpu: f64 = istiod.expect("cpu").await?[0].parse()?;
    let after = metrics(monitoring).await;
    let delta = |sample: &str| {
        http_client::metric_sample(&after, sample) - http_client::metric_sample(&before, sample)
    };
    let translations = delta("istiod_index_translations_total");
    let publishes = delta("istiod_index_publishes_total");
    let pushes = delta("pilot_xds_pushes{type=\"wds\"}");

    istiod.tell("rss").await?;
    let rss_kib: u64 = istiod.expect("rss").await?[0].parse()?;
    istiod.tell("quit").await?;
    let _ = tokio::time::timeout(PATIENCE, istiod.child.wait()).await;

    let p50 = fanout[fanout.len() / 2];
    let max = *fanout.last().context("at least one round")?;
    let rss_mb = rss_kib as f64 / 1024.0;
    println!();
    println!(
        "control plane: {} pods, {} services, {} nodes; {} delta-ADS clients over gRPC TLS on loopback; {cores} cores shared by istiod and the clients",
        sizes.pods, sizes.services, sizes.nodes, sizes.clients
    );
    println!(
        "  full translation              {:>9.1} ms  (best of {}; median {:.1} ms)   goal < 1000 ms",
        translation_min * 1000.0,
        sizes.translations,
        translation_median * 1000.0
    );
    println!(
        "  full state                    {:>9.2} MB  ({resources} resources; one client's initial responses {:.2} MB)",
        state_bytes as f64 / 1e6,
        initial_bytes as f64 / 1e6
    );
    println!(
        "  initial sync, all clients     {:>9.1} ms",
        ms(initial_sync)
    );
    println!(
        "  one pod change -> all clients {:>9.1} ms  (median of {}; max {:.1} ms)   goal < 100 ms",
        ms(p50),
        sizes.rounds,
        ms(max)
    );
    println!(
        "  burst of {} pod changes     {:>9.3} s CPU in istiod  ({translations} translations, {publishes} snapshots, {pushes} Address pushes; all clients hold it after {:.1} ms)",
        sizes.burst,
        burst_cpu,
        ms(burst_wall)
    );
    println!(
        "  peak RSS of istiod            {:>9.1} MB   goal < 300 MB",
        rss_mb
    );
    println!(
        "{}",
        json!({
            "bench": "controlplane",
            "smoke": smoke,
            "cores": cores,
            "pods": sizes.pods,
            "services": sizes.services,
            "nodes": sizes.nodes,
            "clients": sizes.clients,
            "translation_ms": translation_min * 1000.0,
            "translation_median_ms": translation_median * 1000.0,
            "resources": resources,
            "state_bytes": state_bytes,
            "initial_response_bytes": initial_bytes,
            "initial_sync_ms": ms(initial_sync),
            "fanout_p50_ms": ms(p50),
            "fanout_max_ms": ms(max),
            "burst_changes": sizes.burst,
            "burst_cpu_s": burst_cpu,
            "burst_wall_ms": ms(burst_wall),
            "burst_translations": translations,
            "burst_publishes": publishes,
            "burst_address_pushes": pushes,
            "peak_rss_mb": rss_mb,
        })
    );
    Ok(())
}
