//! Finding the network namespaces of pods that already run, for a node agent
//! that starts (or restarts) after its pods did: it learned their sandboxes
//! from CNI ADDs it never saw.
//!
//! Like upstream's node agent (istio/istio `cni/pkg/nodeagent/podcgroupns_linux.go`
//! `FindNetnsForPods`), every network namespace on the machine is a
//! candidate: those of the processes in `/proc/<pid>/ns/net`, and here also
//! the runtimes' bind mounts (`/run/netns`, `/var/run/netns`), which is where
//! the local cluster's pods live. The node's own namespace is never one.
//!
//! Upstream matches a process to a pod by the pod uid in its cgroup path and
//! then checks that the namespace holds one of the pod's addresses. Our
//! runtimes (the local cluster, the kube e2e node runtime) put no pod uid in
//! cgroups, so the key is the pod's address (`status.podIPs`), which is
//! unique among one node's pods: a pod's namespace is the one holding one of
//! its addresses. When several namespaces hold it (namespaces of other nodes
//! or other clusters sharing the machine, as on a developer's laptop), the
//! one whose processes' cgroup names the pod uid wins, as upstream; when
//! that still leaves zero or several, the pod is not found and the caller
//! handles it fail-closed. A candidate found through `/proc` is named by
//! the oldest process in it (the sandbox's), as upstream.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::debug;

use super::enrolment::PodKey;
use crate::inpod::Netns;

/// Where network namespaces are looked for.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// procfs of the machine's pid namespace (`/proc`; a host mount when the
    /// agent runs in a container).
    pub proc_dir: PathBuf,
    /// Directories of namespace bind mounts (`ip netns`, container runtimes).
    pub netns_dirs: Vec<PathBuf>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            proc_dir: PathBuf::from("/proc"),
            netns_dirs: vec![PathBuf::from("/run/netns"), PathBuf::from("/var/run/netns")],
        }
    }
}

/// A pod whose namespace is looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedPod {
    pub key: PodKey,
    pub uid: String,
    pub ips: Vec<IpAddr>,
}

/// The namespace found for a pod, and the path it was found at.
#[derive(Clone, Debug)]
pub struct FoundNetns {
    pub netns: Netns,
    pub path: PathBuf,
}

/// Why a pod's namespace was not found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "pod {0} has no address in the pod source (status.podIPs), so its network namespace cannot be recognised"
    )]
    NoAddress(PodKey),
    #[error("pod {pod}: no network namespace on this machine holds its address(es) {ips:?}")]
    NotFound { pod: PodKey, ips: Vec<IpAddr> },
    #[error(
        "pod {pod}: {} network namespaces hold its address(es) {ips:?} and no process in exactly one of them has the pod's uid in its cgroup: {}",
        paths.len(),
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Ambiguous {
        pod: PodKey,
        ips: Vec<IpAddr>,
        paths: Vec<PathBuf>,
    },
}

/// A namespace on the machine.
#[derive(Debug)]
struct Candidate {
    netns: Netns,
    /// A bind mount if there is one, else `/proc/<pid>/ns/net` of the
    /// oldest process seen in it.
    path: PathBuf,
    /// Start time of the process `path` names (`None`: a bind mount).
    oldest: Option<u64>,
    pids: Vec<u32>,
    ips: Vec<IpAddr>,
}

/// Looks for the namespace of each of `wanted`, never one of `exclude`
/// (inodes: the node's own namespace). Blocking: it enters every candidate
/// namespace to list its addresses.
pub fn find(
    config: &DiscoveryConfig,
    exclude: &[u64],
    wanted: &[WantedPod],
) -> Vec<(PodKey, Result<FoundNetns, DiscoveryError>)> {
    let candidates = candidates(config, exclude);
    let mut holders: BTreeMap<IpAddr, Vec<u64>> = BTreeMap::new();
    for (inode, candidate) in &candidates {
        for ip in &candidate.ips {
            holders.entry(*ip).or_default().push(*inode);
        }
    }
    wanted
        .iter()
        .map(|pod| {
            let found = match_pod(config, &candidates, &holders, pod);
            (pod.key.clone(), found)
        })
        .collect()
}

fn match_pod(
    config: &DiscoveryConfig,
    candidates: &BTreeMap<u64, Candidate>,
    holders: &BTreeMap<IpAddr, Vec<u64>>,
    pod: &WantedPod,
) -> Result<FoundNetns, DiscoveryError> {
    if pod.ips.is_empty() {
        return Err(DiscoveryError::NoAddress(pod.key.clone()));
    }
    let mut inodes: Vec<u64> = pod
        .ips
        .iter()
        .filter_map(|ip| holders.get(&ip.to_canonical()))
        .flatten()
        .copied()
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    if inodes.len() > 1 {
        let by_uid: Vec<u64> = inodes
            .iter()
            .copied()
            .filter(|inode| {
                candidates[inode].pids.iter().any(|pid| {
                    let cgroup = std::fs::read_to_string(
                        config.proc_dir.join(pid.to_string()).join("cgroup"),
                    )
                    .unwrap_or_default();
                    pod_uid_from_cgroup(&cgroup)
                        .is_some_and(|uid| uid.eq_ignore_ascii_case(&pod.uid))
                })
            })
            .collect();
        if by_uid.len() == 1 {
            inodes = by_uid;
        }
    }
    match inodes.as_slice() {
        [] => Err(DiscoveryError::NotFound {
            pod: pod.key.clone(),
            ips: pod.ips.clone(),
        }),
        [inode] => {
            let c = &candidates[inode];
            Ok(FoundNetns {
                netns: c.netns.clone(),
                path: c.path.clone(),
            })
        }
        several => Err(DiscoveryError::Ambiguous {
            pod: pod.key.clone(),
            ips: pod.ips.clone(),
            paths: several.iter().map(|i| candidates[i].path.clone()).collect(),
        }),
    }
}

/// Every namespace on the machine but `exclude`, with its addresses.
fn candidates(config: &DiscoveryConfig, exclude: &[u64]) -> BTreeMap<u64, Candidate> {
    let mut found: BTreeMap<u64, Candidate> = BTreeMap::new();
    for dir in &config.netns_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Not every file there is a mounted namespace (a runtime may be
            // half way through creating one): those do not open as one.
            let Ok(netns) = Netns::open(&path) else {
                continue;
            };
            if exclude.contains(&netns.inode()) {
                continue;
            }
            found.entry(netns.inode()).or_insert(Candidate {
                netns,
                path,
                oldest: None,
                pids: Vec::new(),
                ips: Vec::new(),
            });
        }
    }
    let pids = std::fs::read_dir(&config.proc_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids {
        let dir = config.proc_dir.join(pid.to_string());
        let path = dir.join("ns").join("net");
        // Processes come and go while we look: any of these may fail. The
        // link's target is the namespace itself (an nsfs inode).
        let Ok(inode) = std::fs::metadata(&path).map(|m| m.ino()) else {
            continue;
        };
        if exclude.contains(&inode) {
            continue;
        }
        let started = start_time(&dir);
        match found.get_mut(&inode) {
            Some(c) => {
                c.pids.push(pid);
                if let (Some(oldest), Some(started)) = (c.oldest, started)
                    && started < oldest
                {
                    c.oldest = Some(started);
                    c.path = path;
                }
            }
            None => {
                let Ok(netns) = Netns::open(&path) else {
                    continue;
                };
                if netns.inode() != inode {
                    continue;
                }
                found.insert(
                    inode,
                    Candidate {
                        netns,
                        path,
                        oldest: Some(started.unwrap_or(u64::MAX)),
                        pids: vec![pid],
                        ips: Vec::new(),
                    },
                );
            }
        }
    }
    for candidate in found.values_mut() {
        match candidate.netns.run(addresses) {
            Ok(Ok(ips)) => candidate.ips = ips,
            Ok(Err(e)) => {
                debug!(path = %candidate.path.display(), error = %e, "cannot list addresses")
            }
            Err(e) => debug!(path = %candidate.path.display(), error = %e, "cannot enter"),
        }
    }
    found
}

/// The addresses of the calling thread's network namespace.
fn addresses() -> Result<Vec<IpAddr>, nix::Error> {
    let mut ips: Vec<IpAddr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    Ok(ips)
}

/// A process's start time (clock ticks since boot, `stat` field 22).
fn start_time(proc_pid: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_pid.join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The pod uid in a process's `/proc/<pid>/cgroup`, in the shapes container
/// runtimes write it (`…/kubepods/burstable/pod<uid>/<container>`,
/// `…kubepods-besteffort-pod<uid with _>.slice…`): `pod` after a
/// punctuation character, then 8-4-4-4-12 hex digits whose groups may be
/// separated by one punctuation character, then punctuation. Returned with
/// dashes, as Kubernetes writes uids.
pub fn pod_uid_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(pod_uid_in_path)
}

fn pod_uid_in_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    path.match_indices("pod")
        .filter(|(at, _)| *at > 0 && bytes[at - 1].is_ascii_punctuation())
        .find_map(|(at, _)| uid_at(&bytes[at + 3..]))
}

fn uid_at(bytes: &[u8]) -> Option<String> {
    let mut uid = String::with_capacity(36);
    let mut i = 0;
    for (group, len) in [8, 4, 4, 4, 12].into_iter().enumerate() {
        if group > 0 {
            if bytes.get(i).is_some_and(u8::is_ascii_punctuation) {
                i += 1;
            }
            uid.push('-');
        }
        for _ in 0..len {
            let digit = *bytes.get(i).filter(|b| b.is_ascii_hexdigit())?;
            uid.push(char::from(digit));
            i += 1;
        }
    }
    bytes
        .get(i)
        .is_some_and(u8::is_ascii_punctuation)
        .then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_are_read_from_the_cgroup_shapes_runtimes_write() {
        let cases = [
            (
                "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961",
                Some("2c48913c-b29f-11e7-9350-020968147796"),
            ),
            (
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/docker-9bca8d63d5fa.scope",
                Some("2c48913c-b29f-11e7-9350-020968147796"),
            ),
            (
                "12:pids:/kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:b2a102854b49",
                Some("72f7f152-440c-66ac-9084-e0fc1d8a910c"),
            ),
            // No uid: a crio path, a plain session, a "pod" word that is not one.
            (
                "0::/../crio-45490e76e0878aaa4d9808f7d2eefba37f093c3efbba9838b6d8ab804d9bd814.scope",
                None,
            ),
            ("0::/user.slice/user-0.slice/session-1.scope", None),
            ("0::/system.slice/podman.service", None),
            // Too short to be a uid.
            ("0::/kubepods/pod2c48913c-b29f-11e7/abc", None),
        ];
        for (cgroup, want) in cases {
            assert_eq!(pod_uid_from_cgroup(cgroup).as_deref(), want, "{cgroup}");
        }
    }
}
