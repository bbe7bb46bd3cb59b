//! `cargo xtask bench ca`: how many certificates per second the embedded CA
//! issues over gRPC TLS, and where the time goes.
//!
//! In one run: the raw sign-only rate (`CertificateAuthority::sign_csr`,
//! one thread and one per core), then CreateCertificate over gRPC TLS with
//! many concurrent requests over a few HTTP/2 connections (CSRs prepared
//! beforehand). Server and client run in separate runtimes whose threads
//! are named, so the CPU each spends per certificate is read from
//! `/proc/self/task/*/stat`: server CPU minus signing is the transport and
//! parsing cost (TLS, HTTP/2, protobuf, token check).
//!
//! Options (after `--`): `--requests N` (20000), `--connections C` (4),
//! `--concurrency K` (64). Prints a table and one JSON line; asserts
//! nothing about time.

#[path = "../tests/integration/support/ca_client.rs"]
mod client;
#[path = "support/options.rs"]
mod options;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use api::SpiffeId;
use istiod_rs::auth::token_file::TokenFile;
use istiod_rs::ca::impersonation::StaticNodeLookup;
use istiod_rs::ca::rate_limit::CallerRateLimit;
use istiod_rs::ca::service::CertificateService;
use istiod_rs::ca::{CaConfig, CertificateAuthority, csr};
use istiod_rs::grpc::{GrpcConfig, GrpcServer};
use proxy_core::listener::ListenerMetrics;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-token";
const SERVER_THREAD: &str = "ca-server";
const CLIENT_THREAD: &str = "ca-client";
struct Args {
    requests: usize,
    connections: usize,
    concurrency: usize,
    /// Distinct CSRs cycled through by the requests.
    csr_pool: usize,
    /// Certificates signed per sign-only measurement.
    sign_only: usize,
    warm_up: usize,
    /// `cargo test --all-targets` runs this binary without `--bench`: then
    /// it only checks, in a moment, that every path works.
    smoke: bool,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut args = Args {
            requests: 20_000,
            connections: 4,
            concurrency: 64,
            csr_pool: 2000,
            sign_only: 10_000,
            warm_up: 500,
            smoke: true,
        };
        args.smoke = options::parse_counts(&mut [
            ("--requests", &mut args.requests),
            ("--connections", &mut args.connections),
            ("--concurrency", &mut args.concurrency),
        ])?;
        if args.smoke {
            args.requests = args.requests.min(200);
            args.csr_pool = 50;
            args.sign_only = 100;
            args.warm_up = 10;
        }
        Ok(args)
    }
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string();

    let dir = tempfile::tempdir()?;
    let mut config = CaConfig::new("cluster.local", dir.path().join("state"));
    // One caller makes every request: the figures are the CA's, not the
    // per-caller limit's.
    config.rate_limit = CallerRateLimit {
        per_second: 1e9,
        burst: u32::MAX,
    };
    let ca = Arc::new(CertificateAuthority::new(config)?);
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{token: {TOKEN}, serviceAccount: bench/client}}\n"),
    )?;

    if args.smoke {
        eprintln!("smoke run (no --bench): checks the paths, the figures mean nothing");
    }
    eprintln!("preparing {} CSRs (P-256)...", args.csr_pool);
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..args.csr_pool)
            .map(|_| rcgen::KeyPair::generate().map(|key| client::csr_pem(&key)))
            .collect::<Result<_, _>>()?,
    );

    eprintln!("sign-only...");
    let sign = measure_sign_only(&ca, &csrs, cores, args.sign_only)?;

    eprintln!(
        "gRPC TLS: {} requests, {} connections, {} in flight...",
        args.requests, args.connections, args.concurrency
    );
    let grpc = measure_grpc(&ca, &tokens, &csrs, &args)?;

    let server_us = per_item_us(grpc.server_cpu, args.requests);
    let client_us = per_item_us(grpc.client_cpu, args.requests);
    let transport_us = (server_us - sign.sign_csr_us).max(0.0);
    let server_capacity = cores as f64 * 1e6 / server_us;

    println!();
    println!("CreateCertificate over gRPC TLS (self-signed P-256 root, P-256 CSRs)");
    println!("  machine                     {cores} cores, load average {load} at start");
    println!(
        "  load                        {} requests, {} HTTP/2 connections, {} in flight",
        args.requests, args.connections, args.concurrency
    );
    println!(
        "  throughput                  {:>8.0} certs/s   (goal >= 2000; client and server share the cores)",
        grpc.rate
    );
    println!(
        "  latency p50 / p99           {:>8.2} / {:.2} ms",
        grpc.p50_ms, grpc.p99_ms
    );
    if grpc.failures > 0 {
        println!("  FAILED requests             {:>8}", grpc.failures);
    }
    println!(
        "  sign-only, 1 thread         {:>8.0} certs/s",
        sign.serial_rate
    );
    println!(
        "  sign-only, {cores} threads        {:>8.0} certs/s",
        sign.parallel_rate
    );
    println!(
        "  server capacity             {:>8.0} certs/s   ({cores} cores / server CPU per cert)",
        server_capacity
    );
    println!("CPU per certificate (µs)");
    println!("  CSR check (parse + verify)  {:>8.1}", sign.csr_check_us);
    println!(
        "  sign + PEM                  {:>8.1}",
        sign.sign_csr_us - sign.csr_check_us
    );
    println!("  = signing (sign_csr)        {:>8.1}", sign.sign_csr_us);
    println!(
        "  transport + parse + auth    {:>8.1}   (server CPU - signing: TLS, HTTP/2, protobuf, token)",
        transport_us
    );
    println!("  = server total              {server_us:>8.1}");
    println!("  client (not istiod)         {client_us:>8.1}");
    println!(
        "{}",
        serde_json::json!({
            "bench": "ca",
            "smoke": args.smoke,
            "cores": cores,
            "loadavg_at_start": load,
            "requests": args.requests,
            "connections": args.connections,
            "concurrency": args.concurrency,
            "failures": grpc.failures,
            "certs_per_sec": round(grpc.rate),
            "p50_ms": round(grpc.p50_ms * 100.0) / 100.0,
            "p99_ms": round(grpc.p99_ms * 100.0) / 100.0,
            "sign_only_per_sec_1_thread": round(sign.serial_rate),
            "sign_only_per_sec_all_cores": round(sign.parallel_rate),
            "server_capacity_per_sec": round(server_capacity),
            "us_per_cert": {
                "csr_check": round(sign.csr_check_us * 10.0) / 10.0,
                "signing": round(sign.sign_csr_us * 10.0) / 10.0,
                "transport_parse_auth": round(transport_us * 10.0) / 10.0,
                "server_total": round(server_us * 10.0) / 10.0,
                "client_total": round(client_us * 10.0) / 10.0,
            },
        })
    );
    if grpc.failures > 0 {
        bail!("{} CreateCertificate requests failed", grpc.failures);
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    x.round()
}

struct SignOnly {
    /// CSR parse and signature check alone: CPU µs per CSR.
    csr_check_us: f64,
    /// The whole `sign_csr`: CPU µs per certificate.
    sign_csr_us: f64,
    /// Certificates per second (wall clock) on one thread.
    serial_rate: f64,
    /// Certificates per second (wall clock) with one thread per core.
    parallel_rate: f64,
}

fn measure_sign_only(
    ca: &CertificateAuthority,
    csrs: &[String],
    cores: usize,
    count: usize,
) -> Result<SignOnly> {
    let id: SpiffeId = "spiffe://cluster.local/ns/bench/sa/client".parse()?;
    let csr_at = |i: usize| csrs[i % csrs.len()].as_str();

    // CPU time, not wall clock: on a shared machine other processes take
    // turns on the cores, and the split below is of istiod's own work.
    let cpu = cpu_time("/proc/thread-self/stat");
    for i in 0..count {
        csr::parse(csr_at(i))?;
    }
    let csr_check_us = per_item_us(cpu_time("/proc/thread-self/stat") - cpu, count);

    let cpu = cpu_time("/proc/thread-self/stat");
    let started = Instant::now();
    for i in 0..count {
        ca.sign_csr(csr_at(i), &id, None)?;
    }
    let serial_rate = count as f64 / started.elapsed().as_secs_f64();
    let sign_csr_us = per_item_us(cpu_time("/proc/thread-self/stat") - cpu, count);

    let per_thread = count / cores;
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..cores)
            .map(|t| {
                let id = &id;
                s.spawn(move || -> Result<()> {
                    for i in 0..per_thread {
                        ca.sign_csr(csr_at(t * per_thread + i), id, None)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("signing thread panicked")?;
        }
        Ok(())
    })?;
    let parallel_rate = (per_thread * cores) as f64 / started.elapsed().as_secs_f64();
    Ok(SignOnly {
        csr_check_us,
        sign_csr_us,
        serial_rate,
        parallel_rate,
    })
}

struct GrpcRun {
    rate: f64,
    failures: usize,
    p50_ms: f64,
    p99_ms: f64,
    server_cpu: Duration,
    client_cpu: Duration,
}

fn measure_grpc(
    ca: &Arc<CertificateAuthority>,
    tokens: &std::path::Path,
    csrs: &Arc<Vec<String>>,
    args: &Args,
) -> Result<GrpcRun> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()?;

    let shutdown = CancellationToken::new();
    let (addr, server) = server_rt.block_on(async {
        let auth = Arc::new(TokenFile::open(tokens, "cluster.local")?);
        let mut registry = prometheus_client::registry::Registry::default();
        let service = CertificateService::new(
            ca.clone(),
            auth,
            Arc::new(StaticNodeLookup::default()),
            &mut registry,
        );
        let grpc = GrpcServer::bind(
            GrpcConfig {
                tls_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..GrpcConfig::default()
            },
            ca.clone(),
            &ListenerMetrics::default(),
        )
        .await?;
        let addr = grpc.tls_addr();
        let routes = tonic::service::Routes::new(service.into_server());
        let server = tokio::spawn(grpc.serve(routes, shutdown.clone()));
        anyhow::Ok((addr, server))
    })?;

    let roots = ca.roots().to_vec();
    let run = client_rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..args.connections {
            clients.push(client::tls_channel(addr, &roots).await?);
        }
        drive(&clients, csrs, args.warm_up, args.concurrency).await;
        let server_before = thread_cpu(SERVER_THREAD);
        let client_before = thread_cpu(CLIENT_THREAD);
        let started = Instant::now();
        let (latencies, failures) = drive(&clients, csrs, args.requests, args.concurrency).await;
        let elapsed = started.elapsed();
        let server_cpu = thread_cpu(SERVER_THREAD).saturating_sub(server_before);
        let client_cpu = thread_cpu(CLIENT_THREAD).saturating_sub(client_before);
        anyhow::Ok(GrpcRun {
            rate: args.requests as f64 / elapsed.as_secs_f64(),
            failures,
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            server_cpu,
            client_cpu,
        })
    })?;

    shutdown.cancel();
    server_rt.block_on(server)??;
    Ok(run)
}

/// Sends `total` requests with `concurrency` in flight, spread over the
/// connections; returns each successful request's latency and the failures.
async fn drive(
    clients: &[client::Client],
    csrs: &Arc<Vec<String>>,
    total: usize,
    concurrency: usize,
) -> (Vec<Duration>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let mut client = clients[t % clients.len()].clone();
            let (next, csrs) = (next.clone(), csrs.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let csr = csrs[i % csrs.len()].clone();
                    let started = Instant::now();
                    match client
                        .create_certificate(client::request(csr, Some(TOKEN), 0, None))
                        .await
                    {
                        Ok(_) => latencies.push(started.elapsed()),
                        Err(status) => {
                            if failures == 0 {
                                eprintln!("request failed: {status:?}");
                            }
                            failures += 1;
                        }
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    let mut failures = 0;
    for task in tasks {
        let (l, f) = task.await.expect("request task panicked");
        latencies.extend(l);
        failures += f;
    }
    (latencies, failures)
}

fn percentile(latencies: &[Duration], p: f64) -> f64 {
    if latencies.is_empty() {
        return f64::NAN;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn per_item_us(cpu: Duration, items: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / items as f64
}

/// CPU time (user + system) of this process's threads whose name starts
/// with `prefix`.
fn thread_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .map(|task| task.path().join("stat"))
        .filter(|stat| {
            std::fs::read_to_string(stat.with_file_name("comm"))
                .is_ok_and(|name| name.starts_with(prefix))
        })
        .map(|stat| cpu_time(&stat.to_string_lossy()))
        .sum()
}

/// CPU time (user + system) from a `/proc/.../stat` file, in clock ticks
/// of 10 ms (USER_HZ is 100 on Linux); runs here last seconds.
fn cpu_time(stat_path: &str) -> Duration {
    const TICK: Duration = Duration::from_millis(10);
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return Duration::ZERO;
    };
    // `pid (comm) state ...`: comm may hold spaces, so split at the last ')'.
    // utime and stime are fields 14 and 15 of the line; `state` is field 3.
    let ticks: u64 = stat
        .rfind(')')
        .map(|close| {
            stat[close + 1..]
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
}
