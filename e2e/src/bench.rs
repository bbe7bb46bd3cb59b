//! `cargo xtask bench l4`: what the mesh costs on the L4 path, measured on
//! the local cluster against the direct path (the same pods, not enrolled)
//! in the same run, release builds throughout.
//!
//! Figures, all cross-node (client on the first node, server on the second):
//! - single-stream bulk throughput (`client bulk` to an `echo --sink`);
//! - request/response latency (p50/p90/p99 and the distribution) at a fixed
//!   rate (1,000 requests/s) with 1 KB payloads over a few long-lived
//!   connections (`client load`);
//! - new connections per second, each with one small round trip
//!   (`client connect-rate`);
//! - each ztunnel-rs's CPU seconds (`/proc/<pid>/stat` utime + stime) over
//!   the latency run and its peak RSS (`VmHWM`), scaled per 1,000 requests/s.
//!   The latency run comes first, so the peak covers start-up and that run,
//!   not the buffers of the bulk transfer after it.
//!
//! Output: a table, a JSON file and an SVG chart of the two latency
//! distributions. Goals (upstream ztunnel's published figures for the
//! two-ztunnel path) are printed next to what was measured; nothing here
//! asserts on time.
//!
//! `cargo xtask bench l7` ([`l7`]) shares the harness below: the cluster,
//! the client and server pods of a path, a `client load` run, a process's
//! CPU and memory from `/proc`, the goals table and the output files.

pub mod l7;
pub mod svg;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::apps::{BulkReport, ConnectRateReport, LoadReport, Quantile};
use crate::binaries::{Binaries, Profile};
use crate::cluster::{Cluster, ClusterError, PodInfo};
use crate::local::{LocalCluster, LocalClusterConfig, Progress};
use crate::mesh::{MeshConfig, MeshMode};
use crate::probe::{self, ProbeError};
use crate::scenarios::fixture::{
    ECHO_SINK, ECHO_TCP, L4Fixture, client_pod, echo_server, namespace_yaml,
};

const MESH_NS: &str = "bench-mesh";
const DIRECT_NS: &str = "bench-direct";

/// Goals, from upstream ztunnel's published figures at 1,000 requests/s.
pub const GOAL_ADDED_P99_MS: f64 = 0.2;
pub const GOAL_ADDED_P90_MS: f64 = 0.17;
pub const GOAL_VCPU_PER_1000_RPS: f64 = 0.06;
pub const GOAL_MB_PER_1000_RPS: f64 = 12.0;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("{what} failed: {detail}")]
    Run { what: String, detail: String },
    #[error("could not read {path}: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a benchmark wrote: its JSON report and its latency chart.
pub type Files = (PathBuf, PathBuf);

/// Command line of the `bench-l4` binary.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "bench-l4",
    about = "L4 benchmark: the mesh against the direct path on the local cluster"
)]
pub struct BenchArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Length of the bulk throughput run.
    #[arg(long, default_value = "10s", value_parser = crate::apps::client::parse_duration)]
    pub bulk_duration: Duration,
    /// Length of the new-connections run.
    #[arg(long, default_value = "5s", value_parser = crate::apps::client::parse_duration)]
    pub connect_duration: Duration,
    /// Connections in flight at once in the new-connections run.
    #[arg(long, default_value_t = 4)]
    pub connect_concurrency: u32,
}

/// The flags every local-cluster benchmark takes: the cluster, the
/// fixed-rate latency run and where the output goes.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Requests per second of the latency run, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Long-lived connections of the latency run.
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Request size in bytes (echoed back in full over TCP).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Measured part of the latency run.
    #[arg(long, default_value = "20s", value_parser = crate::apps::client::parse_duration)]
    pub duration: Duration,
    /// Unmeasured start of the latency run.
    #[arg(long, default_value = "2s", value_parser = crate::apps::client::parse_duration)]
    pub warmup: Duration,
    /// Where the JSON and the SVG go (default: <workspace>/target/bench-<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `RUST_LOG` of the mesh's components.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Take binaries from the debug profile (quick check of the harness, not a measurement).
    #[arg(long)]
    pub debug: bool,
}

impl RunArgs {
    fn profile(&self) -> Profile {
        if self.debug {
            Profile::Debug
        } else {
            Profile::Release
        }
    }

    /// The latency run: `self.rate` requests/s over `self.connections`.
    fn fixed_rate(&self, target: String, protocol: &'static str) -> LoadRun {
        LoadRun {
            target,
            protocol,
            rate: Some(self.rate),
            connections: self.connections,
            payload: self.payload,
            duration: self.duration,
            warmup: self.warmup,
        }
    }

    /// `debug` or `release`.
    fn profile_name(&self) -> String {
        format!("{:?}", self.profile()).to_lowercase()
    }

    /// Seconds the CPU of a latency run is counted over (its warm-up
    /// included: the rate is the same).
    fn run_seconds(&self) -> f64 {
        (self.duration + self.warmup).as_secs_f64()
    }
}

/// A figure measured on both paths.
#[derive(Clone, Debug, Serialize)]
pub struct Pair<T> {
    pub direct: T,
    pub mesh: T,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub gbit_per_s: f64,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub requests: u64,
    pub errors: u64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub distribution: Vec<Quantile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnectRate {
    pub per_second: f64,
    pub connections: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One process of the mesh (a ztunnel-rs, a waypoint-rs) during a latency run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessUsage {
    pub node: String,
    /// What it does on the path: `source`, `destination` (ztunnels),
    /// `waypoint`.
    pub role: String,
    /// CPU seconds in the process itself and in the kernel on its behalf
    /// (the kernel's share includes the network stack it drives).
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    /// CPU seconds per second of the run.
    pub vcpu: f64,
    pub vcpu_per_1000_rps: f64,
    /// `VmHWM`: the most it ever held resident, start-up and the latency run
    /// included (the bulk run comes later).
    pub peak_rss_mb: f64,
    pub peak_rss_mb_per_1000_rps: f64,
    /// Resident at the end of the run: heap and stacks (`RssAnon`), and
    /// pages of the binary and libraries (`RssFile`).
    pub rss_anon_mb: f64,
    pub rss_file_mb: f64,
}

impl ProcessUsage {
    /// `cpu` spent over `seconds` by a process that holds `memory` now,
    /// on a path that carried `rate` requests/s.
    fn new(
        node: &str,
        role: &str,
        cpu: CpuTime,
        memory: Memory,
        seconds: f64,
        rate: f64,
    ) -> ProcessUsage {
        let vcpu = cpu.total() / seconds.max(1e-9);
        ProcessUsage {
            node: node.to_string(),
            role: role.to_string(),
            cpu_user_seconds: cpu.user,
            cpu_system_seconds: cpu.system,
            vcpu,
            vcpu_per_1000_rps: vcpu * per_1000(rate),
            peak_rss_mb: memory.peak,
            peak_rss_mb_per_1000_rps: memory.peak * per_1000(rate),
            rss_anon_mb: memory.anon,
            rss_file_mb: memory.file,
        }
    }

    /// Its share of CPU time spent in the kernel, in percent.
    fn kernel_percent(&self) -> f64 {
        100.0 * self.cpu_system_seconds
            / (self.cpu_user_seconds + self.cpu_system_seconds).max(1e-9)
    }
}

impl Goal {
    /// Met when `measured` is at most `limit` (both in `unit`); `note`
    /// follows the target, `digits` is how `measured` is shown.
    fn at_most(
        name: String,
        limit: f64,
        note: &str,
        measured: f64,
        unit: &str,
        digits: usize,
    ) -> Goal {
        Goal {
            name,
            goal: format!("<= {limit} {unit}{note}"),
            measured: format!("{measured:.digits$} {unit}"),
            met: Some(measured <= limit),
        }
    }
}

/// The factor that scales a figure measured at `rate` requests/s to 1,000.
fn per_1000(rate: f64) -> f64 {
    1000.0 / rate.max(1e-9)
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Goal {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub profile: String,
    pub cpus: usize,
    pub rate: f64,
    pub connections: u32,
    pub payload_bytes: usize,
    pub throughput: Pair<Throughput>,
    pub latency: Pair<Latency>,
    pub connect_rate: Pair<ConnectRate>,
    pub ztunnels: Vec<ProcessUsage>,
    /// The echo server's own CPU per 1,000 requests/s on each path: what a
    /// small tokio app spends on this machine for the same requests (one
    /// read and one write each), to put the ztunnels' figures in scale.
    pub server_app_vcpu_per_1000_rps: Pair<f64>,
    pub goals: Vec<Goal>,
}

/// The pods of one path: a client on the first node, a server on the second.
struct Path2 {
    client: PodInfo,
    server: PodInfo,
}

/// The label (`app: <this>`) of every benchmark's server pod, which its
/// Services select.
const SERVER_APP: &str = "bench-server";

/// Creates the pods of a path in `namespace`; `server` adapts the echo
/// server's pod (more ports, say).
fn create_path(cluster: &dyn Cluster, namespace: &str, ambient: bool) -> Result<Path2, BenchError> {
    cluster.apply_yaml(&namespace_yaml(namespace, ambient))?;
    let nodes = cluster.nodes();
    let (n0, n1) = (&nodes[0], &nodes[nodes.len().min(2) - 1]);
    let server = cluster
        .create_pod(&echo_server(namespace, "server", n1, "default").label("app", SERVER_APP))?;
    let client = cluster.create_pod(&client_pod(namespace, "client", n0, "default"))?;
    let timeout = Duration::from_secs(60);
    if ambient {
        let td = api::labels::DEFAULT_TRUST_DOMAIN;
        probe::until_in_mesh(
            cluster,
            td,
            &[(&server, "default"), (&client, "default")],
            timeout,
        )?;
    } else {
        probe::until_known(cluster, &[&server, &client], "TCP", timeout)?;
    }
    Ok(Path2 { client, server })
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

fn need_ok<T>(what: &str, ok: bool, error: &Option<String>, report: T) -> Result<T, BenchError> {
    if ok {
        Ok(report)
    } else {
        Err(BenchError::Run {
            what: what.to_string(),
            detail: error.clone().unwrap_or_else(|| "no error given".into()),
        })
    }
}

fn bulk(cluster: &dyn Cluster, p: &Path2, args: &BenchArgs) -> Result<Throughput, BenchError> {
    let a: Vec<String> = [
        "bulk".to_string(),
        L4Fixture::at(&p.server, ECHO_SINK),
        "--duration".into(),
        format!("{}ms", args.bulk_duration.as_millis()),
    ]
    .to_vec();
    let r: BulkReport = probe::client(
        cluster,
        &p.client,
        &a,
        args.bulk_duration * 3 + Duration::from_secs(30),
    )?;
    let r = need_ok("bulk throughput", r.ok, &r.error.clone(), r)?;
    Ok(Throughput {
        gbit_per_s: r.bits_per_second / 1e9,
        bytes: r.bytes,
        seconds: r.seconds,
    })
}

/// One `client load` run from a client pod.
struct LoadRun {
    /// `host:port` (tcp) or a URL (http).
    target: String,
    /// `client load --protocol`.
    protocol: &'static str,
    /// Requests/s over all connections; `None`: as many as the connections
    /// carry (`--saturate`).
    rate: Option<f64>,
    connections: u32,
    payload: usize,
    duration: Duration,
    warmup: Duration,
}

impl LoadRun {
    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "load".into(),
            self.target.clone(),
            "--protocol".into(),
            self.protocol.into(),
            "--connections".into(),
            self.connections.to_string(),
            "--payload".into(),
            self.payload.to_string(),
            "--duration".into(),
            format!("{}ms", self.duration.as_millis()),
            "--warmup".into(),
            format!("{}ms", self.warmup.as_millis()),
            "--distribution".into(),
        ];
        match self.rate {
            Some(rate) => a.extend(["--rate".into(), rate.to_string()]),
            None => a.push("--saturate".into()),
        }
        a
    }

    fn run(
        &self,
        cluster: &dyn Cluster,
        from: &PodInfo,
        what: &str,
    ) -> Result<Latency, BenchError> {
        let timeout = (self.duration + self.warmup) * 2 + Duration::from_secs(30);
        let r: LoadReport = probe::client(cluster, from, &self.args(), timeout)?;
        let r = need_ok(what, r.ok, &r.error.clone(), r)?;
        Ok(Latency {
            requests: r.requests,
            errors: r.errors,
            achieved_rate: r.achieved_rate,
            p50_ms: ms(r.latency_us.p50),
            p90_ms: ms(r.latency_us.p90),
            p99_ms: ms(r.latency_us.p99),
            p999_ms: ms(r.latency_us.p999),
            max_ms: ms(r.latency_us.max),
            distribution: r.distribution.unwrap_or_default(),
        })
    }
}

fn connect_rate(
    cluster: &dyn Cluster,
    p: &Path2,
    args: &BenchArgs,
) -> Result<ConnectRate, BenchError> {
    let a: Vec<String> = vec![
        "connect-rate".into(),
        L4Fixture::at(&p.server, ECHO_TCP),
        "--duration".into(),
        format!("{}ms", args.connect_duration.as_millis()),
        "--concurrency".into(),
        args.connect_concurrency.to_string(),
    ];
    let timeout = args.connect_duration * 3 + Duration::from_secs(30);
    let r: ConnectRateReport = probe::client(cluster, &p.client, &a, timeout)?;
    let r = need_ok("the new-connections run", r.ok, &r.error.clone(), r)?;
    Ok(ConnectRate {
        per_second: r.per_second,
        connections: r.connections,
        errors: r.errors,
        p50_ms: ms(r.latency_us.p50),
        p99_ms: ms(r.latency_us.p99),
    })
}

/// A process's CPU time so far, in seconds.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTime {
    user: f64,
    system: f64,
}

impl CpuTime {
    fn read(pid: u32, ticks_per_second: f64) -> Result<CpuTime, BenchError> {
        let stat = read_proc(pid, "stat")?;
        // Fields after the command name (which may hold spaces): utime is
        // the 14th field of the line, stime the 15th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let seconds = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
                / ticks_per_second
        };
        Ok(CpuTime {
            user: seconds(11),
            system: seconds(12),
        })
    }

    fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }

    fn total(self) -> f64 {
        self.user + self.system
    }
}

/// A process's memory, in megabytes (10^6 bytes), from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    peak: f64,
    anon: f64,
    file: f64,
}

impl Memory {
    fn read(pid: u32) -> Result<Memory, BenchError> {
        let status = read_proc(pid, "status")?;
        let mb = |key: &str| {
            crate::procfs::status_kb(&status, key).map_or(0.0, |kb| kb as f64 * 1024.0 / 1e6)
        };
        Ok(Memory {
            peak: mb("VmHWM:"),
            anon: mb("RssAnon:"),
            file: mb("RssFile:"),
        })
    }
}

fn read_proc(pid: u32, file: &str) -> Result<String, BenchError> {
    crate::procfs::read(pid, file)
        .map_err(|crate::procfs::ProcError { path, source }| BenchError::Proc { path, source })
}

/// The CPU time each of `pids` spent while `run` ran.
fn cpu_during<T>(
    pids: &[u32],
    hz: f64,
    run: impl FnOnce() -> Result<T, BenchError>,
) -> Result<(T, Vec<CpuTime>), BenchError> {
    let read = || {
        pids.iter()
            .map(|pid| CpuTime::read(*pid, hz))
            .collect::<Result<Vec<_>, _>>()
    };
    let before = read()?;
    let result = run()?;
    let after = read()?;
    let spent = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.since(*b))
        .collect();
    Ok((result, spent))
}

/// The pid of a pod's app, as the run recorded it.
fn app_pid(cluster: &LocalCluster, pod: &PodInfo) -> Result<u32, BenchError> {
    let name = format!("pod-{}.{}", pod.namespace, pod.name);
    cluster
        .run()
        .record()
        .processes
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.pid)
        .ok_or_else(|| BenchError::Run {
            what: format!("finding the app of {}/{}", pod.namespace, pod.name),
            detail: format!("the run records no process {name}"),
        })
}

/// The CPUs this machine gives the run.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Runs the benchmark and returns its report.
/// Starts the local cluster with the mesh, from `run`'s binaries.
fn start_cluster(run: &RunArgs, say: &dyn Fn(&str)) -> Result<LocalCluster, BenchError> {
    let profile = run.profile();
    say(&format!(
        "starting the local cluster with the mesh ({profile:?} binaries)"
    ));
    Ok(LocalCluster::start(LocalClusterConfig {
        mesh: MeshMode::On(MeshConfig {
            log: run.log.clone(),
            ..MeshConfig::default()
        }),
        binaries: Binaries::new(profile),
        progress: Progress::new(|s| eprintln!("  {s}")),
        ..LocalClusterConfig::default()
    })?)
}

/// Each node's ztunnel-rs: (node, pid).
fn ztunnel_pids(cluster: &LocalCluster) -> Vec<(String, u32)> {
    cluster
        .mesh()
        .map(|m| {
            m.nodes()
                .into_iter()
                .filter_map(|n| Some((n.node, n.ztunnel?.pid)))
                .collect()
        })
        .unwrap_or_default()
}

/// Which end of a path from `client` a ztunnel on `node` serves.
fn ztunnel_role(node: &str, client: &PodInfo) -> &'static str {
    if node == client.node {
        "source"
    } else {
        "destination"
    }
}

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs, say: &dyn Fn(&str)) -> Result<BenchReport, BenchError> {
    let run = &args.run;
    let cluster = start_cluster(run, say)?;
    say("creating the pods: client on node0, server on node1, once in the mesh and once not");
    let mesh = create_path(&cluster, MESH_NS, true)?;
    let direct = create_path(&cluster, DIRECT_NS, false)?;
    let ztunnel_pids = ztunnel_pids(&cluster);
    let hz = ticks_per_second();

    say(&format!(
        "latency at {} requests/s, {} B payloads, {} connections: direct, then mesh",
        run.rate, run.payload, run.connections
    ));
    let latency = |p: &Path2| {
        run.fixed_rate(L4Fixture::at(&p.server, ECHO_TCP), "tcp")
            .run(&cluster, &p.client, "the latency run")
    };
    let run_seconds = run.run_seconds();
    let (direct_latency, direct_app) =
        cpu_during(&[app_pid(&cluster, &direct.server)?], hz, || {
            latency(&direct)
        })?;
    let mut watched: Vec<u32> = ztunnel_pids.iter().map(|(_, pid)| *pid).collect();
    watched.push(app_pid(&cluster, &mesh.server)?);
    let (mesh_latency, spent) = cpu_during(&watched, hz, || latency(&mesh))?;
    let mut ztunnels = Vec::new();
    for ((node, pid), cpu) in ztunnel_pids.iter().zip(&spent) {
        ztunnels.push(ProcessUsage::new(
            node,
            ztunnel_role(node, &mesh.client),
            *cpu,
            Memory::read(*pid)?,
            run_seconds,
            mesh_latency.achieved_rate,
        ));
    }
    // After the latency run: the buffers of a bulk transfer would otherwise
    // count in the memory per 1,000 requests/s.
    say("bulk throughput, one stream: direct, then mesh");
    let throughput = Pair {
        direct: bulk(&cluster, &direct, args)?,
        mesh: bulk(&cluster, &mesh, args)?,
    };
    let app_vcpu = |cpu: &CpuTime, rate: f64| cpu.total() / run_seconds * per_1000(rate);
    let server_app_vcpu_per_1000_rps = Pair {
        direct: app_vcpu(&direct_app[0], direct_latency.achieved_rate),
        mesh: spent
            .last()
            .map_or(0.0, |c| app_vcpu(c, mesh_latency.achieved_rate)),
    };
    let latency = Pair {
        direct: direct_latency,
        mesh: mesh_latency,
    };
    say("new connections per second: direct, then mesh");
    let connect = Pair {
        direct: connect_rate(&cluster, &direct, args)?,
        mesh: connect_rate(&cluster, &mesh, args)?,
    };
    let goals = goals(&throughput, &latency, &ztunnels);
    Ok(BenchReport {
        profile: run.profile_name(),
        cpus: cpus(),
        rate: run.rate,
        connections: run.connections,
        payload_bytes: run.payload,
        throughput,
        latency,
        connect_rate: connect,
        ztunnels,
        server_app_vcpu_per_1000_rps,
        goals,
    })
}

fn goals(
    throughput: &Pair<Throughput>,
    latency: &Pair<Latency>,
    ztunnels: &[ProcessUsage],
) -> Vec<Goal> {
    let added = |f: fn(&Latency) -> f64| f(&latency.mesh) - f(&latency.direct);
    let mut goals = vec![
        Goal {
            name: "added p90 latency".into(),
            goal: format!("<= {GOAL_ADDED_P90_MS} ms (upstream's figure)"),
            measured: format!("{:+.3} ms", added(|l| l.p90_ms)),
            met: Some(added(|l| l.p90_ms) <= GOAL_ADDED_P90_MS),
        },
        Goal {
            name: "added p99 latency".into(),
            goal: format!("<= {GOAL_ADDED_P99_MS} ms"),
            measured: format!("{:+.3} ms", added(|l| l.p99_ms)),
            met: Some(added(|l| l.p99_ms) <= GOAL_ADDED_P99_MS),
        },
    ];
    for z in ztunnels {
        goals.push(Goal::at_most(
            format!("ztunnel CPU per 1,000 rps ({}, {})", z.node, z.role),
            GOAL_VCPU_PER_1000_RPS,
            "",
            z.vcpu_per_1000_rps,
            "vCPU",
            3,
        ));
        goals.push(Goal::at_most(
            format!("ztunnel peak RSS per 1,000 rps ({}, {})", z.node, z.role),
            GOAL_MB_PER_1000_RPS,
            "",
            z.peak_rss_mb_per_1000_rps,
            "MB",
            1,
        ));
    }
    goals.push(Goal {
        name: "bulk throughput, mesh / direct".into(),
        goal: "as close to 1 as two TLS passes on the machine's cores allow".into(),
        measured: format!(
            "{:.2} ({:.2} / {:.2} Gbit/s)",
            throughput.mesh.gbit_per_s / throughput.direct.gbit_per_s.max(1e-9),
            throughput.mesh.gbit_per_s,
            throughput.direct.gbit_per_s
        ),
        met: None,
    });
    goals
}

/// The report as a table.
pub fn table(r: &BenchReport) -> String {
    use crate::demo::table::{Column, render};
    let col = |heading, width| Column { heading, width };
    let columns = [
        col("FIGURE", 34),
        col("DIRECT", 14),
        col("MESH", 14),
        col("MESH - DIRECT", 16),
    ];
    let row = |name: &str, d: f64, m: f64, unit: &str, digits: usize| {
        vec![
            name.to_string(),
            format!("{d:.digits$} {unit}"),
            format!("{m:.digits$} {unit}"),
            format!("{:+.digits$} {unit}", m - d),
        ]
    };
    let (t, l, c) = (&r.throughput, &r.latency, &r.connect_rate);
    let mut rows = vec![
        row(
            "bulk throughput, one stream",
            t.direct.gbit_per_s,
            t.mesh.gbit_per_s,
            "Gbit/s",
            2,
        ),
        row("latency p50", l.direct.p50_ms, l.mesh.p50_ms, "ms", 3),
        row("latency p90", l.direct.p90_ms, l.mesh.p90_ms, "ms", 3),
        row("latency p99", l.direct.p99_ms, l.mesh.p99_ms, "ms", 3),
        row("latency p99.9", l.direct.p999_ms, l.mesh.p999_ms, "ms", 3),
        row(
            "requests/s achieved",
            l.direct.achieved_rate,
            l.mesh.achieved_rate,
            "",
            0,
        ),
        row(
            "request errors",
            l.direct.errors as f64,
            l.mesh.errors as f64,
            "",
            0,
        ),
        row(
            "new connections/s",
            c.direct.per_second,
            c.mesh.per_second,
            "",
            0,
        ),
        row(
            "new connection p50",
            c.direct.p50_ms,
            c.mesh.p50_ms,
            "ms",
            3,
        ),
    ];
    rows.push(row(
        "echo server CPU per 1k rps",
        r.server_app_vcpu_per_1000_rps.direct,
        r.server_app_vcpu_per_1000_rps.mesh,
        "vCPU",
        3,
    ));
    for z in &r.ztunnels {
        rows.push(vec![
            format!("ztunnel {} ({}) CPU", z.node, z.role),
            String::new(),
            format!("{:.3} vCPU", z.vcpu),
            format!("{:.0}% in the kernel", z.kernel_percent()),
        ]);
        rows.push(vec![
            format!("ztunnel {} ({}) memory", z.node, z.role),
            String::new(),
            format!("{:.1} MB peak", z.peak_rss_mb),
            format!("{:.1} heap + {:.1} file", z.rss_anon_mb, z.rss_file_mb),
        ]);
    }
    let figures = render(&columns, &rows).replace("\n\n", "\n");
    format!(
        "L4 benchmark ({} build, {} CPUs; {} requests/s, {} B payloads, {} connections; all paths cross-node)\n\n{figures}\n{}",
        r.profile,
        r.cpus,
        r.rate,
        r.payload_bytes,
        r.connections,
        goals_table(&r.goals)
    )
}

/// The goals, each with what was measured and whether it was met.
fn goals_table(goals: &[Goal]) -> String {
    use crate::demo::table::{Column, render};
    let col = |heading, width| Column { heading, width };
    let goal_rows: Vec<Vec<String>> = goals
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.goal.clone(),
                g.measured.clone(),
                match g.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "-",
                }
                .to_string(),
            ]
        })
        .collect();
    render(
        &[
            col("GOAL", 44),
            col("TARGET", 44),
            col("MEASURED", 28),
            col("", 6),
        ],
        &goal_rows,
    )
    .replace("\n\n", "\n")
}

/// Writes `l4.json` and `l4-latency.svg` into `dir`; returns their paths.
pub fn write(r: &BenchReport, dir: &Path) -> Result<Files, BenchError> {
    let title = format!(
        "Request latency at {} requests/s, {} B, {} connections (cross-node)",
        r.rate, r.payload_bytes, r.connections
    );
    write_files(
        r,
        dir,
        "l4",
        &title,
        &[
            ("direct", r.latency.direct.distribution.as_slice()),
            ("mesh", r.latency.mesh.distribution.as_slice()),
        ],
    )
}

/// Writes `<name>.json` (the report) and `<name>-latency.svg` (the chart
/// of `series`) into `dir`; returns their paths.
fn write_files<R: Serialize>(
    report: &R,
    dir: &Path,
    name: &str,
    title: &str,
    series: &[(&str, &[Quantile])],
) -> Result<Files, BenchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(report).expect("the report serializes");
    std::fs::write(&json, text + "\n").map_err(io(&json))?;
    let chart = dir.join(format!("{name}-latency.svg"));
    std::fs::write(&chart, svg::latency_chart(title, series)).map_err(io(&chart))?;
    Ok((json, chart))
}

/// The `main` of a benchmark binary (`bench-<name>`): enters the privileges
/// the local cluster needs (re-running itself in a user namespace when it
/// must), runs the benchmark with progress on stderr, prints the table and
/// writes the files (into `out`, else `<workspace>/target/bench-<name>`).
pub fn main<R>(
    name: &str,
    out: Option<PathBuf>,
    run: impl FnOnce(&dyn Fn(&str)) -> Result<R, BenchError>,
    table: fn(&R) -> String,
    write: fn(&R, &Path) -> Result<Files, BenchError>,
) -> anyhow::Result<()> {
    if let Some(status) = crate::privilege::enter_for_binary()? {
        std::process::exit(status.code().unwrap_or(1));
    }
    let start = std::time::Instant::now();
    let say = |step: &str| eprintln!("[{:>6.1}s] {step}", start.elapsed().as_secs_f64());
    let report = run(&say)?;
    println!("{}", table(&report));
    let dir = out.unwrap_or_else(|| Binaries::default().target_dir.join(format!("bench-{name}")));
    let (json, svg) = write(&report, &dir)?;
    println!("JSON: {}\nlatency chart: {}", json.display(), svg.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_scaled_to_1000_requests_per_second() {
        let cpu = CpuTime {
            user: 3.0,
            system: 1.0,
        };
        let memory = Memory {
            peak: 24.0,
            anon: 16.0,
            file: 8.0,
        };
        // 4 CPU seconds over 20 s at 500 requests/s.
        let u = ProcessUsage::new("node0", "waypoint", cpu, memory, 20.0, 500.0);
        assert_eq!(u.vcpu, 0.2);
        assert_eq!(u.vcpu_per_1000_rps, 0.4);
        assert_eq!(u.peak_rss_mb_per_1000_rps, 48.0);
        assert_eq!(u.kernel_percent(), 25.0);
        assert_eq!((u.node.as_str(), u.role.as_str()), ("node0", "waypoint"));
    }

    #[test]
    fn a_load_run_asks_for_a_rate_or_for_saturation() {
        let mut run = LoadRun {
            target: "http://10.0.0.1:8080/".into(),
            protocol: "http",
            rate: Some(1000.0),
            connections: 4,
            payload: 1024,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(2),
        };
        let args = run.args();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].as_str())
        };
        assert_eq!(after("--rate"), Some("1000"));
        assert_eq!(after("--protocol"), Some("http"));
        assert_eq!(after("--duration"), Some("20000ms"));
        assert!(!args.contains(&"--saturate".to_string()));
        run.rate = None;
        let args = run.args();
        assert!(args.contains(&"--saturate".to_string()) && !args.contains(&"--rate".to_string()));
    }
}
