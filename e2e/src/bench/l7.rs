//! `cargo xtask bench l7`: what the waypoint costs, measured on the local
//! cluster against the L4-only mesh and the direct path in the same run,
//! release builds throughout.
//!
//! Three paths, all cross-node (client on the first node, server on the
//! second), for each protocol (HTTP/1.1 `POST`s and gRPC unary calls, 1 KB
//! request bodies):
//! - direct: the same pods in a namespace that is not enrolled, to the
//!   server pod's IP;
//! - L4 mesh: enrolled pods, to the VIP of a Service with no waypoint
//!   (client ztunnel -> server ztunnel);
//! - waypoint: the same enrolled pods, to the VIP of a Service bound to a
//!   provisioned waypoint (`istio.io/use-waypoint`): client ztunnel ->
//!   waypoint-rs -> server ztunnel. The local cluster places the waypoint's
//!   one replica on the first node (the client's), so the path crosses
//!   nodes once, as the L4 path does.
//!
//! Each path gets a fixed-rate run (1,000 requests/s over a few long-lived
//! connections: p50/p90/p99, the distribution, the rate achieved) and a
//! saturation run (a closed loop over a fixed number of connections:
//! requests/s). Over the waypoint path's fixed-rate run, the waypoint's CPU
//! (`/proc/<pid>/stat` utime + stime) and peak RSS (`VmHWM`, start-up and
//! the fixed-rate runs so far included) are scaled per 1,000 requests/s,
//! with the ztunnels' on the L4 and waypoint paths for comparison. The
//! fixed-rate runs come before any saturation run, so the peak is not a
//! saturation run's. The waypoint's own `istio_requests_total` shows that
//! the waypoint path passed it and the L4 path did not.
//!
//! Output: a table, `l7.json` and `l7-latency.svg` (every fixed-rate
//! distribution). Goals (issue 12) are printed next to what was measured;
//! nothing here asserts on time.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::{
    BenchError, CpuTime, Files, Goal, Latency, LoadRun, Memory, Path2, ProcessUsage, RunArgs,
    app_pid, cpu_during, cpus, create_path, goals_table, per_1000, start_cluster, ticks_per_second,
    write_files, ztunnel_pids, ztunnel_role,
};
use crate::cluster::{Cluster, PodInfo, ProxyRef};
use crate::local::LocalCluster;
use crate::probe::{self, ProbeError, eventually};
use crate::scenarios::fixture::{ECHO_GRPC, ECHO_HTTP, service_vip};

const DIRECT_NS: &str = "bench-l7-direct";
const MESH_NS: &str = "bench-l7-mesh";
/// The waypoint Gateway; the local cluster names its pod `<name>-0`.
const WAYPOINT: &str = "bench-waypoint";
/// The Service with no waypoint (the L4 path).
const L4_SERVICE: &str = "server-l4";
/// The Service bound to the waypoint.
const WAYPOINT_SERVICE: &str = "server-waypoint";
/// The requests metric waypoint-rs reports (Istio's standard name).
const REQUESTS: &str = "istio_requests_total";
/// Unmeasured start of each saturation run.
const SATURATION_WARMUP: Duration = Duration::from_secs(1);
/// How long the waypoint may take to be provisioned, Ready and in the path.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Goals (issue 12): the waypoint's CPU and memory per 1,000 requests/s.
pub const GOAL_VCPU_PER_1000_RPS: f64 = 0.10;
pub const GOAL_MB_PER_1000_RPS: f64 = 30.0;
/// Upstream's Envoy-based waypoint per 1,000 requests/s, as issue 12 gives
/// them (the reference the goals are set against).
pub const UPSTREAM_VCPU_PER_1000_RPS: f64 = 0.25;
pub const UPSTREAM_MB_PER_1000_RPS: f64 = 60.0;

/// Command line of the `bench-l7` binary.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "bench-l7",
    about = "L7 benchmark: the waypoint against the L4 mesh and the direct path on the local cluster"
)]
pub struct BenchArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Protocols to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "http,grpc")]
    pub protocols: Vec<Protocol>,
    /// Connections of the saturation runs (each with one request in flight).
    #[arg(long, default_value_t = 16)]
    pub saturation_connections: u32,
    /// Measured part of each saturation run.
    #[arg(long, default_value = "10s", value_parser = crate::apps::client::parse_duration)]
    pub saturation_duration: Duration,
}

/// What the client speaks to the echo server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 `POST`s to the echo's HTTP port.
    Http,
    /// gRPC unary calls (h2c) to the echo's gRPC port.
    Grpc,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP/1.1",
            Protocol::Grpc => "gRPC unary",
        }
    }

    /// `client load --protocol`.
    fn load_protocol(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }

    /// The echo server's port, and the Services' port name that tells the
    /// mesh the protocol (the port-name prefix declares it).
    fn port(self) -> (u16, &'static str) {
        match self {
            Protocol::Http => (ECHO_HTTP, "http"),
            Protocol::Grpc => (ECHO_GRPC, "grpc"),
        }
    }

    /// The URL `client load` takes (gRPC: the echo's one method, the
    /// default of a URL without a path).
    fn target(self, host: &str) -> String {
        format!("http://{host}:{}/", self.port().0)
    }
}

/// A figure measured on the three paths.
#[derive(Clone, Debug, Serialize)]
pub struct Paths<T> {
    pub direct: T,
    pub l4: T,
    pub waypoint: T,
}

/// One protocol's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ProtocolReport {
    pub protocol: Protocol,
    /// At `rate` requests/s over `connections`.
    pub fixed_rate: Paths<Latency>,
    /// A closed loop over `saturation_connections`: `achieved_rate` is the
    /// most the path carried.
    pub saturation: Paths<Latency>,
    /// The waypoint over the waypoint path's fixed-rate run.
    pub waypoint: ProcessUsage,
    /// The waypoint's CPU (vCPU) over the waypoint path's saturation run.
    pub waypoint_saturation_vcpu: f64,
    /// Each ztunnel over the L4 path's and the waypoint path's fixed-rate runs.
    pub ztunnels: Paths<Vec<ProcessUsage>>,
    /// The echo server's CPU per 1,000 requests/s on each path (a small
    /// hyper server's cost, to put the proxies' in scale).
    pub server_app_vcpu_per_1000_rps: Paths<f64>,
    /// Requests the waypoint counted (`istio_requests_total`) during the
    /// L4 path's fixed-rate run (must be 0) and the waypoint path's.
    pub waypoint_counted: Paths<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub profile: String,
    pub cpus: usize,
    /// `/proc/loadavg` before and after: the machine is shared, and what
    /// else ran shows here.
    pub load_average: (String, String),
    pub rate: f64,
    pub connections: u32,
    pub payload_bytes: usize,
    pub saturation_connections: u32,
    pub saturation_seconds: f64,
    pub client_node: String,
    pub server_node: String,
    pub waypoint_node: String,
    pub protocols: Vec<ProtocolReport>,
    pub goals: Vec<Goal>,
}

/// The three paths' client and server pods, the waypoint and the targets.
struct World {
    direct: Path2,
    mesh: Path2,
    waypoint: PodInfo,
    l4_vip: String,
    waypoint_vip: String,
}

impl World {
    fn target(&self, path: PathKind, protocol: Protocol) -> String {
        match path {
            PathKind::Direct => protocol.target(&self.direct.server.ip.to_string()),
            PathKind::L4 => protocol.target(&self.l4_vip),
            PathKind::Waypoint => protocol.target(&self.waypoint_vip),
        }
    }

    fn pods(&self, path: PathKind) -> &Path2 {
        match path {
            PathKind::Direct => &self.direct,
            PathKind::L4 | PathKind::Waypoint => &self.mesh,
        }
    }

    fn waypoint_proxy(&self) -> ProxyRef {
        ProxyRef::Pod {
            namespace: self.waypoint.namespace.clone(),
            name: self.waypoint.name.clone(),
        }
    }

    /// Requests the waypoint has counted so far.
    fn counted(&self, cluster: &dyn Cluster) -> Result<f64, ProbeError> {
        let samples = probe::metrics(cluster, &self.waypoint_proxy())?;
        Ok(crate::prometheus::sum(
            &samples,
            REQUESTS,
            &[("reporter", "waypoint")],
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathKind {
    Direct,
    L4,
    Waypoint,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::L4 => "L4 mesh",
            PathKind::Waypoint => "waypoint",
        }
    }
}

/// The Gateway and the two Services over the mesh namespace's server.
fn mesh_objects_yaml(protocols: &[Protocol]) -> String {
    let ports: Vec<String> = protocols
        .iter()
        .map(|p| {
            let (port, name) = p.port();
            format!("{{name: {name}, port: {port}, targetPort: {port}}}")
        })
        .collect();
    let service = |name: &str, waypoint: bool| {
        let label = if waypoint {
            format!(", labels: {{{}: {WAYPOINT}}}", api::labels::USE_WAYPOINT)
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {MESH_NS}{label}}}\n\
             spec:\n  selector: {{app: {}}}\n  ports: [{}]\n",
            super::SERVER_APP,
            ports.join(", ")
        )
    };
    [
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {WAYPOINT}, namespace: {MESH_NS}}}\n\
             spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        ),
        service(L4_SERVICE, false),
        service(WAYPOINT_SERVICE, true),
    ]
    .join("---\n")
}

fn create_world(
    cluster: &dyn Cluster,
    args: &BenchArgs,
    say: &dyn Fn(&str),
) -> Result<World, BenchError> {
    say("creating the pods: client on node0, server on node1, once in the mesh and once not");
    let mesh = create_path(cluster, MESH_NS, true)?;
    let direct = create_path(cluster, DIRECT_NS, false)?;
    say("provisioning the waypoint and the Services (one bound to the waypoint, one not)");
    cluster.apply_yaml(&mesh_objects_yaml(&args.protocols))?;
    let waypoint =
        probe::until_pod_ready(cluster, MESH_NS, &format!("{WAYPOINT}-0"), READY_TIMEOUT)?;
    let vip = |name: &str| {
        eventually(
            &format!("the cluster IP of Service {MESH_NS}/{name}"),
            READY_TIMEOUT,
            || Ok(service_vip(cluster, MESH_NS, name)?.ok_or("no VIP yet".to_string())),
        )
    };
    let world = World {
        direct,
        l4_vip: vip(L4_SERVICE)?,
        waypoint_vip: vip(WAYPOINT_SERVICE)?,
        mesh,
        waypoint,
    };
    for protocol in &args.protocols {
        until_through_waypoint(cluster, &world, *protocol)?;
    }
    Ok(world)
}

/// Waits until requests to the waypoint-bound Service pass the waypoint
/// (the client's ztunnel knows the binding, the waypoint its Service).
fn until_through_waypoint(
    cluster: &dyn Cluster,
    world: &World,
    protocol: Protocol,
) -> Result<(), BenchError> {
    let probe_run = LoadRun {
        target: world.target(PathKind::Waypoint, protocol),
        protocol: protocol.load_protocol(),
        rate: Some(20.0),
        connections: 1,
        payload: 16,
        duration: Duration::from_millis(500),
        warmup: Duration::ZERO,
    };
    let what = format!("{} requests to pass the waypoint", protocol.name());
    eventually(&what, READY_TIMEOUT, || {
        let before = world.counted(cluster)?;
        let sent = match probe_run.run(cluster, &world.mesh.client, &what) {
            Ok(l) => l.requests as f64,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let counted = world.counted(cluster)? - before;
        Ok(if sent > 0.0 && counted >= sent {
            Ok(())
        } else {
            Err(format!(
                "{sent} requests answered, the waypoint counted {counted}"
            ))
        })
    })?;
    Ok(())
}

/// The processes measured over a run: each node's ztunnel, the waypoint and
/// the path's echo server, in this order.
struct Watched {
    pids: Vec<u32>,
    ztunnels: Vec<(String, u32)>,
}

impl Watched {
    fn ztunnel_usage(
        &self,
        spent: &[CpuTime],
        client: &PodInfo,
        seconds: f64,
        rate: f64,
    ) -> Result<Vec<ProcessUsage>, BenchError> {
        self.ztunnels
            .iter()
            .zip(spent)
            .map(|((node, pid), cpu)| {
                Ok(ProcessUsage::new(
                    node,
                    ztunnel_role(node, client),
                    *cpu,
                    Memory::read(*pid)?,
                    seconds,
                    rate,
                ))
            })
            .collect()
    }
}

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs, say: &dyn Fn(&str)) -> Result<BenchReport, BenchError> {
    let run = &args.run;
    let load_before = load_average();
    let cluster = start_cluster(run, say)?;
    let world = create_world(&cluster, args, say)?;
    let hz = ticks_per_second();
    let waypoint_pid = app_pid(&cluster, &world.waypoint)?;
    let ztunnels = ztunnel_pids(&cluster);
    let watched = |server: &PodInfo| -> Result<Watched, BenchError> {
        let mut pids: Vec<u32> = ztunnels.iter().map(|(_, pid)| *pid).collect();
        pids.push(waypoint_pid);
        pids.push(app_pid(&cluster, server)?);
        Ok(Watched {
            pids,
            ztunnels: ztunnels.clone(),
        })
    };
    let mut fixed = Vec::new();
    for protocol in &args.protocols {
        say(&format!(
            "{}: {} requests/s, {} B bodies, {} connections: direct, L4 mesh, waypoint",
            protocol.name(),
            run.rate,
            run.payload,
            run.connections
        ));
        fixed.push(fixed_rate_runs(
            &cluster, &world, args, *protocol, &watched,
        )?);
    }
    let mut protocols = Vec::new();
    for (protocol, fixed) in args.protocols.iter().zip(fixed) {
        say(&format!(
            "{}: saturation over {} connections: direct, L4 mesh, waypoint",
            protocol.name(),
            args.saturation_connections
        ));
        let saturation_run = |path: PathKind| LoadRun {
            rate: None,
            connections: args.saturation_connections,
            duration: args.saturation_duration,
            warmup: SATURATION_WARMUP,
            ..run.fixed_rate(world.target(path, *protocol), protocol.load_protocol())
        };
        let saturate = |path: PathKind| {
            saturation_run(path).run(
                &cluster,
                &world.pods(path).client,
                &format!("the {} {} saturation run", protocol.name(), path.name()),
            )
        };
        let direct = saturate(PathKind::Direct)?;
        let l4 = saturate(PathKind::L4)?;
        let (waypoint, spent) = cpu_during(&[waypoint_pid], hz, || saturate(PathKind::Waypoint))?;
        let saturation_seconds = (args.saturation_duration + SATURATION_WARMUP).as_secs_f64();
        protocols.push(ProtocolReport {
            protocol: *protocol,
            fixed_rate: fixed.latency,
            saturation: Paths {
                direct,
                l4,
                waypoint,
            },
            waypoint: fixed.waypoint,
            waypoint_saturation_vcpu: spent[0].total() / saturation_seconds,
            ztunnels: fixed.ztunnels,
            server_app_vcpu_per_1000_rps: fixed.server_app_vcpu_per_1000_rps,
            waypoint_counted: fixed.waypoint_counted,
        });
    }
    let goals = goals(&protocols);
    Ok(BenchReport {
        profile: run.profile_name(),
        cpus: cpus(),
        load_average: (load_before, load_average()),
        rate: run.rate,
        connections: run.connections,
        payload_bytes: run.payload,
        saturation_connections: args.saturation_connections,
        saturation_seconds: args.saturation_duration.as_secs_f64(),
        client_node: world.mesh.client.node.clone(),
        server_node: world.mesh.server.node.clone(),
        waypoint_node: world.waypoint.node.clone(),
        protocols,
        goals,
    })
}

/// What one protocol's fixed-rate runs measured.
struct FixedRuns {
    latency: Paths<Latency>,
    waypoint: ProcessUsage,
    ztunnels: Paths<Vec<ProcessUsage>>,
    server_app_vcpu_per_1000_rps: Paths<f64>,
    waypoint_counted: Paths<f64>,
}

/// One path's fixed-rate run: its latency, the CPU of every watched
/// process, the requests the waypoint counted meanwhile.
struct Measured {
    latency: Latency,
    cpu: Vec<CpuTime>,
    counted: f64,
}

/// The three fixed-rate runs of one protocol, with the processes' usage.
fn fixed_rate_runs(
    cluster: &LocalCluster,
    world: &World,
    args: &BenchArgs,
    protocol: Protocol,
    watched: &dyn Fn(&PodInfo) -> Result<Watched, BenchError>,
) -> Result<FixedRuns, BenchError> {
    let run = &args.run;
    let hz = ticks_per_second();
    let seconds = run.run_seconds();
    let what = |path: PathKind| format!("the {} {} run", protocol.name(), path.name());
    let measure = |path: PathKind, w: &Watched| -> Result<Measured, BenchError> {
        let pods = world.pods(path);
        let before = world.counted(cluster)?;
        let (latency, cpu) = cpu_during(&w.pids, hz, || {
            run.fixed_rate(world.target(path, protocol), protocol.load_protocol())
                .run(cluster, &pods.client, &what(path))
        })?;
        let counted = world.counted(cluster)? - before;
        Ok(Measured {
            latency,
            cpu,
            counted,
        })
    };
    let direct = measure(PathKind::Direct, &watched(&world.direct.server)?)?;
    let w = watched(&world.mesh.server)?;
    let l4 = measure(PathKind::L4, &w)?;
    let waypoint = measure(PathKind::Waypoint, &w)?;
    check_counted(&l4, &waypoint).map_err(|detail| BenchError::Run {
        what: format!("the {} runs", protocol.name()),
        detail,
    })?;
    let n = w.ztunnels.len();
    let usage = ProcessUsage::new(
        &world.waypoint.node,
        "waypoint",
        waypoint.cpu[n],
        Memory::read(w.pids[n])?,
        seconds,
        waypoint.latency.achieved_rate,
    );
    let app = |m: &Measured| {
        m.cpu.last().map_or(0.0, |c| c.total()) / seconds * per_1000(m.latency.achieved_rate)
    };
    let ztunnels = |m: &Measured| {
        w.ztunnel_usage(&m.cpu, &world.mesh.client, seconds, m.latency.achieved_rate)
    };
    Ok(FixedRuns {
        waypoint: usage,
        ztunnels: Paths {
            direct: Vec::new(),
            l4: ztunnels(&l4)?,
            waypoint: ztunnels(&waypoint)?,
        },
        server_app_vcpu_per_1000_rps: Paths {
            direct: app(&direct),
            l4: app(&l4),
            waypoint: app(&waypoint),
        },
        waypoint_counted: Paths {
            direct: 0.0,
            l4: l4.counted,
            waypoint: waypoint.counted,
        },
        latency: Paths {
            direct: direct.latency,
            l4: l4.latency,
            waypoint: waypoint.latency,
        },
    })
}

/// The waypoint must have counted none of the L4 path's requests and every
/// one the waypoint path answered (the warm-up's too, so at least those).
fn check_counted(l4: &Measured, waypoint: &Measured) -> Result<(), String> {
    if l4.counted > 0.0 {
        return Err(format!(
            "the waypoint counted {} requests of the L4 path, which must not pass it",
            l4.counted
        ));
    }
    let answered = waypoint.latency.requests as f64;
    if waypoint.counted < answered {
        return Err(format!(
            "the waypoint path answered {answered} requests, the waypoint counted {}: some went around it",
            waypoint.counted
        ));
    }
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The goals, per protocol.
fn goals(protocols: &[ProtocolReport]) -> Vec<Goal> {
    let mut goals = Vec::new();
    for p in protocols {
        let name = p.protocol.name();
        let w = &p.waypoint;
        goals.push(Goal::at_most(
            format!("waypoint CPU per 1,000 rps ({name})"),
            GOAL_VCPU_PER_1000_RPS,
            &format!(" (upstream Envoy: {UPSTREAM_VCPU_PER_1000_RPS})"),
            w.vcpu_per_1000_rps,
            "vCPU",
            3,
        ));
        goals.push(Goal::at_most(
            format!("waypoint peak RSS per 1,000 rps ({name})"),
            GOAL_MB_PER_1000_RPS,
            &format!(" (upstream Envoy: {UPSTREAM_MB_PER_1000_RPS})"),
            w.peak_rss_mb_per_1000_rps,
            "MB",
            1,
        ));
        let f = &p.fixed_rate;
        let l4_adds = f.l4.p90_ms - f.direct.p90_ms;
        let hop_adds = f.waypoint.p90_ms - f.l4.p90_ms;
        goals.push(Goal {
            name: format!("p90 the waypoint hop adds ({name})"),
            goal: format!("<= what L4 adds over direct ({l4_adds:+.3} ms)"),
            measured: format!("{hop_adds:+.3} ms"),
            met: Some(hop_adds <= l4_adds),
        });
    }
    goals
}

/// The report as a table.
pub fn table(r: &BenchReport) -> String {
    use crate::demo::table::{Column, render};
    let col = |heading, width| Column { heading, width };
    let columns = [
        col("FIGURE", 34),
        col("DIRECT", 12),
        col("L4 MESH", 12),
        col("WAYPOINT", 12),
        col("WAYPOINT - L4", 28),
    ];
    let mut out = format!(
        "L7 benchmark ({} build, {} CPUs, load average {} before, {} after)\n\
         client {}, server {}, waypoint {}; {} B request bodies; fixed rate {} requests/s over {} connections; \
         saturation over {} connections\n",
        r.profile,
        r.cpus,
        r.load_average.0,
        r.load_average.1,
        r.client_node,
        r.server_node,
        r.waypoint_node,
        r.payload_bytes,
        r.rate,
        r.connections,
        r.saturation_connections,
    );
    let ms = |v: f64| format!("{v:.3} ms");
    for p in &r.protocols {
        let (f, s) = (&p.fixed_rate, &p.saturation);
        let latency = |name: &str, get: fn(&Latency) -> f64| {
            vec![
                name.to_string(),
                ms(get(&f.direct)),
                ms(get(&f.l4)),
                ms(get(&f.waypoint)),
                format!(
                    "{:+.3} ms (L4 {:+.3})",
                    get(&f.waypoint) - get(&f.l4),
                    get(&f.l4) - get(&f.direct)
                ),
            ]
        };
        let count = |name: &str, get: fn(&Latency) -> f64, paths: &Paths<Latency>, ratio: bool| {
            let (d, l, w) = (get(&paths.direct), get(&paths.l4), get(&paths.waypoint));
            vec![
                name.to_string(),
                format!("{d:.0}"),
                format!("{l:.0}"),
                format!("{w:.0}"),
                if ratio {
                    format!("{:.2} x L4", w / l.max(1e-9))
                } else {
                    String::new()
                },
            ]
        };
        let mut rows = vec![
            latency("latency p50", |l| l.p50_ms),
            latency("latency p90", |l| l.p90_ms),
            latency("latency p99", |l| l.p99_ms),
            count("requests/s achieved", |l| l.achieved_rate, f, false),
            count("request errors", |l| l.errors as f64, f, false),
            count("saturation requests/s", |l| l.achieved_rate, s, true),
            count("saturation errors", |l| l.errors as f64, s, false),
        ];
        let w = &p.waypoint;
        rows.push(vec![
            "waypoint CPU".into(),
            String::new(),
            String::new(),
            format!("{:.3} vCPU", w.vcpu),
            format!(
                "{:.3} per 1k rps, {:.0}% kernel",
                w.vcpu_per_1000_rps,
                w.kernel_percent()
            ),
        ]);
        rows.push(vec![
            "waypoint CPU at saturation".into(),
            String::new(),
            String::new(),
            format!("{:.3} vCPU", p.waypoint_saturation_vcpu),
            String::new(),
        ]);
        rows.push(vec![
            "waypoint memory".into(),
            String::new(),
            String::new(),
            format!("{:.1} MB peak", w.peak_rss_mb),
            format!("{:.1} heap + {:.1} file", w.rss_anon_mb, w.rss_file_mb),
        ]);
        for (l4, via) in p.ztunnels.l4.iter().zip(&p.ztunnels.waypoint) {
            rows.push(vec![
                format!("ztunnel {} ({}) CPU", l4.node, l4.role),
                String::new(),
                format!("{:.3} vCPU", l4.vcpu),
                format!("{:.3} vCPU", via.vcpu),
                format!("peak {:.1} MB", via.peak_rss_mb),
            ]);
        }
        let a = &p.server_app_vcpu_per_1000_rps;
        rows.push(vec![
            "echo server CPU per 1k rps".into(),
            format!("{:.3} vCPU", a.direct),
            format!("{:.3} vCPU", a.l4),
            format!("{:.3} vCPU", a.waypoint),
            String::new(),
        ]);
        rows.push(vec![
            "requests the waypoint counted".into(),
            String::new(),
            format!("{:.0}", p.waypoint_counted.l4),
            format!("{:.0}", p.waypoint_counted.waypoint),
            String::new(),
        ]);
        let mut heading = columns;
        heading[0].heading = p.protocol.name();
        out.push('\n');
        out.push_str(&render(&heading, &rows).replace("\n\n", "\n"));
    }
    out.push('\n');
    out.push_str(&goals_table(&r.goals));
    out
}

/// Writes `l7.json` and `l7-latency.svg` into `dir`; returns their paths.
pub fn write(r: &BenchReport, dir: &Path) -> Result<Files, BenchError> {
    let names: Vec<(String, &Paths<Latency>)> = r
        .protocols
        .iter()
        .map(|p| (p.protocol.name().to_string(), &p.fixed_rate))
        .collect();
    let labels: Vec<[String; 3]> = names
        .iter()
        .map(|(n, _)| {
            [PathKind::Direct, PathKind::L4, PathKind::Waypoint]
                .map(|k| format!("{n} {}", k.name()))
        })
        .collect();
    let series: Vec<(&str, &[crate::apps::Quantile])> = names
        .iter()
        .zip(&labels)
        .flat_map(|((_, f), l)| {
            [
                (l[0].as_str(), f.direct.distribution.as_slice()),
                (l[1].as_str(), f.l4.distribution.as_slice()),
                (l[2].as_str(), f.waypoint.distribution.as_slice()),
            ]
        })
        .collect();
    let title = format!(
        "Request latency at {} requests/s, {} B bodies, {} connections (cross-node)",
        r.rate, r.payload_bytes, r.connections
    );
    write_files(r, dir, "l7", &title, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50: f64, p90: f64, rate: f64) -> Latency {
        Latency {
            requests: (rate * 20.0) as u64,
            errors: 0,
            achieved_rate: rate,
            p50_ms: p50,
            p90_ms: p90,
            p99_ms: p90 * 2.0,
            p999_ms: p90 * 3.0,
            max_ms: p90 * 4.0,
            distribution: Vec::new(),
        }
    }

    fn usage(role: &str, vcpu_per_1000: f64, peak_mb: f64) -> ProcessUsage {
        ProcessUsage {
            node: "node0".into(),
            role: role.into(),
            cpu_user_seconds: 1.0,
            cpu_system_seconds: 1.0,
            vcpu: vcpu_per_1000,
            vcpu_per_1000_rps: vcpu_per_1000,
            peak_rss_mb: peak_mb,
            peak_rss_mb_per_1000_rps: peak_mb,
            rss_anon_mb: peak_mb / 2.0,
            rss_file_mb: peak_mb / 2.0,
        }
    }

    /// Direct p90 0.20 ms, L4 0.30 (adds 0.10), waypoint `waypoint_p90`.
    fn protocol(waypoint_p90: f64, vcpu: f64, peak_mb: f64) -> ProtocolReport {
        let fixed = Paths {
            direct: latency(0.1, 0.2, 1000.0),
            l4: latency(0.15, 0.3, 1000.0),
            waypoint: latency(0.3, waypoint_p90, 1000.0),
        };
        ProtocolReport {
            protocol: Protocol::Http,
            saturation: Paths {
                direct: latency(1.0, 2.0, 9000.0),
                l4: latency(1.0, 2.0, 6000.0),
                waypoint: latency(1.0, 2.0, 3000.0),
            },
            fixed_rate: fixed,
            waypoint: usage("waypoint", vcpu, peak_mb),
            waypoint_saturation_vcpu: 0.9,
            ztunnels: Paths {
                direct: Vec::new(),
                l4: vec![usage("source", 0.02, 10.0)],
                waypoint: vec![usage("source", 0.03, 11.0)],
            },
            server_app_vcpu_per_1000_rps: Paths {
                direct: 0.01,
                l4: 0.01,
                waypoint: 0.01,
            },
            waypoint_counted: Paths {
                direct: 0.0,
                l4: 0.0,
                waypoint: 22000.0,
            },
        }
    }

    #[test]
    fn goals_compare_the_waypoint_hop_with_what_l4_adds() {
        // The hop adds 0.05 ms (<= 0.10), 0.08 vCPU and 20 MB: all met.
        let met = goals(&[protocol(0.35, 0.08, 20.0)]);
        assert_eq!(met.len(), 3);
        assert!(met.iter().all(|g| g.met == Some(true)), "{met:?}");
        assert_eq!(met[2].measured, "+0.050 ms");
        assert!(met[2].goal.contains("+0.100 ms"), "{:?}", met[2]);
        // The hop adds 0.20 ms (> 0.10), 0.12 vCPU and 31 MB: all missed.
        let missed = goals(&[protocol(0.5, 0.12, 31.0)]);
        assert!(missed.iter().all(|g| g.met == Some(false)), "{missed:?}");
        assert_eq!(missed[0].measured, "0.120 vCPU");
        assert_eq!(missed[1].measured, "31.0 MB");
    }

    #[test]
    fn the_table_shows_each_protocol_and_the_hop_against_l4() {
        let protocols = vec![protocol(0.5, 0.12, 31.0)];
        let report = BenchReport {
            profile: "release".into(),
            cpus: 2,
            load_average: ("0.5 0.4 0.3".into(), "1.5 0.9 0.5".into()),
            rate: 1000.0,
            connections: 4,
            payload_bytes: 1024,
            saturation_connections: 16,
            saturation_seconds: 10.0,
            client_node: "node0".into(),
            server_node: "node1".into(),
            waypoint_node: "node0".into(),
            goals: goals(&protocols),
            protocols,
        };
        let text = table(&report);
        assert!(text.contains("HTTP/1.1"), "{text}");
        assert!(text.contains("waypoint node0"), "{text}");
        // p90: the hop adds 0.2 ms, L4 adds 0.1 ms over direct.
        assert!(text.contains("+0.200 ms (L4 +0.100)"), "{text}");
        // Saturation: 3,000 through the waypoint is half of L4's 6,000.
        assert!(text.contains("0.50 x L4"), "{text}");
        assert!(text.contains("MISSED"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["protocols"][0]["protocol"], "http");
        assert_eq!(
            json["protocols"][0]["saturation"]["waypoint"]["achieved_rate"],
            3000.0
        );
    }

    #[test]
    fn the_services_bind_one_to_the_waypoint_and_name_the_protocol_ports() {
        let yaml = mesh_objects_yaml(&[Protocol::Http, Protocol::Grpc]);
        let objects = crate::objects::Object::from_yaml(&yaml).unwrap();
        assert_eq!(objects.len(), 3);
        assert!(yaml.contains("gatewayClassName: istio-waypoint"));
        let bound: Vec<&str> = objects
            .iter()
            .filter(|o| o.labels().get(api::labels::USE_WAYPOINT) == Some(&WAYPOINT.to_string()))
            .map(|o| o.name())
            .collect();
        assert_eq!(bound, [WAYPOINT_SERVICE]);
        assert!(
            yaml.contains("{name: http, port: 8080, targetPort: 8080}, {name: grpc, port: 7070, targetPort: 7070}"),
            "{yaml}"
        );
    }

    #[test]
    fn counts_prove_which_path_passed_the_waypoint() {
        let m = |requests: u64, counted: f64| Measured {
            latency: Latency {
                requests,
                ..latency(0.1, 0.2, 1000.0)
            },
            cpu: Vec::new(),
            counted,
        };
        assert_eq!(check_counted(&m(100, 0.0), &m(100, 120.0)), Ok(()));
        assert!(
            check_counted(&m(100, 3.0), &m(100, 120.0))
                .unwrap_err()
                .contains("L4 path")
        );
        assert!(
            check_counted(&m(100, 0.0), &m(100, 60.0))
                .unwrap_err()
                .contains("around it")
        );
    }
}
