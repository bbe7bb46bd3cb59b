//! The in-pod redirection rules, as upstream's node agent installs them
//! (REDIRECT flavour): chains `ISTIO_PRERT` / `ISTIO_OUTPUT` in mangle and nat
//! (and raw for DNS capture), proxy mark 0x539, connmark 0x111.
//!
//! - the pod's outbound TCP goes to 15001, inbound TCP to 15006;
//! - 15008 (HBONE) reaches ztunnel's listener untouched;
//! - kubelet probes, SNATed on the node to 169.254.7.127, pass uncaptured;
//! - packets of sockets carrying the proxy mark (ztunnel's own) pass;
//! - with DNS capture, DNS to port 53 goes to ztunnel's DNS proxy on 15053.
//!
//! With them goes the pod's policy routing for original-source connections
//! (ztunnel connects to the application from the client's address): packets
//! carrying connmark 0x111 are looked up in table 100, where everything is
//! local, so the application's replies to such a connection come back to
//! ztunnel's socket instead of leaving the pod (`ip rule add fwmark
//! 0x111/0xfff pref 32764 lookup 100`, `ip route add local 0.0.0.0/0 dev lo
//! table 100`, and the IPv6 twins), as upstream's node agent installs.
//!
//! Rules are applied with `iptables-restore --noflush` from a thread that has
//! entered the pod's netns (see [`crate::inpod::Netns::run`]); the child
//! process inherits that netns. Our chains are declared in the restore input,
//! which flushes and refills them atomically, and the jumps into them are
//! added only where `-C` does not find them: installing twice leaves exactly
//! one copy. Which binary is called is configurable: `iptables` follows the
//! distribution's alternative (nf_tables on Debian), `iptables-nft` and
//! `iptables-legacy` pick a backend explicitly.

use std::io::Write;
use std::process::{Command, Stdio};

use api::ports;

pub const CHAIN_PREROUTING: &str = "ISTIO_PRERT";
pub const CHAIN_OUTPUT: &str = "ISTIO_OUTPUT";
/// IPv6 twin of `api::ports::KUBELET_PROBE_IPV4`, as upstream.
pub const KUBELET_PROBE_IPV6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// Mask of the mesh's bits in the packet and connection marks.
const MARK_MASK: u32 = 0xfff;
/// Seconds to wait for the xtables lock (legacy backend) before failing.
const LOCK_WAIT_SECS: &str = "5";

/// Errors installing or removing the rules.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {binary}: {source} (install the iptables package, or pass --iptables)")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("cannot run {binary}: {source} (install the iproute2 package)")]
    SpawnIp {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} {args} failed ({status}): {stderr}")]
    Failed {
        binary: String,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// How rules are built and which binaries apply them.
#[derive(Clone, Debug)]
pub struct RedirectionConfig {
    /// Send the pod's DNS to ztunnel's DNS proxy (15053).
    pub dns_capture: bool,
    /// Also install the IPv6 rules (ip6tables).
    pub ipv6: bool,
    /// The IPv4 binary: `iptables`, `iptables-nft` or `iptables-legacy` (the
    /// `ip6tables…` and `…-restore` siblings are derived from it).
    pub iptables: String,
    /// The iproute2 binary that installs the in-pod policy routing.
    pub ip: String,
    /// The ipset binary that keeps the node's set of probed pod addresses
    /// (see [`super::host_probe`]).
    pub ipset: String,
}

impl Default for RedirectionConfig {
    fn default() -> Self {
        RedirectionConfig {
            dns_capture: false,
            ipv6: true,
            iptables: "iptables".into(),
            ip: "ip".into(),
            ipset: "ipset".into(),
        }
    }
}

impl RedirectionConfig {
    pub(super) fn families(&self) -> &'static [Family] {
        if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }

    /// The binary for `family`; `restore` picks the `-restore` sibling.
    pub fn binary(&self, family: Family, restore: bool) -> String {
        let base = match family {
            Family::V4 => self.iptables.clone(),
            Family::V6 => match self.iptables.rsplit_once('/') {
                Some((dir, name)) => format!("{dir}/{}", name.replacen("iptables", "ip6tables", 1)),
                None => self.iptables.replacen("iptables", "ip6tables", 1),
            },
        };
        if restore {
            format!("{base}-restore")
        } else {
            base
        }
    }
}

/// A jump from a built-in chain into one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub builtin: &'static str,
    pub target: &'static str,
}

/// The jumps the rules need, in the order they are added.
pub fn jumps(config: &RedirectionConfig) -> Vec<Jump> {
    let jump = |table, builtin, target| Jump {
        table,
        builtin,
        target,
    };
    let mut jumps = vec![
        jump("mangle", "PREROUTING", CHAIN_PREROUTING),
        jump("mangle", "OUTPUT", CHAIN_OUTPUT),
        jump("nat", "OUTPUT", CHAIN_OUTPUT),
        jump("nat", "PREROUTING", CHAIN_PREROUTING),
    ];
    if config.dns_capture {
        jumps.push(jump("raw", "PREROUTING", CHAIN_PREROUTING));
        jumps.push(jump("raw", "OUTPUT", CHAIN_OUTPUT));
    }
    jumps
}

/// One rule in one of our chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: String,
}

/// The rules inside our chains, per table in evaluation order.
pub fn rules(config: &RedirectionConfig, family: Family) -> Vec<Rule> {
    let (loopback, probe) = match family {
        Family::V4 => ("127.0.0.1/32", ports::KUBELET_PROBE_IPV4.to_string()),
        Family::V6 => ("::1/128", KUBELET_PROBE_IPV6.to_string()),
    };
    let proxy_mark = masked(ports::PROXY_MARK);
    let connmark = masked(ports::PROXY_CONNMARK);
    let outbound = ports::ZTUNNEL_OUTBOUND;
    let inbound = ports::ZTUNNEL_INBOUND_PLAINTEXT;
    let hbone = ports::HBONE;
    let dns = ports::DNS;
    let rule = |table, chain, spec: String| Rule { table, chain, spec };

    let mut rules = vec![
        // Connections the proxy itself opened into the pod (looping back
        // through lo with its mark) are remembered by connmark…
        rule(
            "mangle",
            CHAIN_PREROUTING,
            format!("-m mark --mark {proxy_mark} -j CONNMARK --set-xmark {connmark}"),
        ),
        // …so the pod's replies on them get the mark back and are not captured.
        rule(
            "mangle",
            CHAIN_OUTPUT,
            format!(
                "-m connmark --mark {connmark} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
            ),
        ),
        // Kubelet's probes: never captured.
        rule(
            "nat",
            CHAIN_PREROUTING,
            format!("-s {probe} -p tcp -m tcp -j ACCEPT"),
        ),
        // Everything else arriving, except HBONE and the proxy's own, goes to
        // the inbound plaintext listener.
        rule(
            "nat",
            CHAIN_PREROUTING,
            format!(
                "! -d {loopback} -p tcp ! --dport {hbone} -m mark ! --mark {proxy_mark} -j REDIRECT --to-ports {inbound}"
            ),
        ),
        rule(
            "nat",
            CHAIN_OUTPUT,
            format!("-d {probe} -p tcp -m tcp -j ACCEPT"),
        ),
    ];
    if config.dns_capture {
        rules.extend([
            rule("nat", CHAIN_OUTPUT, format!("! -o lo -p udp -m mark ! --mark {proxy_mark} -m udp --dport 53 -j REDIRECT --to-ports {dns}")),
            rule("nat", CHAIN_OUTPUT, format!("! -d {loopback} -p tcp -m tcp --dport 53 -m mark ! --mark {proxy_mark} -j REDIRECT --to-ports {dns}")),
            // The DNS proxy's upstream queries and their answers get a
            // conntrack zone of their own, so they cannot collide with the
            // pod's redirected queries on the same ports.
            rule("raw", CHAIN_OUTPUT, format!("-p udp -m mark --mark {proxy_mark} -m udp --dport 53 -j CT --zone 1")),
            rule("raw", CHAIN_PREROUTING, format!("-p udp -m mark ! --mark {proxy_mark} -m udp --sport 53 -j CT --zone 1")),
        ]);
    }
    rules.extend([
        rule("nat", CHAIN_OUTPUT, format!("-p tcp -m mark --mark {connmark} -j ACCEPT")),
        // The pod talking to itself over its own address stays in the pod.
        rule("nat", CHAIN_OUTPUT, format!("! -d {loopback} -o lo -j ACCEPT")),
        // Everything else leaving goes to the outbound listener.
        rule("nat", CHAIN_OUTPUT, format!("! -d {loopback} -p tcp -m mark ! --mark {proxy_mark} -j REDIRECT --to-ports {outbound}")),
    ]);
    rules
}

/// The `iptables-restore --noflush` input for `family`: our chains declared
/// (so flushed) and refilled, plus the jumps listed in `missing_jumps`.
pub fn restore_script(
    config: &RedirectionConfig,
    family: Family,
    missing_jumps: &[Jump],
) -> String {
    let chains = Chains {
        tables: &tables(config),
        names: &[CHAIN_PREROUTING, CHAIN_OUTPUT],
        jumps: &jumps(config),
    };
    chains.restore_script(missing_jumps, &rules(config, family))
}

/// A set of chains of ours: their names, the tables they live in, and the
/// jumps from built-in chains into them.
pub(super) struct Chains<'a> {
    pub tables: &'a [&'static str],
    pub names: &'a [&'static str],
    pub jumps: &'a [Jump],
}

impl Chains<'_> {
    /// The `iptables-restore --noflush` input: each chain that a jump of its
    /// table targets declared (so flushed) and refilled with `rules`, plus
    /// `missing_jumps`.
    pub(super) fn restore_script(&self, missing_jumps: &[Jump], rules: &[Rule]) -> String {
        let mut script = String::new();
        for &table in self.tables {
            script.push_str(&format!("*{table}\n"));
            for &chain in self.names {
                if self
                    .jumps
                    .iter()
                    .any(|j| j.table == table && j.target == chain)
                {
                    script.push_str(&format!(":{chain} - [0:0]\n"));
                }
            }
            for jump in missing_jumps.iter().filter(|j| j.table == table) {
                script.push_str(&format!("-A {} -j {}\n", jump.builtin, jump.target));
            }
            for rule in rules.iter().filter(|r| r.table == table) {
                script.push_str(&format!("-A {} {}\n", rule.chain, rule.spec));
            }
            script.push_str("COMMIT\n");
        }
        script
    }

    /// Installs (or refreshes) the chains with `rules`, adding only the jumps
    /// `-C` does not find, in the current network namespace.
    pub(super) fn apply(
        &self,
        config: &RedirectionConfig,
        family: Family,
        rules: &[Rule],
    ) -> Result<(), IptablesError> {
        let binary = config.binary(family, false);
        let mut missing = Vec::new();
        for &jump in self.jumps {
            let args = [
                "-w",
                LOCK_WAIT_SECS,
                "-t",
                jump.table,
                "-C",
                jump.builtin,
                "-j",
                jump.target,
            ];
            if !run(&binary, &args, None)?.status.success() {
                missing.push(jump);
            }
        }
        let script = self.restore_script(&missing, rules);
        let restore = config.binary(family, true);
        let output = run(
            &restore,
            &["--noflush", "-w", LOCK_WAIT_SECS],
            Some(&script),
        )?;
        check(&restore, "--noflush", output)?;
        Ok(())
    }

    /// Removes the jumps and the chains; what is already gone is fine.
    pub(super) fn remove(
        &self,
        config: &RedirectionConfig,
        family: Family,
    ) -> Result<(), IptablesError> {
        let binary = config.binary(family, false);
        for jump in self.jumps {
            let args = [
                "-w",
                LOCK_WAIT_SECS,
                "-t",
                jump.table,
                "-D",
                jump.builtin,
                "-j",
                jump.target,
            ];
            // Deleting one copy per call; a bounded loop in case someone
            // else added duplicates.
            for _ in 0..8 {
                if !run(&binary, &args, None)?.status.success() {
                    break;
                }
            }
        }
        for &table in self.tables {
            for op in ["-F", "-X"] {
                for &chain in self.names {
                    run(
                        &binary,
                        &["-w", LOCK_WAIT_SECS, "-t", table, op, chain],
                        None,
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn tables(config: &RedirectionConfig) -> Vec<&'static str> {
    let mut tables = vec!["mangle", "nat"];
    if config.dns_capture {
        tables.push("raw");
    }
    tables
}

/// Installs (or refreshes) the rules. Must run on a thread inside the pod's
/// netns.
pub fn install(config: &RedirectionConfig) -> Result<(), IptablesError> {
    let chains = Chains {
        tables: &tables(config),
        names: &[CHAIN_PREROUTING, CHAIN_OUTPUT],
        jumps: &jumps(config),
    };
    for &family in config.families() {
        chains.apply(config, family, &rules(config, family))?;
        match install_routing(config, family) {
            Ok(()) => {}
            // A pod with IPv6 disabled has no IPv6 connections to route back
            // (the kernel refuses the route: "IPv6 is disabled on nexthop
            // device"); its IPv4 capture must still work.
            Err(error) if family == Family::V6 => tracing::warn!(
                %error,
                "no IPv6 original-source routing in this pod (IPv6 disabled?); IPv4 is unaffected"
            ),
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// A mark with the mesh's mask, as iptables and `ip rule` take it.
fn masked(mark: u32) -> String {
    format!("{mark:#x}/{MARK_MASK:#x}")
}

/// The `ip rule` selector of the original-source rule, after `ip -4|-6 rule
/// add|del`.
pub fn routing_rule() -> Vec<String> {
    vec![
        "fwmark".into(),
        masked(ports::PROXY_CONNMARK),
        "pref".into(),
        ports::PROXY_RULE_PRIORITY.to_string(),
        "lookup".into(),
        ports::PROXY_ROUTE_TABLE.to_string(),
    ]
}

/// The route of the original-source table, after `ip -4|-6 route
/// replace|del`.
pub fn routing_route(family: Family) -> Vec<String> {
    let everything = match family {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    };
    vec![
        "local".into(),
        everything.into(),
        "dev".into(),
        "lo".into(),
        "table".into(),
        ports::PROXY_ROUTE_TABLE.to_string(),
    ]
}

/// `ip -4|-6 <object> <verb> <spec…>`.
fn ip_args(family: Family, object: &str, verb: &str, spec: Vec<String>) -> Vec<String> {
    let family = match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    };
    [family, object, verb]
        .into_iter()
        .map(String::from)
        .chain(spec)
        .collect()
}

/// Adds the original-source rule (unless `ip rule` already lists it) and
/// route (`replace`: idempotent).
fn install_routing(config: &RedirectionConfig, family: Family) -> Result<(), IptablesError> {
    let pref = ports::PROXY_RULE_PRIORITY.to_string();
    let show = ip_args(family, "rule", "show", vec!["pref".into(), pref]);
    let listed = check(&config.ip, "rule show", run_ip(config, &show)?)?;
    let (mark, table) = (
        masked(ports::PROXY_CONNMARK),
        format!("lookup {}", ports::PROXY_ROUTE_TABLE),
    );
    let present = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|line| line.contains(&mark) && line.contains(&table));
    let mut commands = vec![ip_args(family, "route", "replace", routing_route(family))];
    if !present {
        commands.insert(0, ip_args(family, "rule", "add", routing_rule()));
    }
    for args in commands {
        check(&config.ip, &args.join(" "), run_ip(config, &args)?)?;
    }
    Ok(())
}

/// Removes the original-source rule and route; what is gone is fine.
fn remove_routing(config: &RedirectionConfig, family: Family) -> Result<(), IptablesError> {
    let rule = ip_args(family, "rule", "del", routing_rule());
    // One copy per call; bounded in case of duplicates.
    for _ in 0..8 {
        if !run_ip(config, &rule)?.status.success() {
            break;
        }
    }
    run_ip(
        config,
        &ip_args(family, "route", "del", routing_route(family)),
    )?;
    Ok(())
}

fn run_ip(
    config: &RedirectionConfig,
    args: &[String],
) -> Result<std::process::Output, IptablesError> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&config.ip, &args, None).map_err(|e| match e {
        IptablesError::Spawn { binary, source } => IptablesError::SpawnIp { binary, source },
        other => other,
    })
}

/// Removes the rules and our chains; what is already gone is fine. Must run
/// on a thread inside the pod's netns.
pub fn remove(config: &RedirectionConfig) -> Result<(), IptablesError> {
    // Removal covers DNS capture too, in case it was on when installing.
    let all = RedirectionConfig {
        dns_capture: true,
        ..config.clone()
    };
    let chains = Chains {
        tables: &tables(&all),
        names: &[CHAIN_PREROUTING, CHAIN_OUTPUT],
        jumps: &jumps(&all),
    };
    for &family in config.families() {
        chains.remove(config, family)?;
        remove_routing(config, family)?;
    }
    Ok(())
}

/// `iptables --version` of the configured binary, e.g.
/// `iptables v1.8.9 (nf_tables)`: logged at start so the backend is known.
pub fn version(config: &RedirectionConfig) -> Result<String, IptablesError> {
    let binary = config.binary(Family::V4, false);
    let output = run(&binary, &["--version"], None)?;
    let output = check(&binary, "--version", output)?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

pub(super) fn run(
    binary: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<std::process::Output, IptablesError> {
    let spawn_err = |source| IptablesError::Spawn {
        binary: binary.to_string(),
        source,
    };
    let mut child = Command::new(binary)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    child.wait_with_output().map_err(spawn_err)
}

pub(super) fn check(
    binary: &str,
    args: &str,
    output: std::process::Output,
) -> Result<std::process::Output, IptablesError> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(IptablesError::Failed {
            binary: binary.to_string(),
            args: args.to_string(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_rules_match_upstream_shape() {
        let config = RedirectionConfig::default();
        let script = restore_script(&config, Family::V4, &jumps(&config));
        let want = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";
        assert_eq!(script, want);
    }

    #[test]
    fn present_jumps_are_not_added_again() {
        let config = RedirectionConfig::default();
        let script = restore_script(&config, Family::V4, &[]);
        assert!(!script.contains("-A PREROUTING"), "{script}");
        assert!(!script.contains("-A OUTPUT"), "{script}");
        assert!(
            script.contains(":ISTIO_OUTPUT - [0:0]"),
            "chains are still refilled: {script}"
        );
    }

    #[test]
    fn dns_capture_adds_raw_table_and_redirects_to_15053() {
        let config = RedirectionConfig {
            dns_capture: true,
            ..Default::default()
        };
        let script = restore_script(&config, Family::V6, &jumps(&config));
        assert!(script.contains("*raw\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n"), "{script}");
        assert!(script.contains("-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053"), "{script}");
        assert!(
            script.contains("-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m tcp --dport 53"),
            "{script}"
        );
        assert!(
            script.contains(&format!("-s {KUBELET_PROBE_IPV6} -p tcp")),
            "{script}"
        );
        assert!(!script.contains("127.0.0.1"), "{script}");
    }

    #[test]
    fn binaries_follow_the_configured_backend() {
        let config = RedirectionConfig {
            iptables: "/usr/sbin/iptables-legacy".into(),
            ..Default::default()
        };
        assert_eq!(
            config.binary(Family::V4, true),
            "/usr/sbin/iptables-legacy-restore"
        );
        assert_eq!(
            config.binary(Family::V6, false),
            "/usr/sbin/ip6tables-legacy"
        );
        assert_eq!(
            RedirectionConfig::default().binary(Family::V6, true),
            "ip6tables-restore"
        );
    }

    #[test]
    fn original_source_routing_matches_upstream() {
        assert_eq!(
            routing_rule().join(" "),
            "fwmark 0x111/0xfff pref 32764 lookup 100"
        );
        assert_eq!(
            routing_route(Family::V4).join(" "),
            "local 0.0.0.0/0 dev lo table 100"
        );
        assert_eq!(
            routing_route(Family::V6).join(" "),
            "local ::/0 dev lo table 100"
        );
    }
}
