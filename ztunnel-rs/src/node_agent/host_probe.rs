//! The node's side of kubelet probes. Kubelet probes an enrolled pod from the
//! node; the pod's in-pod rules ([`super::iptables`]) let connections from
//! 169.254.7.127 through uncaptured, and these rules, in the node's network
//! namespace, make kubelet's connections come from that address. The shape
//! is upstream's (istio/istio `cni/pkg/iptables/iptables.go`
//! `AppendHostRules`, `cni/pkg/ipset`):
//!
//! ```text
//! ipset create istio-inpod-probes-v4 hash:ip family inet comment
//! iptables -t nat -N ISTIO_POSTRT
//! iptables -t nat -A POSTROUTING -j ISTIO_POSTRT
//! iptables -t nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp \
//!     -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127
//! ```
//!
//! and the IPv6 twins (`istio-inpod-probes-v6`, SNAT to
//! `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`). `--socket-exists` matches only
//! connections a process on the node opened (kubelet), never forwarded
//! traffic (kube-proxy's, another node's pods'), which must stay captured.
//!
//! The set holds the addresses of the pods ztunnel took, each entry
//! commented with its pod's uid: added once ztunnel acked the pod, removed
//! (only if the uid still matches: a new pod may have the address by then)
//! when the pod is released, and reconciled against the agent's pods when it
//! starts, as upstream's node agent does (`meshdataplane_linux.go`
//! `addPodToHostAddrSet`, `removePodFromHostAddrSet`, `syncHostAddrSets`).
//!
//! Everything here runs `iptables` and `ipset` (the Debian packages of those
//! names) on the calling thread's network namespace: the node's.

use std::collections::BTreeSet;
use std::net::IpAddr;

use api::ports;

use super::iptables::{self, Chains, Family, IptablesError, Jump, RedirectionConfig, Rule};

/// The chain in the node's nat table, as upstream names it.
pub const CHAIN_POSTROUTING: &str = "ISTIO_POSTRT";
/// The sets' common prefix; `-v4` and `-v6` are appended, as upstream.
pub const PROBE_SET: &str = "istio-inpod-probes";

/// Errors keeping the node's probe rules and set.
#[derive(Debug, thiserror::Error)]
pub enum HostProbeError {
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("cannot run {binary}: {source} (install the ipset package, or pass --ipset)")]
    SpawnIpset {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} {args} failed ({status}): {stderr}")]
    Ipset {
        binary: String,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "pod uid {0:?} cannot be an ipset comment (quotes, newlines, or longer than 255 bytes)"
    )]
    BadUid(String),
}

/// One address in the set, with the uid of the pod it was added for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeEntry {
    pub ip: IpAddr,
    pub uid: String,
}

/// What [`reconcile`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub added: Vec<ProbeEntry>,
    pub removed: Vec<ProbeEntry>,
}

/// The set of `family`'s addresses.
pub fn set_name(family: Family) -> String {
    match family {
        Family::V4 => format!("{PROBE_SET}-v4"),
        Family::V6 => format!("{PROBE_SET}-v6"),
    }
}

fn snat_address(family: Family) -> String {
    match family {
        Family::V4 => ports::KUBELET_PROBE_IPV4.to_string(),
        Family::V6 => iptables::KUBELET_PROBE_IPV6.to_string(),
    }
}

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

const JUMPS: &[Jump] = &[Jump {
    table: "nat",
    builtin: "POSTROUTING",
    target: CHAIN_POSTROUTING,
}];

const CHAINS: Chains<'static> = Chains {
    tables: &["nat"],
    names: &[CHAIN_POSTROUTING],
    jumps: JUMPS,
};

/// The rule of our chain for `family`.
pub fn rules(family: Family) -> Vec<Rule> {
    vec![Rule {
        table: "nat",
        chain: CHAIN_POSTROUTING,
        spec: format!(
            "-m owner --socket-exists -p tcp -m set --match-set {} dst -j SNAT --to-source {}",
            set_name(family),
            snat_address(family)
        ),
    }]
}

/// The `iptables-restore --noflush` input for `family`, with the jump when
/// it is missing.
pub fn restore_script(family: Family, jump_missing: bool) -> String {
    let missing: &[Jump] = if jump_missing { JUMPS } else { &[] };
    CHAINS.restore_script(missing, &rules(family))
}

/// Creates the sets (keeping their entries) and installs (or refreshes) the
/// chain, in the calling thread's network namespace.
pub fn install(config: &RedirectionConfig) -> Result<(), HostProbeError> {
    for &family in config.families() {
        let inet = match family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        };
        let name = set_name(family);
        ipset(
            config,
            &[
                "create", &name, "hash:ip", "family", inet, "comment", "-exist",
            ],
            None,
        )?;
        CHAINS.apply(config, family, &rules(family))?;
    }
    Ok(())
}

/// Removes the chain and destroys the sets; what is already gone is fine.
pub fn remove(config: &RedirectionConfig) -> Result<(), HostProbeError> {
    for &family in config.families() {
        CHAINS.remove(config, family)?;
        // The chain referring to the set is gone, so it can be destroyed.
        let name = set_name(family);
        if exists(config, &name)? {
            ipset(config, &["destroy", &name], None)?;
        }
    }
    Ok(())
}

/// Every entry of the sets.
pub fn entries(config: &RedirectionConfig) -> Result<Vec<ProbeEntry>, HostProbeError> {
    let mut all = Vec::new();
    for &family in config.families() {
        let name = set_name(family);
        let saved = ipset(config, &["save", &name], None)?;
        all.extend(parse_save(&name, &saved));
    }
    Ok(all)
}

/// Adds (or re-comments) the pod's addresses: a previous holder of an
/// address loses it to this pod.
pub fn add_pod(
    config: &RedirectionConfig,
    uid: &str,
    ips: &[IpAddr],
) -> Result<(), HostProbeError> {
    let entries: Vec<ProbeEntry> = ips
        .iter()
        .map(|ip| ProbeEntry {
            ip: ip.to_canonical(),
            uid: uid.to_string(),
        })
        .collect();
    apply(config, &[], &entries)
}

/// Removes the addresses commented with the pod's uid; an address another
/// pod has taken since stays.
pub fn remove_pod(config: &RedirectionConfig, uid: &str) -> Result<(), HostProbeError> {
    let stale: Vec<ProbeEntry> = entries(config)?
        .into_iter()
        .filter(|e| e.uid == uid)
        .collect();
    apply(config, &stale, &[])
}

/// Brings the sets to exactly `wanted`: entries of pods the agent no longer
/// has go, missing ones come.
pub fn reconcile(
    config: &RedirectionConfig,
    wanted: &[ProbeEntry],
) -> Result<Reconciled, HostProbeError> {
    let wanted: BTreeSet<ProbeEntry> = wanted
        .iter()
        .filter(|e| config.families().contains(&family_of(e.ip)))
        .map(|e| ProbeEntry {
            ip: e.ip.to_canonical(),
            uid: e.uid.clone(),
        })
        .collect();
    let present: BTreeSet<ProbeEntry> = entries(config)?.into_iter().collect();
    let changes = Reconciled {
        added: wanted.difference(&present).cloned().collect(),
        removed: present.difference(&wanted).cloned().collect(),
    };
    apply(config, &changes.removed, &changes.added)?;
    Ok(changes)
}

/// The `ipset restore` batch deleting `delete` then adding `add` (for
/// `-exist`: a missing entry deleted or a present one deleted first is no
/// error). An address of a family not installed is skipped.
pub fn batch(
    config: &RedirectionConfig,
    delete: &[ProbeEntry],
    add: &[ProbeEntry],
) -> Result<String, HostProbeError> {
    let installed = |e: &&ProbeEntry| config.families().contains(&family_of(e.ip));
    let mut script = String::new();
    for entry in delete.iter().chain(add).filter(installed) {
        script.push_str(&format!(
            "del {} {}\n",
            set_name(family_of(entry.ip)),
            entry.ip
        ));
    }
    for entry in add.iter().filter(installed) {
        let valid = !entry.uid.contains(['"', '\n', '\r']) && entry.uid.len() <= 255;
        if !valid {
            return Err(HostProbeError::BadUid(entry.uid.clone()));
        }
        script.push_str(&format!(
            "add {} {} comment \"{}\"\n",
            set_name(family_of(entry.ip)),
            entry.ip,
            entry.uid
        ));
    }
    Ok(script)
}

fn apply(
    config: &RedirectionConfig,
    delete: &[ProbeEntry],
    add: &[ProbeEntry],
) -> Result<(), HostProbeError> {
    let script = batch(config, delete, add)?;
    if script.is_empty() {
        return Ok(());
    }
    ipset(config, &["-exist", "restore"], Some(&script))?;
    Ok(())
}

/// Entries of `set` in `ipset save` output
/// (`add istio-inpod-probes-v4 10.244.0.5 comment "uid"`).
pub fn parse_save(set: &str, saved: &str) -> Vec<ProbeEntry> {
    saved
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("add ")?.strip_prefix(set)?;
            let mut words = rest.trim_start().splitn(2, ' ');
            let ip: IpAddr = words.next()?.parse().ok()?;
            let uid = words
                .next()
                .and_then(|r| r.trim().strip_prefix("comment "))
                .map(|c| c.trim().trim_matches('"').to_string())
                .unwrap_or_default();
            Some(ProbeEntry { ip, uid })
        })
        .collect()
}

fn exists(config: &RedirectionConfig, name: &str) -> Result<bool, HostProbeError> {
    let listed = ipset(config, &["list", "-n"], None)?;
    Ok(listed.lines().any(|l| l.trim() == name))
}

/// Runs the ipset binary; its stdout when it succeeds.
fn ipset(
    config: &RedirectionConfig,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, HostProbeError> {
    let output = iptables::run(&config.ipset, args, stdin).map_err(|e| match e {
        IptablesError::Spawn { binary, source } => HostProbeError::SpawnIpset { binary, source },
        other => HostProbeError::Iptables(other),
    })?;
    if !output.status.success() {
        return Err(HostProbeError::Ipset {
            binary: config.ipset.clone(),
            args: args.join(" "),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rules_match_upstream() {
        let v4 = restore_script(Family::V4, true);
        assert_eq!(
            v4,
            "*nat\n:ISTIO_POSTRT - [0:0]\n-A POSTROUTING -j ISTIO_POSTRT\n\
             -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127\n\
             COMMIT\n"
        );
        let v6 = restore_script(Family::V6, false);
        assert_eq!(
            v6,
            "*nat\n:ISTIO_POSTRT - [0:0]\n\
             -A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v6 dst -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n\
             COMMIT\n"
        );
    }

    #[test]
    fn save_output_is_parsed_with_its_comments() {
        let saved = "create istio-inpod-probes-v4 hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1\n\
                     add istio-inpod-probes-v4 10.244.0.5 comment \"7f1c-uid\"\n\
                     add istio-inpod-probes-v4 10.244.0.6\n\
                     add istio-inpod-probes-v4x 10.244.0.7 comment \"other set\"\n";
        assert_eq!(
            parse_save("istio-inpod-probes-v4", saved),
            vec![
                ProbeEntry {
                    ip: "10.244.0.5".parse().unwrap(),
                    uid: "7f1c-uid".into()
                },
                ProbeEntry {
                    ip: "10.244.0.6".parse().unwrap(),
                    uid: String::new()
                },
            ]
        );
    }

    #[test]
    fn batches_upsert_by_deleting_first_and_skip_families_not_installed() {
        let entry = |ip: &str, uid: &str| ProbeEntry {
            ip: ip.parse().unwrap(),
            uid: uid.into(),
        };
        let v4_only = RedirectionConfig {
            ipv6: false,
            ..RedirectionConfig::default()
        };
        let script = batch(
            &v4_only,
            &[entry("10.0.0.9", "old")],
            &[entry("10.0.0.5", "u1"), entry("fd00::5", "u1")],
        )
        .unwrap();
        assert_eq!(
            script,
            "del istio-inpod-probes-v4 10.0.0.9\ndel istio-inpod-probes-v4 10.0.0.5\n\
             add istio-inpod-probes-v4 10.0.0.5 comment \"u1\"\n"
        );
        let both = batch(
            &RedirectionConfig::default(),
            &[],
            &[entry("fd00::5", "u1")],
        )
        .unwrap();
        assert!(both.contains("add istio-inpod-probes-v6 fd00::5 comment \"u1\""));
        assert!(matches!(
            batch(&v4_only, &[], &[entry("10.0.0.5", "a\"b")]),
            Err(HostProbeError::BadUid(uid)) if uid == "a\"b"
        ));
    }
}
